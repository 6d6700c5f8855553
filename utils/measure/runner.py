"""The fresh-process runner: run one task of an experiment module in a new Python process.

Settings that the runtime reads when it starts (oneDNN's fast-math mode, OpenMP binding, the allocator)
only take effect in a new process, and a process's high-water mark of resident memory never goes down,
so experiments that vary them run each variant as a child:

    run_in_fresh_process("utils.experiments.variant_runs:stages", env={"OMP_PROC_BIND": "false"}, threads=2, ...)

spawns ``python -m utils.measure.runner utils.experiments.variant_runs:stages --spec '<json>'`` with that
environment; the child imports the module, runs ``TASKS["stages"](spec)`` and prints the result as one
JSON line, which the parent returns. The runner knows tasks only by that string, so the instrument never
imports the experiments that use it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

import torch

from utils.model.memory import InsufficientMemoryError
from utils.paths import REPO

RESULT_MARKER = "TUNING_RESULT "
# The start-up variables the study varies (experiments.variant_runs.ENV_SETTINGS, the probe's verbose logs, the
# thread count): a child starts from this process's environment without any of them, then gets its own, so a
# setting exported in the shell (the Graviton runbook's, say) never leaks into a baseline. OPENBLAS_* stay: some
# machines need them to compute correctly.
STUDY_VARIABLES = ("DNNL_DEFAULT_FPMATH_MODE", "ONEDNN_DEFAULT_FPMATH_MODE", "LRU_CACHE_CAPACITY",
                   "THP_MEM_ALLOC_ENABLE", "OMP_PROC_BIND", "OMP_PLACES", "OMP_NUM_THREADS", "ONEDNN_VERBOSE",
                   "DNNL_VERBOSE")


def child_environment(env: dict | None, threads: int | None = None) -> dict[str, str]:
    """A fresh process's environment: this one's less ``STUDY_VARIABLES``, plus ``env`` (and ``OMP_NUM_THREADS``
    = ``threads`` unless ``env`` sets it)."""
    child = {k: v for k, v in os.environ.items() if k not in STUDY_VARIABLES}
    if threads:
        child["OMP_NUM_THREADS"] = str(threads)
    return child | {k: str(v) for k, v in (env or {}).items()}


class ChildFailed(RuntimeError):
    pass


def task_function(reference: str):
    """The task ``"<module>:<name>"`` names: ``<module>.TASKS[<name>]``; ValueError naming what is accepted."""
    module_name, _, name = reference.partition(":")
    if not module_name or not name:
        raise ValueError(f"a task is named '<module>:<task>', got {reference!r}")
    tasks = getattr(importlib.import_module(module_name), "TASKS", {})
    if name not in tasks:
        raise ValueError(f"unknown task {name!r} of {module_name}; accepted: {', '.join(tasks)}")
    return tasks[name]


def run_in_fresh_process(task: str, env: dict | None = None, timeout: float | None = None, ranks: int = 1,
                         **spec) -> dict:
    """Run ``task`` ("<module>:<name>") with ``spec`` in a new Python process whose environment is
    ``child_environment(env, spec["threads"])``; return what it reports. With ``ranks`` > 1, torchrun starts that
    many such processes on this machine (``--standalone``: a free port on loopback), each with ``spec["threads"]``
    threads, and rank 0's report comes back. A child killed from outside (e.g. by the kernel's out-of-memory
    killer) comes back as ``{"failed": ...}``; any other failure raises ``ChildFailed`` with the end of its error
    output."""
    task_function(task)  # fails here, naming the accepted tasks, rather than in the child
    child_env = child_environment(env, spec.get("threads"))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    command = [sys.executable, *launcher, "-m", "utils.measure.runner", task, "--spec", json.dumps(spec)]
    done = subprocess.run(command, env=child_env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode < 0:  # killed by a signal
        return {"failed": f"killed by signal {-done.returncode} (out of memory?)", "spec": spec, "env": env or {}}
    # the marker may follow a library's terminal codes on the same line (a progress bar's closing escape sequence)
    lines = [line[line.index(RESULT_MARKER):] for line in done.stdout.splitlines() if RESULT_MARKER in line]
    if done.returncode != 0 or not lines:
        raise ChildFailed(f"`{' '.join(command[:4 + len(launcher)])} ...` exited with {done.returncode}:\n"
                          f"{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_MARKER):]) | {"env": env or {}}


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m utils.measure.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", help="<module>:<task>, a key of the module's TASKS")
    parser.add_argument("--spec", required=True, help="the task's parameters as a JSON object")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    if "threads" in spec:
        torch.set_num_threads(spec["threads"])
    run = task_function(args.task)
    try:
        result = run(spec)
    except InsufficientMemoryError as err:  # a model that cannot fit here: a result, not a crash
        result = dict(refused=str(err))
    seen = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "DNNL_", "ONEDNN_", "STUDY_"))
            or k in ("THP_MEM_ALLOC_ENABLE", "LRU_CACHE_CAPACITY")}
    result |= dict(task=args.task.partition(":")[2], spec=spec, threads_used=torch.get_num_threads(), env_seen=seen,
                   pid=os.getpid())
    sys.stdout.flush()
    if int(os.environ.get("RANK", 0)) == 0:  # one report per run: rank 0's, when torchrun started several ranks
        print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
