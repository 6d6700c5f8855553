"""The machine's measured ceilings: matrix-multiply rate at the transformer's real shapes per dtype and
thread count, and memory bandwidth. Achieved FLOP/s of each stage is reported as a fraction of these."""
from __future__ import annotations

import torch

from utils.measure.benchmark import Timing, TimingPolicy, measure
from utils.model.dtypes import parse_dtype

# (M, K, N) of the STDiT3-XL/2 Linear layers: M tokens (a 144p-240p frame batch), K in, N out
GEMM_SHAPES = {
    "proj": (4096, 1152, 1152),
    "qkv": (4096, 1152, 3456),
    "mlp_fc1": (6000, 1152, 4608),
    "mlp_fc2": (6000, 4608, 1152),
}

TINY_GEMM_SHAPES = {"tiny": (256, 128, 128)}  # smoke runs only

GEMM_DTYPES = ("fp32", "bf16", "int8")


def _operands(m: int, k: int, n: int, dtype: str, device: str):
    generator = torch.Generator().manual_seed(0)
    if dtype == "int8":
        # torch._int_mm: exact int8 x int8 -> int32, the int8 GEMM torch exposes on CPU and GPU
        a = torch.randint(-128, 127, (m, k), dtype=torch.int8, generator=generator)
        b = torch.randint(-128, 127, (k, n), dtype=torch.int8, generator=generator)
        return a.to(device), b.to(device)
    torch_dtype = parse_dtype(dtype)
    a = torch.randn(m, k, generator=generator).to(device, torch_dtype)
    b = torch.randn(k, n, generator=generator).to(device, torch_dtype)
    return a, b


def gemm_rate(shape: tuple[int, int, int], dtype: str, policy: TimingPolicy,
              device: str = "cpu") -> tuple[Timing, float]:
    """Median GFLOP/s (GOP/s for int8) of ``a @ b`` at ``shape`` = (M, K, N): 2*M*K*N / time."""
    m, k, n = shape
    a, b = _operands(m, k, n, dtype, device)
    if dtype == "int8":
        timing = measure(torch._int_mm, a, b, policy=policy, device=device)
    else:
        out = torch.empty(m, n, dtype=a.dtype, device=device)
        timing = measure(torch.mm, a, b, out=out, policy=policy, device=device)
    return timing, 2 * m * k * n / timing.median_s / 1e9


def copy_bandwidth(policy: TimingPolicy, size_bytes: int = 1 << 30, device: str = "cpu") -> tuple[Timing, float]:
    """Median GB/s of ``dst.copy_(src)`` on ``size_bytes`` of fp32, read plus write counted."""
    src = torch.ones(size_bytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = measure(dst.copy_, src, policy=policy, device=device)
    return timing, 2 * size_bytes / timing.median_s / 1e9
