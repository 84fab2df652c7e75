"""The MLflow side process: what a stage sends arrives in the run, with the stage's timestamps and the status
the stage ended with (FINISHED, FAILED, or KILLED when the stage died without ending it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from zsqpipe.tracking import Tracker, init_tracking

pytest.importorskip("mlflow")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    info = init_tracking(tmp_path / "tracking.json", True, "zsqpipe", results_dir=tmp_path / "results")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
    import mlflow

    return tmp_path / "tracking.json", info, mlflow.MlflowClient(info["tracking_uri"])


def only_run(client, info):
    runs = client.search_runs([info["experiment_id"]])
    assert len(runs) == 1
    return runs[0]


def test_a_run_arrives_whole_with_the_stage_timestamps(store, tmp_path):
    path, info, client = store
    artifact = tmp_path / "history.json"
    artifact.write_text("{}")
    tracker = Tracker.from_file(path)
    with tracker.run("quantize[method=real]", {"zsq.rule": "quantize"}):
        tracker.log_params({"quant": {"weight_bits": 3}, "note": None})
        sent = []
        for epoch in range(3):
            sent.append(time.time() * 1000)
            tracker.log_metrics({"test_top1": 80.0 + epoch, "resumed": False}, step=epoch)
            time.sleep(0.01)
        tracker.set_tags({"zsq.extra": 1})
        tracker.log_artifact(artifact, "results")
        run_id = tracker.flush()  # everything so far is in the store while the stage still runs
        live = client.get_run(run_id)
        assert live.info.status == "RUNNING" and live.data.metrics == {"test_top1": 82.0}
    run = only_run(client, info)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "quantize[method=real]"
    assert run.data.params == {"quant.weight_bits": "3", "note": "null"}
    assert run.data.tags["zsq.rule"] == "quantize" and run.data.tags["zsq.extra"] == "1"
    assert len(run.data.tags["zsq.git_commit"]) >= 7
    history = sorted(client.get_metric_history(run_id, "test_top1"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 80.0), (1, 81.0), (2, 82.0)]
    assert [m.timestamp for m in history] == [int(t) for t in sent]  # when the stage logged, not the worker
    assert [a.path for a in client.list_artifacts(run_id, "results")] == ["results/history.json"]


def test_a_failing_stage_ends_its_run_failed(store):
    path, info, client = store
    tracker = Tracker.from_file(path)
    with pytest.raises(RuntimeError), tracker.run("x"):
        tracker.log_metrics({"m": 1.0})
        raise RuntimeError("boom")
    run = only_run(client, info)
    assert run.info.status == "FAILED" and run.data.metrics == {"m": 1.0}


KILLED_STAGE = """
import os, signal, sys
from zsqpipe.tracking import Tracker
tracker = Tracker.from_file(sys.argv[1])
with tracker.run("x"):
    tracker.log_metrics({"m": 1.0})
    tracker.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_stage_leaves_its_run_killed_not_running(store):
    path, info, client = store
    r = subprocess.run([sys.executable, "-c", KILLED_STAGE, str(path)], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    deadline = time.monotonic() + 120  # the orphaned worker ends the run when it reads end-of-file
    while (run := only_run(client, info)).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.info.status == "KILLED" and run.data.metrics == {"m": 1.0}


def test_the_stage_never_imports_mlflow(store):
    path, _, _ = store
    code = (
        "import sys\nfrom zsqpipe.tracking import Tracker\nt = Tracker.from_file(sys.argv[1])\n"
        "with t.run('x'):\n    t.log_metrics({'m': 1.0})\nprint('mlflow' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
