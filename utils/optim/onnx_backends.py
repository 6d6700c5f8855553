"""Other CPU runtimes for the denoiser and the VAE decoder: the STDiT3 block stack and the VAE's two decoders exported
to ONNX and run by ONNX Runtime's CPU execution provider or by OpenVINO, as optimisation steps (``onnxruntime``,
``openvino``; ``components`` says which of the transformer and the VAE the runtime takes).

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

The VAE's decode is exported as its two halves, each with its own dynamic dimensions: the temporal decoder
(``post_quant_conv`` and ``decoder`` of ``TemporalVAE``: batch, latent frames, height, width) and the spatial one
(``AutoencoderKL.decode``: frames, height, width). Chunking (``vae_chunking``), the latents' normalisation and
the front-padding crop stay PyTorch's, through the ``decoder_runner`` seams of ``TemporalVAE`` and ``SpatialVAE``.
The VAE runs the backend's floating-point precision (ONNX Runtime fp32, OpenVINO's f32 or bf16): int8 is the
transformer's (the decoders are convolutions, which ``quantize_dynamic`` and NNCF's weight compression leave to
other schemes).

The backends run fp32 weights: the steps refuse a pipeline whose transformer (or VAE) already runs another
precision, int8, compiled or rewritten blocks, another attention kernel or a step cache (those act on the PyTorch
modules the runtime replaces). Each backend keeps the PyTorch modules too (the embedders need the transformer; its
blocks stay loaded, which the notebook's peak memory shows).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from utils.io import write_json_atomic
from utils.model.pipeline import OpenSoraPipeline
from utils.model.stdit3 import STDiT3
from utils.model.vae import OpenSoraVAE
from utils.paths import BUILD

CACHE = BUILD / "onnx"
EXPORTER_PACKAGES = ("torch", "onnx", "onnxscript")
# the revision of what this module exports, in the cache key: 2 = GELU as elementwise operations (gelu_tanh)
EXPORT_REVISION = 2

# steps that change the PyTorch blocks the runtime replaces (or hook them): refused with a backend
BLOCK_STEPS = ("attention", "cache_text_kv", "fused_rope", "fused_modulate", "compile", "teacache", "pab",
               "first_block_cache", "mag_cache", "taylorseer")
RUNTIME_STEPS = ("onnxruntime", "openvino", "ggml")
# steps that change the PyTorch VAE the runtime replaces
VAE_STEPS = ("vae_channels_last",)
COMPONENTS = ("transformer", "vae")
ORT_PRECISIONS = ("fp32", "int8")
OPENVINO_PRECISIONS = ("f32", "bf16")
OPENVINO_WEIGHTS = (None, "int8")
GGML_WEIGHTS = ("f32", "f16", "q8_0")
# ONNX Runtime: the Arm bf16 fast-math GEMM (read only by aarch64 Linux builds: a no-op on x86)
ARM64_BF16_FASTMATH = "mlas.enable_gemm_fastmath_arm64_bfloat16"


# ---- the exported units ---------------------------------------------------------------------------------

def rotate_interleaved(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """rotary-embedding-torch's ``rotate_queries_or_keys`` (interleaved pairs, positions 0..L-1 along dim -2,
    scale 1) as plain tensor maths, which the exporter traces without the library's Python-side cache."""
    positions = torch.arange(x.shape[-2], device=x.device, dtype=freqs.dtype)
    angles = (positions[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # [L, D]
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x * angles.cos() + rotated * angles.sin()).to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``nn.GELU(approximate="tanh")`` as elementwise operations: the exported graph then has no ``Gelu`` node,
    which the ggml execution provider lacks (ONNX Runtime and OpenVINO fuse the pattern back)."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


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


class TemporalDecoder(nn.Module):
    """``TemporalVAE``'s decoding: latents [B, 4, t, h, w] -> [B, 4, 4t, h, w] (before the front-padding crop)."""

    def __init__(self, vae: OpenSoraVAE):
        super().__init__()
        self.post_quant_conv = vae.temporal_vae.post_quant_conv
        self.decoder = vae.temporal_vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class SpatialDecoder(nn.Module):
    """The image VAE's decoding (``AutoencoderKL.decode``): latents [N, 4, h, w] -> frames [N, 3, 8h, 8w]."""

    def __init__(self, vae: OpenSoraVAE):
        super().__init__()
        self.image_vae = vae.spatial_vae.module

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.image_vae.decode(z).sample


@contextlib.contextmanager
def exportable(model: STDiT3):
    """While the exporter traces: the temporal attention's RoPE as ``rotate_interleaved`` (the same angles) and
    the MLPs' GELU as ``gelu_tanh`` (the same formula)."""
    attns = [block.attn for block in model.temporal_blocks]
    mlps = [block.mlp for block in (*model.spatial_blocks, *model.temporal_blocks)]
    saved = [attn.rotate for attn in attns]
    freqs = model.rope.freqs.detach()
    try:
        for attn in attns:
            attn.rotate = lambda t: rotate_interleaved(t, freqs)
        for mlp in mlps:
            mlp.act.forward = gelu_tanh
        yield
    finally:
        for attn, rotate in zip(attns, saved):
            attn.rotate = rotate
        for mlp in mlps:
            del mlp.act.forward


def check_components(components) -> tuple[str, ...]:
    components = tuple([components] if isinstance(components, str) else components)
    if not components or any(c not in COMPONENTS for c in components):
        raise ValueError(f"components {list(components)}: accepted one or both of {', '.join(COMPONENTS)}")
    return components


def check_exportable(pipe: OpenSoraPipeline, backend: str, components=("transformer",)) -> None:
    """Refuse what the exported fp32 modules cannot stand for, saying why and what is accepted."""
    problems = []
    if "transformer" in components:
        problems += [f"`{name}` changes or hooks the PyTorch blocks the runtime replaces"
                     for name in BLOCK_STEPS if name in pipe.optimizations]
        for name in ("quantize", "int8_weight_only"):
            default = "transformer" if name == "quantize" else "text_encoder"
            if name in pipe.optimizations and pipe.optimizations[name].get("component", default) == "transformer":
                problems.append(f"`{name}` quantises the transformer (int8 is the backend's own option)")
    if "vae" in components:
        problems += [f"`{name}` changes the PyTorch VAE the runtime replaces"
                     for name in VAE_STEPS if name in pipe.optimizations]
    for other in RUNTIME_STEPS:
        taken = (set(check_components(pipe.optimizations[other].get("components", COMPONENTS[:1])))
                 & set(components) if other in pipe.optimizations else set())
        problems += [f"`{other}` runs the {component} already" for component in sorted(taken)]
    for component in components:
        if pipe.dtypes[component] != torch.float32:
            problems.append(f"the {component} is {pipe.dtypes[component]} (the export runs fp32 weights: precision "
                            "is the backend's own option)")
    if problems:
        raise ValueError(f"{backend} cannot be applied: " + "; ".join(problems)
                         + ". Accepted with it: the text encoder's steps, vae_chunking, step counts, and the VAE's "
                           "steps where the runtime does not take the VAE.")


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


def _export(module: nn.Module, name: str, architecture, inputs: tuple, input_names: list[str], dynamic: dict,
            cache: Path | None, context=contextlib.nullcontext) -> Path:
    """``module`` exported to ``<folder>/<name>.onnx`` once per architecture, weights and exporter versions
    (``dynamic``: input name -> {axis: name} of its dynamic dimensions); ``export.json`` beside it says how long
    the export took and how large the files are."""
    from torch.export import Dim  # the dynamo exporter's dynamic dimensions

    module = module.eval()
    if next(module.parameters()).dtype != torch.float32:
        raise ValueError(f"the export runs fp32 weights; the {name} is {next(module.parameters()).dtype}")
    key = json.dumps({"module": name, "architecture": architecture, "weights": weights_digest(module),
                      "versions": _versions(), "revision": EXPORT_REVISION}, sort_keys=True)
    folder = Path(cache or CACHE) / hashlib.sha1(key.encode()).hexdigest()[:16]
    path = folder / f"{name}.onnx"
    if (folder / "export.json").exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    dims = {axis_name: Dim(axis_name) for axes in dynamic.values() for axis_name in axes.values()}
    start = time.perf_counter()
    with context(), torch.no_grad():
        torch.onnx.export(module, inputs, str(path), dynamo=True, external_data=True, input_names=input_names,
                          output_names=["out"], dynamic_shapes={
                              n: {axis: dims[a] for axis, a in dynamic.get(n, {}).items()} for n in input_names})
    seconds = time.perf_counter() - start
    write_json_atomic(folder / "export.json", {"key": json.loads(key), "export_seconds": seconds,
                                               "file_bytes": file_bytes(folder)})
    return path


def export_stack(model: STDiT3, cache: Path | None = None) -> Path:
    """The ONNX file of ``model``'s fp32 block stack, exported once per configuration, weights and exporter
    versions into a folder of ``cache`` (default ``CACHE``)."""
    if model.dtype != torch.float32:
        raise ValueError(f"the export runs fp32 weights; the transformer is {model.dtype}")
    return _export(BlockStack(model), "stack", dataclasses.asdict(model.config), example_inputs(model),
                   ["x", "y", "key_mask", "t_mlp"],
                   {"x": {0: "batch", 1: "frames", 2: "patches"}, "y": {0: "batch", 1: "tokens"},
                    "key_mask": {0: "batch", 1: "tokens"}, "t_mlp": {0: "batch"}},
                   cache, lambda: exportable(model))


def export_vae_decoders(vae: OpenSoraVAE, cache: Path | None = None) -> dict[str, Path]:
    """The ONNX files of ``vae``'s temporal and spatial decoders (fp32; dynamic batch or frames, latent frames,
    height and width), each cached like ``export_stack``'s; the architecture in the key is the module's
    ``repr`` (its layers, groups and activations)."""
    generator = torch.Generator().manual_seed(0)
    temporal, spatial = TemporalDecoder(vae), SpatialDecoder(vae)
    return {
        "temporal": _export(temporal, "temporal_decoder", repr(temporal),
                            (torch.randn(2, vae.out_channels, 3, 5, 7, generator=generator),), ["z"],
                            {"z": {0: "batch", 2: "latent_frames", 3: "height", 4: "width"}}, cache),
        "spatial": _export(spatial, "spatial_decoder", repr(spatial),
                           (torch.randn(3, vae.out_channels, 5, 7, generator=generator),), ["z"],
                           {"z": {0: "frames", 2: "height", 3: "width"}}, cache)}


def file_bytes(folder: Path) -> dict[str, int]:
    """Bytes on disk of every file in ``folder`` but ``export.json``."""
    return {f.name: f.stat().st_size for f in sorted(Path(folder).iterdir()) if f.name != "export.json"}


def export_facts(path: Path) -> dict:
    """What the export stored beside ``path``: the cache key, export seconds and bytes on disk."""
    return json.loads((Path(path).parent / "export.json").read_text())


# ---- the runtimes ---------------------------------------------------------------------------------------

def quantize_ort(path: Path) -> Path:
    """``onnxruntime.quantization.quantize_dynamic`` of the exported stack, beside it: int8 weights per output
    channel (QInt8); activations uint8 with one scale per tensor, computed at run time (the only dynamic
    activation type of ONNX's DynamicQuantizeLinear), so coarser than torchao's per-token scales. Only MatMuls
    with constant weights are quantised: the attention's own products stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(path).with_name(f"{Path(path).stem}.int8.onnx")
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


def initializer_bytes(path: Path) -> int:
    """Bytes of the weights (initializers) of the graph at ``path``, from their shapes and types (external data
    is not read)."""
    import numpy as np
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in graph.initializer)


def runtime_facts(module: nn.Module) -> dict | None:
    """What the runtimes that run parts of ``module`` (an STDiT3's block stack, an OpenSoraVAE's decoders) hold,
    None where none does: ``weight_bytes``, their own copy of the weights, beside the PyTorch module that stays
    loaded; ``precision``, what they compute in (OpenVINO: the precision it compiled for, whatever was asked)."""
    runners = [getattr(module, "block_runner", None)]
    runners += [getattr(getattr(module, half, None), "decoder_runner", None)
                for half in ("temporal_vae", "spatial_vae")]
    runners = [r for r in runners if r is not None]
    if not runners:
        return None
    sizes = [r.backend.weight_bytes for r in runners]
    return dict(weight_bytes=None if None in sizes else sum(sizes),
                precision=", ".join(sorted({r.backend.precision for r in runners})))


def _feed(names, tensors) -> dict:
    return {name: t.numpy() if t.dtype == torch.bool else t.float().numpy() for name, t in zip(names, tensors)}


class OrtModel:
    """An exported file in an ONNX Runtime CPU session (``threads`` intra-op threads, full graph optimisation,
    ``options``: session config entries), called with its inputs in order; returns its output. ``precision``: what
    the file computes in (the caller knows: ``quantize_ort`` makes the int8 file); ``weight_bytes``: its
    initializers' (read with ``onnx`` when asked)."""

    def __init__(self, path: Path, threads: int | None = None, options: dict[str, str] | None = None,
                 precision: str = "fp32"):
        import onnxruntime as ort

        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads or torch.get_num_threads()
        session_options.inter_op_num_threads = 1
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in (options or {}).items():
            session_options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        self.path, self.precision = Path(path), precision
        self.inputs = [i.name for i in self.session.get_inputs()]

    @property
    def weight_bytes(self) -> int | None:
        return initializer_bytes(self.path)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["out"], _feed(self.inputs, tensors))[0])


class GgmlModel(OrtModel):
    """An exported file in an ONNX Runtime session whose first execution provider is ggml's (``onnxruntime-ggml``,
    on the CPU, ``threads`` threads), the CPU provider as fallback; ``weights`` the format ggml holds the
    MatMul weights in: f32, f16 (ggml's default) or q8_0 (ggml's int8 blocks of 32 with an f16 scale). A graph
    the provider cannot take whole is refused (no silent fallback to the CPU provider). ``weight_bytes`` is known
    for f32 only (the provider does not report its converted copy)."""

    def __init__(self, path: Path, weights: str = "f16", threads: int | None = None):
        import onnxruntime as ort
        import onnxruntime_ggml

        session_options = ort.SessionOptions()
        # every node on ggml, or no session (the provider otherwise leaves what it lacks to the CPU provider)
        session_options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        self.session = onnxruntime_ggml.InferenceSession(
            str(path), {"device": "cpu", "threads": threads or torch.get_num_threads(), "weights": weights},
            sess_options=session_options)
        self.path, self.precision = Path(path), weights
        self.inputs = [i.name for i in self.session.get_inputs()]

    @property
    def weight_bytes(self) -> int | None:
        return initializer_bytes(self.path) if self.precision == "f32" else None


def compress_openvino(path: Path) -> Path:
    """The exported file as an OpenVINO model with NNCF's data-free symmetric int8 weights, saved beside it (IR:
    ``.xml`` and ``.bin``), for a machine without NNCF."""
    import nncf
    import openvino as ov

    out = Path(path).with_name(f"{Path(path).stem}.openvino_int8_weights.xml")
    if not out.exists():
        model = nncf.compress_weights(ov.Core().read_model(str(path)), mode=nncf.CompressWeightsMode.INT8_SYM)
        ov.save_model(model, str(out), compress_to_fp16=False)
    return out


class OpenVinoModel:
    """An exported file (or an OpenVINO model file, ``compress_openvino``'s) compiled by OpenVINO for the CPU:
    ``precision`` the inference precision hint (f32 or bf16), ``weights="int8"``: NNCF's data-free symmetric int8
    weight compression first (activations stay floating point); called with its inputs in order, returns its output. ``weight_bytes``: the constants of the
    model it compiled (int8 after compression); ``precision``: the inference precision it compiled for (f32 where
    the CPU has no bf16 or f16 arithmetic, whatever was asked)."""

    def __init__(self, path: Path, precision: str = "f32", weights: str | None = None, threads: int | None = None):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        if weights == "int8":
            import nncf

            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)
        self.weight_bytes = sum(op.get_byte_size() for op in model.get_ordered_ops()
                                if op.get_type_name() == "Constant")
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]
        self.output = self.compiled.output(0)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.request.infer(_feed(self.inputs, tensors))[self.output].copy())


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


class DecoderRunner:
    """What a VAE half's ``decoder_runner`` calls in place of its PyTorch decoder: the exported decoder on the
    backend, in the latents' dtype."""

    def __init__(self, backend, name: str):
        self.backend = backend
        self.name = name

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.backend(z).to(z.dtype)


def _attach(pipe: OpenSoraPipeline, name: str, components, build_stack, build_decoder) -> OpenSoraPipeline:
    """Run the stack on ``build_stack(exported path)`` whenever the transformer has weights, and the VAE's
    decoders on ``build_decoder(path)`` whenever the VAE has, for the ``components`` asked; forget them on
    release."""
    def attach(pipe, component):
        if component not in components:
            return
        if component == "transformer":
            pipe.transformer.block_runner = BlockRunner(build_stack(export_stack(pipe.transformer)), name)
        else:
            paths = export_vae_decoders(pipe.vae)
            pipe.vae.temporal_vae.decoder_runner = DecoderRunner(build_decoder(paths["temporal"]), name)
            pipe.vae.spatial_vae.decoder_runner = DecoderRunner(build_decoder(paths["spatial"]), name)

    def detach(pipe, component):
        if component == "transformer" and component in components:
            pipe.transformer.block_runner = None
        elif component == "vae" and component in components:
            pipe.vae.temporal_vae.decoder_runner = pipe.vae.spatial_vae.decoder_runner = None

    pipe.load_hooks.append(attach)
    pipe.release_hooks.append(detach)
    for component in components:
        if pipe.is_loaded(component):
            attach(pipe, component)
    return pipe


def apply_onnxruntime(pipe: OpenSoraPipeline, precision: str = "fp32", threads: int | None = None,
                      arm64_bf16_fastmath: bool = False, components=("transformer",)) -> OpenSoraPipeline:
    """The transformer's blocks and/or the VAE's decoders (``components``) on ONNX Runtime's CPU execution
    provider: ``precision`` fp32, or int8 (``quantize_ort``, the transformer's; the VAE runs fp32);
    ``arm64_bf16_fastmath``: ONNX Runtime's bf16 fast-math GEMM on aarch64 (ignored by x86 builds)."""
    if precision not in ORT_PRECISIONS:
        raise ValueError(f"precision {precision!r}: accepted {', '.join(ORT_PRECISIONS)}")
    components = check_components(components)
    if precision == "int8" and "transformer" not in components:
        raise ValueError("precision int8 quantises the transformer's MatMuls; the VAE alone runs fp32 "
                         "(accepted: precision fp32 with components ['vae'])")
    check_exportable(pipe, "onnxruntime", components)
    options = {ARM64_BF16_FASTMATH: "1"} if arm64_bf16_fastmath else {}
    return _attach(pipe, f"onnxruntime {precision}", components,
                   lambda path: OrtModel(quantize_ort(path) if precision == "int8" else path, threads, options,
                                         precision),
                   lambda path: OrtModel(path, threads, options))


def apply_openvino(pipe: OpenSoraPipeline, precision: str = "f32", weights: str | None = None,
                   threads: int | None = None, components=("transformer",)) -> OpenSoraPipeline:
    """The transformer's blocks and/or the VAE's decoders (``components``) compiled by OpenVINO for the CPU:
    ``precision`` f32 or bf16 (x86 with AVX-512 BF16 or AMX; OpenVINO documents f32 and f16 only on Arm),
    ``weights="int8"``: NNCF int8 weight compression of the transformer (the VAE keeps its float weights)."""
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision {precision!r}: accepted {', '.join(OPENVINO_PRECISIONS)}")
    if weights not in OPENVINO_WEIGHTS:
        raise ValueError(f"weights {weights!r}: accepted None or 'int8'")
    components = check_components(components)
    if weights and "transformer" not in components:
        raise ValueError("weights int8 compresses the transformer's; the VAE alone keeps float weights "
                         "(accepted: weights None with components ['vae'])")
    check_exportable(pipe, "openvino", components)
    return _attach(pipe, f"openvino {precision}{' int8 weights' if weights else ''}", components,
                   lambda path: OpenVinoModel(path, precision, weights, threads),
                   lambda path: OpenVinoModel(path, precision, None, threads))


def apply_ggml(pipe: OpenSoraPipeline, weights: str = "f16", threads: int | None = None) -> OpenSoraPipeline:
    """The transformer's blocks on ggml's CPU backend through ONNX Runtime (``onnxruntime-ggml``): ``weights`` f32,
    f16 or q8_0 (activations stay f32). The VAE stays with PyTorch: the provider runs only 1-D convolutions
    (measured on the exported decoders, which it refuses at run time)."""
    if weights not in GGML_WEIGHTS:
        raise ValueError(f"weights {weights!r}: accepted {', '.join(GGML_WEIGHTS)}")
    check_exportable(pipe, "ggml", ("transformer",))
    return _attach(pipe, f"ggml {weights}", ("transformer",), lambda path: GgmlModel(path, weights, threads), None)
