"""The report's section on notebook ``04_precision_threads_memory`` (precision, threads, start-up settings,
memory), assembled from stored records alone, with the recommended settings for Graviton and for x86:
a row is "measured here" when records of that architecture support it, else "from the guide" (AWS's
Graviton getting-started guide, ``machinelearning/pytorch.md``; see ``/work/shared/reference``)."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from utils.io import GIB
from utils.measure.compare import DEFAULT_THRESHOLD, FASTER, SAME, SLOWER, Spread, verdict
from utils.measure.instances import HEADROOM_RULE, instance_table
from utils.measure.records import WATERFALL, in_environment, one_environment, select, value_of
from utils.model.pipeline import STAGES
from utils.model.text_encoder import T5_PRESETS
from utils.report.figures import FigureSpec, ReportInputs, context_label, new_figure, save_figure, setting_label, short

# ---- notebook 04: precision, threads, memory ---------------------------------------------------------

TUNING_NOTEBOOK = "04_precision_threads_memory"

PRECISION_ORDER = ("fp32", "fast_math", "upstream", "autocast", "bf16", "int8_t5")


def tuning_rows(df: pd.DataFrame, experiment: str, **criteria) -> pd.DataFrame:
    """Notebook 04's records of one ``experiment`` (config.experiment) from its newest run only (a rerun of
    some variants never sits in one table with an earlier run's others), with its config columns present."""
    df = one_environment(df)
    for column in ("config.experiment", "config.env_setting", "config.memory_config", "config.optimizations",
                   "config.env"):
        if column not in df.columns:
            df[column] = None
    rows = select(df, notebook=TUNING_NOTEBOOK, **{"config.experiment": experiment})
    if len(rows) and "run_id" in rows.columns:
        rows = rows[rows["run_id"] == rows.sort_values("time", kind="stable")["run_id"].iloc[-1]]
    return select(rows, **criteria) if criteria else rows


def _ordered(names, order=PRECISION_ORDER) -> list:
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + [n for n in names if n not in order]


def precision_times(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Seconds per video of each stage per precision variant (derived from measured stage medians)."""
    rows = tuning_rows(df, "precision", metric="video_seconds", stage=["encode_prompt", "denoise", "decode"])
    rows = rows.drop_duplicates(["variant", "stage"], keep="last")
    if rows.empty:
        return None
    variants = _ordered(rows["variant"])
    stages = [s for s in STAGES if s in set(rows["stage"])]
    figure, (ax,) = new_figure(8.0, 1.2 + 0.35 * len(variants) * len(stages))
    height = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = select(rows, variant=variant).set_index("stage")["value"].reindex(stages)
        positions = [s + (len(variants) / 2 - i - 0.5) * height for s in range(len(stages))]
        ax.barh(positions, values, height, label=variant)
        for y, seconds in zip(positions, values):
            if not pd.isna(seconds):
                ax.annotate(f"{short(seconds)} s", (seconds, y), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=7)
    ax.set_yticks(range(len(stages)), stages)
    ax.invert_yaxis()
    positive = rows["value"][rows["value"] > 0]
    if len(positive) and positive.max() / positive.min() > 100:
        ax.set_xscale("log")
    ax.set_xlabel("seconds per video (derived: denoise = steps x one measured step)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Time per stage by precision\n{setting_label(rows)}\n{context_label(rows, environment)}",
                 fontsize=10)
    return save_figure(figure, path)


def thread_scaling(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Left: each stage's speed-up against its fewest-thread time (measured medians); right: each start-up
    setting's speed-up against the default start-up (derived), per stage."""
    timings = tuning_rows(df, "threads", metric=["seconds", "seconds_per_step"],
                          stage=["encode_prompt", "denoise", "decode"])
    timings = timings.drop_duplicates(["stage", "config.threads"], keep="last")
    settings = tuning_rows(df, "startup_env", metric="speedup_vs_default").drop_duplicates(
        ["variant", "stage"], keep="last")
    panels = [p for p, rows in (("threads", timings), ("settings", settings)) if not rows.empty]
    if not panels:
        return None
    figure, axes = new_figure(5.0 * len(panels), 3.8, len(panels))
    for ax, panel in zip(axes, panels):
        if panel == "threads":
            for stage in [s for s in STAGES if s in set(timings["stage"])]:
                rows = select(timings, stage=stage).sort_values("config.threads")
                threads = rows["config.threads"].astype(float)
                ax.plot(threads, rows["value"].iloc[0] / rows["value"], marker="o", label=stage)
            counts = sorted(set(timings["config.threads"].astype(float)))
            ax.plot(counts, [c / counts[0] for c in counts], "k:", label="linear")
            ax.set(xlabel="threads", ylabel=f"speed-up over {int(counts[0])} thread(s) (measured medians)",
                   title=f"Thread scaling, {select(timings, stage=timings['stage'].iloc[-1])['config.dtype'].iloc[-1]}")
            ax.set_xticks(counts)
        else:
            names = list(dict.fromkeys(settings["variant"]))
            stages = [s for s in STAGES if s in set(settings["stage"])]
            width = 0.8 / len(stages)
            for i, stage in enumerate(stages):
                values = select(settings, stage=stage).set_index("variant")["value"].reindex(names)
                ax.bar([x + (i - (len(stages) - 1) / 2) * width for x in range(len(names))], values, width,
                       label=stage)
            ax.axhline(1.0, color="k", linewidth=0.8)
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
            ax.set(ylabel="speed-up over the default start-up (derived)", title="Start-up settings, each in a fresh process")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    used = pd.concat([timings, settings])
    figure.suptitle(f"Threads and start-up settings\n{setting_label(used)}\n{context_label(used, environment)}",
                    fontsize=10)
    return save_figure(figure, path)


def memory_waterfall(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Resident memory through a whole run, event by event, per memory configuration (measured peak RSS;
    after freeing T5: the resident set), with the usable memory of c7g instances (derived)."""

    rows = tuning_rows(df, "memory").drop_duplicates(["variant", "stage", "metric"], keep="last")
    measured = rows[rows["metric"].isin([m for _, _, m, _ in WATERFALL])]
    if measured.empty:
        return None
    refused = select(rows, metric="refused_estimate_bytes")
    figure, (ax,) = new_figure(9.0, 4.6)
    configs = list(dict.fromkeys(measured["variant"]))
    for config in configs:
        ours = select(measured, variant=config)
        points = [(i, value_of(ours, stage=stage, metric=metric)) for i, (_, stage, metric, _) in enumerate(WATERFALL)]
        points = [(i, v / GIB) for i, v in points if v is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=config)
    top = measured["value"].max() / GIB
    for _, instance in select(instance_table(("c7g",)), family="c7g").iterrows():
        if instance["usable_gib"] <= top * 1.3:
            ax.axhline(instance["usable_gib"], color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(f"{instance['instance']} usable", (len(WATERFALL) - 0.5, instance["usable_gib"]), fontsize=6,
                        color="grey", ha="right", va="bottom")
    ax.set_xticks(range(len(WATERFALL)), [label for *_, label in WATERFALL], rotation=20, fontsize=8)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("GiB resident (measured peak during each event)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    note = ("\nnot run (preflight refused): " + ", ".join(refused["variant"])) if not refused.empty else ""
    ax.set_title(f"Memory through a whole run, per configuration{note}\n{setting_label(measured)}\n"
                 f"{context_label(measured, environment)}", fontsize=10)
    return save_figure(figure, path)


TUNING_FIGURES = ("precision_times", "thread_scaling", "memory_waterfall")  # captions name notebook 04's context

COMPUTE = ("encode_prompt", "denoise", "decode")

# a difference counts as a gain or a loss only beyond this fraction, and only outside the between-process spread
GAIN_THRESHOLD = DEFAULT_THRESHOLD

# the start-up settings the guide recommends, as notebook 04 names them
GUIDE_SETTINGS = {"omp_proc_bind_false": "OMP_PROC_BIND=false", "omp_places_cores": "OMP_PLACES=cores",
                  "thp": "THP_MEM_ALLOC_ENABLE=1", "lru_cache": "LRU_CACHE_CAPACITY=1024"}

# (setting, recommendation, the guide's reason): AWS Graviton getting-started guide, machinelearning/pytorch.md
GUIDE = {
    "precision": ("bf16 in eager mode, or fp32 weights with fast math; not fp16",
                  "Graviton3 and later have BF16 instructions; fp16 is several times slower than bf16 "
                  "(pytorch#134282)"),
    "fast_math": ("DNNL_DEFAULT_FPMATH_MODE=BF16 (Graviton3 and later)",
                  "fp32 GEMMs in oneDNN+ACL run as bf16: faster on large GEMMs, slight accuracy loss"),
    "threads": ("OMP_NUM_THREADS = vCPUs / processes", "no SMT on Graviton: one vCPU is one core"),
    "omp_proc_bind_false": ("OMP_PROC_BIND=false", "spread the vCPUs across processes"),
    "omp_places_cores": ("OMP_PLACES=cores", "spread the vCPUs across processes"),
    "thp": ("THP_MEM_ALLOC_ENABLE=1 (kernel THP madvise or always)",
            "transparent huge pages for large tensors: faster in the PyTorch tutorial"),
    "lru_cache": ("LRU_CACHE_CAPACITY=1024", "oneDNN primitive cache; raises the memory footprint"),
}


def _env_rows(records: pd.DataFrame, environments: dict, arch_prefixes: tuple[str, ...], primary: str | None):
    """Notebook 04's records of the environment of this architecture: the primary one if it matches, else
    the one with the newest such record; (environment id, rows) or (None, empty)."""
    rows = select(records, notebook="04_precision_threads_memory")
    ids = [i for i in dict.fromkeys(rows["environment_id"].dropna()[::-1])
           if str((environments.get(i) or {}).get("arch", i)).startswith(arch_prefixes)]
    if not ids:
        return None, rows.iloc[0:0]
    chosen = primary if primary in ids else ids[0]
    return chosen, in_environment(rows, chosen)


# ---- tables ---------------------------------------------------------------------------------------------

def probe_table(df: pd.DataFrame) -> tuple[pd.DataFrame | None, dict]:
    rows = tuning_rows(df, "onednn_probe").drop_duplicates(["variant", "stage", "metric"], keep="last")
    if rows.empty:
        return None, {}
    table = []
    for setting in list(dict.fromkeys(rows["variant"])):
        for op in list(dict.fromkeys(select(rows, variant=setting)["stage"])):
            ours = select(rows, variant=setting, stage=op)
            changed = value_of(ours, metric="changes_kernels")
            table.append({"start-up": setting, "op (fp32)": op,
                          "oneDNN primitives": value_of(ours, metric="onednn_primitives"),
                          "with attr-fpmath:bf16": value_of(ours, metric="fpmath_bf16_primitives"),
                          "bf16 kernels": value_of(ours, metric="bf16_kernels"),
                          "error vs float64": value_of(ours, metric="rel_err_fp64"),
                          "median s": value_of(ours, metric="seconds"),
                          "changed vs default (derived)": None if changed is None else ("yes" if changed else "no"),
                          "implementations": select(ours, metric="onednn_primitives")["note"].iloc[-1]})
    changes = select(rows, metric="changes_kernels")
    criterion = changes["note"].dropna()  # what counts as a change, as the notebook stored it ("1: ...")
    summary = dict(ops=int(changes["stage"].nunique()), changed=int((changes["value"] > 0).sum()),
                   onednn=int((select(rows, variant="default", metric="onednn_primitives")["value"] > 0).sum()),
                   criterion=criterion.iloc[-1].split(": ", 1)[-1] if len(criterion) else None)
    return pd.DataFrame(table), summary


def precision_table(df: pd.DataFrame) -> pd.DataFrame | None:
    video = tuning_rows(df, "precision", metric="video_seconds").drop_duplicates(["variant", "stage"], keep="last")
    if video.empty:
        return None
    peaks = tuning_rows(df, "precision", metric="peak_rss_bytes")
    fp32_total = None
    table = []
    for variant in _ordered(video["variant"], PRECISION_ORDER):
        ours = select(video, variant=variant)
        seconds = {s: value_of(ours, stage=s) for s in COMPUTE}
        total = sum(v for v in seconds.values()) + (value_of(ours, stage="prepare_latents") or 0.0) \
            if all(v is not None for v in seconds.values()) else None
        fp32_total = total if variant == "fp32" else fp32_total
        table.append({"variant": variant, "optimisations": ours["config.optimizations"].iloc[-1] or "none",
                      **{f"{s} s": seconds[s] for s in COMPUTE}, "video s": total,
                      "largest stage peak GiB": select(peaks, variant=variant)["value"].max() / GIB})
    table = pd.DataFrame(table)
    table.insert(6, "speed-up vs fp32", [fp32_total / t if fp32_total and t else None for t in table["video s"]])
    spreads = {v: process_totals(tuning_rows(df, "precision"), v) for v in table["variant"]}
    if spreads.get("fp32") is not None:  # measured with the comparison protocol: the processes' range and verdict
        # one value per quantity: a protocol variant's video is the median of its processes' videos (the verdict's)
        table["video s"] = [t if spreads[v] is None else spreads[v].median for v, t in zip(table["variant"],
                                                                                           table["video s"])]
        fp32_total = spreads["fp32"].median
        table["speed-up vs fp32"] = [fp32_total / t if t else None for t in table["video s"]]
        table.insert(6, "video s, process range", [None if spreads[v] is None else
                                                   f"{spreads[v].low:.4g}-{spreads[v].high:.4g}"
                                                   for v in table["variant"]])
        table.insert(8, "vs fp32", [None if spreads[v] is None or v == "fp32" else
                                    verdict(spreads["fp32"], spreads[v], GAIN_THRESHOLD)["verdict"]
                                    for v in table["variant"]])
    return table


def fidelity_table(df: pd.DataFrame) -> pd.DataFrame | None:
    columns = {("encode_prompt", "cosine"): "T5 cosine", ("encode_prompt", "rel_l2"): "T5 rel. L2",
               ("denoise", "rel_l2"): "1-step latent rel. L2", ("denoise", "final_rel_l2"): "final latent rel. L2",
               ("denoise", "final_cosine"): "final latent cosine", ("decode", "psnr"): "frames PSNR dB",
               ("decode", "ssim"): "frames SSIM", ("decode", "max_abs_diff"): "frames max abs diff"}
    rows = tuning_rows(df, "precision", metric=sorted({m for _, m in columns})).drop_duplicates(
        ["variant", "stage", "metric"], keep="last")
    if rows.empty:
        return None
    return pd.DataFrame([{"variant": v, **{label: value_of(rows, variant=v, stage=s, metric=m)
                                           for (s, m), label in columns.items()}}
                         for v in _ordered(rows["variant"], PRECISION_ORDER)])


def adherence_table(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = tuning_rows(df, "adherence")
    if rows.empty:
        return None
    rows = rows.assign(split=rows.get("config.split", pd.Series(index=rows.index, dtype=object)).fillna("-"))
    rows = rows.drop_duplicates(["variant", "split", "metric"], keep="last")
    return pd.DataFrame([{"variant": v, "combinations": split, "clips": select(rows, variant=v, split=split)["spread.n"].max(),
                          **{m.removeprefix("adherence_").replace("_", " "): value_of(rows, variant=v, split=split, metric=m)
                             for m in ("adherence_all_correct", "adherence_shape", "adherence_colour", "adherence_motion")}}
                         for v in _ordered(rows["variant"], PRECISION_ORDER)
                         for split in dict.fromkeys(select(rows, variant=v)["split"])])


def threads_table(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = tuning_rows(df, "threads", metric=["seconds", "seconds_per_step"], stage=list(COMPUTE))
    rows = rows.drop_duplicates(["stage", "config.threads"], keep="last")
    if rows.empty:
        return None
    counts = sorted({int(t) for t in rows["config.threads"].dropna()})
    table = []
    for stage in [s for s in STAGES if s in set(rows["stage"])]:
        ours = select(rows, stage=stage)
        seconds = {n: value_of(ours, **{"config.threads": n}) for n in counts}
        first = seconds[counts[0]]
        table.append({"stage": stage, "dtype": ours["config.dtype"].iloc[-1],
                      **{f"{n} threads s": seconds[n] for n in counts},
                      **{f"speed-up at {n}": first / seconds[n] if first and seconds[n] else None for n in counts[1:]}})
    return pd.DataFrame(table)


def startup_table(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = tuning_rows(df, "startup_env", metric="speedup_vs_default").drop_duplicates(["variant", "stage"], keep="last")
    if rows.empty:
        return None
    judged = "quality.verdict" in rows.columns and rows["quality.verdict"].notna().any()

    def verdict_of(variant, stage):
        ours = select(rows, variant=variant, stage=stage)
        return ours["quality.verdict"].iloc[-1] if len(ours) else None

    return pd.DataFrame([{"start-up setting": v, "environment": select(rows, variant=v)["config.env"].iloc[-1] or "(none)",
                          **{f"{s} speed-up": value_of(rows, variant=v, stage=s) for s in COMPUTE
                             if s in set(rows["stage"])},
                          **({f"{s} verdict": verdict_of(v, s) for s in COMPUTE if s in set(rows["stage"])}
                             if judged else {})}
                         for v in dict.fromkeys(rows["variant"])])


def memory_table(df: pd.DataFrame, families=("c7g", "m7g", "r7g")) -> pd.DataFrame | None:
    rows = tuning_rows(df, "memory").drop_duplicates(["variant", "stage", "metric"], keep="last")
    if rows.empty:
        return None
    instances = instance_table(tuple(f for f in families if f in set(instance_table(families)["family"])))
    table = []
    for config in dict.fromkeys(rows["variant"]):
        ours = select(rows, variant=config)
        row = {"configuration": config, "optimisations": ours["config.optimizations"].iloc[-1] or "none"}
        for _, stage, metric, label in WATERFALL:
            value = value_of(ours, stage=stage, metric=metric)
            row[f"{label} GiB"] = None if value is None else value / GIB
        peak = value_of(ours, stage="total", metric="peak_rss_bytes")
        refused = select(ours, metric="refused_estimate_bytes")
        row["peak GiB"] = None if peak is None else peak / GIB
        row["analytic estimate GiB"] = (value_of(ours, metric="analytic_peak_bytes") or
                                        value_of(ours, metric="refused_estimate_bytes") or math.nan) / GIB
        for family in families:
            memory = value_of(ours, metric=f"smallest_{family}_gib")
            match = instances[(instances["family"] == family) & (instances["memory_gib"] == memory)]
            row[f"smallest {family}"] = match["instance"].iloc[0] if len(match) else (
                "not run" if not refused.empty else None)
        row["note"] = refused["note"].iloc[-1] if not refused.empty else ""
        table.append(row)
    return pd.DataFrame(table)


# ---- recommendations ------------------------------------------------------------------------------------

def process_totals(rows: pd.DataFrame, variant: str, stages=COMPUTE) -> Spread | None:
    """The seconds of one video in each of ``variant``'s fresh processes (per process: its stage medians, the
    denoising step times the steps), from the timing records' ``spread.per_process``; None unless every
    stage has per-process values for the same processes."""
    timing = select(rows, variant=variant, metric=["seconds", "seconds_per_step"]).drop_duplicates("stage", keep="last")
    if "spread.per_process" not in timing.columns:
        return None
    per_stage = {}
    for _, row in timing.iterrows():
        values = row["spread.per_process"]
        if row["stage"] in stages and isinstance(values, list):
            per_stage[row["stage"]] = [v * (row["config.steps"] if row["stage"] == "denoise" else 1) for v in values]
    if set(per_stage) != set(stages) or len({len(v) for v in per_stage.values()}) != 1:
        return None
    return Spread.of([sum(parts) for parts in zip(*per_stage.values())])


def _stage_verdict(rows: pd.DataFrame) -> str | None:
    """One start-up setting's recommendation from the verdicts its speed-up records carry (one per stage);
    None when they carry none (measured in one process, before the comparison protocol)."""
    if "quality.verdict" not in rows.columns or rows["quality.verdict"].isna().any():
        return None
    verdicts = set(rows["quality.verdict"])
    if verdicts == {FASTER}:
        return "set it"
    if SLOWER in verdicts and FASTER not in verdicts:
        return "leave it unset (slower here)"
    return "optional: no measurable difference here"


def _range(spread: Spread) -> str:
    return f"{spread.median:.3g} s (processes {spread.low:.3g}-{spread.high:.3g}, n={len(spread.values)})"


def _x(value) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _precision_recommendation(rows: pd.DataFrame, precision: pd.DataFrame, fidelity: pd.DataFrame | None) -> dict:
    """The precision to use: among the variants measurably faster than fp32 per video (the comparison
    protocol over each process's video seconds) whose numbers differ from fp32's, the fastest, with those
    not measurably different from it named beside it."""
    fid = {} if fidelity is None else fidelity.set_index("variant").to_dict("index")
    # a variant that times only the stage it changes (int8_t5) has no video of its own to rank
    whole = precision.dropna(subset=["video s"])["variant"] if "video s" in precision else precision["variant"]
    spreads = {v: process_totals(tuning_rows(rows, "precision"), v) for v in whole}
    if spreads.get("fp32") is None or any(spread is None for spread in spreads.values()):
        return dict(setting="precision", recommendation="not ranked: measured in one process (rerun notebook 04)",
                    evidence="no between-process spread is stored for every variant")
    # a variant whose frames equal fp32's runs the same kernels: any speed difference is noise
    candidates = [v for v in spreads if v != "fp32" and fid.get(v, {}).get("frames max abs diff") != 0]
    faster = [v for v in candidates if verdict(spreads["fp32"], spreads[v], GAIN_THRESHOLD)["verdict"] == FASTER]
    if not faster:
        return dict(setting="precision", recommendation="fp32",
                    evidence=f"no variant with other numbers was faster than fp32 per video outside the process "
                             f"ranges and beyond {GAIN_THRESHOLD:.0%}; fp32 {_range(spreads['fp32'])}")
    best = min(faster, key=lambda v: spreads[v].median)
    peers = [v for v in faster if v != best and verdict(spreads[best], spreads[v], GAIN_THRESHOLD)["verdict"] == SAME]
    row = precision.set_index("variant").loc[best]
    quality = ", ".join(f"{k} {v:.4g}" for k, v in fid.get(best, {}).items() if k in (
        "final latent cosine", "frames PSNR dB", "frames SSIM") and v is not None and not pd.isna(v))
    return dict(setting="precision", recommendation=f"{best} ({row['optimisations']})" + (
                    f", or {', '.join(peers)}: no measurable difference between them" if peers else ""),
                evidence=f"fastest video: {_range(spreads[best])}, {_x(spreads['fp32'].median / spreads[best].median)} "
                         f"fp32 ({_range(spreads['fp32'])})" + (f"; vs fp32: {quality}" if quality else ""))


def _memory_recommendation(memory: pd.DataFrame) -> dict:
    """The configuration with the smallest measured peak; configurations within ``GAIN_THRESHOLD`` of it
    count as ties, and the one with the fewest steps among them is named (the event that sets the peak too)."""
    measured = memory.dropna(subset=["peak GiB"])
    smallest = measured["peak GiB"].min()
    tied = measured[measured["peak GiB"] <= smallest * (1 + GAIN_THRESHOLD)]
    best = tied.loc[tied["configuration"].str.count(r"\+").idxmin()]
    events = {c.removesuffix(" GiB"): best[c] for c in best.index
              if c.endswith(" GiB") and c not in ("peak GiB", "analytic estimate GiB") and not pd.isna(best[c])}
    at = max(events, key=events.get) if events else None
    others = [c for c in tied["configuration"] if c != best["configuration"]]
    return dict(setting="memory", recommendation=f"{best['configuration']} ({best['optimisations']})",
                evidence=f"smallest measured peak {best['peak GiB']:.3g} GiB" + (f", set by {at}" if at else "")
                         + (f"; within {GAIN_THRESHOLD:.0%} of it: {', '.join(others)} (no measurable difference; "
                            "the one with the fewest steps is named)" if others else "")
                         + ": fits " + ", ".join(str(best[c]) for c in best.index if c.startswith("smallest ")))


def recommendations(rows: pd.DataFrame, environment_id: str | None, guide_only: bool) -> pd.DataFrame:
    """One row per setting: the recommendation, its evidence and its source."""
    def guide(key, name):
        value, why = GUIDE[key]
        return dict(setting=name, recommendation=value, evidence=why, source="from the guide")

    measured = f"measured here ({environment_id})"
    out = []
    precision, fidelity = precision_table(rows), fidelity_table(rows)
    if precision is not None and not guide_only and precision["video s"].notna().any():
        out.append(_precision_recommendation(rows, precision, fidelity) | dict(source=measured))
    else:
        out.append(guide("precision", "precision"))
    _, probe = probe_table(rows)
    fast_math = select(tuning_rows(rows, "precision", metric="speedup_vs_fp32", variant="fast_math"), stage="denoise")
    speedup = value_of(fast_math)
    if probe and not guide_only:
        faster = _stage_verdict(fast_math.tail(1)) == "set it" if len(fast_math) else False
        out.append(dict(setting="DNNL_DEFAULT_FPMATH_MODE=BF16",
                        recommendation="set it (fp32 weights)" if probe["changed"] and faster
                        else "leave it unset: no measurable effect here",
                        evidence=f"oneDNN ran {probe['onednn']} of {probe['ops']} probed fp32 ops; fast math changed the "
                                 f"kernels or the error of {probe['changed']} of them; denoise step {_x(speedup)} fp32",
                        source=measured))
    else:
        out.append(guide("fast_math", "DNNL_DEFAULT_FPMATH_MODE=BF16"))
    threads = threads_table(rows)
    if threads is not None and not guide_only and len([c for c in threads.columns if c.startswith("speed-up")]):
        denoise = threads.set_index("stage").loc["denoise"] if "denoise" in set(threads["stage"]) else threads.iloc[0]
        gains = {int(c.split()[-1]): denoise[c] for c in threads.columns if c.startswith("speed-up")}
        best = max(gains, key=lambda n: gains[n])
        out.append(dict(setting="threads (OMP_NUM_THREADS)", recommendation=f"{best} (the most measured)"
                        if best == max(gains) else f"{best}", source=measured,
                        evidence="denoise speed-up " + ", ".join(f"{_x(g)} at {n}" for n, g in gains.items())))
    else:
        out.append(guide("threads", "threads (OMP_NUM_THREADS)"))
    startup = tuning_rows(rows, "startup_env", metric="speedup_vs_default")
    for key, name in GUIDE_SETTINGS.items():
        ours = select(startup, variant=key).drop_duplicates("stage", keep="last")
        if ours.empty or guide_only:
            out.append(guide(key, name))
            continue
        judged = _stage_verdict(ours)
        out.append(dict(setting=name, source=measured,
                        recommendation=judged or "not ranked: measured in one process (rerun notebook 04)",
                        evidence="speed-up " + ", ".join(f"{s} {_x(v)}" for s, v in zip(ours["stage"], ours["value"]))
                                 + (f" (a gain only outside the between-process spread and beyond "
                                    f"{GAIN_THRESHOLD:.0%})" if judged else "")))
    memory = memory_table(rows)
    if memory is not None and not guide_only and memory["peak GiB"].notna().any():
        out.append(_memory_recommendation(memory) | dict(source=measured))
    return pd.DataFrame(out, columns=["setting", "recommendation", "evidence", "source"])


def tuning_section(records: pd.DataFrame, environments: dict, primary: str | None,
                   configured: dict | None = None) -> dict | None:
    """The tables of the section (None where not measured; ``measured`` False when the primary environment
    has no records of notebook 04) and the recommended settings for Graviton and x86; ``configured``:
    notebook 04's configured parameters (the sampling steps of its fidelity runs, which no record stores)."""
    df = in_environment(records, primary)
    probe, probe_summary = probe_table(df)
    arm_id, arm_rows = _env_rows(records, environments, ("aarch64", "arm64"), primary)
    x86_id, x86_rows = _env_rows(records, environments, ("x86_64", "amd64"), primary)
    used = tuning_rows(df, "precision")
    threads, startup = threads_table(df), startup_table(df)
    mine = select(df, notebook=TUNING_NOTEBOOK)
    processes = mine["spread.n_processes"].max() if "spread.n_processes" in mine.columns else None
    return dict(
        measured=not select(df, notebook="04_precision_threads_memory").empty,
        setting=setting_label(used), probe=probe, probe_summary=probe_summary, precision=precision_table(df),
        fidelity=fidelity_table(df), adherence=adherence_table(df), threads=threads,
        thread_counts=sorted({int(t) for t in tuning_rows(df, "threads")["config.threads"].dropna()}),
        fidelity_steps=(configured or {}).get("fidelity_steps"),
        t5_layers=T5_PRESETS["t5-v1_1-xxl"]["num_layers"],
        startup=startup, memory=memory_table(df), headroom=HEADROOM_RULE, threshold=GAIN_THRESHOLD,
        processes=None if processes is None or pd.isna(processes) else int(processes),
        startup_judged=startup is not None and any(c.endswith(" verdict") for c in startup.columns),
        graviton=recommendations(arm_rows, arm_id, guide_only=arm_id is None),
        x86=recommendations(x86_rows, x86_id, guide_only=x86_id is None) if x86_id else None,
    )


# ---- the section's interface (utils.report.render) ----------------------------------------------------

NOTEBOOKS = (TUNING_NOTEBOOK,)
FIGURES = {
    "precision_times": FigureSpec.of_records(
        precision_times, "seconds per video per stage and precision, derived from measured stage times",
        shows=dict(notebook=TUNING_NOTEBOOK)),
    "thread_scaling": FigureSpec.of_records(
        thread_scaling, "speed-up per stage with threads (measured) and with start-up settings (derived)",
        shows=dict(notebook=TUNING_NOTEBOOK)),
    "memory_waterfall": FigureSpec.of_records(
        memory_waterfall, "resident memory through a whole run per configuration (measured)",
        shows=dict(notebook=TUNING_NOTEBOOK)),
}


def section(inputs: ReportInputs) -> dict:
    return dict(tuning=tuning_section(inputs.records, inputs.environments, inputs.primary,
                                      inputs.configured.get(TUNING_NOTEBOOK)))
