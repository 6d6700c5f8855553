"""The quality testbed's mini model: tokenizer, strict loading of the committed weights, training code,
and the adherence of the committed model against controls that must fail."""
import json

import pytest
import torch

from utils.model import weights
from utils.model.pipeline import TIMESTEP_TRANSFORM, load_pipeline
from utils.model.sampler import rflow_sample
from utils.model.weights import CheckpointError
from utils.testbed import minimodel, synthetic
from utils.testbed import training as minitrain
from utils.testbed.adherence import adherence, adherence_summary
from utils.testbed.noise_floor import perturb_weights, restore_weights

# A third of the training combinations and every held-out one, one seed. On these the committed model
# (weights 7d4d8adc3c65) gets all three attributes right in 70 % (train) and 80 % (held out) of clips and
# colour in all of them; the bounds leave room for another machine's reduction order, and controls must fail.
TRAIN_CAPTIONS = synthetic.TRAIN[::3]  # 20 combinations
HELD_OUT_CAPTIONS = synthetic.HELD_OUT


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return load_pipeline("mini", weights="trained-mini", dtype="fp32")


def score(pipe, combinations, cfg_scale=7.0, seed=0):
    video, _ = minimodel.generate(pipe, combinations, seed=seed, cfg_scale=cfg_scale)
    return adherence_summary(adherence(video, list(combinations)))


def test_tokenizer_covers_every_caption_without_unknown_words(pipe):
    ids, mask = pipe.text_encoder.tokenize(minimodel.caption_corpus())
    tokenizer = pipe.tokenizer
    assert ids.shape[1] == pipe.transformer.config.model_max_length
    assert not (ids == tokenizer.unk_token_id).any()
    lengths = mask.sum(1)
    assert (ids[torch.arange(len(ids)), lengths - 1] == tokenizer.eos_token_id).all()  # EOS closes each caption
    assert lengths.max() < ids.shape[1]  # nothing truncated


def test_committed_weights_load_strictly_and_record_how_they_were_made():
    record = json.loads((weights.MINI_DIR / "training.json").read_text())
    assert record["config"]["dit_steps"] > 0 and record["seconds"]["total"] > 0
    with pytest.raises(ValueError, match="belong to the 'mini' preset"):
        load_pipeline("tiny", weights="trained-mini")


def test_a_mismatched_checkpoint_is_refused(tmp_path):
    for component, folder in weights.component_dirs(tmp_path).items():
        folder.mkdir(parents=True)
        source = weights.MINI_DIR / component
        for file in source.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "transformer" / "model.safetensors")
    state.pop("final_layer.linear.bias")
    save_file(state, tmp_path / "transformer" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: final_layer.linear.bias"):
        load_pipeline("mini", weights=str(tmp_path))


def test_weights_id_tells_weights_apart(tmp_path):
    for component, folder in weights.component_dirs(tmp_path).items():
        folder.mkdir(parents=True)
        for file in (weights.MINI_DIR / component).iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
    committed = weights.weights_id()
    assert len(committed) == 12 and weights.weights_id(tmp_path) == committed  # content, not location
    vae_file = tmp_path / "vae" / "model.safetensors"
    data = bytearray(vae_file.read_bytes())
    data[-1] ^= 1  # one bit of one parameter
    vae_file.write_bytes(bytes(data))
    assert weights.weights_id(tmp_path) != committed
    vae_file.unlink()
    assert weights.weights_id(tmp_path) is None
    assert minimodel.quality_config("mini", "trained-mini", 30, 1)["mini_weights"] == committed
    assert "mini_weights" not in minimodel.quality_config("tiny", "random", 2, 1)


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make mini-model"):
        load_pipeline("mini", weights=str(tmp_path))


def test_training_code_runs_end_to_end_and_its_output_loads(tmp_path):
    config = minitrain.TrainConfig(clips_per_combination=1, spatial_steps=1, temporal_steps=1, dit_steps=2,
                                   spatial_batch=2, temporal_batch=2, dit_batch=2)
    record = minitrain.train(config, tmp_path)
    assert set(record["losses"]) == {"spatial_vae", "temporal_vae", "transformer"}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in record["losses"].values())
    trained = load_pipeline("mini", weights=str(tmp_path), dtype="fp32")  # strict key checks
    assert torch.equal(trained.vae.scale.flatten(), torch.tensor(record["latent_scale"]))
    records = minitrain.training_records(record)
    assert {r.metric for r in records} == {"training_seconds", "final_loss"}
    assert {r.config["mini_weights"] for r in records} == {weights.weights_id(tmp_path)}


def test_learning_rate_schedules():
    warm = [minitrain.lr_factor(step, 1000, warmup=100, schedule="cosine") for step in range(1000)]
    assert warm[0] == pytest.approx(0.01) and warm[99] == 1.0 and warm[100] == 1.0  # linear warm-up, then the peak
    assert all(a >= b for a, b in zip(warm[100:], warm[101:]))  # decays monotonically
    assert warm[550] == pytest.approx(0.5) and 0 < warm[-1] < 1e-4  # half way: half; the last step: almost zero
    assert {minitrain.lr_factor(step, 1000, warmup=100) for step in range(100, 1000)} == {1.0}  # constant
    with pytest.raises(ValueError, match="accepted: constant, cosine"):
        minitrain.TrainConfig(dit_schedule="linear")


def test_training_timesteps_follow_upstreams_transform():
    gen = torch.Generator().manual_seed(0)
    t = minitrain.sample_timesteps(10_000, torch.tensor([1.0]), gen)
    assert 0 < t.min() and t.max() < 1000 and abs(t.median().item() - 500) < 20  # logit-normal, centred
    shifted = minitrain.sample_timesteps(10_000, torch.tensor([0.28]), torch.Generator().manual_seed(0))
    assert shifted.median() < 300  # r < 1 moves training towards low noise, as sampling does
    x0, noise = torch.ones(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1)
    assert minitrain.noised(x0, noise, torch.tensor([250.0])).item() == pytest.approx(0.75)


def test_mini_model_trains_and_samples_without_the_resolution_shift(pipe):
    # at 64 px upstream's shift would be r = 0.28; the mini model is trained and sampled without it
    assert pipe.use_timestep_transform is False and TIMESTEP_TRANSFORM["opensora-v1.2"] is True
    assert json.loads((weights.MINI_DIR / "training.json").read_text())["use_timestep_transform"] is False
    setting = minimodel.mini_setting(steps=2)
    y, mask = pipe.encode_prompt([synthetic.TRAIN[0].caption])
    z = pipe.prepare_latents(1, setting)
    y_null = pipe.transformer.y_embedder.y_embedding[None, None]
    args = pipe.model_args(1, setting)
    with torch.inference_mode():
        shifted = rflow_sample(pipe.transformer, pipe.scheduler, z, y, y_null, mask, args, num_steps=2, progress=False)
        plain = rflow_sample(pipe.transformer, pipe.scheduler, z, y, y_null, mask, args, num_steps=2,
                             use_timestep_transform=False, progress=False)
    assert torch.equal(pipe.denoise(z, y, mask, setting, progress=False), plain)
    assert not torch.allclose(plain, shifted)  # the setting changes the result


def test_trained_model_follows_prompts_and_controls_fail(pipe):
    trained = score(pipe, TRAIN_CAPTIONS)
    held_out = score(pipe, HELD_OUT_CAPTIONS)
    unconditional = score(pipe, TRAIN_CAPTIONS, cfg_scale=0.0)
    saved = minimodel.scramble_weights(pipe.transformer)
    try:
        scrambled = score(pipe, TRAIN_CAPTIONS)
    finally:
        minimodel.restore(pipe.transformer, saved)
    assert trained["colour_accuracy"] >= 0.8 and held_out["colour_accuracy"] >= 0.7, (trained, held_out)
    assert trained["all_correct"] >= 0.55 and held_out["all_correct"] >= 0.6, (trained, held_out)  # chance: 1/75
    assert unconditional["colour_accuracy"] <= 0.4 and unconditional["all_correct"] <= 0.05, unconditional
    assert scrambled["colour_accuracy"] <= 0.4 and scrambled["all_correct"] <= 0.1, scrambled
    assert score(pipe, TRAIN_CAPTIONS) == trained  # restored exactly


def test_perturbation_is_undone_exactly():
    model = torch.nn.Linear(8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = perturb_weights(model, 0.01)
    change = (model.weight - before["weight"]).abs() / before["weight"].abs()
    assert 0 < change.median() < 0.02
    restore_weights(model, saved)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
