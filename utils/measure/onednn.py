"""Which oneDNN kernels run the pipeline's fp32 operations, with and without oneDNN's bf16 fast-math mode.

``task_probe`` runs in a fresh process started by ``utils.experiments.variant_runs`` with ``ONEDNN_VERBOSE=1``
(and the start-up setting under test, e.g. ``DNNL_DEFAULT_FPMATH_MODE=BF16``): for each op it reads oneDNN's
verbose log from the process's own standard output, and compares the result with float64. On x86 an fp32 Linear runs in MKL,
not oneDNN, so fast math cannot touch it; on Graviton the same Linear runs in oneDNN+ACL.
"""
from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from contextlib import contextmanager

import torch

from utils.measure.benchmark import TimingPolicy, measure


def _probe_ops() -> dict:
    """fp32 operations at the pipeline's kinds of shape, small enough to run in a second each:
    name -> (fn, inputs)."""
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    linear = torch.nn.Linear(1152, 4608)  # the transformer's MLP
    conv2d = torch.nn.Conv2d(128, 128, 3, padding=1)  # the 2D VAE decoder
    conv3d = torch.nn.Conv3d(128, 128, 3, padding=1)  # the temporal VAE at 144p (smaller ones skip oneDNN)
    attention = torch.nn.functional.scaled_dot_product_attention
    return {
        "linear": (linear, (randn(1024, 1152),)),
        "matmul": (torch.bmm, (randn(16, 405, 72), randn(16, 72, 405))),
        "conv2d": (conv2d, (randn(1, 128, 72, 128),)),
        "conv3d": (conv3d, (randn(1, 128, 17, 18, 32),)),
        "sdpa": (attention, (randn(1, 16, 405, 72), randn(1, 16, 405, 72), randn(1, 16, 405, 72))),
    }


@contextmanager
def captured_stdout_fd():
    """What native code (oneDNN's verbose log) writes to file descriptor 1 inside the block, as lines."""
    libc = ctypes.CDLL(None)
    lines: list[str] = []
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 1)
        try:
            yield lines
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            scratch.seek(0)
            lines.extend(scratch.read().decode(errors="replace").splitlines())


def parse_onednn_verbose(lines: list[str]) -> list[dict]:
    """The executed primitives of oneDNN verbose lines: kind, implementation, attributes, fpmath."""
    primitives = []
    for line in lines:
        fields = line.split(",")
        if not line.startswith("onednn_verbose") or "exec" not in fields:
            continue
        at = fields.index("exec")
        kind, impl, attrs = fields[at + 2], fields[at + 3], fields[at + 6] if len(fields) > at + 6 else ""
        fpmath = next((a.split(":", 1)[1] for a in attrs.split() if a.startswith("attr-fpmath:")), None)
        primitives.append(dict(kind=kind, impl=impl, fpmath=fpmath, memory=fields[at + 5] if len(fields) > at + 5 else ""))
    return primitives


def task_probe(spec: dict) -> dict:
    """Run each probe op in fp32 under oneDNN's verbose log (``ONEDNN_VERBOSE=1`` set by the parent):
    the primitives it executes, whether they carry ``attr-fpmath:bf16``, whether a bf16 kernel runs,
    its error against float64 (a real bf16 down-conversion raises it from ~1e-7 to ~1e-3) and its time."""

    torch.set_num_threads(spec["threads"])
    results = {}
    with torch.inference_mode():
        for name, (fn, args) in _probe_ops().items():
            fn(*args)  # creates and caches the primitives
            with captured_stdout_fd() as lines:
                out = fn(*args)
            primitives = parse_onednn_verbose(lines)
            double = fn.double() if isinstance(fn, torch.nn.Module) else fn
            reference = double(*(a.double() for a in args))
            if isinstance(fn, torch.nn.Module):
                fn.float()
            error = float((out.double() - reference).norm() / reference.norm())
            timing = measure(fn, *args, policy=TimingPolicy.from_spec(spec, repeats=5).with_(warmup=1))
            compute = [p for p in primitives if p["kind"] != "reorder"]
            results[name] = dict(
                onednn_primitives=len(compute), reorders=len(primitives) - len(compute),
                implementations=sorted({f"{p['kind']} {p['impl']}" for p in compute}),
                fpmath_bf16=sum(p["fpmath"] == "bf16" for p in compute),
                bf16_kernels=sum("bf16" in p["impl"] or ":bf16" in p["memory"] for p in compute),
                rel_err_fp64=error, timing=timing.as_dict())
    return dict(ops=results, torch=torch.__version__, mkldnn=torch.backends.mkldnn.is_available(),
                isa=torch.backends.cpu.get_cpu_capability())
