"""Probe the activation ranges of saved quantized cells (docs/budget.md "Session 22").

Loads ``results/quant/<dataset>/<arch>/<method>/<bits>/seed<N>/model.pt`` from a working directory and tests
each cell on the whole test set (weights unchanged) with

- its own ranges;
- ``--swap-from METHOD:SEED``: the ranges of another cell, all of them and only the first activation's;
- ``--mse``: each activation range clipped to the x_max that minimises the quantization MSE of its
  (post-ReLU) inputs on the first ``--calib-images`` *training* images (real data: for ``ptq`` that is its
  own calibration data; for a zero-shot cell it is an upper bound, not a data-free method).

    python scripts/act_range_probe.py WORKDIR ptq:0 qimera:1 --swap-from qimera:0 --mse
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from zsqpipe.engine import evaluate, setup_runtime
from zsqpipe.quant import QuantAct, fake_quant_per_tensor
from zsqpipe.stages.common import EVAL_BATCH, eval_loader
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.model_io import model_from_checkpoint

CPU = torch.device("cpu")


def load_cell(root: Path, method: str, seed: int, bits: str) -> torch.nn.Module:
    model, _ = model_from_checkpoint(root / method / bits / f"seed{seed}" / "model.pt", CPU)
    return model.to(memory_format=torch.channels_last).eval()  # as the evaluate stage


def act_quantizers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The activation quantizers (of the ``QuantAct`` modules), by state-dict prefix, in forward order."""
    return {f"{n}.quantizer": m.quantizer for n, m in model.named_modules() if isinstance(m, QuantAct)}


def ranges(model: torch.nn.Module, only_first: bool = False) -> dict[str, torch.Tensor]:
    names = list(act_quantizers(model))[: 1 if only_first else None]
    sd = model.state_dict()
    return {f"{n}.{b}": sd[f"{n}.{b}"].clone() for n in names for b in ("x_min", "x_max")}


def with_ranges(model: torch.nn.Module, new: dict[str, torch.Tensor], loader) -> float:
    """Test top-1 of ``model`` with ``new`` ranges; restores its own afterwards."""
    own = {k: v.clone() for k, v in model.state_dict().items() if k in new}
    model.load_state_dict({**model.state_dict(), **new})
    top1 = evaluate(model, loader)["top1"]
    model.load_state_dict({**model.state_dict(), **own})
    return top1


def mse_clip(v: torch.Tensor, bits: int, grid: int = 100) -> float:
    """argmin_c E[(Q_c(v) - v)^2] over c in (0.05..1) * max(v), Q_c: unsigned uniform, 2^bits levels on [0, c]."""
    zero = torch.zeros(())
    errors = [
        (float(((fake_quant_per_tensor(v, zero, c, bits) - v) ** 2).mean()), float(c))
        for c in torch.linspace(0.05, 1.0, grid) * v.max()
    ]
    return min(errors)[1]


def mse_ranges(model: torch.nn.Module, x: torch.Tensor, bits: int, max_values: int = 200_000) -> dict:
    inputs, hooks = {}, []
    for name, q in act_quantizers(model).items():
        hooks.append(q.register_forward_pre_hook(lambda _m, i, n=name: inputs.__setitem__(n, i[0].detach())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, v in inputs.items():
        if float(v.min()) < 0:
            raise ValueError(f"{name}: inputs are signed; the MSE probe handles post-ReLU (unsigned) ranges only")
        v = v.flatten()
        v = v[torch.randperm(len(v), generator=gen)[:max_values]]
        out[f"{name}.x_min"] = torch.zeros(())
        out[f"{name}.x_max"] = torch.tensor(mse_clip(v, bits))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("cells", nargs="+", help="METHOD:SEED")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--bits", default="w3a3")
    ap.add_argument("--swap-from", help="METHOD:SEED whose ranges to try")
    ap.add_argument("--mse", action="store_true")
    ap.add_argument("--calib-images", type=int, default=512)
    args = ap.parse_args()
    setup_runtime(1, 0)
    root = args.workdir / "results" / "quant" / args.dataset / args.arch
    data = load_prepared(args.workdir / "results" / "data" / args.dataset / "manifest.json")
    loader = eval_loader(data.test, data.info, EVAL_BATCH, CPU)
    act_bits = int(args.bits.split("a")[1])
    x_cal = None
    if args.mse:
        cal = data.train.subset(torch.arange(args.calib_images))
        x_cal = next(iter(eval_loader(cal, data.info, args.calib_images, CPU)))[0]
    donor = None
    if args.swap_from:
        m, s = args.swap_from.split(":")
        donor = load_cell(root, m, int(s), args.bits)
    for cell in args.cells:
        method, seed = cell.split(":")
        model = load_cell(root, method, int(seed), args.bits)
        own, first_keys = ranges(model), list(ranges(model, only_first=True))
        first = first_keys[-1]  # its x_max
        parts = [f"{cell}: own {evaluate(model, loader)['top1']:.2f} (first x_max {float(own[first]):.2f})"]
        if donor is not None:
            parts.append(f"{args.swap_from}'s ranges {with_ranges(model, ranges(donor), loader):.2f}")
            parts.append(f"only its first {with_ranges(model, ranges(donor, True), loader):.2f}")
        if x_cal is not None:
            clips = mse_ranges(model, x_cal, act_bits)
            ratio = [float(clips[k] / own[k]) for k in clips if k.endswith("x_max")]
            first_only = {k: clips[k] for k in first_keys}
            parts.append(f"MSE first range ({float(clips[first]):.2f}) {with_ranges(model, first_only, loader):.2f}")
            parts.append(
                f"MSE all {with_ranges(model, clips, loader):.2f} (clip/own median {statistics.median(ratio):.2f})"
            )
        print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
