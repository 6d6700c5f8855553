"""What notebook ``07_step_caching`` runs: the step caches of ``utils.optim.caching`` (and diffusers' generic
hooks, ``utils.optim.hook_caches``) against simply taking fewer sampling steps.

- On the trained mini model: every variant generates every caption of both splits, one video per call (an
  adaptive cache decides per video, as upstream runs one prompt per batch), with the noise of each clip from
  its own seed; the prompt adherence, the transformer evaluations counted below the hooks, and the fidelity of
  each clip against the 30-step uncached clip from the same noise. The adherence difference to the uncached
  run is paired (same captions, same noise) and its margin is two standard errors of the per-clip differences.
- TeaCache's rescaling polynomial fitted to the mini model's own (input distance, output distance) pairs on
  calibration seeds apart from the evaluation seeds, next to the published OpenSora polynomial.
- On the real-size model (random weights): seconds per video of each variant, alternated in one process on
  one loaded transformer (``remove_cache`` between variants), with each step timed; adaptive caches replay a
  skip pattern (the one the mini model chose at the same threshold, or evenly spaced steps derived from
  TeaCache's published speed-up), since random weights would decide differently from trained ones; the cost
  of TeaCache's check alone, and the bytes each cache holds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from utils.experiments.e05_attention import synthetic_caption
from utils.measure.benchmark import TimingPolicy, measure
from utils.measure.fidelity import fidelity
from utils.measure.flops import count_flops
from utils.measure.results import Record, ResultsStore, make_config
from utils.model.pipeline import OpenSoraPipeline, VideoSetting
from utils.optim.caching import (
    apply_step_counts,
    cache_stats,
    consecutive_pairs,
    fit_teacache,
    modulated_input,
    recording_pairs,
    relative_l1,
    remove_cache,
    teacache_stats,
)
from utils.optim.registry import OPTIMIZATIONS
from utils.testbed import minimodel
from utils.testbed.adherence import adherence, paired_margin

EXPERIMENT = "step_caching"
BASELINE = "30 steps"  # the uncached run every variant is compared with


@dataclass(frozen=True)
class Variant:
    """One way to spend fewer transformer evaluations: ``cache`` (registry steps, {} for none) at ``steps``
    sampling steps; ``method`` and ``value`` are what the curve and the tables group by."""

    name: str
    method: str
    value: float | None
    steps: int
    cache: dict = field(default_factory=dict, hash=False)


# method -> (the variant's name for a value, the registry step, the option the value sets)
METHODS = {
    "teacache, published fit": ("teacache {} (published fit)", "teacache", "threshold"),
    "teacache, mini fit": ("teacache {} (mini fit)", "teacache", "threshold"),
    "pab": ("pab (VideoSys OpenSora)", "pab", None),
    "first-block cache (diffusers)": ("first-block cache {}", "first_block_cache", "threshold"),
    "magcache (diffusers, published ratios)": ("magcache {}", "mag_cache", "threshold"),
    "taylorseer (diffusers)": ("taylorseer every {}", "taylorseer", "cache_interval"),
}


def variant_of(method: str, value, steps: int, coefficients=None) -> Variant:
    """The variant of ``method`` at ``value`` (a threshold, an interval, or the step count for "fewer steps"
    and "none"), as the notebook builds it and as a record's config names it."""
    if method in ("none", "fewer steps"):
        n = int(value)
        return Variant(BASELINE if method == "none" and n == 30 else f"{n} steps", method, n, n)
    if method not in METHODS:
        raise ValueError(f"unknown caching method {method!r}; accepted: none, fewer steps, {', '.join(METHODS)}")
    name, step, option = METHODS[method]
    options = {} if option is None else {option: int(value) if option == "cache_interval" else float(value)}
    if method == "teacache, mini fit":
        options["coefficients"] = list(coefficients)
    return Variant(name.format(value), method, value, steps, {step: options})


def variants(steps: int, fewer_steps=(), teacache_thresholds=(), mini_thresholds=(), mini_coefficients=None,
             pab: bool = True, fbc_thresholds=(), magcache_thresholds=(), taylorseer_intervals=()) -> list[Variant]:
    """The baseline (``steps`` steps, no cache) and each variant the parameters ask for."""
    values = {"fewer steps": [n for n in fewer_steps if n != steps], "teacache, published fit": teacache_thresholds,
              "teacache, mini fit": mini_thresholds if mini_coefficients is not None else (),
              "pab": [None] if pab else [], "first-block cache (diffusers)": fbc_thresholds,
              "magcache (diffusers, published ratios)": magcache_thresholds,
              "taylorseer (diffusers)": taylorseer_intervals}
    return [variant_of("none", steps, steps)] + [
        variant_of(method, value, steps, mini_coefficients) for method, chosen in values.items() for value in chosen]


def use(pipe: OpenSoraPipeline, variant: Variant) -> None:
    """The transformer with ``variant``'s cache only (the previous one removed; counters always on)."""
    remove_cache(pipe.transformer)
    apply_step_counts(pipe)  # the counters, reset before each video by the sampler; a cache below replaces it
    for name, options in variant.cache.items():
        OPTIMIZATIONS[name](pipe, **options)


def describe(variant: Variant) -> str:
    return ", ".join(f"{k}({', '.join(f'{o}={v}' for o, v in sorted(opts.items()) if o != 'coefficients')})"
                     for k, opts in variant.cache.items()) or "none"


# ---- what a variant costs: FLOP-weighted evaluations ------------------------------------------------------

BRANCHES = ("attn", "cross_attn", "mlp")


def branch_flops(pipe: OpenSoraPipeline, setting: VideoSetting, caption_tokens: int) -> dict[str, int]:
    """FLOPs of one call of each branch of a spatial and a temporal block at ``setting`` (CFG batch of 2),
    counted on meta tensors (``utils.measure.flops``): keys ``attn_spatial``, ``mlp_temporal``, ..."""
    model = pipe.transformer
    T, h, w = model.grid_size(torch.empty(1, 1, *pipe.latent_size(setting), device="meta"))
    S, C, B = h * w, model.config.hidden_size, 2
    tokens = torch.empty(B, T * S, C, device="meta")
    caption = torch.empty(B, caption_tokens, C, device="meta")
    out = {}
    for block in (model.spatial_blocks[0], model.temporal_blocks[0]):
        kind = "temporal" if block.temporal else "spatial"
        sequence = torch.empty(*((B * S, T) if block.temporal else (B * T, S)), C, device="meta")
        out[f"attn_{kind}"] = count_flops(block.attn, sequence)[1]
        out[f"cross_attn_{kind}"] = count_flops(block.cross_attn, tokens, caption, None)[1]
        out[f"mlp_{kind}"] = count_flops(block.mlp, tokens)[1]
    return out


def equivalents(stats: dict, flops: dict[str, int]) -> float:
    """Full-evaluation equivalents of one video: each branch's calls per block of its type, weighted by its
    share of a block pair's FLOPs (``branch_flops``; embedders and final layer, which always run, left out)."""
    per_type = stats["blocks"] // 2
    pair = sum(flops.values())
    return sum(stats[f"executed_{key}"] / per_type * n for key, n in flops.items()) / pair


# ---- the mini model ---------------------------------------------------------------------------------------

def clip_seed(seed: int, index: int) -> int:
    """Each clip's own noise: seed 0 clip 3 -> 3, seed 1 clip 3 -> 1003."""
    return seed * 1000 + index


def run_clips(pipe: OpenSoraPipeline, variant: Variant, splits, seeds, cfg_scale: float,
              flops: dict[str, int] | None = None) -> list[dict]:
    """Every caption of ``splits`` once per seed, one video per call: decoded clip, final latent, counts (and
    the FLOP-weighted evaluations with ``flops``)."""
    use(pipe, variant)
    rows = []
    jobs = [(split, seed, i, a) for split in splits for seed in seeds
            for i, a in enumerate(minimodel.split_combinations(split))]
    for split, seed, index, attributes in tqdm(jobs, desc=variant.name, unit="clip", leave=False):
        video, latent = minimodel.generate(pipe, [attributes], clip_seed(seed, index), variant.steps, cfg_scale)
        stats = cache_stats(pipe.transformer)
        rows.append(dict(split=split, seed=seed, index=index, attributes=attributes, video=video[0], latent=latent[0],
                         equivalents=equivalents(stats, flops) if flops else None, **stats))
    return rows


def clip_table(rows: list[dict], reference: list[dict]) -> pd.DataFrame:
    """One row per clip: adherence, evaluations, executed fractions and fidelity against ``reference``."""
    if [(r["split"], r["seed"], r["index"]) for r in rows] != [(r["split"], r["seed"], r["index"]) for r in reference]:
        raise ValueError("a variant's clips and the reference's differ; run both over the same splits and seeds")
    scores = adherence(torch.stack([r["video"] for r in rows]), [r["attributes"] for r in rows])
    out = []
    for row, ref, (_, score) in zip(rows, reference, scores.iterrows()):
        quality = fidelity(row["video"][None], ref["video"][None], row["latent"][None], ref["latent"][None])
        possible = row["blocks"] * ref["evaluations"]
        out.append(dict(split=row["split"], seed=row["seed"], index=row["index"], caption=score["caption"],
                        all_correct=bool(score["all_correct"]), evaluations=row["evaluations"],
                        equivalents=row["equivalents"],
                        attention_fraction=row["executed_attn"] / possible,
                        cross_fraction=row["executed_cross_attn"] / possible,
                        block_fraction=row["executed_block"] / possible, cache_bytes=row["cache_bytes"],
                        psnr=quality["psnr"], ssim=quality["ssim"], flicker_ratio=quality["flicker_ratio"],
                        latent_relative_l2=quality["latent_relative_l2"]) | {
            f"correct_{k}": bool(score[f"correct_{k}"]) for k in ("shape", "colour", "motion")} | {
            "found": bool(score["found"])})
    return pd.DataFrame(out)


def summarise(name: str, table: pd.DataFrame, reference: pd.DataFrame) -> dict:
    """A variant's curve point: all-correct, its paired difference to the reference and that difference's
    margin, mean evaluations per video and the fidelity means."""
    difference = table["all_correct"].astype(float) - reference["all_correct"].astype(float)
    finite = table["psnr"].replace(np.inf, np.nan)
    return dict(variant=name, clips=len(table), all_correct=float(table["all_correct"].mean()),
                difference=float(difference.mean()), margin=paired_margin(difference.to_numpy()),
                evaluations=float(table["evaluations"].mean()), evaluations_min=int(table["evaluations"].min()),
                evaluations_max=int(table["evaluations"].max()), equivalents=float(table["equivalents"].mean()),
                attention_fraction=float(table["attention_fraction"].mean()), psnr=float(finite.mean()),
                psnr_identical=int(finite.isna().sum()), ssim=float(table["ssim"].mean()),
                flicker_ratio=float(table["flicker_ratio"].mean()),
                latent_relative_l2=float(table["latent_relative_l2"].mean()))


def mini_records(variant: Variant, table: pd.DataFrame, summary: dict, config: dict) -> list[Record]:
    """Adherence records per split and for both together, the counts and the fidelity means, each stored."""
    config = config | dict(experiment=EXPERIMENT, method=variant.method, method_value=variant.value,
                           sampling_steps=variant.steps, cache=describe(variant),
                           coefficients=variant.cache.get("teacache", {}).get("coefficients"))
    records = []
    for split, rows in [*table.groupby("split", sort=False), ("all", table)]:
        records += minimodel.adherence_records(variant.name, split, rows, config)
    n = len(table)
    note = f"{n} clips, one video per call; against the {BASELINE} uncached clip from the same noise"
    both = config | dict(split="all")
    records += [
        Record(variant.name, "adherence", "adherence_difference", "fraction", summary["difference"],
               spread={"n": n, "margin": summary["margin"]}, config=both,
               note=f"{note}; paired: the margin is 2 standard errors of the per-clip differences"),
        Record(variant.name, "denoise", "evaluations", "calls", summary["evaluations"],
               spread={"n": n, "min": summary["evaluations_min"], "max": summary["evaluations_max"]}, config=both,
               note="transformer calls per video in which the last block ran (counted below the cache hooks)"),
        Record(variant.name, "denoise", "attention_fraction", "fraction", summary["attention_fraction"],
               spread={"n": n}, config=both, note="self-attention calls run, over the uncached run's"),
        Record(variant.name, "denoise", "evaluation_equivalents", "calls", summary["equivalents"], kind="derived",
               spread={"n": n}, config=both,
               note="counted branch calls per video weighted by each branch's FLOPs in the real-size model at the "
                    "headline setting (a block pair = 1)"),
    ]
    for metric, unit in (("psnr", "dB"), ("ssim", ""), ("flicker_ratio", ""), ("latent_relative_l2", "")):
        if pd.notna(summary[metric]):
            records.append(Record(variant.name, "fidelity", metric, unit, float(summary[metric]),
                                  spread={"n": n, "identical": summary["psnr_identical"]}, config=both, note=note))
    return records


def mini_curve(store: ResultsStore, pipe: OpenSoraPipeline, config: dict, variant_list: list[Variant],
               splits, seeds, cfg_scale: float, flops: dict[str, int]) -> pd.DataFrame:
    """Every variant over the same clips; stored; returns one row per variant (``summarise``)."""
    baseline = next(v for v in variant_list if v.method == "none")
    reference_rows = run_clips(pipe, baseline, splits, seeds, cfg_scale, flops)
    reference = clip_table(reference_rows, reference_rows)
    summaries = []
    for variant in tqdm(variant_list, desc="variants", unit="variant"):
        table = reference if variant is baseline else clip_table(
            run_clips(pipe, variant, splits, seeds, cfg_scale, flops), reference_rows)
        summary = summarise(variant.name, table, reference)
        store.add(*mini_records(variant, table, summary, config))
        summaries.append(summary | dict(method=variant.method, value=variant.value))
    remove_cache(pipe.transformer)
    return pd.DataFrame(summaries)


# ---- TeaCache's polynomial on the mini model --------------------------------------------------------------

def calibrate_teacache(store: ResultsStore, pipe: OpenSoraPipeline, config: dict, seeds, steps: int,
                       cfg_scale: float, split: str = "train") -> tuple[tuple[float, ...], pd.DataFrame]:
    """(input distance, output distance) pairs of uncached runs of every caption of ``split`` (one video per
    call), the 4th-degree fit, stored as records; returns the coefficients and the pairs."""
    remove_cache(pipe.transformer)
    pairs = []
    for seed in tqdm(list(seeds), desc="TeaCache calibration", unit="seed"):
        for index, attributes in enumerate(minimodel.split_combinations(split)):
            with recording_pairs(pipe.transformer) as recorder:
                minimodel.generate(pipe, [attributes], clip_seed(seed, index), steps, cfg_scale)
            pairs += [(i + 1, x, y) for i, (x, y) in
                      enumerate(consecutive_pairs(recorder.inputs, recorder.outputs, steps))]
    frame = pd.DataFrame(pairs, columns=["step", "input_distance", "output_distance"])
    coefficients = fit_teacache(list(zip(frame["input_distance"], frame["output_distance"])))
    fitted = np.poly1d(coefficients)(frame["input_distance"])
    residual = float(np.sqrt(np.mean((fitted - frame["output_distance"]) ** 2)))
    note = (f"numpy.polyfit(degree 4) of {len(frame)} (input, output) relative-L1 pairs of consecutive steps, "
            f"{split} captions x calibration seeds {list(seeds)}, uncached, one video per call")
    cal = config | dict(experiment=EXPERIMENT, split=split, calibration_seeds=list(seeds))
    store.add(*[Record("teacache mini fit", "calibration", f"coefficient_{power}", "", float(c),
                       spread={"n": len(frame), "rms_residual": residual}, config=cal, note=note)
                for power, c in zip(range(len(coefficients) - 1, -1, -1), coefficients)])
    return coefficients, frame


# ---- the real-size model --------------------------------------------------------------------------------

def spread_steps(computed: int, steps: int) -> list[int]:
    """``computed`` step indices spread evenly over ``steps``, the first and last included."""
    if not 2 <= computed <= steps:
        raise ValueError(f"between 2 and {steps} computed steps, got {computed}")
    return sorted({round(i * (steps - 1) / (computed - 1)) for i in range(computed)})


def replay_variant(name: str, computed: list[int], steps: int, how: str) -> Variant:
    return Variant(name, f"teacache replay ({how})", len(computed), steps,
                   {"teacache": {"threshold": 0.0, "replay": list(computed)}})


def mini_pattern(pipe: OpenSoraPipeline, threshold: float, coefficients, attributes, seed: int, steps: int,
                 cfg_scale: float) -> list[int]:
    """The steps TeaCache computed on one mini-model video at ``threshold``."""
    variant = Variant("pattern", "teacache", threshold, steps,
                      {"teacache": {"threshold": threshold, "coefficients": list(coefficients)}})
    use(pipe, variant)
    computed = []

    def keep(i):
        if teacache_stats(pipe.transformer)["computed"] > len(computed):
            computed.append(i)

    setting = minimodel.mini_setting(steps=steps, cfg_scale=cfg_scale, seed=seed)
    y, mask = pipe.encode_prompt([attributes.caption])
    z = pipe.prepare_latents(1, setting)
    pipe.denoise(z, y, mask, setting, progress=False, on_step=keep)
    remove_cache(pipe.transformer)
    return computed


def timed_video(pipe: OpenSoraPipeline, variant: Variant, z, y, mask, setting: VideoSetting) -> dict:
    """One denoising run of ``variant``: total seconds, each step's seconds and the counts."""
    use(pipe, variant)
    setting = VideoSetting(**{**vars(setting), "steps": variant.steps})
    marks = [time.perf_counter()]
    start = marks[0]
    pipe.denoise(z, y, mask, setting, progress=False, on_step=lambda i: marks.append(time.perf_counter()))
    seconds = time.perf_counter() - start
    stats = cache_stats(pipe.transformer)
    remove_cache(pipe.transformer)  # frees what the cache held
    return dict(seconds=seconds, step_seconds=list(np.diff(marks)), **stats)


def real_timing(store: ResultsStore, pipe: OpenSoraPipeline, setting: VideoSetting, prompt: str,
                variant_list: list[Variant], rounds: int, config: dict) -> pd.DataFrame:
    """Each variant's seconds per video, alternated in one process (A B C A B C ...; ``rounds`` each, after one
    uncached warm-up step), with the counts and the bytes its cache held; stored."""
    y, mask = synthetic_caption(pipe, prompt)
    z = pipe.prepare_latents(1, setting)
    warm = Variant("warm-up", "none", 1, 1)
    timed_video(pipe, warm, z, y, mask, setting)
    results = {v.name: [] for v in variant_list}
    order = [v for _ in range(rounds) for v in variant_list]
    for variant in tqdm(order, desc="videos", unit="video"):
        results[variant.name].append(timed_video(pipe, variant, z, y, mask, setting))
    rows = []
    for variant in variant_list:
        runs = results[variant.name]
        seconds = [r["seconds"] for r in runs]
        steps_s = [s for r in runs for s in r["step_seconds"]]
        first = runs[0]
        cfg = config | dict(experiment=EXPERIMENT, method=variant.method, method_value=variant.value,
                            sampling_steps=variant.steps, cache=describe(variant), steps=variant.steps,
                            replay=variant.cache.get("teacache", {}).get("replay"))
        note = (f"denoising loop of one video, {rounds} run(s) alternated with the other variants in one process; "
                f"spread: the runs (n) and each step's seconds (step_min, step_max)")
        store.add(
            Record(variant.name, "denoise", "seconds", "s", float(np.median(seconds)),
                   spread=dict(n=len(seconds), per_run=seconds, min=min(seconds), max=max(seconds),
                           step_min=float(min(steps_s)),
                               step_max=float(max(steps_s)), step_median=float(np.median(steps_s))), config=cfg,
                   note=note),
            Record(variant.name, "denoise", "evaluations", "calls", int(first["evaluations"]), spread={"n": len(runs)},
                   config=cfg, note="transformer calls per video in which the last block ran (counted)"),
            Record(variant.name, "denoise", "cache_bytes", "bytes", int(first["cache_bytes"]), spread={"n": len(runs)},
                   config=cfg, note="bytes of the tensors the cache held at the end of the video (counted)"))
        rows.append(dict(variant=variant.name, method=variant.method, steps=variant.steps,
                         evaluations=first["evaluations"], attention_calls=first["executed_attn"],
                         seconds=float(np.median(seconds)), runs=len(seconds), min_s=min(seconds), max_s=max(seconds),
                         cache_mib=first["cache_bytes"] / 2**20))
    return pd.DataFrame(rows)


def check_cost(store: ResultsStore, pipe: OpenSoraPipeline, setting: VideoSetting, policy: TimingPolicy,
               config: dict) -> float:
    """Seconds of TeaCache's per-step check alone at the real shape: spatial block 0's modulated input and its
    relative L1 distance to the previous one (CFG batch of 2); stored."""
    model = pipe.transformer
    T, h, w = model.grid_size(pipe.prepare_latents(1, setting))
    x = torch.randn(2, T * h * w, model.config.hidden_size, dtype=model.dtype)
    t_mlp = torch.randn(2, 6 * model.config.hidden_size, dtype=model.dtype)
    previous = modulated_input(model.spatial_blocks[0], x, t_mlp)

    @torch.inference_mode()
    def check():
        return relative_l1(modulated_input(model.spatial_blocks[0], x, t_mlp), previous)

    timing = measure(check, policy=policy)
    store.add(Record("teacache check", "denoise", "seconds", "s", timing.median_s, spread=timing.spread(),
                     config=config | dict(experiment=EXPERIMENT, tokens=T * h * w),
                     note="one step's check: norm1, modulation and the relative L1 distance (with .item())"))
    return timing.median_s


def real_config(pipe: OpenSoraPipeline, setting: VideoSetting, dtype: str, threads: int) -> dict:
    return make_config(model=pipe.preset, weights="random", resolution=setting.resolution,
                       aspect_ratio=setting.aspect_ratio, frames=setting.num_frames, steps=setting.steps, dtype=dtype,
                       threads=threads, cfg_scale=setting.cfg_scale, seed=setting.seed)
