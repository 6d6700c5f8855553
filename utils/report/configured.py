"""What the notebooks were configured to run, for the values no record stores (a guidance scale, the
calibration prompts, the sampling steps of a fidelity run): each notebook's ``parameters`` cell (literals
only) with its parameter profile from ``notebooks/profiles.json`` over it, as ``python -m utils.notebooks``
hands them to papermill. The profile is the one the notebook's stored run names (``notebook_runs``
records), else ``default``. These numbers are *configured*, not measured."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd

from utils.paths import REPO

NOTEBOOKS_DIR = REPO / "notebooks"
RUNS_NOTEBOOK = "notebook_runs"  # utils.notebooks stores each run's wall time and profile there
DEFAULT_PROFILE = "default"


def parameters_cell(path: Path) -> dict:
    """The literal assignments of the notebook's cell tagged ``parameters`` (empty when it has none)."""
    cells = json.loads(Path(path).read_text())["cells"]
    for cell in cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            out = {}
            for node in ast.parse(source).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        out[node.targets[0].id] = ast.literal_eval(node.value)
                    except ValueError:
                        continue  # not a literal: nothing the report can read
            return out
    return {}


def notebook_parameters(notebook: str, profile: str = DEFAULT_PROFILE, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict:
    """The parameters ``notebook`` runs with under ``profile``: its own cell, with the profile's values for
    the parameters the cell declares (``utils.notebooks`` passes only those)."""
    notebooks_dir = Path(notebooks_dir)
    path = notebooks_dir / f"{notebook}.ipynb"
    if not path.is_file():
        return {}
    cell = parameters_cell(path)
    profiles_path = notebooks_dir / "profiles.json"
    profiles = json.loads(profiles_path.read_text()) if profiles_path.is_file() else {}
    chosen = profiles.get(profile, {})
    overlay = chosen.get("*", {}) | chosen.get(notebook, {})
    return cell | {name: value for name, value in overlay.items() if name in cell}


def profile_of(df: pd.DataFrame, notebook: str) -> str:
    """The profile of the newest stored run of ``notebook`` (``notebook_runs`` records), else ``default``."""
    if "config.profile" not in df.columns:
        return DEFAULT_PROFILE
    runs = df[(df["notebook"] == RUNS_NOTEBOOK) & (df["variant"] == notebook)]["config.profile"].dropna()
    return str(runs.iloc[-1]) if len(runs) else DEFAULT_PROFILE


def configuration(df: pd.DataFrame, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict[str, dict]:
    """Every notebook's configured parameters (notebook stem -> parameters), each under the profile its
    stored run names."""
    notebooks_dir = Path(notebooks_dir)
    if not notebooks_dir.is_dir():
        return {}
    return {path.stem: notebook_parameters(path.stem, profile_of(df, path.stem), notebooks_dir)
            for path in sorted(notebooks_dir.glob("*.ipynb"))}
