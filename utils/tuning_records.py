"""Records, footprint entries and instance sizing from ``utils.tuning``'s child results.

Every figure notebook 04 shows goes through here into the results store (``utils.results``): stage
timings per precision, thread count and start-up setting; fidelity against the fp32 reference; the
memory waterfall of each configuration; the oneDNN probe; and the smallest Graviton instance each
configuration fits in (derived from the measured peak and a stated headroom for the OS).
"""
from __future__ import annotations

import math

import pandas as pd
import torch

from .benchmark import Timing
from .memory import GIB, footprint_key
from .pipeline import STAGES
from .results import Record, make_config, timing_record

NOTEBOOK = "04_precision_threads_memory"

# ---- Graviton instance sizes ------------------------------------------------------------------------------
# vCPUs per size and GiB of memory per vCPU by family (AWS's instance type pages: c7g/c8g "compute optimised"
# 2 GiB per vCPU, m7g/m8g 4, r7g/r8g 8); sizes .medium to .16xlarge
INSTANCE_VCPUS = {"medium": 1, "large": 2, "xlarge": 4, "2xlarge": 8, "4xlarge": 16, "8xlarge": 32, "12xlarge": 48,
                  "16xlarge": 64}
GIB_PER_VCPU = {"c7g": 2, "m7g": 4, "r7g": 8, "c8g": 2, "m8g": 4, "r8g": 8}
# Headroom for the OS, an assumption: the kernel and firmware keep 3-5 % of the nominal memory out of
# MemTotal, and the OS with its daemons and the page cache of the libraries needs about half a GiB.
HEADROOM_FRACTION = 0.06
HEADROOM_FIXED_GIB = 0.5
HEADROOM_RULE = (f"usable = nominal x (1 - {HEADROOM_FRACTION:.0%}) - {HEADROOM_FIXED_GIB} GiB "
                 "(kernel/firmware reservation and the OS; an assumption, not measured)")


def instance_table(families=("c7g", "m7g", "r7g")) -> pd.DataFrame:
    """instance, family, vcpus, memory_gib (nominal) and usable_gib (after the OS headroom), smallest first."""
    unknown = set(families) - set(GIB_PER_VCPU)
    if unknown:
        raise ValueError(f"unknown instance families {sorted(unknown)}; accepted: {', '.join(GIB_PER_VCPU)}")
    rows = [dict(instance=f"{family}.{size}", family=family, vcpus=vcpus, memory_gib=vcpus * GIB_PER_VCPU[family],
                 usable_gib=vcpus * GIB_PER_VCPU[family] * (1 - HEADROOM_FRACTION) - HEADROOM_FIXED_GIB)
            for family in families for size, vcpus in INSTANCE_VCPUS.items()]
    return pd.DataFrame(rows).sort_values(["family", "memory_gib"], kind="stable").reset_index(drop=True)


def smallest_instance(peak_bytes: float, family: str) -> dict | None:
    """The smallest ``family`` instance whose usable memory holds ``peak_bytes``, or None."""
    table = instance_table((family,))
    fits = table[table["usable_gib"] * GIB >= peak_bytes]
    return None if fits.empty else fits.iloc[0].to_dict()


# ---- timings ------------------------------------------------------------------------------------------

def timing_of(entry: dict) -> Timing:
    """A ``benchmark.Timing`` back from a child's ``Timing.as_dict()``."""
    fields = {k: v for k, v in entry.items() if k not in ("median_s", "iqr_s")}
    return Timing(**fields)


def experiment_config(result: dict, experiment: str, **extra) -> dict:
    """The record config of a child result: its pipeline config, the experiment and its start-up setting."""
    from .tuning import env_text

    config = result.get("config") or make_config(**{k: result.get("spec", {}).get(k) for k in ("model", "threads")})
    return dict(config, experiment=experiment, env=env_text(result.get("env", {})), **extra)


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
        records.append(timing_record(variant, stage, timing, config, metric=metric))
        records.append(Record(variant=variant, stage=stage, metric="peak_rss_bytes", unit="B",
                              value=timing.peak_rss_bytes, config=config, note="this stage's model alone in memory"))
        if entry.get("load_s") is not None:
            records.append(Record(variant=variant, stage=stage, metric="load_seconds", unit="s", value=entry["load_s"],
                                  spread={"n": 1}, config=config, note="random materialisation of the stage's model"))
        scale = steps if stage == "denoise" else 1
        records.append(Record(variant=variant, stage=stage, metric="video_seconds", unit="s",
                              value=timing.median_s * scale, kind="derived", config=config,
                              note=f"{steps} x one measured step" if stage == "denoise" else "one measured call"))
    return records


def ratio_records(results: dict, baseline, variant_of, metric: str, config_of, note: str) -> list[Record]:
    """Derived ``metric`` = baseline median / result median per stage (a speed-up above 1), for every
    result against ``results[baseline]``; ``variant_of(name)`` and ``config_of(name)`` label each."""
    if "stages" not in results.get(baseline, {}):
        return []
    base = results[baseline]["stages"]
    records = []
    for name, result in results.items():
        for stage, entry in result.get("stages", {}).items():
            if stage not in base or stage == "prepare_latents":
                continue
            value = base[stage]["timing"]["median_s"] / entry["timing"]["median_s"]
            records.append(Record(variant=variant_of(name), stage=stage, metric=metric, unit="x", value=value,
                                  kind="derived", config=config_of(name), note=note))
    return records


# ---- fidelity against the fp32 reference --------------------------------------------------------------

def fidelity_records(variant: str, outputs: str, reference: str, config: dict) -> list[Record]:
    """Each stage's output against the reference's on the same inputs (``utils.quality``): the prompt
    embedding and the latents (relative L2, cosine), the decoded frames (PSNR, SSIM, flicker ratio, max
    abs difference). An infinite PSNR (identical frames) is not stored; max_abs_diff = 0 says it."""
    from .quality import fidelity, latent_errors

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


# ---- memory -------------------------------------------------------------------------------------------

# the waterfall of a whole run: (event, stage of the record, metric of the record, label on a figure)
WATERFALL = (("load text_encoder", "encode_prompt", "load_peak_rss_bytes", "load T5"),
             ("encode_prompt", "encode_prompt", "peak_rss_bytes", "encode"),
             ("release text_encoder", "encode_prompt", "rss_after_release_bytes", "free T5"),
             ("load transformer", "denoise", "load_peak_rss_bytes", "load transformer"),
             ("denoise", "denoise", "peak_rss_bytes", "denoise step"),
             ("load vae", "decode", "load_peak_rss_bytes", "load VAE"),
             ("decode", "decode", "peak_rss_bytes", "decode"))


def footprint_records(name: str, result: dict, families=("c7g", "m7g", "r7g")) -> list[Record]:
    """The waterfall of one memory configuration (measured), its total peak, the smallest instance of
    each family it fits in (derived); a configuration the preflight refused gets its estimate instead."""
    config = experiment_config(result, "memory", memory_config=name)
    if "refused" in result or "failed" in result:
        estimate = result.get("estimate", {})
        why = result.get("refused") or result.get("failed")
        return [Record(variant=name, stage="total", metric="refused_estimate_bytes", unit="B",
                       value=float(estimate.get("peak", 0)), kind="derived", config=config,
                       note=f"not run: {why}")]
    records = []
    metric_of = {event: (stage, metric) for event, stage, metric, _ in WATERFALL}
    for event in result["events"]:
        if event["event"] not in metric_of:
            continue
        stage, metric = metric_of[event["event"]]
        value = event["rss_after_bytes"] if metric == "rss_after_release_bytes" else event["peak_rss_bytes"]
        records.append(Record(variant=name, stage=stage, metric=metric, unit="B", value=value, config=config,
                              note=f"{event['event']}: {event['seconds']:.1f} s"))
        if event["event"].startswith("load "):
            records.append(Record(variant=name, stage=stage, metric="load_seconds", unit="s", value=event["seconds"],
                                  spread={"n": 1}, config=config, note=event["event"]))
    peak = result["peak_rss_bytes"]
    records.append(Record(variant=name, stage="total", metric="peak_rss_bytes", unit="B", value=peak, config=config,
                          note="highest resident set size of the whole run"))
    records.append(Record(variant=name, stage="total", metric="analytic_peak_bytes", unit="B",
                          value=float(result["estimate"]["analytic_peak"]), kind="derived", config=config,
                          note="the preflight's analytic estimate for the same run"))
    for family in families:
        fit = smallest_instance(peak, family)
        records.append(Record(variant=name, stage="total", metric=f"smallest_{family}_gib", unit="GiB",
                              value=float(fit["memory_gib"]) if fit else float("nan"), kind="derived",
                              config=config, note=(fit["instance"] if fit else f"no {family} up to .16xlarge")
                              + f"; {HEADROOM_RULE}"))
    return [r for r in records if not (isinstance(r.value, float) and math.isnan(r.value))]


def footprint_entries(results: dict[str, dict], environment: dict, run_id: str) -> list[dict]:
    """Entries of ``data/footprints.json`` (``memory.store_footprints``) for the measured configurations."""
    entries = []
    for name, result in results.items():
        if "events" not in result or "key" not in result.get("estimate", {}):
            continue
        stages = {}
        for event in result["events"]:
            if event["stage"]:
                stages[event["stage"]] = max(stages.get(event["stage"], 0), event["peak_rss_bytes"])
        entries.append(dict(key=footprint_key(**result["estimate"]["key"]), peak_rss_bytes=result["peak_rss_bytes"],
                            stages=stages, environment_id=environment["environment_id"], arch=environment["arch"],
                            memory_config=name, source=f"notebook {NOTEBOOK}, run {run_id}",
                            time=run_id.split("-")[0]))
    return entries


# ---- the oneDNN probe ---------------------------------------------------------------------------------

def probe_records(results: dict[str, dict], threads: int) -> list[Record]:
    """Per start-up setting and op: oneDNN primitives executed, how many carry ``attr-fpmath:bf16``, how
    many are bf16 kernels, the error against float64 and the time (measured); per op against
    ``default``: whether fast math changed the kernels or the numbers (derived)."""
    records = []
    for setting, result in results.items():
        config = make_config(threads=threads, dtype="fp32", experiment="onednn_probe", env_setting=setting,
                             env=" ".join(f"{k}={v}" for k, v in sorted(result.get("env", {}).items())),
                             isa=result.get("isa"))
        for op, found in result["ops"].items():
            note = "; ".join(found["implementations"]) or "no oneDNN primitive (MKL, ATen or another library)"
            for metric, unit in (("onednn_primitives", "calls"), ("fpmath_bf16_primitives", "calls"),
                                 ("bf16_kernels", "calls"), ("rel_err_fp64", "")):
                value = found["fpmath_bf16" if metric == "fpmath_bf16_primitives" else metric]
                records.append(Record(variant=setting, stage=op, metric=metric, unit=unit, value=float(value),
                                      spread={"n": 1}, config=config, note=note))
            records.append(timing_record(setting, op, timing_of(found["timing"]), config))
    if "default" in results:
        for setting, result in results.items():
            if setting == "default":
                continue
            config = make_config(threads=threads, dtype="fp32", experiment="onednn_probe", env_setting=setting)
            for op, found in result["ops"].items():
                base = results["default"]["ops"][op]
                error_ratio = found["rel_err_fp64"] / max(base["rel_err_fp64"], 1e-30)
                changed = (found["implementations"] != base["implementations"] or found["bf16_kernels"] > 0
                           or error_ratio > 10)
                records += [
                    Record(variant=setting, stage=op, metric="error_ratio_vs_default", unit="x", value=error_ratio,
                           kind="derived", config=config),
                    Record(variant=setting, stage=op, metric="time_ratio_vs_default", unit="x",
                           value=found["timing"]["median_s"] / base["timing"]["median_s"], kind="derived",
                           config=config),
                    Record(variant=setting, stage=op, metric="changes_kernels", unit="bool", value=float(changed),
                           kind="derived", config=config,
                           note="1: other implementations, a bf16 kernel, or an error > 10x the default's"),
                ]
    return records


# ---- adherence of the trained mini model ----------------------------------------------------------------

def adherence_records_of(variant: str, result: dict, steps: int, threads: int) -> list[Record]:
    """``minimodel.adherence_records`` of each split of an ``adherence`` child result."""
    from .minimodel import adherence_records, quality_config

    config = quality_config("mini", "trained-mini", steps, threads, dtype=result["dtype"]) | dict(
        text_encoder_dtype=result["text_encoder_dtype"], experiment="adherence",
        optimizations=result.get("optimizations", ""),
        env=" ".join(f"{k}={v}" for k, v in sorted(result.get("env", {}).items())))
    return [record for split, rows in result["tables"].items()
            for record in adherence_records(variant, split, pd.DataFrame(rows), config)]


# ---- tables for the notebook ----------------------------------------------------------------------------

def probe_table(results: dict[str, dict]) -> pd.DataFrame:
    """Per start-up setting and op: oneDNN primitives, fast-math attributes, bf16 kernels, error, time."""
    return pd.DataFrame([dict(setting=setting, op=op, onednn=found["onednn_primitives"],
                              fpmath_bf16=found["fpmath_bf16"], bf16_kernels=found["bf16_kernels"],
                              rel_err_fp64=found["rel_err_fp64"], median_s=found["timing"]["median_s"],
                              implementations="; ".join(found["implementations"]))
                         for setting, result in results.items() for op, found in result["ops"].items()])


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


def footprint_table(results: dict[str, dict], families=("c7g", "m7g", "r7g")) -> pd.DataFrame:
    """Per memory configuration: peak GiB (or why it did not run) and the smallest instance per family."""
    rows = []
    for name, result in results.items():
        row = dict(config=name)
        if "events" in result:
            row["peak_gib"] = result["peak_rss_bytes"] / GIB
            row["analytic_gib"] = result["estimate"]["analytic_peak"] / GIB
            for family in families:
                fit = smallest_instance(result["peak_rss_bytes"], family)
                row[family] = fit["instance"] if fit else "none"
        else:
            row["not run"] = result.get("refused") or result.get("failed")
        rows.append(row)
    return pd.DataFrame(rows)
