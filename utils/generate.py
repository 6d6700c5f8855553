"""Command line: generate one video with the OpenSora 1.2 pipeline on the CPU.

    python -m utils.generate --prompt "a red panda eating bamboo" --resolution 144p --aspect-ratio 9:16 \
        --num-frames 2s --steps 30 --dtype bf16 --weights random --out video.mp4

    python -m utils.generate --recipe fast --prompt "a red panda eating bamboo" --out video.mp4

Writes ``video.mp4`` (h264, 24 fps), ``video.npz`` (the lossless uint8 frames) and ``video.json`` (the
setting, the weights label, stage times and peak memory). ``--recipe`` picks a named recipe
(``utils.optim.recipes``: faithful, upstream, fast, small, graviton) in place of ``--dtype``,
``--text-encoder-dtype`` and ``--cache``; a recipe with start-up settings restarts the command with them set.
Bad input exits with status 2 before any heavy work and leaves no output file.

Over several processes or machines, torchrun starts one rank per process (``utils.parallel``; gloo over TCP):

    torchrun --nproc-per-node 2 -m utils.generate --parallel cfg --recipe upstream --prompt "..." --out video.mp4
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 --rdzv-id video \
        -m utils.generate --parallel cfg ...          # the same command on each of two machines

``--parallel cfg`` (2 ranks), ``sequence`` (P ranks), ``cfg+sequence`` (2 x P) or ``batch`` (several ``--prompt``,
one video per rank, written as ``<out>-<i>.mp4``); every rank logs, rank 0 writes the files. A rank count the mode
cannot use, or ranks with different settings or weights, exit with status 2; a peer that exits or stays silent
longer than ``--peer-timeout`` ends the run with status 1 and a message.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from utils.fingerprint import fingerprint
from utils.io import GIB, atomic_path
from utils.model import aspect
from utils.model.dtypes import DTYPES
from utils.model.memory import InsufficientMemoryError, timed
from utils.model.pipeline import PIPELINE_PRESETS, STAGES, VideoSetting, load_pipeline
from utils.model.video import to_uint8, write_frames, write_mp4
from utils.model.weights import TRAINED_MINI, CheckpointError
from utils.optim import registry
from utils.optim.caching import cache_stats, parse_cache
from utils.optim.hook_caches import MAGCACHE_OPENSORA
from utils.optim.recipes import RECIPES, build_pipeline, missing_env, recipe
from utils.parallel import modes
from utils.parallel.world import (
    DEFAULT_TIMEOUT_S,
    LAUNCH_HINT,
    MODES,
    ParallelSetupError,
    PeerLost,
    World,
    close,
    init_world,
    launched,
    plan,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", required=True, action="append",
                   help="what the video shows (given several times with --parallel batch: one video per prompt)")
    p.add_argument("--resolution", default="144p", help=f"one of {', '.join(aspect.resolutions())}")
    p.add_argument("--aspect-ratio", default="9:16", help="H:W, e.g. 9:16 (landscape), 16:9, 1:1")
    p.add_argument("--num-frames", default="2s", help="2s, 4s, 8s, 16s (51..408 frames) or an integer")
    p.add_argument("--steps", type=int, default=30, help="rectified-flow steps (upstream: 30)")
    p.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance scale (upstream: 7)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="a named recipe (the study's headline configurations), in place of --dtype, "
                        "--text-encoder-dtype and --cache: "
                        + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()))
    p.add_argument("--dtype", choices=list(DTYPES), help="transformer and VAE precision (default bf16)")
    p.add_argument("--text-encoder-dtype", choices=list(DTYPES),
                   help="T5 precision (default: --dtype; upstream runs T5 in fp32)")
    p.add_argument("--weights", default="random",
                   help="'random', a folder with the official checkpoints, 'hub' (Hugging Face cache), or with "
                        f"--model mini '{TRAINED_MINI}' (the mini model trained here, data/mini-model)")
    p.add_argument("--allow-download", action="store_true", help="with --weights hub: fetch missing files")
    p.add_argument("--model", default="opensora-v1.2", choices=list(PIPELINE_PRESETS))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    p.add_argument("--keep-text-encoder", action="store_true",
                   help="keep T5 in memory after encoding (default: free it, the largest component)")
    p.add_argument("--cache", help="a step cache (notebook 07): teacache[:THRESHOLD|slow|fast], pab, fbc[:THRESHOLD], "
                                   "magcache[:THRESHOLD], taylorseer[:INTERVAL]")
    p.add_argument("--parallel", choices=list(MODES),
                   help="spread the work over the ranks torchrun starts: "
                        + "; ".join(f"{name}: {what}" for name, what in MODES.items()))
    p.add_argument("--peer-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="with --parallel: seconds a rank waits for a silent peer before it gives up")
    p.add_argument("--out", type=Path, required=True,
                   help="output .mp4 path (several prompts: <stem>-<i>.mp4 beside it)")
    return p


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> VideoSetting:
    """Every check that needs no model: exits with status 2 and a message on bad input."""
    if not all(prompt.strip() for prompt in args.prompt):
        parser.error("--prompt is empty; give a description of the video")
    if len(args.prompt) > 1 and args.parallel != "batch":
        parser.error(f"{len(args.prompt)} prompts given: several --prompt go with --parallel batch (one video per "
                     "rank); otherwise give one")
    if args.parallel:
        if not launched():
            parser.error(f"--parallel {args.parallel} runs as several ranks, which torchrun starts: {LAUNCH_HINT}")
        if not args.peer_timeout > 0:
            parser.error(f"--peer-timeout must be positive seconds, got {args.peer_timeout}")
        try:
            layout = plan(args.parallel, int(os.environ["WORLD_SIZE"]))
        except ParallelSetupError as err:
            parser.error(str(err))
        if layout.mode == "batch" and len(args.prompt) % layout.size:
            parser.error(f"batch parallel gives every rank the same number of videos: {len(args.prompt)} prompts do "
                         f"not divide over {layout.size} ranks (give a multiple of {layout.size})")
    if args.out.suffix.lower() != ".mp4":
        parser.error(f"--out must end in .mp4, got {args.out}")
    if not args.out.parent.is_dir():
        parser.error(f"--out folder {args.out.parent} does not exist")
    if args.weights == TRAINED_MINI and args.model != "mini":
        parser.error(f"--weights {TRAINED_MINI} are the mini model's (--model mini), not {args.model}'s")
    if args.weights not in ("random", "hub", TRAINED_MINI) and not Path(args.weights).is_dir():
        parser.error(f"--weights {args.weights} does not exist; accepted: 'random', 'hub', '{TRAINED_MINI}' (with "
                     "--model mini) or a folder holding hpcai-tech/OpenSora-STDiT-v3, hpcai-tech/OpenSora-VAE-v1.2 and "
                     "DeepFloyd/t5-v1_1-xxl (or, with --model mini, a training run's <folder>/<component>/)")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.recipe:
        given = [flag for flag, value in (("--dtype", args.dtype), ("--text-encoder-dtype", args.text_encoder_dtype),
                                           ("--cache", args.cache)) if value is not None]
        if given:
            parser.error(f"--recipe {args.recipe} sets the precisions and the cache itself; drop {', '.join(given)} "
                         f"(the recipe: {recipe(args.recipe).describe()})")
    args.dtype = args.dtype or ("fp32" if args.recipe else "bf16")  # a recipe builds fp32, its steps choose
    try:
        args.steps_applied = parse_cache(args.cache) if args.cache else {}
    except ValueError as err:
        parser.error(f"--cache: {err}")
    if "mag_cache" in args.steps_applied and args.steps != len(MAGCACHE_OPENSORA):
        parser.error(f"--cache magcache uses MagCache's published OpenSora ratios, measured for "
                     f"{len(MAGCACHE_OPENSORA)} steps; got --steps {args.steps}")
    try:
        return VideoSetting.create(args.resolution, args.aspect_ratio, args.num_frames, args.steps,
                                   args.cfg_scale, args.seed)
    except ValueError as err:
        parser.error(str(err))


def restart_with(settings: dict[str, str], argv: list[str] | None) -> None:
    """Run this command again in a process started with ``settings`` (start-up settings a recipe needs: oneDNN
    and OpenMP read them once, when the process starts)."""
    print("restarting with the recipe's start-up settings: " + " ".join(f"{k}={v}" for k, v in settings.items()),
          flush=True)
    argv = sys.argv[1:] if argv is None else argv
    os.execve(sys.executable, [sys.executable, "-m", "utils.generate", *argv], os.environ | settings)


def build(args: argparse.Namespace, setting: VideoSetting):
    if args.recipe:
        return build_pipeline(args.recipe, args.model, weights=args.weights, setting=setting,
                              allow_download=args.allow_download)
    pipe = load_pipeline(args.model, weights=args.weights, dtype=args.dtype, text_encoder_dtype=args.text_encoder_dtype,
                         setting=setting, free_text_encoder=not args.keep_text_encoder,
                         allow_download=args.allow_download)
    return registry.apply(pipe, args.steps_applied)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setting = validate(args, parser)
    if args.recipe and missing_env(args.recipe):
        restart_with(missing_env(args.recipe), argv)
    torch.set_num_threads(args.threads)
    world = None
    try:
        world = init_world(args.parallel, args.peer_timeout) if args.parallel else None
        return generate(args, setting, world)
    except (CheckpointError, InsufficientMemoryError, ParallelSetupError) as err:
        print(f"error{'' if world is None else f' (rank {world.rank})'}: {err}", file=sys.stderr)
        return 2
    except PeerLost as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        close(world)


def output_paths(out: Path, count: int) -> list[Path]:
    """The .mp4 of each video: ``out`` for one, ``<stem>-<i>.mp4`` beside it for several."""
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def generate(args: argparse.Namespace, setting: VideoSetting, world: World | None) -> int:
    pipe, load_seconds, load_peak = timed(build, args, setting)
    if world is not None:
        modes.parallelize(pipe, world, setting, args.prompt)
    lead = world is None or world.rank == 0  # the rank that prints the run and writes the files
    precision = {c: str(d).removeprefix("torch.") for c, d in pipe.dtypes.items()}
    if lead:
        print(f"{args.model}: {f'recipe {args.recipe}, ' if args.recipe else ''}weights {pipe.weights}, "
              f"{', '.join(f'{c} {d}' for c, d in precision.items())}, {args.threads} threads, tokenizer "
              f"{'stand-in (not the T5 vocabulary)' if pipe.tokenizer.is_standin else 'T5'}")
        if pipe.optimizations:
            print(f"steps: {registry.describe(pipe)}")
        print(f"{setting.resolution} {setting.aspect_ratio}: {setting.height}x{setting.width} px, "
              f"{setting.num_frames} frames -> latent {pipe.latent_size(setting)}, {setting.steps} steps"
              + ("" if world is None else f"; --parallel {world.layout.mode} over {world.size} ranks"))

    options = dict(free_text_encoder=not args.keep_text_encoder)
    if world is not None and world.layout.mode == "batch":
        (result, frames), run_seconds, run_peak = timed(modes.run_batch, pipe, world, args.prompt, setting, **options)
    else:
        result, run_seconds, run_peak = timed(pipe, args.prompt, setting, decode=lead, **options)
        frames = None if result.video is None else np.stack([to_uint8(video) for video in result.video])
    if world is not None:
        world.log(f"{world.layout.mode}: denoise {result.seconds['denoise']:.2f} s; collectives sent "
                  f"{world.stats.bytes_sent / 1e6:.1f} MB in {world.stats.seconds:.2f} s ({world.stats.calls} calls)")
    if not lead:
        return 0
    caching = cache_stats(pipe.transformer) if "teacache" in pipe.optimizations or args.cache else None
    record = dict(
        model=args.model, recipe=args.recipe, weights=pipe.weights, dtypes=precision,
        startup_env={k: os.environ.get(k) for k in recipe(args.recipe).env} if args.recipe else {},
        tokenizer_standin=pipe.tokenizer.is_standin,
        threads=args.threads, setting=vars(setting) | {"fps": setting.fps},
        frames_shape=list(frames.shape[1:]), load_seconds=load_seconds, load_peak_rss_bytes=load_peak,
        seconds=result.seconds, peak_rss_bytes=result.peak_rss_bytes,
        # the whole run: the stages and the loading of each component as its stage comes
        run_seconds=run_seconds, run_peak_rss_bytes=run_peak,
        process_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        optimizations=registry.describe(pipe), cache=caching,
        parallel=None if world is None else dict(vars(world.layout), rank0_collectives=world.stats.as_dict()),
        torch=torch.__version__, machine=platform.machine(), processor=platform.processor(),
        environment_id=fingerprint()["environment_id"],
    )
    written = []
    with ExitStack() as stack:  # every file appears together or not at all
        for prompt, video, mp4_path in zip(args.prompt, frames, output_paths(args.out, len(args.prompt))):
            outputs = (mp4_path, mp4_path.with_suffix(".npz"), mp4_path.with_suffix(".json"))
            mp4, npz, meta = (stack.enter_context(atomic_path(p)) for p in outputs)
            write_mp4(video, mp4, fps=aspect.FPS)
            write_frames(video, npz)
            meta.write_text(json.dumps(record | dict(prompt=prompt), indent=1))
            written += outputs

    print(f"weights: {'random (output is noise-like; timings are real)' if pipe.weights == 'random' else pipe.weights}")
    built = "(build)" if args.recipe else "(load weights)"
    print(f"  {built:<16} {load_seconds:9.2f} s   peak RSS {load_peak / GIB:6.2f} GiB")
    for stage in STAGES:
        print(f"  {stage:<16} {result.seconds[stage]:9.2f} s   peak RSS {result.peak_rss_bytes[stage] / GIB:6.2f} GiB")
    if caching:
        print(f"  cache {args.cache or 'teacache (the recipe)'}: {caching['evaluations']} of {setting.steps} steps "
              "ran the transformer's blocks; "
              f"attention ran {caching['executed_attn']} of {setting.steps * caching['blocks']} times")
    print(f"  {'whole run':<16} {run_seconds:9.2f} s   peak RSS {run_peak / GIB:6.2f} GiB (stages and loading each "
          f"component as its stage comes)")
    print(f"wrote {', '.join(str(p) for p in written)} ({frames.shape[1]} frames of {frames.shape[3]}x{frames.shape[2]}"
          f"{'' if len(frames) == 1 else f', {len(frames)} videos'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
