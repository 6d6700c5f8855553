"""Timing a callable the way the study reports it: the first call apart, warm-up, repeats, median and
spread, a fixed thread count, and a check that no other process used the CPU during each timed window
(on a shared 2-core machine a busy neighbour slows a run 2-4x; see the project's x86 notes)."""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import psutil
import torch

from utils.model.memory import PeakRSS, return_freed_memory

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """Cores' worth of CPU used by *other* processes between ``start()`` and ``stop()``:
    busy jiffies of the whole machine (/proc/stat) minus this process's own (/proc/self/stat)."""

    @staticmethod
    def _machine_busy() -> int:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle

    @staticmethod
    def _own_busy() -> int:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._machine0, self._own0 = self._machine_busy(), self._own_busy()

    def stop(self) -> float:
        elapsed = time.perf_counter() - self._t0
        other = (self._machine_busy() - self._machine0) - (self._own_busy() - self._own0)
        return max(other, 0) / CLOCK_TICKS / max(elapsed, 1e-9)


@contextmanager
def num_threads(threads: int | None):
    """Run with exactly ``threads`` intra-op threads (None: leave as is), restoring the old count."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


@dataclass
class Timing:
    """Seconds of one callable: the first call alone, then ``repeats`` timed calls after ``warmup``."""

    first_s: float
    times_s: list[float]
    warmup: int
    threads: int
    device: str
    other_cpu: list[float] = field(default_factory=list)  # other processes' cores during each timed call
    busy_retries: int = 0
    peak_rss_bytes: int | None = None
    peak_device_bytes: int | None = None
    busy_threshold: float = 0.15
    result: object = field(default=None, repr=False, compare=False)  # what the last timed call returned

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def iqr_s(self) -> float:
        if len(self.times_s) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q3 - q1

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def max_s(self) -> float:
        return max(self.times_s)

    @property
    def quiet(self) -> bool:
        """True when no timed window saw other processes above the threshold used."""
        return not self.other_cpu or max(self.other_cpu) <= self.busy_threshold

    def spread(self) -> dict:
        return dict(n=len(self.times_s), iqr=self.iqr_s, min=self.min_s, max=self.max_s,
                    first=self.first_s, warmup=self.warmup, other_cpu_max=max(self.other_cpu, default=0.0),
                    busy_retries=self.busy_retries)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "result"} | dict(median_s=self.median_s,
                                                                                 iqr_s=self.iqr_s)


@dataclass(frozen=True)
class TimingPolicy:
    """How a callable is timed: ``warmup`` calls first (the first of them timed on its own), then ``repeats``
    timed calls on ``threads`` intra-op threads (None: as set). A timed call during which other processes
    used more than ``busy_threshold`` cores is thrown away and retried after ``busy_wait_s``, at most
    ``busy_retries`` times per call (a call still busy then is kept and flagged). Notebooks build one from
    their parameters and hand it to every measurement."""

    warmup: int = 1
    repeats: int = 5
    threads: int | None = None
    busy_retries: int = 3
    busy_threshold: float = 0.15
    busy_wait_s: float = 5.0

    def __post_init__(self):
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if self.warmup < 0 or self.busy_retries < 0:
            raise ValueError(f"warmup and busy_retries must be at least 0, got {self.warmup}, {self.busy_retries}")

    def with_(self, **changes) -> "TimingPolicy":
        """The same policy with ``changes`` (e.g. ``repeats=1``)."""
        return replace(self, **changes)

    def to_spec(self) -> dict:
        """The policy as a fresh-process task's JSON spec carries it (``from_spec`` reads it back)."""
        return dict(warmup=self.warmup, repeats=self.repeats, threads=self.threads, busy_retries=self.busy_retries)

    @classmethod
    def from_spec(cls, spec: dict, **defaults) -> "TimingPolicy":
        """The policy a fresh-process task's JSON spec carries (keys ``warmup``, ``repeats``, ``threads``,
        ``busy_retries``), ``defaults`` for keys it lacks."""
        fields = {k: spec[k] for k in ("warmup", "repeats", "threads", "busy_retries") if k in spec}
        return cls(**(defaults | fields))


def measure(fn, *args, policy: TimingPolicy = TimingPolicy(), device: str = "cpu", **kwargs) -> Timing:
    """Time ``fn(*args, **kwargs)`` under ``policy``.

    The first call is timed on its own (packing, compilation, caches) and also serves as a warm-up;
    ``warmup - 1`` more untimed calls follow, then ``repeats`` timed calls, each checked for other
    processes' CPU use (``TimingPolicy``). Peak resident memory over all calls is recorded, and on CUDA
    the peak allocated bytes; the clock is read after synchronising the device.
    """
    watch = CpuWatch()
    with num_threads(policy.threads), PeakRSS() as rss:
        used_threads = torch.get_num_threads()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(torch.device(device))
        synchronize(device)
        start = time.perf_counter()
        fn(*args, **kwargs)
        synchronize(device)
        first = time.perf_counter() - start
        for _ in range(max(policy.warmup - 1, 0)):
            fn(*args, **kwargs)
        synchronize(device)
        times, other, retries = [], [], 0
        for _ in range(policy.repeats):
            for attempt in range(policy.busy_retries + 1):
                watch.start()
                start = time.perf_counter()
                result = fn(*args, **kwargs)
                synchronize(device)
                elapsed = time.perf_counter() - start
                busy = watch.stop()
                if busy <= policy.busy_threshold or attempt == policy.busy_retries:
                    break
                retries += 1
                time.sleep(policy.busy_wait_s)
            times.append(elapsed)
            other.append(busy)
        peak_device = (torch.cuda.max_memory_allocated(torch.device(device))
                       if device.startswith("cuda") else None)
    return Timing(first_s=first, times_s=times, warmup=policy.warmup, threads=used_threads, device=device,
                  other_cpu=other, busy_retries=retries, peak_rss_bytes=rss.peak, peak_device_bytes=peak_device,
                  busy_threshold=policy.busy_threshold, result=result)


def measure_with_memory(fn, *args, policy: TimingPolicy = TimingPolicy(), **kwargs) -> tuple[Timing, int]:
    """``measure`` under inference mode, plus the peak RSS increase over the resident set just before it
    (the call's working set; the Timing's own peak is the whole process's)."""
    return_freed_memory()
    before = psutil.Process().memory_info().rss
    with torch.inference_mode():
        timing = measure(fn, *args, policy=policy, **kwargs)
    return timing, timing.peak_rss_bytes - before
