"""The temporal half of OpenSora VAE v1.2: ``VAE_Temporal`` (built by ``VAE_Temporal_SD`` upstream).

A MAGVIT-v2-style causal 3D-conv VAE that runs on the 4-channel latents of the spatial SDXL VAE and
compresses time by 4 (no spatial compression). Upstream: ``opensora/models/vae/vae_temporal.py`` and
``opensora/models/vae/utils.py`` on branch ``opensora/v1.2``. Module and parameter names are upstream's,
so ``temporal_vae.*`` checkpoint keys load with ``strict=True``.

Layout ``B C T H W`` throughout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU}  # upstream get_activation_fn


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
class CausalConv3d(nn.Module):
    """``nn.Conv3d`` that pads time at the front only, so frame t never sees frames after t.

    Time padding is ``k_t - 1 + (1 - stride_t)`` zeros in front (upstream ``time_causal_padding``; a
    stride-2 conv gets one frame less so that T frames give T/2). Height and width get ``k // 2`` zeros
    on both sides.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: tuple[int, int, int] = (1, 1, 1), bias: bool = True):
        super().__init__()
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size,) * 3
        time_kernel, height_kernel, width_kernel = kernel_size
        time_pad = time_kernel - 1 + (1 - stride[0])
        # F.pad order: (W left, W right, H top, H bottom, T front, T back)
        self.causal_padding = (width_kernel // 2, width_kernel // 2, height_kernel // 2, height_kernel // 2, time_pad, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.causal_padding, mode="constant")  # B C T+pad H+2ph W+2pw
        return self.conv(x)  # B C' T' H W


class ResBlock(nn.Module):
    """GroupNorm -> act -> conv3 -> GroupNorm -> act -> conv3, plus a (1x1x1-projected) residual.

    All convs are bias-free (upstream MAGVIT choice); ``conv3`` exists only when channels change.
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, activation: type[nn.Module]):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activate = activation()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        if in_channels != out_channels:
            # upstream use_conv_shortcut=False: a 1x1x1 projection, not a 3x3x3 conv
            self.conv3 = CausalConv3d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.in_channels == self.out_channels else self.conv3(x)  # B C_out T H W
        x = self.conv1(self.activate(self.norm1(x)))  # B C_out T H W
        x = self.conv2(self.activate(self.norm2(x)))
        return x + residual


def _res_blocks(in_channels: int, out_channels: int, count: int, num_groups: int, activation) -> nn.ModuleList:
    """``count`` ResBlocks, the first mapping ``in_channels -> out_channels``."""
    channels = [in_channels] + [out_channels] * count
    return nn.ModuleList(ResBlock(channels[i], out_channels, num_groups, activation) for i in range(count))


# ---------------------------------------------------------------------------------------------
# encoder and decoder
# ---------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """conv_in -> per stage (ResBlocks, then a stride-(2,1,1) conv where time is downsampled) ->
    ResBlocks -> GroupNorm -> act -> 1x1x1 conv to ``out_channels`` (mean and logvar)."""

    def __init__(self, in_channels: int, out_channels: int, filters: int, num_res_blocks: int,
                 channel_multipliers: tuple[int, ...], temporal_downsample: tuple[bool, ...],
                 num_groups: int, activation: type[nn.Module]):
        super().__init__()
        self.activate = activation()
        self.conv_in = CausalConv3d(in_channels, filters, 3, bias=False)  # upstream: MAGVIT first conv has no bias
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        channels = filters
        for stage, multiplier in enumerate(channel_multipliers):
            stage_channels = filters * multiplier
            self.block_res_blocks.append(_res_blocks(channels, stage_channels, num_res_blocks, num_groups, activation))
            channels = stage_channels
            if stage < len(channel_multipliers) - 1:
                # upstream keeps an Identity in the list for stages without downsampling, so checkpoint
                # indices (conv_blocks.1, conv_blocks.2) line up with the stage number
                self.conv_blocks.append(
                    CausalConv3d(channels, channels, 3, stride=(2, 1, 1)) if temporal_downsample[stage] else nn.Identity()
                )
        self.res_blocks = _res_blocks(channels, channels, num_res_blocks, num_groups, activation)
        self.norm1 = nn.GroupNorm(num_groups, channels)
        self.conv2 = CausalConv3d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # B filters T H W
        for stage, res_blocks in enumerate(self.block_res_blocks):
            for block in res_blocks:
                x = block(x)  # B filters*mult[stage] T H W
            if stage < len(self.conv_blocks):
                x = self.conv_blocks[stage](x)  # B C T/2 H W where downsampled
        for block in self.res_blocks:
            x = block(x)
        x = self.activate(self.norm1(x))
        return self.conv2(x)  # B out_channels T/4 H W


class Decoder(nn.Module):
    """conv1 -> ResBlocks -> per stage from the deepest (ResBlocks, then a conv to 2C channels and
    depth-to-space into 2x frames where time was downsampled) -> GroupNorm -> act -> conv_out."""

    def __init__(self, in_channels: int, out_channels: int, filters: int, num_res_blocks: int,
                 channel_multipliers: tuple[int, ...], temporal_downsample: tuple[bool, ...],
                 num_groups: int, activation: type[nn.Module]):
        super().__init__()
        self.activate = activation()
        self.temporal_downsample = tuple(temporal_downsample)
        channels = filters * channel_multipliers[-1]
        self.conv1 = CausalConv3d(in_channels, channels, 3)
        self.res_blocks = _res_blocks(channels, channels, num_res_blocks, num_groups, activation)
        # built deepest stage first, stored by stage index (upstream inserts at the front)
        stage_blocks, upsample_convs = {}, {}
        for stage in reversed(range(len(channel_multipliers))):
            stage_channels = filters * channel_multipliers[stage]
            stage_blocks[stage] = _res_blocks(channels, stage_channels, num_res_blocks, num_groups, activation)
            channels = stage_channels
            if stage > 0:
                upsample_convs[stage - 1] = (
                    CausalConv3d(channels, channels * 2, 3) if temporal_downsample[stage - 1] else nn.Identity()
                )
        self.block_res_blocks = nn.ModuleList(stage_blocks[i] for i in range(len(channel_multipliers)))
        self.conv_blocks = nn.ModuleList(upsample_convs[i] for i in range(len(channel_multipliers) - 1))
        self.norm1 = nn.GroupNorm(num_groups, channels)
        self.conv_out = CausalConv3d(channels, out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)  # B filters*mult[-1] T H W
        for block in self.res_blocks:
            x = block(x)
        for stage in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[stage]:
                x = block(x)  # B filters*mult[stage] T H W
            if stage > 0 and self.temporal_downsample[stage - 1]:
                x = self.conv_blocks[stage - 1](x)  # B 2C T H W
                x = depth_to_time(x, 2)  # B C 2T H W
        x = self.activate(self.norm1(x))
        return self.conv_out(x)  # B out_channels 4T H W


def depth_to_time(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Upstream ``rearrange("B (C ts hs ws) T H W -> B C (T ts) (H hs) (W ws)")`` with hs = ws = 1:
    channel ``c * factor + s`` becomes frame ``t * factor + s`` of channel ``c``."""
    batch, channels, frames, height, width = x.shape
    x = x.view(batch, channels // factor, factor, frames, height, width)  # B C ts T H W
    return x.transpose(2, 3).reshape(batch, channels // factor, frames * factor, height, width)  # B C T*ts H W


# ---------------------------------------------------------------------------------------------
# posterior and the temporal VAE
# ---------------------------------------------------------------------------------------------
class DiagonalGaussian:
    """Upstream ``DiagonalGaussianDistribution``: ``moments`` = [mean; logvar] on dim 1, logvar clamped."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments  # upstream .parameters: logvar here is not clamped
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # upstream draws torch.randn(shape) on the CPU default generator, then moves it to device/dtype
        noise = torch.randn(self.mean.shape, generator=generator).to(device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class TemporalVAE(nn.Module):
    """Upstream ``VAE_Temporal``: causal 3D VAE compressing time by ``2 ** sum(temporal_downsample)``."""

    def __init__(self, in_out_channels: int = 4, latent_embed_dim: int = 4, embed_dim: int = 4, filters: int = 128,
                 num_res_blocks: int = 4, channel_multipliers: tuple[int, ...] = (1, 2, 2, 4),
                 temporal_downsample: tuple[bool, ...] = (False, True, True), num_groups: int = 32,
                 activation_fn: str = "swish"):
        super().__init__()
        if activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn {activation_fn!r} is not one of {sorted(ACTIVATIONS)}")
        activation = ACTIVATIONS[activation_fn]
        stack = dict(filters=filters, num_res_blocks=num_res_blocks, channel_multipliers=tuple(channel_multipliers),
                     temporal_downsample=tuple(temporal_downsample), num_groups=num_groups, activation=activation)
        self.time_downsample_factor = 2 ** sum(temporal_downsample)
        self.out_channels = in_out_channels
        self.encoder = Encoder(in_out_channels, 2 * latent_embed_dim, **stack)
        self.quant_conv = CausalConv3d(2 * latent_embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, latent_embed_dim, 1)
        self.decoder = Decoder(latent_embed_dim, in_out_channels, **stack)
        self.decoder_runner = None

    def time_padding(self, num_frames: int) -> int:
        """Frames added in front so that ``num_frames`` becomes a multiple of the downsample factor."""
        return -num_frames % self.time_downsample_factor

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` input frames: ``ceil(num_frames / factor)``."""
        return (num_frames + self.time_padding(num_frames)) // self.time_downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """``x`` [B, C, T, H, W] -> posterior over [B, embed_dim, ceil(T/4), H, W]."""
        x = F.pad(x, (0, 0, 0, 0, self.time_padding(x.shape[2]), 0))  # B C T_pad H W, zeros in front
        moments = self.quant_conv(self.encoder(x))  # B 2*embed_dim T_pad/4 H W
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``z`` [B, embed_dim, t, H, W] -> [B, C, 4t - time_padding(num_frames), H, W]."""
        # decoder_runner: the decoder exported to another runtime (utils.optim.onnx_backends), else PyTorch's
        x = self.decoder_runner(z) if self.decoder_runner else self.decoder(self.post_quant_conv(z))  # B C 4t H W
        return x[:, :, self.time_padding(num_frames):]  # B C num_frames H W: front padding dropped
