"""The report renderer over a small synthetic store: files, figures, tables, numbers from records only."""
import json
import re
from pathlib import Path

import pytest

from utils.fingerprint import fingerprint
from utils.measure.profiling import OP_CLASSES
from utils.measure.results import Record, ResultsStore, load_records, make_config
from utils.model.pipeline import STAGES
from utils.report import render as renderer
from utils.report.sections import s02_stage_profile
from utils.testbed.minimodel import quality_config

DENOISE_STEP_S = 123.456  # distinctive: the report must show it as "123"
MODEL = dict(model="opensora-v1.2", weights="random", resolution="144p", aspect_ratio="9:16", frames=51, steps=30,
             dtype="fp32", threads=2, text_encoder_dtype="fp32")
GROUP_MS = dict(spatial_attn=30.0, temporal_attn=10.0, cross_attn=15.0, mlp=35.0, embedders=2.0, final_layer=1.0,
                other=7.0)


def build_store(root: Path, denoise_step_s: float = DENOISE_STEP_S) -> None:
    env = ResultsStore("00_environment", root=root)
    for threads in (1, 2):
        for dtype, scale in (("fp32", 1.0), ("bf16", 3.0), ("int8", 6.0)):
            unit = "GOP/s" if dtype == "int8" else "GFLOP/s"
            rates = {"qkv": 40.0 * threads * scale, "mlp_fc1": 45.0 * threads * scale}
            for shape, rate in rates.items():
                env.add(Record(variant=dtype, stage="gemm", metric="gflops", unit=unit, value=rate,
                               spread={"n": 5, "iqr": 0.001},
                               config=make_config(threads=threads, dtype=dtype, shape=shape, mkn=[64, 32, 16])))
            env.add(Record(variant=dtype, stage="gemm", metric="gflops_ceiling", unit=unit, value=max(rates.values()),
                           kind="derived", config=make_config(threads=threads, dtype=dtype)))
        env.add(Record(variant="copy", stage="memory", metric="gbs", unit="GB/s", value=9.5 * threads,
                       spread={"n": 5, "iqr": 0.01}, config=make_config(threads=threads)))

    base = ResultsStore("01_baseline", root=root)
    config = make_config(**MODEL)
    seconds = {"encode_prompt": 5.0, "prepare_latents": 0.002, "denoise": denoise_step_s, "decode": 40.0}
    flops = {"encode_prompt": 2e11, "denoise": 1.1e13, "decode": 3e12}
    for stage, s in seconds.items():
        metric = "seconds_per_step" if stage == "denoise" else "seconds"
        base.add(Record(variant="baseline", stage=stage, metric=metric, unit="s", value=s,
                        spread={"n": 3, "iqr": s / 50}, config=config),
                 Record(variant="baseline", stage=stage, metric="peak_rss_bytes", unit="B", value=3 * 2**30,
                        config=config),
                 Record(variant="baseline", stage=stage, metric="video_seconds", unit="s",
                        value=s * (MODEL["steps"] if stage == "denoise" else 1), kind="derived", config=config))
        if stage in flops:
            base.add(Record(variant="baseline", stage=stage, metric="load_seconds", unit="s", value=7.0, config=config),
                     Record(variant="baseline", stage=stage, metric="flops", unit="FLOP", value=flops[stage],
                            kind="derived", config=config),
                     Record(variant="baseline", stage=stage, metric="gflops", unit="GFLOP/s",
                            value=flops[stage] / s / 1e9, kind="derived", config=config))
    total = sum(s * (MODEL["steps"] if stage == "denoise" else 1) for stage, s in seconds.items())
    base.add(Record(variant="baseline", stage="total", metric="video_seconds", unit="s", value=total, kind="derived",
                    config=config))
    check = make_config(**MODEL | dict(frames=17, steps=2))
    base.add(Record(variant="check", stage="total", metric="derived_video_seconds", unit="s", value=20.0,
                    kind="derived", config=check),
             Record(variant="check", stage="total", metric="measured_video_seconds", unit="s", value=21.0,
                    spread={"n": 1}, config=check),
             Record(variant="check", stage="total", metric="peak_rss_bytes", unit="B", value=5 * 2**30, config=check))

    prof = ResultsStore("02_stage_profile", root=root)
    for stage in STAGES:
        shares = [0.6, 0.2, 0.1, 0.05, 0.0, 0.05, 0.0] if stage != "decode" else [0.1, 0.0, 0.1, 0.1, 0.6, 0.1, 0.0]
        prof.add(*[Record(variant=c, stage=stage, metric="self_share", unit="fraction", value=v, config=config)
                   for c, v in zip(OP_CLASSES, shares)])
        prof.add(Record(variant="baseline", stage=stage, metric="ceiling_fraction", unit="fraction", value=0.5,
                        kind="derived", config=config))
    step_ms = sum(GROUP_MS.values())
    for group, ms in GROUP_MS.items():
        prof.add(Record(variant=group, stage="denoise", metric="ms_per_step", unit="ms", value=ms, config=config),
                 Record(variant=group, stage="denoise", metric="share", unit="fraction", value=ms / step_ms,
                        kind="derived", config=config))
    for resolution, tokens, s in (("144p", 1440, 0.5), ("240p", 3600, 1.4)):
        cfg = make_config(**MODEL | dict(resolution=resolution, tokens=tokens))
        prof.add(Record(variant="block_pair", stage="denoise", metric="seconds", unit="s", value=s,
                        spread={"n": 2, "iqr": 0.01}, config=cfg),
                 Record(variant="block_pair", stage="denoise", metric="model_seconds_per_step", unit="s",
                        value=s * 28 + 0.1, kind="derived", config=cfg))
    for resolution, pixels, s in (("144p", 144 * 256, 0.3), ("240p", 240 * 426, 0.8)):
        cfg = make_config(**MODEL | dict(resolution=resolution, pixels=pixels))
        prof.add(Record(variant="spatial_frame", stage="decode", metric="seconds", unit="s", value=s, config=cfg),
                 Record(variant="temporal_chunk", stage="decode", metric="seconds", unit="s", value=2 * s, config=cfg))
    prof.add(Record(variant="t5", stage="encode_prompt", metric="seconds", unit="s", value=4.0, config=config))


def render(tmp_path: Path, root: Path):
    return renderer.render(results_root=root, figures_dir=tmp_path / "figures", out_dir=tmp_path / "report")


def table_row(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    build_store(tmp_path / "results")
    md_path, html_path = render(tmp_path, tmp_path / "results")
    return tmp_path, md_path, html_path


def test_report_files_tables_and_figures(rendered):
    tmp_path, md_path, html_path = rendered
    markdown, html = md_path.read_text(), html_path.read_text()
    assert "<table>" in html and "<img" in html
    assert "Performance measured on the real architecture with random weights" in markdown
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(images) == 7  # the six single-machine figures and the cross-platform one
    for image in images:
        assert (md_path.parent / image).resolve().is_file(), image
    # the sections this store has records for
    fed = ("Appendix B: hardware of every environment", "Ceilings", "Baseline: faithful fp32 eager",
           "Where the time goes", "Ranked bottlenecks", "CPU against GPU, and Graviton projections")
    for title in fed:
        assert "not measured yet" not in section(markdown, title).lower(), title


def section(markdown: str, title: str) -> str:
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, flags=re.M | re.S).group(1)


def test_quality_section_from_records(tmp_path):
    build_store(tmp_path / "results")
    store = ResultsStore("03_quality_baseline", root=tmp_path / "results")
    mini = quality_config("mini", "trained-mini", steps=30, threads=2)  # the committed weights' id
    other = dict(mini, mini_weights="0123456789ab")  # records of other weights are left out and listed
    for variant, split, all_correct, config in (("ground truth", "all", 1.0, mini), ("fp32", "train", 0.875, mini),
                                                ("fp32", "held_out", 0.4321, mini),
                                                ("scrambled transformer", "train", 0.0, mini),
                                                ("fp32", "train", 0.111, other)):
        store.add(*[Record(variant=variant, stage="adherence", metric=f"adherence_{name}", unit="fraction",
                           value=all_correct if name == "all_correct" else 0.9, spread={"n": 120},
                           config=dict(config, split=split)) for name in ("shape", "colour", "motion", "all_correct")])
    store.add(Record(variant="1-thread", stage="noise_floor", metric="psnr", unit="dB", value=71.25, config=mini),
              Record(variant="1-thread", stage="noise_floor", metric="latent_cosine", unit="", value=0.999999,
                     config=mini))
    markdown = render(tmp_path, tmp_path / "results")[0].read_text()
    quality = section(markdown, "Quality baseline: a mini OpenSora trained here")
    assert "not measured yet" not in quality.lower()
    assert "**87.5 %**" in quality and "**43.2 %**" in quality  # fp32 train and held-out all-correct, from records
    assert "11.1 %" not in quality
    assert f"weights id `{mini['mini_weights']}`" in quality
    assert "| 03_quality_baseline | 0123456789ab | 4 |" in quality  # the left-out records, per notebook
    assert table_row(quality, "scrambled transformer")[1:3] == ["train", "120"]
    assert "71.2" in table_row(quality, "mini (trained-mini weights)")[2]
    assert (tmp_path / "figures" / "quality_adherence.png").is_file()
    assert "random weights" not in re.search(r"\*Figure: prompt adherence.*", quality).group(0)


def test_numbers_come_from_records(rendered, tmp_path):
    _, md_path, _ = rendered
    row = table_row(md_path.read_text(), "median seconds per call")
    assert row[2:6] == ["5.00", "0.00200", "123", "40.0"]  # encode, prepare, denoise (one step), decode
    build_store(tmp_path / "results", denoise_step_s=654.321)
    changed = render(tmp_path, tmp_path / "results")[0].read_text()
    assert table_row(changed, "median seconds per call")[4] == "654"
    assert table_row(changed, "seconds per video")[4] == "19,600"  # 30 x 654.321, derived


def test_bottlenecks_rank_and_shares(rendered):
    tmp_path, _, _ = rendered
    table = s02_stage_profile.bottlenecks(load_records(tmp_path / "results"))
    assert list(table["rank"]) == list(range(1, len(table) + 1))
    assert table["share"].is_monotonic_decreasing
    assert table["share"].iloc[0] == table["share"].max()
    assert abs(table["share"].sum() - 1) < 1e-6
    assert table["where"].iloc[0] == "denoise: mlp"  # the largest module group of the largest stage
    assert set(table["stage"]) == set(STAGES)
    assert table.loc[table["stage"] == "decode", "dominant op class"].item() == "convolution"


def test_empty_store_renders_not_measured(tmp_path):
    md_path, html_path = render(tmp_path, tmp_path / "nothing")
    assert "not measured yet" in md_path.read_text().lower()
    assert html_path.is_file()
    assert not list((tmp_path / "figures").glob("*.png"))


def test_several_environments_and_unknown_one(rendered, tmp_path):
    source, _, _ = rendered
    root = tmp_path / "results"
    build_store(root)
    primary = next((root / "environments").glob("*.json"))
    other = json.loads(primary.read_text()) | {"environment_id": "aarch64-graviton-test-64c-00000000",
                                               "cpu_model": "Graviton test"}
    (root / "environments" / f"{other['environment_id']}.json").write_text(json.dumps(other))
    markdown = render(tmp_path, root)[0].read_text()
    assert f"{primary.stem} (primary)" in markdown and "Graviton test" in markdown
    with pytest.raises(ValueError, match="accepted"):
        renderer.render(results_root=root, figures_dir=tmp_path / "f", out_dir=tmp_path / "r", environment_id="nope")


def test_arm_section_from_emulated_records(tmp_path, monkeypatch):
    build_store(tmp_path / "results")
    for profile, qemu_cpu, fastmath in (("g2", "neoverse-n1", 1.0), ("g3", "max,sve256=on,sme=off", 0.0)):
        monkeypatch.setenv("ARM_QEMU_CPU", qemu_cpu)
        monkeypatch.setenv("ARM_PROFILE", profile)
        fingerprint.cache_clear()  # one process per emulated CPU in real runs
        store = ResultsStore("arm_check", root=tmp_path / "results")
        config = make_config(threads=2, arm_profile=profile, qemu_cpu=qemu_cpu)
        store.add(Record(variant="sdpa", stage="arm_check", metric="passed", unit="bool", value=1.0, kind="emulated",
                         config=config, note=f"fp32 3.3e-07 on {profile}"),
                  Record(variant="fp32_fastmath", stage="arm_check", metric="passed", unit="bool", value=fastmath,
                         kind="emulated", config=config, note="Linear moved to bf16"))
    monkeypatch.delenv("ARM_QEMU_CPU")
    fingerprint.cache_clear()
    markdown = render(tmp_path, tmp_path / "results")[0].read_text()
    # the machines in the section, every result in appendix C
    arm = section(markdown, "aarch64 functional check (emulated)") + section(
        markdown, "Appendix C: aarch64 functional check, every result")
    assert table_row(arm, "sdpa") == ["sdpa", "pass", "pass"]
    assert table_row(arm, "fp32_fastmath") == ["fp32_fastmath", "pass", "**FAIL**"]
    machine = table_row(arm, "g3")  # the first table: one row per emulated CPU
    assert machine[1] == "max,sve256=on,sme=off" and machine[4] == "emulated" and machine[-1] == "1/2"
    assert "fp32 3.3e-07 on g2" in arm and "not measured yet" not in arm.lower()


def test_the_summary_s_fast_row_is_the_rung_the_records_support():
    import pandas as pd

    from utils.report.sections import s08_end_to_end as s08
    names = ["faithful", "upstream", "best attention", "fast", "small"]
    ladder = pd.DataFrame({"configuration": names, "s per video (derived)": [900.0, 600.0, 300.0, 200.0, 500.0],
                           "speed-up over faithful (derived)": [None, 1.5, 3.0, 4.5, 1.8],
                           "speed-up over upstream (derived)": [None, None, 2.0, 3.0, 1.2],
                           "verdict against faithful": ["baseline", "faster", "faster", "faster", "faster"],
                           "verdict against upstream": [None, "baseline", "faster", "faster", "faster"],
                           "peak GiB (measured)": [19.0, 18.0, 9.0, 9.0, 5.0],
                           "PSNR dB vs faithful (derived)": [None, 40.0, 35.0, 31.0, 34.0]})
    mini = pd.DataFrame({"configuration": names, "difference (paired)": [0.0, 0.0, -0.01, -0.2, 0.0],
                         "margin (two SE)": [0.0, 0.05, 0.05, 0.05, 0.05],
                         "verdict": ["baseline", "within the margin", "within the margin", "loses adherence",
                                     "within the margin"]})
    supported = s08.supported_fast(ladder, mini)
    assert supported["rung"] == "best attention" and not supported["is_fast"]
    assert supported["rungs_kept"] == ["faithful", "upstream", "best attention"]
    table = s08.summary(ladder, mini).set_index("recipe")
    assert table.loc["fast (rung best attention)", "s per video"] == 300.0
    assert table.loc["fast (rung best attention)", "command"] == "python -m utils.generate --recipe fast"
    targets = {t["target"]: t for t in s08.targets(ladder, mini)}
    assert targets["fast over faithful, end to end (x)"]["value"] == 3.0
    mini.loc[mini["configuration"] == "fast", "verdict"] = "within the margin"
    assert s08.supported_fast(ladder, mini)["rung"] == "fast"


def test_the_readme_headline_is_rewritten_between_its_markers(tmp_path):
    start, end = renderer.README_MARKERS
    assert renderer.README.read_text().count(start) == 1  # `make render` rewrites the committed README's block
    text = f"intro\n{start}\nold table\n{end}\nrest\n"
    assert renderer.replace_block(text, "new table\n") == f"intro\n{start}\nnew table\n{end}\nrest\n"
    with pytest.raises(ValueError, match="each headline marker once, in order"):
        renderer.replace_block(f"{end}\n{start}\n", "x")
    readme = tmp_path / "README.md"
    readme.write_text(text)
    build_store(tmp_path / "results")  # no notebook 08 records: the block says so
    renderer.render(results_root=tmp_path / "results", figures_dir=tmp_path / "figures", out_dir=tmp_path / "report",
                    readme=readme)
    block = readme.read_text().split(start)[1].split(end)[0]
    assert "has no records yet" in block and "old table" not in block
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith(f"{end}\nrest\n")


def test_recipe_costs_price_the_smallest_instance_that_fits_and_the_largest():
    import pandas as pd

    from utils.report.sections import s90_cross_platform as xp
    table = pd.DataFrame({"recipe": ["faithful", "fast"], "peak GiB": [19.0, 9.0],
                          "speed-up over faithful": [None, 8.0]})
    projection = pd.DataFrame({"instance": ["c7g.16xlarge"] * 2 + ["c8g.16xlarge"], "projected_seconds": [60.0, 40.0,
                                                                                                           1.0]})
    prices = pd.DataFrame({"platform": ["m7g.large"], "instance": ["m7g.large"], "usd_per_hour": [0.08]})
    h100 = pd.DataFrame({"variant": ["upstream"], "instance": ["p5 (on-demand)"], "seconds": [3.0],
                         "usd_per_hour": [12.0], "usd_per_video": [0.01]})
    costs = xp.recipe_costs(table, projection, h100, prices).set_index(["recipe", "platform"])
    # faithful: 100 s on a Graviton3 16xlarge; the smallest c7g holding 19 GiB is the 4xlarge (16 vCPUs): 4x longer
    assert costs.loc[("faithful", "c7g.4xlarge"), "s per video"] == pytest.approx(400.0)
    assert costs.loc[("faithful", "c7g.4xlarge"), "price"] == "no sourced price"
    assert costs.loc[("faithful", "r7g.xlarge"), "s per video"] == pytest.approx(1600.0)
    # fast: 8x faster; m7g priced from the large size, linear in vCPUs
    row = costs.loc[("fast", "m7g.xlarge")]
    assert row["s per video"] == pytest.approx(100 * 64 / 4 / 8) and row["usd per hour"] == pytest.approx(0.16)
    assert row["usd per video"] == pytest.approx(200 * 0.16 / 3600) and row["kind"] == "projected"
    assert costs.loc[("fast", "m7g.16xlarge"), "s per video"] == pytest.approx(12.5)
    assert costs.loc[("upstream (GPU bench)", "H100, p5 (on-demand)"), "kind"] == "derived from measured"
    # two priced sizes of one family: the newest price is the one scaled
    dated = pd.DataFrame({"platform": ["m7g.16xlarge", "m7g.large"], "instance": ["m7g.16xlarge", "m7g.large"],
                          "usd_per_hour": [3.2, 0.08], "date": ["2025-01-01", "2026-06-17"]})
    assert xp.family_price(dated, "m7g.xlarge") == (pytest.approx(0.16), "derived from m7g.large (linear in vCPUs)")
    assert xp.family_price(dated, "m7g.16xlarge") == (pytest.approx(3.2), "price table")
    assert xp.family_price(dated, "c7g.large") == (None, "no sourced price")
    assert xp.family_price(dated, "m7g.24xlarge")[0] == pytest.approx(0.04 * 96)  # sizes by EC2's naming rule
    assert xp.family_price(dated, "m7g.metal") == (None, "no sourced price")
