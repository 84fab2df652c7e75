"""Which settings determine a method's generator warm-up; importable without torch (the Snakefile reads it).

GDFQ and Qimera train their generator on the FP teacher alone during their warm-up epochs, and HAST and IntraQ
calibrate activation ranges on the batches of a GDFQ generator trained on the teacher alone (the official
calibration epochs). In neither case does the generator see the student: its batches and its final state
depend on the FP model, the seed and the settings named here, not on the bit width. The workflow therefore
trains it once per (FP model, settings, seed) in a ``generator_warmup`` job (``zsqpipe/stages/warmup.py``) and
every cell that needs it replays the recorded batches through its own student (``zsqpipe/zsq/warmup.py``),
which gives the same student as training the generator inside the cell (tests/test_warmup.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from zsqpipe.config import canonical_json

# GeneratorQAT (GDFQ, Qimera): the warm-up's generator steps, batch and lr schedule (the generator's cosine
# schedule spans warm-up and fine-tuning steps, so epochs and iters_per_epoch shape it too)
_GENERATOR_QAT = ("epochs", "warmup_epochs", "warmup_iters", "iters_per_epoch", "batch_size", "schedule",
                  "milestones", "lr_g", "g_beta1", "g_beta2", "bns_weight")  # fmt: skip
GENERATOR_QAT_FIELDS: dict[str, tuple[str, ...]] = {
    "gdfq": (*_GENERATOR_QAT, "latent_dim"),
    "qimera": (*_GENERATOR_QAT, "mix_prob", "mix_k", "noise_scale", "random_embedding", "freeze_embedding",
               "disentanglement", "dm_dim"),  # fmt: skip
}
# Range calibration on a GDFQ generator (zsqpipe.zsq.calibration): spec key -> the method's config field
CALIBRATION_FIELDS: dict[str, dict[str, str]] = {
    "hast": {"steps": "calib_iters", "batch_size": "calib_batch_size", "lr": "generator_lr",
             "latent_dim": "generator_latent_dim", "bns_weight": "generator_bns_weight"},  # fmt: skip
    "intraq": {"steps": "generator_steps", "batch_size": "generator_batch_size", "lr": "generator_lr",
               "latent_dim": "generator_latent_dim", "bns_weight": "bns_weight"},  # fmt: skip
}
WARMUP_KINDS = ("calib", *GENERATOR_QAT_FIELDS)


def warmup_spec(method: str, cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The settings that determine ``method``'s generator warm-up under config ``cfg`` (complete, defaults
    filled), as plain JSON values; None if the method (or this config of it) trains no generator on the
    teacher alone. ``kind`` names the procedure: ``calib`` (a GDFQ generator for range calibration, shared by
    HAST and IntraQ), ``gdfq``, ``qimera`` (the method's warm-up epochs)."""
    if method in CALIBRATION_FIELDS:
        if cfg.get("calibration", "generator") != "generator":  # intraq `calibration: shards`
            return None
        return {"kind": "calib", **{key: _plain(cfg[field]) for key, field in CALIBRATION_FIELDS[method].items()}}
    if method in GENERATOR_QAT_FIELDS:
        return {"kind": method, **{field: _plain(cfg[field]) for field in GENERATOR_QAT_FIELDS[method]}}
    return None


def warmup_steps(spec: Mapping[str, Any]) -> int:
    """Generator steps (= recorded batches) of a warm-up."""
    if spec["kind"] == "calib":
        return int(spec["steps"])
    return int(spec["warmup_epochs"]) * int(spec["warmup_iters"] or spec["iters_per_epoch"])


def record_mb(spec: Mapping[str, Any], input_shape: tuple[int, ...]) -> float:
    """Size of a warm-up's recorded batches (float32 images) in MiB."""
    return warmup_steps(spec) * int(spec["batch_size"]) * math.prod(input_shape) * 4 / 2**20


def warmup_tag(spec: Mapping[str, Any]) -> str:
    """``<kind>@<8 hex>``: the folder name of a warm-up (equal specs share one)."""
    return f"{spec['kind']}@{hashlib.sha256(canonical_json(dict(spec)).encode()).hexdigest()[:8]}"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
