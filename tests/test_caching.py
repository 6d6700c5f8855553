"""The step caches of notebook 07 (utils.optim.caching) on the tiny preset: a cache that skips nothing
reproduces the uncached latents bit for bit; a cache that skips reports the evaluations it ran, counted
below its hooks and checked against the schedule; state is reset between videos; checkpoint names stay."""
import numpy as np
import pytest
import torch

from utils.experiments import e07_step_caching as e07
from utils.measure.records import prepare
from utils.measure.results import RESULTS, load_records
from utils.model.pipeline import VideoSetting, load_pipeline
from utils.model.sampler import rflow_timesteps
from utils.model.weights import COMPONENTS, TRAINED_MINI, weights_present
from utils.optim import registry
from utils.optim.caching import (
    PAB_OPENSORA,
    PAB_WINDOW,
    TEACACHE_OPENSORA,
    cache_bytes,
    cache_stats,
    fit_teacache,
    pab,
    pab_timestep,
    remove_cache,
    teacache,
    teacache_stats,
)
from utils.report.sections import s07_step_caching as s07
from utils.testbed.adherence import paired_margin

STEPS = 8
SETTING = VideoSetting.create("144p", "9:16", 17, steps=STEPS)
PROMPT = "a red ball bouncing on a wooden floor"


@pytest.fixture(scope="module")
def caption():
    pipe = load_pipeline("tiny", dtype="fp32", load=("text_encoder",))
    return pipe.encode_prompt([PROMPT])


def pipeline(steps=None):
    pipe = load_pipeline("tiny", dtype="fp32", load=("transformer",))
    return registry.apply(pipe, steps or {"step_counts": {}})


def denoised(pipe, caption, seed=42):
    y, mask = caption
    setting = VideoSetting.create("144p", "9:16", 17, steps=STEPS, seed=seed)
    return pipe.denoise(pipe.prepare_latents(1, setting), y, mask, setting, progress=False)


@pytest.fixture(scope="module")
def uncached(caption):
    pipe = pipeline()
    return denoised(pipe, caption), cache_stats(pipe.transformer)


def test_uncached_counts_every_module(uncached):
    _, stats = uncached
    blocks = stats["blocks"]
    assert stats["evaluations"] == STEPS
    assert all(stats[f"executed_{kind}"] == STEPS * blocks for kind in ("block", "attn", "cross_attn", "mlp"))
    assert stats["cache_bytes"] == 0


@pytest.mark.parametrize("steps", [{"teacache": {"threshold": 0.0}},
                                   {"pab": {"spatial": None, "temporal": None, "cross": None}},
                                   {"pab": {"window": (0, 1)}}],
                         ids=["teacache-0", "pab-no-range", "pab-empty-window"])
def test_cache_that_skips_nothing_is_exact(caption, uncached, steps):
    pipe = pipeline(steps)
    out = denoised(pipe, caption)
    assert torch.equal(out, uncached[0])
    assert cache_stats(pipe.transformer) | {"cache_bytes": 0} == uncached[1]


def test_teacache_reports_what_it_ran(caption, uncached):
    pipe = pipeline({"teacache": {"threshold": 0.5, "coefficients": [1.0, 0.0]}})
    out = denoised(pipe, caption)
    stats, own = cache_stats(pipe.transformer), teacache_stats(pipe.transformer)
    assert own["steps"] == STEPS and 2 <= own["computed"] < STEPS  # the first and last always run
    assert stats["evaluations"] == own["computed"]
    assert stats["executed_block"] == own["computed"] * stats["blocks"]
    assert len(own["distances"]) == STEPS - 2
    assert not torch.equal(out, uncached[0])
    # the cached residual and the last modulated input, one [2, N, C] activation each
    assert stats["cache_bytes"] > 0


def test_teacache_replay_computes_the_given_steps(caption):
    pipe = pipeline({"teacache": {"threshold": 0.0, "replay": [0, 3, 5]}})
    denoised(pipe, caption)
    assert cache_stats(pipe.transformer)["evaluations"] == 4  # 0, 3, 5 and the last step


def test_pab_reuses_on_its_schedule(caption):
    pipe = pipeline({"pab": {}})
    denoised(pipe, caption)
    stats = cache_stats(pipe.transformer)
    timesteps = rflow_timesteps(STEPS, *(torch.tensor([float(v)]) for v in (SETTING.height, SETTING.width,
                                                                            SETTING.num_frames)))
    inside = [PAB_WINDOW[0] < pab_timestep(t) < PAB_WINDOW[1] for t in timesteps.tolist()]
    reused = {kind: sum(1 for i in range(1, STEPS) if inside[i] and i % every) for kind, every in PAB_OPENSORA.items()}
    pairs = stats["blocks"] // 2
    assert sum(inside) > 0
    assert stats["executed_attn"] == 2 * pairs * STEPS - pairs * (reused["spatial"] + reused["temporal"])
    assert stats["executed_cross_attn"] == 2 * pairs * (STEPS - reused["cross"])
    assert stats["executed_mlp"] == stats["executed_block"] == 2 * pairs * STEPS
    assert stats["evaluations"] == STEPS


@pytest.mark.parametrize("steps", [{"teacache": {"threshold": 0.5, "coefficients": [1.0, 0.0]}}, {"pab": {}}],
                         ids=["teacache", "pab"])
def test_state_is_reset_between_videos(caption, steps):
    alone = [denoised(pipeline(steps), caption, seed) for seed in (1, 2)]
    pipe = pipeline(steps)
    in_a_row = [denoised(pipe, caption, seed) for seed in (1, 2)]
    assert all(torch.equal(a, b) for a, b in zip(alone, in_a_row))


def test_caches_compose_with_the_rewrites(caption):
    rewrites = {"cache_text_kv": {}, "fused_rope": {}, "fused_modulate": {}}
    plain = denoised(pipeline(dict(rewrites, step_counts={})), caption)
    cached = pipeline(dict(rewrites, teacache={"threshold": 0.0}))
    assert torch.equal(denoised(cached, caption), plain)


def test_one_model_takes_caches_in_turn(caption, uncached):
    pipe = pipeline({"teacache": {"threshold": 0.5, "coefficients": [1.0, 0.0]}})
    skipped = denoised(pipe, caption)
    remove_cache(pipe.transformer)
    assert torch.equal(denoised(pipe, caption), uncached[0])
    assert cache_stats(pipe.transformer)["evaluations"] == STEPS
    pab(pipe.transformer)
    remove_cache(pipe.transformer)
    teacache(pipe.transformer, threshold=0.5, coefficients=(1.0, 0.0))
    assert torch.equal(denoised(pipe, caption), skipped)
    with pytest.raises(ValueError, match="already has the step cache"):
        pab(pipe.transformer)
    assert torch.equal(denoised(pipe, caption), skipped)  # the refused cache left no hook behind


def test_checkpoint_names_unchanged():
    plain = load_pipeline("tiny", dtype="fp32", load=())
    for steps in ({"teacache": {}}, {"pab": {}}):
        pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()), steps)
        assert all(list(pipe._module(c).state_dict()) == list(plain._module(c).state_dict()) for c in COMPONENTS)


def test_fit_recovers_a_known_polynomial():
    x = np.linspace(0.01, 0.3, 40)
    y = np.poly1d(TEACACHE_OPENSORA)(x)
    assert np.allclose(fit_teacache(list(zip(x, y))), TEACACHE_OPENSORA, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="more than 4 pairs"):
        fit_teacache([(0.1, 0.1)] * 4)


@pytest.mark.parametrize("steps, message", [
    ({"teacache": {"threshold": -0.1}}, "at least 0"),
    ({"teacache": {"replay": [1.5]}}, "step indices"),
    ({"pab": {"spatial": 0}}, "positive int"),
    ({"pab": {"window": (900, 100)}}, "low < high"),
])
def test_bad_options_fail_clearly(steps, message):
    with pytest.raises(ValueError, match=message):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()), steps)


def test_cache_bytes_counts_nothing_without_state():
    assert cache_bytes(load_pipeline("tiny", dtype="fp32", load=()).transformer) == 0


def test_the_recommended_cache_keeps_the_mini_models_adherence():
    """The cache the report recommends (``s07_step_caching.choice`` over the stored records) against the uncached
    run on the held-out captions, two seeds, paired: its all-correct fraction is no further below the uncached
    run's than two standard errors of the per-clip differences."""
    if not weights_present():
        pytest.skip("the trained mini model is not in data/mini-model")
    rows, environment = s07.notebook_rows(prepare(load_records(RESULTS)), None)
    best = s07.choice(s07.curve_table(rows)) if environment else None
    if not best or not best["best"]:
        pytest.skip("no stored notebook 07 run recommends a cache")
    row = rows[(rows["variant"] == best["best"]["variant"]) & (rows["metric"] == "adherence_difference")].iloc[-1]
    variant = e07.variant_of(row["config.method"], row["config.method_value"], int(row["config.sampling_steps"]),
                             row["config.coefficients"])
    pipe = load_pipeline("mini", weights=TRAINED_MINI, dtype="fp32")
    reference = e07.run_clips(pipe, e07.variant_of("none", variant.steps, variant.steps), ["held_out"], [0, 1], 7.0)
    table = e07.clip_table(e07.run_clips(pipe, variant, ["held_out"], [0, 1], 7.0), reference)
    assert table["evaluations"].mean() < variant.steps or table["attention_fraction"].mean() < 1  # it saved work
    differences = table["all_correct"].astype(float) - e07.clip_table(reference, reference)["all_correct"].astype(float)
    assert differences.mean() >= -paired_margin(differences.to_numpy())
