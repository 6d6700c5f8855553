"""The HTML report read as a person reads it: opened in a real browser (Debian's Chromium, driven by Playwright),
its first screen saved as an image, every figure checked to have loaded and every table to fit the page.

    python tools/report_check.py [report/report.html] [--out build/report-check] [--width 1280 --height 800]

Exit status 0 when every image loaded and no table is wider than the page, 1 otherwise (each problem named),
2 when the report or the browser is missing. Writes ``first-screen.png`` and ``check.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# what the page says of itself once loaded: each image's source and whether it decoded, each table's right edge
# against the page's width (a table may scroll inside its own box, but its box must fit)
PROBE = """() => ({
  width: document.documentElement.clientWidth,
  images: [...document.images].map(i => ({src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0})),
  tables: [...document.querySelectorAll('table')].map((t, n) => ({
    index: n, right: Math.ceil(t.getBoundingClientRect().right),
    header: (t.querySelector('th') || {}).textContent || ''})),
  first_heading: (document.querySelector('h2') || {}).textContent || ''
})"""


def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def check(report: Path, out: Path, width: int, height: int, executable: str) -> dict:
    from playwright.sync_api import sync_playwright  # installed by `make report-check`

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = chromium.new_page(viewport={"width": width, "height": height})
        page.goto(report.resolve().as_uri(), wait_until="load")
        found = page.evaluate(PROBE)
        page.screenshot(path=str(out / "first-screen.png"))
        chromium.close()
    problems = [f"figure {i['src']} did not load" for i in found["images"] if not i["loaded"]]
    problems += [f"table {t['index'] + 1} (first column {t['header']!r}) is {t['right'] - found['width']} px wider "
                 f"than the page" for t in found["tables"] if t["right"] > found["width"]]
    return dict(found, problems=problems, viewport=[width, height], report=str(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, nargs="?", default=Path("report/report.html"))
    parser.add_argument("--out", type=Path, default=Path("build/report-check"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args(argv)
    if not args.report.is_file():
        parser.error(f"{args.report} does not exist; render it first (make render)")
    executable = browser()
    if executable is None:
        parser.error("no Chromium on PATH; `make report-check` installs Debian's chromium package")
    result = check(args.report, args.out, args.width, args.height, executable)
    (args.out / "check.json").write_text(json.dumps(result, indent=1))
    print(f"{args.report}: {len(result['images'])} figures, {len(result['tables'])} tables, first section "
          f"{result['first_heading']!r}; first screen in {args.out / 'first-screen.png'}")
    for problem in result["problems"]:
        print(f"  problem: {problem}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
