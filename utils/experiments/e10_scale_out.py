"""What notebook ``10_scale_out`` runs: the denoising loop spread over ranks with ``torch.distributed`` (gloo,
``utils.parallel``), each mode against one process using the same cores.

- On this machine (2 cores): every mode as 2 ranks x 1 thread (torchrun, loopback) against 1 rank x 2 threads,
  fresh processes in interleaved order (the comparison protocol): each step's seconds, the bytes each rank sent
  per step and the seconds it spent inside the collectives (counted by ``utils.parallel.world``), each rank's
  peak memory, and the final latent against the single process's (parity).
- A model for N instances (a projection): the step's compute at the measured per-core rate spread over N
  instances' cores, plus the communication the modes need there (bytes from the formulas that the counted bytes
  confirm here) at the instances' published network bandwidth.
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from utils.experiments.e05_attention import synthetic_caption
from utils.measure import fidelity
from utils.measure.compare import run_interleaved
from utils.measure.results import Record, ResultsStore, make_config
from utils.measure.runner import run_in_fresh_process
from utils.model.pipeline import VideoSetting, load_pipeline
from utils.optim import registry
from utils.optim.caching import teacache_stats
from utils.parallel import modes
from utils.parallel.modes import bytes_per_step, messages_per_step
from utils.parallel.world import DEFAULT_TIMEOUT_S, close, gather_first, init_world, plan

EXPERIMENT = "scale_out"
TASK = "utils.experiments.e10_scale_out:{}"


@dataclass(frozen=True)
class Run:
    """One way to run the loop: ``mode`` (None: one process) on ``ranks`` x ``threads``, for ``prompts`` videos;
    ``baseline`` names the one-process run it is compared with."""

    name: str
    mode: str | None
    ranks: int
    threads: int
    prompts: int = 1
    baseline: str | None = None


def runs(cores: int = 2) -> list[Run]:
    """The modes on ``cores`` cores: one rank per core against one process with every core."""
    single, pair = f"1 rank x {cores} threads", f"1 rank x {cores} threads, {cores} videos"
    return [Run(single, None, 1, cores), Run(f"cfg: 2 ranks x {cores // 2} thread", "cfg", 2, cores // 2,
                                             baseline=single),
            Run(f"sequence: {cores} ranks x 1 thread", "sequence", cores, 1, baseline=single),
            Run(pair, None, 1, cores, prompts=cores),
            Run(f"batch: {cores} ranks x 1 thread", "batch", cores, 1, prompts=cores, baseline=pair)]


# ---- the child side (every rank) -------------------------------------------------------------------------------

def _setting_of(spec: dict) -> VideoSetting:
    return VideoSetting.create(spec["resolution"], spec["aspect_ratio"], spec["num_frames"], spec["steps"],
                               spec.get("cfg_scale", 7.0), spec.get("seed", 42))


def task_denoise(spec: dict) -> dict:
    """The denoising loop for ``spec["prompts"]`` videos (random caption embeddings with the prompt's real token
    mask; T5 never built), as ``spec["mode"]`` spreads it over the ranks torchrun started (None: this process
    alone): each step's seconds, and per rank the bytes sent and the seconds inside collectives per step and the
    peak memory; rank 0 saves the final latents to ``spec["outputs"]``."""
    world = init_world(spec["mode"], spec.get("timeout", DEFAULT_TIMEOUT_S)) if spec.get("mode") else None
    try:
        return _denoise(spec, world)
    finally:
        close(world)


def _denoise(spec: dict, world) -> dict:
    setting = _setting_of(spec)
    count = spec.get("prompts", 1)
    pipe = registry.apply(load_pipeline(spec["model"], dtype="fp32", load=()), spec.get("optimizations"))
    rows = slice(0, count)
    if world is not None:
        modes.check_setup(pipe, world, setting, count)
        rows = modes.my_prompts(world, [spec["prompt"]] * count) if world.layout.mode == "batch" else rows
    pipe.load("transformer")
    captions = [synthetic_caption(pipe, spec["prompt"], seed=i) for i in range(count)][rows]
    y, mask = torch.cat([c[0] for c in captions]), torch.cat([c[1] for c in captions])
    if world is not None:
        modes.parallelize(pipe, world, setting, [spec["prompt"]] * count)
    z = pipe.prepare_latents(len(captions), setting, noise_rows=(rows.start, count))

    marks, sent = [], []
    stats = world.stats if world is not None else None
    if stats is not None:
        stats.reset()

    def on_step(i):
        marks.append(time.perf_counter())
        if stats is not None:
            sent.append((stats.bytes_sent, stats.seconds))

    start = time.perf_counter()
    latents = pipe.denoise(z, y, mask, setting, progress=False, on_step=on_step)
    times = list(np.diff([start, *marks]))
    comm = [(b1 - b0, s1 - s0) for (b0, s0), (b1, s1) in zip([(0, 0.0), *sent], sent)]
    mine = dict(rank=0 if world is None else world.rank, step_seconds=times,
                bytes_per_step=[b for b, _ in comm], comm_seconds_per_step=[s for _, s in comm],
                by_op=stats.as_dict()["by_op"] if stats is not None else {},
                max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    ranks = [mine]
    if world is not None:
        if world.layout.mode == "batch":  # every rank's videos, in prompt order, on rank 0
            parts = gather_first(world, latents)
            latents = torch.cat(parts) if parts is not None else latents
        ranks = [None] * world.size
        dist.all_gather_object(ranks, mine)
    if spec.get("outputs") and (world is None or world.rank == 0):
        Path(spec["outputs"]).parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(latents=latents), spec["outputs"])
    return dict(ranks=ranks, layout=None if world is None else vars(world.layout),
                optimizations=registry.describe(pipe), latent_shape=list(latents.shape),
                grid=list(modes.grid(pipe, setting)),
                teacache=teacache_stats(pipe.transformer) if "teacache" in pipe.optimizations else None)


TASKS = {"denoise": task_denoise}


# ---- the parent side -----------------------------------------------------------------------------------------

def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _spec(setting: VideoSetting, model: str, prompt: str, steps: int, optimizations: dict, timeout: float) -> dict:
    return dict(model=model, resolution=setting.resolution, aspect_ratio=setting.aspect_ratio,
                num_frames=setting.num_frames, steps=steps, cfg_scale=setting.cfg_scale, seed=setting.seed,
                prompt=prompt, optimizations=optimizations, timeout=timeout)


def _config(config: dict, run: Run, result: dict, setting: VideoSetting, model: str, steps: int, **extra) -> dict:
    return config | dict(experiment=EXPERIMENT, configuration=run.name, mode=run.mode or "single", ranks=run.ranks,
                         threads=run.threads, videos=run.prompts, baseline=run.baseline, weights="random",
                         optimizations=result["optimizations"], model=model, resolution=setting.resolution,
                         aspect_ratio=setting.aspect_ratio, frames=setting.num_frames, steps=steps,
                         grid=result["grid"], **extra)


def _add(store: ResultsStore, name: str, metric: str, unit: str, values, cfg: dict, note: str,
         kind: str = "measured", quality: dict | None = None) -> float:
    values = [float(v) for v in values]
    store.add(Record(name, "denoise", metric, unit, float(np.median(values)), kind=kind,
                     spread=dict(n=len(values), per_run=values, min=min(values), max=max(values)), config=cfg,
                     quality=quality or {}, note=note))
    return float(np.median(values))


def per_process(result: dict) -> dict:
    """One process's (one torchrun launch's) values: the steady step (the slowest rank's median of steps 2..), and
    per rank the bytes sent and the collectives' share of the steady steps."""
    ranks = result["ranks"]
    steady = [r["step_seconds"][1:] or r["step_seconds"] for r in ranks]
    comm = [r["comm_seconds_per_step"][1:] or r["comm_seconds_per_step"] for r in ranks]
    sent = [r["bytes_per_step"][1:] or r["bytes_per_step"] for r in ranks]
    return dict(step_s=max(float(np.median(s)) for s in steady),
                first_step_s=max(r["step_seconds"][0] for r in ranks),
                bytes_per_step=max(float(np.median(b)) for b in sent),
                comm_s=max(float(np.median(c)) for c in comm),
                comm_share=max(sum(c) / sum(s) for c, s in zip(comm, steady)),
                peak_rank_bytes=max(r["max_rss_bytes"] for r in ranks),
                peak_total_bytes=sum(r["max_rss_bytes"] for r in ranks))


def protocol(store: ResultsStore, run_list: list[Run], setting: VideoSetting, model: str, prompt: str,
             processes: int, steps: int, optimizations: dict, config: dict, outputs: Path,
             timeout: float = DEFAULT_TIMEOUT_S, runner=run_in_fresh_process) -> pd.DataFrame:
    """Every run ``processes`` times (one launch of its ranks each), fresh processes in interleaved order, each the
    loop over ``steps`` steps; stored per run: the steady step's seconds, the first step's, bytes sent and the
    collectives' seconds and share per step (the busiest rank), peak memory per rank and of all ranks together;
    the first round's final latents saved under ``outputs`` and compared with the baseline run's (parity)."""
    base = _spec(setting, model, prompt, steps, optimizations, timeout)

    def run_of(run: Run):
        spec = dict(base, mode=run.mode, threads=run.threads, prompts=run.prompts, ranks=run.ranks)
        return lambda round_: (TASK.format("denoise"), {},
                               spec | ({"outputs": str(outputs / f"{slug(run.name)}.pt")} if round_ == 0 else {}))

    results = run_interleaved({r.name: run_of(r) for r in run_list}, processes, runner=runner, desc="scale-out")
    rows = []
    for run in run_list:
        values = [per_process(r) for r in results[run.name]]
        cfg = _config(config, run, results[run.name][0], setting, model, steps, processes=len(values))
        note = (f"{run.ranks} rank(s) x {run.threads} thread(s), the loop over {steps} steps, {len(values)} launches "
                "in interleaved order with the other runs; spread: every launch's value (per_run)")
        row = dict(run=run.name, mode=run.mode or "single", ranks=run.ranks, threads=run.threads, videos=run.prompts)
        row["step s"] = _add(store, run.name, "step_seconds", "s", [v["step_s"] for v in values], cfg,
                             note + "; the slowest rank's median of steps 2..")
        row["first step s"] = _add(store, run.name, "first_step_seconds", "s", [v["first_step_s"] for v in values],
                                   cfg, note + "; the loop's first step (set-up included), the slowest rank")
        sent = [v["bytes_per_step"] for v in values]
        row["bytes/step/rank"] = _add(store, run.name, "bytes_sent_per_step", "B", sent,
                                      cfg, note + "; counted: what the busiest rank's collectives sent per steady step")
        row["comm s/step"] = _add(store, run.name, "comm_seconds_per_step", "s", [v["comm_s"] for v in values], cfg,
                                  note + "; seconds inside collectives per steady step (waiting for a slower peer "
                                         "included), the busiest rank")
        row["comm share"] = _add(store, run.name, "comm_share", "fraction", [v["comm_share"] for v in values], cfg,
                                 note + "; the collectives' seconds over the steady steps' seconds, the busiest rank")
        row["peak GiB/rank"] = _add(store, run.name, "peak_rss_per_rank", "B",
                                    [v["peak_rank_bytes"] for v in values], cfg, note + "; the largest rank's peak "
                                    "resident memory") / 2**30
        row["peak GiB total"] = _add(store, run.name, "peak_rss_total", "B", [v["peak_total_bytes"] for v in values],
                                     cfg, note + "; the ranks' peaks added (what the machine holds)") / 2**30
        rows.append(row)
    table = pd.DataFrame(rows)
    parity_rows = [parity(store, run, outputs, config | dict(experiment=EXPERIMENT, part="parity"), steps)
                   for run in run_list if run.baseline]
    return table.merge(pd.DataFrame(parity_rows), on="run", how="left")


def parity(store: ResultsStore, run: Run, outputs: Path, config: dict, steps: int) -> dict:
    """The run's final latents against its baseline's (the first round of each: same noise, same captions)."""
    mine = torch.load(outputs / f"{slug(run.name)}.pt")["latents"]
    reference = torch.load(outputs / f"{slug(run.baseline)}.pt")["latents"]
    diff = fidelity.compare(mine, reference)
    cfg = config | dict(configuration=run.name, baseline=run.baseline, steps=steps, mode=run.mode)
    for metric, value in diff.items():
        store.add(Record(run.name, "latents", metric, "", value, kind="measured", config=cfg,
                         note=f"the final latent after {steps} steps against {run.baseline}'s, same noise and "
                              "captions"))
    return dict(run=run.name, **diff)


def fp32_parity(store: ResultsStore, run_list: list[Run], setting: VideoSetting, model: str, prompt: str, steps: int,
                config: dict, outputs: Path, timeout: float = DEFAULT_TIMEOUT_S,
                runner=run_in_fresh_process) -> pd.DataFrame:
    """Each run once with every component fp32 (upstream's numerics, no step), the loop over ``steps`` steps; its
    final latents against its baseline's (stored, part ``fp32 parity``)."""
    base = _spec(setting, model, prompt, steps, {}, timeout)
    for run in tqdm(run_list, desc="fp32 parity", unit="launch"):
        runner(TASK.format("denoise"), ranks=run.ranks, **dict(base, mode=run.mode, threads=run.threads,
                                                                prompts=run.prompts,
                                                                outputs=str(outputs / f"{slug(run.name)}.pt")))
    cfg = config | dict(experiment=EXPERIMENT, part="fp32 parity", optimizations="", weights="random", model=model,
                        resolution=setting.resolution, aspect_ratio=setting.aspect_ratio, frames=setting.num_frames)
    return pd.DataFrame([parity(store, run, outputs, cfg, steps) for run in run_list if run.baseline])


def formula_check(store: ResultsStore, measured: pd.DataFrame, run_list: list[Run], pipe, setting: VideoSetting,
                  element_bytes: int, config: dict) -> pd.DataFrame:
    """The bytes each run's busiest rank sent per step (counted, ``measured`` from ``protocol``) against
    ``bytes_per_step`` (the projection's model); both stored (part ``formula``)."""
    frames, tokens = modes.grid(pipe, setting)
    model = pipe.transformer.config
    out = model.out_channels * math.prod(pipe.latent_size(setting))
    counted = measured.set_index("run")["bytes/step/rank"]
    rows = []
    for run in run_list:
        if run.mode in (None, "batch"):
            continue
        layout = plan(run.mode, run.ranks)
        formula = sum(bytes_per_step(layout.cfg, layout.sequence, frames, tokens, model.hidden_size, model.depth,
                                     element_bytes, out).values())
        cfg = config | dict(experiment=EXPERIMENT, part="formula", configuration=run.name, mode=run.mode,
                            ranks=run.ranks, grid=[frames, tokens], element_bytes=element_bytes)
        store.add(Record(run.name, "denoise", "bytes_counted_per_step", "B", float(counted[run.name]), config=cfg,
                         note="counted on the run (the protocol's busiest rank, steady steps)"),
                  Record(run.name, "denoise", "bytes_formula_per_step", "B", float(formula), kind="derived",
                         config=cfg, note="utils.parallel.modes.bytes_per_step at the run's grid"))
        rows.append(dict(run=run.name, counted=float(counted[run.name]), formula=formula))
    return pd.DataFrame(rows)


# ---- the projection: N instances ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Assumptions:
    """What the projection assumes beyond the measured rate and the counted bytes; each is a stated assumption."""

    flow_cap_gbps: float = 10.0  # AWS: one TCP flow reaches up to 10 Gbps inside a cluster placement group
    latency_s: float = 50e-6  # per message, an order of magnitude (third-party ping in a placement group: 37-61 us)
    element_bytes: int = 2  # bf16 activations, as the measured runs
    pays: float = 0.5  # one more instance pays while it cuts at least this share of a perfect split's cut


def step_flops(pipe, setting: VideoSetting) -> int:
    """FLOPs of one CFG step of the transformer at ``setting``, counted on the meta device (shapes only)."""
    from utils.measure.flops import count_flops

    cfg = pipe.transformer.config
    args = {k: v.to("meta") if k in ("fps", "num_frames", "ar") else v for k, v in pipe.model_args(2, setting).items()}
    with torch.device("meta"):
        x = torch.empty(2, cfg.in_channels, *pipe.latent_size(setting))
        y = torch.empty(2, 1, cfg.model_max_length, cfg.caption_channels)
        return count_flops(pipe.transformer, x, torch.empty(2), y=y, **args)[1]


def layout_for(instances: int) -> tuple[int, int]:
    """(cfg, sequence) for N instances: one alone; the CFG halves for two, with N/2 sequence parts each beyond (the
    halves exchange the least: one prediction per step)."""
    if instances != 1 and instances % 2:
        raise ValueError(f"the projection pairs the instances (CFG halves): 1 or an even count, got {instances}")
    return (1, 1) if instances == 1 else (2, instances // 2)


def instance_counts(max_instances: int) -> list[int]:
    """The counts the projection steps through: one, then pairs (two more instances: one more part per half)."""
    return [1, *range(2, max_instances + 1, 2)]


def projected_step(flops: int, frames: int, tokens: int, output_elements: int, hidden: int, depth: int, instances: int,
                   vcpus: int, rate_per_vcpu: float, gbps: float, a: Assumptions) -> dict | None:
    """One step on ``instances`` instances of ``vcpus`` each: compute at ``rate_per_vcpu`` FLOP/s spread evenly (the
    padded share included), then the traffic at the bandwidth one rank reaches (its instance's, at most one flow's
    cap per peer) and a latency per message; None where a part would have no frame or token."""
    cfg, P = layout_for(instances)
    if P > min(frames, tokens):
        return None
    padding = max(-(-frames // P) * P / frames, -(-tokens // P) * P / tokens)
    compute = flops * padding / (instances * vcpus * rate_per_vcpu)
    sent = sum(bytes_per_step(cfg, P, frames, tokens, hidden, depth, a.element_bytes, output_elements).values())
    peers = (P - 1) + (cfg - 1)
    bandwidth = min(gbps, max(peers, 1) * a.flow_cap_gbps) * 1e9 / 8
    comm = sent / bandwidth + messages_per_step(cfg, P, depth) * a.latency_s
    return dict(instances=instances, cfg=cfg, sequence=P, compute_s=compute, comm_s=comm, step_s=compute + comm,
                bytes_sent=sent, comm_share=comm / (compute + comm))


def last_paying(curve: pd.DataFrame, pays: float) -> int:
    """The instance count after which the next count on ``curve`` stops paying: it cuts the step by less than
    ``pays`` of what a perfect split would cut (step x (1 - N / N_next))."""
    steps = curve.set_index("instances")["step_s"]
    counts = list(steps.index)
    for n, following in zip(counts, counts[1:]):
        if steps[n] - steps[following] < pays * steps[n] * (1 - n / following):
            return int(n)
    return int(counts[-1])


NETWORK = Path(__file__).resolve().parents[2] / "data" / "network.csv"
PROJECTED_SETTINGS = [(r, n) for r in ("144p", "360p", "720p") for n in ("2s", "16s")]


def network_table(path: Path = NETWORK) -> pd.DataFrame:
    """The instances' vCPUs and published bandwidth (``data/network.csv``, sources in its rows)."""
    return pd.read_csv(path, comment="#")


def projection(store: ResultsStore, pipe, rate_per_vcpu: float, config: dict, aspect_ratio: str = "9:16",
               settings=PROJECTED_SETTINGS, max_instances: int = 32, assumptions: Assumptions = Assumptions(),
               instances: pd.DataFrame | None = None) -> pd.DataFrame:
    """The step on 1, 2, 4, .. ``max_instances`` instances of each row of ``instances`` (``network_table``) at each
    setting
    (resolution, length): ``projected_step`` with this machine's measured FLOP rate per vCPU; stored (kind
    ``projected``) per setting and instance: the curve, the last paying count, its step and communication share."""
    instances = network_table() if instances is None else instances
    cfg_model = pipe.transformer.config
    rows, curves = [], []
    for resolution, length in tqdm(settings, desc="projection", unit="setting"):
        setting = VideoSetting.create(resolution, aspect_ratio, length, 30)
        flops = step_flops(pipe, setting)
        frames, tokens = modes.grid(pipe, setting)
        output_elements = cfg_model.out_channels * math.prod(pipe.latent_size(setting))
        for inst in instances.itertuples():
            curve = pd.DataFrame([p for n in instance_counts(max_instances) if (p := projected_step(
                flops, frames, tokens, output_elements, cfg_model.hidden_size, cfg_model.depth, n, inst.vcpus,
                rate_per_vcpu, inst.gbps, assumptions)) is not None])
            best = last_paying(curve, assumptions.pays)
            at = curve.set_index("instances").loc[best]
            cfg = config | dict(experiment=EXPERIMENT, part="projection", instance=inst.instance, vcpus=inst.vcpus,
                                range_end=best == int(curve["instances"].max()),
                                gbps=inst.gbps, resolution=resolution, frames=setting.num_frames, length=length,
                                aspect_ratio=aspect_ratio, grid=[frames, tokens], rate_per_vcpu=rate_per_vcpu,
                                assumptions=vars(assumptions), step_flops=flops)
            name = f"{inst.instance} {resolution} {length}"
            note = ("projected: compute at the per-vCPU rate measured here, spread evenly; the modes' bytes (formulas "
                    "checked against the counted bytes) at the published bandwidth; see the assumptions in config")
            for metric, unit, value, extra in (
                    ("one_instance_step_seconds", "s", curve.iloc[0]["step_s"], {}),
                    ("last_paying_instances", "instances", best,
                     {"cfg": int(at["cfg"]), "sequence": int(at["sequence"])}),
                    ("step_seconds_at_last_paying", "s", at["step_s"], {}),
                    ("comm_share_at_last_paying", "fraction", at["comm_share"], {})):
                store.add(Record(name, "denoise", metric, unit, float(value), kind="projected", config=cfg | extra,
                                 note=note))
            store.add(Record(name, "denoise", "step_seconds_curve", "s", float(at["step_s"]), kind="projected",
                             config=cfg, note=note + "; the curve over instance counts in quality",
                             quality=dict(curve=curve[["instances", "step_s", "comm_share"]].to_dict("list"))))
            rows.append(dict(instance=inst.instance, resolution=resolution, length=length, frames=frames,
                             tokens=tokens, **{"1 instance s/step": curve.iloc[0]["step_s"], "last paying N": best,
                                               "s/step there": at["step_s"], "comm share there": at["comm_share"]}))
            curves.append(curve.assign(instance=inst.instance, resolution=resolution, length=length))
    return pd.DataFrame(rows)


def experiment_config(store: ResultsStore, **extra) -> dict:
    return make_config(experiment=EXPERIMENT, environment_id=store.environment_id, **extra)
