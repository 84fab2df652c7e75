"""MLflow under parallel jobs: config/smoke.yaml with 2 seeds through `snakemake --cores 4`, logging to an
`mlflow server` on loopback (MLFLOW_TRACKING_URI=http://127.0.0.1:PORT) and to the default SQLite store.

Every job must leave exactly one FINISHED run with its params, metrics and artifacts; no run is lost, none is
duplicated, and no job reports a tracking failure. Marked slow (two whole smoke DAGs, ~2 min each on an idle
2-core machine, 8 min on a loaded one): the second CI step runs them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from workflow_helpers import REPO, snakemake_cmd, write_config

SEEDS = [0, 1]
# data, fp_model, aggregate + (quantize, evaluate) x 2 methods x 3 seeds (mlflow_init makes the store only)
EXPECTED = {"data": 1, "fp_model": 1, "aggregate": 1, "quantize": 2 * len(SEEDS), "evaluate": 2 * len(SEEDS)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts under ``root``."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "server-artifacts"), "--workers", "2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 300  # a start-up guard: a busy 2-core machine takes 30-60 s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited:\n{(root / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("mlflow server did not answer /health within 300 s")


pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(params=["server", "sqlite"])
def parallel_run(request, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    cfg = write_config(wd / "smoke.yaml", tables__hast__seeds=SEEDS)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server = None
    try:
        if request.param == "server":
            server, uri = start_server(tmp_path)
            env["MLFLOW_TRACKING_URI"] = uri
        r = subprocess.run(
            snakemake_cmd(wd, cfg, "--cores", "4"),
            capture_output=True,
            text=True,
            timeout=900,
            cwd=REPO,
            env=env,
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
        info = json.loads((wd / "results/mlflow/tracking.json").read_text())
        yield request.param, wd, info
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def test_parallel_jobs_log_every_run(parallel_run):
    import mlflow

    store, wd, info = parallel_run
    if store == "server":
        assert info["tracking_uri"].startswith("http://127.0.0.1:")
    else:
        assert info["tracking_uri"] == f"sqlite:///{(wd / 'results/mlflow/mlflow.db').resolve()}"
    # no job fell back to file-only because tracking failed
    logs = list((wd / "results/logs").rglob("*.log"))
    assert logs and not [p for p in logs if "MLflow tracking failed" in p.read_text()]

    client = mlflow.MlflowClient(tracking_uri=info["tracking_uri"])
    runs = client.search_runs([info["experiment_id"]], max_results=1000)
    per_rule: dict[str, int] = {}
    for run in runs:
        per_rule[run.data.tags["zsq.rule"]] = per_rule.get(run.data.tags["zsq.rule"], 0) + 1
    assert per_rule == EXPECTED
    assert all(run.info.status == "FINISHED" for run in runs)
    cells = [(r.data.tags["zsq.rule"], r.data.tags["zsq.wildcards"]) for r in runs]
    assert len(set(cells)) == len(cells)  # one run per job, none duplicated
    for run in runs:
        rule = run.data.tags["zsq.rule"]
        assert run.data.params, rule
        assert run.data.tags.get("zsq.config_hash") and run.data.tags.get("zsq.git_commit")
        if rule in ("quantize", "evaluate", "fp_model"):
            assert run.data.metrics, rule
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        if rule == "quantize":
            assert {"history.json", "checkpoint", "logs"} <= artifacts, artifacts
            assert len(client.get_metric_history(run.info.run_id, "test_top1")) >= 1
        if rule == "evaluate":
            assert "metrics.json" in artifacts, artifacts
