"""Faults and bad input (issue 6, item 4): damaged shards, checkpoints and dataset files, a full disk, an MLflow
server that dies mid-run and invalid config values. Each case checks (a) one clear error line naming the file or
key and what was expected (CLI: ``zsqpipe <cmd>: error: ...``, exit status 1, no traceback), (b) no half-written
output (no final file, no ``.tmp-*`` file) and (c) that nothing already finished is lost.

Covered elsewhere and not repeated here: the shard reader on truncated/flipped/missing shards
(test_shards.py::test_corruption_is_detected), a truncated IDX payload through the loader
(test_data.py::test_truncated_idx_detected), an unreadable resume checkpoint in ``ResumeState``
(test_resume.py::test_corrupt_checkpoint_starts_from_scratch; the stage-level truncation is here), a truncated
fp.pt given to quantize (test_cli.py::test_corrupt_checkpoint_is_reported; here also evaluate and the one-line
form) and the config cases of test_config.py (unknown keys, bits patterns, enums, ``snakemake -n``).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import hidden_debian_data, prepare_fp_and_shards

from zsqpipe.cli import cli
from zsqpipe.config import FPConfig, validate_config
from zsqpipe.errors import ConfigError, IntegrityError, OutputError
from zsqpipe.io import atomic_path, sha256_file
from zsqpipe.job import Job
from zsqpipe.quant import QuantConfig
from zsqpipe.resume import Checkpoints
from zsqpipe.stages.fp_model import run_fp_model
from zsqpipe.stages.quantize import run_quantize

# Hang guards, not timings: only a stage stuck (e.g. in MLflow HTTP retries) reaches them, never a busy machine.
HANG_GUARD_S = 300
REPO = Path(__file__).resolve().parent.parent
FP = {"epochs": 2, "max_steps_per_epoch": 2, "batch_size": 32, "lr": 0.05, "eval_batch_size": 64}
REAL = {"epochs": 2, "iters_per_epoch": 2, "batch_size": 32, "calib_batches": 2}
PTQ = {"calib_images": 64, "batch_size": 32}
ZEROQ = {"epochs": 2, "iters_per_epoch": 5, "batch_size": 8, "calib_batches": 1}  # >= 1 shard per epoch
CELL = {"dataset": "fashion_mnist", "arch": "resnet20", "method": "ptq", "weight_bits": 4, "act_bits": 4, "seed": 0}
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Data manifest, FP model, synthetic shards (40, 40, 20 rows) and a finished ptq cell."""
    tmp = tmp_path_factory.mktemp("faults")
    with hidden_debian_data(tmp):
        prepare_fp_and_shards(tmp, FP, "zeroq")
        cell = tmp / "cells" / "ptq"
        run_quantize(tmp / "fp.pt", tmp / "manifest.json", "ptq", PTQ, QuantConfig(weight_bits=4, act_bits=4), 0,
                     cell / "model.pt", cell / "history.json", job=Job.quiet(device="cpu", threads=1))  # fmt: skip
        yield tmp


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(r, cmd: str, *needles: str) -> str:
    """The CLI failed cleanly: exit 1, exactly one ``zsqpipe <cmd>: error:`` line containing ``needles``."""
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # no traceback
    assert "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith(f"zsqpipe {cmd}: error:")]
    assert len(lines) == 1, r.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".tmp-*")] if folder.exists() else []


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder`` (to show finished outputs are untouched)."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def quantize_args(p: Path, out: Path, method="ptq", params=PTQ, *extra):
    return ["quantize", "--fp", p / "fp.pt", "--data", p / "manifest.json", "--method", method, "--weight-bits", 4,
            "--act-bits", 4, "--method-params", json.dumps(params), "--out-model", out / "model.pt",
            "--out-history", out / "history.json", "--device", "cpu", "--threads", 1, *extra]  # fmt: skip


def assert_no_outputs(out: Path, *names: str) -> None:
    for name in names:
        assert not (out / name).exists(), name
    assert temp_files(out) == []


# ------------------------------------------------------------------------------ 1. damaged sample shards


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_quantize_refuses_damaged_shard_before_training(prepared, tmp_path, damage):
    samples = tmp_path / "samples"
    samples.mkdir()
    for f in (prepared / "samples").iterdir():
        (samples / f.name).write_bytes(f.read_bytes())
    shard = samples / "shard-00002.parquet"
    raw = shard.read_bytes()
    shard.write_bytes(
        raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:] if damage == "flip" else raw[: len(raw) // 2]
    )
    before, cells = snapshot(samples), snapshot(prepared / "cells")
    out = tmp_path / "q"
    logs = []
    import zsqpipe.commands as commands

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(commands, "echo", logs.append)
        r = run_cli(*quantize_args(prepared, out, "zeroq", ZEROQ, "--samples", samples))
    one_error_line(r, "quantize", "shard-00002.parquet", "SHA-256 differs", "rerun the synthesize stage")
    assert not any(m.startswith("epoch") for m in logs), logs  # refused before any training
    assert_no_outputs(out, "model.pt", "history.json", ".resume")
    assert snapshot(samples) == before and snapshot(prepared / "cells") == cells


def test_shard_damaged_mid_run_fails_and_keeps_the_finished_epoch(prepared, tmp_path):
    """A shard that goes bad after epoch 0: the stage fails naming it, epoch 0's checkpoint survives, and once
    the shard is restored the rerun resumes from it."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for f in (prepared / "samples").iterdir():
        (samples / f.name).write_bytes(f.read_bytes())
    shards = sorted(samples.glob("shard-*.parquet"))
    good = {s: s.read_bytes() for s in shards}
    out, root = tmp_path / "q", tmp_path / ".resume"
    original = Checkpoints.save

    def save_then_damage(self, epoch):
        original(self, epoch)
        if epoch == 0:
            for s in shards:
                s.write_bytes(good[s][: len(good[s]) // 2])

    def run():
        return run_quantize(prepared / "fp.pt", prepared / "manifest.json", "zeroq", ZEROQ,
                            QuantConfig(weight_bits=4, act_bits=4), 0, out / "model.pt", out / "history.json",
                            samples=samples, job=Job.quiet(device="cpu", threads=1, resume_root=root))  # fmt: skip

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpoints, "save", save_then_damage)
        with pytest.raises(IntegrityError, match=r"shard-0000\d\.parquet: SHA-256 differs") as e:
            run()
    assert "\n" not in str(e.value)
    assert_no_outputs(out, "model.pt", "history.json")
    assert list(root.rglob("state.pt")), "epoch 0's checkpoint was lost"
    for s in shards:
        s.write_bytes(good[s])
    result = run()
    assert result["resumed_from_epoch"] is not None and len(result["history"]) == 2
    assert not list(root.rglob("state.pt"))  # cleared once the outputs were written


# -------------------------------------------------------------------------------- 2. damaged checkpoints


def truncated(src: Path, dst: Path, keep: float = 0.5) -> Path:
    raw = src.read_bytes()
    dst.write_bytes(raw[: int(len(raw) * keep)])
    return dst


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_fp_checkpoint_quantize(prepared, tmp_path, keep):
    bad = truncated(prepared / "fp.pt", tmp_path / "fp.pt", keep)
    (tmp_path / "manifest.json").write_bytes((prepared / "manifest.json").read_bytes())
    out = tmp_path / "q"
    r = run_cli(*quantize_args(tmp_path, out))
    one_error_line(r, "quantize", str(bad), "not a zsqpipe checkpoint (truncated or damaged")
    assert_no_outputs(out, "model.pt", "history.json")


@pytest.mark.parametrize("which", ["fp.pt as --model", "model.pt"])
def test_truncated_checkpoint_evaluate(prepared, tmp_path, which):
    cell = prepared / "cells" / "ptq"
    src = prepared / "fp.pt" if which.startswith("fp") else cell / "model.pt"
    bad = truncated(src, tmp_path / src.name)
    before = snapshot(prepared / "cells")
    out = tmp_path / "e" / "metrics.json"
    r = run_cli("evaluate", "--model", bad, "--history", cell / "history.json", "--data", prepared / "manifest.json",
                "--cell", json.dumps(CELL), "--out", out, "--device", "cpu")  # fmt: skip
    one_error_line(r, "evaluate", str(bad), "not a zsqpipe checkpoint (truncated or damaged")
    assert_no_outputs(out.parent, "metrics.json")
    assert snapshot(prepared / "cells") == before


NOT_A_CHECKPOINT = {  # what users find at a checkpoint path: fixed bytes, no randomness
    "garbage": (bytes(range(7, 256, 3)) * 40, "neither a torch zip archive nor a pickle"),
    "html": (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n",
             "an HTML/XML page"),
    "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"4d7a" * 16 + b"\nsize 1095\n",
            "a Git LFS pointer file"),
}  # fmt: skip


@pytest.mark.parametrize("kind", NOT_A_CHECKPOINT)
@pytest.mark.parametrize("role", ["model.pt to evaluate", "fp.pt to quantize"])
def test_file_that_is_not_a_checkpoint_is_one_line(prepared, tmp_path, kind, role):
    """Garbage, an HTML error page or a Git LFS pointer where a checkpoint belongs: exactly one stderr line
    ``zsqpipe <cmd>: error: <path>: not a zsqpipe checkpoint (<why>)``, exit 1, nothing written, and none of
    torch's weights_only advice (re-running with weights_only=False would execute a foreign file's code)."""
    content, why = NOT_A_CHECKPOINT[kind]
    (tmp_path / "manifest.json").write_bytes((prepared / "manifest.json").read_bytes())
    if role.startswith("model.pt"):
        cmd, bad, out, names = "evaluate", tmp_path / "model.pt", tmp_path / "e", ["metrics.json"]
        bad.write_bytes(content)
        cell = prepared / "cells" / "ptq"
        r = run_cli("evaluate", "--model", bad, "--history", cell / "history.json", "--data",
                    tmp_path / "manifest.json", "--cell", json.dumps(CELL), "--out", out / "metrics.json",
                    "--device", "cpu")  # fmt: skip
    else:
        cmd, bad, out, names = "quantize", tmp_path / "fp.pt", tmp_path / "q", ["model.pt", "history.json"]
        bad.write_bytes(content)
        r = run_cli(*quantize_args(tmp_path, out))
    line = one_error_line(r, cmd, f"{bad}: not a zsqpipe checkpoint ({why}")
    assert r.stderr.strip().splitlines() == [line], r.stderr
    assert "weights_only" not in r.output
    assert_no_outputs(out, *names)


def test_external_fp_checkpoint_that_is_not_a_checkpoint_is_one_line(tmp_path):
    """fp_model.checkpoints naming an HTML page: one IntegrityError line, "not a PyTorch checkpoint"."""
    from zsqpipe.models import create_model
    from zsqpipe.stages.fp_model import _load_external

    bad = tmp_path / "resnet20.pth"
    bad.write_bytes(NOT_A_CHECKPOINT["html"][0])
    with pytest.raises(IntegrityError) as e:
        _load_external(create_model("resnet20", num_classes=10, in_channels=1, image_size=28), bad)
    assert (
        str(e.value)
        == f"{bad}: not a PyTorch checkpoint (an HTML/XML page, e.g. an error page saved by a failed download)"
    )


def test_checkpoint_that_is_not_a_model(prepared, tmp_path):
    """A readable torch file that is not a zsqpipe model (missing keys, wrong weights) is one line, too."""
    (tmp_path / "manifest.json").write_bytes((prepared / "manifest.json").read_bytes())
    out = tmp_path / "q"
    torch.save({"state_dict": {}}, tmp_path / "fp.pt")
    one_error_line(run_cli(*quantize_args(tmp_path, out)), "quantize", str(tmp_path / "fp.pt"),
                   "not a zsqpipe model checkpoint", "'arch'")  # fmt: skip
    ckpt = torch.load(prepared / "fp.pt", weights_only=True)
    ckpt["state_dict"] = {k: v[..., :1] if v.ndim == 4 else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "fp.pt")
    line = one_error_line(run_cli(*quantize_args(tmp_path, out)), "quantize", "weights do not fit 'resnet20'")
    assert str(tmp_path / "fp.pt") in line
    assert_no_outputs(out, "model.pt", "history.json")


def test_truncated_resume_checkpoint_starts_from_scratch(prepared, tmp_path):
    """Stage level: a truncated .resume/…/state.pt is ignored (logged) and the run starts from epoch 0."""
    out, root = tmp_path / "fp", tmp_path / ".resume"
    original = Checkpoints.save

    class Killed(Exception):
        pass

    def save_then_kill(self, epoch):
        original(self, epoch)
        raise Killed

    def run(log):
        return run_fp_model(prepared / "manifest.json", "resnet20", FPConfig(**FP), out / "fp.pt",
                            out / "fp.json", Job("cpu", 1, log=log, resume_root=root))  # fmt: skip

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpoints, "save", save_then_kill)
        with pytest.raises(Killed):
            run(lambda _m: None)
    (state,) = root.rglob("state.pt")
    truncated(state, state)
    logs: list[str] = []
    metrics = run(logs.append)
    assert metrics["resumed_from_epoch"] is None and len(metrics["history"]) == 2
    assert any("starting from scratch" in m and "state.pt" in m for m in logs), logs
    assert not list(root.rglob("state.pt"))


# ---------------------------------------------------------------------------------- 3. full disk on write


def test_atomic_path_cleans_up_on_every_failure(tmp_path, monkeypatch):
    target = tmp_path / "out" / "x.json"
    target.parent.mkdir()
    target.write_text("finished\n")
    full_disk = r"x\.json: cannot write \(\[Errno 28\] No space left on device\)"
    with pytest.raises(OutputError, match=full_disk), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ENOSPC
    with pytest.raises(ValueError), atomic_path(target):  # other errors pass through unchanged
        raise ValueError("boom")

    def full(*_a, **_k):
        raise ENOSPC

    monkeypatch.setattr(os, "fsync", full)  # the data reaches the disk only at fsync on some file systems
    with pytest.raises(OutputError, match="No space left"), atomic_path(target) as tmp:
        tmp.write_text("new")
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match="No space left"), atomic_path(target) as tmp:
        tmp.write_text("new")
    monkeypatch.undo()
    assert target.read_text() == "finished\n" and temp_files(tmp_path) == []


def _raise_enospc(*_a, **_k):
    raise ENOSPC


def _fail_temp_text(original):
    def write_text(self, *a, **k):
        if self.name.startswith(".tmp-"):
            raise ENOSPC
        return original(self, *a, **k)

    return write_text


def _dev_full_save(original):
    def save(obj, f, *a, **k):  # the real error torch's zip writer gives on a full disk (a RuntimeError)
        return original(obj, "/dev/full", *a, **k)

    return save


@pytest.mark.parametrize("fault", ["torch.save ENOSPC", "torch.save /dev/full", "json ENOSPC"])
def test_quantize_disk_full_leaves_no_output_and_keeps_the_checkpoint(prepared, tmp_path, fault):
    if fault.endswith("/dev/full") and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    out, root = tmp_path / "cells" / "real", tmp_path / ".resume"
    other = tmp_path / "cells" / "ptq"  # a finished cell next to this one
    other.mkdir(parents=True)
    for f in (prepared / "cells" / "ptq").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    before = snapshot(other)
    save_checkpoint_orig = Checkpoints.save
    with pytest.MonkeyPatch.context() as mp:

        def save_then_break_disk(self, epoch):  # epoch checkpoints succeed; the disk fills before the outputs
            save_checkpoint_orig(self, epoch)
            if epoch == REAL["epochs"] - 1:
                if fault == "torch.save ENOSPC":
                    mp.setattr(torch, "save", _raise_enospc)
                elif fault == "torch.save /dev/full":
                    mp.setattr(torch, "save", _dev_full_save(torch.save))
                else:
                    mp.setattr(Path, "write_text", _fail_temp_text(Path.write_text))

        mp.setattr(Checkpoints, "save", save_then_break_disk)
        r = run_cli(*quantize_args(prepared, out, "real", REAL, "--resume-root", root))
    named = "history.json" if fault.startswith("json") else "model.pt"
    line = one_error_line(r, "quantize", str(out / named), "cannot write")
    assert ("No space left on device" in line) if "ENOSPC" in fault else ("disk full?" in line)
    assert_no_outputs(out, "model.pt", "history.json")
    assert snapshot(other) == before
    assert list(root.rglob("state.pt")), "the last epoch's checkpoint was lost"
    r = run_cli(*quantize_args(prepared, out, "real", REAL, "--resume-root", root))  # the disk has room again
    assert r.exit_code == 0, r.output
    assert json.loads((out / "history.json").read_text())["resumed_from_epoch"] is not None


def test_synthesize_disk_full_writing_a_shard(prepared, tmp_path):
    import pyarrow.parquet as pq

    finished = tmp_path / "samples" / "seed0"  # a finished sample set of another seed
    finished.mkdir(parents=True)
    for f in (prepared / "samples").iterdir():
        (finished / f.name).write_bytes(f.read_bytes())
    before = snapshot(finished)
    out = tmp_path / "samples" / "seed1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pq, "write_table", _raise_enospc)
        r = run_cli("synthesize", "--fp", prepared / "fp.pt", "--synthesizer", "zeroq", "--seed", 1, "--params",
                    json.dumps({"num_samples": 8, "batch_size": 8, "iters": 1}), "--out", out, "--device", "cpu",
                    "--threads", 1)  # fmt: skip
    one_error_line(r, "synthesize", str(out / "shard-00000.parquet"), "No space left on device")
    assert_no_outputs(out, "manifest.json", "shard-00000.parquet")
    assert snapshot(finished) == before


@pytest.mark.parametrize("stage", ["data", "evaluate", "aggregate"])
def test_json_and_table_writes_on_a_full_disk(prepared, tmp_path, stage, fashion_dir, no_debian_data):
    cell = prepared / "cells" / "ptq"
    out = tmp_path / "out"
    args = {
        "data": ["data", "--dataset", "fashion_mnist", "--params", json.dumps({"data_dir": str(fashion_dir),
                 "val_size": 40}), "--out", out / "manifest.json"],
        "evaluate": ["evaluate", "--model", cell / "model.pt", "--history", cell / "history.json", "--data",
                     prepared / "manifest.json", "--cell", json.dumps(CELL), "--out", out / "metrics.json",
                     "--device", "cpu"],
        "aggregate": ["aggregate", prepared / "cells" / "ptq" / "history.json", "--out-csv", out / "t.csv",
                      "--out-md", out / "t.md"],
    }[stage]  # fmt: skip
    if stage == "aggregate":  # aggregate reads metrics files: make one
        r = run_cli("evaluate", "--model", cell / "model.pt", "--history", cell / "history.json", "--data",
                    prepared / "manifest.json", "--cell", json.dumps(CELL), "--out", tmp_path / "m.json",
                    "--device", "cpu")  # fmt: skip
        assert r.exit_code == 0, r.output
        args[1] = tmp_path / "m.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "write_text", _fail_temp_text(Path.write_text))  # JSON and Markdown writes
        r = run_cli(*args)
    named = {"data": "manifest.json", "evaluate": "metrics.json", "aggregate": "t.md"}[stage]
    one_error_line(r, stage, str(out / named), "No space left on device")
    assert_no_outputs(out, "manifest.json", "metrics.json", "t.csv", "t.md")  # t.csv too: both or neither


def test_write_table_publishes_both_or_neither(tmp_path):
    """Every table stage (aggregate, nas-table, supernet-table, oqat-table) writes CSV + Markdown through
    ``write_table``: a failing CSV write leaves neither file (nor a temp file), an old pair stays as it was."""
    import pandas as pd

    from zsqpipe.errors import OutputError
    from zsqpipe.io import write_table

    csv, md = tmp_path / "t.csv", tmp_path / "t.md"
    write_table(pd.DataFrame({"a": [1.0]}), csv, md, "# old\n")
    old = (csv.read_text(), md.read_text())

    class Broken(pd.DataFrame):
        def to_csv(self, *a, **k):
            raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="t.csv"):
        write_table(Broken({"a": [2.0]}), csv, md, "# new\n")
    assert (csv.read_text(), md.read_text()) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.md"]


# ----------------------------------------------------------------------------- 4. unreadable dataset files


def _damage_idx(path: Path, how: str) -> None:
    raw = path.read_bytes()  # gzip-compressed IDX
    if how == "garbage":
        path.write_bytes(b"this is not an IDX file\n" * 40)
    elif how == "truncated gzip":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "flipped gzip":  # the CRC check catches it
        mid = len(raw) // 2
        path.write_bytes(raw[:mid] + bytes(b ^ 0xFF for b in raw[mid : mid + 16]) + raw[mid + 16 :])
    elif how == "flipped deflate":  # a damaged deflate block header: zlib.error, not an OSError
        raw = gzip.compress(gzip.decompress(raw))  # a bare 10-byte gzip header: the deflate data starts at 10
        path.write_bytes(raw[:10] + bytes(b ^ 0xFF for b in raw[10:14]) + raw[14:])
    elif how == "wrong magic":
        data = bytearray(gzip.decompress(raw))
        data[2] = 0x0D  # float32 IDX
        path.write_bytes(gzip.compress(bytes(data)))
    elif how == "truncated header":
        path.write_bytes(gzip.compress(gzip.decompress(raw)[:10]))


@pytest.mark.parametrize(
    "how,expected",
    [
        ("garbage", "expected a readable gzip-compressed IDX file"),
        ("truncated gzip", "expected a readable gzip-compressed IDX file"),
        ("flipped gzip", "expected a readable gzip-compressed IDX file"),
        ("flipped deflate", "expected a readable gzip-compressed IDX file"),
        ("wrong magic", "expected 0000080N"),
        ("truncated header", "is truncated"),
        ("permission", "Permission denied"),
    ],
)
def test_data_refuses_unreadable_idx_file(fashion_dir, no_debian_data, tmp_path, how, expected):
    bad = fashion_dir / "train-images-idx3-ubyte.gz"
    out = tmp_path / "out" / "manifest.json"
    data_args = ["data", "--dataset", "fashion_mnist", "--params",
                 json.dumps({"data_dir": str(fashion_dir), "val_size": 40}), "--out", out]  # fmt: skip
    r = run_cli(*data_args)
    assert r.exit_code == 0, r.output  # a finished manifest from an earlier run of the same job
    finished = out.read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        if how == "permission":  # we run as root, so chmod 000 would not stop reads: fake the open
            real_open = gzip.open

            def guarded(path, *a, **k):
                if Path(path) == bad:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return real_open(path, *a, **k)

            mp.setattr(gzip, "open", guarded)
        else:
            _damage_idx(bad, how)
        r = run_cli(*data_args)
    one_error_line(r, "data", str(bad), expected)
    assert out.read_bytes() == finished and temp_files(out.parent) == []


# ------------------------------------------------------------------------------- 5. MLflow server dies

GATE_WRAPPER = """
import sys, time
from pathlib import Path
import zsqpipe.cli as cli
import zsqpipe.commands as commands
from zsqpipe.tracking import init_tracking

gate, tracking = Path(sys.argv.pop(1)), sys.argv.pop(1)
init_tracking(tracking, True, "zsqpipe")  # what `zsqpipe tracking-init` does, without a second interpreter
from zsqpipe.tracking import Tracker
trackers = []
log_metrics = Tracker.log_metrics
def remember(self, *args, **kwargs):
    trackers.append(self)
    log_metrics(self, *args, **kwargs)
Tracker.log_metrics = remember
log = commands.echo
def paused_log(msg):
    log(msg)
    if msg.startswith("epoch 0"):
        import mlflow
        run = mlflow.MlflowClient().get_run(trackers[-1].flush())  # tracking works until the server dies
        print("PAUSED", run.info.status, *sorted(run.data.metrics), flush=True)
        while not gate.exists():
            time.sleep(0.05)
commands.echo = paused_log
cli.main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (loopback only) with a SQLite store in ``folder``. It lives at most
    10 minutes (coreutils `timeout`) and its whole process group is killed by :meth:`kill`."""

    def __init__(self, folder: Path, env: dict):
        self.uri = f"http://127.0.0.1:{_free_port()}"
        self.log = folder / "server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", self.uri.rsplit(":", 1)[1],
               "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--default-artifact-root", str(folder / "artifacts")]  # fmt: skip
        if shutil.which("timeout"):
            cmd = ["timeout", "600", *cmd]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, seconds: float = HANG_GUARD_S) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=5)
                return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


MLFLOW_ENV = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}  # our defaults


@pytest.fixture(scope="module", autouse=True)
def early_mlflow_server(request, tmp_path_factory):
    """Start the server when the module starts (it takes 30-60 s on a busy 2-core machine), so that its start
    overlaps the other tests; only if the test that needs it was collected."""
    if not any(
        getattr(item, "originalname", "") == "test_mlflow_server_dies_mid_run"
        for item in request.session.items
    ):
        yield None
        return
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), MLFLOW_ENV)
    try:
        yield server
    finally:
        server.kill()


def test_mlflow_server_dies_mid_run(prepared, tmp_path, early_mlflow_server):
    """A real `mlflow server` is killed after fp-model's first epoch: the stage finishes (exit 0, all files),
    reports the failure in exactly one stderr line and does not hang in MLflow's HTTP retries."""
    server = early_mlflow_server
    server.wait_ready()
    env = {**MLFLOW_ENV, "MLFLOW_TRACKING_URI": server.uri}
    (tmp_path / "wrap.py").write_text(GATE_WRAPPER)
    out = tmp_path / "fp"
    stage = subprocess.Popen(
        [sys.executable, str(tmp_path / "wrap.py"), str(tmp_path / "gate"), str(tmp_path / "tracking.json"),
         "fp-model", "--data", str(prepared / "manifest.json"), "--arch", "resnet20", "--params", json.dumps(FP),
         "--out-model", str(out / "fp.pt"), "--out-metrics", str(out / "fp.json"), "--device", "cpu", "--threads",
         "1", "--no-resume", "--tracking", str(tmp_path / "tracking.json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        for line in stage.stdout:
            if line.startswith("PAUSED"):
                break
        else:
            raise AssertionError(f"stage ended before its first epoch: {stage.wait()} {stage.stderr.read()}")
        assert line.split()[1] == "RUNNING" and "val_top1" in line.split(), line  # tracked so far
        server.kill()
        (tmp_path / "gate").touch()
        # a hang guard, not a timing: MLflow's default HTTP retries would keep the stage for many minutes
        _, stderr = stage.communicate(timeout=HANG_GUARD_S)
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
    assert stage.returncode == 0, stderr
    failures = [ln for ln in stderr.splitlines() if "MLflow tracking failed" in ln]
    assert len(failures) == 1 and "continuing without tracking" in failures[0], stderr
    assert "Traceback" not in stderr, stderr
    metrics = json.loads((out / "fp.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["test_top1"] >= 0 and (out / "fp.pt").is_file()


def test_tracking_init_with_unreachable_server_is_one_line(tmp_path):
    """`tracking-init` must reach the store (it creates the experiment): a dead server is one error line."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "zsqpipe", "tracking-init", "--out", tmp_path / "tracking.json"],
                       env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("zsqpipe tracking-init: error:")]
    assert len(lines) == 1 and env["MLFLOW_TRACKING_URI"] in lines[0] and "tracking: false" in lines[0], (
        r.stderr
    )
    assert_no_outputs(tmp_path, "tracking.json")


# ------------------------------------------------------------------------------ 6. invalid config values


@pytest.mark.parametrize(
    "bad,key,expected",
    [
        ({"experiment": 5}, "experiment", "of type 'string'"),  # string
        ({"experiment": ""}, "experiment", "non-empty"),  # string minLength
        ({"data": {"val_size": 1.5}}, "data.val_size", "of type 'integer'"),  # integer
        ({"data": {"val_size": -1}}, "data.val_size", "minimum of 0"),  # integer minimum
        ({"fp_model": {"lr": "fast"}}, "fp_model.lr", "of type 'number'"),  # number
        ({"fp_model": {"lr": True}}, "fp_model.lr", "of type 'number'"),  # a bool is not a number
        ({"resume": "no"}, "resume", "of type 'boolean'"),  # boolean
        ({"datasets": "fashion_mnist"}, "datasets", "of type 'array'"),  # array
        ({"datasets": []}, "datasets", "non-empty"),  # array minItems
        ({"data": 5}, "data", "of type 'object'"),  # object
        ({"tables": {"hast": 3}}, "tables.hast", "of type 'object'"),  # object under additionalProperties
        ({"tables": {"hast": {"colour": 1}}}, "tables.hast.colour", "unknown key"),
        ({"datasets": ["mnist"]}, "datasets.0", "not one of ['fashion_mnist'"),  # enum in an array
        ({"fp_model": {"grad_quant": {"interval": "x"}}}, "fp_model.grad_quant.interval", "not one of"),
        ({"data": {"test_subset": "all"}}, "data.test_subset", "of type 'integer', 'null'"),  # null-or-X
        ({"fp_model": {"grad_quant": 5}}, "fp_model.grad_quant", "of type 'object', 'null'"),
        ({"fp_model": {"milestones": [1.5]}}, "fp_model.milestones.0", "maximum of 1"),  # number bounds
        ({"tables": {"hast": {"bits": ["w4"]}}}, "tables.hast.bits.0", "expected weight/activation bits as wNaM"),
        ({"tables": {"hast": {"seeds": ["0"]}}}, "tables.hast.seeds.0", "of type 'integer'"),
        ({"tables": {"hast": {"archs": []}}}, "tables.hast.archs", "non-empty"),
        ({"device": "cuda:x"}, "device", "expected auto, cpu, cuda or cuda:N"),  # pattern
        ({"quant": {"first_layer_bits": "8"}}, "quant.first_layer_bits", "expected null (= the cell's weight"),
        # anyOf without a description: the alternatives are spelled out
        ({"fp_model": {"grad_quant": {"bits": "x"}}}, "fp_model.grad_quant.bits",
         "expected an integer in 2..16 or 32 or null"),
        ({"tables": {"hast": {"paper": {"fashion_mnist": {"resnet20": {"real": {"w4a4": "x"}}}}}}},
         "tables.hast.paper.fashion_mnist.resnet20.real.w4a4", "of type 'number'"),
    ],
)  # fmt: skip
def test_every_schema_type_rejects_a_wrong_value_in_one_line(bad, key, expected):
    with pytest.raises(ConfigError) as e:
        validate_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config key '{key}': ") and expected in msg, msg


def test_snakemake_rejects_a_null_or_integer_key_in_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data: {test_subset: all}\n")
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(cfg), "--workflow-profile", "none"],
        capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "invalid config" in ln]
    assert len(lines) == 1 and "'data.test_subset'" in lines[0] and "'integer', 'null'" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "results").exists()


def test_supernet_checkpoints_of_the_wrong_kind_or_shape_are_one_line_errors(tmp_path):
    """supernet-search and oqat-search load their supernets through checkpoint_of_kind + load_state_checked:
    a checkpoint of another stage, or a state that does not fit the rebuilt model, is one line naming the file."""
    from zsqpipe.io import save_checkpoint
    from zsqpipe.stages.model_io import checkpoint_of_kind, load_state_checked
    from zsqpipe.stages.oqat_io import load_oqat_supernet
    from zsqpipe.stages.supernet_search import load_nb201_supernet

    path = tmp_path / "fp.pt"
    save_checkpoint(path, {"kind": "fp_model", "state_dict": {}})
    for load, kind in ((load_nb201_supernet, "'nb201_supernet'"), (load_oqat_supernet, "expected")):
        with pytest.raises(IntegrityError) as e:
            load(path, "cpu")
        assert str(path) in str(e.value) and kind in str(e.value) and "\n" not in str(e.value)
    assert checkpoint_of_kind(path, "fp_model", "an fp-model checkpoint")["kind"] == "fp_model"
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    bad = {k: v for k, v in model.state_dict().items() if not k.startswith("1.")} | {
        "2.weight": torch.zeros(1)
    }
    with pytest.raises(IntegrityError) as e:
        load_state_checked(model, bad, path, "the supernet of its config")
    msg = str(e.value)
    assert msg.startswith(f"{path}: weights do not fit the supernet of its config:") and "\n" not in msg
    assert "1.weight" in msg and "(and 1 more)" in msg  # the unexpected "2.weight" line is counted, not shown
