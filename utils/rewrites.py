"""Rewrites of the expensive operations the stage profile found, each an ``apply_<name>(pipe, **options)``
step of ``utils.optimize`` that keeps every checkpoint name (modules are patched, never replaced).

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

Each has a model-level form (``cache_text_kv(model)``, ...) so a bare STDiT3, such as the block-pair proxy
of notebook 05, is rewritten the same way (``rewrite_model``).
"""
from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn.functional as F
from einops import rearrange

from .attention import set_attention
from .pipeline import OpenSoraPipeline
from .stdit3 import STDiT3, STDiT3Block

# the transformer rewrites of notebook 05 in the order they compose, with the options it uses
MODEL_REWRITES = ("attention", "cache_text_kv", "fused_rope", "fused_modulate")
REWRITES = {"attention": {"spatial": "best", "temporal": "best", "cross": "best"}, "cache_text_kv": {},
            "fused_rope": {}, "fused_modulate": {}, "vae_channels_last": {}}


def _caches(model) -> list[dict]:
    """The run-time caches a rewrite attached to ``model`` (emptied when its weights change)."""
    return model.__dict__.setdefault("_rewrite_caches", [])


def clear_caches(model) -> None:
    for cache in _caches(model):
        cache.clear()


def _on_transformer_change(pipe: OpenSoraPipeline) -> None:
    """Empty the transformer's caches whenever it is loaded or released (new weights, or none)."""
    def clear(pipe_, component):
        if component == "transformer":
            clear_caches(pipe_.transformer)

    if not getattr(pipe, "_clears_rewrite_caches", False):
        pipe.load_hooks.append(clear)
        pipe.release_hooks.append(clear)
        pipe._clears_rewrite_caches = True


# ---- the caption's projections, once per caption ------------------------------------------------------

def cache_text_kv(model: STDiT3) -> STDiT3:
    """Memoise ``y_embedder`` (by the caption's value) and each ``cross_attn.kv_linear`` (by the identity
    of the projected caption, which the memo hands out unchanged while the caption is)."""
    embedder = model.y_embedder
    caption_cache: dict = {}
    _caches(model).append(caption_cache)

    def embed(caption):
        cached = caption_cache.get("input")
        if (cached is not None and not caption.is_meta and cached.shape == caption.shape
                and cached.dtype == caption.dtype and cached.device == caption.device and torch.equal(cached, caption)):
            return caption_cache["output"]
        output = type(embedder).forward(embedder, caption)
        if not caption.is_meta:
            caption_cache.update(input=caption.clone(), output=output)  # a copy: the caller may reuse its buffer
        return output

    embedder.forward = embed
    for block in (*model.spatial_blocks, *model.temporal_blocks):
        linear = block.cross_attn.kv_linear
        kv_cache: dict = {}
        _caches(model).append(kv_cache)

        def project(y, _linear=linear, _cache=kv_cache):
            version = None if y.is_inference() else y._version  # inference tensors keep no version counter
            if _cache.get("y") is y and _cache.get("version") == version:
                return _cache["kv"]
            kv = type(_linear).forward(_linear, y)
            if not y.is_meta:
                _cache.update(y=y, version=version, kv=kv)
            return kv

        linear.forward = project
    return model


# ---- temporal RoPE in one pass ------------------------------------------------------------------------

def _complex_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., D] as D/2 complex numbers (interleaved pairs), copying only if strides forbid a view."""
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def fuse_rope(model: STDiT3) -> STDiT3:
    """The temporal blocks rotate q and k with a cached complex table (per length and dtype) of
    upstream's angles: positions and frequencies in the activation dtype as rotary-embedding-torch
    computes them, cos and sin in that dtype; the rotation itself in fp32, rounded once."""
    rope = model.rope
    tables: dict = {}
    _caches(model).append(tables)

    def rotate(t: torch.Tensor) -> torch.Tensor:  # t [B, H, T, D], rotated along T
        length = t.shape[-2]
        key = (length, t.dtype, t.device)
        if key not in tables:
            freqs = rope.forward(rope.get_seq_pos(length, device=t.device, dtype=t.dtype), seq_len=length)  # [T, D]
            # upstream repeats each angle over its pair: take one per pair
            tables[key] = torch.complex(freqs.cos()[:, ::2].float(), freqs.sin()[:, ::2].float())  # [T, D/2]
        rotated = _complex_view(t.float()) * tables[key]  # [B, H, T, D/2] complex
        return torch.view_as_real(rotated).flatten(-2).to(t.dtype)  # [B, H, T, D]

    for block in model.temporal_blocks:
        block.attn.rotate = rotate
    return model


# ---- LayerNorm + modulation, gated residuals ----------------------------------------------------------

def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (shift, scale [B, 1, C]): one affine LayerNorm when every
    sample has the same modulation, upstream's three steps otherwise."""
    if shift.shape[0] == 1 or (torch.equal(shift, shift[:1].expand_as(shift))
                               and torch.equal(scale, scale[:1].expand_as(scale))):
        return F.layer_norm(x, x.shape[-1:], weight=1 + scale[0, 0], bias=shift[0, 0], eps=eps)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


def _fused_block_forward(self: STDiT3Block, x, y, key_mask, t_mlp, T, S, x_mask=None, t0_mlp=None):
    """``STDiT3Block.forward`` with the fused norm/modulation and gated residuals; the image-to-video
    path (``x_mask``, per-frame modulation) runs the original."""
    if x_mask is not None:
        return STDiT3Block.forward(self, x, y, key_mask, t_mlp, T, S, x_mask, t0_mlp)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulation(t_mlp)
    h = modulated_norm(x, shift_msa, scale_msa, self.norm1.eps)  # [B, N, C]
    if self.temporal:
        h = rearrange(h, "B (T S) C -> (B S) T C", T=T, S=S)
        h = rearrange(self.attn(h), "(B S) T C -> B (T S) C", T=T, S=S)
    else:
        h = rearrange(h, "B (T S) C -> (B T) S C", T=T, S=S)
        h = rearrange(self.attn(h), "(B T) S C -> B (T S) C", T=T, S=S)
    x = torch.addcmul(x, gate_msa, h)  # x + gate_msa * h
    x = x + self.cross_attn(x, y, key_mask)
    h = self.mlp(modulated_norm(x, shift_mlp, scale_mlp, self.norm2.eps))
    return torch.addcmul(x, gate_mlp, h)


def fuse_modulate(model: STDiT3) -> STDiT3:
    for block in (*model.spatial_blocks, *model.temporal_blocks):
        block.forward = types.MethodType(_fused_block_forward, block)
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
    expect it) and is laid out again when loaded."""
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


# ---- measurement helpers for notebook 05 -------------------------------------------------------------

def synthetic_caption(pipe: OpenSoraPipeline, prompt: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings drawn at random (T5-XXL is not run) with the real token mask of ``prompt``
    (the pipeline's tokenizer, upstream's preprocessing): y [1, 1, L, D] in the transformer dtype, mask [1, L]."""
    from .pipeline import AESTHETIC_SCORE
    from .text_encoder import append_score_to_prompts, text_preprocessing

    text = [text_preprocessing(p) for p in append_score_to_prompts([prompt], aes=AESTHETIC_SCORE)]
    _, mask = pipe.text_encoder.tokenize(text)
    cfg = pipe.transformer.config
    y = torch.randn(1, 1, cfg.model_max_length, cfg.caption_channels, generator=torch.Generator().manual_seed(seed))
    return y.to(pipe.dtypes["transformer"]), mask


def pair_model(pipe: OpenSoraPipeline, dtype: torch.dtype, seed: int = 0) -> STDiT3:
    """A depth-1 copy of the pipeline's transformer (one spatial and one temporal block, embedders and
    final layer), random weights drawn with ``seed``."""
    from .stdit3 import build_stdit3
    from .weights import materialize_random

    config = dataclasses.replace(pipe.transformer.config, depth=1)
    return materialize_random(build_stdit3(config, device="meta"), dtype, seed=seed).eval()


def pair_inputs(pipe: OpenSoraPipeline, setting, y: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> tuple:
    """(args, kwargs) of one CFG transformer call at ``setting``: noise, timestep, the caption batch
    [prompt; null caption] and the model arguments."""
    cfg = pipe.transformer.config
    noise = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, *pipe.latent_size(setting), generator=noise).to(dtype)
    null = torch.randn(1, 1, *y.shape[2:], generator=torch.Generator().manual_seed(2)).to(dtype)
    caption = torch.cat([y.to(dtype), null])  # [prompt; null caption]
    return (x, torch.full((2,), 500.0)), dict(y=caption, mask=mask, **pipe.model_args(2, setting))


def compare(output: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """Max absolute and relative L2 difference of ``output`` against ``expected`` (in float64)."""
    output, expected = output.double(), expected.double()
    difference = output - expected
    return dict(max_abs_diff=float(difference.abs().max()),
                rel_l2_diff=float(difference.norm() / expected.norm().clamp_min(1e-300)))


def caption_projection_seconds(model: STDiT3, y_cfg: torch.Tensor, warmup: int, repeats: int, threads: int,
                               busy_retries: int = 3):
    """Timing of what ``cache_text_kv`` computes once per caption instead of every step: the caption
    projection and every block's K/V projection of it (the modules' own forwards, not the memo)."""
    from .benchmark import measure

    embedder = model.y_embedder
    linears = [b.cross_attn.kv_linear for b in (*model.spatial_blocks, *model.temporal_blocks)]

    def project():
        y = type(embedder).forward(embedder, y_cfg.squeeze(1))
        return [type(linear).forward(linear, y) for linear in linears]

    with torch.inference_mode():
        return measure(project, warmup=warmup, repeats=repeats, threads=threads, max_busy_retries=busy_retries)


def decode_parts(vae, latents: torch.Tensor, num_frames: int, warmup: int, repeats: int, threads: int,
                 busy_retries: int = 3) -> dict:
    """The two halves of a decode at the VAE's chunking, timed alone: the temporal decoder on the first
    chunk of latents (``temporal_chunk``) and the 2D decoder on the first micro-batch of its frames
    (``spatial_batch``). Each Timing's ``result`` is that part's output."""
    from .benchmark import measure
    from .vae import SPATIAL_SCALING_FACTOR

    z = latents[:, :, :vae.micro_z_frame_size].to(vae.dtype)
    z = z * vae.scale.to(z.dtype) + vae.shift.to(z.dtype)
    chunk_frames = min(vae.micro_frame_size or num_frames, num_frames)
    with torch.inference_mode():
        temporal = measure(vae.temporal_vae.decode, z, num_frames=chunk_frames, warmup=warmup, repeats=repeats,
                           threads=threads, max_busy_retries=busy_retries)
        frames = temporal.result.transpose(1, 2).flatten(0, 1)[:vae.micro_batch_size or chunk_frames]  # (B T) 4 h w
        spatial = measure(lambda: vae.spatial_vae.module.decode(frames / SPATIAL_SCALING_FACTOR).sample,
                          warmup=warmup, repeats=repeats, threads=threads, max_busy_retries=busy_retries)
    return {"temporal_chunk": temporal, "spatial_batch": spatial, "frames_per_batch": len(frames)}


def derived_decode_seconds(parts: dict, vae, num_frames: int, latent_frames: int) -> float:
    """A whole decode from its parts: every temporal chunk as the first (the last may be shorter) and
    every frame at the first micro-batch's per-frame time."""
    chunks = -(-latent_frames // (vae.micro_z_frame_size or latent_frames))
    per_frame = parts["spatial_batch"].median_s / parts["frames_per_batch"]
    return chunks * parts["temporal_chunk"].median_s + num_frames * per_frame


def measure_with_memory(fn, *args, warmup: int, repeats: int, threads: int, busy_retries: int = 3, **kwargs):
    """``benchmark.measure`` under inference mode, plus the peak RSS increase over the resident set
    just before it (the call's working set; the Timing's own peak is the whole process's)."""
    import psutil

    from .benchmark import measure
    from .memory import return_freed_memory

    return_freed_memory()
    before = psutil.Process().memory_info().rss
    with torch.inference_mode():
        timing = measure(fn, *args, warmup=warmup, repeats=repeats, threads=threads, max_busy_retries=busy_retries,
                         **kwargs)
    return timing, timing.peak_rss_bytes - before


def spatial_micro_batches(vae, latents: torch.Tensor, sizes, warmup: int, repeats: int, threads: int,
                          busy_retries: int = 3) -> dict:
    """Per micro-batch size (frames per 2D-decoder call): the Timing of one call and its peak RSS
    increase (``measure_with_memory``)."""
    from .vae import SPATIAL_SCALING_FACTOR

    frames = latents.transpose(1, 2).flatten(0, 1).to(vae.dtype)  # (B T) 4 h w
    out = {}
    for size in sizes:
        if size > len(frames):
            frames = frames.repeat(-(-size // len(frames)), 1, 1, 1)
        batch = frames[:size] / SPATIAL_SCALING_FACTOR
        timing, increase = measure_with_memory(lambda: vae.spatial_vae.module.decode(batch).sample, warmup=warmup,
                                               repeats=repeats, threads=threads, busy_retries=busy_retries)
        timing.result = None
        out[size] = dict(timing=timing, peak_increase_bytes=increase)
    return out


def group_breakdown(model: STDiT3, args: tuple, kwargs: dict) -> dict[str, float]:
    """Milliseconds per module group of one call of ``model`` under the profiler
    (``profiling.module_breakdown``), "other" being the profiled call's wall time minus the groups: the
    split notebook 02 makes of a denoising step."""
    import time

    from .profiling import STDIT3_GROUPS, module_breakdown

    start = time.perf_counter()
    with torch.inference_mode():
        groups = module_breakdown(model, model, *args, groups=STDIT3_GROUPS, **kwargs)
    groups["other"] = max((time.perf_counter() - start) * 1e3 - sum(groups.values()), 0.0)
    return groups


def compare_step(pipe: OpenSoraPipeline, setting, y: torch.Tensor, mask: torch.Tensor, steps: dict, warmup: int,
                 repeats: int, threads: int, busy_retries: int = 3) -> dict:
    """One denoising step of ``pipe`` (transformer loaded) timed as it is, then again after
    ``optimize.apply(pipe, steps)``; plus the caption projections the caches compute once per video.
    Returns Timings ``baseline``, ``rewritten`` (``.result``: the step's latents), ``projection``, the
    peak RSS increases, the latents and the applied steps' description."""
    from dataclasses import replace

    from .optimize import apply, describe

    one_step = replace(setting, steps=1)
    z = pipe.prepare_latents(1, setting)
    caption = y.to(pipe.dtypes["transformer"])
    measured = {}
    for variant in ("baseline", "rewritten"):
        if variant == "rewritten":
            apply(pipe, steps)
        measured[variant], measured[f"{variant}_increase"] = measure_with_memory(
            pipe.denoise, z, caption, mask, one_step, progress=False, warmup=warmup, repeats=repeats, threads=threads,
            busy_retries=busy_retries)
    null = pipe.transformer.y_embedder.y_embedding[None, None]
    measured["projection"] = caption_projection_seconds(pipe.transformer, torch.cat([caption, null]), warmup, repeats,
                                                        threads, busy_retries)
    measured["description"] = describe(pipe)
    return measured


def compare_decode(pipe: OpenSoraPipeline, latents: torch.Tensor, setting, latent_frames: int, steps: dict,
                   micro_batch_sizes, warmup: int, repeats: int, threads: int, busy_retries: int = 3,
                   full_decode: bool = False) -> dict:
    """The decode parts (``decode_parts``) of ``pipe`` (VAE loaded) as it is and after
    ``optimize.apply(pipe, steps)``, the whole decode too with ``full_decode``, the 2D decoder per
    micro-batch size after the steps, and per variant the decode seconds of one video (the measured
    whole decode, else derived from the parts)."""
    from .benchmark import measure
    from .optimize import apply

    out = {"parts": {}, "full": {}, "video": {}}
    for variant in ("baseline", "rewritten"):
        if variant == "rewritten":
            apply(pipe, steps)
        out["parts"][variant] = decode_parts(pipe.vae, latents, setting.num_frames, warmup, repeats, threads,
                                             busy_retries)
        out["full"][variant] = (measure(pipe.decode, latents, setting, warmup=warmup, repeats=repeats,
                                        threads=threads, max_busy_retries=busy_retries) if full_decode else None)
        out["video"][variant] = (out["full"][variant].median_s if full_decode else
                                 derived_decode_seconds(out["parts"][variant], pipe.vae, setting.num_frames,
                                                        latent_frames))
    out["micro"] = spatial_micro_batches(pipe.vae, latents, micro_batch_sizes, warmup, 1, threads, busy_retries)
    return out
