"""Queries over the stored records (``results.load_records``'s DataFrame): one environment's rows, selection
by field values, the newest setting, the baseline rows, single values. Notebooks, figures and the report
read records through these."""
from __future__ import annotations

import pandas as pd

from utils.measure.results import load_records
from utils.model.aspect import image_size
from utils.model.pipeline import STAGES

# the config fields that make one video setting; records of a figure come from the newest setting
SETTING_KEYS = ("config.model", "config.weights", "config.resolution", "config.aspect_ratio", "config.frames",
                "config.steps", "config.threads")

COLUMNS = ("environment_id", "notebook", "variant", "stage", "metric", "unit", "value", "kind", "note", "time",
           "run_id", "git_commit", "git_dirty", "config.model", "config.weights", "config.resolution",
           "config.aspect_ratio", "config.frames", "config.steps", "config.dtype", "config.threads",
           "config.text_encoder_dtype", "config.shape", "config.mkn", "config.tokens", "config.pixels",
           "config.split",
           "spread.n", "spread.iqr")


# ---- selecting records --------------------------------------------------------------------------------

def prepare(df: pd.DataFrame | None) -> pd.DataFrame:
    """A copy with every column the figures and the report read (missing ones as NaN), sorted by time."""
    df = pd.DataFrame(columns=list(COLUMNS)) if df is None else df.copy()
    for column in COLUMNS:
        if column not in df.columns:
            df[column] = None
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    return df.sort_values("time", kind="stable", na_position="first").reset_index(drop=True)


def in_environment(df: pd.DataFrame, environment_id: str | None) -> pd.DataFrame:
    """The rows of one environment (the study's one "records of this machine" query)."""
    return df[df["environment_id"] == environment_id].reset_index(drop=True)


def environment_records(root, environment_id: str | None) -> pd.DataFrame:
    """What a notebook reads back of its own machine: the stored records under ``root`` of
    ``environment_id``, prepared (every column the figures read, sorted by time)."""
    return in_environment(prepare(load_records(root)), environment_id)


def one_environment(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the environment with the newest record, when ``df`` holds several."""
    df = prepare(df)
    ids = df["environment_id"].dropna().unique()
    if len(ids) > 1:
        df = df[df["environment_id"] == df["environment_id"].dropna().iloc[-1]]
    return df


def select(df: pd.DataFrame, **criteria) -> pd.DataFrame:
    """Rows whose columns equal the given values; a list or tuple value accepts any of its items."""
    mask = pd.Series(True, index=df.index)
    for column, wanted in criteria.items():
        mask &= df[column].isin(list(wanted)) if isinstance(wanted, (list, tuple, set)) else df[column] == wanted
    return df[mask]


def notebook_environment(records: pd.DataFrame, notebook: str, primary: str | None) -> tuple[pd.DataFrame, str | None]:
    """``notebook``'s records of one environment: ``primary`` if it ran the notebook, else the newest environment
    that did (a section drawn from it names its CPU); (empty, None) if none did."""
    rows = select(records, notebook=notebook)
    if rows.empty:
        return rows, None
    ids = list(dict.fromkeys(rows["environment_id"].dropna()[::-1]))
    chosen = primary if primary in ids else ids[0]
    return rows[rows["environment_id"] == chosen], chosen


def same(series: pd.Series, value) -> pd.Series:
    return series.isna() if pd.isna(value) else series.astype(object) == value


def newest_setting(rows: pd.DataFrame, keys=SETTING_KEYS) -> pd.DataFrame:
    """The rows measured at the same setting (``keys``) as the newest row, newest row per identity."""
    if rows.empty:
        return rows
    newest = rows.iloc[-1]
    mask = pd.Series(True, index=rows.index)
    for key in keys:
        mask &= same(rows[key], newest[key])
    return rows[mask].drop_duplicates(["notebook", "variant", "stage", "metric"], keep="last")


def baseline_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The ``01_baseline`` records of the faithful pipeline at its newest setting."""
    return newest_setting(select(df, notebook="01_baseline", variant="baseline"))


def value_of(rows: pd.DataFrame, **criteria) -> float | None:
    """The newest matching value, or None."""
    rows = select(rows, **criteria)
    return None if rows.empty or pd.isna(rows["value"].iloc[-1]) else float(rows["value"].iloc[-1])


def pixels_of(row: pd.Series) -> int | None:
    """Pixels per frame of a record: ``config.pixels``, else from its resolution and aspect ratio."""
    if not pd.isna(row["config.pixels"]):
        return int(row["config.pixels"])
    if pd.isna(row["config.resolution"]) or pd.isna(row["config.aspect_ratio"]):
        return None

    try:
        height, width = image_size(row["config.resolution"], row["config.aspect_ratio"])
    except ValueError:
        return None
    return height * width


# the memory waterfall of a whole lazily loaded run (notebook 04's footprint runs): (event, stage of the record,
# metric of the record, label on a figure)
WATERFALL = (("load text_encoder", "encode_prompt", "load_peak_rss_bytes", "load T5"),
             ("encode_prompt", "encode_prompt", "peak_rss_bytes", "encode"),
             ("release text_encoder", "encode_prompt", "rss_after_release_bytes", "free T5"),
             ("load transformer", "denoise", "load_peak_rss_bytes", "load transformer"),
             ("denoise", "denoise", "peak_rss_bytes", "denoise step"),
             ("load vae", "decode", "load_peak_rss_bytes", "load VAE"),
             ("decode", "decode", "peak_rss_bytes", "decode"))


def ceiling_fractions(df: pd.DataFrame, threads: int | None = None, dtype: str = "fp32") -> pd.DataFrame:
    """Per baseline stage: achieved GFLOP/s (derived record), the ``dtype`` GEMM ceiling at the same
    thread count, and their ratio. Stages lacking either are left out."""
    df = one_environment(df)
    rows = select(df, notebook="01_baseline", variant="baseline", metric="gflops").dropna(subset=["value"])
    if threads is not None:
        rows = rows[rows["config.threads"] == threads]
    rows = newest_setting(rows)
    out = []
    for stage in STAGES:
        achieved = value_of(rows, stage=stage)
        if achieved is None:
            continue
        threads_used = select(rows, stage=stage)["config.threads"].iloc[-1]
        ceiling = value_of(df, stage="gemm", metric="gflops_ceiling", variant=dtype, **{"config.threads": threads_used})
        if ceiling:
            out.append(dict(stage=stage, gflops=achieved, ceiling=ceiling, fraction=achieved / ceiling))
    return pd.DataFrame(out, columns=["stage", "gflops", "ceiling", "fraction"])
