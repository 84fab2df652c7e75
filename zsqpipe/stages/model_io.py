"""Rebuild FP or quantized models from the checkpoints the stages write."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from zsqpipe.errors import IntegrityError
from zsqpipe.io import load_checkpoint
from zsqpipe.models import create_model
from zsqpipe.quant import QuantConfig, quantize_model

REQUIRED_KEYS = ("arch", "num_classes", "in_channels", "image_size", "state_dict")


def model_from_checkpoint(path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """Rebuild an FP or quantized model saved by ``fp-model``/``quantize`` (arch + state dict + quant config)."""
    ckpt = load_checkpoint(path)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise IntegrityError(
            f"{path}: not a zsqpipe model checkpoint: no {missing[0]!r}; expected the model.pt/fp.pt of "
            "`zsqpipe fp-model` or `zsqpipe quantize`"
        )
    model = create_model(
        ckpt["arch"],
        num_classes=ckpt["num_classes"],
        in_channels=ckpt["in_channels"],
        image_size=ckpt["image_size"],
    )
    if ckpt.get("quant") is not None:
        quantize_model(model, QuantConfig.from_dict(ckpt["quant"]))
    load_state_checked(model, ckpt["state_dict"], path, repr(ckpt["arch"]))
    return model.to(device).eval(), ckpt


def load_state_checked(model: nn.Module, state: dict, path: str | Path, target: str) -> None:
    """``model.load_state_dict(state)``; a mismatch is one IntegrityError line naming ``path`` and ``target``
    (torch's message lists every missing/unexpected key on a line of its own: the first two are kept)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise IntegrityError(f"{path}: weights do not fit {target}: {' '.join(lines[:2])}{more}") from e


def checkpoint_of_kind(path: str | Path, kind: str, what: str) -> dict:
    """The checkpoint at ``path``, which must carry ``kind`` (``what`` names the stage that writes it)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != kind:
        raise IntegrityError(f"{path}: not {what} (kind {ckpt.get('kind')!r}, expected {kind!r})")
    return ckpt
