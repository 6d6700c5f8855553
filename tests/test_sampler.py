"""Rectified-flow timesteps against upstream's, for fp32 and for bf16 model arguments."""
import json

import pytest
import torch

from utils.model.sampler import make_scheduler, rflow_sample, rflow_timesteps, set_rflow_timesteps
from utils.paths import UPSTREAM

TABLE = json.loads((UPSTREAM / "opensora_v1_2_rflow_timesteps.json").read_text())


@pytest.mark.parametrize("dtype,key", [(torch.float32, "timesteps"), (torch.bfloat16, "timesteps_bf16_model_args")])
@pytest.mark.parametrize("setting", list(TABLE["sizes"]))
def test_timesteps_equal_upstream(setting, dtype, key):
    height, width, frames = (torch.tensor([v], dtype=dtype) for v in TABLE["sizes"][setting])
    ours = rflow_timesteps(30, height, width, frames)
    assert torch.equal(ours, torch.tensor(TABLE[key][setting], dtype=torch.float32))


def test_scheduler_carries_the_exact_timesteps():
    height, width, frames = (torch.tensor([v], dtype=torch.float32) for v in TABLE["sizes"]["240p_9:16_51f"])
    scheduler = make_scheduler()
    set_rflow_timesteps(scheduler, rflow_timesteps(30, height, width, frames))
    assert torch.equal(scheduler.timesteps, torch.tensor(TABLE["timesteps"]["240p_9:16_51f"]))
    assert scheduler.sigmas[-1] == 0 and len(scheduler.sigmas) == 31


def test_euler_update_is_upstreams():
    """With a constant velocity v, upstream's z + v * sum(dt) lands at z + v (t runs from 1000 to 0)."""
    z = torch.randn(1, 4, 2, 4, 4)
    v = torch.randn(1, 4, 2, 4, 4)

    def model(z_in, t, **kwargs):
        return torch.cat([v, v]).repeat(1, 2, 1, 1, 1)  # both CFG halves, plus the dropped sigma half

    args = {k: torch.tensor([x]) for k, x in dict(height=144.0, width=256.0, num_frames=51.0, fps=24.0).items()}
    y = torch.zeros(1, 1, 2, 8)
    out = rflow_sample(model, make_scheduler(), z, y, y, None, args, num_steps=5, progress=False)
    assert out.dtype == torch.float32
    assert torch.allclose(out, z + v, atol=1e-5)
