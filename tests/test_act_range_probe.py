"""scripts/act_range_probe.py: the MSE clip it reports (docs/budget.md "Session 22")."""

import importlib.util
from pathlib import Path

import torch

SPEC = importlib.util.spec_from_file_location(
    "act_range_probe", Path(__file__).resolve().parent.parent / "scripts" / "act_range_probe.py"
)
probe = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(probe)


def test_mse_clip_keeps_the_max_of_a_uniform_tensor_and_clips_a_heavy_tail():
    uniform = torch.linspace(0, 1, 10_001)
    assert probe.mse_clip(uniform, bits=3) > 0.9  # no outliers: clipping only adds error
    gen = torch.Generator().manual_seed(0)
    tail = torch.cat([torch.rand(100_000, generator=gen), torch.tensor([20.0])])
    clip = probe.mse_clip(tail, bits=3)
    assert clip < 2.0  # one outlier at 20 must not set the 3-bit step
    step = clip / 7
    err = ((torch.clamp(torch.round(tail / step), 0, 7) * step - tail) ** 2).mean()
    naive = ((torch.round(tail / (20 / 7)) * (20 / 7) - tail) ** 2).mean()
    assert err < naive
