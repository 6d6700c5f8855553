"""The study's report, rendered from the stored records alone: ``report/report.md`` and ``report.html``.

    python -m utils.report [--results ROOT] [--figures DIR] [--out DIR] [--environment ID]

Every number in the report comes from a record of the results store (``utils.results``), formatted
by the Jinja filters below; the template (``utils/templates/report.md.j2``) holds the prose. Figures
are redrawn from the same records (``utils.plots``). A section whose records are missing says so
instead of showing anything, so a report can be rendered before every notebook has run.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

from . import cross_platform, plots
from .minimodel import weights_id
from .paths import FIGURES, REPORT
from .pipeline import STAGES
from .plots import baseline_rows, newest_setting, one_environment, prepare, select, setting_label, value_of
from .report_arm import arm_section
from .report_quality import quality_section, split_mini_records
from .report_attention import attention_section
from .report_int8 import INT8_FIGURES, NOTEBOOK as INT8_NOTEBOOK, int8_section
from .report_tuning import TUNING_FIGURES, tuning_section
from .results import RESULTS, load_environments, load_records

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "report.md.j2"
BOTTLENECK_COLUMNS = ["rank", "where", "stage", "component", "seconds per video (derived)", "share",
                      "achieved GFLOP/s", "ceiling fraction", "dominant op class"]
# config fields that say nothing about the setting (or are lists) stay out of "How to reproduce"
UNSUMMARISED = {"config.mkn", "config.latent"}


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
    gib=_or_dash(lambda x: sig(float(x) / 2**30)),  # bytes -> GiB
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


# ---- derived tables ----------------------------------------------------------------------------------

def ceiling_fractions(df: pd.DataFrame, threads: int | None = None, dtype: str = "fp32") -> pd.DataFrame:
    """Per baseline stage: achieved GFLOP/s (derived record), the ``dtype`` GEMM ceiling at the same
    thread count, and their ratio. Stages lacking either are left out."""
    df = one_environment(df)
    rows = select(df, notebook="01_baseline", variant="baseline", metric="gflops").dropna(subset=["value"])
    if threads is not None:
        rows = rows[rows["config.threads"] == threads]
    rows = newest_setting(rows)
    out = []
    for stage in STAGES:
        achieved = value_of(rows, stage=stage)
        if achieved is None:
            continue
        threads_used = select(rows, stage=stage)["config.threads"].iloc[-1]
        ceiling = value_of(df, stage="gemm", metric="gflops_ceiling", variant=dtype, **{"config.threads": threads_used})
        if ceiling:
            out.append(dict(stage=stage, gflops=achieved, ceiling=ceiling, fraction=achieved / ceiling))
    return pd.DataFrame(out, columns=["stage", "gflops", "ceiling", "fraction"])


def _dominant_op_class(df: pd.DataFrame) -> dict[str, str]:
    shares = newest_setting(select(df, metric="self_share"))
    return {stage: rows.loc[rows["value"].idxmax(), "variant"]
            for stage, rows in shares.dropna(subset=["value"]).groupby("stage") if rows["value"].max() > 0}


def _stage_video_seconds(base: pd.DataFrame) -> dict[str, float]:
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


def bottlenecks(df: pd.DataFrame) -> pd.DataFrame:
    """(stage, component) rows ranked by their share of the derived per-video time: the denoiser split
    by its module-group shares, other stages whole. Rate, ceiling fraction and dominant op class are
    the stage's (no per-group FLOP count is stored)."""
    df = one_environment(df)
    base = baseline_rows(df)
    video = _stage_video_seconds(base)
    if not video:
        return pd.DataFrame(columns=BOTTLENECK_COLUMNS)
    groups = newest_setting(select(df, stage="denoise", metric="ms_per_step")).dropna(subset=["value"])
    if groups.empty:
        groups = newest_setting(select(df, stage="denoise", metric="share")).dropna(subset=["value"])
    threads = base["config.threads"].dropna()
    fractions = ceiling_fractions(df, threads=threads.iloc[-1] if len(threads) else None).set_index("stage")
    stored = newest_setting(select(df, variant="baseline", metric="ceiling_fraction"))
    dominant = _dominant_op_class(df)
    rows = []
    for stage, seconds in video.items():
        parts = [("whole stage", seconds)]
        if stage == "denoise" and groups["value"].sum() > 0:
            parts = [(g, seconds * v / groups["value"].sum()) for g, v in zip(groups["variant"], groups["value"])]
        fraction = fractions["fraction"].get(stage, value_of(stored, stage=stage))
        for component, part in parts:
            rows.append({"where": stage if component == "whole stage" else f"{stage}: {component}",
                         "stage": stage, "component": component, "seconds per video (derived)": part,
                         "achieved GFLOP/s": value_of(base, stage=stage, metric="gflops"),
                         "ceiling fraction": fraction, "dominant op class": dominant.get(stage)})
    table = pd.DataFrame(rows).sort_values("seconds per video (derived)", ascending=False, kind="stable")
    total = table["seconds per video (derived)"].sum()
    table["share"] = table["seconds per video (derived)"] / total if total > 0 else 0.0
    table["rank"] = range(1, len(table) + 1)
    return table[BOTTLENECK_COLUMNS].reset_index(drop=True)


# ---- sections -----------------------------------------------------------------------------------------

def primary_environment(df: pd.DataFrame, environments: dict, requested: str | None = None) -> str | None:
    """``requested``, else the environment of the newest ``01_baseline`` record, else of the newest record."""
    known = set(environments) | set(df["environment_id"].dropna())
    if requested is not None:
        if requested not in known:
            raise ValueError(f"environment {requested!r} is not in the store; accepted: {', '.join(sorted(known)) or 'none'}")
        return requested
    for rows in (select(df, notebook="01_baseline"), df):
        ids = rows["environment_id"].dropna()
        if len(ids):
            return ids.iloc[-1]
    return next(iter(environments), None)


def _quantity(label: str, rows: pd.DataFrame, values: list, format: str) -> dict:
    return dict(label=label, kind=kinds_of(rows), format=format, cells=values)


def _reproduce(df: pd.DataFrame) -> list[dict]:
    """Per notebook: record count, kinds, runs, commits and the distinct values of each config field."""
    out = []
    for notebook, rows in df.groupby("notebook", sort=True):
        settings = []
        for column in sorted(c for c in rows.columns if c.startswith("config.") and c not in UNSUMMARISED):
            values = rows[column].dropna()
            values = sorted({text(v) for v in values if not isinstance(v, (list, dict))}, key=_natural)
            if values:
                settings.append(dict(name=column.removeprefix("config."), distinct=", ".join(values)))
        commits = sorted({f"{str(c)[:10]}{' (dirty)' if d is True else ''}"
                          for c, d in zip(rows["git_commit"], rows["git_dirty"]) if not missing(c)})
        out.append(dict(notebook=notebook, records=len(rows), kinds=kinds_of(rows), runs=rows["run_id"].nunique(),
                        newest=rows["time"].dropna().max(), commits=", ".join(commits) or "–", settings=settings))
    return out


def _natural(value: str):
    try:
        return (0, float(value.rstrip("p")), value)
    except ValueError:
        return (1, 0.0, value)


HARDWARE_FIELDS = [  # (label, getter, format)
    ("CPU model", lambda e: e.get("cpu_model"), "text"),
    ("arch", lambda e: e.get("arch"), "text"),
    ("torch ISA", lambda e: e.get("isa_torch"), "text"),
    ("CPU flags", lambda e: " ".join(e.get("cpu_flags") or []) or None, "text"),
    ("logical CPUs", lambda e: e.get("logical_cpus"), "integer"),
    ("usable CPUs", lambda e: e.get("usable_cpus"), "integer"),
    ("memory (GiB)", lambda e: e.get("memory_bytes"), "gib"),
    ("torch", lambda e: e.get("torch_build"), "text"),
    ("oneDNN", lambda e: e.get("onednn"), "text"),
    ("OS", lambda e: e.get("os"), "text"),
    ("Python", lambda e: e.get("python"), "text"),
    ("performance env vars", lambda e: " ".join(f"{k}={v}" for k, v in (e.get("env") or {}).items()) or None, "text"),
    ("device", lambda e: e.get("device"), "text"),
    ("commit at last record", lambda e: (e.get("git") or {}).get("commit"), "text"),
    ("uncommitted changes", lambda e: (e.get("git") or {}).get("dirty"), "text"),
]


def _hardware(environments: dict, primary: str | None) -> dict | None:
    if not environments:
        return None
    ids = sorted(environments, key=lambda i: (i != primary, i))
    rows = [dict(label=label, format=format, cells=[get(environments[i]) for i in ids])
            for label, get, format in HARDWARE_FIELDS]
    return dict(columns=[f"{i} (primary)" if i == primary else i for i in ids], rows=rows)


def _ceilings(df: pd.DataFrame) -> dict | None:
    rates = select(df, stage="gemm", metric="gflops").drop_duplicates(
        ["variant", "config.shape", "config.threads"], keep="last")
    tops = select(df, stage="gemm", metric="gflops_ceiling").drop_duplicates(["variant", "config.threads"], keep="last")
    bandwidth = select(df, stage="memory", metric="gbs").drop_duplicates(["config.threads"], keep="last")
    if rates.empty and tops.empty and bandwidth.empty:
        return None
    ceiling_rows = []
    order = {d: i for i, d in enumerate(plots.GEMM_DTYPES)}
    tops = tops.assign(order=tops["variant"].map(lambda v: order.get(v, len(order))))
    for _, top in tops.sort_values(["order", "variant", "config.threads"]).iterrows():
        shapes = select(rates, variant=top["variant"], **{"config.threads": top["config.threads"]})
        best = shapes.loc[shapes["value"].idxmax(), "config.shape"] if not shapes.empty else None
        ceiling_rows.append({"dtype": top["variant"], "threads": top["config.threads"], "ceiling": top["value"],
                             "unit": top["unit"], "best shape": best, "kind": top["kind"]})
    gemm = pd.DataFrame(ceiling_rows, columns=["dtype", "threads", "ceiling", "unit", "best shape", "kind"])
    copy = pd.DataFrame({"threads": bandwidth["config.threads"], "copy GB/s": bandwidth["value"],
                         "kind": bandwidth["kind"]}).sort_values("threads")
    return dict(gemm=gemm if len(gemm) else None, bandwidth=copy if len(copy) else None,
                shapes=", ".join(sorted({text(s) for s in rates["config.shape"].dropna()})))


def _baseline(df: pd.DataFrame) -> dict | None:
    base = baseline_rows(df)
    if base.empty:
        return None
    stages = [s for s in STAGES if not select(base, stage=s).empty]
    timing_metric = {s: "seconds_per_step" if value_of(base, stage=s, metric="seconds_per_step") is not None
                     else "seconds" for s in stages}
    timing = pd.concat([select(base, stage=s, metric=timing_metric[s]) for s in stages])
    video = _stage_video_seconds(base)
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


def _timings(rows: pd.DataFrame, columns: dict) -> pd.DataFrame | None:
    """A table of measured timing records: the config ``columns`` (name -> label), median, IQR, n, kind."""
    rows = rows.drop_duplicates(list(columns) + ["variant"], keep="last")
    if rows.empty:
        return None
    table = pd.DataFrame({label: rows[column].map(text) for column, label in columns.items()})
    table["median s"], table["IQR s"], table["n"], table["kind"] = (
        rows["value"], rows["spread.iqr"], rows["spread.n"], rows["kind"])
    return table.reset_index(drop=True)


def _profile(df: pd.DataFrame) -> dict:
    shares = newest_setting(select(df, metric="self_share"))
    op_table = None
    if not shares.empty:
        pivot = shares.pivot_table(index="variant", columns="stage", values="value", aggfunc="last")
        pivot = pivot[[s for s in STAGES if s in pivot.columns]]
        pivot = pivot.reindex([c for c in plots.OP_CLASSES if c in pivot.index] +
                              sorted(set(pivot.index) - set(plots.OP_CLASSES)))
        op_table = pivot.reset_index().rename(columns={"variant": "op class"})
    groups = newest_setting(select(df, stage="denoise", metric="ms_per_step")).dropna(subset=["value"])
    group_table = None
    if not groups.empty:
        share_rows = newest_setting(select(df, stage="denoise", metric="share"))
        group_shares = {v: value_of(share_rows, variant=v) for v in groups["variant"]}
        group_table = pd.DataFrame({
            "module group": groups["variant"], "ms per step": groups["value"], "ms kind": groups["kind"],
            "share of the step": [group_shares[v] if group_shares[v] is not None else ms / groups["value"].sum()
                                  for v, ms in zip(groups["variant"], groups["value"])],
            "share kind": [kinds_of(select(share_rows, variant=v)) if group_shares[v] is not None else "derived"
                           for v in groups["variant"]],
        }).sort_values("ms per step", ascending=False)
    base = baseline_rows(df)
    threads = base["config.threads"].dropna()
    threads = threads.iloc[-1] if len(threads) else None
    fractions = ceiling_fractions(df, threads=threads)
    stored = newest_setting(select(df, variant="baseline", metric="ceiling_fraction"))
    if fractions.empty and not stored.empty:
        fractions = pd.DataFrame({"stage": stored["stage"], "gflops": None, "ceiling": None,
                                  "fraction": stored["value"]})
    roofline = None if fractions.empty else fractions.rename(columns={
        "gflops": "achieved GFLOP/s", "ceiling": "fp32 GEMM ceiling", "fraction": "fraction of the ceiling"})
    other_ceilings = {d: value_of(df, stage="gemm", metric="gflops_ceiling", variant=d, **{"config.threads": threads})
                      for d in plots.GEMM_DTYPES}
    blocks = select(df, stage="denoise", variant="block_pair", metric="seconds")
    block_table = _timings(blocks, {"config.resolution": "resolution", "config.frames": "frames",
                                    "config.tokens": "tokens", "config.threads": "threads"})
    model_step = select(df, stage="denoise", variant="block_pair", metric="model_seconds_per_step")
    if block_table is not None and not model_step.empty:
        per_tokens = {text(t): v for t, v in zip(model_step["config.tokens"], model_step["value"])}
        block_table.insert(len(block_table.columns) - 1, "model s per step (derived)",
                           block_table["tokens"].map(per_tokens))
    decode = select(df, stage="decode", variant=["spatial_frame", "temporal_chunk"], metric="seconds")
    decode = decode.assign(**{"config.pixels": [plots.pixels_of(r) for _, r in decode.iterrows()]})
    decode_table = _timings(decode.sort_values(["variant", "config.pixels"]),
                            {"variant": "part", "config.resolution": "resolution", "config.pixels": "pixels",
                             "config.threads": "threads"})
    t5_table = _timings(select(df, stage="encode_prompt", variant="t5", metric="seconds"),
                        {"config.threads": "threads"})
    return dict(op_table=op_table, op_setting=setting_label(shares), group_table=group_table,
                group_setting=setting_label(groups), roofline=roofline, threads=threads,
                ceilings=other_ceilings, blocks=block_table, decode=decode_table, t5=t5_table)


# ---- rendering ----------------------------------------------------------------------------------------

CSS = """body { font: 15px/1.5 system-ui, sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; }
blockquote { border-left: 4px solid #d9822b; background: #fff6ec; margin: 1em 0; padding: 0.4em 1em; }
code { background: #f3f3f3; padding: 0 0.2em; }"""


def _cross_platform(xp: dict) -> dict | None:
    """Tables of the cross-platform section (None when no platform has per-video times)."""
    if xp["totals"].empty:
        return None
    totals = xp["totals"].rename(columns={"text_encoder_dtype": "T5 dtype", "seconds": "seconds per video"})
    projection = None
    if not xp["projection"].empty:
        projection = (xp["projection"].pivot_table(index=["instance", "generation"], columns="stage",
                                                   values="projected_seconds")
                      .assign(total=lambda d: d.sum(axis=1)).reset_index())
    costs = None
    if not xp["costs"].empty:
        costs = xp["costs"][["platform", "instance", "variant", "resolution", "frames", "seconds", "kind",
                             "usd_per_hour", "unit", "usd_per_video", "date"]]
    return dict(totals=totals.drop(columns=["environment_id"]),
                published=None if xp["published"].empty else xp["published"],
                projection=projection, costs=costs, gemm_efficiency=xp["gemm_efficiency"],
                fractions=None if xp["projection"].empty else
                xp["projection"].drop_duplicates("stage").assign(tflop=lambda d: d.flops_per_video / 1e12)
                [["stage", "ceiling_fraction_here", "tflop"]]
                .rename(columns={"ceiling_fraction_here": "fraction of the fp32 GEMM ceiling here (derived)",
                                 "tflop": "TFLOP per video (counted)"}),
                price_sources=cross_platform.prices()[["platform", "instance", "usd_per_hour", "unit", "source",
                                                       "date", "note"]],
                notebooks=None if xp["notebooks"].empty else xp["notebooks"])


def _write_atomic(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_html(markdown: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"<style>\n{CSS}\n</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def figure_sources() -> dict[str, dict]:
    """Which records a figure's context line (CPU, threads, weights) describes, where not the baseline's."""
    return {"ceilings": dict(stage="gemm"), "quality_adherence": dict(notebook="03_quality_baseline", stage="adherence")} | {
        name: dict(notebook=plots.TUNING_NOTEBOOK) for name in TUNING_FIGURES} | {
        name: dict(notebook=INT8_NOTEBOOK) for name in INT8_FIGURES}


def render(results_root=RESULTS, figures_dir=FIGURES, out_dir=REPORT,
           environment_id: str | None = None) -> tuple[Path, Path]:
    """Redraw the figures into ``figures_dir`` and write ``out_dir/report.md`` and ``report.html`` from
    the records under ``results_root``; returns the two paths."""
    import jinja2

    results_root, figures_dir, out_dir = Path(results_root), Path(figures_dir), Path(out_dir)
    mini_weights = weights_id()
    records, stale_mini = split_mini_records(prepare(load_records(results_root)), mini_weights)
    environments = load_environments(results_root)
    primary = primary_environment(records, environments, environment_id)
    df = records[records["environment_id"] == primary].reset_index(drop=True)
    environment = environments.get(primary)

    figures = {}
    for name, (draw, what) in (plots.FIGURES | INT8_FIGURES).items():
        path = figures_dir / f"{name}.png"
        drawn = draw(df, path, environment=environment)
        if drawn is None:
            path.unlink(missing_ok=True)  # a figure of records no longer there would mislead
            figures[name] = None
        else:
            shown = select(df, **figure_sources().get(name, dict(notebook=["01_baseline", "02_stage_profile"])))
            figures[name] = dict(path=Path(os.path.relpath(drawn, out_dir)).as_posix(), caption=what,
                                 context=plots.context_label(shown, environment))

    xp = cross_platform.summary(records, environments, primary)
    drawn = plots.cross_platform(xp["totals"], xp["projection"], figures_dir / "cross_platform.png")
    if drawn is None:
        (figures_dir / "cross_platform.png").unlink(missing_ok=True)
    figures["cross_platform"] = None if drawn is None else dict(
        path=Path(os.path.relpath(drawn, out_dir)).as_posix(), context="every platform in the store",
        caption="seconds per video by platform, derived from measured stage times (solid) or projected (hatched)")

    examples = figures_dir / "quality_examples.png"  # drawn by 03_quality_baseline from generated frames
    figures["quality_examples"] = dict(
        path=Path(os.path.relpath(examples, out_dir)).as_posix(), context="Drawn by `03_quality_baseline`",
        caption="clips generated by the mini model trained here (fp32, seed 0); \"held out\" marks combinations "
                "never seen in training") if examples.is_file() else None

    ranked = bottlenecks(df)
    base = baseline_rows(df)
    title = "OpenSora 1.2 text-to-video on CPU: inference study"
    context = dict(
        title=title, primary=primary, environment=environment or {}, figures=figures,
        random_weights=(df["config.weights"] == "random").any(),
        weights=sorted({w for w in df["config.weights"].dropna() if w != "none"}),
        newest=df["time"].dropna().max() if len(df) else None,
        reproduce=_reproduce(df),
        profiles=sorted({text(p) for p in df.get("config.profile", pd.Series(dtype=object)).dropna()}), hardware=_hardware(environments, primary), ceilings=_ceilings(df),
        baseline=_baseline(df), profile=_profile(df),
        bottlenecks=None if ranked.empty else ranked.drop(columns=["stage", "component"]),
        bottleneck_setting=setting_label(base),
        group_split=not newest_setting(select(df, stage="denoise", metric=["ms_per_step", "share"])).empty,
        quality=quality_section(df), mini_weights=mini_weights, stale_mini=stale_mini,
        arm=arm_section(records, environments),
        attention=attention_section(df),
        int8=int8_section(df, records),
        tuning=tuning_section(records, environments, primary),
        xp=_cross_platform(xp),
    )
    template_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    template_env.filters.update(FILTERS, table=markdown_table, fmt=fmt)
    markdown = template_env.get_template(TEMPLATE).render(**context)
    html = to_html(markdown, title)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    _write_atomic(md_path, markdown)
    _write_atomic(html_path, html)
    return md_path, html_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS), help="results store root (default: data/results)")
    parser.add_argument("--figures", default=str(FIGURES), help="where the figures are drawn (default: figures/)")
    parser.add_argument("--out", default=str(REPORT), help="where report.md and report.html go (default: report/)")
    parser.add_argument("--environment", default=None, help="primary environment id (default: newest baseline)")
    args = parser.parse_args(argv)
    try:
        md_path, html_path = render(args.results, args.figures, args.out, args.environment)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {md_path} and {html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
