"""The report's headline (notebook ``08_end_to_end``), assembled from stored records alone: the named recipes
and the ladder from ``faithful`` to ``fast`` as complete generations at the headline setting (stages, loading,
whole run, peak memory, fidelity to ``faithful``), the mini model's adherence per configuration, the targets
of the headline issue met or their gap, and the executive summary the report opens with."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from utils.measure.compare import Spread, verdict
from utils.measure.instances import HEADROOM_RULE
from utils.measure.records import notebook_environment
from utils.model.pipeline import STAGES
from utils.model.weights import COMPONENTS
from utils.optim.recipes import LADDER, RECIPES, fastest_kept, keeps_adherence, recipe
from utils.report.figures import FigureSpec, ReportInputs, context_label, drawn_from, new_figure, save_figure
from utils.report.sections import s90_cross_platform as xp

NOTEBOOK = "08_end_to_end"
BASELINE, UPSTREAM = "faithful", "upstream"
RECIPE_NAMES = ("faithful", "upstream", "fast", "small")  # the recipes the summary shows (their records' names)
# the headline issue's targets: fast against faithful and upstream (end to end), fast's PSNR, small's peak
TARGETS = dict(fast_over_faithful=8.0, fast_over_upstream=3.5, fast_psnr_db=30.0, small_peak_gib=6.0)
PARTS = ("loading", *[s for s in STAGES if s != "prepare_latents"])  # the waterfall's stack


def notebook_rows(records: pd.DataFrame, primary: str | None) -> tuple[pd.DataFrame, str | None]:
    """Notebook 08's records of one environment (the primary one if it ran the notebook, else the newest that
    did); within it, the newest run of each part (the protocol, the complete runs, the mini model)."""
    rows, chosen = notebook_environment(records, NOTEBOOK, primary)
    if chosen is None:
        return rows, None
    part = np.where(rows["config.model"] == "mini", "mini", rows["config.part"].fillna("").astype(str))
    return pd.concat([group[group["run_id"] == group["run_id"].iloc[-1]] for _, group in rows.groupby(part)]), chosen


def _get(rows: pd.DataFrame, configuration: str, stage: str, metric: str):
    hit = rows[(rows["variant"] == configuration) & (rows["stage"] == stage) & (rows["metric"] == metric)]
    return hit.iloc[-1] if len(hit) else None


def _value(rows: pd.DataFrame, configuration: str, stage: str, metric: str):
    hit = _get(rows, configuration, stage, metric)
    return None if hit is None else hit["value"]


def _part(rows: pd.DataFrame, part: str) -> pd.DataFrame:
    return rows[(rows["config.model"] != "mini") & (rows["config.part"] == part)]


def _mini(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["config.model"] == "mini"]


def _compare(rows: pd.DataFrame, baseline: str, configuration: str) -> tuple[float | None, str | None]:
    """(baseline's seconds per video / the configuration's, the protocol's verdict on the per-process values)."""
    base, mine = _get(rows, baseline, "video", "seconds"), _get(rows, configuration, "video", "seconds")
    if base is None or mine is None:
        return None, None
    judged = verdict(Spread.of(base["spread.per_run"]), Spread.of(mine["spread.per_run"]))
    return 1 / judged["ratio"], judged["verdict"]


def configurations(rows: pd.DataFrame) -> list[str]:
    """The configurations the protocol timed, in the ladder's order, then the other recipes."""
    found = list(dict.fromkeys(rows.loc[(rows["stage"] == "video") & (rows["metric"] == "seconds"), "variant"]))
    order = [name for name, _ in LADDER] + list(RECIPES)
    return sorted(found, key=lambda n: order.index(n) if n in order else len(order))


def ladder_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    """One row per configuration from the protocol's processes: the derived seconds per video (median and range
    of the processes), its parts (measured medians), peak memory, the speed-up over faithful and over upstream
    with the protocol's verdict, and the complete run's fidelity to faithful where it ran."""
    protocol, complete = _part(rows, "protocol"), _part(rows, "complete")
    out = []
    for name in configurations(protocol):
        video = _get(protocol, name, "video", "seconds")
        entry = {"configuration": name, "s per video (derived)": video["value"], "min s": video["spread.min"],
                 "max s": video["spread.max"], "processes": str(int(video["spread.n"])),
                 "loading s": sum(_value(protocol, name, f"load_{c}", "seconds") for c in COMPONENTS),
                 "encode_prompt s": _value(protocol, name, "encode_prompt", "seconds"),
                 "first step s": _value(protocol, name, "denoise", "first_step_seconds"),
                 "step s": _value(protocol, name, "denoise", "step_seconds"),
                 "skipped step s": _value(protocol, name, "denoise", "skipped_step_seconds"),
                 "evaluated steps": str(int(video["config.evaluated_steps"])),
                 "decode s": _value(protocol, name, "decode", "seconds"),
                 "peak GiB (measured)": _value(protocol, name, "video", "peak_rss") / 2**30}
        for stage in ("encode_prompt", "denoise", "decode"):  # each stage's peak, where the run stored it
            peak = _value(protocol, name, stage, "peak_rss")
            if peak is not None:
                entry[f"{stage} peak GiB (measured)"] = peak / 2**30
        entry["denoise s (derived)"] = (entry["s per video (derived)"] - entry["loading s"] - entry["encode_prompt s"]
                                        - entry["decode s"])
        for baseline in (BASELINE, UPSTREAM):
            ratio, judged = _compare(protocol, baseline, name) if name != baseline else (None, "baseline")
            entry[f"speed-up over {baseline} (derived)"] = ratio
            entry[f"verdict against {baseline}"] = judged
        for metric, label in (("psnr", "PSNR dB"), ("ssim", "SSIM"), ("latent_relative_l2", "latent rel. L2")):
            value = _value(complete, name, "fidelity", metric)
            entry[f"{label} vs faithful (derived)"] = None if name == BASELINE else value
        out.append(entry)
    return pd.DataFrame(out) if out else None


def complete_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    """One row per complete run (every step, one process): its seconds and peak (measured) against the video
    the protocol derived for the same configuration."""
    protocol, complete = _part(rows, "protocol"), _part(rows, "complete")
    names = list(dict.fromkeys(complete.loc[complete["metric"] == "seconds", "variant"]))
    out = []
    for name in names:
        measured = _value(complete, name, "complete", "seconds")
        derived = _value(protocol, name, "video", "seconds")
        evaluations = _value(complete, name, "complete", "evaluations")
        out.append({"configuration": name, "s per video (measured, one run)": measured,
                    "derived by the protocol s": derived,
                    "measured / derived": None if derived is None else measured / derived,
                    "peak GiB (measured)": _value(complete, name, "complete", "peak_rss") / 2**30,
                    "evaluations (counted)": None if evaluations is None else str(int(evaluations))})
    return pd.DataFrame(out) if out else None


def context_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    """fast's steady step in a complete run against the loop alone (measured), with the protocol's verdict."""
    context = _part(rows, "context")
    if context.empty:
        return None
    spreads, out = {}, []
    for _, row in context.iterrows():
        spreads[row["config.context"]] = Spread.of(row["spread.per_run"])
        out.append({"configuration": row["config.configuration"], "context": row["config.context"],
                    "s per step (measured, median of processes)": row["value"], "min s": row["spread.min"],
                    "max s": row["spread.max"], "processes": str(int(row["spread.n"]))})
    if {"complete run", "denoise only"} <= set(spreads):
        judged = verdict(spreads["denoise only"], spreads["complete run"])
        for entry in out:
            entry["complete run / loop alone (derived)"] = judged["ratio"]
            entry["verdict"] = judged["verdict"]
    return pd.DataFrame(out)


def mini_table(rows: pd.DataFrame) -> pd.DataFrame | None:
    """One row per configuration: the mini model's all-correct adherence per split, the paired difference to
    faithful with its margin, the verdict, and the PSNR of its clips against faithful's."""
    mini = _mini(rows)
    differences = mini[mini["metric"] == "adherence_difference"]
    if differences.empty:
        return None
    out = []
    for _, row in differences.iterrows():
        name = row["variant"]
        entry = {"configuration": name}
        for split in str(row["config.splits"]).split(","):
            hit = mini[(mini["variant"] == name) & (mini["metric"] == "all_correct") & (mini["config.split"] == split)]
            entry[f"all-correct {split} (measured)"] = hit["value"].iloc[-1] if len(hit) else None
        margin = float(row["spread.margin"])
        entry.update({"difference (paired)": row["value"], "margin (two SE)": margin,
                      "verdict": "baseline" if name == BASELINE else
                      ("within the margin" if keeps_adherence(row["value"], margin) else "loses adherence")})
        psnr = _get(mini, name, "adherence", "psnr")
        entry["PSNR dB vs faithful clips"] = None if psnr is None or name == BASELINE else psnr["value"]
        out.append(entry)
    return pd.DataFrame(out)


def fast_rung(ladder: pd.DataFrame | None, mini: pd.DataFrame | None) -> str:
    """The configuration whose records stand for the ``fast`` recipe: the rung the records support, else the rung
    named fast."""
    supported = supported_fast(ladder, mini)
    return supported["rung"] if supported else "fast"


def summary(ladder: pd.DataFrame | None, mini: pd.DataFrame | None) -> pd.DataFrame | None:
    """The executive summary: one row per recipe measured (faithful, upstream, fast, small); ``fast`` is the rung
    the records support (``supported_fast``)."""
    if ladder is None:
        return None
    by_name = ladder.set_index("configuration")
    quality = mini.set_index("configuration") if mini is not None else None
    fast = fast_rung(ladder, mini)
    out = []
    for recipe_name in RECIPE_NAMES:
        name = fast if recipe_name == "fast" else recipe_name
        if name not in by_name.index:
            continue
        row = by_name.loc[name]
        label = recipe_name if name == recipe_name else f"{recipe_name} (rung {name})"
        entry = {"recipe": label, "command": f"python -m utils.generate --recipe {recipe_name}",
                 "s per video": row["s per video (derived)"],
                 "speed-up over faithful": row["speed-up over faithful (derived)"],
                 "speed-up over upstream": row["speed-up over upstream (derived)"],
                 "peak GiB": row["peak GiB (measured)"],
                 "adherence change (mini)": None if quality is None or name not in quality.index
                 else quality.loc[name, "difference (paired)"],
                 "PSNR dB vs faithful": row["PSNR dB vs faithful (derived)"]}
        out.append(entry)
    return pd.DataFrame(out) if out else None


def targets(ladder: pd.DataFrame | None, mini: pd.DataFrame | None) -> list[dict] | None:
    """Each target of the headline issue: the value measured, the target, met or not."""
    if ladder is None:
        return None
    by_name = ladder.set_index("configuration")
    fast, out = fast_rung(ladder, mini), []

    def add(what, value, target, met):
        out.append(dict(target=what, value=value, goal=target, met=None if value is None else "yes" if met else "no"))

    if fast in by_name.index:
        row = by_name.loc[fast]
        for baseline, key in ((BASELINE, "fast_over_faithful"), (UPSTREAM, "fast_over_upstream")):
            value = row[f"speed-up over {baseline} (derived)"]
            add(f"fast over {baseline}, end to end (x)", value, TARGETS[key],
                value is not None and value >= TARGETS[key] and row[f"verdict against {baseline}"] == "faster")
        psnr = row["PSNR dB vs faithful (derived)"]
        add("fast's decoded PSNR against faithful (dB)", psnr, TARGETS["fast_psnr_db"],
            psnr is not None and psnr >= TARGETS["fast_psnr_db"])
        if mini is not None and fast in set(mini["configuration"]):
            hit = mini.set_index("configuration").loc[fast]
            add("fast's adherence change on the mini model (within the margin)", hit["difference (paired)"],
                -hit["margin (two SE)"], hit["verdict"] == "within the margin")
    if "small" in by_name.index:
        peak = by_name.loc["small", "peak GiB (measured)"]
        add("small's whole-run peak (GiB)", peak, TARGETS["small_peak_gib"], peak < TARGETS["small_peak_gib"])
    return out


def _costs(inputs: ReportInputs, ladder, mini, rows) -> pd.DataFrame | None:
    """The cost table at the headline setting: the Graviton3 projection from the primary environment's records,
    the H100 bench's rows at the same resolution and frame count."""
    if inputs.primary is None:
        return None
    protocol = _part(rows, "protocol")
    if protocol.empty:
        return None
    c = protocol.iloc[-1]
    projection = xp.graviton_projection(inputs.records, inputs.primary)
    if projection.empty or (projection["resolution"].iloc[0], int(projection["frames"].iloc[0])) != (
            c["config.resolution"], int(c["config.frames"])):
        return None  # the projection is of another setting
    costs = xp.summary(inputs.records, inputs.environments, inputs.primary)["costs"]
    h100 = costs[costs["platform"].str.contains("H100") & (costs["resolution"] == c["config.resolution"])
                 & (costs["frames"] == int(c["config.frames"])) & (costs["steps"] == int(c["config.steps"]))]
    return xp.recipe_costs(summary(ladder, mini), projection, h100, xp.prices(), BASELINE)


def recipes_table(environment: dict | None = None) -> pd.DataFrame:
    """The named recipes as the code defines them (configured), ``fast`` as chosen for ``environment`` (the
    records' fingerprint; default: this machine): what each is, its steps, its start-up settings."""
    where = {} if environment is None else dict(environment_id=environment["environment_id"], arch=environment["arch"])
    return pd.DataFrame([{"recipe": r.name, "command": f"python -m utils.generate --recipe {r.name}", "what": r.summary,
                          "steps (utils.optim.registry)": r.describe(),
                          "start-up settings": " ".join(f"{k}={v}" for k, v in r.env.items()) or "none",
                          "chosen by": r.source} for r in (recipe(name, **where) for name in RECIPES)])


def supported_fast(ladder: pd.DataFrame | None, mini: pd.DataFrame | None) -> dict | None:
    """The rung the records support as ``fast`` (``recipes.fastest_kept``: the fewest seconds per video, derived,
    among the ladder's rungs whose mini-model adherence stays within the margin of faithful), the numbers it is
    chosen on, and whether it is the rung named ``fast``; what notebook 08 stores for the ``fast`` recipe."""
    if ladder is None or mini is None:
        return None
    kept = set(mini.loc[mini["verdict"].isin(["baseline", "within the margin"]), "configuration"])
    seconds = dict(zip(ladder["configuration"], ladder["s per video (derived)"]))
    rung = fastest_kept(seconds, kept)
    if rung is None or BASELINE not in seconds:
        return None
    quality = mini.set_index("configuration").loc[rung]
    return dict(rung=rung, seconds_per_video=float(seconds[rung]), faithful_seconds_per_video=float(seconds[BASELINE]),
                adherence_difference=float(quality["difference (paired)"]), margin=float(quality["margin (two SE)"]),
                rungs_kept=[n for n, _ in LADDER if n in kept and n in seconds], is_fast=rung == "fast",
                source="notebook 08_end_to_end: seconds per video derived by the comparison protocol, adherence on "
                       "the trained mini model")


def recommendation(table: pd.DataFrame | None) -> dict | None:
    """The summary's rows the recommendation lines quote: the fastest recipe measured and the smallest."""
    if table is None:
        return None
    rows = table.set_index("recipe")
    fastest = rows["s per video"].idxmin()
    smallest = rows["peak GiB"].idxmin()
    return dict(fastest=dict(rows.loc[fastest], recipe=fastest), smallest=dict(rows.loc[smallest], recipe=smallest))


def setting(rows: pd.DataFrame) -> str | None:
    real = _part(rows, "protocol")
    if real.empty:
        return None
    c = real.iloc[-1]
    words = str(c["config.prompt"]).split()
    prompt = " ".join(words[:8]) + (" ..." if len(words) > 8 else "")
    return (f"{c['config.model']} (random weights), {c['config.resolution']} {c['config.aspect_ratio']}, "
            f"{int(c['config.frames'])} frames, {int(c['config.steps'])} steps, {int(c['config.threads'])} thread(s), "
            f"prompt \"{prompt}\"")


def waterfall_figure(rows: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Seconds per video of each configuration, stacked by part (loading, encode, denoise, decode), with the
    whole run's process range as an error bar."""
    table = ladder_table(rows)
    if table is None:
        return None
    figure, (ax,) = new_figure(8.0, 4.2)
    x = np.arange(len(table))
    bottom = np.zeros(len(table))
    columns = {"loading": "loading s", "encode_prompt": "encode_prompt s", "denoise": "denoise s (derived)",
               "decode": "decode s"}
    for part in PARTS:
        values = table[columns[part]].to_numpy(dtype=float)
        ax.bar(x, values, bottom=bottom, label=part)
        bottom += values
    low = table["s per video (derived)"] - table["min s"]
    high = table["max s"] - table["s per video (derived)"]
    ax.errorbar(x, table["s per video (derived)"], yerr=[low, high], fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(x, table["configuration"], rotation=20, ha="right")
    ax.set_ylabel("seconds per video")
    ax.legend(fontsize=8)
    ax.set_title("From faithful to fast: seconds per video by stage")
    return save_figure(figure, path)


def process_values(rows: pd.DataFrame) -> pd.DataFrame:
    """Every protocol process's own value of each configuration (long form): the derived seconds per video and
    the measured seconds per step (the median of the process's later steps that ran the blocks)."""
    protocol = _part(rows, "protocol")
    out = []
    for name in configurations(protocol):
        for stage, metric, quantity in (("video", "seconds", "seconds per video (derived)"),
                                        ("denoise", "step_seconds", "seconds per step (measured)")):
            hit = _get(protocol, name, stage, metric)
            if hit is not None:
                out += [dict(configuration=name, quantity=quantity, process=i, seconds=float(v))
                        for i, v in enumerate(Spread.of(hit["spread.per_run"]).values, 1)]
    return pd.DataFrame(out)


def spread_figure(rows: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Each protocol process's value per configuration (seaborn strip plot), its median marked: how far apart
    the fresh processes land, which is what a speed-up must clear to count."""
    import seaborn as sns  # only the figure needs it

    values = process_values(rows)
    if values.empty:
        return None
    quantities = list(dict.fromkeys(values["quantity"]))
    figure, axes = new_figure(8.0, 0.35 * values["configuration"].nunique() + 1.6, ncols=len(quantities))
    order = list(dict.fromkeys(values["configuration"]))
    for ax, quantity in zip(axes, quantities):
        shown = values[values["quantity"] == quantity]
        # seaborn's jitter draws from numpy's global generator: seeded (and restored) so every render is the same
        state = np.random.get_state()
        np.random.seed(0)
        try:
            sns.stripplot(data=shown, x="seconds", y="configuration", order=order, ax=ax, jitter=0.15, size=5,
                          alpha=0.8)
        finally:
            np.random.set_state(state)
        sns.pointplot(data=shown, x="seconds", y="configuration", order=order, ax=ax, estimator="median",
                      errorbar=None, linestyle="none", marker="|", markersize=14, color="black")
        ax.set_xscale("log")
        ax.set_xlabel(quantity)
        ax.set_ylabel("")
    for ax in axes[1:]:
        ax.set_yticklabels([])
    figure.suptitle("Each fresh process's value (dots) and the median (bar), per configuration", fontsize=10)
    return save_figure(figure, path)


def tradeoff_figure(rows: pd.DataFrame, path, environment: dict | None = None) -> Path | None:
    """Seconds per video against fidelity to faithful (PSNR) and against peak memory, per configuration."""
    table = ladder_table(rows)
    if table is None:
        return None
    figure, (left, right) = new_figure(8.0, 3.6, ncols=2)
    for _, row in table.iterrows():
        seconds, psnr = row["s per video (derived)"], row["PSNR dB vs faithful (derived)"]
        if psnr is not None and np.isfinite(psnr):
            left.scatter(seconds, psnr)
            left.annotate(row["configuration"], (seconds, psnr), fontsize=7)
        right.scatter(seconds, row["peak GiB (measured)"])
        right.annotate(row["configuration"], (seconds, row["peak GiB (measured)"]), fontsize=7)
    left.set_xlabel("seconds per video")
    left.set_ylabel("PSNR dB against faithful")
    right.set_xlabel("seconds per video")
    right.set_ylabel("whole-run peak GiB")
    return save_figure(figure, path)


def _context(inputs: ReportInputs) -> str:
    rows, chosen = notebook_rows(inputs.records, inputs.primary)
    return context_label(_part(rows, "protocol"), inputs.environments.get(chosen))


NOTEBOOKS = (NOTEBOOK,)
FIGURES = {
    "end_to_end_waterfall": FigureSpec(
        "seconds per video of each rung from faithful to fast and of the small recipe, stacked by stage (loading, "
        "encode, denoise, decode: measured medians of the protocol's processes, the denoise derived for every step), "
        "the bar: the range of the processes' derived videos",
        drawn_from(notebook_rows, waterfall_figure), describe=_context),
    "end_to_end_spread": FigureSpec(
        "the protocol's fresh processes one by one: each process's seconds per video (derived) and seconds per step "
        "(measured), per configuration, with their median", drawn_from(notebook_rows, spread_figure),
        describe=_context),
    "end_to_end_tradeoff": FigureSpec(
        "seconds per video (derived) against the decoded frames' PSNR to faithful's complete run (derived) and against "
        "the whole run's peak resident memory (measured), per configuration",
        drawn_from(notebook_rows, tradeoff_figure), describe=_context),
}


def section(inputs: ReportInputs) -> dict:
    rows, chosen = notebook_rows(inputs.records, inputs.primary)
    if chosen is None:
        return dict(headline=None, recipes=recipes_table(inputs.environments.get(inputs.primary)))
    ladder, mini = ladder_table(rows), mini_table(rows)
    table = summary(ladder, mini)
    environment = inputs.environments.get(chosen, {})
    protocol = _part(rows, "protocol")
    return dict(recipes=recipes_table(environment or None), headline=dict(
        environment=environment.get("cpu_model") or chosen, primary=chosen == inputs.primary,
        setting=setting(rows), ladder=ladder, complete=complete_table(rows), context=context_table(rows), mini=mini,
        summary=table,
        recommendation=recommendation(table), supported=supported_fast(ladder, mini),
        costs=_costs(inputs, ladder, mini, rows), cost_assumptions=xp.COST_ASSUMPTIONS, headroom=HEADROOM_RULE,
        targets=pd.DataFrame(targets(ladder, mini) or [], columns=["target", "value", "goal", "met"]),
        processes=int(protocol["config.processes"].max()) if len(protocol) else None,
        protocol_steps=int(protocol["config.protocol_steps"].max()) if len(protocol) else None))
