"""Named recipes: whole configurations of the pipeline, each a list of optimisation steps
(``utils.optim.registry``) and the start-up settings its process needs, usable as

    pipe = build_pipeline("fast", setting=setting)      # or apply_recipe(load_pipeline(..., load=()), "fast")
    python -m utils.generate --recipe fast --prompt "..." --out video.mp4
    make video RECIPE=fast PROMPT="..."

- ``faithful``: upstream's numerics on the CPU, everything fp32, eager: the baseline every other recipe is
  measured against.
- ``upstream``: upstream's own precision choices (T5 fp32, transformer and VAE bf16), eager.
- ``fast``: the ladder's rung (``LADDER``) that notebook 08 chose from its records on this machine, or this
  architecture (``data/recipe_choice.json``): the fewest seconds per video among the rungs whose mini-model
  adherence stays within the measured margin of ``faithful`` (``fastest_kept``). With no choice on record for the
  architecture, the rung named ``fast`` as proposed: bf16 T5 and VAE, the transformer int8 (w8a8 dynamic) and
  compiled, the measured best attention kernels, TeaCache at its published "fast" threshold (``Recipe.source``
  says which).
- ``small``: the least memory: the T5 and the transformer built block by block straight into int8
  (``streamed``), so neither ever exists whole in bf16; the VAE in bf16, decoding one frame per call. The
  transformer is compiled: eager int8 is slower than bf16 on x86 (notebook 06), and the whole-run peak is set
  while the int8 T5 encodes, not while the transformer runs.
- ``graviton``: the route the study recommends on Arm: bf16 with the Graviton guide's start-up settings, the
  transformer's int8 path that ``make arm-check`` verifies (torchao w8a8 dynamic), the exact rewrites, TeaCache;
  no ``torch.compile`` (not checkable under emulation: a user's Graviton run measures it, see the runbook).

Every recipe frees the T5 after encoding (memory only: encoding comes first and once).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import time
from dataclasses import dataclass, field

from utils.fingerprint import fingerprint
from utils.io import merge_table, read_table
from utils.model.pipeline import OpenSoraPipeline, VideoSetting, load_pipeline
from utils.optim import registry
from utils.optim.caching import TEACACHE_THRESHOLDS
from utils.optim.preflight import preflight
from utils.optim.rewrites import REWRITES
from utils.paths import DATA

# the Graviton guide's start-up settings (AWS Graviton getting-started guide, machinelearning/pytorch.md):
# oneDNN's bf16 fast math for fp32 layers, oneDNN's primitive cache, transparent huge pages for the c10
# allocator, OpenMP threads unbound and placed on cores
GUIDE_ENV = {"DNNL_DEFAULT_FPMATH_MODE": "BF16", "LRU_CACHE_CAPACITY": "1024", "THP_MEM_ALLOC_ENABLE": "1",
             "OMP_PROC_BIND": "false", "OMP_PLACES": "cores"}

EXACT_REWRITES = {name: options for name, options in REWRITES.items() if name != "attention"}
# the ladder from faithful to fast, one rung a step further: (rung, the steps it adds). The exact rewrites of
# notebook 05 come after fast: under torch.compile they slowed the int8 loop here (a step of 20 s against 12 s,
# one process each on the Zen 5 of the recipes' first runs), so fast leaves them out and notebook 08 measures them
# as the rung after it
LADDER = (
    ("faithful", {}),
    ("upstream", {"bf16": {"components": ["transformer", "vae"]}}),
    ("bf16 T5", {"bf16": {}}),
    ("int8 + compile", {"quantize": {"scheme": "w8a8_dynamic"}, "compile": {}}),
    ("best attention", {"attention": REWRITES["attention"]}),  # notebook 05's measured best kernel per shape
    ("fast", {"teacache": {"threshold": TEACACHE_THRESHOLDS["fast"]}}),  # TeaCache
    ("fast + exact rewrites", EXACT_REWRITES),
)


def ladder_steps(rung: str) -> dict[str, dict]:
    """The registry steps of the ladder up to and including ``rung`` (a later rung's step of the same name,
    e.g. ``bf16`` for every component after upstream's two, replaces the earlier one)."""
    names = [name for name, _ in LADDER]
    if rung not in names:
        raise ValueError(f"unknown rung {rung!r}; accepted: {', '.join(names)}")
    steps: dict[str, dict] = {}
    for name, added in LADDER[:names.index(rung) + 1]:
        steps.update(added)
    return steps


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    steps: dict[str, dict]  # utils.optim.registry steps, applied to a pipeline built fp32 with nothing loaded
    env: dict[str, str] = field(default_factory=dict)  # start-up settings: set before the process starts
    source: str = ""  # where the choice comes from

    def describe(self) -> str:
        return registry.describe(self.steps) or "fp32, eager (no step)"


# the fast recipe's steps when notebook 08 chose no rung on this architecture
PROPOSED = ("the rung named fast as proposed (bf16, int8 transformer compiled, best attention, TeaCache): no choice "
            "by notebook 08 on record for this architecture")

RECIPES = {
    "faithful": Recipe("faithful", "upstream's numerics on the CPU: everything fp32, eager", ladder_steps("faithful"),
                       source="the baseline"),
    "upstream": Recipe("upstream", "upstream's precision: T5 fp32, transformer and VAE bf16, eager",
                       ladder_steps("upstream"), source="upstream's inference script"),
    "fast": Recipe("fast", "the fastest ladder rung that keeps the mini model's adherence (notebook 08's choice)",
                   ladder_steps("fast"), source=PROPOSED),
    "small": Recipe("small", "least memory: T5 and transformer built block by block into int8 (the transformer "
                    "compiled), VAE bf16 one frame per call",
                    {"bf16": {}, "int8_weight_only": {"component": "text_encoder", "streamed": True},
                     "quantize": {"scheme": "w8a8_dynamic", "streamed": True}, "vae_chunking": {"micro_batch_size": 1},
                     "compile": {}},
                    source="memory: no component whole in bf16 while it loads"),
    "graviton": Recipe("graviton", "bf16 with the Graviton guide's start-up settings, int8 transformer, exact "
                       "rewrites, TeaCache; no compile", {"bf16": {}, "quantize": {"scheme": "w8a8_dynamic"},
                                                          **EXACT_REWRITES,
                                                          "teacache": {"threshold": TEACACHE_THRESHOLDS["fast"]}},
                       env=GUIDE_ENV, source="the study's Arm recommendation; checked by make arm-check under "
                                             "emulation, speed for a Graviton run to measure"),
}


# ---- fast: chosen from notebook 08's records ---------------------------------------------------------

CHOICE_TABLE = DATA / "recipe_choice.json"
CHOICE_DOC = ("The ladder rung the fast recipe applies, per environment: the fewest seconds per video (derived end to "
              "end) among the rungs whose mini-model adherence stays within the measured margin of faithful. Written "
              "by notebook 08_end_to_end (utils.optim.recipes.store_choice), read by "
              "utils.optim.recipes.recipe('fast'): this environment's entry, else the newest of the same architecture.")


def keeps_adherence(difference: float, margin: float) -> bool:
    """A configuration keeps the mini model's adherence when its paired all-correct difference to faithful is no
    worse than minus the margin (two standard errors of the per-clip differences)."""
    return difference >= -margin


def fastest_kept(seconds: dict[str, float], kept) -> str | None:
    """The rule that names ``fast``: among the ladder's rungs in ``kept`` (those that keep adherence), the one with
    the fewest ``seconds`` per video; None when no rung qualifies."""
    rungs, kept = dict(LADDER), set(kept)
    timed = {n: s for n, s in seconds.items() if n in rungs and n in kept and s is not None and not math.isnan(s)}
    return min(timed, key=timed.__getitem__) if timed else None


def fast_choice(environment_id: str, arch: str, path=CHOICE_TABLE) -> dict | None:
    """Notebook 08's entry for ``environment_id``, else the newest for ``arch``; None if ``arch`` has none."""
    entries = [e for e in read_table(path) if e.get("arch") == arch]
    pool = [e for e in entries if e.get("environment_id") == environment_id] or entries
    return max(pool, key=lambda e: e["written"]) if pool else None


def store_choice(choice: dict, environment: dict, path=CHOICE_TABLE) -> dict:
    """Store notebook 08's ``choice`` (``rung`` and the numbers it was chosen on) for ``environment`` (a
    fingerprint), replacing the environment's earlier one; returns the entry."""
    if choice["rung"] not in dict(LADDER):
        raise ValueError(f"{choice['rung']!r} is not a rung of the ladder; rungs: {', '.join(dict(LADDER))}")
    entry = dict(choice, environment_id=environment["environment_id"], arch=environment["arch"],
                 written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    merge_table(path, [entry], lambda e: (e["environment_id"],), CHOICE_DOC)
    fast_recipe.cache_clear()
    return entry


@functools.cache
def fast_recipe(environment_id: str | None = None, arch: str | None = None, path=CHOICE_TABLE) -> Recipe:
    """``fast`` as chosen for ``environment_id`` on ``arch`` (default: this machine)."""
    if environment_id is None:
        environment_id, arch = fingerprint()["environment_id"], platform.machine()
    choice = fast_choice(environment_id, arch, path)
    if choice is None:
        return RECIPES["fast"]
    where = "this environment" if choice["environment_id"] == environment_id else choice["environment_id"]
    return dataclasses.replace(
        RECIPES["fast"], steps=ladder_steps(choice["rung"]),
        source=f"rung '{choice['rung']}', chosen by notebook 08 on {where} ({choice['written']}): the fewest seconds "
               f"per video among the rungs that keep the mini model's adherence")


def recipe(name: str, environment_id: str | None = None, arch: str | None = None) -> Recipe:
    """Recipe ``name``; ``fast`` as chosen for ``environment_id`` on ``arch`` (default: this machine)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; accepted: {', '.join(RECIPES)}")
    return fast_recipe(environment_id, arch) if name == "fast" else RECIPES[name]


def missing_env(name: str, environ=os.environ) -> dict[str, str]:
    """The recipe's start-up settings this process was not started with (empty: nothing to restart for)."""
    return {k: v for k, v in recipe(name).env.items() if environ.get(k) != v}


def apply_recipe(pipe: OpenSoraPipeline, name: str) -> OpenSoraPipeline:
    """Apply recipe ``name``'s steps to ``pipe``, built fp32 with no component loaded (``load=()``: the steps
    choose the dtypes and formats components are made in, and ``streamed`` ones must see them unloaded).
    Start-up settings cannot be applied to a running process: a recipe with some that this process lacks
    raises, naming them (``python -m utils.generate --recipe`` restarts itself with them)."""
    chosen = recipe(name)
    if any(pipe.is_loaded(c) for c in ("text_encoder", "transformer", "vae")) or pipe.optimizations:
        raise ValueError(f"recipe {name}: build the pipeline fp32 with load=() and no step applied "
                         "(build_pipeline does)")
    lacking = missing_env(name)
    if lacking:
        raise RuntimeError(f"recipe {name} needs start-up settings this process was started without: "
                           + " ".join(f"{k}={v}" for k, v in lacking.items())
                           + " (set them before starting Python, or use python -m utils.generate --recipe)")
    return registry.apply(pipe, chosen.steps)


def build_pipeline(name: str, preset: str = "opensora-v1.2", weights: str = "random",
                   setting: VideoSetting | None = None, **options) -> OpenSoraPipeline:
    """``load_pipeline`` (fp32, nothing loaded) with recipe ``name`` applied; with ``setting``, the memory
    preflight of the pipeline as the recipe makes it (``utils.optim.preflight``) before anything loads."""
    pipe = apply_recipe(load_pipeline(preset, weights=weights, dtype="fp32", load=(), **options), name)
    if setting is not None:
        preflight(pipe, setting, free_text_encoder=True)
    return pipe
