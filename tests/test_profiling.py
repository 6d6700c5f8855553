"""Profiling helpers: operator classes, stage tables, trace files and module-group times (tiny models)."""
import json

import pytest
import torch
from conftest import prefixed
from torch import nn

from utils.measure.profiling import (
    OP_CLASSES,
    STDIT3_GROUPS,
    class_table,
    classify_op,
    module_breakdown,
    op_table,
    profile_stage,
)
from utils.model.stdit3 import build_stdit3

EXPECTED_CLASSES = {
    "matmul": ["aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm",
               "aten::_int_mm", "mkldnn::_linear_pointwise"],
    "attention": ["aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                  "aten::softmax", "aten::_softmax", "aten::_safe_softmax"],
    "normalization": ["aten::layer_norm", "aten::native_layer_norm", "aten::group_norm",
                      "aten::native_group_norm", "aten::rms_norm"],
    "elementwise": ["aten::add", "aten::add_", "aten::mul", "aten::gelu", "aten::silu", "aten::sin", "aten::cos",
                    "aten::rsqrt", "aten::pow", "aten::mean", "aten::where", "aten::add.Tensor",
                    "aten::upsample_trilinear3d"],
    "convolution": ["aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::conv3d",
                    "aten::conv2d", "mkldnn::_convolution_pointwise"],
    "memory": ["aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::to", "aten::_to_copy",
               "aten::permute", "aten::reshape", "aten::view", "aten::transpose", "aten::t", "aten::unsqueeze",
               "aten::pad", "aten::constant_pad_nd", "aten::empty", "aten::fill_", "aten::zero_",
               "aten::upsample_nearest2d", "aten::as_strided", "aten::expand"],
    "other": ["aten::randn", "aten::normal_", "aten::item", "my_custom_label", "aten::madeup_op"],
}


@pytest.mark.parametrize("op_class", EXPECTED_CLASSES)
def test_classify_op(op_class):
    assert {name: classify_op(name) for name in EXPECTED_CLASSES[op_class]} == \
        {name: op_class for name in EXPECTED_CLASSES[op_class]}


@pytest.fixture(scope="module")
def sequential_profile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU())
    x = torch.randn(8, 16)
    with torch.no_grad():
        model(x)  # warm-up
        return profile_stage(model, x, stage="tiny_stage")


def test_class_table_of_linear_layernorm_gelu(sequential_profile):
    classes = class_table(sequential_profile).set_index("op_class")
    assert list(classes.index) == list(OP_CLASSES)
    assert (classes.loc[["matmul", "normalization", "elementwise"], "self_ms"] > 0).all()
    assert abs(classes["share"].sum() - 1) < 1e-6
    assert (classes["stage"] == "tiny_stage").all()


def test_op_table_counts_operators_only(sequential_profile):
    ops = op_table(sequential_profile)
    assert list(ops.columns) == ["stage", "op", "op_class", "calls", "self_ms", "share"]
    assert "tiny_stage" not in set(ops["op"])
    assert all("::" in op for op in ops["op"])
    assert abs(ops["share"].sum() - 1) < 1e-6
    assert ops["self_ms"].is_monotonic_decreasing
    # the label row is kept in the raw rows, marked as not counted
    labels = [row for row in sequential_profile.ops if row.op == "tiny_stage"]
    assert len(labels) == 1 and not labels[0].counted
    assert isinstance(sequential_profile.result, torch.Tensor)


def test_traces_written(tmp_path):
    model = nn.Linear(8, 8)
    profile_stage(model, torch.randn(2, 8), stage="encode_prompt", trace_dir=tmp_path / "traces")
    tensorboard = list((tmp_path / "traces").glob("*.pt.trace.json"))
    chrome = tmp_path / "traces" / "encode_prompt.chrome.json"
    assert len(tensorboard) == 1 and tensorboard[0].name.startswith("encode_prompt.")
    for path in (tensorboard[0], chrome):
        trace = json.loads(path.read_text())
        assert isinstance(trace["traceEvents"], list) and trace["traceEvents"]
        assert any(event.get("name") == "encode_prompt" for event in trace["traceEvents"])


def test_bad_stage_label():
    with pytest.raises(ValueError, match="stage label"):
        profile_stage(lambda: None, stage="a/b")


@pytest.fixture(scope="module")
def tiny_stdit3(stdit3_reference):
    tensors, _ = stdit3_reference
    model = build_stdit3("tiny")
    model.load_state_dict(prefixed(tensors, "weights."), strict=True)
    return model, prefixed(tensors, "case1.input.")


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_module_breakdown_stdit3(tiny_stdit3):
    model, inputs = tiny_stdit3
    with torch.no_grad():
        model(**inputs)  # warm-up
        times = module_breakdown(model, model, groups=STDIT3_GROUPS, **inputs)
    assert set(times) == set(STDIT3_GROUPS)
    assert all(times[group] > 0 for group in ("spatial_attn", "temporal_attn", "cross_attn", "mlp")), times
    assert _hook_count(model) == 0


def test_module_breakdown_refuses_overlapping_groups(tiny_stdit3):
    model, inputs = tiny_stdit3
    overlapping = {"attn": lambda n: n.endswith("attn"), "cross": lambda n: n.endswith("cross_attn")}
    with pytest.raises(ValueError, match="disjoint"):
        module_breakdown(model, model, groups=overlapping, **inputs)
    nested = {"blocks": lambda n: n == "spatial_blocks.0", "mlp": lambda n: n.endswith(".mlp")}
    with pytest.raises(ValueError, match="must not nest"):
        module_breakdown(model, model, groups=nested, **inputs)
    assert _hook_count(model) == 0


def test_module_breakdown_removes_hooks_when_fn_raises(tiny_stdit3):
    model, _ = tiny_stdit3

    def broken():
        model.final_layer(torch.randn(2, 5, 3), torch.randn(2, 64), 1, 5)  # wrong width: raises inside

    with pytest.raises(RuntimeError):
        module_breakdown(model, broken, groups={"final_layer": STDIT3_GROUPS["final_layer"]})
    assert _hook_count(model) == 0
