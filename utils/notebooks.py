"""Run a study notebook with papermill under a parameter profile (``notebooks/profiles.json``).

    python -m utils.notebooks notebooks/01_baseline.ipynb build/default/01_baseline.ipynb --profile default

The executed copy goes to the output path; the notebook's records go to ``--results`` (default
``data/results``), its figures to ``--figures`` and profiler traces to ``--traces``. A smoke run points
all three into a scratch folder so the stored results are never touched. The run's wall time (papermill's
own, from the executed copy) is stored as the notebook's ``notebook_seconds`` record; ``--record-only``
stores it from an executed copy made earlier on this machine, without running anything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from utils.measure.results import Record, ResultsStore, make_config
from utils.measure.runner import STUDY_VARIABLES
from utils.paths import REPO

PROFILES = REPO / "notebooks" / "profiles.json"

RUNS_NOTEBOOK = "notebook_runs"  # where the notebooks' wall times are stored


def profile_parameters(profile: str, notebook: str) -> dict:
    profiles = json.loads(PROFILES.read_text())
    if profile not in profiles or profile.startswith("_"):
        accepted = ", ".join(p for p in profiles if not p.startswith("_"))
        raise ValueError(f"unknown profile {profile!r}; accepted: {accepted}")
    chosen = profiles[profile]
    return chosen.get("*", {}) | chosen.get(notebook, {})


def run(notebook: Path, output: Path, profile: str, results: str, figures: str, traces: str) -> float:
    """Execute ``notebook`` into ``output``; returns the wall seconds. The kernel starts without the start-up
    variables the study varies (``measure.runner.STUDY_VARIABLES``): each experiment sets its own."""
    import papermill  # slow to import; --record-only and the tests never execute a notebook

    parameters = profile_parameters(profile, notebook.stem) | dict(
        results_root=results, figures_dir=figures, trace_dir=traces)
    accepted = papermill.inspect_notebook(str(notebook))  # the notebook's own parameters cell
    parameters = {name: value for name, value in parameters.items() if name in accepted}
    output.parent.mkdir(parents=True, exist_ok=True)
    Path(figures).mkdir(parents=True, exist_ok=True)
    for name in STUDY_VARIABLES:  # the kernel inherits this process's environment: none of the study's settings
        os.environ.pop(name, None)
    start = time.perf_counter()
    papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name="python3",
                               cwd=str(REPO), progress_bar=True, log_output=False)
    return time.perf_counter() - start


def store_duration(executed: Path, profile: str, results: str):
    """The ``notebook_seconds`` record of an executed copy (papermill's duration and end time in its
    metadata; variant: the notebook's name), stored in ``results`` under ``notebook_runs``; the copy must
    come from this machine."""

    metadata = json.loads(Path(executed).read_text()).get("metadata", {}).get("papermill", {})
    if metadata.get("duration") is None or metadata.get("exception"):
        raise ValueError(f"{executed} has no papermill duration of a completed run")
    name = Path(executed).stem
    record = Record(variant=name, stage="notebook", metric="notebook_seconds", unit="s",
                    value=float(metadata["duration"]), spread={"n": 1},
                    config=make_config(profile=profile, threads=profile_parameters(profile, name).get("threads")),
                    note=f"wall time of the whole notebook (papermill), ended {metadata.get('end_time')}")
    ResultsStore(RUNS_NOTEBOOK, root=results).add(record)  # apart from the notebooks' own records
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.notebooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--results", default="data/results")
    parser.add_argument("--figures", default="figures")
    parser.add_argument("--traces", default="build/traces")
    parser.add_argument("--record-only", action="store_true",
                        help="do not run: store the wall time of the executed copy at OUTPUT")
    args = parser.parse_args(argv)
    try:
        profile_parameters(args.profile, args.notebook.stem)
    except ValueError as err:
        parser.error(str(err))
    if not args.record_only:
        seconds = run(args.notebook, args.output, args.profile, args.results, args.figures, args.traces)
        print(f"{args.notebook.name} ({args.profile}): {seconds:.0f} s -> {args.output}")
    store_duration(args.output, args.profile, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
