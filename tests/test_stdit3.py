"""STDiT3 against upstream numerics (the shared tiny fixture) and the real checkpoint's manifest."""
import pytest
import torch
from conftest import prefixed

from utils.model.sampler import make_scheduler, rflow_sample
from utils.model.stdit3 import STDIT3_PRESETS, build_stdit3, config_from_dict
from utils.model.weights import read_manifest, state_dict_shapes

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(stdit3_reference):
    tensors, meta = stdit3_reference
    assert config_from_dict(meta["config"]) == STDIT3_PRESETS["tiny"]
    model = build_stdit3("tiny")
    model.load_state_dict(prefixed(tensors, "weights."), strict=True)
    return model


@pytest.mark.parametrize("case", ["case1", "case2"])
def test_forward_matches_upstream(tiny, stdit3_reference, case):
    tensors, _ = stdit3_reference
    with torch.no_grad():
        out = tiny(**prefixed(tensors, f"{case}.input."))
    expected = tensors[f"{case}.output"]
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (out - expected).abs().max() < ATOL


def test_intermediates_match_upstream(tiny, stdit3_reference):
    tensors, _ = stdit3_reference
    seen = {}

    def keep(name):
        return lambda module, args, output: seen.setdefault(name, output)

    hooks = [tiny.x_embedder.register_forward_hook(keep("x_embedder_out")),
             tiny.t_block.register_forward_hook(keep("t_mlp")),
             tiny.spatial_blocks[0].register_forward_hook(keep("spatial_block0_out")),
             tiny.temporal_blocks[0].register_forward_hook(keep("temporal_block0_out")),
             tiny.final_layer.register_forward_hook(keep("final_layer_out"))]
    with torch.no_grad():
        tiny(**prefixed(tensors, "case1.input."))
        seen["pos_emb"] = tiny.pos_embed(4, 6, scale=(64 * 96) ** 0.5 / 512, base_size=round(24**0.5),
                                         dtype=torch.float32)
    for hook in hooks:
        hook.remove()
    expected = prefixed(tensors, "case1.intermediate.")
    assert set(seen) == set(expected)
    for name, value in expected.items():
        assert (seen[name] - value).abs().max() < ATOL, name


def test_sampling_loop_matches_upstream(tiny, stdit3_reference):
    tensors, _ = stdit3_reference
    inputs = prefixed(tensors, "case3.input.")
    y_null = tiny.y_embedder.y_embedding[None, None]  # upstream text_encoder.null(1)
    out = rflow_sample(tiny, make_scheduler(), inputs["z"], inputs["y"], y_null, inputs["mask"],
                       prefixed(inputs, "additional_args."), num_steps=3, cfg_scale=7.0, progress=False)
    assert (out - tensors["case3.output"]).abs().max() < ATOL


def test_real_size_matches_checkpoint_manifest():
    model = build_stdit3("STDiT3-XL/2", device="meta")
    assert state_dict_shapes(model) == read_manifest("stdit3")
    assert list(model.state_dict()) == list(read_manifest("stdit3")), "state_dict order differs from upstream"


def test_hub_config_fields():
    hub = dict(depth=28, hidden_size=1152, num_heads=16, patch_size=[1, 2, 2], in_channels=4,
               caption_channels=4096, model_max_length=300, qk_norm=True, pred_sigma=True, mlp_ratio=4.0,
               input_sq_size=512, class_dropout_prob=0.1, drop_path=0.0, freeze_y_embedder=True,
               only_train_temporal=False, skip_y_embedder=False, enable_flash_attn=False,
               enable_layernorm_kernel=False, torch_dtype="float32", transformers_version="4.36.2",
               model_type="STDiT3", architectures=["STDiT3"])
    assert config_from_dict(hub) == STDIT3_PRESETS["STDiT3-XL/2"]


def test_bf16_forward_close_to_fp32(tiny, stdit3_reference):
    """bf16 runs end to end and stays near fp32 (bf16 has ~3 significant digits)."""
    tensors, _ = stdit3_reference
    inputs = prefixed(tensors, "case1.input.")
    bf16 = build_stdit3("tiny", dtype=torch.bfloat16)
    bf16.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        out = bf16(**inputs)
        ref = tiny(**inputs)
    assert out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_unknown_preset():
    with pytest.raises(ValueError, match="accepted: STDiT3-XL/2, tiny"):
        build_stdit3("STDiT3-XXL")


@pytest.mark.parametrize("lengths", [(5, 5), (7, 3), (0, 0)])  # CFG (equal), unequal, no valid token at all
def test_cross_attention_sees_only_valid_caption_tokens(tiny, lengths):
    """The model drops the caption's padding before the projection (upstream packs the valid tokens): the
    output equals attending over all padded tokens with the key mask, and the projection gets the valid
    tokens only, with no key mask left when every sample has the same caption length."""
    g = torch.Generator().manual_seed(0)
    cfg = tiny.config
    B, L = len(lengths), cfg.model_max_length
    x = torch.randn(B, cfg.in_channels, 3, 8, 8, generator=g)
    y = torch.randn(B, 1, L, cfg.caption_channels, generator=g)
    mask = (torch.arange(L) < torch.tensor(lengths)[:, None]).long()
    args = dict(timestep=torch.tensor([500.0] * B), y=y, mask=mask, fps=torch.tensor([24.0]),
                height=torch.tensor([64.0]), width=torch.tensor([64.0]))
    seen = []
    hook = tiny.y_embedder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    padded_forward = tiny.encode_caption

    def padded(y, mask):  # the previous formulation: all L tokens projected, the padding masked
        return tiny.y_embedder(y.squeeze(1)), mask.repeat(B // mask.shape[0], 1).bool()

    with torch.no_grad():
        out = tiny(x, **args)
        y_valid, key_mask = tiny.encode_caption(y, mask)
        tiny.encode_caption = padded
        try:
            expected = tiny(x, **args)
        finally:
            tiny.encode_caption = padded_forward
    hook.remove()
    assert seen[0] == max(max(lengths), 1)
    assert y_valid.shape[1] == max(max(lengths), 1)
    assert (key_mask is None) == (len(set(lengths)) == 1 and lengths[0] > 0)
    assert (out - expected).abs().max() < ATOL * max(1.0, float(expected.abs().max()))
