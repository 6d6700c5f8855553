"""Where the time goes: operator profiles of each stage, the denoiser step by module group, and how
each stage's cost grows with the token count (resolution x frames). One model in memory at a time."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import replace
from pathlib import Path

import torch

from .benchmark import Timing, measure
from .memory import return_freed_memory

# Recording shapes and allocations made a profiled fp32 denoising step at 144p 2s grow past 24 GB (measured:
# +3 GB at 17 frames, out of memory at 51); operator times need neither.
LEAN = dict(record_shapes=False, profile_memory=False)
from .pipeline import PIPELINE_PRESETS, OpenSoraPipeline, VideoSetting
from .profiling import STDIT3_GROUPS, StageProfile, module_breakdown, profile_stage
from .stdit3 import build_stdit3
from .vae import build_vae
from .weights import materialize_random


def profile_stages(pipe: OpenSoraPipeline, setting: VideoSetting, prompt: str, trace_dir: Path | None,
                   threads: int) -> tuple[dict[str, StageProfile], dict[str, float], float]:
    """Profile encode, one denoising step and decode, each after one warm-up call. A profiled call's
    allocations (about twice an unprofiled one's) stay in the C heap unless handed back, so they are
    handed back after each; otherwise fp32 runs out of memory on 24 GB. Returns the stage
    profiles, the milliseconds per module group of a second, separately profiled denoising step
    ("other" is the rest of that step: norms, modulation, reshapes, the Euler update) and that step's
    wall milliseconds."""
    one_step = replace(setting, steps=1)
    profiles = {}
    torch.set_num_threads(threads)

    pipe.load("text_encoder")
    y, mask = pipe.encode_prompt([prompt])
    profiles["encode_prompt"] = profile_stage(pipe.encode_prompt, [prompt], stage="encode_prompt",
                                              trace_dir=trace_dir, **LEAN)
    return_freed_memory()
    pipe.release("text_encoder")

    z = pipe.prepare_latents(1, setting)
    pipe.load("transformer")
    latents = pipe.denoise(z, y, mask, one_step, progress=False)
    profiles["denoise"] = profile_stage(pipe.denoise, z, y, mask, one_step, progress=False, stage="denoise",
                                        trace_dir=trace_dir, **LEAN)
    return_freed_memory()
    start = time.perf_counter()
    groups = module_breakdown(pipe.transformer, pipe.denoise, z, y, mask, one_step, progress=False,
                              groups=STDIT3_GROUPS)
    step_ms = (time.perf_counter() - start) * 1e3
    groups["other"] = max(step_ms - sum(groups.values()), 0.0)  # norms, modulation, reshapes, the update
    return_freed_memory()
    pipe.release("transformer")

    pipe.load("vae")
    pipe.decode(latents, setting)
    profiles["decode"] = profile_stage(pipe.decode, latents, setting, stage="decode", trace_dir=trace_dir, **LEAN)
    pipe.release("vae")
    return profiles, groups, step_ms


def tokens(pipe: OpenSoraPipeline, setting: VideoSetting) -> int:
    """Visual tokens per sample of the denoiser at ``setting`` (patch 1x2x2 over the latent)."""
    t, h, w = pipe.latent_size(setting)
    pt, ph, pw = pipe.transformer.config.patch_size
    return -(-t // pt) * -(-h // ph) * -(-w // pw)


def block_pair_timing(pipe: OpenSoraPipeline, setting: VideoSetting, dtype: torch.dtype, warmup: int,
                      repeats: int, threads: int) -> Timing:
    """One spatial + one temporal block of the pipeline's transformer (a depth-1 copy with its
    embedders and final layer) at CFG batch 2 and ``setting``'s token grid; random weights."""
    config = dataclasses.replace(pipe.transformer.config, depth=1)
    model = materialize_random(build_stdit3(config, device="meta"), dtype).eval()
    x = torch.randn(2, config.in_channels, *pipe.latent_size(setting), dtype=dtype)
    y = torch.randn(2, 1, config.model_max_length, config.caption_channels, dtype=dtype)
    args = pipe.model_args(2, setting)
    timestep = torch.full((2,), 500.0)
    with torch.inference_mode():
        timing = measure(model, x, timestep, y=y, warmup=warmup, repeats=repeats, threads=threads, **args)
    del model
    return timing


def vae_decode_timings(pipe: OpenSoraPipeline, setting: VideoSetting, dtype: torch.dtype, warmup: int,
                       repeats: int, threads: int) -> dict[str, Timing]:
    """The two halves of the VAE decoder at ``setting``'s resolution: one frame through the 2D decoder
    (``spatial_frame``) and one 5-latent-frame chunk through the temporal decoder (``temporal_chunk``)."""
    vae = materialize_random(build_vae(PIPELINE_PRESETS[pipe.preset]["vae"], device="meta"), dtype).eval()
    _, h, w = vae.get_latent_size([1, setting.height, setting.width])
    frame = torch.randn(1, vae.out_channels, 1, h, w, dtype=dtype)
    chunk = torch.randn(1, vae.out_channels, vae.micro_z_frame_size, h, w, dtype=dtype)
    with torch.inference_mode():
        timings = {
            "spatial_frame": measure(vae.spatial_vae.decode, frame, warmup=warmup, repeats=repeats, threads=threads),
            "temporal_chunk": measure(vae.temporal_vae.decode, chunk, num_frames=vae.micro_frame_size,
                                      warmup=warmup, repeats=repeats, threads=threads),
        }
    del vae
    return timings
