import json

import pytest
import torch
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


@pytest.fixture(scope="module")
def one_thread():
    """For tests on tiny tensors: a second thread only adds synchronisation, which on a busy machine
    costs more than the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
