"""The OpenSora 1.2 text-to-video pipeline: ``encode_prompt -> prepare_latents -> denoise -> decode``.

Components follow diffusers' names (``tokenizer, text_encoder, transformer, vae, scheduler``). Each
stage can be called alone and runs inside ``torch.profiler.record_function(<stage>)``; ``STAGES`` is
the one tuple of stage names used by profiler labels, result records and plots.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import record_function

from . import aspect
from .memory import GIB, InsufficientMemoryError, check_fits, denoiser_activation_bytes, module_bytes, timed, \
    vae_decode_activation_bytes
from .sampler import make_scheduler, rflow_sample
from .stdit3 import STDIT3_PRESETS, build_stdit3, config_from_dict
from .text_encoder import T5TextEncoder, append_score_to_prompts, build_t5_encoder, load_tokenizer, \
    text_preprocessing
from .vae import build_vae
from .weights import CheckpointError, load_component, materialize_random, resolve_weights_dir

STAGES = ("encode_prompt", "prepare_latents", "denoise", "decode")

# which preset of each component makes a pipeline
PIPELINE_PRESETS = {
    "opensora-v1.2": dict(transformer="STDiT3-XL/2", vae="OpenSoraVAE_V1_2", text_encoder="t5-v1_1-xxl"),
    # the upstream fixture sizes: runs in seconds, for tests and smoke runs
    "tiny": dict(transformer="tiny", vae="tiny", text_encoder="tiny"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AESTHETIC_SCORE = 6.5  # upstream appends " aesthetic score: 6.5." to every prompt


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[name]


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
        if int(steps) < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return cls(resolution, aspect_ratio, frames, height, width, int(steps), float(cfg_scale), int(seed))

    @property
    def fps(self) -> int:
        return aspect.fps_for(self.num_frames)


@dataclass
class Generation:
    """One generated batch: frames in [-1, 1] [B, 3, F, H, W], plus the measurements of the run."""

    video: torch.Tensor
    latents: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)


class OpenSoraPipeline:
    def __init__(self, tokenizer, text_encoder, transformer, vae, scheduler, weights: str, preset: str):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder  # T5TextEncoder (tokenizer + T5EncoderModel); None once freed
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.weights = weights  # "random" or the folder the official weights came from
        self.preset = preset

    # ---- stages --------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt embeddings y [n, 1, L, D], the null caption of the same shape, and the mask [n, L]."""
        if self.text_encoder is None:
            raise RuntimeError("the text encoder was freed; build a new pipeline to encode prompts")
        with record_function("encode_prompt"):
            prompts = [text_preprocessing(p) for p in append_score_to_prompts(prompts, aes=AESTHETIC_SCORE)]
            encoded = self.text_encoder.encode(prompts)
            y = encoded["y"].to(self.transformer.dtype)
            # upstream hands the transformer's learned null caption to the text encoder for CFG
            y_null = self.transformer.y_embedder.y_embedding[None].repeat(len(prompts), 1, 1)[:, None]
        return y, y_null, encoded["mask"]

    def latent_size(self, setting: VideoSetting) -> tuple[int, int, int]:
        return tuple(self.vae.get_latent_size([setting.num_frames, setting.height, setting.width]))

    def prepare_latents(self, batch: int, setting: VideoSetting) -> torch.Tensor:
        """Gaussian noise z [B, 4, T, H/8, W/8] in the transformer's dtype, from the setting's seed."""
        with record_function("prepare_latents"):
            generator = torch.Generator().manual_seed(setting.seed)
            shape = (batch, self.vae.out_channels, *self.latent_size(setting))
            return torch.randn(shape, generator=generator).to(self.transformer.dtype)

    def model_args(self, batch: int, setting: VideoSetting) -> dict[str, torch.Tensor]:
        # upstream prepare_multi_resolution_info: [B] tensors in the model dtype (bf16 rounds them)
        dtype = self.transformer.dtype
        values = dict(height=setting.height, width=setting.width, num_frames=setting.num_frames,
                      ar=setting.height / setting.width, fps=setting.fps)
        return {k: torch.tensor([v] * batch, dtype=torch.float32).to(dtype) for k, v in values.items()}

    def denoise(self, z, y, y_null, mask, setting: VideoSetting, progress: bool = True) -> torch.Tensor:
        with record_function("denoise"):
            return rflow_sample(self.transformer, self.scheduler, z, y, y_null, mask,
                                self.model_args(z.shape[0], setting), num_steps=setting.steps,
                                cfg_scale=setting.cfg_scale, progress=progress)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, setting: VideoSetting) -> torch.Tensor:
        with record_function("decode"):
            return self.vae.decode(z.to(self.vae_dtype), num_frames=setting.num_frames).float()

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def free_text_encoder(self) -> None:
        """Drop the text encoder (the largest component) once the prompts are encoded."""
        self.text_encoder = None

    # ---- the whole run -----------------------------------------------------------------------
    def __call__(self, prompts: list[str], setting: VideoSetting, progress: bool = True,
                 free_text_encoder: bool = False) -> Generation:
        seconds, peaks = {}, {}
        (y, y_null, mask), seconds["encode_prompt"], peaks["encode_prompt"] = timed(self.encode_prompt, prompts)
        if free_text_encoder:
            self.free_text_encoder()
        z, seconds["prepare_latents"], peaks["prepare_latents"] = timed(self.prepare_latents, len(prompts), setting)
        z, seconds["denoise"], peaks["denoise"] = timed(self.denoise, z, y, y_null, mask, setting, progress)
        video, seconds["decode"], peaks["decode"] = timed(self.decode, z, setting)
        return Generation(video=video, latents=z, seconds=seconds, peak_rss_bytes=peaks)


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def estimate_peak_bytes(transformer, vae, text_encoder_model, setting: VideoSetting, dtype, text_encoder_dtype,
                        batch: int = 1, free_text_encoder: bool = False) -> dict[str, int]:
    """Resident weights plus the largest stage's working set, from modules still on the meta device."""
    weights = {
        "transformer": module_bytes(transformer, dtype),
        "vae": module_bytes(vae, dtype),
        "text_encoder": module_bytes(text_encoder_model, text_encoder_dtype),
    }
    frames, h, w = vae.get_latent_size([setting.num_frames, setting.height, setting.width])
    pt, ph, pw = transformer.config.patch_size
    tokens = -(-frames // pt) * -(-h // ph) * -(-w // pw)
    cfg = transformer.config
    denoise = denoiser_activation_bytes(tokens, cfg.hidden_size, cfg.mlp_ratio, dtype, batch=2 * batch)
    widest = vae.spatial_vae.module.config.block_out_channels[1]  # channels of the last upsampled maps
    decode = vae_decode_activation_bytes(setting.num_frames * batch, h * 8, w * 8, vae.micro_batch_size, widest,
                                         dtype)
    resident_after_encoding = weights["transformer"] + weights["vae"] + (
        0 if free_text_encoder else weights["text_encoder"])
    return dict(weights, denoise=resident_after_encoding + denoise, decode=resident_after_encoding + decode,
                peak=max(sum(weights.values()), resident_after_encoding + max(denoise, decode)))


def load_pipeline(preset: str = "opensora-v1.2", weights: str = "random", dtype: str = "bf16",
                  text_encoder_dtype: str | None = None, setting: VideoSetting | None = None,
                  free_text_encoder: bool = False, allow_download: bool = False, seed: int = 0,
                  tokenizer_path: str | None = None) -> OpenSoraPipeline:
    """Build the pipeline: every module on the meta device first, a memory preflight for ``setting``,
    then one materialisation in the target dtype, random (``weights="random"``) or from the official
    files (a folder, or ``"hub"`` for the Hugging Face cache)."""
    if preset not in PIPELINE_PRESETS:
        raise ValueError(f"unknown pipeline preset {preset!r}; accepted: {', '.join(PIPELINE_PRESETS)}")
    names = PIPELINE_PRESETS[preset]
    torch_dtype = parse_dtype(dtype)
    te_dtype = parse_dtype(text_encoder_dtype or dtype)
    folders = {}
    if weights != "random":
        root = None if weights == "hub" else weights
        if root is not None and not Path(root).is_dir():
            raise CheckpointError(f"weights folder {root} does not exist; pass a folder, 'hub' or 'random'")
        folders = {c: resolve_weights_dir(c, root, allow_download) for c in ("transformer", "vae", "text_encoder")}

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
                                       free_text_encoder=free_text_encoder)
        advice = [option for option, applies in (
            ("bf16 weights (--dtype bf16)", torch_dtype == torch.float32),
            ("a bf16 text encoder (--text-encoder-dtype bf16)", te_dtype == torch.float32),
            ("freeing the text encoder after encoding (no --keep-text-encoder)", not free_text_encoder),
        ) if applies] + ["a lower resolution or fewer frames"]
        check_fits(estimate["peak"], f"{preset} ({dtype}, text encoder {text_encoder_dtype or dtype}) at "
                   f"{setting.resolution} {setting.aspect_ratio} {setting.num_frames} frames",
                   f"Try {', or '.join(advice)}. Weights: "
                   + ", ".join(f"{k} {estimate[k] / GIB:.1f} GiB" for k in ("transformer", "vae", "text_encoder")))

    for component, module in (("transformer", transformer), ("vae", vae), ("text_encoder", t5)):
        if component in folders:
            load_component(module, component, folders[component])
        else:
            materialize_random(module, module_dtype(module), seed=seed)
    tokenizer = load_tokenizer(tokenizer_path or (str(folders["text_encoder"]) if folders else None))
    text_encoder = T5TextEncoder(tokenizer, t5.eval(), model_max_length=transformer.config.model_max_length)
    label = "random" if weights == "random" else ", ".join(str(f) for f in folders.values())
    return OpenSoraPipeline(tokenizer, text_encoder, transformer.eval(), vae.eval(), make_scheduler(), label, preset)


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype

