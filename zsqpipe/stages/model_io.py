"""Rebuild FP or quantized models from the checkpoints the stages write."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from zsqpipe.io import load_checkpoint
from zsqpipe.models import create_model
from zsqpipe.quant import QuantConfig, quantize_model


def model_from_checkpoint(path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """Rebuild an FP or quantized model saved by ``fp-model``/``quantize`` (arch + state dict + quant config)."""
    ckpt = load_checkpoint(path)
    model = create_model(
        ckpt["arch"],
        num_classes=ckpt["num_classes"],
        in_channels=ckpt["in_channels"],
        image_size=ckpt["image_size"],
    )
    if ckpt.get("quant") is not None:
        quantize_model(model, QuantConfig.from_dict(ckpt["quant"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt
