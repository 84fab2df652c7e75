"""Activation-range calibration shared by the method plug-ins (``real``, ``ptq``, ``zeroq``, ``intraq``,
``hast``, ``gdfq``): kept out of any one method's module so that editing a method reruns that method's cells
only (each method's code version is the import closure of its own module, ``zsqpipe/codehash.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from zsqpipe.quant import set_quant_state
from zsqpipe.zsq.bnstats import BNStatistics
from zsqpipe.zsq.generators import GDFQGenerator, gdfq_generator_step
from zsqpipe.zsq.warmup import WarmupRecord, WarmupRecorder, check_init_rng

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


@dataclass(frozen=True)
class CalibrationGenerator:
    """The settings of the IntraQ/HAST calibration generator (``zsqpipe.warmups``' ``calib`` spec, less its kind)."""

    steps: int
    batch_size: int
    lr: float = 1e-3
    latent_dim: int = 100
    bns_weight: float = 0.1


def calibration_generator_run(
    teacher, num_classes: int, input_shape: tuple[int, ...], gen: CalibrationGenerator, seed: int, device,
    recorder: WarmupRecorder | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:  # fmt: skip
    """The IntraQ/HAST official calibration generator (``main_direct.py`` epochs 0-3): a GDFQ generator (initial
    weights from the global RNG) trained on the teacher alone for ``gen.steps`` steps of ``gen.batch_size``,
    L_G = CE(T(G(z, y)), y) + ``gen.bns_weight`` * BNS (Adam ``gen.lr``, betas (0.5, 0.999)). Yields each step's
    detached batch, its labels and L_G; the generator sees no student. ``recorder``: notes the RNG state around
    the generator's construction (generator_warmup job)."""
    with recorder.generator_init() if recorder is not None else contextlib.nullcontext():
        generator = GDFQGenerator(num_classes, tuple(input_shape), gen.latent_dim).to(device)
    generator.train()
    opt = torch.optim.Adam(generator.parameters(), lr=gen.lr, betas=(0.5, 0.999))
    rng = torch.Generator().manual_seed(seed)
    bn_stats = BNStatistics(teacher)
    try:
        for _ in range(gen.steps):
            yield gdfq_generator_step(generator, teacher, bn_stats, opt, gen.batch_size, rng, device, gen.bns_weight)
    finally:
        bn_stats.remove()


def _replay(warmup: WarmupRecord, steps: int, device, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """The recorded calibration batches, with the global RNG moved on as building the generator would (a record
    of another seed, ``adopt_rng`` False: the cell's global RNG is left as it is)."""
    if warmup.adopt_rng:
        check_init_rng(warmup, name)
        torch.set_rng_state(warmup.after_init_rng)
    for i in range(steps):
        yield warmup.batch(i, device)


def calibrate_with_generator(
    student, teacher, num_classes: int, input_shape: tuple[int, ...], gen: CalibrationGenerator, seed: int, device,
    log=print, name: str = "calibration", warmup: WarmupRecord | None = None,
) -> float:  # fmt: skip
    """Calibrate the activation ranges on the batches of :func:`calibration_generator_run`: the quantized
    student, in eval mode, forwards each batch with range updates on (no student step); then the ranges are
    frozen and the generator discarded. ``warmup``: the same run recorded by the ``generator_warmup`` job,
    replayed instead of trained here (same ranges). Returns the mean L_G over the steps."""
    steps, batch_size = gen.steps, gen.batch_size
    warn_short_official_calibration(student, steps, log)
    if warmup is not None and (warmup.steps, warmup.images.shape[1]) != (steps, batch_size):
        raise ValueError(f"{name}: the warm-up has {warmup.steps} batches of {warmup.images.shape[1]}, "
                         f"the calibration needs {steps} of {batch_size}")  # fmt: skip
    if warmup is None:
        run = calibration_generator_run(teacher, num_classes, input_shape, gen, seed, device)
    else:
        run = _replay(warmup, steps, device, name)
    student.eval()
    set_quant_state(student, enabled=True, update_ranges=True)
    total = 0.0
    try:
        for x, _, loss in run:
            total += loss
            with torch.no_grad():
                student(x.contiguous(memory_format=torch.channels_last))
    finally:
        set_quant_state(student, update_ranges=False)
    mean_loss = total / max(steps, 1)
    source = "generator" if warmup is None else "recorded generator"
    log(f"{name}: calibrated activation ranges on {steps} {source} batches of {batch_size} "
        f"(mean L_G {mean_loss:.4f}); generator discarded")  # fmt: skip
    return mean_loss
