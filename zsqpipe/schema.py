"""The workflow config schema, built from the config dataclasses (each key, default and constraint written once).

``workflow/schemas/config.schema.yaml`` is the hand-written part: the workflow's own keys (tables, variants,
deploy, the NAS/supernet/OQAT sections' lists) and markers where a section comes from code:

- ``x-dataclass: "module:Class"`` — the section is that dataclass: one property per field with its type,
  bounds, choices and description (``typing.Annotated`` specs, ``zsqpipe.config``) and its default.
  ``x-exclude: [...]`` leaves fields out (set elsewhere, e.g. the cell's bits); ``x-only: [...]`` keeps some;
  ``x-defaults: false`` leaves the defaults out (overrides of another section); the node's own ``properties``
  and keywords are kept beside (or over) the generated ones.
- ``x-plugins: methods | synthesis | strategies`` — one such section per registered method / synthesizer /
  NAS strategy, from its config dataclass.
- ``x-names: methods | datasets | archs | strategies | nb201_datasets`` — an ``enum`` of the registered names.

Building imports the plug-ins (torch), so :func:`load_schema` caches the result under the user cache folder,
keyed by a hash of the package's sources and the skeleton: the Snakefile reads the cache at parse time and
rebuilds it (a few seconds) only after the code changed. ``python -m zsqpipe.schema`` prints the full schema.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import sys
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

from zsqpipe.config import SCHEMA_PATH as SKELETON_PATH  # the hand-written part
from zsqpipe.config import Spec, as_json

PACKAGE_ROOT = Path(__file__).resolve().parent

_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", dict: "object", list: "array",
               tuple: "array", typing.Any: None}  # fmt: skip


def _unwrap(hint: Any) -> tuple[Any, list[Spec], bool]:
    """``Annotated[X | None, spec, ...]`` (nested any way) -> (X, its Specs outermost last, nullable)."""
    specs: list[Spec] = []
    nullable = False
    while True:
        origin = typing.get_origin(hint)
        if origin is typing.Annotated:
            hint, *meta = typing.get_args(hint)
            specs = [m for m in meta if isinstance(m, Spec)] + specs
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(hint))
            if len(args) != 1:
                raise TypeError(f"unsupported union {hint!r}")
            hint = args[0]
        else:
            return hint, specs, nullable


def field_schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of one annotated field type: ``int | None`` -> ``{type: [integer, "null"]}``, plus the
    keywords of its ``Spec`` annotations (bounds, enum, description, raw keywords) and nested dataclasses (their
    keys checked, no defaults: the consumer builds them)."""
    hint, specs, nullable = _unwrap(hint)
    origin = typing.get_origin(hint) or hint
    schema: dict[str, Any] = {}
    json_type = _JSON_TYPES.get(origin)
    if json_type is None and origin is not typing.Any:
        raise TypeError(f"unsupported config field type {hint!r}")
    if json_type == "array":
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if args and _JSON_TYPES.get(typing.get_origin(args[0]) or args[0]):
            schema["items"] = {"type": _JSON_TYPES[typing.get_origin(args[0]) or args[0]]}
    if json_type is not None:
        schema["type"] = [json_type, "null"] if nullable else json_type
    for spec in specs:
        if spec.nested is not None:
            schema.update(dataclass_schema(_resolve(spec.nested), defaults=False))
            if nullable:
                schema["type"] = ["object", "null"]
        schema.update(spec.schema())
    if {"enum", "anyOf", "const"} & set(schema):  # the choices say it all (null among them where allowed)
        schema.pop("type", None)
        if nullable and "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
    return schema


@cache
def tuple_fields(cls: type) -> frozenset[str]:
    """The fields of config dataclass ``cls`` typed as tuples (JSON gives them as lists)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return frozenset(name for name, hint in hints.items() if typing.get_origin(_unwrap(hint)[0]) is tuple)


def _resolve(ref: Any) -> Any:
    if isinstance(ref, str):
        module, _, name = ref.partition(":")
        return getattr(importlib.import_module(module), name)
    return ref


@cache
def _dataclass_schema(
    cls: type, defaults: bool, exclude: tuple[str, ...], only: tuple[str, ...] | None
) -> str:
    hints = typing.get_type_hints(cls, include_extras=True)
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or (only is not None and f.name not in only) or not f.init:
            continue
        prop = field_schema(hints[f.name])
        if defaults and f.default is not dataclasses.MISSING:
            prop["default"] = as_json(f.default)
        elif defaults and f.default_factory is not dataclasses.MISSING:
            prop["default"] = as_json(f.default_factory())
        props[f.name] = prop
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if defaults:
        schema["default"] = {}
    return json.dumps(schema)


def dataclass_schema(cls: type, *, defaults: bool = True, exclude: tuple[str, ...] = (),
                     only: tuple[str, ...] | None = None) -> dict[str, Any]:  # fmt: skip
    """The JSON-schema section of config dataclass ``cls``: an object with one property per field (unknown keys
    rejected), each with its default unless ``defaults`` is false."""
    return json.loads(
        _dataclass_schema(cls, defaults, tuple(exclude), tuple(only) if only is not None else None)
    )


def _plugin_configs(kind: str) -> dict[str, type]:
    if kind == "methods":
        from zsqpipe.methods import get_method
        from zsqpipe.names import METHOD_NAMES

        return {name: get_method(name).Config for name in METHOD_NAMES}
    if kind == "synthesis":
        from zsqpipe.names import SYNTHESIZER_NAMES
        from zsqpipe.zsq.synthesis import get_synthesizer

        return {name: get_synthesizer(name)[1] for name in SYNTHESIZER_NAMES}
    if kind == "strategies":
        from zsqpipe.nas.strategies import STRATEGY_NAMES, get_strategy

        return {name: get_strategy(name).config for name in STRATEGY_NAMES}
    raise ValueError(f"x-plugins: unknown plug-in kind {kind!r}")


def _names(kind: str) -> list[str]:
    """The registered names of a plug-in kind (declared without torch in ``zsqpipe.names`` and friends)."""
    from zsqpipe import names

    if kind == "nb201_datasets":
        from zsqpipe.nas.benchmark import DATASETS

        return list(DATASETS)
    if kind == "strategies":
        from zsqpipe.nas.strategies import STRATEGY_NAMES

        return list(STRATEGY_NAMES)
    table = {"datasets": names.DATASET_NAMES, "archs": names.ARCH_NAMES, "methods": names.METHOD_NAMES}
    if kind not in table:
        raise ValueError(f"x-names: unknown kind {kind!r}")
    return list(table[kind])


def _expand(node: Any) -> Any:
    if isinstance(node, list):
        return [_expand(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _expand(v) for k, v in node.items()}
    if "x-names" in node:
        node = {"enum": _names(node.pop("x-names")), **node}
    if "x-dataclass" in node:
        cls = _resolve(node.pop("x-dataclass"))
        only = node.pop("x-only", None)
        gen = dataclass_schema(cls, defaults=node.pop("x-defaults", True), exclude=tuple(node.pop("x-exclude", ())),
                               only=tuple(only) if only is not None else None)  # fmt: skip
        own = node.get("properties", {})
        props = {k: {**gen["properties"].get(k, {}), **own.get(k, {})} for k in {**gen["properties"], **own}}
        node = {**gen, **node, "properties": props}  # the skeleton's keywords refine the generated ones
    if "x-plugins" in node:
        configs = _plugin_configs(node.pop("x-plugins"))
        gen = {"type": "object", "additionalProperties": False, "default": {},
               "properties": {name: dataclass_schema(cls) for name, cls in configs.items()}}  # fmt: skip
        node = {**gen, **node, "properties": {**gen["properties"], **node.get("properties", {})}}  # own wins
    return node


def build_schema(skeleton: Path = SKELETON_PATH) -> dict[str, Any]:
    """The full workflow schema: the skeleton with every ``x-dataclass`` / ``x-plugins`` marker expanded."""
    import yaml

    return _expand(yaml.safe_load(skeleton.read_text()))


def source_key(skeleton: Path = SKELETON_PATH) -> str:
    """A hash of everything the built schema depends on: the skeleton and the package's Python sources."""
    h = hashlib.sha256(skeleton.read_bytes())
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    base = os.environ.get("ZSQPIPE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "zsqpipe"
    )
    return Path(base)


def load_schema(skeleton: Path = SKELETON_PATH) -> dict[str, Any]:
    """The full schema, from the cache when the sources are unchanged (else built and cached atomically)."""
    if skeleton != SKELETON_PATH:
        return build_schema(skeleton)
    key = source_key(skeleton)
    path = cache_dir() / f"config.schema.{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    schema = build_schema(skeleton)
    if source_key(skeleton) != key:  # the sources changed while building: do not cache a mix
        return schema
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(schema))
        os.replace(tmp, path)
    except OSError:  # a read-only cache folder costs only time
        pass
    return schema


def main(argv: list[str] | None = None) -> int:
    """``python -m zsqpipe.schema``: print the full workflow schema (YAML) as the workflow validates with it."""
    import yaml

    argv = sys.argv[1:] if argv is None else argv
    if argv:
        print("usage: python -m zsqpipe.schema  (prints the full config schema)", file=sys.stderr)
        return 2
    try:
        yaml.safe_dump(build_schema(), sys.stdout, sort_keys=False, width=120)
        sys.stdout.flush()
    except BrokenPipeError:  # piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
