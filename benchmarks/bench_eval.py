"""Benchmark: evaluation throughput of a fake-quantized model vs the same FP model (plain PyTorch eval).

The cost every quantize cell pays after each epoch (validation + test sets). Same ResNet-20 (1x28x28, random
weights), channels_last, `torch.inference_mode`, batch --batch; the fake-quant model is W{bits}A{bits} with
calibrated ranges (min-max weights, EMA activations: the default quantizers). Prints img/s of both and the
ratio fake-quant / FP (1.0 = no overhead).

    python benchmarks/bench_eval.py [--threads 1] [--batch 1000] [--bits 4] [--device auto]
"""

from __future__ import annotations

import copy

import torch
from _timing import parse_bench_args, step_times

from zsqpipe.models import create_model
from zsqpipe.quant import QuantConfig, quantize_model, set_quant_state


def main() -> None:
    args, dev = parse_bench_args(__doc__, batch=1000, iters=5, warmup=1, threads=1)
    fp = create_model("resnet20", num_classes=10, in_channels=1, image_size=28).to(dev).eval()
    fp = fp.to(memory_format=torch.channels_last)
    fq = quantize_model(copy.deepcopy(fp), QuantConfig(weight_bits=args.bits, act_bits=args.bits))
    x = torch.randn(args.batch, 1, 28, 28, device=dev).contiguous(memory_format=torch.channels_last)
    set_quant_state(fq, enabled=True, update_ranges=True)
    with torch.no_grad():
        fq(x)
    set_quant_state(fq, update_ranges=False)
    fq = fq.to(dev, memory_format=torch.channels_last).eval()

    def rate(model) -> float:
        with torch.inference_mode():
            times = step_times(lambda _i: model(x), args.iters, args.warmup, dev)
        return args.batch / sorted(times)[len(times) // 2]

    r_fp, r_fq = rate(fp), rate(fq)
    print(f"eval ResNet-20 batch {args.batch}, {torch.get_num_threads()} thread(s), {dev}: FP {r_fp:.0f} img/s, "
          f"W{args.bits}A{args.bits} fake-quant {r_fq:.0f} img/s, ratio {r_fq / r_fp:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
