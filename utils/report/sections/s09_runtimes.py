"""Notebook ``09_runtimes``: the denoiser and the VAE decoder on ONNX Runtime and OpenVINO beside PyTorch, from
stored records alone (the variant, fidelity and adherence tables are notebook 06's, over this notebook's records)."""
from __future__ import annotations

import functools
import math

import pandas as pd

from utils.io import GIB
from utils.measure.records import notebook_environment, select, value_of
from utils.report.figures import FigureSpec, ReportInputs, context_label, drawn_from, setting_label
from utils.report.sections import s06_int8
from utils.report.sections.arm_check import PROFILE_ORDER, latest_runs

NOTEBOOK = "09_runtimes"

# e09_runtimes.VARIANTS' order: PyTorch first, then each runtime
VARIANT_ORDER = ("fp32", "bf16", "pytorch_fastest", "ort_fp32", "ort_int8", "openvino_f32", "openvino_bf16",
                 "openvino_int8_weights", "ggml_f16", "ggml_q8_0")
RUNTIMES = {"ort": "ONNX Runtime (CPU EP)", "openvino": "OpenVINO (CPU)", "ggml": "ggml (ONNX Runtime EP)"}


def runtime_of(name: str) -> str:
    return next((label for prefix, label in RUNTIMES.items() if name.startswith(prefix + "_")), "PyTorch")


def verdict_of(rows: pd.DataFrame, name: str, metric: str, stage: str = "denoise") -> str | None:
    """The comparison protocol's verdict stored with a speed-up record, or None."""
    hit = select(rows, variant=name, stage=stage, metric=metric)
    if hit.empty or "quality.verdict" not in hit.columns or pd.isna(hit["quality.verdict"].iloc[-1]):
        return None
    return hit["quality.verdict"].iloc[-1]


def variant_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Notebook 06's variant table over this notebook's records, with the runtime, the protocol's verdicts, the
    load seconds (session creation or compilation included) and, for the runtimes, the weight bytes of the
    runtime's model in place of the PyTorch module's (which stays loaded beside it: the stage peak counts both)."""
    table = s06_int8.variant_table(df, NOTEBOOK, VARIANT_ORDER)
    if table is None:
        return None
    rows = s06_int8.int8_rows(df, "variants", NOTEBOOK).drop_duplicates(["variant", "stage", "metric"], keep="last")
    table.insert(1, "runtime", [runtime_of(n) for n in table["variant"]])
    table["verdict vs fp32"] = [verdict_of(rows, n, "speedup_vs_fp32") for n in table["variant"]]
    table["verdict vs bf16"] = [verdict_of(rows, n, "speedup_vs_bf16") for n in table["variant"]]
    table["load s"] = [value_of(rows, variant=n, stage="denoise", metric="load_seconds") for n in table["variant"]]
    table["model GiB"] = [(value_of(rows, variant=n, stage="denoise", metric="runtime_bytes") or math.nan) / GIB
                          if runtime_of(n) != "PyTorch" else gib
                          for n, gib in zip(table["variant"], table["model GiB"])]
    table.insert(3, "computes in", [precision_of(rows, n, "denoise") for n in table["variant"]])
    return table.drop(columns=["stage", "quantise s"])


def precision_of(rows: pd.DataFrame, name: str, stage: str) -> str | None:
    """The precision a runtime variant computed ``stage`` in, as the runtime reported it (OpenVINO compiles a bf16
    request for f32 on a CPU without bf16 arithmetic), or None for PyTorch."""
    hit = select(rows, variant=name, stage=stage, metric="runtime_bytes")
    if hit.empty or "quality.precision" not in hit.columns:
        return None
    return hit["quality.precision"].iloc[-1]


def decode_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """The VAE decode of every variant that timed one (``e09_runtimes.DECODED``), each on PyTorch fp32's final
    latent: seconds, the speed-up and verdict against PyTorch fp32, the stage's peak, the runtime's weight bytes,
    and the frames against PyTorch fp32's (PSNR, SSIM, largest difference on the [-1, 1] scale)."""
    rows = s06_int8.int8_rows(df, "variants", NOTEBOOK).drop_duplicates(["variant", "stage", "metric"], keep="last")
    rows = select(rows, stage="decode")
    table = []
    for name in [n for n in VARIANT_ORDER if n in set(rows["variant"])]:
        seconds = value_of(rows, variant=name, metric="seconds")
        if seconds is None:
            continue
        table.append({"variant": name, "runtime": runtime_of(name), "computes in": precision_of(rows, name, "decode"),
                      "s per decode": seconds,
                      "speed-up vs fp32": value_of(rows, variant=name, metric="speedup_vs_fp32"),
                      "verdict vs fp32": verdict_of(rows, name, "speedup_vs_fp32", "decode"),
                      "stage peak GiB": (value_of(rows, variant=name, metric="peak_rss_bytes") or math.nan) / GIB,
                      "runtime GiB": (value_of(rows, variant=name, metric="runtime_bytes") or math.nan) / GIB,
                      "PSNR dB": value_of(rows, variant=name, metric="psnr"),
                      "SSIM": value_of(rows, variant=name, metric="ssim"),
                      "max abs diff": value_of(rows, variant=name, metric="max_abs_diff")})
    return pd.DataFrame(table) if table else None


def export_table(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = s06_int8.int8_rows(df, "export", NOTEBOOK).drop_duplicates(["variant", "metric"], keep="last")
    if rows.empty:
        return None
    return pd.DataFrame([{"file": name, "GiB on disk": (value_of(rows, variant=name, metric="file_bytes") or
                                                        math.nan) / GIB,
                          "made in s": value_of(rows, variant=name, metric="export_seconds"),
                          "exporter": rows["config.exporter"].iloc[-1] if "config.exporter" in rows else None}
                         for name in dict.fromkeys(rows["variant"])])


def fastest(table: pd.DataFrame | None) -> dict | None:
    """The fastest variant of each runtime (seconds per step) and the fastest overall."""
    if table is None or table.empty:
        return None
    best = table.loc[table.groupby("runtime")["s per step/call"].idxmin()]
    return dict(per_runtime=best[["runtime", "variant", "s per step/call", "speed-up vs fp32", "verdict vs fp32"]],
                overall=table.loc[table["s per step/call"].idxmin()].to_dict())


def notebook_rows(records: pd.DataFrame, primary: str | None) -> tuple[pd.DataFrame, str | None]:
    """Notebook 09's records of one environment: the primary one if it ran the notebook, else the newest that did."""
    return notebook_environment(records, NOTEBOOK, primary)


def runtimes_section(rows: pd.DataFrame, environment: dict | None = None, primary: bool = True) -> dict | None:
    """The section from notebook 09's records of one environment (``notebook_rows``); ``environment`` its
    fingerprint, ``primary`` whether it is the report's primary one."""
    if rows.empty:
        return None
    variants = variant_table(rows)
    timed = select(rows, metric="seconds_per_step")
    return dict(variants=variants, export=export_table(rows), fastest=fastest(variants), decode=decode_table(rows),
                adherence=s06_int8.adherence_table(rows, NOTEBOOK, VARIANT_ORDER),
                setting=setting_label(timed) if len(timed) else None, primary=primary,
                environment=(environment or {}).get("cpu_model"))


tradeoff_figure = functools.partial(s06_int8.tradeoff_figure, notebook=NOTEBOOK, order=VARIANT_ORDER)


def _context(inputs: ReportInputs) -> str:
    rows, chosen = notebook_rows(inputs.records, inputs.primary)
    return context_label(select(rows, metric="seconds_per_step"), inputs.environments.get(chosen))

NOTEBOOKS = (NOTEBOOK,)
FIGURES = {
    "runtimes_tradeoff": FigureSpec(
        "denoiser speed-up vs final-latent error per runtime and precision (measured, random weights), memory per "
        "variant, and the mini model's adherence per runtime path (measured)",
        drawn_from(notebook_rows, tradeoff_figure), describe=_context),
}


def arm_runtime_checks(records: pd.DataFrame) -> pd.DataFrame | None:
    """The runtime checks (``runtime_*``) of each emulated profile's latest ``make arm-check`` run: passed or
    failed, and the check's own account of what ran and its errors."""
    rows = latest_runs(records)
    if rows.empty:
        return None
    rows = rows[rows["variant"].str.startswith("runtime_")]
    if rows.empty:
        return None
    rows = rows.assign(order=rows["config.arm_profile"].map(
        lambda p: PROFILE_ORDER.index(p) if p in PROFILE_ORDER else len(PROFILE_ORDER)))
    rows = rows.sort_values(["variant", "order"])
    return pd.DataFrame({"check": rows["variant"], "profile": rows["config.arm_profile"],
                         "result": ["pass" if v == 1 else "**FAIL**" for v in rows["value"]],
                         "what ran and its error (emulated, functional only)": rows["note"]})


def section(inputs: ReportInputs) -> dict:
    rows, chosen = notebook_rows(inputs.records, inputs.primary)
    return dict(runtimes=None if chosen is None else runtimes_section(rows, inputs.environments.get(chosen),
                                                                      chosen == inputs.primary),
                runtime_arm_checks=arm_runtime_checks(inputs.records))
