"""What notebook ``03_quality_baseline`` runs: the trained mini model's prompt adherence (training and held-out
combinations), the checks of the metric itself (ground truth, the VAE's own ceiling), the controls that must
fail, example clips, and the fidelity metrics' noise floor on the mini and the real-size model, stored as
records."""
from __future__ import annotations

import pandas as pd
import torch

from utils.measure.results import ResultsStore
from utils.model.pipeline import OpenSoraPipeline, VideoSetting
from utils.testbed import minimodel, synthetic
from utils.testbed.adherence import adherence, adherence_summary
from utils.testbed.noise_floor import noise_floor


def _summaries(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.DataFrame({name: adherence_summary(table) for name, table in tables.items()}).T


def metric_checks(store: ResultsStore, pipe: OpenSoraPipeline, config: dict, ground_truth_seeds: int) -> pd.DataFrame:
    """The detector on rendered clips of every combination (it must read them all) and on the same clips
    through the VAE (the best a generated clip can score); stored, returns the summaries."""
    clips, truth = synthetic.make_dataset(synthetic.ALL_COMBINATIONS, ground_truth_seeds, seed=10_000)
    checks = {"ground truth": adherence(clips, truth),
              "VAE round trip": adherence(minimodel.vae_round_trip(pipe.vae, clips), truth)}
    for variant, table in checks.items():
        store.add(*minimodel.adherence_records(variant, "all", table, config))
    return _summaries(checks)


def adherence_by_split(store: ResultsStore, pipe: OpenSoraPipeline, config: dict, seeds: list[int], steps: int,
                       cfg_scale: float) -> pd.DataFrame:
    """The fp32 mini model's adherence on the training and the held-out combinations; stored."""
    tables = {split: minimodel.evaluate_adherence(pipe, split, seeds, steps, cfg_scale) for split in minimodel.SPLITS}
    for split, table in tables.items():
        store.add(*minimodel.adherence_records("fp32", split, table, config))
    return _summaries(tables)


def controls(store: ResultsStore, pipe: OpenSoraPipeline, config: dict, seed: int, steps: int,
             cfg_scale: float) -> pd.DataFrame:
    """Adherence without guidance (CFG 1: what guidance adds), unconditional (CFG 0) and with the
    transformer's weights scrambled (both must fall to chance); stored."""
    tables = {"no guidance (cfg 1)": minimodel.evaluate_adherence(pipe, "train", [seed], steps, cfg_scale=1.0),
              "unconditional (cfg 0)": minimodel.evaluate_adherence(pipe, "train", [seed], steps, cfg_scale=0.0)}
    saved = minimodel.scramble_weights(pipe.transformer)
    tables["scrambled transformer"] = minimodel.evaluate_adherence(pipe, "train", [seed], steps, cfg_scale)
    minimodel.restore(pipe.transformer, saved)
    for variant, table in tables.items():
        store.add(*minimodel.adherence_records(variant, "train", table, config))
    return _summaries(tables)


def examples(pipe: OpenSoraPipeline, captions: list[str], seed: int, steps: int,
             cfg_scale: float) -> tuple[torch.Tensor, list[bool]]:
    """Generated clips of ``captions`` and whether each caption's combination was held out of training."""
    combinations = [synthetic.Attributes.parse(caption) for caption in captions]
    video, _ = minimodel.generate(pipe, combinations, seed=seed, steps=steps, cfg_scale=cfg_scale)
    return video, [a in synthetic.HELD_OUT for a in combinations]


def noise_floors(store: ResultsStore, runs: dict[str, tuple[OpenSoraPipeline, list[str], VideoSetting, dict]],
                 threads: int, perturbations: list[float]) -> pd.DataFrame:
    """The fidelity metrics between runs that apply nothing lossy (``testbed.noise_floor``), per model:
    ``runs`` maps a model's name to its pipeline, prompts, setting and record config; stored."""
    floors = {}
    for name, (pipe, prompts, setting, config) in runs.items():
        floors[name] = noise_floor(pipe, prompts, setting, threads, tuple(perturbations))
        store.add(*minimodel.fidelity_records(floors[name], config))
    return pd.concat(floors, names=["model"])
