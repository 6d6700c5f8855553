"""What every figure of the report shares: its registration (``FigureSpec``), what it is drawn from
(``ReportInputs``), labels and the canvas. The figures themselves live in the section module of the
notebook whose records they show (``utils.report.sections``).

Every figure function takes the records of one environment (a DataFrame; rows of other environments are
dropped in favour of the newest one present) and an output path, writes a PNG and returns its path,
or returns None when the records it needs are not there yet. Titles say what kind of number is shown,
the CPU and thread count it was measured with, and "random weights" where the model's weights were.
Figures are drawn on ``matplotlib.figure.Figure`` (Agg canvas), never through pyplot's global state,
so importing this module changes no notebook's backend.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

DPI = 120
BASELINE_NOTEBOOKS = ("01_baseline", "02_stage_profile")


@dataclass(frozen=True)
class ReportInputs:
    """What a section and its figures are drawn from: ``df`` the primary environment's records,
    ``records`` every environment's (both with stale mini-model records left out), ``environments`` the
    fingerprints by id, ``primary`` the primary environment's id, ``environment`` its fingerprint and
    ``configured`` each notebook's configured parameters (``utils.report.configured``), for the values no
    record stores."""

    df: pd.DataFrame
    records: pd.DataFrame
    environments: dict
    primary: str | None
    environment: dict | None
    configured: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FigureSpec:
    """One figure of a section: ``draw(inputs, path)`` writes the PNG and returns its path, or None when its
    records are not there (None for a figure a notebook draws itself, shown when its file exists);
    ``shows`` the records its context line (CPU, threads, weights) describes, as ``select`` criteria;
    ``context`` a fixed context line instead, or ``describe(inputs)`` one computed from the inputs (a section
    drawn from another environment than the primary one names its own CPU)."""

    caption: str
    draw: Callable[[ReportInputs, Path], Path | None] | None = None
    shows: dict | None = None
    context: str | None = None
    describe: Callable[[ReportInputs], str] | None = None

    @classmethod
    def of_records(cls, draw: Callable, caption: str, shows: dict | None = None) -> "FigureSpec":
        """A figure drawn by ``draw(df, path, environment=...)`` from the primary environment's records."""
        return cls(caption, lambda inputs, path: draw(inputs.df, path, environment=inputs.environment),
                   shows or dict(notebook=list(BASELINE_NOTEBOOKS)))


def drawn_from(notebook_rows: Callable, draw: Callable) -> Callable[[ReportInputs, Path], Path | None]:
    """A ``FigureSpec`` draw function: ``draw(rows, path, environment=...)`` on a section's own records, those
    ``notebook_rows(records, primary)`` chooses (None while that notebook has none)."""
    def drawn(inputs: ReportInputs, path: Path) -> Path | None:
        rows, chosen = notebook_rows(inputs.records, inputs.primary)
        return None if chosen is None else draw(rows, path, environment=inputs.environments.get(chosen))
    return drawn


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


def short(x: float) -> str:
    """A value label on a figure: three significant digits, no exponent above 100."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def label_text(value, suffix: str = "") -> str:
    if pd.isna(value):
        return ""
    return f"{int(value) if isinstance(value, float) and value.is_integer() else value}{suffix}"


def new_figure(width: float = 7.0, height: float = 4.0, ncols: int = 1, width_ratios=None):
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, ncols, squeeze=False, width_ratios=width_ratios)[0]


def save_figure(figure: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path




