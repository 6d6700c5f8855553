"""Post-training quantisation of the pipeline's Linear layers: ``apply_quantize(pipe, scheme, ...)``.

Schemes (torchao's configs, except the deprecated ``torch.ao`` path kept for comparison):

- ``w8a8_dynamic``: int8 weights with a scale per output channel, int8 activations with a symmetric
  scale per token computed at run time (``Int8DynamicActivationInt8WeightConfig``); ViDiT-Q's W8A8 recipe
  (which keeps the embedders and the final layer in floating point, as ``BLOCK_CLASSES`` does).
- ``w8a8_dynamic_ao``: ``torch.ao.quantization.quantize_dynamic``: int8 weights per tensor, one activation
  scale per call; oneDNN's VNNI kernel on x86, QNNPACK/oneDNN+ACL on aarch64. Deprecated in torch 2.13;
  fp32 modules only; the modules are swapped, so it cannot be saved in the checkpoint layout.
- ``w8a8_static``: SmoothQuant (activation outliers moved into the weights, strength ``alpha``) and one
  activation scale per layer fixed by calibration on captured transformer inputs (``capture_inputs``),
  torchao's ``SmoothQuantConfig`` over ``Int8StaticActivationInt8WeightConfig``; ``alpha=None``: plain static.
- ``w8_weight_only``: int8 weights per output channel, activations in the model's dtype (memory, not
  speed, on x86: see the x86 notes).
- ``w4a8_dynamic``: 4-bit weights in groups of 32 with int8 dynamic activations through aten's
  ``_dyn_quant_matmul_4bit`` (KleidiAI); torchao refuses it where KleidiAI is missing (x86).

``classes`` picks the Linear layers by role (``LAYER_CLASSES``, matched on their checkpoint names), so one
class at a time gives the sensitivity ranking. The quantised weights are made from the loaded float ones
each time the component is loaded (load hooks), so ``pipe.release``/``pipe.load`` keep the scheme.
"""
from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from utils.io import GIB
from utils.model.memory import check_fits, module_bytes, return_freed_memory
from utils.model.pipeline import OpenSoraPipeline, VideoSetting
from utils.model.weights import COMPONENTS, RandomFill, fill_from_checkpoint, materialize_in_parts, module_parts

# the transformer's Linear layers by role, matched on their checkpoint names
LAYER_CLASSES = {
    "spatial_attn": r"spatial_blocks\.\d+\.attn\.",
    "temporal_attn": r"temporal_blocks\.\d+\.attn\.",
    "cross_attn": r"(spatial|temporal)_blocks\.\d+\.cross_attn\.",
    "mlp": r"(spatial|temporal)_blocks\.\d+\.mlp\.",
    "embedders": r"(t_embedder|fps_embedder|y_embedder|t_block)\.",
    "final_layer": r"final_layer\.",
}

BLOCK_CLASSES = ("spatial_attn", "temporal_attn", "cross_attn", "mlp")  # ViDiT-Q keeps the rest in fp

SCHEMES = ("w8a8_dynamic", "w8a8_dynamic_ao", "w8a8_static", "w8_weight_only", "w4a8_dynamic")

QUANTIZABLE = ("transformer", "text_encoder")  # the VAE's compute is convolutions (torchao: Linear only)

STREAMABLE = ("w8a8_dynamic", "w8_weight_only", "w4a8_dynamic")  # schemes that quantise a layer from its weight alone


def selected_linears(module: nn.Module, component: str, classes=None) -> list[str]:
    """Names of the Linear layers of ``component`` that ``classes`` select (None, or the text encoder: all)."""
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if component != "transformer" or classes is None:
        return linears
    pattern = re.compile("|".join(f"(?:{LAYER_CLASSES[c]})" for c in classes))
    return [name for name in linears if pattern.match(name)]


def _check(scheme: str, component: str, classes) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; accepted: {', '.join(SCHEMES)}")
    if component not in QUANTIZABLE:
        raise ValueError(f"cannot quantise the {component}: accepted components {', '.join(QUANTIZABLE)} (the "
                         "VAE's work is convolutions, and torchao's CPU int8 schemes cover Linear layers only)")
    unknown = set(classes or ()) - set(LAYER_CLASSES)
    if unknown or (classes is not None and not classes):
        raise ValueError(f"unknown or empty layer classes {sorted(unknown)}; accepted: {', '.join(LAYER_CLASSES)}")
    if scheme == "w4a8_dynamic" and not torch.backends.kleidiai.is_available():
        raise ValueError("w4a8_dynamic needs aten's KleidiAI 4-bit kernels (aarch64 builds of torch); this torch "
                         "has none. Accepted here: " + ", ".join(s for s in SCHEMES if s != "w4a8_dynamic"))


def _config(scheme: str, static_base: bool = False):
    # torchao is imported where a scheme is built: the emulated aarch64 environment has none (arm-check)
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8StaticActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerGroup,
        PerRow,
        PerTensor,
    )

    # set_inductor_config=False: leave torch.compile's global settings alone
    if scheme == "w8a8_dynamic":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if scheme == "w8a8_static":
        return Int8StaticActivationInt8WeightConfig(granularity=[PerTensor(), PerRow()], set_inductor_config=False)
    if scheme == "w8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32),
                                                 intx_packing_format="opaque_aten_kleidiai")


def _filter(names: list[str]):
    chosen = set(names)
    return lambda module, fqn: isinstance(module, nn.Linear) and fqn in chosen


# ---- quantising one module ------------------------------------------------------------------------------

def quantize_module(module: nn.Module, scheme: str, names: list[str], calibration: list | None = None,
                    alpha: float | None = 0.5, progress: bool = False) -> nn.Module:
    """Quantise the Linear layers ``names`` of ``module`` in place (``w8a8_dynamic_ao`` swaps them).
    ``w8a8_static`` runs ``module`` on each ``(args, kwargs)`` of ``calibration`` between observing and
    converting."""
    from torchao.quantization import quantize_  # see _config

    if scheme == "w8a8_dynamic_ao":
        if next(module.parameters()).dtype != torch.float32:
            raise ValueError("w8a8_dynamic_ao (torch.ao dynamic quantisation) needs an fp32 module; use w8a8_dynamic "
                             "for bf16")
        if platform.machine() in ("x86_64", "AMD64") and "onednn" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "onednn"  # the VNNI kernel; the x86 notes measured it fastest
        # which swapped layers had a bias: the packed ones cannot say once released to the meta device
        module.__dict__.setdefault("_ao_has_bias", {}).update(
            {name: module.get_submodule(name).bias is not None for name in names})
        mapping = {name: torch.ao.quantization.default_dynamic_qconfig for name in names}
        torch.ao.quantization.quantize_dynamic(module, mapping, dtype=torch.qint8, inplace=True)
        return module
    if scheme != "w8a8_static":
        quantize_(module, _config(scheme), filter_fn=_filter(names))
        return module
    from torchao.prototype.smoothquant import SmoothQuantConfig  # see _config
    from torchao.prototype.smoothquant.core import SmoothQuantObservedLinear

    if not calibration:
        raise ValueError("w8a8_static needs calibration inputs (capture_inputs, then calibration=<file>)")
    quantize_(module, SmoothQuantConfig(_config(scheme), step="prepare", alpha=alpha), filter_fn=_filter(names))
    for observed in module.modules():  # torchao's observer keeps every input: more than 24 GB at the real size
        if isinstance(observed, SmoothQuantObservedLinear):
            observed.obs = RangeObserver(observed.obs.weight, observed.obs.alpha)
    dtype = next(module.parameters()).dtype
    cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    with torch.inference_mode():
        for args, kwargs in tqdm(calibration, desc="calibration", unit="call", disable=not progress):
            module(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
    quantize_(module, SmoothQuantConfig(_config(scheme), step="convert", alpha=alpha), filter_fn=_filter(names))
    return module


class RangeObserver(nn.Module):
    """torchao's ``SmoothQuantObserver`` with per-channel minima and maxima in place of the list of every
    input it keeps. Its smoothing factor needs only each channel's absolute maximum, and the per-tensor
    activation scale only the smoothed input's extremes, which (the factors being positive) lie among each
    channel's extremes divided by its factor: the same quantisation parameters in O(channels) memory.
    (torchao's ``use_running_absmax`` observer does this too, but fails at convert with the static int8
    config in torchao 0.18.)"""

    def __init__(self, weight: torch.Tensor, alpha: float | None):
        super().__init__()
        self.weight, self.alpha = weight, alpha
        self.low = self.high = None
        self.ndim = 2  # the inputs' rank: the activation scale takes it

    @torch.no_grad()
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        flat = input.reshape(-1, input.shape[-1])
        self.ndim = input.ndim
        low, high = flat.amin(dim=0), flat.amax(dim=0)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        return input

    def calculate_qparams(self, weight_quant_kwargs=None):
        from torchao.quantization.quantize_.common import _choose_quant_func_and_quantize_tensor  # see _config

        if self.low is None:
            raise RuntimeError("calibrate the observer first: run the module on the calibration inputs")
        x_abs_max = torch.maximum(self.low.abs(), self.high.abs())
        if self.alpha is None:
            factor = torch.ones_like(x_abs_max)
        else:  # torchao's formula
            eps = torch.finfo(torch.float32).eps
            factor = (x_abs_max + eps) ** self.alpha / (self.weight.abs().amax(dim=0) + eps) ** (1 - self.alpha)
        if weight_quant_kwargs is None:
            return factor, None, None
        extremes = torch.stack([self.low, self.high]) / factor
        extremes = _choose_quant_func_and_quantize_tensor(extremes.view((1,) * (self.ndim - 2) + extremes.shape),
                                                          weight_quant_kwargs)
        return factor, extremes.scale, extremes.zero_point


def is_quantized(module: nn.Module) -> bool:
    """Whether a Linear's weight is a quantised tensor (or the module a swapped ``torch.ao`` one)."""
    return type(getattr(module, "weight", None)) not in (nn.Parameter, torch.Tensor, type(None)) \
        or isinstance(module, torch.ao.nn.quantized.dynamic.Linear)


# ---- the pipeline step --------------------------------------------------------------------------------

def capture_inputs(pipe: OpenSoraPipeline, y, mask, setting: VideoSetting, path: str | Path,
                   progress: bool = True) -> Path:
    """Run ``setting.steps`` denoising steps (a short schedule spans the same noise levels as a long one)
    and save every transformer call's inputs to ``path``: the calibration set of ``w8a8_static``."""
    calls = []

    def keep(_module, args, kwargs):
        clone = lambda v: v.detach().clone() if torch.is_tensor(v) else v  # noqa: E731
        calls.append((tuple(map(clone, args)), {k: clone(v) for k, v in kwargs.items()}))

    handle = pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        pipe.denoise(pipe.prepare_latents(y.shape[0], setting), y, mask, setting, progress=progress)
    finally:
        handle.remove()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(calls, path)
    return path


def apply_quantize(pipe: OpenSoraPipeline, scheme: str = "w8a8_dynamic", component: str = "transformer",
                   classes=BLOCK_CLASSES, calibration: str | None = None, alpha: float | None = 0.5,
                   streamed: bool = False) -> OpenSoraPipeline:
    """Quantise ``component``'s Linear layers of the ``classes`` roles (None: every Linear layer; the text
    encoder quantises all of its Linear layers) with ``scheme`` whenever it is loaded. ``calibration``: a file
    written by ``capture_inputs`` (``w8a8_static`` only); ``alpha``: SmoothQuant's migration strength.
    ``streamed``: build the component one block at a time, quantising each block before the next is made
    (``load_streamed``), so it never exists whole in its load dtype (the T5-XXL: 8.9 GiB in bf16, 4.5 GiB once
    int8); the same weights, so the same result as quantising the whole module (the tests check it)."""
    classes = tuple(classes) if classes is not None else None
    _check(scheme, component, classes)
    if scheme == "w8a8_static" and component != "transformer":
        raise ValueError("w8a8_static calibrates on captured transformer inputs: component must be 'transformer'")
    if scheme == "w8a8_static" and not (calibration and Path(calibration).is_file()):
        raise FileNotFoundError(f"w8a8_static needs a calibration file written by capture_inputs; got {calibration!r}")
    if streamed and scheme not in STREAMABLE:
        raise ValueError(f"{scheme} cannot be streamed (it needs the whole module); streamed schemes: "
                         f"{', '.join(STREAMABLE)}")
    if streamed and pipe.is_loaded(component):
        raise ValueError(f"streamed quantisation builds the {component} as it loads, and it is loaded already: build "
                         "the pipeline with load=() (or release the component) first")

    def quantize(pipe_, loaded):
        if loaded != component:
            return
        start = time.perf_counter()
        module = pipe_._module(component)
        calls = torch.load(calibration, weights_only=False) if scheme == "w8a8_static" else None
        quantize_module(module, scheme, selected_linears(module, component, classes), calls, alpha)
        return_freed_memory()  # glibc would keep the replaced float weights (GiBs) in the process
        module.quantize_seconds = time.perf_counter() - start  # reported by utils.experiments.variant_runs's stage runs

    def restore_on_meta(pipe_, released):
        if released == component:
            to_meta_float(pipe_._module(component), pipe_.dtypes[component])

    if streamed:
        pipe.loaders[component] = lambda pipe_, loaded: load_streamed(pipe_, loaded, scheme, classes)
    else:
        pipe.load_hooks.append(quantize)
    pipe.release_hooks.append(restore_on_meta)
    if pipe.is_loaded(component):
        quantize(pipe, component)
    return pipe


def largest_part_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``module``'s largest part (``utils.model.weights.module_parts``) in ``dtype``: what a streamed
    load holds in floating point at once, beside the quantised parts before it."""
    return max(module_bytes(module.get_submodule(name), dtype) for name in module_parts(module))


def load_streamed(pipe: OpenSoraPipeline, component: str, scheme: str, classes) -> None:
    """``pipe.load`` for a streamed quantised component: each part (random, or read from the official files)
    is made in the component's dtype and its selected Linear layers quantised before the next part exists."""
    module = pipe._module(component)
    dtype = pipe.dtypes[component]
    needed = int8_weight_only_bytes(module, dtype) + largest_part_bytes(module, dtype)
    check_fits(needed, f"loading the {component} block by block as {scheme} ({needed / GIB:.1f} GiB)",
               "Release another component first.", device=pipe.device)
    names = selected_linears(module, component, classes)
    start = time.perf_counter()

    def quantize_part(name, part):
        own = [n[len(name) + 1:] for n in names if n.startswith(name + ".")] + [""] * (name in names)
        if own:
            quantize_module(part, scheme, own)
        return_freed_memory()  # the part's float weights, before the next part is made

    fill = (fill_from_checkpoint(module, component, pipe.folders[component], dtype, pipe.device)
            if component in pipe.folders else RandomFill(dtype, pipe.seed, pipe.device))
    materialize_in_parts(module, fill, quantize_part)
    module.quantize_seconds = time.perf_counter() - start  # loading and quantising, together


def to_meta_float(module: nn.Module, dtype: torch.dtype) -> None:
    """Plain float Linear layers on the meta device where quantised ones were, so ``pipe.load`` works again."""
    for name, child in list(module.named_modules()):
        if not is_quantized(child):
            continue
        if isinstance(child, nn.Linear):
            child.weight = nn.Parameter(torch.empty(child.weight.shape, dtype=dtype, device="meta"), requires_grad=False)
            continue
        parent_name, _, attr = name.rpartition(".")
        has_bias = module.__dict__.get("_ao_has_bias", {}).get(name, True)
        with torch.device("meta"):
            plain = nn.Linear(child.in_features, child.out_features, bias=has_bias, dtype=dtype)
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, plain)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes a module's parameters and buffers hold, counting a quantised tensor's own data and scales."""
    def size(t):
        if type(t) in (nn.Parameter, torch.Tensor):
            return t.numel() * t.element_size()
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names if getattr(t, n) is not None)
        return t.numel() * t.element_size()

    total = sum(size(p) for p in module.parameters()) + sum(size(b) for b in module.buffers())
    for child in module.modules():  # torch.ao's swapped Linear keeps its weight (per tensor) in packed params
        if isinstance(child, torch.ao.nn.quantized.dynamic.Linear):
            weight, bias = child._packed_params._weight_bias()
            total += weight.numel() + (bias.numel() * bias.element_size() if bias is not None else 0)
    return total


# ---- weight-only int8 ---------------------------------------------------------------------------------

def int8_weight_only_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``module`` once its Linear weights are int8 with one ``dtype`` scale per output row."""
    linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
    full = sum(m.weight.numel() for m in linear) * dtype.itemsize
    int8 = sum(m.weight.numel() + m.weight.shape[0] * dtype.itemsize for m in linear)
    return module_bytes(module, dtype) - full + int8


def apply_int8_weight_only(pipe: OpenSoraPipeline, component: str = "text_encoder",
                           streamed: bool = False) -> OpenSoraPipeline:
    """Linear weights of ``component`` as int8, one scale per output channel (torchao
    ``Int8WeightOnlyConfig``, ``utils.optim.quantize``'s ``w8_weight_only`` on every Linear layer); activations stay
    in the component's dtype. The int8 weights are made from the loaded ones, so loading still needs the
    component in its dtype for a moment (load it in bf16 to halve that), unless ``streamed`` (one block at a
    time: ``apply_quantize``). On x86 this saves memory, not time."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; accepted: {', '.join(COMPONENTS)}")
    return apply_quantize(pipe, "w8_weight_only", component, classes=None, streamed=streamed)
