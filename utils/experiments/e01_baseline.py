"""What notebook ``01_baseline`` runs: the faithful fp32 eager pipeline stage by stage, one model in memory at a
time (``measure.stages``), stored as records with the 30-step video derived from one measured step, and the
check of that derivation against a complete generation at a small setting."""
from __future__ import annotations

import pandas as pd

from utils.io import GIB
from utils.measure.benchmark import TimingPolicy
from utils.measure.results import Record, ResultsStore, timing_record
from utils.measure.stages import complete_run, derived_video_seconds, measure_stages, record_config
from utils.model.pipeline import OpenSoraPipeline, VideoSetting


def baseline_stages(store: ResultsStore, pipe: OpenSoraPipeline, setting: VideoSetting, prompt: str,
                    policy: TimingPolicy) -> pd.DataFrame:
    """Measure every stage (the denoiser for one step) and store its time, peak memory, load time, FLOPs,
    achieved GFLOP/s and derived seconds per video, and the derived total; returns the per-stage table."""
    config = record_config(pipe, setting, policy.threads)
    measured = measure_stages(pipe, setting, prompt, policy)
    video = derived_video_seconds(measured, setting.steps)
    rows = []
    for stage, result in measured.items():
        timing = result.timing
        store.add(timing_record("baseline", stage, timing, config,
                                metric="seconds_per_step" if stage == "denoise" else "seconds"),
                  Record(variant="baseline", stage=stage, metric="peak_rss_bytes", unit="B",
                         value=timing.peak_rss_bytes, config=config))
        if result.load_s is not None:
            store.add(Record(variant="baseline", stage=stage, metric="load_seconds", unit="s", value=result.load_s,
                             spread={"n": 1}, config=config, note="random materialisation of the stage's model"))
        gflops = result.flops / timing.median_s / 1e9 if result.flops else None
        if result.flops:
            store.add(Record(variant="baseline", stage=stage, metric="flops", unit="FLOP", value=result.flops,
                             kind="derived", config=config, note="FlopCounterMode: matmul, conv, attention"),
                      Record(variant="baseline", stage=stage, metric="gflops", unit="GFLOP/s", value=gflops,
                             kind="derived", config=config))
        store.add(Record(variant="baseline", stage=stage, metric="video_seconds", unit="s", value=video[stage],
                         kind="derived", config=config,
                         note=f"{setting.steps} x one measured step" if stage == "denoise" else "one measured call"))
        rows.append(dict(stage=stage, median_s=timing.median_s, iqr_s=timing.iqr_s, n=len(timing.times_s),
                         quiet=timing.quiet, load_s=result.load_s, peak_rss_gib=timing.peak_rss_bytes / GIB,
                         gflops=gflops, video_s=video[stage]))
    store.add(Record(variant="baseline", stage="total", metric="video_seconds", unit="s", value=sum(video.values()),
                     kind="derived", config=config, note=f"encode + prepare + {setting.steps} steps + decode"))
    return pd.DataFrame(rows)


def derivation_check(store: ResultsStore, pipe: OpenSoraPipeline, check: VideoSetting, prompt: str,
                     policy: TimingPolicy) -> pd.Series:
    """At the (small) ``check`` setting: the video time derived from stage timings against one complete
    generation (loads excluded) and its peak memory, stored; returns both and their ratio."""
    derived = sum(derived_video_seconds(measure_stages(pipe, check, prompt, policy), check.steps).values())
    seconds, peak = complete_run(pipe, check, prompt, threads=policy.threads)
    config = record_config(pipe, check, policy.threads)
    store.add(Record(variant="check", stage="total", metric="derived_video_seconds", unit="s", value=derived,
                     kind="derived", config=config, note="from stage timings at the check setting"),
              Record(variant="check", stage="total", metric="measured_video_seconds", unit="s",
                     value=sum(seconds.values()), spread={"n": 1, "stages": seconds}, config=config,
                     note="one complete generation, one model in memory at a time, loads excluded"),
              Record(variant="check", stage="total", metric="peak_rss_bytes", unit="B", value=peak, config=config))
    return pd.Series({"derived_s": derived, "measured_s": sum(seconds.values()),
                      "measured/derived": sum(seconds.values()) / derived, "peak_rss_gib": peak / GIB})
