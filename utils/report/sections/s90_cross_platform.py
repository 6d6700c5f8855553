"""Cross-platform comparison from stored records only: every platform's per-video times at the same
settings, our H100 against upstream's published H100 table, projections for Graviton instances no one
has measured yet, and cost per video from an editable price table (``data/prices.csv``)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from utils.io import GIB
from utils.measure.instances import INSTANCE_VCPUS, smallest_instance
from utils.measure.records import in_environment
from utils.paths import DATA, UPSTREAM
from utils.report.figures import FigureSpec, ReportInputs, new_figure, save_figure, short

PUBLISHED_H100 = UPSTREAM / "opensora_v1_2_published_h100.json"

PRICES = DATA / "prices.csv"

TIMING_NOTEBOOKS = ("01_baseline", "80_gpu_bench")

DEFAULT_GEMM_EFFICIENCY = 0.8  # assumed share of a Graviton's theoretical fp32 peak that a tuned GEMM reaches

# Graviton instances for the projection: cores, the SIMD FP32 FLOP per cycle per core and the clock,
# from shared/reference/graviton-pytorch.md section 3 (AWS Graviton getting-started README table; the
# FLOP/cycle is derived there from the pipe count, assuming one FMA per pipe per cycle).
GRAVITON = {
    "c7g.16xlarge": dict(generation="Graviton3", cores=64, flop_per_cycle_fp32=32, ghz=2.6),
    "c8g.16xlarge": dict(generation="Graviton4", cores=64, flop_per_cycle_fp32=32, ghz=2.8),
    "c8g.24xlarge": dict(generation="Graviton4", cores=96, flop_per_cycle_fp32=32, ghz=2.8),
    "m7g.16xlarge": dict(generation="Graviton3", cores=64, flop_per_cycle_fp32=32, ghz=2.6),
    "c6g.16xlarge": dict(generation="Graviton2", cores=64, flop_per_cycle_fp32=16, ghz=2.5),
}


def platform_name(environment: dict) -> str:
    if environment.get("device", "cpu") != "cpu":
        return environment["device"]
    return f"{environment['cpu_model']}, {environment['arch']}"


def video_times(records: pd.DataFrame, environments: dict[str, dict]) -> pd.DataFrame:
    """Derived per-video seconds per stage and in total, one row per (platform, variant, setting, stage),
    from the CPU baseline and the GPU bench."""
    rows = records[records.notebook.isin(TIMING_NOTEBOOKS) & (records.metric == "video_seconds")]
    if rows.empty:
        return pd.DataFrame(columns=["platform", "environment_id", "variant", "dtype", "text_encoder_dtype",
                                     "resolution", "frames", "steps", "stage", "seconds", "kind"])
    out = pd.DataFrame({
        "platform": [platform_name(environments.get(e, {"device": e})) for e in rows.environment_id],
        "environment_id": rows.environment_id, "variant": rows.variant, "dtype": rows["config.dtype"],
        "text_encoder_dtype": rows["config.text_encoder_dtype"], "resolution": rows["config.resolution"],
        "frames": rows["config.frames"].astype(int), "steps": rows["config.steps"].astype(int),
        "stage": rows.stage, "seconds": rows.value, "kind": rows.kind,
    })
    return out.reset_index(drop=True)


def totals(times: pd.DataFrame) -> pd.DataFrame:
    """One row per platform set-up and setting: total derived seconds of one video."""
    keys = ["platform", "environment_id", "variant", "dtype", "text_encoder_dtype", "resolution", "frames", "steps"]
    return times[times.stage == "total"][keys + ["seconds"]].sort_values(["resolution", "frames", "seconds"])


def published_h100() -> pd.DataFrame:
    cases = json.loads(PUBLISHED_H100.read_text())["cases"]
    return pd.DataFrame(cases)


def against_published(records: pd.DataFrame, environments: dict[str, dict]) -> pd.DataFrame:
    """Our GPU set-up that matches upstream's inference script (T5 fp32, model bf16) against upstream's
    published H100 times at the same resolution and frame count (30 steps both)."""
    gpu = totals(video_times(records, environments))
    gpu = gpu[(gpu.variant == "upstream") & gpu.platform.str.contains("H100")]
    measured = records[(records.notebook == "80_gpu_bench") & (records.metric == "measured_video_seconds")]
    published = published_h100()
    rows = []
    for row in gpu.itertuples():
        match = published[(published.resolution == row.resolution) & (published.frames == row.frames)]
        if match.empty:
            continue
        complete = measured[(measured.variant == row.variant) & (measured["config.resolution"] == row.resolution)
                            & (measured["config.frames"] == row.frames)]
        rows.append(dict(resolution=row.resolution, frames=row.frames, duration=match.duration.iloc[0],
                         ours_derived_s=row.seconds,
                         ours_measured_s=complete.value.iloc[0] if not complete.empty else None,
                         upstream_published_s=float(match.seconds.iloc[0]),
                         ratio_ours_over_upstream=row.seconds / float(match.seconds.iloc[0])))
    return pd.DataFrame(rows)


def prices() -> pd.DataFrame:
    with open(PRICES) as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))]
    table = pd.DataFrame(rows)
    table["usd_per_hour"] = table.usd_per_hour.astype(float)
    return table


def cost_per_video(table: pd.DataFrame, price_table: pd.DataFrame) -> pd.DataFrame:
    """Seconds x hourly price for every row of ``table`` (platform, seconds) whose platform has a price: a row of
    the price table, or for an instance name a priced size of its family (``family_price``); ``price`` says which."""
    merged = table.merge(price_table, left_on="platform", right_on="platform", how="inner").assign(price="price table")
    derived = []
    for _, row in table[~table.platform.isin(price_table.platform)].iterrows():
        if re.fullmatch(r"[a-z0-9]+\.[a-z0-9]+", str(row.platform)):
            usd, source = family_price(price_table, row.platform)
            if usd is not None:
                derived.append(dict(row, instance=row.platform, usd_per_hour=usd, price=source))
    if derived:
        merged = pd.concat([merged, pd.DataFrame(derived)], ignore_index=True)
    merged["usd_per_video"] = merged.seconds * merged.usd_per_hour / 3600
    return merged


def graviton_projection(records: pd.DataFrame, environment_id: str, gemm_efficiency: float = DEFAULT_GEMM_EFFICIENCY,
                        instances: dict[str, dict] = GRAVITON) -> pd.DataFrame:
    """Projected fp32 per-video seconds of the CPU baseline's setting on Graviton instances.

    Per stage: time = FLOPs per video / (ceiling fraction measured here x the instance's fp32 GEMM
    ceiling), where the instance's ceiling = cores x FLOP/cycle x GHz x ``gemm_efficiency`` (the share
    of its theoretical peak a tuned GEMM reaches: an assumption) and the ceiling fraction is the
    stage's achieved GFLOP/s over this machine's measured fp32 GEMM ceiling at the same thread count.
    Assumes perfect scaling with cores and the same kernel efficiency on Arm: a projection, to be
    replaced by measurements."""
    mine = in_environment(records, environment_id)
    base = mine[(mine.notebook == "01_baseline") & (mine.variant == "baseline")]
    if base.empty:
        return pd.DataFrame()
    threads = int(base["config.threads"].iloc[0])
    ceilings = mine[(mine.metric == "gflops_ceiling") & (mine.variant == "fp32") & (mine["config.threads"] == threads)]
    if ceilings.empty:
        return pd.DataFrame()
    ceiling_here = float(ceilings.value.iloc[0])
    steps = int(base["config.steps"].iloc[0])
    rows = []
    for stage in ("encode_prompt", "denoise", "decode"):
        flops = base[(base.stage == stage) & (base.metric == "flops")]
        achieved = base[(base.stage == stage) & (base.metric == "gflops")]
        if flops.empty or achieved.empty:
            continue
        per_video = float(flops.value.iloc[0]) * (steps if stage == "denoise" else 1)
        fraction = float(achieved.value.iloc[0]) / ceiling_here
        for name, spec in instances.items():
            ceiling = spec["cores"] * spec["flop_per_cycle_fp32"] * spec["ghz"] * gemm_efficiency
            rows.append(dict(instance=name, generation=spec["generation"], stage=stage, flops_per_video=per_video,
                             ceiling_fraction_here=fraction, instance_gemm_gflops=ceiling,
                             projected_seconds=per_video / (fraction * ceiling * 1e9)))
    projection = pd.DataFrame(rows)
    if projection.empty:
        return projection
    projection["resolution"] = base["config.resolution"].iloc[0]
    projection["frames"] = int(base["config.frames"].iloc[0])
    projection["steps"] = steps
    return projection


def notebook_times(records: pd.DataFrame, environment_id: str, projected: pd.DataFrame) -> pd.DataFrame:
    """Each study notebook's measured wall time here (default profile) and, per Graviton instance, that
    time scaled by the instance's projected baseline video time over the baseline video time measured
    here: a projection that assumes every notebook's work scales like the baseline video's compute."""
    here = in_environment(records, environment_id)
    mine = here[here["metric"] == "notebook_seconds"]
    mine = mine[mine.get("config.profile", pd.Series(index=mine.index, dtype=object)) == "default"]
    base = here[(here.notebook == "01_baseline") & (here.variant == "baseline") & (here.stage == "total")
                & (here.metric == "video_seconds")]
    if mine.empty:
        return pd.DataFrame()
    mine = mine.sort_values("time").drop_duplicates("variant", keep="last").sort_values("variant")
    table = pd.DataFrame({"notebook": mine.variant.values, "measured here s": mine.value.values})
    if not base.empty and not projected.empty:
        here = float(base.sort_values("time").value.iloc[-1])
        for row in projected.itertuples():
            table[f"{row.platform} s (projected)"] = table["measured here s"] * row.seconds / here
    return table


def summary(records: pd.DataFrame, environments: dict[str, dict], environment_id: str | None,
            gemm_efficiency: float = DEFAULT_GEMM_EFFICIENCY) -> dict:
    """Everything the report's cross-platform section shows: totals per platform set-up, the comparison
    with upstream's published H100 times, the Graviton projection (per instance) and costs per video."""
    table = totals(video_times(records, environments))
    projection = graviton_projection(records, environment_id, gemm_efficiency) if environment_id else pd.DataFrame()
    projected = pd.DataFrame(columns=["platform", "seconds", "kind"])
    if not projection.empty:
        projected = (projection.groupby(["instance", "generation", "resolution", "frames", "steps"], as_index=False)
                     .projected_seconds.sum().rename(columns={"instance": "platform", "projected_seconds": "seconds"})
                     .assign(kind="projected"))
    costs = cost_per_video(pd.concat([table.assign(kind="derived from measured"), projected], ignore_index=True),
                           prices())
    return dict(totals=table, published=against_published(records, environments), projection=projection,
                projected=projected, costs=costs, gemm_efficiency=gemm_efficiency,
                notebooks=notebook_times(records, environment_id, projected) if environment_id else pd.DataFrame())


# ---- cost per video of notebook 08's recipes --------------------------------------------------------

COST_FAMILIES = ("c7g", "m7g", "r7g")  # Graviton3: the same chip, 2, 4 and 8 GiB per vCPU
GRAVITON3 = "c7g.16xlarge"  # the projection's Graviton3 entry (GRAVITON): 64 cores, all three families
LARGEST = "16xlarge"
COST_ASSUMPTIONS = (
    "faithful's seconds on a Graviton3 16xlarge are notebook 90's fp32 projection of notebook 01's baseline (counted "
    "FLOPs over the share of the fp32 GEMM ceiling reached on the primary environment, times the instance's fp32 "
    "peak and the assumed GEMM efficiency); a recipe divides them by its speed-up over faithful measured here, "
    "assumed to carry over (bf16: Graviton3's BFMMLA gives 2-4x its fp32 peak, int8: SMMLA 4-8x, by the "
    "Graviton notes' section 3.2, against AVX-512 BF16 and VNNI here; TeaCache's skipped steps carry over "
    "exactly); smaller sizes scale with the vCPU count (perfect scaling); the smallest size is the first whose "
    "usable memory holds the recipe's measured peak")


def size_vcpus(size: str) -> int | None:
    """vCPUs of an EC2 size by the naming rule (large 2, xlarge 4, Nxlarge 4N; medium 1), or None."""
    if size in INSTANCE_VCPUS:
        return INSTANCE_VCPUS[size]
    match = re.fullmatch(r"(\d+)xlarge", size)
    return 4 * int(match.group(1)) if match else None


def family_price(prices: pd.DataFrame, instance: str) -> tuple[float | None, str]:
    """The hourly price of ``instance`` and where it comes from: its own row of the price table, else the newest
    priced size of its family scaled by the vCPU count (EC2 prices scale linearly with size within a family),
    else None."""
    rows = prices[prices["instance"] == instance]
    if len(rows):
        return float(rows["usd_per_hour"].iloc[0]), "price table"
    family, size = instance.split(".")
    names = prices["instance"].astype(str).str.split(" ").str[0]
    family_rows = prices[names.str.startswith(f"{family}.") & names.str.split(".").str[1].map(size_vcpus).notna()]
    if family_rows.empty or size_vcpus(size) is None:
        return None, "no sourced price"
    row = (family_rows.sort_values("date", kind="stable") if "date" in family_rows else family_rows).iloc[-1]
    other = str(row["instance"]).split(" ")[0]
    return float(row["usd_per_hour"]) / size_vcpus(other.split(".")[1]) * size_vcpus(size), \
        f"derived from {other} (linear in vCPUs)"


def recipe_costs(table: pd.DataFrame | None, projection: pd.DataFrame, h100: pd.DataFrame,
                 prices: pd.DataFrame, baseline: str = "faithful") -> pd.DataFrame | None:
    """Dollars per video of each recipe of notebook 08's summary ``table`` (projected) on the smallest c7g, m7g
    and r7g that holds its peak and on the 16xlarge (``COST_ASSUMPTIONS``), beside the H100 rows of the GPU bench
    at the same setting (derived from measured stage times) with each H100 price."""
    if table is None or projection.empty:
        return None
    graviton3 = projection[projection["instance"] == GRAVITON3]["projected_seconds"].sum()
    largest = INSTANCE_VCPUS[LARGEST]
    out = []
    for _, row in table.iterrows():
        speed_up = 1.0 if row["recipe"] == baseline else row["speed-up over faithful"]
        if speed_up is None or not np.isfinite(speed_up):
            continue
        for family in COST_FAMILIES:
            fits = smallest_instance(row["peak GiB"] * GIB, family)
            sizes = dict.fromkeys([fits["instance"]] if fits else []) | {f"{family}.{LARGEST}": None}
            for instance in sizes:
                vcpus = INSTANCE_VCPUS[instance.split(".")[1]]
                seconds = graviton3 * largest / vcpus / speed_up
                price, priced = family_price(prices, instance)
                out.append({"recipe": row["recipe"], "platform": instance, "kind": "projected",
                            "s per video": seconds, "usd per hour": price,
                            "usd per video": None if price is None else seconds * price / 3600, "price": priced})
    for _, row in h100.iterrows():
        out.append({"recipe": f"{row['variant']} (GPU bench)", "platform": f"H100, {row['instance']}",
                    "kind": "derived from measured", "s per video": row["seconds"], "usd per hour": row["usd_per_hour"],
                    "usd per video": row["usd_per_video"], "price": "price table"})
    return pd.DataFrame(out) if out else None


# name -> (function, what the figure shows); the report draws them all in this order
def cross_platform_figure(totals: pd.DataFrame, projection: pd.DataFrame, path) -> Path | None:
    """Seconds per video of every platform set-up (derived from measured records) at each setting,
    with the Graviton projections (hatched) at the CPU baseline's setting. Log scale."""
    if totals.empty:
        return None
    bars = [(f"{r.platform}\n{r.variant} ({r.dtype}, T5 {r.text_encoder_dtype})", f"{r.resolution} {r.frames}f",
             r.seconds, False) for r in totals.itertuples()]
    steps = {f"{r.resolution} {r.frames}f": set() for r in totals.itertuples()}
    for r in totals.itertuples():
        steps[f"{r.resolution} {r.frames}f"].add(int(r.steps))
    if projection is not None and not projection.empty:
        per_instance = projection.groupby(["instance", "generation", "resolution", "frames"], as_index=False)
        for r in per_instance.projected_seconds.sum().itertuples():
            bars.append((f"{r.instance} ({r.generation})\nfp32, projected", f"{r.resolution} {r.frames}f",
                         r.projected_seconds, True))
    settings = sorted({b[1] for b in bars}, key=lambda s: (int(s.split("p")[0]), s))
    figure, axes = new_figure(5.5 * len(settings), 0.9 + 0.45 * max(sum(b[1] == s for b in bars) for s in settings),
                           len(settings))
    for ax, setting in zip(axes, settings):
        chosen = sorted([b for b in bars if b[1] == setting], key=lambda b: b[2])
        for i, (label, _, seconds, projected) in enumerate(chosen):
            ax.barh(i, seconds, color="tab:gray" if projected else "tab:blue", hatch="//" if projected else None)
            ax.annotate(f"{short(seconds)} s", (seconds, i), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)
        ax.set_yticks(range(len(chosen)), [b[0] for b in chosen], fontsize=7)
        ax.set_xscale("log")
        counts = "/".join(str(n) for n in sorted(steps.get(setting, ())))
        ax.set(title=f"{setting}, {counts} steps" if counts else setting, xlabel="seconds per video")
        ax.grid(axis="x", alpha=0.3)
    figure.suptitle("Seconds per video by platform: derived from measured stage times (solid), "
                    "projected (hatched); random weights", fontsize=10)
    return save_figure(figure, path)


def _cross_platform(xp: dict) -> dict | None:
    """Tables of the cross-platform section (None when no platform has per-video times)."""
    if xp["totals"].empty:
        return None
    totals = xp["totals"].rename(columns={"text_encoder_dtype": "T5 dtype", "seconds": "seconds per video"})
    projection = None
    if not xp["projection"].empty:
        projection = (xp["projection"].pivot_table(index=["instance", "generation"], columns="stage",
                                                   values="projected_seconds")
                      .assign(total=lambda d: d.sum(axis=1)).reset_index())
    costs = None
    if not xp["costs"].empty:
        costs = xp["costs"][["platform", "instance", "variant", "resolution", "frames", "seconds", "kind",
                             "usd_per_hour", "unit", "usd_per_video", "price"]]
    return dict(totals=totals.drop(columns=["environment_id"]), steps=sorted({int(s) for s in xp["totals"]["steps"]}),
                published=None if xp["published"].empty else xp["published"],
                projection=projection, costs=costs, gemm_efficiency=xp["gemm_efficiency"],
                fractions=None if xp["projection"].empty else
                xp["projection"].drop_duplicates("stage").assign(tflop=lambda d: d.flops_per_video / 1e12)
                [["stage", "ceiling_fraction_here", "tflop"]]
                .rename(columns={"ceiling_fraction_here": "fraction of the fp32 GEMM ceiling here (derived)",
                                 "tflop": "TFLOP per video (counted)"}),
                price_sources=prices()[["platform", "instance", "usd_per_hour", "unit", "source",
                                                       "date", "note"]],
                notebooks=None if xp["notebooks"].empty else xp["notebooks"])


# ---- the section's interface (utils.report.render) ----------------------------------------------------

NOTEBOOKS = ("90_cross_platform", "01_baseline", "80_gpu_bench")


def _draw(inputs: ReportInputs, path) -> Path | None:
    xp = summary(inputs.records, inputs.environments, inputs.primary)
    return cross_platform_figure(xp["totals"], xp["projection"], path)


FIGURES = {
    "cross_platform": FigureSpec("seconds per video by platform, derived from measured stage times (solid) or "
                                 "projected (hatched)", _draw, context="every platform in the store"),
}


def section(inputs: ReportInputs) -> dict:
    return dict(xp=_cross_platform(summary(inputs.records, inputs.environments, inputs.primary)))
