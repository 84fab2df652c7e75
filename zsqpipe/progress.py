"""Progress bars for long loops (tqdm on stderr), shown only when stderr is a terminal.

Snakemake jobs redirect stderr to their log, so bars never clutter logs; by hand in a terminal they show
the steps of the current epoch. A bar only counts: it draws no random numbers and changes no result (this
module is left out of code versions, ``zsqpipe.codehash.NON_RESULT_MODULES``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def _interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, **kwargs):
    """``tqdm(iterable)`` on stderr, disabled (a plain pass-through) when stderr is not a TTY; transient
    (``leave=False``) unless told otherwise."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=not _interactive(), **kwargs)
