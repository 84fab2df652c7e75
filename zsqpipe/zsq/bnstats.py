"""Batch-normalisation statistics losses used by data-free synthesis.

``BNStatistics`` hooks every ``BatchNorm2d`` of a (frozen) teacher and records the statistics of its *input*
for the current forward pass:

- batch statistics (GDFQ/IntraQ/HAST): mean and biased variance over (N, H, W) per channel; the loss is
  (1/L) sum_l [MSE(mu_l, mu_l^BN) + MSE(var_l, var_l^BN)]  (GDFQ Eq. 6 as implemented in ``trainer.py``);
- per-sample statistics (ZeroQ ``distill_data.py``): per image mean and std over (H, W); the loss is
  sum_l mean_b [||mu_lb - mu_l^BN||^2 + ||sigma_lb - sigma_l^BN||^2].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BNStatistics:
    """Forward hooks on every BatchNorm2d of ``model``; call :meth:`remove` when done."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError("BNStatistics: the model has no BatchNorm2d layer")
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(_module, inp, _out):
            self.inputs[i] = inp[0]

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def batch_loss(self) -> torch.Tensor:
        """(1/L) sum_l MSE(batch mean, running mean) + MSE(biased batch var, running var)."""
        total = 0.0
        for bn, x in zip(self.layers, self.inputs, strict=True):
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            total = total + F.mse_loss(mean, bn.running_mean) + F.mse_loss(var, bn.running_var)
        return total / len(self.layers)

    def per_sample_loss(self) -> torch.Tensor:
        """ZeroQ: sum_l mean_b (||mu_b - mu^BN||^2 + ||sigma_b - sigma^BN||^2) with per-image statistics."""
        total = 0.0
        for bn, x in zip(self.layers, self.inputs, strict=True):
            mean = x.mean(dim=(2, 3))
            std = x.var(dim=(2, 3), unbiased=False).add(bn.eps).sqrt()
            target_std = bn.running_var.add(bn.eps).sqrt()
            total = (
                total
                + ((mean - bn.running_mean) ** 2).sum(1).mean()
                + ((std - target_std) ** 2).sum(1).mean()
            )
        return total
