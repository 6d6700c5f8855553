"""OpenSora VAE v1.2 against upstream: tiny-VAE numerics, the real checkpoint layout, latent sizes."""
import json

import pytest
import torch
from safetensors.torch import load_file

from utils.model.vae import VAE_PRESETS, build_vae
from utils.model.weights import materialize_random, read_manifest, state_dict_shapes
from utils.paths import UPSTREAM

FIXTURE = UPSTREAM / "vae_v1_2_tiny_reference"
TOLERANCE = 1e-5  # fp32, max abs error


@pytest.fixture(scope="module")
def reference():
    meta = json.loads(FIXTURE.with_suffix(".json").read_text())
    return meta, load_file(str(FIXTURE.with_suffix(".safetensors")))


@pytest.fixture(scope="module")
def tiny_vae(reference):
    meta, tensors = reference
    prefix = meta["weights_prefix"]
    vae = build_vae("tiny")
    vae.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return vae


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs().max().item()
    assert error <= TOLERANCE, f"{what}: max abs error {error:.3g} > {TOLERANCE}"


def _as_tuples(config):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def test_tiny_preset_is_the_fixture_config(reference):
    meta, _ = reference
    preset = VAE_PRESETS["tiny"]
    assert _as_tuples(preset["spatial_vae_config"]) == _as_tuples(meta["spatial_vae_config"])
    assert _as_tuples(preset["temporal_vae_config"]) == _as_tuples(meta["temporal_vae_config"])
    pipeline = {k: v for k, v in meta["pipeline_config"].items() if k != "cal_loss"}  # training-only switch
    assert _as_tuples(preset["pipeline_config"]) == _as_tuples(pipeline)


@torch.no_grad()
def test_case1_decode(reference, tiny_vae):
    _, tensors = reference
    z = tensors["case1.input.z"]
    chunk0 = tiny_vae.temporal_vae.decode((z * tiny_vae.scale + tiny_vae.shift)[:, :, :5], num_frames=17)
    assert_close(chunk0, tensors["case1.intermediate.temporal_decode_chunk0"], "temporal decode of chunk 0")
    assert_close(tiny_vae.decode(z, num_frames=51), tensors["case1.output"], "decode")


@torch.no_grad()
def test_case2_temporal_encoder_moments(reference, tiny_vae):
    _, tensors = reference
    posterior = tiny_vae.temporal_vae.encode(tensors["case2.input.x_z"])
    assert_close(posterior.moments, tensors["case2.output.moments"], "temporal moments")


@torch.no_grad()
def test_case3_spatial_encode_mean(reference, tiny_vae):
    _, tensors = reference
    latent = tiny_vae.spatial_vae.encode(tensors["case3.input.video"], sample=False)
    assert_close(latent, tensors["case3.output.latent_mean_scaled"], "spatial encode mean * 0.18215")


@torch.no_grad()
def test_encode_decode_shapes_and_sampling(tiny_vae):
    video = torch.rand(1, 3, 20, 16, 24) * 2 - 1
    mean = tiny_vae.encode(video, sample=False)
    assert list(mean.shape) == [1, 4] + tiny_vae.get_latent_size([20, 16, 24])  # 17 -> 5, 3 -> 1
    first = tiny_vae.encode(video, generator=torch.Generator().manual_seed(0))
    again = tiny_vae.encode(video, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and not torch.equal(first, mean)
    assert tiny_vae.decode(mean, num_frames=20).shape == (1, 3, 20, 16, 24)


def test_real_preset_matches_checkpoint_manifest():
    vae = build_vae("OpenSoraVAE_V1_2", device="meta")
    built, manifest = state_dict_shapes(vae), read_manifest("vae")
    missing = sorted(set(manifest) - set(built))
    unexpected = sorted(set(built) - set(manifest))
    wrong = {k: (built[k], manifest[k]) for k in set(built) & set(manifest) if built[k] != manifest[k]}
    assert built == manifest, f"missing {missing[:10]}, unexpected {unexpected[:10]}, shape (built, manifest) {wrong}"


def test_get_latent_size_table(reference):
    meta, _ = reference
    vae = build_vae("OpenSoraVAE_V1_2", device="meta")
    for key, expected in meta["get_latent_size"].items():
        size = [int(s) for s in key.split("x")]
        assert vae.get_latent_size(size) == expected, key


@torch.no_grad()
def test_materialize_random_keeps_scale_shift():
    vae = materialize_random(build_vae("tiny", device="meta"), torch.float32, seed=1)
    assert torch.equal(vae.scale.flatten(), torch.tensor(VAE_PRESETS["tiny"]["pipeline_config"]["scale"]))
    assert torch.equal(vae.shift.flatten(), torch.tensor(VAE_PRESETS["tiny"]["pipeline_config"]["shift"]))
    video = vae.decode(torch.randn(1, 4, 2, 2, 3), num_frames=5)
    assert video.shape == (1, 3, 5, 16, 24) and torch.isfinite(video).all()


def test_unknown_preset_names_accepted_ones():
    with pytest.raises(ValueError, match="OpenSoraVAE_V1_2.*tiny"):
        build_vae("sdxl")


@pytest.mark.parametrize("call, message", [
    (lambda vae: vae.encode(torch.zeros(1, 3, 8, 8)), "video must be 5-D"),
    (lambda vae: vae.encode(torch.zeros(1, 4, 1, 8, 8)), "3 channels"),
    (lambda vae: vae.decode(torch.zeros(1, 3, 1, 1, 1), num_frames=1), "4 channels"),
    (lambda vae: vae.decode(torch.zeros(1, 4, 2, 1, 1), num_frames=17), "need 5 latent frames"),
])
def test_bad_input_is_rejected(tiny_vae, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_vae)
