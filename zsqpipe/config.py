"""Typed stage configs (dataclasses that serialise to plain dicts) and config validation.

The workflow config (``config/*.yaml``) is validated against ``workflow/schemas/config.schema.yaml`` (JSON
Schema; defaults are filled in). Each rule passes its slice of the config to its stage as JSON through
``params:``; the stage turns it into one of these dataclasses, which rejects unknown keys again, so a stage
run by hand is as strict as one run by Snakemake.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from zsqpipe.errors import ConfigError

T = TypeVar("T")

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


def from_dict(cls: type[T], d: dict[str, Any] | None, prefix: str) -> T:
    """Build dataclass ``cls`` from ``d``; unknown keys and wrong types raise a one-line ConfigError."""
    d = dict(d or {})
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key; expected one of {sorted(names)}")
    for name, f in names.items():
        if name not in d:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{prefix}.{name}: required key is missing")
            continue
        _check_type(f"{prefix}.{name}", d[name], f.type)
    return cls(**d)


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_type(key: str, value: Any, annotation: Any) -> None:
    ann = str(annotation).replace(" ", "")
    options = ann.split("|")
    if value is None:
        if "None" in options:
            return
        raise ConfigError(f"{key}: expected {ann}, got null")
    options = [opt for opt in options if opt != "None"]  # null was handled above
    if any(opt not in _TYPES for opt in options):
        return  # containers and other types: checked by the schema / the consumer
    for opt in options:
        if isinstance(value, bool) and opt != "bool":
            continue
        if isinstance(value, _TYPES[opt]):
            return
    raise ConfigError(f"{key}: expected {ann}, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = "data"
    allow_download: bool = False
    val_size: int = 5000
    split_seed: int = 0
    test_subset: int | None = None  # use only the first N test images (smoke tests); null = the full test set


@dataclass(frozen=True)
class FPConfig:
    """Full-precision training recipe (or ``checkpoint``: load a local file instead of training)."""

    checkpoint: str | None = None
    epochs: int = 2
    max_steps_per_epoch: int | None = (
        None  # cap on optimizer steps per epoch (smoke tests); null = full epochs
    )
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_frac: float = 0.15
    milestones: tuple[float, ...] = (0.5, 0.75)  # schedule "step": LR x 0.1 at these fractions of training
    label_smoothing: float = 0.1
    augment: bool = False
    seed: int = 0
    eval_batch_size: int = 1000
    channels_last: bool = True
    deterministic: bool = True
    grad_quant: dict[str, Any] | None = None  # zsqpipe.gradquant.GradQuantConfig fields; None = FP gradients

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------
# Workflow config validation (used by workflow/rules/common.smk and by the tests)


def _load_schema(path: Path = SCHEMA_PATH) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def _fill_defaults(schema: dict, instance: Any) -> None:
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(sub, instance[key])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in schema.get("properties", {}):
                _fill_defaults(extra, value)


def _error_line(err) -> str:
    path = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        key = f"{path}.{extra[0]}" if path != "<top level>" else extra[0]
        return f"config key '{key}': unknown key (allowed: {', '.join(sorted(err.schema.get('properties', {})))})"
    if err.validator == "enum":
        return f"config key '{path}': {err.instance!r} is not one of {err.validator_value}"
    if err.validator in ("pattern", "anyOf", "oneOf") and err.schema.get("description"):
        return f"config key '{path}': {err.instance!r} is invalid; expected {err.schema['description']}"
    if err.validator in ("anyOf", "oneOf"):  # jsonschema says only "not valid under any of the given schemas"
        options = " or ".join(_describe(sub) for sub in err.validator_value)
        return f"config key '{path}': {err.instance!r} is invalid; expected {options}"
    return f"config key '{path}': {err.message}"


_ARTICLE = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "a boolean",
            "array": "an array", "object": "an object", "null": "null"}  # fmt: skip


def _describe(sub: dict) -> str:
    """A short English description of a (sub)schema, for anyOf/oneOf errors without a description."""
    if "const" in sub:
        return "null" if sub["const"] is None else repr(sub["const"])
    if "enum" in sub:
        return f"one of {sub['enum']}"
    kind = sub.get("type")
    if isinstance(kind, list):
        return " or ".join(_ARTICLE.get(k, k) for k in kind)
    text = _ARTICLE.get(kind, "a value") if kind else "a value"
    lo, hi = sub.get("minimum"), sub.get("maximum")
    if lo is not None and hi is not None:
        text += f" in {lo}..{hi}"
    elif lo is not None:
        text += f" >= {lo}"
    elif hi is not None:
        text += f" <= {hi}"
    if "pattern" in sub:
        text += f" matching {sub['pattern']}"
    return text


def validate_config(config: dict, schema_path: Path = SCHEMA_PATH) -> dict:
    """Validate ``config`` against the workflow schema, fill defaults, and return it.

    Raises :class:`ConfigError` with one line naming the offending key.
    """
    import jsonschema

    schema = _load_schema(schema_path)
    instance = copy.deepcopy(config)
    _fill_defaults(schema, instance)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(
        validator.iter_errors(instance), key=lambda e: (len(e.absolute_path), str(e.absolute_path))
    )
    if errors:
        raise ConfigError(_error_line(jsonschema.exceptions.best_match(errors)))
    _validate_variants(schema, instance)
    _validate_tables(instance)
    return instance


def check_config_paths(config: dict, base: str | os.PathLike = ".") -> None:
    """Every file or folder a (validated) config names must exist, relative paths read from ``base`` (the
    workflow's working directory): each ``fp_model.checkpoints`` entry (keyed ``<dataset>/<arch>``) a file,
    ``data.data_dir`` a folder when it is not the default ``data`` and downloads are off. A ConfigError line
    names the key and the path (Snakemake would otherwise treat an existing fp.pt whose checkpoint input is
    missing as a source file and keep reporting the old model)."""
    from zsqpipe.names import ARCH_NAMES, DATASET_NAMES

    base = Path(base)
    for key, path in config["fp_model"]["checkpoints"].items():
        dataset, _, arch = key.partition("/")
        if dataset not in DATASET_NAMES or arch not in ARCH_NAMES:
            raise ConfigError(
                f"config key 'fp_model.checkpoints.{key}': expected a '<dataset>/<arch>' key, dataset one of "
                f"{list(DATASET_NAMES)}, arch one of {list(ARCH_NAMES)}"
            )
        full = base / path
        if not full.is_file():
            what = "is a folder, expected a checkpoint file" if full.is_dir() else "no such file"
            raise ConfigError(f"config key 'fp_model.checkpoints.{key}': {path}: {what}")
    data = config["data"]
    explicit = data["data_dir"] != DataConfig.data_dir and not data["allow_download"]
    if explicit and not (base / data["data_dir"]).is_dir():
        raise ConfigError(
            f"config key 'data.data_dir': {data['data_dir']}: no such folder (or set data.allow_download: true)"
        )


def _validate_tables(instance: dict) -> None:
    from zsqpipe.names import METHOD_NAMES

    known = list(METHOD_NAMES) + list(instance.get("variants", {}))
    for table, t in instance["tables"].items():
        if t.get("archs") is None:
            t["archs"] = list(instance["archs"])
        for i, m in enumerate(t["methods"]):
            if m not in known:
                raise ConfigError(
                    f"config key 'tables.{table}.methods.{i}': {m!r} is not a method or variant {known}"
                )


def _validate_variants(schema: dict, instance: dict) -> None:
    """Each variant's overrides must be valid settings of its base method / synthesizer."""
    import jsonschema

    from zsqpipe.names import METHOD_SYNTHESIZER

    props = schema["properties"]
    for name, variant in instance.get("variants", {}).items():
        base = variant["method"]
        parts = [("methods", base)]
        if variant.get("synthesis"):
            if base not in METHOD_SYNTHESIZER:
                raise ConfigError(
                    f"config key 'variants.{name}.synthesis': method {base!r} has no synthesizer"
                )
            parts.append(("synthesis", METHOD_SYNTHESIZER[base]))
        if variant.get("quant"):
            parts.append(("quant", None))
        for section, key in parts:
            section_schema = props[section] if key is None else props[section]["properties"].get(key, {})
            sub_schema = {"type": "object", **section_schema, "definitions": schema["definitions"]}
            current = instance[section] if key is None else instance[section].get(key, {})
            merged = {**current, **variant.get(section, {})}
            errors = list(jsonschema.Draft202012Validator(sub_schema).iter_errors(merged))
            if errors:
                err = jsonschema.exceptions.best_match(errors)
                line = _error_line(err).split(": ", 1)[1]
                where = ".".join(str(p) for p in err.absolute_path)
                if err.validator == "additionalProperties":
                    where = sorted(set(err.instance) - set(err.schema.get("properties", {})))[0]
                raise ConfigError(f"config key 'variants.{name}.{section}.{where}': {line}")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces): the form params take so Snakemake compares them stably."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
