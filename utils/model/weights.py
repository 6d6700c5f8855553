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


@torch.no_grad()
def materialize_random(module: nn.Module, dtype: torch.dtype, seed: int = 0, chunk_rows: int = 1024,
                       device: str = "cpu") -> nn.Module:
    """Turn a module built on the meta device into real tensors of ``dtype`` on ``device``, filled randomly.

    Memory is allocated once, directly in ``dtype`` (a bf16 T5-XXL never exists in fp32). Weights of
    rank >= 2 get N(0, 1/fan_in) (activations keep unit scale through deep stacks), rank-1 tensors
    named like a norm weight or scale get ones, other rank-1 tensors zeros. Non-persistent buffers
    (position tables, RoPE frequencies) are recomputed by their module's ``reset_buffers`` if it has one.
    Filling goes in row chunks through a float32 scratch of at most ``chunk_rows`` rows, drawn on
    ``device`` (so a GPU fills its own memory; values differ between devices, shapes do not).
    """
    module.to(dtype=dtype)
    _allocate(module, device)
    gen = torch.Generator(device).manual_seed(seed)
    # non-persistent buffers are recomputed below; a cache one holds after a forward pass (rope.cached_freqs)
    # would otherwise draw from the stream and change every weight after it on a reload
    transient = {f"{name}.{buffer}".lstrip(".") for name, sub in module.named_modules()
                 for buffer in sub._non_persistent_buffers_set}
    tensors = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if n not in transient]
    large = sum(t.numel() for _, t in tensors) > 200_000_000  # a bar only where filling takes seconds
    for name, tensor in tqdm(tensors, desc=f"random {type(module).__name__}", unit="tensor", disable=not large,
                             mininterval=2.0):
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
    _reset_constants(module)
    return module


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


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # only when official files are loaded

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # safetensors, pickle and zip each raise their own types
        raise CheckpointError(f"{path} could not be read as a {path.suffix} weight file: {err}") from None


def read_checkpoint(folder: Path, component: str, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """All tensors of ``component``'s files in ``folder`` (shards followed through their index)."""
    for name in _WEIGHT_FILES[component]:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{path} names shards that are missing: {', '.join(missing)}")
            paths = [folder / s for s in shards]
        else:
            paths = [path]
        state = {}
        for shard in paths:
            state.update({k: v for k, v in _read_tensor_file(shard).items() if keep(k)})
        return state
    raise CheckpointError(f"no weight file in {folder}; expected one of {', '.join(_WEIGHT_FILES[component])}")


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``CheckpointError`` naming the missing, unexpected and mis-shaped keys, if any."""
    expected = state_dict_shapes(module)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {expected[k]})"
        for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k]
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


def load_component(module: nn.Module, component: str, folder: Path, device: str = "cpu") -> nn.Module:
    """Load the official ``component`` ('transformer', 'vae' or 'text_encoder') from ``folder``."""
    if component == "text_encoder":
        # the DeepFloyd files hold the whole T5; the encoder keeps `shared` and `encoder.*`
        state = read_checkpoint(folder, component, keep=lambda k: k == "shared.weight" or k.startswith("encoder."))
        if "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
            state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in T5EncoderModel
    else:
        state = read_checkpoint(folder, component)
    return load_strict(module, state, str(folder), device)

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
