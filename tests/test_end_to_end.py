"""Notebook 08's bookkeeping (utils.experiments.e08_end_to_end) with a stand-in for the fresh processes: the video
derived per process, the records stored per configuration, each stage's peak, and the report's tables over them."""
import pytest

from utils.experiments import e08_end_to_end as e08
from utils.measure.records import environment_records
from utils.measure.results import ResultsStore
from utils.model.pipeline import VideoSetting
from utils.optim.recipes import ladder_steps
from utils.report.sections import s08_end_to_end as s08

SETTING = VideoSetting.create("144p", "9:16", 51, steps=30)
STEP_S = {"faithful": 30.0, "upstream": 20.0, "fast": 10.0}


def fake_run(task, env, optimizations, steps, **spec):
    """One process's result as task_complete returns it: a configuration's step time by its steps, a skipped step
    costing a tenth, stage peaks of 1, 2 and 3 GiB."""
    name = "fast" if "teacache" in optimizations else "upstream" if "bf16" in optimizations else "faithful"
    skips = optimizations.get("teacache", {}).get("replay")
    later = [STEP_S[name] / 10 if skips and i not in skips else STEP_S[name] for i in range(1, steps)]
    seconds = dict(encode_prompt=5.0, prepare_latents=0.0, denoise=STEP_S[name] + sum(later), decode=20.0)
    return dict(seconds=seconds, run_seconds=sum(seconds.values()) + 15.0, load_seconds={"text_encoder": 15.0},
                first_step_seconds=STEP_S[name], later_step_seconds=later, optimizations=name,
                dtypes={"transformer": "bfloat16"}, process_max_rss_bytes=4 * 2**30,
                peak_rss_bytes=dict(encode_prompt=2**30, prepare_latents=2**30, denoise=2 * 2**30, decode=3 * 2**30))


def test_the_protocol_derives_each_process_s_video_and_stores_each_stage_s_peak(tmp_path):
    store = ResultsStore("08_end_to_end", root=tmp_path)
    configs = e08.configurations(["faithful", "upstream", "fast"], recipes=())
    assert [c.name for c in configs] == ["faithful", "upstream", "fast"] and configs[2].steps == ladder_steps("fast")
    replay = [0, 9, 19, 29]  # 4 of 30 steps computed, as the mini model's pattern would give
    table = e08.protocol_runs(store, configs, SETTING, "opensora-v1.2", "a prompt", 3, 2, 3, replay,
                              e08.experiment_config(store), runner=fake_run).set_index("configuration")
    # building and loading 15 s, encode 5, first step, 29 later steps at the median, decode 20
    assert table.loc["faithful", "video s"] == pytest.approx(15 + 5 + 30 + 29 * 30 + 20)
    # TeaCache: the first step, 3 more evaluated steps, 26 skipped at a tenth of a step
    assert table.loc["fast", "video s"] == pytest.approx(15 + 5 + 10 + 3 * 10 + 26 * 1 + 20)
    assert table.loc["fast", "decode peak GiB"] == pytest.approx(3.0)
    rows, _ = s08.notebook_rows(environment_records(tmp_path, store.environment_id), store.environment_id)
    ladder = s08.ladder_table(rows).set_index("configuration")
    assert ladder.loc["upstream", "denoise peak GiB (measured)"] == pytest.approx(2.0)
    assert ladder.loc["fast", "speed-up over faithful (derived)"] == pytest.approx(940 / 106)
    assert ladder.loc["fast", "verdict against faithful"] == "faster"  # every process alike: the ranges are apart
