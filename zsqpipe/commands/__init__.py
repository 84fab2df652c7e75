"""The command layer: one decorator per kind of command, owning what every job shares.

* :func:`job_command` — a stage that computes: adds ``--device/--threads`` (``runtime``), ``--resume-root/
  --no-resume`` (``resume``: the option naming the output next to which ``.resume`` goes by default) and the
  tracking options, and hands the body an ``open_job(params)`` context manager: one MLflow run named after the
  rule and wildcards (tags: rule, wildcards, hash of ``params``), yielding the :class:`~zsqpipe.job.Job` the
  stage function takes; the job's log is attached when the body succeeded (a failed body closes the run FAILED).
* :func:`table_command` — a stage that builds a table from files: the body returns ``(inputs, build,
  outputs)``; one run logs the input count and the rows and attaches the written outputs and the log.
* :func:`command` — an untracked command (``tracking-init``, ``plot``).

Every kind maps a :class:`~zsqpipe.errors.ZsqError` to ``zsqpipe <command>: error: <message>`` and exit
status 1. Stage modules are imported inside the bodies, so ``zsqpipe --help`` and each command start fast.
Commands register themselves in :data:`COMMANDS`; ``zsqpipe.cli`` adds them to the group.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from zsqpipe.errors import ConfigError, ZsqError

PATH = click.Path(path_type=Path)
EXISTING = click.Path(path_type=Path, exists=True, dir_okay=False)
COMMANDS: list[click.Command] = []


def parse_json(value: str | None, what: str) -> dict:
    """A JSON object given on the command line (``what``: the option, for the one-line error)."""
    if not value:
        return {}
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def echo(msg: str) -> None:
    """The jobs' log: stdout, flushed (Snakemake redirects it to the rule's log file)."""
    click.echo(msg)
    sys.stdout.flush()


def _errors_to_exit(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZsqError as e:
            ctx = click.get_current_context()
            click.echo(f"zsqpipe {ctx.info_name}: error: {e}", err=True)
            ctx.exit(1)

    return wrapper


def _options(fn, specs):
    for args, kwargs in reversed(specs):
        fn = click.option(*args, **kwargs)(fn)
    return fn


TRACKING_OPTIONS = [
    (("--tracking",), {"type": EXISTING, "default": None,
                       "help": "tracking.json written by `zsqpipe tracking-init` (omit: no MLflow run)."}),
    (("--rule",), {"default": "manual", "show_default": True, "help": "Snakemake rule name (MLflow tag)."}),
    (("--wildcards",), {"default": "", "help": "Snakemake wildcards, 'k=v, ...' (MLflow tag)."}),
    (("--log-file",), {"type": PATH, "default": None, "help": "This job's log, attached to the run."}),
]  # fmt: skip
DEVICE_OPTION = (("--device",), {"default": "auto", "show_default": True,
                                 "help": "auto (CUDA when present, else CPU), cpu, cuda or cuda:N."})  # fmt: skip
RESUME_OPTIONS = [
    (("--resume-root",), {"type": PATH, "default": None,
                          "help": "Folder for epoch checkpoints, kept outside the outputs; a rerun resumes from the "
                          "last one (default: .resume next to the output; the workflow uses results/.resume)."}),
    (("--no-resume",), {"is_flag": True, "help": "Neither resume nor write epoch checkpoints."}),
]  # fmt: skip


def threads_option(
    default: int | None = None, help: str = "torch CPU threads (the rule's `threads`)."
) -> tuple:
    return (
        ("--threads",),
        {"type": int, "default": default, "show_default": default is not None, "help": help},
    )


@contextlib.contextmanager
def tracked_run(tracking, rule: str, wildcards: str, params: dict, log_file=None) -> Iterator:
    """One MLflow run named after the rule and wildcards (tags: rule, wildcards, a hash of ``params``), yielding
    its tracker; the job's log file is attached when the body succeeded (``Tracker.run`` closes a failed one
    FAILED)."""
    from zsqpipe.io import sha256_json
    from zsqpipe.tracking import Tracker

    tracker = Tracker.from_file(tracking)
    tags = {"zsq.rule": rule, "zsq.wildcards": wildcards, "zsq.config_hash": sha256_json(params)[:16]}
    with tracker.run(f"{rule}[{wildcards}]" if wildcards else rule, tags):
        yield tracker
        if log_file:
            tracker.log_artifact(log_file, "logs")


def _register(name: str, body: Callable, specs: list = ()) -> click.Command:
    """The click command ``name`` of ``body`` with the options ``specs`` and one-line errors, in COMMANDS."""
    cmd = click.command(name)(_options(_errors_to_exit(body), specs))
    COMMANDS.append(cmd)
    return cmd


def command(name: str):
    """An untracked command: registered, with one-line errors."""

    return lambda fn: _register(name, fn)


def job_command(name: str, *, device: bool = True, threads: tuple | None = threads_option(),
                resume: str | None = None):  # fmt: skip
    """A computing stage (see the module docstring). The body is called as ``body(open_job, **options)``;
    ``with open_job(params) as job:`` runs the stage in its tracked run. ``resume``: the output option whose
    folder holds ``.resume`` when ``--resume-root`` is not given (None: the stage does not checkpoint)."""

    def deco(fn: Callable):
        @functools.wraps(fn)
        def body(*, tracking, rule, wildcards, log_file, **opts):
            runtime = {"device": opts.pop("device", "auto"), "threads": opts.pop("threads", None)}
            if resume is not None:
                root, off = opts.pop("resume_root"), opts.pop("no_resume")
                runtime["resume_root"] = (
                    None if off else root if root is not None else opts[resume].parent / ".resume"
                )

            @contextlib.contextmanager
            def open_job(params: dict):
                from zsqpipe.job import Job

                with tracked_run(tracking, rule, wildcards, params, log_file) as tracker:
                    yield Job(tracker=tracker, log=echo, **runtime)

            return fn(open_job, **opts)

        specs = ([DEVICE_OPTION] if device else []) + ([threads] if threads else [])
        specs += (RESUME_OPTIONS if resume is not None else []) + TRACKING_OPTIONS
        return _register(name, body, specs)

    return deco


def table_command(name: str, kind: str):
    """A table stage (see the module docstring): the body returns ``(inputs, build, outputs)``; ``kind`` names
    the inputs (``metrics``, ``results``, ...) in the run's parameters."""

    def deco(fn: Callable):
        @functools.wraps(fn)
        def body(*, tracking, rule, wildcards, log_file, **opts):
            inputs, build, outputs = fn(**opts)
            with tracked_run(
                tracking, rule, wildcards, {kind: [str(p) for p in inputs]}, log_file
            ) as tracker:
                table = build()
                tracker.log_params({f"n_{kind}": len(inputs), "rows": len(table)})
                for path in outputs:
                    if path is not None:
                        tracker.log_artifact(path, "tables")
                echo(f"{len(table)} rows -> {outputs[0]}")

        return _register(name, body, TRACKING_OPTIONS)

    return deco


MANIFEST = (  # the prepared data set, read by most stages
    ("--data", "manifest"),
    {"type": EXISTING, "required": True, "help": "Manifest from `zsqpipe data`."},
)
TABLE_OUTPUTS = [
    (("--out-csv",), {"type": PATH, "required": True}),
    (("--out-md",), {"type": PATH, "required": True}),
]


def options(*specs):
    """Several ``click.option`` s from ``((names...), {kwargs})`` pairs, in the order given."""
    return lambda fn: _options(fn, list(specs))
