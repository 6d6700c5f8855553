"""The study's report, rendered from the stored records alone: ``report/report.md`` and ``report.html``.

    python -m utils.report [--results ROOT] [--figures DIR] [--out DIR] [--environment ID]

Every number in the report comes from a record of the results store (``utils.measure.results``),
formatted by the Jinja filters of ``utils.report.formats``; the template (``templates/report.md.j2``)
holds the prose. Each notebook's part of the report is a section module of ``utils.report.sections``
with one interface: ``FIGURES`` (name -> ``FigureSpec``) and ``section(inputs)``, the template's
entries it fills. A section whose records are missing says so instead of showing anything, so a report
can be rendered before every notebook has run.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from utils.io import write_text_atomic
from utils.measure.records import in_environment, prepare, select
from utils.measure.results import RESULTS, load_environments, load_records
from utils.model.weights import weights_id
from utils.paths import FIGURES, REPO, REPORT
from utils.report.configured import NOTEBOOKS_DIR, configuration
from utils.report.figures import ReportInputs, context_label
from utils.report.formats import FILTERS, fmt, kinds_of, markdown_table, missing, text
from utils.report.sections import (
    arm_check,
    s00_environment,
    s01_baseline,
    s02_stage_profile,
    s03_quality_baseline,
    s04_precision_threads_memory,
    s05_attention,
    s06_int8,
    s07_step_caching,
    s08_end_to_end,
    s09_runtimes,
    s10_scale_out,
    s90_cross_platform,
)
from utils.report.sections.s03_quality_baseline import split_mini_records

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "report.md.j2"
README = REPO / "README.md"
README_TEMPLATE = "readme_headline.md.j2"
# the README's block the renderer rewrites (the headline table), between these two lines
README_MARKERS = ("<!-- headline: written by python -m utils.report from the records; edit the template -->",
                  "<!-- headline: end -->")
# every section of the report, in the notebooks' order
SECTIONS = (s00_environment, s01_baseline, s02_stage_profile, s03_quality_baseline, s04_precision_threads_memory,
            s05_attention, s06_int8, s07_step_caching, s08_end_to_end, s09_runtimes, s10_scale_out,
            s90_cross_platform, arm_check)
# config fields that say nothing about the setting (or are lists) stay out of "How to reproduce"
UNSUMMARISED = {"config.mkn", "config.latent"}


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



# ---- rendering ----------------------------------------------------------------------------------------

CSS = """body { font: 15px/1.5 system-ui, sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; }
blockquote { border-left: 4px solid #d9822b; background: #fff6ec; margin: 1em 0; padding: 0.4em 1em; }
code { background: #f3f3f3; padding: 0 0.2em; }"""


def to_html(markdown: str, title: str) -> str:
    from markdown_it import MarkdownIt  # only the renderer needs it, as jinja2 below

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"<style>\n{CSS}\n</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def draw_figures(inputs: ReportInputs, figures_dir: Path, out_dir: Path) -> dict[str, dict | None]:
    """Every section's figures, drawn into ``figures_dir``: name -> path (relative to ``out_dir``), caption
    and context line, or None where its records (or, for a notebook's own figure, its file) are missing."""
    figures = {}
    for module in SECTIONS:
        for name, spec in module.FIGURES.items():
            path = figures_dir / f"{name}.png"
            if spec.draw is None:
                drawn = path if path.is_file() else None
            else:
                drawn = spec.draw(inputs, path)
                if drawn is None:
                    path.unlink(missing_ok=True)  # a figure of records no longer there would mislead
            figures[name] = None if drawn is None else dict(
                path=Path(os.path.relpath(drawn, out_dir)).as_posix(), caption=spec.caption,
                context=spec.context or (spec.describe(inputs) if spec.describe else
                                         context_label(select(inputs.df, **spec.shows), inputs.environment)))
    return figures


def replace_block(text: str, block: str, markers=README_MARKERS) -> str:
    """``text`` with the lines between the two ``markers`` replaced by ``block``; raises if they are missing."""
    start, end = markers
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"the README must hold each headline marker once, in order: {start!r} ... {end!r}")
    head, rest = text.split(start)
    return f"{head}{start}\n{block.strip()}\n{end}{rest.split(end, 1)[1]}"


def render(results_root=RESULTS, figures_dir=FIGURES, out_dir=REPORT, environment_id: str | None = None,
           notebooks_dir=NOTEBOOKS_DIR, readme: Path | None = None) -> tuple[Path, Path]:
    """Redraw the figures into ``figures_dir`` and write ``out_dir/report.md`` and ``report.html`` from
    the records under ``results_root`` and, for the values no record stores, the notebooks' configured
    parameters under ``notebooks_dir``; with ``readme``, rewrite its headline block from the same records.
    Returns the two paths."""
    import jinja2  # only the renderer needs it; the section modules are imported by notebooks too

    results_root, figures_dir, out_dir = Path(results_root), Path(figures_dir), Path(out_dir)
    mini_weights = weights_id()
    records, stale_mini = split_mini_records(prepare(load_records(results_root)), mini_weights)
    environments = load_environments(results_root)
    primary = primary_environment(records, environments, environment_id)
    df = in_environment(records, primary)
    inputs = ReportInputs(df=df, records=records, environments=environments, primary=primary,
                          environment=environments.get(primary), configured=configuration(df, notebooks_dir))

    title = "OpenSora 1.2 text-to-video on CPU: inference study"
    context = dict(
        title=title, primary=primary, environment=inputs.environment or {},
        figures=draw_figures(inputs, figures_dir, out_dir),
        random_weights=(df["config.weights"] == "random").any(),
        weights=sorted({w for w in df["config.weights"].dropna() if w != "none"}),
        newest=df["time"].dropna().max() if len(df) else None,
        reproduce=_reproduce(df),
        profiles=sorted({text(p) for p in df.get("config.profile", pd.Series(dtype=object)).dropna()}),
        mini_weights=mini_weights, stale_mini=stale_mini,
        # the executed notebooks exported beside the report (make report): notebook -> link
        runs={p.stem: Path(os.path.relpath(p, out_dir)).as_posix()
              for p in sorted((out_dir / "notebooks").glob("*.html"))},
    )
    for module in SECTIONS:
        context |= module.section(inputs)
    template_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    template_env.filters.update(FILTERS, table=markdown_table, fmt=fmt)
    markdown = template_env.get_template(TEMPLATE).render(**context)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    write_text_atomic(md_path, markdown)
    write_text_atomic(html_path, to_html(markdown, title))
    if readme is not None:
        block = template_env.get_template(README_TEMPLATE).render(**context)
        write_text_atomic(readme, replace_block(Path(readme).read_text(), block))
    return md_path, html_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS), help="results store root (default: data/results)")
    parser.add_argument("--figures", default=str(FIGURES), help="where the figures are drawn (default: figures/)")
    parser.add_argument("--out", default=str(REPORT), help="where report.md and report.html go (default: report/)")
    parser.add_argument("--environment", default=None, help="primary environment id (default: newest baseline)")
    args = parser.parse_args(argv)
    try:
        # the README's headline follows the committed report only
        readme = README if Path(args.out).resolve() == REPORT.resolve() else None
        md_path, html_path = render(args.results, args.figures, args.out, args.environment, readme=readme)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {md_path} and {html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
