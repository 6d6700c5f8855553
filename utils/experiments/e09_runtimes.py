"""Notebook 09: the denoiser and the VAE decoder on other CPU runtimes (ONNX Runtime's CPU execution provider,
OpenVINO, ggml through ONNX Runtime) side by side with PyTorch: the exports, one denoising step and one decode per
runtime and precision under the comparison protocol, fidelity against PyTorch fp32, and the trained mini model's adherence with each runtime's
int8 path.

Each runtime is an optimisation step (``utils.optim.onnx_backends``): the pipeline, the CFG loop, the sampler and the
VAE's chunking stay PyTorch's; only the transformer's blocks and the VAE's decoders run elsewhere. The runs reuse
notebook 06's machinery (fresh processes, fp32 first and its outputs fed to the others, records of stage times,
sizes and fidelity).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd

from utils.experiments.e06_int8 import decoded, variant_records
from utils.experiments.variant_runs import adherence_records_of, run_all, run_compared
from utils.measure.results import Record, ResultsStore, make_config
from utils.measure.runner import run_in_fresh_process
from utils.model.pipeline import load_pipeline
from utils.optim import onnx_backends
from utils.optim.recipes import ladder_steps

BOTH = ["transformer", "vae"]
# variant -> its optimisation steps; fp32 (PyTorch eager, the faithful baseline) is the reference: it encodes the
# prompt every other variant is fed and decodes the latent the VAE variants decode
VARIANTS = {
    "fp32": {},
    "bf16": {"bf16": {"components": ["transformer"]}},
    # the fastest PyTorch pipeline of the ladder (notebook 08): bf16 (VAE too), int8 W8A8 dynamic, compiled, best
    # attention
    "pytorch_fastest": ladder_steps("best attention"),
    "ort_fp32": {"onnxruntime": {"components": BOTH}},
    "ort_int8": {"onnxruntime": {"precision": "int8", "components": BOTH}},  # the VAE: fp32
    "openvino_f32": {"openvino": {"precision": "f32", "components": BOTH}},
    "openvino_bf16": {"openvino": {"precision": "bf16", "components": BOTH}},
    "openvino_int8_weights": {"openvino": {"precision": "bf16", "weights": "int8", "components": BOTH}},
    # ggml's CPU backend through ONNX Runtime: the transformer only (it runs no 2-D or 3-D convolution)
    "ggml_f16": {"ggml": {"weights": "f16"}},
    "ggml_q8_0": {"ggml": {"weights": "q8_0"}},
}
# the variants whose decode is timed: one per distinct VAE (ort_int8's VAE is ort_fp32's, openvino_int8_weights'
# is openvino_bf16's, bf16's is fp32's)
DECODED = ("fp32", "pytorch_fastest", "ort_fp32", "openvino_f32", "openvino_bf16")


def check_variants(names: list[str]) -> None:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown runtime variants {unknown}; accepted: {', '.join(VARIANTS)}")


def stage_run(base: dict, name: str, outputs: Path, fidelity_steps: int) -> tuple[str, dict, dict]:
    """The ``stages`` task of variant ``name``: fp32 encodes, denoises and decodes (the reference), the others
    denoise (and decode, ``DECODED``) from its outputs."""
    reference = name == "fp32"
    stages = (["encode_prompt"] if reference else []) + ["denoise"] + (["decode"] if name in DECODED else [])
    spec = base | dict(optimizations=copy.deepcopy(VARIANTS[name]), stages=stages,
                       outputs=str(outputs / f"{name}.pt"), fidelity_steps=fidelity_steps,
                       inputs=None if reference else str(outputs / "fp32.pt"))
    return "stages", {}, spec


# ---- the export, in its own process (the timed processes load the cached files) ---------------------------

def task_export(spec: dict) -> dict:
    """Export the block stack and the VAE's decoders of ``spec["model"]`` (fp32, random weights of the study's
    seed) and, for the int8 runtime, quantise the stack; report each export's ``export.json`` facts."""
    pipe = load_pipeline(spec["model"], weights=spec.get("weights", "random"), dtype="fp32",
                         load=("transformer", "vae"))
    paths = {"stack": onnx_backends.export_stack(pipe.transformer)} | {
        f"{half}_decoder": path for half, path in onnx_backends.export_vae_decoders(pipe.vae).items()}
    if spec.get("int8"):
        onnx_backends.quantize_ort(paths["stack"])
    return dict(facts={name: onnx_backends.export_facts(path) for name, path in paths.items()})


TASKS = {"export": task_export}


def export(store: ResultsStore, model: str, threads: int) -> dict:
    """The exports (and the stack's int8 quantisation) in a fresh process; stored per exported file (variant:
    ``stack``, ``stack_int8``, ``temporal_decoder``, ``spatial_decoder``): export or quantise seconds, bytes on
    disk."""
    result = run_in_fresh_process(f"{__name__}:export", model=model, threads=threads, int8=True)
    records = []
    for module, facts in result["facts"].items():
        config = make_config(model=model, dtype="fp32", threads=threads, weights="random", experiment="export",
                             exporter=", ".join(f"{k} {v}" for k, v in sorted(facts["key"]["versions"].items())))
        sizes = facts["file_bytes"]
        int8 = sum(size for name, size in sizes.items() if ".int8." in name)
        files = ((module, sum(sizes.values()) - int8, facts["export_seconds"],
                  "torch.onnx.export (dynamo), ONNX graph and external data"),
                 (f"{module}_int8", int8, facts.get("quantize_seconds"),
                  "onnxruntime.quantization.quantize_dynamic, per-channel QInt8 weights"))
        for variant, size, seconds, note in files:
            if size:
                records += [Record(variant=variant, stage="export", metric="file_bytes", unit="B", value=size,
                                   spread={"n": 1}, config=config, note=f"{note}: bytes on disk"),
                            Record(variant=variant, stage="export", metric="export_seconds", unit="s", value=seconds,
                                   spread={"n": 1}, config=config, note=note)]
        if facts.get("int8_ops"):
            ops = facts["int8_ops"]
            records.append(Record(variant=f"{module}_int8", stage="export", metric="quantized_matmuls", unit="",
                                  spread={"n": 1}, value=ops["MatMulInteger"], config=config, quality=ops,
                                  note="MatMuls quantize_dynamic made MatMulInteger (quality: the MatMuls left float)"))
    store.add(*records)
    return result


# ---- the comparison, fidelity and adherence ----------------------------------------------------------------

def variants(store: ResultsStore, base: dict, names: list[str], outputs: Path, fidelity_steps: int,
             processes: int) -> dict[str, dict]:
    """One denoising step of every variant in ``processes`` fresh processes each, interleaved (fp32 first in every
    round); stored with the speed-ups against fp32 and bf16, model bytes and fidelity against fp32."""
    check_variants(names)
    order = ["fp32"] + [n for n in names if n != "fp32"]
    runs = run_compared({n: stage_run(base, n, outputs, fidelity_steps) for n in order}, processes,
                        "runtime variants")
    store.add(*variant_records(runs, base["steps"]))
    return runs


def decoded_fidelity(store: ResultsStore, model: str, runs: dict[str, dict], names: list[str], outputs: Path,
                     setting, fidelity_steps: int) -> pd.DataFrame:
    """Each variant's final latent decoded by the fp32 VAE against fp32's frames (notebook 06's ``decoded``)."""
    return decoded(store, model, runs, [n for n in names if n != "fp32"], outputs, setting, fidelity_steps)


def mini_adherence(store: ResultsStore, names: list[str], threads: int, splits: list[str], seeds: list[int],
                   steps: int) -> pd.DataFrame:
    """The trained mini model's adherence with each variant's steps, each in a fresh process; stored."""
    check_variants(names)
    results = run_all({n: ("adherence", {}, dict(threads=threads, splits=splits, seeds=seeds, steps=steps,
                                                 optimizations=copy.deepcopy(VARIANTS[n]))) for n in names},
                      "mini-model adherence")
    for name, result in results.items():
        store.add(*adherence_records_of(name, result, steps, threads))
    return pd.DataFrame([dict(variant=name, split=split, **summary) for name, result in results.items()
                         for split, summary in result["summaries"].items()])
