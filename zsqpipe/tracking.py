"""MLflow tracking: one run per pipeline job; a no-op when tracking is disabled.

The workflow's ``mlflow_init`` job creates the store and the experiment once, before jobs fan out, and writes
``results/mlflow/tracking.json`` (``enabled``, ``tracking_uri``, ``experiment_id``). Every stage opens its
own run in that experiment, tagged with the rule, wildcards, config hash and git commit. Tracking never
decides a result: every metric is also written to files, and tables are built from files only. If the
tracking server fails mid-run, the stage reports it once on stderr and finishes without tracking.

The run is logged by a **side process** (``python -m zsqpipe.tracking``, :func:`serve`): importing MLflow and
opening its store cost ~1.7 s per job (``benchmarks/bench_startup.py``), which the stage would otherwise pay
before its first step. The stage sends each call as a JSON line with its own timestamp and goes on; the worker
imports MLflow, creates the run with :class:`mlflow.MlflowClient` and logs as the lines arrive (per-epoch
metrics stay live), and the stage waits for it only when the run ends, so the store is complete when the job
exits. A stage killed without ending its run leaves the run ``KILLED``, not ``RUNNING``.

A dead server must be noticed in seconds, not minutes: MLflow's HTTP client by default retries a failed
request 7 times with exponential backoff (about 4 minutes). Unless the user has set them, :func:`_http_defaults`
therefore sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=3``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`` (waits of about
1, 2, 4 s) and ``MLFLOW_HTTP_REQUEST_TIMEOUT=20`` (seconds per request); after a failure the worker logs
nothing more, so nothing contacts the server again.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zsqpipe.errors import TrackingError
from zsqpipe.io import flatten_dict, read_json, write_json

DEFAULT_EXPERIMENT = "zsqpipe"
HTTP_DEFAULTS = {  # see the module docstring; a value the user exported wins
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
WORKER_FAILED = 3  # the worker's exit code after it reported a tracking failure
WORKER_EXIT_WAIT_S = 600  # the longest a stage waits for its worker to finish logging (a hang guard)


def _http_defaults() -> None:
    """Make a dead tracking server fail fast (MLflow reads these variables on every request)."""
    for key, value in HTTP_DEFAULTS.items():
        if not os.environ.get(key):
            os.environ[key] = value


def default_tracking_uri(results_dir: str | os.PathLike = "results") -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a SQLite file at an absolute path under ``results/mlflow``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = (Path(results_dir) / "mlflow" / "mlflow.db").resolve()
    return f"sqlite:///{db}"


def init_tracking(out: str | os.PathLike, enabled: bool, experiment: str, results_dir="results") -> dict:
    """Create the MLflow store and experiment once, and write the tracking file that jobs read."""
    info: dict[str, Any] = {"enabled": bool(enabled), "experiment_name": experiment}
    if enabled:
        import mlflow

        _http_defaults()
        from mlflow.tracking import MlflowClient

        uri = default_tracking_uri(results_dir)
        if uri.startswith("sqlite:"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        try:
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                artifacts = None
                if uri.startswith("sqlite:"):
                    artifacts = (Path(results_dir) / "mlflow" / "artifacts").resolve().as_uri()
                exp_id = client.create_experiment(experiment, artifact_location=artifacts)
            else:
                exp_id = exp.experiment_id
        except Exception as e:  # MLflow raises many types (HTTP, SQL, ...)
            reason = " ".join(str(e).split())[:400]
            raise TrackingError(
                f"MLflow tracking store {uri} cannot be used ({type(e).__name__}: {reason}); start the server, "
                "fix MLFLOW_TRACKING_URI, or set tracking: false"
            ) from e
        info.update(tracking_uri=uri, experiment_id=str(exp_id))
    write_json(out, info)
    return info


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _failure_line(what: str, err: BaseException) -> str:
    reason = " ".join(str(err).split())  # one line, whatever the backend's message looks like
    return (
        f"zsqpipe: MLflow tracking failed during {what} ({type(err).__name__}: {reason}); "
        "continuing without tracking, results are still written to files"
    )


class Tracker:
    """One MLflow run, logged by a side process (module docstring). Disabled trackers accept every call and
    do nothing; so does an enabled one whose worker failed (it said so once on stderr)."""

    def __init__(self, info: dict | None = None):
        self.info = info or {"enabled": False}
        self.enabled = bool(self.info.get("enabled"))
        self._worker: subprocess.Popen | None = None
        self._lines: queue.SimpleQueue | None = None
        self._pump: threading.Thread | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike | None) -> Tracker:
        return cls(read_json(path) if path else None)

    def _send(self, op: str, **fields) -> None:
        if self.enabled and self._worker is not None:
            self._lines.put(json.dumps({"op": op, **fields}) + "\n")

    def _pump_lines(self) -> None:
        """Write queued lines to the worker (a thread, so a slow worker never blocks the stage)."""
        while (line := self._lines.get()) is not None:
            with contextlib.suppress(OSError, ValueError):  # a dead worker: drop the lines
                self._worker.stdin.write(line)
                self._worker.stdin.flush()
        with contextlib.suppress(OSError, ValueError):
            self._worker.stdin.close()

    def _start_worker(self, first: dict) -> None:
        package_root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}  # the worker imports this very package
        try:
            self._worker = subprocess.Popen(
                [sys.executable, "-m", "zsqpipe.tracking"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
        except OSError as e:
            print(_failure_line("start_run", e), file=sys.stderr)
            self.enabled = False
            return
        self._lines = queue.SimpleQueue()
        self._pump = threading.Thread(target=self._pump_lines, name="zsqpipe-tracking", daemon=True)
        self._pump.start()
        self._send("start", **first)

    def _stop_worker(self, status: str) -> None:
        if self._worker is None:
            return
        self._send("end", status=status)
        self._lines.put(None)
        self._pump.join()
        try:
            code = self._worker.wait(timeout=WORKER_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self._worker.kill()
            code = self._worker.wait()
        if code == WORKER_FAILED:
            self.enabled = False  # the worker said why, once
        elif code != 0:
            print(f"zsqpipe: MLflow tracking worker exited with code {code}; results are still written to "
                  "files", file=sys.stderr)  # fmt: skip
        self._worker.stdout.close()
        self._worker = None

    def flush(self) -> str | None:
        """Wait until the worker has logged everything sent so far; the run's id (None if not tracked)."""
        if not (self.enabled and self._worker is not None):
            return None
        self._send("flush")
        reply = self._worker.stdout.readline().split()
        return reply[1] if len(reply) == 2 and reply[1] != "-" else None

    @contextlib.contextmanager
    def run(self, run_name: str, tags: dict[str, str] | None = None) -> Iterator[Tracker]:
        if self.enabled:
            self._start_worker({"info": self.info, "run_name": run_name, "tags": tags or {}})
        status = "FINISHED"
        try:
            yield self
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._stop_worker(status)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            flat = {k: ("null" if v is None else str(v))[:6000] for k, v in flatten_dict(params).items()}
            self._send("params", params=flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {
            k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if clean:
            self._send("metrics", metrics=clean, step=step or 0, timestamp=int(time.time() * 1000))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._send("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send("tags", tags={k: str(v) for k, v in tags.items()})


class _RunLogger:
    """The worker's side: one MLflow run, logged with one client. The first failure (other than a locked
    SQLite store, retried) is reported once and turns logging off."""

    def __init__(self, info: dict, run_name: str, tags: dict[str, str]):
        self.client = None
        self.run_id: str | None = None
        self.ok = True
        self.call("start_run", self._start, info, run_name, tags)

    def _start(self, info: dict, run_name: str, tags: dict[str, str]) -> None:
        from mlflow import MlflowClient

        _http_defaults()
        self.client = MlflowClient(info["tracking_uri"])
        tags = {"zsq.git_commit": git_commit(), **tags}
        self.run_id = self.client.create_run(info["experiment_id"], run_name=run_name, tags=tags).info.run_id

    def call(self, what: str, fn, *args, retries: int = 3) -> None:
        if not self.ok:
            return
        for attempt in range(retries):
            try:
                fn(*args)
                return
            except Exception as e:  # MLflow raises many types (HTTP, SQL, ...)
                if "locked" in str(e).lower() and attempt + 1 < retries:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                print(_failure_line(what, e), file=sys.stderr, flush=True)
                self.ok = False
                return

    def handle(self, msg: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        op, run = msg["op"], self.run_id
        if op == "params":
            items = [Param(k, v) for k, v in msg["params"].items()]
            for i in range(0, len(items), 100):  # MLflow's limit per batch
                self.call("log_params", lambda b: self.client.log_batch(run, params=b), items[i : i + 100])
        elif op == "metrics":
            batch = [Metric(k, v, msg["timestamp"], msg["step"]) for k, v in msg["metrics"].items()]
            self.call("log_metrics", lambda b: self.client.log_batch(run, metrics=b), batch)
        elif op == "tags":
            batch = [RunTag(k, v) for k, v in msg["tags"].items()]
            self.call("set_tags", lambda b: self.client.log_batch(run, tags=b), batch)
        elif op == "artifact":
            self.call("log_artifact", self.client.log_artifact, run, msg["path"], msg["artifact_path"])
        elif op == "end":
            self.call("end_run", self.client.set_terminated, run, msg["status"])
            self.run_id = None


def serve(lines, reply) -> bool:
    """The worker loop: JSON lines from the stage (``start`` first, ``end`` last) to one MLflow run. A stage
    that dies without ``end`` leaves its run KILLED; ``flush`` is answered with the run id once handled.
    False if tracking failed (reported on stderr)."""
    logger = None
    for line in lines:
        try:
            msg = json.loads(line)
        except ValueError:  # the stage died mid-line
            break
        if msg["op"] == "start":
            logger = _RunLogger(msg["info"], msg["run_name"], msg["tags"])
        elif msg["op"] == "flush":
            print("flushed", (logger and logger.ok and logger.run_id) or "-", file=reply, flush=True)
        elif logger is not None:
            logger.handle(msg)
    if logger is not None and logger.run_id is not None:
        logger.handle({"op": "end", "status": "KILLED"})
    return logger is None or logger.ok


if __name__ == "__main__":
    reply_channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever MLflow prints goes to the job's log, not into the reply channel
    sys.stdout = sys.stderr
    sys.exit(0 if serve(sys.stdin, reply_channel) else WORKER_FAILED)
