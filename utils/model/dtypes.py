"""The study's precisions by name: the one map between "fp32"/"bf16" and torch's dtypes."""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32", "bf16", or torch's own name of another dtype."""
    return DTYPE_NAMES.get(dtype, str(dtype))
