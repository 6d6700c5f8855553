"""The environment a measurement was taken in: machine, ISA, libraries, settings, code version.

Saved once per machine (``data/results/environments/<id>.json``); every record names its
environment id, so figures from several machines sit side by side.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
from functools import cache

import psutil
import torch

from utils.paths import REPO

# environment variables that change performance (read at start-up by OpenMP, oneDNN, torch, MKL)
PERF_ENV_PREFIXES = ("OMP_", "KMP_", "GOMP_", "DNNL_", "ONEDNN_", "MKL_", "OPENBLAS_", "TORCHINDUCTOR_",
                     "PYTORCH_", "ACL_", "XNNPACK_")

PERF_ENV_NAMES = ("THP_MEM_ALLOC_ENABLE", "LRU_CACHE_CAPACITY", "LD_PRELOAD", "MALLOC_CONF", "CI")

# CPU flags that decide which kernels run (x86 AVX-512/AMX, Arm SVE/BF16/I8MM)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile",
             "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm", "svebf16", "svei8mm", "sme")

LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "torchao")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_model() -> str:
    info = _cpuinfo()
    for key in ("model name", "Model Name", "Hardware"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", info, re.M)
        if match:
            family = re.search(r"^cpu family\s*:\s*(\d+)$", info, re.M)
            model = re.search(r"^model\s*:\s*(\d+)$", info, re.M)
            # a VM may report only a brand ("AMD EPYC"): the family/model numbers tell the generation
            detail = f" (family {family.group(1)} model {model.group(1)})" if family and model else ""
            return match.group(1).strip() + detail
    part = re.search(r"^CPU part\s*:\s*(\S+)$", info, re.M)  # aarch64 reports a part number, not a name
    implementer = re.search(r"^CPU implementer\s*:\s*(\S+)$", info, re.M)
    if part:
        return f"arm implementer {implementer.group(1) if implementer else '?'} part {part.group(1)}"
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    match = re.search(r"^(flags|Features)\s*:\s*(.+)$", _cpuinfo(), re.M)
    present = set(match.group(2).split()) if match else set()
    return [flag for flag in ISA_FLAGS if flag in present]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _onednn_version() -> str | None:
    match = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    return match.group(1) if match else None


def git_state() -> dict:
    def run(*args):
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit = run("rev-parse", "--verify", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except OSError:
        commit, dirty = "", None
    if not commit:  # a copy without .git (e.g. a lent GPU machine): the caller may name the commit
        return {"commit": os.environ.get("STUDY_GIT_COMMIT"), "dirty": None}
    return {"commit": commit, "dirty": dirty}


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


@cache
def fingerprint(device: str = "cpu") -> dict:
    """Everything about this process's environment that can change a measurement."""
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith(PERF_ENV_PREFIXES) or k in PERF_ENV_NAMES}
    facts = {
        "cpu_model": cpu_model(),
        "arch": platform.machine(),
        "isa_torch": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "torch_build": torch.__version__,
        "onednn": _onednn_version(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "mkl_available": torch.backends.mkl.is_available(),
        "torch_threads_default": torch.get_num_threads(),
        "env": env,
        "device": device_name(device),
        "cuda": torch.version.cuda if device.startswith("cuda") else None,
    }
    if os.environ.get("ARM_QEMU_CPU"):  # set by tools/arm-python.sh: an emulated aarch64 CPU (qemu-user)
        facts |= {"emulated": True, "qemu_cpu": os.environ["ARM_QEMU_CPU"],
                  "arm_profile": os.environ.get("ARM_PROFILE")}
    facts["environment_id"] = environment_id(facts)
    facts["git"] = git_state()
    return facts


def environment_id(facts: dict) -> str:
    """Short, stable id of the machine and software stack (not of the code version or the settings,
    which each record carries itself)."""
    stable = {k: facts[k] for k in ("cpu_model", "arch", "isa_torch", "logical_cpus", "torch_build", "device")}
    # whole GiB: the kernel's reserved memory differs by a few hundred KiB between boots of the same machine type
    stable["memory_gib"] = round(facts["memory_bytes"] / 2**30)
    if facts.get("emulated"):  # never the id of the machine it imitates
        stable["qemu_cpu"] = facts["qemu_cpu"]
    digest = hashlib.sha1(repr(sorted(stable.items())).encode()).hexdigest()[:8]
    name = facts["device"] if facts["device"] != "cpu" else facts["cpu_model"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:32]
    emulated = "qemu-" if facts.get("emulated") else ""
    return f"{facts['arch']}-{emulated}{slug}-{facts['logical_cpus']}c-{digest}"
