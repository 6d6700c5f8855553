"""Step caching: fewer transformer evaluations per video (notebook ``07_step_caching``).

Each cache is an ``apply_<name>(pipe, **options)`` step of ``utils.optim.registry``, built from diffusers' hook
machinery (``HookRegistry``, ``ModelHook``, ``StateManager``): the hooks sit on the transformer's modules
(checkpoint names unchanged), their state is per cache context, and the sampler (``utils.model.sampler``)
resets it before each video and runs each CFG call inside ``transformer.cache_context("cfg", step_index=i,
num_inference_steps=n, timestep=t)``: one decision for the whole CFG batch, as upstream batches both halves.

- ``teacache``: upstream TeaCache for OpenSora 1.2 (ali-vilab/TeaCache ``eval/teacache/experiments/opensora.py``).
  Each step, the relative L1 distance of spatial block 0's timestep-modulated input (its ``norm1`` output
  modulated by its own shift and scale) to the previous step's is rescaled by a 4th-degree polynomial and
  accumulated; while the sum stays below the threshold the 56 blocks are skipped and the residual of the last
  computed step (last block's output minus first block's input) is added. The embedders, the timestep MLP and
  the final layer always run; the first and last steps are always computed.
- ``pab``: pyramid attention broadcast with VideoSys's OpenSora configuration (spatial every 2 steps, temporal
  every 4, cross every 6, inside the timestep window (450, 930), both bounds strict, timesteps bf16-rounded to
  integers as VideoSys does). As diffusers' PAB hook, the attention module's output is reused (before the
  self-attention's gate, which the current step applies); VideoSys reuses it after the gate.
- ``step_counts``: no cache, only the counters every cache step also installs (modules executed per video).

``cache_stats(model)`` reads, after a video, how many times each kind of module ran and how many bytes the
caches hold; ``fit_teacache`` fits TeaCache's polynomial to a model's own (input distance, output distance)
pairs (``teacache_pairs``), as TeaCache's authors fitted theirs on OpenSora outputs at 480p.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from utils.model.pipeline import OpenSoraPipeline
from utils.model.stdit3 import STDiT3, STDiT3Block, t2i_modulate

# TeaCache's published rescaling polynomial for OpenSora 1.2 (highest power first), fitted by its authors on
# real OpenSora outputs at 480p (70 T2V-CompBench prompts), and its two published thresholds
TEACACHE_OPENSORA = (2.17546007e+02, -1.18329252e+02, 2.68662585e+01, -4.59364272e-02, 4.84426240e-02)
TEACACHE_THRESHOLDS = {"slow": 0.1, "fast": 0.2}

# VideoSys's OpenSora PAB configuration: reuse every N steps per attention kind, inside the timestep window
PAB_OPENSORA = {"spatial": 2, "temporal": 4, "cross": 6}
PAB_WINDOW = (450, 930)

COUNTED = ("block", "attn", "cross_attn", "mlp")  # what the counters count, per video
COUNTER_HOOK = "step_counter"


@dataclass
class CacheConfig:
    """What a pipeline's step cache is (``transformer._cache_config``, as diffusers' ``enable_cache`` sets it)."""

    name: str
    options: dict = field(default_factory=dict)


def _register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def blocks_in_order(model: STDiT3) -> list[STDiT3Block]:
    """The blocks in the order they run: spatial 0, temporal 0, spatial 1, ..."""
    return [b for pair in zip(model.spatial_blocks, model.temporal_blocks) for b in pair]


def _hooks(model: torch.nn.Module, name: str) -> list[ModelHook]:
    registries = (getattr(module, "_diffusers_hook", None) for module in model.modules())
    return [r.hooks[name] for r in registries if r is not None and name in r.hooks]


def counts_only(model: STDiT3) -> bool:
    """Whether the model's only "cache" is the counters (``step_counts``), which a real cache replaces."""
    return isinstance(model._cache_config, CacheConfig) and model._cache_config.name == "step_counts"


def make_room(model: STDiT3) -> None:
    """Before a cache is enabled: refuse a second cache; the counters-only config gives way."""
    if model.is_cache_enabled and not counts_only(model):
        raise ValueError(f"the transformer already has the step cache {model._cache_config}; one cache per pipeline")
    model._cache_config = None


def enable(model: STDiT3, config) -> None:
    """Record ``config`` as the model's step cache (diffusers' ``_cache_config``), refusing a second cache."""
    make_room(model)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    model._cache_config = config


# ---- counting: how much of the model ran --------------------------------------------------------------

class StepCounter(ModelHook):
    """Counts the calls that reach a module (the cache hooks sit outside it, so a skipped call is not counted);
    reset with the caches, before each video."""

    _is_stateful = True

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs

    def reset_state(self, module):
        self.calls = 0
        return module


def install_counters(model: STDiT3, branches: bool = False) -> None:
    """A ``StepCounter`` on every block and, with ``branches`` (caches that reuse a block's attention or MLP
    output), on its attention, cross-attention and MLP; each once per model. Without branch counters a branch
    runs exactly when its block does, and no hook sits inside the block, which ``torch.compile`` compiles
    whole (a hook there is traced into the compiled code and recompiles it for every block)."""
    modules = [m for b in blocks_in_order(model) for m in ((b, b.attn, b.cross_attn, b.mlp) if branches else (b,))]
    for module in modules:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or COUNTER_HOOK not in registry.hooks:
            _register(module, StepCounter(), COUNTER_HOOK)


def _counter(module: torch.nn.Module) -> StepCounter | None:
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.hooks.get(COUNTER_HOOK)


def _calls(block: STDiT3Block, kind: str = "block") -> int:
    """Calls of ``block`` (or of its branch ``kind``: the block's own count where the branch has no counter)."""
    counter = _counter(block) if kind == "block" else (_counter(getattr(block, kind)) or _counter(block))
    if counter is None:
        raise ValueError("the transformer has no step counters; apply a cache step (or step_counts) first")
    return counter.calls


def cache_stats(model: STDiT3) -> dict:
    """After a video: how many times each kind of module ran (``executed_<kind>`` over all ``blocks``, and
    ``executed_<kind>_spatial`` / ``_temporal`` by block type), the full evaluations (``evaluations``: calls
    in which the last block ran) and the bytes the caches hold."""
    blocks = blocks_in_order(model)
    executed = {f"executed_{kind}": sum(_calls(b, kind) for b in blocks) for kind in COUNTED}
    by_type = {f"executed_{kind}_{'temporal' if temporal else 'spatial'}":
               sum(_calls(b, kind) for b in blocks if b.temporal == temporal)
               for kind in COUNTED[1:] for temporal in (False, True)}
    return executed | by_type | dict(blocks=len(blocks), evaluations=_calls(blocks[-1]),
                                     cache_bytes=cache_bytes(model))


def _tensors(value):
    """The tensors in ``value``, looking inside tuples, lists, dicts and plain objects' attributes."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
        for item in vars(value).values():
            yield from _tensors(item)


def cache_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors the step caches' states hold now (each distinct storage once)."""
    seen, total = set(), 0
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook in registry.hooks.values():
            for manager in (v for v in vars(hook).values() if isinstance(v, StateManager)):
                for tensor in _tensors(list(manager._state_cache.values())):
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        total += storage.nbytes()
    return total


# ---- TeaCache -------------------------------------------------------------------------------------------

class _TeaState(BaseState):
    def __init__(self):
        self.reset()

    def reset(self):
        self.accumulated = 0.0
        self.previous = None  # the last step's modulated input of spatial block 0
        self.stack_input = None  # the first block's input at the last computed step
        self.residual = None  # last block's output minus first block's input, at the last computed step
        self.compute = True
        self.steps = 0
        self.computed = 0
        self.distances = []  # (step, relative L1 distance of the modulated input) per step after the first


def modulated_input(block: STDiT3Block, x: torch.Tensor, t_mlp: torch.Tensor) -> torch.Tensor:
    """TeaCache's indicator: spatial block 0's norm1 output modulated by its own shift and scale."""
    shift, scale = block._modulation(t_mlp)[:2]
    return t2i_modulate(block.norm1(x), shift, scale)


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """TeaCache's distance: mean |a - b| / mean |b| over the whole tensor (the CFG batch together)."""
    return float((current - previous).abs().mean() / previous.abs().mean())


class TeaCacheHook(ModelHook):
    """On every block: the head (spatial block 0) decides; the others run or pass their input through; the
    tail (the last temporal block) stores the stack's residual after a computed step."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, head: bool, tail: bool, threshold: float,
                 coefficients: tuple[float, ...], replay: frozenset[int] | None = None):
        super().__init__()
        self.state_manager = state_manager
        self.head, self.tail = head, tail
        self.threshold = threshold
        self.rescale = np.poly1d(coefficients)
        self.replay = replay  # computed step indices to replay instead of deciding (distances still measured)
        # the head's distance of two modulated inputs; utils.parallel sums it over ranks that hold parts of the batch
        self.distance = relative_l1

    def new_forward(self, block, x, y, key_mask, t_mlp, T, S, x_mask=None, t0_mlp=None):
        state = self.state_manager.get_state()
        if self.head:
            context = self.state_manager.context
            current = modulated_input(block, x, t_mlp)
            first, last = context.step_index == 0, context.step_index == context.num_inference_steps - 1
            if first or last or state.previous is None or state.residual is None:
                state.compute, state.accumulated = True, 0.0
            else:
                distance = self.distance(current, state.previous)
                state.distances.append((context.step_index, distance))
                state.accumulated += float(self.rescale(distance))
                state.compute = state.accumulated >= self.threshold
                if state.compute:
                    state.accumulated = 0.0
                if self.replay is not None:
                    state.compute = context.step_index in self.replay
            state.previous = current
            state.steps += 1
            if not state.compute:
                return x + state.residual
            state.computed += 1
            state.stack_input = x
        if not state.compute:
            return x
        out = self.fn_ref.original_forward(x, y, key_mask, t_mlp, T, S, x_mask, t0_mlp)
        if self.tail:
            state.residual = out - state.stack_input
            state.stack_input = None
        return out

    def reset_state(self, module):
        self.state_manager.reset()
        return module


def teacache(model: STDiT3, threshold: float = TEACACHE_THRESHOLDS["slow"],
             coefficients: tuple[float, ...] = TEACACHE_OPENSORA, replay: list[int] | None = None) -> STDiT3:
    """TeaCache hooks (named "teacache") on ``model``'s blocks; ``threshold`` 0 computes every step. With
    ``replay`` (step indices) those steps are computed and the others skipped whatever the distances say (the
    first and last always run): the skip pattern another model chose, timed on this one's weights."""
    if not threshold >= 0:
        raise ValueError(f"the TeaCache threshold must be at least 0 (0: no skipping), got {threshold}")
    if len(coefficients) < 1:
        raise ValueError("TeaCache needs the rescaling polynomial's coefficients (highest power first)")
    if replay is not None and not all(isinstance(i, int) and i >= 0 for i in replay):
        raise ValueError(f"replay takes the step indices (ints >= 0) to compute, got {replay!r}")
    make_room(model)
    install_counters(model)
    manager = StateManager(_TeaState)
    blocks = blocks_in_order(model)
    replayed = None if replay is None else frozenset(replay)
    for i, block in enumerate(blocks):
        _register(block, TeaCacheHook(manager, head=i == 0, tail=i == len(blocks) - 1, threshold=float(threshold),
                                      coefficients=tuple(coefficients), replay=replayed), "teacache")
    options = dict(threshold=float(threshold), coefficients=list(coefficients))
    enable(model, CacheConfig("teacache", options | ({} if replay is None else {"replay": sorted(replayed)})))
    return model


def teacache_head(model: STDiT3) -> TeaCacheHook:
    """The hook that decides (on spatial block 0)."""
    (head,) = [h for h in _hooks(model, "teacache") if h.head]
    return head


def teacache_stats(model: STDiT3) -> dict:
    """The head's record of the last video: steps, computed steps and the per-step input distances."""
    head = teacache_head(model)
    states = list(head.state_manager._state_cache.values())
    if not states:
        return dict(steps=0, computed=0, distances=[])
    (state,) = states
    return dict(steps=state.steps, computed=state.computed, distances=list(state.distances))


# ---- pyramid attention broadcast ------------------------------------------------------------------------

class _Broadcast(BaseState):
    def __init__(self):
        self.reset()

    def reset(self):
        self.output = None
        self.reused = 0


def pab_timestep(timestep: float) -> int:
    """VideoSys compares ``int(t.to(bfloat16))`` with the window."""
    return int(torch.tensor(float(timestep)).to(torch.bfloat16))


class BroadcastHook(ModelHook):
    """On an attention module: its output of the last computed step is reused on step ``i`` when ``i % every``
    is not 0 and the (bf16-rounded integer) timestep lies strictly inside ``window``."""

    _is_stateful = True

    def __init__(self, every: int, window: tuple[float, float]):
        super().__init__()
        self.every, self.window = every, window
        self.state_manager = StateManager(_Broadcast)

    def new_forward(self, module, *args, **kwargs):
        state = self.state_manager.get_state()
        context = self.state_manager.context
        inside = self.window[0] < pab_timestep(context.timestep) < self.window[1]
        if state.output is not None and inside and context.step_index % self.every != 0:
            state.reused += 1
            return state.output
        state.output = self.fn_ref.original_forward(*args, **kwargs)
        return state.output

    def reset_state(self, module):
        self.state_manager.reset()
        return module


def pab(model: STDiT3, spatial: int | None = PAB_OPENSORA["spatial"], temporal: int | None = PAB_OPENSORA["temporal"],
        cross: int | None = PAB_OPENSORA["cross"], window: tuple[float, float] = PAB_WINDOW) -> STDiT3:
    """``BroadcastHook``s (named "pab") on the attention modules; a kind given None, or 1, is never reused."""
    ranges = dict(spatial=spatial, temporal=temporal, cross=cross)
    for kind, every in ranges.items():
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"PAB's {kind} range must be a positive int (reuse on steps i % range != 0) or None, "
                             f"got {every!r}")
    low, high = (float(v) for v in window)
    if not low < high:
        raise ValueError(f"PAB's timestep window must be (low, high) with low < high, got {window}")
    make_room(model)
    install_counters(model, branches=True)
    for block in blocks_in_order(model):
        attention = ranges["temporal" if block.temporal else "spatial"]
        for module, every in ((block.attn, attention), (block.cross_attn, ranges["cross"])):
            if every is not None and every > 1:
                _register(module, BroadcastHook(every, (low, high)), "pab")
    enable(model, CacheConfig("pab", dict(ranges, window=[low, high])))
    return model


def remove_cache(model: STDiT3) -> STDiT3:
    """The step cache's hooks removed; the counters stay and go on counting (the ``step_counts`` step), so
    another cache can be applied to the same model and compared with it in one process."""
    config = model._cache_config
    if config is None:
        return model
    if isinstance(config, CacheConfig):
        HookRegistry.check_if_exists_or_initialize(model).remove_hook(config.name, recurse=True)
        model._cache_config = None
    else:  # one of diffusers' own configs (utils.optim.hook_caches)
        model.disable_cache()
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    enable(model, CacheConfig("step_counts"))
    return model


# ---- the registry steps ---------------------------------------------------------------------------------

def _transformer(pipe: OpenSoraPipeline) -> STDiT3:
    return pipe.transformer


def apply_teacache(pipe: OpenSoraPipeline, threshold: float = TEACACHE_THRESHOLDS["slow"],
                   coefficients=TEACACHE_OPENSORA, replay=None) -> OpenSoraPipeline:
    """TeaCache on the transformer (see ``teacache``); ``coefficients`` default to TeaCache's OpenSora fit."""
    teacache(_transformer(pipe), threshold, tuple(coefficients), None if replay is None else list(replay))
    return pipe


def apply_pab(pipe: OpenSoraPipeline, spatial=PAB_OPENSORA["spatial"], temporal=PAB_OPENSORA["temporal"],
              cross=PAB_OPENSORA["cross"], window=PAB_WINDOW) -> OpenSoraPipeline:
    """Pyramid attention broadcast on the transformer (see ``pab``)."""
    pab(_transformer(pipe), spatial, temporal, cross, tuple(window))
    return pipe


def apply_step_counts(pipe: OpenSoraPipeline) -> OpenSoraPipeline:
    """No cache: the counters alone, so an uncached run reports the same counts as a cached one."""
    install_counters(_transformer(pipe))
    enable(_transformer(pipe), CacheConfig("step_counts"))
    return pipe


# the command line's ``--cache NAME[:VALUE]``: NAME -> (registry step, the option VALUE sets, how it is read)
CACHE_SPECS = {
    "teacache": ("teacache", "threshold", float),
    "pab": ("pab", None, None),
    "fbc": ("first_block_cache", "threshold", float),
    "magcache": ("mag_cache", "threshold", float),
    "taylorseer": ("taylorseer", "cache_interval", int),
}


def parse_cache(spec: str) -> dict[str, dict]:
    """``"teacache:0.2"`` -> ``{"teacache": {"threshold": 0.2}}`` (registry steps); ``teacache:slow`` and
    ``teacache:fast`` name TeaCache's published thresholds."""
    name, _, value = spec.partition(":")
    accepted = "teacache[:THRESHOLD|slow|fast], pab, fbc[:THRESHOLD], magcache[:THRESHOLD], taylorseer[:INTERVAL]"
    if name not in CACHE_SPECS:
        raise ValueError(f"unknown cache {spec!r}; accepted: {accepted}")
    step, option, kind = CACHE_SPECS[name]
    if not value:
        return {step: {}}
    if option is None:
        raise ValueError(f"{name} takes no value (got {spec!r}); accepted: {accepted}")
    if name == "teacache" and value in TEACACHE_THRESHOLDS:
        return {step: {option: TEACACHE_THRESHOLDS[value]}}
    try:
        parsed = kind(value)
    except ValueError:
        raise ValueError(f"{spec!r}: {value!r} is not a {kind.__name__}; accepted: {accepted}") from None
    if not parsed >= 0:
        raise ValueError(f"{spec!r}: the value must be at least 0; accepted: {accepted}")
    return {step: {option: parsed}}


# ---- TeaCache's polynomial, fitted to a model's own steps -----------------------------------------------

class _PairRecorder(ModelHook):
    """On the model: the modulated input of spatial block 0 and the model output of every call."""

    def __init__(self, block: STDiT3Block):
        super().__init__()
        self.block = block
        self.inputs, self.outputs = [], []

    def new_forward(self, model, *args, **kwargs):
        captured = {}

        def grab(block, block_args):  # block(x, y, key_mask, t_mlp, ...)
            captured["m"] = modulated_input(block, block_args[0], block_args[3]).float()

        handle = self.block.register_forward_pre_hook(grab)
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            handle.remove()
        self.inputs.append(captured["m"])
        self.outputs.append(out.float())
        return out


@contextmanager
def recording_pairs(model: STDiT3):
    """Within the block, every call of ``model`` records TeaCache's indicator and the output; yields the
    recorder, whose ``pairs()`` gives (input distance, output distance) for consecutive calls."""
    recorder = _PairRecorder(model.spatial_blocks[0])
    _register(model, recorder, "teacache_pairs")
    try:
        yield recorder
    finally:
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("teacache_pairs", recurse=False)


def consecutive_pairs(inputs: list[torch.Tensor], outputs: list[torch.Tensor], steps: int) -> list[tuple[float, float]]:
    """(input distance, output distance) of consecutive steps within each run of ``steps`` calls."""
    if len(inputs) % steps:
        raise ValueError(f"{len(inputs)} recorded calls are not whole runs of {steps} steps")
    pairs = []
    for start in range(0, len(inputs), steps):
        for i in range(start + 1, start + steps):
            pairs.append((relative_l1(inputs[i], inputs[i - 1]), relative_l1(outputs[i], outputs[i - 1])))
    return pairs


def fit_teacache(pairs: list[tuple[float, float]], degree: int = 4) -> tuple[float, ...]:
    """``numpy.polyfit`` of output distance on input distance (highest power first), as TeaCache's authors did."""
    if len(pairs) <= degree:
        raise ValueError(f"fitting a degree-{degree} polynomial needs more than {degree} pairs, got {len(pairs)}")
    x, y = np.array(pairs, dtype=np.float64).T
    return tuple(float(c) for c in np.polyfit(x, y, degree))
