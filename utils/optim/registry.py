"""Optimisations as named switches over a built pipeline: ``apply_<name>(pipe, **options)``.

Every step is registered in ``OPTIMIZATIONS``, whose order is the order in which steps compose:
``apply(pipe, {"autocast": {}, "bf16": {}})`` applies ``bf16`` first whatever order it is given in.
The baseline (no step) is fp32 eager, faithful to upstream. A step records itself in
``pipe.optimizations`` (name -> options); records, the memory preflight and the footprint table name a
pipeline's steps with ``describe(pipe)``. Steps that change weights survive ``pipe.release`` /
``pipe.load`` (they act through the component's dtype or the pipeline's load hooks), so the one-model-
at-a-time measurements of ``utils.measure.stages`` see them.

Settings read when a process starts (oneDNN's fast-math mode, OpenMP binding, the allocator) are not
steps: ``utils.experiments.variant_runs`` applies them in a fresh process.
"""
from __future__ import annotations

from utils.model.pipeline import OpenSoraPipeline
from utils.optim.attention import apply_attention
from utils.optim.caching import apply_pab, apply_step_counts, apply_teacache
from utils.optim.hook_caches import apply_first_block_cache, apply_mag_cache, apply_taylorseer
from utils.optim.onnx_backends import apply_ggml, apply_onnxruntime, apply_openvino
from utils.optim.precision import apply_autocast, apply_bf16
from utils.optim.quantize import apply_int8_weight_only, apply_quantize
from utils.optim.rewrites import apply_cache_text_kv, apply_fused_modulate, apply_fused_rope, apply_vae_channels_last
from utils.optim.runtime import apply_compile, apply_vae_chunking

# ---- the registry -------------------------------------------------------------------------------------

# name -> step, in the order steps compose: weight dtypes, then weight formats, then run-time knobs,
# then wrappers around the stages (which must see the final modules)
OPTIMIZATIONS = {
    "bf16": apply_bf16,
    "int8_weight_only": apply_int8_weight_only,
    "quantize": apply_quantize,  # utils.optim.quantize: int8 (and 4-bit) post-training quantisation
    "vae_chunking": apply_vae_chunking,
    # rewrites of the profile's bottlenecks (utils.optim.attention, utils.optim.rewrites): exact within rounding
    "attention": apply_attention,
    "cache_text_kv": apply_cache_text_kv,
    "fused_rope": apply_fused_rope,
    "fused_modulate": apply_fused_modulate,
    "vae_channels_last": apply_vae_channels_last,
    "compile": apply_compile,
    # step caches (utils.optim.caching; diffusers' own in utils.optim.hook_caches): diffusers hooks around the
    # compiled blocks, so their Python decisions and counters stay out of the compiled code; one per pipeline
    "teacache": apply_teacache,
    "pab": apply_pab,
    "first_block_cache": apply_first_block_cache,
    "mag_cache": apply_mag_cache,
    "taylorseer": apply_taylorseer,
    "step_counts": apply_step_counts,
    # other runtimes for the transformer's blocks and the VAE's decoders (utils.optim.onnx_backends): after every
    # step that changes them, so they see (and refuse) them
    "onnxruntime": apply_onnxruntime,
    "openvino": apply_openvino,
    "ggml": apply_ggml,
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
