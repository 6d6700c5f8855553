"""Cross-platform tables from stored records: totals, upstream comparison, Graviton projection, cost."""
import json

import pytest

from utils.experiments import gpu_bench
from utils.measure.results import Record, ResultsStore, load_environments, load_records, make_config
from utils.report.sections import s90_cross_platform as cross_platform


def _store(tmp_path, notebook, environment_id, device_name):
    store = ResultsStore(notebook, root=tmp_path)
    # stand in for another machine: same fingerprint machinery, another id and device
    store.environment = dict(store.environment, environment_id=environment_id, device=device_name)
    store.environment_id = environment_id
    store.path = tmp_path / environment_id / f"{notebook}.json"
    env_file = tmp_path / "environments" / f"{environment_id}.json"
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text(json.dumps(store.environment))
    return store


def _config(resolution, frames, dtype, te_dtype, threads=2):
    return make_config(model="opensora-v1.2", weights="random", resolution=resolution, aspect_ratio="9:16",
                       frames=frames, steps=30, dtype=dtype, threads=threads, text_encoder_dtype=te_dtype)


@pytest.fixture
def records(tmp_path):
    cpu = _store(tmp_path, "01_baseline", "x86_64-test-cpu-2c-0001", "cpu")
    config = _config("144p", 51, "fp32", "fp32")
    for stage, seconds, flops in [("encode_prompt", 10.0, 3e12), ("denoise", 60.0, 6e12), ("decode", 100.0, 9e12)]:
        video = seconds * 30 if stage == "denoise" else seconds
        cpu.add(Record(variant="baseline", stage=stage, metric="video_seconds", unit="s", value=video, kind="derived",
                       config=config),
                Record(variant="baseline", stage=stage, metric="flops", unit="FLOP", value=flops, kind="derived",
                       config=config),
                Record(variant="baseline", stage=stage, metric="gflops", unit="GFLOP/s", value=flops / seconds / 1e9,
                       kind="derived", config=config))
    cpu.add(Record(variant="baseline", stage="total", metric="video_seconds", unit="s", value=1910.0, kind="derived",
                   config=config))
    ceilings = _store(tmp_path, "00_environment", "x86_64-test-cpu-2c-0001", "cpu")
    ceilings.add(Record(variant="fp32", stage="gemm", metric="gflops_ceiling", unit="GFLOP/s", value=200.0,
                        kind="derived", config=make_config(threads=2, dtype="fp32")))
    gpu = _store(tmp_path, "80_gpu_bench", "x86_64-nvidia-h100-80gb-hbm3-16c-0002", "NVIDIA H100 80GB HBM3")
    gpu_config = _config("360p", 51, "bf16", "fp32", threads=16)
    gpu.add(Record(variant="upstream", stage="total", metric="video_seconds", unit="s", value=12.0, kind="derived",
                   config=gpu_config),
            Record(variant="upstream", stage="total", metric="measured_video_seconds", unit="s", value=12.5,
                   config=gpu_config))
    return load_records(tmp_path), load_environments(tmp_path)


def test_totals_cover_every_platform(records):
    frame, environments = records
    totals = cross_platform.totals(cross_platform.video_times(frame, environments))
    assert set(totals.platform) == {"NVIDIA H100 80GB HBM3", f"{environments['x86_64-test-cpu-2c-0001']['cpu_model']}, "
                                    f"{environments['x86_64-test-cpu-2c-0001']['arch']}"}
    assert sorted(totals.seconds) == [12.0, 1910.0]


def test_against_published_h100(records):
    frame, environments = records
    table = cross_platform.against_published(frame, environments)
    row = table.iloc[0]
    assert (row.resolution, row.frames, row.upstream_published_s) == ("360p", 51, 18.0)
    assert row.ours_derived_s == 12.0 and row.ours_measured_s == 12.5
    assert row.ratio_ours_over_upstream == pytest.approx(12.0 / 18.0)


def test_graviton_projection_follows_the_stated_model(records):
    frame, _ = records
    projection = cross_platform.graviton_projection(frame, "x86_64-test-cpu-2c-0001", gemm_efficiency=0.8)
    row = projection[(projection.instance == "c7g.16xlarge") & (projection.stage == "denoise")].iloc[0]
    # denoise: 6 TFLOP per step x 30 steps, at (100 GFLOP/s / 200 ceiling) x (64 x 32 x 2.6 x 0.8) GFLOP/s
    assert row.projected_seconds == pytest.approx(6e12 * 30 / (0.5 * 64 * 32 * 2.6 * 0.8 * 1e9))
    by_instance = projection.groupby("instance").projected_seconds.sum()
    assert by_instance["c8g.16xlarge"] / by_instance["c8g.24xlarge"] == pytest.approx(1.5)


def test_cost_per_video_uses_the_price_table(records):
    frame, environments = records
    summary = cross_platform.summary(frame, environments, "x86_64-test-cpu-2c-0001")
    costs = summary["costs"]
    h100 = costs[costs.instance == "p5.48xlarge (capacity block)"].iloc[0]
    assert h100.usd_per_video == pytest.approx(12.0 * 4.916 / 3600)
    assert "m7g.16xlarge" in set(costs.platform)  # a projected row priced from the table
    assert set(costs.kind) == {"derived from measured", "projected"}


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    assert gpu_bench.main(["--device", "cpu", "--model", "tiny", "--quick", "--results", str(tmp_path)]) == 0
    frame = load_records(tmp_path)
    totals = frame[(frame.stage == "total") & (frame.metric == "video_seconds")]
    assert len(totals) == 1 and totals.variant.iloc[0] == "upstream"
    assert set(frame[frame.metric == "seconds_per_step"].stage) == {"denoise"}
    assert (frame.metric == "measured_video_seconds").sum() == 1


def test_notebook_times_scale_with_the_projection(tmp_path, records):
    frame, environments = records
    runs = _store(tmp_path, "notebook_runs", "x86_64-test-cpu-2c-0001", "cpu")
    for profile, seconds in (("default", 955.0), ("tiny", 3.0)):
        runs.add(Record(variant="01_baseline", stage="notebook", metric="notebook_seconds", unit="s", value=seconds,
                        spread={"n": 1}, config=make_config(profile=profile)))
    frame = load_records(tmp_path)
    xp = cross_platform.summary(frame, environments, "x86_64-test-cpu-2c-0001")
    table = xp["notebooks"]
    assert list(table.notebook) == ["01_baseline"] and table["measured here s"].iloc[0] == 955.0  # default only
    c7g = xp["projected"].set_index("platform").seconds["c7g.16xlarge"]
    assert table["c7g.16xlarge s (projected)"].iloc[0] == pytest.approx(955.0 * c7g / 1910.0)


def test_notebook_duration_is_read_from_papermills_metadata(tmp_path):
    from utils.notebooks import store_duration

    executed = tmp_path / "01_baseline.ipynb"
    executed.write_text(json.dumps({"metadata": {"papermill": {"duration": 12.5, "end_time": "2026-11-26T12:00:00",
                                                               "exception": None}}, "cells": []}))
    record = store_duration(executed, "tiny", tmp_path / "results")
    assert record.value == 12.5 and record.config["profile"] == "tiny"
    stored = load_records(tmp_path / "results")
    assert stored.loc[stored.metric == "notebook_seconds", "value"].tolist() == [12.5]
    executed.write_text(json.dumps({"metadata": {"papermill": {"duration": None, "exception": True}}}))
    with pytest.raises(ValueError, match="no papermill duration"):
        store_duration(executed, "tiny", tmp_path / "results")


# ---- make arm-check's checks of the study's own steps, run natively (x86 here) --------------------------------

@pytest.fixture(scope="module")
def arm_checks():
    import torch

    from utils.experiments import arm_check

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield arm_check.all_checks()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name, kernel", [("quantize_w8a8_dynamic", "_int_mm"), ("quantize_w8_weight_only", "+mm"),
                                          ("cache_text_kv", "bit-identical"), ("attention_bmm", "+bmm"),
                                          ("bf16", "video")])
def test_arm_step_checks_pass_natively(arm_checks, name, kernel):
    """The study's steps through utils.optim against the tiny fp32 pipeline, as make arm-check runs them under
    emulation: within their bounds, naming the kernels that ran (``kernel`` is one they must name)."""
    check, config = arm_checks[name]
    passed, detail, numbers = check("native")
    assert passed, detail
    assert kernel in detail and 0 <= numbers["latent_rel_l2"] < numbers["bound"]
    assert config["checked"].startswith("utils.optim.registry.apply of ") and config["frames"] == 1


def test_arm_check_reports_w4a8_refused_without_kleidiai(arm_checks):
    import torch

    if torch.backends.kleidiai.is_available():
        pytest.skip("this torch has KleidiAI: w4a8_dynamic runs here")
    passed, detail, numbers = arm_checks["quantize_w4a8_dynamic"][0]("native")
    assert not passed and numbers == {}
    assert detail.startswith("refused by utils.optim.quantize:") and "KleidiAI" in detail


def test_arm_step_checks_follow_utils_optim(monkeypatch):
    """Every scheme and every attention choice gets a check, read from utils.optim when the check runs."""
    from utils.experiments import arm_check
    from utils.optim import attention, quantize

    monkeypatch.setitem(attention.CHOICES, "cross", attention.CHOICES["cross"] + ("newkernel",))
    checks = arm_check.all_checks()
    assert {f"quantize_{s}" for s in quantize.SCHEMES} <= set(checks)
    assert "attention_newkernel" in checks and "attention_sdpa" not in checks  # sdpa: the baseline
    assert checks["attention_newkernel"][1]["step"] == "attention(cross=newkernel)"
    assert arm_check.select(checks, ["op_", "bf16"]) == [n for n in checks if n.startswith("op_")] + ["bf16"]
    with pytest.raises(ValueError, match="no check is named"):
        arm_check.select(checks, ["int3"])
    assert arm_check.torchao_compatibility() == ""  # torch 2.13 has the names torchao 0.18 imports


def test_arm_check_store_keeps_one_complete_run(tmp_path):
    from utils.experiments import arm_check

    def result(name):
        return dict(name=name, passed=True, detail=f"{name} ran", numbers={"latent_rel_l2": 0.0},
                    config={"checked": f"what {name} checks"})

    arm_check.store([result("int8"), result("bf16")], tmp_path, "g3", threads=2)
    arm_check.store([result("op_int8"), result("bf16")], tmp_path, "g3", threads=2, replace=True)
    frame = load_records(tmp_path)
    assert sorted(frame.variant) == ["bf16", "op_int8"]  # the renamed check's old record is gone
    assert frame["git_commit"].notna().all() and set(frame["config.checked"]) == {"what op_int8 checks",
                                                                                 "what bf16 checks"}
