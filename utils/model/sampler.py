"""Rectified-flow sampling with classifier-free guidance (upstream ``opensora/schedulers/rf``).

The Euler steps run through diffusers' ``FlowMatchEulerDiscreteScheduler``. Upstream's timestep
schedule depends on the resolution and length (an SD3-style shift ``r``) and is computed from the
model-argument tensors, so it is computed here exactly as upstream does and handed to the scheduler
as both ``timesteps`` and ``sigmas = timesteps / 1000`` (with the scheduler's own shift left at 1).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

NUM_TIMESTEPS = 1000  # training timesteps; t = 1000 is pure noise

BASE_RESOLUTION = 512 * 512


def shift_ratio(height: torch.Tensor, width: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
    """Upstream ``timestep_transform`` ratio ``r = sqrt(H*W / 512^2) * sqrt(T')``, ``T' = frames//17*5``.

    Computed in the dtype of the model-argument tensors: in upstream's bf16 run they are bf16, so r is
    rounded (2.421875 instead of 2.4187 at 240p 2s)."""
    ratio_space = (height * width / BASE_RESOLUTION).sqrt()
    latent_frames = torch.ones_like(num_frames) if num_frames[0] == 1 else num_frames // 17 * 5
    return ratio_space * latent_frames.sqrt()


def rflow_timesteps(num_steps: int, height: torch.Tensor, width: torch.Tensor, num_frames: torch.Tensor,
                    use_timestep_transform: bool = True) -> torch.Tensor:
    """The ``num_steps`` timesteps in [0, 1000] (float32, first 1000, no terminal 0) as upstream's RFLOW."""
    base = torch.tensor([(1.0 - i / num_steps) * NUM_TIMESTEPS for i in range(num_steps)])  # float32
    if not use_timestep_transform:
        return base
    r = shift_ratio(height[:1].cpu(), width[:1].cpu(), num_frames[:1].cpu())  # the schedule lives on the CPU
    s = base / NUM_TIMESTEPS
    return (r * s / (1 + (r - 1) * s) * NUM_TIMESTEPS).float()


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # shift 1: the resolution/length shift is already in the timesteps we hand over
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TIMESTEPS, shift=1.0)


def set_rflow_timesteps(scheduler: FlowMatchEulerDiscreteScheduler, timesteps: torch.Tensor) -> None:
    scheduler.set_timesteps(sigmas=(timesteps / NUM_TIMESTEPS).tolist(), timesteps=timesteps.tolist())


@torch.inference_mode()
def rflow_sample(
    model: Callable[..., torch.Tensor],
    scheduler: FlowMatchEulerDiscreteScheduler,
    z: torch.Tensor,
    y: torch.Tensor,
    y_null: torch.Tensor,
    mask: torch.Tensor | None,
    model_args: dict[str, torch.Tensor],
    num_steps: int = 30,
    cfg_scale: float = 7.0,
    use_timestep_transform: bool = True,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoise ``z`` [B, C, T, H, W] from t = 1000 to 0 with guidance; returns the final latent.

    ``y`` [B, 1, L, D] are the prompt embeddings, ``y_null`` the null caption of the same shape;
    ``mask`` [B, L] is the prompt token mask, used for both halves of the CFG batch (upstream).
    ``model_args`` hold ``height, width, num_frames, fps`` (and ``ar``) as [B] tensors.
    """
    timesteps = rflow_timesteps(num_steps, model_args["height"], model_args["width"],
                                model_args["num_frames"], use_timestep_transform)
    set_rflow_timesteps(scheduler, timesteps)
    y_cfg = torch.cat([y, y_null], dim=0)  # [2B, 1, L, D]: conditional first, as upstream
    # a model with step caches (diffusers hooks, utils.optim.caching) starts each video from empty caches and is
    # told where the loop is; one context for the CFG batch, as upstream batches both halves in one call
    caching = getattr(model, "is_cache_enabled", False)
    if caching:
        model._reset_stateful_cache()
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoise", unit="step", disable=not progress)):
        z_in = torch.cat([z, z], dim=0)  # [2B, C, T, H, W]
        t_in = t.to(z.device).repeat(z_in.shape[0])
        context = (model.cache_context("cfg", step_index=i, num_inference_steps=num_steps, timestep=float(t))
                   if caching else nullcontext())
        with context:
            pred = model(z_in, t_in, y=y_cfg, mask=mask, **model_args)
        velocity = pred.chunk(2, dim=1)[0]  # upstream drops the sigma half of the output
        cond, uncond = velocity.chunk(2, dim=0)
        velocity = uncond + cfg_scale * (cond - uncond)  # points from noise towards data
        # diffusers steps x + (sigma_next - sigma) * out with out = noise - x0, i.e. minus our velocity;
        # z is promoted to float32 here, as upstream's update promotes a bf16 z after the first step
        z = scheduler.step(-velocity, t, z).prev_sample
        if on_step is not None:
            on_step(i)
    return z
