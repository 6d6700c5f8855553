"""INT8 post-training quantisation (``utils.optim.quantize``) against the float baseline.

Stated bounds:
- one quantised Linear stack on Gaussian inputs, relative L2 error against float: w8a8_dynamic < 3 %,
  w8a8_dynamic_ao (per-tensor activations) < 5 %, w8a8_static (calibrated on the same distribution) < 5 %,
  w8_weight_only < 1.5 % (fp32 and bf16);
- the tiny pipeline's two-step latent with the transformer's blocks in w8a8_dynamic: relative L2 < 10 %;
- the trained mini model (w8a8_dynamic, held-out captions and a third of the training ones, seed 0): each
  attribute's accuracy within 0.15 of fp32's (2 clips in 15, 3 in 20), and the detected attributes of at
  least 70 % of the clips identical to fp32's;
- static W8A8's memory-bounded observer gives exactly torchao's own observer's result;
- a saved quantised transformer reloads into a fresh one and gives bit-identical outputs.
"""
import io

import pytest
import torch
from torch import nn

from utils.model import weights
from utils.model.pipeline import VideoSetting, load_pipeline
from utils.model.stdit3 import build_stdit3
from utils.optim import quantize, registry
from utils.report import render
from utils.testbed import minimodel, synthetic
from utils.testbed.adherence import adherence, adherence_margin, adherence_summary

BOUNDS = {"w8a8_dynamic": 0.03, "w8a8_dynamic_ao": 0.05, "w8a8_static": 0.05, "w8_weight_only": 0.015}
SETTING = VideoSetting.create("144p", "9:16", 17, steps=2)
PROMPT = "a red circle moving right"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def stack(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scheme", sorted(BOUNDS))
def test_quantised_linear_within_bound(one_thread, scheme, dtype):
    if scheme == "w8a8_dynamic_ao" and dtype != torch.float32:
        with pytest.raises(ValueError, match="needs an fp32 module"):
            quantize.quantize_module(stack(dtype), scheme, ["0", "2"])
        return
    x = torch.randn(4, 64, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        expected = stack(dtype)(x)
        calibration = [((torch.randn(4, 64, 256).to(dtype),), {})] if scheme == "w8a8_static" else None
        module = quantize.quantize_module(stack(dtype), scheme, ["0", "2"], calibration)
        assert all(quantize.is_quantized(module[i]) for i in (0, 2))
        error = rel(module(x), expected)
    assert 0 < error < BOUNDS[scheme], error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("alpha", [0.5, None], ids=["smoothquant", "plain"])
def test_range_observer_matches_torchaos(one_thread, dtype, alpha):
    """Static W8A8 through ``RangeObserver`` (per-channel extremes) equals torchao's own observer (every
    input kept) bit for bit: the same smoothing factors and activation scales."""
    from torchao.prototype.smoothquant import SmoothQuantConfig
    from torchao.quantization import quantize_

    generator = torch.Generator().manual_seed(2)
    calls = [torch.randn(3, 32, 256, generator=generator).to(dtype) * torch.linspace(0.1, 8, 256).to(dtype)
             for _ in range(3)]
    theirs = stack(dtype)
    config = quantize._config("w8a8_static")
    quantize_(theirs, SmoothQuantConfig(config, step="prepare", alpha=alpha), filter_fn=quantize._filter(["0", "2"]))
    x = torch.randn(2, 16, 256, generator=generator).to(dtype)
    with torch.inference_mode():
        for c in calls:
            theirs(c)
        quantize_(theirs, SmoothQuantConfig(config, step="convert", alpha=alpha), filter_fn=quantize._filter(["0", "2"]))
        ours = quantize.quantize_module(stack(dtype), "w8a8_static", ["0", "2"], [((c,), {}) for c in calls], alpha)
        for i in (0, 2):
            assert torch.equal(ours[i].weight.act_pre_scale, theirs[i].weight.act_pre_scale)
            assert torch.equal(ours[i].weight.act_quant_scale, theirs[i].weight.act_quant_scale)
        assert torch.equal(ours(x), theirs(x))


def test_layer_classes_partition_the_transformers_linear_layers():
    model = build_stdit3("tiny", device="meta")
    every = quantize.selected_linears(model, "transformer", None)
    per_class = {c: set(quantize.selected_linears(model, "transformer", (c,))) for c in quantize.LAYER_CLASSES}
    assert sum(len(names) for names in per_class.values()) == len(every)  # each Linear in exactly one class
    assert set().union(*per_class.values()) == set(every)
    assert "spatial_blocks.0.attn.qkv" in per_class["spatial_attn"]
    assert "temporal_blocks.0.cross_attn.kv_linear" in per_class["cross_attn"]
    assert "final_layer.linear" in per_class["final_layer"] and "t_block.1" in per_class["embedders"]


@pytest.fixture(scope="module")
def reference(one_thread):
    pipe = load_pipeline("tiny", dtype="fp32", load=("text_encoder", "transformer"))
    y, mask = pipe.encode_prompt([PROMPT])
    return dict(y=y, mask=mask, z=pipe.prepare_latents(1, SETTING),
                latent=pipe.denoise(pipe.prepare_latents(1, SETTING), y, mask, SETTING, progress=False), pipe=pipe)


def test_pipeline_step_bound_classes_and_reload(reference):
    pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"quantize": {"scheme": "w8a8_dynamic"}})
    pipe.load("transformer")
    model = pipe.transformer
    assert quantize.is_quantized(model.spatial_blocks[0].mlp.fc1)
    assert not quantize.is_quantized(model.final_layer.linear) and not quantize.is_quantized(model.t_block[1])
    assert model.quantize_seconds > 0
    latent = pipe.denoise(reference["z"], reference["y"], reference["mask"], SETTING, progress=False)
    assert 0 < rel(latent, reference["latent"]) < 0.10
    pipe.release("transformer")  # plain meta weights again, quantised again on the next load
    assert type(model.spatial_blocks[0].mlp.fc1.weight) is nn.Parameter and model.spatial_blocks[0].mlp.fc1.weight.is_meta
    pipe.load("transformer")
    assert torch.equal(pipe.denoise(reference["z"], reference["y"], reference["mask"], SETTING, progress=False), latent)
    assert quantize.quantized_bytes(model) < 0.6 * quantize.quantized_bytes(reference["pipe"].transformer)


def test_torch_ao_path_swaps_and_restores(reference):
    pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"quantize": {"scheme": "w8a8_dynamic_ao"}})
    pipe.load("transformer")
    fc1 = pipe.transformer.spatial_blocks[0].mlp.fc1
    assert type(fc1).__module__.startswith("torch.ao.nn.quantized")
    latent = pipe.denoise(reference["z"], reference["y"], reference["mask"], SETTING, progress=False)
    assert 0 < rel(latent, reference["latent"]) < 0.15
    pipe.release("transformer")
    assert type(pipe.transformer.spatial_blocks[0].mlp.fc1) is nn.Linear
    pipe.load("transformer")
    assert torch.equal(pipe.denoise(reference["z"], reference["y"], reference["mask"], SETTING, progress=False), latent)


def test_static_calibration_from_captured_inputs(reference, tmp_path):
    path = quantize.capture_inputs(reference["pipe"], reference["y"], reference["mask"], SETTING,
                                   tmp_path / "calibration.pt", progress=False)
    calls = torch.load(path, weights_only=False)
    assert len(calls) == SETTING.steps and calls[0][0][0].shape[0] == 2  # one CFG call per step
    pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()),
                          {"quantize": {"scheme": "w8a8_static", "calibration": str(path)}})
    pipe.load("transformer")
    fc1 = pipe.transformer.spatial_blocks[0].mlp.fc1.weight
    assert type(fc1).__name__ == "Int8Tensor" and fc1.act_quant_scale is not None and fc1.act_pre_scale is not None
    latent = pipe.denoise(reference["z"], reference["y"], reference["mask"], SETTING, progress=False)
    assert 0 < rel(latent, reference["latent"]) < 0.15


def test_bad_input_fails_early(tmp_path):
    pipe = load_pipeline("tiny", dtype="fp32", load=())
    with pytest.raises(ValueError, match="accepted: w8a8_dynamic, w8a8_dynamic_ao"):
        registry.apply(pipe, {"quantize": {"scheme": "int3"}})
    with pytest.raises(ValueError, match="cannot quantise the vae.*convolutions"):
        registry.apply(pipe, {"quantize": {"component": "vae"}})
    with pytest.raises(ValueError, match="unknown or empty layer classes.*accepted: spatial_attn"):
        registry.apply(pipe, {"quantize": {"classes": ["attention"]}})
    with pytest.raises(FileNotFoundError, match="calibration file written by capture_inputs"):
        registry.apply(pipe, {"quantize": {"scheme": "w8a8_static", "calibration": str(tmp_path / "none.pt")}})
    if not torch.backends.kleidiai.is_available():
        with pytest.raises(ValueError, match="KleidiAI"):
            registry.apply(pipe, {"quantize": {"scheme": "w4a8_dynamic"}})
    assert pipe.optimizations == {} and pipe.load_hooks == []  # nothing half-applied


def test_quantised_state_saves_and_reloads(reference):
    model = build_stdit3("tiny", dtype=torch.float32)
    model.load_state_dict(reference["pipe"].transformer.state_dict())
    quantize.quantize_module(model, "w8a8_dynamic", quantize.selected_linears(model, "transformer", quantize.BLOCK_CLASSES))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build_stdit3("tiny", dtype=torch.float32)  # other random weights, replaced by the saved ones
    fresh.load_state_dict(torch.load(buffer, weights_only=False), strict=True, assign=True)
    assert type(fresh.spatial_blocks[0].attn.qkv.weight).__name__ == "Int8Tensor"
    args = dict(y=reference["y"], mask=reference["mask"], **reference["pipe"].model_args(1, SETTING))
    with torch.inference_mode():
        z, t = reference["z"], torch.tensor([500.0])
        torch.testing.assert_close(fresh(z, t, **args), model(z, t, **args), rtol=0, atol=0)


def test_quantised_mini_model_keeps_adherence(one_thread):
    if not weights.weights_present():
        pytest.skip("the trained mini model is not in data/mini-model")
    pipe = load_pipeline("mini", weights="trained-mini", dtype="fp32")
    captions = list(synthetic.HELD_OUT) + list(synthetic.TRAIN[::3])
    tables = {}
    for name in ("fp32", "w8a8_dynamic"):
        if name != "fp32":
            registry.apply(pipe, {"quantize": {"scheme": name}})
        video, _ = minimodel.generate(pipe, captions, seed=0)
        tables[name] = adherence(video, captions)
    fp32, int8 = (adherence_summary(t) for t in tables.values())
    # the report's bound: two standard errors of the difference of two fractions over these clips
    margin = adherence_margin(fp32["all_correct"], fp32["n"])
    assert int8["all_correct"] >= fp32["all_correct"] - margin, (fp32, int8, margin)
    columns = ["detected_shape", "detected_colour", "detected_motion"]
    same = (tables["fp32"][columns].astype(str).values == tables["w8a8_dynamic"][columns].astype(str).values).all(axis=1)
    assert same.mean() >= 0.7, same.mean()


def test_int8_section_recommends_from_records(tmp_path):
    from utils.measure.results import Record, ResultsStore, make_config

    store = ResultsStore("06_int8", root=tmp_path / "results")
    model = dict(model="opensora-v1.2", weights="random", resolution="144p", aspect_ratio="9:16", frames=17, steps=30,
                 dtype="fp32", threads=2)
    timings = {"fp32": (20.0, None), "w8a8_dynamic": (12.5, 0.031), "w8a8_static": (10.0, 0.25),
               "w8a8_dynamic+compile": (11.0, 0.030)}  # no adherence of its own: inherits its eager form's
    for name, (seconds, error) in timings.items():
        config = make_config(**model, experiment="variants", optimizations="" if name == "fp32" else f"quantize({name})")
        store.add(Record(variant=name, stage="denoise", metric="seconds_per_step", unit="s", value=seconds,
                         spread={"n": 2}, config=config),
                  Record(variant=name, stage="denoise", metric="speedup_vs_fp32", unit="x", value=20.0 / seconds,
                         kind="derived", config=config))
        if error is not None:
            store.add(Record(variant=name, stage="denoise", metric="final_rel_l2", unit="", value=error, spread={"n": 1},
                             config=config))
    # the margin at fp32's 30 % over 60 clips is 2 sqrt(2 x 0.3 x 0.7 / 60) = 16.7 %: static's -25 % is outside
    for name, all_correct in (("fp32", 0.30), ("w8a8_dynamic", 0.2867), ("w8a8_static", 0.05)):
        for split in ("train", "held_out"):
            config = make_config(**model | dict(model="mini", weights="trained-mini", resolution="64px"),
                                 experiment="adherence", split=split, mini_weights=weights.weights_id())
            store.add(Record(variant=name, stage="adherence", metric="adherence_all_correct", unit="fraction",
                             value=all_correct, spread={"n": 60}, config=config))
    store.add(Record(variant="w8a8_dynamic_ao", stage="total", metric="not_run", unit="", value=1.0,
                     config=make_config(**model, experiment="variants"), note="not run: killed by signal 9"))
    from utils.experiments.e06_int8 import sensitivity_records
    sensitivity = {"real": {"mlp": (0.01, 600e6), "embedders": (0.03, 17e6), "blocks": (0.02, 1.2e9), "all": (0.05, 1.2e9)},
                   "mini": {"mlp": (0.02, 1e6), "embedders": (0.01, 0.2e6), "blocks": (0.03, 2e6), "all": (0.04, 2.3e6)}}
    for label, groups in sensitivity.items():
        rows = [{"group": g, "relative_l2": e, "cosine": 1 - e, "layers": 1, "parameters": n, "classes": [g]}
                for g, (e, n) in groups.items()]
        store.add(*sensitivity_records(rows, label, make_config(**model), "w8a8_dynamic"))
    markdown = render.render(results_root=tmp_path / "results", figures_dir=tmp_path / "figures",
                             out_dir=tmp_path / "report")[0].read_text()
    section = markdown[markdown.index("## INT8 post-training quantisation"):markdown.index("## aarch64 functional")]
    appendix = markdown[markdown.index("## Appendix H: INT8 kernels"):]
    # each model ranks by its own error and counts its own parameters (the sensitivity table is in the appendix)
    assert "| mlp | 600 | 1.00 | 0.0100 | 0.0200 | 2 | 1 |" in appendix
    assert "| embedders | 17.0 | 0.200 | 0.0300 | 0.0100 | 1 | 2 |" in appendix
    assert "Appendix H" in section
    assert "real rel. L2 0.0200 → 0.0500" in section
    assert "Not measured in this run: `w8a8_dynamic_ao` (killed by signal 9)." in section
    assert "The fastest transformer variant is `w8a8_static`: it denoises\n2.000x as fast as fp32" in section
    assert ("within the margin of fp32 on every split\n(train 16.7 %, held_out 16.7 %)\nis `w8a8_dynamic+compile` "
            "(1.818x fp32's speed") in section
    assert "Its adherence is that of its eager form `w8a8_dynamic` (derived" in section
    assert "`w8a8_dynamic` runs at\n1.600x fp32's speed" in section
    assert "Variants within the margin (measured): w8a8_dynamic." in section
    assert (tmp_path / "figures" / "int8_tradeoff.png").is_file()


def test_composes_with_bf16_and_the_rewrites(reference):
    from utils.optim.rewrites import MODEL_REWRITES, REWRITES

    rewrites = {name: REWRITES[name] for name in MODEL_REWRITES}
    latents = {}
    for name, extra in (("alone", {}), ("rewritten", rewrites)):
        pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()),
                              {"bf16": {}, "quantize": {"scheme": "w8a8_dynamic"}} | extra)
        pipe.load("transformer")
        latents[name] = pipe.denoise(reference["z"], reference["y"], reference["mask"], SETTING, progress=False)
    assert list(pipe.optimizations)[:2] == ["bf16", "quantize"]
    assert rel(latents["rewritten"], latents["alone"]) < 0.05  # rewrites reorder bf16 rounding (bf16 bound 5 %)
    assert rel(latents["alone"], reference["latent"]) < 0.15


def test_compiled_int8_matches_eager(reference):
    latents = {}
    for name, extra in (("eager", {}), ("compiled", {"compile": {}})):
        pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()),
                              {"quantize": {"scheme": "w8a8_dynamic"}} | extra)
        pipe.load("transformer")
        latents[name] = pipe.denoise(reference["z"], reference["y"], reference["mask"], SETTING, progress=False)
    # inductor fuses the per-token scale computation: rounding moves, the scheme does not (w8a8 bound 3 %)
    assert rel(latents["compiled"], latents["eager"]) < 0.03
