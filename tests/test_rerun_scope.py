"""What a code edit reruns, as Snakemake itself plans it (config/README.md "Each stage's code version").

A temp copy of the workflow and package (imported through PYTHONPATH) gets every job of an all-methods smoke
table marked done (empty placeholder outputs + ``--touch``, which records each job's params); then one module
of the copy is edited and a dry run says which jobs would rerun. No job runs, so this is a fast test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from workflow_helpers import REPO, write_config

from zsqpipe.names import METHOD_NAMES, METHOD_SYNTHESIZER

TARGET = "results/tables/hast.csv"


class WorkflowCopy:
    def __init__(self, root: Path, **overrides):
        self.repo = root / "repo"
        for part in ("workflow", "config", "zsqpipe"):
            src = REPO / part
            if src.is_dir():
                shutil.copytree(src, self.repo / part, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                self.repo.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, self.repo / part)
        self.root, self.wd = root, root / "wd"
        overrides = {"tables__hast__methods": list(METHOD_NAMES), **overrides}
        self.cfg = write_config(root / "all.yaml", tables__hast__seeds=[0], tracking=False, **overrides)
        self.env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        self.env["PYTHONPATH"] = str(self.repo)  # the copy's zsqpipe (run outside REPO: `-m` puts cwd first)

    def snakemake(self, *args: str, check: bool = True) -> str:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(self.repo / "workflow" / "Snakefile"), "--directory",
               str(self.wd), TARGET, "--configfile", str(self.cfg), *args]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=self.env, cwd=self.root)
        assert (r.returncode == 0) == check, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout + r.stderr

    def planned(self) -> set[tuple[str, str]]:
        """(rule, method or synthesizer) of every job a dry run would execute."""
        jobs, rule = set(), None  # fp_model, data and mlflow_init are ("fp_model", "") etc.
        for line in self.snakemake("-n").splitlines():
            if m := re.match(r"^(?:local)?rule (\w+):", line):
                rule = m.group(1)
                if rule in ("aggregate", "fp_model", "data", "mlflow_init"):
                    jobs.add((rule, "hast" if rule == "aggregate" else ""))
            elif rule and (m := re.match(r"^\s+wildcards: .*\b(?:method|synth)=([\w@]+)", line)):
                jobs.add((rule, m.group(1)))
        return jobs

    def mark_all_done(self) -> None:
        outputs = []
        for line in self.snakemake("-n", "-p").splitlines():
            if line.startswith("    output: "):
                outputs += [o.strip() for o in line.removeprefix("    output: ").split(",")]
        for out in outputs:  # dry-run order is a topological order: placeholders get increasing mtimes
            path = self.wd / out
            if "/samples/" in out:
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
        self.snakemake("--touch", "--forceall", "--cores", "1")  # records every job's params, code version
        assert "Nothing to be done" in self.snakemake("-n")

    def edit(self, module: str):
        path = self.repo / (module.replace(".", "/") + ".py")
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        try:
            return self.planned()
        finally:
            path.write_text(original)


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    wf = WorkflowCopy(tmp_path_factory.mktemp("rerun"))
    wf.mark_all_done()
    return wf


def cells(method: str) -> set[tuple[str, str]]:
    jobs = {("quantize", method), ("evaluate", method), ("aggregate", "hast")}
    return jobs


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_editing_a_method_module_reruns_only_its_cells(copy, method):
    assert copy.edit(f"zsqpipe.methods.{method}") == cells(method)


@pytest.mark.parametrize("synth", sorted(set(METHOD_SYNTHESIZER.values())))
def test_editing_a_synthesizer_reruns_its_samples_and_their_cells(copy, synth):
    users = [m for m, s in METHOD_SYNTHESIZER.items() if s == synth]
    expected = {("synthesize", synth)}.union(*(cells(m) for m in users))
    assert copy.edit(f"zsqpipe.zsq.synth_{synth}") == expected


def test_editing_shared_calibration_reruns_the_methods_that_calibrate(copy):
    users = {"real", "ptq", "zeroq", "intraq", "hast", "gdfq", "qimera"}  # zaq learns its ranges (LSQ-like)
    assert copy.edit("zsqpipe.zsq.calibration") == set().union(*(cells(m) for m in users))


def test_editing_the_generator_loop_reruns_gdfq_and_qimera(copy):
    assert copy.edit("zsqpipe.zsq.generator_qat") == cells("gdfq") | cells("qimera")


# ------------------------------------------------------------------ paths the config names (issue 12, item 2)


def test_changed_fp_checkpoint_bytes_rerun_fp_model_and_below(tmp_path):
    """Other bytes at the configured checkpoint path, even with an older mtime (``cp -p``), rerun fp_model
    and every job that depends on it: its SHA-256 is a param of fp_model."""
    ckpt = tmp_path / "pretrained" / "fp.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"first weights")
    wf = WorkflowCopy(tmp_path, tables__hast__methods=["real", "ptq"],
                      fp_model__checkpoints={"fashion_mnist/resnet20": str(ckpt)})  # fmt: skip
    wf.mark_all_done()
    old = ckpt.stat().st_mtime - 3600
    ckpt.write_bytes(b"other weights")
    os.utime(ckpt, (old, old))
    assert wf.planned() == {("fp_model", ""), ("aggregate", "hast")} | cells("real") | cells("ptq")


@pytest.mark.parametrize(
    "override,line",
    [
        ({"fp_model__checkpoints": {"fashion_mnist/resnet20": "/nonexistent/x.pth"}},
         "config key 'fp_model.checkpoints.fashion_mnist/resnet20': /nonexistent/x.pth: no such file"),
        ({"fp_model__checkpoints": {"fashion_mnist/resnet20": "."}},
         "config key 'fp_model.checkpoints.fashion_mnist/resnet20': .: is a folder, expected a checkpoint file"),
        ({"fp_model__checkpoints": {"fashion-mnist/resnet20": "x.pth"}},
         "config key 'fp_model.checkpoints.fashion-mnist/resnet20': expected a '<dataset>/<arch>' key"),
        ({"data__data_dir": "/nonexistent/data"},
         "config key 'data.data_dir': /nonexistent/data: no such folder"),
    ],
)  # fmt: skip
def test_missing_path_in_config_is_one_line_after_a_finished_run(copy, tmp_path, override, line):
    """After a finished run (fp.pt exists), a config naming a path that does not exist is refused at
    validation, in one line naming the key and the path (Snakemake alone says "Nothing to be done")."""
    overlay = write_config(tmp_path / "overlay.yaml", base="smoke.yaml", **override)
    out = copy.snakemake("-n", "--configfile", str(copy.cfg), str(overlay), check=False)
    errors = [ln for ln in out.splitlines() if "invalid config" in ln]
    assert len(errors) == 1 and line in errors[0], out[-2000:]
