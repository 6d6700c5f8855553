"""What notebook ``08_end_to_end`` runs: the named recipes (``utils.optim.recipes``) and the ladder from
``faithful`` to ``fast``, each as complete generations at the headline setting.

- **Complete runs**: every configuration (a ladder rung or a recipe: registry steps plus start-up settings) is
  one whole generation in a fresh process: the pipeline built fp32 with nothing loaded, the steps applied,
  then T5 loaded, the prompt encoded, T5 freed, the transformer loaded, the 30 steps (each timed), the VAE
  loaded, the decode; the stages, each component's loading, the whole run and the process's peak resident
  memory. Configurations run in interleaved order (``utils.measure.compare.run_interleaved``), ``processes``
  rounds; the outputs of the first round are kept for fidelity against ``faithful`` (same noise, same prompt).
- **TeaCache at real size** replays the skip pattern TeaCache chose on the trained mini model at the same
  threshold (random weights would decide differently from trained ones, as in notebook 07).
- **Quality on the mini model**: each configuration's steps on the trained mini model (fresh process), every
  caption of the chosen splits once per seed, one video per call: adherence, and the paired difference to
  ``faithful`` with its margin (two standard errors of the per-clip differences).
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from utils.experiments.e05_attention import synthetic_caption
from utils.measure.compare import Spread, run_interleaved, verdict
from utils.measure.fidelity import fidelity, psnr
from utils.measure.results import Record, ResultsStore, make_config
from utils.measure.runner import run_in_fresh_process
from utils.model.memory import PeakRSS
from utils.model.pipeline import STAGES, VideoSetting, load_pipeline
from utils.model.weights import COMPONENTS, TRAINED_MINI, weights_id
from utils.optim import registry
from utils.optim.caching import cache_stats
from utils.optim.recipes import LADDER, ladder_steps, recipe
from utils.paths import PROMPTS
from utils.testbed import minimodel
from utils.testbed.adherence import adherence, paired_margin

EXPERIMENT = "end_to_end"
BASELINE = "faithful"
TASK = "utils.experiments.e08_end_to_end:{}"


@dataclass(frozen=True)
class Configuration:
    """A ladder rung or a recipe: what a complete run applies (registry steps) and starts with (env)."""

    name: str
    kind: str  # "rung" or "recipe"
    steps: dict = field(hash=False)
    env: dict = field(default_factory=dict, hash=False)


def configurations(rungs=None, recipes=("small",)) -> list[Configuration]:
    """The ladder's rungs (all, or those named) in ladder order, then the recipes named that are not a rung."""
    names = [name for name, _ in LADDER]
    chosen = names if rungs is None else [n for n in names if n in rungs]
    out = [Configuration(n, "rung", ladder_steps(n)) for n in chosen]  # a rung has no start-up setting
    return out + [Configuration(r, "recipe", recipe(r).steps, recipe(r).env) for r in recipes if r not in chosen]


def headline_prompt(index: int = 0) -> str:
    """Line ``index`` of the shipped prompts (``data/prompts``)."""
    prompts = [line.strip() for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not 0 <= index < len(prompts):
        raise ValueError(f"prompt_index {index} out of range; accepted: 0..{len(prompts) - 1} ({PROMPTS})")
    return prompts[index]


def teacache_threshold(configs: list[Configuration]) -> float | None:
    """The TeaCache threshold the configurations use (one at most), None if none does."""
    found = {c.steps["teacache"]["threshold"] for c in configs if "teacache" in c.steps}
    if len(found) > 1:
        raise ValueError(f"the configurations use several TeaCache thresholds {sorted(found)}; one replay serves one")
    return next(iter(found), None)


def with_replay(configuration: Configuration, computed: list[int] | None) -> dict:
    """The configuration's steps, TeaCache replaying ``computed`` (the mini model's pattern) if it has TeaCache."""
    steps = {k: dict(v) for k, v in configuration.steps.items()}
    if "teacache" in steps and computed is not None:
        steps["teacache"]["replay"] = list(computed)
    return steps


# ---- the child side ------------------------------------------------------------------------------------

def _setting_of(spec: dict) -> VideoSetting:
    return VideoSetting.create(spec["resolution"], spec["aspect_ratio"], spec["num_frames"], spec["steps"],
                               spec.get("cfg_scale", 7.0), spec.get("seed", 42))


def task_complete(spec: dict) -> dict:
    """One complete generation with ``spec["optimizations"]`` (registry steps): stage and load seconds, each
    step's seconds, peak resident memory of each stage and of the whole run; outputs saved to ``spec["outputs"]``."""
    torch.set_num_threads(spec["threads"])
    setting = _setting_of(spec)
    with PeakRSS() as whole:
        start = time.perf_counter()
        pipe = registry.apply(load_pipeline(spec["model"], dtype="fp32", load=()), spec["optimizations"])
        marks = []
        result = pipe([spec["prompt"]], setting, progress=False, free_text_encoder=True,
                      on_step=lambda i: marks.append(time.perf_counter()))
        seconds = time.perf_counter() - start
    steps_s = list(np.diff(marks)) if len(marks) > 1 else []
    out = dict(seconds=result.seconds, peak_rss_bytes=result.peak_rss_bytes, load_seconds=result.load_seconds,
               run_seconds=seconds, run_peak_rss_bytes=whole.peak,
               process_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               # the loop's set-up and first step (a compiled rung compiles here)
               first_step_seconds=result.seconds["denoise"] - sum(steps_s),
               later_step_seconds=steps_s, optimizations=registry.describe(pipe),
               dtypes={c: str(pipe.dtypes[c]).removeprefix("torch.") for c in COMPONENTS},
               cache=cache_stats(pipe.transformer) if "teacache" in pipe.optimizations else None)
    if spec.get("outputs"):
        Path(spec["outputs"]).parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(video=result.video.to(torch.float16), latents=result.latents), spec["outputs"])
    return out


def task_denoise_only(spec: dict) -> dict:
    """The denoising loop alone with ``spec["optimizations"]``: only the transformer built, a random caption
    embedding with the prompt's real mask (T5 never built), ``spec["steps"]`` steps each timed."""
    torch.set_num_threads(spec["threads"])
    setting = _setting_of(spec)
    pipe = registry.apply(load_pipeline(spec["model"], dtype="fp32", load=()), spec["optimizations"])
    pipe.load("transformer")
    y, mask = synthetic_caption(pipe, spec["prompt"])
    marks = []
    start = time.perf_counter()
    pipe.denoise(pipe.prepare_latents(1, setting), y, mask, setting, progress=False,
                 on_step=lambda i: marks.append(time.perf_counter()))
    later = list(np.diff(marks))
    return dict(first_step_seconds=marks[0] - start, later_step_seconds=later,
                process_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def task_mini(spec: dict) -> dict:
    """The trained mini model with ``spec["optimizations"]``: every caption of the splits once per seed, one
    video per call; per-clip adherence rows; the clips saved to ``spec["outputs"]`` for fidelity."""
    torch.set_num_threads(spec["threads"])
    pipe = registry.apply(load_pipeline("mini", weights=TRAINED_MINI, dtype="fp32", load=()), spec["optimizations"])
    for component in COMPONENTS:
        pipe.load(component)
    rows, videos, latents = [], [], []
    for split in spec["splits"]:
        for seed in spec["seeds"]:
            for index, attributes in enumerate(minimodel.split_combinations(split)):
                video, latent = minimodel.generate(pipe, [attributes], seed * 1000 + index, spec["steps"],
                                                   spec.get("cfg_scale", 7.0))
                score = adherence(video, [attributes]).iloc[0]
                rows.append(dict(split=split, seed=seed, index=index, caption=score["caption"],
                                 all_correct=bool(score["all_correct"])))
                videos.append(video[0].to(torch.float16))
                latents.append(latent[0])
    torch.save(dict(video=torch.stack(videos), latents=torch.stack(latents)), spec["outputs"])
    return dict(rows=rows, optimizations=registry.describe(pipe))


TASKS = {"complete": task_complete, "denoise_only": task_denoise_only, "mini": task_mini}


# ---- the parent side -----------------------------------------------------------------------------------

def probe_replay(configuration: Configuration, steps: int) -> list[int] | None:
    """For a TeaCache configuration timed over ``steps`` (at least 3) steps: compute the first and the last, skip
    the rest, so both an evaluated and a skipped step are timed; None for a configuration without TeaCache."""
    if "teacache" not in configuration.steps:
        return None
    if steps < 3:
        raise ValueError(f"timing a skipped step needs at least 3 protocol steps, got {steps}")
    return [0, steps - 1]


def derived_video_seconds(run: dict, steps: int, evaluated: int, computed: list[int] | None) -> float:
    """A whole video of ``steps`` steps, ``evaluated`` of them running the blocks, from a run over fewer steps:
    building and loading, the encode, the first step (compilation included), ``evaluated - 1`` evaluated steps
    and the skipped ones at the medians that run measured, the decode."""
    later = run["later_step_seconds"]  # steps 1.. of the timed run
    if computed is None:
        evaluated_s, skipped_s = float(np.median(later)), 0.0
    else:
        evaluated_s = float(np.median([t for i, t in enumerate(later, 1) if i in computed]))
        skipped_s = float(np.median([t for i, t in enumerate(later, 1) if i not in computed]))
    overhead = run["run_seconds"] - sum(run["seconds"].values())  # building, loading, what lies between stages
    return (overhead + run["seconds"]["encode_prompt"] + run["seconds"]["prepare_latents"] + run["first_step_seconds"]
            + (evaluated - 1) * evaluated_s + (steps - evaluated) * skipped_s + run["seconds"]["decode"])


def _spec(setting: VideoSetting, model: str, prompt: str, threads: int, steps: int) -> dict:
    return dict(model=model, resolution=setting.resolution, aspect_ratio=setting.aspect_ratio,
                num_frames=setting.num_frames, steps=steps, cfg_scale=setting.cfg_scale, seed=setting.seed,
                prompt=prompt, threads=threads)


def _config(config: dict, c: Configuration, run: dict, setting: VideoSetting, model: str, prompt: str, threads: int,
            **extra) -> dict:
    return config | dict(experiment=EXPERIMENT, configuration=c.name, kind=c.kind, weights="random",
                         optimizations=run["optimizations"], env=" ".join(f"{k}={v}" for k, v in c.env.items()),
                         dtypes=run["dtypes"], model=model, resolution=setting.resolution,
                         aspect_ratio=setting.aspect_ratio, frames=setting.num_frames, steps=setting.steps,
                         prompt=prompt, threads=threads, **extra)


def _add(store: ResultsStore, name: str, stage: str, metric: str, unit: str, values, cfg: dict, note: str,
         kind: str = "measured") -> float:
    values = [float(v) for v in values]
    store.add(Record(name, stage, metric, unit, float(np.median(values)), kind=kind,
                     spread=dict(n=len(values), per_run=values, min=min(values), max=max(values)), config=cfg,
                     note=note))
    return float(np.median(values))


def protocol_runs(store: ResultsStore, configs: list[Configuration], setting: VideoSetting, model: str, prompt: str,
                  processes: int, threads: int, protocol_steps: int, replay: list[int] | None, config: dict,
                  runner=run_in_fresh_process) -> pd.DataFrame:
    """Every configuration ``processes`` times, fresh processes in interleaved order, each a complete generation
    over ``protocol_steps`` steps at the setting's resolution and frames: the stages, each component's loading,
    the steps and the process's peak; the seconds of a ``setting.steps``-step video derived per process (TeaCache
    configurations: ``len(replay)`` evaluated steps); stored. One row per configuration (medians)."""
    spec = _spec(setting, model, prompt, threads, protocol_steps)

    def run_of(c: Configuration):
        return TASK.format("complete"), c.env, dict(spec, optimizations=with_replay(c, probe_replay(c, protocol_steps)))

    results = run_interleaved({c.name: run_of(c) for c in configs}, processes, runner=runner, desc="protocol")
    rows = []
    for c in configs:
        runs = results[c.name]
        computed = probe_replay(c, protocol_steps)
        evaluated = len(replay) if computed is not None and replay is not None else setting.steps
        cfg = _config(config, c, runs[0], setting, model, prompt, threads, part="protocol",
                      protocol_steps=protocol_steps, evaluated_steps=evaluated, processes=len(runs))
        note = (f"a complete generation over {protocol_steps} steps in a fresh process, {len(runs)} processes in "
                "interleaved order with the other configurations; spread: every process's value (per_run)")
        row = dict(configuration=c.name, kind=c.kind, optimizations=runs[0]["optimizations"])
        for stage in ("encode_prompt", "decode"):
            row[f"{stage} s"] = _add(store, c.name, stage, "seconds", "s", [r["seconds"][stage] for r in runs], cfg,
                                     note)
        for component in COMPONENTS:
            row[f"load {component} s"] = _add(store, c.name, f"load_{component}", "seconds", "s",
                                              [r["load_seconds"].get(component, 0.0) for r in runs], cfg,
                                              note + "; building the component (random weights) with its load hooks")
        row["first step s"] = _add(store, c.name, "denoise", "first_step_seconds", "s",
                                   [r["first_step_seconds"] for r in runs], cfg,
                                   note + "; the loop's set-up and first step (compilation included)")
        row["step s"] = _add(store, c.name, "denoise", "step_seconds", "s",
                             [np.median([t for i, t in enumerate(r["later_step_seconds"], 1)
                                         if computed is None or i in computed]) for r in runs], cfg,
                             note + "; the median of the later steps that ran the blocks")
        if computed is not None:
            row["skipped step s"] = _add(store, c.name, "denoise", "skipped_step_seconds", "s",
                                         [np.median([t for i, t in enumerate(r["later_step_seconds"], 1)
                                                     if i not in computed]) for r in runs], cfg,
                                         note + "; the median of the steps TeaCache skipped (its check, the final "
                                                "layer and the cached residual)")
        row["evaluated steps"] = evaluated
        row["video s"] = _add(store, c.name, "video", "seconds", "s",
                              [derived_video_seconds(r, setting.steps, evaluated, computed) for r in runs], cfg,
                              f"a {setting.steps}-step video derived per process ({evaluated} steps running the "
                              "blocks): building and loading, the encode, the first step, the later steps at their "
                              "measured medians, the decode", kind="derived")
        row["peak GiB"] = _add(store, c.name, "video", "peak_rss", "bytes", [r["process_max_rss_bytes"] for r in runs],
                               cfg, note + "; the process's high-water mark of resident memory (getrusage): the step "
                                           "count does not change it") / 2**30
        for stage in ("encode_prompt", "denoise", "decode"):
            row[f"{stage} peak GiB"] = _add(store, c.name, stage, "peak_rss", "bytes",
                                            [r["peak_rss_bytes"][stage] for r in runs], cfg,
                                            note + "; the stage's peak resident memory (sampled while it ran)") / 2**30
        rows.append(row)
    return pd.DataFrame(rows)


def complete_runs(store: ResultsStore, configs: list[Configuration], setting: VideoSetting, model: str, prompt: str,
                  threads: int, outputs: Path, replay: list[int] | None, config: dict,
                  runner=run_in_fresh_process) -> pd.DataFrame:
    """One whole generation of each configuration at ``setting`` (every step), in a fresh process: its measured
    seconds against the derived ones of the protocol (when stored), and the fidelity of its output against
    ``faithful``'s (when it is among them); stored."""
    spec = _spec(setting, model, prompt, threads, setting.steps)
    results = {}
    for c in configs:
        results[c.name] = runner(TASK.format("complete"), env=c.env, **spec, optimizations=with_replay(c, replay),
                                 outputs=str(outputs / f"{c.name}.pt"))
    reference = outputs / f"{BASELINE}.pt"
    reference = torch.load(reference) if BASELINE in results else None
    rows = []
    for c in configs:
        run = results[c.name]
        cfg = _config(config, c, run, setting, model, prompt, threads, part="complete", processes=1)
        note = "one whole generation (every step) in a fresh process"
        row = dict(configuration=c.name, **{"video s": _add(store, c.name, "complete", "seconds", "s",
                                                             [run["run_seconds"]], cfg, note)})
        row["peak GiB"] = _add(store, c.name, "complete", "peak_rss", "bytes", [run["process_max_rss_bytes"]], cfg,
                               note + "; the process's high-water mark of resident memory (getrusage)") / 2**30
        for stage in STAGES:
            row[f"{stage} s"] = _add(store, c.name, "complete", f"{stage}_seconds", "s", [run["seconds"][stage]], cfg,
                                     note)
        if run["cache"]:
            row["evaluations"] = _add(store, c.name, "complete", "evaluations", "calls", [run["cache"]["evaluations"]],
                                      cfg, note + "; transformer calls in which the blocks ran (counted)")
        if reference is not None:
            mine = torch.load(outputs / f"{c.name}.pt")
            quality = fidelity(mine["video"].float(), reference["video"].float(), mine["latents"], reference["latents"])
            for metric in ("psnr", "ssim", "latent_relative_l2"):
                row[metric] = float(quality[metric])
                store.add(Record(c.name, "fidelity", metric, "dB" if metric == "psnr" else "", row[metric],
                                 kind="derived", spread={"n": 1}, config=cfg,
                                 note=f"decoded frames / final latent against {BASELINE}'s complete run from the same "
                                      "noise and prompt"))
        rows.append(row)
    return pd.DataFrame(rows)


def context_check(store: ResultsStore, configuration: Configuration, setting: VideoSetting, model: str, prompt: str,
                  processes: int, threads: int, steps: int, config: dict, runner=run_in_fresh_process) -> pd.DataFrame:
    """Does a complete run slow the denoising loop? ``configuration``'s steady step (the median of steps 2..) in a
    whole generation (T5 built, encoding and freed first) against a process that only denoises (the transformer
    alone, a random caption embedding), fresh processes in interleaved order; stored, with the protocol's verdict."""
    spec = _spec(setting, model, prompt, threads, steps)
    options = with_replay(configuration, None)
    if "teacache" in options:  # every step runs the blocks, so the two loops do the same work
        del options["teacache"]
    runs = {"complete run": (TASK.format("complete"), configuration.env, dict(spec, optimizations=options)),
            "denoise only": (TASK.format("denoise_only"), configuration.env, dict(spec, optimizations=options))}
    results = run_interleaved(runs, processes, runner=runner, desc="context")
    rows, spreads = [], {}
    for context, runs_of in results.items():
        described = dict(optimizations=registry.describe(options), dtypes=None)
        cfg = _config(config, configuration, described, setting, model, prompt, threads, part="context",
                      context=context, protocol_steps=steps, processes=len(runs_of))
        steady = [float(np.median(r["later_step_seconds"])) for r in runs_of]
        spreads[context] = Spread.of(steady)
        _add(store, f"{configuration.name} ({context})", "denoise", "step_seconds", "s", steady, cfg,
             f"the median of steps 2..{steps} in each of {len(runs_of)} fresh processes, interleaved with the other "
             "context; spread: every process's value (per_run)")
        rows.append(dict(context=context, **{"step s": spreads[context].median, "min s": min(steady),
                                             "max s": max(steady)}))
    judged = verdict(spreads["denoise only"], spreads["complete run"])
    table = pd.DataFrame(rows)
    table["complete / denoise only"] = judged["ratio"]
    table["verdict"] = judged["verdict"]
    return table


def mini_quality(store: ResultsStore, configs: list[Configuration], splits, seeds, steps: int, threads: int,
                 outputs: Path, config: dict, runner=run_in_fresh_process) -> pd.DataFrame:
    """Each configuration's steps on the trained mini model (fresh process each, its start-up settings):
    adherence per split, the paired difference to ``faithful`` with its margin, fidelity to its clips; stored."""
    results = {}
    for c in configs:
        results[c.name] = runner(TASK.format("mini"), env=c.env, optimizations=c.steps, splits=list(splits),
                                 seeds=list(seeds), steps=steps, threads=threads,
                                 outputs=str(outputs / f"mini-{c.name}.pt"))
    reference = pd.DataFrame(results[BASELINE]["rows"])
    ref_clips = torch.load(outputs / f"mini-{BASELINE}.pt")
    rows = []
    for c in configs:
        table = pd.DataFrame(results[c.name]["rows"])
        cfg = config | dict(experiment=EXPERIMENT, configuration=c.name, kind=c.kind, model="mini",
                            weights=TRAINED_MINI, mini_weights=weights_id(), steps=steps,
                            optimizations=results[c.name]["optimizations"],
                            splits=",".join(splits), seeds=",".join(map(str, seeds)), threads=threads)
        difference = table["all_correct"].astype(int) - reference["all_correct"].astype(int)
        margin = paired_margin(difference)
        clips = torch.load(outputs / f"mini-{c.name}.pt")
        # PSNR only: SSIM over every clip at once would hold tens of GB (a Gaussian window over the stacked clips)
        clip_psnr = psnr(clips["video"].float(), ref_clips["video"].float())
        row = dict(configuration=c.name, **{f"all-correct {s}": float(table[table["split"] == s]["all_correct"].mean())
                                            for s in splits})
        row.update(all_correct=float(table["all_correct"].mean()), difference=float(difference.mean()),
                   margin=margin, psnr=float(clip_psnr))
        for split in splits:
            store.add(Record(c.name, "adherence", "all_correct", "fraction", row[f"all-correct {split}"],
                             spread={"n": int((table["split"] == split).sum())}, config=cfg | dict(split=split),
                             kind="measured", note="mini model clips whose shape, colour and motion are all right"))
        store.add(Record(c.name, "adherence", "adherence_difference", "fraction", row["difference"],
                         spread=dict(n=len(table), margin=margin), config=cfg, kind="derived",
                         note=f"mean per-clip all-correct difference to {BASELINE} (same captions and noise); margin: "
                              "two standard errors of the per-clip differences"),
                  Record(c.name, "adherence", "psnr", "dB", row["psnr"], spread={"n": len(table)}, config=cfg,
                         kind="derived", note=f"the mini model's clips against {BASELINE}'s from the same noise"))
        rows.append(row)
    return pd.DataFrame(rows)


def experiment_config(store: ResultsStore, **extra) -> dict:
    return make_config(experiment=EXPERIMENT, environment_id=store.environment_id, **extra)
