"""Benchmark: one fake-quantized (W4A4) training step vs one FP training step.

Same model (ResNet-20, 1x28x28, channels_last), same batch, same process, same optimizer; quantizers are
calibrated and ranges frozen, as during fine-tuning. Prints the median step times and their ratio.

    python benchmarks/bench_qat_step.py [--batch 128] [--iters 20] [--threads 2] [--device auto]
"""

from __future__ import annotations

import copy
import statistics

import torch
from _timing import parse_bench_args, sgd_step, step_times

from zsqpipe.models import create_model
from zsqpipe.quant import QuantConfig, quantize_model, set_quant_state


def main() -> None:
    args, dev = parse_bench_args(__doc__, batch=128, iters=20, warmup=3, threads=2,
                                 extra=lambda ap: ap.add_argument("--arch", default="resnet20"))  # fmt: skip
    fp = create_model(args.arch, num_classes=10, in_channels=1, image_size=28).to(dev)
    fp = fp.to(memory_format=torch.channels_last).eval()
    q = quantize_model(copy.deepcopy(fp), QuantConfig(weight_bits=args.bits, act_bits=args.bits))
    x = torch.randn(args.batch, 1, 28, 28, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    set_quant_state(q, update_ranges=True)
    with torch.no_grad():
        q(x)
    set_quant_state(q, update_ranges=False)

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    # interleave to share machine noise fairly (one optimizer per model and round, as before)
    t_fp, t_q = [], []
    for _ in range(2):
        t_fp += step_times(sgd_step(fp, x, y, sgd(fp)), args.iters // 2, args.warmup, dev)
        t_q += step_times(sgd_step(q, x, y, sgd(q)), args.iters // 2, args.warmup, dev)
    m_fp, m_q = statistics.median(t_fp), statistics.median(t_q)
    print(f"device={dev} threads={args.threads} arch={args.arch} batch={args.batch} W{args.bits}A{args.bits}")
    print(f"FP step:        {m_fp * 1e3:8.1f} ms (median of {len(t_fp)})")
    print(f"fake-quant step:{m_q * 1e3:8.1f} ms (median of {len(t_q)})")
    print(f"ratio (quant / FP): {m_q / m_fp:.3f}")


if __name__ == "__main__":
    main()
