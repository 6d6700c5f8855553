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
    """"<CPU>, <n> threads[, random weights]" for a figure of ``rows``."""
    if environment:
        cpu = environment.get("cpu_model") or environment.get("environment_id", "")
    else:
        ids = rows["environment_id"].dropna().unique()
        cpu = f"environment {ids[-1]}" if len(ids) else "unknown environment"
    parts = [cpu, _threads_label(rows)]
    if (rows["config.weights"] == "random").any():
        parts.append("random weights")
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


def _figure(width: float = 7.0, height: float = 4.0, ncols: int = 1):
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, ncols, squeeze=False)[0]


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


FIGURES = {
    "ceilings": (ceilings, "GEMM rate per dtype and thread count (measured) with the per-dtype ceiling (derived)"),
    "baseline_stage_times": (stage_times, "baseline seconds per video by stage, derived from measured stage times"),
    "op_classes": (op_classes, "operator self-time share per stage by op class (measured, torch.profiler)"),
    "block_breakdown": (block_breakdown, "denoiser ms per step by module group (measured under the profiler)"),
    "roofline": (roofline, "achieved GFLOP/s per stage (derived) against the GEMM ceilings (derived)"),
    "scaling": (scaling, "block-pair seconds vs tokens and spatial-frame decode seconds vs pixels (measured)"),
}
