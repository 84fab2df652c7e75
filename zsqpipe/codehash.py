"""Code versions for Snakemake params: a hash of the source of the modules a stage imports.

Snakemake's code trigger only sees a rule's shell string, never the package code it runs, so each rule
passes ``code_version("zsqpipe.stages.quantize", ...)`` as a param. The import closure is found statically
(``ast``, no imports executed, stdlib only), restricted to the ``zsqpipe`` package.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
PACKAGE = "zsqpipe"
# Modules that cannot change a result (tracking, CLI glue, the Job container, progress bars): left out so editing
# them reruns nothing. (zsqpipe.commands.* are never imported by a stage; the CLI imports the stages, not back.)
# zsqpipe.schema builds the workflow schema from the config dataclasses: what it changes reaches the rules as the
# filled config values in their params (and it imports every plug-in, which would tie each stage to all of them).
NON_RESULT_MODULES = frozenset(
    {"zsqpipe.tracking", "zsqpipe.cli", "zsqpipe.job", "zsqpipe.codehash", "zsqpipe.progress", "zsqpipe.schema"}
)


def module_path(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for cand in (PACKAGE_ROOT / rel / "__init__.py", (PACKAGE_ROOT / rel).with_suffix(".py")):
        if cand.is_file():
            return cand
    return None


@cache
def _direct_imports(module: str) -> frozenset[str]:
    path = module_path(module)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return frozenset(m for m in found if (m == PACKAGE or m.startswith(PACKAGE + ".")) and module_path(m))


def import_closure(*modules: str) -> list[str]:
    """All ``zsqpipe`` modules reachable by imports from ``modules`` (including their parent packages)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen or m in NON_RESULT_MODULES or module_path(m) is None:
            continue
        seen.add(m)
        todo.extend(_direct_imports(m))
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(seen)


def code_version(*modules: str) -> str:
    """SHA-256 (16 hex digits) over the source files in the import closure of ``modules``."""
    h = hashlib.sha256()
    for m in import_closure(*modules):
        h.update(m.encode())
        h.update(module_path(m).read_bytes())
    return h.hexdigest()[:16]
