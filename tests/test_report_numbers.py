"""No number is typed in the report: the template holds no digit outside Jinja's tags and a short allowlist of
names, and a report rendered from a store whose values differ from the real ones shows the new values."""
import json
import re
import shutil
from pathlib import Path

import pytest

from utils.measure.results import RESULTS
from utils.report import render as renderer
from utils.report.configured import NOTEBOOKS_DIR
from utils.report.formats import FILTERS

TEMPLATE = renderer.TEMPLATES / renderer.TEMPLATE

# Digits the template may hold, each a name and never a quantity. Everything else numeric comes from a record,
# a notebook's configured parameters or a constant of the code, through a Jinja expression.
ALLOWED = (
    # a name of code, a file, a notebook, a variant or a setting, in backticks (`04_precision_threads_memory`,
    # `_dyn_quant_matmul_4bit`, `opensora/v1.2`, `DNNL_DEFAULT_FPMATH_MODE=BF16`): it has a letter, no space
    (r"`(?=[^`\s]*[A-Za-z])[^`\s]+`", "names of code"),
    # the quantisation schemes by name where the prose sets them in bold (**w8a8_dynamic**, w8_weight_only)
    (r"\bw\d+(?:a\d+)?_\w+", "scheme names"),
    # number formats and data types: the dtype of a tensor is its name, not a measured value
    (r"\b(?:fp32|fp16|bf16|BF16|int8|INT8|int4|float64)\b", "dtypes"),
    # models, chips and architectures by name (OpenSora 1.2's T5-XXL and STDiT3, the H100 GPU, Graviton
    # generations, x86_64 and aarch64); "VAE v1.2" and "OpenSora 1.2" name the upstream release
    (r"\bT5(?:-XXL)?\b|\bSTDiT3\b|\bH100\b|\bGraviton(?:2|3E|3|4)\b|\bx86(?:_64)?\b|\baarch64\b|\bOpenSora 1\.2\b"
     r"|\bv1\.2\b", "product and model names"),
    # units and names of quantities: 2D/3D convolutions and decoders, the L2 norm
    (r"\b[23]D\b|\bL2\b", "units"),
    # a section of a cited document
    (r"\bsection \d+(?:\.\d+)*", "section numbers"),
    # the noise floor's perturbation as a formula: its size e comes from the records, the rest defines it
    (r"`1 \+ e N\(0, 1\)`", "a formula"),
)


def literal_text(template: str) -> str:
    """The template without Jinja's expressions, statements and comments: what it types itself."""
    return re.sub(r"\{#.*?#\}|\{\{.*?\}\}|\{%.*?%\}", " ", template, flags=re.S)


def typed_numbers(template: str) -> list[str]:
    """Each line of the template's own text that still holds a digit once the allowlist is taken out."""
    found = []
    for line in literal_text(template).splitlines():
        rest = line
        for pattern, _why in ALLOWED:
            rest = re.sub(pattern, " ", rest)
        if re.search(r"\d", rest):
            found.append(line.strip())
    return found


def test_template_types_no_number():
    assert typed_numbers(TEMPLATE.read_text()) == []


def test_a_typed_number_is_caught():
    template = TEMPLATE.read_text()
    for planted in ("Seconds of one 30-step video", "CFG 7", "calibration on 2 prompts", "torch 2.9.1",
                    "`w8a8_dynamic` at 0.5", "{{ steps }} steps of 1.5 s", "section two and 10x"):
        assert typed_numbers(template + "\n" + planted + "\n") == [literal_text(planted).strip()], planted
    assert typed_numbers("{# 30 steps #}{{ 30 }}{% if x > 1.05 %}{% endif %}") == []  # Jinja's own text is not typed


# ---- the rendered report follows the store ---------------------------------------------------------------

def _edit_records(path: Path, edit) -> None:
    records = json.loads(path.read_text())
    rows = records if isinstance(records, list) else records["records"]
    for row in rows:
        edit(row)
    path.write_text(json.dumps(records))


def _scale(factor: float, variant: str, metrics: set[str], found: dict):
    """An edit that multiplies the value of the records of ``variant`` with one of ``metrics``; ``found``
    collects the original values by metric (the newest last)."""
    def edit(row):
        if row.get("variant") == variant and row.get("metric") in metrics and row.get("value") is not None:
            found.setdefault((row["metric"], row.get("stage")), []).append(row["value"])
            row["value"] = row["value"] * factor
    return edit


@pytest.fixture(scope="module")
def changed_report(tmp_path_factory):
    """The real store and notebooks copied and changed in several places, rendered without the committed
    figures; returns the rendered markdown and the original values of the changed records."""
    tmp = tmp_path_factory.mktemp("numbers")
    results, notebooks = tmp / "results", tmp / "notebooks"
    shutil.copytree(RESULTS, results)
    shutil.copytree(NOTEBOOKS_DIR, notebooks)
    store = next(p for p in results.iterdir() if (p / "01_baseline.json").is_file())
    original = {}
    # the fp32 step and every derived video time of the baseline, 1.25 times slower
    _edit_records(store / "01_baseline.json", _scale(1.25, "baseline", {"seconds_per_step", "video_seconds"}, original))
    # notebook 06: bf16's speed-up over fp32
    _edit_records(store / "06_int8.json", _scale(1.5, "bf16", {"speedup_vs_fp32"}, original))
    # configured values: notebook 06's calibration prompts and fidelity steps, notebook 03's guidance scale
    for name, changes in (("06_int8", {"calibration_prompts": "7", "fidelity_steps": "9"}),
                          ("03_quality_baseline", {"cfg_scale": "4.5"})):
        path = notebooks / f"{name}.ipynb"
        notebook = json.loads(path.read_text())
        cell = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
        source = "".join(cell["source"])
        for parameter, value in changes.items():
            source, n = re.subn(rf"^{parameter} = [^#\n]*", f"{parameter} = {value}  ", source, flags=re.M)
            assert n == 1, parameter
        cell["source"] = source.splitlines(keepends=True)
        path.write_text(json.dumps(notebook))
    new_md = renderer.render(results_root=results, figures_dir=tmp / "figures", out_dir=tmp / "new",
                             notebooks_dir=notebooks)[0]
    return new_md.read_text(), {key: values[-1] for key, values in original.items()}


def _line(markdown: str, start: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith(start))


def test_report_follows_the_store(changed_report):
    new, original = changed_report
    sig = FILTERS["sig"]
    total = original[("video_seconds", "total")]
    assert sig(total * 1.25) != sig(total)
    assert re.search(r"Derived time of one \d+-step video: \*\*(\S+) s\*\*", new).group(1) == sig(total * 1.25)
    assert f"the one in the baseline section ({sig(total * 1.25)} s, `01_baseline`" in new  # notebook 05's text
    step = original[("seconds_per_step", "denoise")]
    assert _line(new, "| median seconds per call").split("|")[5].strip() == sig(step * 1.25) != sig(step)
    speedup = original[("speedup_vs_fp32", "denoise")]
    assert _line(new, "| bf16 | denoise | bf16 |").split("|")[5].strip() == sig(speedup * 1.5) != sig(speedup)

    # configured values: the notebooks' parameter cells (the real ones: 2 prompts, 2 steps, CFG 7)
    assert "calibration on 7 of the sample prompts" in new
    assert "a short sampling run of 9 steps (configured)" in new
    assert re.search(r"steps, CFG 4\.5:\*\*", new) and not re.search(r"CFG 7\b", new)


def test_numbers_follow_the_code(changed_report):
    new, _ = changed_report
    from utils.report.sections import s03_quality_baseline
    from utils.testbed import synthetic
    bed = s03_quality_baseline.testbed()
    assert bed["combinations"] == len(synthetic.ALL_COMBINATIONS) == bed["shapes"] * bed["colours"] * bed["motions"]
    assert f"a fixed set of the {bed['combinations']} combinations" in new
    assert f"synthetic clips ({synthetic.NUM_FRAMES} frames of {synthetic.SIZE}x{synthetic.SIZE})" in new
