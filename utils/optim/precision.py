"""Precision steps of the optimisation ladder: weights and activations in bf16 (all components, or upstream's
own mixed choice), and ``torch.autocast`` over the compute stages."""
from __future__ import annotations

import functools

import torch

from utils.model.dtypes import parse_dtype
from utils.model.pipeline import STAGES, OpenSoraPipeline
from utils.model.weights import COMPONENTS

COMPUTE_STAGES = tuple(s for s in STAGES if s != "prepare_latents")


# ---- precision ----------------------------------------------------------------------------------------

def apply_bf16(pipe: OpenSoraPipeline, components=COMPONENTS) -> OpenSoraPipeline:
    """Weights and activations of ``components`` in bfloat16. Upstream's own mixed precision is
    ``components=("transformer", "vae")`` (T5 stays fp32). A released component is materialised
    directly in bf16 when it is loaded (the same random draws as fp32, rounded)."""
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; accepted: {', '.join(COMPONENTS)}")
    for component in components:
        pipe.dtypes[component] = torch.bfloat16
        if pipe.is_loaded(component):
            pipe._module(component).to(torch.bfloat16)
    return pipe


def apply_autocast(pipe: OpenSoraPipeline, dtype: str = "bf16", stages=COMPUTE_STAGES) -> OpenSoraPipeline:
    """Run ``stages`` under ``torch.autocast`` in ``dtype``: weights stay as loaded (fp32), matmuls,
    convolutions and attention run in ``dtype`` on the fly, normalisations and reductions in fp32."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; accepted: {', '.join(STAGES)}")
    torch_dtype = parse_dtype(dtype)
    device_type = torch.device(pipe.device).type
    for stage in stages:
        method = getattr(pipe, stage)

        @functools.wraps(method)
        def under_autocast(*args, _method=method, **kwargs):
            with torch.autocast(device_type, dtype=torch_dtype):
                return _method(*args, **kwargs)

        setattr(pipe, stage, under_autocast)  # an instance attribute: the class's stage stays plain
    return pipe
