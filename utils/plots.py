"""The study's figures, each drawn from stored records alone (``results.load_records``).

Every function takes the records of one environment (a DataFrame; rows of other environments are
dropped in favour of the newest one present) and an output path, writes a PNG and returns its path,
or returns None when the records it needs are not there yet. Titles say what kind of number is shown,
the CPU and thread count it was measured with, and "random weights" where the model's weights were.
Figures are drawn on ``matplotlib.figure.Figure`` (Agg canvas), never through pyplot's global state,
so importing this module changes no notebook's backend.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from .pipeline import STAGES
from .profiling import OP_CLASSES

DPI = 120
GEMM_DTYPES = ("fp32", "bf16", "int8")
MODULE_GROUPS = ("spatial_attn", "temporal_attn", "cross_attn", "mlp", "embedders", "final_layer", "other")
# the config fields that make one video setting; records of a figure come from the newest setting
SETTING_KEYS = ("config.model", "config.weights", "config.resolution", "config.aspect_ratio", "config.frames",
                "config.steps", "config.threads")
COLUMNS = ("environment_id", "notebook", "variant", "stage", "metric", "unit", "value", "kind", "note", "time",
           "run_id", "git_commit", "git_dirty", "config.model", "config.weights", "config.resolution",
           "config.aspect_ratio", "config.frames", "config.steps", "config.dtype", "config.threads",
           "config.text_encoder_dtype", "config.shape", "config.mkn", "config.tokens", "config.pixels",
           "config.split",
           "spread.n", "spread.iqr")


# ---- selecting records --------------------------------------------------------------------------------

def prepare(df: pd.DataFrame | None) -> pd.DataFrame:
    """A copy with every column the figures and the report read (missing ones as NaN), sorted by time."""
    df = pd.DataFrame(columns=list(COLUMNS)) if df is None else df.copy()
    for column in COLUMNS:
        if column not in df.columns:
            df[column] = None
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    return df.sort_values("time", kind="stable", na_position="first").reset_index(drop=True)


def one_environment(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the environment with the newest record, when ``df`` holds several."""
    df = prepare(df)
    ids = df["environment_id"].dropna().unique()
    if len(ids) > 1:
        df = df[df["environment_id"] == df["environment_id"].dropna().iloc[-1]]
    return df


def select(df: pd.DataFrame, **criteria) -> pd.DataFrame:
    """Rows whose columns equal the given values; a list or tuple value accepts any of its items."""
    mask = pd.Series(True, index=df.index)
    for column, wanted in criteria.items():
        mask &= df[column].isin(list(wanted)) if isinstance(wanted, (list, tuple, set)) else df[column] == wanted
    return df[mask]


def _same(series: pd.Series, value) -> pd.Series:
    return series.isna() if pd.isna(value) else series.astype(object) == value


def newest_setting(rows: pd.DataFrame, keys=SETTING_KEYS) -> pd.DataFrame:
    """The rows measured at the same setting (``keys``) as the newest row, newest row per identity."""
    if rows.empty:
        return rows
    newest = rows.iloc[-1]
    mask = pd.Series(True, index=rows.index)
    for key in keys:
        mask &= _same(rows[key], newest[key])
    return rows[mask].drop_duplicates(["notebook", "variant", "stage", "metric"], keep="last")


def baseline_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The ``01_baseline`` records of the faithful pipeline at its newest setting."""
    return newest_setting(select(df, notebook="01_baseline", variant="baseline"))


def value_of(rows: pd.DataFrame, **criteria) -> float | None:
    """The newest matching value, or None."""
    rows = select(rows, **criteria)
    return None if rows.empty or pd.isna(rows["value"].iloc[-1]) else float(rows["value"].iloc[-1])


def pixels_of(row: pd.Series) -> int | None:
    """Pixels per frame of a record: ``config.pixels``, else from its resolution and aspect ratio."""
    if not pd.isna(row["config.pixels"]):
        return int(row["config.pixels"])
    if pd.isna(row["config.resolution"]) or pd.isna(row["config.aspect_ratio"]):
        return None
    from .aspect import image_size

    try:
        height, width = image_size(row["config.resolution"], row["config.aspect_ratio"])
    except ValueError:
        return None
    return height * width


# ---- labels -------------------------------------------------------------------------------------------

def _threads_label(rows: pd.DataFrame) -> str:
    threads = sorted({int(t) for t in rows["config.threads"].dropna()})
    if not threads:
        return ""
    if len(threads) == 1:
        return f"{threads[0]} thread" + ("s" if threads[0] != 1 else "")
    return f"{threads[0]}-{threads[-1]} threads"


def context_label(rows: pd.DataFrame, environment: dict | None = None) -> str:
    """"<CPU>, <n> threads[, random weights]" for a figure of ``rows``; a figure mixing random and trained
    weights names both."""
    if environment:
        cpu = environment.get("cpu_model") or environment.get("environment_id", "")
    else:
        ids = rows["environment_id"].dropna().unique()
        cpu = f"environment {ids[-1]}" if len(ids) else "unknown environment"
    parts = [cpu, _threads_label(rows)]
    weights = set(rows["config.weights"].dropna()) - {"none"}
    if weights == {"random"}:
        parts.append("random weights")
    elif "random" in weights:
        parts.append("weights: " + ", ".join(sorted(weights)))
    return ", ".join(p for p in parts if p)


def setting_label(rows: pd.DataFrame) -> str:
    """"<resolution> <aspect ratio>, <frames> frames, <steps> steps" of the newest row."""
    if rows.empty:
        return ""
    row = rows.iloc[-1]
    parts = [" ".join(str(row[k]) for k in ("config.resolution", "config.aspect_ratio") if not pd.isna(row[k]))]
    if not pd.isna(row["config.frames"]):
        parts.append(f"{int(row['config.frames'])} frames")
    if not pd.isna(row["config.steps"]):
        parts.append(f"{int(row['config.steps'])} steps")
    return ", ".join(p for p in parts if p)


def _short(x: float) -> str:
    """A value label on a figure: three significant digits, no exponent above 100."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _text(value, suffix: str = "") -> str:
    if pd.isna(value):
        return ""
    return f"{int(value) if isinstance(value, float) and value.is_integer() else value}{suffix}"


def _figure(width: float = 7.0, height: float = 4.0, ncols: int = 1, width_ratios=None):
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, ncols, squeeze=False, width_ratios=width_ratios)[0]


def _save(figure: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


# ---- figures ------------------------------------------------------------------------------------------

def ceilings(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Measured GEMM rate per dtype against thread count, one line per shape, with the ceiling."""
    df = one_environment(df)
    rates = select(df, stage="gemm", metric="gflops").drop_duplicates(
        ["variant", "config.shape", "config.threads"], keep="last")
    if rates.empty:
        return None
    ceiling = select(df, stage="gemm", metric="gflops_ceiling").drop_duplicates(
        ["variant", "config.threads"], keep="last")
    dtypes = [d for d in GEMM_DTYPES if d in set(rates["variant"])] + sorted(set(rates["variant"]) - set(GEMM_DTYPES))
    figure, axes = _figure(4.0 * len(dtypes), 3.8, len(dtypes))
    for ax, dtype in zip(axes, dtypes):
        for shape, rows in select(rates, variant=dtype).groupby("config.shape", sort=True):
            rows = rows.sort_values("config.threads")
            ax.plot(rows["config.threads"], rows["value"], marker="o", label=str(shape))
        top = select(ceiling, variant=dtype).sort_values("config.threads")
        if not top.empty:
            ax.plot(top["config.threads"], top["value"], "k--", linewidth=2, label="ceiling (best shape, derived)")
        ax.set(title=dtype, xlabel="threads", ylabel=select(rates, variant=dtype)["unit"].iloc[0])
        ax.set_xticks(sorted(set(select(rates, variant=dtype)["config.threads"].astype(int))))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(f"GEMM rate at the transformer's shapes (measured)\n{context_label(rates, environment)}",
                    fontsize=10)
    return _save(figure, path)


def stage_times(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Derived seconds per video of each baseline stage (denoise = steps x one measured step)."""
    rows = select(baseline_rows(one_environment(df)), metric="video_seconds", stage=list(STAGES))
    if rows.empty:
        return None
    rows = rows.set_index("stage").reindex([s for s in STAGES if s in set(rows["stage"])])
    figure, (ax,) = _figure(7.0, 3.2)
    ax.barh(rows.index[::-1], rows["value"][::-1], color="tab:blue")
    positive = rows["value"][rows["value"] > 0]
    if len(positive) and positive.max() / positive.min() > 100:
        ax.set_xscale("log")
    for stage, seconds in rows["value"].items():
        ax.annotate(f"{_short(seconds)} s", (seconds, stage), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_xlabel("seconds per video (derived from measured stage times)")
    ax.set_title(f"Baseline fp32 eager, seconds per video by stage\n{setting_label(rows)}\n"
                 f"{context_label(rows, environment)}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(figure, path)


def op_classes(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Stacked bars: each stage's operator self time split by op class (measured, torch.profiler)."""
    rows = newest_setting(select(one_environment(df), metric="self_share"))
    if rows.empty:
        return None
    table = rows.pivot_table(index="stage", columns="variant", values="value", aggfunc="last").fillna(0.0)
    table = table.reindex([s for s in STAGES if s in table.index] + sorted(set(table.index) - set(STAGES)))
    classes = [c for c in OP_CLASSES if c in table.columns] + sorted(set(table.columns) - set(OP_CLASSES))
    figure, (ax,) = _figure(7.0, 4.0)
    bottom = pd.Series(0.0, index=table.index)
    for op_class in classes:
        ax.bar(table.index, table[op_class], bottom=bottom, label=op_class)
        bottom += table[op_class]
    ax.set(ylabel="share of operator self CPU time (measured)", ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"Operator classes per stage (torch.profiler)\n{setting_label(rows)}\n"
                 f"{context_label(rows, environment)}", fontsize=10)
    return _save(figure, path)


def block_breakdown(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Milliseconds of one denoising step per module group (measured under the profiler)."""
    rows = newest_setting(select(one_environment(df), stage="denoise", metric="ms_per_step"))
    if rows.empty:
        return None
    rows = rows.sort_values("value")
    figure, (ax,) = _figure(7.0, 3.6)
    ax.barh(rows["variant"], rows["value"], color="tab:orange")
    for group, ms in zip(rows["variant"], rows["value"]):
        ax.annotate(_short(ms), (ms, group), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel("ms per denoising step (measured under torch.profiler, its overhead included)")
    ax.set_title(f"Denoiser step by module group\n{setting_label(rows)}\n{context_label(rows, environment)}",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(figure, path)


def roofline(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Achieved GFLOP/s of each baseline stage (derived) against the GEMM ceilings at its thread count."""
    df = one_environment(df)
    rows = select(baseline_rows(df), metric="gflops", stage=list(STAGES)).dropna(subset=["value"])
    if rows.empty:
        return None
    threads = rows["config.threads"].iloc[-1]
    tops = select(df, stage="gemm", metric="gflops_ceiling", **{"config.threads": threads})
    figure, (ax,) = _figure(8.0, 4.2)
    stages = [s for s in STAGES if s in set(rows["stage"])]
    achieved = rows.set_index("stage")["value"].reindex(stages)
    ax.bar(stages, achieved, color="tab:green", label="achieved (counted FLOPs / measured time)")
    styles = {"fp32": "k--", "bf16": "b-.", "int8": "r:"}
    for dtype in GEMM_DTYPES:
        top = value_of(tops, variant=dtype)
        if top is not None:
            ax.axhline(top, linestyle=styles[dtype][1:], color=styles[dtype][0], label=f"{dtype} GEMM ceiling")
    fp32 = value_of(tops, variant="fp32")
    for stage, rate in achieved.items():
        label = _short(rate) + (f"\n{rate / fp32:.0%} of fp32" if fp32 else "")
        ax.annotate(label, (stage, rate), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("GFLOP/s (int8: GOP/s)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"Achieved rate per stage vs. measured GEMM ceilings\n{setting_label(rows)}\n"
                 f"{context_label(rows, environment)}", fontsize=10)
    return _save(figure, path)


def scaling(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Measured seconds of one spatial+temporal block pair against tokens, and of one frame through the
    2D VAE decoder against pixels."""
    df = one_environment(df)
    blocks = select(df, stage="denoise", variant="block_pair", metric="seconds").dropna(subset=["config.tokens"])
    frames = select(df, stage="decode", variant="spatial_frame", metric="seconds")
    frames = frames.assign(pixels=[pixels_of(row) for _, row in frames.iterrows()]).dropna(subset=["pixels"])
    if not blocks.empty:
        blocks = blocks[_same(blocks["config.threads"], blocks["config.threads"].iloc[-1])]
    if not frames.empty:
        frames = frames[_same(frames["config.threads"], frames["config.threads"].iloc[-1])]
    panels = [p for p in (("tokens", blocks, "config.tokens", "one spatial + one temporal block, CFG batch 2"),
                          ("pixels per frame", frames, "pixels", "one frame through the 2D VAE decoder"))
              if not p[1].empty]
    if not panels:
        return None
    figure, axes = _figure(5.0 * len(panels), 3.8, len(panels))
    for ax, (xlabel, rows, column, title) in zip(axes, panels):
        rows = rows.drop_duplicates([column, "config.resolution", "config.frames"], keep="last").sort_values(column)
        ax.plot(rows[column].astype(float), rows["value"], marker="o")
        for _, row in rows.iterrows():
            frames = _text(row["config.frames"], " frames") if column == "config.tokens" else ""  # a frame is a frame
            name = " ".join(p for p in (_text(row["config.resolution"]), frames) if p)
            ax.annotate(name, (float(row[column]), row["value"]), xytext=(3, 3), textcoords="offset points",
                        fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="seconds (measured median)", title=title)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, which="both")
    used = pd.concat([p[1] for p in panels])
    figure.suptitle(f"How cost grows with size\n{context_label(used, environment)}", fontsize=10)
    return _save(figure, path)


# name -> (function, what the figure shows); the report draws them all in this order
def cross_platform(totals: pd.DataFrame, projection: pd.DataFrame, path) -> Path | None:
    """Seconds per video of every platform set-up (derived from measured records) at each setting,
    with the Graviton projections (hatched) at the CPU baseline's setting. Log scale."""
    if totals.empty:
        return None
    bars = [(f"{r.platform}\n{r.variant} ({r.dtype}, T5 {r.text_encoder_dtype})", f"{r.resolution} {r.frames}f",
             r.seconds, False) for r in totals.itertuples()]
    if projection is not None and not projection.empty:
        per_instance = projection.groupby(["instance", "generation", "resolution", "frames"], as_index=False)
        for r in per_instance.projected_seconds.sum().itertuples():
            bars.append((f"{r.instance} ({r.generation})\nfp32, projected", f"{r.resolution} {r.frames}f",
                         r.projected_seconds, True))
    settings = sorted({b[1] for b in bars}, key=lambda s: (int(s.split("p")[0]), s))
    figure, axes = _figure(5.5 * len(settings), 0.9 + 0.45 * max(sum(b[1] == s for b in bars) for s in settings),
                           len(settings))
    for ax, setting in zip(axes, settings):
        chosen = sorted([b for b in bars if b[1] == setting], key=lambda b: b[2])
        for i, (label, _, seconds, projected) in enumerate(chosen):
            ax.barh(i, seconds, color="tab:gray" if projected else "tab:blue", hatch="//" if projected else None)
            ax.annotate(f"{_short(seconds)} s", (seconds, i), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)
        ax.set_yticks(range(len(chosen)), [b[0] for b in chosen], fontsize=7)
        ax.set_xscale("log")
        ax.set(title=f"{setting}, 30 steps", xlabel="seconds per video")
        ax.grid(axis="x", alpha=0.3)
    figure.suptitle("Seconds per video by platform: derived from measured stage times (solid), "
                    "projected (hatched); random weights", fontsize=10)
    return _save(figure, path)


def quality_examples(video, captions: list[str], held_out: list[bool], path, frames=(0, 4, 8, 12, 16)) -> Path:
    """One row per caption: the given frames of a generated clip ``video`` [n, 3, F, H, W] in [-1, 1]."""
    figure = Figure(figsize=(1.3 * len(frames) + 0.2, 1.45 * len(captions) + 0.5), layout="constrained")
    axes = figure.subplots(len(captions), len(frames), squeeze=False)
    images = ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy()  # n F H W 3 in [0, 1]
    for row, (caption, unseen) in enumerate(zip(captions, held_out)):
        for col, frame in enumerate(frames):
            ax = axes[row][col]
            ax.imshow(images[row, frame], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"frame {frame}", fontsize=8)
        axes[row][0].set_ylabel(caption.removeprefix("a ") + ("\n(held out)" if unseen else ""), fontsize=7)
    figure.suptitle("Mini model trained here (fp32): generated clips per caption", fontsize=9)
    return _save(figure, path)


ADHERENCE_METRICS = ("adherence_shape", "adherence_colour", "adherence_motion", "adherence_all_correct")


def adherence(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Measured prompt adherence per attribute of the detector checks, the trained mini model (fp32,
    training and held-out combinations) and the controls that must fail, with chance levels."""
    df = one_environment(df)
    rows = select(df, notebook="03_quality_baseline", stage="adherence", metric=list(ADHERENCE_METRICS))
    if rows.empty:
        return None
    rows = rows.assign(group=rows["variant"] + "\n" + rows["config.split"].fillna(""))
    rows = rows.drop_duplicates(["group", "metric"], keep="last")
    table = rows.pivot(index="group", columns="metric", values="value").reindex(columns=list(ADHERENCE_METRICS))
    table = table.loc[list(dict.fromkeys(rows["group"]))]  # in the order the notebook stored them
    figure, (ax,) = _figure(max(7.0, 1.1 * len(table)), 3.8)
    width = 0.8 / len(ADHERENCE_METRICS)
    for i, metric in enumerate(ADHERENCE_METRICS):
        positions = [x + (i - 1.5) * width for x in range(len(table))]
        ax.bar(positions, table[metric], width, label=metric.removeprefix("adherence_").replace("_", " "))
    for level in (1 / 3, 1 / 5, 1 / 75):  # chance: shape, colour and motion, all correct
        ax.axhline(level, linestyle=":", linewidth=0.8, color="grey")
    ax.text(len(table) - 0.5, 1 / 3, "chance: shape 1/3, colour and motion 1/5, all 1/75", fontsize=7,
            ha="right", va="bottom", color="grey")
    ax.set_xticks(range(len(table)))
    ax.set_xticklabels(table.index, fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel="fraction of clips correct")
    ax.legend(fontsize=7, ncols=4, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Prompt adherence (measured): detector checks, mini model trained here, controls\n"
                 f"{context_label(rows, environment)}", fontsize=10)
    return _save(figure, path)


FIGURES = {
    "ceilings": (ceilings, "GEMM rate per dtype and thread count (measured) with the per-dtype ceiling (derived)"),
    "baseline_stage_times": (stage_times, "baseline seconds per video by stage, derived from measured stage times"),
    "op_classes": (op_classes, "operator self-time share per stage by op class (measured, torch.profiler)"),
    "block_breakdown": (block_breakdown, "denoiser ms per step by module group (measured under the profiler)"),
    "roofline": (roofline, "achieved GFLOP/s per stage (derived) against the GEMM ceilings (derived)"),
    "scaling": (scaling, "block-pair seconds vs tokens and spatial-frame decode seconds vs pixels (measured)"),
    "quality_adherence": (adherence, "prompt adherence per attribute of the trained mini model and controls (measured)"),
}


# ---- notebook 04: precision, threads, memory ---------------------------------------------------------

TUNING_NOTEBOOK = "04_precision_threads_memory"
PRECISION_ORDER = ("fp32", "fast_math", "upstream", "autocast", "bf16", "int8_t5")


def tuning_rows(df: pd.DataFrame, experiment: str, **criteria) -> pd.DataFrame:
    """Notebook 04's records of one ``experiment`` (config.experiment), with its config columns present."""
    df = one_environment(df)
    for column in ("config.experiment", "config.env_setting", "config.memory_config", "config.optimizations",
                   "config.env"):
        if column not in df.columns:
            df[column] = None
    return select(df, notebook=TUNING_NOTEBOOK, **{"config.experiment": experiment}, **criteria)


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
    figure, (ax,) = _figure(8.0, 1.2 + 0.35 * len(variants) * len(stages))
    height = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = select(rows, variant=variant).set_index("stage")["value"].reindex(stages)
        positions = [s + (len(variants) / 2 - i - 0.5) * height for s in range(len(stages))]
        ax.barh(positions, values, height, label=variant)
        for y, seconds in zip(positions, values):
            if not pd.isna(seconds):
                ax.annotate(f"{_short(seconds)} s", (seconds, y), xytext=(3, 0), textcoords="offset points",
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
    return _save(figure, path)


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
    figure, axes = _figure(5.0 * len(panels), 3.8, len(panels))
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
    return _save(figure, path)


def memory_waterfall(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Resident memory through a whole run, event by event, per memory configuration (measured peak RSS;
    after freeing T5: the resident set), with the usable memory of c7g instances (derived)."""
    from .tuning_records import WATERFALL, instance_table

    rows = tuning_rows(df, "memory").drop_duplicates(["variant", "stage", "metric"], keep="last")
    measured = rows[rows["metric"].isin([m for _, _, m, _ in WATERFALL])]
    if measured.empty:
        return None
    refused = select(rows, metric="refused_estimate_bytes")
    figure, (ax,) = _figure(9.0, 4.6)
    configs = list(dict.fromkeys(measured["variant"]))
    for config in configs:
        ours = select(measured, variant=config)
        points = [(i, value_of(ours, stage=stage, metric=metric)) for i, (_, stage, metric, _) in enumerate(WATERFALL)]
        points = [(i, v / 2**30) for i, v in points if v is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=config)
    top = measured["value"].max() / 2**30
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
    return _save(figure, path)


FIGURES.update({
    "precision_times": (precision_times, "seconds per video per stage and precision, derived from measured stage times"),
    "thread_scaling": (thread_scaling, "speed-up per stage with threads (measured) and with start-up settings (derived)"),
    "memory_waterfall": (memory_waterfall, "resident memory through a whole run per configuration (measured)"),
})


# ---- notebook 05: attention kernels and the rewrites of the bottlenecks -----------------------------------

ATTENTION_KINDS = ("spatial", "temporal", "cross")
MEMORY_BUDGETS_GIB = (24, 128)  # the machines the reference path is checked against (the study's question)


def _config(rows: pd.DataFrame, name: str) -> pd.Series:
    return rows[name] if name in rows.columns else pd.Series(None, index=rows.index, dtype=object)


def attention_kernels(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Seconds per query token of each attention kernel against the sequence length (spatial: tokens per
    frame, temporal: frames; cross: queries per sample against the caption), per attention type and dtype;
    hollow markers are derived from a part of the call; dotted lines mark where SDPA and the batched
    matmul swap places."""
    rows = select(one_environment(df), notebook="05_attention", stage="attention", metric="seconds")
    if rows.empty or "config.shape" not in rows.columns:
        return None
    shape = rows["config.shape"]
    rows = rows.assign(attention=_config(rows, "config.attention"), batch=[s[0] for s in shape],
                       q_len=[s[2] for s in shape], k_len=[s[3] for s in shape])
    rows = rows.assign(x=rows["q_len"].where(rows["attention"] == "cross", rows["k_len"]),
                       us_per_token=rows["value"] / (rows["batch"] * rows["q_len"]) * 1e6)
    kinds = [k for k in ATTENTION_KINDS if k in set(rows["attention"])]
    dtypes = [d for d in ("fp32", "bf16") if d in set(rows["config.dtype"])]
    figure = Figure(figsize=(5.0 * len(dtypes), 3.4 * len(kinds)), layout="constrained")
    axes = figure.subplots(len(kinds), len(dtypes), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            chosen = rows[(rows["attention"] == kind) & (rows["config.dtype"] == dtype)]
            curves = {}
            for variant, group in chosen.groupby("variant", sort=True):
                curve = group.groupby("x").agg(y=("us_per_token", "median"),
                                               derived=("kind", lambda k: (k == "derived").any())).sort_index()
                curves[variant] = curve["y"]
                line = ax.plot(curve.index, curve["y"], label=variant, linewidth=1.2)[0]
                for measured, style in ((False, dict(facecolors=line.get_color())), (True, dict(facecolors="none"))):
                    points = curve[curve["derived"] == measured]
                    ax.scatter(points.index, points["y"], s=16, edgecolors=line.get_color(), **style)
            if "sdpa" in curves and "bmm" in curves:
                both = pd.concat([curves["sdpa"], curves["bmm"]], axis=1, keys=["sdpa", "bmm"]).dropna()
                faster = (both["bmm"] < both["sdpa"]).tolist()
                for k in range(1, len(faster)):
                    if faster[k] != faster[k - 1]:
                        at = (both.index[k - 1] * both.index[k]) ** 0.5
                        ax.axvline(at, color="k", linestyle=":", linewidth=1)
                        ax.annotate("sdpa/bmm crossover", (at, ax.get_ylim()[1]), fontsize=7, rotation=90,
                                    va="top", ha="right")
            ax.set(xscale="log", yscale="log", title=f"{kind}, {dtype}", ylabel="µs per query token",
                   xlabel="queries per sample (keys: caption)" if kind == "cross" else
                   ("tokens per frame" if kind == "spatial" else "latent frames"))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)
    figure.suptitle("Attention kernels at the model's shapes (filled: measured, hollow: derived from a part)\n"
                    f"{context_label(rows, environment)}", fontsize=10)
    return _save(figure, path)


def attention_memory(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Peak of a denoising step with the reference attention (derived) against tokens per sample, one
    line per frame count, per attention type (columns) and dtype (rows); grey: the same step with SDPA;
    dotted: the machines; circles: the first setting past each machine."""
    df = one_environment(df)
    rows = select(df, notebook="05_attention", metric="step_peak_bytes", variant=["reference", "sdpa"])
    if rows.empty:
        return None
    rows = rows.assign(attention=_config(rows, "config.attention"), gib=rows["value"] / 2**30)
    budgets = next((b for b in _config(rows, "config.budgets")[::-1] if isinstance(b, list)), MEMORY_BUDGETS_GIB)
    kinds = [k for k in ATTENTION_KINDS if k in set(rows["attention"])]
    dtypes = [d for d in ("fp32", "bf16") if d in set(rows["config.dtype"])]
    frame_counts = sorted({int(f) for f in rows["config.frames"].dropna()})
    colors = {f: plt_color for f, plt_color in zip(frame_counts, ("tab:red", "tab:orange", "tab:purple", "tab:brown",
                                                                     "tab:pink", "tab:olive"))}
    figure = Figure(figsize=(4.6 * len(kinds), 3.6 * len(dtypes)), layout="constrained")
    axes = figure.subplots(len(dtypes), len(kinds), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            chosen = rows[(rows["attention"] == kind) & (rows["config.dtype"] == dtype)]
            for frames, group in chosen.groupby("config.frames"):
                for variant, style in (("reference", dict(marker="o", markersize=3)), ("sdpa", dict(linewidth=0.8))):
                    curve = group[group["variant"] == variant].sort_values("config.tokens")
                    ax.plot(curve["config.tokens"], curve["gib"], color=colors.get(int(frames), "k") if
                            variant == "reference" else "tab:gray", label=(f"reference, {int(frames)} frames"
                            if variant == "reference" else ("with SDPA" if frames == frame_counts[0] else None)),
                            **style)
            reference = chosen[chosen["variant"] == "reference"]
            for budget in budgets:
                ax.axhline(budget, color="grey", linestyle=":", linewidth=1)
                ax.text(0.01, budget, f"{budget} GiB machine", transform=ax.get_yaxis_transform(), fontsize=7,
                        va="bottom", color="grey")
                over = reference[reference["gib"] > budget].sort_values("gib")
                if len(over):
                    ax.scatter(over["config.tokens"].iloc[:1], over["gib"].iloc[:1], s=70, facecolors="none",
                               edgecolors="k", zorder=3)
            ax.set(xscale="log", yscale="log", title=f"{kind}, {dtype}", xlabel="tokens per sample (T x S)",
                   ylabel="step peak, GiB (derived)")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6, loc="lower right")
    figure.suptitle("Memory of a denoising step with the reference attention (weights + block working set + "
                    "score matrix, analytic);\ncircles: first setting past each machine. "
                    f"{context_label(rows, environment)}", fontsize=10)
    return _save(figure, path)


def rewrite_effects(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Left: each rewrite alone on one block pair, seconds after / before (measured side by side).
    Right: baseline and rewritten seconds of one denoising step (measured), the decode and a whole
    video (derived), per dtype, with the ratio."""
    df = one_environment(df)
    pairs = select(df, notebook="05_attention", stage="denoise", metric="block_pair_seconds")
    if pairs.empty:
        return None
    videos = select(df, notebook="05_attention", metric=["seconds_per_step", "video_seconds"])
    figure, (left, right) = _figure(12.0, 4.0, 2)
    dtypes = [d for d in ("fp32", "bf16") if d in set(pairs["config.dtype"])]
    names = [v for v in dict.fromkeys(pairs["variant"]) if v != "baseline"]
    width = 0.8 / max(len(dtypes), 1)
    for i, dtype in enumerate(dtypes):
        mine = pairs[pairs["config.dtype"] == dtype].drop_duplicates("variant", keep="last")
        mine = mine.set_index("variant")["value"]
        ratios = [mine.get(n) / mine.get("baseline") if n in mine and "baseline" in mine else float("nan")
                  for n in names]
        positions = [k + (i - (len(dtypes) - 1) / 2) * width for k in range(len(names))]
        bars = left.bar(positions, ratios, width, label=dtype)
        for bar, ratio in zip(bars, ratios):
            left.annotate(f"{ratio:.2f}", (bar.get_x() + bar.get_width() / 2, ratio), xytext=(0, 2),
                          textcoords="offset points", ha="center", fontsize=7)
    left.axhline(1.0, color="k", linewidth=0.8)
    left.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
    left.set(ylabel="block-pair seconds, rewritten / baseline", title="Each rewrite alone (one block pair, measured)")
    left.legend(fontsize=7)
    labels, positions = [], []
    for i, dtype in enumerate(dtypes):
        for j, (stage, metric, what) in enumerate((("denoise", "seconds_per_step", "step"),
                                                   ("decode", "video_seconds", "decode*"),
                                                   ("total", "video_seconds", "video*"))):
            x = i * 4 + j
            values = [value_of(videos, stage=stage, metric=metric, variant=v, **{"config.dtype": dtype})
                      for v in ("baseline", "rewritten")]
            for offset, value, color in ((-0.2, values[0], "tab:gray"), (0.2, values[1], "tab:green")):
                if value is not None:
                    right.bar(x + offset, value, 0.4, color=color)
            if None not in values:
                right.annotate(f"x{values[1] / values[0]:.2f}", (x, max(values)), xytext=(0, 2),
                               textcoords="offset points", ha="center", fontsize=7)
            labels.append(f"{dtype}\n{what}")
            positions.append(x)
    right.set_xticks(positions, labels, fontsize=7)
    right.set_yscale("log")
    right.set(ylabel="seconds", title="All rewrites: baseline (grey), rewritten (green)\n"
                                      "one step measured; * derived per video")
    figure.suptitle(f"Rewrites of the bottlenecks\n{setting_label(pairs)}\n{context_label(pairs, environment)}",
                    fontsize=10)
    return _save(figure, path)


FIGURES.update({
    "attention_kernels": (attention_kernels, "attention kernels: µs per query token against sequence length, per "
                                             "type and dtype (measured or derived)"),
    "attention_memory": (attention_memory, "step peak with the reference attention against tokens, with the "
                                           "machines' memory (derived)"),
    "rewrite_effects": (rewrite_effects, "each rewrite on one block pair (measured); all rewrites per stage and per "
                                         "video (measured and derived)"),
})
