"""Fidelity of an output against a reference output of the same inputs: PSNR and SSIM of decoded frames
(torchmetrics), the final latent's relative L2 and cosine, frame-to-frame flicker, and the max/relative
difference of two tensors. Used for every optimisation against the fp32 baseline."""
from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def compare(output: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """Max absolute and relative L2 difference of ``output`` against ``expected`` (in float64)."""
    output, expected = output.double(), expected.double()
    difference = output - expected
    return dict(max_abs_diff=float(difference.abs().max()),
                rel_l2_diff=float(difference.norm() / expected.norm().clamp_min(1e-300)))



def check_video(video: torch.Tensor, ndim: tuple[int, ...], name: str = "video") -> None:
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(video).__name__}")
    layouts = {4: "[3, F, H, W]", 5: "[B, 3, F, H, W]"}
    if video.ndim not in ndim or video.shape[-4] != 3:
        raise ValueError(f"{name} must be {' or '.join(layouts[n] for n in ndim)} RGB frames in [-1, 1], "
                         f"got shape {tuple(video.shape)}")


# ---------------------------------------------------------------------------------------------
# fidelity against a reference output
# ---------------------------------------------------------------------------------------------
def _as_frames(video: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two same-shape videos -> two [B*F, 3, H, W] float64 batches of frames."""
    check_video(video, (4, 5))
    check_video(reference, (4, 5), "reference")
    if video.shape != reference.shape:
        raise ValueError(f"video {tuple(video.shape)} and reference {tuple(reference.shape)} must have the same shape")
    frames = [v.detach().cpu().double().reshape(-1, *v.shape[-4:]).transpose(1, 2).flatten(0, 1)  # [B*F, 3, H, W]
              for v in (video, reference)]
    return frames[0], frames[1]


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB over all frames (one MSE over every pixel), data range 2 for [-1, 1].

    Identical inputs have zero error: the result is ``float("inf")``."""
    frames, reference_frames = _as_frames(video, reference)
    if torch.equal(frames, reference_frames):
        return float("inf")
    return float(peak_signal_noise_ratio(frames, reference_frames, data_range=2.0))


def ssim(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM over all frames as a batch of images (11 x 11 Gaussian window), data range 2 for [-1, 1]."""
    frames, reference_frames = _as_frames(video, reference)
    if min(frames.shape[-2:]) < 11:
        raise ValueError(f"ssim needs frames of at least 11 x 11 pixels (its window), got {tuple(frames.shape[-2:])}")
    return float(structural_similarity_index_measure(frames, reference_frames, data_range=2.0))


def latent_errors(latents: torch.Tensor, reference: torch.Tensor) -> dict:
    """Relative L2 error ||a - b|| / ||b|| and cosine similarity of the flattened latents, in float64
    (the cosine is nan when ``latents`` are all zero)."""
    if latents.shape != reference.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and reference {tuple(reference.shape)} "
                         "must have the same shape")
    a, b = (t.detach().cpu().double().flatten() for t in (latents, reference))
    if b.norm() == 0:
        raise ValueError("reference latents are all zero: a relative error needs a non-zero reference")
    cosine = float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 else math.nan
    return {"relative_l2": float((a - b).norm() / b.norm()), "cosine": cosine}


def flicker(video: torch.Tensor) -> float:
    """Mean absolute frame-to-frame difference of [3, F, H, W] or [B, 3, F, H, W] frames (F >= 2)."""
    check_video(video, (4, 5))
    if video.shape[-3] < 2:
        raise ValueError(f"flicker needs at least 2 frames, got {video.shape[-3]}")
    frames = video.detach().cpu().double()
    return float(frames.diff(dim=-3).abs().mean())


def fidelity(video: torch.Tensor, reference: torch.Tensor, latents: torch.Tensor | None = None,
             reference_latents: torch.Tensor | None = None) -> dict:
    """psnr, ssim, flicker and flicker_ratio (video / reference), plus latent errors when both latents are given.

    flicker_ratio is 1 when both are static, inf when only the reference is; both are None for images
    (one frame)."""
    if (latents is None) != (reference_latents is None):
        raise ValueError("give both latents and reference_latents, or neither")
    video_flicker = ratio = None
    if video.shape[-3] > 1:
        video_flicker, reference_flicker = flicker(video), flicker(reference)
        if reference_flicker == 0:
            ratio = 1.0 if video_flicker == 0 else math.inf
        else:
            ratio = video_flicker / reference_flicker
    result = dict(psnr=psnr(video, reference), ssim=ssim(video, reference), flicker=video_flicker, flicker_ratio=ratio)
    if latents is not None:
        result.update({f"latent_{k}": v for k, v in latent_errors(latents, reference_latents).items()})
    return result
