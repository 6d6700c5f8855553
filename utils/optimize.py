"""Optimisations as named switches over a built pipeline: ``apply_<name>(pipe, **options)``.

Every step is registered in ``OPTIMIZATIONS``, whose order is the order in which steps compose:
``apply(pipe, {"autocast": {}, "bf16": {}})`` applies ``bf16`` first whatever order it is given in.
The baseline (no step) is fp32 eager, faithful to upstream. A step records itself in
``pipe.optimizations`` (name -> options); records, the memory preflight and the footprint table name a
pipeline's steps with ``describe(pipe)``. Steps that change weights survive ``pipe.release`` /
``pipe.load`` (they act through the component's dtype or the pipeline's load hooks), so the one-model-
at-a-time measurements of ``utils.stages`` see them.

Settings read when a process starts (oneDNN's fast-math mode, OpenMP binding, the allocator) are not
steps: ``utils.tuning`` applies them in a fresh process.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .memory import GIB, check_fits, module_bytes
from .pipeline import COMPONENTS, DTYPES, STAGES, OpenSoraPipeline, VideoSetting, estimate_peak_bytes, parse_dtype
from .attention import apply_attention
from .quantize import apply_quantize
from .rewrites import apply_cache_text_kv, apply_fused_modulate, apply_fused_rope, apply_vae_channels_last

COMPUTE_STAGES = tuple(s for s in STAGES if s != "prepare_latents")
FOOTPRINT_SEPARATE = ("vae_chunking",)  # steps whose effect the footprint key holds in fields of its own


# ---- precision ----------------------------------------------------------------------------------------

def apply_bf16(pipe: OpenSoraPipeline, components=COMPONENTS) -> OpenSoraPipeline:
    """Weights and activations of ``components`` in bfloat16. Upstream's own mixed precision is
    ``components=("transformer", "vae")`` (T5 stays fp32). A released component is materialised
    directly in bf16 when it is loaded (the same random draws as fp32, rounded)."""
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; accepted: {', '.join(COMPONENTS)}")
    for component in components:
        pipe.dtypes[component] = torch.bfloat16
        if pipe.is_loaded(component):
            pipe._module(component).to(torch.bfloat16)
    return pipe


def apply_autocast(pipe: OpenSoraPipeline, dtype: str = "bf16", stages=COMPUTE_STAGES) -> OpenSoraPipeline:
    """Run ``stages`` under ``torch.autocast`` in ``dtype``: weights stay as loaded (fp32), matmuls,
    convolutions and attention run in ``dtype`` on the fly, normalisations and reductions in fp32."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; accepted: {', '.join(STAGES)}")
    torch_dtype = parse_dtype(dtype)
    device_type = torch.device(pipe.device).type
    for stage in stages:
        method = getattr(pipe, stage)

        @functools.wraps(method)
        def under_autocast(*args, _method=method, **kwargs):
            with torch.autocast(device_type, dtype=torch_dtype):
                return _method(*args, **kwargs)

        setattr(pipe, stage, under_autocast)  # an instance attribute: the class's stage stays plain
    return pipe


# ---- weight-only int8 ---------------------------------------------------------------------------------

def int8_weight_only_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``module`` once its Linear weights are int8 with one ``dtype`` scale per output row."""
    linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
    full = sum(m.weight.numel() for m in linear) * dtype.itemsize
    int8 = sum(m.weight.numel() + m.weight.shape[0] * dtype.itemsize for m in linear)
    return module_bytes(module, dtype) - full + int8


def apply_int8_weight_only(pipe: OpenSoraPipeline, component: str = "text_encoder") -> OpenSoraPipeline:
    """Linear weights of ``component`` as int8, one scale per output channel (torchao
    ``Int8WeightOnlyConfig``, ``utils.quantize``'s ``w8_weight_only`` on every Linear layer); activations stay
    in the component's dtype. The int8 weights are made from the loaded ones, so loading still needs the
    component in its dtype for a moment (load it in bf16 to halve that). On x86 this saves memory, not time."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; accepted: {', '.join(COMPONENTS)}")
    return apply_quantize(pipe, "w8_weight_only", component, classes=None)


# ---- VAE chunking (memory against speed) --------------------------------------------------------------

def apply_vae_chunking(pipe: OpenSoraPipeline, micro_batch_size: int | None = 4,
                       micro_frame_size: int | None = 17) -> OpenSoraPipeline:
    """Frames per spatial-VAE call (``micro_batch_size``, None: all) and frames per temporal-VAE chunk
    (``micro_frame_size``). Upstream uses 4 and 17; ``micro_batch_size`` keeps the numerics,
    ``micro_frame_size`` changes the latent frame count and the numerics (checkpoints were trained on 17)."""
    for name, value in (("micro_batch_size", micro_batch_size), ("micro_frame_size", micro_frame_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    pipe.vae.micro_batch_size = micro_batch_size
    pipe.vae.micro_frame_size = micro_frame_size
    return pipe


# ---- compilation ----------------------------------------------------------------------------------------

def apply_compile(pipe: OpenSoraPipeline, mode: str | None = None) -> OpenSoraPipeline:
    """``torch.compile`` of the transformer's blocks (regional compilation: every STDiT3 block is compiled,
    and the blocks of one kind share the compiled code, so 56 blocks cost two compilations). The first
    denoising call pays for it. Needed for torchao's int8 kernels to run fused (the x86 notes: eager int8
    is slower than bf16, compiled faster)."""
    for block in (*pipe.transformer.spatial_blocks, *pipe.transformer.temporal_blocks):
        block.compile(mode=mode)
    return pipe


# ---- the registry -------------------------------------------------------------------------------------

# name -> step, in the order steps compose: weight dtypes, then weight formats, then run-time knobs,
# then wrappers around the stages (which must see the final modules)
OPTIMIZATIONS = {
    "bf16": apply_bf16,
    "int8_weight_only": apply_int8_weight_only,
    "quantize": apply_quantize,  # utils.quantize: int8 (and 4-bit) post-training quantisation
    "vae_chunking": apply_vae_chunking,
    # rewrites of the profile's bottlenecks (utils.attention, utils.rewrites): exact within rounding
    "attention": apply_attention,
    "cache_text_kv": apply_cache_text_kv,
    "fused_rope": apply_fused_rope,
    "fused_modulate": apply_fused_modulate,
    "vae_channels_last": apply_vae_channels_last,
    "compile": apply_compile,
    "autocast": apply_autocast,
}


def apply(pipe: OpenSoraPipeline, steps: dict[str, dict] | None) -> OpenSoraPipeline:
    """Apply ``steps`` (name -> options) in the registry's order; a step applies once per pipeline."""
    steps = dict(steps or {})
    unknown = set(steps) - set(OPTIMIZATIONS)
    if unknown:
        raise ValueError(f"unknown optimisations {sorted(unknown)}; accepted: {', '.join(OPTIMIZATIONS)}")
    for name, step in OPTIMIZATIONS.items():
        if name not in steps:
            continue
        if name in pipe.optimizations:
            raise ValueError(f"{name} is already applied to this pipeline (options {pipe.optimizations[name]})")
        options = dict(steps[name] or {})
        step(pipe, **options)
        pipe.optimizations[name] = options
    return pipe


def describe(steps: dict[str, dict] | OpenSoraPipeline, exclude=()) -> str:
    """"bf16(components=transformer,vae), int8_weight_only(component=text_encoder)": applied steps in
    registry order ("" for the baseline), as records and the footprint table name them."""
    if isinstance(steps, OpenSoraPipeline):
        steps = steps.optimizations
    parts = []
    for name in OPTIMIZATIONS:
        if name in steps and name not in exclude:
            options = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                                for k, v in sorted((steps[name] or {}).items()))
            parts.append(f"{name}({options})" if options else name)
    return ", ".join(parts)


# ---- memory preflight of an optimised pipeline --------------------------------------------------------

def memory_estimate(pipe: OpenSoraPipeline, setting: VideoSetting, free_text_encoder: bool = False,
                    lazy_load: bool = True) -> dict:
    """Peak resident bytes of a whole run of ``pipe`` as optimised (``peak``, ``source``, the footprint
    ``key``, ...), its components loaded each when its stage comes (``lazy_load``, as ``pipe(...)`` does
    on a pipeline built with ``load=()``) or all at once: a measured footprint of the same setting,
    precisions, steps, VAE chunking and loading when the table has one, else the analytic estimate, with an int8 component counted as int8 once loaded and
    at its load dtype while it is being loaded."""
    modules = {c: pipe._module(c) for c in COMPONENTS}
    weight_bytes, load_peaks = {}, []
    for step, default in (("int8_weight_only", "text_encoder"), ("quantize", "transformer")):
        if step in pipe.optimizations:  # int8 weights with a scale per row (4-bit schemes: counted as int8)
            component = pipe.optimizations[step].get("component", default)
            weight_bytes[component] = int8_weight_only_bytes(modules[component], pipe.dtypes[component])
            load_peaks.append(module_bytes(modules[component], pipe.dtypes[component]))
    estimate = estimate_peak_bytes(modules["transformer"], modules["vae"], modules["text_encoder"], setting,
                                   pipe.dtypes["transformer"], pipe.dtypes["text_encoder"],
                                   free_text_encoder=free_text_encoder, preset=pipe.preset, lazy_load=lazy_load,
                                   optimizations=describe(pipe, exclude=FOOTPRINT_SEPARATE),
                                   weight_bytes=weight_bytes)
    if estimate["source"] == "analytic estimate":
        estimate["peak"] = estimate["analytic_peak"] = max([estimate["peak"], *load_peaks])
    return estimate


def preflight(pipe: OpenSoraPipeline, setting: VideoSetting, free_text_encoder: bool = False,
              lazy_load: bool = True) -> dict:
    """``load_pipeline``'s memory check for ``pipe`` as optimised (``memory_estimate``): raises
    ``InsufficientMemoryError`` naming the figure's source; returns the estimate."""
    names = {v: k for k, v in DTYPES.items()}
    estimate = memory_estimate(pipe, setting, free_text_encoder, lazy_load)
    check_fits(estimate["peak"], f"{pipe.preset} (transformer {names[pipe.dtypes['transformer']]}, text encoder "
               f"{names[pipe.dtypes['text_encoder']]}{', ' + describe(pipe) if pipe.optimizations else ''}, "
               f"{'freeing' if free_text_encoder else 'keeping'} the text encoder) at {setting.resolution} "
               f"{setting.aspect_ratio} {setting.num_frames} frames",
               "Try bf16 weights, a bf16 or int8 text encoder, freeing the text encoder after encoding, or a "
               "lower resolution. Weights: " + ", ".join(f"{c} {estimate[c] / GIB:.1f} GiB" for c in COMPONENTS),
               device=pipe.device, source=estimate["source"])
    return estimate
