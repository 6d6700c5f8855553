"""What notebook ``04_precision_threads_memory`` runs, each variant in a fresh process (``variant_runs``): the
precision variants with their fidelity against fp32 and the mini model's adherence, thread scaling, the start-up
settings, the oneDNN fast-math probe, and the memory footprints of whole runs (records, and the preflight's
footprint table)."""
from __future__ import annotations

import math

import pandas as pd

from utils.experiments.variant_runs import (
    ENV_SETTINGS,
    adherence_records_of,
    experiment_config,
    fidelity_records,
    footprint_run,
    ratio_records,
    run_all,
    run_compared,
    stage_records,
    stage_run,
    stage_table,
    timing_of,
    variant_env,
    variant_steps,
)
from utils.io import GIB
from utils.measure.benchmark import TimingPolicy
from utils.measure.instances import HEADROOM_RULE, smallest_instance
from utils.measure.records import WATERFALL
from utils.measure.results import Record, ResultsStore, make_config, timing_record
from utils.model.memory import footprint_key, store_footprints

NOTEBOOK = "04_precision_threads_memory"


# ---- memory -------------------------------------------------------------------------------------------

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


# ---- tables for the notebook ----------------------------------------------------------------------------

def probe_table(results: dict[str, dict]) -> pd.DataFrame:
    """Per start-up setting and op: oneDNN primitives, fast-math attributes, bf16 kernels, error, time."""
    return pd.DataFrame([dict(setting=setting, op=op, onednn=found["onednn_primitives"],
                              fpmath_bf16=found["fpmath_bf16"], bf16_kernels=found["bf16_kernels"],
                              rel_err_fp64=found["rel_err_fp64"], median_s=found["timing"]["median_s"],
                              implementations="; ".join(found["implementations"]))
                         for setting, result in results.items() for op, found in result["ops"].items()])


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


# ---- the experiments: each variant in a fresh process, its records stored --------------------------------

FIDELITY_METRICS = ("rel_l2", "cosine", "final_rel_l2", "final_cosine", "psnr", "ssim", "max_abs_diff")


def probe(store: ResultsStore, settings: list[str], policy: TimingPolicy) -> pd.DataFrame:
    """Which oneDNN kernels run the pipeline's fp32 operations under each start-up setting (``ONEDNN_VERBOSE``)."""
    spec = {k: v for k, v in policy.to_spec().items() if k != "warmup"}  # the probe warms each op up once
    results = run_all({name: ("probe", ENV_SETTINGS[name] | {"ONEDNN_VERBOSE": "1"}, spec) for name in settings},
                      "oneDNN probe")
    store.add(*probe_records(results, policy.threads))
    return probe_table(results)


def precision(store: ResultsStore, base: dict, variants: list[str], outputs, fidelity_steps: int,
              processes: int) -> dict[str, dict]:
    """Every precision variant's stages in ``processes`` fresh processes each, interleaved (the comparison
    protocol; fp32 first in each round, the others fed fp32's outputs, so each stage is compared on the same
    inputs), their speed-ups over fp32 with the verdict, and their fidelity against fp32 (first round);
    returns the runs."""
    reference = outputs / "fp32.pt"
    order = ["fp32"] + [v for v in variants if v != "fp32"]
    results = run_compared({v: stage_run(base, v, outputs=outputs / f"{v}.pt", fidelity_steps=fidelity_steps,
                                         inputs=None if v == "fp32" else reference) for v in order},
                           processes, "precision variants")
    for name, result in results.items():
        store.add(*stage_records(result, name, experiment_config(result, "precision"), base["steps"]))
    store.add(*ratio_records(results, "fp32", lambda name: name, "speedup_vs_fp32",
                             lambda name: experiment_config(results[name], "precision"),
                             "fp32 median / variant median"))
    for name, result in results.items():
        if name != "fp32" and result.get("inputs_used"):  # fed the fp32 run's outputs: comparable stage by stage
            store.add(*fidelity_records(name, result["outputs"], results["fp32"]["outputs"],
                                        experiment_config(result, "precision")))
    return results


def fidelity_table(records: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """The fidelity records of run ``run_id`` (``records``: this machine's), one row per variant."""
    rows = records[(records["run_id"] == run_id) & records["metric"].isin(FIDELITY_METRICS)]
    return rows.pivot_table(index="variant", columns=["stage", "metric"], values="value", aggfunc="last")


def mini_adherence(store: ResultsStore, variants: list[str], threads: int, splits: list[str], seeds: list[int],
                   steps: int) -> pd.DataFrame:
    """The trained mini model's adherence with each variant's steps and start-up settings."""
    results = run_all({v: ("adherence", variant_env(v), dict(threads=threads, optimizations=variant_steps(v),
                                                              splits=splits, seeds=seeds, steps=steps))
                       for v in variants}, "mini-model adherence")
    for name, result in results.items():
        store.add(*adherence_records_of(name, result, steps, threads))
    return pd.DataFrame([dict(variant=name, split=split, **summary) for name, result in results.items()
                         for split, summary in result["summaries"].items()])


def thread_scaling(store: ResultsStore, base: dict, variant: str, thread_counts: list[int], repeats: int, reference,
                   measured: dict[str, dict]) -> pd.DataFrame:
    """``variant``'s stages at each thread count (the run at ``base``'s threads taken from ``measured``, the
    precision runs, when it is there) and the speed-up over the fewest threads."""
    threads = base["threads"]
    results = run_all({n: stage_run(base, variant, threads=n, repeats=repeats, inputs=reference)
                       for n in thread_counts if not (n == threads and variant in measured)}, "thread counts")
    if threads in thread_counts and variant in measured:
        results[threads] = measured[variant]
    results = dict(sorted(results.items()))
    for n, result in results.items():
        store.add(*stage_records(result, variant, experiment_config(result, "threads"), base["steps"]))
    store.add(*ratio_records(results, min(results), lambda n: variant, "speedup_vs_fewest_threads",
                             lambda n: experiment_config(results[n], "threads"), "fewest-thread median / this median"))
    return stage_table(results, base["steps"])


def startup_settings(store: ResultsStore, base: dict, variant: str, settings: list[str], stages: list[str],
                     repeats: int, reference, processes: int) -> pd.DataFrame:
    """``variant``'s ``stages`` under the default start-up and each start-up setting, each in ``processes``
    fresh processes, interleaved (the comparison protocol), and the speed-up over the default with the
    verdict."""
    names = ["default"] + [name for name in settings if name != "default"]
    results = run_compared({name: stage_run(base, variant, env_setting=name, stages=stages, repeats=repeats,
                                            inputs=reference) for name in names}, processes, "start-up settings")
    for name, result in results.items():
        store.add(*stage_records(result, name, experiment_config(result, "startup_env", env_setting=name),
                                 base["steps"]))
    store.add(*ratio_records(results, "default", lambda name: name, "speedup_vs_default",
                             lambda name: experiment_config(results[name], "startup_env", env_setting=name),
                             "default start-up median / this setting's median"))
    return stage_table(results, base["steps"])


def memory(store: ResultsStore, base: dict, configs: list[str], families: list[str], footprints_path) -> pd.DataFrame:
    """Each memory configuration's whole run (its waterfall, peak and the smallest instance it fits), stored as
    records and as measured footprints for the preflight (``footprints_path``)."""
    results = run_all({name: footprint_run(base, name) for name in configs}, "memory configurations")
    for name, result in results.items():
        store.add(*footprint_records(name, result, families))
    store_footprints(footprint_entries(results, store.environment, store.run_id), footprints_path)
    return footprint_table(results, families)
