"""tools/pdf_check.py's reading of poppler's output: the words set past a page's edge, the figures to embed (the
whole check runs in `make report-pdf`, which installs pandoc, XeLaTeX and poppler)."""
import importlib.util

from utils.paths import REPO

spec = importlib.util.spec_from_file_location("pdf_check", REPO / "tools" / "pdf_check.py")
pdf_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pdf_check)


def test_the_pdf_check_finds_words_past_the_page_s_edge():
    bbox = ('<page width="842.0" height="595.0"><word xMin="10.0" yMin="5.0" xMax="60.0" yMax="15.0">inside</word>'
            '<word xMin="800.0" yMin="5.0" xMax="900.5" yMax="15.0">beyond</word>'
            '<word xMin="800.0" yMin="5.0" xMax="842.5" yMax="15.0">edge</word></page>'
            '<page width="842.0" height="595.0"><word xMin="10.0" yMin="590.0" xMax="60.0" yMax="600.0">below</word>'
            '</page>')
    assert [(w["page"], w["word"]) for w in pdf_check.words_off_page(bbox)] == [(1, "beyond"), (2, "below")]


def test_the_pdf_check_counts_the_report_s_figures():
    markdown = "text ![a](../figures/a.png) and ![b c](../figures/b.png), not [a link](x.html)"
    assert pdf_check.figures_in(markdown) == ["../figures/a.png", "../figures/b.png"]
