"""The report's scale-out section (notebook ``10_scale_out``), assembled from stored records alone: each parallel
mode measured on this machine against one process on the same cores (step, bytes, communication share, memory,
parity), the fp32 parity check, the counted bytes against the projection's formulas, and the projection to N
Graviton instances with its assumptions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from utils.measure.compare import Spread, verdict
from utils.measure.records import notebook_environment
from utils.report.figures import FigureSpec, ReportInputs, context_label, drawn_from, new_figure, save_figure

NOTEBOOK = "10_scale_out"
PARTS = ("protocol", "parity", "fp32 parity", "formula", "projection")


def notebook_rows(records: pd.DataFrame, primary: str | None) -> tuple[pd.DataFrame, str | None]:
    """Notebook 10's records of one environment (the primary one if it ran the notebook, else the newest that did);
    within it, the newest run of each part."""
    rows, chosen = notebook_environment(records, NOTEBOOK, primary)
    if chosen is None or not len(rows):
        return rows, None
    part = rows["config.part"].fillna("").astype(str)
    return pd.concat([group[group["run_id"] == group["run_id"].iloc[-1]] for _, group in rows.groupby(part)]), chosen


def _part(rows: pd.DataFrame, part: str) -> pd.DataFrame:
    return rows[rows["config.part"] == part] if "config.part" in rows else rows.iloc[:0]


def _get(rows: pd.DataFrame, variant: str, metric: str):
    hit = rows[(rows["variant"] == variant) & (rows["metric"] == metric)]
    return hit.iloc[-1] if len(hit) else None


def _values(row) -> list[float]:
    per_run = row.get("spread.per_run")
    return [float(v) for v in per_run] if isinstance(per_run, (list, tuple, np.ndarray)) else [float(row["value"])]


def measured_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    """One row per run of the protocol: its ranks and threads, the steady step (median and range over launches),
    the speed-up over its one-process baseline with the protocol's verdict, bytes and communication per step,
    memory, and parity with the baseline."""
    protocol = _part(rows, "protocol")
    steps = protocol[protocol["metric"] == "step_seconds"]
    if not len(steps):
        return None
    parity = _part(rows, "parity")
    out = []
    for _, row in steps.iterrows():
        name = row["variant"]
        values = _values(row)
        entry = {"run": name, "mode": row["config.mode"], "videos": int(row["config.videos"]),
                 "step s": row["value"], "min s": min(values), "max s": max(values)}
        baseline = row.get("config.baseline")
        if isinstance(baseline, str) and baseline:
            base = _get(steps, baseline, "step_seconds")
            if base is not None:
                judged = verdict(Spread.of(_values(base)), Spread.of(values))
                entry |= {"speed-up": 1 / judged["ratio"], "verdict": judged["verdict"]}
        for column, metric, scale in (("MB sent/step/rank", "bytes_sent_per_step", 1e-6),
                                      ("comm s/step", "comm_seconds_per_step", 1),
                                      ("comm share", "comm_share", 1),
                                      ("peak GiB/rank", "peak_rss_per_rank", 2**-30),
                                      ("peak GiB, all ranks", "peak_rss_total", 2**-30)):
            hit = _get(protocol, name, metric)
            entry[column] = None if hit is None else hit["value"] * scale
        hit = _get(parity, name, "rel_l2_diff")
        entry["latent rel. L2 vs baseline"] = None if hit is None else hit["value"]
        out.append(entry)
    return pd.DataFrame(out)


def fp32_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    parity = _part(rows, "fp32 parity")
    if not len(parity):
        return None
    table = parity.pivot_table(index="variant", columns="metric", values="value", aggfunc="last")
    return table.reset_index().rename(columns={"variant": "run", "max_abs_diff": "max abs diff",
                                               "rel_l2_diff": "rel. L2 diff"})


def formula_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    formula = _part(rows, "formula")
    if not len(formula):
        return None
    table = formula.pivot_table(index="variant", columns="metric", values="value", aggfunc="last").reset_index()
    return table.rename(columns={"variant": "run", "bytes_counted_per_step": "counted B/step",
                                 "bytes_formula_per_step": "formula B/step"})


def projection_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    projected = _part(rows, "projection")
    if not len(projected):
        return None
    out = []
    for name, group in projected.groupby("variant", sort=False):
        first = group.iloc[0]
        value = {m: g.iloc[-1] for m, g in group.groupby("metric")}
        paying = value["last_paying_instances"]
        out.append({"instance": first["config.instance"], "resolution": first["config.resolution"],
                    "length": first["config.length"], "s/step on one": value["one_instance_step_seconds"]["value"],
                    "last paying N": int(paying["value"]),
                    "cfg x sequence there": f"{int(paying['config.cfg'])} x {int(paying['config.sequence'])}",
                    "s/step there": value["step_seconds_at_last_paying"]["value"],
                    "comm share there": value["comm_share_at_last_paying"]["value"]})
    return pd.DataFrame(out)


def assumptions(rows: pd.DataFrame) -> dict | None:
    projected = _part(rows, "projection")
    if not len(projected):
        return None
    first = projected.iloc[-1]
    return {k.removeprefix("config.assumptions."): first[k] for k in projected.columns
            if k.startswith("config.assumptions.")} | dict(rate_gflops_per_vcpu=first["config.rate_per_vcpu"] / 1e9)


def setting(rows: pd.DataFrame) -> str | None:
    protocol = _part(rows, "protocol")
    if not len(protocol):
        return None
    r = protocol.iloc[0]
    return (f"{r['config.model']}, {r['config.resolution']} {r['config.aspect_ratio']}, {int(r['config.frames'])} "
            f"frames, the loop over {int(r['config.steps'])} steps, steps: {r['config.optimizations'] or 'none'}, "
            f"random weights")


def summary(rows: pd.DataFrame) -> dict:
    """The numbers the notebook ends on: each mode's speed-up and verdict, its communication share, and the
    projection's last paying instance count per setting on the first instance type."""
    measured = measured_table(rows)
    projected = projection_table(rows)
    out = {}
    if measured is not None and "speed-up" in measured:
        out["measured"] = measured.dropna(subset=["speed-up"])[["run", "speed-up", "verdict", "comm share"]]
    if projected is not None:
        out["projected"] = projected
    return out


# ---- figures -----------------------------------------------------------------------------------------------

def measured_figure(rows: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Each run's steady step (every launch a dot, the median a bar) and its communication share."""
    protocol = _part(rows, "protocol")
    steps = protocol[protocol["metric"] == "step_seconds"]
    if not len(steps):
        return None
    figure, (left, right) = new_figure(11.0, 3.8, ncols=2)
    names = list(steps["variant"])
    for i, (_, row) in enumerate(steps.iterrows()):
        left.bar(i, row["value"], color="#9ecae1" if row["config.mode"] == "single" else "#fdae6b")
        values = _values(row)
        left.plot([i] * len(values), values, "k.", markersize=5)
        share = _get(protocol, row["variant"], "comm_share")
        right.bar(i, 0 if share is None else 100 * share["value"], color="#fdae6b")
    for ax in (left, right):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    left.set_ylabel("steady step, s (measured; dots: launches)")
    right.set_ylabel("time inside collectives, % of the step (counted)")
    figure.suptitle("Scale-out on this machine's cores: one process against ranks\n"
                    f"{context_label(steps, environment)}", fontsize=10)
    return save_figure(figure, path)


def projection_figure(rows: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """The projected step against the instance count, per setting, one panel per instance type."""
    projected = _part(rows, "projection")
    curves = projected[projected["metric"] == "step_seconds_curve"]
    if not len(curves):
        return None
    instances = list(dict.fromkeys(curves["config.instance"]))
    figure, axes = new_figure(3.6 * len(instances), 3.8, ncols=len(instances))
    axes = np.atleast_1d(axes)
    for ax, instance in zip(axes, instances):
        for _, row in curves[curves["config.instance"] == instance].iterrows():
            curve = {k: list(row[f"quality.curve.{k}"]) for k in ("instances", "step_s")}
            ax.plot(curve["instances"], curve["step_s"], marker=".", label=f"{row['config.resolution']} "
                                                                             f"{row['config.length']}")
            best = _get(projected, row["variant"], "last_paying_instances")
            if best is not None:
                at = curve["instances"].index(int(best["value"]))
                ax.plot(curve["instances"][at], curve["step_s"][at], "ko", fillstyle="none", markersize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(instance, fontsize=9)
        ax.set_xlabel("instances")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("s per denoising step (projected)")
    axes[0].legend(fontsize=7)
    figure.suptitle("Projected step on N instances (circles: the last instance count that pays)\n"
                    f"compute at the rate measured here, {context_label(projected, environment)}", fontsize=10)
    return save_figure(figure, path)


def _context(inputs: ReportInputs) -> str:
    rows, chosen = notebook_rows(inputs.records, inputs.primary)
    return context_label(_part(rows, "protocol"), inputs.environments.get(chosen))


NOTEBOOKS = (NOTEBOOK,)
FIGURES = {
    "scale_out_measured": FigureSpec(
        "each mode's steady denoising step on this machine's cores against one process with all of them (every "
        "launch a dot), and the share of the step its busiest rank spent inside collectives (measured, counted)",
        drawn_from(notebook_rows, measured_figure), describe=_context),
    "scale_out_projection": FigureSpec(
        "the projected step on N instances of each type per setting: compute at the FLOP rate per vCPU measured "
        "here, traffic from the counted-and-checked formulas at the published bandwidth (projected, not measured)",
        drawn_from(notebook_rows, projection_figure), describe=_context),
}


def section(inputs: ReportInputs) -> dict:
    rows, chosen = notebook_rows(inputs.records, inputs.primary)
    if chosen is None:
        return dict(scale_out=None)
    environment = inputs.environments.get(chosen, {})
    return dict(scale_out=dict(
        environment=environment.get("cpu_model") or chosen, primary=chosen == inputs.primary, setting=setting(rows),
        measured=measured_table(rows), fp32=fp32_table(rows), formula=formula_table(rows),
        projection=projection_table(rows), assumptions=assumptions(rows)))
