"""Named recipes (utils.optim.recipes) and the block-by-block (streamed) loading the ``small`` recipe rests on."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from utils import generate
from utils.model.pipeline import VideoSetting, load_pipeline
from utils.model.stdit3 import build_stdit3
from utils.model.text_encoder import build_t5_encoder
from utils.model.weights import (
    CheckpointError,
    RandomFill,
    fill_from_checkpoint,
    materialize_in_parts,
    materialize_random,
    module_parts,
)
from utils.optim import recipes, registry
from utils.optim.preflight import memory_estimate
from utils.optim.quantize import is_quantized
from utils.paths import REPO

SETTING = VideoSetting.create("144p", "9:16", 17, steps=2)
BUILDERS = {"t5": lambda: build_t5_encoder("tiny", device="meta"),
            "stdit3": lambda: build_stdit3("tiny", device="meta")}


def test_parts_cover_every_tensor_once_and_no_part_is_more_than_a_block():
    model = BUILDERS["stdit3"]()
    parts = module_parts(model)
    assert "spatial_blocks.0" in parts and "spatial_blocks" not in parts and "" not in parts
    owned = [id(t) for name in parts for t in model.get_submodule(name).parameters()]
    assert len(owned) == len(set(owned)) == len(list(model.parameters()))
    t5 = BUILDERS["t5"]()
    t5.tie_weights()
    assert "encoder.embed_tokens" not in module_parts(t5)  # tied to `shared`: one part, not two


@pytest.mark.parametrize("model", sorted(BUILDERS))
def test_random_weights_part_by_part_are_the_whole_module_draws(model):
    whole = materialize_random(BUILDERS[model](), torch.bfloat16, seed=3).state_dict()
    parts = materialize_in_parts(BUILDERS[model](), RandomFill(torch.bfloat16, seed=3)).state_dict()
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_checkpoint_part_by_part_is_the_strict_load(tmp_path):
    reference = materialize_random(build_stdit3("tiny", device="meta"), torch.float32, seed=5)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "model.safetensors")
    model = build_stdit3("tiny", device="meta")
    materialize_in_parts(model, fill_from_checkpoint(model, "transformer", tmp_path, torch.bfloat16))
    assert all(torch.equal(v.to(torch.bfloat16), model.state_dict()[k]) for k, v in reference.state_dict().items())
    state = reference.state_dict()
    state["final_layer.linear.weight"] = state["final_layer.linear.weight"][:-1]
    del state["spatial_blocks.0.attn.qkv.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: spatial_blocks.0.attn.qkv.bias.*\n.*mis-shaped keys: "
                                              "final_layer.linear.weight"):
        fill_from_checkpoint(build_stdit3("tiny", device="meta"), "transformer", tmp_path, torch.bfloat16)


def _run(steps):
    pipe = registry.apply(load_pipeline("tiny", dtype="bf16", load=()), steps)
    return pipe, pipe(["a red circle moving left"], SETTING, progress=False)


def test_streamed_quantisation_is_the_whole_module_quantisation():
    runs = {}
    for streamed in (False, True):
        runs[streamed] = _run({"int8_weight_only": {"component": "text_encoder", "streamed": streamed},
                               "quantize": {"scheme": "w8a8_dynamic", "streamed": streamed}})
    (pipe, whole), (streamed_pipe, streamed) = runs[False], runs[True]
    quantized = [sum(map(is_quantized, p.transformer.modules())) for p in (pipe, streamed_pipe)]
    assert quantized[0] == quantized[1] > 0
    assert torch.equal(whole.latents, streamed.latents) and torch.equal(whole.video, streamed.video)
    streamed_pipe.release("transformer")  # released, it streams again on the next load
    streamed_pipe.load("transformer")
    assert sum(map(is_quantized, streamed_pipe.transformer.modules())) > 0


def test_streaming_refuses_what_it_cannot_do():
    pipe = load_pipeline("tiny", dtype="bf16")
    with pytest.raises(ValueError, match="it is loaded already"):
        registry.apply(pipe, {"quantize": {"scheme": "w8a8_dynamic", "streamed": True}})
    with pytest.raises(ValueError, match="w8a8_dynamic_ao cannot be streamed"):
        registry.apply(load_pipeline("tiny", load=()), {"quantize": {"scheme": "w8a8_dynamic_ao", "streamed": True}})


def test_the_preflight_counts_one_block_of_a_streamed_component_while_it_loads():
    estimates = {}
    for streamed in (False, True):
        pipe = registry.apply(load_pipeline("opensora-v1.2", dtype="bf16", load=()),
                              {"int8_weight_only": {"component": "text_encoder", "streamed": streamed}})
        estimates[streamed] = memory_estimate(pipe, VideoSetting.create("144p", "9:16", "2s"), free_text_encoder=True)
    # whole: the bf16 T5-XXL (8.9 GiB) while it loads; streamed: its int8 weights and one bf16 block
    assert estimates[False]["analytic_peak"] > 8.5 * 2**30 > 6 * 2**30 > estimates[True]["analytic_peak"]


def test_the_ladder_builds_up_to_fast():
    assert recipes.ladder_steps("faithful") == {}
    assert recipes.ladder_steps("upstream") == recipes.RECIPES["upstream"].steps
    assert recipes.ladder_steps("fast") == recipes.RECIPES["fast"].steps  # the rung proposed as fast
    # the exact rewrites come after fast (they slowed the compiled int8 loop): the last rung adds them
    assert set(recipes.ladder_steps(recipes.LADDER[-1][0])) - set(recipes.RECIPES["fast"].steps) == set(
        recipes.EXACT_REWRITES)
    assert recipes.ladder_steps("bf16 T5")["bf16"] == {}  # every component, replacing upstream's two
    with pytest.raises(ValueError, match="unknown rung 'turbo'; accepted: faithful, upstream"):
        recipes.ladder_steps("turbo")


def test_fast_is_the_fastest_rung_that_keeps_adherence():
    seconds = {"faithful": 900.0, "upstream": 600.0, "best attention": 300.0, "fast": 200.0, "small": 100.0}
    # small is no rung; fast loses adherence here, so best attention is the fastest kept
    assert recipes.fastest_kept(seconds, {"faithful", "upstream", "best attention", "small"}) == "best attention"
    assert recipes.fastest_kept(seconds, set(seconds)) == "fast"
    assert recipes.fastest_kept(dict(seconds, fast=float("nan")), set(seconds)) == "best attention"
    assert recipes.fastest_kept(seconds, {"small"}) is None
    assert recipes.keeps_adherence(-0.05, 0.06) and not recipes.keeps_adherence(-0.07, 0.06)


def test_the_fast_recipe_applies_the_rung_chosen_for_the_environment_else_the_architecture(tmp_path):
    table = tmp_path / "choice.json"
    x86 = dict(environment_id="x86_64-a", arch="x86_64")
    proposed = recipes.fast_recipe("x86_64-a", "x86_64", table)
    assert proposed.steps == recipes.ladder_steps("fast") and proposed.source == recipes.PROPOSED
    entry = recipes.store_choice(dict(rung="best attention", seconds_per_video=300.0), x86, table)
    assert entry["environment_id"] == "x86_64-a" and entry["written"]
    for environment in ("x86_64-a", "x86_64-b"):  # its own entry; another x86 machine takes the newest x86 entry
        chosen = recipes.fast_recipe(environment, "x86_64", table)
        assert chosen.steps == recipes.ladder_steps("best attention") and "best attention" in chosen.source
    assert recipes.fast_recipe("aarch64-c", "aarch64", table).steps == recipes.ladder_steps("fast")
    recipes.store_choice(dict(rung="fast"), x86, table)  # replaces the environment's entry
    assert [e["rung"] for e in json.loads(table.read_text())["entries"]] == ["fast"]
    with pytest.raises(ValueError, match="'small' is not a rung of the ladder; rungs: faithful"):
        recipes.store_choice(dict(rung="small"), x86, table)


@pytest.mark.parametrize("name", ["faithful", "upstream", "small"])
def test_a_recipe_runs_the_tiny_pipeline(name):
    pipe = recipes.build_pipeline(name, "tiny", setting=SETTING)
    result = pipe(["a red circle moving left"], SETTING, progress=False, free_text_encoder=True)
    assert torch.isfinite(result.video).all() and pipe.optimizations == recipes.recipe(name).steps


def test_a_recipe_needs_its_start_up_settings_and_an_unloaded_pipeline(monkeypatch):
    for key in recipes.GUIDE_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="started without: DNNL_DEFAULT_FPMATH_MODE=BF16"):
        recipes.build_pipeline("graviton", "tiny")
    with pytest.raises(ValueError, match="build the pipeline fp32 with load=()"):
        recipes.apply_recipe(load_pipeline("tiny"), "faithful")
    with pytest.raises(ValueError, match="unknown recipe 'turbo'; accepted: faithful, upstream, fast, small, graviton"):
        recipes.recipe("turbo")


def test_the_command_line_restarts_with_the_recipe_s_start_up_settings(tmp_path):
    out = tmp_path / "clip.mp4"
    env = {k: v for k, v in os.environ.items() if k not in recipes.GUIDE_ENV}
    result = subprocess.run([sys.executable, "-m", "utils.generate", "--recipe", "graviton", "--model", "tiny",
                             "--prompt", "a red circle", "--num-frames", "17", "--steps", "2", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "restarting with the recipe's start-up settings" in result.stdout
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["recipe"] == "graviton" and record["startup_env"] == recipes.GUIDE_ENV
    assert record["optimizations"] == registry.describe(recipes.RECIPES["graviton"].steps)
    assert record["run_peak_rss_bytes"] <= record["process_max_rss_bytes"]


def test_a_recipe_with_its_own_precision_flags_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--recipe", "fast", "--dtype", "fp32", "--cache", "pab", "--model", "tiny", "--prompt", "x",
                       "--out", str(tmp_path / "clip.mp4")])
    assert exit_info.value.code == 2
    assert "--recipe fast sets the precisions and the cache itself; drop --dtype, --cache" in capsys.readouterr().err
