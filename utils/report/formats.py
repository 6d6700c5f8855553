"""How the report writes numbers and tables: the Jinja filters (significant digits, percentages, GiB,
ratios), markdown tables of DataFrames, and the kind (measured, derived, ...) of a group of records."""
from __future__ import annotations

import math

import pandas as pd

from utils.io import GIB

# ---- number formats (Jinja filters) -------------------------------------------------------------------

def missing(x) -> bool:
    return x is None or (not isinstance(x, str) and pd.isna(x))


def sig(x, digits: int = 3) -> str:
    """``digits`` significant digits, thousands separated: 123.456 -> "123", 0.012345 -> "0.0123"."""
    if missing(x):
        return "–"
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    magnitude = math.floor(math.log10(abs(x)))
    if magnitude < -4:
        return f"{x:.{digits - 1}e}"
    decimals = digits - 1 - magnitude
    return f"{round(x, decimals):,.0f}" if decimals <= 0 else f"{x:,.{decimals}f}"


def text(x) -> str:
    if missing(x):
        return "–"
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _or_dash(format_number):
    return lambda x: "–" if missing(x) else format_number(x)


FILTERS = dict(
    sig=sig, text=text,
    pct=_or_dash(lambda x: f"{100 * float(x):.1f} %"),
    gib=_or_dash(lambda x: sig(float(x) / GIB)),  # bytes -> GiB
    giga=_or_dash(lambda x: sig(float(x) / 1e9)),  # FLOP -> GFLOP
    ratio=_or_dash(lambda x: f"{float(x):.3f}"),
    integer=_or_dash(lambda x: f"{int(x):,}"),
)


def fmt(x, format: str = "text") -> str:
    """``x`` through the filter named ``format``, escaped for a markdown table cell."""
    if format not in FILTERS:
        raise ValueError(f"unknown format {format!r}; accepted: {', '.join(FILTERS)}")
    return FILTERS[format](x).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, formats: dict | None = None, default: str = "sig") -> str:
    """A GitHub-style markdown table of ``df``; ``formats`` maps a column to a filter name (otherwise
    ``default`` for numeric columns, ``text`` for the rest). Numeric columns are right-aligned."""
    formats = dict(formats or {})
    for column in df.columns:
        formats.setdefault(column, default if pd.api.types.is_numeric_dtype(df[column]) else "text")
    right = [formats[c] != "text" for c in df.columns]
    lines = ["| " + " | ".join(fmt(c) for c in df.columns) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v, formats[c]) for c, v in zip(df.columns, row)) + " |")
    return "\n".join(lines)


def kinds_of(rows: pd.DataFrame) -> str:
    """"measured", "derived", "measured + derived", ... of the records behind a number or a row."""
    order = ("measured", "derived", "projected", "emulated")
    present = set(rows["kind"].dropna())
    return " + ".join(k for k in order if k in present) or "–"
