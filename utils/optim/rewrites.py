"""Rewrites of the expensive operations the stage profile found, each an ``apply_<name>(pipe, **options)``
step of ``utils.optim.registry`` that keeps every checkpoint name (modules are hooked, never replaced).

- ``cache_text_kv``: the caption projection and every cross-attention's key/value projection depend on
  the caption only, so they are computed at the first denoising step and reused while the caption batch
  (prompt and null caption, the CFG batch) is unchanged. Exact: the same numbers are reused.
- ``fused_rope``: the temporal RoPE as one complex multiply by a cached table of the same angles
  (upstream's rotary-embedding-torch makes ~8 passes over q and k per call: cos, scale, rotate_half,
  stack, sin, scale, add, cat). Exact within rounding (fp32); in bf16 the rotation is rounded once.
- ``fused_modulate``: ``LayerNorm(x) * (1 + scale) + shift`` as one LayerNorm with that weight and bias
  when the batch shares its modulation (CFG does: same timestep), and the gated residuals
  ``x + gate * h`` as one ``addcmul``. Exact within rounding.
- ``vae_channels_last``: the VAE's convolutions in channels-last layout (oneDNN's native one, no reorder
  per call). Exact within rounding (another accumulation order).

The three transformer rewrites are diffusers hooks (``diffusers.hooks.ModelHook``) registered through each
module's ``HookRegistry`` under the rewrite's name: ``remove_rewrite`` removes them (the original forwards
come back), and their memos (the caption's projections, the RoPE tables) are hook state, which
``clear_caches`` empties with the registry's ``reset_stateful_hooks``; a pipeline does so whenever its
transformer is loaded or released. ``vae_channels_last`` is a layout, not a hook.

Each has a model-level form (``cache_text_kv(model)``, ...) so a bare STDiT3, such as the block-pair proxy
of notebook 05, is rewritten the same way (``rewrite_model``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from einops import rearrange

from utils.model.pipeline import OpenSoraPipeline
from utils.model.stdit3 import STDiT3, STDiT3Block
from utils.optim.attention import set_attention

# the transformer rewrites of notebook 05 in the order they compose, with the options it uses
MODEL_REWRITES = ("attention", "cache_text_kv", "fused_rope", "fused_modulate")

REWRITES = {"attention": {"spatial": "best", "temporal": "best", "cross": "best"}, "cache_text_kv": {},
            "fused_rope": {}, "fused_modulate": {}, "vae_channels_last": {}}

# the rewrites that are hooks, each registered under its name on the modules it changes
HOOKED_REWRITES = ("cache_text_kv", "fused_rope", "fused_modulate")


def _blocks(model: STDiT3) -> tuple[STDiT3Block, ...]:
    return (*model.spatial_blocks, *model.temporal_blocks)


def _register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def rewrite_hooks(model: torch.nn.Module, name: str) -> list[ModelHook]:
    """The hooks the rewrite ``name`` registered on ``model``'s modules (none when it is not applied)."""
    registries = (getattr(module, "_diffusers_hook", None) for module in model.modules())
    return [registry.hooks[name] for registry in registries if registry is not None and name in registry.hooks]


def remove_rewrite(model: STDiT3, name: str) -> STDiT3:
    """Undo the hooked rewrite ``name`` on ``model``: its hooks go, with their memos, and every module it
    changed has its original forward (and RoPE) back. A pipeline's record of its steps
    (``pipe.optimizations``) is not changed."""
    if name not in HOOKED_REWRITES:
        raise ValueError(f"{name!r} is not a hooked rewrite; accepted: {', '.join(HOOKED_REWRITES)}")
    if not rewrite_hooks(model, name):
        raise ValueError(f"{name} is not applied to this model")
    HookRegistry.check_if_exists_or_initialize(model).remove_hook(name)
    return model


def clear_caches(model: torch.nn.Module) -> None:
    """Empty the memos of ``model``'s rewrites: the state of its stateful hooks."""
    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()


def _on_transformer_change(pipe: OpenSoraPipeline) -> None:
    """Empty the transformer's caches whenever it is loaded or released (new weights, or none)."""
    def clear(pipe_, component):
        if component == "transformer":
            clear_caches(pipe_.transformer)

    if not getattr(pipe, "_clears_rewrite_caches", False):
        pipe.load_hooks.append(clear)
        pipe.release_hooks.append(clear)
        pipe._clears_rewrite_caches = True


class MemoHook(ModelHook):
    """A hook whose state is the dict ``memo``, emptied in place by ``reset_stateful_hooks``."""

    _is_stateful = True

    def __init__(self, memo: dict | None = None):
        super().__init__()
        self.memo = {} if memo is None else memo

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.memo.clear()
        return module


# ---- the caption's projections, once per caption ------------------------------------------------------

class CaptionMemo(MemoHook):
    """On ``y_embedder``: its output, reused while the caption has the same value."""

    def new_forward(self, module: torch.nn.Module, caption: torch.Tensor) -> torch.Tensor:
        cached = self.memo.get("input")
        if (cached is not None and not caption.is_meta and cached.shape == caption.shape
                and cached.dtype == caption.dtype and cached.device == caption.device and torch.equal(cached, caption)):
            return self.memo["output"]
        output = self.fn_ref.original_forward(caption)
        if not caption.is_meta:
            self.memo.update(input=caption.clone(), output=output)  # a copy: the caller may reuse its buffer
        return output


class ProjectionMemo(MemoHook):
    """On a cross-attention's ``kv_linear``: its output, reused while its input is the same tensor, unmodified
    (the caption memo hands out the projected caption unchanged while the caption is)."""

    def new_forward(self, module: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        version = None if y.is_inference() else y._version  # inference tensors keep no version counter
        if self.memo.get("input") is y and self.memo.get("version") == version:
            return self.memo["output"]
        output = self.fn_ref.original_forward(y)
        if not y.is_meta:
            self.memo.update(input=y, version=version, output=output)
        return output


def cache_text_kv(model: STDiT3) -> STDiT3:
    """Memoise ``y_embedder`` (by the caption's value) and each ``cross_attn.kv_linear`` (by the identity
    of the projected caption): hooks named "cache_text_kv"."""
    _register(model.y_embedder, CaptionMemo(), "cache_text_kv")
    for block in _blocks(model):
        _register(block.cross_attn.kv_linear, ProjectionMemo(), "cache_text_kv")
    return model


# ---- temporal RoPE in one pass ------------------------------------------------------------------------

def _complex_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., D] as D/2 complex numbers (interleaved pairs), copying only if strides forbid a view
    (always contiguous under ``torch.compile``, which cannot trace ``storage_offset``)."""
    if (torch.compiler.is_compiling() or x.stride(-1) != 1 or x.storage_offset() % 2
            or any(s % 2 for s in x.stride()[:-1])):
        x = x.contiguous()
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


class FusedRoPE(MemoHook):
    """On a temporal ``SelfAttention``: its ``rotate`` (upstream's rotary-embedding-torch) becomes this hook's
    while registered; the memo is the complex tables, one per length, dtype and device, shared by the
    model's blocks. diffusers' hooks intercept only ``forward``: this one's forward passes through, the
    rewrite is the swapped ``rotate``."""

    def __init__(self, rope: torch.nn.Module, tables: dict):
        super().__init__(tables)
        self.rope = rope

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.upstream = module.rotate
        module.rotate = self.rotate
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # (diffusers' spelling)
        module.rotate = self.upstream
        return module

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` [B, H, T, D] rotated along T: upstream's angles (positions and frequencies in the
        activation dtype as rotary-embedding-torch computes them, cos and sin in that dtype), the
        rotation itself in fp32, rounded once."""
        length = t.shape[-2]
        key = (length, t.dtype, t.device)
        if key not in self.memo:
            rope = self.rope
            freqs = rope.forward(rope.get_seq_pos(length, device=t.device, dtype=t.dtype), seq_len=length)  # [T, D]
            # upstream repeats each angle over its pair: take one per pair
            self.memo[key] = torch.complex(freqs.cos()[:, ::2].float(), freqs.sin()[:, ::2].float())  # [T, D/2]
        rotated = _complex_view(t.float()) * self.memo[key]  # [B, H, T, D/2] complex
        return torch.view_as_real(rotated).flatten(-2).to(t.dtype)  # [B, H, T, D]


def fuse_rope(model: STDiT3) -> STDiT3:
    """The temporal blocks rotate q and k with a cached complex table of upstream's angles: hooks named
    "fused_rope" on their attentions."""
    tables: dict = {}
    for block in model.temporal_blocks:
        _register(block.attn, FusedRoPE(model.rope, tables), "fused_rope")
    return model


# ---- LayerNorm + modulation, gated residuals ----------------------------------------------------------

def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (shift, scale [B, 1, C]): one affine LayerNorm when every
    sample has the same modulation, upstream's three steps otherwise."""
    if shift.shape[0] == 1 or (torch.equal(shift, shift[:1].expand_as(shift))
                               and torch.equal(scale, scale[:1].expand_as(scale))):
        return F.layer_norm(x, x.shape[-1:], weight=1 + scale[0, 0], bias=shift[0, 0], eps=eps)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


class FusedModulate(ModelHook):
    """On an ``STDiT3Block``: its forward with the fused norm/modulation and gated residuals; the
    image-to-video path (``x_mask``, per-frame modulation) runs the original."""

    def new_forward(self, block: STDiT3Block, x, y, key_mask, t_mlp, T, S, x_mask=None, t0_mlp=None):
        if x_mask is not None:
            return self.fn_ref.original_forward(x, y, key_mask, t_mlp, T, S, x_mask, t0_mlp)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block._modulation(t_mlp)
        h = modulated_norm(x, shift_msa, scale_msa, block.norm1.eps)  # [B, N, C]
        if block.temporal:
            h = rearrange(h, "B (T S) C -> (B S) T C", T=T, S=S)
            h = rearrange(block.attn(h), "(B S) T C -> B (T S) C", T=T, S=S)
        else:
            h = rearrange(h, "B (T S) C -> (B T) S C", T=T, S=S)
            h = rearrange(block.attn(h), "(B T) S C -> B (T S) C", T=T, S=S)
        x = torch.addcmul(x, gate_msa, h)  # x + gate_msa * h
        x = x + block.cross_attn(x, y, key_mask)
        h = block.mlp(modulated_norm(x, shift_mlp, scale_mlp, block.norm2.eps))
        return torch.addcmul(x, gate_mlp, h)


def fuse_modulate(model: STDiT3) -> STDiT3:
    """Every block's forward fused (``FusedModulate``): hooks named "fused_modulate"."""
    for block in _blocks(model):
        _register(block, FusedModulate(), "fused_modulate")
    return model


# ---- the VAE's layout ---------------------------------------------------------------------------------

VAE_PARTS = ("spatial", "temporal")


def vae_channels_last(vae, parts=("spatial",)):
    """Conv weights of the 2D VAE in ``channels_last`` and/or of the temporal VAE in ``channels_last_3d``;
    activations follow the weights' layout through oneDNN's convolutions."""
    unknown = set(parts) - set(VAE_PARTS)
    if unknown:
        raise ValueError(f"unknown VAE parts {sorted(unknown)}; accepted: {', '.join(VAE_PARTS)}")
    if "spatial" in parts:
        vae.spatial_vae.module.to(memory_format=torch.channels_last)
    if "temporal" in parts:
        vae.temporal_vae.to(memory_format=torch.channels_last_3d)
    return vae


# ---- the steps ----------------------------------------------------------------------------------------

def apply_cache_text_kv(pipe: OpenSoraPipeline) -> OpenSoraPipeline:
    """Caption projection and cross-attention K/V computed once per caption batch, reused by every
    denoising step (held memory: the projected caption and 2 x L x C per block)."""
    cache_text_kv(pipe.transformer)
    _on_transformer_change(pipe)
    return pipe


def apply_fused_rope(pipe: OpenSoraPipeline) -> OpenSoraPipeline:
    fuse_rope(pipe.transformer)
    _on_transformer_change(pipe)
    return pipe


def apply_fused_modulate(pipe: OpenSoraPipeline) -> OpenSoraPipeline:
    fuse_modulate(pipe.transformer)
    return pipe


def apply_vae_channels_last(pipe: OpenSoraPipeline, parts=("spatial",)) -> OpenSoraPipeline:
    """The VAE's convolutions in channels-last layout (``parts``: "spatial" 2D decoder/encoder, "temporal"
    3D); a released VAE goes back to the default layout (random materialisation and checkpoint loading
    expect it) and is laid out again when loaded. A VAE not loaded yet is laid out when it is (materialising
    weights into a channels-last module on the meta device fails)."""
    if pipe.is_loaded("vae"):
        vae_channels_last(pipe.vae, parts)

    def relayout(pipe_, component):
        if component == "vae":
            vae_channels_last(pipe_.vae, parts)

    def default_layout(pipe_, component):
        if component == "vae":
            pipe_.vae.to(memory_format=torch.contiguous_format)

    pipe.load_hooks.append(relayout)
    pipe.release_hooks.append(default_layout)
    return pipe


MODEL_FUNCTIONS = {"attention": lambda model, **o: set_attention(model, **o), "cache_text_kv": cache_text_kv,
                   "fused_rope": fuse_rope, "fused_modulate": fuse_modulate}


def rewrite_model(model: STDiT3, steps: dict[str, dict]) -> STDiT3:
    """Apply the transformer rewrites among ``steps`` (name -> options) to a bare STDiT3, in the
    registry's order; VAE and precision steps are ignored here."""
    for name in MODEL_REWRITES:
        if name in steps:
            MODEL_FUNCTIONS[name](model, **(steps[name] or {}))
    return model
