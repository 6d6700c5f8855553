"""tools/report_check.py in a real browser: it names a figure that did not load and a table wider than the page.
Needs Chromium and Playwright (`make report-check` installs both; CI runs it before the tests)."""
import shutil
import subprocess
import sys

import pytest

from utils.paths import REPO

pytest.importorskip("playwright")
pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium: make report-check installs it")

PAGE = """<!DOCTYPE html><html><head><style>body {{ margin: 0 }} {css}</style></head><body>
<h2>Summary</h2><img src="{image}"><table><tr><th>wide</th><td style="min-width: 3000px">x</td></tr></table>
</body></html>"""


def _check(tmp_path, image: str, css: str = ""):
    (tmp_path / "page.html").write_text(PAGE.format(image=image, css=css))
    return subprocess.run([sys.executable, str(REPO / "tools" / "report_check.py"), str(tmp_path / "page.html"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)


def test_a_missing_figure_and_a_wide_table_fail(tmp_path):
    done = _check(tmp_path, "missing.png")
    assert done.returncode == 1, done.stderr
    assert "figure missing.png did not load" in done.stdout
    assert "table 1 (first column 'wide') is" in done.stdout and "px wider than the page" in done.stdout
    assert (tmp_path / "out" / "first-screen.png").stat().st_size > 0


def test_the_report_s_own_table_style_keeps_a_wide_table_inside_the_page(tmp_path):
    from utils.report.render import CSS

    png = REPO / "figures" / next(p.name for p in (REPO / "figures").glob("*.png"))
    done = _check(tmp_path, png.as_uri(), CSS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 figures, 1 tables, first section 'Summary'" in done.stdout
