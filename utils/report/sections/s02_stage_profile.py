"""The report's stage-profile section (notebook ``02_stage_profile``): operator classes per stage, the
denoiser by module group, achieved GFLOP/s against the ceilings, scaling with tokens, the ranked
bottlenecks."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.ticker import NullFormatter, ScalarFormatter

from utils.measure import profiling, records
from utils.measure.ceilings import GEMM_DTYPES
from utils.measure.profiling import OP_CLASSES
from utils.measure.records import (
    baseline_rows,
    ceiling_fractions,
    newest_setting,
    one_environment,
    pixels_of,
    same,
    select,
    value_of,
)
from utils.model.pipeline import STAGES
from utils.report.figures import (
    FigureSpec,
    ReportInputs,
    context_label,
    label_text,
    new_figure,
    save_figure,
    setting_label,
    short,
)
from utils.report.formats import kinds_of, text
from utils.report.sections.s01_baseline import stage_video_seconds

MODULE_GROUPS = ("spatial_attn", "temporal_attn", "cross_attn", "mlp", "embedders", "final_layer", "other")


def op_classes(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Stacked bars: each stage's operator self time split by op class (measured, torch.profiler)."""
    rows = newest_setting(select(one_environment(df), metric="self_share"))
    if rows.empty:
        return None
    table = rows.pivot_table(index="stage", columns="variant", values="value", aggfunc="last").fillna(0.0)
    table = table.reindex([s for s in STAGES if s in table.index] + sorted(set(table.index) - set(STAGES)))
    classes = [c for c in OP_CLASSES if c in table.columns] + sorted(set(table.columns) - set(OP_CLASSES))
    figure, (ax,) = new_figure(7.0, 4.0)
    bottom = pd.Series(0.0, index=table.index)
    for op_class in classes:
        ax.bar(table.index, table[op_class], bottom=bottom, label=op_class)
        bottom += table[op_class]
    ax.set(ylabel="share of operator self CPU time (measured)", ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"Operator classes per stage (torch.profiler)\n{setting_label(rows)}\n"
                 f"{context_label(rows, environment)}", fontsize=10)
    return save_figure(figure, path)


def block_breakdown(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Milliseconds of one denoising step per module group (measured under the profiler)."""
    rows = newest_setting(select(one_environment(df), stage="denoise", metric="ms_per_step"))
    if rows.empty:
        return None
    rows = rows.sort_values("value")
    figure, (ax,) = new_figure(7.0, 3.6)
    ax.barh(rows["variant"], rows["value"], color="tab:orange")
    for group, ms in zip(rows["variant"], rows["value"]):
        ax.annotate(short(ms), (ms, group), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel("ms per denoising step (measured under torch.profiler, its overhead included)")
    ax.set_title(f"Denoiser step by module group\n{setting_label(rows)}\n{context_label(rows, environment)}",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(figure, path)


def roofline(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Achieved GFLOP/s of each baseline stage (derived) against the GEMM ceilings at its thread count."""
    df = one_environment(df)
    rows = select(baseline_rows(df), metric="gflops", stage=list(STAGES)).dropna(subset=["value"])
    if rows.empty:
        return None
    threads = rows["config.threads"].iloc[-1]
    tops = select(df, stage="gemm", metric="gflops_ceiling", **{"config.threads": threads})
    figure, (ax,) = new_figure(8.0, 4.2)
    stages = [s for s in STAGES if s in set(rows["stage"])]
    achieved = rows.set_index("stage")["value"].reindex(stages)
    ax.bar(stages, achieved, color="tab:green", label="achieved (counted FLOPs / measured time)")
    styles = {"fp32": "k--", "bf16": "b-.", "int8": "r:"}
    for dtype in GEMM_DTYPES:
        top = value_of(tops, variant=dtype)
        if top is not None:
            ax.axhline(top, linestyle=styles[dtype][1:], color=styles[dtype][0], label=f"{dtype} GEMM ceiling")
    fp32 = value_of(tops, variant="fp32")
    for stage, rate in achieved.items():
        label = short(rate) + (f"\n{rate / fp32:.0%} of fp32" if fp32 else "")
        ax.annotate(label, (stage, rate), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("GFLOP/s (int8: GOP/s)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"Achieved rate per stage vs. measured GEMM ceilings\n{setting_label(rows)}\n"
                 f"{context_label(rows, environment)}", fontsize=10)
    return save_figure(figure, path)


def scaling(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Measured seconds of one spatial+temporal block pair against tokens, and of one frame through the
    2D VAE decoder against pixels."""
    df = one_environment(df)
    blocks = select(df, stage="denoise", variant="block_pair", metric="seconds").dropna(subset=["config.tokens"])
    frames = select(df, stage="decode", variant="spatial_frame", metric="seconds")
    frames = frames.assign(pixels=[pixels_of(row) for _, row in frames.iterrows()]).dropna(subset=["pixels"])
    if not blocks.empty:
        blocks = blocks[same(blocks["config.threads"], blocks["config.threads"].iloc[-1])]
    if not frames.empty:
        frames = frames[same(frames["config.threads"], frames["config.threads"].iloc[-1])]
    panels = [p for p in (("tokens", blocks, "config.tokens", "one spatial + one temporal block, CFG batch"),
                          ("pixels per frame", frames, "pixels", "one frame through the 2D VAE decoder"))
              if not p[1].empty]
    if not panels:
        return None
    figure, axes = new_figure(5.0 * len(panels), 3.8, len(panels))
    for ax, (xlabel, rows, column, title) in zip(axes, panels):
        rows = rows.drop_duplicates([column, "config.resolution", "config.frames"], keep="last").sort_values(column)
        ax.plot(rows[column].astype(float), rows["value"], marker="o")
        for _, row in rows.iterrows():
            frames = label_text(row["config.frames"], " frames") if column == "config.tokens" else ""  # a frame is a frame
            name = " ".join(p for p in (label_text(row["config.resolution"]), frames) if p)
            ax.annotate(name, (float(row[column]), row["value"]), xytext=(3, 3), textcoords="offset points",
                        fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="seconds (measured median)", title=title)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, which="both")
    used = pd.concat([p[1] for p in panels])
    figure.suptitle(f"How cost grows with size\n{context_label(used, environment)}", fontsize=10)
    return save_figure(figure, path)

BOTTLENECK_COLUMNS = ["rank", "where", "stage", "component", "seconds per video (derived)", "share",
                      "achieved GFLOP/s", "ceiling fraction", "dominant op class"]


# ---- derived tables ----------------------------------------------------------------------------------


def _dominant_op_class(df: pd.DataFrame) -> dict[str, str]:
    shares = newest_setting(select(df, metric="self_share"))
    return {stage: rows.loc[rows["value"].idxmax(), "variant"]
            for stage, rows in shares.dropna(subset=["value"]).groupby("stage") if rows["value"].max() > 0}


def bottlenecks(df: pd.DataFrame) -> pd.DataFrame:
    """(stage, component) rows ranked by their share of the derived per-video time: the denoiser split
    by its module-group shares, other stages whole. Rate, ceiling fraction and dominant op class are
    the stage's (no per-group FLOP count is stored)."""
    df = one_environment(df)
    base = baseline_rows(df)
    video = stage_video_seconds(base)
    if not video:
        return pd.DataFrame(columns=BOTTLENECK_COLUMNS)
    groups = newest_setting(select(df, stage="denoise", metric="ms_per_step")).dropna(subset=["value"])
    if groups.empty:
        groups = newest_setting(select(df, stage="denoise", metric="share")).dropna(subset=["value"])
    threads = base["config.threads"].dropna()
    fractions = ceiling_fractions(df, threads=threads.iloc[-1] if len(threads) else None).set_index("stage")
    stored = newest_setting(select(df, variant="baseline", metric="ceiling_fraction"))
    dominant = _dominant_op_class(df)
    rows = []
    for stage, seconds in video.items():
        parts = [("whole stage", seconds)]
        if stage == "denoise" and groups["value"].sum() > 0:
            parts = [(g, seconds * v / groups["value"].sum()) for g, v in zip(groups["variant"], groups["value"])]
        fraction = fractions["fraction"].get(stage, value_of(stored, stage=stage))
        for component, part in parts:
            rows.append({"where": stage if component == "whole stage" else f"{stage}: {component}",
                         "stage": stage, "component": component, "seconds per video (derived)": part,
                         "achieved GFLOP/s": value_of(base, stage=stage, metric="gflops"),
                         "ceiling fraction": fraction, "dominant op class": dominant.get(stage)})
    table = pd.DataFrame(rows).sort_values("seconds per video (derived)", ascending=False, kind="stable")
    total = table["seconds per video (derived)"].sum()
    table["share"] = table["seconds per video (derived)"] / total if total > 0 else 0.0
    table["rank"] = range(1, len(table) + 1)
    return table[BOTTLENECK_COLUMNS].reset_index(drop=True)


def _timings(rows: pd.DataFrame, columns: dict) -> pd.DataFrame | None:
    """A table of measured timing records: the config ``columns`` (name -> label), median, IQR, n, kind."""
    rows = rows.drop_duplicates(list(columns) + ["variant"], keep="last")
    if rows.empty:
        return None
    table = pd.DataFrame({label: rows[column].map(text) for column, label in columns.items()})
    table["median s"], table["IQR s"], table["n"], table["kind"] = (
        rows["value"], rows["spread.iqr"], rows["spread.n"], rows["kind"])
    return table.reset_index(drop=True)


def _profile(df: pd.DataFrame) -> dict:
    shares = newest_setting(select(df, metric="self_share"))
    op_table = None
    if not shares.empty:
        pivot = shares.pivot_table(index="variant", columns="stage", values="value", aggfunc="last")
        pivot = pivot[[s for s in STAGES if s in pivot.columns]]
        pivot = pivot.reindex([c for c in profiling.OP_CLASSES if c in pivot.index] +
                              sorted(set(pivot.index) - set(profiling.OP_CLASSES)))
        op_table = pivot.reset_index().rename(columns={"variant": "op class"})
    groups = newest_setting(select(df, stage="denoise", metric="ms_per_step")).dropna(subset=["value"])
    group_table = None
    if not groups.empty:
        share_rows = newest_setting(select(df, stage="denoise", metric="share"))
        group_shares = {v: value_of(share_rows, variant=v) for v in groups["variant"]}
        group_table = pd.DataFrame({
            "module group": groups["variant"], "ms per step": groups["value"], "ms kind": groups["kind"],
            "share of the step": [group_shares[v] if group_shares[v] is not None else ms / groups["value"].sum()
                                  for v, ms in zip(groups["variant"], groups["value"])],
            "share kind": [kinds_of(select(share_rows, variant=v)) if group_shares[v] is not None else "derived"
                           for v in groups["variant"]],
        }).sort_values("ms per step", ascending=False)
    base = baseline_rows(df)
    threads = base["config.threads"].dropna()
    threads = threads.iloc[-1] if len(threads) else None
    fractions = ceiling_fractions(df, threads=threads)
    stored = newest_setting(select(df, variant="baseline", metric="ceiling_fraction"))
    if fractions.empty and not stored.empty:
        fractions = pd.DataFrame({"stage": stored["stage"], "gflops": None, "ceiling": None,
                                  "fraction": stored["value"]})
    roofline = None if fractions.empty else fractions.rename(columns={
        "gflops": "achieved GFLOP/s", "ceiling": "fp32 GEMM ceiling", "fraction": "fraction of the ceiling"})
    other_ceilings = {d: value_of(df, stage="gemm", metric="gflops_ceiling", variant=d, **{"config.threads": threads})
                      for d in GEMM_DTYPES}
    blocks = select(df, stage="denoise", variant="block_pair", metric="seconds")
    block_table = _timings(blocks, {"config.resolution": "resolution", "config.frames": "frames",
                                    "config.tokens": "tokens", "config.threads": "threads"})
    model_step = select(df, stage="denoise", variant="block_pair", metric="model_seconds_per_step")
    if block_table is not None and not model_step.empty:
        per_tokens = {text(t): v for t, v in zip(model_step["config.tokens"], model_step["value"])}
        block_table.insert(len(block_table.columns) - 1, "model s per step (derived)",
                           block_table["tokens"].map(per_tokens))
    decode = select(df, stage="decode", variant=["spatial_frame", "temporal_chunk"], metric="seconds")
    decode = decode.assign(**{"config.pixels": [records.pixels_of(r) for _, r in decode.iterrows()]})
    decode_table = _timings(decode.sort_values(["variant", "config.pixels"]),
                            {"variant": "part", "config.resolution": "resolution", "config.pixels": "pixels",
                             "config.threads": "threads"})
    t5_table = _timings(select(df, stage="encode_prompt", variant="t5", metric="seconds"),
                        {"config.threads": "threads"})
    return dict(op_table=op_table, op_setting=setting_label(shares), group_table=group_table,
                group_setting=setting_label(groups), roofline=roofline, threads=threads,
                ceilings=other_ceilings, blocks=block_table, decode=decode_table, t5=t5_table)


# ---- the section's interface (utils.report.render) ----------------------------------------------------

NOTEBOOKS = ("02_stage_profile", "01_baseline", "00_environment")
FIGURES = {
    "op_classes": FigureSpec.of_records(op_classes, "operator self-time share per stage by op class (measured, "
                                                    "torch.profiler)"),
    "block_breakdown": FigureSpec.of_records(block_breakdown, "denoiser ms per step by module group (measured under "
                                                              "the profiler)"),
    "roofline": FigureSpec.of_records(roofline, "achieved GFLOP/s per stage (derived) against the GEMM ceilings "
                                                "(derived)"),
    "scaling": FigureSpec.of_records(scaling, "block-pair seconds vs tokens and spatial-frame decode seconds vs "
                                              "pixels (measured)"),
}


def section(inputs: ReportInputs) -> dict:
    df = inputs.df
    ranked = bottlenecks(df)
    return dict(profile=_profile(df), bottlenecks=None if ranked.empty else ranked.drop(columns=["stage", "component"]),
                bottleneck_setting=setting_label(baseline_rows(df)),
                group_split=not newest_setting(select(df, stage="denoise", metric=["ms_per_step", "share"])).empty)
