"""Profiling: where a stage's CPU time goes, by operator class and by module group.

``profile_stage`` runs one call under ``torch.profiler`` and keeps one row per operator;
``op_table``/``class_table`` turn it into shares of the stage's operator self time; ``module_breakdown``
splits one model call into caller-named module groups (spatial attention, MLP, ...). Warm the call up
before profiling it: the first call of a shape pays one-time costs (weight packing, allocator growth).
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn
from torch.profiler import ProfilerActivity, record_function, tensorboard_trace_handler
from torch.utils._pytree import tree_leaves

# ---- operator classes ------------------------------------------------------------------------------

OP_CLASSES = ("matmul", "attention", "normalization", "elementwise", "convolution", "memory", "other")

# (class, alternatives), tried in order; each alternative must match the whole base name, i.e. the op
# name without its namespace ("aten::"), overload (".Tensor") and in-place underscore ("add_" -> "add").
_OP_RULES = (
    ("attention", r"scaled_dot_product_attention|_scaled_dot_product_\w+|_flash_attention\w*|"
                  r"_efficient_attention\w*|_?safe_softmax|_?softmax|_?log_softmax"),
    ("matmul", r"mm|bmm|addmm|baddbmm|addbmm|_addmm_activation|addmv|mv|dot|matmul|einsum|"
               r"_int_mm|_weight_int\d+pack_mm\w*|_linear_pointwise|q?linear\w*"),
    ("normalization", r"layer_norm|native_layer_norm|group_norm|native_group_norm|rms_norm|_fused_rms_norm|"
                      r"batch_norm|native_batch_norm|_native_batch_norm_legit\w*|_batch_norm_impl_index|"
                      r"instance_norm"),
    ("convolution", r"convolution|_convolution|mkldnn_convolution|_convolution_pointwise|convolution_overrideable|"
                    r"conv[123]d|conv_transpose[123]d|_?slow_conv\w*|thnn_conv\w*|_nnpack_spatial_convolution"),
    # data movement, allocation and views; views cost ~0 self time but belong here, not in "other"
    ("memory", r"copy|contiguous|clone|cat|stack|to|_to_copy|_copy_from\w*|permute|reshape|_reshape_alias|view|"
               r"_unsafe_view|view_as|transpose|t|expand|expand_as|unsqueeze|squeeze|flatten|unflatten|"
               r"as_strided|slice|select|narrow|narrow_copy|split|split_with_sizes|tensor_split|chunk|unbind|"
               r"movedim|swapaxes|unfold|meshgrid|index|index_select|gather|embedding|repeat|repeat_interleave|"
               r"roll|flip|pad|constant_pad_nd|reflection_pad\w+|replication_pad\w+|empty|empty_like|empty_strided|"
               r"new_empty\w*|zeros|zeros_like|new_zeros|ones|ones_like|new_ones|full|full_like|fill|zero|"
               r"resize|detach|alias|lift_fresh|resolve_conj|resolve_neg|_?upsample_nearest\w*|dropout"),
    ("elementwise", r"add|sub|rsub|mul|div|neg|exp|exp2|expm1|log|log1p|log2|sqrt|rsqrt|pow|square|reciprocal|"
                    r"sin|cos|tan|tanh|sigmoid|gelu|silu|relu|mish|erf|erfinv|abs|sign|clamp\w*|"
                    r"maximum|minimum|lerp|addcmul|addcdiv|where|masked_fill|floor|ceil|round|trunc|fmod|"
                    r"remainder|eq|ne|lt|le|gt|ge|logical_\w+|bitwise_\w+|mean|sum|prod|amax|amin|max|min|all|any|"
                    r"var|var_mean|std|std_mean|norm|linalg_vector_norm|cumsum|_?upsample_\w*linear\w*"),
)

_OP_PATTERNS = tuple((op_class, re.compile(rf"(?:{alternatives})")) for op_class, alternatives in _OP_RULES)


def op_base_name(name: str) -> str:
    """``aten::add_`` -> ``add``; ``mkldnn::_linear_pointwise.binary`` -> ``_linear_pointwise``."""
    base = name.split("::", 1)[-1].split(".", 1)[0]
    return base[:-1] if len(base) > 1 and base.endswith("_") else base


def classify_op(name: str) -> str:
    """The class in ``OP_CLASSES`` of an operator name such as ``aten::addmm``; unknown names -> "other"."""
    base = op_base_name(name)
    for op_class, pattern in _OP_PATTERNS:
        if pattern.fullmatch(base):
            return op_class
    return "other"


# ---- which profiler rows are operators ------------------------------------------------------------

# A row counts towards the shares only if it is a dispatched operator: a ``namespace::op`` name
# (aten, mkldnn, quantized, torchao, ...) that is not a user annotation. This leaves out our own
# ``record_function`` labels (stage names, ``module::<group>``), ``ProfilerStep#N`` and runtime rows
# such as ``cudaLaunchKernel``. Code compiled by torch.compile runs inside annotation rows
# ("Torch-Compiled Region", "## Call CompiledFxGraph ... ##") and is therefore not counted.
_OPERATOR_NAME = re.compile(r"[A-Za-z_]\w*::\w+(\.\w+)?")


def is_operator_row(name: str, is_user_annotation: bool) -> bool:
    return not is_user_annotation and _OPERATOR_NAME.fullmatch(name) is not None


# ---- profiling one stage ------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpRow:
    """One profiler row (``key_averages`` of one name); times in microseconds, memory in bytes."""

    op: str
    op_class: str
    counted: bool  # True for operators; False for annotations and bookkeeping (left out of shares)
    calls: int
    self_cpu_us: float
    cpu_total_us: float  # including children
    self_cpu_memory_bytes: int  # allocated minus freed in the op itself (0 without profile_memory)
    self_device_us: float  # 0 unless CUDA was profiled
    flops: int  # 0 unless with_flops (only matmul/conv have formulas)


@dataclass
class StageProfile:
    stage: str
    result: Any  # what fn returned
    ops: list[OpRow]
    wall_ms: float  # the call's wall time under the profiler (inflated by the profiler's overhead)

    @property
    def operators(self) -> list[OpRow]:
        return [row for row in self.ops if row.counted]


_STAGE_LABEL = re.compile(r"[A-Za-z0-9_.-]+")


def _activities(args, kwargs) -> list[ProfilerActivity]:
    activities = [ProfilerActivity.CPU]
    on_cuda = any(isinstance(leaf, torch.Tensor) and leaf.is_cuda for leaf in tree_leaves((args, kwargs)))
    if on_cuda and torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    return activities


def _write_traces(prof, trace_dir: Path, stage: str) -> None:
    """TensorBoard's ``<stage>.<ns>.pt.trace.json`` via the stock handler, plus ``<stage>.chrome.json``.

    Kineto saves a trace only once ("Trace is already saved" on a second export), so the chrome file
    is a byte copy of the TensorBoard one, which is itself a Chrome trace."""
    trace_dir.mkdir(parents=True, exist_ok=True)
    pattern = f"{stage}.*.pt.trace.json"
    before = set(trace_dir.glob(pattern))
    tensorboard_trace_handler(str(trace_dir), worker_name=stage)(prof)
    written = set(trace_dir.glob(pattern)) - before
    if len(written) != 1:
        raise RuntimeError(f"expected one new {pattern} in {trace_dir}, found {sorted(map(str, written))}")
    shutil.copyfile(written.pop(), trace_dir / f"{stage}.chrome.json")


def profile_stage(fn: Callable, *args, stage: str, trace_dir: Path | None = None, record_shapes: bool = True,
                  profile_memory: bool = True, with_flops: bool = False, **kwargs) -> StageProfile:
    """Run ``fn(*args, **kwargs)`` once under ``torch.profiler``, inside ``record_function(stage)``.

    With ``trace_dir``, writes a TensorBoard trace (open with ``tensorboard --logdir trace_dir``) and
    ``trace_dir/<stage>.chrome.json`` (chrome://tracing, Perfetto); nothing is written if fn raises.
    CUDA is profiled too when a tensor argument is on a GPU (the tables still use CPU self time)."""
    if not _STAGE_LABEL.fullmatch(stage or ""):
        raise ValueError(f"stage label {stage!r} must be non-empty letters, digits, '_', '-' or '.' "
                         "(it names the trace files)")
    with torch.profiler.profile(activities=_activities(args, kwargs), record_shapes=record_shapes,
                                profile_memory=profile_memory, with_flops=with_flops) as prof:
        start = time.perf_counter()
        with record_function(stage):
            result = fn(*args, **kwargs)
        wall_ms = (time.perf_counter() - start) * 1e3
    if trace_dir is not None:
        _write_traces(prof, Path(trace_dir), stage)
    rows = [OpRow(op=evt.key, op_class=classify_op(evt.key),
                  counted=is_operator_row(evt.key, bool(evt.is_user_annotation)), calls=int(evt.count),
                  self_cpu_us=float(evt.self_cpu_time_total), cpu_total_us=float(evt.cpu_time_total),
                  self_cpu_memory_bytes=int(evt.self_cpu_memory_usage),
                  self_device_us=float(evt.self_device_time_total), flops=int(evt.flops or 0))
            for evt in prof.key_averages()]
    rows.sort(key=lambda row: row.self_cpu_us, reverse=True)
    return StageProfile(stage=stage, result=result, ops=rows, wall_ms=wall_ms)


# ---- tables ----------------------------------------------------------------------------------------

def op_table(profile: StageProfile):
    """One row per operator: ``stage, op, op_class, calls, self_ms, share`` (share of the stage's operator
    self time), largest first. Annotation and bookkeeping rows are left out (see ``is_operator_row``)."""

    operators = profile.operators
    total_us = sum(row.self_cpu_us for row in operators)
    table = pd.DataFrame({
        "stage": profile.stage,
        "op": [row.op for row in operators],
        "op_class": [row.op_class for row in operators],
        "calls": [row.calls for row in operators],
        "self_ms": [row.self_cpu_us / 1e3 for row in operators],
        "share": [row.self_cpu_us / total_us if total_us > 0 else 0.0 for row in operators],
    }, columns=["stage", "op", "op_class", "calls", "self_ms", "share"])
    return table.sort_values("self_ms", ascending=False, kind="stable").reset_index(drop=True)


def class_table(profile: StageProfile):
    """Operator self time per class: ``stage, op_class, self_ms, share``, one row per ``OP_CLASSES`` entry
    in that order (zeros where absent). Shares sum to 1 unless the stage ran no operator (then all 0)."""

    self_us = dict.fromkeys(OP_CLASSES, 0.0)
    for row in profile.operators:
        self_us[row.op_class] += row.self_cpu_us
    total_us = sum(self_us.values())
    return pd.DataFrame({
        "stage": profile.stage,
        "op_class": list(OP_CLASSES),
        "self_ms": [self_us[c] / 1e3 for c in OP_CLASSES],
        "share": [self_us[c] / total_us if total_us > 0 else 0.0 for c in OP_CLASSES],
    })


# ---- module groups ----------------------------------------------------------------------------------

MODULE_LABEL = "module::{group}"

# the disjoint groups of one STDiT3 forward (names as in utils/model/stdit3.py); the rest of the call
# (patch reshapes, modulation arithmetic between blocks) belongs to no group
STDIT3_GROUPS: dict[str, Callable[[str], bool]] = {
    "spatial_attn": lambda n: n.startswith("spatial_blocks.") and n.endswith(".attn"),
    "temporal_attn": lambda n: n.startswith("temporal_blocks.") and n.endswith(".attn"),
    "cross_attn": lambda n: n.endswith(".cross_attn"),
    "mlp": lambda n: n.startswith(("spatial_blocks.", "temporal_blocks.")) and n.endswith(".mlp"),
    "embedders": lambda n: n in ("pos_embed", "x_embedder", "t_embedder", "fps_embedder", "t_block", "y_embedder"),
    "final_layer": lambda n: n == "final_layer",
}


def _select_modules(model: nn.Module, groups: dict[str, Callable[[str], bool]]) -> dict[str, list[nn.Module]]:
    """The outermost submodules of each group. A module matching two predicates, or a module of one
    group inside a module of another, is refused: either would count the same time twice."""
    chosen: list[tuple[str, str, nn.Module]] = []  # (name, group, module), parents before children
    for name, module in model.named_modules():
        if not name:
            continue  # the root is the whole call, not a group
        matches = [group for group, predicate in groups.items() if predicate(name)]
        if len(matches) > 1:
            raise ValueError(f"module {name!r} matches groups {matches}; the predicates must be disjoint")
        if not matches:
            continue
        outer = [(n, g) for n, g, _ in chosen if name.startswith(n + ".")]
        if any(g != matches[0] for _, g in outer):
            raise ValueError(f"module {name!r} (group {matches[0]!r}) lies inside {outer}; groups must not nest")
        if not outer:  # an inner module of the same group is already timed by its parent
            chosen.append((name, matches[0], module))
    selected = {group: [m for _, g, m in chosen if g == group] for group in groups}
    empty = [group for group, modules in selected.items() if not modules]
    if empty:
        raise ValueError(f"groups {empty} match no submodule of {type(model).__name__}")
    return selected


def module_breakdown(model: nn.Module, fn: Callable, *args, groups: dict[str, Callable[[str], bool]],
                     **kwargs) -> dict[str, float]:
    """Milliseconds of ``fn(*args, **kwargs)`` spent inside each group of ``model``'s submodules.

    ``groups`` maps a group name to a predicate over module names (``model.named_modules()``); the
    predicates must be disjoint and a group's modules must not lie inside another group's (checked).
    Each selected module's forward is wrapped in ``record_function("module::<group>")`` by a pair of
    forward hooks for one profiled call; the hooks are removed afterwards, also when fn raises. Times
    are inclusive CPU times of those annotations (children included, profiler overhead included)."""
    if not groups:
        raise ValueError("groups is empty; pass {name: predicate over module names}")
    selected = _select_modules(model, groups)
    open_labels: dict[int, list[record_function]] = {}  # per module, for re-entrant calls

    def enter(label: str):
        def pre_hook(module, inputs):
            context = record_function(label)
            context.__enter__()
            open_labels.setdefault(id(module), []).append(context)
        return pre_hook

    def leave(module, inputs, output):
        stack = open_labels.get(id(module))
        if stack:  # empty when an earlier pre-hook raised before ours ran
            stack.pop().__exit__(None, None, None)

    handles = []
    try:
        for group, modules in selected.items():
            for module in modules:
                handles.append(module.register_forward_pre_hook(enter(MODULE_LABEL.format(group=group))))
                # always_call: the label is closed even when forward raises
                handles.append(module.register_forward_hook(leave, always_call=True))
        with torch.profiler.profile(activities=_activities(args, kwargs)) as prof:
            fn(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    labels = {MODULE_LABEL.format(group=group): group for group in groups}
    times_ms = dict.fromkeys(groups, 0.0)
    for evt in prof.key_averages():
        if evt.is_user_annotation and evt.key in labels:
            times_ms[labels[evt.key]] += evt.cpu_time_total / 1e3
    return times_ms
