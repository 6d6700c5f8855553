"""The quality testbed's model: OpenSora 1.2's classes at small sizes, trained here on synthetic clips.

No pretrained OpenSora weights can be downloaded where this study is developed, so lossy optimisations
are judged on a model that does follow its prompts: the ``mini`` presets of ``stdit3``, ``vae`` and
``text_encoder`` (the same classes as the real pipeline), trained by ``utils.testbed.training`` on the clips of
``utils.testbed.synthetic`` and stored in ``data/mini-model/<component>/`` in the official file layouts, so
``load_pipeline("mini", weights="trained-mini")`` loads them with the same strict key checks.

The text encoder is a small T5 with its own word-level vocabulary of the captions (built with the
``tokenizers`` library); it is left at its random initialisation and frozen, as upstream freezes T5.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from utils.measure.results import Record, make_config
from utils.model.captions import append_score_to_prompts, text_preprocessing
from utils.model.pipeline import AESTHETIC_SCORE, VideoSetting
from utils.model.stdit3 import STDIT3_PRESETS
from utils.model.text_encoder import EOS_TOKEN, PAD_TOKEN, T5_PRESETS, UNK_TOKEN
from utils.model.weights import TRAINED_MINI, weights_id
from utils.testbed import synthetic
from utils.testbed.adherence import adherence, adherence_summary
from utils.testbed.noise_floor import restore_weights

SPLITS = {"train": synthetic.TRAIN, "held_out": synthetic.HELD_OUT}


def mini_setting(steps: int = 30, cfg_scale: float = 7.0, seed: int = 0) -> VideoSetting:
    """The testbed's clip: 17 frames of 64x64 (5 x 8 x 8 latents, 80 tokens). Not in upstream's aspect
    tables, so built directly; the sampler's resolution/length shift applies to it as to any setting."""
    return VideoSetting(resolution=f"{synthetic.SIZE}px", aspect_ratio="1:1", num_frames=synthetic.NUM_FRAMES,
                        height=synthetic.SIZE, width=synthetic.SIZE, steps=steps, cfg_scale=cfg_scale, seed=seed)


# ---------------------------------------------------------------------------------------------
# tokenizer: one token per word of the captions, as encode_prompt presents them
# ---------------------------------------------------------------------------------------------
def caption_corpus() -> list[str]:
    """Every caption of the testbed after upstream's score suffix and cleaning (what the tokenizer sees)."""
    captions = [a.caption for a in synthetic.ALL_COMBINATIONS]
    return [text_preprocessing(c) for c in append_score_to_prompts(captions, aes=AESTHETIC_SCORE)]


def build_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """A word-level vocabulary of the caption corpus with T5's special ids (pad 0, EOS 1, unk 2) and
    T5's EOS-appending post-processor; saved to ``out_dir`` (tokenizer.json + config)."""
    splitter = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = sorted({piece for line in caption_corpus() for piece, _span in splitter.pre_tokenize_str(line)})
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2} | {w: i + 3 for i, w in enumerate(words)}
    if len(vocab) > T5_PRESETS["mini"]["vocab_size"]:
        raise ValueError(f"{len(vocab)} words do not fit the mini T5's {T5_PRESETS['mini']['vocab_size']} embeddings")
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = splitter
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, vocab[EOS_TOKEN])])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                      unk_token=UNK_TOKEN, model_max_length=STDIT3_PRESETS["mini"].model_max_length)
    wrapped.save_pretrained(out_dir)
    wrapped.is_standin = False
    return wrapped


# ---------------------------------------------------------------------------------------------
# evaluation: generate every caption of a split and read the attributes back from the pixels
# ---------------------------------------------------------------------------------------------
def split_combinations(split: str) -> tuple[synthetic.Attributes, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    return SPLITS[split]


@torch.inference_mode()
def generate(pipe, combinations, seed: int, steps: int = 30, cfg_scale: float = 7.0,
             progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded clips [n, 3, 17, 64, 64] in [-1, 1] and final latents for the captions of ``combinations``
    (one batch; the noise of each clip comes from ``seed``)."""
    setting = mini_setting(steps=steps, cfg_scale=cfg_scale, seed=seed)
    prompts = [a.caption for a in combinations]
    y, mask = pipe.encode_prompt(prompts)
    z = pipe.prepare_latents(len(prompts), setting)
    z = pipe.denoise(z, y, mask, setting, progress=progress)
    return pipe.decode(z, setting), z


def evaluate_adherence(pipe, split: str = "train", seeds=(0, 1), steps: int = 30, cfg_scale: float = 7.0,
                       progress: bool = True) -> pd.DataFrame:
    """Adherence table (``testbed.adherence.adherence``) of every caption of ``split`` once per seed, with a
    ``seed`` and a ``split`` column."""
    combinations = split_combinations(split)
    tables = []
    for seed in tqdm(list(seeds), desc=f"adherence {split}", unit="seed", disable=not progress):
        video, _ = generate(pipe, combinations, seed, steps, cfg_scale)
        tables.append(adherence(video, list(combinations)).assign(seed=seed, split=split))
    return pd.concat(tables, ignore_index=True)


@torch.inference_mode()
def vae_round_trip(vae, clips: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Clips [N, 3, F, H, W] through the VAE (posterior means) and back: the best a generated clip can look."""
    frames = clips.shape[2]
    return torch.cat([vae.decode(vae.encode(chunk.to(vae.dtype), sample=False), num_frames=frames).float()
                      for chunk in tqdm(clips.split(batch), desc="VAE round trip", unit="batch")])


@torch.no_grad()
def scramble_weights(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Shuffle the elements of every floating-point parameter in place (same values, no learned
    structure: a control that must lose adherence); returns the originals for ``restore``."""
    generator = torch.Generator().manual_seed(seed)
    saved = {}
    for name, param in module.named_parameters():
        if param.is_floating_point():
            saved[name] = param.detach().clone()
            flat = param.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=generator)])
    return saved


restore = restore_weights


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------
def quality_config(model: str, weights: str, steps: int, threads: int, setting: VideoSetting | None = None,
                   dtype: str = "fp32") -> dict:
    setting = setting or mini_setting(steps=steps)
    mini = {"mini_weights": weights_id()} if weights == TRAINED_MINI else {}
    return make_config(model=model, weights=weights, resolution=setting.resolution, aspect_ratio=setting.aspect_ratio,
                       frames=setting.num_frames, steps=steps, dtype=dtype, threads=threads, **mini)


# adherence_summary's keys -> record metrics
ADHERENCE_METRICS = {"shape_accuracy": "adherence_shape", "colour_accuracy": "adherence_colour",
                     "motion_accuracy": "adherence_motion", "all_correct": "adherence_all_correct",
                     "found": "adherence_found"}


def adherence_records(variant: str, split: str, table: pd.DataFrame, config: dict) -> list[Record]:
    """One record per attribute (and all-correct) of an adherence table, as fractions of its clips."""
    summary = adherence_summary(table)
    n = int(summary.pop("n"))
    return [Record(variant=variant, stage="adherence", metric=ADHERENCE_METRICS[name], unit="fraction", value=value,
                   spread={"n": n}, config=dict(config, split=split),
                   note=f"{n} clips: {table['caption'].nunique()} captions x {n // max(table['caption'].nunique(), 1)} "
                        "seeds or clips each")
            for name, value in summary.items()]


FIDELITY_UNITS = {"psnr": "dB", "ssim": "", "latent_relative_l2": "", "latent_cosine": "", "flicker_ratio": "",
                  "max_abs_diff": ""}


def fidelity_records(floor: pd.DataFrame, config: dict, stage: str = "noise_floor") -> list[Record]:
    """Records of a fidelity table (one row per run, a ``run`` column); an infinite PSNR (identical
    frames) is not stored, ``max_abs_diff`` = 0 says it."""
    records = []
    for row in floor.to_dict("records"):
        for metric, unit in FIDELITY_UNITS.items():
            value = row.get(metric)
            if value is None or not pd.notna(value) or value == float("inf"):
                continue
            records.append(Record(variant=row["run"], stage=stage, metric=metric, unit=unit, value=float(value),
                                  spread={"n": 1}, config=config, note="against the reference fp32 run"))
    return records
