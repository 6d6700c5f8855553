"""Loading checkpoints written in the official file layout, strictly; refusing broken ones clearly."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration

from utils.model.pipeline import load_pipeline
from utils.model.stdit3 import STDIT3_PRESETS, build_stdit3
from utils.model.text_encoder import T5_PRESETS
from utils.model.vae import build_vae
from utils.model.weights import REPOS, CheckpointError, materialize_random


def _official_layout(root, transformer_state, vae_state, t5_state, config):
    """Write the three repos as the hub has them: safetensors for STDiT3 and the VAE, two pickle
    shards with an index (encoder and decoder together) for T5."""
    stdit = root / REPOS["transformer"]
    stdit.mkdir(parents=True)
    save_file(transformer_state, stdit / "model.safetensors")
    (stdit / "config.json").write_text(json.dumps(config))
    vae = root / REPOS["vae"]
    vae.mkdir(parents=True)
    save_file(vae_state, vae / "model.safetensors")
    t5 = root / REPOS["text_encoder"]
    t5.mkdir(parents=True)
    names = sorted(t5_state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: t5_state[k].clone() for k in keys}, t5 / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (t5 / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def checkpoint(tmp_path):
    transformer = materialize_random(build_stdit3("tiny", device="meta"), torch.float32, seed=1)
    vae = materialize_random(build_vae("tiny", device="meta"), torch.float32, seed=2)
    with torch.device("meta"):
        t5_full = T5ForConditionalGeneration(T5Config(**T5_PRESETS["tiny"]))
    materialize_random(t5_full, torch.float32, seed=3)
    config = dataclasses.asdict(STDIT3_PRESETS["tiny"]) | {
        "model_type": "STDiT3", "architectures": ["STDiT3"], "torch_dtype": "float32", "enable_flash_attn": False}
    states = dict(transformer=transformer.state_dict(), vae=vae.state_dict(),
                  t5={k: v for k, v in t5_full.state_dict().items()})
    return tmp_path, states, config


def test_official_layout_loads_strictly(checkpoint):
    root, states, config = checkpoint
    _official_layout(root, states["transformer"], states["vae"], states["t5"], config)
    pipe = load_pipeline("tiny", weights=str(root), dtype="fp32")
    for name, value in states["transformer"].items():
        assert torch.equal(pipe.transformer.state_dict()[name], value), name
    for name, value in states["vae"].items():
        assert torch.equal(pipe.vae.state_dict()[name], value), name
    encoder = pipe.text_encoder.model
    assert torch.equal(encoder.shared.weight, states["t5"]["shared.weight"])
    assert encoder.encoder.embed_tokens.weight is encoder.shared.weight  # tied, stored once
    assert torch.equal(encoder.state_dict()["encoder.block.1.layer.1.DenseReluDense.wo.weight"],
                       states["t5"]["encoder.block.1.layer.1.DenseReluDense.wo.weight"])
    assert str(root) in pipe.weights


def test_bf16_load_casts_once(checkpoint):
    root, states, config = checkpoint
    _official_layout(root, states["transformer"], states["vae"], states["t5"], config)
    pipe = load_pipeline("tiny", weights=str(root), dtype="bf16")
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.text_encoder.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("corrupt,expected", [
    (lambda s: s.pop("final_layer.linear.bias"), "missing keys: final_layer.linear.bias"),
    (lambda s: s.update({"extra.weight": torch.zeros(2)}), "unexpected keys: extra.weight"),
    (lambda s: s.update({"t_block.1.weight": torch.zeros(3, 3)}), "mis-shaped keys: t_block.1.weight (file (3, 3)"),
])
def test_corrupted_transformer_is_refused(checkpoint, corrupt, expected):
    root, states, config = checkpoint
    corrupt(states["transformer"])
    _official_layout(root, states["transformer"], states["vae"], states["t5"], config)
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_pipeline("tiny", weights=str(root))


def test_corrupted_vae_and_t5_are_refused(checkpoint):
    root, states, config = checkpoint
    states["t5"].pop("encoder.final_layer_norm.weight")
    _official_layout(root, states["transformer"], states["vae"], states["t5"], config)
    with pytest.raises(CheckpointError, match="missing keys: encoder.final_layer_norm.weight"):
        load_pipeline("tiny", weights=str(root))


def test_unreadable_file_is_refused(checkpoint):
    root, states, config = checkpoint
    _official_layout(root, states["transformer"], states["vae"], states["t5"], config)
    (root / REPOS["vae"] / "model.safetensors").write_bytes(b"truncated download")
    with pytest.raises(CheckpointError, match="model.safetensors could not be read"):
        load_pipeline("tiny", weights=str(root))


def test_missing_shard_and_wrong_config(checkpoint):
    root, states, config = checkpoint
    _official_layout(root, states["transformer"], states["vae"], states["t5"], config | {"depth": 3})
    with pytest.raises(CheckpointError, match="config.json describes"):
        load_pipeline("tiny", weights=str(root))
    (root / REPOS["transformer"] / "config.json").write_text(json.dumps(config))
    (root / REPOS["text_encoder"] / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="shards that are missing: pytorch_model-00002-of-00002.bin"):
        load_pipeline("tiny", weights=str(root))


def test_absent_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pipeline("tiny", weights=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no transformer weights for hpcai-tech/OpenSora-STDiT-v3"):
        load_pipeline("tiny", weights=str(tmp_path))


def test_reloading_a_released_transformer_gives_the_same_random_weights():
    model = build_stdit3("tiny", device="meta")
    materialize_random(model, torch.float32, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.rope.rotate_queries_or_keys(torch.zeros(1, 1, 5, model.config.head_dim))  # fills rope.cached_freqs
    assert model.rope.cached_freqs is not None
    model.to("meta")
    materialize_random(model, torch.float32, seed=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
