"""Training the quality testbed's mini OpenSora on synthetic clips (``make mini-model``).

Stages, each on the output of the one before, with a fixed seed and a progress bar:
1. data: ``synthetic.make_dataset`` over the training combinations (held-out ones are never seen);
2. tokenizer (word level) and a small T5, left at its seeded random initialisation and frozen;
3. spatial VAE (diffusers ``AutoencoderKL``) on single frames: L1 + MSE reconstruction + a small KL term;
4. temporal VAE on the spatial latents of whole clips: MSE reconstruction + a small KL term;
5. latent normalisation: ``shift`` / ``scale`` = per-channel mean / std of the training latents
   (upstream stores measured constants in the same buffers);
6. STDiT3 with upstream's rectified-flow objective (v1.2 training config): logit-normal timesteps, shifted
   as the sampler shifts them (for the mini model not at all: ``utils.model.pipeline.TIMESTEP_TRANSFORM``),
   ``x_t = (1 - t) x_0 + t noise``, velocity target ``x_0 - noise``,
   10 % caption dropout to the null caption (for classifier-free guidance), EMA weights saved.
Weights go to ``data/mini-model/<component>/model.safetensors`` in the official layouts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import T5Config, T5EncoderModel

from utils.fingerprint import fingerprint
from utils.measure.benchmark import num_threads
from utils.measure.results import Record, make_config
from utils.model.captions import append_score_to_prompts, text_preprocessing
from utils.model.pipeline import AESTHETIC_SCORE, TIMESTEP_TRANSFORM
from utils.model.sampler import NUM_TIMESTEPS, shift_ratio
from utils.model.stdit3 import STDIT3_PRESETS, build_stdit3
from utils.model.text_encoder import T5_PRESETS, T5TextEncoder
from utils.model.vae import build_vae
from utils.model.weights import MINI_DIR, weights_id
from utils.testbed import synthetic
from utils.testbed.minimodel import build_tokenizer, mini_setting

SCHEDULES = ("constant", "cosine")  # learning-rate schedules after the warm-up


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    clips_per_combination: int = 16  # training clips per training combination
    spatial_steps: int = 1200  # spatial VAE optimiser steps
    spatial_batch: int = 16  # frames per step
    spatial_lr: float = 1e-3
    temporal_steps: int = 300
    temporal_batch: int = 8  # clips per step
    temporal_lr: float = 1e-3
    kl_weight: float = 1e-6  # upstream's VAE KL weight
    dit_steps: int = 5000
    dit_batch: int = 32
    dit_lr: float = 1e-3
    dit_warmup: int = 100  # linear learning-rate warm-up steps
    dit_schedule: str = "cosine"  # after the warm-up: "cosine" (towards zero at the last step) or "constant"
    caption_dropout: float = 0.1  # upstream's class_dropout_prob
    ema_decay: float = 0.998
    threads: int = 2  # both cores: 0.41 s per transformer step here, 0.61 s at one thread

    def __post_init__(self):
        if self.dit_schedule not in SCHEDULES:
            raise ValueError(f"unknown dit_schedule {self.dit_schedule!r}; accepted: {', '.join(SCHEDULES)}")


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _batches(n: int, batch: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=generator)


def lr_factor(step: int, steps: int, warmup: int = 0, schedule: str = "constant") -> float:
    """Learning-rate multiplier at ``step``: linear warm-up over ``warmup`` steps, then constant or a cosine
    decay that reaches zero after the last of ``steps`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimise(params, lr: float, steps: int, warmup: int = 0, schedule: str = "constant"):
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: lr_factor(step, steps, warmup, schedule))
    return optimiser, scheduler


def _step(optimiser, schedule, loss: torch.Tensor) -> float:
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimiser.param_groups for p in g["params"]], 1.0)
    optimiser.step()
    schedule.step()
    return loss.item()


def _loss_log(losses: list[float], every: int = 50) -> list[float]:
    """Mean loss per block of ``every`` steps (what the record keeps of the curve)."""
    return [sum(losses[i:i + every]) / len(losses[i:i + every]) for i in range(0, len(losses), every)]


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
def train_spatial_vae(vae, frames: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> list[float]:
    """``frames`` [N, 3, 64, 64] in [-1, 1]."""
    autoencoder = vae.spatial_vae.module.train()
    optimiser, schedule = _optimise(autoencoder.parameters(), cfg.spatial_lr, cfg.spatial_steps)
    losses = []
    bar = tqdm(_batches(len(frames), cfg.spatial_batch, cfg.spatial_steps, gen), total=cfg.spatial_steps,
               desc="spatial VAE", unit="step")
    for index in bar:
        x = frames[index]  # B 3 64 64
        posterior = autoencoder.encode(x).latent_dist
        recon = autoencoder.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        losses.append(_step(optimiser, schedule, loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    autoencoder.eval()
    return losses


def train_temporal_vae(vae, spatial_latents: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> list[float]:
    """``spatial_latents`` [N, 4, 17, 8, 8]: the scaled spatial latents of whole clips."""
    temporal = vae.temporal_vae.train()
    optimiser, schedule = _optimise(temporal.parameters(), cfg.temporal_lr, cfg.temporal_steps)
    frames = spatial_latents.shape[2]
    losses = []
    bar = tqdm(_batches(len(spatial_latents), cfg.temporal_batch, cfg.temporal_steps, gen),
               total=cfg.temporal_steps, desc="temporal VAE", unit="step")
    for index in bar:
        x_z = spatial_latents[index]  # B 4 17 8 8
        posterior = temporal.encode(x_z)
        recon = temporal.decode(posterior.sample(gen), num_frames=frames)  # B 4 17 8 8
        kl = 0.5 * (posterior.mean.pow(2) + posterior.std.pow(2) - 1.0 - posterior.logvar).sum(dim=(1, 2, 3, 4)).mean()
        loss = F.mse_loss(recon, x_z) + cfg.kl_weight * kl
        losses.append(_step(optimiser, schedule, loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    temporal.eval()
    return losses


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Upstream ``RFlow.add_noise``: ``x_t = (1 - t/1000) x_0 + (t/1000) noise``."""
    s = (t / NUM_TIMESTEPS).view(-1, 1, 1, 1, 1)
    return (1 - s) * x0 + s * noise


def sample_timesteps(batch: int, ratio: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Upstream's training timesteps: logit-normal ``s`` in (0, 1), then ``timestep_transform`` (ratio 1: none)."""
    s = torch.sigmoid(torch.randn(batch, generator=gen))
    return ratio * s / (1 + (ratio - 1) * s) * NUM_TIMESTEPS


def train_transformer(model, latents: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, caption_index: torch.Tensor,
                      cfg: TrainConfig, gen: torch.Generator) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``latents`` [N, 4, 5, 8, 8] normalised; ``y`` [K, 1, L, D] / ``mask`` [K, L] per caption;
    ``caption_index`` [N] the caption of each clip. Returns the losses and the EMA state dict."""
    setting = mini_setting()
    model.train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimiser, schedule = _optimise(model.parameters(), cfg.dit_lr, cfg.dit_steps, cfg.dit_warmup, cfg.dit_schedule)
    args = {k: torch.full((cfg.dit_batch,), float(v)) for k, v in dict(
        height=setting.height, width=setting.width, num_frames=setting.num_frames, fps=setting.fps).items()}
    # the sampler's shift (utils.model.pipeline.TIMESTEP_TRANSFORM), so training and sampling see the same timesteps
    ratio = (shift_ratio(args["height"][:1], args["width"][:1], args["num_frames"][:1])
             if TIMESTEP_TRANSFORM["mini"] else torch.ones(1))
    null = model.y_embedder.y_embedding  # [L, D] the fixed null caption
    losses = []
    bar = tqdm(_batches(len(latents), cfg.dit_batch, cfg.dit_steps, gen), total=cfg.dit_steps, desc="STDiT3",
               unit="step")
    for index in bar:
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(len(index), ratio, gen)
        y_batch = y[caption_index[index]].clone()  # B 1 L D
        drop = torch.rand(len(index), generator=gen) < cfg.caption_dropout
        y_batch[drop] = null  # upstream token_drop: the caption becomes the null caption, the mask stays
        pred = model(noised(x0, noise, t), t, y=y_batch, mask=mask[caption_index[index]], **args)
        velocity = pred.chunk(2, dim=1)[0]  # the sigma half is not trained (upstream's RF loss ignores it)
        losses.append(_step(optimiser, schedule, F.mse_loss(velocity, x0 - noise)))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 1 - cfg.ema_decay) if v.is_floating_point() else ema[k].copy_(v)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
    model.eval()
    return losses, ema


# ---------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------
def save_component(state: dict[str, torch.Tensor], folder: Path, extra: dict[str, str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata=extra)


def encode_captions(text_encoder: T5TextEncoder, combinations) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` [K, 1, L, D], ``mask`` [K, L] for the captions, prepared exactly as ``encode_prompt`` does."""
    prompts = [text_preprocessing(p) for p in append_score_to_prompts([a.caption for a in combinations],
                                                                      aes=AESTHETIC_SCORE)]
    encoded = text_encoder.encode(prompts)
    return encoded["y"], encoded["mask"]


def train(cfg: TrainConfig = TrainConfig(), out_dir: Path = MINI_DIR) -> dict:
    """Train every component of the mini model and save it to ``out_dir``; returns the training record."""
    with num_threads(cfg.threads):
        return _train(cfg, Path(out_dir))


def _train(cfg: TrainConfig, out_dir: Path) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    seconds = {}
    start = time.perf_counter()

    clips, attributes = synthetic.make_dataset(synthetic.TRAIN, cfg.clips_per_combination, seed=cfg.seed)
    seconds["data"] = time.perf_counter() - start

    tokenizer = build_tokenizer(out_dir / "text_encoder")
    t5 = T5EncoderModel(T5Config(**T5_PRESETS["mini"])).eval()  # transformers' own seeded initialisation
    text_encoder = T5TextEncoder(tokenizer, t5, model_max_length=STDIT3_PRESETS["mini"].model_max_length)
    y, mask = encode_captions(text_encoder, synthetic.TRAIN)
    caption_index = torch.tensor([synthetic.TRAIN.index(a) for a in attributes])

    vae = build_vae("mini")
    mark = time.perf_counter()
    frames = clips.transpose(1, 2).flatten(0, 1)  # (N F) 3 64 64
    spatial_losses = train_spatial_vae(vae, frames, cfg, gen)
    seconds["spatial_vae"] = time.perf_counter() - mark

    mark = time.perf_counter()
    with torch.no_grad():
        spatial_latents = torch.cat([vae.spatial_vae.encode(chunk, sample=False)
                                     for chunk in tqdm(clips.split(64), desc="spatial latents", unit="batch")])
    temporal_losses = train_temporal_vae(vae, spatial_latents, cfg, gen)
    seconds["temporal_vae"] = time.perf_counter() - mark

    mark = time.perf_counter()
    with torch.no_grad():
        latents = torch.cat([vae.temporal_vae.encode(chunk).mode() for chunk in spatial_latents.split(64)])
        shift = latents.mean(dim=(0, 2, 3, 4))
        scale = latents.std(dim=(0, 2, 3, 4))
        vae.shift.copy_(shift.view(vae.shift.shape))
        vae.scale.copy_(scale.view(vae.scale.shape))
        latents = (latents - vae.shift) / vae.scale  # N 4 5 8 8
    seconds["latents"] = time.perf_counter() - mark

    mark = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_stdit3("mini")
    dit_losses, ema = train_transformer(model, latents, y, mask, caption_index, cfg, gen)
    seconds["transformer"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - start

    note = {"made_by": "utils.testbed.training.train", "config": json.dumps(dataclasses.asdict(cfg))}
    t5_state = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    save_component(t5_state, out_dir / "text_encoder", note)
    save_component(vae.state_dict(), out_dir / "vae", note)
    save_component(ema, out_dir / "transformer", note)
    (out_dir / "transformer" / "config.json").write_text(
        json.dumps(dataclasses.asdict(STDIT3_PRESETS["mini"]), indent=1) + "\n")
    record = dict(config=dataclasses.asdict(cfg), seconds=seconds, clips=len(clips),
                  train_combinations=len(synthetic.TRAIN), held_out_combinations=len(synthetic.HELD_OUT),
                  losses=dict(spatial_vae=_loss_log(spatial_losses), temporal_vae=_loss_log(temporal_losses),
                              transformer=_loss_log(dit_losses)),
                  latent_shift=shift.tolist(), latent_scale=scale.tolist(),
                  use_timestep_transform=TIMESTEP_TRANSFORM["mini"], weights_id=weights_id(out_dir),
                  environment_id=fingerprint()["environment_id"])
    (out_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def training_records(record: dict) -> list[Record]:
    """Results-store records of a training run: seconds per stage and the final loss of each model."""
    cfg = record["config"]
    config = make_config(model="mini", weights="trained-mini", resolution=f"{synthetic.SIZE}px", aspect_ratio="1:1",
                         frames=synthetic.NUM_FRAMES, dtype="fp32", threads=cfg["threads"], seed=cfg["seed"],
                         mini_weights=record["weights_id"])
    steps = dict(spatial_vae=cfg["spatial_steps"], temporal_vae=cfg["temporal_steps"], transformer=cfg["dit_steps"])
    records = [Record(variant="mini-model", stage=stage, metric="training_seconds", unit="s", value=seconds,
                      spread={"n": 1}, config=config, note=f"{steps.get(stage, '-')} optimiser steps"
                      if stage in steps else "")
               for stage, seconds in record["seconds"].items()]
    records += [Record(variant="mini-model", stage=stage, metric="final_loss", unit="", value=losses[-1],
                       spread={"n": 1}, config=config, note="mean over the last 50 optimiser steps")
                for stage, losses in record["losses"].items()]
    return records
