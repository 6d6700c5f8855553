"""The import graph of ``utils/``: the layering rule its sub-packages follow, and which files each notebook
runs (the Makefile's notebook dependencies). Standard library only, so ``make`` can run it before the
project's environment exists.

    python -m utils.imports check          # exit 1 listing every import against the layers, and any cycle
    python -m utils.imports make-deps      # make rules: each notebook's executed copy <- the files it runs

Layers, lowest first; a module imports only from lower layers or from its own sub-package:

    io, paths, fingerprint, imports                 shared helpers
    model                                           OpenSora 1.2 as upstream runs it
    optim | measure                                 the optimisation ladder | the instrument (neither imports the other)
    testbed | parallel                              the quality testbed | denoising over several processes
    experiments | report                            what notebooks run | what the report shows (neither imports
                                                    the other)
    generate, notebooks                             command lines
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"shared": 0, "model": 1, "optim": 2, "measure": 2, "testbed": 3, "parallel": 3, "experiments": 4, "report": 4, "cli": 5}
# the top-level modules, by unit
TOP_LEVEL = {"io": "shared", "paths": "shared", "fingerprint": "shared", "imports": "shared", "generate": "cli",
             "notebooks": "cli"}
# what a notebook's code is: the report's modules only show a notebook's records, so changing them reruns none
NOT_RUN_BY_NOTEBOOKS = ("report",)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer unit of a module: ``utils.model.vae`` -> ``model``, ``utils.io`` -> ``shared``."""
    name = module.split(".")[1] if "." in module else module
    return TOP_LEVEL.get(name, name)


def imported_modules(source: str, known: set[str]) -> set[str]:
    """The ``utils`` modules that ``source`` imports, at any depth of the code (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                and node.module.split(".")[0] == "utils"):
            candidates = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {c for c in candidates if c in known} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "utils"}
    return {m for m in found if m in known}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``utils`` module -> the ``utils`` modules it imports (packages' ``__init__`` included)."""
    paths = {module_name(p, root): p for p in sorted((root / "utils").rglob("*.py"))}
    known = set(paths)
    return {name: imported_modules(path.read_text(), known) - {name} for name, path in paths.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from the same or a higher layer in another sub-package."""
    problems = []
    for module, imports in sorted(graph.items()):
        if module == "utils":
            continue
        for target in sorted(imports):
            source_unit, target_unit = unit(module), unit(target)
            if target == "utils" or source_unit == target_unit:
                continue
            if source_unit not in LAYERS or target_unit not in LAYERS:
                problems.append(f"{module} -> {target}: {source_unit if source_unit not in LAYERS else target_unit} "
                                f"is in no layer (utils.imports.LAYERS)")
            elif LAYERS[target_unit] >= LAYERS[source_unit]:
                problems.append(f"{module} -> {target}: layer {source_unit} ({LAYERS[source_unit]}) may not import "
                                f"{target_unit} ({LAYERS[target_unit]})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among the modules (each once, as the path that closes it)."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def notebook_imports(notebook: Path, known: set[str]) -> set[str]:
    cells = json.loads(Path(notebook).read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return imported_modules("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))),
                            known)


def notebook_files(notebook: Path, root: Path = ROOT) -> list[Path]:
    """The ``utils`` files a notebook runs: the modules it imports and everything they import, the
    report's modules left out (``NOT_RUN_BY_NOTEBOOKS``)."""
    graph = import_graph(root)
    runs = lambda m: unit(m) not in NOT_RUN_BY_NOTEBOOKS  # noqa: E731
    todo = [m for m in notebook_imports(notebook, set(graph)) if runs(m)]
    seen = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        seen |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in graph}  # packages
        todo += [m for m in graph[module] if runs(m) and m not in seen]
    files = []
    for module in sorted(seen):
        path = root.joinpath(*module.split("."))
        files.append(path / "__init__.py" if path.is_dir() else path.with_suffix(".py"))
    return [f.relative_to(root) for f in files if f.is_file()]


def make_deps(root: Path = ROOT) -> str:
    lines = ["# generated by `python -m utils.imports make-deps`: each notebook's executed copy depends on the",
             "# utils files it runs (utils.imports.notebook_files)"]
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        files = " ".join(str(f) for f in notebook_files(notebook, root))
        lines.append(f"build/$(PROFILE)/{notebook.name}: {files}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["check"]:
        graph = import_graph()
        problems = violations(graph) + [" -> ".join(c) + ": import cycle" for c in cycles(graph)]
        print("\n".join(problems) or f"{len(graph)} modules, imports follow the layers, no cycle")
        return 1 if problems else 0
    if argv == ["make-deps"]:
        sys.stdout.write(make_deps())
        return 0
    print(f"usage: python -m utils.imports check|make-deps; got {' '.join(argv) or 'nothing'}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
