"""Experiments that need a fresh process: precision variants, thread counts, start-up settings, memory.

Settings that the runtime reads when it starts (oneDNN's ``DNNL_DEFAULT_FPMATH_MODE``, OpenMP's
``OMP_PROC_BIND`` / ``OMP_PLACES``, the c10 allocator's ``THP_MEM_ALLOC_ENABLE``, oneDNN's
``LRU_CACHE_CAPACITY``) only take effect in a new process, and a process's high-water mark of
resident memory never goes down, so every run here is a child process:

    run_task("stages", env={"OMP_PROC_BIND": "false"}, threads=2, model="tiny", ...)

runs ``TASKS["stages"]`` through the fresh-process runner (``utils.measure.runner``) with that
environment and returns the JSON it prints. Tasks: ``stages`` (time each stage one model at a time and keep its
outputs for fidelity),
``footprint`` (peak resident memory of a whole pipeline run, event by event), ``adherence`` (the
trained mini model's prompt adherence) and ``probe`` (which oneDNN kernels run fp32 ops, with and
without fast math; ``utils.measure.onednn``). Timing goes through ``utils.measure.benchmark.measure`` (first
call apart, warm-up, repeats, median, other-process CPU check). The record builders below turn the results into
records (shared by notebooks 04 and 06).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import psutil
import torch
from tqdm.auto import tqdm

from utils.io import GIB
from utils.measure.benchmark import Timing, TimingPolicy, measure
from utils.measure.compare import DEFAULT_THRESHOLD, Spread, run_interleaved, verdict
from utils.measure.fidelity import fidelity, latent_errors
from utils.measure.onednn import task_probe
from utils.measure.results import Record, make_config, timing_record
from utils.measure.runner import run_in_fresh_process
from utils.measure.stages import record_config
from utils.model.dtypes import dtype_name
from utils.model.memory import InsufficientMemoryError, timed
from utils.model.pipeline import STAGES, VideoSetting, load_pipeline
from utils.optim import preflight, registry
from utils.optim.onnx_backends import runtime_facts
from utils.optim.quantize import quantized_bytes
from utils.optim.recipes import GUIDE_ENV
from utils.optim.registry import describe
from utils.testbed.adherence import adherence_summary
from utils.testbed.minimodel import adherence_records, evaluate_adherence, quality_config

# start-up settings, each set in a fresh process; "guide" is the Graviton guide's whole recommendation

ENV_SETTINGS = {
    "default": {},
    "fast_math": {"DNNL_DEFAULT_FPMATH_MODE": "BF16"},  # ONEDNN_DEFAULT_FPMATH_MODE is the newer spelling
    "omp_proc_bind_false": {"OMP_PROC_BIND": "false"},
    "omp_places_cores": {"OMP_PLACES": "cores"},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "lru_cache": {"LRU_CACHE_CAPACITY": "1024"},
    "guide": GUIDE_ENV,
}

# precision variants: optimisation steps (utils.optim.registry) and a start-up setting; "stages" limits a
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

    env = variant_env(variant) | (ENV_SETTINGS[env_setting] if env_setting else {})
    spec = base | dict(optimizations=variant_steps(variant), stages=list(VARIANTS[variant].get("stages", STAGES)))
    return "stages", env, spec | {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}


def footprint_run(base: dict, config: str) -> tuple[str, dict, dict]:
    """The ``footprint`` task of memory configuration ``config``."""
    chosen = MEMORY_CONFIGS[config]
    steps = variant_steps(chosen["variant"], chosen.get("extra"))
    return "footprint", variant_env(chosen["variant"]), base | dict(optimizations=steps,
                                                                     free_text_encoder=chosen["free_text_encoder"])


def run_task(task: str, env: dict | None = None, timeout: float | None = None, **spec) -> dict:
    """``TASKS[task]`` with ``spec`` in a fresh process (``utils.measure.runner``) with ``env`` added."""
    return run_in_fresh_process(f"{__name__}:{task}", env=env, timeout=timeout, **spec)


def run_all(runs: dict[str, tuple[str, dict, dict]], desc: str) -> dict[str, dict]:
    """``{name: (task, env, spec)}`` one after another, each in a fresh process, with a progress bar (for
    runs that are not ranked against each other: memory footprints, probes, adherence)."""
    results = {}
    for name, (task, env, spec) in tqdm(runs.items(), desc=desc, unit="process"):
        results[name] = run_task(task, env=env, **spec)
    return results


def run_compared(runs: dict[str, tuple[str, dict, dict]], processes: int, desc: str,
                 first_round_only: tuple[str, ...] = ("outputs", "fidelity_steps")) -> dict[str, dict]:
    """The comparison protocol (``utils.measure.compare``) over ``stages`` runs: every run in ``processes``
    fresh processes, interleaved; the spec keys ``first_round_only`` (outputs saved, the fidelity run) go to
    the first round only. Returns name -> ``combine_processes`` of its results."""
    def per_round(task, env, spec):
        return lambda round_: (task, env, spec if round_ == 0 else
                               {k: v for k, v in spec.items() if k not in first_round_only})

    results = run_interleaved({name: per_round(*run) for name, run in runs.items()}, processes,
                              runner=lambda task, env=None, **spec: run_task(task, env=env, **spec), desc=desc)
    return {name: combine_processes(parts) for name, parts in results.items()}


def combine_processes(results: list[dict]) -> dict:
    """One result from a variant's fresh processes: the first process's (its outputs, config and timings),
    each stage with ``processes`` (every process's median, in run order) and ``positions`` (their places in
    the interleaved sequence). A process that was refused or failed makes the whole result that one."""
    first = results[0]
    broken = [r for r in results if "stages" not in r]
    if broken:
        return broken[0]
    combined = dict(first, stages={stage: dict(entry) for stage, entry in first["stages"].items()})
    for stage, entry in combined["stages"].items():
        entry["processes"] = [r["stages"][stage]["timing"]["median_s"] for r in results]
        entry["positions"] = [r.get("position") for r in results]
    return combined


def process_spread(entry: dict) -> Spread:
    """A stage entry's between-process spread (one value when it ran in one process)."""
    return Spread.of(entry.get("processes") or [entry["timing"]["median_s"]])


# ---- the child side: stages ---------------------------------------------------------------------------

def _build(spec: dict):

    pipe = load_pipeline(spec["model"], weights=spec.get("weights", "random"), dtype="fp32", load=())
    registry.apply(pipe, spec.get("optimizations"))
    setting = VideoSetting.create(spec["resolution"], spec["aspect_ratio"], spec["num_frames"], spec["steps"])
    return pipe, setting


def _config(pipe, setting, spec: dict) -> dict:

    return record_config(pipe, setting, spec["threads"], optimizations=describe(pipe),
                         micro_batch_size=pipe.vae.micro_batch_size, micro_frame_size=pipe.vae.micro_frame_size)


def _measure(fn, *args, spec: dict, **kwargs):

    return measure(fn, *args, policy=TimingPolicy.from_spec(spec, repeats=3), **kwargs)


def _loaded(pipe, component: str) -> float:
    start = time.perf_counter()
    pipe.load(component)
    return time.perf_counter() - start


def _timing(timing, load_s, pipe=None, component: str | None = None) -> dict:
    """A stage's timing, its model's load time and, for a loaded model, its bytes (quantised tensors
    counted by their data and scales), the part of loading spent quantising (``utils.optim.quantize``) and the
    weight bytes of another runtime that runs part of it (``utils.optim.onnx_backends``)."""
    entry = {"timing": timing.as_dict(), "load_s": load_s}
    if pipe is not None:

        module = pipe._module(component)
        entry |= {"model_bytes": quantized_bytes(module), "quantize_s": getattr(module, "quantize_seconds", None),
                  "runtime": runtime_facts(module)}
    return entry


def task_stages(spec: dict) -> dict:
    """Time ``spec["stages"]`` one model at a time (``utils.measure.stages.measure_stages``' order), feeding
    each stage the reference's inputs when ``spec["inputs"]`` names a reference's outputs file (so
    each stage's error is its own), and save the outputs to ``spec["outputs"]``: the prompt embedding,
    the latent after one measured step, the final latent of ``fidelity_steps`` steps, the video."""

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

    pipe, setting = _build(spec)
    setting = replace(setting, steps=1)  # memory does not grow with the step count
    free = bool(spec.get("free_text_encoder"))
    config = _config(pipe, setting, spec) | {"free_text_encoder": free}
    estimate = preflight.memory_estimate(pipe, setting, free_text_encoder=free)
    estimate = {k: v for k, v in estimate.items() if isinstance(v, (int, float, str, dict))}
    try:
        preflight.preflight(pipe, setting, free_text_encoder=free)
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
    """The mini model's adherence table with the variant's steps applied (``utils.testbed.minimodel``)."""

    torch.set_num_threads(spec["threads"])
    pipe = load_pipeline("mini", weights="trained-mini", dtype="fp32")
    registry.apply(pipe, spec.get("optimizations"))
    tables = {split: evaluate_adherence(pipe, split=split, seeds=spec["seeds"], steps=spec["steps"],
                                        progress=False) for split in spec["splits"]}
    return dict(tables={s: json.loads(t.to_json(orient="records")) for s, t in tables.items()},
                summaries={s: adherence_summary(t) for s, t in tables.items()}, optimizations=registry.describe(pipe),
                dtype=dtype_name(pipe.dtypes["transformer"]),
                text_encoder_dtype=dtype_name(pipe.dtypes["text_encoder"]))


TASKS = {"stages": task_stages, "footprint": task_footprint, "adherence": task_adherence, "probe": task_probe}



# ---- timings ------------------------------------------------------------------------------------------

def timing_of(entry: dict) -> Timing:
    """A ``benchmark.Timing`` back from a child's ``Timing.as_dict()``."""
    fields = {k: v for k, v in entry.items() if k not in ("median_s", "iqr_s")}
    return Timing(**fields)


def experiment_config(result: dict, experiment: str, **extra) -> dict:
    """The record config of a child result: its pipeline config, the experiment, its start-up setting (``env``)
    and the start-up variables the child saw (``env_seen``: the runner starts it without the study's, so only
    the setting's own and the thread count)."""
    config = result.get("config") or make_config(**{k: result.get("spec", {}).get(k) for k in ("model", "threads")})
    return dict(config, experiment=experiment, env=env_text(result.get("env", {})),
                env_seen=env_text(result.get("env_seen", {})), **extra)


def stage_records(result: dict, variant: str, config: dict, steps: int) -> list[Record]:
    """Median time (denoise: per step), peak RSS and model load time of each measured stage, and the
    derived seconds per video of ``steps`` steps; a run that was refused or killed gets one record saying so."""
    if "stages" not in result:
        why = result.get("refused") or result.get("failed")
        return [Record(variant=variant, stage="total", metric="not_run", unit="", value=1.0, kind="measured",
                       config=config, note=f"not run: {why}")]
    records = []
    for stage in STAGES:
        if stage not in result["stages"]:
            continue
        entry = result["stages"][stage]
        timing = timing_of(entry["timing"])
        metric = "seconds_per_step" if stage == "denoise" else "seconds"
        spread = process_spread(entry)
        if "processes" in entry:  # the median of the processes' medians, every process's value kept
            records.append(Record(variant=variant, stage=stage, metric=metric, unit="s", value=spread.median,
                                  spread=spread.as_dict() | dict(positions=entry["positions"], within_process=dict(
                                      n=len(timing.times_s), iqr=timing.iqr_s, first=timing.first_s,
                                      other_cpu_max=max(timing.other_cpu, default=0.0))),
                                  config=config, note=f"median of {len(spread.values)} fresh processes, run "
                                                      "interleaved with the variants it is compared with"))
        else:
            records.append(timing_record(variant, stage, timing, config, metric=metric))
        records.append(Record(variant=variant, stage=stage, metric="peak_rss_bytes", unit="B",
                              value=timing.peak_rss_bytes, config=config, note="this stage's model alone in memory"))
        if entry.get("load_s") is not None:
            records.append(Record(variant=variant, stage=stage, metric="load_seconds", unit="s", value=entry["load_s"],
                                  spread={"n": 1}, config=config, note="random materialisation of the stage's model"))
        scale = steps if stage == "denoise" else 1
        records.append(Record(variant=variant, stage=stage, metric="video_seconds", unit="s",
                              value=spread.median * scale, kind="derived", config=config,
                              note=f"{steps} x one measured step" if stage == "denoise" else "one measured call"))
    return records


def ratio_records(results: dict, baseline, variant_of, metric: str, config_of, note: str,
                  threshold: float = DEFAULT_THRESHOLD) -> list[Record]:
    """Derived ``metric`` = baseline median / result median per stage (a speed-up above 1), for every
    result against ``results[baseline]``; ``variant_of(name)`` and ``config_of(name)`` label each. Where
    both ran in several processes, the record's ``quality`` holds the protocol's ``verdict`` (its note
    says it): a speed-up inside the between-process spread is "no measurable difference"."""
    if "stages" not in results.get(baseline, {}):
        return []
    base = results[baseline]["stages"]
    records = []
    for name, result in results.items():
        for stage, entry in result.get("stages", {}).items():
            if stage not in base or stage == "prepare_latents":
                continue
            ours, theirs = process_spread(entry), process_spread(base[stage])
            judged = verdict(theirs, ours, threshold) if len(ours.values) > 1 and len(theirs.values) > 1 else {}
            records.append(Record(variant=variant_of(name), stage=stage, metric=metric, unit="x",
                                  value=theirs.median / ours.median, kind="derived", config=config_of(name),
                                  quality=judged, spread=dict(baseline=theirs.as_dict(), variant=ours.as_dict()),
                                  note=note + (f"; {judged['verdict']}" if judged and name != baseline else "")))
    return records


# ---- fidelity against the fp32 reference --------------------------------------------------------------

def fidelity_records(variant: str, outputs: str, reference: str, config: dict) -> list[Record]:
    """Each stage's output against the reference's on the same inputs (``utils.testbed.adherence``): the prompt
    embedding and the latents (relative L2, cosine), the decoded frames (PSNR, SSIM, flicker ratio, max
    abs difference). An infinite PSNR (identical frames) is not stored; max_abs_diff = 0 says it."""

    ours, ref = torch.load(outputs), torch.load(reference)
    records = []

    def add(stage, metric, value, unit="", quality=None, note=""):
        if value is not None and math.isfinite(value):
            records.append(Record(variant=variant, stage=stage, metric=metric, unit=unit, value=float(value),
                                  spread={"n": 1}, config=config, quality=quality or {},
                                  note=note or "against the fp32 reference on the same inputs"))

    for stage, key, prefix in (("encode_prompt", "y", ""), ("denoise", "latent_one_step", ""),
                               ("denoise", "latent_final", "final_")):
        if key in ours and key in ref:
            errors = latent_errors(ours[key].float(), ref[key].float())
            add(stage, f"{prefix}rel_l2", errors["relative_l2"], quality=errors)
            add(stage, f"{prefix}cosine", errors["cosine"], quality=errors)
    if "video" in ours and "video" in ref:
        scores = fidelity(ours["video"], ref["video"])
        diff = float((ours["video"] - ref["video"]).abs().max())
        for metric, unit in (("psnr", "dB"), ("ssim", ""), ("flicker_ratio", "")):
            add("decode", metric, scores[metric], unit, quality=scores | {"max_abs_diff": diff})
        add("decode", "max_abs_diff", diff, quality=scores)
    return records


# ---- adherence of the trained mini model ----------------------------------------------------------------

def adherence_records_of(variant: str, result: dict, steps: int, threads: int) -> list[Record]:
    """``minimodel.adherence_records`` of each split of an ``adherence`` child result."""

    config = quality_config("mini", "trained-mini", steps, threads, dtype=result["dtype"]) | dict(
        text_encoder_dtype=result["text_encoder_dtype"], experiment="adherence",
        optimizations=result.get("optimizations", ""),
        env=" ".join(f"{k}={v}" for k, v in sorted(result.get("env", {}).items())))
    return [record for split, rows in result["tables"].items()
            for record in adherence_records(variant, split, pd.DataFrame(rows), config)]


def stage_table(results: dict[str, dict], steps: int) -> pd.DataFrame:
    """variant x stage: median seconds (denoise: per step) and derived seconds per video."""
    rows = []
    for name, result in results.items():
        for stage, entry in result.get("stages", {}).items():
            median = entry["timing"]["median_s"]
            rows.append(dict(run=name, stage=stage, median_s=median, iqr_s=entry["timing"]["iqr_s"],
                             video_s=median * (steps if stage == "denoise" else 1),
                             peak_rss_gib=(entry["timing"]["peak_rss_bytes"] or 0) / GIB, load_s=entry["load_s"]))
    return pd.DataFrame(rows)
