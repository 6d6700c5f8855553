"""The transformer's block stack exported to ONNX and run by ONNX Runtime and OpenVINO (utils.optim.onnx_backends),
on the tiny preset. Bounds: fp32 runtimes within 1e-5 of the largest |value| of the PyTorch fp32 latents after two
denoising steps (fp32 rounding in another order of operations); int8 and bf16 runtimes within 5e-2 relative L2
(the tiny model's int8 error through two steps; the real-size error is the notebook's to measure)."""
import pytest
import torch

from utils.model.pipeline import VideoSetting, load_pipeline
from utils.model.stdit3 import build_stdit3
from utils.model.weights import materialize_random
from utils.optim import onnx_backends as ob
from utils.optim import registry

pytest.importorskip("onnxruntime")

FP32 = 1e-5
LOSSY_REL_L2 = 5e-2
SETTING = VideoSetting.create("144p", "9:16", 17, steps=2)
PROMPT = "a red ball bouncing on a wooden floor"


def relative(out, expected):
    return float((out.double() - expected.double()).abs().max() / expected.double().abs().max())


def rel_l2(out, expected):
    return float((out.double() - expected.double()).norm() / expected.double().norm())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def caption():
    return load_pipeline("tiny", dtype="fp32", load=("text_encoder",)).encode_prompt([PROMPT])


def denoised(pipe, caption):
    y, mask = caption
    return pipe.denoise(pipe.prepare_latents(1, SETTING), y, mask, SETTING, progress=False)


@pytest.fixture(scope="module")
def baseline(caption):
    return denoised(load_pipeline("tiny", dtype="fp32", load=("transformer",)), caption)


@pytest.fixture(autouse=True)
def tmp_cache(cache, monkeypatch):
    monkeypatch.setattr(ob, "CACHE", cache)


def tiny_model():
    model = build_stdit3("tiny", device="meta")
    materialize_random(model, torch.float32, seed=0)
    model.reset_buffers()
    return model.eval()


def test_the_plain_rope_is_the_librarys():
    model = tiny_model()
    q = torch.randn(6, 4, 5, model.config.head_dim)
    assert torch.allclose(ob.rotate_interleaved(q, model.rope.freqs.detach()), model.rope.rotate_queries_or_keys(q),
                          atol=1e-6, rtol=0)


def test_the_stack_in_pytorch_and_on_ort_matches_the_model_at_another_shape(cache):
    model = tiny_model()
    path = ob.export_stack(model, cache)
    facts = ob.export_facts(path)
    assert facts["export_seconds"] > 0 and facts["file_bytes"]["stack.onnx"] > 0
    # a shape other than the tracer's: the dimensions are dynamic
    C = model.config.hidden_size
    x, y, t_mlp = torch.randn(2, 4, 6, C), torch.randn(2, 3, C), torch.randn(2, 6 * C)
    key_mask = torch.tensor([[True, True, True], [True, True, False]])
    with torch.no_grad():
        expected = ob.BlockStack(model)(x, y, key_mask, t_mlp)
        reference = x.flatten(1, 2)
        for spatial, temporal in zip(model.spatial_blocks, model.temporal_blocks):
            reference = temporal(spatial(reference, y, key_mask, t_mlp, 4, 6), y, key_mask, t_mlp, 4, 6)
    assert torch.equal(expected.flatten(1, 2), reference)
    assert relative(ob.OrtStack(path, threads=1)(x, y, key_mask, t_mlp), expected) < FP32
    assert ob.export_stack(model, cache) == path and ob.export_facts(path) == facts  # cached, not exported again


def test_onnxruntime_fp32_denoises_like_pytorch(caption, baseline):
    pipe = load_pipeline("tiny", dtype="fp32", load=("transformer",))
    registry.apply(pipe, {"onnxruntime": {"threads": 1}})
    assert isinstance(pipe.transformer.block_runner, ob.BlockRunner)
    assert relative(denoised(pipe, caption), baseline) < FP32
    pipe.release("transformer")
    assert pipe.transformer.block_runner is None
    pipe.load("transformer")  # the same random weights: the cached export serves again
    assert relative(denoised(pipe, caption), baseline) < FP32


def test_onnxruntime_int8_stays_within_its_bound(caption, baseline):
    pipe = load_pipeline("tiny", dtype="fp32", load=("transformer",))
    registry.apply(pipe, {"onnxruntime": {"precision": "int8", "threads": 1}})
    latents = denoised(pipe, caption)
    assert 0 < rel_l2(latents, baseline) < LOSSY_REL_L2
    # every block Linear's MatMul quantised: qkv, proj, q, kv, proj and fc1, fc2 per block
    depth = pipe.transformer.config.depth
    assert ob.export_facts(ob.export_stack(pipe.transformer))["int8_ops"]["MatMulInteger"] == 2 * depth * 7


def test_the_backends_refuse_what_they_cannot_stand_for():
    pipe = load_pipeline("tiny", dtype="bf16", load=())
    with pytest.raises(ValueError, match="transformer is torch.bfloat16"):
        registry.apply(pipe, {"onnxruntime": {}})
    pipe = load_pipeline("tiny", dtype="fp32", load=())
    with pytest.raises(ValueError, match="`compile` changes or hooks"):
        registry.apply(pipe, {"compile": {}, "onnxruntime": {}})
    with pytest.raises(ValueError, match="accepted fp32, int8"):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"onnxruntime": {"precision": "bf16"}})
    with pytest.raises(ValueError, match="`onnxruntime` changes or hooks"):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"onnxruntime": {}, "openvino": {}})


def test_a_frame_mask_is_refused():
    runner = ob.BlockRunner(lambda *args: None, "onnxruntime fp32")
    with pytest.raises(ValueError, match="no frame mask"):
        runner(torch.zeros(1, 4, 8), torch.zeros(1, 2, 8), None, torch.zeros(1, 48), 2, 2,
               x_mask=torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.parametrize("options, bound", [({"precision": "f32"}, FP32), ({"precision": "f32", "weights": "int8"},
                                                                           LOSSY_REL_L2)])
def test_openvino_denoises_like_pytorch(options, bound, caption, baseline):
    pytest.importorskip("openvino")
    if options.get("weights"):
        pytest.importorskip("nncf")
    pipe = load_pipeline("tiny", dtype="fp32", load=("transformer",))
    registry.apply(pipe, {"openvino": options | {"threads": 1}})
    latents = denoised(pipe, caption)
    error = relative(latents, baseline) if bound == FP32 else rel_l2(latents, baseline)
    assert error < bound
