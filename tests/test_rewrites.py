"""The rewrites of notebook 05 against the baseline on the tiny preset. Bounds: fp32 outputs (latents
after 2 denoising steps, decoded frames) within 1e-5 of the largest |value| ("exact within fp32
rounding"); ``cache_text_kv`` bit for bit; bf16 with every rewrite within 3e-2 relative L2 of bf16
without them (the rewrites round once where bf16 upstream rounds two or three times). Checkpoint names
are unchanged after every step."""
import pytest
import torch
from conftest import prefixed

from utils.experiments.e05_attention import pair_inputs, pair_model, synthetic_caption
from utils.measure.fidelity import compare
from utils.model.pipeline import VideoSetting, load_pipeline
from utils.model.sampler import make_scheduler, rflow_sample
from utils.model.stdit3 import build_stdit3
from utils.model.weights import COMPONENTS
from utils.optim import registry
from utils.optim.rewrites import (
    REWRITES,
    cache_text_kv,
    clear_caches,
    fuse_modulate,
    fuse_rope,
    modulated_norm,
    rewrite_model,
    vae_channels_last,
)

FP32 = 1e-5
BF16_REL_L2 = 3e-2
SETTING = VideoSetting.create("144p", "9:16", 17, steps=2)
PROMPT = "a red ball bouncing on a wooden floor"
TRANSFORMER_STEPS = ("attention", "cache_text_kv", "fused_rope", "fused_modulate")


def relative(out, expected):
    return float((out.double() - expected.double()).abs().max() / expected.double().abs().max())


def keys(pipe):
    return {c: list(pipe._module(c).state_dict()) for c in COMPONENTS}


@pytest.fixture(scope="module")
def caption():
    pipe = load_pipeline("tiny", dtype="fp32", load=("text_encoder",))
    return pipe.encode_prompt([PROMPT])


def denoised(pipe, caption):
    y, mask = caption
    z = pipe.prepare_latents(1, SETTING)
    return pipe.denoise(z, y, mask, SETTING, progress=False)


@pytest.fixture(scope="module")
def baseline(caption):
    pipe = load_pipeline("tiny", dtype="fp32", load=("transformer", "vae"))
    latents = denoised(pipe, caption)
    return dict(latents=latents, video=pipe.decode(latents, SETTING), keys=keys(pipe))


@pytest.mark.parametrize("name", TRANSFORMER_STEPS)
def test_each_transformer_rewrite_matches_the_baseline(name, caption, baseline):
    pipe = load_pipeline("tiny", dtype="fp32", load=("transformer",))
    registry.apply(pipe, {name: REWRITES[name]})
    assert pipe.optimizations == {name: REWRITES[name]}
    assert keys(pipe) == baseline["keys"]
    latents = denoised(pipe, caption)
    if name == "cache_text_kv":
        assert torch.equal(latents, baseline["latents"])  # the same numbers, reused
    assert relative(latents, baseline["latents"]) < FP32


@pytest.mark.parametrize("parts", [("spatial",), ("spatial", "temporal")])
def test_vae_channels_last_matches_the_baseline_and_survives_reload(parts, baseline):
    pipe = load_pipeline("tiny", dtype="fp32", load=("vae",))
    registry.apply(pipe, {"vae_channels_last": {"parts": parts}})
    assert keys(pipe) == baseline["keys"]
    conv = pipe.vae.spatial_vae.module.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert relative(pipe.decode(baseline["latents"], SETTING), baseline["video"]) < FP32
    pipe.release("vae")
    pipe.load("vae")
    assert pipe.vae.spatial_vae.module.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert relative(pipe.decode(baseline["latents"], SETTING), baseline["video"]) < FP32


def test_vae_channels_last_before_the_vae_is_loaded(baseline):
    """Applied to a pipeline whose VAE is still on the meta device, the layout comes when it loads."""
    pipe = load_pipeline("tiny", dtype="fp32", load=())
    registry.apply(pipe, {"vae_channels_last": {"parts": ("spatial",)}})
    pipe.load("vae")
    assert pipe.vae.spatial_vae.module.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert relative(pipe.decode(baseline["latents"], SETTING), baseline["video"]) < FP32


def test_all_rewrites_together_end_to_end(caption, baseline):
    pipe = load_pipeline("tiny", dtype="fp32", load=("transformer", "vae"))
    registry.apply(pipe, REWRITES)
    assert keys(pipe) == baseline["keys"]
    latents = denoised(pipe, caption)
    assert relative(latents, baseline["latents"]) < FP32
    assert relative(pipe.decode(latents, SETTING), baseline["video"]) < FP32


def test_rewrites_compose_with_bf16(caption):
    plain = load_pipeline("tiny", dtype="fp32", load=("transformer", "vae"))
    registry.apply(plain, {"bf16": {"components": ["transformer", "vae"]}})
    rewritten = load_pipeline("tiny", dtype="fp32", load=("transformer", "vae"))
    registry.apply(rewritten, REWRITES | {"bf16": {"components": ["transformer", "vae"]}})
    assert list(rewritten.optimizations)[0] == "bf16"  # the registry's order, whatever the dict's
    assert keys(rewritten) == keys(plain)
    assert rewritten.transformer.dtype == torch.bfloat16
    expected = denoised(plain, caption)
    latents = denoised(rewritten, caption)
    assert compare(latents, expected)["rel_l2_diff"] < BF16_REL_L2
    assert compare(rewritten.decode(latents, SETTING), plain.decode(expected, SETTING))["rel_l2_diff"] < BF16_REL_L2


# ---- the pieces ---------------------------------------------------------------------------------------

@pytest.fixture()
def tiny(stdit3_reference):
    tensors, _ = stdit3_reference
    model = build_stdit3("tiny")
    model.load_state_dict(prefixed(tensors, "weights."), strict=True)
    return model


def test_cache_text_kv_projects_once_per_caption(tiny, stdit3_reference):
    tensors, _ = stdit3_reference
    inputs = prefixed(tensors, "case3.input.")
    y_null = tiny.y_embedder.y_embedding[None, None]
    args = prefixed(inputs, "additional_args.")
    sample = lambda model, y: rflow_sample(model, make_scheduler(), inputs["z"], y, y_null,  # noqa: E731
                                           inputs["mask"], args, num_steps=3, progress=False)
    expected = sample(tiny, inputs["y"])
    other_expected = sample(tiny, inputs["y"] + 1)
    calls = []
    linear_forward = torch.nn.Linear.forward
    torch.nn.Linear.forward = lambda self, x: calls.append(self) or linear_forward(self, x)
    cache_text_kv(tiny)  # after: a hook calls the forward the module had when it was registered
    try:
        out = sample(tiny, inputs["y"])
        kv_calls = sum(c is tiny.spatial_blocks[0].cross_attn.kv_linear for c in calls)
        other = sample(tiny, inputs["y"] + 1)  # a new caption invalidates the cache
    finally:
        torch.nn.Linear.forward = linear_forward
    assert kv_calls == 1, "K/V of the caption recomputed at a later step"
    assert torch.equal(out, expected) and torch.equal(other, other_expected)
    assert (out - tensors["case3.output"]).abs().max() < 1e-5
    memos = [m._diffusers_hook.get_hook("cache_text_kv").memo for m in tiny.modules() if hasattr(m, "_diffusers_hook")]
    assert len(memos) == 5 and all(memos)  # the hooks on y_embedder and on each block's kv_linear
    clear_caches(tiny)
    assert not any(memos)


def test_caches_are_emptied_when_the_transformer_changes(caption):
    pipe = load_pipeline("tiny", dtype="fp32", load=("transformer",))
    registry.apply(pipe, {"cache_text_kv": {}, "fused_rope": {}})
    denoised(pipe, caption)
    memos = [hook.memo for m in pipe.transformer.modules() if hasattr(m, "_diffusers_hook")
             for hook in m._diffusers_hook.hooks.values()]  # the caption's projections, the RoPE tables
    assert memos and all(memos)
    pipe.release("transformer")
    assert not any(memos)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
def test_fused_rope_matches_rotary_embedding_torch(tiny, dtype, bound):
    tiny = tiny.to(dtype)
    rotate = tiny.temporal_blocks[0].attn.rotate  # upstream's rotary-embedding-torch
    qkv = torch.randn(6, 15, 3, 4, 16).to(dtype).permute(2, 0, 3, 1, 4)  # [3, B, H, T, D]
    expected = [rotate(qkv[0].contiguous()), rotate(qkv[1])]
    fuse_rope(tiny)
    fused = tiny.temporal_blocks[0].attn.rotate
    assert fused is not rotate
    for t, e in zip([qkv[0].contiguous(), qkv[1]], expected):  # contiguous, and a strided view
        out = fused(t)
        assert out.dtype == dtype and out.shape == e.shape
        assert relative(out, e) < bound


@pytest.mark.parametrize("shared", [True, False])
def test_modulated_norm_matches_upstream_formula(shared):
    x = torch.randn(2, 30, 64)
    shift, scale = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    if shared:
        shift, scale = shift[:1].expand(2, -1, -1), scale[:1].expand(2, -1, -1)
    expected = torch.nn.functional.layer_norm(x, (64,), eps=1e-6) * (1 + scale) + shift
    assert relative(modulated_norm(x, shift, scale, 1e-6), expected) < 1e-6


def test_fused_modulate_on_a_cfg_batch(tiny, stdit3_reference):
    tensors, _ = stdit3_reference
    inputs = prefixed(tensors, "case1.input.")
    inputs["timestep"] = inputs["timestep"][:1].expand_as(inputs["timestep"])  # CFG: one timestep
    with torch.no_grad():
        expected = tiny(**inputs)
        fuse_modulate(tiny)
        out = tiny(**inputs)
        per_sample = tiny(**prefixed(tensors, "case1.input."))  # distinct timesteps: upstream's formula
        with_x_mask = tiny(**prefixed(tensors, "case2.input."))  # the t0-frame path: the original forward
    assert relative(out, expected) < FP32
    assert (per_sample - tensors["case1.output"]).abs().max() < 1e-5
    assert (with_x_mask - tensors["case2.output"]).abs().max() < 1e-5


def test_rewrite_model_on_the_block_pair_proxy():
    pipe = load_pipeline("tiny", dtype="fp32", load=())
    y, mask = synthetic_caption(pipe, PROMPT)
    assert y.shape == (1, 1, 8, 32) and mask.shape == (1, 8) and 0 < int(mask.sum()) <= 8
    args, kwargs = pair_inputs(pipe, SETTING, y, mask, torch.float32)
    with torch.inference_mode():
        expected = pair_model(pipe, torch.float32)(*args, **kwargs)
        model = rewrite_model(pair_model(pipe, torch.float32), REWRITES)
        keys_after = list(model.state_dict())
        first, second = model(*args, **kwargs), model(*args, **kwargs)  # the second call uses the caches
    assert keys_after == list(pair_model(pipe, torch.float32).state_dict())
    assert len(model.spatial_blocks) == 1 and torch.equal(first, second)
    assert relative(first, expected) < FP32


def test_vae_channels_last_refuses_unknown_parts():
    with pytest.raises(ValueError, match="accepted"):
        vae_channels_last(None, parts=("mid",))
