"""Atomic writes, hashing, JSON helpers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from zsqpipe.errors import IntegrityError, OutputError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A failing writer leaves no ``.tmp-*`` file and never a half-written ``path`` (a SIGKILLed one may leave
    the temp file). An ``OSError`` while writing (disk full, quota, permissions) becomes an
    :class:`OutputError` naming ``path``; an existing ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({os_reason(e)})") from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give results the usual permissions
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({os_reason(e)}); no partial file was left") from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def os_reason(e: OSError) -> str:
    return f"[Errno {e.errno}] {e.strerror}" if e.strerror else " ".join(str(e).split()) or type(e).__name__


def json_text(obj: Any) -> str:
    """The text :func:`write_json` writes (sorted keys, indented, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj))


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_table(table: Any, out_csv: str | os.PathLike, out_md: str | os.PathLike, markdown: str) -> None:
    """Publish ``table`` (a DataFrame) as CSV (floats to 4 decimals, no index) and its Markdown text, both or
    neither: both are written to temp files first, the CSV is renamed into place, then the Markdown."""
    with atomic_path(out_md) as tmp_md:
        tmp_md.write_text(markdown)
        with atomic_path(out_csv) as tmp:
            table.to_csv(tmp, index=False, float_format="%.4f")


def mean_pm_std(mean: float | None, std: float | None, digits: int = 2) -> str:
    """``mean ± std`` with ``digits`` decimals; the mean alone when std is missing (one seed); "" when the mean
    is missing."""
    if mean is None or np.isnan(mean):
        return ""
    if std is None or np.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(title: str, preamble: list[str], cols: list[str], rows: list[list[Any]]) -> list[str]:
    """Lines of a Markdown page: ``# title``, each preamble paragraph, then the table (cells via ``str``)."""
    lines = [f"# {title}", ""]
    for paragraph in preamble:
        lines += [paragraph, ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise IntegrityError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}); the file is corrupt"
        ) from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def save_checkpoint(path: str | os.PathLike, obj: dict, before_publish=None) -> None:
    """``torch.save`` through :func:`atomic_path`. ``before_publish(tmp)`` runs on the complete temp file
    before it is renamed onto ``path`` (e.g. to hash it and write a companion file); if it fails, ``path``
    is not published."""
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (e.g. a full disk) this way
            reason = " ".join(str(e).split())[:300]
            raise OutputError(f"{path}: cannot write checkpoint (disk full?): {reason}") from e
        if before_publish is not None:
            before_publish(tmp)


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6


def _not_a_checkpoint_reason(head: bytes, size: int) -> str | None:
    """Why the first bytes of a file say it cannot be a torch checkpoint (None: it may be one)."""
    if size == 0:
        return "the file is empty"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer file, not the weights: fetch them with `git lfs pull`"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML/XML page, e.g. an error page saved by a failed download"
    if not head.startswith((ZIP_MAGIC, b"\x80")):  # zip archive, or a pre-1.6 (pickle protocol >= 2) file
        return f"neither a torch zip archive nor a pickle: it starts with {head[:16]!r}"
    return None


def torch_load_checked(path: str | os.PathLike, map_location="cpu", what: str = "a zsqpipe checkpoint"):
    """``torch.load(path, weights_only=True)`` whose failure is one IntegrityError line,
    ``<path>: not <what> (<reason>)``: empty, a Git LFS pointer, an HTML page, a truncated archive, or objects
    safe loading refuses. Never torch's multi-line text (whose advice, ``weights_only=False``, would run code
    from a damaged or foreign file)."""
    import pickle
    import warnings

    import torch

    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path}: checkpoint not found" + (" (a directory)" if path.is_dir() else ""))
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    reason = _not_a_checkpoint_reason(head, size)
    if reason is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. torch's multi-line pickle-protocol UserWarning
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            reason = (
                f"it holds a Python object that safe loading (weights_only=True) refuses: {refused.group(1)}"
                if refused
                else "a pickle stream that safe loading cannot read: damaged, or not written by torch.save"
            )
        except Exception as e:  # zip reader / EOF errors of a truncated or damaged file
            first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else ""
            reason = f"truncated or damaged: {type(e).__name__}{': ' + first if first else ''}"
    raise IntegrityError(f"{path}: not {what} ({reason})")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; a missing, truncated or foreign file gives one
    IntegrityError line (:func:`torch_load_checked`)."""
    obj = torch_load_checked(path, map_location)
    if not isinstance(obj, dict):
        raise IntegrityError(f"{path}: not a zsqpipe checkpoint (a {type(obj).__name__}, expected a dict)")
    return obj


def flatten_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out
