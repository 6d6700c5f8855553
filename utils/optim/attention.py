"""Attention kernels of the STDiT3 blocks, one switch per attention type, and their memory model.

Shapes as the model calls them: q, k, v [batch, heads, length, head_dim]; at CFG batch 2,
- spatial: 2T sequences of the S tokens of one frame;
- temporal: 2S sequences of the T latent frames (RoPE already applied to q and k);
- cross: 2 samples, N = T*S queries against the caption's valid tokens (the model drops the padding of
  the 300-token caption first, ``utils.model.stdit3.valid_caption``); a key mask [B, 1, 1, L] (True =
  attend) only where the samples' caption lengths differ.

Kernels (the same maths at different cost):
- ``reference``: upstream's non-flash path, ``softmax((q * scale) @ k^T)`` with the softmax in fp32, cast
  back, ``@ v``. It holds the whole [B, H, Lq, Lk] score matrix twice (scores and probabilities, fp32).
- ``sdpa``: ``F.scaled_dot_product_attention``, the baseline. On CPU it runs
  ``aten::_scaled_dot_product_flash_attention_for_cpu`` (blockwise, no Lq x Lk matrix); ``sdpa_kernels()``
  reads which op runs for each dtype and mask from the profiler.
- ``chunked``: the reference maths over blocks of (batch, query rows), at most ``chunk_mib`` of scores
  at a time: the explicit path with bounded memory.
- ``bmm``: the reference maths as flat batched matmuls, scale in the matmul, softmax in place: for short
  sequences, where SDPA's blocked kernel spends its time on per-block overhead (x86 notes: 1.5-2x slower
  at 15 frames).
Cross-attention only: ``packed``, each sample against its own attended keys without a mask, one call per
sample (upstream's xformers block-diagonal formulation, as a loop).
``best`` picks, per call, the kernel measured fastest for the attention type and dtype at the nearest
measured shape (query and key lengths; ``data/attention_best.json``).

A query whose keys are all masked gets a zero output in every variant: torch SDPA's CPU kernel does
this (checked in the tests), as xformers does for an empty block; upstream never meets it, because T5
always emits the EOS token.
"""
from __future__ import annotations

import functools
import math
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.fingerprint import fingerprint
from utils.io import nearest_environment, read_table
from utils.model.dtypes import dtype_name
from utils.paths import DATA

KINDS = ("spatial", "temporal", "cross")

KERNELS = ("reference", "sdpa", "chunked", "bmm")

CROSS_ONLY = ("packed",)

CHOICES = {kind: KERNELS + (CROSS_ONLY if kind == "cross" else ()) + ("best",) for kind in KINDS}

BEST_CANDIDATES = ("sdpa", "bmm", "chunked")  # kernels "best" chooses from (reference is the fidelity yardstick)

BEST_TABLE = DATA / "attention_best.json"

DEFAULT_CHUNK_MIB = 64

BEST_MAX_SCORES_MIB = 1024  # "best" never runs a kernel holding the score matrix when it would pass this



# ---- masks --------------------------------------------------------------------------------------------

def _as_4d(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a boolean mask (True = attend), got {attn_mask.dtype}")
    while attn_mask.dim() < 4:
        attn_mask = attn_mask[None]
    return attn_mask


def _zero_rows_without_keys(out: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the query rows whose keys are all masked (their softmax was NaN), as torch SDPA on CPU does."""
    if attn_mask is None:
        return out
    has_key = attn_mask.any(-1, keepdim=True)  # [B|1, H|1, Lq|1, 1]
    return out if bool(has_key.all()) else out.masked_fill(~has_key, 0.0)


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    """[B, H, Lq, D] laid out as [B, Lq, H, D], like SDPA's output, so the model's reshape is free."""
    B, H, Lq, D = q.shape
    return q.new_empty(B, Lq, H, D).transpose(1, 2)


# ---- kernels ------------------------------------------------------------------------------------------

def reference(q, k, v, attn_mask=None):
    """Upstream's non-flash ``Attention``: scale q, q @ k^T, softmax in fp32, back to q's dtype, @ v."""
    attn_mask = _as_4d(attn_mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, Lq, Lk] in q's dtype
    scores = scores.float()  # upstream: "translate attn to float32" before the softmax
    if attn_mask is not None:
        scores.masked_fill_(~attn_mask, float("-inf"))
    probs = scores.softmax(-1).to(q.dtype)
    return _zero_rows_without_keys(probs @ v, attn_mask)  # [B, H, Lq, D]


def sdpa(q, k, v, attn_mask=None):
    """torch's fused kernel: on CPU ``_scaled_dot_product_flash_attention_for_cpu`` (see ``sdpa_kernels``)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def chunked(q, k, v, attn_mask=None, chunk_mib: float = DEFAULT_CHUNK_MIB):
    """The reference maths over blocks of (batch, query rows) holding at most ``chunk_mib`` MiB of fp32
    scores and probabilities (8 bytes per score) at a time."""
    attn_mask = _as_4d(attn_mask)
    B, H, Lq, _ = q.shape
    rows = max(1, int(chunk_mib * 2**20) // (8 * H * k.shape[-2]))  # query rows per chunk, over samples
    q_block = min(Lq, rows)
    b_block = max(1, min(B, rows // Lq)) if q_block == Lq else 1
    out = _empty_output(q)
    for b0 in range(0, B, b_block):
        for q0 in range(0, Lq, q_block):
            mask = None
            if attn_mask is not None:
                mask = attn_mask[b0:b0 + b_block] if attn_mask.shape[0] > 1 else attn_mask
                mask = mask[:, :, q0:q0 + q_block] if mask.shape[2] > 1 else mask
            out[b0:b0 + b_block, :, q0:q0 + q_block] = reference(
                q[b0:b0 + b_block, :, q0:q0 + q_block], k[b0:b0 + b_block], v[b0:b0 + b_block], mask)
    return out


def bmm(q, k, v, attn_mask=None):
    """The reference maths as [B*H, L, D] batched matmuls: the scale applied by the matmul (no scaled
    copy of q), the softmax computed in place (in fp32 internally for bf16, rounded once)."""
    attn_mask = _as_4d(attn_mask)
    B, H, Lq, D = q.shape
    Lk = k.shape[-2]
    scores = torch.baddbmm(q.new_empty(1, 1, 1), q.reshape(B * H, Lq, D), k.reshape(B * H, Lk, D).transpose(1, 2),
                           beta=0, alpha=D**-0.5)  # [BH, Lq, Lk]; beta=0 ignores the (empty) input
    if attn_mask is not None:
        scores.view(B, H, Lq, Lk).masked_fill_(~attn_mask, float("-inf"))
    torch.softmax(scores, -1, out=scores)
    out = torch.bmm(scores, v.reshape(B * H, Lk, D)).view(B, H, Lq, D)
    return _zero_rows_without_keys(out, attn_mask)


KERNEL_FUNCTIONS = {"reference": reference, "sdpa": sdpa, "chunked": chunked, "bmm": bmm}


# ---- cross-attention: one call per sample ---------------------------------------------------------------

def packed(q, k, v, attn_mask=None):
    """Each sample against its own attended keys, no mask: upstream's block-diagonal (xformers) maths."""
    attn_mask = _as_4d(attn_mask)
    if attn_mask is None:
        return sdpa(q, k, v)
    if attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
        raise ValueError(f"packed attention needs a key-padding mask [B, 1, 1, L], got {list(attn_mask.shape)}")
    keep = attn_mask.expand(q.shape[0], 1, 1, -1)[:, 0, 0]  # [B, Lk]
    out = _empty_output(q)
    for b in range(q.shape[0]):
        index = keep[b].nonzero().squeeze(1)
        if len(index) == 0:
            out[b].zero_()
            continue
        if int(index[-1]) + 1 == len(index):  # a prefix (right-padded caption): a view, no copy
            kb, vb = k[b:b + 1, :, :len(index)], v[b:b + 1, :, :len(index)]
        else:
            kb, vb = k[b:b + 1].index_select(2, index), v[b:b + 1].index_select(2, index)
        out[b:b + 1] = sdpa(q[b:b + 1], kb, vb)
    return out


# ---- "best": the fastest measured kernel per type, dtype and shape ------------------------------------

def load_best_table(path: Path | str = BEST_TABLE) -> list[dict]:
    return read_table(path)


@functools.cache
def _this_environment() -> str:
    return fingerprint()["environment_id"]


def entry_lengths(entry: dict) -> tuple[int, int]:
    """(query length, key length) of a table entry; an entry of a self-attention or from the ceilings notes
    may state only its key length or its ``shape`` [batch, heads, queries, keys, head_dim]."""
    if "query_length" in entry:
        return entry["query_length"], entry["key_length"]
    if "shape" in entry:
        return entry["shape"][2], entry["shape"][3]
    return entry["key_length"], entry["key_length"]


def best_kernel(entries: list[dict], kind: str, dtype: torch.dtype, query_length: int, key_length: int,
                environment_id: str | None = None, arch: str | None = None) -> str:
    """The ``best`` of the entry for (``kind``, ``dtype``) measured at the shape nearest (``query_length``,
    ``key_length``) (sum of the log distances): this environment's entries if there are any, else the same
    architecture's, else any; "sdpa" if none."""
    matches = [e for e in entries if e["attention"] == kind and e["dtype"] == dtype_name(dtype)]
    matches = nearest_environment(matches, environment_id, arch)
    if not matches:
        return "sdpa"

    def distance(entry):
        q, k = entry_lengths(entry)
        return abs(math.log(q / max(query_length, 1))) + abs(math.log(k / max(key_length, 1)))

    return min(matches, key=distance)["best"]


def best_attention(kind: str, entries: list[dict], chunk_mib: float = DEFAULT_CHUNK_MIB,
                   max_scores_mib: float = BEST_MAX_SCORES_MIB):
    """An attention function choosing its kernel per call from ``entries``. A kernel that holds the score
    matrix is replaced by SDPA when the scores would pass ``max_scores_mib``. ``.choices`` records
    (dtype, query length, key length) -> kernel as chosen."""
    environment, arch = _this_environment(), platform.machine()
    choices: dict[tuple, str] = {}

    def attention(q, k, v, attn_mask=None):
        key = (dtype_name(q.dtype), q.shape[-2], k.shape[-2])
        if key not in choices:
            choices[key] = best_kernel(entries, kind, q.dtype, q.shape[-2], k.shape[-2], environment, arch)
        name = choices[key]
        if name == "bmm" and 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[-2] > max_scores_mib * 2**20:
            name = "sdpa"
        if name == "chunked":
            return chunked(q, k, v, attn_mask, chunk_mib=chunk_mib)
        return KERNEL_FUNCTIONS[name](q, k, v, attn_mask)

    attention.choices = choices
    return attention


# ---- the switch ---------------------------------------------------------------------------------------

def attention_function(kind: str, choice: str, chunk_mib: float = DEFAULT_CHUNK_MIB, table=BEST_TABLE):
    """The function for ``choice`` (see ``CHOICES[kind]``); None for "sdpa", the model's own default."""
    if kind not in CHOICES:
        raise ValueError(f"unknown attention type {kind!r}; accepted: {', '.join(KINDS)}")
    if choice not in CHOICES[kind]:
        raise ValueError(f"unknown {kind} attention {choice!r}; accepted: {', '.join(CHOICES[kind])}")
    if choice == "sdpa":
        return None
    if choice == "best":
        return best_attention(kind, load_best_table(table), chunk_mib=chunk_mib)
    if choice == "chunked":
        return functools.partial(chunked, chunk_mib=chunk_mib)
    if choice == "packed":
        return packed
    return KERNEL_FUNCTIONS[choice]


def set_attention(model, spatial: str = "sdpa", temporal: str = "sdpa", cross: str = "sdpa",
                  chunk_mib: float = DEFAULT_CHUNK_MIB, table=BEST_TABLE):
    """Give every attention module of an STDiT3 ``model`` the chosen function (no parameter changes;
    "sdpa" restores the model's own default, the baseline). Returns the model."""
    functions = {kind: attention_function(kind, choice, chunk_mib, table)
                 for kind, choice in (("spatial", spatial), ("temporal", temporal), ("cross", cross))}
    for blocks, kind in ((model.spatial_blocks, "spatial"), (model.temporal_blocks, "temporal")):
        for block in blocks:
            for module, function in ((block.attn, functions[kind]), (block.cross_attn, functions["cross"])):
                if function is None:
                    module.__dict__.pop("attention", None)
                else:
                    module.attention = function
    return model


def apply_attention(pipe, spatial: str = "best", temporal: str = "best", cross: str = "best",
                    chunk_mib: float = DEFAULT_CHUNK_MIB, table: str | None = None):
    """The attention kernel of each attention type of the transformer (see ``CHOICES``; ``table``: the
    "best" table, default ``data/attention_best.json``). Exact within rounding; works on a released
    transformer too (it sets functions, not weights)."""
    set_attention(pipe.transformer, spatial, temporal, cross, chunk_mib, table or BEST_TABLE)
    return pipe


# ---- which SDPA kernel runs -----------------------------------------------------------------------------

def sdpa_kernels(dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:
    """The aten ops SDPA dispatches to on this machine for each dtype, without a mask, with a boolean
    key mask and with an additive float mask (read from the profiler on small tensors)."""
    rows = []
    for dtype in dtypes:
        q = torch.randn(2, 4, 33, 72, dtype=dtype)
        k, v = torch.randn(2, 4, 17, 72, dtype=dtype), torch.randn(2, 4, 17, 72, dtype=dtype)
        keys = torch.arange(17) < torch.tensor([[17], [9]])  # [2, 17]
        additive = torch.zeros(2, 1, 1, 17, dtype=dtype).masked_fill(~keys[:, None, None], -math.inf)
        masks = {"none": None, "bool key mask": keys[:, None, None], "float additive mask": additive}
        for mask_name, mask in masks.items():
            with torch.profiler.profile() as prof:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            ops = sorted({e.key for e in prof.key_averages()
                          if e.key.startswith("aten::_scaled_dot_product") or e.key.startswith("aten::_flash")})
            rows.append(dict(dtype=dtype_name(dtype), mask=mask_name, kernel=", ".join(ops) or "(none recorded)"))
    return rows


# ---- shapes and the memory model ----------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionShape:
    """One attention call: ``batch`` sequences x ``heads`` of ``q_len`` queries against ``k_len`` keys."""

    kind: str
    batch: int
    q_len: int
    k_len: int
    heads: int = 16
    head_dim: int = 72

    @property
    def flops(self) -> int:
        return 4 * self.batch * self.heads * self.q_len * self.k_len * self.head_dim

    @property
    def scores(self) -> int:
        return self.batch * self.heads * self.q_len * self.k_len

    def scaled(self, fraction: float) -> "AttentionShape":
        """The same call on a ``fraction`` of the work: fewer sequences, or (cross) fewer queries."""
        if self.kind == "cross":
            return replace(self, q_len=max(1, int(self.q_len * fraction)))
        return replace(self, batch=max(1, int(self.batch * fraction)))


def model_shapes(latent_frames: int, tokens_per_frame: int, heads: int = 16, head_dim: int = 72,
                 caption_tokens: int = 300, batch: int = 2) -> dict[str, AttentionShape]:
    """The three attention calls of one block at CFG batch ``batch`` (2: prompt and null caption)."""
    T, S = latent_frames, tokens_per_frame
    return {"spatial": AttentionShape("spatial", batch * T, S, S, heads, head_dim),
            "temporal": AttentionShape("temporal", batch * S, T, T, heads, head_dim),
            "cross": AttentionShape("cross", batch, T * S, caption_tokens, heads, head_dim)}


def setting_shapes(pipe, setting, caption_tokens: int | None = None) -> tuple[int, int, dict[str, AttentionShape]]:
    """(latent frames T, tokens per frame S, the block's attention shapes) of ``pipe`` at ``setting``, the
    cross-attention against ``caption_tokens`` valid caption tokens (default: the model's max length, the
    most a caption can have)."""
    cfg = pipe.transformer.config
    t, h, w = pipe.latent_size(setting)
    pt, ph, pw = cfg.patch_size
    T, S = -(-t // pt), -(-h // ph) * -(-w // pw)
    return T, S, model_shapes(T, S, cfg.num_heads, cfg.head_dim, caption_tokens or cfg.model_max_length)


def peak_bytes(kernel: str, shape: AttentionShape, dtype: torch.dtype, chunk_mib: float = DEFAULT_CHUNK_MIB) -> int:
    """Analytic transient memory of one call beyond its inputs. ``reference`` holds fp32 scores and
    probabilities together (8 bytes per score; in bf16 the bf16 scores and their fp32 copy, 6 bytes, come
    first), plus the scaled q and the output; ``bmm`` holds the scores once in the input dtype, plus
    contiguous copies of k and v and the output; ``chunked`` one chunk; SDPA (and the cross key handlings
    over it) little more than its output."""
    item = dtype.itemsize
    per_query = shape.batch * shape.heads * shape.head_dim * item
    output = shape.q_len * per_query
    if kernel == "reference":
        return 8 * shape.scores + 2 * output + shape.k_len * per_query
    if kernel == "bmm":
        return item * shape.scores + output + 2 * shape.k_len * per_query
    if kernel == "chunked":
        return min(8 * shape.scores, int(chunk_mib * 2**20)) + 2 * output
    return output
