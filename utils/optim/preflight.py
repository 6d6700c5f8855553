"""The memory preflight of an optimised pipeline: its whole-run peak from a measured footprint of the same
setting and steps, else the analytic estimate, and the check that refuses a run that cannot fit before
any heavy work starts."""
from __future__ import annotations

from utils.io import GIB
from utils.model.dtypes import dtype_name
from utils.model.memory import check_fits, module_bytes
from utils.model.pipeline import OpenSoraPipeline, VideoSetting, estimate_peak_bytes
from utils.model.weights import COMPONENTS
from utils.optim.quantize import int8_weight_only_bytes, largest_part_bytes
from utils.optim.registry import describe

FOOTPRINT_SEPARATE = ("vae_chunking",)  # steps whose effect the footprint key holds in fields of its own


# ---- memory preflight of an optimised pipeline --------------------------------------------------------

def memory_estimate(pipe: OpenSoraPipeline, setting: VideoSetting, free_text_encoder: bool = False,
                    lazy_load: bool = True) -> dict:
    """Peak resident bytes of a whole run of ``pipe`` as optimised (``peak``, ``source``, the footprint
    ``key``, ...), its components loaded each when its stage comes (``lazy_load``, as ``pipe(...)`` does
    on a pipeline built with ``load=()``) or all at once: a measured footprint of the same setting,
    precisions, steps, VAE chunking and loading when the table has one, else the analytic estimate, with an
    int8 component counted as int8 once loaded and at its load dtype while it is being loaded (one block of it
    when it is streamed)."""
    modules = {c: pipe._module(c) for c in COMPONENTS}
    weight_bytes, load_peaks = {}, []
    for step, default in (("int8_weight_only", "text_encoder"), ("quantize", "transformer")):
        if step in pipe.optimizations:  # int8 weights with a scale per row (4-bit schemes: counted as int8)
            component = pipe.optimizations[step].get("component", default)
            module, dtype = modules[component], pipe.dtypes[component]
            weight_bytes[component] = int8_weight_only_bytes(module, dtype)
            # streamed: the int8 parts so far and one part in its load dtype; else the whole module in that dtype
            load_peaks.append(weight_bytes[component] + largest_part_bytes(module, dtype)
                              if pipe.optimizations[step].get("streamed") else module_bytes(module, dtype))
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
    estimate = memory_estimate(pipe, setting, free_text_encoder, lazy_load)
    check_fits(estimate["peak"], f"{pipe.preset} (transformer {dtype_name(pipe.dtypes['transformer'])}, text encoder "
               f"{dtype_name(pipe.dtypes['text_encoder'])}{', ' + describe(pipe) if pipe.optimizations else ''}, "
               f"{'freeing' if free_text_encoder else 'keeping'} the text encoder) at {setting.resolution} "
               f"{setting.aspect_ratio} {setting.num_frames} frames",
               "Try bf16 weights, a bf16 or int8 text encoder, freeing the text encoder after encoding, or a "
               "lower resolution. Weights: " + ", ".join(f"{c} {estimate[c] / GIB:.1f} GiB" for c in COMPONENTS),
               device=pipe.device, source=estimate["source"])
    return estimate
