"""The report's environment section (notebook ``00_environment``): the machines in the store and the
measured GEMM and memory-bandwidth ceilings."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from utils.measure.ceilings import GEMM_DTYPES
from utils.measure.records import one_environment, select
from utils.report.figures import FigureSpec, ReportInputs, context_label, new_figure, save_figure
from utils.report.formats import text

# ---- figures ------------------------------------------------------------------------------------------

def ceilings(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Measured GEMM rate per dtype against thread count, one line per shape, with the ceiling."""
    df = one_environment(df)
    rates = select(df, stage="gemm", metric="gflops").drop_duplicates(
        ["variant", "config.shape", "config.threads"], keep="last")
    if rates.empty:
        return None
    ceiling = select(df, stage="gemm", metric="gflops_ceiling").drop_duplicates(
        ["variant", "config.threads"], keep="last")
    dtypes = [d for d in GEMM_DTYPES if d in set(rates["variant"])] + sorted(set(rates["variant"]) - set(GEMM_DTYPES))
    figure, axes = new_figure(4.0 * len(dtypes), 3.8, len(dtypes))
    for ax, dtype in zip(axes, dtypes):
        for shape, rows in select(rates, variant=dtype).groupby("config.shape", sort=True):
            rows = rows.sort_values("config.threads")
            ax.plot(rows["config.threads"], rows["value"], marker="o", label=str(shape))
        top = select(ceiling, variant=dtype).sort_values("config.threads")
        if not top.empty:
            ax.plot(top["config.threads"], top["value"], "k--", linewidth=2, label="ceiling (best shape, derived)")
        ax.set(title=dtype, xlabel="threads", ylabel=select(rates, variant=dtype)["unit"].iloc[0])
        ax.set_xticks(sorted(set(select(rates, variant=dtype)["config.threads"].astype(int))))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(f"GEMM rate at the transformer's shapes (measured)\n{context_label(rates, environment)}",
                    fontsize=10)
    return save_figure(figure, path)


HARDWARE_FIELDS = [  # (label, getter, format)
    ("CPU model", lambda e: e.get("cpu_model"), "text"),
    ("arch", lambda e: e.get("arch"), "text"),
    ("torch ISA", lambda e: e.get("isa_torch"), "text"),
    ("CPU flags", lambda e: " ".join(e.get("cpu_flags") or []) or None, "text"),
    ("logical CPUs", lambda e: e.get("logical_cpus"), "integer"),
    ("usable CPUs", lambda e: e.get("usable_cpus"), "integer"),
    ("memory (GiB)", lambda e: e.get("memory_bytes"), "gib"),
    ("torch", lambda e: e.get("torch_build"), "text"),
    ("oneDNN", lambda e: e.get("onednn"), "text"),
    ("OS", lambda e: e.get("os"), "text"),
    ("Python", lambda e: e.get("python"), "text"),
    ("performance env vars", lambda e: " ".join(f"{k}={v}" for k, v in (e.get("env") or {}).items()) or None, "text"),
    ("device", lambda e: e.get("device"), "text"),
    ("commit at last record", lambda e: (e.get("git") or {}).get("commit"), "text"),
    ("uncommitted changes", lambda e: (e.get("git") or {}).get("dirty"), "text"),
]


def _hardware(environments: dict, primary: str | None) -> dict | None:
    if not environments:
        return None
    ids = sorted(environments, key=lambda i: (i != primary, i))
    rows = [dict(label=label, format=format, cells=[get(environments[i]) for i in ids])
            for label, get, format in HARDWARE_FIELDS]
    return dict(columns=[f"{i} (primary)" if i == primary else i for i in ids], rows=rows)


def _ceilings(df: pd.DataFrame) -> dict | None:
    rates = select(df, stage="gemm", metric="gflops").drop_duplicates(
        ["variant", "config.shape", "config.threads"], keep="last")
    tops = select(df, stage="gemm", metric="gflops_ceiling").drop_duplicates(["variant", "config.threads"], keep="last")
    bandwidth = select(df, stage="memory", metric="gbs").drop_duplicates(["config.threads"], keep="last")
    if rates.empty and tops.empty and bandwidth.empty:
        return None
    ceiling_rows = []
    order = {d: i for i, d in enumerate(GEMM_DTYPES)}
    tops = tops.assign(order=tops["variant"].map(lambda v: order.get(v, len(order))))
    for _, top in tops.sort_values(["order", "variant", "config.threads"]).iterrows():
        shapes = select(rates, variant=top["variant"], **{"config.threads": top["config.threads"]})
        best = shapes.loc[shapes["value"].idxmax(), "config.shape"] if not shapes.empty else None
        ceiling_rows.append({"dtype": top["variant"], "threads": top["config.threads"], "ceiling": top["value"],
                             "unit": top["unit"], "best shape": best, "kind": top["kind"]})
    gemm = pd.DataFrame(ceiling_rows, columns=["dtype", "threads", "ceiling", "unit", "best shape", "kind"])
    copy = pd.DataFrame({"threads": bandwidth["config.threads"], "copy GB/s": bandwidth["value"],
                         "kind": bandwidth["kind"]}).sort_values("threads")
    return dict(gemm=gemm if len(gemm) else None, bandwidth=copy if len(copy) else None,
                shapes=", ".join(sorted({text(s) for s in rates["config.shape"].dropna()})))


# ---- the section's interface (utils.report.render) ----------------------------------------------------

NOTEBOOKS = ("00_environment",)
FIGURES = {
    "ceilings": FigureSpec.of_records(ceilings, "GEMM rate per dtype and thread count (measured) with the per-dtype "
                                                "ceiling (derived)", shows=dict(stage="gemm")),
}


def section(inputs: ReportInputs) -> dict:
    return dict(hardware=_hardware(inputs.environments, inputs.primary), ceilings=_ceilings(inputs.df))
