"""Resumable training (zsqpipe/resume.py): a stage interrupted after an epoch and rerun ends with exactly the
result of an uninterrupted run; streams restore their position; stale, corrupt or unresumable states restart
from scratch. The kill -9 through Snakemake is tests/test_workflow.py::test_killed_job_resumes (slow)."""

from pathlib import Path

import pytest
import torch
from conftest import hidden_debian_data, prepare_fp_and_shards, same_state

from zsqpipe.config import FPConfig
from zsqpipe.data.datasets import ImageData, dataset_info
from zsqpipe.data.loaders import BatchLoader, EndlessBatches
from zsqpipe.data.shards import ShardSet
from zsqpipe.engine import infinite
from zsqpipe.job import Job
from zsqpipe.quant import QuantConfig
from zsqpipe.resume import Checkpoints, ResumeState, job_dir
from zsqpipe.stages.fp_model import run_fp_model
from zsqpipe.stages.quantize import run_quantize
from zsqpipe.zsq.augment import random_resized_crop_flip
from zsqpipe.zsq.finetune import SyntheticBatches

FP = {"epochs": 3, "max_steps_per_epoch": 2, "batch_size": 32, "lr": 0.05, "eval_batch_size": 64}
METHODS = {  # 3 epochs each, a handful of steps (config/smoke.yaml-sized and below)
    "real": {"epochs": 3, "iters_per_epoch": 2, "batch_size": 32, "calib_batches": 2, "talr": {},
             "grad_quant": {"bits": 4}},
    "gdfq": {"epochs": 3, "warmup_epochs": 1, "iters_per_epoch": 2, "batch_size": 16},
    "qimera": {"epochs": 3, "warmup_epochs": 1, "iters_per_epoch": 2, "batch_size": 16},
    "zaq": {"epochs": 3, "iters_per_epoch": 2, "q_steps": 2, "batch_size": 16, "nz": 32},
    "hast": {"epochs": 3, "iters_per_epoch": 2, "batch_size": 16, "calib_iters": 2, "calib_batch_size": 8},
    "zeroq": {"epochs": 3, "iters_per_epoch": 2, "batch_size": 16, "calib_batches": 1},
    "intraq": {"epochs": 3, "iters_per_epoch": 2, "batch_size": 16, "calib_batches": 1},
}  # fmt: skip
FAST = ("real", "gdfq")  # the others run with -m slow (same code path: ctx.resumable + a stream/generator)


class Killed(Exception):
    """Stands in for SIGKILL right after a checkpoint was written."""


def run_interrupted(run, after_epoch: int):
    """``run()`` with the process 'killed' right after the checkpoint of ``after_epoch`` is written."""
    original = Checkpoints.save

    def save(self, epoch):
        original(self, epoch)
        if epoch == after_epoch:
            raise Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpoints, "save", save)
        with pytest.raises(Killed):
            run()


def without_times(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def assert_supernet_resume_exact(run, tmp_path: Path) -> tuple[dict, dict]:
    """A supernet stage (``run(out_dir, resume_root, log)`` writing ``supernet.pt``, ``history.json`` and
    ``metrics.json``) killed after epoch 1 of 3 and rerun: resumed from epoch 2, the same history and a
    bit-identical checkpoint as an uninterrupted run, checkpoints cleaned. Returns (reference, resumed) metrics."""
    from zsqpipe.io import load_checkpoint, read_json

    logs: list[str] = []
    ref = run(tmp_path / "ref", None)
    root = tmp_path / ".resume"
    run_interrupted(lambda: run(tmp_path / "out", root), after_epoch=1)
    assert len(list(root.rglob("state.pt"))) == 1 and not (tmp_path / "out" / "metrics.json").exists()
    res = run(tmp_path / "out", root, logs.append)
    assert res["resumed_from_epoch"] == 2 and ref["resumed_from_epoch"] is None
    assert any("resumed from epoch 2" in m for m in logs), logs
    h_ref = read_json(tmp_path / "ref" / "history.json")["history"]
    h_res = read_json(tmp_path / "out" / "history.json")["history"]
    assert without_times(h_res) == without_times(h_ref) and [r["epoch"] for r in h_res] == [0, 1, 2]
    a = load_checkpoint(tmp_path / "ref" / "supernet.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "out" / "supernet.pt")["state_dict"]
    assert same_state(a, b)
    assert not root.exists()  # cleaned once the outputs are written
    return ref, res


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Data manifest, FP model and synthetic shards on the tiny Fashion-MNIST fixture."""
    tmp = tmp_path_factory.mktemp("resume")
    with hidden_debian_data(tmp):
        prepare_fp_and_shards(tmp, FP, "test")
        yield tmp


# ------------------------------------------------------------------------------------------ stage results


@pytest.mark.parametrize(
    "method", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
)
def test_quantize_resumed_after_a_kill_equals_an_uninterrupted_run(prepared, tmp_path, method):
    logs = []

    def run(out, resume_root, log=lambda _m: None):
        samples = prepared / "samples" if method in ("hast", "zeroq", "intraq") else None
        return run_quantize(prepared / "fp.pt", prepared / "manifest.json", method, METHODS[method],
                            QuantConfig(weight_bits=4, act_bits=4), 0, out / "model.pt", out / "history.json",
                            samples=samples, job=Job("cpu", 1, log=log, resume_root=resume_root))  # fmt: skip

    ref = run(tmp_path / "ref", None)  # no resume: writes no checkpoint either
    root = tmp_path / ".resume"
    run_interrupted(lambda: run(tmp_path / "out", root), after_epoch=1)
    assert not (tmp_path / "out" / "model.pt").exists()  # Snakemake would delete it anyway
    assert len(list(root.rglob("state.pt"))) == 1
    res = run(tmp_path / "out", root, logs.append)
    assert any("resumed from epoch 2" in m for m in logs), logs
    assert res["resumed_from_epoch"] == 2 and ref["resumed_from_epoch"] is None
    assert without_times(res["history"]) == without_times(ref["history"])
    assert [r["epoch"] for r in res["history"]] == [0, 1, 2]
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "out" / "model.pt", weights_only=True)["state_dict"]
    assert same_state(a, b)
    assert not root.exists()  # cleaned once the outputs are written
    assert not list(tmp_path.rglob(".tmp-*"))


def test_fp_model_resumed_after_a_kill_equals_an_uninterrupted_run(prepared, tmp_path):
    cfg, logs = FPConfig(**FP), []

    def run(out, resume_root, log=lambda _m: None):
        return run_fp_model(prepared / "manifest.json", "resnet20", cfg, out / "fp.pt", out / "fp.json",
                            Job("cpu", 1, log=log, resume_root=resume_root))  # fmt: skip

    ref = run(tmp_path / "ref", None)
    run_interrupted(lambda: run(tmp_path / "out", tmp_path / ".resume"), after_epoch=1)
    res = run(tmp_path / "out", tmp_path / ".resume", logs.append)
    assert res["resumed_from_epoch"] == 2 and any("resumed from epoch 2" in m for m in logs)
    assert without_times(res["history"]) == without_times(ref["history"])
    assert (res["test_top1"], res["val_top1"]) == (ref["test_top1"], ref["val_top1"])
    # where it ran is recorded (bit-identical models hold on one machine type, not across CPU kernel sets)
    assert res["runtime"]["threads"] == 1 and res["runtime"]["cpu_capability"] and res["runtime"]["torch"]
    a = torch.load(tmp_path / "ref" / "fp.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "out" / "fp.pt", weights_only=True)["state_dict"]
    assert same_state(a, b)
    assert not (tmp_path / ".resume").exists()


def test_changed_config_never_resumes_a_stale_state(prepared, tmp_path):
    cfg, logs = {**METHODS["real"], "epochs": 2, "iters_per_epoch": 1, "talr": None, "grad_quant": None}, []
    root = tmp_path / ".resume"

    def run(c, log=lambda _m: None):
        return run_quantize(prepared / "fp.pt", prepared / "manifest.json", "real", c, QuantConfig(4, 4), 0,
                            tmp_path / "model.pt", tmp_path / "history.json",
                            job=Job("cpu", 1, log=log, resume_root=root))  # fmt: skip

    run_interrupted(lambda: run(cfg), after_epoch=0)
    res = run({**cfg, "lr": 0.001}, logs.append)
    assert res["resumed_from_epoch"] is None
    assert any("ignoring checkpoints of another config" in m for m in logs), logs
    assert not root.exists()  # the stale state goes too, once the outputs exist


# ---------------------------------------------------------------------------------------- resume module


def test_job_dir_mirrors_the_output_path(tmp_path):
    root = tmp_path / "results" / ".resume"
    out = tmp_path / "results" / "quant" / "x" / "model.pt"
    assert job_dir(root, out) == root / "quant" / "x" / "model.pt"
    assert job_dir(root, Path("/elsewhere/model.pt")) == root / "abs" / "elsewhere" / "model.pt"


def test_checkpoint_roundtrip_restores_objects_and_rng(tmp_path):
    import random

    import numpy as np

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, torch.Generator().manual_seed(1)

    def step(model, opt, gen):
        loss = model(torch.randn(4, 3, generator=gen)).pow(2).sum() + torch.rand(()) + random.random()
        loss = loss + float(np.random.rand())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    state = ResumeState.for_job(tmp_path / ".resume", tmp_path / "out.pt", {"k": 1})
    model, opt, gen = make()
    ck = Checkpoints(state)
    assert ck.attach(model=model, optimizer=opt, rng=gen) == 0
    step(model, opt, gen)
    ck.save(0)
    expected = [step(model, opt, gen) for _ in range(3)]
    model2, opt2, gen2 = make()
    ck2 = Checkpoints(state, log=lambda _m: None)
    assert ck2.attach(model=model2, optimizer=opt2, rng=gen2) == 1
    assert [step(model2, opt2, gen2) for _ in range(3)] == expected
    assert (state.directory / "key.json").is_file()
    ck2.clear()
    assert not (tmp_path / ".resume").exists()


def test_unresumable_loop_writes_no_checkpoint(tmp_path):
    logs = []
    state = ResumeState.for_job(tmp_path / ".resume", tmp_path / "out.pt", {"k": 1}, logs.append)
    ck = Checkpoints(state, log=logs.append)
    assert ck.attach(model=torch.nn.Linear(2, 2), batches=iter([1, 2, 3])) == 0
    ck.save(0)
    assert not (tmp_path / ".resume").exists()
    assert any("resume: off: batches" in m for m in logs)


def test_corrupt_checkpoint_starts_from_scratch(tmp_path):
    logs = []
    state = ResumeState.for_job(tmp_path / ".resume", tmp_path / "out.pt", {"k": 1}, logs.append)
    state.path.parent.mkdir(parents=True)
    state.path.write_bytes(b"not a checkpoint")
    assert Checkpoints(state, log=logs.append).attach(model=torch.nn.Linear(2, 2)) == 0
    assert any("starting from scratch" in m for m in logs)


def test_disabled_state_does_nothing(tmp_path):
    ck = Checkpoints(ResumeState.for_job(None, tmp_path / "out.pt", {}))
    assert ck.attach(model=torch.nn.Linear(2, 2)) == 0
    ck.save(0)
    ck.clear()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ streams


def batches_equal(xs, ys) -> bool:
    if len(xs) != len(ys):
        return False
    return all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(xs, ys, strict=True))


def take(it, n):
    return [next(it) for _ in range(n)]


def test_endless_batches_equal_infinite_and_restore_mid_pass():
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 255, (50, 1, 28, 28), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (50,), generator=g), [], Path("."))  # fmt: skip

    def loader():
        return BatchLoader(
            data, dataset_info("fashion_mnist"), 8, shuffle=True, augment=True, drop_last=True, seed=3
        )

    reference = take(infinite(loader()), 20)  # 6 batches a pass: 3+ passes
    stream = EndlessBatches(loader())
    assert batches_equal(take(stream, 20), reference)
    stream = EndlessBatches(loader())
    head = take(stream, 9)  # mid-pass
    state = stream.state_dict()
    restored = EndlessBatches(loader())
    restored.load_state_dict(state)
    assert batches_equal(head + take(restored, 11), reference)


def old_synthetic_batches(shards, batch_size, seed, augment=True):
    """The generator SyntheticBatches replaced (kept here to prove the batches did not change)."""
    from zsqpipe.data.loaders import random_crop_flip

    gen = torch.Generator().manual_seed(seed)
    pad = max(2, shards.shape[-1] // 8)
    epoch = 0
    while True:
        for x, y in shards.iter_batches(batch_size, seed=seed + epoch):
            if len(y) < batch_size:
                continue
            if augment:
                x = random_crop_flip(x, pad, True, gen)
            yield x.contiguous(memory_format=torch.channels_last), y
        epoch += 1


def test_synthetic_streams_unchanged_and_restore_mid_shard(prepared):
    from zsqpipe.methods.base import QuantContext
    from zsqpipe.zsq.finetune import ShardStream

    shards = ShardSet.open(prepared / "samples" / "manifest.json")
    reference = take(old_synthetic_batches(shards, 16, 5), 20)  # 2 + 2 + 1 batches a pass: 4 passes
    assert batches_equal(take(SyntheticBatches(shards, 16, 5, "cpu"), 20), reference)
    for k in (0, 1, 3, 5, 7):  # at a pass start, mid-shard, at shard and pass boundaries
        stream = SyntheticBatches(shards, 16, 5, "cpu")
        head = take(stream, k)
        restored = SyntheticBatches(shards, 16, 5, "cpu")
        restored.load_state_dict(stream.state_dict())
        assert batches_equal(head + take(restored, 20 - k), reference), k

    ctx = QuantContext(None, None, torch.device("cpu"), 0, 10, (1, 28, 28), None, None, samples=shards)
    gen = torch.Generator().manual_seed(5)
    rrc = [(random_resized_crop_flip(x, (0.5, 1.0), gen).contiguous(memory_format=torch.channels_last), y)
           for x, y in take(old_synthetic_batches(shards, 16, 5, augment=False), 12)]  # fmt: skip
    stream = ShardStream(ctx, 16, 5, "rrc", 0.5)
    head = take(stream, 4)
    restored = ShardStream(ctx, 16, 5, "rrc", 0.5)
    restored.load_state_dict(stream.state_dict())
    assert batches_equal(head + take(restored, 8), rrc)
