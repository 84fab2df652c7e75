"""Benchmark: training-step time of QAT techniques vs plain QAT (W4A4 fake quantization).

Variants, same model (ResNet-20, 1x28x28, channels_last), batch and process, SGD momentum 0.9:
- ``qat``: the default quantizers (``minmax_channel`` weights, ``ema_minmax`` activations, ranges frozen);
- ``lsq``: LSQ weights (per channel) and activations (learned steps, zsqpipe/quant/quantizers.py);
- ``lsq+talr``: LSQ with transition-rate scheduling (zsqpipe/quant/talr.py, per-layer TALR);
- ``qat+g4``: ``qat`` with 4-bit LBT gradient quantization and adaptive intervals (zsqpipe/gradquant.py).
Prints the median step times and their ratios to ``qat``.

    python benchmarks/bench_qat_techniques.py [--batch 128] [--iters 20] [--threads 2] [--device auto]
"""

from __future__ import annotations

import copy
import statistics

import torch
from _timing import parse_bench_args, sgd_step, step_times

from zsqpipe.gradquant import GradQuantConfig, enable_grad_quant
from zsqpipe.models import create_model
from zsqpipe.quant import QuantConfig, quantize_model, set_quant_state
from zsqpipe.quant.talr import TALR, TALRConfig, talr_param_groups

LR = 1e-3


def main() -> None:
    def extra(ap):
        ap.add_argument("--arch", default="resnet20")
        ap.add_argument("--grad-bits", type=int, default=4)

    args, dev = parse_bench_args(__doc__, batch=128, iters=20, warmup=3, threads=2, extra=extra)
    fp = create_model(args.arch, num_classes=10, in_channels=1, image_size=28).to(dev)
    fp = fp.to(memory_format=torch.channels_last).eval()
    x = torch.randn(args.batch, 1, 28, 28, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    b = args.bits

    def quantized(wq: str, aq: str):
        q = quantize_model(copy.deepcopy(fp), QuantConfig(b, b, weight_quantizer=wq, act_quantizer=aq))
        q = q.to(dev, memory_format=torch.channels_last)
        set_quant_state(q, update_ranges=True)
        with torch.no_grad():
            q(x)
        set_quant_state(q, update_ranges=False)
        return q

    qat = quantized("minmax_channel", "ema_minmax")
    lsq = quantized("lsq", "lsq")
    lsq_t = quantized("lsq", "lsq")
    qat_g = quantized("minmax_channel", "ema_minmax")
    talr_opt = torch.optim.SGD(talr_param_groups(lsq_t, "layer"), lr=LR, momentum=0.9)
    talr = TALR(talr_opt, lsq_t, total_steps=10**6, cfg=TALRConfig())
    gq = enable_grad_quant(qat_g, GradQuantConfig(bits=args.grad_bits))

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)

    steps = {
        "qat": sgd_step(qat, x, y, sgd(qat)),
        "lsq": sgd_step(lsq, x, y, sgd(lsq)),
        "lsq+talr": sgd_step(lsq_t, x, y, talr),
        f"qat+g{args.grad_bits}": sgd_step(qat_g, x, y, sgd(qat_g), after=gq.update_intervals),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(2):  # interleave to share machine noise fairly
        for k, step in steps.items():
            times[k] += step_times(step, args.iters // 2, args.warmup, dev)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={dev} threads={args.threads} arch={args.arch} batch={args.batch} W{b}A{b}")
    for k, m in med.items():
        print(
            f"{k:10s} step: {m * 1e3:8.1f} ms (median of {len(times[k])})   ratio vs qat: {m / med['qat']:.3f}"
        )


if __name__ == "__main__":
    main()
