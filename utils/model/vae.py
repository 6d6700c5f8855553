"""OpenSora VAE v1.2: the SDXL image VAE applied per frame, then a causal temporal VAE.

Upstream: ``opensora/models/vae/vae.py`` (``VideoAutoencoderKL``, ``VideoAutoencoderPipeline``,
``OpenSoraVAE_V1_2``) on branch ``opensora/v1.2``. Total compression T x4, H x8, W x8 into 4 channels.

- spatial: diffusers ``AutoencoderKL`` built from a config (no download), frames as images
  ``(B T) C H W`` in micro-batches of ``micro_batch_size``;
- temporal: ``utils.model.vae_temporal.TemporalVAE`` on chunks of ``micro_frame_size`` frames;
- latents normalised per channel with the ``shift`` / ``scale`` buffers.

State-dict names are upstream's (``spatial_vae.module.*``, ``temporal_vae.*``, ``scale``, ``shift``), so
``hpcai-tech/OpenSora-VAE-v1.2`` ``model.safetensors`` loads with ``strict=True``.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL
from torch import nn
from tqdm.auto import tqdm

from utils.model.vae_temporal import TemporalVAE

LATENT_CHANNELS = 4
VAE_COMPRESSION = (4, 8, 8)  # (T, H, W) pixels per latent
SPATIAL_SCALING_FACTOR = 0.18215  # upstream hard-codes the SD-1 constant, not the SDXL config's 0.13025

_SDXL_BLOCKS = dict(
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=LATENT_CHANNELS,
    act_fn="silu",
)

VAE_PRESETS = {
    # upstream OpenSoraVAE_V1_2(micro_batch_size=4, micro_frame_size=17)
    "OpenSoraVAE_V1_2": {
        # PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers subfolder "vae" config.json; scaling_factor and
        # force_upcast are carried for fidelity but unused (see SPATIAL_SCALING_FACTOR)
        "spatial_vae_config": dict(_SDXL_BLOCKS, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                   norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        # upstream VAE_Temporal_SD
        "temporal_vae_config": dict(in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=128, num_res_blocks=4,
                                    channel_multipliers=[1, 2, 2, 4], temporal_downsample=[False, True, True],
                                    num_groups=32, activation_fn="swish"),
        "pipeline_config": dict(micro_frame_size=17, micro_batch_size=4,
                                shift=[-0.10, 0.34, 0.27, 0.98], scale=[3.85, 2.32, 2.33, 3.06]),
    },
    # the tiny VAE of data/upstream/vae_v1_2_tiny_reference.json (upstream numerics, fixture weights)
    "tiny": {
        "spatial_vae_config": dict(_SDXL_BLOCKS, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
                                   norm_num_groups=4, sample_size=64, scaling_factor=0.13025, force_upcast=False),
        "temporal_vae_config": dict(in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=4, num_res_blocks=2,
                                    channel_multipliers=[1, 2, 2, 4], temporal_downsample=[False, True, True],
                                    num_groups=2, activation_fn="swish"),
        "pipeline_config": dict(micro_frame_size=17, micro_batch_size=4,
                                shift=[-0.10, 0.34, 0.27, 0.98], scale=[3.85, 2.32, 2.33, 3.06]),
    },
    # the quality testbed's VAE (utils.testbed.minimodel), trained here on 64x64 synthetic clips; its shift/scale
    # are measured on the training latents and stored in its checkpoint (these are placeholders)
    "mini": {
        "spatial_vae_config": dict(_SDXL_BLOCKS, block_out_channels=[16, 32, 32, 32], layers_per_block=1,
                                   norm_num_groups=8, sample_size=64, scaling_factor=0.13025, force_upcast=False),
        "temporal_vae_config": dict(in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=16, num_res_blocks=1,
                                    channel_multipliers=[1, 2, 2, 4], temporal_downsample=[False, True, True],
                                    num_groups=4, activation_fn="swish"),
        "pipeline_config": dict(micro_frame_size=17, micro_batch_size=None,
                                shift=[0.0, 0.0, 0.0, 0.0], scale=[1.0, 1.0, 1.0, 1.0]),
    },
}


# ---------------------------------------------------------------------------------------------
# spatial VAE
# ---------------------------------------------------------------------------------------------
class SpatialVAE(nn.Module):
    """Upstream ``VideoAutoencoderKL``: ``AutoencoderKL`` (as ``.module``) applied to every frame.

    ``micro_batch_size`` frames go through the image VAE at a time (``None``: all at once); it can be
    changed at run time and does not change the result beyond float reordering.
    """

    def __init__(self, config: dict, micro_batch_size: int | None):
        super().__init__()
        self.module = AutoencoderKL(**config)
        self.micro_batch_size = micro_batch_size
        # decodes a batch of latents elsewhere (the decoder exported to another runtime): utils.optim.onnx_backends
        self.decoder_runner = None

    def _frame_batches(self, frames: torch.Tensor):
        step = self.micro_batch_size or frames.shape[0]
        return (frames[start:start + step] for start in range(0, frames.shape[0], step))

    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Video [B, 3, T, H, W] -> latents [B, 4, T, H/8, W/8] (a posterior sample, or its mean)."""
        batch, _, frames, _, _ = x.shape
        images = x.transpose(1, 2).flatten(0, 1)  # (B T) C H W
        latents = []
        for chunk in self._frame_batches(images):
            posterior = self.module.encode(chunk).latent_dist
            latents.append((posterior.sample(generator) if sample else posterior.mode()) * SPATIAL_SCALING_FACTOR)
        latents = torch.cat(latents)  # (B T) 4 H/8 W/8
        return latents.unflatten(0, (batch, frames)).transpose(1, 2)  # B 4 T H/8 W/8

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, 4, T, h, w] -> video [B, 3, T, 8h, 8w]."""
        batch, _, frames, _, _ = z.shape
        latents = z.transpose(1, 2).flatten(0, 1)  # (B T) 4 h w
        chunks = tqdm(self._frame_batches(latents), desc="decode frames", unit="batch", leave=False,
                      total=-(-latents.shape[0] // (self.micro_batch_size or latents.shape[0])))
        decode = self.decoder_runner or (lambda latents: self.module.decode(latents).sample)
        images = torch.cat([decode(chunk / SPATIAL_SCALING_FACTOR) for chunk in chunks])  # (B T) 3 8h 8w
        return images.unflatten(0, (batch, frames)).transpose(1, 2)  # B 3 T 8h 8w


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
class OpenSoraVAE(nn.Module):
    """Upstream ``VideoAutoencoderPipeline`` at inference (``cal_loss=False``).

    Run-time knobs (memory against speed): ``micro_batch_size`` (frames per spatial VAE call) and
    ``micro_frame_size`` (frames per temporal VAE call; ``None``: whole video). ``micro_batch_size``
    keeps the numerics; ``micro_frame_size`` changes them (chunks are encoded independently), and
    checkpoints were trained with 17.
    """

    def __init__(self, spatial_vae_config: dict, temporal_vae_config: dict, pipeline_config: dict):
        super().__init__()
        self.spatial_vae = SpatialVAE(spatial_vae_config, pipeline_config["micro_batch_size"])
        self.temporal_vae = TemporalVAE(**temporal_vae_config)
        self.micro_frame_size = pipeline_config["micro_frame_size"]
        self.out_channels = self.temporal_vae.out_channels
        self.in_channels = spatial_vae_config["in_channels"]
        self._shift_values = tuple(pipeline_config["shift"])
        self._scale_values = tuple(pipeline_config["scale"])
        self.register_buffer("scale", torch.empty(1, len(self._scale_values), 1, 1, 1))
        self.register_buffer("shift", torch.empty(1, len(self._shift_values), 1, 1, 1))
        if self.scale.device.type != "meta":
            self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Restore the constant ``scale`` / ``shift`` buffers (called by ``weights.materialize_random``)."""
        self.scale.copy_(torch.tensor(self._scale_values).view(self.scale.shape))
        self.shift.copy_(torch.tensor(self._shift_values).view(self.shift.shape))

    @property
    def micro_batch_size(self) -> int | None:
        return self.spatial_vae.micro_batch_size

    @micro_batch_size.setter
    def micro_batch_size(self, value: int | None) -> None:
        self.spatial_vae.micro_batch_size = value

    @property
    def micro_z_frame_size(self) -> int | None:
        """Latent frames per temporal chunk (5 for 17 frames)."""
        return None if self.micro_frame_size is None else self.temporal_vae.latent_frames(self.micro_frame_size)

    @property
    def device(self) -> torch.device:
        return self.scale.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def get_latent_size(self, input_size: Sequence[int | None]) -> list[int | None]:
        """``[T, H, W]`` in pixels -> ``[t, h, w]`` latent size (``None`` stays ``None``).

        Upstream counts whole ``micro_frame_size`` chunks and the remainder separately:
        ``t = (T // 17) * 5 + ceil((T % 17) / 4)``; ``h = H // 8``, ``w = W // 8`` (floor).
        """
        frames, height, width = input_size
        _, patch_h, patch_w = VAE_COMPRESSION
        latent_h = None if height is None else height // patch_h
        latent_w = None if width is None else width // patch_w
        if frames is None:
            return [None, latent_h, latent_w]
        if self.micro_frame_size is None:
            return [self.temporal_vae.latent_frames(frames), latent_h, latent_w]
        whole_chunks, remainder = divmod(frames, self.micro_frame_size)
        latent_t = whole_chunks * self.micro_z_frame_size
        if remainder > 0:
            latent_t += self.temporal_vae.latent_frames(remainder)
        return [latent_t, latent_h, latent_w]

    @staticmethod
    def _check_video(x: torch.Tensor, name: str, channels: int) -> None:
        if x.dim() != 5 or x.shape[1] != channels:
            raise ValueError(f"{name} must be 5-D [B, {channels}, T, H, W] ({channels} channels); got shape {list(x.shape)}")

    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 4, t, H/8, W/8], t from ``get_latent_size``.

        ``sample=True`` draws from both posteriors as upstream does (spatial with ``generator``, temporal
        with ``torch.randn(generator=generator)``); ``sample=False`` takes their means.
        """
        self._check_video(x, "video", self.in_channels)
        x_z = self.spatial_vae.encode(x, sample=sample, generator=generator)  # B 4 T H/8 W/8
        step = self.micro_frame_size or x_z.shape[2]
        z_chunks = []
        for start in range(0, x_z.shape[2], step):
            posterior = self.temporal_vae.encode(x_z[:, :, start:start + step])  # over B 4 ceil(chunk/4) h w
            z_chunks.append(posterior.sample(generator) if sample else posterior.mode())
        z = torch.cat(z_chunks, dim=2)  # B 4 t h w
        return (z - self.shift) / self.scale

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latents [B, 4, t, h, w] -> video [B, 3, num_frames, 8h, 8w].

        ``num_frames`` is the pixel frame count the latents were made for; ``t`` must equal
        ``get_latent_size([num_frames, None, None])[0]``.
        """
        self._check_video(z, "latents", self.out_channels)
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        expected_t = self.get_latent_size([num_frames, None, None])[0]
        if z.shape[2] != expected_t:
            raise ValueError(f"{num_frames} frames need {expected_t} latent frames, got latents of shape {list(z.shape)}")
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)  # upstream casts the buffers to z's dtype
        z_step = self.micro_z_frame_size or z.shape[2]
        frame_step = self.micro_frame_size or num_frames
        x_z_chunks = []
        for chunk_index, start in enumerate(range(0, z.shape[2], z_step)):
            # upstream: num_frames=min(micro_frame_size, frames left); decides how much front padding to drop
            chunk_frames = min(frame_step, num_frames - chunk_index * frame_step)
            x_z_chunks.append(self.temporal_vae.decode(z[:, :, start:start + z_step], num_frames=chunk_frames))
        x_z = torch.cat(x_z_chunks, dim=2)  # B 4 num_frames h w
        return self.spatial_vae.decode(x_z)  # B 3 num_frames 8h 8w


def build_vae(preset: str = "OpenSoraVAE_V1_2", device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> OpenSoraVAE:
    """Build the VAE of ``preset`` (a key of ``VAE_PRESETS``) with freshly initialised weights.

    ``device="meta"`` allocates nothing (use ``weights.materialize_random`` or a checkpoint after);
    ``scale`` / ``shift`` then come back with ``reset_buffers()``.
    """
    if preset not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; accepted: {sorted(VAE_PRESETS)}")
    config = copy.deepcopy(VAE_PRESETS[preset])
    with torch.device(device):
        vae = OpenSoraVAE(**config)
    return vae.to(dtype=dtype).eval()
