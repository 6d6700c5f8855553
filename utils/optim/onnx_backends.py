"""Other CPU runtimes for the denoiser: the STDiT3 block stack exported to ONNX and run by ONNX Runtime's CPU
execution provider or by OpenVINO, as optimisation steps (``onnxruntime``, ``openvino``).

What is exported is the **block stack**: the 2 x depth spatial and temporal blocks, where a denoising step spends
its time. The embedders, the caption projection and the final layer stay in PyTorch (a few milliseconds per
step), and so do the CFG loop, the sampler and the pipeline's stages: the transformer calls the stack through its
``block_runner`` seam. The export (``torch.onnx.export``, the dynamo exporter) has dynamic batch, latent frames,
patches per frame and caption tokens, so one file serves every setting; it is cached under ``build/onnx/`` by the
blocks' configuration, a digest of their weights and the exporter's versions, with its export time and file size
in ``export.json`` beside it.

The exported stack always takes the caption key mask (all true where every sample attends to every kept token,
which SDPA treats exactly like no mask) and has no frame mask: image-conditioned generation (``x_mask``) stays
with PyTorch and is refused with the backend.

The backends run fp32 weights: the steps refuse a pipeline whose transformer already runs another precision,
int8, compiled or rewritten blocks, another attention kernel or a step cache (those act on the PyTorch blocks the
runtime replaces). Each backend keeps the PyTorch transformer too (the embedders need it; its blocks stay loaded,
which the notebook's peak memory shows).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from utils.io import write_json_atomic
from utils.model.pipeline import OpenSoraPipeline
from utils.model.stdit3 import STDiT3
from utils.paths import BUILD

CACHE = BUILD / "onnx"
EXPORTER_PACKAGES = ("torch", "onnx", "onnxscript")

# steps that change the PyTorch blocks the runtime replaces (or hook them): refused with a backend
BLOCK_STEPS = ("attention", "cache_text_kv", "fused_rope", "fused_modulate", "compile", "teacache", "pab",
               "first_block_cache", "mag_cache", "taylorseer", "onnxruntime", "openvino")
ORT_PRECISIONS = ("fp32", "int8")
OPENVINO_PRECISIONS = ("f32", "bf16")
OPENVINO_WEIGHTS = (None, "int8")
# ONNX Runtime: the Arm bf16 fast-math GEMM (read only by aarch64 Linux builds: a no-op on x86)
ARM64_BF16_FASTMATH = "mlas.enable_gemm_fastmath_arm64_bfloat16"


# ---- the exported unit ----------------------------------------------------------------------------------

def rotate_interleaved(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """rotary-embedding-torch's ``rotate_queries_or_keys`` (interleaved pairs, positions 0..L-1 along dim -2,
    scale 1) as plain tensor maths, which the exporter traces without the library's Python-side cache."""
    positions = torch.arange(x.shape[-2], device=x.device, dtype=freqs.dtype)
    angles = (positions[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # [L, D]
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x * angles.cos() + rotated * angles.sin()).to(x.dtype)


class BlockStack(nn.Module):
    """The transformer's blocks as one module: x [B, T, S, C], caption y [B, L, C], its key mask [B, L] (bool)
    and the timestep modulation t_mlp [B, 6C] in; x after every spatial and temporal block out."""

    def __init__(self, model: STDiT3):
        super().__init__()
        self.spatial_blocks = model.spatial_blocks
        self.temporal_blocks = model.temporal_blocks
        self.rope = model.rope

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_mask: torch.Tensor, t_mlp: torch.Tensor) -> torch.Tensor:
        B, T, S, C = x.shape
        h = x.flatten(1, 2)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            h = spatial(h, y, key_mask, t_mlp, T, S)
            h = temporal(h, y, key_mask, t_mlp, T, S)
        return h.unflatten(1, (T, S))


@contextlib.contextmanager
def exportable(model: STDiT3):
    """The temporal attention's RoPE as ``rotate_interleaved`` while the exporter traces (the same angles)."""
    attns = [block.attn for block in model.temporal_blocks]
    saved = [attn.rotate for attn in attns]
    freqs = model.rope.freqs.detach()
    try:
        for attn in attns:
            attn.rotate = lambda t: rotate_interleaved(t, freqs)
        yield
    finally:
        for attn, rotate in zip(attns, saved):
            attn.rotate = rotate


def check_exportable(pipe: OpenSoraPipeline, backend: str) -> None:
    """Refuse what the exported fp32 stack cannot stand for, saying why and what is accepted."""
    problems = [f"`{name}` changes or hooks the PyTorch blocks the runtime replaces"
                for name in BLOCK_STEPS if name in pipe.optimizations]
    if pipe.dtypes["transformer"] != torch.float32:
        problems.append(f"the transformer is {pipe.dtypes['transformer']} (the export runs fp32 weights: precision "
                        "is the backend's own option)")
    for name in ("quantize", "int8_weight_only"):
        if name in pipe.optimizations and pipe.optimizations[name].get("component", "transformer" if name ==
                                                                       "quantize" else "text_encoder") == "transformer":
            problems.append(f"`{name}` quantises the transformer (int8 is the backend's own option)")
    if problems:
        raise ValueError(f"{backend} cannot be applied: " + "; ".join(problems)
                         + ". Accepted with it: the text encoder's and the VAE's steps, vae_chunking, step counts.")


def _versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in EXPORTER_PACKAGES}


def weights_digest(module: nn.Module) -> str:
    """sha1 over every tensor of ``module``'s state (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()


def example_inputs(model: STDiT3) -> tuple[torch.Tensor, ...]:
    """Small inputs for the tracer: every dynamic dimension at its own size above one (the exporter fixes sizes 0
    and 1, and takes equal sizes for equal dimensions)."""
    C = model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, C, generator=generator)
    y = torch.randn(2, 7, C, generator=generator)
    return x, y, torch.ones(2, 7, dtype=torch.bool), torch.randn(2, 6 * C, generator=generator)


def export_stack(model: STDiT3, cache: Path | None = None) -> Path:
    """The ONNX file of ``model``'s fp32 block stack, exported once per configuration, weights and exporter
    versions into a folder of ``cache`` (default ``CACHE``), whose ``export.json`` says how long it took and how
    large it is."""
    if model.dtype != torch.float32:
        raise ValueError(f"the export runs fp32 weights; the transformer is {model.dtype}")
    stack = BlockStack(model).eval()
    key = json.dumps({"config": dataclasses.asdict(model.config), "weights": weights_digest(stack),
                      "versions": _versions()}, sort_keys=True)
    folder = Path(cache or CACHE) / hashlib.sha1(key.encode()).hexdigest()[:16]
    path = folder / "stack.onnx"
    if (folder / "export.json").exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    from torch.export import Dim  # the dynamo exporter's dynamic dimensions
    batch, frames, patches, tokens = Dim("batch"), Dim("frames"), Dim("patches"), Dim("tokens")
    start = time.perf_counter()
    with exportable(model), torch.no_grad():
        torch.onnx.export(stack, example_inputs(model), str(path), dynamo=True, external_data=True,
                          input_names=["x", "y", "key_mask", "t_mlp"], output_names=["out"],
                          dynamic_shapes={"x": {0: batch, 1: frames, 2: patches}, "y": {0: batch, 1: tokens},
                                          "key_mask": {0: batch, 1: tokens}, "t_mlp": {0: batch}})
    seconds = time.perf_counter() - start
    write_json_atomic(folder / "export.json", {"key": json.loads(key), "export_seconds": seconds,
                                               "file_bytes": file_bytes(folder)})
    return path


def file_bytes(folder: Path) -> dict[str, int]:
    """Bytes on disk of every file in ``folder`` but ``export.json``."""
    return {f.name: f.stat().st_size for f in sorted(Path(folder).iterdir()) if f.name != "export.json"}


def export_facts(path: Path) -> dict:
    """What ``export_stack`` stored beside ``path``: the cache key, export seconds and bytes on disk."""
    return json.loads((Path(path).parent / "export.json").read_text())


# ---- the runtimes ---------------------------------------------------------------------------------------

def quantize_ort(path: Path) -> Path:
    """``onnxruntime.quantization.quantize_dynamic`` of the exported stack, beside it: int8 weights per output
    channel (QInt8); activations uint8 with one scale per tensor, computed at run time (the only dynamic
    activation type of ONNX's DynamicQuantizeLinear), so coarser than torchao's per-token scales. Only MatMuls
    with constant weights are quantised: the attention's own products stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(path).with_name("stack.int8.onnx")
    if not out.exists():
        start = time.perf_counter()
        quantize_dynamic(Path(path), out, per_channel=True, weight_type=QuantType.QInt8,
                         use_external_data_format=True)
        facts = export_facts(path)
        facts |= {"quantize_seconds": time.perf_counter() - start, "file_bytes": file_bytes(Path(path).parent),
                  "int8_ops": op_counts(out, ("MatMulInteger", "DynamicQuantizeLinear", "MatMul"))}
        write_json_atomic(Path(path).parent / "export.json", facts)
    return out


def op_counts(path: Path, ops: tuple[str, ...]) -> dict[str, int]:
    """How many nodes of each of ``ops`` the graph at ``path`` has (its weights are not read): after
    ``quantize_dynamic``, the MatMuls left are those it did not quantise (the attention's, and any whose weight
    is not a constant)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {op: sum(node.op_type == op for node in graph.node) for op in ops}


class OrtStack:
    """The exported stack in an ONNX Runtime CPU session (``threads`` intra-op threads, full graph optimisation,
    ``options``: session config entries)."""

    def __init__(self, path: Path, threads: int | None = None, options: dict[str, str] | None = None):
        import onnxruntime as ort

        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads or torch.get_num_threads()
        session_options.inter_op_num_threads = 1
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in (options or {}).items():
            session_options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])

    def __call__(self, x, y, key_mask, t_mlp) -> torch.Tensor:
        feed = {"x": x.float().numpy(), "y": y.float().numpy(), "key_mask": key_mask.numpy(),
                "t_mlp": t_mlp.float().numpy()}
        return torch.from_numpy(self.session.run(["out"], feed)[0])


class OpenVinoStack:
    """The exported stack compiled by OpenVINO for the CPU: ``precision`` the inference precision hint (f32 or
    bf16), ``weights="int8"``: NNCF's data-free symmetric int8 weight compression first (activations stay
    floating point)."""

    def __init__(self, path: Path, precision: str = "f32", weights: str | None = None, threads: int | None = None):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        if weights == "int8":
            import nncf

            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def __call__(self, x, y, key_mask, t_mlp) -> torch.Tensor:
        feed = {"x": x.float().numpy(), "y": y.float().numpy(), "key_mask": key_mask.numpy(),
                "t_mlp": t_mlp.float().numpy()}
        return torch.from_numpy(self.request.infer(feed)[self.output].copy())


class BlockRunner:
    """What ``STDiT3.block_runner`` calls in place of its block loop: the stack on the backend, the caption's key
    mask made explicit (all true without one); a frame mask is refused."""

    def __init__(self, backend, name: str):
        self.backend = backend
        self.name = name

    def __call__(self, x, y, key_mask, t_mlp, T, S, x_mask=None):
        if x_mask is not None:
            raise ValueError(f"the {self.name} block stack has no frame mask (x_mask): image-conditioned generation "
                             "runs with PyTorch (remove the runtime step)")
        if key_mask is None:
            key_mask = torch.ones(y.shape[:2], dtype=torch.bool)
        return self.backend(x.unflatten(1, (T, S)), y, key_mask, t_mlp).flatten(1, 2).to(x.dtype)


def _attach(pipe: OpenSoraPipeline, name: str, build) -> OpenSoraPipeline:
    """Run the stack on ``build(exported path)`` whenever the transformer has weights; forget it on release."""
    def attach(pipe, component):
        if component == "transformer":
            pipe.transformer.block_runner = BlockRunner(build(export_stack(pipe.transformer)), name)

    def detach(pipe, component):
        if component == "transformer":
            pipe.transformer.block_runner = None

    pipe.load_hooks.append(attach)
    pipe.release_hooks.append(detach)
    if pipe.is_loaded("transformer"):
        attach(pipe, "transformer")
    return pipe


def apply_onnxruntime(pipe: OpenSoraPipeline, precision: str = "fp32", threads: int | None = None,
                      arm64_bf16_fastmath: bool = False) -> OpenSoraPipeline:
    """The transformer's blocks on ONNX Runtime's CPU execution provider: ``precision`` fp32, or int8
    (``quantize_ort``); ``arm64_bf16_fastmath``: ONNX Runtime's bf16 fast-math GEMM on aarch64 (ignored by x86
    builds)."""
    if precision not in ORT_PRECISIONS:
        raise ValueError(f"precision {precision!r}: accepted {', '.join(ORT_PRECISIONS)}")
    check_exportable(pipe, "onnxruntime")
    options = {ARM64_BF16_FASTMATH: "1"} if arm64_bf16_fastmath else {}
    return _attach(pipe, f"onnxruntime {precision}", lambda path: OrtStack(
        quantize_ort(path) if precision == "int8" else path, threads, options))


def apply_openvino(pipe: OpenSoraPipeline, precision: str = "f32", weights: str | None = None,
                   threads: int | None = None) -> OpenSoraPipeline:
    """The transformer's blocks compiled by OpenVINO for the CPU: ``precision`` f32 or bf16 (x86 with AVX-512
    BF16 or AMX; OpenVINO documents f32 and f16 only on Arm), ``weights="int8"``: NNCF int8 weight compression."""
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision {precision!r}: accepted {', '.join(OPENVINO_PRECISIONS)}")
    if weights not in OPENVINO_WEIGHTS:
        raise ValueError(f"weights {weights!r}: accepted None or 'int8'")
    check_exportable(pipe, "openvino")
    return _attach(pipe, f"openvino {precision}{' int8 weights' if weights else ''}",
                   lambda path: OpenVinoStack(path, precision, weights, threads))
