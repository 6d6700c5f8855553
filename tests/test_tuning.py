"""Optimisation steps against the fp32 baseline (tiny preset), the fresh-process runner, the footprint
table and the memory preflight that reads it, the oneDNN log parser, records and the report section.

Stated bounds (tiny model, random weights, same inputs per stage):
- bf16 weights and activations: relative L2 error < 5 % and cosine > 0.998 for every stage's output;
- bf16 autocast: the same bounds;
- int8 weight-only T5: cosine of the prompt embedding > 0.995 (relative L2 < 10 %);
- upstream's mixed precision keeps T5 in fp32: its embedding is exactly fp32's.
"""
import json

import pytest
import torch

from utils.experiments import variant_runs
from utils.experiments.e04_precision_threads_memory import footprint_entries, footprint_records, probe_records
from utils.experiments.variant_runs import ratio_records, stage_records
from utils.io import GIB
from utils.measure import runner
from utils.measure.benchmark import Timing
from utils.measure.instances import instance_table, smallest_instance
from utils.measure.onednn import parse_onednn_verbose
from utils.measure.results import ResultsStore, load_records, make_config
from utils.model import memory
from utils.model.memory import InsufficientMemoryError, footprint_key, load_footprints, store_footprints
from utils.model.pipeline import STAGES, VideoSetting, load_pipeline
from utils.optim import preflight, registry
from utils.paths import REPO
from utils.report import render

SETTING = VideoSetting.create("144p", "9:16", 17, steps=2)
PROMPT = "a red circle moving right"
BOUNDS = {"bf16": (0.05, 0.998), "autocast": (0.05, 0.998)}  # (max relative L2, min cosine)


def errors(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    a, b = ours.double().flatten(), reference.double().flatten()
    return float((a - b).norm() / b.norm()), float(a @ b / (a.norm() * b.norm()))


def stage_outputs(pipe, reference: dict | None = None) -> dict:
    """Each stage's output, fed the reference's inputs when given (each component loaded once)."""
    out = {}
    pipe.load("text_encoder")
    out["y"], mask = pipe.encode_prompt([PROMPT])
    pipe.release("text_encoder")
    y = out["y"] if reference is None else reference["y"]
    z = pipe.prepare_latents(1, SETTING)
    pipe.load("transformer")
    out["latent"] = pipe.denoise(z, y, mask, SETTING, progress=False)
    pipe.release("transformer")
    pipe.load("vae")
    out["video"] = pipe.decode(out["latent"] if reference is None else reference["latent"], SETTING)
    pipe.release("vae")
    return out


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return stage_outputs(load_pipeline("tiny", dtype="fp32", load=()))


# ---- optimisation steps against fp32 --------------------------------------------------------------------

@pytest.mark.parametrize("name, steps", [("bf16", {"bf16": {}}), ("autocast", {"autocast": {"dtype": "bf16"}})])
def test_precision_steps_within_bounds(reference, name, steps):
    pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()), steps)
    ours = stage_outputs(pipe, reference)
    max_rel, min_cos = BOUNDS[name]
    for key in ("y", "latent", "video"):
        rel, cos = errors(ours[key].float(), reference[key])
        assert 0 < rel < max_rel and cos > min_cos, (name, key, rel, cos)  # lossy, but within the bound


def test_bf16_weights_are_fp32_draws_rounded():
    fp32 = load_pipeline("tiny", dtype="fp32", load=("transformer",))
    bf16 = registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"bf16": {}})
    bf16.load("transformer")
    for (name, a), (_, b) in zip(fp32.transformer.named_parameters(), bf16.transformer.named_parameters()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name


def test_upstream_mixed_precision_keeps_t5_exact(reference):
    pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()),
                          variant_runs.variant_steps("upstream"))
    assert pipe.dtypes == {"text_encoder": torch.float32, "transformer": torch.bfloat16, "vae": torch.bfloat16}
    ours = stage_outputs(pipe, reference)
    assert torch.equal(ours["y"], reference["y"])
    assert errors(ours["latent"], reference["latent"])[0] < BOUNDS["bf16"][0]


def test_int8_weight_only_text_encoder_bound_and_reload(reference):
    pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"int8_weight_only": {}})
    pipe.load("text_encoder")
    linear = pipe.text_encoder.model.encoder.block[0].layer[0].SelfAttention.q
    assert type(linear.weight).__name__ == "Int8Tensor"
    y, _ = pipe.encode_prompt([PROMPT])
    rel, cos = errors(y, reference["y"])
    assert cos > 0.995 and 0 < rel < 0.10, (rel, cos)
    pipe.release("text_encoder")  # plain meta weights again, quantised again on the next load
    assert type(linear.weight) is torch.nn.Parameter and linear.weight.is_meta
    pipe.load("text_encoder")
    assert type(linear.weight).__name__ == "Int8Tensor"
    assert torch.equal(pipe.encode_prompt([PROMPT])[0], y)


def test_vae_chunking_keeps_numerics_and_validates(reference):
    pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=("vae",)),
                          {"vae_chunking": {"micro_batch_size": 1, "micro_frame_size": 17}})
    torch.testing.assert_close(pipe.decode(reference["latent"], SETTING), reference["video"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="positive int or None"):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"vae_chunking": {"micro_batch_size": 0}})


def test_registry_order_and_bad_input():
    names = list(registry.OPTIMIZATIONS)  # others register their steps too; these keep their places
    assert (names.index("bf16") < names.index("int8_weight_only") < names.index("quantize") < names.index("vae_chunking")
            < names.index("autocast"))
    assert names[-1] == "autocast"  # wrappers around the stages come last
    pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()),
                          {"autocast": {}, "bf16": {"components": ["transformer", "vae"]}})
    assert list(pipe.optimizations) == ["bf16", "autocast"]  # registry order, whatever the given order
    assert registry.describe(pipe) == "bf16(components=transformer,vae), autocast"
    with pytest.raises(ValueError, match="already applied"):
        registry.apply(pipe, {"bf16": {}})
    with pytest.raises(ValueError, match="accepted: bf16, int8_weight_only, quantize, vae_chunking"):
        registry.apply(pipe, {"fp8": {}})
    with pytest.raises(ValueError, match="unknown components"):
        registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"bf16": {"components": ["t5"]}})
    with pytest.raises(ValueError, match="unknown variants"):
        variant_runs.check_names(variants=["fp16"])


# ---- the fresh-process runner ---------------------------------------------------------------------------

def test_fresh_process_runner_returns_a_valid_record(tmp_path, monkeypatch):
    monkeypatch.setenv("DNNL_DEFAULT_FPMATH_MODE", "BF16")  # exported in the shell: must not reach the child
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    base = dict(model="tiny", resolution="144p", aspect_ratio="9:16", num_frames=17, steps=2, prompt=PROMPT,
                threads=1, warmup=1, repeats=1, busy_retries=0)
    task, env, spec = variant_runs.stage_run(base, "bf16", env_setting="lru_cache", outputs=tmp_path / "bf16.pt",
                                       fidelity_steps=1)
    result = variant_runs.run_task(task, env=env | {"STUDY_PROBE": "seen"}, **spec)
    assert result["env_seen"]["LRU_CACHE_CAPACITY"] == "1024" and result["env_seen"]["STUDY_PROBE"] == "seen"
    assert result["env_seen"]["OMP_NUM_THREADS"] == "1" and result["threads_used"] == 1
    assert "DNNL_DEFAULT_FPMATH_MODE" not in result["env_seen"]
    stored = variant_runs.experiment_config(result, "startup_env")  # each record says what the child saw
    assert "LRU_CACHE_CAPACITY=1024" in stored["env_seen"] and "DNNL_DEFAULT_FPMATH_MODE" not in stored["env_seen"]
    assert result["pid"] != __import__("os").getpid()
    assert set(result["stages"]) == set(STAGES) and result["config"]["dtype"] == "bf16"
    outputs = torch.load(result["outputs"])
    assert set(outputs) == {"y", "mask", "latent_one_step", "latent_final", "video"}
    store = ResultsStore("04_precision_threads_memory", root=tmp_path / "results")
    config = dict(result["config"], experiment="precision")
    store.add(*stage_records(result, "bf16", config, steps=30))  # validated against the schema
    records = load_records(tmp_path / "results")
    step = records[(records.stage == "denoise") & (records.metric == "seconds_per_step")]["value"].item()
    video = records[(records.stage == "denoise") & (records.metric == "video_seconds")]["value"].item()
    assert video == pytest.approx(30 * step)


def test_a_child_starts_from_a_clean_environment(monkeypatch):
    for name, value in variant_runs.GUIDE_ENV.items():  # the runbook's exports
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "ZEN")  # machine settings other than the study's stay
    clean = runner.child_environment({}, threads=2)
    assert not set(variant_runs.GUIDE_ENV) & set(clean) and clean["OMP_NUM_THREADS"] == "2"
    assert clean["OPENBLAS_CORETYPE"] == "ZEN" and clean["PATH"] == __import__("os").environ["PATH"]
    assert runner.child_environment({"OMP_PLACES": "cores"}, threads=1)["OMP_PLACES"] == "cores"
    varied = {name for setting in variant_runs.ENV_SETTINGS.values() for name in setting}
    assert varied <= set(runner.STUDY_VARIABLES), varied - set(runner.STUDY_VARIABLES)


def test_a_failing_child_raises_with_its_error():
    with pytest.raises(runner.ChildFailed, match="unknown pipeline preset"):
        variant_runs.run_task("stages", model="huge", resolution="144p", aspect_ratio="9:16", num_frames=17, steps=1,
                              prompt=PROMPT, threads=1)
    with pytest.raises(ValueError, match="unknown task 'train' of utils.experiments.variant_runs; accepted: stages, "
                                         "footprint, adherence, probe"):
        variant_runs.run_task("train")
    with pytest.raises(ValueError, match="a task is named '<module>:<task>'"):
        runner.run_in_fresh_process("stages")


# ---- memory: footprints, the preflight, instances -----------------------------------------------------

def tiny_key(**changes) -> dict:
    fields = dict(model="tiny", resolution="144p", aspect_ratio="9:16", frames=17, dtype="fp32",
                  text_encoder_dtype="fp32", free_text_encoder=False, lazy_load=False, optimizations="",
                  micro_batch_size=4, micro_frame_size=17)
    return footprint_key(**(fields | changes))


def entry(key, peak, environment="x86_64-elsewhere-1c-00000000"):
    return dict(key=key, peak_rss_bytes=peak, stages={}, environment_id=environment, arch="x86_64",
                memory_config="test", source="test", time="20260101T000000Z")


def test_footprint_table_merges_and_validates(tmp_path):
    path = tmp_path / "footprints.json"
    store_footprints([entry(tiny_key(), 5 * GIB), entry(tiny_key(dtype="bf16"), 3 * GIB)], path)
    store_footprints([entry(tiny_key(), 6 * GIB)], path)  # same environment and key: replaced
    assert sorted(e["peak_rss_bytes"] for e in load_footprints(path)) == [3 * GIB, 6 * GIB]
    store_footprints([entry(tiny_key(), 7 * GIB, environment="x86_64-other-2c-11111111")], path)
    assert memory.measured_footprint(tiny_key(), path)["peak_rss_bytes"] == 7 * GIB  # the larger, to be safe
    assert memory.measured_footprint(tiny_key(), path, environment_id="x86_64-elsewhere-1c-00000000")[
        "peak_rss_bytes"] == 6 * GIB  # this machine's own figure first
    assert memory.measured_footprint(tiny_key(frames=51), path) is None
    with pytest.raises(ValueError, match="missing .'lazy_load'."):
        footprint_key(**{k: v for k, v in tiny_key().items() if k != "lazy_load"})


def test_preflight_reads_the_footprint_table(tmp_path, monkeypatch):
    path = tmp_path / "footprints.json"
    monkeypatch.setattr(memory, "FOOTPRINTS", path)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1 * GIB)
    load_pipeline("tiny", dtype="fp32", setting=SETTING, load=())  # analytic: a few MB, fits
    store_footprints([entry(tiny_key(lazy_load=True), 5 * GIB)], path)
    with pytest.raises(InsufficientMemoryError) as refused:
        load_pipeline("tiny", dtype="fp32", setting=SETTING, load=())
    message = str(refused.value)
    assert "needs about 5.0 GiB (measured peak RSS from footprints.json, environment x86_64-elsewhere" in message
    assert "1.0 GiB is available" in message
    load_pipeline("tiny", dtype="fp32", setting=SETTING, load=(), free_text_encoder=True)  # another key: analytic


def test_preflight_of_an_optimised_pipeline(tmp_path, monkeypatch):
    path = tmp_path / "footprints.json"
    monkeypatch.setattr(memory, "FOOTPRINTS", path)
    pipe = registry.apply(load_pipeline("tiny", dtype="fp32", load=()), {"bf16": {}, "int8_weight_only": {}})
    estimate = preflight.preflight(pipe, SETTING, free_text_encoder=True)
    assert estimate["source"] == "analytic estimate"
    bf16_t5 = memory.module_bytes(pipe.text_encoder.model, torch.bfloat16)
    assert estimate["text_encoder"] < bf16_t5 and estimate["peak"] >= bf16_t5  # int8 resident, bf16 while loading
    assert estimate["key"]["optimizations"] == "bf16, int8_weight_only" and estimate["key"]["lazy_load"]
    store_footprints([entry(estimate["key"], 100 * GIB)], path)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 2 * GIB)
    with pytest.raises(InsufficientMemoryError, match=r"int8_weight_only.*needs about 100\.0 GiB \(measured"):
        preflight.preflight(pipe, SETTING, free_text_encoder=True)


def test_footprint_task_records_and_entries(tmp_path):
    spec = dict(model="tiny", resolution="144p", aspect_ratio="9:16", num_frames=17, steps=2, prompt=PROMPT,
                threads=1, free_text_encoder=True, optimizations={"bf16": {}})
    result = variant_runs.task_footprint(spec) | {"env": {}}
    events = [e["event"] for e in result["events"]]
    assert events == ["start", "load text_encoder", "encode_prompt", "release text_encoder", "prepare_latents",
                      "load transformer", "denoise", "load vae", "decode"]
    assert result["peak_rss_bytes"] == max(e["peak_rss_bytes"] for e in result["events"])
    store = ResultsStore("04_precision_threads_memory", root=tmp_path / "results")
    store.add(*footprint_records("bf16+free", result))
    records = load_records(tmp_path / "results")
    assert set(records.metric) >= {"load_peak_rss_bytes", "peak_rss_bytes", "rss_after_release_bytes",
                                   "smallest_c7g_gib", "analytic_peak_bytes"}
    entries = footprint_entries({"bf16+free": result}, store.environment, store.run_id)
    assert entries[0]["key"] == tiny_key(dtype="bf16", text_encoder_dtype="bf16", free_text_encoder=True,
                                         lazy_load=True, optimizations="bf16")
    refused = {"refused": "needs about 9.0 GiB", "estimate": {"peak": 9 * GIB}, "config": result["config"], "env": {}}
    (record,) = footprint_records("too big", refused)
    assert record.metric == "refused_estimate_bytes" and "not run" in record.note


def test_smallest_instance_with_headroom():
    table = instance_table(("c7g",))
    assert list(table["instance"])[:3] == ["c7g.medium", "c7g.large", "c7g.xlarge"]
    assert (table["usable_gib"] < table["memory_gib"]).all()
    assert smallest_instance(3 * GIB, "c7g")["instance"] == "c7g.large"  # 4 GiB, ~3.3 usable
    assert smallest_instance(3.5 * GIB, "c7g")["instance"] == "c7g.xlarge"
    assert smallest_instance(15 * GIB, "r7g")["instance"] == "r7g.xlarge"  # 16 GiB leaves less than 15 usable
    assert smallest_instance(200 * GIB, "c7g") is None
    with pytest.raises(ValueError, match="unknown instance families"):
        instance_table(("p5",))


# ---- oneDNN probe parsing --------------------------------------------------------------------------------

VERBOSE = """onednn_verbose,v1,primitive,info,template:operation,engine,primitive,implementation,prop_kind
onednn_verbose,v1,primitive,exec,cpu,reorder,jit:blk,undef,src:f32::blocked:abcd::f0 dst:f32::blocked:aBcd16b::f0,attr-scratchpad:user attr-fpmath:bf16,,1x64x32x32,0.02
onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx512_core,forward_training,src:f32:a:blocked:aBcd16b::f0 wei:f32:a:blocked:ABcd16b16a::f0,attr-scratchpad:user attr-fpmath:bf16,alg:convolution_direct,mb1_ic64oc64,0.6
onednn_verbose,v1,primitive,exec,cpu,matmul,gemm:acl,undef,src:bf16::blocked:ab::f0 wei:bf16::blocked:ab::f0,,,64x64:64x64,0.1
random output line"""


def test_parse_onednn_verbose():
    primitives = parse_onednn_verbose(VERBOSE.splitlines())
    assert [p["kind"] for p in primitives] == ["reorder", "convolution", "matmul"]
    assert primitives[1]["impl"] == "jit:avx512_core" and primitives[1]["fpmath"] == "bf16"
    assert primitives[2]["fpmath"] is None and ":bf16" in primitives[2]["memory"]


def test_probe_records_find_no_change_when_nothing_changes():
    timing = Timing(first_s=0.1, times_s=[0.1], warmup=1, threads=1, device="cpu").as_dict()
    same = dict(onednn_primitives=1, reorders=2, implementations=["convolution jit:avx512_core"], fpmath_bf16=0,
                bf16_kernels=0, rel_err_fp64=2e-7, timing=timing)
    results = {"default": {"ops": {"conv2d": same}, "env": {}},
               "fast_math": {"ops": {"conv2d": same | {"fpmath_bf16": 1}}, "env": {"DNNL_DEFAULT_FPMATH_MODE": "BF16"}},
               "bf16_kernel": {"ops": {"conv2d": same | {"bf16_kernels": 1, "rel_err_fp64": 3e-3}}, "env": {}}}
    records = probe_records(results, threads=1)
    changed = {r.variant: r.value for r in records if r.metric == "changes_kernels"}
    assert changed == {"fast_math": 0.0, "bf16_kernel": 1.0}


# ---- records, the notebook and the report ---------------------------------------------------------------

def fake_result(seconds: dict[str, float], threads: int = 2, dtype: str = "fp32", iqr: float = 0.0,
                processes: tuple[float, ...] | None = None) -> dict:
    """A child's ``stages`` result; with ``processes`` (relative factors), a ``combine_processes`` result of
    that many fresh processes whose medians are ``seconds`` times each factor."""
    config = make_config(model="opensora-v1.2", weights="random", resolution="144p", aspect_ratio="9:16", frames=51,
                         steps=30, dtype=dtype, threads=threads, text_encoder_dtype=dtype,
                         optimizations="bf16" if dtype == "bf16" else "")
    stages = {s: {"timing": Timing(first_s=v, times_s=[v - iqr, v, v + iqr], warmup=1, threads=threads,
                                   device="cpu", peak_rss_bytes=GIB).as_dict(), "load_s": 1.0}
              for s, v in seconds.items()}
    if processes:
        for stage, entry in stages.items():
            entry.update(processes=[seconds[stage] * f for f in processes], positions=list(range(len(processes))))
    return dict(config=config, stages=stages, env={})


def test_ratio_records_and_report_section(tmp_path):

    store = ResultsStore("04_precision_threads_memory", root=tmp_path / "results")
    spread = (0.99, 1.0, 1.01)  # three fresh processes, 1 % apart
    precision = {"fp32": fake_result({"encode_prompt": 20.0, "denoise": 70.0, "decode": 110.0}, processes=spread),
                 "bf16": fake_result({"encode_prompt": 8.0, "denoise": 35.0, "decode": 55.0}, dtype="bf16",
                                     processes=spread)}
    for name, result in precision.items():
        store.add(*stage_records(result, name, dict(result["config"], experiment="precision"), steps=30))
    speedups = ratio_records(precision, "fp32", lambda n: n, "speedup_vs_fp32",
                             lambda n: dict(precision[n]["config"], experiment="precision"), "test")
    assert {(r.variant, r.stage): round(r.value, 3) for r in speedups}[("bf16", "denoise")] == 2.0
    store.add(*speedups)
    startup = {"default": fake_result({"denoise": 35.0}, dtype="bf16", iqr=0.1, processes=spread),
               "thp": fake_result({"denoise": 30.0}, dtype="bf16", iqr=0.1, processes=spread),  # ranges apart
               "lru_cache": fake_result({"denoise": 35.2}, dtype="bf16", iqr=0.1, processes=spread),  # overlapping
               "omp_proc_bind_false": fake_result({"denoise": 30.0}, dtype="bf16", iqr=0.1)}  # one process
    for name, result in startup.items():
        store.add(*stage_records(result, name, dict(result["config"], experiment="startup_env", env_setting=name),
                                 steps=30))
    store.add(*ratio_records(startup, "default", lambda n: n, "speedup_vs_default",
                             lambda n: dict(startup[n]["config"], experiment="startup_env", env_setting=n), "test"))
    md_path, _ = render.render(tmp_path / "results", tmp_path / "figures", tmp_path / "report")
    markdown = md_path.read_text()
    section = markdown[markdown.index("## Precision, threads and memory"):markdown.index("## CPU against GPU")]
    assert "| bf16 | bf16 |" in section and "2.004" in section  # (20+70*30+110) / (8+35*30+55), derived
    assert (tmp_path / "figures" / "precision_times.png").is_file()
    graviton = section[section.index("**Graviton.**"):section.index("**x86.**")]
    assert "Nobody has run `04_precision_threads_memory` on Graviton yet" in graviton and "measured here" not in graviton
    x86 = section[section.index("**x86.**"):]
    assert "| THP_MEM_ALLOC_ENABLE=1 | set it |" in x86  # 35/30: ranges apart, beyond the 3 % threshold
    assert "| LRU_CACHE_CAPACITY=1024 | optional: no measurable difference here |" in x86
    assert "| OMP_PROC_BIND=false | not ranked: measured in one process" in x86  # no between-process spread
    assert "| precision | bf16 (bf16) |" in x86 and "measured here" in x86
    assert "| OMP_PLACES=cores | OMP_PLACES=cores |" in x86 and "from the guide" in x86  # not measured: the guide
    assert "no measurable difference" in section and "process range" in section


def test_notebook_structure():
    notebook = json.loads((REPO / "notebooks" / "04_precision_threads_memory.ipynb").read_text())
    cells = notebook["cells"]
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    assert cells[0]["cell_type"] == "markdown" and cells[0]["source"][0].startswith("# 04")
    assert cells[1]["metadata"]["tags"] == ["parameters"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert not any(line.lstrip().startswith(("def ", "class ")) for c in code for line in c["source"])
    from utils.notebooks import profile_parameters

    tiny = profile_parameters("tiny", "04_precision_threads_memory")
    assert tiny["model"] == "tiny" and tiny["footprints_path"].startswith("build/smoke")
    parameters = "".join(cells[1]["source"])
    assert all(f"{name} =" in parameters for name in tiny)  # every profile parameter exists in the notebook
    variant_runs.check_names(variants=tiny["variants"], env_settings=tiny["env_settings"],
                       memory_configs=tiny["memory_configs"])
