"""The report's section on attention kernels and the rewrites of the bottlenecks (notebook
``05_attention``), assembled from stored records alone: tables for the template, plus the evidence from
the stage profile (notebook 02) that motivated each rewrite."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from utils.io import GIB
from utils.measure.compare import Spread
from utils.measure.records import baseline_rows, one_environment, same, select, value_of
from utils.model.dtypes import DTYPES
from utils.model.stdit3 import STDIT3_PRESETS
from utils.optim.attention import BEST_CANDIDATES, best_kernel
from utils.report.figures import (
    FigureSpec,
    ReportInputs,
    context_label,
    new_figure,
    save_figure,
    setting_label,
)
from utils.report.formats import kinds_of

# ---- notebook 05: attention kernels and the rewrites of the bottlenecks -----------------------------------

ATTENTION_KINDS = ("spatial", "temporal", "cross")

MEMORY_BUDGETS_GIB = (24, 128)  # the machines the reference path is checked against (the study's question)


def _config(rows: pd.DataFrame, name: str) -> pd.Series:
    return rows[name] if name in rows.columns else pd.Series(None, index=rows.index, dtype=object)


def attention_kernels(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Seconds per query token of each attention kernel against the sequence length (spatial: tokens per
    frame, temporal: frames; cross: queries per sample against the caption), per attention type and dtype;
    hollow markers are derived from a part of the call; dotted lines mark where SDPA and the batched
    matmul swap places."""
    rows = select(one_environment(df), notebook="05_attention", stage="attention", metric="seconds")
    if rows.empty or "config.shape" not in rows.columns:
        return None
    shape = rows["config.shape"]
    rows = rows.assign(attention=_config(rows, "config.attention"), batch=[s[0] for s in shape],
                       q_len=[s[2] for s in shape], k_len=[s[3] for s in shape])
    rows = rows.assign(x=rows["q_len"].where(rows["attention"] == "cross", rows["k_len"]),
                       us_per_token=rows["value"] / (rows["batch"] * rows["q_len"]) * 1e6)
    kinds = [k for k in ATTENTION_KINDS if k in set(rows["attention"])]
    dtypes = [d for d in ("fp32", "bf16") if d in set(rows["config.dtype"])]
    figure = Figure(figsize=(5.0 * len(dtypes), 3.4 * len(kinds)), layout="constrained")
    axes = figure.subplots(len(kinds), len(dtypes), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            chosen = rows[(rows["attention"] == kind) & (rows["config.dtype"] == dtype)]
            curves = {}
            for variant, group in chosen.groupby("variant", sort=True):
                curve = group.groupby("x").agg(y=("us_per_token", "median"),
                                               derived=("kind", lambda k: (k == "derived").any())).sort_index()
                curves[variant] = curve["y"]
                line = ax.plot(curve.index, curve["y"], label=variant, linewidth=1.2)[0]
                for measured, style in ((False, dict(facecolors=line.get_color())), (True, dict(facecolors="none"))):
                    points = curve[curve["derived"] == measured]
                    ax.scatter(points.index, points["y"], s=16, edgecolors=line.get_color(), **style)
            if "sdpa" in curves and "bmm" in curves:
                both = pd.concat([curves["sdpa"], curves["bmm"]], axis=1, keys=["sdpa", "bmm"]).dropna()
                faster = (both["bmm"] < both["sdpa"]).tolist()
                for k in range(1, len(faster)):
                    if faster[k] != faster[k - 1]:
                        at = (both.index[k - 1] * both.index[k]) ** 0.5
                        ax.axvline(at, color="k", linestyle=":", linewidth=1)
                        ax.annotate("sdpa/bmm crossover", (at, ax.get_ylim()[1]), fontsize=7, rotation=90,
                                    va="top", ha="right")
            ax.set(xscale="log", yscale="log", title=f"{kind}, {dtype}", ylabel="µs per query token",
                   xlabel="queries per sample (keys: caption)" if kind == "cross" else
                   ("tokens per frame" if kind == "spatial" else "latent frames"))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)
    figure.suptitle("Attention kernels at the model's shapes (filled: measured, hollow: derived from a part)\n"
                    f"{context_label(rows, environment)}", fontsize=10)
    return save_figure(figure, path)


def attention_memory(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Peak of a denoising step with the reference attention (derived) against tokens per sample, one
    line per frame count, per attention type (columns) and dtype (rows); grey: the same step with SDPA;
    dotted: the machines; circles: the first setting past each machine."""
    df = one_environment(df)
    rows = select(df, notebook="05_attention", metric="step_peak_bytes", variant=["reference", "sdpa"])
    if rows.empty:
        return None
    rows = rows.assign(attention=_config(rows, "config.attention"), gib=rows["value"] / GIB)
    budgets = next((b for b in _config(rows, "config.budgets")[::-1] if isinstance(b, list)), MEMORY_BUDGETS_GIB)
    kinds = [k for k in ATTENTION_KINDS if k in set(rows["attention"])]
    dtypes = [d for d in ("fp32", "bf16") if d in set(rows["config.dtype"])]
    frame_counts = sorted({int(f) for f in rows["config.frames"].dropna()})
    colors = {f: plt_color for f, plt_color in zip(frame_counts, ("tab:red", "tab:orange", "tab:purple", "tab:brown",
                                                                     "tab:pink", "tab:olive"))}
    figure = Figure(figsize=(4.6 * len(kinds), 3.6 * len(dtypes)), layout="constrained")
    axes = figure.subplots(len(dtypes), len(kinds), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            chosen = rows[(rows["attention"] == kind) & (rows["config.dtype"] == dtype)]
            for frames, group in chosen.groupby("config.frames"):
                for variant, style in (("reference", dict(marker="o", markersize=3)), ("sdpa", dict(linewidth=0.8))):
                    curve = group[group["variant"] == variant].sort_values("config.tokens")
                    ax.plot(curve["config.tokens"], curve["gib"], color=colors.get(int(frames), "k") if
                            variant == "reference" else "tab:gray", label=(f"reference, {int(frames)} frames"
                            if variant == "reference" else ("with SDPA" if frames == frame_counts[0] else None)),
                            **style)
            reference = chosen[chosen["variant"] == "reference"]
            for budget in budgets:
                ax.axhline(budget, color="grey", linestyle=":", linewidth=1)
                ax.text(0.01, budget, f"{budget} GiB machine", transform=ax.get_yaxis_transform(), fontsize=7,
                        va="bottom", color="grey")
                over = reference[reference["gib"] > budget].sort_values("gib")
                if len(over):
                    ax.scatter(over["config.tokens"].iloc[:1], over["gib"].iloc[:1], s=70, facecolors="none",
                               edgecolors="k", zorder=3)
            ax.set(xscale="log", yscale="log", title=f"{kind}, {dtype}", xlabel="tokens per sample (T x S)",
                   ylabel="step peak, GiB (derived)")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6, loc="lower right")
    figure.suptitle("Memory of a denoising step with the reference attention (weights + block working set + "
                    "score matrix, analytic);\ncircles: first setting past each machine. "
                    f"{context_label(rows, environment)}", fontsize=10)
    return save_figure(figure, path)


def rewrite_effects(df: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Left: each rewrite alone on one block pair, seconds after / before (measured side by side).
    Right: baseline and rewritten seconds of one denoising step (measured), the decode and a whole
    video (derived), per dtype, with the ratio."""
    df = one_environment(df)
    pairs = select(df, notebook="05_attention", stage="denoise", metric="block_pair_seconds")
    if pairs.empty:
        return None
    videos = select(df, notebook="05_attention", metric=["seconds_per_step", "video_seconds"])
    figure, (left, right) = new_figure(12.0, 4.0, 2)
    dtypes = [d for d in ("fp32", "bf16") if d in set(pairs["config.dtype"])]
    names = [v for v in dict.fromkeys(pairs["variant"]) if v != "baseline"]
    width = 0.8 / max(len(dtypes), 1)
    for i, dtype in enumerate(dtypes):
        mine = pairs[pairs["config.dtype"] == dtype].drop_duplicates("variant", keep="last")
        mine = mine.set_index("variant")["value"]
        ratios = [mine.get(n) / mine.get("baseline") if n in mine and "baseline" in mine else float("nan")
                  for n in names]
        positions = [k + (i - (len(dtypes) - 1) / 2) * width for k in range(len(names))]
        bars = left.bar(positions, ratios, width, label=dtype)
        for bar, ratio in zip(bars, ratios):
            left.annotate(f"{ratio:.2f}", (bar.get_x() + bar.get_width() / 2, ratio), xytext=(0, 2),
                          textcoords="offset points", ha="center", fontsize=7)
    left.axhline(1.0, color="k", linewidth=0.8)
    left.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
    left.set(ylabel="block-pair seconds, rewritten / baseline", title="Each rewrite alone (one block pair, measured)")
    left.legend(fontsize=7)
    labels, positions = [], []
    for i, dtype in enumerate(dtypes):
        for j, (stage, metric, what) in enumerate((("denoise", "seconds_per_step", "step"),
                                                   ("decode", "video_seconds", "decode*"),
                                                   ("total", "video_seconds", "video*"))):
            x = i * 4 + j
            values = [value_of(videos, stage=stage, metric=metric, variant=v, **{"config.dtype": dtype})
                      for v in ("baseline", "rewritten")]
            for offset, value, color in ((-0.2, values[0], "tab:gray"), (0.2, values[1], "tab:green")):
                if value is not None:
                    right.bar(x + offset, value, 0.4, color=color)
            if None not in values:
                right.annotate(f"x{values[1] / values[0]:.2f}", (x, max(values)), xytext=(0, 2),
                               textcoords="offset points", ha="center", fontsize=7)
            labels.append(f"{dtype}\n{what}")
            positions.append(x)
    right.set_xticks(positions, labels, fontsize=7)
    right.set_yscale("log")
    right.set(ylabel="seconds", title="All rewrites: baseline (grey), rewritten (green)\n"
                                      "one step measured; * derived per video")
    figure.suptitle(f"Rewrites of the bottlenecks\n{setting_label(pairs)}\n{context_label(pairs, environment)}",
                    fontsize=10)
    return save_figure(figure, path)

NOTEBOOK = "05_attention"

KINDS = ("spatial", "temporal", "cross")

DTYPE_ORDER = ("fp32", "bf16")

REWRITE_NAMES = ("attention", "cache_text_kv", "fused_rope", "fused_modulate")

CHANGES = {  # what each rewrite changes, in words (the numbers come from records)
    "attention": "per attention type the fastest measured kernel (`attention(spatial=best, temporal=best, "
                 "cross=best)`); the caption's padding trimmed from the cross-attention's keys",
    "cache_text_kv": "caption projection and each block's cross-attention K/V computed once per caption, "
                     "not per step",
    "fused_rope": "temporal RoPE as one complex multiply by a cached table instead of a chain of elementwise passes",
    "fused_modulate": "LayerNorm + modulation as one affine LayerNorm (shared CFG modulation); gated residuals "
                      "as addcmul",
    "vae_channels_last": "VAE convolutions in channels-last layout",
}

BLOCK_GROUPS = ("spatial_attn", "temporal_attn", "cross_attn", "mlp", "other")  # once per block pair


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(None, index=df.index, dtype=object)


def _quality(rows: pd.DataFrame) -> dict:
    """The quality fields of the newest row (stored flattened as ``quality.<name>`` columns)."""
    if rows.empty:
        return {}
    last = rows.iloc[-1]
    return {c.removeprefix("quality."): last[c] for c in rows.columns
            if c.startswith("quality.") and not pd.isna(last[c])}


def _pct(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{100 * float(x):.1f} %"


def _mine(df: pd.DataFrame) -> pd.DataFrame:
    """This notebook's records, the newest of each identity (config values compared as text: some are lists)."""
    rows = select(df, notebook=NOTEBOOK)
    if rows.empty:
        return rows
    config_columns = [c for c in rows.columns if c.startswith("config.")]
    config = [repr(tuple(r)) for r in rows[config_columns].itertuples(index=False)]
    identity = rows[["variant", "stage", "metric"]].assign(config=config)
    return rows[~identity.duplicated(keep="last")]


# ---- kernels --------------------------------------------------------------------------------------------

def kernel_table(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = select(df, metric="sdpa_kernel")
    if rows.empty:
        return None
    return pd.DataFrame({"dtype": rows["config.dtype"], "mask": _column(rows, "config.mask"),
                         "aten op": rows["variant"]}).drop_duplicates(keep="last").reset_index(drop=True)


def _timings(df: pd.DataFrame) -> pd.DataFrame:
    rows = select(df, stage="attention", metric="seconds")
    if rows.empty:
        return rows
    shape = _column(rows, "config.shape")
    return rows.assign(attention=_column(rows, "config.attention"),
                       batch=[s[0] if isinstance(s, list) else None for s in shape],
                       q_len=[s[2] if isinstance(s, list) else None for s in shape],
                       k_len=[s[3] if isinstance(s, list) else None for s in shape],
                       error=_column(rows, "quality.rel_l2_error_vs_fp64"))


def kernels_at_setting(df: pd.DataFrame, resolution, frames) -> pd.DataFrame | None:
    """Seconds of each variant per attention type and dtype at the end-to-end setting, with its error."""
    rows = _timings(df)
    if rows.empty:
        return None
    rows = rows[(rows["config.resolution"] == resolution) & (rows["config.frames"] == frames)]
    if rows.empty:
        return None
    out = []
    for (kind, variant), group in rows.groupby(["attention", "variant"], sort=False):
        entry = {"attention": kind, "variant": variant}
        for dtype in DTYPE_ORDER:
            one = group[group["config.dtype"] == dtype]
            entry[f"{dtype} s"] = one["value"].iloc[-1] if len(one) else None
            entry[f"{dtype} rel. error"] = one["error"].iloc[-1] if len(one) else None
        entry["kind"] = " + ".join(sorted(set(group["kind"])))
        out.append(entry)
    order = {k: i for i, k in enumerate(KINDS)}
    table = pd.DataFrame(out).sort_values("attention", key=lambda s: s.map(order), kind="stable")
    return table.reset_index(drop=True)


def crossovers(df: pd.DataFrame) -> pd.DataFrame | None:
    """Per attention type and dtype, the sequence lengths where the faster of SDPA and the batched
    matmul changes (medians of seconds per query token over the settings of each length)."""
    rows = _timings(df)
    if len(rows):
        rows = rows[rows["variant"].isin(["sdpa", "bmm"]) & rows["attention"].isin(["spatial", "temporal"])]
    if rows.empty:
        return None
    rows = rows.assign(per_token=rows["value"] / (rows["batch"] * rows["q_len"]))
    out = []
    for (kind, dtype), group in rows.groupby(["attention", "config.dtype"]):
        curve = group.pivot_table(index="k_len", columns="variant", values="per_token", aggfunc="median").dropna()
        if curve.shape[1] < 2 or curve.empty:
            continue
        faster = (curve["bmm"] < curve["sdpa"]).map({True: "bmm", False: "sdpa"})
        changes = [f"{faster.index[i - 1]}→{faster.index[i]}" for i in range(1, len(faster))
                   if faster.iloc[i] != faster.iloc[i - 1]]
        out.append({"attention": kind, "dtype": dtype, "lengths measured": ", ".join(map(str, curve.index)),
                    "faster at the shortest": faster.iloc[0], "faster at the longest": faster.iloc[-1],
                    "crossover between lengths": ", ".join(changes) or "none"})
    return pd.DataFrame(out) if out else None


def _best_entries(df: pd.DataFrame) -> list[dict]:
    """The ``best`` table's entries as this notebook stored them (records ``best_kernel_seconds``)."""
    rows = select(df, metric="best_kernel_seconds")
    return [dict(attention=r["config.attention"], dtype=r["config.dtype"], best=r["variant"],
                 key_length=int(r["config.key_length"]),
                 **({"query_length": int(r["config.query_length"])} if not pd.isna(r.get("config.query_length"))
                    else {})) for _, r in rows.iterrows()]


def best_table(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = select(df, metric="best_kernel_seconds")
    if rows.empty:
        return None
    per_shape = "config.query_length" in rows.columns and rows["config.query_length"].notna().any()
    return pd.DataFrame({"attention": _column(rows, "config.attention"), "dtype": rows["config.dtype"],
                         **({"query length": _column(rows, "config.query_length")} if per_shape else {}),
                         "key length": _column(rows, "config.key_length"), "best": rows["variant"],
                         ("all candidates (s)" if per_shape else "all candidates (s, summed over settings)"):
                         rows["note"]}).reset_index(drop=True)


def best_at_setting(df: pd.DataFrame, resolution, frames) -> pd.DataFrame | None:
    """Per attention type and dtype at the end-to-end setting: the kernel ``best`` picks there
    (``utils.optim.attention.best_kernel`` over the stored entries, nearest call shape), the fastest
    candidate measured at that shape, and their seconds."""
    entries, rows = _best_entries(df), _timings(df)
    if not entries or rows.empty:
        return None
    rows = rows[(rows["config.resolution"] == resolution) & (rows["config.frames"] == frames)
                & rows["variant"].isin(BEST_CANDIDATES)]
    out = []
    for (kind, dtype), group in rows.groupby(["attention", "config.dtype"], sort=False):
        seconds = group.drop_duplicates("variant", keep="last").set_index("variant")["value"]
        q_len, k_len = int(group["q_len"].iloc[-1]), int(group["k_len"].iloc[-1])
        picked = best_kernel(entries, kind, DTYPES[dtype], q_len, k_len)
        fastest = seconds.idxmin()
        out.append({"attention": kind, "dtype": dtype, "query length": q_len, "key length": k_len,
                    "best picks": picked, "its s": seconds.get(picked), "fastest measured": fastest,
                    "fastest s": seconds[fastest], "agree": "yes" if picked == fastest else "no"})
    order = {k: i for i, k in enumerate(KINDS)}
    return pd.DataFrame(out).sort_values("attention", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def upstream_formulation(records: pd.DataFrame, environments: dict | None = None) -> pd.DataFrame | None:
    """The faithful transformer call against upstream's own caption formulation, alternated in one process
    (``e05_attention.upstream_formulation_check``), from the newest environment that ran it (any machine: the
    comparison is within one process): per dtype the medians and ranges, ratio, verdict and the CPU."""
    if "notebook" not in records.columns:
        return None
    ratios = select(records, notebook=NOTEBOOK, metric="ratio_vs_upstream_formulation")
    if ratios.empty:
        return None
    environment = ratios.sort_values("time", kind="stable")["environment_id"].iloc[-1]
    mine = records[records["environment_id"] == environment]
    calls = select(mine, notebook=NOTEBOOK, metric="transformer_call_seconds")
    ratios = select(mine, notebook=NOTEBOOK, metric="ratio_vs_upstream_formulation")
    cpu = (environments or {}).get(environment, {}).get("cpu_model", environment)
    isa = (environments or {}).get(environment, {}).get("isa_torch")
    out = []
    for dtype in DTYPE_ORDER:
        ratio = ratios[ratios["config.dtype"] == dtype]
        if ratio.empty:
            continue
        ratio = ratio.iloc[-1]
        row = {"dtype": dtype}
        for variant in ("faithful", "upstream"):
            call = calls[(calls["config.dtype"] == dtype) & (calls["variant"] == variant)].iloc[-1]
            row[f"{variant} s"] = call["value"]
            row[f"{variant} range s"] = f"{call['spread.min']:.4g}-{call['spread.max']:.4g}"
        row.update({"calls each": int(call["spread.n_processes"]), "faithful / upstream": ratio["value"],
                    "verdict": ratio["quality.verdict"], "rel. L2 diff": ratio["quality.rel_l2_diff"],
                    "CPU": f"{cpu} ({isa})" if isa else cpu, "kind": "measured (ratio derived)"})
        out.append(row)
    return pd.DataFrame(out) if out else None


def memory_wall(df: pd.DataFrame) -> pd.DataFrame | None:
    """Per attention type, dtype and machine size: the smallest setting whose denoising step with the
    reference attention needs more memory than the machine has, what the score matrix adds there, and
    the first setting where the step does not fit even with SDPA (all derived)."""
    rows = select(df, variant="reference", metric="step_peak_bytes")
    if rows.empty:
        return None
    rows = rows.assign(attention=_column(rows, "config.attention"))
    sdpa = select(df, variant="sdpa", metric="step_peak_bytes")
    sdpa = sdpa.assign(attention=_column(sdpa, "config.attention"))
    scores = select(df, variant="reference", metric="attention_peak_bytes")
    budgets = next((b for b in _column(rows, "config.budgets")[::-1] if isinstance(b, list)), MEMORY_BUDGETS_GIB)
    name = lambda row: f"{row['config.resolution']} {int(row['config.frames'])} frames"  # noqa: E731
    out = []
    for (kind, dtype), group in rows.groupby(["attention", "config.dtype"], sort=False):
        with_sdpa = sdpa[(sdpa["attention"] == kind) & (sdpa["config.dtype"] == dtype)]
        for budget in budgets:
            over = group[group["value"] > budget * GIB].sort_values("value")
            sdpa_over = with_sdpa[with_sdpa["value"] > budget * GIB].sort_values("value")
            first = None if over.empty else over.iloc[0]
            attention_bytes = None if first is None else value_of(
                scores[(_column(scores, "config.attention") == kind) & (scores["config.dtype"] == dtype)],
                **{"config.resolution": first["config.resolution"], "config.frames": first["config.frames"]})
            out.append({"attention": kind, "dtype": dtype, "machine GiB": budget,
                        "first setting that does not fit (reference)": "none" if first is None else name(first),
                        "step peak there (GiB)": None if first is None else first["value"] / GIB,
                        "of which scores (GiB)": None if attention_bytes is None else attention_bytes / GIB,
                        "first that does not fit with SDPA": "none" if sdpa_over.empty else name(sdpa_over.iloc[0])})
    return pd.DataFrame(out)


def confirm(df: pd.DataFrame) -> dict | None:
    measured = select(df, metric="confirm_peak_increase_bytes")
    if measured.empty:
        return None
    row = measured.iloc[-1]
    return dict(setting=f"{row['config.resolution']} {int(row['config.frames'])} frames", dtype=row["config.dtype"],
                attention=_column(measured, "config.attention").iloc[-1],
                exceeds=bool(_column(measured, "config.exceeds_budget").iloc[-1]),
                fraction=_column(measured, "config.fraction").iloc[-1], measured=row["value"],
                predicted=value_of(df, metric="confirm_predicted_bytes"),
                full=value_of(df, metric="confirm_full_predicted_bytes"))


# ---- rewrites ---------------------------------------------------------------------------------------------

def _profile_share(df: pd.DataFrame, **criteria) -> float | None:
    return value_of(select(df, notebook="02_stage_profile"), **criteria)


def evidence(df: pd.DataFrame) -> dict[str, str]:
    """What the stage profile (notebook 02) showed for each rewrite, from its records."""
    share = lambda group: _profile_share(df, stage="denoise", metric="share", variant=group)  # noqa: E731
    op = lambda stage, cls: _profile_share(df, stage=stage, metric="self_share", variant=cls)  # noqa: E731
    return {
        "attention": f"spatial {_pct(share('spatial_attn'))}, temporal {_pct(share('temporal_attn'))}, cross "
                     f"{_pct(share('cross_attn'))} of the step; attention kernels "
                     f"{_pct(op('denoise', 'attention'))} of its operator time",
        "cache_text_kv": f"cross-attention {_pct(share('cross_attn'))} of the step, its K/V projection of the "
                         "unchanged caption redone every step",
        "fused_rope": f"temporal attention {_pct(share('temporal_attn'))} against spatial "
                      f"{_pct(share('spatial_attn'))} of the step with the same projection FLOPs and far fewer "
                      "attention FLOPs",
        "fused_modulate": f"'other' (norms, modulation, residuals) {_pct(share('other'))} of the step; elementwise "
                          f"operators {_pct(op('denoise', 'elementwise'))}",
        "vae_channels_last": f"convolutions {_pct(op('decode', 'convolution'))} of the decode's operator time",
    }


def rewrite_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Per rewrite and dtype: the block pair's seconds and added peak memory before and after, and the
    output difference against the baseline pair (all measured in one run)."""
    rows = select(df, stage="denoise", metric="block_pair_seconds")
    if rows.empty:
        return None
    memory = select(df, stage="denoise", metric="block_pair_peak_rss_increase_bytes")
    out = []
    for name in (*REWRITE_NAMES, "all"):
        for dtype in DTYPE_ORDER:
            same = {"config.dtype": dtype}
            after, before = select(rows, variant=name, **same), select(rows, variant="baseline", **same)
            if after.empty or before.empty:
                continue
            quality = _quality(after)
            seconds_before, seconds_after = before["value"].iloc[-1], after["value"].iloc[-1]
            out.append({"rewrite": name, "dtype": dtype, "pair s before": seconds_before,
                        "pair s after": seconds_after, "ratio": seconds_after / seconds_before,
                        "added peak MiB before": value_of(memory, variant="baseline", **{"config.dtype": dtype}),
                        "added peak MiB after": value_of(memory, variant=name, **{"config.dtype": dtype}),
                        "rel. L2 diff": quality.get("rel_l2_diff"), "max abs diff": quality.get("max_abs_diff")})
    table = pd.DataFrame(out)
    for column in ("added peak MiB before", "added peak MiB after"):
        table[column] = table[column] / 2**20
    return table


def rewrite_reasons(df: pd.DataFrame) -> pd.DataFrame:
    """Per rewrite: what the stage profile showed (from notebook 02's records) and what changes."""
    found = evidence(df)
    return pd.DataFrame([{"rewrite": name, "evidence (stage profile, notebook 02)": found[name],
                          "change": CHANGES[name]} for name in (*REWRITE_NAMES, "vae_channels_last")])


def end_to_end(df: pd.DataFrame) -> pd.DataFrame | None:
    """Per dtype and stage: baseline and rewritten seconds (measured step, derived decode and video) and peaks."""
    steps = select(df, stage="denoise", metric="seconds_per_step")
    if steps.empty:
        return None
    out = []
    for dtype in DTYPE_ORDER:
        mine = select(df, **{"config.dtype": dtype})
        if select(steps, **{"config.dtype": dtype}).empty:
            continue
        quality = _quality(select(mine, stage="denoise", metric="seconds_per_step", variant="rewritten"))
        lines = [("one denoising step (measured)", "denoise", "seconds_per_step", "peak_rss_bytes", quality)]
        parts = select(mine, stage="decode", metric="part_seconds", variant="rewritten")
        for part in ("temporal_chunk", "spatial_batch"):
            one = parts[_column(parts, "config.part") == part]
            q = _quality(one)
            lines.append((f"decode: {part} (measured)", "decode", ("part_seconds", part), "part_peak_rss_bytes", q))
        lines += [(f"{stage} per video (derived)", stage, "video_seconds", None, {})
                  for stage in ("denoise", "decode", "total")]
        for label, stage, metric, peak_metric, q in lines:
            values = {}
            for variant in ("baseline", "rewritten"):
                if isinstance(metric, tuple):
                    pick = select(mine, stage=stage, metric=metric[0], variant=variant)
                    pick = pick[_column(pick, "config.part") == metric[1]]
                    values[variant] = value_of(pick)
                    peak = select(mine, stage=stage, metric=peak_metric, variant=variant)
                    values[f"{variant} peak"] = value_of(peak[_column(peak, "config.part") == metric[1]])
                else:
                    values[variant] = value_of(mine, stage=stage, metric=metric, variant=variant)
                    values[f"{variant} peak"] = (value_of(mine, stage=stage, metric=peak_metric, variant=variant)
                                                 if peak_metric else None)
            if values["baseline"] is None:
                continue
            gib = {v: None if values[f"{v} peak"] is None else values[f"{v} peak"] / GIB
                   for v in ("baseline", "rewritten")}
            out.append({"dtype": dtype, "what": label, "baseline s": values["baseline"],
                        "rewritten s": values["rewritten"],
                        "ratio": values["rewritten"] / values["baseline"] if values["rewritten"] else None,
                        "baseline peak GiB": gib["baseline"], "rewritten peak GiB": gib["rewritten"],
                        "rel. L2 diff": q.get("rel_l2_diff")})
    return pd.DataFrame(out) if out else None


def bottlenecks_after(df: pd.DataFrame) -> pd.DataFrame | None:
    """The ranked bottlenecks of one video after the rewrites (derived): the rewritten denoiser split by
    the module groups of the rewritten block pair (block groups x depth, embedders and final layer once),
    the rewritten decode, and the unchanged encode."""
    groups = select(df, stage="denoise", metric="pair_group_ms")
    if groups.empty:
        return None
    out = []
    for dtype in DTYPE_ORDER:
        mine = select(df, **{"config.dtype": dtype})
        stages = ("encode_prompt", "denoise", "decode")
        video = {s: value_of(mine, stage=s, metric="video_seconds", variant="rewritten") for s in stages}
        before = {s: value_of(mine, stage=s, metric="video_seconds", variant="baseline") for s in stages}
        rows = []
        for variant, target in (("all", video), ("baseline", before)):
            pair = select(groups, variant=variant, **{"config.dtype": dtype})
            if pair.empty or target["denoise"] is None:
                rows.append(None)
                continue
            depth = pd.to_numeric(_column(pair, "config.depth"), errors="coerce").fillna(1).astype(int)
            per_step = {g: v * (d if g in BLOCK_GROUPS else 1)
                        for g, v, d in zip(_column(pair, "config.group"), pair["value"], depth)}
            total = sum(per_step.values())
            parts = {f"denoise: {g}": target["denoise"] * ms / total for g, ms in per_step.items()}
            parts.update({s: target[s] for s in ("decode", "encode_prompt") if target[s] is not None})
            rows.append(parts)
        after, base = rows
        if after is None:
            continue
        total = sum(after.values())
        for where, seconds in sorted(after.items(), key=lambda kv: -kv[1]):
            out.append({"dtype": dtype, "where": where, "seconds per video before (derived)": (base or {}).get(where),
                        "seconds per video after (derived)": seconds, "share after": seconds / total})
    if not out:
        return None
    table = pd.DataFrame(out)
    table.insert(0, "rank", table.groupby("dtype").cumcount() + 1)
    return table


def micro_batches(df: pd.DataFrame) -> pd.DataFrame | None:
    rows = select(df, stage="decode", metric="seconds_per_micro_batch")
    if rows.empty:
        return None
    memory = select(df, stage="decode", metric="micro_batch_peak_rss_increase_bytes")
    sizes = _column(rows, "config.micro_batch")
    added = [value_of(memory[_column(memory, "config.micro_batch") == s], **{"config.dtype": d})
             for s, d in zip(sizes, rows["config.dtype"])]
    return pd.DataFrame({"dtype": rows["config.dtype"], "frames per call": sizes,
                         "s per frame": rows["value"] / sizes.astype(float),
                         "added peak MiB": [None if a is None else a / 2**20 for a in added]})


SAME_VIDEO = ("config.model", "config.resolution", "config.aspect_ratio", "config.frames", "config.steps",
              "config.threads", "config.dtype")


def baseline_elsewhere(df: pd.DataFrame, mine: pd.DataFrame) -> dict | None:
    """This notebook's fp32 baseline video (derived) beside ``01_baseline``'s when both are at the same setting:
    two runs of one quantity, each named by its run."""
    here = select(mine, stage="total", metric="video_seconds", variant="baseline", **{"config.dtype": "fp32"})
    there = select(baseline_rows(df), stage="total", metric="video_seconds")
    if here.empty or there.empty:
        return None
    here, there = here.iloc[-1], there.iloc[-1]
    if not all(same(pd.Series([there.get(k)], dtype=object), here.get(k)).iloc[0] for k in SAME_VIDEO):
        return None
    return dict(here=here["value"], here_run=here["run_id"], there=there["value"], there_run=there["run_id"])


def step_protocol(rows: pd.DataFrame) -> pd.DataFrame | None:
    """The rewritten step against the baseline between fresh processes (``e05_attention.step_between_processes``):
    per dtype each variant's median step and process range, the speed-up and the protocol's verdict."""
    speedups = select(rows, metric="step_speedup", variant="rewritten")
    if speedups.empty:
        return None
    out = []
    for dtype in DTYPE_ORDER:
        ours = speedups[speedups["config.dtype"] == dtype]
        if ours.empty:
            continue
        row = ours.iloc[-1]
        entry = {"dtype": dtype}
        for variant, key in (("baseline", "spread.baseline"), ("rewritten", "spread.variant")):
            spread = Spread.of(row[f"{key}.per_process"])
            entry[f"{variant} s per step"] = spread.median
            entry[f"{variant} range s"] = f"{spread.low:.4g}-{spread.high:.4g}"
        entry.update({"processes each": len(spread.values), "speed-up": row["value"], "verdict": row["quality.verdict"],
                      "kind": "measured (speed-up derived)"})
        out.append(entry)
    return pd.DataFrame(out) if out else None


def attention_section(df: pd.DataFrame) -> dict | None:
    mine = _mine(df)
    if mine.empty:
        return None
    in_processes = _column(mine, "config.experiment") == "step_protocol"
    protocol, mine = mine[in_processes], mine[~in_processes]
    e2e_rows = select(mine, stage="denoise", metric="seconds_per_step")
    setting_rows = e2e_rows if len(e2e_rows) else mine
    last = setting_rows.iloc[-1]
    ratios = {d: value_of(mine, metric="video_ratio", **{"config.dtype": d}) for d in DTYPE_ORDER}
    layout = {d: value_of(mine, metric="layout_seconds_per_step", **{"config.dtype": d}) for d in DTYPE_ORDER}
    steps = {d: value_of(mine, stage="denoise", metric="seconds_per_step", variant="baseline", **{"config.dtype": d})
             for d in DTYPE_ORDER}
    return dict(
        setting=setting_label(setting_rows), threads=last["config.threads"], kernels=kernel_table(mine),
        kernels_kind=kinds_of(select(mine, metric="sdpa_kernel")),
        at_setting=kernels_at_setting(mine, last["config.resolution"], last["config.frames"]),
        crossovers=crossovers(mine), best=best_table(mine), wall=memory_wall(mine), confirm=confirm(mine),
        best_at_setting=best_at_setting(mine, last["config.resolution"], last["config.frames"]),
        step_protocol=step_protocol(protocol),
        skipped=len(select(mine, metric="skipped")), timed=len(select(mine, stage="attention", metric="seconds")),
        derived=len(select(mine, stage="attention", metric="seconds", kind="derived")),
        rewrites=rewrite_table(df), reasons=rewrite_reasons(df), end_to_end=end_to_end(mine),
        ratios={d: r for d, r in ratios.items() if r is not None},
        layout={d: (s, layout[d] / steps[d] if steps[d] else None) for d, s in layout.items() if s is not None},
        bottlenecks_after=bottlenecks_after(mine), micro_batches=micro_batches(mine),
        steps=e2e_rows["config.steps"].dropna().iloc[-1] if e2e_rows["config.steps"].notna().any() else None,
        caption_keys=STDIT3_PRESETS["STDiT3-XL/2"].model_max_length, baseline_elsewhere=baseline_elsewhere(df, mine))


# ---- the section's interface (utils.report.render) ----------------------------------------------------

NOTEBOOKS = (NOTEBOOK,)
FIGURES = {  # their context lines describe the baseline notebooks' records, as before the layout change
    "attention_kernels": FigureSpec.of_records(
        attention_kernels, "attention kernels: µs per query token against sequence length, per type and dtype "
                           "(measured or derived)"),
    "attention_memory": FigureSpec.of_records(
        attention_memory, "step peak with the reference attention against tokens, with the machines' memory (derived)"),
    "rewrite_effects": FigureSpec.of_records(
        rewrite_effects, "each rewrite on one block pair (measured); all rewrites per stage and per video (measured "
                         "and derived)"),
}


def section(inputs: ReportInputs) -> dict:
    attention = attention_section(inputs.df)
    if attention is not None:
        attention["upstream"] = upstream_formulation(inputs.records, inputs.environments)
    return dict(attention=attention)
