"""The report's quality-baseline section (notebook ``03_quality_baseline`` and the mini model's training
run), assembled from stored records alone."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure

from utils.measure.records import one_environment, select
from utils.model.sampler import shift_ratio
from utils.model.stdit3 import STDIT3_PRESETS
from utils.model.weights import TRAINED_MINI
from utils.report.figures import FigureSpec, ReportInputs, context_label, new_figure, save_figure
from utils.report.formats import FILTERS
from utils.testbed import synthetic

NOTEBOOK = "03_quality_baseline"

# the testbed's chance levels: one attribute value guessed at random, and all three at once
CHANCE = {"shape": 1 / len(synthetic.SHAPES), "colour": 1 / len(synthetic.COLOURS),
          "motion": 1 / len(synthetic.MOTIONS), "all": 1 / len(synthetic.ALL_COMBINATIONS)}


def quality_examples(video, captions: list[str], held_out: list[bool], path, frames=(0, 4, 8, 12, 16)) -> Path:
    """One row per caption: the given frames of a generated clip ``video`` [n, 3, F, H, W] in [-1, 1]."""
    figure = Figure(figsize=(1.3 * len(frames) + 0.2, 1.45 * len(captions) + 0.5), layout="constrained")
    axes = figure.subplots(len(captions), len(frames), squeeze=False)
    images = ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy()  # n F H W 3 in [0, 1]
    for row, (caption, unseen) in enumerate(zip(captions, held_out)):
        for col, frame in enumerate(frames):
            ax = axes[row][col]
            ax.imshow(images[row, frame], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"frame {frame}", fontsize=8)
        axes[row][0].set_ylabel(caption.removeprefix("a ") + ("\n(held out)" if unseen else ""), fontsize=7)
    figure.suptitle("Mini model trained here (fp32): generated clips per caption", fontsize=9)
    return save_figure(figure, path)


ADHERENCE_METRICS = ("adherence_shape", "adherence_colour", "adherence_motion", "adherence_all_correct")


def adherence(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Measured prompt adherence per attribute of the detector checks, the trained mini model (fp32,
    training and held-out combinations) and the controls that must fail, with chance levels."""
    df = one_environment(df)
    rows = select(df, notebook="03_quality_baseline", stage="adherence", metric=list(ADHERENCE_METRICS))
    if rows.empty:
        return None
    rows = rows.assign(group=rows["variant"] + "\n" + rows["config.split"].fillna(""))
    rows = rows.drop_duplicates(["group", "metric"], keep="last")
    table = rows.pivot(index="group", columns="metric", values="value").reindex(columns=list(ADHERENCE_METRICS))
    table = table.loc[list(dict.fromkeys(rows["group"]))]  # in the order the notebook stored them
    figure, (ax,) = new_figure(max(7.0, 1.1 * len(table)), 3.8)
    width = 0.8 / len(ADHERENCE_METRICS)
    for i, metric in enumerate(ADHERENCE_METRICS):
        positions = [x + (i - 1.5) * width for x in range(len(table))]
        ax.bar(positions, table[metric], width, label=metric.removeprefix("adherence_").replace("_", " "))
    for level in sorted(set(CHANCE.values())):
        ax.axhline(level, linestyle=":", linewidth=0.8, color="grey")
    pct = FILTERS["pct"]
    ax.text(len(table) - 0.5, CHANCE["shape"], f"chance: shape {pct(CHANCE['shape'])}, colour {pct(CHANCE['colour'])}, "
            f"motion {pct(CHANCE['motion'])}, all {pct(CHANCE['all'])}", fontsize=7, ha="right", va="bottom",
            color="grey")
    ax.set_xticks(range(len(table)))
    ax.set_xticklabels(table.index, fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel="fraction of clips correct")
    ax.legend(fontsize=7, ncols=4, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Prompt adherence (measured): detector checks, mini model trained here, controls\n"
                 f"{context_label(rows, environment)}", fontsize=10)
    return save_figure(figure, path)

FLOOR_METRICS = {"psnr": "PSNR dB", "ssim": "SSIM", "latent_relative_l2": "latent rel. L2", "latent_cosine": "latent cosine",
                 "flicker_ratio": "flicker ratio", "max_abs_diff": "max abs diff (frames)"}


def split_mini_records(records: pd.DataFrame, current: str | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The records to report, and a table of the ``trained-mini`` records left out because they were
    measured with other mini-model weights than ``current`` (``minimodel.weights_id()`` of the weights in
    ``data/mini-model``) or do not say which (per notebook; None when every record matches)."""
    ids = records["config.mini_weights"] if "config.mini_weights" in records.columns else pd.Series(
        None, index=records.index, dtype=object)
    other = (records["config.weights"] == TRAINED_MINI) & (ids.astype(object) != current)
    if not other.any():
        return records, None
    left_out = records[other].assign(weights=ids[other].fillna("not recorded"))
    table = (left_out.groupby(["environment_id", "notebook", "weights"], sort=False)
             .agg(records=("metric", "size"), newest=("time", "max")).reset_index())
    return records[~other].reset_index(drop=True), table


def _in_stored_order(rows: pd.DataFrame, keys: list[str]) -> list[tuple]:
    return list(dict.fromkeys(map(tuple, rows[keys].itertuples(index=False))))


def adherence_table(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = select(df, notebook="03_quality_baseline", stage="adherence", metric=list(ADHERENCE_METRICS))
    if rows.empty:
        return None
    rows = rows.assign(split=rows["config.split"].fillna("-"))
    rows = rows.drop_duplicates(["variant", "split", "metric"], keep="last")
    table = []
    for variant, split in _in_stored_order(rows, ["variant", "split"]):
        group = select(rows, variant=variant, split=split)
        values = dict(zip(group["metric"], group["value"]))
        table.append({"variant": variant, "combinations": split, "clips": group["spread.n"].max(),
                      **{m.removeprefix("adherence_").replace("_", " "): values.get(m) for m in ADHERENCE_METRICS},
                      "kind": " + ".join(sorted(set(group["kind"])))})
    return pd.DataFrame(table)


def noise_floor_table(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = select(df, notebook="03_quality_baseline", stage="noise_floor")
    if rows.empty:
        return None
    rows = rows.drop_duplicates(["config.model", "variant", "metric"], keep="last")
    table = []
    for model, run in _in_stored_order(rows, ["config.model", "variant"]):
        group = select(rows, **{"config.model": model, "variant": run})
        values = dict(zip(group["metric"], group["value"]))
        weights = group["config.weights"].iloc[0]
        table.append({"model": f"{model} ({weights} weights)", "run against the reference": run,
                      **{label: values.get(metric) for metric, label in FLOOR_METRICS.items()}})
    return pd.DataFrame(table)


def training_table(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = select(df, notebook="train_mini_model", metric=["training_seconds", "final_loss"])
    if rows.empty:
        return None
    rows = rows.drop_duplicates(["stage", "metric"], keep="last")
    table = rows.pivot(index="stage", columns="metric", values="value").reset_index()
    notes = rows[rows["metric"] == "training_seconds"].set_index("stage")["note"]
    table["what"] = table["stage"].map(notes).fillna("")
    order = ["data", "spatial_vae", "temporal_vae", "latents", "transformer", "total"]
    table = table.set_index("stage").reindex([s for s in order if s in set(table["stage"])]).reset_index()
    return table.rename(columns={"training_seconds": "seconds (measured)", "final_loss": "final loss"})


def testbed() -> dict:
    """The testbed's sizes, from the code that defines them: the mini transformer, the synthetic clips,
    the attribute counts and chance levels, and the sampler's resolution shift at the clip's size."""
    mini = STDIT3_PRESETS["mini"]
    size = torch.tensor([float(synthetic.SIZE)])
    return dict(depth=mini.depth, width=mini.hidden_size, frames=synthetic.NUM_FRAMES, size=synthetic.SIZE,
                shapes=len(synthetic.SHAPES), colours=len(synthetic.COLOURS), motions=len(synthetic.MOTIONS),
                combinations=len(synthetic.ALL_COMBINATIONS), chance=CHANCE,
                shift_ratio=float(shift_ratio(size, size, torch.tensor([synthetic.NUM_FRAMES]))[0]))


def quality_section(df: pd.DataFrame, configured: dict | None = None) -> dict | None:
    """The section's tables; ``configured``: notebook 03's configured parameters (its guidance scale, which
    no record stores)."""
    adherence = adherence_table(df)
    floor = noise_floor_table(df)
    if adherence is None and floor is None:
        return None
    headline = {}
    if adherence is not None:
        fp32 = adherence[adherence["variant"] == "fp32"].set_index("combinations")
        headline = {split: fp32.loc[split].to_dict() for split in fp32.index}
        settings = select(df, notebook=NOTEBOOK, stage="adherence", variant="fp32")
        headline["steps"] = settings["config.steps"].dropna().max()
        headline["threads"] = settings["config.threads"].dropna().max()
        headline["cfg_scale"] = (configured or {}).get("cfg_scale")
    losses = select(df, notebook="train_mini_model", metric="final_loss")["note"].dropna()
    return dict(adherence=adherence, floor=floor, training=training_table(df), headline=headline,
                testbed=testbed(), loss_note=losses.iloc[-1] if len(losses) else None,
                # the unit roundoff of bf16 (half its machine epsilon): the floor's perturbation of that size
                bf16_rounding=torch.finfo(torch.bfloat16).eps / 2)


# ---- the section's interface (utils.report.render) ----------------------------------------------------

NOTEBOOKS = ("03_quality_baseline", "train_mini_model")
FIGURES = {
    "quality_adherence": FigureSpec.of_records(
        adherence, "prompt adherence per attribute of the trained mini model and controls (measured)",
        shows=dict(notebook="03_quality_baseline", stage="adherence")),
    # drawn by the notebook from generated frames, shown when its file is there
    "quality_examples": FigureSpec("clips generated by the mini model trained here (fp32, the first seed); "
                                   "\"held out\" marks combinations never seen in training",
                                   context="Drawn by `03_quality_baseline`"),
}


def section(inputs: ReportInputs) -> dict:
    return dict(quality=quality_section(inputs.df, inputs.configured.get(NOTEBOOK)))
