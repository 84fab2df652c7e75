"""OQAT supernet checkpoints: write (``oqat-train``) and load (``oqat-train --inherit-from``, ``oqat-search``)."""

from __future__ import annotations

from pathlib import Path

import torch

from zsqpipe.io import save_checkpoint
from zsqpipe.nas.oqat import OQATTrainConfig, build_oqat_supernet
from zsqpipe.nas.supernet201 import NB201Supernet
from zsqpipe.stages.model_io import checkpoint_of_kind, load_state_checked

KIND = "oqat_supernet"


def save_oqat_supernet(path: Path, model: NB201Supernet, cfg: OQATTrainConfig, info, extra: dict) -> None:
    save_checkpoint(
        path,
        {
            "kind": KIND,
            "dataset": info.name,
            "in_channels": info.in_channels,
            "num_classes": info.num_classes,
            "image_size": info.image_size,
            "bits": int(model.oqat_bits),
            "config": cfg.to_dict(),
            **extra,
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        },
    )


def load_oqat_supernet(path: Path, device: torch.device | str = "cpu") -> tuple[NB201Supernet, dict]:
    """The supernet of an ``oqat-train`` checkpoint (on ``device``) and the checkpoint's metadata."""
    ckpt = checkpoint_of_kind(path, KIND, "an oqat-train checkpoint")
    cfg = OQATTrainConfig.from_dict(ckpt["config"], f"{path}: config")
    model = build_oqat_supernet(cfg, ckpt["in_channels"], ckpt["num_classes"], ckpt["bits"])
    load_state_checked(model, ckpt.pop("state_dict"), path, "the OQAT supernet of its config")
    return model.to(device), ckpt
