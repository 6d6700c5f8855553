"""The measurement backbone: timer statistics, results store, schema, FLOP counts (no speed asserted)."""
import json
import time

import pytest
import torch

from utils import io
from utils.measure import benchmark
from utils.measure.benchmark import TimingPolicy, measure, num_threads
from utils.measure.flops import count_flops
from utils.measure.results import Record, ResultsStore, SchemaError, load_records, validate
from utils.model.stdit3 import build_stdit3
from utils.paths import UPSTREAM

CONFIG = dict(model="tiny", weights="random", resolution="144p", aspect_ratio="9:16", frames=17, steps=2,
              dtype="fp32", threads=1)


def test_timer_structure_and_ordering():
    calls = []
    # no busy retries here (a neighbour on the CPU would add calls); they are tested below
    timing = measure(lambda: (calls.append(1), time.sleep(0.01)),
                     policy=TimingPolicy(warmup=2, repeats=4, threads=1, busy_threshold=float("inf")))
    assert len(calls) == 1 + 1 + 4  # first call (also a warm-up), one more warm-up, four timed
    assert len(timing.times_s) == 4 and timing.threads == 1
    assert timing.min_s <= timing.median_s <= timing.max_s
    assert timing.iqr_s >= 0 and timing.first_s >= 0.01
    assert all(t >= 0.01 for t in timing.times_s)
    spread = timing.spread()
    assert spread["n"] == 4 and spread["min"] == timing.min_s and spread["warmup"] == 2


def test_thread_count_is_set_and_restored():
    before = torch.get_num_threads()
    seen = []
    measure(lambda: seen.append(torch.get_num_threads()), policy=TimingPolicy(repeats=1, threads=1, busy_wait_s=0))
    assert set(seen) == {1} and torch.get_num_threads() == before
    with num_threads(None):
        assert torch.get_num_threads() == before


def test_busy_windows_are_retried_then_flagged(monkeypatch):
    readings = iter([0.9, 0.05, 0.9, 0.9])  # call 1: busy then quiet; call 2: busy twice (limit 1 retry)
    monkeypatch.setattr(benchmark.CpuWatch, "stop", lambda self: next(readings))
    timing = measure(lambda: None, policy=TimingPolicy(repeats=2, busy_retries=1, busy_wait_s=0))
    assert timing.busy_retries == 2
    assert timing.other_cpu == [0.05, 0.9]
    assert not timing.quiet


def test_cpu_watch_does_not_count_our_own_work():
    watch = benchmark.CpuWatch()
    watch.start()
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:  # one core busy in this process: must not count as another's
        pass
    # /proc/stat counts 10 ms jiffies: over 0.5 s the reading is exact to a few hundredths of a core
    assert 0 <= watch.stop() < 0.9


def _record(value=1.0, metric="seconds", stage="denoise"):
    return Record(variant="fp32", stage=stage, metric=metric, unit="s", value=value,
                  spread={"n": 3, "iqr": 0.1}, config=CONFIG)


def test_store_round_trip_and_replacement(tmp_path):
    store = ResultsStore("01_baseline", root=tmp_path)
    store.add(_record(1.0), _record(5.0, stage="decode"))
    store.add(_record(2.0))  # same identity: replaces
    frame = load_records(tmp_path)
    assert len(frame) == 2
    row = frame[frame.stage == "denoise"].iloc[0]
    assert row.value == 2.0 and row["config.dtype"] == "fp32" and row["spread.n"] == 3
    assert row.environment_id == store.environment_id and row.kind == "measured"
    assert (tmp_path / "environments" / f"{store.environment_id}.json").exists()


def test_environment_id_is_stable_across_boots_and_changes_with_the_machine():
    from utils.fingerprint import fingerprint
    from utils.fingerprint import environment_id as eid
    facts = dict(fingerprint())
    reboot = dict(facts, memory_bytes=facts["memory_bytes"] - 320 * 1024)  # kernel reservation, seen on two boots
    assert eid(reboot) == eid(facts) == facts["environment_id"]
    assert eid(dict(facts, memory_bytes=facts["memory_bytes"] + 4 * 2**30)) != eid(facts)
    assert eid(dict(facts, torch_build="2.12.0+cpu")) != eid(facts)


def test_a_measurement_supersedes_the_variants_earlier_failure(tmp_path):
    store = ResultsStore("06_int8", root=tmp_path)
    failed = Record(variant="fp32", stage="total", metric="not_run", unit="", value=1.0, config=CONFIG,
                    note="not run: killed by signal 9")
    other = Record(variant="bf16", stage="total", metric="not_run", unit="", value=1.0, config=CONFIG,
                   note="not run: killed by signal 9")
    store.add(failed, other)
    store.add(_record(2.0))  # fp32 ran this time
    frame = load_records(tmp_path)
    assert sorted(zip(frame.variant, frame.metric)) == [("bf16", "not_run"), ("fp32", "seconds")]
    store.add(failed)  # and a new failure is stored beside the earlier measurement
    assert len(load_records(tmp_path)) == 3


def test_other_machines_are_never_overwritten(tmp_path):
    other = tmp_path / "aarch64-graviton-64c-0000" / "01_baseline.json"
    other.parent.mkdir()
    foreign = dict(vars(_record(9.0)), schema_version=1, run_id="x", environment_id="aarch64-graviton-64c-0000",
                   notebook="01_baseline",
                   time="2026-01-01T00:00:00+00:00")
    other.write_text(json.dumps({"records": [foreign]}))
    ResultsStore("01_baseline", root=tmp_path).add(_record(1.0))
    assert json.loads(other.read_text())["records"][0]["value"] == 9.0
    assert sorted(load_records(tmp_path).value) == [1.0, 9.0]


def test_interrupted_write_leaves_earlier_records(tmp_path, monkeypatch):
    store = ResultsStore("01_baseline", root=tmp_path)
    store.add(_record(1.0))
    before = store.path.read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted mid-write")

    monkeypatch.setattr(io.os, "fsync", crash)  # the new file is written, not yet renamed over the old
    with pytest.raises(KeyboardInterrupt):
        store.add(_record(2.0, stage="decode"))
    assert store.path.read_text() == before
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temporary left behind


def test_schema_validation():
    good = dict(vars(_record()), schema_version=1, run_id="r", environment_id="e", time="t", notebook="n")
    assert validate(dict(good)) == good
    for broken, message in [({"kind": "guessed"}, "kind"), ({"value": "fast"}, "value"),
                            ({"config": {"model": "tiny"}}, "config lacks"),
                            ({"config": CONFIG | {"weights": "pretrained"}}, "weights"),
                            ({"schema_version": 0}, "schema version")]:
        with pytest.raises(SchemaError, match=message):
            validate(good | broken)
    with pytest.raises(SchemaError, match="lacks 'unit'"):
        validate({k: v for k, v in good.items() if k != "unit"})


def test_linear_flops_are_2mnk():
    m, k, n = 7, 64, 48
    _, flops = count_flops(torch.nn.Linear(k, n), torch.randn(m, k))
    assert flops == 2 * m * n * k


def test_cpu_attention_is_counted():
    q = torch.randn(2, 4, 16, 8)
    _, flops = count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert flops == 4 * 2 * 4 * 16 * 16 * 8


def test_real_stdit3_flops_match_upstream_count():
    table = json.loads((UPSTREAM / "opensora_v1_2_flops.json").read_text())["cases"]["240p_9:16_2s"]
    model = build_stdit3("STDiT3-XL/2", device="meta")
    x = torch.empty(2, 4, *table["latent"], device="meta")
    args = dict(y=torch.empty(2, 1, 300, 4096, device="meta"), fps=torch.tensor([24.0] * 2, device="meta"),
                height=torch.tensor([240.0] * 2), width=torch.tensor([426.0] * 2))
    _, flops = count_flops(model, x, torch.empty(2, device="meta"), **args)
    assert abs(flops / 1e12 - table["dit_forward_cfg_batch2_TFLOP"]) < 0.005 * table["dit_forward_cfg_batch2_TFLOP"]


def test_timing_policy_checks_and_derives():
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        TimingPolicy(repeats=0)
    with pytest.raises(ValueError, match="at least 0"):
        TimingPolicy(busy_retries=-1)
    policy = TimingPolicy(warmup=2, repeats=3, threads=2)
    assert policy.with_(repeats=1) == TimingPolicy(warmup=2, repeats=1, threads=2) and policy.repeats == 3
    spec = dict(threads=1, repeats=4, busy_retries=0, model="tiny")  # a fresh-process task's spec
    assert TimingPolicy.from_spec(spec, repeats=9, warmup=3) == TimingPolicy(warmup=3, repeats=4, threads=1,
                                                                              busy_retries=0)
    assert TimingPolicy.from_spec(policy.to_spec()) == policy  # what a fresh process is handed comes back whole
