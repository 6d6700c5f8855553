"""Procedurally generated videos of one simple object, for a small text-to-video quality testbed.

Each clip shows one flat-coloured shape on a constant dark background, moving at constant velocity or
standing still; its caption says all three attributes ("a red circle moving left"). A model trained on
``TRAIN`` is judged on ``HELD_OUT`` combinations it never saw, with ``utils.testbed.adherence.detect`` reading the
attributes back from the frames.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

SHAPES = ("circle", "square", "triangle")

# well separated in RGB (every pair >= 170 apart, each >= 140 from the background) so colour survives a VAE
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
    "white": (235, 235, 235),
}

MOTIONS = ("left", "right", "up", "down", "still")

BACKGROUND = (48, 48, 48)  # dark grey, constant over the frame and the clip

NUM_FRAMES = 17  # the VAE compresses time x4: 17 frames -> 5 latent frames

SIZE = 64  # the VAE compresses space x8: 64 x 64 -> 8 x 8 latents

MIN_SIZE = 40  # objects scale with the frame; below 40 px they are under 9 px across and shapes blur together

# geometry at SIZE, scaled by size / SIZE for other frame sizes
OBJECT_PX = (22.0, 30.0)  # side / diameter / triangle base (= height), drawn uniformly per clip

TRAVEL_PX = (16.0, 24.0)  # distance the centre moves over the whole clip, drawn uniformly per clip

MARGIN_PX = 1  # background pixels kept between the object and the frame edge

# image rows grow downwards, so "up" decreases the row
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}  # (dx, dy)


def _check_choice(kind: str, value: str, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {kind} {value!r}; accepted: {', '.join(accepted)}")


# ---------------------------------------------------------------------------------------------
# attributes and captions
# ---------------------------------------------------------------------------------------------
_CAPTION = re.compile(r"an? (\w+) (\w+) (?:moving (\w+)|staying (still))")


@dataclass(frozen=True, order=True)
class Attributes:
    """What one clip shows; ordering (and so ``ALL_COMBINATIONS``) is by shape, colour, motion."""

    shape: str
    colour: str
    motion: str

    def __post_init__(self):
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("motion", self.motion, MOTIONS)

    @property
    def caption(self) -> str:
        movement = "staying still" if self.motion == "still" else f"moving {self.motion}"
        return f"a {self.colour} {self.shape} {movement}"

    @classmethod
    def parse(cls, caption: str) -> "Attributes":
        """Inverse of ``caption``; case, surrounding spaces and a final full stop are ignored."""
        match = _CAPTION.fullmatch(" ".join(caption.lower().strip().rstrip(".").split()))
        if match is None:
            raise ValueError(
                f"cannot parse caption {caption!r}; expected 'a <colour> <shape> moving <direction>' or "
                f"'a <colour> <shape> staying still' with colour in {{{', '.join(COLOURS)}}}, shape in "
                f"{{{', '.join(SHAPES)}}}, direction in {{{', '.join(m for m in MOTIONS if m != 'still')}}}")
        colour, shape, direction, still = match.groups()
        if direction == "still":
            raise ValueError(f"cannot parse caption {caption!r}: write 'staying still', not 'moving still'")
        return cls(shape, colour, direction or still)


ALL_COMBINATIONS = tuple(sorted(Attributes(s, c, m) for s in SHAPES for c in COLOURS for m in MOTIONS))

# Held out: (colour index + motion index) % 5 == shape index, a Latin-square pattern over the
# (colour, motion) grid. Each shape loses one motion per colour and one colour per motion, so 15 of 75
# combinations are held out while every (shape, colour) pair keeps 4 of its 5 motions, every
# (shape, motion) pair 4 of its 5 colours, and every (colour, motion) pair at least 2 of its 3 shapes:
# each held-out combination is a new composition of pairs all seen in training.
HELD_OUT = tuple(a for a in ALL_COMBINATIONS
                 if (list(COLOURS).index(a.colour) + MOTIONS.index(a.motion)) % len(MOTIONS) == SHAPES.index(a.shape))

TRAIN = tuple(a for a in ALL_COMBINATIONS if a not in HELD_OUT)


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def _shape_mask(shape: str, cx: float, cy: float, diameter: float, size: int) -> np.ndarray:
    """Hard (not anti-aliased) [size, size] bool mask of ``shape`` with its bounding box centred at (cx, cy)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres, [size, size] each
    half = diameter / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    # upright isosceles triangle: apex at the top centre, base (= height) along the bottom
    depth = y - (cy - half)  # 0 at the apex row, diameter at the base
    return (depth >= 0) & (depth <= diameter) & (np.abs(x - cx) <= depth / 2)


def _check_frames_and_size(num_frames: int, size: int) -> None:
    if int(num_frames) < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if int(size) < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px to fit a recognisable object and its motion "
                         f"(objects are {OBJECT_PX[0]:g}-{OBJECT_PX[1]:g} px and travel {TRAVEL_PX[0]:g}-"
                         f"{TRAVEL_PX[1]:g} px at {SIZE} px, scaled with size), got {size}")


def render_clip(attributes: Attributes, seed: int, num_frames: int = NUM_FRAMES, size: int = SIZE) -> torch.Tensor:
    """float32 [3, num_frames, size, size] in [-1, 1]; deterministic in (attributes, seed).

    The seed draws the object size, the travel distance and the start position; the attributes are
    mixed into the random stream too, so one seed gives different geometry for different captions.
    The object stays fully inside the frame (with a ``MARGIN_PX`` border) in every frame."""
    if not isinstance(attributes, Attributes):
        raise ValueError(f"attributes must be an Attributes, got {type(attributes).__name__}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    _check_frames_and_size(num_frames, size)
    num_frames, size = int(num_frames), int(size)
    scale = size / SIZE
    rng = np.random.default_rng([int(seed), SHAPES.index(attributes.shape), list(COLOURS).index(attributes.colour),
                                 MOTIONS.index(attributes.motion)])
    diameter = rng.uniform(*OBJECT_PX) * scale
    dx, dy = _DIRECTIONS[attributes.motion]
    travel = rng.uniform(*TRAVEL_PX) * scale if attributes.motion != "still" else 0.0
    # the path's low end is uniform over the positions that keep the whole path inside the frame
    lo, hi = MARGIN_PX + diameter / 2, size - MARGIN_PX - diameter / 2
    start = []
    for direction in (dx, dy):
        low_end = rng.uniform(lo, hi - travel * abs(direction))
        start.append(low_end + travel if direction < 0 else low_end)

    background = np.array(BACKGROUND, dtype=np.float32) / 127.5 - 1  # [3]
    colour = np.array(COLOURS[attributes.colour], dtype=np.float32) / 127.5 - 1  # [3]
    video = np.broadcast_to(background[:, None, None, None], (3, num_frames, size, size)).copy()  # [3, F, H, W]
    for frame in range(num_frames):
        progress = frame / (num_frames - 1) if num_frames > 1 else 0.0
        mask = _shape_mask(attributes.shape, start[0] + dx * travel * progress, start[1] + dy * travel * progress,
                           diameter, size)  # [H, W]
        video[:, frame, mask] = colour[:, None]
    return torch.from_numpy(video)


def make_dataset(combinations, clips_per_combination: int, seed: int, num_frames: int = NUM_FRAMES,
                 size: int = SIZE) -> tuple[torch.Tensor, list[Attributes]]:
    """[N, 3, F, H, W] clips, ``clips_per_combination`` per combination in the given order, and their attributes.

    ``seed`` draws one clip seed per clip index, shared by all combinations (``render_clip`` mixes the
    attributes in), so a clip does not depend on which other combinations are in the list. The first
    clips of a larger set with the same seed are the same clips: give a validation set its own seed."""
    combinations = list(combinations)
    if not combinations:
        raise ValueError("combinations is empty; pass Attributes, e.g. synthetic.TRAIN")
    for item in combinations:
        if not isinstance(item, Attributes):
            raise ValueError(f"combinations must hold Attributes (e.g. synthetic.TRAIN), got {item!r}")
    if int(clips_per_combination) < 1:
        raise ValueError(f"clips_per_combination must be at least 1, got {clips_per_combination}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    _check_frames_and_size(num_frames, size)
    clip_seeds = np.random.default_rng(int(seed)).integers(0, 2 ** 31, size=int(clips_per_combination))
    jobs = [(a, int(s)) for a in combinations for s in clip_seeds]
    videos = torch.empty(len(jobs), 3, int(num_frames), int(size), int(size))  # [N, 3, F, H, W]
    for i, (attributes, clip_seed) in enumerate(tqdm(jobs, desc="rendering clips", unit="clip")):
        videos[i] = render_clip(attributes, clip_seed, num_frames, size)
    return videos, [a for a, _ in jobs]
