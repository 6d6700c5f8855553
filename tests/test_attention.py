"""Attention kernels against the reference and SDPA, mask handling, the switch, "best", the memory
model and the benchmark planner. Bounds (max abs difference over the largest |value| of the yardstick):
fp32 variants against each other 1e-5; bf16 variants against float64 3e-2 (2^-8 rounding of q, k, v,
scores and output; SDPA itself lands at ~1e-2 here); chunked against unchunked 1e-6."""
import json

import pytest
import torch
from conftest import prefixed

from utils.experiments.e05_attention import (
    best_entries,
    exact,
    kernel_records,
    make_cases,
    make_inputs,
    run,
    store_best_table,
)
from utils.measure.benchmark import TimingPolicy
from utils.model.stdit3 import build_stdit3
from utils.optim import attention as attn
from utils.optim.attention import AttentionShape, model_shapes, peak_bytes

FP32 = 1e-5
BF16 = 3e-2
CHUNKED = 1e-6
ALL_CROSS = ("reference", "sdpa", "chunked", "bmm", "packed")


def relative(out, expected):
    return float((out.double() - expected.double()).abs().max() / expected.double().abs().max())


def qkv(batch=3, heads=4, q_len=40, k_len=23, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g).to(dtype) for n in (q_len, k_len, k_len)]


def key_mask(lengths, k_len=23):
    return (torch.arange(k_len) < torch.tensor(lengths)[:, None])[:, None, None]  # [B, 1, 1, L]


@pytest.mark.parametrize("kernel", attn.KERNELS)
@pytest.mark.parametrize("lengths", [(40, 40, 40), (17, 17, 17)])  # self-attention shapes: long-ish, short
def test_kernels_match_reference_fp32(kernel, lengths):
    q, k, v = qkv(q_len=lengths[0], k_len=lengths[1])
    fn = attn.attention_function("spatial", kernel, chunk_mib=0.002) or attn.sdpa
    assert relative(fn(q, k, v), attn.reference(q, k, v)) < FP32


@pytest.mark.parametrize("variant", ALL_CROSS + ("best",))
def test_masked_variants_match_sdpa_fp32(variant):
    q, k, v = qkv()
    mask = key_mask([23, 9, 4])
    fn = attn.attention_function("cross", variant, chunk_mib=0.002) or attn.sdpa
    assert relative(fn(q, k, v, mask), attn.sdpa(q, k, v, mask)) < FP32


@pytest.mark.parametrize("variant", ALL_CROSS)
def test_bf16_variants_within_bound_of_float64(variant):
    q, k, v = qkv(dtype=torch.bfloat16)
    mask = key_mask([23, 9, 4])
    fn = attn.attention_function("cross", variant) or attn.sdpa
    out = fn(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    assert relative(out, exact(q, k, v, mask)) < BF16


@pytest.mark.parametrize("variant", ALL_CROSS + ("best",))
def test_fully_padded_sample_gives_zeros_like_sdpa(variant):
    q, k, v = qkv()
    mask = key_mask([23, 0, 5])
    baseline = attn.sdpa(q, k, v, mask)
    assert torch.equal(baseline[1], torch.zeros_like(baseline[1])), "torch SDPA's CPU semantics changed"
    fn = attn.attention_function("cross", variant) or attn.sdpa
    out = fn(q, k, v, mask)
    assert not out.isnan().any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert relative(out, baseline) < FP32


@pytest.mark.parametrize("variant", ["packed", "best"])
def test_no_attended_key_at_all(variant):
    q, k, v = qkv()
    out = attn.attention_function("cross", variant)(q, k, v, key_mask([0, 0, 0]))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("variant", ALL_CROSS)
def test_non_prefix_mask(variant):
    q, k, v = qkv()
    mask = torch.rand(3, 1, 1, 23, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, ..., 0] = True
    fn = attn.attention_function("cross", variant) or attn.sdpa
    assert relative(fn(q, k, v, mask), attn.sdpa(q, k, v, mask)) < FP32


@pytest.mark.parametrize("chunk_mib", [0.0005, 0.004, 1.0])  # one query row, several samples, everything
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_unchunked(chunk_mib, masked):
    q, k, v = qkv(batch=5, q_len=37)
    mask = key_mask([23, 1, 7, 23, 0]) if masked else None
    assert relative(attn.chunked(q, k, v, mask, chunk_mib=chunk_mib), attn.reference(q, k, v, mask)) < CHUNKED


def test_variants_take_the_models_strided_layouts():
    shape = AttentionShape("cross", batch=2, q_len=30, k_len=12, heads=4, head_dim=16)
    q, k, v, mask = make_inputs(shape, torch.float32, caption_length=7)
    assert not q.is_contiguous() and not k.is_contiguous()
    expected = attn.sdpa(q, k, v, mask)
    for variant in ALL_CROSS:
        fn = attn.attention_function("cross", variant) or attn.sdpa
        assert relative(fn(q, k, v, mask), expected) < FP32, variant


def test_non_boolean_mask_is_refused():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="boolean"):
        attn.reference(q, k, v, torch.zeros(3, 1, 1, 23))


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="accepted"):
        attn.attention_function("temporal", "packed")
    with pytest.raises(ValueError, match="accepted"):
        attn.attention_function("diagonal", "sdpa")


# ---- the switch on the model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(stdit3_reference):
    tensors, _ = stdit3_reference
    model = build_stdit3("tiny")
    model.load_state_dict(prefixed(tensors, "weights."), strict=True)
    return model


@pytest.mark.parametrize("choice", ["reference", "chunked", "bmm", "best"])
@pytest.mark.parametrize("case", ["case1", "case2"])  # plain; CFG batch with a mask, x_mask and odd size
def test_set_attention_keeps_the_model_output(tiny, stdit3_reference, choice, case):
    tensors, _ = stdit3_reference
    inputs = prefixed(tensors, f"{case}.input.")
    keys = list(tiny.state_dict())
    with torch.no_grad():
        baseline = tiny(**inputs)
        cross = {"bmm": "packed"}.get(choice, choice)
        attn.set_attention(tiny, spatial=choice, temporal=choice, cross=cross, chunk_mib=0.001)
        try:
            out = tiny(**inputs)
        finally:
            attn.set_attention(tiny)  # back to SDPA
        again = tiny(**inputs)
    assert list(tiny.state_dict()) == keys
    assert (out - baseline).abs().max() < FP32 * max(1.0, float(baseline.abs().max()))
    assert torch.equal(again, baseline), "restoring sdpa must give the baseline bit for bit"
    assert (baseline - tensors[f"{case}.output"]).abs().max() < 1e-5


# ---- best ---------------------------------------------------------------------------------------------

def test_best_kernel_prefers_this_environment_and_nearest_length():
    entries = [dict(attention="temporal", dtype="fp32", key_length=15, best="bmm", environment_id="here", arch="x"),
               dict(attention="temporal", dtype="fp32", key_length=120, best="sdpa", environment_id="here", arch="x"),
               dict(attention="temporal", dtype="fp32", key_length=15, best="sdpa", environment_id="there", arch="x")]
    assert attn.best_kernel(entries, "temporal", torch.float32, 20, 20, "here", "x") == "bmm"
    assert attn.best_kernel(entries, "temporal", torch.float32, 100, 100, "here", "x") == "sdpa"
    assert attn.best_kernel(entries, "temporal", torch.float32, 15, 15, "elsewhere", "x") in ("bmm", "sdpa")
    assert attn.best_kernel(entries, "temporal", torch.float32, 15, 15, "elsewhere", "y") in ("bmm", "sdpa")
    assert attn.best_kernel(entries, "spatial", torch.float32, 15, 15, "here", "x") == "sdpa"  # no entry: SDPA


def test_best_kernel_is_chosen_per_call_shape():
    """Two settings with the same key length but different query lengths keep their own winners."""
    entries = [dict(attention="cross", dtype="bf16", query_length=1620, key_length=18, best="bmm",
                    environment_id="e", arch="a"),
               dict(attention="cross", dtype="bf16", query_length=24300, key_length=18, best="sdpa",
                    environment_id="e", arch="a")]
    assert attn.best_kernel(entries, "cross", torch.bfloat16, 1620, 18, "e", "a") == "bmm"
    assert attn.best_kernel(entries, "cross", torch.bfloat16, 20000, 18, "e", "a") == "sdpa"
    fn = attn.best_attention("cross", entries)
    q, k, v = qkv(batch=2, q_len=40, k_len=18, dtype=torch.bfloat16)
    fn(q, k, v)
    assert fn.choices == {("bf16", 40, 18): "bmm"}


def test_best_never_builds_a_large_score_matrix():
    entries = [dict(attention="spatial", dtype="fp32", key_length=40, best="bmm", environment_id="e", arch="a")]
    fn = attn.best_attention("spatial", entries, max_scores_mib=0.001)
    q, k, v = qkv()
    assert relative(fn(q, k, v), attn.sdpa(q, k, v)) < FP32


def test_committed_best_table_is_well_formed():
    entries = attn.load_best_table()
    assert entries
    for entry in entries:
        assert entry["attention"] in attn.KINDS and entry["dtype"] in ("fp32", "bf16")
        assert entry["best"] in attn.BEST_CANDIDATES and entry["key_length"] > 0


def test_store_best_table_replaces_the_notebooks_entries_of_an_environment(tmp_path):
    path = tmp_path / "best.json"
    first = dict(environment_id="e", arch="a", attention="cross", dtype="fp32", query_length=810, key_length=18,
                 best="sdpa", source="notebook 05_attention")
    notes = dict(first, query_length=405, key_length=300, source="x86-ceilings.md 3c")
    store_best_table([first, dict(first, query_length=1620), notes], path)
    store_best_table([dict(first, best="bmm")], path)  # a rerun measured only one shape
    entries = json.loads(path.read_text())["entries"]
    assert [(e["query_length"], e["best"]) for e in entries] == [(405, "sdpa"), (810, "bmm")]


# ---- shapes, memory model, SDPA kernel, the benchmark -----------------------------------------------------

def test_model_shapes_at_240p():
    shapes = model_shapes(latent_frames=15, tokens_per_frame=405)
    assert shapes["spatial"] == AttentionShape("spatial", 30, 405, 405)
    assert shapes["temporal"] == AttentionShape("temporal", 810, 15, 15)
    assert shapes["cross"] == AttentionShape("cross", 2, 6075, 300)
    assert model_shapes(15, 405, caption_tokens=18)["cross"].k_len == 18


def test_reference_memory_model():
    shape = AttentionShape("spatial", batch=30, q_len=3600, k_len=3600)  # 720p, 15 frames, CFG
    assert peak_bytes("reference", shape, torch.float32) > 8 * 30 * 16 * 3600**2  # fp32 scores + probabilities
    assert peak_bytes("bmm", shape, torch.bfloat16) < peak_bytes("reference", shape, torch.bfloat16) / 3
    assert peak_bytes("chunked", shape, torch.float32, chunk_mib=64) < 2**30
    assert peak_bytes("sdpa", shape, torch.float32) < 2**30


def test_sdpa_kernels_are_recorded():
    rows = attn.sdpa_kernels()
    assert {(r["dtype"], r["mask"]) for r in rows} >= {("fp32", "none"), ("bf16", "bool key mask")}
    assert all("_scaled_dot_product" in r["kernel"] for r in rows)


def test_benchmark_plans_measures_derives_and_skips():
    from utils.model.pipeline import load_pipeline

    pipe = load_pipeline("tiny", dtype="fp32", load=())
    cases = make_cases(pipe, ["144p"], "9:16", [17], ["fp32"], caption_length=3,
                       variants={"spatial": ("sdpa", "bmm"), "temporal": ("bmm",),
                                 "cross": ("bmm", "padded", "packed")})
    assert {c.work.k_len for c in cases if c.kind == "cross"} == {3, pipe.transformer.config.model_max_length}
    policy = TimingPolicy(warmup=1, repeats=1, threads=1)
    rows = list(run(cases, policy, max_call_s=1e-4, max_gib=1.0, skip_s=10.0))
    assert len(rows) == len(cases) and {r["status"] for r in rows} <= {"measured", "derived"}
    assert all(r["seconds"] > 0 and r["accuracy"]["rel_l2_error_vs_fp64"] < FP32 for r in rows)
    assert any(r["status"] == "derived" for r in rows)  # the tiny time cap forces partial measurements
    skipped = list(run(cases[:1], policy, max_call_s=1e-4, max_gib=1.0, skip_s=0.0))
    assert skipped[0]["status"] == "skipped" and skipped[0]["reason"]
    records = kernel_records(rows + skipped, "tiny", "9:16", 1)
    assert {r.metric for r in records} == {"predicted_peak_bytes", "seconds", "peak_rss_increase_bytes", "skipped"}
    entries = best_entries(rows, "e", 1)
    assert {e["attention"] for e in entries} <= {"spatial"} and all(e["best"] in ("sdpa", "bmm") for e in entries)
    assert all(e["query_length"] == e["key_length"] for e in entries)


def test_upstream_formulation_gives_the_faithful_output_and_restores_the_model(tiny, stdit3_reference):
    """Upstream's caption path (all tokens projected, valid ones packed, one attention per sample), patched
    in for the notebook's side-by-side timing, computes what the model computes; the model is itself after."""
    from utils.experiments.e05_attention import upstream_formulation

    tensors, _ = stdit3_reference
    inputs = prefixed(tensors, "case2.input.")  # CFG batch with a caption mask
    with torch.no_grad():
        ours = tiny(**inputs)
        with upstream_formulation(tiny):
            theirs = tiny(**inputs)
        again = tiny(**inputs)
    assert (ours - theirs).abs().max() < FP32 * max(1.0, float(ours.abs().max()))
    assert torch.equal(again, ours)
    assert "encode_caption" not in vars(tiny) and "forward" not in vars(tiny.spatial_blocks[0].cross_attn)
