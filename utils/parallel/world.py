"""The ranks of a parallel run and the collectives between them, counted.

``torchrun`` starts one process per rank (on one machine or several) and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); ``init_world`` joins them into a gloo
process group (CPU tensors over TCP) and lays them out for a mode:

    cfg            2 ranks: the conditional and unconditional halves of every step's CFG batch
    sequence       P ranks: the latent split along its spatial tokens (VideoSys's dynamic sequence parallelism)
    cfg+sequence   2 x P ranks: both; rank = half * P + part
    batch          N ranks: the prompts split over the ranks, one video each

Every collective goes through this module, which counts what it sends (``CommStats``: bytes each rank sends to
the others, by the algorithm's volume, from the tensors' sizes; the seconds spent inside the call, waiting for a
slower peer included) and turns a peer that stops answering into ``PeerLost`` with a message, after the run's
timeout, instead of a hang. A set-up the ranks cannot run raises ``ParallelSetupError`` before any model work.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

MODES = {
    "cfg": "the two CFG halves of each step on two ranks; one exchange of the predicted velocity per step",
    "sequence": "the latent split along its spatial tokens over the ranks; two all-to-alls around each spatial "
                "attention, one gather before the final layer",
    "cfg+sequence": "both: 2 x P ranks",
    "batch": "the prompts split over the ranks, one video each (throughput)",
}
DEFAULT_TIMEOUT_S = 600  # a peer silent for this long ends the run (a step of the real model takes about a minute)
LAUNCH_HINT = "torchrun --nproc-per-node 2 -m utils.generate --parallel cfg ..."


class ParallelSetupError(ValueError):
    """A set-up the ranks cannot run (what was wrong, what is accepted); raised before any model work."""


class PeerLost(RuntimeError):
    """A collective failed: a peer exited, or stopped answering for longer than the run's timeout."""


@dataclass(frozen=True)
class Layout:
    """How the ranks share the work: ``cfg`` halves (1 or 2) x ``sequence`` parts per video; ``batch`` ranks each
    with their own videos."""

    mode: str
    size: int
    cfg: int = 1
    sequence: int = 1

    @property
    def batch(self) -> int:
        return self.size if self.mode == "batch" else 1


def plan(mode: str, size: int) -> Layout:
    """The layout of ``size`` ranks for ``mode``; ParallelSetupError naming what is accepted."""
    if mode not in MODES:
        raise ParallelSetupError(f"unknown parallel mode {mode!r}; accepted: {', '.join(MODES)}")
    if size < 2:
        raise ParallelSetupError(f"--parallel {mode} needs at least 2 ranks, got {size} (start them with "
                                 f"{LAUNCH_HINT})")
    if mode == "cfg" and size != 2:
        raise ParallelSetupError(f"cfg parallel splits each step's two CFG halves: it runs on exactly 2 ranks, got "
                                 f"{size}; for more ranks use cfg+sequence (2 x P) or sequence")
    if mode == "cfg+sequence" and (size % 2 or size < 4):
        raise ParallelSetupError(f"cfg+sequence runs on 2 x P ranks (P >= 2: 4, 6, 8, ...), got {size}")
    return Layout(mode, size, cfg=2 if mode in ("cfg", "cfg+sequence") else 1,
                  sequence={"sequence": size, "cfg+sequence": size // 2}.get(mode, 1))


def check_work(layout: Layout, prompts: int, frames: int, tokens: int) -> None:
    """That the work divides over the ranks: ``prompts`` over batch ranks; the latent's ``frames`` (patch grid T)
    and spatial ``tokens`` (S) each at least the sequence parts (a part with no frame or token would only wait)."""
    if layout.mode == "batch":
        if prompts % layout.size:
            raise ParallelSetupError(f"batch parallel gives every rank the same number of videos: {prompts} prompts "
                                     f"do not divide over {layout.size} ranks (give a multiple of {layout.size})")
    elif prompts != 1:
        raise ParallelSetupError(f"--parallel {layout.mode} makes one video; got {prompts} prompts (several prompts "
                                 "go with --parallel batch)")
    if layout.sequence > 1 and layout.sequence > min(frames, tokens):
        raise ParallelSetupError(f"sequence parallel over {layout.sequence} parts needs at least as many latent frames "
                                 f"and spatial tokens per frame: this setting has {frames} frames and {tokens} "
                                 f"tokens; use at most {min(frames, tokens)} sequence ranks")


@dataclass
class CommStats:
    """What this rank's collectives sent and how long they took, since the last ``reset``."""

    bytes_sent: int = 0
    seconds: float = 0.0
    calls: int = 0
    by_op: dict = field(default_factory=dict)  # op -> [calls, bytes]

    def add(self, op: str, nbytes: int, seconds: float) -> None:
        self.bytes_sent += nbytes
        self.seconds += seconds
        self.calls += 1
        entry = self.by_op.setdefault(op, [0, 0])
        entry[0] += 1
        entry[1] += nbytes

    def reset(self) -> None:
        self.bytes_sent, self.seconds, self.calls, self.by_op = 0, 0.0, 0, {}

    def as_dict(self) -> dict:
        return dict(bytes_sent=self.bytes_sent, seconds=self.seconds, calls=self.calls,
                    by_op={op: dict(calls=c, bytes=b) for op, (c, b) in self.by_op.items()})


@dataclass
class World:
    """This rank's place: its rank, the layout, its groups (gloo process groups) and its communication counts."""

    rank: int
    layout: Layout
    timeout_s: float
    cfg_group: object = None  # the ranks holding the two halves of this rank's part
    sequence_group: object = None  # the ranks holding the parts of this rank's half
    stats: CommStats = field(default_factory=CommStats)

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def cfg_rank(self) -> int:  # 0: the conditional half, 1: the unconditional
        return self.rank // self.layout.sequence if self.layout.cfg > 1 else 0

    @property
    def sequence_rank(self) -> int:
        return self.rank % self.layout.sequence

    def log(self, message: str) -> None:
        """Every rank logs, each line marked with its rank."""
        print(f"[rank {self.rank}/{self.size}] {message}", flush=True)


def launched() -> bool:
    """Whether this process was started as a rank (by torchrun, or with its environment variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(mode: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the gloo process group torchrun's environment describes, laid out for ``mode``. A rank count the mode
    cannot use fails before joining; a peer that never joins ends with PeerLost after ``timeout_s``."""
    if not launched():
        raise ParallelSetupError(f"--parallel {mode} runs as several ranks, which torchrun starts: {LAUNCH_HINT}")
    if not timeout_s > 0:
        raise ParallelSetupError(f"the peer timeout must be positive seconds, got {timeout_s}")
    layout = plan(mode, int(os.environ["WORLD_SIZE"]))
    rank = int(os.environ["RANK"])
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        raise PeerLost(f"rank {rank}: the {layout.size} ranks did not all join within {timeout_s:g} s at "
                       f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({first_line(err)})") from err
    world = World(rank, layout, timeout_s)
    P = layout.sequence
    timeout = datetime.timedelta(seconds=timeout_s)  # a group's own default would be gloo's thirty minutes
    # every rank creates every group, in the same order (torch.distributed's rule)
    for half in range(layout.cfg):
        group = dist.new_group([half * P + part for part in range(P)], timeout=timeout)
        if world.cfg_rank == half:
            world.sequence_group = group
    for part in range(P):
        group = dist.new_group([half * P + part for half in range(layout.cfg)], timeout=timeout)
        if world.sequence_rank == part:
            world.cfg_group = group
    return world


def close(world: World | None) -> None:
    if world is not None and dist.is_initialized():
        dist.destroy_process_group()


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


# ---- counted collectives ---------------------------------------------------------------------------------

def _run(world: World, op: str, nbytes: int, call) -> None:
    start = time.perf_counter()
    try:
        call()
    except RuntimeError as err:  # gloo: a closed connection, or a receive that timed out
        raise PeerLost(f"rank {world.rank}: {op} failed: a peer exited or did not answer within "
                       f"{world.timeout_s:g} s ({first_line(err)})") from err
    world.stats.add(op, nbytes, time.perf_counter() - start)


def group_size(group) -> int:
    return dist.get_world_size(group)


def all_to_all(world: World, tensor: torch.Tensor, group) -> torch.Tensor:
    """``all_to_all_single`` over ``group``: chunk i of dim 0 goes to the group's rank i; the result's chunk i
    came from rank i. Sends (P-1)/P of the tensor."""
    P = group_size(group)
    tensor = tensor.contiguous()
    out = torch.empty_like(tensor)
    _run(world, "all_to_all", tensor.numel() * tensor.element_size() * (P - 1) // P,
         lambda: dist.all_to_all_single(out, tensor, group=group))
    return out


def all_gather(world: World, tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all), in group rank order. Sends the tensor to each of the P-1 peers."""
    P = group_size(group)
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(P)]
    _run(world, "all_gather", tensor.numel() * tensor.element_size() * (P - 1),
         lambda: dist.all_gather(parts, tensor, group=group))
    return parts


def gather_first(world: World, tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (same shape on all) on rank 0, in rank order; None on the others, which each send
    their tensor once."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world.size)] if world.rank == 0 else None
    _run(world, "gather", 0 if world.rank == 0 else tensor.numel() * tensor.element_size(),
         lambda: dist.gather(tensor, parts, dst=0))
    return parts


def all_reduce_sum(world: World, tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum over ``group`` (default: all ranks), in place. Sends 2 (P-1)/P of the tensor (ring)."""
    P = group_size(group)
    _run(world, "all_reduce", 2 * tensor.numel() * tensor.element_size() * (P - 1) // P,
         lambda: dist.all_reduce(tensor, group=group))
    return tensor


# ---- agreement ----------------------------------------------------------------------------------------------

def weights_digest(module: torch.nn.Module, sample: int = 4096) -> str:
    """A digest of ``module``'s weights: every saved tensor's name, shape, dtype and first ``sample`` values (enough to
    tell one checkpoint or random seed from another without reading gigabytes). Weights not materialised yet (the
    meta device) or in a quantised tensor type count by name, shape and dtype only."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict(keep_vars=True).items():  # persistent tensors only
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        plain = type(tensor.data) is torch.Tensor and tensor.device.type == "cpu"
        if plain:
            digest.update(tensor.detach().reshape(-1)[:sample].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def files_digest(paths, head: int = 1 << 20) -> str:
    """A digest of checkpoint files: each file's name, size and first ``head`` bytes."""
    digest = hashlib.sha1()
    for path in sorted(p for folder in paths for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(f"{path.name}{path.stat().st_size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(head))
    return digest.hexdigest()


def agree(world: World, what: dict) -> None:
    """That every rank runs with the same ``what`` (settings, steps, weights digest); ParallelSetupError on every
    rank, naming the ranks and the keys that differ, otherwise."""
    mine = json.loads(json.dumps(what, sort_keys=True, default=str))
    everyone: list = [None] * world.size
    try:
        dist.all_gather_object(everyone, mine)
    except RuntimeError as err:
        raise PeerLost(f"rank {world.rank}: comparing the ranks' settings failed: a peer exited or did not answer "
                       f"within {world.timeout_s:g} s ({first_line(err)})") from err
    differing = {rank: sorted(k for k in set(theirs) | set(everyone[0]) if theirs.get(k) != everyone[0].get(k))
                 for rank, theirs in enumerate(everyone) if theirs != everyone[0]}
    if differing:
        detail = "; ".join(f"rank {rank} differs from rank 0 in {', '.join(keys)}" for rank, keys in differing.items())
        raise ParallelSetupError(f"the ranks must run the same settings and weights: {detail}")
