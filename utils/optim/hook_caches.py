"""diffusers' own step caches on STDiT3 (notebook ``07_step_caching``): First Block Cache, MagCache, TaylorSeer.

Each is an ``apply_<name>(pipe, **options)`` step of ``utils.optim.registry`` that puts diffusers 0.42's hooks,
unchanged, on the transformer's modules and records diffusers' config as ``transformer._cache_config`` (so
``disable_cache`` and ``caching.remove_cache`` take them off). Like the caches of ``utils.optim.caching`` they
install its counters first, inside the cache hooks, so ``caching.cache_stats`` counts only what ran, and the
sampler's ``cache_context("cfg", ...)`` gives the CFG batch one decision per step.

How they attach, and why not through ``transformer.enable_cache(config)``:

- diffusers' FBC and MagCache look for the blocks among the direct children of the module they are given, by
  name (``_ALL_TRANSFORMER_BLOCK_IDENTIFIERS`` in ``diffusers/hooks/_common.py``: ``blocks``,
  ``transformer_blocks``, ...), and neither config nor apply function takes other names. STDiT3's are
  ``spatial_blocks`` and ``temporal_blocks``, which the checkpoint fixes, so ``enable_cache`` fails: FBC with
  ``IndexError: pop from empty list``, and MagCache only logs "No transformer blocks found to apply hooks" and
  leaves the cache enabled with no hook at all. Here diffusers' apply functions get a throwaway module whose one
  child, ``blocks``, lists the same block objects in the order they run (spatial 0, temporal 0, spatial 1, ...):
  the head is spatial block 0, the tail the last temporal block, and the hooks land on the blocks themselves
  (no module is added to STDiT3, its state_dict is unchanged).
- their hooks read the block's input through ``TransformerBlockRegistry`` metadata, so ``STDiT3Block`` is
  registered there (one output tensor; ``hidden_states_argument_name="x"``, found by position in the signature).
  FBC asks for the parameter literally named ``hidden_states`` (``Parameter 'hidden_states' not found in
  function signature but was requested``), so the registered metadata reads that name as ``x``.
- TaylorSeer takes the modules to hook as regexes (``cache_identifiers``), so it needs neither.

The three caches:

- ``first_block_cache``: spatial block 0 always runs; when the relative mean change of its residual (output
  minus input) since the last computed step is at most ``threshold``, the other blocks (55 in STDiT3-XL/2) are
  skipped and the stack's last residual (tail output minus head output) is added. Its first step is always
  computed.
- ``mag_cache``: from step ``int(retention_ratio * steps + 0.5)`` on, the per-step magnitude ratios (of
  consecutive stack residuals) since the last computed step are multiplied up and ``|1 - product|`` is summed;
  while the sum stays within ``threshold``, for at most ``max_skip_steps`` steps in a row, all blocks are
  skipped and the last residual (last block's output minus first block's input) is added. MagCache counts the
  steps itself and starts over after ``num_inference_steps`` calls (default: one per ratio); the sampler's
  context says how many steps the loop runs, and a loop of another length is refused. The ratios default to
  those MagCache's authors measured on OpenSora 1.2 (``MAGCACHE_OPENSORA``; they ran it at threshold 0.12 with
  ``max_skip_steps`` 3, and 0.24 with 5); ``calibrate=True`` skips nothing and measures this model's
  (``mag_calibration``).
- ``taylorseer``: on every block, the attention, cross-attention and MLP outputs (before their gates) are
  computed on the warm-up steps and every ``cache_interval``-th step after them, and predicted between them by
  a Taylor expansion of order ``max_order`` in the step index (divided differences of the computed steps), as
  TaylorSeer caches each layer's attention and MLP features. Whole blocks are not hooked: diffusers' TaylorSeer
  predicts each hooked module on its own, so predicted blocks would throw away every prediction but the last
  block's; hooking the branches keeps the block's norms, timestep modulation, gates and residual additions at
  the current step. The blocks themselves run every step, so ``evaluations`` stays at the step count and the
  saving shows in ``executed_attn``, ``executed_cross_attn`` and ``executed_mlp``. The expansion is kept in
  the transformer's dtype (diffusers defaults to bf16).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    ModelHook,
    TaylorSeerCacheConfig,
    first_block_cache,
    mag_cache,
    taylorseer_cache,
)
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

from utils.model.pipeline import OpenSoraPipeline
from utils.model.stdit3 import STDiT3, STDiT3Block
from utils.optim.caching import blocks_in_order, enable, install_counters

# MagCache's OpenSora 1.2 ratios for steps 1..29 of 30, measured by its authors on the official checkpoint
# (Zehong-Ma/MagCache eval/magcache/experiments/opensora.py, which uses their square roots); step 0 is never
# skipped and diffusers indexes the ratios by step, so it gets 1.0
_MAGCACHE_OPENSORA_MEASURED = (
    0.93359, 0.96484, 0.99609, 1.0, 0.99609, 0.99609, 0.99219, 1.0, 1.0, 0.99609, 0.99219, 1.0, 0.99219, 0.99609,
    0.99219, 0.99609, 0.99609, 0.99609, 0.99219, 0.99219, 0.99219, 0.98828, 0.98828, 0.98438, 0.98438, 0.97656,
    0.97656, 0.96484, 0.96484,
)
MAGCACHE_OPENSORA = (1.0, *(r**0.5 for r in _MAGCACHE_OPENSORA_MEASURED))

TAYLORSEER_MODULES = ("attn", "cross_attn", "mlp")  # each block's branches whose outputs TaylorSeer predicts
STEPS_CHECK_HOOK = "mag_cache_steps"
CALIBRATION_HOOK = "mag_calibration"


# ---- what diffusers needs to know about STDiT3Block ------------------------------------------------------

class _BlockMetadata(TransformerBlockMetadata):
    """diffusers 0.42's FBC hooks ask for ``"hidden_states"`` by that name, MagCache's for
    ``hidden_states_argument_name``: both get STDiT3Block's first argument, ``x``."""

    def _get_parameter_from_args_kwargs(self, identifier: str, args=(), kwargs=None):
        if identifier == "hidden_states":
            identifier = self.hidden_states_argument_name
        return super()._get_parameter_from_args_kwargs(identifier, args, kwargs)


def _register_block() -> None:
    TransformerBlockRegistry.register(STDiT3Block, _BlockMetadata(return_hidden_states_index=0,
                                                                  hidden_states_argument_name="x"))


def _in_running_order(model: STDiT3) -> torch.nn.Module:
    """A throwaway module whose ``blocks`` are ``model``'s blocks in the order they run, for diffusers' lookup."""
    view = torch.nn.Module()
    view.blocks = torch.nn.ModuleList(blocks_in_order(model))
    return view


def _attach(model: STDiT3, config, attach, branches: bool = False) -> None:
    """Counters first (innermost; on the branches too for a cache that reuses them), the one-cache check before
    any cache hook, then ``attach()``."""
    install_counters(model, branches)
    enable(model, config)
    attach()
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


# ---- MagCache's step count and calibration -----------------------------------------------------------------

class StepsCheck(ModelHook):
    """On the transformer: MagCache counts the steps itself and starts over after ``steps`` calls, so a sampler
    loop of another length (the cache context's ``num_inference_steps``) would put the ratios on the wrong steps."""

    def __init__(self, state_manager, steps: int):
        super().__init__()
        self.state_manager, self.steps = state_manager, steps

    def pre_forward(self, model, *args, **kwargs):
        context = self.state_manager._context
        if context is not None and context.num_inference_steps not in (None, self.steps):
            raise ValueError(f"MagCache is set for {self.steps} steps (num_inference_steps) but the sampler runs "
                             f"{context.num_inference_steps}; apply mag_cache with num_inference_steps="
                             f"{context.num_inference_steps}")
        return args, kwargs


class _CalibrationTap(ModelHook):
    """Outside MagCache's tail hook: the ratios of each finished calibration video (after the last step diffusers
    prints them and starts a new list)."""

    def __init__(self, state_manager, steps: int):
        super().__init__()
        self.state_manager, self.steps = state_manager, steps
        self.runs = []

    def new_forward(self, block, *args, **kwargs):
        ratios = self.state_manager.get_state().calibration_ratios  # the list this step's ratio is appended to
        out = self.fn_ref.original_forward(*args, **kwargs)
        if len(ratios) == self.steps:
            self.runs.append(list(ratios))
        return out


def _mag_head(model: STDiT3) -> ModelHook:
    return HookRegistry.check_if_exists_or_initialize(model.spatial_blocks[0]).get_hook(
        mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK)


@contextmanager
def mag_calibration(model: STDiT3):
    """Within the block, each video sampled by ``model`` under MagCache's calibration (``calibrate=True``, which
    skips nothing) appends its per-step magnitude ratios to the yielded list: ``mag_ratios`` for ``apply_mag_cache``."""
    config = model._cache_config
    if not (isinstance(config, MagCacheConfig) and config.calibrate):
        raise ValueError(f"calibrating needs the mag_cache step with calibrate=True; the transformer's cache is "
                         f"{config}")
    tap = _CalibrationTap(_mag_head(model).state_manager, config.num_inference_steps)
    registry = HookRegistry.check_if_exists_or_initialize(model.temporal_blocks[-1])
    registry.register_hook(tap, CALIBRATION_HOOK)
    try:
        yield tap.runs
    finally:
        registry.remove_hook(CALIBRATION_HOOK, recurse=False)


# ---- the registry steps ---------------------------------------------------------------------------------

def apply_first_block_cache(pipe: OpenSoraPipeline, threshold: float = 0.05) -> OpenSoraPipeline:
    """diffusers' First Block Cache on the transformer; ``threshold`` 0 computes every step whose first block's
    residual changed at all."""
    if not threshold >= 0:
        raise ValueError(f"the First Block Cache threshold must be at least 0 (0: skip only an unchanged step), "
                         f"got {threshold}")
    model, config = pipe.transformer, FirstBlockCacheConfig(threshold=float(threshold))
    _register_block()
    _attach(model, config, lambda: first_block_cache.apply_first_block_cache(_in_running_order(model), config))
    return pipe


def apply_mag_cache(pipe: OpenSoraPipeline, threshold: float = 0.06, max_skip_steps: int = 3,
                    retention_ratio: float = 0.2, mag_ratios=None, calibrate: bool = False,
                    num_inference_steps: int | None = None) -> OpenSoraPipeline:
    """diffusers' MagCache on the transformer. ``mag_ratios`` (one per step; default ``MAGCACHE_OPENSORA``) are
    interpolated to ``num_inference_steps`` (default: one step per ratio), which must be the sampler's step count;
    ``calibrate=True`` skips nothing and measures the ratios instead (``mag_calibration``)."""
    if not threshold >= 0:
        raise ValueError(f"the MagCache threshold must be at least 0, got {threshold}")
    if not isinstance(max_skip_steps, int) or max_skip_steps < 0:
        raise ValueError(f"max_skip_steps must be an int >= 0 (0: no skipping), got {max_skip_steps!r}")
    if not 0 <= retention_ratio <= 1:
        raise ValueError(f"retention_ratio is the fraction of first steps never skipped, in [0, 1]; got "
                         f"{retention_ratio}")
    ratios = [float(r) for r in (MAGCACHE_OPENSORA if mag_ratios is None else mag_ratios)]
    steps = len(ratios) if num_inference_steps is None else num_inference_steps
    if not isinstance(steps, int) or steps < 1 or not ratios:
        raise ValueError(f"MagCache needs ratios and the sampler's step count (num_inference_steps >= 1); got "
                         f"{len(ratios)} ratios and num_inference_steps={num_inference_steps!r}")
    model = pipe.transformer
    config = MagCacheConfig(threshold=float(threshold), max_skip_steps=max_skip_steps,
                            retention_ratio=float(retention_ratio), num_inference_steps=steps,
                            mag_ratios=None if calibrate else ratios, calibrate=bool(calibrate))

    def attach():
        mag_cache.apply_mag_cache(_in_running_order(model), config)
        root = HookRegistry.check_if_exists_or_initialize(model)
        if root.get_hook(STEPS_CHECK_HOOK) is not None:  # left by an earlier MagCache that was removed
            root.remove_hook(STEPS_CHECK_HOOK, recurse=False)
        root.register_hook(StepsCheck(_mag_head(model).state_manager, steps), STEPS_CHECK_HOOK)

    _register_block()
    _attach(model, config, attach)
    return pipe


def apply_taylorseer(pipe: OpenSoraPipeline, cache_interval: int = 5, disable_cache_before_step: int = 3,
                     max_order: int = 1) -> OpenSoraPipeline:
    """diffusers' TaylorSeer on every block's attention, cross-attention and MLP: computed on the steps before
    ``d = disable_cache_before_step`` and on steps d + 1, d + 1 + ``cache_interval``, ...; predicted on the others
    (step d included, as diffusers schedules it)."""
    options = dict(cache_interval=cache_interval, disable_cache_before_step=disable_cache_before_step,
                   max_order=max_order)
    minimum = dict(cache_interval=1, disable_cache_before_step=1, max_order=0)  # step 0 has nothing to predict from
    for name, value in options.items():
        if not isinstance(value, int) or value < minimum[name]:
            raise ValueError(f"TaylorSeer's {name} must be an int >= {minimum[name]}, got {value!r}")
    model = pipe.transformer
    config = TaylorSeerCacheConfig(
        **options, taylor_factors_dtype=model.dtype,
        cache_identifiers=[rf"(spatial|temporal)_blocks\.\d+\.({'|'.join(TAYLORSEER_MODULES)})"])
    _attach(model, config, lambda: taylorseer_cache.apply_taylorseer_cache(model, config), branches=True)
    return pipe
