"""The procedural testbed videos: determinism, geometry, the train / held-out split and captions."""
import itertools

import pytest
import torch

from utils.testbed import synthetic
from utils.testbed.synthetic import (
    ALL_COMBINATIONS,
    BACKGROUND,
    COLOURS,
    HELD_OUT,
    MOTIONS,
    NUM_FRAMES,
    SHAPES,
    SIZE,
    TRAIN,
    Attributes,
    make_dataset,
    render_clip,
)

BACKGROUND_VALUE = torch.tensor(BACKGROUND, dtype=torch.float32) / 127.5 - 1  # [3]


pytestmark = pytest.mark.usefixtures("one_thread")


def object_mask(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] -> [F, H, W]: pixels that are not background."""
    return (video - BACKGROUND_VALUE[:, None, None, None]).abs().amax(dim=0) > 1e-6


def centroids(mask: torch.Tensor) -> torch.Tensor:
    """[F, H, W] -> [F, 2] (x, y) pixel centroids."""
    ys, xs = torch.meshgrid(torch.arange(mask.shape[1]), torch.arange(mask.shape[2]), indexing="ij")
    area = mask.sum((1, 2))
    return torch.stack([(mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area], dim=1)


def test_clip_shape_range_and_colours():
    attributes = Attributes("triangle", "yellow", "up")
    video = render_clip(attributes, seed=3)
    assert video.shape == (3, NUM_FRAMES, SIZE, SIZE) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    # exactly two colours: the background and the object's (hard masks, no anti-aliasing)
    colours = torch.unique(video.flatten(1).T, dim=0)
    expected = torch.stack([BACKGROUND_VALUE, torch.tensor(COLOURS["yellow"], dtype=torch.float32) / 127.5 - 1])
    assert torch.allclose(colours.sort(dim=0).values, expected.sort(dim=0).values)


def test_clips_are_deterministic_in_attributes_and_seed():
    red_circle = Attributes("circle", "red", "left")
    assert torch.equal(render_clip(red_circle, 7), render_clip(red_circle, 7))
    assert not torch.equal(render_clip(red_circle, 7), render_clip(red_circle, 8))
    # the attributes are mixed into the random stream: same seed, same colour and shape, other geometry
    other = render_clip(Attributes("circle", "red", "right"), 7)
    assert not torch.equal(object_mask(render_clip(red_circle, 7))[0], object_mask(other)[0])


def test_object_inside_frame_with_the_promised_size_and_motion():
    for attributes, seed in itertools.product(ALL_COMBINATIONS, range(2)):
        where = f"{attributes.caption}, seed {seed}"
        mask = object_mask(render_clip(attributes, seed))  # [F, H, W]
        # visible in every frame, never touching the border
        assert mask.flatten(1).any(dim=1).all(), where
        assert not (mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any()), where
        widths = mask.any(dim=1).sum(dim=1)  # [F]
        low, high = synthetic.OBJECT_PX
        assert low - 1 <= widths.min() and widths.max() <= high + 1, (where, widths)
        dx, dy = (centroids(mask[-1:]) - centroids(mask[:1]))[0].tolist()
        if attributes.motion == "still":
            assert torch.equal(mask[0], mask[-1]), where
            continue
        along, across = (dx, dy) if attributes.motion in ("left", "right") else (dy, dx)
        sign = 1 if attributes.motion in ("right", "down") else -1  # rows grow downwards
        assert synthetic.TRAVEL_PX[0] - 1 <= sign * along <= synthetic.TRAVEL_PX[1] + 1 and abs(across) < 1.5, (
            where, dx, dy)


def test_split_is_a_partition_that_trains_every_value_and_pair():
    assert len(ALL_COMBINATIONS) == 75 and len(set(ALL_COMBINATIONS)) == 75
    assert list(ALL_COMBINATIONS) == sorted(ALL_COMBINATIONS)
    assert len(HELD_OUT) == 15 and len(TRAIN) == 60
    assert not set(TRAIN) & set(HELD_OUT)
    assert set(TRAIN) | set(HELD_OUT) == set(ALL_COMBINATIONS)
    for field, values in (("shape", SHAPES), ("colour", COLOURS), ("motion", MOTIONS)):
        counts = [sum(getattr(a, field) == v for a in TRAIN) for v in values]
        assert min(counts) >= 10, (field, counts)
    # every pair of values (e.g. red + moving left) is seen in training: held-out clips are new compositions
    for first, second in itertools.combinations(("shape", "colour", "motion"), 2):
        seen = {(getattr(a, first), getattr(a, second)) for a in TRAIN}
        wanted = {(getattr(a, first), getattr(a, second)) for a in ALL_COMBINATIONS}
        assert seen == wanted, (first, second, wanted - seen)


def test_caption_round_trip_and_parse_tolerance():
    assert Attributes("circle", "red", "left").caption == "a red circle moving left"
    assert Attributes("square", "blue", "still").caption == "a blue square staying still"
    for attributes in ALL_COMBINATIONS:
        assert Attributes.parse(attributes.caption) == attributes
    assert Attributes.parse("  A White  Triangle moving DOWN. ") == Attributes("triangle", "white", "down")


@pytest.mark.parametrize("caption, words", [
    ("a purple circle moving left", "yellow"),  # unknown colour: the message lists the accepted ones
    ("a red hexagon moving left", "triangle"),
    ("a red circle moving sideways", "still"),
    ("a red circle moving still", "staying still"),
    ("red circle", "staying still"),
])
def test_bad_captions_say_what_is_accepted(caption, words):
    with pytest.raises(ValueError, match=words):
        Attributes.parse(caption)


def test_bad_inputs_fail_early_with_the_accepted_values():
    with pytest.raises(ValueError, match="circle, square, triangle"):
        Attributes("hexagon", "red", "left")
    with pytest.raises(ValueError, match="red, green, blue, yellow, white"):
        Attributes("circle", "purple", "left")
    with pytest.raises(ValueError, match="left, right, up, down, still"):
        Attributes("circle", "red", "diagonal")
    red_circle = Attributes("circle", "red", "left")
    with pytest.raises(ValueError, match="num_frames must be at least 1"):
        render_clip(red_circle, 0, num_frames=0)
    with pytest.raises(ValueError, match="size must be at least"):
        render_clip(red_circle, 0, size=16)
    with pytest.raises(ValueError, match="non-negative"):
        render_clip(red_circle, -1)
    with pytest.raises(ValueError, match="Attributes"):
        render_clip(("circle", "red", "left"), 0)
    with pytest.raises(ValueError, match="clips_per_combination"):
        make_dataset(TRAIN, 0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        make_dataset([], 1, seed=0)
    with pytest.raises(ValueError, match="Attributes"):
        make_dataset(["a red circle moving left"], 1, seed=0)


def test_other_lengths_and_sizes():
    still = render_clip(Attributes("square", "green", "still"), 1, num_frames=1, size=128)
    assert still.shape == (3, 1, 128, 128)
    moving = object_mask(render_clip(Attributes("square", "green", "right"), 1, num_frames=5, size=128))
    assert centroids(moving)[-1, 0] - centroids(moving)[0, 0] >= 2 * 15  # travel scales with the frame


def test_make_dataset_layout_and_independence():
    red_circle, blue_square = Attributes("circle", "red", "left"), Attributes("square", "blue", "up")
    videos, labels = make_dataset([red_circle, blue_square], 3, seed=5, num_frames=9, size=64)
    assert videos.shape == (6, 3, 9, 64, 64) and videos.dtype == torch.float32
    assert labels == [red_circle] * 3 + [blue_square] * 3
    assert len({tuple(object_mask(v)[0].nonzero()[0].tolist()) for v in videos[:3]}) > 1  # clips differ
    again, _ = make_dataset([red_circle, blue_square], 3, seed=5, num_frames=9, size=64)
    assert torch.equal(videos, again)
    # a clip depends on its combination, index and the seed, not on which other combinations are listed
    alone, _ = make_dataset([blue_square], 3, seed=5, num_frames=9, size=64)
    assert torch.equal(alone, videos[3:])
    other_seed, _ = make_dataset([blue_square], 3, seed=6, num_frames=9, size=64)
    assert not torch.equal(other_seed, alone)
