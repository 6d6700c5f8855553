"""What notebook ``00_environment`` runs: the machine's measured ceilings, the matrix-multiply rate at the
transformer's real shapes per dtype and thread count (``measure.ceilings.gemm_rate``) and the memory copy
bandwidth, each stored as records."""
from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from utils.measure.benchmark import TimingPolicy
from utils.measure.ceilings import copy_bandwidth, gemm_rate
from utils.measure.results import Record, ResultsStore, make_config


def gemm_ceilings(store: ResultsStore, shapes: dict[str, tuple[int, int, int]], dtypes: list[str],
                  thread_counts: list[int], policy: TimingPolicy) -> pd.DataFrame:
    """Measure ``a @ b`` at each (M, K, N) of ``shapes`` per dtype and thread count and store each rate, and per
    dtype and thread count the best of them as the ceiling (derived); returns the table of measured rates."""
    rows = []
    for threads in tqdm(thread_counts, desc="threads"):
        for dtype in dtypes:
            unit = "GOP/s" if dtype == "int8" else "GFLOP/s"
            best = None
            for name, (m, k, n) in shapes.items():
                timing, rate = gemm_rate((m, k, n), dtype, policy.with_(threads=threads))
                store.add(Record(variant=dtype, stage="gemm", metric="gflops", unit=unit, value=rate,
                                 spread=timing.spread() | {"median_s": timing.median_s},
                                 config=make_config(threads=threads, dtype=dtype, shape=name, mkn=[m, k, n])))
                rows.append(dict(threads=threads, dtype=dtype, shape=name, rate=rate, quiet=timing.quiet,
                                 median_ms=timing.median_s * 1e3, iqr_ms=timing.iqr_s * 1e3))
                best = rate if best is None else max(best, rate)
            store.add(Record(variant=dtype, stage="gemm", metric="gflops_ceiling", unit=unit, value=best,
                             kind="derived", config=make_config(threads=threads, dtype=dtype),
                             note="best median over the transformer's GEMM shapes"))
    return pd.DataFrame(rows)


def bandwidth(store: ResultsStore, thread_counts: list[int], size_bytes: int, policy: TimingPolicy) -> pd.DataFrame:
    """Measure and store the copy bandwidth (GB/s, read plus write) of ``size_bytes`` per thread count."""
    rows = []
    for threads in thread_counts:
        timing, rate = copy_bandwidth(policy.with_(threads=threads), size_bytes=size_bytes)
        store.add(Record(variant="copy", stage="memory", metric="gbs", unit="GB/s", value=rate,
                         spread=timing.spread(), config=make_config(threads=threads, bytes=size_bytes)))
        rows.append(dict(threads=threads, gbs=rate, quiet=timing.quiet))
    return pd.DataFrame(rows)
