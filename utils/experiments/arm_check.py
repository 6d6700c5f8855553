"""Functional checks of the aarch64 code paths the study relies on, for one (emulated) Graviton CPU.

    ARM_PROFILE=g3 tools/arm-python.sh -m utils.experiments.arm_check     # one profile under qemu-user
    make arm-check                                            # g2, g3 and g4 (ARM_STORE=1 keeps records)

It also runs natively on an Arm machine (``python -m utils.experiments.arm_check``). Each check prints one line;
the run ends with ``N passed, N failed`` and exits non-zero when a check failed. Every check is
functional: numerics against an fp64 reference, and which kernel library ran (oneDNN's verbose log, the
ATen operator, the packed-weight format). Under emulation every timing is 300-3000x off, unevenly per
instruction set, so none is reported as performance. Records (``kind="emulated"``, one file per
profile) go to build/arm/results, or to data/results with ``--store``.

Module level imports only the standard library (and ``utils.paths``, itself standard library only):
tools/arm-python.sh runs ``--hwcaps`` before any wheel is on the path, to write the HWCAPs into the
profile's fake /proc/cpuinfo.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from utils.paths import BUILD, REPO

BUILD_RESULTS = BUILD / "arm" / "results"

# Linux arm64 HWCAP bits (uapi/asm/hwcap.h): AT_HWCAP, then AT_HWCAP2
HWCAP_NAMES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
               "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()

HWCAP2_NAMES = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
                "svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme sme_i16i64 sme_f64f64 sme_i8i32 "
                "sme_f16f32 sme_b16f32 sme_f32f32 sme_fa64 wfxt ebf16 sve_ebf16 cssc rprfm sve2p1 sme2 sme2p1 "
                "sme_i16i32 sme_bi32i32 sme_b16b16 sme_f16f16 mops hbc").split()

AT_HWCAP, AT_HWCAP2 = 16, 26

# the HWCAPs that decide which kernels run
KERNEL_HWCAPS = ("asimddp", "sve", "sve2", "svebf16", "svei8mm", "i8mm", "bf16", "sme", "sme2")

# What tools/arm-python.sh's profiles must show with torch 2.9.1 (the emulated torch).
EXPECTED = {
    "g2": dict(isa_torch="DEFAULT", mkldnn_bf16=False),  # Neoverse N1: NEON + dotprod, no BF16
    "g3": dict(isa_torch="SVE256", mkldnn_bf16=True),    # Neoverse V1: 256-bit SVE
    "g4": dict(isa_torch="DEFAULT", mkldnn_bf16=True),   # Neoverse V2: torch 2.9 has no SVE128 level, so NEON
}

# Error bounds (relative Frobenius error against fp64 on the same rounded inputs)
FP32_BOUND = 1e-5  # fp32 kernels: a few ulps

BF16_BOUND = 1e-2  # bf16 output rounding is 2^-9 = 2e-3

FASTMATH_MIN = 1e-4  # fp32 on bf16 weights (fast math) is ~2e-3 away; exact fp32 is ~1e-6

INT8_BOUND = 5e-2

INT4_BOUND = 2e-2  # int8 activations x int4 weights, against fp64 on the dequantised weights

M, K, N = 64, 256, 256  # the Linear shape of the checks


def hwcaps() -> list[str]:
    """HWCAP names the kernel (or QEMU) reports to this process: what cpuinfo, oneDNN and ACL see."""
    if platform.machine() != "aarch64":
        return []
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    words = ((getauxval(AT_HWCAP), HWCAP_NAMES), (getauxval(AT_HWCAP2), HWCAP2_NAMES))
    return [name for bits, names in words for i, name in enumerate(names) if bits >> i & 1]


def rel_error(actual, reference) -> float:
    actual, reference = actual.double(), reference.double()
    return ((actual - reference).norm() / reference.norm()).item()


def inputs(*shape, seed: int = 0):
    import torch  # standard library only at module level (see above)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# which kernels ran
# ---------------------------------------------------------------------------------------------
@contextmanager
def dispatch_log():
    """Collect the ATen operators and oneDNN primitives run inside the block. oneDNN writes its verbose
    lines to the C stdout, so fd 1 is redirected to a file meanwhile."""
    import torch  # standard library only at module level (see above)
    from torch.utils._python_dispatch import TorchDispatchMode

    class AtenOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in ("t", "view", "detach", "transpose", "empty", "permute"):
                log["aten"].append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    log = {"aten": [], "onednn": []}
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON), AtenOps():
                yield log
        finally:
            ctypes.CDLL(None).fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                fields = line.split(",")
                if line.startswith("onednn_verbose") and "exec" in fields:
                    kind, impl = fields[fields.index("exec") + 2: fields.index("exec") + 4]
                    if kind != "reorder":
                        log["onednn"].append(f"{kind} {impl}" + (" fpmath:bf16" if "fpmath:bf16" in line else ""))
    log["aten"] = sorted(set(log["aten"]))
    log["onednn"] = sorted(set(log["onednn"]))


def describe(log: dict) -> str:
    onednn = "; ".join(log["onednn"]) or "no oneDNN primitive"
    return f"aten {'+'.join(log['aten'])} -> {onednn}"


# ---------------------------------------------------------------------------------------------
# the checks: each returns (passed, one-line detail, numbers for the record)
# ---------------------------------------------------------------------------------------------
def check_environment(profile: str):
    import torch  # standard library only at module level (see above)

    from utils.fingerprint import ISA_FLAGS, fingerprint  # see above
    facts = fingerprint() | aarch64_facts()
    caps = set(facts["hwcaps"])
    problems = [] if facts["arch"] == "aarch64" else [f"arch is {facts['arch']}"]
    cpuinfo_flags = set(facts["cpu_flags"])
    if cpuinfo_flags != caps & set(ISA_FLAGS):  # the profile's fake /proc/cpuinfo against getauxval
        problems.append(f"/proc/cpuinfo flags {sorted(cpuinfo_flags)} != HWCAPs {sorted(caps & set(ISA_FLAGS))}")
    for name, wanted in EXPECTED.get(profile, {}).items():
        if facts[name] != wanted:
            problems.append(f"{name} {facts[name]} (profile {profile} expects {wanted})")
    for name in ("acl", "kleidiai"):
        if not facts[name]:
            problems.append(f"{name} unavailable")
    detail = (f"torch {torch.__version__}, ISA {facts['isa_torch']}, mkldnn bf16 {facts['mkldnn_bf16']}, "
              f"ACL {facts['acl']}, KleidiAI {facts['kleidiai']}, HWCAPs "
              f"{' '.join(c for c in KERNEL_HWCAPS if c in caps) or 'none of ' + '/'.join(KERNEL_HWCAPS)}")
    return not problems, "; ".join(problems + [detail]), {}


def aarch64_facts() -> dict:
    """What decides the Arm kernels, beyond utils.fingerprint: HWCAPs, oneDNN's bf16, ACL, KleidiAI."""
    import torch  # standard library only at module level (see above)

    def ask(call):
        try:
            return call()
        except (AttributeError, RuntimeError):  # an op this torch build lacks
            return None

    return {
        "hwcaps": hwcaps(),
        "mkldnn_bf16": ask(lambda: bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())),
        "acl": ask(lambda: bool(torch.ops.mkldnn._is_mkldnn_acl_supported())),
        "kleidiai": ask(lambda: bool(torch.backends.kleidiai.is_available())),
        "quantized_engines": list(torch.backends.quantized.supported_engines),
    }


def check_parity_tests(profile: str):
    """The upstream-fixture parity tests (tests/arm: test_stdit3's and test_vae's, aarch64 bound)."""
    import pytest  # see above

    class Outcomes:
        counts: dict[str, int] = {}

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                Outcomes.counts[report.outcome] = Outcomes.counts.get(report.outcome, 0) + 1

    code = pytest.main(["-q", "-W", "ignore", "-p", "no:cacheprovider", str(REPO / "tests" / "arm")],
                       plugins=[Outcomes()])
    counts = Outcomes.counts
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "no tests ran"
    bound = getattr(sys.modules.get("test_parity"), "AARCH64_ATOL", None)
    return (code == 0 and counts.get("passed", 0) > 0,
            f"{summary} (tests/arm/test_parity.py: upstream fixtures, max abs error < {bound:g})", counts)


def check_generation(profile: str, frames: int):
    import torch  # standard library only at module level (see above)

    from utils.model.pipeline import VideoSetting, load_pipeline  # see above
    setting = VideoSetting.create("144p", "9:16", frames, steps=2)
    pipe = load_pipeline("tiny", weights="random", dtype="fp32")
    out = pipe(["a beautiful waterfall in a forest"], setting, progress=False)
    expected = (1, 3, setting.num_frames, setting.height, setting.width)
    latents = (1, pipe.vae.out_channels, *pipe.latent_size(setting))
    problems = [f"{name} shape {tuple(t.shape)} != {want}" for name, t, want in
                (("video", out.video, expected), ("latents", out.latents, latents)) if tuple(t.shape) != want]
    finite = bool(torch.isfinite(out.video).all())
    if not finite:
        problems.append("video has non-finite values")
    detail = (f"tiny fp32 144p 9:16 {setting.num_frames} frame(s) {setting.steps} steps: video "
              f"{tuple(out.video.shape)}, latents {tuple(out.latents.shape)}, finite {finite}")
    return not problems, "; ".join(problems + [detail]), {}


def linear_errors(dtype_name: str) -> dict:
    """fp64-referenced errors and dispatch of nn.Linear and matmul in ``dtype_name`` (this process's
    oneDNN fpmath mode), plus a hash of the Linear output (to tell whether a setting changed it)."""
    import torch  # standard library only at module level (see above)

    from utils.model.dtypes import parse_dtype  # module level imports only the standard library (see above)

    dtype = parse_dtype(dtype_name)
    x, w, b = inputs(M, K, seed=1).to(dtype), inputs(N, K, seed=2).to(dtype), inputs(N, seed=3).to(dtype)
    with torch.no_grad(), dispatch_log() as linear_log:
        y = torch.nn.functional.linear(x, w, b)
    w_t = w.T.contiguous()
    with torch.no_grad(), dispatch_log() as matmul_log:
        z = torch.matmul(x, w_t)
    return {
        "linear": rel_error(y, torch.nn.functional.linear(x.double(), w.double(), b.double())),
        "matmul": rel_error(z, x.double() @ w.double().T),
        "linear_dispatch": describe(linear_log), "matmul_dispatch": describe(matmul_log),
        "linear_sha": hashlib.sha256(y.float().numpy().tobytes()).hexdigest()[:16],
    }


def _check_linear(dtype: str, bound: float):
    e = linear_errors(dtype)
    ok = e["linear"] < bound and e["matmul"] < bound
    return ok, (f"Linear {e['linear']:.1e}, matmul {e['matmul']:.1e} vs fp64 (bound {bound:g}); "
                f"Linear: {e['linear_dispatch']}; matmul: {e['matmul_dispatch']}"), \
        {"linear_rel_error": e["linear"], "matmul_rel_error": e["matmul"]}


def check_fp32_linear(profile: str):
    return _check_linear("fp32", FP32_BOUND)


def check_bf16_linear(profile: str):
    return _check_linear("bf16", BF16_BOUND)


def check_fastmath(profile: str):
    """DNNL_DEFAULT_FPMATH_MODE=BF16 is read when oneDNN starts, so a second interpreter measures it.
    Where oneDNN has bf16 it must move the fp32 Linear (addmm) onto bf16 (a bf16-sized error);
    elsewhere it must leave the output bit-identical. matmul is reported: it changes only where its
    shape sends it to oneDNN rather than OpenBLAS."""
    import torch  # standard library only at module level (see above)
    default = linear_errors("fp32")
    command = [os.environ["ARM_PYTHON"]] if os.environ.get("ARM_PYTHON") else [sys.executable]
    env = dict(os.environ, DNNL_DEFAULT_FPMATH_MODE="BF16")
    done = subprocess.run([*command, "-m", "utils.experiments.arm_check", "--fastmath-probe"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return False, f"probe process failed ({done.returncode}): {done.stderr.strip()[-400:]}", {}
    fast = json.loads(done.stdout.strip().splitlines()[-1])
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        ok = FASTMATH_MIN < fast["linear"] < BF16_BOUND
        verdict = "Linear moved to bf16, as expected" if ok else "expected a bf16-sized Linear error"
    else:
        ok = fast["linear_sha"] == default["linear_sha"]
        verdict = "Linear bit-identical (no bf16 here), as expected" if ok else "Linear changed without bf16"
    return ok, (f"DNNL_DEFAULT_FPMATH_MODE=BF16: fp32 Linear {fast['linear']:.1e} (default {default['linear']:.1e}): "
                f"{verdict}; Linear: {fast['linear_dispatch']}; matmul {fast['matmul']:.1e}: "
                f"{fast['matmul_dispatch']}"), \
        {"linear_rel_error": fast["linear"], "matmul_rel_error": fast["matmul"],
         "default_linear_rel_error": default["linear"]}


def check_int8(profile: str):
    """Dynamic int8 quantisation of a Linear with each quantised engine torch offers here (qnnpack, and
    onednn where built), and torch._int_mm (int8 x int8 -> int32, exact)."""
    import torch  # standard library only at module level (see above)
    from torch import nn
    engines = [e for e in ("qnnpack", "onednn") if e in torch.backends.quantized.supported_engines]
    if "qnnpack" not in engines:
        return False, f"qnnpack not among {torch.backends.quantized.supported_engines}", {}
    model = nn.Sequential(nn.Linear(K, N))
    with torch.no_grad():
        model[0].weight.copy_(inputs(N, K, seed=2) / K ** 0.5)
    x = inputs(M, K, seed=1)
    reference = model.double()(x.double())
    model.float()
    problems, numbers, parts = [], {}, []
    for engine in engines:
        torch.backends.quantized.engine = engine
        with torch.no_grad():
            quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
            with dispatch_log() as log:
                y = quantized(x)
        numbers[f"{engine}_rel_error"] = error = rel_error(y, reference)
        parts.append(f"{engine} dynamic Linear {error:.1e} ({describe(log)})")
        if error >= INT8_BOUND:
            problems.append(f"{engine} error {error:.1e} >= {INT8_BOUND:g}")
    a = torch.randint(-128, 128, (32, K), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    b = torch.randint(-128, 128, (K, N), generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    with dispatch_log() as int_mm_log:
        c = torch._int_mm(a, b)
    exact = c.dtype == torch.int32 and torch.equal(c.long(), a.long() @ b.long())
    if not exact:
        problems.append("torch._int_mm is not exact")
    parts.append(f"torch._int_mm exact {exact} ({describe(int_mm_log)})")
    return not problems, "; ".join(problems + [", ".join(parts[:-1]) + " vs fp64; " + parts[-1]]), numbers


def pack_int4(weight, group: int):
    """Symmetric int4 weights [-8, 7] with one scale per ``group`` inputs, packed the way
    _dyn_quant_pack_4bit_weight expects (two nibbles per byte, value + 8, odd input in the high half).
    Scales are bf16 for groups, fp32 per channel (group = K). Returns (nibbles, scales, dequantised)."""
    import torch  # standard library only at module level (see above)
    n, k = weight.shape
    groups = weight.reshape(n, k // group, group)
    scales = (groups.abs().amax(-1) / 7).clamp_min(1e-8).to(torch.bfloat16 if group < k else torch.float32)
    q = (groups / scales.float()[..., None]).round().clamp(-8, 7)
    dequantised = (q * scales.double()[..., None]).reshape(n, k)
    shifted = q.reshape(n, k).to(torch.int32) + 8
    nibbles = (shifted[:, 1::2] << 4 | shifted[:, ::2]).to(torch.uint8)  # [N, K/2]
    return nibbles, scales, dequantised


def check_int4(profile: str):
    """KleidiAI's 4-bit dynamic-quant matmul: int8 activations (per row, dynamic) x int4 weights. A
    uint8 packed tensor means the KleidiAI path; torch's reference path packs into fp32."""
    import torch  # standard library only at module level (see above)
    x, w, bias = inputs(8, K, seed=1), inputs(N, K, seed=2), inputs(N, seed=3)
    problems, numbers, parts = [], {}, []
    for group in (32, K):
        nibbles, scales, dequantised = pack_int4(w, group)
        packed = torch.ops.aten._dyn_quant_pack_4bit_weight(nibbles, scales, bias, group, K, N)
        with dispatch_log() as log:
            y = torch.ops.aten._dyn_quant_matmul_4bit(x, packed, group, K, N)
        error = rel_error(y, x.double() @ dequantised.T + bias.double())
        label = f"group {group}" if group < K else "per channel"
        numbers[f"rel_error_group_{group}"] = error
        kleidiai = packed.dtype == torch.uint8
        parts.append(f"{label} {error:.1e} (packed {str(packed.dtype).removeprefix('torch.')}"
                     f"{': KleidiAI' if kleidiai else ': reference path'})")
        if error >= INT4_BOUND:
            problems.append(f"{label}: error {error:.1e} >= {INT4_BOUND:g}")
        if not kleidiai:
            problems.append(f"{label}: not the KleidiAI path")
    return not problems, "; ".join(problems + [", ".join(parts) + f" vs fp64; {describe(log)}"]), numbers


def check_sdpa(profile: str):
    import torch  # standard library only at module level (see above)
    import torch.nn.functional as F
    q, k, v = (inputs(1, 4, 128, 64, seed=s) for s in (6, 7, 8))
    numbers, problems, parts = {}, [], []
    for name, dtype, bound in (("fp32", torch.float32, FP32_BOUND), ("bf16", torch.bfloat16, BF16_BOUND)):
        with torch.no_grad(), dispatch_log() as log:
            out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        ref = F.scaled_dot_product_attention(*(t.to(dtype).double() for t in (q, k, v)))
        numbers[f"{name}_rel_error"] = error = rel_error(out, ref)
        parts.append(f"{name} {error:.1e} ({describe(log)})")
        if error >= bound:
            problems.append(f"{name} error {error:.1e} >= {bound:g}")
    return not problems, "; ".join(problems + [", ".join(parts) + " vs fp64"]), numbers


# ---------------------------------------------------------------------------------------------
# running and storing
# ---------------------------------------------------------------------------------------------
# name -> (check, record config fields): run in this order, one line each
CHECKS = {
    "environment": (check_environment, {}),
    "parity_tests": (check_parity_tests, dict(model="tiny", weights="random", dtype="fp32")),  # upstream's init
    "generation": (check_generation, dict(model="tiny", weights="random", resolution="144p", aspect_ratio="9:16",
                                          steps=2, dtype="fp32")),
    "fp32_linear": (check_fp32_linear, dict(dtype="fp32", shape=[M, K, N])),
    "bf16_linear": (check_bf16_linear, dict(dtype="bf16", shape=[M, K, N])),
    "fp32_fastmath": (check_fastmath, dict(dtype="fp32", fpmath="bf16", shape=[M, K, N])),
    "int8": (check_int8, dict(dtype="int8", shape=[M, K, N])),
    "int4_kleidiai": (check_int4, dict(dtype="int4", shape=[8, K, N])),
    "sdpa": (check_sdpa, dict(shape=[1, 4, 128, 64])),
}


def run_checks(profile: str, names: list[str], frames: int) -> list[dict]:
    results = []
    for name in names:
        check, config = CHECKS[name]
        try:
            passed, detail, numbers = check(profile, frames) if name == "generation" else check(profile)
        except Exception as error:  # a check that crashes fails; the others still run
            passed, detail, numbers = False, f"{type(error).__name__}: {error}", {}
        if name == "generation":
            config = dict(config, frames=frames)
        print(f"{'PASS' if passed else 'FAIL'} {name:<14} {detail}", flush=True)
        results.append(dict(name=name, passed=passed, detail=detail, numbers=numbers, config=config))
    return results


def store(results: list[dict], root: Path, profile: str, threads: int) -> Path:
    """One record per check (value 1 = passed) in the results store, kind "emulated" under qemu-user,
    and the aarch64 facts added to the environment file."""
    from utils.io import write_json_atomic  # see above
    from utils.measure.results import Record, ResultsStore, make_config  # see above
    store = ResultsStore("arm_check", root=root)
    environment = dict(store.environment, **aarch64_facts())
    write_json_atomic(store.root / "environments" / f"{store.environment_id}.json", environment)
    kind = "emulated" if environment.get("emulated") else "measured"
    extra = dict(arm_profile=profile, qemu_cpu=environment.get("qemu_cpu"))
    store.add(*(Record(variant=r["name"], stage="arm_check", metric="passed", unit="bool",
                       value=float(r["passed"]), kind=kind, config=make_config(threads=threads, **r["config"], **extra),
                       quality={k: v for k, v in r["numbers"].items() if isinstance(v, (int, float))},
                       note=r["detail"]) for r in results))
    return store.path


def fastmath_probe() -> None:
    """The second interpreter of check_fastmath: one JSON line, in this process's fpmath mode."""
    print(json.dumps(linear_errors("fp32")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    parser.add_argument("--frames", type=int, default=1,
                        help="frames of the tiny generation (1 = an image; 17 = the shortest video, ~10x the work)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--store", action="store_true", default=os.environ.get("ARM_STORE", "") not in ("", "0"),
                        help="keep the records in data/results (default: build/arm/results; env ARM_STORE=1)")
    parser.add_argument("--results", type=Path, help="results root (overrides --store)")
    parser.add_argument("--hwcaps", action="store_true", help="print this CPU's HWCAP names and exit")
    parser.add_argument("--fastmath-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hwcaps:
        print(" ".join(hwcaps()))
        return 0
    if platform.machine() != "aarch64":
        parser.error(f"this is {platform.machine()}: run it under emulation, e.g. "
                     "ARM_PROFILE=g3 tools/arm-python.sh -m utils.experiments.arm_check (or make arm-check)")
    # the lines are the output; warnings (deprecations, the stand-in tokenizer) and progress bars would
    # bury them
    warnings.simplefilter("ignore")
    os.environ["TQDM_DISABLE"] = "1"
    import torch  # standard library only at module level (see above)
    torch.set_num_threads(args.threads)
    if args.fastmath_probe:
        fastmath_probe()
        return 0

    profile = os.environ.get("ARM_PROFILE", "native")
    qemu = os.environ.get("ARM_QEMU_CPU")
    print(f"arm-check {profile}: " + (f"qemu-user -cpu {qemu}, functional only (timings are not performance)"
                                      if qemu else "native aarch64") + f", {args.threads} threads", flush=True)
    started = time.perf_counter()
    results = run_checks(profile, args.only or list(CHECKS), args.frames)
    root = args.results or (REPO / "data" / "results" if args.store else BUILD_RESULTS)
    path = store(results, root, profile, args.threads)
    failed = sum(not r["passed"] for r in results)
    print(f"records: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    print(f"{profile}: {len(results) - failed} passed, {failed} failed "
          f"({time.perf_counter() - started:.0f} s{' under emulation' if qemu else ''})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
