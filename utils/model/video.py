"""Turning decoded frames into files: an h264 mp4 to watch and the lossless uint8 frames to measure."""
from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8, rounded as upstream's ``save_sample``."""
    x = video.float().mul(0.5).add(0.5).clamp(0, 1).mul(255).add(0.5).clamp(0, 255)
    return x.permute(1, 2, 3, 0).to(torch.uint8).numpy()


def write_mp4(frames: np.ndarray, path: Path, fps: int = 24) -> None:
    """h264 mp4 (yuv420p) of [F, H, W, 3] uint8 frames; decoded sizes are multiples of 8, so no resizing."""
    with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1,
                            pixelformat="yuv420p", output_params=["-crf", "18"]) as writer:
        for frame in frames:
            writer.append_data(frame)


def read_mp4(path: Path) -> np.ndarray:
    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack([frame for frame in reader])


def write_frames(frames: np.ndarray, path: Path) -> None:
    """The lossless frames as a compressed ``.npz`` (key ``frames``, [F, H, W, 3] uint8)."""
    with open(path, "wb") as f:
        np.savez_compressed(f, frames=frames)
