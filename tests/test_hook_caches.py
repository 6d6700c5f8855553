"""diffusers' own step caches on STDiT3 (utils.optim.hook_caches) on the tiny preset: a setting that skips
nothing reproduces the uncached latents bit for bit (every module runs on the same inputs); a setting that
skips reports, through the counters below its hooks, exactly what the hook's own state says it computed;
state is reset between videos; checkpoint names stay; MagCache refuses a loop of another length."""
import pytest
import torch
from diffusers.hooks import HookRegistry

from utils.model.pipeline import VideoSetting, load_pipeline
from utils.model.weights import COMPONENTS
from utils.optim import registry
from utils.optim.caching import cache_stats, remove_cache
from utils.optim.hook_caches import TAYLORSEER_MODULES, mag_calibration

STEPS = 8
PROMPT = "a red ball bouncing on a wooden floor"
FBC_SKIPPING = {"first_block_cache": {"threshold": 0.5}}
# ratios of 1 accumulate no error: from step round(0.25 * 8) = 2 on, 2 steps skipped, 1 computed, ...
MAG_SKIPPING = {"mag_cache": {"mag_ratios": [1.0] * STEPS, "max_skip_steps": 2, "retention_ratio": 0.25}}
TAYLOR_SKIPPING = {"taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2}}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caption():
    pipe = load_pipeline("tiny", dtype="fp32", load=("text_encoder",))
    return pipe.encode_prompt([PROMPT])


def pipeline(steps):
    pipe = load_pipeline("tiny", dtype="fp32", load=("transformer",))
    return registry.apply(pipe, steps)


def denoised(pipe, caption, seed=42):
    y, mask = caption
    setting = VideoSetting.create("144p", "9:16", 17, steps=STEPS, seed=seed)
    return pipe.denoise(pipe.prepare_latents(1, setting), y, mask, setting, progress=False)


def recorded(model, read):
    """``read()`` after every call of ``model``, inside its cache context: the hook's own record of each step."""
    seen = []
    model.register_forward_hook(lambda *_: seen.append(read()))
    return seen


def hook(module, name):
    return HookRegistry.check_if_exists_or_initialize(module).get_hook(name)


@pytest.fixture(scope="module")
def uncached(caption):
    pipe = pipeline({"step_counts": {}})
    return denoised(pipe, caption), cache_stats(pipe.transformer)


@pytest.mark.parametrize("steps", [
    {"first_block_cache": {"threshold": 0.0}},
    {"mag_cache": {"calibrate": True, "num_inference_steps": STEPS}},
    {"mag_cache": {"max_skip_steps": 0, "num_inference_steps": STEPS}},
    {"taylorseer": {"cache_interval": 1}},
    {"taylorseer": {"disable_cache_before_step": STEPS}},
], ids=["fbc-0", "mag-calibrate", "mag-no-skips", "taylorseer-every-step", "taylorseer-warm-up-only"])
def test_cache_that_skips_nothing_is_exact(caption, uncached, steps):
    pipe = pipeline(steps)
    assert torch.equal(denoised(pipe, caption), uncached[0])
    assert cache_stats(pipe.transformer) | {"cache_bytes": 0} == uncached[1]


def test_calibrated_mag_ratios_with_threshold_0_are_exact(caption, uncached):
    pipe = pipeline({"mag_cache": {"calibrate": True, "num_inference_steps": STEPS}})
    with mag_calibration(pipe.transformer) as runs:
        denoised(pipe, caption)
    (ratios,) = runs
    assert len(ratios) == STEPS and ratios[0] == 1.0
    assert 1.0 not in ratios[1:]  # else threshold 0 would skip that step: no error accumulates on a ratio of 1
    pipe = pipeline({"mag_cache": {"threshold": 0.0, "mag_ratios": ratios}})
    assert torch.equal(denoised(pipe, caption), uncached[0])
    assert cache_stats(pipe.transformer)["evaluations"] == STEPS


def test_first_block_cache_reports_what_it_ran(caption, uncached):
    pipe = pipeline(FBC_SKIPPING)
    head = hook(pipe.transformer.spatial_blocks[0], "fbc_leader_block_hook")
    computed = recorded(pipe.transformer, lambda: head.state_manager.get_state().should_compute)
    out = denoised(pipe, caption)
    stats = cache_stats(pipe.transformer)
    assert len(computed) == STEPS and computed[0]
    assert 1 <= stats["evaluations"] == sum(computed) < STEPS
    # the head block runs every step, the others only on computed steps
    assert stats["executed_block"] == sum(computed) * stats["blocks"] + STEPS - sum(computed)
    assert not torch.equal(out, uncached[0])


def test_mag_cache_reports_what_it_ran(caption, uncached):
    pipe = pipeline(MAG_SKIPPING)
    head = hook(pipe.transformer.spatial_blocks[0], "mag_cache_leader_block_hook")
    computed = recorded(pipe.transformer, lambda: head.state_manager.get_state().should_compute)
    out = denoised(pipe, caption)
    stats = cache_stats(pipe.transformer)
    assert computed == [True, True, False, False, True, False, False, True]
    assert stats["evaluations"] == sum(computed) < STEPS
    assert stats["executed_block"] == sum(computed) * stats["blocks"]  # a skipped step runs no block
    assert not torch.equal(out, uncached[0])


def test_taylorseer_reports_what_it_ran(caption, uncached):
    pipe = pipeline(TAYLOR_SKIPPING)
    model = pipe.transformer
    hooks = [hook(getattr(b, kind), "taylorseer_cache") for b in (*model.spatial_blocks, *model.temporal_blocks)
             for kind in TAYLORSEER_MODULES]
    assert all(hooks)

    def updated():  # the modules whose Taylor factors were computed at this step
        states = [h.state_manager.get_state() for h in hooks]
        return sum(s.last_update_step == s.current_step for s in states)

    computed = recorded(model, updated)
    out = denoised(pipe, caption)
    stats = cache_stats(model)
    # diffusers' schedule: steps before 2, then steps 3, 6 (every 3rd after step 2); all modules alike
    assert computed == [len(hooks) if i in (0, 1, 3, 6) else 0 for i in range(STEPS)]
    assert sum(stats[f"executed_{kind}"] for kind in TAYLORSEER_MODULES) == sum(computed)
    assert stats["evaluations"] == STEPS and stats["executed_block"] == STEPS * stats["blocks"]
    assert not torch.equal(out, uncached[0])


@pytest.mark.parametrize("steps", [FBC_SKIPPING, MAG_SKIPPING, TAYLOR_SKIPPING], ids=["fbc", "mag", "taylorseer"])
def test_state_is_reset_between_videos(caption, steps):
    alone = [denoised(pipeline(steps), caption, seed) for seed in (1, 2)]
    pipe = pipeline(steps)
    in_a_row = [denoised(pipe, caption, seed) for seed in (1, 2)]
    assert all(torch.equal(a, b) for a, b in zip(alone, in_a_row))


@pytest.mark.parametrize("steps", [FBC_SKIPPING, MAG_SKIPPING, TAYLOR_SKIPPING], ids=["fbc", "mag", "taylorseer"])
def test_removed_cache_leaves_the_uncached_model(caption, uncached, steps):
    pipe = pipeline(steps)
    skipped = denoised(pipe, caption)
    remove_cache(pipe.transformer)
    assert torch.equal(denoised(pipe, caption), uncached[0])
    assert cache_stats(pipe.transformer) | {"cache_bytes": 0} == uncached[1]
    (name, options), = steps.items()
    registry.OPTIMIZATIONS[name](pipe, **options)  # the same cache again, on the same model
    assert torch.equal(denoised(pipe, caption), skipped)


def test_caches_compose_with_the_rewrites(caption):
    rewrites = {"cache_text_kv": {}, "fused_rope": {}, "fused_modulate": {}}
    plain = denoised(pipeline(dict(rewrites, step_counts={})), caption)
    for cache in ({"first_block_cache": {"threshold": 0.0}}, {"taylorseer": {"cache_interval": 1}}):
        assert torch.equal(denoised(pipeline(dict(rewrites, **cache)), caption), plain)


def test_mag_cache_refuses_a_loop_of_another_length(caption):
    pipe = pipeline({"mag_cache": {}})  # MagCache's OpenSora ratios: 30 steps
    with pytest.raises(ValueError, match=f"set for 30 steps .* sampler runs {STEPS}"):
        denoised(pipe, caption)


def test_checkpoint_names_unchanged():
    plain = load_pipeline("tiny", dtype="fp32", load=())
    for steps in (FBC_SKIPPING, MAG_SKIPPING, TAYLOR_SKIPPING):
        pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()), steps)
        assert all(list(pipe._module(c).state_dict()) == list(plain._module(c).state_dict()) for c in COMPONENTS)


@pytest.mark.parametrize("steps, message", [
    ({"first_block_cache": {"threshold": -1.0}}, "at least 0"),
    ({"mag_cache": {"max_skip_steps": -1}}, "max_skip_steps"),
    ({"mag_cache": {"retention_ratio": 1.5}}, r"in \[0, 1\]"),
    ({"mag_cache": {"mag_ratios": []}}, "needs ratios"),
    ({"taylorseer": {"cache_interval": 0}}, "cache_interval must be an int >= 1"),
    ({"taylorseer": {"disable_cache_before_step": 0}}, "disable_cache_before_step must be an int >= 1"),
    ({"teacache": {}, "first_block_cache": {}}, "already has the step cache"),
])
def test_bad_options_fail_clearly(steps, message):
    with pytest.raises(ValueError, match=message):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()), steps)


def test_calibration_needs_calibrate():
    pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()), MAG_SKIPPING)
    with pytest.raises(ValueError, match="calibrate=True"):
        with mag_calibration(pipe.transformer):
            pass
