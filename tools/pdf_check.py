"""The PDF report checked as pages: every page rendered to an image (poppler's ``pdftoppm``), every figure of the
markdown report embedded, and no word set beyond the page's edge (the words' boxes from ``pdftotext -bbox``).

    python tools/pdf_check.py [report/report.pdf] [--markdown report/report.md] [--out build/report-pdf]

Exit status 0 when every check passes, 1 otherwise (each problem named), 2 when the PDF, the markdown or
poppler's tools are missing. Writes ``page-N.png`` (low resolution) and ``check.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

TOOLS = ("pdfinfo", "pdfimages", "pdftoppm", "pdftotext")
SLACK_PT = 1.0  # a word may touch the page's edge by this much (rounding of the boxes)


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def figures_in(markdown: str) -> list[str]:
    """The images the markdown report shows (``![caption](path)``)."""
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def words_off_page(bbox_html: str) -> list[dict]:
    """Each word whose box leaves its page (``pdftotext -bbox`` output: pages with their size, words with boxes)."""
    found = []
    pages = re.findall(r'<page width="([\d.]+)" height="([\d.]+)">(.*?)</page>', bbox_html, flags=re.S)
    for number, (width, height, body) in enumerate(pages, 1):
        for x_min, y_min, x_max, y_max, word in re.findall(
                r'<word xMin="([-\d.]+)" yMin="([-\d.]+)" xMax="([-\d.]+)" yMax="([-\d.]+)">(.*?)</word>', body):
            if (float(x_min) < -SLACK_PT or float(x_max) > float(width) + SLACK_PT
                    or float(y_max) > float(height) + SLACK_PT):
                found.append(dict(page=number, word=word, x_max=float(x_max), width=float(width)))
    return found


def check(pdf: Path, markdown: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    pages = int(re.search(r"^Pages:\s+(\d+)", run("pdfinfo", str(pdf)), flags=re.M).group(1))
    embedded = len(run("pdfimages", "-list", str(pdf)).splitlines()[2:])  # two header lines
    for old in out.glob("page-*.png"):
        old.unlink()
    run("pdftoppm", "-r", "40", "-png", str(pdf), str(out / "page"))
    images = sorted(out.glob("page-*.png"))
    wanted = figures_in(markdown.read_text())
    off = words_off_page(run("pdftotext", "-bbox", str(pdf), "-"))
    problems = []
    if len(images) != pages:
        problems.append(f"{len(images)} page images rendered for {pages} pages")
    if embedded < len(wanted):
        problems.append(f"{embedded} images embedded for the report's {len(wanted)} figures")
    problems += [f"page {w['page']}: {w['word']!r} ends at {w['x_max']:.0f} pt, past the page's {w['width']:.0f} pt"
                 for w in off[:20]]
    if len(off) > 20:
        problems.append(f"... and {len(off) - 20} more words off the page")
    return dict(pdf=str(pdf), pages=pages, embedded_images=embedded, figures=len(wanted),
                page_images=[p.name for p in images], words_off_page=len(off), problems=problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pdf", type=Path, nargs="?", default=Path("report/report.pdf"))
    parser.add_argument("--markdown", type=Path, default=Path("report/report.md"))
    parser.add_argument("--out", type=Path, default=Path("build/report-pdf"))
    args = parser.parse_args(argv)
    for path in (args.pdf, args.markdown):
        if not path.is_file():
            parser.error(f"{path} does not exist; make it first (make report-pdf)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        parser.error(f"poppler's {', '.join(missing)} not on PATH; `make report-pdf` installs Debian's poppler-utils")
    result = check(args.pdf, args.markdown, args.out)
    (args.out / "check.json").write_text(json.dumps(result, indent=1))
    print(f"{args.pdf}: {result['pages']} pages (rendered into {args.out}), {result['embedded_images']} images "
          f"embedded for {result['figures']} figures, {result['words_off_page']} words off the page")
    for problem in result["problems"]:
        print(f"  problem: {problem}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
