"""The parallel modes over a built pipeline: ``parallelize(pipe, world, setting, prompts)`` after the optimisation
steps (``utils.optim``), so bf16, int8, the rewrites, ``torch.compile`` and the step caches run inside each rank.

- **CFG parallel**: hooks around the transformer give it this rank's half of the CFG batch (the conditional or the
  null caption) and gather the halves' predictions after it: one exchange of the predicted velocity per step, the
  sampler and its guidance unchanged. Each rank holds the full weights.
- **Sequence parallel** (VideoSys's dynamic sequence parallelism, ``docs/dsp.md``): after the patch embedding the
  tokens are split along the spatial dimension (all frames of S/P tokens per rank, the last part padded), so the
  temporal attention, the cross-attention and the MLP are local; around every spatial attention two all-to-alls
  switch the split to whole frames (T/P frames per rank, padded) and back; the parts are gathered before the final
  layer. Combines with CFG parallel (2 x P ranks).
- **Batch parallel**: the prompts split over the ranks, one video each (``run_batch``), each from the noise it
  would get in the whole batch.

Step caches with a fixed schedule (PAB, TaylorSeer, TeaCache replaying a pattern) run unchanged. TeaCache's
adaptive decision is taken from the whole CFG batch's input, which no rank holds under CFG or sequence parallel:
its distance is summed over the ranks (``collective_distance``), the same quantity up to float summation order.
The other adaptive caches (first-block cache, MagCache) decide inside diffusers' hooks and are refused there.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from utils.model.pipeline import Generation, OpenSoraPipeline, VideoSetting
from utils.model.stdit3 import STDiT3
from utils.model.video import to_uint8
from utils.optim import caching
from utils.parallel.world import (
    ParallelSetupError,
    World,
    agree,
    all_gather,
    all_reduce_sum,
    all_to_all,
    check_work,
    files_digest,
    gather_first,
    weights_digest,
)

# steps whose decision depends on the whole batch's activations inside diffusers' hooks
ADAPTIVE_HOOK_CACHES = ("first_block_cache", "mag_cache")


class CFGParallel:
    """Forward hooks on the transformer: this rank's half of the CFG batch in, both halves' outputs out."""

    def __init__(self, world: World):
        self.world = world

    def split(self, module, args, kwargs):
        """The CFG batch's tensors (``x``, ``timestep``, ``y``, and ``x_mask`` by keyword) cut to this rank's half;
        the caption mask and the model arguments stay whole, as the model repeats them over its batch."""
        half = self.world.cfg_rank
        args = list(args)
        for i, name in enumerate(("x", "timestep", "y", "x_mask")):
            if i < len(args) and name != "x_mask":  # the fourth positional parameter is the caption mask
                args[i] = args[i].chunk(2)[half]
            elif kwargs.get(name) is not None:
                kwargs[name] = kwargs[name].chunk(2)[half]
        return tuple(args), kwargs

    def gather(self, module, args, kwargs, output):
        return torch.cat(all_gather(self.world, output, self.world.cfg_group), dim=0)


class SequenceParallel:
    """The transformer's split of its tokens over the sequence ranks (``STDiT3.sequence_parallel``) and the two
    all-to-alls around each spatial attention (hooks on the block's ``attn``)."""

    def __init__(self, world: World):
        self.world, self.group = world, world.sequence_group
        self.parts, self.rank = world.layout.sequence, world.sequence_rank
        self.T = self.S = self.part = self.frames = None

    def split(self, x: torch.Tensor, T: int, S: int) -> tuple[torch.Tensor, int]:
        """x [B, T*S, C] -> this rank's tokens [B, T*part, C] (part = ceil(S/P), the last rank's padded), part."""
        B, _, C = x.shape
        P = self.parts
        self.T, self.S, self.part, self.frames = T, S, -(-S // P), -(-T // P)
        x = F.pad(x.view(B, T, S, C), (0, 0, 0, self.part * P - S))
        return x[:, :, self.rank * self.part:(self.rank + 1) * self.part].reshape(B, T * self.part, C), self.part

    def gather(self, x: torch.Tensor, T: int, S: int) -> torch.Tensor:
        """Every rank's tokens [B, T*part, C] -> the whole sequence [B, T*S, C] (padding dropped)."""
        B, _, C = x.shape
        parts = all_gather(self.world, x.view(B, T, self.part, C), self.group)
        return torch.cat(parts, dim=2)[:, :, :S].reshape(B, T * S, C)

    def to_frames(self, module, args):
        """Before a spatial attention: [(B T), part, C] (all frames, some tokens) -> [(B f), S, C] (f whole frames)."""
        (h,) = args
        P, T, part, f = self.parts, self.T, self.part, self.frames
        B, C = h.shape[0] // T, h.shape[-1]
        h = F.pad(h.view(B, T, part, C), (0, 0, 0, 0, 0, f * P - T))  # frames padded to P x f
        h = all_to_all(self.world, h.view(B, P, f, part, C).transpose(0, 1), self.group)  # [P token parts, B, f, ...]
        h = h.permute(1, 2, 0, 3, 4).reshape(B, f, P * part, C)[:, :, :self.S]
        return (h.reshape(B * f, self.S, C),)

    def to_tokens(self, module, args, out):
        """After a spatial attention: [(B f), S, C] -> [(B T), part, C]."""
        P, T, S, part, f = self.parts, self.T, self.S, self.part, self.frames
        B, C = out.shape[0] // f, out.shape[-1]
        h = F.pad(out.view(B, f, S, C), (0, 0, 0, P * part - S))
        h = all_to_all(self.world, h.view(B, f, P, part, C).permute(2, 0, 1, 3, 4), self.group)  # [P frame parts, ...]
        return h.transpose(0, 1).reshape(B, P * f, part, C)[:, :T].reshape(B * T, part, C)


def collective_distance(world: World, group=None):
    """TeaCache's relative L1 distance over the parts every rank holds: mean |a - b| / mean |b| of the whole CFG
    batch, as sums over the ranks (each rank holds as many values: the halves, and the token parts when S divides)."""
    def distance(current: torch.Tensor, previous: torch.Tensor) -> float:
        sums = torch.stack([(current - previous).abs().sum(dtype=torch.float64),
                            previous.abs().sum(dtype=torch.float64)])
        all_reduce_sum(world, sums, group)
        return float(sums[0] / sums[1])
    return distance


def grid(pipe: OpenSoraPipeline, setting: VideoSetting) -> tuple[int, int]:
    """The transformer's patch grid at ``setting``: frames T and spatial tokens S."""
    patch = pipe.transformer.config.patch_size
    T, h, w = (-(-n // p) for n, p in zip(pipe.latent_size(setting), patch))
    return T, h * w


def check_setup(pipe: OpenSoraPipeline, world: World, setting: VideoSetting, prompts: int) -> None:
    """Every check that needs no weights: the work divides over the ranks; the steps can run split."""
    T, S = grid(pipe, setting)
    check_work(world.layout, prompts, T, S)
    if world.layout.mode == "batch":
        return
    refused = [name for name in ADAPTIVE_HOOK_CACHES if name in pipe.optimizations]
    if refused:
        raise ParallelSetupError(f"{', '.join(refused)} decide(s) from the whole batch inside diffusers' hooks, which "
                                 f"no rank holds under --parallel {world.layout.mode}; use teacache, pab or taylorseer "
                                 "(or --parallel batch)")
    teacache = pipe.optimizations.get("teacache")
    if teacache is not None and teacache.get("replay") is None and S % world.layout.sequence:
        raise ParallelSetupError(f"TeaCache's distance over {world.layout.sequence} sequence ranks needs the {S} "
                                 "spatial tokens to divide evenly (padding would enter the distance); use a rank "
                                 f"count dividing {S}")


def agreement(pipe: OpenSoraPipeline, setting: VideoSetting, prompts: list[str], extra: dict | None = None) -> dict:
    """What every rank must share: the setting, the prompts, the steps, the weights (files or random seed, and the
    transformer's loaded values)."""
    return dict(setting=vars(setting), prompts=prompts, optimizations=pipe.optimizations, dtypes=pipe.dtypes,
                weights=pipe.weights, seed=pipe.seed,
                files=files_digest(pipe.folders.values()) if pipe.folders else None,
                transformer=weights_digest(pipe.transformer)) | (extra or {})


def parallelize(pipe: OpenSoraPipeline, world: World, setting: VideoSetting, prompts: list[str],
                extra: dict | None = None) -> OpenSoraPipeline:
    """Check the set-up and that the ranks agree (``agreement`` and ``extra``), then split the transformer's work as
    ``world``'s mode says (batch parallel splits the prompts instead: ``run_batch``)."""
    check_setup(pipe, world, setting, len(prompts))
    agree(world, agreement(pipe, setting, prompts, extra))
    layout = world.layout
    if layout.mode == "batch":
        return pipe
    model: STDiT3 = pipe.transformer
    if layout.cfg > 1:
        cfg = CFGParallel(world)
        model.register_forward_pre_hook(cfg.split, with_kwargs=True)
        model.register_forward_hook(cfg.gather, with_kwargs=True)
    if layout.sequence > 1:
        sequence = SequenceParallel(world)
        model.sequence_parallel = sequence
        for block in model.spatial_blocks:
            block.attn.register_forward_pre_hook(sequence.to_frames)
            block.attn.register_forward_hook(sequence.to_tokens)
    teacache = pipe.optimizations.get("teacache")
    if teacache is not None and teacache.get("replay") is None:
        caching.teacache_head(model).distance = collective_distance(world)
    return pipe


def my_prompts(world: World, prompts: list[str]) -> slice:
    """This rank's prompts under batch parallel: an equal run of consecutive prompts."""
    per = len(prompts) // world.size
    return slice(world.rank * per, (world.rank + 1) * per)


def run_batch(pipe: OpenSoraPipeline, world: World, prompts: list[str], setting: VideoSetting,
              **options) -> tuple[Generation, np.ndarray | None]:
    """This rank's videos (its run of the prompts, from their rows of the whole batch's noise); and on rank 0 every
    rank's frames in prompt order, uint8 [N, F, H, W, 3] (None on the others)."""
    rows = my_prompts(world, prompts)
    generation = pipe(prompts[rows], setting, noise_rows=(rows.start, len(prompts)), **options)
    frames = torch.from_numpy(np.stack([to_uint8(video) for video in generation.video]))
    gathered = gather_first(world, frames)
    return generation, None if gathered is None else torch.cat(gathered).numpy()


# ---- what the modes send: the model of the counted bytes -------------------------------------------------------

def bytes_per_step(cfg: int, sequence: int, frames: int, tokens: int, hidden: int, depth: int, element_bytes: int,
                   output_elements: int, batch: int = 1) -> dict[str, int]:
    """Bytes one rank sends per denoising step, by collective, for ``batch`` videos (a CFG batch of 2 x batch)
    split into ``cfg`` halves x ``sequence`` parts: the latent's patch grid ``frames`` x ``tokens``, the
    transformer's ``hidden`` size and ``depth`` (spatial blocks), activations of ``element_bytes``, and the
    prediction's ``output_elements`` per video (float32). The formulas of ``CFGParallel`` and ``SequenceParallel``;
    notebook 10 checks them against the bytes counted on the run."""
    rows = 2 * batch // cfg  # CFG-batch rows in each rank's forward
    P = sequence
    part, f = -(-tokens // P), -(-frames // P)
    sent = {}
    if P > 1:
        # each spatial block: two all-to-alls of [P, rows, f, part, hidden], (P-1)/P of it leaving the rank
        sent["all_to_all"] = depth * 2 * (P - 1) * rows * f * part * hidden * element_bytes
        # the parts, gathered before the final layer
        sent["all_gather"] = (P - 1) * rows * frames * part * hidden * element_bytes
    if cfg > 1:
        sent["all_gather"] = sent.get("all_gather", 0) + (cfg - 1) * rows * output_elements * 4  # the prediction
    return sent


def messages_per_step(cfg: int, sequence: int, depth: int) -> int:
    """Messages one rank sends per step (one per peer per collective): the latency term of the projection."""
    return (2 * depth + 1) * (sequence - 1) + (cfg - 1)
