"""Resolution, aspect-ratio and frame-count tables (upstream opensora/datasets/aspect.py)."""
import pytest

from utils.model import aspect


@pytest.mark.parametrize("resolution,ratio,size", [
    ("144p", "9:16", (144, 256)), ("240p", "9:16", (240, 426)), ("360p", "16:9", (640, 360)),
    ("480p", "1:1", (640, 640)), ("720p", "9:16", (720, 1280)), ("144p", "3:4", (166, 221)),
])
def test_image_size(resolution, ratio, size):
    assert aspect.image_size(resolution, ratio) == size


@pytest.mark.parametrize("name,frames", [("2s", 51), ("4s", 102), ("8s", 204), ("16s", 408), ("17", 17), (1, 1)])
def test_num_frames(name, frames):
    assert aspect.num_frames(name) == frames


@pytest.mark.parametrize("value", [0, -3, 10_000, "3s", "many"])
def test_bad_frame_counts_say_what_is_accepted(value):
    with pytest.raises(ValueError, match="accepted: a duration"):
        aspect.num_frames(value)


def test_unknown_resolution_and_ratio():
    with pytest.raises(ValueError, match="accepted: 144p, 240p"):
        aspect.image_size("1440p", "9:16")
    with pytest.raises(ValueError, match=r"accepted \(H:W\)"):
        aspect.image_size("144p", "16:10")


def test_image_fps():
    assert aspect.fps_for(1) == 120 and aspect.fps_for(51) == 24
