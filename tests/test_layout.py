"""The package layout: imports go one way (``utils.imports``'s layers), no cycle, and the checks can fail."""
import shutil
import subprocess
import sys

from utils import imports
from utils.paths import REPO
from utils.report import render
from utils.report.figures import FigureSpec


def test_utils_follows_the_layers_without_cycles():
    graph = imports.import_graph()
    assert {imports.unit(m) for m in graph if m != "utils"} <= set(imports.LAYERS)
    assert imports.violations(graph) == []
    assert imports.cycles(graph) == []


def planted_tree(tmp_path):
    shutil.copytree(REPO / "utils", tmp_path / "utils", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def plant(path, line):
    path.write_text(path.read_text() + f"\n\ndef planted():\n    {line}\n")


def test_a_planted_reverse_import_is_caught(tmp_path):
    root = planted_tree(tmp_path)
    plant(root / "utils/model/video.py", "from utils.report.render import render  # the model reading the report")
    problems = imports.violations(imports.import_graph(root))
    assert problems == ["utils.model.video -> utils.report.render: layer model (1) may not import report (4)"]


def test_peer_layers_may_not_import_each_other(tmp_path):
    root = planted_tree(tmp_path)
    plant(root / "utils/report/figures.py", "from utils.experiments import variant_runs")
    plant(root / "utils/optim/precision.py", "import utils.measure.benchmark")
    problems = imports.violations(imports.import_graph(root))
    assert problems == ["utils.optim.precision -> utils.measure.benchmark: layer optim (2) may not import measure (2)",
                        "utils.report.figures -> utils.experiments.variant_runs: layer report (4) may not import "
                        "experiments (4)"]


def test_a_planted_cycle_is_caught(tmp_path):
    root = planted_tree(tmp_path)
    plant(root / "utils/model/aspect.py", "from utils.model.pipeline import VideoSetting")
    found = imports.cycles(imports.import_graph(root))
    assert found and all(c[0] == c[-1] for c in found)
    assert any("utils.model.aspect" in c and "utils.model.pipeline" in c for c in found)


def test_the_command_line_check_fails_on_a_violation(tmp_path):
    root = planted_tree(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "utils.imports", "check"], cwd=root, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    plant(root / "utils/testbed/synthetic.py", "from utils.experiments import e06_int8")
    bad = subprocess.run([sys.executable, "-m", "utils.imports", "check"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 1 and "utils.testbed.synthetic -> utils.experiments.e06_int8" in bad.stdout


def test_notebook_dependencies_follow_imports_and_leave_out_the_report():
    files = {str(f) for f in imports.notebook_files(REPO / "notebooks/05_attention.ipynb")}
    assert {"utils/experiments/e05_attention.py", "utils/optim/rewrites.py", "utils/model/pipeline.py"} <= files
    assert not any(f.startswith("utils/report/") for f in files)
    baseline = {str(f) for f in imports.notebook_files(REPO / "notebooks/01_baseline.ipynb")}
    assert "utils/measure/stages.py" in baseline and "utils/optim/quantize.py" not in baseline
    rules = imports.make_deps()
    assert "build/$(PROFILE)/06_int8.ipynb: " in rules and "utils/optim/quantize.py" in rules


def test_every_report_section_has_the_one_interface():
    modules = {p.stem for p in (REPO / "utils/report/sections").glob("*.py") if p.stem != "__init__"}
    assert {m.__name__.rsplit(".", 1)[1] for m in render.SECTIONS} == modules  # none left out of the report
    names = [name for m in render.SECTIONS for name in m.FIGURES]
    assert len(names) == len(set(names))  # a figure file belongs to one section
    for module in render.SECTIONS:
        assert module.NOTEBOOKS and all(isinstance(n, str) for n in module.NOTEBOOKS), module.__name__
        assert all(isinstance(spec, FigureSpec) for spec in module.FIGURES.values()), module.__name__
        assert callable(module.section), module.__name__


def test_every_numbered_notebook_has_its_experiment_and_section_module():
    for notebook in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        number, name = notebook.stem.split("_", 1)
        used = {m for m in imports.notebook_imports(notebook, set(imports.import_graph()))}
        assert f"utils.report.sections.s{number}_{name}" in used, notebook.name
        experiment = REPO / f"utils/experiments/e{number}_{name}.py"
        if experiment.exists():  # the reading notebooks (9x) have no experiment of their own
            assert f"utils.experiments.e{number}_{name}" in used, notebook.name
        else:
            assert number.startswith("9"), f"{notebook.name} measures without utils/experiments/e{number}_{name}.py"
