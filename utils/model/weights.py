"""Weights: strict loading of the official checkpoints, and fast random materialisation.

Official files (section 3 of the upstream brief):
- STDiT3-XL/2 ``hpcai-tech/OpenSora-STDiT-v3``: ``model.safetensors``, bare ``state_dict()`` names.
- VAE v1.2 ``hpcai-tech/OpenSora-VAE-v1.2``: ``model.safetensors``, ``spatial_vae.module.*``,
  ``temporal_vae.*``, ``scale``, ``shift``.
- T5 ``DeepFloyd/t5-v1_1-xxl``: ``pytorch_model-0000{1,2}-of-00002.bin`` (+ ``.index.json``) holding
  encoder and decoder; a safetensors conversion may exist. Only ``shared.*`` and ``encoder.*`` are kept.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from utils.paths import DATA, UPSTREAM

TRAINED_MINI = "trained-mini"  # the weights of the "mini" preset trained here, in data/mini-model/
COMPONENTS = ("text_encoder", "transformer", "vae")  # the pipeline's components with weights
MANIFESTS = {
    "stdit3": UPSTREAM / "opensora_v1_2_stdit3_xl2_state_dict.tsv",
    "vae": UPSTREAM / "opensora_v1_2_vae_state_dict.tsv",
    "t5": UPSTREAM / "opensora_v1_2_t5_xxl_encoder_state_dict.tsv",
}


class CheckpointError(ValueError):
    """A checkpoint that does not exist or does not match the model, with the keys that are wrong."""


# ---------------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------------
def read_manifest(component: str) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of the official checkpoint of ``component`` ('stdit3', 'vae' or 't5')."""
    shapes = {}
    for line in MANIFESTS[component].read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        shapes[name] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return shapes


def state_dict_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# random weights, built without an fp32 detour
# ---------------------------------------------------------------------------------------------
def _fan_in(tensor: torch.Tensor) -> int:
    return math.prod(tensor.shape[1:])


def _allocate(module: nn.Module, device: str = "cpu") -> None:
    """Real (uninitialised) memory on ``device`` for a meta module, with tied weights tied again."""
    module.to_empty(device=device)
    tie = getattr(module, "tie_weights", None)  # transformers models: T5's shared/embed_tokens
    if callable(tie):
        tie()


def _reset_constants(module: nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_buffers", None)
        if callable(reset):
            reset()


def _persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # non-persistent buffers are recomputed by reset_buffers; a cache one holds after a forward pass
    # (rope.cached_freqs) would otherwise draw from the stream and change every weight after it on a reload
    transient = {f"{name}.{buffer}".lstrip(".") for name, sub in module.named_modules()
                 for buffer in sub._non_persistent_buffers_set}
    return [(n, b) for n, b in module.named_buffers() if n not in transient]


@torch.no_grad()
def _fill_random(tensors: list[tuple[str, torch.Tensor]], gen: torch.Generator, device: str, chunk_rows: int = 1024,
                 label: str = "") -> None:
    large = sum(t.numel() for _, t in tensors) > 200_000_000  # a bar only where filling takes seconds
    for name, tensor in tqdm(tensors, desc=f"random {label}", unit="tensor", disable=not large, mininterval=2.0):
        if not tensor.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if tensor.dim() >= 2:
            std = 1.0 / math.sqrt(_fan_in(tensor))
            flat = tensor.view(tensor.shape[0], -1)
            for start in range(0, flat.shape[0], chunk_rows):
                rows = flat[start:start + chunk_rows]
                rows.copy_(torch.randn(rows.shape, generator=gen, device=device) * std)
        elif "norm" in name or leaf in ("weight", "scale", "g"):
            tensor.fill_(1.0)
        else:
            tensor.zero_()


@torch.no_grad()
def materialize_random(module: nn.Module, dtype: torch.dtype, seed: int = 0, chunk_rows: int = 1024,
                       device: str = "cpu") -> nn.Module:
    """Turn a module built on the meta device into real tensors of ``dtype`` on ``device``, filled randomly.

    Memory is allocated once, directly in ``dtype`` (a bf16 T5-XXL never exists in fp32). Weights of
    rank >= 2 get N(0, 1/fan_in) (activations keep unit scale through deep stacks), rank-1 tensors
    named like a norm weight or scale get ones, other rank-1 tensors zeros; parameters first, then
    persistent buffers. Non-persistent buffers (position tables, RoPE frequencies) are recomputed by their
    module's ``reset_buffers`` if it has one. Filling goes in row chunks through a float32 scratch of at
    most ``chunk_rows`` rows, drawn on ``device`` (so a GPU fills its own memory; values differ between
    devices, shapes do not).
    """
    module.to(dtype=dtype)
    _allocate(module, device)
    gen = torch.Generator(device).manual_seed(seed)
    _fill_random(list(module.named_parameters()) + _persistent_buffers(module), gen, device, chunk_rows,
                 type(module).__name__)
    _reset_constants(module)
    return module


# ---------------------------------------------------------------------------------------------
# one block at a time: a component built (and, e.g., quantised) part by part, never whole in its load dtype
# ---------------------------------------------------------------------------------------------
def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def module_parts(module: nn.Module) -> list[str]:
    """Names of submodules that together hold every tensor of ``module`` once, none larger than one repeated
    block: a module whose subtree has a ``ModuleList`` is opened into its children (a ``ModuleList`` into its
    blocks), any other is one part; a submodule whose tensors all belong to earlier parts (an embedding tied
    to another) and one with no tensors are left out."""
    parts, seen = [], set()

    def walk(prefix: str, sub: nn.Module) -> None:
        if not any(isinstance(m, nn.ModuleList) for m in sub.modules()):
            tensors = {id(t) for t in (*sub.parameters(), *sub.buffers())}
            if tensors - seen:
                parts.append(prefix)
                seen.update(tensors)
            return
        if _own_tensors(sub):
            raise ValueError(f"{prefix or type(sub).__name__} holds tensors of its own beside its blocks: "
                             "it cannot be built part by part")
        for name, child in sub.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", module)
    return parts


@torch.no_grad()
def materialize_in_parts(module: nn.Module, fill, after_part=None) -> nn.Module:
    """Give a meta ``module`` real tensors one part (``module_parts``) at a time: ``fill(name, part)`` gives
    the part its memory and values (``RandomFill``, ``fill_from_checkpoint``), then ``after_part(name, part)``
    may shrink it (quantise it) before the next part is made, so the whole module never exists in its load
    dtype at once; then ``fill.finish(module)`` if it has one. Tied weights are tied again at the end
    (transformers' ``tie_weights``)."""
    tie = getattr(module, "tie_weights", None)
    if callable(tie):
        tie()  # on the meta module, so a tied embedding is one part, not two
    large = sum(p.numel() for p in module.parameters()) > 200_000_000  # a bar only where building takes seconds
    for name in tqdm(module_parts(module), desc=f"{type(module).__name__} by parts", unit="part", disable=not large,
                     mininterval=2.0):
        part = module.get_submodule(name)
        fill(name, part)
        if after_part is not None:
            after_part(name, part)
    if hasattr(fill, "finish"):
        fill.finish(module)
    if callable(tie):
        tie()
    return module


class RandomFill:
    """``fill`` for ``materialize_in_parts`` with the values ``materialize_random`` gives the whole module: one
    stream, every part's parameters in module order, the persistent buffers (small: STDiT3's null caption)
    kept for ``finish``, as the whole module draws them after all parameters; ``finish`` also restores the
    constants of the whole module (``reset_buffers``, e.g. STDiT3's ``rope.freqs``)."""

    def __init__(self, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator(device).manual_seed(seed)
        self.buffers: list[tuple[str, torch.Tensor]] = []

    def __call__(self, name: str, part: nn.Module) -> None:
        part.to(dtype=self.dtype)
        part.to_empty(device=self.device)
        _fill_random(list(part.named_parameters()), self.gen, self.device, label=name)
        self.buffers += [(f"{name}.{n}", b) for n, b in _persistent_buffers(part)]

    def finish(self, module: nn.Module) -> None:
        _fill_random(self.buffers, self.gen, self.device, label="buffers")
        self.buffers = []
        _reset_constants(module)


# ---------------------------------------------------------------------------------------------
# the official checkpoints
# ---------------------------------------------------------------------------------------------
REPOS = {
    "transformer": "hpcai-tech/OpenSora-STDiT-v3",
    "vae": "hpcai-tech/OpenSora-VAE-v1.2",
    "text_encoder": "DeepFloyd/t5-v1_1-xxl",
}

# weight files each repo is recognised by, in order of preference
_WEIGHT_FILES = {
    "transformer": ("model.safetensors",),
    "vae": ("model.safetensors",),
    "text_encoder": ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors",
                     "pytorch_model.bin"),
}


def _has_weights(folder: Path, component: str) -> bool:
    return any((folder / name).is_file() for name in _WEIGHT_FILES[component])


def resolve_weights_dir(component: str, root: str | os.PathLike | None, allow_download: bool = False) -> Path:
    """The folder holding ``component``'s official files.

    With ``root``: ``root/<org>/<name>``, ``root/<name>`` or ``root`` itself, whichever holds the weight
    files. Without: the Hugging Face cache, offline unless ``allow_download``."""
    repo_id = REPOS[component]
    if root is None:
        from huggingface_hub import snapshot_download  # only for the hub cache: most runs use random weights

        try:
            return Path(snapshot_download(repo_id, local_files_only=not allow_download))
        except Exception as err:  # the hub raises several types for "not cached"
            how = "" if allow_download else " (offline: pass allow_download to fetch it)"
            raise CheckpointError(f"{repo_id} is not in the Hugging Face cache{how}: {err}") from None
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"weights folder {root} does not exist")
    candidates = [root / repo_id, root / repo_id.split("/")[1], root]
    for folder in candidates:
        if folder.is_dir() and _has_weights(folder, component):
            return folder
    raise CheckpointError(
        f"no {component} weights for {repo_id} under {root}: looked for {' or '.join(_WEIGHT_FILES[component])} "
        f"in {', '.join(str(c) for c in candidates)}"
    )


class LazyCheckpoint(Mapping):
    """``name -> tensor`` over ``component``'s files in ``folder`` (shards followed through their index),
    reading a tensor only when it is asked for (safetensors' ``safe_open``; ``.bin`` files memory-mapped);
    ``shapes()`` without reading any. Names that ``keep`` refuses are left out."""

    def __init__(self, folder: Path, component: str, keep=lambda name: True):
        self.source = str(folder)
        self._where = {}
        for shard in self._shard_paths(Path(folder), component):
            opened = self._open(shard)
            self._where.update({k: opened for k in opened.keys() if keep(k)})

    @staticmethod
    def _shard_paths(folder: Path, component: str) -> list[Path]:
        for name in _WEIGHT_FILES[component]:
            path = folder / name
            if not path.is_file():
                continue
            if not name.endswith(".index.json"):
                return [path]
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{path} names shards that are missing: {', '.join(missing)}")
            return [folder / s for s in shards]
        raise CheckpointError(f"no weight file in {folder}; expected one of {', '.join(_WEIGHT_FILES[component])}")

    @staticmethod
    def _open(path: Path):
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open  # only when official files are loaded

                return safe_open(path, framework="pt", device="cpu")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # safetensors, pickle and zip each raise their own types
            raise CheckpointError(f"{path} could not be read as a {path.suffix} weight file: {err}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        opened = self._where[name]
        return opened[name] if isinstance(opened, dict) else opened.get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(o[k].shape) if isinstance(o, dict) else tuple(o.get_slice(k).get_shape())
                for k, o in self._where.items()}


def read_checkpoint(folder: Path, component: str, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """All tensors of ``component``'s files in ``folder`` (shards followed through their index)."""
    lazy = LazyCheckpoint(folder, component, keep)
    return {name: lazy[name] for name in lazy}


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_state_dict(module: nn.Module, state: Mapping, source: str) -> None:
    """Raise ``CheckpointError`` naming the missing, unexpected and mis-shaped keys, if any."""
    expected = state_dict_shapes(module)
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{k} (file {found[k]}, model {expected[k]})"
        for k in set(expected) & set(found) if found[k] != expected[k]
    )
    if missing or unexpected or misshaped:
        parts = [f"checkpoint {source} does not match the {type(module).__name__} it is loaded into:"]
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped keys: {_listing(misshaped)}")
        raise CheckpointError("\n  ".join(parts))


@torch.no_grad()
def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, device: str = "cpu") -> nn.Module:
    """Check ``state`` against ``module`` and copy it in (cast to the module's dtype).

    A module still on the meta device is first given real memory on ``device`` in its own dtype."""
    check_state_dict(module, state, source)
    if any(p.is_meta for p in module.parameters()):
        _allocate(module, device)
        _reset_constants(module)  # non-persistent buffers are not in the file
    module.load_state_dict(state, strict=True)
    return module


def _t5_encoder_keys(name: str) -> bool:
    # the DeepFloyd files hold the whole T5; the encoder keeps `shared` and `encoder.*`
    return name == "shared.weight" or name.startswith("encoder.")


def load_component(module: nn.Module, component: str, folder: Path, device: str = "cpu") -> nn.Module:
    """Load the official ``component`` ('transformer', 'vae' or 'text_encoder') from ``folder``."""
    if component == "text_encoder":
        state = read_checkpoint(folder, component, keep=_t5_encoder_keys)
        if "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
            state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in T5EncoderModel
    else:
        state = read_checkpoint(folder, component)
    return load_strict(module, state, str(folder), device)


def fill_from_checkpoint(module: nn.Module, component: str, folder: Path, dtype: torch.dtype, device: str = "cpu"):
    """``fill`` for ``materialize_in_parts`` from the official files, after the strict key check of the whole
    ``module`` against them: each part reads only its own tensors (cast to ``dtype``), so the file is never in
    memory whole."""
    lazy = LazyCheckpoint(folder, component, **({"keep": _t5_encoder_keys} if component == "text_encoder" else {}))
    expected = state_dict_shapes(module)
    shapes = lazy.shapes()
    if component == "text_encoder" and "encoder.embed_tokens.weight" not in shapes and "shared.weight" in shapes:
        shapes["encoder.embed_tokens.weight"] = shapes["shared.weight"]  # tied in T5EncoderModel
    check_state_dict(module, {k: torch.empty(v, device="meta") for k, v in shapes.items()}, str(folder))

    def fill(name: str, part: nn.Module) -> None:
        part.to(dtype=dtype)
        part.to_empty(device=device)
        _reset_constants(part)  # non-persistent buffers are not in the file
        own = [k for k in expected if k.startswith(name + ".")]
        part.load_state_dict({k[len(name) + 1:]: lazy[k] for k in own}, strict=True)

    return fill


MINI_DIR = DATA / "mini-model"  # <component>/model.safetensors (+ the tokenizer and config files)


def component_dirs(root: str | Path = MINI_DIR) -> dict[str, Path]:
    return {component: Path(root) / component for component in COMPONENTS}


def weights_present(root: str | Path = MINI_DIR) -> bool:
    return all((folder / "model.safetensors").is_file() for folder in component_dirs(root).values())


def weights_id(root: str | Path = MINI_DIR) -> str | None:
    """Which trained mini model is under ``root``: the first 12 hex digits of a SHA-256 over every file of
    its component folders (weights, tokenizer, config), or None when a weight file is missing. Records of
    ``trained-mini`` carry it as ``config.mini_weights``, so results of other weights are told apart."""
    if not weights_present(root):
        return None
    digest = hashlib.sha256()
    for component, folder in component_dirs(root).items():
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.update(f"{component}/{path.name}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def require_weights(root: str | Path = MINI_DIR) -> dict[str, Path]:
    """The component folders of a trained mini model under ``root``; raises if a weight file is missing."""
    folders = component_dirs(root)
    missing = [str(f / "model.safetensors") for f in folders.values() if not (f / "model.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"the trained mini model is missing {', '.join(missing)}; "
                                "train it with `make mini-model`")
    return folders
