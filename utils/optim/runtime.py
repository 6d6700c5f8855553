"""Run-time knobs of the optimisation ladder: the VAE's chunking (memory against speed) and ``torch.compile``
of the transformer's blocks."""
from __future__ import annotations

import torch

from utils.model.pipeline import OpenSoraPipeline

# ---- VAE chunking (memory against speed) --------------------------------------------------------------

def apply_vae_chunking(pipe: OpenSoraPipeline, micro_batch_size: int | None = 4,
                       micro_frame_size: int | None = 17) -> OpenSoraPipeline:
    """Frames per spatial-VAE call (``micro_batch_size``, None: all) and frames per temporal-VAE chunk
    (``micro_frame_size``). Upstream uses 4 and 17; ``micro_batch_size`` keeps the numerics,
    ``micro_frame_size`` changes the latent frame count and the numerics (checkpoints were trained on 17)."""
    for name, value in (("micro_batch_size", micro_batch_size), ("micro_frame_size", micro_frame_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    pipe.vae.micro_batch_size = micro_batch_size
    pipe.vae.micro_frame_size = micro_frame_size
    return pipe


# ---- compilation ----------------------------------------------------------------------------------------

def apply_compile(pipe: OpenSoraPipeline, mode: str | None = None) -> OpenSoraPipeline:
    """``torch.compile`` of the transformer's blocks (regional compilation: every STDiT3 block is compiled,
    and the blocks of one kind share the compiled code, so 56 blocks cost two compilations). The first
    denoising call pays for it. Needed for torchao's int8 kernels to run fused (the x86 notes: eager int8
    is slower than bf16, compiled faster)."""
    for block in (*pipe.transformer.spatial_blocks, *pipe.transformer.temporal_blocks):
        # the block's forward as it is now (with the rewrites' hooks), so hooks registered later (the step
        # caches and their counters) wrap the compiled code instead of being traced into it
        block.forward = torch.compile(block.forward, mode=mode)
    return pipe
