"""The report's step-caching section (notebook ``07_step_caching``), assembled from stored records alone: the
mini model's adherence and fidelity against the work each variant does, TeaCache's polynomials, the real-size
seconds per video, and the answer to "caching or fewer steps?", chosen from the records by code."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from utils.measure.compare import Spread, verdict
from utils.measure.records import notebook_environment, select
from utils.optim.caching import TEACACHE_OPENSORA
from utils.report.figures import FigureSpec, ReportInputs, context_label, new_figure, save_figure

NOTEBOOK = "07_step_caching"
BASELINE = "none"  # the method of the uncached run


def notebook_rows(records: pd.DataFrame, primary: str | None) -> tuple[pd.DataFrame, str | None]:
    """Notebook 07's records of one environment: the primary one if it ran the notebook, else the newest
    that did (the section names its CPU); within it, the newest run of each experiment part."""
    rows, chosen = notebook_environment(records, NOTEBOOK, primary)
    if chosen is None:
        return rows, None
    parts = []
    for _, part in rows.groupby(rows["stage"].isin(["denoise"]) & (rows["config.model"] != "mini"), sort=False):
        parts.append(part[part["run_id"] == part["run_id"].iloc[-1]])
    return pd.concat(parts), chosen


def _mini(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["config.model"] == "mini"]


def _value(rows: pd.DataFrame, variant: str, metric: str, split: str | None = "all"):
    hit = rows[(rows["variant"] == variant) & (rows["metric"] == metric)]
    if split is not None and "config.split" in hit:
        hit = hit[hit["config.split"] == split]
    return hit.iloc[-1] if len(hit) else None


def _number(rows: pd.DataFrame, variant: str, metric: str, split: str | None = "all"):
    hit = _value(rows, variant, metric, split)
    return None if hit is None else hit["value"]


def curve_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    """One row per mini-model variant: method, setting, evaluations, FLOP-weighted equivalents, adherence with
    its paired difference and margin, and the fidelity against the uncached clips."""
    mini = _mini(rows)
    variants = list(dict.fromkeys(mini.loc[mini["metric"] == "adherence_difference", "variant"]))
    if not variants:
        return None
    out = []
    for variant in variants:
        difference = _value(mini, variant, "adherence_difference")
        evaluations = _value(mini, variant, "evaluations")
        margin = float(difference["spread.margin"])
        within = difference["value"] >= -margin
        entry = {"variant": variant, "method": difference["config.method"],
                 "evaluations (mean, measured)": evaluations["value"],
                 "range": f"{int(evaluations['spread.min'])}-{int(evaluations['spread.max'])}",
                 "FLOP-weighted evaluations (derived)": _number(mini, variant, "evaluation_equivalents"),
                 "all-correct, both splits": _number(mini, variant, "adherence_all_correct"),
                 "train": _number(mini, variant, "adherence_all_correct", "train"),
                 "held out": _number(mini, variant, "adherence_all_correct", "held_out"),
                 "difference (paired)": difference["value"], "margin (two SE)": margin,
                 "verdict": "within the margin" if within else "loses adherence"}
        for metric, name in (("psnr", "PSNR dB"), ("ssim", "SSIM"), ("flicker_ratio", "flicker ratio")):
            entry[name] = _number(mini, variant, metric)
        out.append(entry)
    return pd.DataFrame(out)


def equal_work(table: pd.DataFrame) -> pd.DataFrame | None:
    """Each cache that keeps adherence, against fewer steps at the same work: its PSNR and the PSNR of the
    fewer-steps runs interpolated linearly at its FLOP-weighted evaluations (derived; only inside the range of
    the fewer-steps runs measured, the uncached run excluded as its PSNR is infinite)."""
    cost = "FLOP-weighted evaluations (derived)"
    fewer = table[table["method"] == "fewer steps"].dropna(subset=["PSNR dB"]).sort_values(cost)
    caches = table[~table["method"].isin(["fewer steps", BASELINE]) & (table["verdict"] == "within the margin")]
    if len(fewer) < 2 or caches.empty:
        return None
    low, high = fewer[cost].min(), fewer[cost].max()
    rows = []
    for _, row in caches.sort_values(cost).iterrows():
        if not low <= row[cost] <= high or pd.isna(row["PSNR dB"]):
            continue
        reference = float(np.interp(row[cost], fewer[cost], fewer["PSNR dB"]))
        rows.append({"cache": row["variant"], cost: row[cost], "cache PSNR dB (measured)": row["PSNR dB"],
                     "fewer steps PSNR dB at the same work (interpolated)": reference,
                     "gain dB (derived)": row["PSNR dB"] - reference})
    return pd.DataFrame(rows) if rows else None


def choice(table: pd.DataFrame) -> dict | None:
    """The answer to "caching or fewer steps?" on two counts: on adherence, the cheapest variant (FLOP-weighted)
    that keeps it within the margin among the caches and among the fewer-steps runs; on fidelity to the uncached
    video, how many of those caches beat fewer steps at the same work (``equal_work``)."""
    if table is None:
        return None
    cost = "FLOP-weighted evaluations (derived)"
    kept = table[(table["verdict"] == "within the margin") & (table["method"] != BASELINE)]
    caches = kept[kept["method"] != "fewer steps"].sort_values(cost)
    fewer = kept[kept["method"] == "fewer steps"].sort_values(cost)
    if caches.empty and fewer.empty:
        return dict(best=None)
    best_cache = caches.iloc[0].to_dict() if len(caches) else None
    best_fewer = fewer.iloc[0].to_dict() if len(fewer) else None
    if best_cache is None or (best_fewer is not None and best_fewer[cost] <= best_cache[cost]):
        winner = "fewer steps"
    else:
        winner = "caching"
    matched = equal_work(table)
    fidelity = None if matched is None else dict(
        table=matched, better=int((matched["gain dB (derived)"] > 0).sum()), of=len(matched),
        best=matched.sort_values("gain dB (derived)").iloc[-1].to_dict())
    return dict(best=best_cache, fewer=best_fewer, winner=winner, cost=cost, fidelity=fidelity)


def coefficients(rows: pd.DataFrame) -> pd.DataFrame | None:
    """The published OpenSora polynomial and the mini model's fit, highest power first."""
    fit = rows[(rows["stage"] == "calibration") & rows["metric"].str.startswith("coefficient_")]
    if fit.empty:
        return None
    powers = sorted({int(m.rsplit("_", 1)[1]) for m in fit["metric"]}, reverse=True)
    mini = {int(r["metric"].rsplit("_", 1)[1]): r["value"] for _, r in fit.iterrows()}
    published = dict(zip(range(len(TEACACHE_OPENSORA) - 1, -1, -1), TEACACHE_OPENSORA))
    first = fit.iloc[-1]
    return pd.DataFrame({"power": [str(p) for p in powers],
                         "published (TeaCache's OpenSora fit)": [published.get(p) for p in powers],
                         "mini model fit (measured pairs)": [mini[p] for p in powers]}).assign(
        pairs=str(int(first["spread.n"])), **{"rms residual of the fit": first["spread.rms_residual"]})


def speed_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    """Real-size seconds per video per variant, the counts, the cache's bytes and the ratio to the uncached run."""
    real = rows[(rows["config.model"] != "mini") & (rows["stage"] == "denoise")]
    seconds = real[(real["metric"] == "seconds") & (real["variant"] != "teacache check")]
    if seconds.empty:
        return None
    base = seconds[seconds["config.method"] == BASELINE]
    base_s = float(base["value"].iloc[-1]) if len(base) else None
    base_runs = Spread.of(base["spread.per_run"].iloc[-1]) if len(base) else None
    out = []
    for _, row in seconds.iterrows():
        evaluations = real[(real["variant"] == row["variant"]) & (real["metric"] == "evaluations")]
        cache = real[(real["variant"] == row["variant"]) & (real["metric"] == "cache_bytes")]
        entry = {"variant": row["variant"], "method": row["config.method"],
                 "steps": str(int(row["config.sampling_steps"])),
                 "evaluations (counted)": str(int(evaluations["value"].iloc[-1])) if len(evaluations) else None,
                 "s per video (measured)": row["value"], "runs": str(int(row["spread.n"])),
                 "min-max s": f"{row['spread.min']:.3g}-{row['spread.max']:.3g}",
                 "s per step, min-max": f"{row['spread.step_min']:.3g}-{row['spread.step_max']:.3g}",
                 "cache MiB (counted)": cache["value"].iloc[-1] / 2**20 if len(cache) else None}
        if base_s:
            entry["speed-up (derived)"] = base_s / row["value"]
            runs = Spread.of(row["spread.per_run"])
            entry["verdict"] = ("baseline" if row["config.method"] == BASELINE else
                                verdict(base_runs, runs)["verdict"] if min(len(runs.values), len(base_runs.values)) > 1
                                else "not ranked: one run each")
        out.append(entry)
    return pd.DataFrame(out)


def real_setting(rows: pd.DataFrame) -> str | None:
    """"<model>, <resolution> <aspect ratio>, <frames> frames, <dtype>, <threads> threads" of the real-size rows."""
    real = rows[(rows["config.model"] != "mini") & (rows["metric"] == "seconds")]
    if real.empty:
        return None
    row = real.iloc[-1]
    return (f"{row['config.model']}, {row['config.resolution']} {row['config.aspect_ratio']}, "
            f"{int(row['config.frames'])} frames, {row['config.dtype']}, {int(row['config.threads'])} threads")


def check_cost(rows: pd.DataFrame) -> dict | None:
    hit = rows[(rows["variant"] == "teacache check") & (rows["metric"] == "seconds")]
    if hit.empty:
        return None
    row = hit.iloc[-1]
    return dict(seconds=row["value"], tokens=row.get("config.tokens"), n=int(row["spread.n"]))


def noise_floor(records: pd.DataFrame, rows: pd.DataFrame) -> dict[str, float]:
    """The mini model's fidelity noise floor of notebook 03 for the same weights: PSNR of a run with the
    transformer's weights perturbed by a known relative amount against the unperturbed run (newest per amount)."""
    weights = set(_mini(rows)["config.mini_weights"].dropna()) if "config.mini_weights" in rows else set()
    floor = select(records, notebook="03_quality_baseline", stage="noise_floor", metric="psnr")
    floor = floor[(floor["config.model"] == "mini") & floor["variant"].str.startswith("weights")]
    if weights and "config.mini_weights" in floor:
        floor = floor[floor["config.mini_weights"].isin(weights)]
    return {variant: float(group["value"].iloc[-1]) for variant, group in floor.groupby("variant")}


def curve_figure(rows: pd.DataFrame, path, environment: dict | None = None,
                 floor: dict[str, float] | None = None) -> Path | None:
    """All-correct adherence (both splits) and PSNR against FLOP-weighted evaluations, one line per method,
    the paired margin as error bars around the uncached run's level; ``floor`` (``noise_floor``) marks the PSNR
    of known weight perturbations."""
    table = curve_table(rows)
    if table is None:
        return None
    cost = "FLOP-weighted evaluations (derived)"
    figure, (left, right) = new_figure(11.0, 4.2, ncols=2)
    base = table[table["method"] == BASELINE]
    for method, group in table.groupby("method", sort=False):
        if method == "fewer steps":  # the uncached run is the last point of the fewer-steps line
            group = pd.concat([group, base])
        group = group.sort_values(cost)
        style = dict(marker="o", label=method, linestyle="-" if method != BASELINE else "none")
        left.errorbar(group[cost], group["all-correct, both splits"], yerr=group["margin (two SE)"], capsize=3, **style)
        finite = group[group["PSNR dB"].notna()]
        right.plot(finite[cost], finite["PSNR dB"], **style)
    if len(base):
        level, margin = base["all-correct, both splits"].iloc[0], table["margin (two SE)"].max()
        left.axhline(level, color="grey", linewidth=0.8, linestyle="--")
        left.axhspan(level - margin, level + margin, color="grey", alpha=0.12)
    for label, psnr in (floor or {}).items():
        right.axhline(psnr, color="grey", linewidth=0.8, linestyle=":")
        right.annotate(f"noise floor: {label} (notebook 03)", (0.01, psnr), xycoords=("axes fraction", "data"),
                       fontsize=7, color="grey", va="bottom")
    left.set_xlabel("transformer work per video (full evaluations, FLOP-weighted; derived)")
    left.set_ylabel("all-correct adherence (measured)")
    right.set_xlabel("transformer work per video (full evaluations, FLOP-weighted; derived)")
    right.set_ylabel("PSNR against the uncached clip, dB (measured)")
    left.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    mini = _mini(rows)
    figure.suptitle(f"Mini model: adherence and fidelity against transformer work, per caching method\n"
                    f"{context_label(mini, environment)}", fontsize=10)
    return save_figure(figure, path)


def _draw_curve(inputs: ReportInputs, path) -> Path | None:
    rows, chosen = notebook_rows(inputs.records, inputs.primary)
    if chosen is None:
        return None
    return curve_figure(rows, path, environment=inputs.environments.get(chosen),
                        floor=noise_floor(inputs.records, rows))


def _curve_context(inputs: ReportInputs) -> str:
    rows, chosen = notebook_rows(inputs.records, inputs.primary)
    return context_label(_mini(rows), inputs.environments.get(chosen))


NOTEBOOKS = (NOTEBOOK,)
FIGURES = {
    "caching_curve": FigureSpec(
        "the trained mini model's all-correct adherence (both splits) and PSNR against the uncached clip, against "
        "the FLOP-weighted transformer work per video, per caching method and fewer steps (measured; the work is "
        "derived from counted calls); dotted: the PSNR of runs with the transformer's weights perturbed, notebook "
        "03's noise floor", _draw_curve, describe=_curve_context),
}


def section(inputs: ReportInputs) -> dict:
    rows, chosen = notebook_rows(inputs.records, inputs.primary)
    if chosen is None:
        return dict(caching=None)
    table = curve_table(rows)
    mini = _mini(rows)
    base = mini[(mini["metric"] == "adherence_difference") & (mini["config.method"] == BASELINE)]
    clips = base.iloc[-1] if len(base) else None
    environment = inputs.environments.get(chosen, {})
    return dict(caching=dict(
        environment=environment.get("cpu_model") or chosen, primary=chosen == inputs.primary,
        curve=table, choice=choice(table), coefficients=coefficients(rows), speed=speed_table(rows),
        real_setting=real_setting(rows),
        check=check_cost(rows), clips=int(clips["spread.n"]) if clips is not None else None,
        configured=inputs.configured.get(NOTEBOOK)))
