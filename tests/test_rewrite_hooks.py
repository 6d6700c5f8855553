"""The transformer rewrites as diffusers hooks (``utils.optim.rewrites``): registered under their names,
removable (the original forward, bit for bit), their memos emptied by the registry's reset, checkpoint
names unchanged, and rewritten blocks still compile (``block.compile()``, as ``apply_compile`` does) to
the eager rewritten output within fp32 rounding (1e-5 of the largest |value|)."""
import pytest
import torch
from conftest import prefixed
from diffusers.hooks import HookRegistry
from torch._dynamo.utils import counters

from utils.model.stdit3 import build_stdit3
from utils.optim.rewrites import (
    HOOKED_REWRITES,
    REWRITES,
    CaptionMemo,
    FusedModulate,
    FusedRoPE,
    ProjectionMemo,
    cache_text_kv,
    clear_caches,
    remove_rewrite,
    rewrite_hooks,
    rewrite_model,
)

FP32 = 1e-5


@pytest.fixture()
def tiny(stdit3_reference):
    tensors, _ = stdit3_reference
    model = build_stdit3("tiny")
    model.load_state_dict(prefixed(tensors, "weights."), strict=True)
    return model


@pytest.fixture()
def cfg_inputs(stdit3_reference):
    """A CFG batch (one timestep for both samples), so that ``fused_modulate`` takes its fused path."""
    tensors, _ = stdit3_reference
    inputs = prefixed(tensors, "case1.input.")
    inputs["timestep"] = inputs["timestep"][:1].expand_as(inputs["timestep"]).clone()
    return inputs


def hooked(model):
    """Every rewrite in ``HOOKED_REWRITES`` applied to ``model``."""
    return rewrite_model(model, {name: REWRITES[name] for name in HOOKED_REWRITES})


def relative(out, expected):
    return float((out.double() - expected.double()).abs().max() / expected.double().abs().max())


def test_hooks_are_registered_under_their_names(tiny):
    hooked(tiny)
    blocks = (*tiny.spatial_blocks, *tiny.temporal_blocks)
    expected = {  # name -> (module, hook class) of each hook
        "cache_text_kv": [(tiny.y_embedder, CaptionMemo), *((b.cross_attn.kv_linear, ProjectionMemo) for b in blocks)],
        "fused_rope": [(b.attn, FusedRoPE) for b in tiny.temporal_blocks],
        "fused_modulate": [(b, FusedModulate) for b in blocks],
    }
    for name, placed in expected.items():
        assert len(rewrite_hooks(tiny, name)) == len(placed)
        for module, kind in placed:
            assert isinstance(HookRegistry.check_if_exists_or_initialize(module).get_hook(name), kind)
    assert len({id(hook.memo) for hook in rewrite_hooks(tiny, "fused_rope")}) == 1  # one table cache per model
    with pytest.raises(ValueError, match="already exists"):
        cache_text_kv(tiny)


@pytest.mark.parametrize("name", HOOKED_REWRITES)
def test_removing_a_rewrite_restores_the_original_output(name, tiny, cfg_inputs):
    upstream_rotate = tiny.temporal_blocks[0].attn.rotate
    with torch.no_grad():
        expected = tiny(**cfg_inputs)
        hooked(tiny)
        rewritten = tiny(**cfg_inputs)  # fills the memos
        remove_rewrite(tiny, name)
        assert rewrite_hooks(tiny, name) == []
        assert all(rewrite_hooks(tiny, other) for other in HOOKED_REWRITES if other != name)
        partly = tiny(**cfg_inputs)
        for other in HOOKED_REWRITES:
            if other != name:
                remove_rewrite(tiny, other)
        restored = tiny(**cfg_inputs)
    assert relative(rewritten, expected) < FP32 and relative(partly, expected) < FP32
    assert torch.equal(restored, expected)
    assert tiny.temporal_blocks[0].attn.rotate is upstream_rotate
    with pytest.raises(ValueError, match="not applied"):
        remove_rewrite(tiny, name)
    with pytest.raises(ValueError, match="accepted"):
        remove_rewrite(tiny, "attention")


def test_reset_empties_the_memo_and_a_stale_caption_is_never_reused(tiny, cfg_inputs):
    other_inputs = cfg_inputs | {"y": cfg_inputs["y"] + 1}
    with torch.no_grad():
        expected, other_expected = tiny(**cfg_inputs), tiny(**other_inputs)
        hooked(tiny)
        tiny(**cfg_inputs)
        memos = [hook.memo for name in ("cache_text_kv", "fused_rope") for hook in rewrite_hooks(tiny, name)]
        assert len(memos) == 1 + 4 + 2 and all(memos)
        clear_caches(tiny)  # the registry's reset_stateful_hooks
        assert not any(memos)
        assert tiny(**other_inputs).equal(tiny(**other_inputs))  # the new caption's memo, reused
        assert relative(tiny(**other_inputs), other_expected) < FP32
        caption = cfg_inputs["y"].clone()
        first = tiny(**cfg_inputs | {"y": caption})
        caption += 1  # the caller's buffer, reused for another caption: the memo holds a copy
        second = tiny(**cfg_inputs | {"y": caption})
    assert relative(first, expected) < FP32 and relative(second, other_expected) < FP32


def test_the_projection_memo_sees_in_place_changes(tiny):
    linear = tiny.spatial_blocks[0].cross_attn.kv_linear
    cache_text_kv(tiny)
    y = torch.randn(2, 8, 64)
    with torch.no_grad():
        first = linear(y)
        assert linear(y) is first  # the same tensor, unmodified: the memo
        y.mul_(2)  # bumps its version counter
        second = linear(y)
        assert torch.equal(second, torch.nn.functional.linear(y, linear.weight, linear.bias))


def test_checkpoint_names_and_values_are_unchanged(tiny):
    state = tiny.state_dict()
    modules = [name for name, _ in tiny.named_modules()]
    rewrite_model(tiny, REWRITES)
    assert list(tiny.state_dict()) == list(state)
    assert all(torch.equal(tensor, state[key]) for key, tensor in tiny.state_dict().items())
    assert [name for name, _ in tiny.named_modules()] == modules  # hooked, never replaced
    for name in HOOKED_REWRITES:
        remove_rewrite(tiny, name)
    assert list(tiny.state_dict()) == list(state)


def test_rewritten_blocks_compile(tiny, cfg_inputs):
    other_inputs = cfg_inputs | {"y": cfg_inputs["y"] + 1}
    rewrite_model(tiny, REWRITES)
    torch._dynamo.reset()  # earlier compilations in this process would count against the recompile limit
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        eager, other_eager = tiny(**cfg_inputs), tiny(**other_inputs)
        for block in (*tiny.spatial_blocks, *tiny.temporal_blocks):
            block.compile()
        compiled = [tiny(**cfg_inputs), tiny(**cfg_inputs)]  # the second call with the memos filled
        other = tiny(**other_inputs)  # a new caption, through the compiled blocks
    assert all(relative(out, eager) < FP32 for out in compiled)
    assert relative(other, other_eager) < FP32
    assert counters["stats"]["unique_graphs"] > graphs  # the blocks ran compiled
