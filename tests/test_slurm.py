"""The user-facing SLURM profile on a real (one-node, loopback) Slurm cluster: config/smoke.yaml end to end.

Marked ``slurm``: not in the default suite; `.ci/run` runs it in its own bounded step (`make test-slurm`).
tests/slurm/cluster.sh installs Debian's slurm-wlm + munge when missing and starts munged, slurmctld and slurmd
as root; the workflow runs with ``--workflow-profile workflow/profiles/slurm`` (unchanged) plus the test-only layer
tests/slurm/profile (squeue as status command: the cluster has no accounting). Checked: the table, that every
non-local job was submitted once through sbatch and completed in Slurm, that the training/evaluation rules
went to the gpu partition with one GPU and the profile's CPUs, and that the local rules never reached Slurm.
"""

from __future__ import annotations

import os
import re
import subprocess

import pandas as pd
import pytest
from workflow_helpers import REPO, snakemake_cmd, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1500)]

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
# non-local jobs of config/smoke.yaml's hast table: data, fp_model, 2 x quantize, 2 x evaluate
SUBMITTED_RULES = {"data": 1, "fp_model": 1, "quantize": 2, "evaluate": 2}
GPU_RULES = {"fp_model": 8, "quantize": 8, "evaluate": 4}  # cpus_per_gpu in workflow/profiles/slurm/config.yaml


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root")
    state = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(
        ["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=600
    )
    if r.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=120)
        raise AssertionError(f"cluster start failed:\n{r.stdout}\n{r.stderr}")
    try:
        yield state
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=120)


def scontrol_job(jobid: str) -> str:
    return subprocess.run(
        ["scontrol", "show", "job", jobid], capture_output=True, text=True, timeout=30, check=True
    ).stdout


def test_smoke_workflow_through_sbatch(cluster, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    cfg = write_config(wd / "smoke.yaml")
    cmd = snakemake_cmd(
        wd, cfg, "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"),
        "--profile", str(REPO / "tests" / "slurm" / "profile"),
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SLURM_CONF")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO, env=env)
    log = r.stdout + r.stderr
    (tmp_path / "snakemake.log").write_text(log)
    assert r.returncode == 0, log[-6000:]

    table = pd.read_csv(wd / "results/tables/hast.csv")
    assert sorted(table["method"]) == ["ptq", "real"]
    assert table["last_top1_mean"].notna().all()

    # every non-local job went through sbatch exactly once (no failed first attempt hidden by `retries: 1`)
    submitted = re.findall(
        r"has been submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/", log
    )
    per_rule: dict[str, list[str]] = {}
    for jobid, rule in submitted:
        per_rule.setdefault(rule, []).append(jobid)
    assert {rule: len(ids) for rule, ids in per_rule.items()} == SUBMITTED_RULES, submitted
    # ... and the local rules did not
    assert "rule_mlflow_init" not in log and "rule_aggregate" not in log

    ctld = (cluster / "slurmctld.log").read_text()
    for rule, ids in per_rule.items():
        for jobid in ids:
            assert f"_job_complete: JobId={jobid} WEXITSTATUS 0" in ctld, (rule, jobid)
            info = scontrol_job(jobid)
            assert "JobState=COMPLETED" in info, info
            if rule in GPU_RULES:
                assert "Partition=gpu" in info and "TresPerJob=gres:gpu:1" in info, info
                assert f"NumCPUs={GPU_RULES[rule]}" in info, info
            else:
                assert "Partition=cpu" in info and "TresPerJob" not in info, info
