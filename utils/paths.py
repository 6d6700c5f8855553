"""Where the repository keeps its inputs and outputs (one place, so notebooks and tests agree)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DATA = REPO / "data"

UPSTREAM = DATA / "upstream"  # tables, manifests and tiny reference tensors taken from upstream v1.2

PROMPTS = DATA / "prompts" / "opensora_samples.txt"

BUILD = REPO / "build"

FIGURES = REPO / "figures"

REPORT = REPO / "report"
