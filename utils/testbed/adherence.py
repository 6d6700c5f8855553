"""Quality metrics: prompt adherence on the synthetic testbed, and fidelity against a reference output.

Adherence is analytic (no learned model): ``detect`` segments the one object of a synthetic clip
(``utils.testbed.synthetic``) from decoded frames and reads its shape, colour and motion back, so a generated
clip can be scored against its caption. Fidelity (``psnr``, ``ssim``, ``latent_errors``, ``flicker``)
compares any model's output with a reference output, e.g. an optimised pipeline against the fp32 baseline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.measure.benchmark import num_threads
from utils.measure.fidelity import check_video
from utils.testbed.synthetic import COLOURS, Attributes

# ---------------------------------------------------------------------------------------------
# detection thresholds (colour distances in 0-255 RGB units, sizes as fractions of the frame)
# ---------------------------------------------------------------------------------------------
CANDIDATE_DISTANCE = 50.0  # first pass: clearly not background (every palette colour is >= 140 away)

MIN_AREA_FRACTION = 0.004  # ~16 px at 64 x 64; the smallest object covers ~100 px

MAX_FOREGROUND_FRACTION = 0.35  # the largest object covers ~22 %; more than this is noise or a scene

MIN_VISIBLE_FRACTION = 0.5  # found only when the object is visible in at least half of the frames

# Shape from two blur-tolerant numbers. A triangle's centroid sits 1/6 of its height below its box
# centre, a circle's or square's at it (within 0.03 after pixelation); blur trims the apex and the
# box with it, down to about 0.05 under a 7 x 7 blur, so the cut is low.
TRIANGLE_DROP_ABOVE = 0.06

# bounding-box fill: circle pi/4 (0.75-0.84 after pixelation), square 1 (>= 0.88 even under a 7 x 7 blur)
SQUARE_ABOVE = 0.87

STILL_BELOW_FRACTION = 0.125  # 8 px at 64 px: moving objects travel >= 16 px, still ones 0

_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [C, 3]


@dataclass(frozen=True)
class Detection:
    """What ``detect`` read from one clip; attributes are None when nothing was found."""

    found: bool
    shape: str | None
    colour: str | None
    motion: str | None
    visible_fraction: float  # frames in which an object was segmented
    area_px: float  # median object area over those frames, in pixels of full object colour
    fill_ratio: float  # median area / bounding-box area: circle pi/4, square 1 (a triangle's box loses its apex)
    centroid_drop: float  # median (centroid row - box centre row) / box height: triangle 1/6, others 0
    median_rgb: tuple[float, float, float] | None  # median object colour, 0-255
    displacement_px: tuple[float, float] | None  # (dx, dy) over the clip from a linear fit; +y is down



def _largest_components(mask: torch.Tensor) -> torch.Tensor:
    """[F, H, W] bool -> [F, H, W] bool: the largest 8-connected component of each frame.

    Every pixel starts with its own label and takes the largest label of its 3 x 3 neighbourhood, inside
    the mask, until nothing changes (scipy is not available); slices beat max_pool2d on frames this small,
    and the work is cropped to the rows and columns that hold any foreground."""
    rows, cols = mask.any(dim=(0, 2)).nonzero()[:, 0], mask.any(dim=(0, 1)).nonzero()[:, 0]
    largest = torch.zeros_like(mask)
    if len(rows) == 0:
        return largest
    crop = (slice(None), slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    inside = mask[crop]  # [F, h, w]
    frames, pixels = len(inside), inside[0].numel()
    labels = torch.arange(1, inside.numel() + 1).reshape(inside.shape) * inside  # [F, h, w], unique over all frames
    for _ in range(pixels):
        padded = F.pad(labels, (1, 1, 1, 1))  # [F, h + 2, w + 2]
        grown = torch.maximum(torch.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])  # [F, h, w + 2]
        grown = torch.maximum(torch.maximum(grown[..., :-2], grown[..., 1:-1]), grown[..., 2:]) * inside  # [F, h, w]
        if torch.equal(grown, labels):
            break
        labels = grown
    counts = torch.bincount(labels.flatten(), minlength=inside.numel() + 1)[1:].reshape(frames, pixels)  # [F, h*w]
    best = counts.argmax(dim=1) + torch.arange(frames) * pixels + 1  # [F], the label of each frame's largest
    largest[crop] = (labels == best[:, None, None]) & inside
    return largest


def _pool(mask: torch.Tensor, size: int, erode: bool = False) -> torch.Tensor:
    """[V, H, W] bool dilated (or eroded) by a size x size square, as a maximum over shifted slices (rows,
    then columns), which is several times faster than max_pool2d on frames this small."""
    height, width, reach = mask.shape[-2], mask.shape[-1], size // 2
    x = F.pad((~mask if erode else mask).to(torch.uint8), (reach, reach, reach, reach))  # [V, H + 2r, W + 2r]
    x = torch.stack([x[:, i:i + height] for i in range(size)]).amax(dim=0)  # [V, H, W + 2r]
    x = torch.stack([x[..., i:i + width] for i in range(size)]).amax(dim=0)  # [V, H, W]
    return x == 0 if erode else x > 0


def _coverage(frames: torch.Tensor, background: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """[V, 3, H, W] frames -> [V, H, W]: each pixel's position between its frame's background (0) and
    ``colour`` (1). Linear in the frame, so blur moves coverage between pixels without changing its sum or
    centroid, and noise across the colour axis is ignored."""
    contrast = colour - background  # [V, 3]
    direction = contrast / contrast.square().sum(dim=1, keepdim=True)  # [V, 3]
    return ((frames - background[:, :, None, None]) * direction[:, :, None, None]).sum(dim=1)  # [V, H, W]


def detect(video: torch.Tensor) -> Detection:
    """Shape, colour and motion of the one object in a clip [3, F, H, W] in [-1, 1].

    The background is each frame's median colour (the object covers a small part of the frame). The
    object is the largest connected region more than halfway from the background to the object's colour,
    after a 3 x 3 smoothing that quietens noise without moving straight edges; blur, noise and a colour
    shift move the cut a little but not the decision."""
    with num_threads(1):  # tiny tensors: a second thread only adds synchronisation (~40x slower when busy)
        return _detect(video)


def _detect(video: torch.Tensor) -> Detection:
    check_video(video, (4,))
    frames = (video.detach().float().cpu().clamp(-1, 1).transpose(0, 1) + 1) * 127.5  # [F, 3, H, W], 0-255
    num_frames, _, height, width = frames.shape
    nothing = Detection(False, None, None, None, 0.0, 0.0, math.nan, math.nan, None, None)
    background = frames.flatten(2).median(dim=2).values  # [F, 3]
    distance = (frames - background[:, :, None, None]).square().sum(dim=1).sqrt()  # [F, H, W]
    candidates = distance > CANDIDATE_DISTANCE  # [F, H, W]
    if candidates.sum() < MIN_AREA_FRACTION * height * width:
        return nothing
    # a first estimate of the object's colour from the candidates furthest from the background (edges
    # blurred into the background would pull a plain median towards it)
    far = distance[candidates] >= distance[candidates].median()  # [n]
    colour = frames.permute(0, 2, 3, 1)[candidates][far].median(dim=0).values  # [3]
    if (colour - background).norm(dim=1).min() < CANDIDATE_DISTANCE:  # e.g. noise: its median is the background
        return nothing

    smooth = F.avg_pool2d(_coverage(frames, background, colour)[:, None], 3, stride=1, padding=1,
                          count_include_pad=False)[:, 0]  # [F, H, W]
    foreground = smooth > 0.5  # [F, H, W]
    plausible = foreground.flatten(1).float().mean(dim=1) <= MAX_FOREGROUND_FRACTION  # [F]
    objects = _largest_components(foreground & plausible[:, None, None])  # [F, H, W]
    visible = objects.flatten(1).sum(dim=1) >= MIN_AREA_FRACTION * height * width  # [F]
    if visible.float().mean() < MIN_VISIBLE_FRACTION:
        return nothing
    objects, frames, background = objects[visible], frames[visible], background[visible]  # V frames
    indices = visible.nonzero()[:, 0].float()  # [V]

    # the object's own colour from its interior (2 px in from the cut), where blur has not mixed in background
    interior = _pool(objects, 5, erode=True)  # [V, H, W]
    pixels = frames.permute(0, 2, 3, 1)  # [V, H, W, 3]
    colour = (pixels[interior] if interior.any() else pixels[objects]).median(dim=0).values  # [3]
    colour_name = list(COLOURS)[int((_PALETTE - colour).norm(dim=1).argmin())]

    # area and centroid from the coverage over the object and 3 px around it (blur- and noise-proof);
    # the bounding box from the cut, whose straight edges stay put under blur
    weights = _coverage(frames, background, colour) * _pool(objects, 7)  # [V, H, W]
    area = weights.sum((1, 2)).clamp(min=1.0)  # [V]
    rows = torch.arange(height, dtype=torch.float32)[None, :, None]  # [1, H, 1]
    cols = torch.arange(width, dtype=torch.float32)[None, None, :]  # [1, 1, W]
    top, bottom = torch.where(objects, rows, height).amin((1, 2)), torch.where(objects, rows, -1).amax((1, 2))  # [V]
    left, right = torch.where(objects, cols, width).amin((1, 2)), torch.where(objects, cols, -1).amax((1, 2))  # [V]
    box_h, box_w = bottom - top + 1, right - left + 1  # [V]
    centre_y = (weights * rows).sum((1, 2)) / area  # [V]
    centre_x = (weights * cols).sum((1, 2)) / area  # [V]
    fill = float((area / (box_h * box_w)).median())
    drop = float(((centre_y - (top + bottom) / 2) / box_h).median())
    shape = "triangle" if drop > TRIANGLE_DROP_ABOVE else "square" if fill > SQUARE_ABOVE else "circle"

    if len(indices) > 1:  # constant velocity: the slope of a linear fit, times the clip length
        dx, dy = (float(np.polyfit(indices.numpy(), c.numpy(), 1)[0]) * (num_frames - 1) for c in (centre_x, centre_y))
    else:
        dx = dy = 0.0
    if math.hypot(dx, dy) < STILL_BELOW_FRACTION * min(height, width):
        motion = "still"
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"  # rows grow downwards
    return Detection(True, shape, colour_name, motion, float(visible.float().mean()), float(area.median()), fill, drop,
                     tuple(round(float(c), 1) for c in colour), (dx, dy))


def adherence(videos: torch.Tensor, attributes: list[Attributes]) -> pd.DataFrame:
    """One row per clip [N, 3, F, H, W]: the prompted and detected attributes and whether each matches."""
    check_video(videos, (5,), "videos")
    attributes = list(attributes)
    if len(attributes) != len(videos):
        raise ValueError(f"{len(videos)} videos but {len(attributes)} attributes; give one Attributes per clip")
    for wanted in attributes:
        if not isinstance(wanted, Attributes):
            raise ValueError(f"attributes must hold Attributes (see utils.testbed.synthetic), got {wanted!r}")
    with num_threads(1):  # tiny tensors: a second thread only adds synchronisation (~40x slower when busy)
        detections = [_detect(v) for v in tqdm(videos, desc="detecting", unit="clip", disable=len(videos) < 100)]
    rows = []
    for wanted, found in zip(attributes, detections):
        row = dict(caption=wanted.caption, shape=wanted.shape, colour=wanted.colour, motion=wanted.motion,
                   found=found.found, detected_shape=found.shape, detected_colour=found.colour,
                   detected_motion=found.motion, fill_ratio=found.fill_ratio, centroid_drop=found.centroid_drop,
                   displacement_x_px=found.displacement_px[0] if found.found else math.nan,
                   displacement_y_px=found.displacement_px[1] if found.found else math.nan)
        for name in ("shape", "colour", "motion"):  # None (not found) never equals a wanted value
            row[f"correct_{name}"] = row[f"detected_{name}"] == row[name]
        row["all_correct"] = row["correct_shape"] and row["correct_colour"] and row["correct_motion"]
        rows.append(row)
    return pd.DataFrame(rows)


def adherence_margin(fraction: float, clips: int, z: float = 2.0) -> float:
    """How far two all-correct fractions, each measured on ``clips`` clips (captions x seeds) near ``fraction``,
    may differ by chance alone: ``z`` standard errors of the difference of two binomial fractions,
    ``z * sqrt(2 p (1 - p) / n)``. An optimised variant "keeps adherence" when it is no further than this
    below fp32 (the test of the int8 schemes and the report use this one bound)."""
    if clips < 1 or not 0 <= fraction <= 1:
        raise ValueError(f"a margin needs at least one clip and a fraction in [0, 1], got {clips}, {fraction}")
    return z * math.sqrt(2 * fraction * (1 - fraction) / clips)


def paired_margin(differences, z: float = 2.0) -> float:
    """How far the mean of per-clip differences (variant minus reference, each -1, 0 or 1, the same captions
    and noise) may lie from 0 by chance alone: ``z`` standard errors of that mean, ``z * sd / sqrt(n)``. Pairing
    removes the spread between clips that both runs share, so it is tighter than ``adherence_margin``; 0 when
    every clip agrees."""
    values = np.asarray(differences, dtype=float)
    if values.size < 2:
        raise ValueError(f"a paired margin needs at least two clips, got {values.size}")
    return float(z * values.std(ddof=1) / math.sqrt(values.size))


def adherence_summary(table: pd.DataFrame) -> dict:
    """Accuracy per attribute, all-correct and found rates (fractions in [0, 1]), and the clip count n."""
    if len(table) == 0:
        raise ValueError("the adherence table is empty; nothing to summarise")
    summary = {f"{name}_accuracy": float(table[f"correct_{name}"].mean()) for name in ("shape", "colour", "motion")}
    summary.update(all_correct=float(table["all_correct"].mean()), found=float(table["found"].mean()), n=len(table))
    return summary
