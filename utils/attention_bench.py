"""Microbenchmarks of the attention kernels (``utils.attention``) at the model's real shapes, for
notebook ``05_attention``: time, peak memory and accuracy of each variant per attention type, dtype and
setting; the reference path's memory wall; and the table the ``best`` mode reads.

Sizing: every call is planned from its FLOPs and the rate measured for the same (type, variant, dtype)
on a smaller shape (or an assumed rate before the first). A call predicted above ``max_call_s`` or
``max_gib`` is measured on fewer sequences (cross: fewer queries; each is independent of the others)
and its full-shape time is derived by the work ratio; one that does not fit even at one sequence is
recorded as skipped. Identical measured shapes are measured once.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from . import attention as attn
from .attention import AttentionShape, peak_bytes
from .benchmark import measure
from .memory import GIB, denoiser_activation_bytes, return_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the variants measured per attention type; "sdpa_nomask" (cross) attends to the padding too: it only
# prices the mask
VARIANTS = {"spatial": ("reference", "sdpa", "chunked", "bmm"),
            "temporal": ("reference", "sdpa", "bmm"),
            "cross": ("reference", "sdpa", "sdpa_nomask", "bmm", "chunked", "trimmed", "trimmed_bmm", "packed")}
# GFLOP/s assumed for planning until a variant has been measured (x86 notes 3c, 2 threads; others guessed low)
ASSUMED_GFLOPS = {("spatial", "sdpa"): 90, ("spatial", "bmm"): 35, ("temporal", "sdpa"): 8, ("temporal", "bmm"): 12,
                  ("cross", "sdpa"): 80, ("cross", "bmm"): 40}
DEFAULT_GFLOPS = 20.0
KERNEL_OF = {"sdpa_nomask": "sdpa", "trimmed": "sdpa", "trimmed_bmm": "bmm", "packed": "sdpa"}
TRIMS_KEYS = ("trimmed", "trimmed_bmm", "packed")


def variant_function(variant: str, chunk_mib: float = attn.DEFAULT_CHUNK_MIB):
    if variant == "sdpa_nomask":
        return lambda q, k, v, attn_mask=None: attn.sdpa(q, k, v)
    if variant == "sdpa":
        return attn.sdpa
    return attn.attention_function("cross" if variant in attn.CROSS_ONLY else "spatial", variant, chunk_mib)


@dataclass(frozen=True)
class Case:
    """One (attention type, variant, dtype) at one setting's full shape."""

    kind: str
    variant: str
    dtype: str
    shape: AttentionShape
    resolution: str
    frames: int  # pixel frames
    latent_frames: int
    tokens_per_frame: int
    caption_length: int  # valid caption tokens (the rest of the 300 are padding)

    @property
    def work(self) -> AttentionShape:
        """The shape of the work actually done: the trimmed/packed variants see only the valid keys."""
        return replace(self.shape, k_len=self.caption_length) if self.variant in TRIMS_KEYS else self.shape


def make_cases(pipe, resolutions, aspect_ratio: str, frame_counts, dtypes, variants=VARIANTS,
               caption_length: int = 300) -> list[Case]:
    from .pipeline import VideoSetting

    cases = []
    for resolution in resolutions:
        for frames in frame_counts:
            setting = VideoSetting.create(resolution, aspect_ratio, frames)
            T, S, shapes = attn.setting_shapes(pipe, setting)
            for kind, shape in shapes.items():
                for dtype in dtypes:
                    cases += [Case(kind, variant, dtype, shape, resolution, setting.num_frames, T, S, caption_length)
                              for variant in variants.get(kind, ())]
    return cases


def make_inputs(shape: AttentionShape, dtype: torch.dtype, caption_length: int, seed: int = 0):
    """q, k, v (and the key mask) in the model's layouts: self-attention q, k fresh from the norms
    (contiguous), v a view of the qkv projection; cross q and k, v views of their projections."""
    g = torch.Generator().manual_seed(seed)
    B, L, H, D = shape.batch, shape.q_len, shape.heads, shape.head_dim
    if shape.kind != "cross":
        qkv = torch.randn(B, L, 3, H, D, generator=g).to(dtype).permute(2, 0, 3, 1, 4)  # [3, B, H, L, D]
        return qkv[0].contiguous(), qkv[1].contiguous(), qkv[2], None
    q = torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2)  # [B, H, Lq, D]
    kv = torch.randn(B, shape.k_len, 2, H, D, generator=g).to(dtype).permute(2, 0, 3, 1, 4)  # [2, B, H, Lk, D]
    mask = (torch.arange(shape.k_len) < caption_length).expand(B, -1)[:, None, None]  # [B, 1, 1, Lk]
    return q, kv[0], kv[1], mask


def exact(q, k, v, attn_mask=None):
    """The attention in float64 (the accuracy yardstick)."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.nan_to_num(scores.softmax(-1)) @ v


def accuracy(variant: str, shape: AttentionShape, dtype: torch.dtype, caption_length: int, seed: int = 0,
             queries: int = 128) -> dict:
    """Errors of ``variant`` against float64 on the first ``queries`` queries of one sequence of ``shape``
    (cross: of both samples), against all of its keys."""
    small = replace(shape, batch=min(shape.batch, 2 if shape.kind == "cross" else 1))
    if shape.kind == "cross":
        small = replace(small, q_len=min(shape.q_len, queries))
    q, k, v, mask = make_inputs(small, dtype, caption_length, seed)
    q = q[:, :, :queries]
    out = variant_function(variant)(q, k, v, mask).double()
    expected = exact(q, k, v, None if variant == "sdpa_nomask" else mask)
    return dict(max_abs_error_vs_fp64=float((out - expected).abs().max()),
                rel_l2_error_vs_fp64=float((out - expected).norm() / expected.norm()))


def _part(shape: AttentionShape, fraction: float) -> AttentionShape:
    """``shape`` cut to at most ``fraction`` of its sequences (cross: queries), rounded down to a power of
    two so that the parts of different settings coincide and are measured once."""
    if fraction >= 1:
        return shape
    target = shape.scaled(fraction)
    units = target.q_len if shape.kind == "cross" else target.batch
    return shape.scaled((1 << (units.bit_length() - 1)) / (shape.q_len if shape.kind == "cross" else shape.batch))


def _rss() -> int:
    return psutil.Process().memory_info().rss


def run(cases: list[Case], warmup: int, repeats: int, threads: int, max_call_s: float, max_gib: float,
        skip_s: float, chunk_mib: float = attn.DEFAULT_CHUNK_MIB, seed: int = 0, busy_retries: int = 3):
    """Measure ``cases`` (smallest work first); yields one dict per case: the case, ``status``
    ("measured", "derived" or "skipped"), ``measured_shape``, ``timing``, ``seconds`` (full shape),
    ``predicted_s``, ``peak_increase_bytes`` (measured, at the measured shape), ``predicted_bytes``
    (full shape, analytic), ``accuracy`` and ``reason``. ``busy_retries``: see ``benchmark.measure``."""
    rates: dict[tuple, float] = {}
    done: dict[tuple, dict] = {}
    ordered = sorted(cases, key=lambda c: (c.work.flops, c.kind, c.variant, c.dtype))
    for case in tqdm(ordered, desc="attention kernels", unit="case"):
        dtype = DTYPES[case.dtype]
        kernel = KERNEL_OF.get(case.variant, case.variant)
        rate = rates.get((case.kind, case.variant, case.dtype),
                         ASSUMED_GFLOPS.get((case.kind, kernel), DEFAULT_GFLOPS) * (1.5 if case.dtype == "bf16" else 1))
        work = case.work
        predicted_s = work.flops / (rate * 1e9)
        input_bytes = (2 * work.q_len + 2 * work.k_len) * work.batch * work.heads * work.head_dim * dtype.itemsize
        predicted_bytes = peak_bytes(kernel, work, dtype, chunk_mib) + input_bytes
        fraction = min(1.0, max_call_s / predicted_s, max_gib * GIB / predicted_bytes)
        measured = _part(case.shape, fraction)
        measured_work = replace(measured, k_len=work.k_len)
        row = dict(case=case, predicted_s=predicted_s, predicted_bytes=peak_bytes(kernel, work, dtype, chunk_mib),
                   measured_shape=measured, timing=None, seconds=None, peak_increase_bytes=None, accuracy={}, reason="")
        unit_s = measured_work.flops / (rate * 1e9)
        unit_bytes = predicted_bytes * measured_work.flops / work.flops
        if unit_s > skip_s or unit_bytes > max_gib * GIB:
            row.update(status="skipped", reason=f"predicted {unit_s:.1f} s and {unit_bytes / GIB:.1f} GiB for the "
                                                f"smallest measurable part; limits {skip_s} s, {max_gib} GiB")
            yield row
            continue
        key = (case.kind, case.variant, case.dtype, measured, case.caption_length)
        if key not in done:
            q, k, v, mask = make_inputs(measured, dtype, case.caption_length, seed)
            fn = variant_function(case.variant, chunk_mib)
            B, L, C = measured.batch, measured.q_len, measured.heads * measured.head_dim
            return_freed_memory()
            before = _rss()
            with torch.inference_mode():  # the model's output reshape is part of a kernel's cost
                timing = measure(lambda: fn(q, k, v, mask).transpose(1, 2).reshape(B, L, C), warmup=warmup,
                                 repeats=repeats, threads=threads, max_busy_retries=busy_retries)
                done[key] = dict(timing=timing, peak=timing.peak_rss_bytes - before,
                                 accuracy=accuracy(case.variant, measured, dtype, case.caption_length, seed))
            del q, k, v, mask
            rates[(case.kind, case.variant, case.dtype)] = measured_work.flops / timing.median_s / 1e9
        result = done[key]
        scale = work.flops / measured_work.flops
        row.update(status="measured" if measured == case.shape else "derived", timing=result["timing"],
                   seconds=result["timing"].median_s * scale, peak_increase_bytes=result["peak"],
                   accuracy=result["accuracy"],
                   reason="" if measured == case.shape else
                   f"measured on {measured.batch} x {measured.q_len} of {case.shape.batch} x {case.shape.q_len}; "
                   f"time x {scale:.3g}")
        yield row


# ---- the reference path's memory wall ------------------------------------------------------------------

def reference_memory(pipe, shapes: dict[str, AttentionShape], tokens: int, dtype: torch.dtype) -> dict[str, dict]:
    """Per attention type: the reference call's transient bytes and the whole denoising step's peak with
    it (transformer weights + the block's working set + that transient), and the same step's peak with
    SDPA (``sdpa_total_bytes``), analytic."""
    from .memory import module_bytes

    cfg = pipe.transformer.config
    resident = module_bytes(pipe.transformer, dtype) + denoiser_activation_bytes(tokens, cfg.hidden_size,
                                                                                 cfg.mlp_ratio, dtype, batch=2)
    return {kind: dict(attention_bytes=peak_bytes("reference", shape, dtype),
                       total_bytes=resident + peak_bytes("reference", shape, dtype), resident_bytes=resident,
                       sdpa_total_bytes=resident + peak_bytes("sdpa", shape, dtype))
            for kind, shape in shapes.items()}


def confirm_reference_memory(shape: AttentionShape, dtype: torch.dtype, target_gib: float, threads: int,
                             seed: int = 0, busy_retries: int = 3) -> dict:
    """Run the reference path once on the part of ``shape`` predicted to need ``target_gib`` (never the
    whole shape) and compare the measured peak RSS increase with the prediction for that part."""
    fraction = min(1.0, target_gib * GIB / peak_bytes("reference", shape, dtype))
    part = shape.scaled(fraction)
    q, k, v, mask = make_inputs(part, dtype, part.k_len, seed)
    return_freed_memory()
    before = _rss()
    with torch.inference_mode():
        timing = measure(attn.reference, q, k, v, mask, warmup=1, repeats=1, threads=threads,
                         max_busy_retries=busy_retries)
    measured = timing.peak_rss_bytes - before
    del q, k, v, mask, timing
    return_freed_memory()
    return dict(part=part, fraction=part.scores / shape.scores, predicted_bytes=peak_bytes("reference", part, dtype),
                measured_bytes=measured, full_predicted_bytes=peak_bytes("reference", shape, dtype))


# ---- the "best" table ----------------------------------------------------------------------------------

BEST_OF = {"sdpa": "sdpa", "bmm": "bmm", "chunked": "chunked", "trimmed": "sdpa", "trimmed_bmm": "bmm"}


def best_entries(rows: list[dict], environment_id: str, threads: int) -> list[dict]:
    """Table entries from ``run`` rows: per (type, dtype, key length) the kernel with the least total
    full-shape time over the shapes where every candidate was timed."""
    totals: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        case = row["case"]
        if row["seconds"] is None or case.variant not in BEST_OF:
            continue
        padded = case.kind == "cross" and case.caption_length < case.shape.k_len
        if padded and case.variant in ("sdpa", "bmm", "chunked"):
            continue  # masked over padding: not what "best" runs (it trims first)
        key = (case.kind, case.dtype, case.work.k_len)
        per_shape = totals.setdefault(key, {}).setdefault((case.resolution, case.frames), {})
        per_shape[BEST_OF[case.variant]] = row["seconds"]
    entries = []
    for (kind, dtype, key_length), shapes in totals.items():
        kernels = set.intersection(*(set(s) for s in shapes.values()))
        if len(kernels) < 2:
            continue
        seconds = {k: sum(s[k] for s in shapes.values()) for k in sorted(kernels)}
        entries.append(dict(environment_id=environment_id, arch=platform.machine(), attention=kind, dtype=dtype,
                            key_length=key_length, best=min(seconds, key=seconds.get), seconds=seconds,
                            threads=threads, source=f"notebook 05_attention, {len(shapes)} settings"))
    return entries


def store_best_table(entries: list[dict], path: Path | str = attn.BEST_TABLE) -> None:
    """Add ``entries`` to the table, replacing those of the same environment, type, dtype and key
    length; written whole beside the file, then renamed."""
    path = Path(path)
    identity = lambda e: (e.get("environment_id"), e["attention"], e["dtype"], e["key_length"])  # noqa: E731
    doc = json.loads(path.read_text())["_doc"] if path.is_file() else (
        "Fastest attention kernel per attention type, dtype and key length (notebook 05_attention), read by "
        "utils.attention's 'best' mode.")
    kept = {identity(e): e for e in attn.load_best_table(path)}
    kept.update({identity(e): e for e in entries})
    payload = {"_doc": doc, "entries": sorted(kept.values(), key=lambda e: tuple(map(str, identity(e))))}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
