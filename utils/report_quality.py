"""The report's quality-baseline section (notebook ``03_quality_baseline`` and the mini model's training
run), assembled from stored records alone."""
from __future__ import annotations

import pandas as pd

from .pipeline import TRAINED_MINI
from .plots import ADHERENCE_METRICS, select

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


def quality_section(df: pd.DataFrame) -> dict | None:
    adherence = adherence_table(df)
    floor = noise_floor_table(df)
    if adherence is None and floor is None:
        return None
    headline = {}
    if adherence is not None:
        fp32 = adherence[adherence["variant"] == "fp32"].set_index("combinations")
        headline = {split: fp32.loc[split].to_dict() for split in fp32.index}
        settings = select(df, notebook="03_quality_baseline", stage="adherence", variant="fp32")
        headline["steps"] = settings["config.steps"].dropna().max()
        headline["threads"] = settings["config.threads"].dropna().max()
    return dict(adherence=adherence, floor=floor, training=training_table(df), headline=headline)
