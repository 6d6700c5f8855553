"""Per-stage measurements of the pipeline, one model in memory at a time.

The faithful fp32 pipeline (T5-XXL 19 GB + STDiT3 4.8 GB + VAE 1.6 GB) does not fit a 24 GB machine
at once, so each stage's model is loaded, measured and released before the next. A denoising step
is one transformer call at CFG batch 2 plus the guidance and Euler update; a 30-step video is
derived as encode + prepare + 30 x step + decode, and that derivation is checked against complete
runs at a small setting.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from utils.measure.benchmark import Timing, TimingPolicy, measure, synchronize
from utils.measure.flops import count_flops
from utils.measure.results import make_config
from utils.model.dtypes import dtype_name
from utils.model.memory import PeakRSS
from utils.model.pipeline import STAGES, OpenSoraPipeline, VideoSetting
from utils.model.stdit3 import CAPTION_KEYS

DEFAULT_PROMPT = "a beautiful waterfall in a forest"

COMPONENT_OF = {"encode_prompt": "text_encoder", "denoise": "transformer", "decode": "vae"}


@dataclass
class StageResult:
    stage: str
    timing: Timing  # for "denoise": one step
    load_s: float | None  # materialising the stage's model, or None
    flops: int | None  # per timed call (one step for "denoise"), counted on the meta device


def _load_timed(pipe: OpenSoraPipeline, component: str) -> float:
    start = time.perf_counter()
    pipe.load(component)
    return time.perf_counter() - start


def stage_flops(pipe: OpenSoraPipeline, setting: VideoSetting, batch: int = 1) -> dict[str, int]:
    """FLOPs of one encode, one denoising step and one decode at ``setting``, from the components'
    shapes alone (each is moved to the meta device for the count if it is loaded)."""
    flops = {}
    length = pipe.text_encoder.model_max_length
    # height and width stay real: the transformer reads them with .item() for the position table
    args = {k: v.to("meta") if k in ("fps", "num_frames", "ar") else v
            for k, v in pipe.model_args(2 * batch, setting).items()}
    with torch.device("meta"):
        if not pipe.is_loaded("text_encoder"):
            ids = torch.zeros(batch, length, dtype=torch.long)
            _, flops["encode_prompt"] = count_flops(pipe.text_encoder.model, input_ids=ids)
        if not pipe.is_loaded("transformer"):
            cfg = pipe.transformer.config
            x = torch.empty(2 * batch, cfg.in_channels, *pipe.latent_size(setting))
            y = torch.empty(2 * batch, 1, length, cfg.caption_channels)
            _, flops["denoise"] = count_flops(pipe.transformer, x, torch.empty(2 * batch), y=y, **args)
        if not pipe.is_loaded("vae"):
            z = torch.empty(batch, pipe.vae.out_channels, *pipe.latent_size(setting), dtype=pipe.dtypes["vae"])
            _, flops["decode"] = count_flops(pipe.vae.decode, z, num_frames=setting.num_frames)
    flops["prepare_latents"] = 0
    return flops


def measure_stages(pipe: OpenSoraPipeline, setting: VideoSetting, prompt: str = DEFAULT_PROMPT,
                   policy: TimingPolicy = TimingPolicy(repeats=3)) -> dict[str, StageResult]:
    """Time each stage with its model alone in memory (released afterwards); the denoiser for one
    step. Returns ``StageResult`` per stage, with FLOPs counted once all models are released."""
    one_step = replace(setting, steps=1)
    results = {}
    device = pipe.device

    pipe.release("transformer"), pipe.release("vae")
    load = _load_timed(pipe, "text_encoder")
    timing = measure(pipe.encode_prompt, [prompt], policy=policy, device=device)
    results["encode_prompt"] = StageResult("encode_prompt", timing, load, None)
    y, mask = timing.result
    pipe.release("text_encoder")

    timing = measure(pipe.prepare_latents, 1, setting, policy=policy, device=device)
    results["prepare_latents"] = StageResult("prepare_latents", timing, None, None)
    z = timing.result

    load = _load_timed(pipe, "transformer")
    timing = measure(pipe.denoise, z, y, mask, one_step, progress=False, policy=policy, device=device)
    results["denoise"] = StageResult("denoise", timing, load, None)
    latents = timing.result
    pipe.release("transformer")

    load = _load_timed(pipe, "vae")
    timing = measure(pipe.decode, latents, setting, policy=policy, device=device)
    results["decode"] = StageResult("decode", timing, load, None)
    pipe.release("vae")

    for stage, flops in stage_flops(pipe, setting).items():
        results[stage].flops = flops
    return results


def derived_video_seconds(results: dict[str, StageResult], steps: int) -> dict[str, float]:
    """Per-stage seconds of one video at ``steps`` denoising steps, from the measured medians."""
    seconds = {stage: results[stage].timing.median_s for stage in STAGES}
    seconds["denoise"] *= steps
    return seconds


def complete_run(pipe: OpenSoraPipeline, setting: VideoSetting, prompt: str = DEFAULT_PROMPT,
                 threads: int | None = None) -> tuple[dict[str, float], int]:
    """One whole generation, one model in memory at a time; returns stage seconds (loads excluded)
    and the peak memory of the whole run (resident set on CPU, allocated bytes on a GPU)."""
    for component in ("transformer", "vae"):
        pipe.release(component)
    gpu = pipe.device.startswith("cuda")
    if gpu:
        torch.cuda.reset_peak_memory_stats(torch.device(pipe.device))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        with PeakRSS() as rss:
            generation = pipe([prompt], setting, progress=True, free_text_encoder=True)
            synchronize(pipe.device)
    finally:
        torch.set_num_threads(previous)
        for component in ("text_encoder", "transformer", "vae"):
            pipe.release(component)
    peak = torch.cuda.max_memory_allocated(torch.device(pipe.device)) if gpu else rss.peak
    return generation.seconds, peak


def record_config(pipe: OpenSoraPipeline, setting: VideoSetting, threads: int, **extra) -> dict:
    """The config of a record about ``pipe`` at ``setting`` (see ``results.CONFIG_FIELDS``)."""
    return make_config(model=pipe.preset, weights="random" if pipe.weights == "random" else "real",
                       resolution=setting.resolution, aspect_ratio=setting.aspect_ratio, frames=setting.num_frames,
                       steps=setting.steps, dtype=dtype_name(pipe.dtypes["transformer"]), threads=threads,
                       text_encoder_dtype=dtype_name(pipe.dtypes["text_encoder"]),
                       latent=list(pipe.latent_size(setting)), cfg_scale=setting.cfg_scale, seed=setting.seed,
                       caption_keys=CAPTION_KEYS, **extra)
