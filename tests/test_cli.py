"""The command line on the tiny preset: a playable mp4, deterministic frames, and clear refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from utils import generate, io
from utils.model import memory, weights
from utils.model.video import read_mp4
from utils.paths import REPO

TINY = ["--model", "tiny", "--prompt", "a red circle moving left", "--resolution", "144p",
        "--aspect-ratio", "9:16", "--num-frames", "17", "--steps", "2", "--dtype", "fp32"]


def test_writes_mp4_frames_and_record(tmp_path):
    out = tmp_path / "clip.mp4"
    result = subprocess.run([sys.executable, "-m", "utils.generate", *TINY, "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "weights: random" in result.stdout and "denoise" in result.stdout
    video = read_mp4(out)
    assert video.shape == (17, 144, 256, 3)
    frames = np.load(tmp_path / "clip.npz")["frames"]
    assert frames.shape == (17, 144, 256, 3) and frames.dtype == np.uint8
    # the random model's frames are noise, which 4:2:0 h264 smears per pixel (and the yuv round trip
    # shifts colours by a few levels), but the picture is still the same one
    assert np.corrcoef(video.ravel().astype(float), frames.ravel().astype(float))[0, 1] > 0.9
    assert np.abs(video.mean(axis=(1, 2)) - frames.mean(axis=(1, 2))).max() < 6
    record = json.loads((tmp_path / "clip.json").read_text())
    assert record["weights"] == "random" and record["setting"]["num_frames"] == 17
    assert set(record["seconds"]) == {"encode_prompt", "prepare_latents", "denoise", "decode"}


def test_same_seed_same_frames(tmp_path):
    for name in ("a", "b"):
        assert generate.main([*TINY, "--seed", "7", "--out", str(tmp_path / f"{name}.mp4")]) == 0
    first, second = (np.load(tmp_path / f"{n}.npz")["frames"] for n in ("a", "b"))
    assert np.array_equal(first, second)
    assert generate.main([*TINY, "--seed", "8", "--out", str(tmp_path / "c.mp4")]) == 0
    assert not np.array_equal(first, np.load(tmp_path / "c.npz")["frames"])


def _with(option, value):
    args = list(TINY)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


@pytest.mark.parametrize("args,message", [
    (_with("--resolution", "1440p"), "unknown resolution '1440p'; accepted: 144p, 240p"),
    (_with("--aspect-ratio", "16:10"), "unknown aspect ratio '16:10'; accepted (H:W)"),
    (_with("--num-frames", "0"), "frame count 0 out of range; accepted: a duration"),
    (_with("--num-frames", "100000"), "frame count 100000 out of range"),
    (_with("--num-frames", "3 seconds"), "not understood"),
    (_with("--num-frames", "4"), "frame count 4 is not supported: upstream's timestep shift needs 1"),
    (_with("--steps", "0"), "steps must be at least 1"),
    (_with("--prompt", "   "), "--prompt is empty"),
    (_with("--weights", "/nonexistent/weights"), "--weights /nonexistent/weights does not exist"),
    (_with("--threads", "0"), "--threads must be at least 1"),
    (_with("--cfg-scale", "-1"), "cfg_scale must be at least 0"),
    (_with("--cfg-scale", "nan"), "cfg_scale must be at least 0"),
    (_with("--weights", "trained-mini"), "--weights trained-mini are the mini model's (--model mini), not tiny's"),
    (_with("--cache", "deepcache"), "--cache: unknown cache 'deepcache'; accepted: teacache"),
    (_with("--cache", "teacache:abc"), "'abc' is not a float"),
    (_with("--cache", "teacache:-1"), "must be at least 0"),
    (_with("--cache", "pab:2"), "pab takes no value"),
    (_with("--cache", "magcache"), "measured for 30 steps; got --steps 2"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([*args, "--out", str(tmp_path / "clip.mp4")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_step_cache_from_the_command_line(tmp_path):
    args = [*_with("--steps", "6"), "--cache", "teacache:1e9", "--out", str(tmp_path / "clip.mp4")]
    assert generate.main(args) == 0
    record = json.loads((tmp_path / "clip.json").read_text())
    # only the first and the last step ran the blocks at an unreachable threshold
    assert record["cache"]["evaluations"] == 2 and record["optimizations"].startswith("teacache(")


def test_wrong_output_suffix(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([*TINY, "--out", str(tmp_path / "clip.avi")])
    assert exit_info.value.code == 2 and "--out must end in .mp4" in capsys.readouterr().err


def test_incomplete_weights_folder_exits_2(tmp_path, capsys):
    weights = tmp_path / "weights" / "hpcai-tech" / "OpenSora-STDiT-v3"
    weights.mkdir(parents=True)
    (weights / "model.safetensors").write_bytes(b"not a safetensors file")
    code = generate.main([*_with("--weights", str(tmp_path / "weights")), "--out", str(tmp_path / "clip.mp4")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no vae weights for hpcai-tech/OpenSora-VAE-v1.2" in err and "no text_encoder weights" in err
    assert "no transformer weights" not in err
    assert not list(tmp_path.glob("clip*"))


def test_not_enough_memory_exits_2_before_building(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 8 * io.GIB)
    args = [*_with("--model", "opensora-v1.2"), "--dtype", "bf16", "--out", str(tmp_path / "clip.mp4")]
    assert generate.main(args) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "8.0 GiB is available" in err and "a lower resolution" in err
    assert os.listdir(tmp_path) == []


def test_the_mini_model_runs_from_the_command_line_with_its_trained_weights(tmp_path):
    if not weights.weights_present():
        pytest.skip("the trained mini model is not in data/mini-model")
    mini = ["--model", "mini", "--prompt", "a red circle moving right", "--num-frames", "1", "--steps", "2"]
    for name, folder in (("named", weights.TRAINED_MINI), ("folder", str(weights.MINI_DIR))):
        assert generate.main([*mini, "--weights", folder, "--out", str(tmp_path / f"{name}.mp4")]) == 0
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["model"] == "mini" and "mini-model" in record["weights"]
    named, folder = (np.load(tmp_path / f"{n}.npz")["frames"] for n in ("named", "folder"))
    assert np.array_equal(named, folder)  # the same weights by name or by folder


def test_start_up_prints_no_library_noise():
    code = "import utils.generate, utils.optim.registry, utils.experiments.variant_runs"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for noise in ("Failed to load", "Unable to import `torchao`", "register_constant"):
        assert noise not in result.stderr, result.stderr[-2000:]
