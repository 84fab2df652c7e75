"""One registry type for every plug-in table: methods, synthesizers, NAS strategies, quantizers, models, datasets.

Modelled on timm's ``_registry``: the decorator (or :meth:`Registry.add`) is the only place an entry is written;
the list of names is derived from the entries. Where the names must be known without importing torch (the
Snakefile's wildcard constraints and the config schema's enums, ``zsqpipe.names``), the registry is given those
``declared`` names and a ``module`` pattern: an entry is imported on first use, and registering a name that
is not declared fails at import (so the two lists cannot drift apart).

No torch import here: ``zsqpipe.names`` and the Snakefile stay light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from zsqpipe.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> entry``. ``what``: the entry kind in messages ("method", "quantizer", ...); ``key``: the
    config key named in the one-line error for an unknown name (default: ``what``); ``declared``: the names
    that may be registered (lazy import through ``module``, e.g. ``"zsqpipe.methods.{}"``); ``error``: the
    exception type of an unknown name."""

    def __init__(self, what: str, *, key: str | None = None, declared: tuple[str, ...] | None = None,
                 module: str | None = None, error: type[Exception] = ConfigError):  # fmt: skip
        self.what, self.key, self.declared, self.module, self.error = what, key or what, declared, module, error
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        if self.declared is not None and name not in self.declared:
            raise ValueError(f"{self.what} {name!r} is not declared in zsqpipe.names ({list(self.declared)})")
        self._entries[name] = entry
        return entry

    def register(self, name: str | None = None, wrap: Callable[[str, Any], T] | None = None):
        """Decorator: register the decorated object under ``name`` (default: its ``__name__``), or what
        ``wrap(name, obj)`` makes of it; the decorated object itself is returned unchanged."""

        def deco(obj):
            key = name or obj.__name__
            self.add(key, wrap(key, obj) if wrap is not None else obj)
            return obj

        return deco

    def names(self) -> list[str]:
        """Every name: the declared ones in their order, else the registered ones sorted."""
        return list(self.declared) if self.declared is not None else sorted(self._entries)

    def get(self, name: str, key: str | None = None) -> T:
        """The entry of ``name``; an unknown name raises ``error`` in one line naming ``key`` and the choices."""
        if name not in self.names():
            raise self.error(f"{key or self.key}: unknown {self.what} {name!r}; expected one of {self.names()}")
        if name not in self._entries and self.module is not None:
            importlib.import_module(self.module.format(name))
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()
