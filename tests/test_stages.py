"""Stage-by-stage measurement on the tiny pipeline: structure, one-model-at-a-time, FLOP counts."""
import pytest

from utils.measure.benchmark import TimingPolicy
from utils.measure.flops import count_flops
from utils.measure.stages import derived_video_seconds, measure_stages, record_config, stage_flops
from utils.model.pipeline import STAGES, VideoSetting, load_pipeline
from utils.model.weights import COMPONENTS
from utils.notebooks import profile_parameters


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny", dtype="fp32", load=())


SETTING = VideoSetting.create("144p", "9:16", 17, steps=3)


def test_measure_stages_one_model_at_a_time(pipe):
    results = measure_stages(pipe, SETTING, policy=TimingPolicy(warmup=1, repeats=2, threads=1))
    assert list(results) == list(STAGES)
    assert all(len(r.timing.times_s) == 2 for r in results.values())
    assert all(not pipe.is_loaded(c) for c in COMPONENTS)  # everything released again
    assert results["prepare_latents"].load_s is None and results["denoise"].load_s > 0
    assert all(results[s].flops > 0 for s in ("encode_prompt", "denoise", "decode"))
    video = derived_video_seconds(results, steps=30)
    assert video["denoise"] == pytest.approx(30 * results["denoise"].timing.median_s)
    assert video["decode"] == results["decode"].timing.median_s


def test_meta_flop_counts_equal_real_runs(pipe):
    counted = stage_flops(pipe, SETTING)
    pipe.load("text_encoder")
    _, encode = count_flops(pipe.encode_prompt, ["a red circle"])
    y, mask = pipe.encode_prompt(["a red circle"])
    pipe.release("text_encoder")
    pipe.load("transformer")
    z = pipe.prepare_latents(1, SETTING)
    _, step = count_flops(pipe.denoise, z, y, mask, VideoSetting.create("144p", "9:16", 17, steps=1), progress=False)
    pipe.release("transformer")
    assert counted["encode_prompt"] == encode
    # the real step also has the guidance arithmetic, which the counter ignores, and the cross-attention
    # over the padded caption (the meta count uses the full caption length, as upstream's FLOP table)
    assert counted["denoise"] == pytest.approx(step, rel=0.02)


def test_record_config(pipe):
    config = record_config(pipe, SETTING, threads=1, tokens=720)
    assert config["model"] == "tiny" and config["weights"] == "random" and config["dtype"] == "fp32"
    assert config["frames"] == 17 and config["latent"] == [5, 18, 32] and config["tokens"] == 720
    # what the report could not read anywhere before: guidance, seed and the cross-attention's keys
    assert config["cfg_scale"] == SETTING.cfg_scale and config["seed"] == SETTING.seed
    assert config["caption_keys"] == "valid caption tokens"


def test_profiles():
    tiny = profile_parameters("tiny", "00_environment")
    assert tiny["model"] == "tiny" and tiny["gemm_shapes"] == ["tiny"]
    assert profile_parameters("default", "01_baseline") == {}
    with pytest.raises(ValueError, match="accepted: default, tiny, full"):
        profile_parameters("huge", "01_baseline")
