"""The comparison protocol: how the study ranks variants on a noisy shared machine.

Two calls in one process share that process's luck (its memory layout, its page cache, the neighbours of
that minute), so their spread understates how much a rerun moves. Every variant that a notebook ranks is
therefore run in ``processes`` (at least 3) fresh processes, in interleaved order (A B C A B C ...), so a
slow spell of the machine falls on every variant alike; each process reports its own median. Per variant
the study keeps every process's value, their median and their range (the between-process spread).

A variant differs from the baseline only when the two ranges of process values do not overlap *and* the
ratio of the medians differs from 1 by more than ``threshold`` (a floor for differences too small to
matter); anything else is "no measurable difference"::

    runs = run_interleaved({"fp32": (task, env, spec), "bf16": ...}, processes=3)
    spread = {name: Spread.of([value(r) for r in results]) for name, results in runs.items()}
    verdict(spread["fp32"], spread["bf16"])   # {"ratio": 0.31, "verdict": "faster", ...}
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from tqdm.auto import tqdm

from utils.measure.runner import run_in_fresh_process

MIN_PROCESSES = 3

DEFAULT_THRESHOLD = 0.03  # differences under 3 % are not reported as gains or losses, even outside the spread

FASTER, SLOWER, SAME = "faster", "slower", "no measurable difference"


def interleaved_order(names: list[str], processes: int) -> list[tuple[int, str]]:
    """(round, name) in run order: every name once per round, rounds one after another (A B C A B C ...)."""
    if processes < MIN_PROCESSES:
        raise ValueError(f"a comparison needs at least {MIN_PROCESSES} fresh processes per variant, got {processes}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"a comparison needs distinct variant names, got {list(names)}")
    return [(round_, name) for round_ in range(processes) for name in names]


def run_interleaved(runs: dict[str, tuple | Callable[[int], tuple]], processes: int = MIN_PROCESSES,
                    runner: Callable[..., dict] = run_in_fresh_process,
                    desc: str = "processes") -> dict[str, list[dict]]:
    """Run every ``{name: (task, env, spec)}`` ``processes`` times, each run a fresh process (``runner``,
    default ``runner.run_in_fresh_process``), in interleaved order; a value may instead be a function of the
    round giving the tuple (e.g. outputs kept in the first round only). Returns name -> the results in run
    order, each with ``round`` and ``position`` (its place in the whole sequence) added."""
    order = interleaved_order(list(runs), processes)
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for position, (round_, name) in enumerate(tqdm(order, desc=desc, unit="process")):
        task, env, spec = runs[name](round_) if callable(runs[name]) else runs[name]
        results[name].append(runner(task, env=env, **spec) | dict(round=round_, position=position))
    return results


@dataclass(frozen=True)
class Spread:
    """One variant's value in each fresh process, their median and range."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values) -> "Spread":
        values = tuple(float(v) for v in values)
        if not values:
            raise ValueError("a spread needs at least one process's value")
        return cls(values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def relative_range(self) -> float:
        """(max - min) / median: the between-process spread as a fraction."""
        return (self.high - self.low) / self.median

    def as_dict(self) -> dict:
        """As a record's ``spread``: every process's value, the process count, min, max and relative range."""
        return dict(n_processes=len(self.values), per_process=list(self.values), min=self.low, max=self.high,
                    relative_range=self.relative_range)


def verdict(baseline: Spread, variant: Spread, threshold: float = DEFAULT_THRESHOLD,
            lower_is_better: bool = True) -> dict:
    """``variant`` against ``baseline``: ratio of the medians (variant / baseline), whether the process
    ranges overlap, and the verdict: "faster"/"slower" (for times; ``lower_is_better=False`` for rates) only
    when the ranges are apart and the ratio is more than ``threshold`` from 1, else "no measurable difference"."""
    ratio = variant.median / baseline.median
    apart = variant.high < baseline.low or variant.low > baseline.high
    if not apart or abs(ratio - 1) <= threshold:
        outcome = SAME
    else:
        outcome = FASTER if (ratio < 1) == lower_is_better else SLOWER
    return dict(ratio=ratio, ranges_overlap=not apart, threshold=threshold,
                baseline_range=baseline.relative_range, variant_range=variant.relative_range, verdict=outcome)
