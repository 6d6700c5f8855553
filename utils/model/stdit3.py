"""STDiT3: the OpenSora 1.2 diffusion transformer (upstream ``opensora/models/stdit/stdit3.py``).

Parameter names and shapes are upstream's, so the official ``hpcai-tech/OpenSora-STDiT-v3`` checkpoint
loads with ``strict=True``. Attention goes through ``F.scaled_dot_product_attention``. The caption
cross-attention attends to each sample's valid caption tokens only, as upstream's packed xformers call
does: the padding after the longest caption of the batch is dropped before the caption projection, and a
key mask is kept only where captions differ in length (never under CFG, whose null branch takes its
prompt's mask).
Shapes: B batch, T latent frames, S = h*w patches per frame, N = T*S tokens, C hidden size,
L caption tokens, H heads, D head dim.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.cache_utils import CacheMixin
from einops import rearrange
from torch import nn

with warnings.catch_warnings():
    # 0.5.3 (upstream's pin) decorates with the deprecated torch.cuda.amp.autocast at import time
    warnings.simplefilter("ignore", FutureWarning)
    from rotary_embedding_torch import RotaryEmbedding


# what the cross-attention attends to, stored in every record's config (measure.stages.record_config): records
# without it were measured when the faithful path attended to all 300 padded caption tokens with a key mask
CAPTION_KEYS = "valid caption tokens"


@dataclass(frozen=True)
class STDiT3Config:
    depth: int = 28  # spatial blocks; as many temporal blocks again, interleaved S0 T0 S1 T1 ...
    hidden_size: int = 1152  # C
    num_heads: int = 16  # head dim = C / num_heads = 72
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w): no temporal patching
    in_channels: int = 4  # VAE latent channels
    caption_channels: int = 4096  # T5-XXL d_model
    model_max_length: int = 300  # caption tokens; also rows of the learned null caption
    qk_norm: bool = True  # RMSNorm on q and k per head
    pred_sigma: bool = True  # output 2*in_channels; the sampler keeps the first half
    mlp_ratio: float = 4.0
    input_sq_size: int = 512  # reference side length for the position-embedding scale
    class_dropout_prob: float = 0.1  # training only (caption dropout)
    drop_path: float = 0.0  # training only

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


STDIT3_PRESETS = {
    "STDiT3-XL/2": STDiT3Config(),
    # the config of the shared upstream fixture (data/upstream/stdit3_tiny_reference.json)
    "tiny": STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8),
    # the quality testbed's model (utils.testbed.minimodel): trained here on 17x64x64 synthetic clips (80 tokens)
    "mini": STDiT3Config(depth=4, hidden_size=128, num_heads=4, caption_channels=64, model_max_length=24,
                         input_sq_size=64),
}

# fields of the hub's config.json that do not change the model on CPU
_HUB_ONLY_FIELDS = {
    "architectures", "model_type", "torch_dtype", "transformers_version", "enable_flash_attn",
    "enable_layernorm_kernel", "enable_sequence_parallelism", "freeze_y_embedder", "only_train_temporal",
    "skip_y_embedder",
}


def config_from_dict(fields: dict) -> STDiT3Config:
    """An ``STDiT3Config`` from a hub ``config.json`` dict, ignoring the fields that only matter upstream."""
    known = {f.name for f in dataclasses.fields(STDiT3Config)}
    unknown = set(fields) - known - _HUB_ONLY_FIELDS
    if unknown:
        warnings.warn(f"STDiT3 config fields ignored: {sorted(unknown)}")
    kwargs = {k: v for k, v in fields.items() if k in known}
    if "patch_size" in kwargs:
        kwargs["patch_size"] = tuple(kwargs["patch_size"])
    return STDiT3Config(**kwargs)


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Upstream ``LlamaRMSNorm``: normalised in fp32, cast back, then scaled by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Mlp(nn.Module):
    """timm ``Mlp`` as upstream uses it (names fc1/fc2, GELU with tanh approximation)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def frame_select(x_mask: torch.Tensor, x: torch.Tensor, x_zero: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """Per frame: ``x`` where ``x_mask[b, t]`` is True, else ``x_zero`` (upstream ``t_mask_select``)."""
    x = x.unflatten(1, (T, S))  # [B, T, S, C]
    x_zero = x_zero.unflatten(1, (T, S))
    return torch.where(x_mask[:, :, None, None], x, x_zero).flatten(1, 2)  # [B, N, C]


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, T, H, W = x.shape
        pt, ph, pw = self.patch_size
        # upstream zero-pads T, H and W at the end up to a multiple of the patch
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))
        x = self.proj(x)  # [B, C, T/pt, H/ph, W/pw]
        return x.flatten(2).transpose(1, 2)  # [B, N, C], tokens in (t, h, w) order


class PositionEmbedding2D(nn.Module):
    """Fixed sin-cos table over the patch grid, scaled to the pixel resolution (no parameters)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", self._inv_freq(dim), persistent=False)

    @staticmethod
    def _inv_freq(dim: int) -> torch.Tensor:
        half = dim // 2
        return 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))

    def reset_buffers(self) -> None:
        self.inv_freq = self._inv_freq(self.dim).to(self.inv_freq.device)

    def _sin_cos(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None] * self.inv_freq[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, h: int, w: int, scale: float, base_size: int, dtype: torch.dtype) -> torch.Tensor:
        rows = torch.arange(h, device=self.inv_freq.device) / scale * (base_size / h)
        cols = torch.arange(w, device=self.inv_freq.device) / scale * (base_size / w)
        grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")  # [h, w] each
        # upstream's meshgrid swaps the axes: the first half of the channels encodes the column (W)
        emb = torch.cat([self._sin_cos(grid_cols.reshape(-1)), self._sin_cos(grid_rows.reshape(-1))], dim=-1)
        return emb.unsqueeze(0).to(dtype)  # [1, S, C]


class TimestepEmbedder(nn.Module):
    """Sinusoid of a scalar (``[cos, sin]``, cos first) through Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(self.sinusoid(t, self.frequency_embedding_size).to(dtype))  # [B, C]


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        # the learned null caption used for classifier-free guidance (a persistent buffer upstream)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class SelfAttention(nn.Module):
    """Fused-qkv multi-head attention with per-head RMSNorm on q, k and optional RoPE (temporal)."""

    # the attention kernel (q, k, v [B, H, L, D]); utils.optim.attention.apply_attention swaps it per instance
    attention = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rotate=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # a bound method of the model's shared RoPE (as upstream), so `rope.freqs` is stored once
        self.rotate = rotate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rotate is not None:
            # upstream order (qk_norm_legacy=False): norm first, then RoPE over the sequence dim
            q, k = self.rotate(q), self.rotate(k)
        x = self.attention(q, k, v)  # [B, H, N, D]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def valid_caption(y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y`` [B, L, ...] and its boolean token mask [B, L] without the tokens after the last one any sample
    attends to; the mask is None when every sample attends to every kept token. Upstream packs the valid
    tokens of all samples (``masked_select``) and attends per sample: the same keys, the same maths. At
    least one token is kept, so a batch without any valid token keeps the zero output of a fully masked
    query (torch SDPA on CPU, xformers for an empty block)."""
    attended = mask.any(0).nonzero()
    length = int(attended[-1]) + 1 if len(attended) else 1
    mask = mask[:, :length]
    return y[:, :length], None if bool(mask.all()) else mask


class CrossAttention(nn.Module):
    """Visual tokens attend to their own sample's caption tokens (no norm, no gate, no modulation)."""

    # the attention kernel (q, k, v, attn_mask); utils.optim.attention.apply_attention swaps it per instance
    attention = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        L = y.shape[1]
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, D]
        kv = self.kv_linear(y).view(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [2, B, H, L, D]
        k, v = kv.unbind(0)
        # upstream: xformers BlockDiagonalMask over the valid tokens of each sample; the keys are those tokens
        # (encode_caption), a mask remains only where the samples' caption lengths differ
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, L]
        x = self.attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, D]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class STDiT3Block(nn.Module):
    def __init__(self, cfg: STDiT3Config, temporal: bool, rope: RotaryEmbedding | None = None):
        super().__init__()
        C = cfg.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(C, cfg.num_heads, cfg.qk_norm, rotate=rope.rotate_queries_or_keys if temporal else None)
        self.cross_attn = CrossAttention(C, cfg.num_heads)
        self.norm2 = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(C, int(C * cfg.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)

    def _modulation(self, t_mlp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B = t_mlp.shape[0]
        return (self.scale_shift_table[None] + t_mlp.reshape(B, 6, -1)).chunk(6, dim=1)  # 6 x [B, 1, C]

    def forward(self, x, y, key_mask, t_mlp, T, S, x_mask=None, t0_mlp=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulation(t_mlp)
        if x_mask is not None:
            shift_msa0, scale_msa0, gate_msa0, shift_mlp0, scale_mlp0, gate_mlp0 = self._modulation(t0_mlp)

        h = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        if x_mask is not None:
            h = frame_select(x_mask, h, t2i_modulate(self.norm1(x), shift_msa0, scale_msa0), T, S)

        if self.temporal:
            h = rearrange(h, "B (T S) C -> (B S) T C", T=T, S=S)
            h = self.attn(h)
            h = rearrange(h, "(B S) T C -> B (T S) C", T=T, S=S)
        else:
            h = rearrange(h, "B (T S) C -> (B T) S C", T=T, S=S)
            h = self.attn(h)
            h = rearrange(h, "(B T) S C -> B (T S) C", T=T, S=S)

        gated = gate_msa * h
        if x_mask is not None:
            gated = frame_select(x_mask, gated, gate_msa0 * h, T, S)
        x = x + gated

        x = x + self.cross_attn(x, y, key_mask)

        h = t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)
        if x_mask is not None:
            h = frame_select(x_mask, h, t2i_modulate(self.norm2(x), shift_mlp0, scale_mlp0), T, S)
        h = self.mlp(h)
        gated = gate_mlp * h
        if x_mask is not None:
            gated = frame_select(x_mask, gated, gate_mlp0 * h, T, S)
        return x + gated


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x, t, T, S, x_mask=None, t0=None):
        # modulated by the timestep embedding t itself, not t_mlp
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = t2i_modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            # upstream normalises and modulates the already-modulated x again for the t0 frames
            x = frame_select(x_mask, x, t2i_modulate(self.norm_final(x), shift0, scale0), T, S)
        return self.linear(x)  # [B, N, pt*ph*pw*C_out]


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
class STDiT3(nn.Module, CacheMixin):
    """The transformer. diffusers' ``CacheMixin`` gives it ``cache_context`` and ``is_cache_enabled``: the step
    caches of ``utils.optim.caching`` are diffusers hooks, which the sampler tells where the loop is."""

    def __init__(self, config: STDiT3Config):
        super().__init__()
        self.config = cfg = config
        C = cfg.hidden_size
        self.pos_embed = PositionEmbedding2D(C)
        self.rope = RotaryEmbedding(dim=cfg.head_dim)  # upstream: rotary-embedding-torch, interleaved pairs
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.fps_embedder = TimestepEmbedder(C)  # upstream SizeEmbedder: same maths, same names
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, C, cfg.model_max_length)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(cfg, temporal=False) for _ in range(cfg.depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(cfg, temporal=True, rope=self.rope) for _ in range(cfg.depth))
        self.final_layer = T2IFinalLayer(C, math.prod(cfg.patch_size), cfg.out_channels)
        # splits the tokens over ranks between the embedding and the final layer: utils.parallel.modes
        self.sequence_parallel = None
        # runs the blocks elsewhere (an exported stack on another runtime): utils.optim.onnx_backends
        self.block_runner = None

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def reset_buffers(self) -> None:
        """Restore the constants that random materialisation would overwrite (``rope.freqs``)."""
        head_dim = self.config.head_dim
        freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
        with torch.no_grad():
            self.rope.freqs.copy_(freqs)
        self.rope.cached_freqs = None

    def grid_size(self, x: torch.Tensor) -> tuple[int, int, int]:
        """Patch grid (T, h, w) of a latent ``x`` [B, C, T, H, W] after padding to the patch size."""
        return tuple(-(-n // p) for n, p in zip(x.shape[2:], self.config.patch_size))

    def encode_caption(self, y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Project the caption's valid tokens (``valid_caption``) and return them [B, L', C] with the
        boolean key mask [B, L'] (None where every sample attends to every kept token)."""
        B = y.shape[0]
        y = y.squeeze(1)  # [B, L, caption_channels]
        if mask is not None:
            if mask.shape[0] != B:
                # upstream repeats a smaller mask batch: CFG's null branch uses its prompt's token count
                mask = mask.repeat(B // mask.shape[0], 1)
            y, mask = valid_caption(y, mask.bool())
        return self.y_embedder(y), mask  # the embedder works per token: the dropped rows change nothing

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None, **kwargs):
        """x [B, C_in, T, H, W] latent; timestep [B] in [0, 1000]; y [B, 1, L, caption_channels];
        mask [B or 1, L] caption token mask; x_mask [B, T] (False frames get timestep-0 modulation);
        fps, height, width [B] (pixels). Returns float32 [B, C_out, T, H, W]. ``num_frames`` and
        ``ar`` are accepted and ignored, as upstream."""
        cfg = self.config
        dtype = self.dtype
        B, _, Tx, Hx, Wx = x.shape
        # upstream casts inputs to the weight dtype; in bf16 runs the timestep is rounded to bf16 here
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)

        T, h, w = self.grid_size(x)
        S = h * w
        base_size = round(S**0.5)
        # upstream reads the resolution from the first sample's (model-dtype) height and width tensors
        scale = (height[0].item() * width[0].item()) ** 0.5 / cfg.input_sq_size
        pos_emb = self.pos_embed(h, w, scale=scale, base_size=base_size, dtype=dtype)  # [1, S, C]

        t = self.t_embedder(timestep, dtype=dtype)  # [B, C]
        fps_emb = self.fps_embedder(fps.reshape(-1).repeat(B // fps.numel()), dtype=dtype)  # [B, C]
        t = t + fps_emb  # fps enters only by addition to t
        t_mlp = self.t_block(t)  # [B, 6C], shared by all blocks
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype=dtype) + fps_emb
            t0_mlp = self.t_block(t0)

        y, key_mask = self.encode_caption(y, mask)  # [B, L', C], [B, L'] or None

        x = self.x_embedder(x)  # [B, N, C]
        x = (x.unflatten(1, (T, S)) + pos_emb[:, None]).flatten(1, 2)  # same table added to every frame

        split = self.sequence_parallel
        x, S_part = (x, S) if split is None else split.split(x, T, S)  # this rank's spatial tokens
        if self.block_runner is not None:
            x = self.block_runner(x, y, key_mask, t_mlp, T, S_part, x_mask)
        else:
            for spatial_block, temporal_block in zip(self.spatial_blocks, self.temporal_blocks):
                x = spatial_block(x, y, key_mask, t_mlp, T, S_part, x_mask, t0_mlp)
                x = temporal_block(x, y, key_mask, t_mlp, T, S_part, x_mask, t0_mlp)
        if split is not None:
            x = split.gather(x, T, S)

        x = self.final_layer(x, t, T, S, x_mask, t0)  # [B, N, pt*ph*pw*C_out]
        x = self.unpatchify(x, T, h, w)[:, :, :Tx, :Hx, :Wx]  # crop the patch padding
        return x.float()  # upstream returns float32 whatever the model dtype

    def unpatchify(self, x: torch.Tensor, T: int, h: int, w: int) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        return rearrange(
            x,
            "B (T h w) (pt ph pw C) -> B C (T pt) (h ph) (w pw)",
            T=T, h=h, w=w, pt=pt, ph=ph, pw=pw, C=self.config.out_channels,
        )  # [B, C_out, T*pt, h*ph, w*pw]


def build_stdit3(preset: str | STDiT3Config = "STDiT3-XL/2", device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> STDiT3:
    """An STDiT3 in eval mode, from a preset name or a config; on ``meta`` it allocates nothing."""
    if isinstance(preset, STDiT3Config):
        config = preset
    elif preset in STDIT3_PRESETS:
        config = STDIT3_PRESETS[preset]
    else:
        raise ValueError(f"unknown STDiT3 preset {preset!r}; accepted: {', '.join(STDIT3_PRESETS)}")
    with torch.device(device):
        model = STDiT3(config)
    return model.to(dtype).eval()
