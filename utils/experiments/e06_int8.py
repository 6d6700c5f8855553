"""What notebook ``06_int8`` runs: the quantised Linear kernels at the transformer's real shapes, calibration
inputs for static quantisation, the quantisation variants of the pipeline (each in a fresh process,
``variant_runs``), decoded-frame fidelity of the variants' final latents, the sensitivity of each layer class,
and the trained mini model's adherence per variant, each stored as records.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from utils.experiments.variant_runs import (
    adherence_records_of,
    experiment_config,
    fidelity_records,
    ratio_records,
    run_all,
    run_compared,
    stage_records,
)
from utils.measure.benchmark import TimingPolicy, measure
from utils.measure.fidelity import fidelity, latent_errors
from utils.measure.results import Record, ResultsStore, make_config, timing_record
from utils.model.dtypes import DTYPES
from utils.model.pipeline import VideoSetting, load_pipeline
from utils.optim.attention import setting_shapes
from utils.optim.quantize import BLOCK_CLASSES, LAYER_CLASSES, capture_inputs, quantize_module, selected_linears
from utils.testbed import minimodel
from utils.testbed.synthetic import TRAIN

# Linear layers of one STDiT3 block by role: (name, in features, out features) as multiples of the width
LINEAR_SHAPES = {"qkv": (1, 3), "proj": (1, 1), "fc1": (1, 4), "fc2": (4, 1)}

KERNEL_SCHEMES = ("float", "w8a8_dynamic", "w8a8_dynamic_compiled", "w8a8_dynamic_ao", "w8a8_static", "w8_weight_only")

# the pipeline variants: optimisation steps (utils.optim.registry) and the stages they change
VARIANTS = {
    # the faithful baseline and the fidelity reference (its final latent is decoded with the others')
    "fp32": dict(steps={}, stages=("encode_prompt", "denoise")),
    "bf16": dict(steps={"bf16": {}}, stages=("denoise",)),
    "w8a8_dynamic": dict(steps={"quantize": {"scheme": "w8a8_dynamic"}}, stages=("denoise",)),
    "w8a8_dynamic_all": dict(steps={"quantize": {"scheme": "w8a8_dynamic", "classes": list(LAYER_CLASSES)}},
                             stages=("denoise",)),
    "bf16+w8a8_dynamic": dict(steps={"bf16": {}, "quantize": {"scheme": "w8a8_dynamic"}}, stages=("denoise",)),
    # torchao's int8 kernels run fused only under torch.compile (regional: the transformer's blocks)
    "bf16+compile": dict(steps={"bf16": {}, "compile": {}}, stages=("denoise",)),
    "w8a8_dynamic+compile": dict(steps={"quantize": {"scheme": "w8a8_dynamic"}, "compile": {}}, stages=("denoise",)),
    "bf16+w8a8_dynamic+compile": dict(steps={"bf16": {}, "quantize": {"scheme": "w8a8_dynamic"}, "compile": {}},
                                      stages=("denoise",)),
    "w8a8_dynamic_ao": dict(steps={"quantize": {"scheme": "w8a8_dynamic_ao"}}, stages=("denoise",)),
    "w8a8_static": dict(steps={"quantize": {"scheme": "w8a8_static"}}, stages=("denoise",)),  # + calibration
    "w8a8_static_plain": dict(steps={"quantize": {"scheme": "w8a8_static", "alpha": None}}, stages=("denoise",)),
    "w8_weight_only": dict(steps={"quantize": {"scheme": "w8_weight_only"}}, stages=("denoise",)),
    "bf16+w8_weight_only": dict(steps={"bf16": {}, "quantize": {"scheme": "w8_weight_only"}}, stages=("denoise",)),
    "t5_w8a8_dynamic": dict(steps={"quantize": {"scheme": "w8a8_dynamic", "component": "text_encoder"}},
                            stages=("encode_prompt",)),
    "t5_w8_weight_only": dict(steps={"quantize": {"scheme": "w8_weight_only", "component": "text_encoder"}},
                              stages=("encode_prompt",)),
}


def variant_steps(name: str, calibration: str | Path | None = None) -> dict:
    """The optimisation steps of variant ``name``; a static variant gets the ``calibration`` file."""
    if name not in VARIANTS:
        raise ValueError(f"unknown int8 variant {name!r}; accepted: {', '.join(VARIANTS)}")
    steps = copy.deepcopy(VARIANTS[name]["steps"])
    if steps.get("quantize", {}).get("scheme") == "w8a8_static":
        if calibration is None:
            raise ValueError(f"{name} needs a calibration file (quantize.capture_inputs)")
        steps["quantize"]["calibration"] = str(calibration)
    return steps


def stage_run(base: dict, name: str, calibration=None, **overrides) -> tuple[str, dict, dict]:
    """The ``variant_runs`` ``stages`` task of variant ``name`` (default start-up settings)."""
    spec = base | dict(optimizations=variant_steps(name, calibration), stages=list(VARIANTS[name]["stages"]))
    return "stages", {}, spec | {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}


# ---- the Linear kernels -------------------------------------------------------------------------------

def linear_cases(width: int, tokens: dict[str, int], dtypes=("fp32", "bf16"), schemes=KERNEL_SCHEMES) -> list[dict]:
    """One case per (setting, Linear role, dtype, scheme); ``tokens`` maps a setting label to the rows
    (CFG batch x frames x tokens per frame) a Linear of the transformer sees there."""
    unknown = set(schemes) - set(KERNEL_SCHEMES)
    if unknown:
        raise ValueError(f"unknown kernel schemes {sorted(unknown)}; accepted: {', '.join(KERNEL_SCHEMES)}")
    return [dict(setting=label, rows=rows, layer=layer, in_features=width * i, out_features=width * o, dtype=dtype,
                 scheme=scheme)
            for label, rows in tokens.items() for layer, (i, o) in LINEAR_SHAPES.items() for dtype in dtypes
            for scheme in schemes if not (scheme == "w8a8_dynamic_ao" and dtype != "fp32")]


def _quantized_linear(case: dict, x: torch.Tensor) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(case["in_features"], case["out_features"])
    with torch.no_grad():  # the same weights and bias for every scheme and for the float64 reference
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) / case["in_features"] ** 0.5)
        linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator) * 0.1)
    module = nn.Sequential(linear.to(DTYPES[case["dtype"]]))
    scheme = case["scheme"]
    if scheme == "float":
        return module
    base = scheme.removesuffix("_compiled")
    quantize_module(module, base, ["0"], calibration=[((x,), {})] if base == "w8a8_static" else None)
    return torch.compile(module) if scheme.endswith("_compiled") else module


def run_linear_cases(cases: list[dict], policy: TimingPolicy) -> list[dict]:
    """Median seconds, GOP/s and the relative error against float64 of each case; the first call (with
    torch.compile: the compilation) is reported apart, and so is the time to quantise."""
    rows = []
    for case in tqdm(cases, desc="Linear kernels", unit="case"):
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(case["rows"], case["in_features"], generator=generator).to(DTYPES[case["dtype"]])
        with torch.inference_mode():
            t0 = time.perf_counter()
            module = _quantized_linear(case, x)
            quantize_s = time.perf_counter() - t0
            timing = measure(module, x, policy=policy)
            reference = _quantized_linear(case | {"scheme": "float", "dtype": "fp32"}, x)[0].double()
            exact = reference(x.double())
        error = float((timing.result.double() - exact).norm() / exact.norm())
        flops = 2 * case["rows"] * case["in_features"] * case["out_features"]
        rows.append(case | dict(seconds=timing.median_s, gops=flops / timing.median_s / 1e9, rel_error=error,
                                quantize_s=quantize_s if case["scheme"] != "float" else 0.0, timing=timing))
    return rows


# ---- sensitivity of each layer class --------------------------------------------------------------------

@torch.inference_mode()
def class_sensitivity(model: nn.Module, run, reference: torch.Tensor, scheme: str = "w8a8_dynamic",
                      groups: dict[str, tuple[str, ...]] | None = None) -> list[dict]:
    """Quantise one group of layer classes of ``model`` at a time (the float weights are put back after
    each), run ``run(model)`` and compare with ``reference`` (latent relative L2 and cosine). Groups
    default to each class alone, then the blocks, then everything."""
    groups = groups or ({name: (name,) for name in LAYER_CLASSES} | {"blocks": BLOCK_CLASSES,
                                                                    "all": tuple(LAYER_CLASSES)})
    rows = []
    for group, classes in tqdm(groups.items(), desc="layer-class sensitivity", unit="group"):
        names = selected_linears(model, "transformer", classes)
        originals = {name: model.get_submodule(name).weight for name in names}
        quantize_module(model, scheme, names)
        try:
            output = run(model)
        finally:
            for name, weight in originals.items():
                model.get_submodule(name).weight = weight
        parameters = sum(weight.numel() for weight in originals.values())
        rows.append(dict(group=group, classes=list(classes), layers=len(names), parameters=parameters,
                         output=output, **latent_errors(output.float(), reference.float())))
    return rows


def decoded_fidelity(pipe, latents: dict[str, torch.Tensor], reference: str, setting: VideoSetting) -> dict[str, dict]:
    """Decode each variant's final latent with ``pipe``'s VAE (loaded) and compare the frames with the
    decoded ``reference`` variant's (PSNR, SSIM, flicker ratio, plus the latents' errors)."""
    with torch.inference_mode():
        videos = {name: pipe.decode(z, setting) for name, z in tqdm(latents.items(), desc="decode", unit="video")}
    return {name: fidelity(video, videos[reference], latents[name], latents[reference])
            for name, video in videos.items() if name != reference}


def one_step(setting: VideoSetting) -> VideoSetting:
    return replace(setting, steps=1)


# ---- records ------------------------------------------------------------------------------------------

def kernel_records(rows: list[dict], model: str, threads: int) -> list[Record]:
    records = []
    for row in rows:
        config = make_config(model=model, dtype=row["dtype"], threads=threads, experiment="kernels",
                             layer=row["layer"], rows=row["rows"], in_features=row["in_features"],
                             out_features=row["out_features"], kernel_setting=row["setting"])
        note = f"one {row['layer']} Linear, {row['rows']} x {row['in_features']} -> {row['out_features']}"
        records += [timing_record(row["scheme"], "linear", row["timing"], config, metric="linear_seconds", note=note),
                    Record(variant=row["scheme"], stage="linear", metric="gops", unit="GOP/s", value=row["gops"],
                           kind="derived", config=config, note="2 rows in out / median seconds"),
                    Record(variant=row["scheme"], stage="linear", metric="rel_error", unit="", value=row["rel_error"],
                           spread={"n": 1}, config=config, note="relative L2 error against float64"),
                    Record(variant=row["scheme"], stage="linear", metric="quantize_seconds", unit="s",
                           value=row["quantize_s"], spread={"n": 1}, config=config)]
    return records


def variant_records(runs: dict[str, dict], steps: int) -> list[Record]:
    """Stage timings, speed-ups against fp32 and bf16 (same run), fidelity against fp32 on the same
    inputs, model bytes and quantisation time of every variant's fresh-process run."""
    config = {name: experiment_config(result, "variants") for name, result in runs.items()}
    records = []
    for name, result in runs.items():
        records += stage_records(result, name, config[name], steps)
        for stage, entry in result.get("stages", {}).items():
            for key, metric, unit in (("model_bytes", "model_bytes", "B"), ("quantize_s", "quantize_seconds", "s")):
                if entry.get(key) is not None:
                    records.append(Record(variant=name, stage=stage, metric=metric, unit=unit, value=entry[key],
                                          spread={"n": 1}, config=config[name]))
            # another runtime runs part of the stage (utils.optim.onnx_backends), its weights' size known
            if (entry.get("runtime") or {}).get("weight_bytes") is not None:
                records.append(Record(variant=name, stage=stage, metric="runtime_bytes", unit="B",
                                      value=entry["runtime"]["weight_bytes"], spread={"n": 1}, config=config[name],
                                      quality={"precision": entry["runtime"]["precision"]},
                                      note="the runtime's own weights (beside the PyTorch module); quality: the "
                                           "precision it computes in"))
        if name != "fp32" and result.get("inputs_used") and "stages" in runs.get("fp32", {}):
            records += fidelity_records(name, result["outputs"], runs["fp32"]["outputs"], config[name])
    for base in ("fp32", "bf16"):
        records += ratio_records(runs, base, lambda n: n, f"speedup_vs_{base}", lambda n: config[n],
                                 f"{base} median / variant median, same interleaved runs")
    return records


def decoded_records(decoded: dict[str, dict], runs: dict[str, dict], fidelity_steps: int) -> list[Record]:
    records = []
    for name, scores in decoded.items():
        config = experiment_config(runs[name], "variants")
        for metric, unit in (("psnr", "dB"), ("ssim", ""), ("flicker_ratio", "")):
            if scores.get(metric) is not None and math.isfinite(scores[metric]):
                records.append(Record(variant=name, stage="decode", metric=f"video_{metric}", unit=unit,
                                      value=float(scores[metric]), spread={"n": 1}, config=config, quality=scores,
                                      note=f"final latent after {fidelity_steps} steps decoded by the fp32 VAE, "
                                           "against the fp32 run's"))
    return records


def sensitivity_records(rows: list[dict], model_label: str, config: dict, scheme: str) -> list[Record]:
    return [Record(variant=row["group"], stage="denoise", metric=f"sensitivity_{metric}", unit="",
                   value=row[key], spread={"n": 1},
                   config=dict(config, experiment="sensitivity", sensitivity_model=model_label, scheme=scheme),
                   quality=dict(layers=row["layers"], parameters=row["parameters"], classes=row["classes"]),
                   note=f"only {'+'.join(row['classes'])} quantised; output latent against fp32")
            for row in rows for metric, key in (("rel_l2", "relative_l2"), ("cosine", "cosine"))]


# ---- the experiments, their records stored ---------------------------------------------------------------

def kernel_tokens(model: str, settings: list[list[str]], aspect_ratio: str) -> dict[str, int]:
    """Rows a Linear of the transformer sees at each (resolution, frames) setting: CFG batch x frames x tokens
    per frame (``"144p 2s"`` -> rows)."""
    shapes_only = load_pipeline(model, weights="random", dtype="fp32", load=())  # meta: shapes only
    tokens = {}
    for resolution, frames in settings:
        latent_frames, per_frame, _ = setting_shapes(shapes_only, VideoSetting.create(resolution, aspect_ratio, frames))
        tokens[f"{resolution} {frames}"] = 2 * latent_frames * per_frame
    return tokens


def kernels(store: ResultsStore, model: str, tokens: dict[str, int], dtypes: list[str], schemes: list[str],
            policy: TimingPolicy) -> pd.DataFrame:
    """One Linear layer per role and setting under each scheme: rate, error, quantising time; stored."""
    width = load_pipeline(model, weights="random", dtype="fp32", load=()).transformer.config.hidden_size
    rows = run_linear_cases(linear_cases(width, tokens, dtypes, schemes), policy)
    store.add(*kernel_records(rows, model, policy.threads))
    return pd.DataFrame([{k: v for k, v in row.items() if k != "timing"} for row in rows])


def calibrate(model: str, prompts: list[str], setting: VideoSetting, path: Path, mini_path: Path | None,
              mini_captions: int) -> None:
    """The transformer's Linear inputs over a short sampling run of ``prompts`` (static W8A8's calibration,
    ``optim.quantize.capture_inputs``), and of the mini model's first ``mini_captions`` training captions into
    ``mini_path`` when it is given; one model in memory at a time."""
    pipe = load_pipeline(model, weights="random", dtype="fp32", load=("text_encoder",))
    y, mask = pipe.encode_prompt(prompts)
    pipe.release("text_encoder")
    pipe.load("transformer")
    capture_inputs(pipe, y, mask, setting, path)
    pipe.release("transformer")
    if mini_path is not None:
        mini = load_pipeline("mini", weights="trained-mini", dtype="fp32")
        y, mask = mini.encode_prompt([a.caption for a in TRAIN[:mini_captions]])
        capture_inputs(mini, y, mask, minimodel.mini_setting(steps=setting.steps), mini_path, progress=False)


def variants(store: ResultsStore, base: dict, names: list[str], calibration: Path, outputs: Path,
             fidelity_steps: int, processes: int) -> dict[str, dict]:
    """Every variant's stages in ``processes`` fresh processes each, interleaved (the comparison protocol;
    fp32 first in each round, the others fed fp32's outputs), their speed-ups with the verdict, sizes and
    fidelity against fp32 (first round); returns the runs."""
    order = ["fp32"] + [v for v in names if v != "fp32"]
    runs = run_compared({v: stage_run(base, v, calibration, outputs=outputs / f"{v}.pt", fidelity_steps=fidelity_steps,
                                      inputs=None if v == "fp32" else outputs / "fp32.pt") for v in order},
                        processes, "int8 variants")
    store.add(*variant_records(runs, base["steps"]))
    return runs


def decoded(store: ResultsStore, model: str, runs: dict[str, dict], names: list[str], outputs: Path,
            setting: VideoSetting, fidelity_steps: int) -> pd.DataFrame:
    """The final latents of ``names`` decoded and compared with fp32's decoded frames; stored."""
    decoder = load_pipeline(model, weights="random", dtype="fp32", load=("vae",))
    latents = {name: torch.load(outputs / f"{name}.pt")["latent_final"] for name in ["fp32"] + names
               if name in runs and "stages" in runs[name]}
    result = decoded_fidelity(decoder, latents, "fp32", setting)
    decoder.release("vae")
    store.add(*decoded_records(result, runs, fidelity_steps))
    return pd.DataFrame(result).T


def sensitivity(store: ResultsStore, model: str, setting: VideoSetting, reference: Path, config: dict, scheme: str,
                mini_steps: int | None, threads: int) -> pd.DataFrame:
    """The output error with one layer class quantised at a time: one denoising step of the real-size model
    (against fp32's step in ``reference``) and, with ``mini_steps``, the trained mini model's whole sampling
    run of the held-out captions; stored."""
    real = load_pipeline(model, weights="random", dtype="fp32", load=("transformer",))
    ref_out = torch.load(reference)
    z = real.prepare_latents(1, setting)
    one = one_step(setting)
    rows = class_sensitivity(real.transformer,
                             lambda m: real.denoise(z, ref_out["y"], ref_out["mask"], one, progress=False),
                             ref_out["latent_one_step"], scheme)
    real.release("transformer")
    store.add(*sensitivity_records(rows, "real", config, scheme))
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "output"} | {"model": "real-size"} for r in rows])
    if mini_steps is not None:
        mini = load_pipeline("mini", weights="trained-mini", dtype="fp32")
        held_out = minimodel.split_combinations("held_out")
        _, mini_reference = minimodel.generate(mini, held_out, seed=0, steps=mini_steps)
        mini_rows = class_sensitivity(mini.transformer,
                                      lambda m: minimodel.generate(mini, held_out, seed=0, steps=mini_steps)[1],
                                      mini_reference, scheme)
        mini_config = (minimodel.quality_config("mini", "trained-mini", mini_steps, threads)
                       | {"experiment": "sensitivity"})
        store.add(*sensitivity_records(mini_rows, "mini", mini_config, scheme))
        table = pd.concat([table, pd.DataFrame([{k: v for k, v in r.items() if k != "output"} | {"model": "mini"}
                                                for r in mini_rows])])
    return table.pivot_table(index="group", columns="model", values="relative_l2")


def mini_adherence(store: ResultsStore, names: list[str], calibration: Path, threads: int, splits: list[str],
                   seeds: list[int], steps: int) -> pd.DataFrame:
    """The trained mini model's adherence with each variant's steps (default start-up settings); stored."""
    results = run_all({v: ("adherence", {}, dict(threads=threads, splits=splits, seeds=seeds, steps=steps,
                                                 optimizations=variant_steps(v, calibration))) for v in names},
                      "mini-model adherence")
    for name, result in results.items():
        store.add(*adherence_records_of(name, result, steps, threads))
    return pd.DataFrame([dict(variant=name, split=split, **summary) for name, result in results.items()
                         for split, summary in result["summaries"].items()])
