"""The transformer's block stack and the VAE's decoders exported to ONNX and run by ONNX Runtime, OpenVINO and
ggml (utils.optim.onnx_backends), on the tiny preset. Bounds: fp32 runtimes within 1e-5 of the largest |value| of
the PyTorch fp32 latents after two denoising steps (fp32 rounding in another order of operations); weight-only
int8, q8_0, f16 and bf16 runtimes within 5e-2 relative L2, dynamic int8 within 0.15 (the tiny model's errors
through two steps; the real-size error is the notebook's to measure)."""
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
# quantize_dynamic's int8: uint8 activations with one scale per tensor, the bound of test_quantize.py's per-tensor
# schemes; the kernels differ by CPU (x86 without VNNI multiplies u8 x s8 pairs with saturation: 0.097 measured on
# an AVX2-only EPYC, under 0.05 with AVX-512 VNNI)
ORT_INT8_REL_L2 = 0.15
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


def test_the_elementwise_gelu_is_torchs_tanh_gelu():
    x = torch.linspace(-8, 8, 1001)
    assert torch.allclose(ob.gelu_tanh(x), torch.nn.GELU(approximate="tanh")(x), atol=1e-6, rtol=0)


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
    assert relative(ob.OrtModel(path, threads=1)(x, y, key_mask, t_mlp), expected) < FP32
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
    assert 0 < rel_l2(latents, baseline) < ORT_INT8_REL_L2
    # the runtime's own weights: int8, about a quarter of the fp32 stack's (scales and the embedders' fp32 aside)
    facts, stack = ob.runtime_facts(pipe.transformer), ob.BlockStack(pipe.transformer)
    fp32_bytes = sum(t.numel() * t.element_size() for t in stack.state_dict().values())
    assert facts["precision"] == "int8" and 0.2 * fp32_bytes < facts["weight_bytes"] < 0.4 * fp32_bytes
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
    with pytest.raises(ValueError, match="`onnxruntime` runs the transformer already"):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"onnxruntime": {}, "openvino": {}})
    with pytest.raises(ValueError, match="accepted one or both of transformer, vae"):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"onnxruntime": {"components": ["text"]}})
    with pytest.raises(ValueError, match="the VAE alone runs fp32"):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()),
                       {"onnxruntime": {"precision": "int8", "components": ["vae"]}})
    with pytest.raises(ValueError, match="`vae_channels_last` changes the PyTorch VAE"):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()),
                       {"vae_channels_last": {}, "openvino": {"components": ["vae"]}})
    with pytest.raises(ValueError, match="the vae is torch.bfloat16"):
        registry.apply(load_pipeline("tiny", dtype="bf16", load=()), {"onnxruntime": {"components": "vae"}})
    # one runtime per component: ONNX Runtime's transformer beside OpenVINO's VAE is accepted
    pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()),
                          {"onnxruntime": {}, "openvino": {"components": ["vae"]}, "vae_chunking": {}})
    assert set(pipe.optimizations) == {"onnxruntime", "openvino", "vae_chunking"}


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


@pytest.mark.parametrize("step", [{"onnxruntime": {}}, {"openvino": {"precision": "f32"}}])
def test_the_vae_decoders_on_a_runtime_decode_like_pytorch(step):
    """Both halves of the decode (temporal chunks, then frames in micro-batches of 4) on the runtime, at a
    resolution other than the tracer's; 34 frames: two temporal chunks."""
    name = next(iter(step))
    pytest.importorskip(name)
    setting = VideoSetting.create("144p", "9:16", 34, steps=2)
    pipe = load_pipeline("tiny", dtype="fp32", load=("vae",))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, pipe.vae.out_channels, *pipe.latent_size(setting), generator=generator)
    expected = pipe.decode(latents, setting)
    registry.apply(pipe, {name: step[name] | {"components": ["vae"], "threads": 1}})
    assert isinstance(pipe.vae.spatial_vae.decoder_runner, ob.DecoderRunner)
    assert isinstance(pipe.vae.temporal_vae.decoder_runner, ob.DecoderRunner)
    video = pipe.decode(latents, setting)
    assert video.shape == expected.shape and relative(video, expected) < FP32
    pipe.release("vae")
    assert pipe.vae.spatial_vae.decoder_runner is None and pipe.vae.temporal_vae.decoder_runner is None


@pytest.mark.parametrize("weights, bound", [("f32", FP32), ("q8_0", LOSSY_REL_L2)])
def test_ggml_denoises_like_pytorch(weights, bound, caption, baseline):
    """The ggml provider takes the whole stack (the session refuses any node left to the CPU provider)."""
    pytest.importorskip("onnxruntime_ggml")
    pipe = load_pipeline("tiny", dtype="fp32", load=("transformer",))
    registry.apply(pipe, {"ggml": {"weights": weights, "threads": 1}})
    assert pipe.transformer.block_runner.backend.session.get_providers()[0] == "ggml"
    latents = denoised(pipe, caption)
    error = relative(latents, baseline) if bound == FP32 else rel_l2(latents, baseline)
    assert 0 < error < bound if bound != FP32 else error < bound
    with pytest.raises(ValueError, match="accepted f32, f16, q8_0"):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"ggml": {"weights": "int4"}})
    with pytest.raises(ValueError, match="`onnxruntime` runs the transformer already"):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"onnxruntime": {}, "ggml": {}})
