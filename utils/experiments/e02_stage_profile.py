"""What notebook ``02_stage_profile`` runs: where the time goes. Operator profiles of each stage, the denoiser
step by module group, the achieved share of the GEMM ceilings, and how each stage's cost grows with the token
count (resolution x frames), each stored as records. One model in memory at a time."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from utils.measure.benchmark import Timing, TimingPolicy, measure
from utils.measure.profiling import STDIT3_GROUPS, StageProfile, class_table, module_breakdown, profile_stage
from utils.measure.records import ceiling_fractions
from utils.measure.results import Record, ResultsStore, timing_record
from utils.measure.stages import record_config
from utils.model.dtypes import DTYPES
from utils.model.memory import return_freed_memory
from utils.model.pipeline import PIPELINE_PRESETS, OpenSoraPipeline, VideoSetting
from utils.model.stdit3 import build_stdit3
from utils.model.vae import build_vae
from utils.model.weights import materialize_random

# Recording shapes and allocations made a profiled fp32 denoising step at 144p 2s grow past 24 GB (measured:
# +3 GB at 17 frames, out of memory at 51); operator times need neither.
LEAN = dict(record_shapes=False, profile_memory=False)


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


def block_pair_timing(pipe: OpenSoraPipeline, setting: VideoSetting, dtype: torch.dtype,
                      policy: TimingPolicy) -> Timing:
    """One spatial + one temporal block of the pipeline's transformer (a depth-1 copy with its
    embedders and final layer) at CFG batch 2 and ``setting``'s token grid; random weights."""
    config = dataclasses.replace(pipe.transformer.config, depth=1)
    model = materialize_random(build_stdit3(config, device="meta"), dtype).eval()
    x = torch.randn(2, config.in_channels, *pipe.latent_size(setting), dtype=dtype)
    y = torch.randn(2, 1, config.model_max_length, config.caption_channels, dtype=dtype)
    args = pipe.model_args(2, setting)
    timestep = torch.full((2,), 500.0)
    with torch.inference_mode():
        timing = measure(model, x, timestep, y=y, policy=policy, **args)
    del model
    return timing


def vae_decode_timings(pipe: OpenSoraPipeline, setting: VideoSetting, dtype: torch.dtype,
                       policy: TimingPolicy) -> dict[str, Timing]:
    """The two halves of the VAE decoder at ``setting``'s resolution: one frame through the 2D decoder
    (``spatial_frame``) and one 5-latent-frame chunk through the temporal decoder (``temporal_chunk``)."""
    vae = materialize_random(build_vae(PIPELINE_PRESETS[pipe.preset]["vae"], device="meta"), dtype).eval()
    _, h, w = vae.get_latent_size([1, setting.height, setting.width])
    frame = torch.randn(1, vae.out_channels, 1, h, w, dtype=dtype)
    chunk = torch.randn(1, vae.out_channels, vae.micro_z_frame_size, h, w, dtype=dtype)
    with torch.inference_mode():
        timings = {
            "spatial_frame": measure(vae.spatial_vae.decode, frame, policy=policy),
            "temporal_chunk": measure(vae.temporal_vae.decode, chunk, num_frames=vae.micro_frame_size, policy=policy),
        }
    del vae
    return timings


# ---- the records ----------------------------------------------------------------------------------------

def op_class_records(store: ResultsStore, profiles: dict[str, StageProfile], config: dict) -> pd.DataFrame:
    """Store each stage's self-time share and milliseconds per operator class; returns the shares, one
    column per stage."""
    for stage, profile in profiles.items():
        for row in class_table(profile).itertuples():
            store.add(Record(variant=row.op_class, stage=stage, metric="self_share", unit="fraction", value=row.share,
                             config=config, note="torch.profiler self CPU time, one call after a warm-up"),
                      Record(variant=row.op_class, stage=stage, metric="self_ms", unit="ms", value=row.self_ms,
                             config=config))
    return pd.concat([class_table(p) for p in profiles.values()]).pivot(index="op_class", columns="stage",
                                                                        values="share")


def group_records(store: ResultsStore, groups: dict[str, float], step_ms: float, config: dict) -> pd.DataFrame:
    """Store the denoiser's milliseconds per module group and their share of the profiled step."""
    for group, ms in groups.items():
        store.add(Record(variant=group, stage="denoise", metric="ms_per_step", unit="ms", value=ms, config=config,
                         note="inclusive CPU time under profiler labels; other = step wall - groups"),
                  Record(variant=group, stage="denoise", metric="share", unit="fraction", value=ms / step_ms,
                         kind="derived", config=config))
    return pd.Series(groups, name="ms per step").to_frame().assign(share=lambda d: d["ms per step"] / step_ms)


def ceiling_fraction_records(store: ResultsStore, records: pd.DataFrame, threads: int, dtype: str,
                             config: dict) -> pd.DataFrame:
    """Store each baseline stage's achieved GFLOP/s as a fraction of the ``dtype`` GEMM ceiling measured at
    the same thread count (``records``: this machine's, with notebooks 00 and 01's)."""
    fractions = ceiling_fractions(records, threads=threads, dtype=dtype)
    for row in fractions.itertuples():
        store.add(Record(variant="baseline", stage=row.stage, metric="ceiling_fraction", unit="fraction",
                         value=row.fraction, kind="derived", config=config,
                         note=f"achieved {row.gflops:.1f} GFLOP/s over the {dtype} GEMM ceiling {row.ceiling:.1f}"))
    return fractions


def scaling(store: ResultsStore, pipe: OpenSoraPipeline, settings: list[VideoSetting], vae_settings: list[VideoSetting],
            dtype: str, policy: TimingPolicy) -> pd.DataFrame:
    """Time a block pair at each of ``settings`` (and the whole model's step derived from it) and the VAE
    decoder's halves at each of ``vae_settings``; store them and return the table."""
    torch_dtype, depth, rows = DTYPES[dtype], pipe.transformer.config.depth, []
    for scaled in settings:
        timing = block_pair_timing(pipe, scaled, torch_dtype, policy)
        n_tokens = tokens(pipe, scaled)
        config = record_config(pipe, scaled, policy.threads, tokens=n_tokens)
        store.add(timing_record("block_pair", "denoise", timing, config,
                                note="depth-1 real-width STDiT3 (one spatial + one temporal block, embedders, "
                                     "final layer) at CFG batch 2"),
                  Record(variant="block_pair", stage="denoise", metric="model_seconds_per_step", unit="s",
                         value=timing.median_s * depth, kind="derived", config=config,
                         note=f"block pair x {depth} (embedders counted each time: an upper bound)"))
        rows.append(dict(setting=f"{scaled.resolution} {scaled.num_frames}", tokens=n_tokens,
                         block_pair_s=timing.median_s, iqr_s=timing.iqr_s, quiet=timing.quiet))
    for scaled in vae_settings:
        for part, timing in vae_decode_timings(pipe, scaled, torch_dtype, policy).items():
            store.add(timing_record(part, "decode", timing,
                                    record_config(pipe, scaled, policy.threads, pixels=scaled.height * scaled.width)))
            rows.append(dict(setting=f"{scaled.resolution} {part}", pixels=scaled.height * scaled.width,
                             seconds=timing.median_s, quiet=timing.quiet))
    return pd.DataFrame(rows)
