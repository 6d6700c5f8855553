"""Resolution, aspect-ratio and frame-count tables of OpenSora 1.2 (upstream ``opensora/datasets/aspect.py``).

The aspect ratio is written H:W, so ``9:16`` is a landscape frame (144p 9:16 = 144 x 256 pixels).
"""
from __future__ import annotations

import json
from functools import cache

from utils.paths import UPSTREAM

FPS = 24  # upstream saves and conditions on 24 fps (120 for single images)

IMAGE_FPS = 120


@cache
def _tables() -> dict:
    return json.loads((UPSTREAM / "opensora_v1_2_aspect_ratios.json").read_text())


def resolutions() -> list[str]:
    return list(_tables()["resolutions"])


def aspect_ratios() -> list[str]:
    return list(_tables()["ASPECT_RATIO_MAP"])


def image_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) in pixels for a resolution name and an ``H:W`` aspect ratio."""
    tables = _tables()
    if resolution not in tables["resolutions"]:
        raise ValueError(f"unknown resolution {resolution!r}; accepted: {', '.join(resolutions())}")
    if aspect_ratio not in tables["ASPECT_RATIO_MAP"]:
        raise ValueError(f"unknown aspect ratio {aspect_ratio!r}; accepted (H:W): {', '.join(aspect_ratios())}")
    key = tables["ASPECT_RATIO_MAP"][aspect_ratio]
    height, width = tables["resolutions"][resolution]["table"][key]
    return height, width


def max_frames() -> int:
    return max(_tables()["NUM_FRAMES_MAP"].values())


def num_frames(value: str | int) -> int:
    """Pixel frame count from a duration name (``2s`` = 51 frames at 24 fps) or an integer."""
    names = _tables()["NUM_FRAMES_MAP"]
    accepted = f"a duration ({', '.join(names)}) or an integer from 1 to {max_frames()}"
    if isinstance(value, str) and value in names:
        return names[value]
    try:
        frames = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"frame count {value!r} not understood; accepted: {accepted}") from None
    if not 1 <= frames <= max_frames():
        raise ValueError(f"frame count {frames} out of range; accepted: {accepted}")
    return frames


def fps_for(frames: int) -> int:
    return IMAGE_FPS if frames == 1 else FPS
