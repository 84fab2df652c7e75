"""Activation-range calibration shared by the method plug-ins (``real``, ``ptq``, ``zeroq``, ``intraq``,
``hast``, ``gdfq``): kept out of any one method's module so that editing a method reruns that method's cells
only (each method's code version is the import closure of its own module, ``zsqpipe/codehash.py``)."""

from __future__ import annotations

import torch

from zsqpipe.quant import set_quant_state

OFFICIAL_EMA_MIN_STEPS = 200


def warn_short_official_calibration(student, steps: int, log=print) -> None:
    """Warn when ``quant.ema_mode=official`` gets fewer calibration steps than its range update needs."""
    if steps < OFFICIAL_EMA_MIN_STEPS and any(
        getattr(m, "ema_mode", None) == "official" for m in student.modules()
    ):
        log(
            f"warning: quant.ema_mode=official with {steps} calibration steps: the official range update "
            f"inflates ranges for its first ~150 steps (docs/quantization.md); use >= {OFFICIAL_EMA_MIN_STEPS}"
        )


def calibrate(student, batches, calib_batches: int, log=print) -> None:
    """Run ``calib_batches`` batches through ``student`` with range updates on, then freeze the ranges."""
    warn_short_official_calibration(student, calib_batches, log)
    set_quant_state(student, enabled=True, update_ranges=True)
    with torch.no_grad():
        for _ in range(calib_batches):
            x, _ = next(batches)
            student(x)
    set_quant_state(student, update_ranges=False)
