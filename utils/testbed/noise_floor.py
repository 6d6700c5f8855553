"""The fidelity metrics' noise floor: how far apart two outputs are when nothing lossy was applied.

Later sections compare an optimised pipeline with the fp32 baseline; a difference only means something
if it is larger than what these runs give for the same pipeline:
- ``repeat``: the same run again (same threads, same seed): any difference is non-determinism;
- ``1-thread``: the same run with one intra-op thread: a different floating-point reduction order;
- ``weights x(1+e)``: every floating-point weight of the transformer multiplied by ``1 + e * N(0, 1)``,
  a deliberate perturbation of a known size (0.1 % is below bf16's rounding of 0.4 %).
"""
from __future__ import annotations

import pandas as pd
import torch

from utils.measure.benchmark import num_threads
from utils.measure.fidelity import fidelity


@torch.no_grad()
def perturb_weights(module: torch.nn.Module, relative: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Multiply every floating-point parameter by ``1 + relative * N(0, 1)`` in place; returns the
    original values so ``restore_weights`` can undo it."""
    generator = torch.Generator().manual_seed(seed)
    saved = {}
    for name, param in module.named_parameters():
        if param.is_floating_point():
            saved[name] = param.detach().clone()
            noise = torch.randn(param.shape, generator=generator).to(param.dtype)
            param.mul_(1 + relative * noise)
    return saved


@torch.no_grad()
def restore_weights(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, param in module.named_parameters():
        if name in saved:
            param.copy_(saved[name])


def _generate(pipe, y, mask, setting) -> tuple[torch.Tensor, torch.Tensor]:
    z = pipe.prepare_latents(len(y), setting)
    z = pipe.denoise(z, y, mask, setting, progress=False)
    return pipe.decode(z, setting), z


def noise_floor(pipe, prompts: list[str], setting, threads: int = 2,
                perturbations: tuple[float, ...] = (1e-3, 1e-2)) -> pd.DataFrame:
    """Fidelity (``measure.fidelity.fidelity``) of each run above against the reference run, one row per run.

    The text encoder runs once and is released before the transformer and VAE are loaded (a real-size
    fp32 T5 and STDiT3 do not fit 24 GB together); every run starts from the same prompt embeddings."""
    pipe.load("text_encoder")
    y, mask = pipe.encode_prompt(prompts)
    pipe.release("text_encoder")
    pipe.load("transformer")
    pipe.load("vae")
    runs = {}
    with num_threads(threads):
        runs["reference"] = _generate(pipe, y, mask, setting)
        runs["repeat"] = _generate(pipe, y, mask, setting)
    with num_threads(1):
        runs["1-thread"] = _generate(pipe, y, mask, setting)
    for relative in perturbations:
        saved = perturb_weights(pipe.transformer, relative)
        with num_threads(threads):
            runs[f"weights x(1+{relative:g}e)"] = _generate(pipe, y, mask, setting)
        restore_weights(pipe.transformer, saved)
    reference_video, reference_latents = runs.pop("reference")
    rows = [dict(run=name, **fidelity(video, reference_video, latents, reference_latents),
                 max_abs_diff=(video - reference_video).abs().max().item())
            for name, (video, latents) in runs.items()]
    return pd.DataFrame(rows)
