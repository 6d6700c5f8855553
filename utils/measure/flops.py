"""FLOP counts per stage with ``torch.utils.flop_counter.FlopCounterMode``.

The counter knows matmuls and convolutions, and SDPA's CUDA kernels but not the CPU flash kernel;
that one is registered here with torch's own SDPA formula, so attention counts on CPU as on GPU.
Element-wise work, norms and softmax are not counted (they are memory-bound; the ceilings are for
matrix multiply), so GFLOP/s figures are matmul/conv/attention FLOPs per second.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

aten = torch.ops.aten


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn, *args, **kwargs) -> tuple[object, int]:
    """Run ``fn`` once under the counter; returns (its result, FLOPs). Use a meta or small input to
    count without the cost of a real run: the count depends on shapes only."""
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


def count_flops_by_op(fn, *args, **kwargs) -> dict[str, int]:
    """FLOPs per aten op for one call of ``fn`` (e.g. to split matmul from attention)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def gflops_per_s(flops: int, seconds: float) -> float:
    return flops / seconds / 1e9
