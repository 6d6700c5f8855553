"""The GPU comparison: the same stage measurements as the CPU baseline, on ``cuda``.

    python -m utils.experiments.gpu_bench [--results data/results] [--quick]

Runs the real-size OpenSora 1.2 with random weights at upstream's published settings (360p and 720p,
2 s and 4 s) and at the CPU study's setting (144p 2 s), in two precision set-ups: ``upstream``
(T5 in fp32, transformer and VAE in bf16, as upstream's inference script) and ``fp32`` (the CPU
baseline's faithful set-up, at the smaller settings). Per stage: median time and peak allocated GPU
memory; a 30-step video derived from one measured step, and one complete run that checks the
derivation. The attention kernels SDPA dispatches to are read from a profile of one denoising step.
Records go to the results store under the GPU's environment id (notebook ``80_gpu_bench``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from utils.io import GIB
from utils.measure.benchmark import TimingPolicy
from utils.measure.profiling import profile_stage
from utils.measure.results import RESULTS, Record, ResultsStore, timing_record
from utils.measure.stages import complete_run, derived_video_seconds, measure_stages, record_config
from utils.model.pipeline import VideoSetting, load_pipeline

NOTEBOOK = "80_gpu_bench"

PROMPT = "a beautiful waterfall in a forest"

# (variant, transformer/VAE dtype, T5 dtype, settings)
RUNS = [
    ("upstream", "bf16", "fp32", [("144p", "2s"), ("360p", "2s"), ("360p", "4s"), ("720p", "2s"), ("720p", "4s")]),
    ("fp32", "fp32", "fp32", [("144p", "2s"), ("360p", "2s")]),
]

CHECK = ("upstream", "360p", "2s")  # one complete 30-step generation, as upstream's published table


def attention_kernels(pipe, setting: VideoSetting) -> dict[str, float]:
    """Device milliseconds per attention op or kernel in one profiled denoising step (after a warm-up)."""
    one_step = replace(setting, steps=1)
    pipe.load("text_encoder")
    y, mask = pipe.encode_prompt([PROMPT])
    pipe.release("text_encoder")
    z = pipe.prepare_latents(1, setting)
    pipe.load("transformer")
    pipe.denoise(z, y, mask, one_step, progress=False)
    profile = profile_stage(pipe.denoise, z, y, mask, one_step, progress=False, stage="denoise", record_shapes=False,
                            profile_memory=False)
    pipe.release("transformer")
    return {row.op: row.self_device_us / 1e3 for row in profile.ops
            if ("attention" in row.op.lower() or "fmha" in row.op.lower() or "flash" in row.op.lower())
            and row.self_device_us > 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.experiments.gpu_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true", help="144p 2s only, 2 repeats (a dry run of the script)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda (the comparison) or cpu (a dry run of the script)")
    parser.add_argument("--model", default="opensora-v1.2", help="opensora-v1.2, or tiny for a dry run")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: this script measures the GPU side of the comparison")
    store = ResultsStore(NOTEBOOK, root=args.results, device=device)
    print(f"{store.environment['device']}: environment {store.environment_id}, torch {torch.__version__}")
    runs = [(v, d, t, [("144p", "2s")]) for v, d, t, _ in RUNS[:1]] if args.quick else RUNS
    repeats = 2 if args.quick else args.repeats

    for variant, dtype, te_dtype, settings in runs:
        pipe = load_pipeline(args.model, weights="random", dtype=dtype, text_encoder_dtype=te_dtype, load=(),
                             device=device)
        for resolution, frames in tqdm(settings, desc=variant):
            setting = VideoSetting.create(resolution, "9:16", frames, steps=30)
            config = record_config(pipe, setting, threads=torch.get_num_threads())
            measured = measure_stages(pipe, setting, PROMPT, TimingPolicy(warmup=args.warmup, repeats=repeats))
            peak = "peak_device_bytes" if device.startswith("cuda") else "peak_rss_bytes"
            video = derived_video_seconds(measured, setting.steps)
            for stage, result in measured.items():
                metric = "seconds_per_step" if stage == "denoise" else "seconds"
                store.add(timing_record(variant, stage, result.timing, config, metric=metric),
                          Record(variant=variant, stage=stage, metric=peak, unit="B",
                                 value=getattr(result.timing, peak), config=config),
                          Record(variant=variant, stage=stage, metric="video_seconds", unit="s", value=video[stage],
                                 kind="derived", config=config))
                if result.flops:
                    store.add(Record(variant=variant, stage=stage, metric="gflops", unit="GFLOP/s", kind="derived",
                                     value=result.flops / result.timing.median_s / 1e9, config=config))
            store.add(Record(variant=variant, stage="total", metric="video_seconds", unit="s", kind="derived",
                             value=sum(video.values()), config=config, note="encode + prepare + 30 steps + decode"))
            print(f"{variant} {resolution} {frames}: " + ", ".join(f"{s} {v:.2f} s" for s, v in video.items())
                  + f"; total {sum(video.values()):.1f} s (derived)")
            if (variant, resolution, frames) == CHECK or (args.quick and variant == "upstream"):
                seconds, peak_bytes = complete_run(pipe, setting, PROMPT)
                store.add(Record(variant=variant, stage="total", metric="measured_video_seconds", unit="s",
                                 value=sum(seconds.values()), spread={"n": 1, "stages": seconds}, config=config,
                                 note="one complete generation, loads excluded"),
                          Record(variant=variant, stage="total", metric=peak, unit="B", value=peak_bytes,
                                 config=config))
                kernels = attention_kernels(pipe, setting)
                for op, ms in kernels.items():
                    store.add(Record(variant=variant, stage="denoise", metric="attention_kernel_ms", unit="ms",
                                     value=ms, config=config | {"kernel": op}, note="one profiled step"))
                print(f"complete run {sum(seconds.values()):.1f} s, peak {peak_bytes / GIB:.1f} GiB; "
                      f"attention: {kernels}")
    print(f"records in {store.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
