"""MLflow tracking: one run per pipeline job; a no-op when tracking is disabled.

The workflow's ``mlflow_init`` job creates the store and the experiment once, before jobs fan out, and writes
``results/mlflow/tracking.json`` (``enabled``, ``tracking_uri``, ``experiment_id``). Every stage opens its
own run in that experiment, tagged with the rule, wildcards, config hash and git commit. Tracking never
decides a result: every metric is also written to files, and tables are built from files only. If the
tracking server fails mid-run, the stage reports it once on stderr and finishes without tracking.

A dead server must be noticed in seconds, not minutes: MLflow's HTTP client by default retries a failed
request 7 times with exponential backoff (about 4 minutes, and again when the process exits and MLflow ends
the still-active run). Unless the user has set them, :func:`_http_defaults` therefore sets
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=3``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`` (waits of about 1, 2, 4 s) and
``MLFLOW_HTTP_REQUEST_TIMEOUT=20`` (seconds per request); after a failure the run is dropped locally, so
nothing contacts the server again.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
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


class Tracker:
    """Thin wrapper around the MLflow fluent API. Disabled trackers accept every call and do nothing."""

    def __init__(self, info: dict | None = None):
        self.info = info or {"enabled": False}
        self.enabled = bool(self.info.get("enabled"))
        self.run_id: str | None = None
        self._mlflow = None

    @classmethod
    def from_file(cls, path: str | os.PathLike | None) -> Tracker:
        return cls(read_json(path) if path else None)

    def _fail(self, what: str, err: Exception) -> None:
        reason = " ".join(str(err).split())  # one line, whatever the backend's message looks like
        print(
            f"zsqpipe: MLflow tracking failed during {what} ({type(err).__name__}: {reason}); "
            "continuing without tracking, results are still written to files",
            file=sys.stderr,
        )
        self.enabled = False
        self._drop_active_run()

    def _drop_active_run(self) -> None:
        """Forget the run locally, so MLflow's exit handler does not retry ``end_run`` against a dead server."""
        if self._mlflow is None:
            return
        with contextlib.suppress(Exception):  # private MLflow state; at worst the exit handler retries
            from mlflow.tracking import fluent

            stack = fluent._active_run_stack
            stack = stack.get() if hasattr(stack, "get") else stack
            stack.clear()
            os.environ.pop("MLFLOW_RUN_ID", None)

    def _call(self, what: str, fn, *args, retries: int = 3, **kwargs):
        if not self.enabled:
            return None
        for attempt in range(retries):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # MLflow raises many types (HTTP, SQL, ...)
                if "locked" in str(e).lower() and attempt + 1 < retries:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                self._fail(what, e)
                return None

    @contextlib.contextmanager
    def run(self, run_name: str, tags: dict[str, str] | None = None) -> Iterator[Tracker]:
        if self.enabled:
            try:
                import mlflow

                self._mlflow = mlflow
                _http_defaults()
                mlflow.set_tracking_uri(self.info["tracking_uri"])
                tags = {"zsq.git_commit": git_commit(), **(tags or {})}
                run = mlflow.start_run(experiment_id=self.info["experiment_id"], run_name=run_name, tags=tags)
                self.run_id = run.info.run_id
            except Exception as e:
                self._fail("start_run", e)
        status = "FINISHED"
        try:
            yield self
        except BaseException:
            status = "FAILED"
            raise
        finally:
            if self.enabled and self.run_id:
                self._call("end_run", self._mlflow.end_run, status=status)

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: ("null" if v is None else str(v))[:6000] for k, v in flatten_dict(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            self._call(
                "log_params", self._mlflow.log_params, dict(items[i : i + 100])
            ) if self.enabled else None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {
            k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if clean and self.enabled:
            self._call("log_metrics", self._mlflow.log_metrics, clean, step=step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self._call("log_artifact", self._mlflow.log_artifact, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self._call("set_tags", self._mlflow.set_tags, tags)
