"""Memory: a peak-RSS monitor for timed stages, and the preflight estimate that refuses settings
which cannot fit before any heavy work starts. The preflight prefers measured footprints
(``data/footprints.json``, written by notebook 04) and falls back to the analytic estimate."""
from __future__ import annotations

import ctypes
import gc
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from torch import nn

from utils.io import GIB, merge_table, nearest_environment, read_table
from utils.paths import DATA

FOOTPRINTS = DATA / "footprints.json"  # measured peak RSS per setting (notebook 04_precision_threads_memory)

# what makes two runs the same for memory: the setting, the precisions, the optimisations, the VAE chunking,
# and whether the components are loaded all at once up front (load_pipeline's default) or each when its
# stage comes (lazy_load: OpenSoraPipeline.__call__ on a pipeline built with load=())
FOOTPRINT_KEY = ("model", "resolution", "aspect_ratio", "frames", "dtype", "text_encoder_dtype", "free_text_encoder",
                 "lazy_load", "optimizations", "micro_batch_size", "micro_frame_size")


class PeakRSS:
    """Context manager sampling this process's resident set size; ``peak`` is the largest seen (bytes)."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.peak = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def module_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of parameters and buffers once materialised in ``dtype`` (works on the meta device)."""
    element = dtype.itemsize
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() for t in tensors) * element


def denoiser_activation_bytes(tokens: int, hidden_size: int, mlp_ratio: float, dtype: torch.dtype,
                              batch: int = 2) -> int:
    """Working set of one STDiT3 block at CFG batch 2: the residual stream and its normalised copies
    (~6 x C), qkv (3 x C) and the MLP hidden (2 x mlp_ratio x C) per token; SDPA's CPU kernel is
    blockwise, so attention adds no N x N matrix."""
    per_token = hidden_size * (6 + 3 + 2 * mlp_ratio)
    return int(batch * tokens * per_token * torch.finfo(dtype).bits // 8)


def vae_decode_activation_bytes(frames: int, height: int, width: int, micro_batch: int, widest_full_res: int,
                                dtype: torch.dtype) -> int:
    """Spatial decode of one micro-batch at full resolution (about five live feature maps of the widest
    full-resolution block), plus the decoded float video."""
    element = torch.finfo(dtype).bits // 8
    feature_maps = 5 * micro_batch * widest_full_res * height * width * element
    video = 3 * frames * height * width * 4
    return feature_maps + video


def return_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS. glibc keeps freed blocks below its
    mmap threshold (which grows to 32 MB as large blocks are freed) in its heap, so after a released
    model the process would otherwise still hold gigabytes that the next model needs."""
    gc.collect()
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


def available_bytes(device: str = "cpu") -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return psutil.virtual_memory().available


class InsufficientMemoryError(MemoryError):
    pass


def check_fits(needed: int, what: str, advice: str, device: str = "cpu", source: str | None = None) -> None:
    """Raise ``InsufficientMemoryError`` when ``needed`` bytes exceed the memory available now on ``device``;
    ``source`` says where ``needed`` came from (a measured footprint or the analytic estimate)."""
    available = available_bytes(device)
    if needed > available:
        raise InsufficientMemoryError(
            f"{what} needs about {needed / GIB:.1f} GiB{f' ({source})' if source else ''} but "
            f"{available / GIB:.1f} GiB is available. {advice}"
        )


# ---- measured footprints ------------------------------------------------------------------------------

def footprint_key(**fields) -> dict:
    """The identity of a measured footprint: exactly the ``FOOTPRINT_KEY`` fields (``optimizations`` a
    string such as "int8_weight_only(component=text_encoder)", "" for none)."""
    missing, unknown = set(FOOTPRINT_KEY) - set(fields), set(fields) - set(FOOTPRINT_KEY)
    if missing or unknown:
        raise ValueError(f"a footprint key needs exactly {', '.join(FOOTPRINT_KEY)}; "
                         f"missing {sorted(missing)}, unknown {sorted(unknown)}")
    return {name: fields[name] for name in FOOTPRINT_KEY}


def load_footprints(path: Path | str = FOOTPRINTS) -> list[dict]:
    """The entries of the footprint table (none when the file does not exist)."""
    return read_table(path)


def measured_footprint(key: dict, path: Path | str = FOOTPRINTS, environment_id: str | None = None,
                       arch: str | None = None) -> dict | None:
    """The entry measured with ``key`` (this environment's if there is one, else the same architecture's,
    else any; among several, the largest peak, to stay on the safe side), or None."""
    matches = nearest_environment([e for e in load_footprints(path) if e["key"] == key], environment_id, arch)
    return max(matches, key=lambda e: e["peak_rss_bytes"]) if matches else None


def store_footprints(entries: list[dict], path: Path | str = FOOTPRINTS) -> None:
    """Add ``entries`` to the table, replacing those with the same environment and key; written whole
    (beside the file, then renamed), so an interrupted run leaves the old table."""
    for entry in entries:
        footprint_key(**entry["key"])  # validates the key
    doc = (f"Measured peak resident memory of whole pipeline runs (notebook 04_precision_threads_memory); "
           f"utils.model.pipeline's memory preflight reads it (keys: {', '.join(FOOTPRINT_KEY)}) and falls back to "
           f"the analytic estimate for settings not in it.")
    merge_table(path, entries, lambda e: (e["environment_id"], json.dumps(e["key"], sort_keys=True)), doc)


def timed(fn, *args, device: str = "cpu", **kwargs):
    """Run ``fn`` once and return (result, seconds, peak RSS bytes); on a GPU the clock is read after
    the device has finished."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize(torch.device(device))

    with PeakRSS() as rss:
        sync()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        sync()
        seconds = time.perf_counter() - start
    return result, seconds, rss.peak
