"""The OpenSora 1.2 text-to-video pipeline: ``encode_prompt -> prepare_latents -> denoise -> decode``.

Components follow diffusers' names (``tokenizer, text_encoder, transformer, vae, scheduler``). Each
stage can be called alone and runs inside ``torch.profiler.record_function(<stage>)``; ``STAGES`` is
the one tuple of stage names used by profiler labels, result records and plots.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import record_function

from utils.fingerprint import fingerprint
from utils.io import GIB
from utils.model import aspect, memory
from utils.model.captions import append_score_to_prompts, text_preprocessing
from utils.model.dtypes import dtype_name, parse_dtype
from utils.model.memory import (
    check_fits,
    denoiser_activation_bytes,
    footprint_key,
    measured_footprint,
    module_bytes,
    return_freed_memory,
    timed,
    vae_decode_activation_bytes,
)
from utils.model.sampler import make_scheduler, rflow_sample
from utils.model.stdit3 import STDIT3_PRESETS, build_stdit3, config_from_dict
from utils.model.text_encoder import T5TextEncoder, build_t5_encoder, load_tokenizer
from utils.model.vae import build_vae
from utils.model.weights import (
    COMPONENTS,
    MINI_DIR,
    TRAINED_MINI,
    CheckpointError,
    load_component,
    materialize_random,
    require_weights,
    resolve_weights_dir,
)

STAGES = ("encode_prompt", "prepare_latents", "denoise", "decode")

# which preset of each component makes a pipeline
PIPELINE_PRESETS = {
    "opensora-v1.2": dict(transformer="STDiT3-XL/2", vae="OpenSoraVAE_V1_2", text_encoder="t5-v1_1-xxl"),
    # the upstream fixture sizes: runs in seconds, for tests and smoke runs
    "tiny": dict(transformer="tiny", vae="tiny", text_encoder="tiny"),
    # the quality testbed (utils.testbed.minimodel): weights="trained-mini" loads the model trained here
    "mini": dict(transformer="mini", vae="mini", text_encoder="mini"),
}

# upstream's RFLOW(use_timestep_transform=True) shifts the timesteps by r = sqrt(H*W / 512^2) * sqrt(T'); at the
# mini model's 64x64, 17 frames r is 0.28, which moves training and sampling towards low noise, after the
# object's shape and path are already laid out (1,500-step runs: 8 % all-correct with the shift, 31 % without,
# data/mini-model/timestep_shift_runs.json). The mini model is trained and sampled without it, an option of
# upstream's scheduler config.
TIMESTEP_TRANSFORM = {"opensora-v1.2": True, "tiny": True, "mini": False}



AESTHETIC_SCORE = 6.5  # upstream appends " aesthetic score: 6.5." to every prompt


@dataclass(frozen=True)
class VideoSetting:
    """What to generate, validated against upstream's tables when built with ``VideoSetting.create``."""

    resolution: str
    aspect_ratio: str
    num_frames: int
    height: int
    width: int
    steps: int = 30
    cfg_scale: float = 7.0
    seed: int = 42

    @classmethod
    def create(cls, resolution: str = "144p", aspect_ratio: str = "9:16", num_frames: str | int = "2s",
               steps: int = 30, cfg_scale: float = 7.0, seed: int = 42) -> "VideoSetting":
        height, width = aspect.image_size(resolution, aspect_ratio)
        frames = aspect.num_frames(num_frames)
        if 1 < frames < 17:
            # upstream's timestep shift uses frames // 17 * 5 latent frames: 0 here, and the schedule is NaN
            raise ValueError(f"frame count {frames} is not supported: upstream's timestep shift needs 1 "
                             "(an image) or at least 17 frames")
        if int(steps) < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not float(cfg_scale) >= 0:  # also refuses NaN
            raise ValueError(f"cfg_scale must be at least 0 (0: unconditional, 1: no guidance, upstream 7), "
                             f"got {cfg_scale}")
        return cls(resolution, aspect_ratio, frames, height, width, int(steps), float(cfg_scale), int(seed))

    @property
    def fps(self) -> int:
        return aspect.fps_for(self.num_frames)


@dataclass
class Generation:
    """One generated batch: frames in [-1, 1] [B, 3, F, H, W], plus the measurements of the run."""

    video: torch.Tensor | None
    latents: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)  # components loaded during the run




class OpenSoraPipeline:
    """The four stages over the components. A component can be released (back to the meta device,
    its memory freed) and loaded again, so a machine too small for all three models at once can run
    the stages one model at a time; shape queries (latent size, model arguments) work either way."""

    def __init__(self, tokenizer, text_encoder, transformer, vae, scheduler, preset: str,
                 dtypes: dict[str, torch.dtype], folders: dict[str, Path], seed: int = 0, device: str = "cpu"):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder  # T5TextEncoder: tokenizer + T5EncoderModel (``.model``)
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.preset = preset
        self.dtypes = dtypes  # per component
        self.folders = folders  # per component, when loaded from the official files
        self.seed = seed
        self.use_timestep_transform = TIMESTEP_TRANSFORM[preset]  # the sampler's resolution shift
        self.device = device  # where loaded components live: "cpu" or "cuda[:n]"
        self.optimizations: dict[str, dict] = {}  # name -> options of each applied utils.optim.registry step
        # fn(pipe, component) run after a component gets weights / after it is released (utils.optim.registry)
        self.load_hooks: list = []
        # component -> fn(pipe, component) that loads it in place of the whole-module materialisation (e.g. part by
        # part, quantising each part as it comes: utils.optim.quantize's streamed loading)
        self.loaders: dict = {}
        self.release_hooks: list = []

    @property
    def weights(self) -> str:
        """``random``, or the folders the official weights came from."""
        return ", ".join(str(f) for f in self.folders.values()) if self.folders else "random"

    def _module(self, component: str) -> torch.nn.Module:
        return self.text_encoder.model if component == "text_encoder" else getattr(self, component)

    def is_loaded(self, component: str) -> bool:
        return not next(self._module(component).parameters()).is_meta

    def load(self, component: str) -> None:
        """Give ``component`` real weights (random, or from its official files), if it has none."""
        if self.is_loaded(component):
            return
        module = self._module(component)
        if component in self.loaders:
            self.loaders[component](self, component)
        else:
            self._load_whole(module, component)
        for hook in self.load_hooks:
            hook(self, component)

    def _load_whole(self, module: torch.nn.Module, component: str) -> None:
        check_fits(module_bytes(module, self.dtypes[component]), f"loading the {component}",
                   "Release another component first, or use bf16.", device=self.device)
        if component in self.folders:
            module.to(dtype=self.dtypes[component])  # on the meta device: the file's tensors are cast as they load
            load_component(module, component, self.folders[component], device=self.device)
        else:
            materialize_random(module, self.dtypes[component], seed=self.seed, device=self.device)

    def release(self, component: str) -> None:
        """Free ``component``'s memory; its shapes stay (meta device) and ``load`` brings it back."""
        self._module(component).to("meta")
        for hook in self.release_hooks:
            hook(self, component)
        return_freed_memory()

    def _require(self, component: str, stage: str) -> None:
        if not self.is_loaded(component):
            raise RuntimeError(f"{stage} needs the {component}, which is not loaded; call load({component!r})")

    # ---- stages --------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings y [n, 1, L, D] and the token mask [n, L]."""
        self._require("text_encoder", "encode_prompt")
        with record_function("encode_prompt"):
            prompts = [text_preprocessing(p) for p in append_score_to_prompts(prompts, aes=AESTHETIC_SCORE)]
            encoded = self.text_encoder.encode(prompts)
        return encoded["y"], encoded["mask"]

    def latent_size(self, setting: VideoSetting) -> tuple[int, int, int]:
        return tuple(self.vae.get_latent_size([setting.num_frames, setting.height, setting.width]))

    def prepare_latents(self, batch: int, setting: VideoSetting, noise_rows: tuple[int, int] | None = None
                        ) -> torch.Tensor:
        """Gaussian noise z [B, 4, T, H/8, W/8] in the transformer's dtype, from the setting's seed
        (drawn on the CPU, so a seed gives the same noise on every device). With ``noise_rows`` = (first, total):
        rows first..first+B of a batch of ``total`` videos' noise, as a part of a batch made elsewhere gets it."""
        first, total = noise_rows or (0, batch)
        if not 0 <= first <= total - batch:
            raise ValueError(f"noise rows {first}..{first + batch} lie outside a batch of {total}")
        with record_function("prepare_latents"):
            generator = torch.Generator().manual_seed(setting.seed)
            shape = (total, self.vae.out_channels, *self.latent_size(setting))
            z = torch.randn(shape, generator=generator)[first:first + batch]
            return z.to(self.device, self.dtypes["transformer"])

    def model_args(self, batch: int, setting: VideoSetting) -> dict[str, torch.Tensor]:
        # upstream prepare_multi_resolution_info: [B] tensors in the model dtype (bf16 rounds them)
        values = dict(height=setting.height, width=setting.width, num_frames=setting.num_frames,
                      ar=setting.height / setting.width, fps=setting.fps)
        dtype = self.dtypes["transformer"]
        return {k: torch.tensor([v] * batch, dtype=torch.float32).to(self.device, dtype) for k, v in values.items()}

    def denoise(self, z, y, mask, setting: VideoSetting, progress: bool = True, on_step=None) -> torch.Tensor:
        """Rectified-flow sampling with CFG from noise ``z`` to the final latent (float32); ``on_step(i)`` is
        called after each step (e.g. to time it)."""
        self._require("transformer", "denoise")
        with record_function("denoise"):
            # upstream hands the transformer's learned null caption to the text encoder for CFG
            y_null = self.transformer.y_embedder.y_embedding[None].repeat(len(y), 1, 1)[:, None]
            return rflow_sample(self.transformer, self.scheduler, z, y.to(self.transformer.dtype), y_null, mask,
                                self.model_args(z.shape[0], setting), num_steps=setting.steps,
                                cfg_scale=setting.cfg_scale, use_timestep_transform=self.use_timestep_transform,
                                progress=progress, on_step=on_step)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, setting: VideoSetting) -> torch.Tensor:
        """Frames in [-1, 1], float32 [B, 3, F, H, W]."""
        self._require("vae", "decode")
        with record_function("decode"):
            return self.vae.decode(z.to(self.dtypes["vae"]), num_frames=setting.num_frames).float()

    # ---- the whole run -----------------------------------------------------------------------
    def __call__(self, prompts: list[str], setting: VideoSetting, progress: bool = True,
                 free_text_encoder: bool = False, on_step=None, noise_rows: tuple[int, int] | None = None,
                 decode: bool = True) -> Generation:
        """All four stages; with ``free_text_encoder`` the text encoder is released after encoding.
        Components not loaded are loaded when their stage comes (that time is not a stage's:
        ``Generation.load_seconds``); ``on_step`` as in ``denoise``, ``noise_rows`` as in ``prepare_latents``.
        Without ``decode`` the run stops at the latents (``video`` is None): a rank whose latents another decodes."""
        seconds, peaks, loads = {}, {}, {}

        def run(stage, *args, **kwargs):
            result, seconds[stage], peaks[stage] = timed(getattr(self, stage), *args, device=self.device, **kwargs)
            return result

        def load(component):
            if not self.is_loaded(component):
                loads[component] = timed(self.load, component, device=self.device)[1]

        load("text_encoder")
        y, mask = run("encode_prompt", prompts)
        if free_text_encoder:
            self.release("text_encoder")
        z = run("prepare_latents", len(prompts), setting, noise_rows)
        load("transformer")
        z = run("denoise", z, y, mask, setting, progress, on_step=on_step)
        video = None
        if decode:
            load("vae")
            video = run("decode", z, setting)
        return Generation(video=video, latents=z, seconds=seconds, peak_rss_bytes=peaks, load_seconds=loads)


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def estimate_peak_bytes(transformer, vae, text_encoder_model, setting: VideoSetting, dtype, text_encoder_dtype,
                        batch: int = 1, free_text_encoder: bool = False, preset: str | None = None,
                        lazy_load: bool = False, optimizations: str = "", weight_bytes: dict[str, int] | None = None,
                        footprints=None) -> dict:
    """Peak resident bytes of a whole run (``peak``) and where the figure comes from (``source``).

    With ``preset`` given, a peak measured at the same setting, precisions, optimisations and VAE chunking
    (``footprints``, default ``memory.FOOTPRINTS``; see ``memory.measured_footprint``) is used; otherwise
    the analytic estimate from modules still on the meta device: resident weights plus the largest stage's
    working set, all models loaded up front or, with ``lazy_load``, each when its stage comes
    (``weight_bytes`` overrides a component's weights, e.g. an int8 one). ``analytic_peak`` is always there.
    """
    weights = {
        "transformer": module_bytes(transformer, dtype),
        "vae": module_bytes(vae, dtype),
        "text_encoder": module_bytes(text_encoder_model, text_encoder_dtype),
    } | (weight_bytes or {})
    frames, h, w = vae.get_latent_size([setting.num_frames, setting.height, setting.width])
    pt, ph, pw = transformer.config.patch_size
    tokens = -(-frames // pt) * -(-h // ph) * -(-w // pw)
    cfg = transformer.config
    denoise = denoiser_activation_bytes(tokens, cfg.hidden_size, cfg.mlp_ratio, dtype, batch=2 * batch)
    widest = vae.spatial_vae.module.config.block_out_channels[1]  # channels of the last upsampled maps
    micro_batch = vae.micro_batch_size or setting.num_frames * batch  # None: every frame in one 2D-decoder call
    decode = vae_decode_activation_bytes(setting.num_frames * batch, h * 8, w * 8, micro_batch, widest,
                                         dtype)
    resident_after_encoding = weights["transformer"] + weights["vae"] + (
        0 if free_text_encoder else weights["text_encoder"])
    # loaded lazily, T5 is alone in memory while it encodes; otherwise all three models are there from the start
    first = weights["text_encoder"] if lazy_load else sum(weights.values())
    analytic = max(first, resident_after_encoding + max(denoise, decode))
    estimate = dict(weights, denoise=resident_after_encoding + denoise, decode=resident_after_encoding + decode,
                    analytic_peak=analytic, peak=analytic, source="analytic estimate")
    if preset is not None:
        key = footprint_key(model=preset, resolution=setting.resolution, aspect_ratio=setting.aspect_ratio,
                            frames=setting.num_frames, dtype=dtype_name(dtype),
                            text_encoder_dtype=dtype_name(text_encoder_dtype),
                            free_text_encoder=free_text_encoder, lazy_load=lazy_load, optimizations=optimizations,
                            micro_batch_size=vae.micro_batch_size, micro_frame_size=vae.micro_frame_size)
        footprints = memory.FOOTPRINTS if footprints is None else footprints
        entry = measured_footprint(key, footprints, environment_id=fingerprint()["environment_id"],
                                   arch=platform.machine())
        estimate["key"] = key
        if entry is not None:
            estimate.update(peak=entry["peak_rss_bytes"],
                            source=f"measured peak RSS from {Path(footprints).name}, environment "
                                   f"{entry['environment_id']}, {entry.get('time', 'undated')}")
    return estimate


def load_pipeline(preset: str = "opensora-v1.2", weights: str = "random", dtype: str = "bf16",
                  text_encoder_dtype: str | None = None, setting: VideoSetting | None = None,
                  free_text_encoder: bool = False, allow_download: bool = False, seed: int = 0,
                  tokenizer_path: str | None = None, load: tuple[str, ...] = COMPONENTS,
                  device: str = "cpu") -> OpenSoraPipeline:
    """Build the pipeline: every module on the meta device first, a memory preflight for ``setting``,
    then one materialisation in the target dtype of the components in ``load``, random
    (``weights="random"``) or from the official files (a folder, or ``"hub"`` for the Hugging Face
    cache); the "mini" preset takes ``weights="trained-mini"`` (the testbed model trained here) or the
    folder a training run wrote (``<folder>/<component>/model.safetensors``). Components left out of ``load`` stay on the meta device until ``pipe.load(name)``.
    ``device`` is where loaded components live ("cpu", or "cuda" for the GPU comparison)."""
    if preset not in PIPELINE_PRESETS:
        raise ValueError(f"unknown pipeline preset {preset!r}; accepted: {', '.join(PIPELINE_PRESETS)}")
    unknown = set(load) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; accepted: {', '.join(COMPONENTS)}")
    names = PIPELINE_PRESETS[preset]
    torch_dtype = parse_dtype(dtype)
    te_dtype = parse_dtype(text_encoder_dtype or dtype)
    folders = {}
    if weights == TRAINED_MINI and preset != "mini":
        raise ValueError(f"weights={TRAINED_MINI!r} belong to the 'mini' preset, not {preset!r}")
    if preset == "mini" and weights != "random":

        folders = require_weights(MINI_DIR if weights == TRAINED_MINI else weights)  # <root>/<component>/
    elif weights != "random":
        root = None if weights == "hub" else weights
        if root is not None and not Path(root).is_dir():
            raise CheckpointError(f"weights folder {root} does not exist; pass a folder, 'hub' or 'random'")
        problems = []
        for component in COMPONENTS:
            try:
                folders[component] = resolve_weights_dir(component, root, allow_download)
            except CheckpointError as err:
                problems.append(str(err))
        if problems:
            raise CheckpointError("\n".join(problems))

    transformer = build_stdit3(names["transformer"], device="meta", dtype=torch_dtype)
    if "transformer" in folders and (folders["transformer"] / "config.json").is_file():
        found = config_from_dict(json.loads((folders["transformer"] / "config.json").read_text()))
        if found != STDIT3_PRESETS[names["transformer"]]:
            raise CheckpointError(f"{folders['transformer']}/config.json describes {found}, "
                                  f"not the {names['transformer']} preset")
    vae = build_vae(names["vae"], device="meta", dtype=torch_dtype)
    t5 = build_t5_encoder(names["text_encoder"], dtype=te_dtype, device="meta")

    if setting is not None:
        estimate = estimate_peak_bytes(transformer, vae, t5, setting, torch_dtype, te_dtype,
                                       free_text_encoder=free_text_encoder, preset=preset,
                                       lazy_load=set(load) != set(COMPONENTS))
        advice = [option for option, applies in (
            ("bf16 weights (--dtype bf16)", torch_dtype == torch.float32),
            ("a bf16 text encoder (--text-encoder-dtype bf16)", te_dtype == torch.float32),
            ("freeing the text encoder after encoding (no --keep-text-encoder)", not free_text_encoder),
        ) if applies] + ["a lower resolution or fewer frames"]
        check_fits(estimate["peak"], f"{preset} ({dtype}, text encoder {text_encoder_dtype or dtype}) at "
                   f"{setting.resolution} {setting.aspect_ratio} {setting.num_frames} frames",
                   f"Try {', or '.join(advice)}. Weights: "
                   + ", ".join(f"{k} {estimate[k] / GIB:.1f} GiB" for k in COMPONENTS), device=device,
                   source=estimate["source"])

    if tokenizer_path is None and preset == "mini":

        # its own vocabulary, whatever the weights
        tokenizer_path = folders.get("text_encoder", MINI_DIR / "text_encoder")
    tokenizer = load_tokenizer(tokenizer_path or (str(folders["text_encoder"]) if folders else None))
    text_encoder = T5TextEncoder(tokenizer, t5, model_max_length=transformer.config.model_max_length)
    dtypes = {"text_encoder": te_dtype, "transformer": torch_dtype, "vae": torch_dtype}
    pipe = OpenSoraPipeline(tokenizer, text_encoder, transformer, vae, make_scheduler(), preset, dtypes, folders,
                            seed, device)
    for component in load:
        pipe.load(component)
    return pipe
