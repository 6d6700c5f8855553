"""What notebook ``05_attention`` runs and the records it stores: microbenchmarks of the attention kernels
(``utils.optim.attention``) at the model's real shapes (time, peak memory and accuracy of each variant per
attention type, dtype and setting), the reference path's memory wall, the table the ``best`` mode reads,
and the rewrites of the bottlenecks (``utils.optim.rewrites``) on a block pair and on the real model.
Each of the notebook's measurements is one function here that takes the ``ResultsStore``, stores its
records and returns the table the notebook shows.

Sizing of the kernel microbenchmark: every call is planned from its FLOPs and the rate measured for the
same (type, variant, dtype) on a smaller shape (or an assumed rate before the first). A call predicted
above ``max_call_s`` or ``max_gib`` is measured on fewer sequences (cross: fewer queries; each is
independent of the others) and its full-shape time is derived by the work ratio; one that does not fit
even at one sequence is recorded as skipped. Identical measured shapes are measured once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import psutil
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from utils.io import GIB, read_table, write_json_atomic
from utils.measure.benchmark import TimingPolicy, measure, measure_with_memory
from utils.measure.compare import Spread, verdict
from utils.measure.fidelity import compare
from utils.measure.profiling import STDIT3_GROUPS, module_breakdown
from utils.measure.records import baseline_rows, environment_records, value_of
from utils.measure.results import Record, ResultsStore, make_config, timing_record
from utils.measure.stages import record_config
from utils.model.captions import append_score_to_prompts, text_preprocessing
from utils.model.dtypes import DTYPES
from utils.model.memory import denoiser_activation_bytes, module_bytes, return_freed_memory
from utils.model.pipeline import AESTHETIC_SCORE, OpenSoraPipeline, VideoSetting, load_pipeline
from utils.model.stdit3 import STDiT3, build_stdit3
from utils.model.vae import SPATIAL_SCALING_FACTOR
from utils.model.weights import materialize_random
from utils.optim import attention as attn
from utils.optim.attention import AttentionShape, peak_bytes
from utils.optim.registry import apply, describe
from utils.optim.rewrites import MODEL_REWRITES, REWRITES, rewrite_model

# ---- measurement helpers for notebook 05 -------------------------------------------------------------

def synthetic_caption(pipe: OpenSoraPipeline, prompt: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings drawn at random (T5-XXL is not run) with the real token mask of ``prompt``
    (the pipeline's tokenizer, upstream's preprocessing): y [1, 1, L, D] in the transformer dtype, mask [1, L]."""

    text = [text_preprocessing(p) for p in append_score_to_prompts([prompt], aes=AESTHETIC_SCORE)]
    _, mask = pipe.text_encoder.tokenize(text)
    cfg = pipe.transformer.config
    y = torch.randn(1, 1, cfg.model_max_length, cfg.caption_channels, generator=torch.Generator().manual_seed(seed))
    return y.to(pipe.dtypes["transformer"]), mask


def pair_model(pipe: OpenSoraPipeline, dtype: torch.dtype, seed: int = 0) -> STDiT3:
    """A depth-1 copy of the pipeline's transformer (one spatial and one temporal block, embedders and
    final layer), random weights drawn with ``seed``."""

    config = dataclasses.replace(pipe.transformer.config, depth=1)
    return materialize_random(build_stdit3(config, device="meta"), dtype, seed=seed).eval()


def pair_inputs(pipe: OpenSoraPipeline, setting, y: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> tuple:
    """(args, kwargs) of one CFG transformer call at ``setting``: noise, timestep, the caption batch
    [prompt; null caption] and the model arguments."""
    cfg = pipe.transformer.config
    noise = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, *pipe.latent_size(setting), generator=noise).to(dtype)
    null = torch.randn(1, 1, *y.shape[2:], generator=torch.Generator().manual_seed(2)).to(dtype)
    caption = torch.cat([y.to(dtype), null])  # [prompt; null caption]
    return (x, torch.full((2,), 500.0)), dict(y=caption, mask=mask, **pipe.model_args(2, setting))


def caption_projection_seconds(model: STDiT3, y_cfg: torch.Tensor, policy: TimingPolicy):
    """Timing of what ``cache_text_kv`` computes once per caption instead of every step: the caption
    projection and every block's K/V projection of it (the modules' own forwards, not the memo)."""
    embedder = model.y_embedder
    linears = [b.cross_attn.kv_linear for b in (*model.spatial_blocks, *model.temporal_blocks)]

    def project():
        y = type(embedder).forward(embedder, y_cfg.squeeze(1))
        return [type(linear).forward(linear, y) for linear in linears]

    with torch.inference_mode():
        return measure(project, policy=policy)


def decode_parts(vae, latents: torch.Tensor, num_frames: int, policy: TimingPolicy) -> dict:
    """The two halves of a decode at the VAE's chunking, timed alone: the temporal decoder on the first
    chunk of latents (``temporal_chunk``) and the 2D decoder on the first micro-batch of its frames
    (``spatial_batch``). Each Timing's ``result`` is that part's output."""

    z = latents[:, :, :vae.micro_z_frame_size].to(vae.dtype)
    z = z * vae.scale.to(z.dtype) + vae.shift.to(z.dtype)
    chunk_frames = min(vae.micro_frame_size or num_frames, num_frames)
    with torch.inference_mode():
        temporal = measure(vae.temporal_vae.decode, z, num_frames=chunk_frames, policy=policy)
        frames = temporal.result.transpose(1, 2).flatten(0, 1)[:vae.micro_batch_size or chunk_frames]  # (B T) 4 h w
        spatial = measure(lambda: vae.spatial_vae.module.decode(frames / SPATIAL_SCALING_FACTOR).sample,
                          policy=policy)
    return {"temporal_chunk": temporal, "spatial_batch": spatial, "frames_per_batch": len(frames)}


def derived_decode_seconds(parts: dict, vae, num_frames: int, latent_frames: int) -> float:
    """A whole decode from its parts: every temporal chunk as the first (the last may be shorter) and
    every frame at the first micro-batch's per-frame time."""
    chunks = -(-latent_frames // (vae.micro_z_frame_size or latent_frames))
    per_frame = parts["spatial_batch"].median_s / parts["frames_per_batch"]
    return chunks * parts["temporal_chunk"].median_s + num_frames * per_frame


def spatial_micro_batches(vae, latents: torch.Tensor, sizes, policy: TimingPolicy) -> dict:
    """Per micro-batch size (frames per 2D-decoder call): the Timing of one call and its peak RSS
    increase (``measure_with_memory``)."""

    frames = latents.transpose(1, 2).flatten(0, 1).to(vae.dtype)  # (B T) 4 h w
    out = {}
    for size in sizes:
        if size > len(frames):
            frames = frames.repeat(-(-size // len(frames)), 1, 1, 1)
        batch = frames[:size] / SPATIAL_SCALING_FACTOR
        timing, increase = measure_with_memory(lambda: vae.spatial_vae.module.decode(batch).sample, policy=policy)
        timing.result = None
        out[size] = dict(timing=timing, peak_increase_bytes=increase)
    return out


def group_breakdown(model: STDiT3, args: tuple, kwargs: dict) -> dict[str, float]:
    """Milliseconds per module group of one call of ``model`` under the profiler
    (``profiling.module_breakdown``), "other" being the profiled call's wall time minus the groups: the
    split notebook 02 makes of a denoising step."""
    start = time.perf_counter()
    with torch.inference_mode():
        groups = module_breakdown(model, model, *args, groups=STDIT3_GROUPS, **kwargs)
    groups["other"] = max((time.perf_counter() - start) * 1e3 - sum(groups.values()), 0.0)
    return groups


def compare_step(pipe: OpenSoraPipeline, setting, y: torch.Tensor, mask: torch.Tensor, steps: dict,
                 policy: TimingPolicy) -> dict:
    """One denoising step of ``pipe`` (transformer loaded) timed as it is, then again after
    ``registry.apply(pipe, steps)``; plus the caption projections the caches compute once per video.
    Returns Timings ``baseline``, ``rewritten`` (``.result``: the step's latents), ``projection``, the
    peak RSS increases, the latents and the applied steps' description."""
    one_step = replace(setting, steps=1)
    z = pipe.prepare_latents(1, setting)
    caption = y.to(pipe.dtypes["transformer"])
    measured = {}
    for variant in ("baseline", "rewritten"):
        if variant == "rewritten":
            apply(pipe, steps)
        measured[variant], measured[f"{variant}_increase"] = measure_with_memory(
            pipe.denoise, z, caption, mask, one_step, progress=False, policy=policy)
    null = pipe.transformer.y_embedder.y_embedding[None, None]
    measured["projection"] = caption_projection_seconds(pipe.transformer, torch.cat([caption, null]), policy)
    measured["description"] = describe(pipe)
    return measured


def compare_decode(pipe: OpenSoraPipeline, latents: torch.Tensor, setting, latent_frames: int, steps: dict,
                   micro_batch_sizes, policy: TimingPolicy,
                   full_decode: bool = False) -> dict:
    """The decode parts (``decode_parts``) of ``pipe`` (VAE loaded) as it is and after
    ``registry.apply(pipe, steps)``, the whole decode too with ``full_decode``, the 2D decoder per
    micro-batch size after the steps, and per variant the decode seconds of one video (the measured
    whole decode, else derived from the parts)."""

    out = {"parts": {}, "full": {}, "video": {}}
    for variant in ("baseline", "rewritten"):
        if variant == "rewritten":
            apply(pipe, steps)
        out["parts"][variant] = decode_parts(pipe.vae, latents, setting.num_frames, policy)
        out["full"][variant] = (measure(pipe.decode, latents, setting, policy=policy) if full_decode else None)
        out["video"][variant] = (out["full"][variant].median_s if full_decode else
                                 derived_decode_seconds(out["parts"][variant], pipe.vae, setting.num_frames,
                                                        latent_frames))
    out["micro"] = spatial_micro_batches(pipe.vae, latents, micro_batch_sizes, policy.with_(repeats=1))
    return out


# the variants measured per attention type. The model's cross-attention attends to the caption's valid
# tokens (batched, no mask under CFG); two cross variants take the caption padded to its 300 tokens with the
# key mask instead: "padded" (SDPA over all of them: the formulation this study used before) and "packed"
# (one SDPA call per sample over its valid keys: upstream's xformers formulation, as a loop)
VARIANTS = {"spatial": ("reference", "sdpa", "chunked", "bmm"),
            "temporal": ("reference", "sdpa", "bmm"),
            "cross": ("reference", "sdpa", "bmm", "chunked", "padded", "packed")}

# GFLOP/s assumed for planning until a variant has been measured (x86 notes 3c, 2 threads; others guessed low)
ASSUMED_GFLOPS = {("spatial", "sdpa"): 90, ("spatial", "bmm"): 35, ("temporal", "sdpa"): 8, ("temporal", "bmm"): 12,
                  ("cross", "sdpa"): 80, ("cross", "bmm"): 40}

DEFAULT_GFLOPS = 20.0

KERNEL_OF = {"padded": "sdpa", "packed": "sdpa"}

PADDED_INPUTS = ("padded", "packed")  # cross variants given the padded caption and its key mask


def variant_function(variant: str, chunk_mib: float = attn.DEFAULT_CHUNK_MIB):
    if variant in ("sdpa", "padded"):
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
    caption_length: int  # valid caption tokens: the model's cross-attention keys (shape.k_len)
    padded_length: int  # the caption's tokens with the padding (the model's max length)

    @property
    def work(self) -> AttentionShape:
        """The shape of the work actually done: "padded" attends to the padding too."""
        return replace(self.shape, k_len=self.padded_length) if self.variant == "padded" else self.shape

    def input_shape(self, shape: AttentionShape) -> AttentionShape:
        """``shape`` (the case's or a part of it) as this variant's inputs have it: padded or valid keys."""
        return replace(shape, k_len=self.padded_length) if self.variant in PADDED_INPUTS else shape


def make_cases(pipe, resolutions, aspect_ratio: str, frame_counts, dtypes, variants=VARIANTS,
               caption_length: int = 300) -> list[Case]:
    """The cases of every setting, attention type, dtype and variant; cross shapes have the caption's
    ``caption_length`` valid tokens as keys, as the model runs them."""
    cases = []
    padded_length = pipe.transformer.config.model_max_length
    for resolution in resolutions:
        for frames in frame_counts:
            setting = VideoSetting.create(resolution, aspect_ratio, frames)
            T, S, shapes = attn.setting_shapes(pipe, setting, caption_length)
            for kind, shape in shapes.items():
                for dtype in dtypes:
                    cases += [Case(kind, variant, dtype, shape, resolution, setting.num_frames, T, S, caption_length,
                                   padded_length)
                              for variant in variants.get(kind, ())]
    return cases


def make_inputs(shape: AttentionShape, dtype: torch.dtype, caption_length: int, seed: int = 0):
    """q, k, v (and the key mask) in the model's layouts: self-attention q, k fresh from the norms
    (contiguous), v a view of the qkv projection; cross q and k, v views of their projections, with a key
    mask only when ``shape`` has more keys than the caption's ``caption_length`` valid tokens."""
    g = torch.Generator().manual_seed(seed)
    B, L, H, D = shape.batch, shape.q_len, shape.heads, shape.head_dim
    if shape.kind != "cross":
        qkv = torch.randn(B, L, 3, H, D, generator=g).to(dtype).permute(2, 0, 3, 1, 4)  # [3, B, H, L, D]
        return qkv[0].contiguous(), qkv[1].contiguous(), qkv[2], None
    q = torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2)  # [B, H, Lq, D]
    kv = torch.randn(B, shape.k_len, 2, H, D, generator=g).to(dtype).permute(2, 0, 3, 1, 4)  # [2, B, H, Lk, D]
    if caption_length >= shape.k_len:
        return q, kv[0], kv[1], None
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
    (its inputs' shape; cross: of both samples), against all of its keys."""
    small = replace(shape, batch=min(shape.batch, 2 if shape.kind == "cross" else 1))
    if shape.kind == "cross":
        small = replace(small, q_len=min(shape.q_len, queries))
    q, k, v, mask = make_inputs(small, dtype, caption_length, seed)
    q = q[:, :, :queries]
    out = variant_function(variant)(q, k, v, mask).double()
    expected = exact(q, k, v, mask)
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


def run(cases: list[Case], policy: TimingPolicy, max_call_s: float, max_gib: float, skip_s: float,
        chunk_mib: float = attn.DEFAULT_CHUNK_MIB, seed: int = 0):
    """Measure ``cases`` (smallest work first); yields one dict per case: the case, ``status``
    ("measured", "derived" or "skipped"), ``measured_shape``, ``timing``, ``seconds`` (full shape),
    ``predicted_s``, ``peak_increase_bytes`` (measured, at the measured shape), ``predicted_bytes``
    (full shape, analytic), ``accuracy`` and ``reason``. ``policy``: see ``benchmark.TimingPolicy``."""
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
            inputs = case.input_shape(measured)
            q, k, v, mask = make_inputs(inputs, dtype, case.caption_length, seed)
            fn = variant_function(case.variant, chunk_mib)
            B, L, C = measured.batch, measured.q_len, measured.heads * measured.head_dim
            return_freed_memory()
            before = _rss()
            with torch.inference_mode():  # the model's output reshape is part of a kernel's cost
                timing = measure(lambda: fn(q, k, v, mask).transpose(1, 2).reshape(B, L, C), policy=policy)
                done[key] = dict(timing=timing, peak=timing.peak_rss_bytes - before,
                                 accuracy=accuracy(case.variant, inputs, dtype, case.caption_length, seed))
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

    cfg = pipe.transformer.config
    resident = module_bytes(pipe.transformer, dtype) + denoiser_activation_bytes(tokens, cfg.hidden_size,
                                                                                 cfg.mlp_ratio, dtype, batch=2)
    return {kind: dict(attention_bytes=peak_bytes("reference", shape, dtype),
                       total_bytes=resident + peak_bytes("reference", shape, dtype), resident_bytes=resident,
                       sdpa_total_bytes=resident + peak_bytes("sdpa", shape, dtype))
            for kind, shape in shapes.items()}


def confirm_reference_memory(shape: AttentionShape, dtype: torch.dtype, target_gib: float, policy: TimingPolicy,
                             seed: int = 0) -> dict:
    """Run the reference path once on the part of ``shape`` predicted to need ``target_gib`` (never the
    whole shape) and compare the measured peak RSS increase with the prediction for that part."""
    fraction = min(1.0, target_gib * GIB / peak_bytes("reference", shape, dtype))
    part = shape.scaled(fraction)
    q, k, v, mask = make_inputs(part, dtype, part.k_len, seed)
    return_freed_memory()
    before = _rss()
    with torch.inference_mode():
        timing = measure(attn.reference, q, k, v, mask, policy=policy.with_(warmup=1, repeats=1))
    measured = timing.peak_rss_bytes - before
    del q, k, v, mask, timing
    return_freed_memory()
    return dict(part=part, fraction=part.scores / shape.scores, predicted_bytes=peak_bytes("reference", part, dtype),
                measured_bytes=measured, full_predicted_bytes=peak_bytes("reference", shape, dtype))


# ---- the "best" table ----------------------------------------------------------------------------------

BEST_SOURCE = "notebook 05_attention"


def best_entries(rows: list[dict], environment_id: str, threads: int) -> list[dict]:
    """Table entries from ``run`` rows: per attention type, dtype and call shape (query and key lengths) the
    candidate kernel (``attention.BEST_CANDIDATES``) with the least full-shape time, among the kernels timed
    at every setting with that shape (settings that share the lengths differ only in batch: their times add)."""
    timed: dict[tuple, dict[tuple, dict]] = {}
    for row in rows:
        case = row["case"]
        if row["seconds"] is None or case.variant not in attn.BEST_CANDIDATES:
            continue
        key = (case.kind, case.dtype, case.shape.q_len, case.shape.k_len)
        timed.setdefault(key, {}).setdefault((case.resolution, case.frames), {})[case.variant] = row["seconds"]
    entries = []
    for (kind, dtype, query_length, key_length), settings in timed.items():
        kernels = set.intersection(*(set(s) for s in settings.values()))
        if len(kernels) < 2:
            continue
        seconds = {k: sum(s[k] for s in settings.values()) for k in sorted(kernels)}
        entries.append(dict(environment_id=environment_id, arch=platform.machine(), attention=kind, dtype=dtype,
                            query_length=query_length, key_length=key_length, best=min(seconds, key=seconds.get),
                            seconds=seconds, settings=sorted(f"{r} {f} frames" for r, f in settings), threads=threads,
                            source=BEST_SOURCE))
    return entries


def store_best_table(entries: list[dict], path: Path | str = attn.BEST_TABLE) -> None:
    """Replace the notebook's earlier entries of the environments in ``entries`` by ``entries`` (other
    sources, such as the ceilings notes, stay); written whole beside the file, then renamed."""
    doc = ("Fastest attention kernel per attention type, dtype and call shape (query and key lengths; notebook "
           "05_attention), read by utils.optim.attention's 'best' mode.")
    environments = {e["environment_id"] for e in entries}
    kept = [e for e in read_table(path)
            if not (e.get("environment_id") in environments and e.get("source", "").startswith(BEST_SOURCE))]
    key = lambda e: (e.get("environment_id", ""), e["attention"], e["dtype"], *attn.entry_lengths(e))  # noqa: E731
    write_json_atomic(path, {"_doc": doc, "entries": sorted(kept + entries, key=key)})


# ---- the notebook's measurements: each stores its records and returns the table shown -----------------

PAIR_NOTE = "depth-1 real-width STDiT3 at CFG batch 2: "

VIDEO_NOTE = ("{steps} steps x one step (+ caption projections once, rewritten); decode measured whole or from its "
              "parts; encode from 01_baseline")


def transformer_rewrites(best_table: Path | str) -> dict[str, dict]:
    """The transformer rewrites measured here (``rewrites.MODEL_REWRITES``, in ``rewrites.REWRITES``' order
    with its options), the attention step reading its kernels from ``best_table``."""
    steps = {name: dict(options) for name, options in REWRITES.items() if name in MODEL_REWRITES}
    steps["attention"]["table"] = best_table
    return steps


def dtype_config(pipe: OpenSoraPipeline, setting: VideoSetting, threads: int, caption_length: int,
                 dtype: str) -> dict:
    """The config of a block-pair or real-model record: ``pipe`` (the shapes-only fp32 pipeline) at
    ``setting`` (``stages.record_config``) with the caption's valid tokens, run in ``dtype``."""
    return record_config(pipe, setting, threads, caption_length=caption_length) | {"dtype": dtype}


def shape_table(pipe: OpenSoraPipeline, setting: VideoSetting, caption_length: int) -> pd.DataFrame:
    """The block's attention calls at ``setting``, one row per type: batch, heads, query and key lengths,
    head dim, GFLOP of one call, and the caption's valid tokens."""
    _, _, shapes = attn.setting_shapes(pipe, setting)
    return pd.DataFrame([dict(attention=kind, batch=s.batch, heads=s.heads, q_len=s.q_len, k_len=s.k_len,
                              head_dim=s.head_dim, gflop=s.flops / 1e9)
                         for kind, s in shapes.items()]).assign(caption_tokens=caption_length)


def sdpa_dispatch(store: ResultsStore, dtypes, threads: int) -> pd.DataFrame:
    """Which aten op ``F.scaled_dot_product_attention`` runs per dtype and mask (``attention.sdpa_kernels``),
    stored as one record per op; returns the table (dtype, mask, kernel)."""
    kernels = pd.DataFrame(attn.sdpa_kernels([DTYPES[d] for d in dtypes]))
    store.add(*[Record(variant=row.kernel, stage="attention", metric="sdpa_kernel", unit="op", value=1,
                       config=make_config(dtype=row.dtype, threads=threads, mask=row.mask),
                       note="aten op under F.scaled_dot_product_attention, from torch.profiler")
                for row in kernels.itertuples()])
    return kernels


def _shape_list(shape: AttentionShape) -> list[int]:
    return [shape.batch, shape.heads, shape.q_len, shape.k_len, shape.head_dim]


def kernel_records(rows: list[dict], model: str, aspect_ratio: str, threads: int) -> list[Record]:
    """Records of ``run``'s rows: per case the analytic peak at the full shape, then either the skip (with
    its predicted seconds and reason) or the full-shape seconds (measured or derived, with the accuracy
    against float64) and the peak RSS increase at the measured shape."""
    records = []
    for row in rows:
        case = row["case"]
        config = make_config(model=model, resolution=case.resolution, aspect_ratio=aspect_ratio, frames=case.frames,
                             dtype=case.dtype, threads=threads, attention=case.kind, latent_frames=case.latent_frames,
                             tokens_per_frame=case.tokens_per_frame, tokens=case.latent_frames * case.tokens_per_frame,
                             caption_length=case.caption_length, shape=_shape_list(case.shape))
        records.append(Record(variant=case.variant, stage="attention", metric="predicted_peak_bytes", unit="B",
                              value=row["predicted_bytes"], kind="derived", config=config,
                              note="analytic transient memory of one call at the full shape"))
        if row["status"] == "skipped":
            records.append(Record(variant=case.variant, stage="attention", metric="skipped", unit="s",
                                  value=row["predicted_s"], kind="derived", config=config, note=row["reason"]))
            continue
        ran = config | {"measured_shape": _shape_list(row["measured_shape"])}
        records += [Record(variant=case.variant, stage="attention", metric="seconds", unit="s", value=row["seconds"],
                           kind="measured" if row["status"] == "measured" else "derived",
                           spread=row["timing"].spread(), config=ran, quality=row["accuracy"],
                           note=row["reason"] or "the model's output reshape included"),
                    Record(variant=case.variant, stage="attention", metric="peak_rss_increase_bytes", unit="B",
                           value=row["peak_increase_bytes"], config=ran, note="at the measured shape")]
    return records


def kernel_table(rows: list[dict]) -> pd.DataFrame:
    """``run``'s rows as a table: type, variant, dtype, setting, full shape, status, full-shape seconds,
    relative error against float64 and the peak MiB the call added."""
    table = []
    for row in rows:
        case, peak = row["case"], row["peak_increase_bytes"]
        table.append(dict(attention=case.kind, variant=case.variant, dtype=case.dtype, resolution=case.resolution,
                          frames=case.frames, batch=case.shape.batch, q_len=case.shape.q_len, k_len=case.shape.k_len,
                          status=row["status"], seconds=row["seconds"],
                          rel_error=row["accuracy"].get("rel_l2_error_vs_fp64"),
                          peak_mib=None if peak is None else peak / 2**20))
    return pd.DataFrame(table)


def kernel_benchmark(store: ResultsStore, cases: list[Case], policy: TimingPolicy, max_call_s: float, max_gib: float,
                     skip_s: float, chunk_mib: float, model: str, aspect_ratio: str) -> tuple[list[dict], pd.DataFrame]:
    """Measure ``cases`` (``run``) and store their records (``kernel_records``, threads from ``policy``).
    Returns ``run``'s rows (``best_kernels`` reads them) and their ``kernel_table``."""
    rows = list(run(cases, policy, max_call_s, max_gib, skip_s, chunk_mib))
    store.add(*kernel_records(rows, model, aspect_ratio, policy.threads))
    return rows, kernel_table(rows)


def reference_memory_wall(store: ResultsStore, pipe: OpenSoraPipeline, model: str, resolutions, aspect_ratio: str,
                          frame_counts, dtypes, budgets) -> pd.DataFrame:
    """The reference path's memory per setting, dtype and attention type (``reference_memory``), stored as
    derived records: a step's peak with the reference, the reference call's own peak and the step's peak
    with SDPA. Returns one row per (type, dtype, setting): tokens, the shape, attention and step GiB, and
    whether the step fits each of ``budgets`` GiB."""
    wall, records = [], []
    for resolution in resolutions:
        for frames in frame_counts:
            scaled = VideoSetting.create(resolution, aspect_ratio, frames)
            T, S, shapes = attn.setting_shapes(pipe, scaled)
            for dtype in dtypes:
                for kind, memory in reference_memory(pipe, shapes, T * S, DTYPES[dtype]).items():
                    config = make_config(model=model, resolution=resolution, aspect_ratio=aspect_ratio,
                                         frames=scaled.num_frames, dtype=dtype, attention=kind, latent_frames=T,
                                         tokens_per_frame=S, tokens=T * S, budgets=budgets)
                    records += [Record(variant="reference", stage="attention", metric="step_peak_bytes", unit="B",
                                       value=memory["total_bytes"], kind="derived", config=config,
                                       note=f"weights + block working set {memory['resident_bytes'] / GIB:.2f} GiB "
                                            "+ attention"),
                                Record(variant="reference", stage="attention", metric="attention_peak_bytes", unit="B",
                                       value=memory["attention_bytes"], kind="derived", config=config),
                                Record(variant="sdpa", stage="attention", metric="step_peak_bytes", unit="B",
                                       value=memory["sdpa_total_bytes"], kind="derived", config=config,
                                       note="the same step with SDPA (no score matrix)")]
                    wall.append(dict(attention=kind, dtype=dtype, resolution=resolution, frames=scaled.num_frames,
                                     tokens=T * S, shape=shapes[kind], attention_gib=memory["attention_bytes"] / GIB,
                                     step_gib=memory["total_bytes"] / GIB))
    store.add(*records)
    wall = pd.DataFrame(wall)
    for budget in budgets:
        wall[f"fits {budget} GiB"] = wall.step_gib <= budget
    return wall


def confirm_memory_wall(store: ResultsStore, wall: pd.DataFrame, budgets, confirm_gib: float, policy: TimingPolicy,
                        model: str, aspect_ratio: str) -> pd.Series:
    """Check the memory model on the smallest row of ``wall`` (``reference_memory_wall``) whose step exceeds
    the smallest budget (else the largest row): the reference run on the part of its call predicted to need
    ``confirm_gib`` (``confirm_reference_memory``), stored as the measured peak increase and the predictions
    for that part and for the whole call. Returns the comparison and the row checked."""
    over = wall[wall.step_gib > min(budgets)].sort_values("step_gib")
    target = over.iloc[0] if len(over) else wall.sort_values("step_gib").iloc[-1]
    confirm = confirm_reference_memory(target["shape"], DTYPES[target["dtype"]], confirm_gib, policy)
    config = make_config(model=model, resolution=target["resolution"], aspect_ratio=aspect_ratio,
                         frames=int(target["frames"]), dtype=target["dtype"], threads=policy.threads,
                         attention=target["attention"], tokens=int(target["tokens"]), fraction=confirm["fraction"],
                         exceeds_budget=bool(len(over)))
    store.add(Record(variant="reference", stage="attention", metric="confirm_peak_increase_bytes", unit="B",
                     value=confirm["measured_bytes"], config=config,
                     note=f"reference run on {confirm['fraction']:.3g} of the call; prediction for that part "
                          f"{confirm['predicted_bytes'] / GIB:.3f} GiB"),
              Record(variant="reference", stage="attention", metric="confirm_predicted_bytes", unit="B",
                     value=confirm["predicted_bytes"], kind="derived", config=config),
              Record(variant="reference", stage="attention", metric="confirm_full_predicted_bytes", unit="B",
                     value=confirm["full_predicted_bytes"], kind="derived", config=config))
    return pd.Series({k: v for k, v in confirm.items() if k != "part"} | dict(target.drop("shape")))


def best_kernels(store: ResultsStore, rows: list[dict], path: Path | str, model: str, threads: int) -> pd.DataFrame:
    """The fastest kernel per type, dtype and call shape among ``kernel_benchmark``'s rows (``best_entries``),
    written to the table at ``path`` (``store_best_table``) and stored as derived records (the winner's
    seconds, every candidate's in the note). Returns the entries (type, dtype, query and key lengths, best,
    seconds per kernel)."""
    entries = best_entries(rows, store.environment_id, threads)
    store_best_table(entries, path)
    store.add(*[Record(variant=entry["best"], stage="attention", metric="best_kernel_seconds", unit="s",
                       value=entry["seconds"][entry["best"]], kind="derived",
                       config=make_config(model=model, dtype=entry["dtype"], threads=threads,
                                          attention=entry["attention"], query_length=entry["query_length"],
                                          key_length=entry["key_length"], settings=entry["settings"]),
                       note="; ".join(f"{k} {v:.4g} s" for k, v in entry["seconds"].items()))
                for entry in entries])
    return pd.DataFrame(entries, columns=["attention", "dtype", "query_length", "key_length", "best", "seconds"])


def block_pair_rewrites(store: ResultsStore, pipe: OpenSoraPipeline, setting: VideoSetting, y: torch.Tensor,
                        mask: torch.Tensor, steps: dict[str, dict], dtypes, policy: TimingPolicy) -> pd.DataFrame:
    """Per dtype, the block pair (``pair_model``) as it is, with each of ``steps`` alone and with all of them,
    each timed with its peak RSS increase (``measure_with_memory``) and its output compared with the
    baseline's; the module groups of the baseline and of all rewrites profiled (``group_breakdown``). Each
    is stored as it is measured. Returns one row per (dtype, variant): median and IQR seconds, whether the
    machine was quiet, the added peak MiB, the differences from the baseline and the ratio to it."""
    variants = {"baseline": {}} | {name: {name: options} for name, options in steps.items()} | {"all": steps}
    depth = pipe.transformer.config.depth
    table = []
    for dtype in dtypes:
        config = dtype_config(pipe, setting, policy.threads, int(mask.sum()), dtype)
        args, kwargs = pair_inputs(pipe, setting, y, mask, DTYPES[dtype])
        expected = None
        for variant, chosen in variants.items():
            pair = rewrite_model(pair_model(pipe, DTYPES[dtype]), chosen)
            timing, increase = measure_with_memory(pair, *args, policy=policy, **kwargs)
            expected = timing.result if expected is None else expected
            parity = compare(timing.result, expected)
            record = timing_record(variant, "denoise", timing, config, metric="block_pair_seconds",
                                   note=PAIR_NOTE + (", ".join(chosen) or "baseline"))
            record.quality = parity
            store.add(record, Record(variant=variant, stage="denoise", metric="block_pair_peak_rss_increase_bytes",
                                     unit="B", value=increase, config=config))
            if variant in ("baseline", "all"):
                store.add(*[Record(variant=variant, stage="denoise", metric="pair_group_ms", unit="ms", value=ms,
                                   config=config | {"group": group, "depth": depth},
                                   note="inclusive CPU time under profiler labels; other = profiled call - groups")
                            for group, ms in group_breakdown(pair, args, kwargs).items()])
            table.append(dict(dtype=dtype, variant=variant, median_s=timing.median_s, iqr_s=timing.iqr_s,
                              quiet=timing.quiet, peak_increase_mib=increase / 2**20, **parity))
            del pair, timing  # the next variant's copy is built without this one
    table = pd.DataFrame(table)
    return table.assign(ratio=table.median_s / table.groupby("dtype").median_s.transform("first"))


def temporal_layout_copies(store: ResultsStore, pipe: OpenSoraPipeline, setting: VideoSetting, caption_length: int,
                           dtypes, policy: TimingPolicy) -> pd.DataFrame:
    """Per dtype, the two activation copies a temporal block makes to change layout ((T S) -> (S T) and
    back) timed at ``setting``, stored per block (measured) and per step (x the temporal blocks, derived).
    Returns one row per dtype: seconds per block and per step."""
    latent_frames, tokens_per_frame, _ = attn.setting_shapes(pipe, setting)
    cfg = pipe.transformer.config
    table = []
    for dtype in dtypes:
        config = dtype_config(pipe, setting, policy.threads, caption_length, dtype)
        hidden = torch.randn(2, latent_frames * tokens_per_frame, cfg.hidden_size).to(DTYPES[dtype])
        layout = measure(lambda: rearrange(rearrange(hidden, "B (T S) C -> (B S) T C", T=latent_frames),
                                           "(B S) T C -> B (T S) C", T=latent_frames, S=tokens_per_frame),
                         policy=policy)
        store.add(timing_record("temporal_layout", "denoise", layout, config, metric="layout_seconds_per_block",
                                note="the two activation copies of a temporal block: (T S) -> (S T) and back"),
                  Record(variant="temporal_layout", stage="denoise", metric="layout_seconds_per_step", unit="s",
                         value=layout.median_s * cfg.depth, kind="derived", config=config,
                         note=f"x {cfg.depth} temporal blocks"))
        table.append(dict(dtype=dtype, seconds_per_block=layout.median_s, seconds_per_step=layout.median_s * cfg.depth))
    return pd.DataFrame(table)


def baseline_encode_seconds(store: ResultsStore) -> float | None:
    """The prompt encoding's seconds per video that notebook ``01_baseline`` stored on this machine (T5 is
    untouched by the rewrites), or None before it has run."""
    return value_of(baseline_rows(environment_records(store.root, store.environment_id)),
                    stage="encode_prompt", metric="video_seconds")


def video_total(seconds: dict[str, float | None]) -> float:
    """A video's seconds from its stages' (a stage without a value counts nothing)."""
    return sum(s for s in seconds.values() if s is not None)


def end_to_end_records(step: dict, decode: dict, video: dict[str, dict], config: dict, steps: int) -> list[Record]:
    """Records of one dtype's real-model comparison: the caption projections (``compare_step``), per variant
    the step's seconds (with its difference from the baseline's latents) and peaks, the decode parts'
    seconds (with their differences from the baseline's parts) and peaks, the whole decode where measured,
    the derived video seconds per stage (``video``: variant -> stage -> seconds) and in total; the rewritten
    / baseline video ratio; and the 2D decoder per micro-batch size (``compare_decode``)."""
    records = [timing_record("rewritten", "denoise", step["projection"], config, metric="caption_projection_seconds",
                             note="the projections cache_text_kv computes once per video instead of every step")]
    for variant in ("baseline", "rewritten"):
        step_record = timing_record(variant, "denoise", step[variant], config, metric="seconds_per_step",
                                    note="one CFG step of the real-size transformer")
        step_record.quality = compare(step[variant].result, step["baseline"].result)
        records += [step_record,
                    Record(variant=variant, stage="denoise", metric="peak_rss_bytes", unit="B",
                           value=step[variant].peak_rss_bytes, config=config),
                    Record(variant=variant, stage="denoise", metric="peak_rss_increase_bytes", unit="B",
                           value=step[f"{variant}_increase"], config=config)]
        for part in ("temporal_chunk", "spatial_batch"):
            timing = decode["parts"][variant][part]
            part_config = config | {"part": part, "frames_per_batch": decode["parts"][variant]["frames_per_batch"]}
            part_record = timing_record(variant, "decode", timing, part_config, metric="part_seconds")
            part_record.quality = compare(timing.result, decode["parts"]["baseline"][part].result)
            records += [part_record, Record(variant=variant, stage="decode", metric="part_peak_rss_bytes", unit="B",
                                            value=timing.peak_rss_bytes, config=config | {"part": part})]
        if decode["full"][variant] is not None:
            records.append(timing_record(variant, "decode", decode["full"][variant], config, metric="seconds"))
        records += [Record(variant=variant, stage=stage, metric="video_seconds", unit="s", value=seconds,
                           kind="derived", config=config, note=VIDEO_NOTE.format(steps=steps))
                    for stage, seconds in video[variant].items() if seconds is not None]
        records.append(Record(variant=variant, stage="total", metric="video_seconds", unit="s", kind="derived",
                              value=video_total(video[variant]), config=config,
                              note=" + ".join(s for s, v in video[variant].items() if v is not None)))
    records.append(Record(variant="rewritten", stage="total", metric="video_ratio", unit="x", kind="derived",
                          value=video_total(video["rewritten"]) / video_total(video["baseline"]), config=config,
                          note="rewritten / baseline derived video seconds, measured in one run"))
    for size, result in decode["micro"].items():
        records += [timing_record("rewritten", "decode", result["timing"], config | {"micro_batch": size},
                                  metric="seconds_per_micro_batch"),
                    Record(variant="rewritten", stage="decode", metric="micro_batch_peak_rss_increase_bytes", unit="B",
                           value=result["peak_increase_bytes"], config=config | {"micro_batch": size})]
    return records


def _end_to_end_in(dtype: str, store: ResultsStore, pipe: OpenSoraPipeline, setting: VideoSetting, y: torch.Tensor,
                   mask: torch.Tensor, transformer_steps: dict, vae_steps: dict, micro_batch_sizes,
                   policy: TimingPolicy, full_decode: bool, encode: float | None) -> list[dict]:
    """``end_to_end`` in one dtype (its models and outputs are freed on return); returns its table rows."""
    run_pipe = load_pipeline(pipe.preset, weights="random", dtype=dtype, load=("transformer",))
    step = compare_step(run_pipe, setting, y, mask, transformer_steps, policy)
    run_pipe.release("transformer")
    run_pipe.load("vae")
    latent_frames = attn.setting_shapes(pipe, setting)[0]
    decode = compare_decode(run_pipe, step["baseline"].result, setting, latent_frames, vae_steps, micro_batch_sizes,
                            policy, full_decode=full_decode)
    run_pipe.release("vae")
    config = dtype_config(pipe, setting, policy.threads, int(mask.sum()), dtype) | {
        "rewrites": step["description"] + ", " + describe(vae_steps)}
    video = {variant: {"encode_prompt": encode, "decode": decode["video"][variant],
                       "denoise": setting.steps * step[variant].median_s
                       + (step["projection"].median_s if variant == "rewritten" else 0)}
             for variant in ("baseline", "rewritten")}
    store.add(*end_to_end_records(step, decode, video, config, setting.steps))
    ratio = video_total(video["rewritten"]) / video_total(video["baseline"])
    return [dict(dtype=dtype, stage=stage, baseline_s=video["baseline"][stage], rewritten_s=video["rewritten"][stage])
            for stage in ("denoise", "decode")] + [dict(dtype=dtype, stage="video", ratio_measured_in_one_run=ratio)]


def end_to_end(store: ResultsStore, pipe: OpenSoraPipeline, setting: VideoSetting, y: torch.Tensor, mask: torch.Tensor,
               transformer_steps: dict, vae_steps: dict, dtypes, micro_batch_sizes, policy: TimingPolicy,
               full_decode: bool = False) -> pd.DataFrame:
    """Per dtype, the real-size model of ``pipe``'s preset (random weights) as it is and rewritten, in one
    process: one denoising step (``compare_step``, ``transformer_steps``), then the decode's parts and the
    2D decoder per micro-batch size (``compare_decode``, ``vae_steps``; the whole decode too with
    ``full_decode``), a video of ``setting.steps`` steps derived from them with the prompt encoding of
    ``01_baseline`` (``baseline_encode_seconds``); stored per dtype (``end_to_end_records``). Returns the
    denoise and decode seconds per video, baseline and rewritten, with their ratio, and the whole video's
    ratio (``ratio_measured_in_one_run``)."""
    encode = baseline_encode_seconds(store)
    table = pd.DataFrame([row for dtype in dtypes
                          for row in _end_to_end_in(dtype, store, pipe, setting, y, mask, transformer_steps, vae_steps,
                                                    micro_batch_sizes, policy, full_decode, encode)])
    return table.assign(ratio=table.rewritten_s / table.baseline_s)


# ---- the faithful cross-attention against upstream's own formulation -----------------------------------

def _upstream_encode_caption(model: STDiT3):
    """Upstream's caption path: every one of the 300 tokens through the caption projection, the key mask kept
    (``STDiT3.forward``: ``y_embedder`` then ``masked_select`` of the valid tokens in the cross-attention)."""
    def encode_caption(y, mask):
        B = y.shape[0]
        return model.y_embedder(y.squeeze(1)), mask.repeat(B // mask.shape[0], 1).bool()
    return encode_caption


def _upstream_cross_attention(module):
    """Upstream's ``MultiHeadCrossAttention``: the valid caption tokens of all samples packed into one
    sequence, one K/V projection over it, then each sample's queries against its own keys (xformers'
    ``BlockDiagonalMask``; here one SDPA call per sample, the same maths)."""
    def forward(x, y, key_mask):
        B, N, C = x.shape
        H, D = module.num_heads, module.head_dim
        lengths = key_mask.sum(1).tolist()
        q = module.q_linear(x).view(B, N, H, D).transpose(1, 2)  # [B, H, N, D]
        kv = module.kv_linear(y[key_mask]).view(-1, 2, H, D)  # [sum of lengths, 2, H, D]
        out = torch.empty_like(q)
        for b, (k, v) in enumerate(zip(kv[:, 0].split(lengths), kv[:, 1].split(lengths))):
            out[b:b + 1] = F.scaled_dot_product_attention(q[b:b + 1], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
        return module.proj(out.transpose(1, 2).reshape(B, N, C))
    return forward


class upstream_formulation:
    """Within the block, ``model`` runs its caption path as upstream does (``_upstream_encode_caption``,
    ``_upstream_cross_attention``); the model's own methods come back on exit."""

    def __init__(self, model: STDiT3):
        self.model = model
        self.modules = [block.cross_attn for block in (*model.spatial_blocks, *model.temporal_blocks)]

    def __enter__(self):
        self.model.encode_caption = _upstream_encode_caption(self.model)
        for module in self.modules:
            module.forward = _upstream_cross_attention(module)
        return self.model

    def __exit__(self, *exc):
        del self.model.encode_caption
        for module in self.modules:
            del module.forward


UPSTREAM_CHECK_NOTE = ("one CFG transformer call, this study's faithful cross-attention (valid caption tokens, "
                       "batched) and upstream's formulation (all 300 tokens projected, valid ones packed, one "
                       "attention per sample) alternated in one process, same random weights and inputs")


def upstream_formulation_check(store: ResultsStore, pipe: OpenSoraPipeline, setting: VideoSetting, y: torch.Tensor,
                               mask: torch.Tensor, dtypes, rounds: int, threads: int) -> pd.DataFrame:
    """Per dtype, the real-size transformer (random weights) called at ``setting`` (CFG batch 2) with its own
    cross-attention and with upstream's formulation (``upstream_formulation``), alternated for ``rounds``
    rounds after one warm-up call each (A B A B ...: a slow spell falls on both), the outputs compared.
    Stores per variant the median with every call's seconds, and the ratio with the verdict of the comparison
    protocol (``utils.measure.compare.verdict`` over the calls). Returns one row per dtype."""
    rows = []
    for dtype in dtypes:
        model = load_pipeline(pipe.preset, weights="random", dtype=dtype, load=("transformer",)).transformer
        args, kwargs = pair_inputs(pipe, setting, y, mask, DTYPES[dtype])
        seconds: dict[str, list[float]] = {"faithful": [], "upstream": []}
        outputs = {}
        with torch.inference_mode():
            for round_ in tqdm(range(rounds + 1), desc=f"faithful vs upstream cross-attention, {dtype}", unit="round"):
                for variant in seconds:
                    with upstream_formulation(model) if variant == "upstream" else contextlib.nullcontext():
                        start = time.perf_counter()
                        outputs[variant] = model(*args, **kwargs)
                        if round_ > 0:  # round 0 warms both up
                            seconds[variant].append(time.perf_counter() - start)
        del model
        return_freed_memory()
        spreads = {variant: Spread.of(values) for variant, values in seconds.items()}
        judged = verdict(spreads["upstream"], spreads["faithful"])
        difference = compare(outputs["faithful"], outputs["upstream"])
        config = dtype_config(pipe, setting, threads, int(mask.sum()), dtype) | {"experiment": "upstream_formulation"}
        store.add(*[Record(variant=variant, stage="denoise", metric="transformer_call_seconds", unit="s",
                           value=spread.median, spread=spread.as_dict(), config=config, note=UPSTREAM_CHECK_NOTE)
                    for variant, spread in spreads.items()],
                  Record(variant="faithful", stage="denoise", metric="ratio_vs_upstream_formulation", unit="x",
                         value=judged["ratio"], kind="derived", config=config, quality=judged | difference,
                         note=f"faithful / upstream seconds per call; {judged['verdict']}"))
        rows.append(dict(dtype=dtype, faithful_s=spreads["faithful"].median, upstream_s=spreads["upstream"].median,
                         faithful_range=(spreads["faithful"].low, spreads["faithful"].high),
                         upstream_range=(spreads["upstream"].low, spreads["upstream"].high), ratio=judged["ratio"],
                         verdict=judged["verdict"], rel_l2_diff=difference["rel_l2_diff"]))
    return pd.DataFrame(rows)


# ---- the end-to-end step under the comparison protocol --------------------------------------------------

def step_between_processes(store: ResultsStore, pipe: OpenSoraPipeline, setting: VideoSetting, y: torch.Tensor,
                           mask: torch.Tensor, transformer_steps: dict, dtypes, processes: int, policy: TimingPolicy,
                           inputs: Path) -> pd.DataFrame:
    """Per dtype, one denoising step of the real-size transformer (random weights) as it is and with
    ``transformer_steps``, each in ``processes`` fresh processes run interleaved (the comparison protocol,
    ``variant_runs.run_compared``; the caption ``y``/``mask`` saved to ``inputs`` for the children). Stores each
    variant's step (every process's median) and the speed-up with its verdict. Returns one row per dtype."""
    from utils.experiments.variant_runs import experiment_config, ratio_records, run_compared, stage_records

    inputs.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"y": y.float(), "mask": mask}, inputs)
    base = dict(model=pipe.preset, resolution=setting.resolution, aspect_ratio=setting.aspect_ratio,
                num_frames=setting.num_frames, steps=setting.steps, prompt="", stages=["denoise"], inputs=str(inputs),
                **policy.to_spec())
    rows = []
    for dtype in dtypes:
        precision = {"bf16": {}} if dtype == "bf16" else {}
        runs = {variant: ("stages", {}, base | dict(optimizations=precision | steps))
                for variant, steps in (("baseline", {}), ("rewritten", transformer_steps))}
        results = run_compared(runs, processes, f"step between processes, {dtype}")

        def config_of(variant, results=results):
            return experiment_config(results[variant], "step_protocol")

        for variant, result in results.items():
            store.add(*stage_records(result, variant, config_of(variant), setting.steps))
        speedups = ratio_records(results, "baseline", lambda v: v, "step_speedup", config_of,
                                 "baseline median / rewritten median, fresh processes run interleaved")
        store.add(*speedups)
        judged = next(r for r in speedups if r.variant == "rewritten")
        rows.append(dict(dtype=dtype, speedup=judged.value, verdict=judged.quality.get("verdict"),
                         baseline=judged.spread["baseline"]["per_process"],
                         rewritten=judged.spread["variant"]["per_process"]))
    return pd.DataFrame(rows)
