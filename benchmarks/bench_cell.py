"""Benchmark: one quantize cell (``run_quantize``, in process) vs a plain PyTorch loop doing the same work.

The stage's cost beyond the arithmetic: data loading and hashing, the harness (resume checkpoints after each
epoch, history, probe check, atomic publish), the method plug-in's structure. The plain loop, written here
from torch and the same model pieces (the FP ResNet-20, ``quantize_model``'s fake-quant layers, the GDFQ
generator), does the same optimiser steps on the same batch sizes and the same evaluations (validation 5,000 +
test 10,000 images after every epoch, batch 1000), with none of the harness. Both run in this process, one
after the other, with the same thread count; start-up (imports, MLflow) is ``bench_startup.py``'s.

Methods: ``real`` (8 calibration batches + 2 x 20 KD steps of batch 128), ``hast`` (200 generator calibration
steps of batch 16, 2 x 20 steps of batch 64 on RandomResizedCrop + flip batches, with feature alignment and the
FGSM copy) and ``gdfq`` (3 x 20
generator steps of batch 64, the last 2 epochs with a student step): the default config's budgets. ``fp``
compares ``run_fp_model`` (the default recipe capped at 2 x 100 steps of batch 128: validation after each
epoch, test once) with the same SGD + one-cycle loop (the workflow runs it with ``--threads 2``).

    python benchmarks/bench_cell.py [--workdir /tmp/zsqpipe-bench-cell] [--methods real hast gdfq fp] [--reps 2]

The first run prepares the inputs in --workdir: the data split of the default config, an FP ResNet-20
(trained for 50 steps: its accuracy does not change the cost) and the HAST samples (256 images, 100 steps).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zsqpipe.job import Job

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from zsqpipe.config import DataConfig, FPConfig  # noqa: E402
from zsqpipe.engine import kd_kl  # noqa: E402
from zsqpipe.methods import get_method  # noqa: E402
from zsqpipe.quant import QuantConfig, quantize_model, set_quant_state  # noqa: E402

BITS = 4
EVAL_BATCH = 1000


def prepare(wd: Path) -> dict[str, Path]:
    """The default data split, a short-trained FP model and HAST samples (made once per workdir)."""
    from zsqpipe.stages.data import prepare_data
    from zsqpipe.stages.fp_model import run_fp_model
    from zsqpipe.stages.synthesize import run_synthesize

    paths = {"data": wd / "data/manifest.json", "fp": wd / "fp.pt", "samples": wd / "samples_hast"}
    if not paths["data"].is_file():
        paths["data"].parent.mkdir(parents=True, exist_ok=True)
        data_dir = "/usr/share/datasets/fashion-mnist" if not Path("data").exists() else "data"
        prepare_data("fashion_mnist", DataConfig(data_dir=data_dir), paths["data"])
    if not paths["fp"].is_file():
        cfg = FPConfig(epochs=1, max_steps_per_epoch=50)
        run_fp_model(paths["data"], "resnet20", cfg, paths["fp"], wd / "fp_metrics.json",
                     Job.quiet(device="cpu", threads=2))  # fmt: skip
    if not (paths["samples"] / "manifest.json").is_file():
        run_synthesize(paths["fp"], "hast", {"num_samples": 256, "iters": 100}, 0, paths["samples"], Job.quiet(device="cpu", threads=2))
    return paths


# ---------------------------------------------------------------------------------------- the stage


FP_STEPS = 100  # fp: 2 epochs x 100 SGD steps of batch 128 (the default recipe, capped), validation per epoch


def stage_seconds(method: str, paths: dict[str, Path], threads: int, out: Path) -> float:
    from zsqpipe.stages.fp_model import run_fp_model
    from zsqpipe.stages.quantize import run_quantize

    if method == "fp":
        t0 = time.perf_counter()
        run_fp_model(paths["data"], "resnet20", FPConfig(max_steps_per_epoch=FP_STEPS), out / "fp.pt",
                     out / "fp_metrics.json", Job.quiet(device="cpu", threads=threads, resume_root=out / "resume"))  # fmt: skip
        return time.perf_counter() - t0

    qcfg = QuantConfig(weight_bits=BITS, act_bits=BITS)
    samples = paths["samples"] if get_method(method).synthesizer else None
    t0 = time.perf_counter()
    run_quantize(paths["fp"], paths["data"], method, {}, qcfg, 0, out / "model.pt", out / "history.json",
                 samples=samples, job=Job.quiet(device="cpu", threads=threads, resume_root=out / "resume"))  # fmt: skip
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ plain PyTorch


class Plain:
    """The inputs of a plain loop: models, normalised tensors, and the per-epoch evaluation."""

    def __init__(self, paths: dict[str, Path]):
        from zsqpipe.models import create_model
        from zsqpipe.stages.data import load_prepared

        data = load_prepared(paths["data"], verify=False)
        ckpt = torch.load(paths["fp"], map_location="cpu", weights_only=True)
        self.teacher = create_model("resnet20", num_classes=10, in_channels=1, image_size=28)
        self.teacher.load_state_dict(ckpt["state_dict"])
        self.teacher.eval().requires_grad_(False)
        self.student = quantize_model(
            copy.deepcopy(self.teacher), QuantConfig(weight_bits=BITS, act_bits=BITS)
        )
        self.student.requires_grad_(True)
        self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.student = self.student.to(memory_format=torch.channels_last)
        mean = torch.tensor(data.info.mean).view(1, -1, 1, 1)
        std = torch.tensor(data.info.std).view(1, -1, 1, 1)
        self.norm = lambda u8: ((u8.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
        self.train_images, self.train_labels = data.train.images, data.train.labels
        self.evals = [(data.val.images, data.val.labels), (data.test.images, data.test.labels)]
        self.samples = paths["samples"]

    def train_batches(self, batch: int):
        order = torch.randperm(len(self.train_labels))
        for b in range(len(order) // batch):
            idx = order[b * batch : (b + 1) * batch]
            yield self.norm(self.train_images[idx]), self.train_labels[idx]

    def end_epoch(self) -> list[float]:
        return self.evaluate(self.evals)

    @torch.inference_mode()
    def evaluate(self, sets) -> list[float]:
        self.student.eval()
        accs = []
        for images, labels in sets:
            correct = 0
            for i in range(0, len(labels), EVAL_BATCH):
                correct += int((self.student(self.norm(images[i : i + EVAL_BATCH])).argmax(1)
                                == labels[i : i + EVAL_BATCH]).sum())  # fmt: skip
            accs.append(100 * correct / len(labels))
        return accs


def sgd(params, lr, steps):
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)


def plain_real(p: Plain) -> None:
    c = get_method("real").Config()
    batches = p.train_batches(c.batch_size)
    set_quant_state(p.student, enabled=True, update_ranges=True)
    with torch.no_grad():
        for _ in range(c.calib_batches):
            p.student(next(batches)[0])
    set_quant_state(p.student, update_ranges=False)
    opt, sched = sgd(p.student.parameters(), c.lr, c.epochs * c.iters_per_epoch)
    for _ in range(c.epochs):
        p.student.eval()
        for _ in range(c.iters_per_epoch):
            x, y = next(batches)
            with torch.no_grad():
                t = p.teacher(x)
            s = p.student(x)
            loss = F.cross_entropy(s, y) + kd_kl(s, t, c.kd_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        p.end_epoch()


def bn_hooks(model):
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    inputs: list = [None] * len(bns)
    for i, m in enumerate(bns):
        m.register_forward_hook(lambda _m, inp, _o, i=i: inputs.__setitem__(i, inp[0]))

    def loss():
        return sum(F.mse_loss(x.mean((0, 2, 3)), bn.running_mean)
                   + F.mse_loss(x.var((0, 2, 3), unbiased=False), bn.running_var)
                   for bn, x in zip(bns, inputs, strict=True)) / len(bns)  # fmt: skip

    return loss


def generator_step(gen, teacher, bn_loss, opt, batch):
    z, y = torch.randn(batch, gen.latent_dim), torch.randint(0, 10, (batch,))
    x = gen(z, y)
    loss = F.cross_entropy(teacher(x), y) + 0.1 * bn_loss()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return x.detach().contiguous(memory_format=torch.channels_last), y


def plain_gdfq(p: Plain) -> None:
    from zsqpipe.zsq.generators import GDFQGenerator

    c = get_method("gdfq").Config()
    gen = GDFQGenerator(10, (1, 28, 28), c.latent_dim).train()
    opt_g = torch.optim.Adam(gen.parameters(), lr=c.lr_g, betas=(0.5, 0.999))
    sched_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, c.epochs * c.iters_per_epoch)
    opt, sched = sgd(p.student.parameters(), c.lr, (c.epochs - c.warmup_epochs) * c.iters_per_epoch)
    bn_loss = bn_hooks(p.teacher)
    for epoch in range(c.epochs):
        warm = epoch < c.warmup_epochs
        set_quant_state(p.student, update_ranges=warm)
        p.student.eval()
        for _ in range(c.iters_per_epoch):
            x, y = generator_step(gen, p.teacher, bn_loss, opt_g, c.batch_size)
            sched_g.step()
            with torch.no_grad():
                t = p.teacher(x)
            with torch.set_grad_enabled(not warm):
                s = p.student(x)
                loss = (
                    F.kl_div(F.log_softmax(s / 20, 1), F.softmax(t / 20, 1), reduction="sum")
                    / s.numel()
                    * 400
                )
                loss = loss + F.cross_entropy(s, y)
            if not warm:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        set_quant_state(p.student, update_ranges=False)
        p.end_epoch()


def plain_hast(p: Plain) -> None:
    import pyarrow.parquet as pq

    from zsqpipe.io import read_json
    from zsqpipe.methods.hast import attention_loss, feature_points
    from zsqpipe.zsq.augment import random_resized_crop_flip
    from zsqpipe.zsq.generators import GDFQGenerator

    c = get_method("hast").Config()
    gen = GDFQGenerator(10, (1, 28, 28), c.generator_latent_dim).train()
    opt_g = torch.optim.Adam(gen.parameters(), lr=c.generator_lr, betas=(0.5, 0.999))
    bn_loss = bn_hooks(p.teacher)
    set_quant_state(p.student, enabled=True, update_ranges=True)
    p.student.eval()
    for _ in range(c.calib_iters):
        x, _ = generator_step(gen, p.teacher, bn_loss, opt_g, c.calib_batch_size)
        with torch.no_grad():
            p.student(x)
    set_quant_state(p.student, update_ranges=False)
    manifest = read_json(p.samples / "manifest.json")
    tables = [pq.read_table(p.samples / e["file"]) for e in manifest["shards"]]
    images = torch.cat([torch.from_numpy(t.column("image").combine_chunks().flatten().to_numpy().copy())
                        for t in tables]).view(-1, *manifest["shape"])  # fmt: skip
    labels = torch.cat([torch.from_numpy(t.column("label").to_numpy().copy()) for t in tables])
    names = feature_points(p.teacher)
    feats = {"s": [None] * len(names), "t": [None] * len(names)}  # overwritten each forward, as the stage's
    for key, model in (("s", p.student), ("t", p.teacher)):
        mods = dict(model.named_modules())
        for i, n in enumerate(names):
            mods[n].register_forward_hook(lambda _m, _i, out, key=key, i=i: feats[key].__setitem__(i, out))

    def fwd(model, key, x):
        out = model(x)
        return out, list(feats[key])

    def loss_s(s, fs, t, ft):
        return c.kd_alpha * kd_kl(s, t, c.kd_temperature) + c.fa_weight * attention_loss(fs, ft)

    gen_aug = torch.Generator().manual_seed(0)
    opt, sched = sgd(p.student.parameters(), c.lr, c.epochs * c.iters_per_epoch)
    for _ in range(c.epochs):
        for _ in range(c.iters_per_epoch):
            idx = torch.randperm(len(labels))[: c.batch_size]
            x = random_resized_crop_flip(images[idx], (c.aug_margin, 1.0), gen_aug)
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            x.requires_grad_(True)
            s, fs = fwd(p.student, "s", x)
            (g,) = torch.autograd.grad(1 - F.softmax(s, 1).gather(1, y[:, None]).mean(), x, retain_graph=True)
            x_adv = (x + c.fgsm_eps * g.sign()).detach()
            with torch.no_grad():
                t, ft = fwd(p.teacher, "t", x)
                t_adv, ft_adv = fwd(p.teacher, "t", x_adv)
            s_adv, fs_adv = fwd(p.student, "s", x_adv)
            loss = loss_s(s, fs, t, ft) + loss_s(s_adv, fs_adv, t_adv, ft_adv)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        p.end_epoch()


def plain_fp(p: Plain) -> None:
    """The FP recipe: SGD (nesterov) + one-cycle LR, label smoothing, validation after each epoch, test once."""
    from zsqpipe.models import create_model

    c = FPConfig(max_steps_per_epoch=FP_STEPS)
    model = create_model("resnet20", num_classes=10, in_channels=1, image_size=28)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, nesterov=True,
                          weight_decay=c.weight_decay)  # fmt: skip
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=c.epochs * FP_STEPS,
                                                pct_start=c.warmup_frac, cycle_momentum=False)  # fmt: skip
    p.student = model
    for _ in range(c.epochs):
        model.train()
        for _, (x, y) in zip(range(FP_STEPS), p.train_batches(c.batch_size), strict=False):
            loss = F.cross_entropy(model(x), y, label_smoothing=c.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        p.evaluate(p.evals[:1])
    p.evaluate(p.evals[1:])


PLAIN = {"real": plain_real, "hast": plain_hast, "gdfq": plain_gdfq, "fp": plain_fp}


def plain_seconds(method: str, paths: dict[str, Path], threads: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    PLAIN[method](Plain(paths))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsqpipe-bench-cell"))
    ap.add_argument("--methods", nargs="+", default=list(PLAIN), choices=list(PLAIN))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    paths = prepare(Path(args.workdir))
    print(f"W{BITS}A{BITS} ResNet-20, Fashion-MNIST, {args.threads} thread(s), median of {args.reps} runs, "
          "stage in process (no start-up)")  # fmt: skip
    print(f"{'method':<8} {'stage s':>9} {'plain s':>9} {'stage/plain':>12}")
    for method in args.methods:
        stage, plain = [], []
        for _ in range(args.reps):  # interleaved, so drifting machine load hits both alike
            with tempfile.TemporaryDirectory() as tmp:
                stage.append(stage_seconds(method, paths, args.threads, Path(tmp)))
            plain.append(plain_seconds(method, paths, args.threads))
        s, q = statistics.median(stage), statistics.median(plain)
        print(f"{method:<8} {s:9.1f} {q:9.1f} {s / q:12.2f}", flush=True)


if __name__ == "__main__":
    main()
