"""The comparison protocol (utils.measure.compare): run order, between-process spread and the verdict."""
import pytest

from utils.measure.compare import (
    FASTER,
    SAME,
    SLOWER,
    Spread,
    interleaved_order,
    run_interleaved,
    verdict,
)


def test_order_interleaves_every_variant_in_every_round():
    order = interleaved_order(["a", "b", "c"], 3)
    assert [name for _, name in order] == ["a", "b", "c"] * 3
    assert [round_ for round_, _ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("names, processes", [(["a", "b"], 2), (["a", "a"], 3), ([], 3)])
def test_order_refuses_too_few_processes_or_bad_names(names, processes):
    with pytest.raises(ValueError, match="at least 3|distinct"):
        interleaved_order(names, processes)


def test_run_interleaved_runs_each_variant_in_its_own_process_in_order():
    calls = []

    def runner(task, env=None, **spec):  # stands in for run_in_fresh_process
        calls.append((task, dict(env), spec["variant"]))
        return {"value": len(calls)}

    runs = {"fp32": ("m:stages", {}, {"variant": "fp32"}),
            "bf16": ("m:stages", {"DNNL_DEFAULT_FPMATH_MODE": "BF16"}, {"variant": "bf16"})}
    results = run_interleaved(runs, processes=3, runner=runner)
    assert [c[2] for c in calls] == ["fp32", "bf16"] * 3
    assert all(env == runs[name][1] for _, env, name in calls)  # each process gets its variant's own settings
    assert [r["position"] for r in results["bf16"]] == [1, 3, 5]
    assert [r["round"] for r in results["fp32"]] == [0, 1, 2]
    assert [r["value"] for r in results["fp32"]] == [1, 3, 5]


def test_spread_keeps_every_process_value():
    spread = Spread.of([10.0, 12.0, 11.0])
    assert spread.median == 11.0 and spread.low == 10.0 and spread.high == 12.0
    assert spread.relative_range == pytest.approx(2 / 11)
    stored = spread.as_dict()
    assert stored["per_process"] == [10.0, 12.0, 11.0] and stored["n_processes"] == 3
    with pytest.raises(ValueError):
        Spread.of([])


def test_verdict_needs_ranges_apart_and_a_difference_above_the_threshold():
    base = Spread.of([10.0, 10.5, 11.0])
    # the case: 11.1 s against 12.4 s looked like a 10 % win, but each came from one process; with
    # the baseline's own processes spanning the gap it is no measurable difference
    assert verdict(Spread.of([10.2, 11.1, 12.4]), Spread.of([11.0, 11.1, 11.2]))["verdict"] == SAME
    faster = verdict(base, Spread.of([5.0, 5.1, 5.3]))
    assert faster["verdict"] == FASTER and faster["ratio"] == pytest.approx(5.1 / 10.5)
    assert not faster["ranges_overlap"]
    assert verdict(base, Spread.of([12.0, 12.5, 13.0]))["verdict"] == SLOWER
    # apart but within the threshold: not reported as a win
    tight = Spread.of([10.00, 10.01, 10.02])
    assert verdict(tight, Spread.of([9.90, 9.91, 9.92]), threshold=0.03)["verdict"] == SAME
    assert verdict(tight, Spread.of([9.90, 9.91, 9.92]), threshold=0.005)["verdict"] == FASTER
    # rates: higher is better
    assert verdict(base, Spread.of([20.0, 21.0, 22.0]), lower_is_better=False)["verdict"] == FASTER


def test_run_interleaved_takes_a_spec_per_round():
    seen = []
    runs = {"fp32": lambda round_: ("m:stages", {}, {"outputs": "fp32.pt" if round_ == 0 else None})}
    run_interleaved(runs, processes=3, runner=lambda task, env=None, **spec: seen.append(spec["outputs"]) or {})
    assert seen == ["fp32.pt", None, None]
