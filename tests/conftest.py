import json

import pytest
from safetensors.torch import load_file

from utils.paths import UPSTREAM


@pytest.fixture(scope="session")
def stdit3_reference():
    """(tensors, json) of the upstream tiny-STDiT3 fixture."""
    return (load_file(UPSTREAM / "stdit3_tiny_reference.safetensors"),
            json.loads((UPSTREAM / "stdit3_tiny_reference.json").read_text()))


def prefixed(tensors: dict, prefix: str) -> dict:
    """The entries of ``tensors`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
