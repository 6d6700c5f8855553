"""Notebook ``06_int8``: its records (from ``utils.experiments.e06_int8``'s results), its figures and the report's
INT8 section, assembled from stored records alone."""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import pandas as pd

from utils.io import GIB
from utils.measure.records import one_environment, select, value_of
from utils.optim.quantize import apply_quantize
from utils.report.figures import FigureSpec, ReportInputs, context_label, new_figure, save_figure, setting_label, short
from utils.report.sections.arm_check import latest_runs
from utils.report.sections.s04_precision_threads_memory import GAIN_THRESHOLD
from utils.testbed.adherence import adherence_margin

NOTEBOOK = "06_int8"


VARIANT_ORDER = ("fp32", "bf16", "bf16+compile", "w8a8_dynamic", "w8a8_dynamic+compile", "bf16+w8a8_dynamic",
                 "bf16+w8a8_dynamic+compile", "w8a8_dynamic_all", "w8a8_dynamic_ao",
                 "w8a8_static", "w8a8_static_plain", "w8_weight_only", "bf16+w8_weight_only", "t5_w8a8_dynamic",
                 "t5_w8_weight_only")

SCHEME_ORDER = ("float", "w8a8_dynamic", "w8a8_dynamic_compiled", "w8a8_dynamic_ao", "w8a8_static", "w8_weight_only")


# utils.experiments.arm_check's quantised paths: the study's schemes through utils.optim on the tiny model, and
# the raw int8 / int4 kernels under them
ARM_PREFIXES = ("quantize_", "op_int8", "op_int4")


# ---- selecting ------------------------------------------------------------------------------------------

def int8_rows(df: pd.DataFrame, experiment: str, notebook: str = NOTEBOOK, **criteria) -> pd.DataFrame:
    """``notebook``'s records of ``experiment`` (notebook 09 stores its runtime variants the same way)."""
    df = one_environment(df)
    for column in ("config.experiment", "config.optimizations", "config.layer", "config.kernel_setting",
                   "config.sensitivity_model", "config.split"):
        if column not in df.columns:
            df[column] = None
    return select(df, notebook=notebook, **{"config.experiment": experiment}, **criteria)


def _ordered(names, order) -> list:
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + [n for n in names if n not in order]


# ---- tables ---------------------------------------------------------------------------------------------

def kernel_table(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = int8_rows(df, "kernels").drop_duplicates(["variant", "metric", "config.dtype", "config.layer",
                                                     "config.kernel_setting"], keep="last")
    if rows.empty:
        return None
    table = []
    for dtype in dict.fromkeys(rows["config.dtype"]):
        ours = select(rows, **{"config.dtype": dtype})
        float_s = select(ours, variant="float", metric="linear_seconds")["value"].sum()
        layers = ours["config.layer"].nunique()
        for scheme in _ordered(ours["variant"], SCHEME_ORDER):
            mine = select(ours, variant=scheme)
            seconds = select(mine, metric="linear_seconds")["value"].sum()
            table.append({"dtype": dtype, "scheme": scheme,
                          **{f"{layer} GOP/s": value_of(mine, metric="gops", **{"config.layer": layer})
                             for layer in dict.fromkeys(mine["config.layer"])},
                          f"speed-up vs float ({layers} layers)": float_s / seconds if seconds else None,
                          "max rel. error": select(mine, metric="rel_error")["value"].max(),
                          f"quantise s ({layers} layers)": select(mine, metric="quantize_seconds")["value"].sum(),
                          "first call s (max)": select(mine, metric="linear_seconds")["spread.first"].max()
                          if "spread.first" in mine.columns else None})
    return pd.DataFrame(table)


def variant_table(df: pd.DataFrame, notebook: str = NOTEBOOK, order=VARIANT_ORDER) -> pd.DataFrame | None:
    rows = int8_rows(df, "variants", notebook).drop_duplicates(["variant", "stage", "metric"], keep="last")
    if rows.empty:
        return None
    table = []
    for name in _ordered(rows["variant"], order):
        ours = select(rows, variant=name)
        stage = "encode_prompt" if name.startswith("t5_") else "denoise"
        per_call = value_of(ours, stage=stage, metric="seconds_per_step" if stage == "denoise" else "seconds")
        if per_call is None:
            continue
        table.append({"variant": name, "stage": stage, "optimisations": ours["config.optimizations"].iloc[-1] or "none",
                      "s per step/call": per_call,
                      "speed-up vs fp32": value_of(ours, stage=stage, metric="speedup_vs_fp32"),
                      "speed-up vs bf16": value_of(ours, stage=stage, metric="speedup_vs_bf16"),
                      "model GiB": (value_of(ours, stage=stage, metric="model_bytes") or math.nan) / GIB,
                      "stage peak GiB": (value_of(ours, stage=stage, metric="peak_rss_bytes") or math.nan) / GIB,
                      "quantise s": value_of(ours, stage=stage, metric="quantize_seconds"),
                      "1-step / T5 rel. L2": value_of(ours, stage=stage, metric="rel_l2"),
                      "final latent rel. L2": value_of(ours, stage=stage, metric="final_rel_l2"),
                      "frames PSNR dB": value_of(ours, stage="decode", metric="video_psnr"),
                      "frames SSIM": value_of(ours, stage="decode", metric="video_ssim")})
    return pd.DataFrame(table) if table else None


def sensitivity_table(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = int8_rows(df, "sensitivity", metric="sensitivity_rel_l2").drop_duplicates(
        ["variant", "config.sensitivity_model"], keep="last")
    if rows.empty:
        return None
    models = list(dict.fromkeys(rows["config.sensitivity_model"]))

    def parameters(group: str, model: str):
        ours = select(rows, variant=group, **{"config.sensitivity_model": model})
        if ours.empty or "quality.parameters" not in ours.columns:
            return None
        return ours["quality.parameters"].iloc[-1] / 1e6

    table = pd.DataFrame([{"layer classes": group,
                           **{f"{m} parameters (M)": parameters(group, m) for m in models},
                           **{f"{m} rel. L2": value_of(rows, variant=group, **{"config.sensitivity_model": m})
                              for m in models}}
                          for group in dict.fromkeys(rows["variant"])])
    singles = ~table["layer classes"].isin(["blocks", "all"])
    for m in models:
        table.loc[singles, f"{m} rank"] = table.loc[singles, f"{m} rel. L2"].rank(ascending=False)
    return table


def adherence_table(df: pd.DataFrame, notebook: str = NOTEBOOK, order=VARIANT_ORDER) -> pd.DataFrame | None:
    rows = int8_rows(df, "adherence", notebook)
    if rows.empty:
        return None
    rows = rows.drop_duplicates(["variant", "config.split", "metric"], keep="last")
    table = []
    for name in _ordered(rows["variant"], order):
        for split in dict.fromkeys(select(rows, variant=name)["config.split"]):
            ours = select(rows, variant=name, **{"config.split": split})
            fp32 = value_of(rows, variant="fp32", metric="adherence_all_correct", **{"config.split": split})
            all_correct = value_of(ours, metric="adherence_all_correct")
            clips = ours["spread.n"].max()
            table.append({"variant": name, "combinations": split, "clips": clips,
                          "all correct": all_correct,
                          "vs fp32": None if fp32 is None or all_correct is None else all_correct - fp32,
                          "margin": None if fp32 is None or pd.isna(clips) else adherence_margin(fp32, int(clips)),
                          **{m: value_of(ours, metric=f"adherence_{m}") for m in ("shape", "colour", "motion")}})
    return pd.DataFrame(table)


def fp32_elsewhere(df: pd.DataFrame, adherence: pd.DataFrame | None) -> list[dict]:
    """Per split: this notebook's fp32 all-correct adherence beside the quality baseline's (notebook 03), two
    runs of one quantity with their clip counts and runs."""
    if adherence is None:
        return []
    there = select(one_environment(df), notebook="03_quality_baseline", stage="adherence", variant="fp32",
                   metric="adherence_all_correct")
    here = adherence[adherence["variant"] == "fp32"]
    out = []
    for _, row in here.iterrows():
        theirs = there[there["config.split"] == row["combinations"]]
        if len(theirs):
            out.append(dict(split=row["combinations"], here=row["all correct"], here_clips=row["clips"],
                            there=theirs["value"].iloc[-1], there_clips=theirs["spread.n"].iloc[-1],
                            there_run=theirs["run_id"].iloc[-1]))
    return out


def recommendation(variants: pd.DataFrame | None, adherence: pd.DataFrame | None,
                   sensitivity: pd.DataFrame | None = None) -> dict | None:
    """The fastest transformer variant whose mini-model adherence stays within the chance margin of fp32
    (``testbed.adherence.adherence_margin`` of fp32's fraction and the clip count) on every split, and the
    fastest overall. A ``+compile`` variant without its own adherence measurement
    counts as kept when its eager form is (compiling keeps the arithmetic; ``derived`` names those), and the
    sensitivity table's ``blocks`` and ``all`` rows give the cost of quantising the embedders and final layer."""
    if variants is None:
        return None
    denoise = variants[(variants["stage"] == "denoise") & (variants["variant"] != "fp32")].dropna(
        subset=["speed-up vs fp32"])
    if denoise.empty:
        return None
    fastest = denoise.sort_values("speed-up vs fp32", ascending=False).iloc[0].to_dict()
    keeps, measured, worst = set(), set(), pd.Series(dtype=float)
    if adherence is not None:
        measured = set(adherence["variant"])
        others = adherence[adherence["variant"] != "fp32"]
        worst = others.groupby("variant")["vs fp32"].min()
        within = (others["vs fp32"] >= -others["margin"]).groupby(others["variant"]).all()
        keeps = {v for v, ok in within.items() if ok and not pd.isna(worst.get(v))}
    derived = {v: v.removesuffix("+compile") for v in denoise["variant"]
               if v.endswith("+compile") and v not in measured and v.removesuffix("+compile") in keeps}
    eligible = denoise[denoise["variant"].isin(keeps | set(derived))].sort_values("speed-up vs fp32", ascending=False)
    best = eligible.iloc[0].to_dict() if len(eligible) else None
    if best is not None:
        eager = denoise[denoise["variant"] == derived.get(best["variant"])]
        best["eager"] = eager.iloc[0].to_dict() if len(eager) else None
    float_layers = None
    if sensitivity is not None and {"blocks", "all"} <= set(sensitivity["layer classes"]):
        rows = sensitivity.set_index("layer classes")
        float_layers = {column: (rows.loc["blocks", column], rows.loc["all", column])
                        for column in ("real rel. L2", "mini rel. L2") if column in rows.columns}
    weight_only = denoise[denoise["variant"] == "w8_weight_only"]
    encoders = variants[(variants["stage"] == "encode_prompt") & (variants["variant"] != "fp32")]
    encoder = encoders.iloc[0].to_dict() if len(encoders) else None
    if encoder is not None:
        encoder["adherence delta"] = worst.get(encoder["variant"])  # worst split, None when not measured
    margins = {} if adherence is None else adherence[adherence["variant"] == "fp32"].set_index("combinations")["margin"]
    return dict(fastest=fastest, best=best, derived=derived, encoder=encoder, margins=dict(margins),
                weight_only=weight_only.iloc[0].to_dict() if len(weight_only) else None, kept=sorted(keeps),
                float_layers=float_layers)


def arm_paths(records: pd.DataFrame | None) -> pd.DataFrame | None:
    """The int8/int4 checks of each CPU profile's latest ``make arm-check`` run (emulated, functional only)."""
    if records is None or "config.arm_profile" not in records.columns:
        return None
    rows = latest_runs(records)
    rows = rows[rows["variant"].str.startswith(ARM_PREFIXES)]
    if rows.empty:
        return None
    return pd.DataFrame([{"check": r["variant"], "profile": r["config.arm_profile"],
                          "result": "pass" if r["value"] == 1 else "FAIL", "what ran and its error": r["note"]}
                         for _, r in rows.sort_values(["variant", "config.arm_profile"]).iterrows()])


def int8_section(df: pd.DataFrame, records: pd.DataFrame | None = None, configured: dict | None = None,
                 environment: dict | None = None) -> dict | None:
    """The section's tables from the primary environment's records ``df``; ``records`` (every environment)
    adds the emulated aarch64 int8 checks; ``configured`` (notebook 06's configured parameters) the values no
    record stores (calibration prompts, the sampling steps of the fidelity runs); ``environment`` (the primary
    fingerprint) the torchao version."""
    mine = select(one_environment(df), notebook=NOTEBOOK)
    if mine.empty:
        return None
    variants, adherence, sensitivity = variant_table(df), adherence_table(df), sensitivity_table(df)
    timed = select(mine, metric="seconds_per_step")
    failed = int8_rows(df, "variants", metric="not_run").drop_duplicates("variant", keep="last")
    not_run = {row["variant"]: row["note"].removeprefix("not run: ") for _, row in failed.iterrows()
               if variants is None or row["variant"] not in set(variants["variant"])}
    configured = configured or {}
    here_runs = int8_rows(df, "adherence", variant="fp32")["run_id"].dropna()
    mini_steps = int8_rows(df, "sensitivity", **{"config.sensitivity_model": "mini"})["config.steps"].dropna()
    return dict(kernels=kernel_table(df), variants=variants, not_run=not_run, sensitivity=sensitivity, adherence=adherence,
                recommendation=recommendation(variants, adherence, sensitivity), arm=arm_paths(records),
                setting=setting_label(timed) if len(timed) else None,
                threads=mine["config.threads"].dropna().iloc[-1] if mine["config.threads"].notna().any() else None,
                torchao=((environment or {}).get("libraries") or {}).get("torchao"),
                smoothquant_alpha=inspect.signature(apply_quantize).parameters["alpha"].default,
                calibration_prompts=configured.get("calibration_prompts"),
                fidelity_steps=configured.get("fidelity_steps"),
                mini_steps=mini_steps.iloc[-1] if len(mini_steps) else None,
                gain_threshold=GAIN_THRESHOLD, fp32_elsewhere=fp32_elsewhere(df, adherence),
                adherence_run=here_runs.iloc[-1] if len(here_runs) else None)


# ---- figures --------------------------------------------------------------------------------------------

def kernels_figure(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """GOP/s of each Linear role per scheme, one panel per dtype (measured medians, derived rates)."""
    rows = int8_rows(df, "kernels", metric="gops").drop_duplicates(
        ["variant", "config.dtype", "config.layer", "config.kernel_setting"], keep="last")
    if rows.empty:
        return None
    dtypes = list(dict.fromkeys(rows["config.dtype"]))
    figure, axes = new_figure(5.0 * len(dtypes), 4.0, ncols=len(dtypes))
    for ax, dtype in zip(axes, dtypes):
        ours = select(rows, **{"config.dtype": dtype})
        schemes = _ordered(ours["variant"], SCHEME_ORDER)
        layers = list(dict.fromkeys(ours["config.layer"]))
        width = 0.8 / len(schemes)
        for i, scheme in enumerate(schemes):
            values = [value_of(ours, variant=scheme, **{"config.layer": layer}) for layer in layers]
            positions = [x + (i - len(schemes) / 2 + 0.5) * width for x in range(len(layers))]
            ax.bar(positions, [v if v is not None else 0 for v in values], width, label=scheme)
        ax.set_xticks(range(len(layers)), layers)
        ax.set_ylabel("GOP/s (derived from measured medians)")
        ax.set_title(f"{dtype} activations, {ours['config.kernel_setting'].iloc[-1]}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=6)
    figure.suptitle(f"One Linear layer per role and scheme\n{context_label(rows, environment)}", fontsize=10)
    return save_figure(figure, path)


def tradeoff_figure(df: pd.DataFrame, path, environment: dict | None = None, notebook: str = NOTEBOOK,
                    order=VARIANT_ORDER) -> Path | None:
    """Left: denoiser speed-up against fp32 (measured side by side) vs the final latent's error against fp32
    (real-size, random weights). Middle: the transformer's bytes and the denoise stage's peak resident memory
    per variant (measured). Right: the mini model's all-correct adherence per variant and split."""
    variants, adherence = variant_table(df, notebook, order), adherence_table(df, notebook, order)
    if variants is None:
        return None
    figure, (left, middle, right) = new_figure(17.0, 4.8, ncols=3, width_ratios=(1.3, 1.0, 1.0))
    denoise = variants[variants["stage"] == "denoise"]
    positions = range(len(denoise))
    middle.barh([y - 0.2 for y in positions], denoise["model GiB"], 0.4, label="transformer weights")
    middle.barh([y + 0.2 for y in positions], denoise["stage peak GiB"], 0.4, label="denoise stage peak RSS")
    for y, (model, peak) in enumerate(zip(denoise["model GiB"], denoise["stage peak GiB"])):
        for offset, value in ((-0.2, model), (0.2, peak)):
            if not pd.isna(value):
                middle.annotate(f"{value:.2f}", (value, y + offset), xytext=(2, 0), textcoords="offset points",
                                va="center", fontsize=6)
    middle.set_yticks(list(positions), denoise["variant"], fontsize=7)
    middle.invert_yaxis()
    middle.set_xlabel("GiB (measured)")
    middle.legend(fontsize=7)
    middle.grid(axis="x", alpha=0.3)
    middle.set_title("Memory per variant", fontsize=9)
    floor = denoise["final latent rel. L2"].min(skipna=True)
    floor = floor / 10 if floor and not pd.isna(floor) and floor > 0 else 1e-7  # where the reference sits
    for _, row in denoise.iterrows():
        error, speedup = row["final latent rel. L2"], row["speed-up vs fp32"]
        reference = pd.isna(error) or error == 0
        left.scatter(speedup, floor if reference else error, marker="x" if reference else "o")
        left.annotate(row["variant"], (speedup, floor if reference else error), xytext=(4, 2),
                      textcoords="offset points", fontsize=7)
    left.set_xlim(0.9, 1.3 * denoise["speed-up vs fp32"].max())  # room for the labels inside the axes
    left.set_yscale("log")
    left.set_xlabel("denoiser speed-up vs fp32 (measured side by side)")
    left.set_ylabel("final latent rel. L2 vs fp32\n(x: fp32 itself, drawn at the floor)", fontsize=8)
    left.grid(alpha=0.3)
    rows = select(int8_rows(df, "variants", notebook), metric="seconds_per_step")
    left.set_title(f"Speed vs fidelity, real-size model (random weights)\n{setting_label(rows)}", fontsize=9)
    if adherence is not None:
        splits = list(dict.fromkeys(adherence["combinations"]))
        names = list(dict.fromkeys(adherence["variant"]))
        width = 0.8 / len(splits)
        for i, split in enumerate(splits):
            ours = adherence[adherence["combinations"] == split].set_index("variant")["all correct"].reindex(names)
            positions = [x + (i - len(splits) / 2 + 0.5) * width for x in range(len(names))]
            right.bar(positions, ours.fillna(0), width, label=split)
            for x, value in zip(positions, ours):
                if not pd.isna(value):
                    right.annotate(short(100 * value), (x, value), ha="center", va="bottom", fontsize=6)
        right.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        right.set_ylabel("all attributes correct (fraction of clips)")
        right.set_ylim(0, 1.25 * adherence["all correct"].max())
        right.legend(fontsize=7, loc="upper center", ncols=len(splits))
        right.set_title("Prompt adherence, trained mini model (measured)", fontsize=9)
    else:
        right.set_axis_off()
    figure.suptitle(context_label(rows, environment), fontsize=9)
    return save_figure(figure, path)


MODEL_TITLES = {"real": "real-size model (random weights, one step)",
                "mini": "mini model (trained here, 30-step clips)"}


def sensitivity_figure(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Output-latent error against fp32 with one layer class quantised at a time, per model (measured)."""
    table = sensitivity_table(df)
    if table is None:
        return None
    columns = [c for c in table.columns if c.endswith("rel. L2")]
    figure, axes = new_figure(5.0 * len(columns), 0.8 + 0.35 * len(table), ncols=len(columns))
    for ax, column in zip(axes, columns):
        ax.barh(table["layer classes"], table[column])
        for y, value in enumerate(table[column]):
            if not pd.isna(value):
                ax.annotate(f"{value:.2e}", (value, y), xytext=(3, 0), textcoords="offset points", va="center",
                            fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("output latent rel. L2 vs fp32")
        model = column.removesuffix(" rel. L2")
        ax.set_title(MODEL_TITLES.get(model, f"{model} model"), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    rows = int8_rows(df, "sensitivity")
    figure.suptitle(f"Sensitivity: one layer class quantised ({rows['config.scheme'].iloc[-1] if 'config.scheme' in rows else ''})"
                    f"\n{context_label(rows, environment)}", fontsize=10)
    return save_figure(figure, path)


# ---- the section's interface (utils.report.render) ----------------------------------------------------

NOTEBOOKS = (NOTEBOOK,)
FIGURES = {
    "int8_kernels": FigureSpec.of_records(
        kernels_figure, "one Linear layer per role: GOP/s per quantisation scheme (derived from measured medians)",
        shows=dict(notebook=NOTEBOOK)),
    "int8_tradeoff": FigureSpec.of_records(
        tradeoff_figure, "denoiser speed-up vs final-latent error (measured, random weights), memory per variant, and "
                         "the mini model's adherence per variant (measured)", shows=dict(notebook=NOTEBOOK)),
    "int8_sensitivity": FigureSpec.of_records(
        sensitivity_figure, "output error with one layer class quantised at a time (measured)",
        shows=dict(notebook=NOTEBOOK)),
}


def section(inputs: ReportInputs) -> dict:
    return dict(int8=int8_section(inputs.df, inputs.records, inputs.configured.get(NOTEBOOK), inputs.environment))
