"""Functional checks of the aarch64 code paths the study relies on, for one (emulated) Graviton CPU.

    ARM_PROFILE=g3 tools/arm-python.sh -m utils.experiments.arm_check     # one profile under qemu-user
    make arm-check                                            # g2, g3 and g4 (ARM_STORE=1 keeps records)

What it runs, in order: the environment (torch's view of the emulated CPU), the upstream-fixture parity
tests (tests/arm), the whole tiny pipeline; the ``op_`` checks, which call aten operators directly (Linear
and matmul in fp32, bf16 and fast math, torch.ao dynamic int8 and torch._int_mm, KleidiAI's int4 matmul,
SDPA); then the study's own steps through ``utils.optim.registry`` on the tiny pipeline against its fp32
run with the same seed (``step_checks``: every scheme of ``utils.optim.quantize.SCHEMES``, the rewrites,
bf16, every kernel of ``utils.optim.attention.CHOICES``, read at run time), each with its parity bound and
the operators it ran that the fp32 run did not. torchao 0.18.0 needs three torch 2.10 names on the
emulated torch 2.9.1: ``torchao_compatibility`` gives them stand-ins, and the output says so.

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
    shim = torchao_compatibility()
    try:
        import torchao  # see above
        torchao_version = f"torchao {torchao.__version__}" + (" (with stand-ins: quantize_ checks)" if shim else "")
    except ImportError as error:
        torchao_version = "torchao unavailable"
        problems.append(f"torchao does not import: {error}")
    detail = (f"torch {torch.__version__}, {torchao_version}, ISA {facts['isa_torch']}, "
              f"mkldnn bf16 {facts['mkldnn_bf16']}, "
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
            f"{summary} (tests/arm/test_parity.py: upstream fixtures, max abs error < {bound})", counts)


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
# the study's own steps (utils.optim) on the tiny pipeline, against its fp32 baseline
# ---------------------------------------------------------------------------------------------
# One frame: under qemu the 17-frame setting took ~40 s per denoise and ~5 min for its decode, too long
# for three profiles; at one frame the temporal attention attends over a single key, so its parity is
# exact whatever the kernel (the kernels still run: the dispatch log names them). tests/test_attention.py
# checks the temporal kernels' maths at longer sequences natively.
STEP_SETTING = dict(resolution="144p", aspect_ratio="9:16", frames=1, steps=2)

STEP_PROMPT = "a red ball bouncing on a wooden floor"

# Parity bounds: relative L2 of the final latents (and, for steps that touch the VAE, of the decoded video)
# against the fp32 tiny pipeline with the same seed and random weights.
# - Exact-within-rounding steps (rewrites, attention kernels): the same maths with sums in another order;
#   fp32 rounding (6e-8 per operation) over two blocks and two steps stays orders of magnitude below 1e-5.
EXACT_BOUND = 1e-5
# - bf16 (transformer and VAE, upstream's mixed precision): the unit roundoff is 2^-8 = 3.9e-3, and tens
#   of roundings add up as a random walk; tests/test_rewrites.py holds bf16 variants to 3e-2 of each other.
BF16_STEP_BOUND = 5e-2
# - quantisation (the transformer's block Linear layers, BLOCK_CLASSES): int8 with a scale per row or
#   token is ~1 % per Linear; tests/test_quantize.py bounds the tiny pipeline at 0.10 (w8a8_dynamic) and
#   0.15 (per-tensor activation scales: w8a8_dynamic_ao, w8a8_static). Weight-only int8 is the most
#   accurate (0.10). 4-bit weights in groups of 32: a Gaussian group's step is ~2.1 sigma / 7, so ~9 % per
#   Linear (measured on one Linear stack under emulation), compounding over 8 quantised layer groups and
#   2 steps: 0.30.
SCHEME_BOUNDS = {"w8a8_dynamic": 0.10, "w8a8_dynamic_ao": 0.15, "w8a8_static": 0.15, "w8_weight_only": 0.10,
                 "w4a8_dynamic": 0.30}

# torchao 0.18.0 imports these at module level (its float8/MX code) and torch 2.9.1 lacks them
TORCHAO_TORCH_2_10_NAMES = ("ScalingType", "SwizzleType", "scaled_grouped_mm")


_STOOD_IN: list[str] = []  # the names torchao_compatibility gave stand-ins in this process


def torchao_compatibility() -> str:
    """Make torchao 0.18.0 importable on the emulated torch 2.9.1, and say how. It imports three names
    that torch 2.10 added to torch.nn.functional, used only by its float8 and MX formats (never by the
    int8/int4 schemes); transformers imports torchao whenever it is installed, so without them not even
    the pipeline imports. Where one is missing, an empty stand-in takes its place (an enum without
    members; a function that raises). Call it before importing utils.model. Returns what was done ("" when
    torch has the names)."""
    import enum

    import torch  # standard library only at module level (see above)
    import torch.nn.functional as F

    def unavailable(*args, **kwargs):
        raise NotImplementedError("float8 grouped matmul needs torch >= 2.10 (stand-in made by arm_check)")

    for name in TORCHAO_TORCH_2_10_NAMES:
        if not hasattr(F, name):
            setattr(F, name, unavailable if name == "scaled_grouped_mm" else enum.Enum(name, {}))
            _STOOD_IN.append(name)
    if not _STOOD_IN:
        return ""
    return (f"torchao 0.18.0 imports torch.nn.functional.{', '.join(_STOOD_IN)} (torch >= 2.10; float8/MX code "
            f"only), absent from torch {torch.__version__}: stand-ins that fail if called")


def step_setting():
    from utils.model.pipeline import VideoSetting  # see above
    s = STEP_SETTING
    return VideoSetting.create(s["resolution"], s["aspect_ratio"], s["frames"], steps=s["steps"])


def run_step(steps: dict, baseline: dict | None, decode: bool = False) -> dict:
    """The tiny fp32 pipeline (random weights, seed 0) with ``steps`` applied through
    utils.optim.registry to its loaded components, from the baseline's caption embedding and noise: final
    latents (and the decoded video), with the ATen operators and oneDNN primitives each stage ran."""
    import torch  # see above

    from utils.model.pipeline import load_pipeline  # see above
    from utils.optim import registry  # see above

    setting = step_setting()
    decode = decode or baseline is None
    components = ("transformer", "vae") if decode else ("transformer",)
    pipe = load_pipeline("tiny", weights="random", dtype="fp32",
                         load=components + (("text_encoder",) if baseline is None else ()))
    if baseline is None:
        y, mask = pipe.encode_prompt([STEP_PROMPT])
        z = pipe.prepare_latents(1, setting)
    else:
        y, mask, z = baseline["y"], baseline["mask"], baseline["z"]
    registry.apply(pipe, steps)
    with torch.no_grad(), dispatch_log() as log:
        latents = pipe.denoise(z.to(pipe.dtypes["transformer"]), y, mask, setting, progress=False)
    video = decode_log = None
    if decode:
        with torch.no_grad(), dispatch_log() as decode_log:
            video = pipe.decode(latents, setting)
    return dict(pipe=pipe, y=y, mask=mask, z=z, latents=latents, video=video, log=log, decode_log=decode_log)


_BASELINE = {}


def tiny_baseline() -> dict:
    """The fp32 tiny pipeline's run, once per process: what every step is compared with."""
    if not _BASELINE:
        _BASELINE.update(run_step({}, None))
    return _BASELINE


def kernels_against(log: dict, base: dict) -> str:
    """The operators a step ran that the baseline did not (+), and those it no longer ran (-)."""
    added = sorted(set(log["aten"]) - set(base["aten"]))
    gone = sorted(set(base["aten"]) - set(log["aten"]))
    onednn = sorted(set(log["onednn"]) - set(base["onednn"]))
    parts = [f"aten +{' +'.join(added)}" if added else "no new aten op"]
    if gone:
        parts.append(f"-{' -'.join(gone)}")
    parts.append(f"oneDNN +{'; +'.join(onednn)}" if onednn else "no new oneDNN primitive")
    return ", ".join(parts)


def _step_check(steps: dict, bound: float, decode: bool = False):
    """Run ``steps`` against the baseline: (passed, detail, numbers, the run)."""
    import torch  # see above

    from utils.optim import registry  # see above
    base = tiny_baseline()
    run = run_step(steps, base, decode)
    numbers = {"latent_rel_l2": rel_error(run["latents"], base["latents"])}
    if decode:
        numbers["video_rel_l2"] = rel_error(run["video"], base["video"])
    errors = list(numbers.values())
    ok = all(e < bound for e in errors)  # NaN fails
    identical = torch.equal(run["latents"], base["latents"])
    measured = ", ".join(f"{k.removesuffix('_rel_l2')} {v:.1e}" for k, v in numbers.items())
    kernels = f"denoise: {kernels_against(run['log'], base['log'])}"
    if decode:
        kernels += f"; decode: {kernels_against(run['decode_log'], base['decode_log'])}"
    detail = (f"{registry.describe(run['pipe'])}: {measured} rel. L2 vs fp32 (bound {bound:g})"
              f"{', bit-identical latents' if identical else ''}; {kernels}")
    return ok, detail, dict(numbers, bound=bound), run


def weight_format(module) -> str:
    """What a quantised Linear became: its weight's tensor type, or the swapped module's class."""
    from torch import nn  # see above
    if isinstance(module, nn.Linear):
        return type(module.weight).__name__
    return f"{type(module).__module__}.{type(module).__name__}"


def check_quantize(profile: str, scheme: str):
    """One scheme of utils.optim.quantize on the transformer's block Linear layers, through the registry
    (w8a8_static calibrated on the baseline's own transformer inputs, as capture_inputs records them)."""
    from utils.optim import quantize  # see above
    shim = torchao_compatibility()
    options = {"scheme": scheme}
    with tempfile.TemporaryDirectory() as folder:
        if scheme == "w8a8_static":
            base = tiny_baseline()
            options["calibration"] = str(quantize.capture_inputs(base["pipe"], base["y"], base["mask"], step_setting(),
                                                                 Path(folder) / "calibration.pt", progress=False))
        try:
            ok, detail, numbers, run = _step_check({"quantize": options}, SCHEME_BOUNDS[scheme])
        except ValueError as refused:  # the step's own refusal (w4a8_dynamic without KleidiAI)
            return False, f"refused by utils.optim.quantize: {refused}", {}
    detail = detail.replace(f"calibration={options.get('calibration')}", "calibration=<captured>")  # a temporary file
    fc1 = run["pipe"].transformer.spatial_blocks[0].mlp.fc1
    detail += f"; block Linear weights: {weight_format(fc1)}" + (f"; {shim}" if shim else "")
    if scheme == "w4a8_dynamic" and "_dyn_quant_matmul_4bit" not in detail:
        return False, "not KleidiAI's kernel (no aten._dyn_quant_matmul_4bit); " + detail, numbers
    return ok, detail, numbers


def check_rewrite(profile: str, name: str):
    """A rewrite of notebook 05 with the options it uses there (utils.optim.rewrites.REWRITES)."""
    from utils.optim.rewrites import REWRITES  # see above
    return _step_check({name: REWRITES[name]}, EXACT_BOUND, decode=name.startswith("vae"))[:3]


def check_bf16(profile: str):
    """bf16 weights and activations of the transformer and the VAE (upstream's mixed precision)."""
    return _step_check({"bf16": {"components": ["transformer", "vae"]}}, BF16_STEP_BOUND, decode=True)[:3]


def check_attention(profile: str, choice: str):
    """One kernel of utils.optim.attention for every attention type that offers it (the others stay at
    the model's sdpa); ``best`` also says which kernels it picked."""
    from utils.optim.attention import CHOICES  # see above
    choices = {kind: choice if choice in offered else "sdpa" for kind, offered in CHOICES.items()}
    ok, detail, numbers, run = _step_check({"attention": choices}, EXACT_BOUND)
    block = run["pipe"].transformer.spatial_blocks[0]
    for kind, module in (("spatial", block.attn), ("cross", block.cross_attn),
                         ("temporal", run["pipe"].transformer.temporal_blocks[0].attn)):
        picked = getattr(module.__dict__.get("attention"), "choices", None)
        if picked:
            detail += f"; {kind} picked (dtype, lengths) -> kernel: " + ", ".join(
                f"({', '.join(map(str, key))}) -> {name}" for key, name in sorted(picked.items()))
    return ok, detail, numbers


# ---- other runtimes (utils.optim.onnx_backends) on the emulated CPU --------------------------------------
# The tiny model's block stack and VAE decoders are exported on the host (`--export-runtime-files`, which
# `make arm-check` runs first): ONNX files are portable, and the dynamo exporter under emulation would take
# hours. The files come with the weights they were exported from, which the emulated PyTorch loads (strict) for
# its own reference run.
RUNTIME_FILES = BUILD / "arm" / "onnx"
RUNTIME_FP32_BOUND = 1e-4  # fp32 runtimes against aarch64 PyTorch fp32 (another order of sums, other kernels)
RUNTIME_LOSSY_BOUND = 5e-2  # bf16 fast math, f16, int8 weights only: tests/test_onnx_backends.py's lossy bound
# quantize_dynamic's int8: uint8 activations with one scale per tensor, like w8a8_dynamic_ao (x86 measures 0.088)
RUNTIME_INT8_BOUND = SCHEME_BOUNDS["w8a8_dynamic_ao"]
RUNTIME_COMPONENTS = ("transformer", "vae")


def export_runtime_files(folder: Path = RUNTIME_FILES) -> Path:
    """On the host, before the emulated checks: the tiny pipeline's block stack (fp32, ONNX Runtime's dynamic int8
    copy, and OpenVINO's model with NNCF's int8 weights: NNCF is not installed under emulation) and VAE decoders
    exported to ONNX into ``folder``, the weights they were made from saved beside
    them, all listed in ``manifest.json`` (returned)."""
    from safetensors.torch import save_file  # see above

    from utils.io import write_json_atomic  # see above
    from utils.model.pipeline import load_pipeline  # see above
    from utils.optim import onnx_backends  # see above
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("tiny", weights="random", dtype="fp32", load=RUNTIME_COMPONENTS)
    stack = onnx_backends.export_stack(pipe.transformer, folder)
    files = {"stack": stack, "stack_int8": onnx_backends.quantize_ort(stack)}
    files |= {f"{half}_decoder": path for half, path in onnx_backends.export_vae_decoders(pipe.vae, folder).items()}
    files["stack_openvino_int8_weights"] = onnx_backends.compress_openvino(stack)
    for component in RUNTIME_COMPONENTS:
        state = {k: v.detach().contiguous().clone() for k, v in pipe._module(component).state_dict().items()}
        save_file(state, folder / f"{component}.safetensors")
    manifest = folder / "manifest.json"
    write_json_atomic(manifest, {name: str(path.relative_to(folder)) for name, path in files.items()}
                      | {component: f"{component}.safetensors" for component in RUNTIME_COMPONENTS})
    return manifest


def runtime_reference() -> dict:
    """The tiny pipeline with the exported files' weights, its fp32 PyTorch latents and video from the baseline's
    caption and noise (once per process)."""
    import torch  # see above
    from safetensors.torch import load_file  # see above

    from utils.model.pipeline import load_pipeline  # see above
    if "pipe" not in _RUNTIME_REFERENCE:
        manifest = json.loads((RUNTIME_FILES / "manifest.json").read_text())
        pipe = load_pipeline("tiny", weights="random", dtype="fp32", load=RUNTIME_COMPONENTS)
        for component in RUNTIME_COMPONENTS:
            pipe._module(component).load_state_dict(load_file(RUNTIME_FILES / manifest[component]), strict=True)
        base, setting = tiny_baseline(), step_setting()
        with torch.no_grad():
            latents = pipe.denoise(base["z"], base["y"], base["mask"], setting, progress=False)
            video = pipe.decode(latents, setting)
        _RUNTIME_REFERENCE.update(pipe=pipe, manifest=manifest, latents=latents, video=video, base=base,
                                  setting=setting)
    return _RUNTIME_REFERENCE


_RUNTIME_REFERENCE: dict = {}


def _runtime_run(stack, decoders=None) -> dict:
    """The reference pipeline with its blocks on ``stack`` (and its VAE decoders on ``decoders``, a pair of
    temporal and spatial models), then back to PyTorch: latents, video and their errors."""
    import torch  # see above

    from utils.optim import onnx_backends  # see above
    ref = runtime_reference()
    pipe, base, setting = ref["pipe"], ref["base"], ref["setting"]
    pipe.transformer.block_runner = onnx_backends.BlockRunner(stack, "arm check")
    if decoders:
        pipe.vae.temporal_vae.decoder_runner = onnx_backends.DecoderRunner(decoders[0], "arm check")
        pipe.vae.spatial_vae.decoder_runner = onnx_backends.DecoderRunner(decoders[1], "arm check")
    try:
        with torch.no_grad():
            latents = pipe.denoise(base["z"], base["y"], base["mask"], setting, progress=False)
            video = pipe.decode(latents, setting) if decoders else None
    finally:
        pipe.transformer.block_runner = pipe.vae.temporal_vae.decoder_runner = None
        pipe.vae.spatial_vae.decoder_runner = None
    run = dict(latents=latents, latent_error=rel_error(latents, ref["latents"]))
    if video is not None:
        run |= dict(video=video, video_error=rel_error(video, ref["video"]))
    return run


def _runtime_ready(module: str) -> str | None:
    """Why the runtime checks cannot run here, or None."""
    import importlib.util
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed in this environment (requirements-aarch64.txt)"
    if not (RUNTIME_FILES / "manifest.json").exists():
        return (f"no exported files in {RUNTIME_FILES}: `make arm-check` makes them on the host first "
                "(python -m utils.experiments.arm_check --export-runtime-files)")
    return None


def check_onnxruntime(profile: str):
    """ONNX Runtime's CPU execution provider on the exported stack and decoders: fp32 against aarch64 PyTorch;
    the bf16 fast-math GEMM option (bit-identical to fp32 where the CPU has no BF16; where it has, whether it
    changed the output says whether the kernel ran); quantize_dynamic's int8 stack."""
    import torch  # see above

    from utils.optim import onnx_backends as ob  # see above
    why = _runtime_ready("onnxruntime")
    if why:
        return False, why, {}
    import onnxruntime
    files = {name: RUNTIME_FILES / path for name, path in runtime_reference()["manifest"].items()}
    fp32 = _runtime_run(ob.OrtModel(files["stack"]), (ob.OrtModel(files["temporal_decoder"]),
                                                       ob.OrtModel(files["spatial_decoder"])))
    fast = _runtime_run(ob.OrtModel(files["stack"], options={ob.ARM64_BF16_FASTMATH: "1"}))
    int8 = _runtime_run(ob.OrtModel(files["stack_int8"], precision="int8"))
    ran = not torch.equal(fast["latents"], fp32["latents"])
    bf16 = "bf16" in hwcaps()
    checks = [fp32["latent_error"] < RUNTIME_FP32_BOUND, fp32["video_error"] < RUNTIME_FP32_BOUND,
              0 < int8["latent_error"] < RUNTIME_INT8_BOUND,
              fast["latent_error"] < RUNTIME_LOSSY_BOUND if bf16 else not ran]  # without BF16: a no-op
    fastmath = (f"bf16 fast math {fast['latent_error']:.1e} ("
                + (("the bf16 kernel ran" if ran else "bit-identical to fp32: the bf16 kernel did not run") if bf16
                   else ("bit-identical to fp32, as expected without BF16" if not ran else "changed without BF16"))
                + ")")
    detail = (f"onnxruntime {onnxruntime.__version__}: fp32 latents {fp32['latent_error']:.1e}, video "
              f"{fp32['video_error']:.1e} rel. L2 vs PyTorch fp32 (bound {RUNTIME_FP32_BOUND:g}); {fastmath}; int8 "
              f"(quantize_dynamic) {int8['latent_error']:.1e} (bound {RUNTIME_INT8_BOUND:g})")
    return all(checks), detail, {"fp32_latent_rel_l2": fp32["latent_error"], "fp32_video_rel_l2": fp32["video_error"],
                                 "fastmath_latent_rel_l2": fast["latent_error"], "fastmath_ran": float(ran),
                                 "int8_latent_rel_l2": int8["latent_error"]}


def check_openvino(profile: str):
    """OpenVINO's CPU plugin on the exported stack and decoders: f32 against aarch64 PyTorch; the f16 and bf16
    precision hints (OpenVINO documents f32 and f16 on Arm) with the precision it compiled for; NNCF's int8
    weight compression (documented to run as floating-point simulation on Arm)."""
    from utils.optim import onnx_backends as ob  # see above
    why = _runtime_ready("openvino")
    if why:
        return False, why, {}
    import openvino
    files = {name: RUNTIME_FILES / path for name, path in runtime_reference()["manifest"].items()}
    f32 = _runtime_run(ob.OpenVinoModel(files["stack"], "f32"), (ob.OpenVinoModel(files["temporal_decoder"], "f32"),
                                                                 ob.OpenVinoModel(files["spatial_decoder"], "f32")))
    numbers, parts = {"f32_latent_rel_l2": f32["latent_error"], "f32_video_rel_l2": f32["video_error"]}, []
    lossy_ok = True
    # bf16 is not documented on Arm: a refusal is reported, not failed
    for hint, weights, required in (("f16", None, True), ("bf16", None, False), ("f32", "int8", True)):
        label = f"{hint}{' int8 weights' if weights else ''}"
        try:
            model = ob.OpenVinoModel(files["stack_openvino_int8_weights" if weights else "stack"], hint)
        except RuntimeError as refused:
            parts.append(f"{label}: refused ({str(refused).strip().splitlines()[0][:160]})")
            lossy_ok &= not required
            continue
        compiled = model.precision  # what OpenVINO compiled for
        error = _runtime_run(model)["latent_error"]
        numbers[f"{label.replace(' ', '_')}_latent_rel_l2"] = error
        parts.append(f"{label}: compiled as {compiled}, {error:.1e}")
        lossy_ok &= error < RUNTIME_LOSSY_BOUND
    ok = f32["latent_error"] < RUNTIME_FP32_BOUND and f32["video_error"] < RUNTIME_FP32_BOUND and lossy_ok
    detail = (f"openvino {openvino.__version__}: f32 latents {f32['latent_error']:.1e}, video {f32['video_error']:.1e} "
              f"rel. L2 vs PyTorch fp32 (bound {RUNTIME_FP32_BOUND:g}); " + "; ".join(parts)
              + f" (bound {RUNTIME_LOSSY_BOUND:g})")
    return ok, detail, numbers


# the decoded video's rel. L2 against the faithful recipe's (tiny model, 1 frame, 4 steps): x86 measures 0.041 for
# graviton (bf16, int8, TeaCache); the bound leaves room for other kernels (ACL, KleidiAI) rounding differently
RECIPE_BOUND = 0.1
RECIPE_STEPS = 4  # TeaCache computes the first and the last step: four let it skip


def check_recipe(profile: str, name: str):
    """A recipe of utils.optim.recipes end to end (``build_pipeline``, then the whole pipeline), in a process started
    with the recipe's start-up settings, against the faithful recipe's frames, both on the tiny model."""
    import numpy as np  # see above

    from utils.optim.recipes import RECIPES  # see above
    command = [os.environ["ARM_PYTHON"]] if os.environ.get("ARM_PYTHON") else [sys.executable]
    frames, runs = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for recipe in ("faithful", name):
            out = Path(folder) / f"{recipe}.npz"
            done = subprocess.run([*command, "-m", "utils.experiments.arm_check", "--recipe-probe", recipe, str(out)],
                                  cwd=REPO, capture_output=True, text=True, timeout=1800,
                                  env=dict(os.environ, **RECIPES[recipe].env))
            if done.returncode != 0:
                return False, f"recipe {recipe} failed ({done.returncode}): {done.stderr.strip()[-400:]}", {}
            frames[recipe] = np.load(out)["video"].astype(np.float64)
            runs[recipe] = json.loads(done.stdout.strip().splitlines()[-1])
    error = float(np.linalg.norm(frames[name] - frames["faithful"]) / np.linalg.norm(frames["faithful"]))
    run = runs[name]
    ok = error < RECIPE_BOUND and run["startup_env"] == RECIPES[name].env
    return ok, (f"recipe {name} ({run['optimizations']}; start-up {run['startup_env'] or 'none'}): video {error:.1e} "
                f"rel. L2 vs the faithful recipe (bound {RECIPE_BOUND:g}); whole run {run['seconds']:.0f} s emulated "
                "(not performance)"), {"frames_rel_l2": error, "bound": RECIPE_BOUND}


def recipe_probe(name: str, out: str) -> None:
    """The tiny model's video with recipe ``name`` (the whole pipeline, ``RECIPE_STEPS`` steps) into ``out``; prints
    the steps applied and the recipe's start-up settings as this process has them (one JSON line)."""
    import numpy as np  # see above

    from utils.model.pipeline import VideoSetting  # see above
    from utils.optim import registry  # see above
    from utils.optim.recipes import RECIPES, build_pipeline  # see above
    setting = VideoSetting.create(STEP_SETTING["resolution"], STEP_SETTING["aspect_ratio"], STEP_SETTING["frames"],
                                  steps=RECIPE_STEPS)
    started = time.perf_counter()
    pipe = build_pipeline(name, "tiny", setting=setting)
    video = pipe([STEP_PROMPT], setting, progress=False, free_text_encoder=True).video
    np.savez(out, video=video.numpy())
    print(json.dumps(dict(optimizations=registry.describe(pipe), seconds=time.perf_counter() - started,
                          startup_env={k: os.environ.get(k) for k in RECIPES[name].env})))


def step_checks() -> dict:
    """name -> (check, record config) for the study's steps: read from utils.optim at run time, so a scheme
    or attention kernel added there is checked without a change here."""
    import functools

    from utils.optim.attention import CHOICES  # see above
    from utils.optim.quantize import SCHEMES  # see above
    from utils.optim.recipes import RECIPES  # see above
    s = STEP_SETTING
    config = dict(model="tiny", weights="random", dtype="fp32", **s)

    def entry(check, step: str, bound: float, video: bool = False):
        checked = (f"utils.optim.registry.apply of {step} on the tiny pipeline (random weights, fp32, "
                   f"{s['resolution']} {s['aspect_ratio']} {s['frames']} frames, {s['steps']} steps): final latents"
                   f"{' and decoded video' if video else ''} against the fp32 pipeline, rel. L2 < {bound:g}")
        return check, dict(config, step=step, checked=checked)

    checks = {f"quantize_{scheme}": entry(functools.partial(check_quantize, scheme=scheme), f"quantize({scheme})",
                                          SCHEME_BOUNDS[scheme]) for scheme in SCHEMES}
    for name in ("cache_text_kv", "fused_rope", "fused_modulate", "vae_channels_last"):
        checks[name] = entry(functools.partial(check_rewrite, name=name), name, EXACT_BOUND, name.startswith("vae"))
    checks["bf16"] = entry(check_bf16, "bf16(transformer,vae)", BF16_STEP_BOUND, True)
    for choice in dict.fromkeys(c for offered in CHOICES.values() for c in offered):
        if choice != "sdpa":  # the baseline's own kernel
            kinds = ",".join(kind for kind, offered in CHOICES.items() if choice in offered)
            checks[f"attention_{choice}"] = entry(functools.partial(check_attention, choice=choice),
                                                  f"attention({kinds}={choice})", EXACT_BOUND)
    for name, check in (("onnxruntime", check_onnxruntime), ("openvino", check_openvino)):
        checks[f"runtime_{name}"] = (check, dict(config, step=name, checked=(
            f"utils.optim.onnx_backends on the tiny model's stack and VAE decoders, exported on the host: {name} "
            f"against aarch64 PyTorch fp32 with the same weights, final latents and video rel. L2 < "
            f"{RUNTIME_FP32_BOUND:g} (fp32), < {RUNTIME_LOSSY_BOUND:g} (bf16, f16, int8 weights), < "
            f"{RUNTIME_INT8_BOUND:g} (dynamic int8)")))
    for name in ("graviton",):  # the recipe the study recommends on Arm (its speed: a Graviton run, the runbook)
        checks[f"recipe_{name}"] = (functools.partial(check_recipe, name=name), dict(
            config, steps=RECIPE_STEPS, step=f"recipe {name}", checked=f"utils.optim.recipes.build_pipeline({name!r}) "
            f"on the tiny model ({RECIPES[name].describe()}), in a process started with its start-up settings, against "
            f"the faithful recipe: decoded video rel. L2 < {RECIPE_BOUND:g}"))
    return checks


# ---------------------------------------------------------------------------------------------
# running and storing
# ---------------------------------------------------------------------------------------------
# name -> (check, record config fields): run in this order, one line each. The "op_" checks call aten
# operators directly (the kernels the study's steps rely on, in isolation); the study's own steps follow
# them (step_checks).
CHECKS = {
    "environment": (check_environment, dict(
        checked="the emulated CPU as torch sees it: arch, cpuinfo flags = HWCAPs, ISA level, bf16, ACL, KleidiAI")),
    "parity_tests": (check_parity_tests, dict(model="tiny", weights="random", dtype="fp32",  # upstream's init
                                              checked="tests/arm: the upstream-fixture tests of test_stdit3.py and "
                                                      "test_vae.py at the aarch64 bound")),
    "generation": (check_generation, dict(model="tiny", weights="random", resolution="144p", aspect_ratio="9:16",
                                          steps=2, dtype="fp32", checked="the whole tiny pipeline, fp32, random "
                                          "weights: video and latent shapes, finite values")),
    "op_fp32_linear": (check_fp32_linear, dict(dtype="fp32", shape=[M, K, N], checked="aten only: fp32 nn.Linear "
                                               f"and matmul {M}x{K}x{N} against fp64 (< {FP32_BOUND:g})")),
    "op_bf16_linear": (check_bf16_linear, dict(dtype="bf16", shape=[M, K, N], checked="aten only: bf16 nn.Linear "
                                               f"and matmul {M}x{K}x{N} against fp64 (< {BF16_BOUND:g})")),
    "op_fp32_fastmath": (check_fastmath, dict(dtype="fp32", fpmath="bf16", shape=[M, K, N], checked="aten only: "
                                              "fp32 nn.Linear with DNNL_DEFAULT_FPMATH_MODE=BF16 (second process)")),
    "op_int8": (check_int8, dict(dtype="int8", shape=[M, K, N], checked="aten only: torch.ao quantize_dynamic on one "
                                 f"Linear per quantised engine (< {INT8_BOUND:g}), torch._int_mm exact")),
    "op_int4_kleidiai": (check_int4, dict(dtype="int4", shape=[8, K, N], checked="aten only: _dyn_quant_matmul_4bit "
                                          f"on hand-packed int4 weights (< {INT4_BOUND:g}), KleidiAI packing")),
    "op_sdpa": (check_sdpa, dict(shape=[1, 4, 128, 64], checked="aten only: scaled_dot_product_attention fp32 and "
                                 "bf16 against fp64")),
}


def all_checks() -> dict:
    """CHECKS, then the study's own steps (their names come from utils.optim, imported here)."""
    return CHECKS | step_checks()


def select(checks: dict, wanted: list[str] | None) -> list[str]:
    """Names in ``checks`` equal to, or starting with, one of ``wanted`` (all of them for None)."""
    if not wanted:
        return list(checks)
    chosen = [name for name in checks if any(name == w or name.startswith(w) for w in wanted)]
    unknown = [w for w in wanted if not any(name == w or name.startswith(w) for name in checks)]
    if unknown:
        raise ValueError(f"no check is named (or starts with) {', '.join(unknown)}; accepted: {', '.join(checks)}")
    return chosen


def run_checks(profile: str, names: list[str], frames: int, checks: dict | None = None) -> list[dict]:
    checks = checks or all_checks()
    results = []
    for name in names:
        check, config = checks[name]
        started = time.perf_counter()
        try:
            passed, detail, numbers = check(profile, frames) if name == "generation" else check(profile)
        except Exception as error:  # a check that crashes fails; the others still run
            passed, detail, numbers = False, f"{type(error).__name__}: {error}", {}
        if name == "generation":
            config = dict(config, frames=frames)
        print(f"{'PASS' if passed else 'FAIL'} {name:<14} {detail} [{time.perf_counter() - started:.0f} s]", flush=True)
        results.append(dict(name=name, passed=passed, detail=detail, numbers=numbers, config=config))
    return results


def store(results: list[dict], root: Path, profile: str, threads: int, replace: bool = False) -> Path:
    """One record per check (value 1 = passed) in the results store, kind "emulated" under qemu-user,
    and the aarch64 facts added to the environment file. ``replace`` (a run of every check): the profile's
    earlier records go, so the store holds one complete run, checks that no longer exist included."""
    from utils.io import write_json_atomic  # see above
    from utils.measure.results import Record, ResultsStore, make_config  # see above
    store = ResultsStore("arm_check", root=root)
    if replace:
        store.path.unlink(missing_ok=True)
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
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these checks (a name, or the start of names: op_, quantize_, attention_)")
    parser.add_argument("--frames", type=int, default=1,
                        help="frames of the tiny generation (1 = an image; 17 = the shortest video, ~10x the work)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--store", action="store_true", default=os.environ.get("ARM_STORE", "") not in ("", "0"),
                        help="keep the records in data/results (default: build/arm/results; env ARM_STORE=1)")
    parser.add_argument("--results", type=Path, help="results root (overrides --store)")
    parser.add_argument("--hwcaps", action="store_true", help="print this CPU's HWCAP names and exit")
    parser.add_argument("--fastmath-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe-probe", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--export-runtime-files", action="store_true",
                        help="on the host: export the runtime checks' ONNX files into "
                             f"{RUNTIME_FILES.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if args.hwcaps:
        print(" ".join(hwcaps()))
        return 0
    if args.export_runtime_files:
        print(f"runtime files: {export_runtime_files().relative_to(REPO)}")
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
    shim = torchao_compatibility()  # before anything imports transformers, which imports torchao
    if args.fastmath_probe:
        fastmath_probe()
        return 0
    if args.recipe_probe:
        recipe_probe(*args.recipe_probe)
        return 0

    profile = os.environ.get("ARM_PROFILE", "native")
    qemu = os.environ.get("ARM_QEMU_CPU")
    print(f"arm-check {profile}: " + (f"qemu-user -cpu {qemu}, functional only (timings are not performance)"
                                      if qemu else "native aarch64") + f", {args.threads} threads", flush=True)
    if shim:
        print(f"note: {shim}", flush=True)
    started = time.perf_counter()
    checks = all_checks()
    try:
        names = select(checks, args.only)
    except ValueError as error:
        parser.error(str(error))
    results = run_checks(profile, names, args.frames, checks)
    root = args.results or (REPO / "data" / "results" if args.store else BUILD_RESULTS)
    path = store(results, root, profile, args.threads, replace=not args.only)
    failed = sum(not r["passed"] for r in results)
    print(f"records: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    print(f"{profile}: {len(results) - failed} passed, {failed} failed "
          f"({time.perf_counter() - started:.0f} s{' under emulation' if qemu else ''})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
