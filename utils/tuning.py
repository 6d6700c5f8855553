"""Experiments that need a fresh process: precision variants, thread counts, start-up settings, memory.

Settings that the runtime reads when it starts (oneDNN's ``DNNL_DEFAULT_FPMATH_MODE``, OpenMP's
``OMP_PROC_BIND`` / ``OMP_PLACES``, the c10 allocator's ``THP_MEM_ALLOC_ENABLE``, oneDNN's
``LRU_CACHE_CAPACITY``) only take effect in a new process, and a process's high-water mark of
resident memory never goes down, so every run here is a child process:

    run_in_fresh_process("stages", env={"OMP_PROC_BIND": "false"}, threads=2, model="tiny", ...)

spawns ``python -m utils.tuning stages --spec '<json>'`` with that environment and returns the JSON
it prints. Tasks: ``stages`` (time each stage one model at a time and keep its outputs for fidelity),
``footprint`` (peak resident memory of a whole pipeline run, event by event), ``adherence`` (the
trained mini model's prompt adherence) and ``probe`` (which oneDNN kernels run fp32 ops, with and
without fast math; ``utils.onednn_probe``). Timing goes through ``utils.benchmark.measure`` (first call apart, warm-up,
repeats, median, other-process CPU check). ``utils.tuning_records`` turns the results into records.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from .onednn_probe import task_probe
from .paths import REPO

# start-up settings, each set in a fresh process; "guide" is the Graviton guide's whole recommendation
GUIDE_ENV = {"DNNL_DEFAULT_FPMATH_MODE": "BF16", "LRU_CACHE_CAPACITY": "1024", "THP_MEM_ALLOC_ENABLE": "1",
             "OMP_PROC_BIND": "false", "OMP_PLACES": "cores"}
ENV_SETTINGS = {
    "default": {},
    "fast_math": {"DNNL_DEFAULT_FPMATH_MODE": "BF16"},  # ONEDNN_DEFAULT_FPMATH_MODE is the newer spelling
    "omp_proc_bind_false": {"OMP_PROC_BIND": "false"},
    "omp_places_cores": {"OMP_PLACES": "cores"},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "lru_cache": {"LRU_CACHE_CAPACITY": "1024"},
    "guide": GUIDE_ENV,
}
# precision variants: optimisation steps (utils.optimize) and a start-up setting; "stages" limits a
# variant to the stages it changes
VARIANTS = {
    "fp32": dict(steps={}, env="default"),  # the faithful baseline and the fidelity reference
    "bf16": dict(steps={"bf16": {}}, env="default"),
    "autocast": dict(steps={"autocast": {"dtype": "bf16"}}, env="default"),
    "fast_math": dict(steps={}, env="fast_math"),
    "upstream": dict(steps={"bf16": {"components": ["transformer", "vae"]}}, env="default"),  # T5 fp32
    "int8_t5": dict(steps={"int8_weight_only": {"component": "text_encoder"}}, env="default",
                    stages=("encode_prompt",)),
}
# memory configurations: a variant's steps plus whether T5 is freed after encoding and VAE chunking
MEMORY_CONFIGS = {
    "fp32": dict(variant="fp32", free_text_encoder=False),
    "fp32+free": dict(variant="fp32", free_text_encoder=True),
    "upstream": dict(variant="upstream", free_text_encoder=False),
    "upstream+free": dict(variant="upstream", free_text_encoder=True),
    "autocast+free": dict(variant="autocast", free_text_encoder=True),
    "bf16": dict(variant="bf16", free_text_encoder=False),
    "bf16+free": dict(variant="bf16", free_text_encoder=True),
    "bf16+int8_t5": dict(variant="bf16", free_text_encoder=False, extra={"int8_weight_only": {}}),
    "bf16+int8_t5+free": dict(variant="bf16", free_text_encoder=True, extra={"int8_weight_only": {}}),
    "bf16+free+vae_batch1": dict(variant="bf16", free_text_encoder=True,
                                 extra={"vae_chunking": {"micro_batch_size": 1, "micro_frame_size": 17}}),
    "bf16+free+vae_frames9": dict(variant="bf16", free_text_encoder=True,
                                  extra={"vae_chunking": {"micro_batch_size": 4, "micro_frame_size": 9}}),
}
RESULT_MARKER = "TUNING_RESULT "
SETTING_FIELDS = ("model", "resolution", "aspect_ratio", "num_frames", "steps", "prompt", "threads")


def variant_steps(name: str, extra: dict | None = None) -> dict:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; accepted: {', '.join(VARIANTS)}")
    return {**VARIANTS[name]["steps"], **(extra or {})}


def variant_env(name: str) -> dict:
    setting = VARIANTS[name]["env"] if name in VARIANTS else name
    if setting not in ENV_SETTINGS:
        raise ValueError(f"unknown start-up setting {setting!r}; accepted: {', '.join(ENV_SETTINGS)}")
    return ENV_SETTINGS[setting]


def env_text(env: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(env.items()))


# ---- the parent side ------------------------------------------------------------------------------------

class ChildFailed(RuntimeError):
    pass


def run_in_fresh_process(task: str, env: dict | None = None, timeout: float | None = None, **spec) -> dict:
    """Run ``task`` with ``spec`` in a new Python process whose environment is this one's plus ``env``
    (and ``OMP_NUM_THREADS`` = ``spec["threads"]`` unless ``env`` sets it); return what it reports. A
    child killed from outside (e.g. by the kernel's out-of-memory killer) comes back as
    ``{"failed": ...}``; any other failure raises ``ChildFailed`` with the end of its error output."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    child_env = dict(os.environ) | {k: str(v) for k, v in (env or {}).items()}
    if spec.get("threads"):
        child_env.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    command = [sys.executable, "-m", "utils.tuning", task, "--spec", json.dumps(spec)]
    done = subprocess.run(command, env=child_env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode < 0:  # killed by a signal
        return {"failed": f"killed by signal {-done.returncode} (out of memory?)", "spec": spec, "env": env or {}}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode != 0 or not lines:
        raise ChildFailed(f"`{' '.join(command[:4])} ...` exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_MARKER):]) | {"env": env or {}}


def check_names(variants=(), env_settings=(), memory_configs=()) -> None:
    """Fail early, naming what is accepted, when a variant, start-up setting or memory configuration is unknown."""
    for kind, names, known in (("variants", variants, VARIANTS), ("start-up settings", env_settings, ENV_SETTINGS),
                               ("memory configurations", memory_configs, MEMORY_CONFIGS)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown {kind} {unknown}; accepted: {', '.join(known)}")


def stage_run(base: dict, variant: str, env_setting: str | None = None, **overrides) -> tuple[str, dict, dict]:
    """The ``stages`` task of ``variant`` (its steps, its start-up setting unless ``env_setting`` names
    another, its stages), from the common ``base`` spec and ``overrides``."""
    from .pipeline import STAGES

    env = variant_env(variant) | (ENV_SETTINGS[env_setting] if env_setting else {})
    spec = base | dict(optimizations=variant_steps(variant), stages=list(VARIANTS[variant].get("stages", STAGES)))
    return "stages", env, spec | {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}


def footprint_run(base: dict, config: str) -> tuple[str, dict, dict]:
    """The ``footprint`` task of memory configuration ``config``."""
    chosen = MEMORY_CONFIGS[config]
    steps = variant_steps(chosen["variant"], chosen.get("extra"))
    return "footprint", variant_env(chosen["variant"]), base | dict(optimizations=steps,
                                                                     free_text_encoder=chosen["free_text_encoder"])


def run_all(runs: dict[str, tuple[str, dict, dict]], desc: str) -> dict[str, dict]:
    """``{name: (task, env, spec)}`` one after another, each in a fresh process, with a progress bar."""
    results = {}
    for name, (task, env, spec) in tqdm(runs.items(), desc=desc, unit="process"):
        results[name] = run_in_fresh_process(task, env=env, **spec)
    return results


# ---- the child side: stages ---------------------------------------------------------------------------

def _build(spec: dict):
    from . import optimize
    from .pipeline import VideoSetting, load_pipeline

    pipe = load_pipeline(spec["model"], weights=spec.get("weights", "random"), dtype="fp32", load=())
    optimize.apply(pipe, spec.get("optimizations"))
    setting = VideoSetting.create(spec["resolution"], spec["aspect_ratio"], spec["num_frames"], spec["steps"])
    return pipe, setting


def _config(pipe, setting, spec: dict) -> dict:
    from .optimize import describe
    from .stages import record_config

    return record_config(pipe, setting, spec["threads"], optimizations=describe(pipe),
                         micro_batch_size=pipe.vae.micro_batch_size, micro_frame_size=pipe.vae.micro_frame_size)


def _measure(fn, *args, spec: dict, **kwargs):
    from .benchmark import measure

    return measure(fn, *args, warmup=spec.get("warmup", 1), repeats=spec.get("repeats", 3), threads=spec["threads"],
                   max_busy_retries=spec.get("busy_retries", 3), **kwargs)


def _loaded(pipe, component: str) -> float:
    start = time.perf_counter()
    pipe.load(component)
    return time.perf_counter() - start


def _timing(timing, load_s, pipe=None, component: str | None = None) -> dict:
    """A stage's timing, its model's load time and, for a loaded model, its bytes (quantised tensors
    counted by their data and scales) and the part of loading spent quantising (``utils.quantize``)."""
    entry = {"timing": timing.as_dict(), "load_s": load_s}
    if pipe is not None:
        from .quantize import quantized_bytes

        module = pipe._module(component)
        entry |= {"model_bytes": quantized_bytes(module), "quantize_s": getattr(module, "quantize_seconds", None)}
    return entry


def task_stages(spec: dict) -> dict:
    """Time ``spec["stages"]`` one model at a time (``utils.stages.measure_stages``' order), feeding
    each stage the reference's inputs when ``spec["inputs"]`` names a reference's outputs file (so
    each stage's error is its own), and save the outputs to ``spec["outputs"]``: the prompt embedding,
    the latent after one measured step, the final latent of ``fidelity_steps`` steps, the video."""
    from .pipeline import STAGES

    pipe, setting = _build(spec)
    stages = [s for s in STAGES if s in spec.get("stages", STAGES)]
    # a reference that was never written (its run refused or failed): this run uses its own inputs
    inputs = torch.load(spec["inputs"]) if spec.get("inputs") and Path(spec["inputs"]).is_file() else {}
    outputs, results, prompt = {}, {}, spec["prompt"]

    if "encode_prompt" in stages:
        load_s = _loaded(pipe, "text_encoder")
        timing = _measure(pipe.encode_prompt, [prompt], spec=spec)
        outputs["y"], outputs["mask"] = timing.result
        results["encode_prompt"] = _timing(timing, load_s, pipe, "text_encoder")
        pipe.release("text_encoder")
    y = inputs.get("y", outputs.get("y"))
    mask = inputs.get("mask", outputs.get("mask"))

    timing = _measure(pipe.prepare_latents, 1, setting, spec=spec)
    z = timing.result
    if "prepare_latents" in stages:
        results["prepare_latents"] = _timing(timing, None)

    if "denoise" in stages:
        if y is None:
            raise ValueError("denoise without encode_prompt needs a reference's outputs (spec['inputs'])")
        load_s = _loaded(pipe, "transformer")
        timing = _measure(pipe.denoise, z, y, mask, replace(setting, steps=1), progress=False, spec=spec)
        outputs["latent_one_step"] = timing.result
        results["denoise"] = _timing(timing, load_s, pipe, "transformer")
        if spec.get("fidelity_steps"):
            start = time.perf_counter()
            outputs["latent_final"] = pipe.denoise(z, y, mask, replace(setting, steps=spec["fidelity_steps"]),
                                                   progress=False)
            results["denoise"]["fidelity_run_s"] = time.perf_counter() - start
        pipe.release("transformer")

    if "decode" in stages:
        latents = inputs.get("latent_final", inputs.get("latent_one_step"))
        if latents is None:
            latents = outputs.get("latent_final", outputs.get("latent_one_step"))
        if latents is None:
            raise ValueError("decode without denoise needs a reference's outputs (spec['inputs'])")
        load_s = _loaded(pipe, "vae")
        timing = _measure(pipe.decode, latents, setting, spec=spec)
        outputs["video"] = timing.result
        results["decode"] = _timing(timing, load_s, pipe, "vae")
        pipe.release("vae")

    if spec.get("outputs"):
        Path(spec["outputs"]).parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in outputs.items()}, spec["outputs"])
    return dict(stages=results, config=_config(pipe, setting, spec), outputs=spec.get("outputs"),
                inputs_used=bool(inputs))


# ---- the child side: memory footprint -----------------------------------------------------------------

def task_footprint(spec: dict) -> dict:
    """A whole generation in the pipeline's order (``OpenSoraPipeline.__call__``: T5, freed or kept, then
    the transformer for one step, then the VAE, the transformer kept), event by event: seconds, peak
    resident memory during the event and resident memory after it. The memory preflight runs first; a
    refused setting comes back as ``refused`` with the message."""
    from . import optimize
    from .memory import InsufficientMemoryError, timed

    pipe, setting = _build(spec)
    setting = replace(setting, steps=1)  # memory does not grow with the step count
    free = bool(spec.get("free_text_encoder"))
    config = _config(pipe, setting, spec) | {"free_text_encoder": free}
    estimate = optimize.memory_estimate(pipe, setting, free_text_encoder=free)
    estimate = {k: v for k, v in estimate.items() if isinstance(v, (int, float, str, dict))}
    try:
        optimize.preflight(pipe, setting, free_text_encoder=free)
    except InsufficientMemoryError as err:
        return dict(refused=str(err), config=config, estimate=estimate)
    process = psutil.Process()
    events = [dict(event="start", stage=None, seconds=0.0, peak_rss_bytes=process.memory_info().rss,
                   rss_after_bytes=process.memory_info().rss)]

    def event(name, stage, fn, *args, **kwargs):
        result, seconds, peak = timed(fn, *args, **kwargs)
        events.append(dict(event=name, stage=stage, seconds=seconds, peak_rss_bytes=peak,
                           rss_after_bytes=process.memory_info().rss))
        return result

    torch.set_num_threads(spec["threads"])
    event("load text_encoder", "encode_prompt", pipe.load, "text_encoder")
    y, mask = event("encode_prompt", "encode_prompt", pipe.encode_prompt, [spec["prompt"]])
    if free:
        event("release text_encoder", "encode_prompt", pipe.release, "text_encoder")
    z = event("prepare_latents", "prepare_latents", pipe.prepare_latents, 1, setting)
    event("load transformer", "denoise", pipe.load, "transformer")
    z = event("denoise", "denoise", pipe.denoise, z, y, mask, setting, progress=False)
    event("load vae", "decode", pipe.load, "vae")
    event("decode", "decode", pipe.decode, z, setting)
    return dict(events=events, peak_rss_bytes=max(e["peak_rss_bytes"] for e in events), config=config,
                estimate=estimate)


# ---- the child side: adherence of the trained mini model ----------------------------------------------

def task_adherence(spec: dict) -> dict:
    """The mini model's adherence table with the variant's steps applied (``utils.minimodel``)."""
    from . import optimize
    from .minimodel import evaluate_adherence
    from .pipeline import DTYPES, load_pipeline
    from .quality import adherence_summary

    torch.set_num_threads(spec["threads"])
    pipe = load_pipeline("mini", weights="trained-mini", dtype="fp32")
    optimize.apply(pipe, spec.get("optimizations"))
    tables = {split: evaluate_adherence(pipe, split=split, seeds=spec["seeds"], steps=spec["steps"],
                                        progress=False) for split in spec["splits"]}
    names = {v: k for k, v in DTYPES.items()}
    return dict(tables={s: json.loads(t.to_json(orient="records")) for s, t in tables.items()},
                summaries={s: adherence_summary(t) for s, t in tables.items()}, optimizations=optimize.describe(pipe),
                dtype=names[pipe.dtypes["transformer"]], text_encoder_dtype=names[pipe.dtypes["text_encoder"]])


TASKS = {"stages": task_stages, "footprint": task_footprint, "adherence": task_adherence, "probe": task_probe}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.tuning", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--spec", required=True, help="the task's parameters as a JSON object")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    if "threads" in spec:
        torch.set_num_threads(spec["threads"])
    from .memory import InsufficientMemoryError

    try:
        result = TASKS[args.task](spec)
    except InsufficientMemoryError as err:  # a model that cannot fit here: a result, not a crash
        result = dict(refused=str(err))
    seen = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "DNNL_", "ONEDNN_", "STUDY_"))
            or k in ("THP_MEM_ALLOC_ENABLE", "LRU_CACHE_CAPACITY")}
    result |= dict(task=args.task, spec=spec, threads_used=torch.get_num_threads(), env_seen=seen, pid=os.getpid())
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
