"""The report's baseline section (notebook ``01_baseline``): the faithful fp32 eager pipeline per stage,
and the 30-step video derived from one measured step with its check against a complete run."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from utils.measure.records import baseline_rows, newest_setting, one_environment, select, value_of
from utils.model.pipeline import STAGES
from utils.report.figures import FigureSpec, ReportInputs, context_label, new_figure, save_figure, setting_label, short
from utils.report.formats import kinds_of


def stage_times(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Derived seconds per video of each baseline stage (denoise = steps x one measured step)."""
    rows = select(baseline_rows(one_environment(df)), metric="video_seconds", stage=list(STAGES))
    if rows.empty:
        return None
    rows = rows.set_index("stage").reindex([s for s in STAGES if s in set(rows["stage"])])
    figure, (ax,) = new_figure(7.0, 3.2)
    ax.barh(rows.index[::-1], rows["value"][::-1], color="tab:blue")
    positive = rows["value"][rows["value"] > 0]
    if len(positive) and positive.max() / positive.min() > 100:
        ax.set_xscale("log")
    for stage, seconds in rows["value"].items():
        ax.annotate(f"{short(seconds)} s", (seconds, stage), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_xlabel("seconds per video (derived from measured stage times)")
    ax.set_title(f"Baseline fp32 eager, seconds per video by stage\n{setting_label(rows)}\n"
                 f"{context_label(rows, environment)}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(figure, path)


def stage_video_seconds(base: pd.DataFrame) -> dict[str, float]:
    """Derived seconds per video of each stage: the stored record, else the measured call (times the
    steps for the denoiser)."""
    seconds = {}
    for stage in STAGES:
        value = value_of(base, stage=stage, metric="video_seconds")
        if value is None and stage == "denoise":
            step = value_of(base, stage=stage, metric="seconds_per_step")
            steps = select(base, stage=stage)["config.steps"].dropna()
            value = step * float(steps.iloc[-1]) if step is not None and len(steps) else None
        elif value is None:
            value = value_of(base, stage=stage, metric="seconds")
        if value is not None:
            seconds[stage] = value
    return seconds


def _quantity(label: str, rows: pd.DataFrame, values: list, format: str) -> dict:
    return dict(label=label, kind=kinds_of(rows), format=format, cells=values)


def _baseline(df: pd.DataFrame) -> dict | None:
    base = baseline_rows(df)
    if base.empty:
        return None
    stages = [s for s in STAGES if not select(base, stage=s).empty]
    timing_metric = {s: "seconds_per_step" if value_of(base, stage=s, metric="seconds_per_step") is not None
                     else "seconds" for s in stages}
    timing = pd.concat([select(base, stage=s, metric=timing_metric[s]) for s in stages])
    video = stage_video_seconds(base)
    video_total = sum(video.values())
    total = select(base, stage="total", metric="video_seconds")

    def row(label, rows, format, column="value"):  # one quantity: a cell per stage, none for the total
        cells = [next(iter(select(rows, stage=s)[column].dropna()[::-1]), None) for s in stages]
        return _quantity(label, rows, cells + [None], format)

    rows = [
        row("median seconds per call (denoise: one step)", timing, "sig"),
        row("IQR of the calls (s)", timing, "sig", "spread.iqr"),
        row("timed calls (n)", timing, "integer", "spread.n"),
        row("peak RSS during the stage (GiB)", select(base, metric="peak_rss_bytes"), "gib"),
        row("loading the stage's model (s)", select(base, metric="load_seconds"), "sig"),
        row("GFLOP per call (counted)", select(base, metric="flops"), "giga"),
        row("achieved GFLOP/s", select(base, metric="gflops"), "sig"),
        _quantity("seconds per video", select(base, metric="video_seconds"),
                  [video.get(s) for s in stages] + [value_of(total) if not total.empty else video_total], "sig"),
        dict(label="share of the video time", kind="derived", format="pct",
             cells=[video[s] / video_total if s in video and video_total > 0 else None for s in stages]
             + [1.0 if video_total > 0 else None]),
    ]
    newest = base.iloc[-1]
    check = newest_setting(select(df, notebook="01_baseline", variant="check", stage="total"))
    derived = value_of(check, metric="derived_video_seconds")
    measured = value_of(check, metric="measured_video_seconds")
    return dict(columns=stages + ["total"], rows=rows, setting=setting_label(base),
                steps=newest["config.steps"], threads=newest["config.threads"], dtype=newest["config.dtype"],
                text_encoder_dtype=newest["config.text_encoder_dtype"], model=newest["config.model"],
                weights=newest["config.weights"], total=value_of(total) if not total.empty else None,
                total_kind=kinds_of(total),
                check=None if check.empty else dict(
                    setting=setting_label(check), derived=derived, measured=measured,
                    derived_kind=kinds_of(select(check, metric="derived_video_seconds")),
                    measured_kind=kinds_of(select(check, metric="measured_video_seconds")),
                    ratio=measured / derived if measured is not None and derived else None,
                    peak_rss=value_of(check, metric="peak_rss_bytes"),
                    peak_rss_kind=kinds_of(select(check, metric="peak_rss_bytes"))))


# ---- the section's interface (utils.report.render) ----------------------------------------------------

NOTEBOOKS = ("01_baseline",)
FIGURES = {
    "baseline_stage_times": FigureSpec.of_records(
        stage_times, "baseline seconds per video by stage, derived from measured stage times"),
}


TIMING_METRICS = ("seconds", "seconds_per_step", "video_seconds")


def padded_baseline(df: pd.DataFrame) -> dict | None:
    """How many of this environment's timing records of the real model were measured before the faithful
    cross-attention attended to the caption's valid tokens only (their config has no ``caption_keys``:
    the baseline then projected and attended over all padded caption tokens), and the notebooks they are in."""
    rows = select(df, metric=list(TIMING_METRICS))
    if rows.empty or "config.model" not in rows.columns:
        return None
    rows = rows[rows["config.model"] == "opensora-v1.2"]
    keys = rows["config.caption_keys"] if "config.caption_keys" in rows.columns else pd.Series(None, index=rows.index)
    old = rows[keys.isna()]
    if old.empty:
        return None
    return dict(records=len(old), of=len(rows), notebooks=sorted(set(old["notebook"])))


def section(inputs: ReportInputs) -> dict:
    return dict(baseline=_baseline(inputs.df), padded_baseline=padded_baseline(inputs.df))
