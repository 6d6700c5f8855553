"""Measurements of notebook ``06_int8``: the quantised Linear kernels at the transformer's real shapes,
the quantisation variants of the pipeline (fresh-process runs through ``utils.tuning``), the
sensitivity of each layer class, and decoded-frame fidelity of the variants' final latents.
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .benchmark import measure
from .pipeline import VideoSetting
from .quality import fidelity, latent_errors
from .quantize import BLOCK_CLASSES, LAYER_CLASSES, quantize_module, selected_linears

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Linear layers of one STDiT3 block by role: (name, in features, out features) as multiples of the width
LINEAR_SHAPES = {"qkv": (1, 3), "proj": (1, 1), "fc1": (1, 4), "fc2": (4, 1)}
KERNEL_SCHEMES = ("float", "w8a8_dynamic", "w8a8_dynamic_compiled", "w8a8_dynamic_ao", "w8a8_static", "w8_weight_only")

# the pipeline variants: optimisation steps (utils.optimize) and the stages they change
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
    """The ``utils.tuning`` ``stages`` task of variant ``name`` (default start-up settings)."""
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


def run_linear_cases(cases: list[dict], warmup: int, repeats: int, threads: int, busy_retries: int = 3) -> list[dict]:
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
            timing = measure(module, x, warmup=warmup, repeats=repeats, threads=threads, max_busy_retries=busy_retries)
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
