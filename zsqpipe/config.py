"""Typed stage configs (dataclasses that serialise to plain dicts) and config validation.

The workflow config (``config/*.yaml``) is validated against the JSON schema that ``zsqpipe.schema`` builds from
``workflow/schemas/config.schema.yaml`` and the config dataclasses (defaults are filled in). Each rule passes its
slice of the config to its stage as JSON through ``params:``; the stage turns it into one of these dataclasses,
validated against the same schema section, so a stage run by hand is as strict as one run by Snakemake.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from zsqpipe.errors import ConfigError

T = TypeVar("T")

# the hand-written part of the schema; zsqpipe.schema adds the sections built from the config dataclasses
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


# ----------------------------------------------------------------------------------------------------------
# Field specs: a config dataclass is the one source of its keys, defaults and constraints. Constraints and
# descriptions ride in ``typing.Annotated`` (``epochs: PosInt = 2``); ``zsqpipe.schema`` turns a dataclass into
# its JSON-schema section (the workflow schema's per-method/-synthesizer/-strategy/-stage sections are built that
# way) and :func:`from_dict` validates against the same section, so a stage run by hand is as strict as Snakemake.


@dataclass(frozen=True)
class Spec:
    """JSON-schema keywords of a config field, used inside ``typing.Annotated``; ``nested``: a dataclass whose
    fields are the keys of a dict-valued field (checked, no defaults filled: the consumer builds it)."""

    keywords: tuple[tuple[str, Any], ...] = ()
    nested: Any = None

    def schema(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self.keywords))


def Schema(**keywords: Any) -> Spec:  # noqa: N802 - reads like a type in annotations
    return Spec(tuple(keywords.items()))


def Range(
    ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> Spec:  # noqa: N802
    """Bounds of a number (JSON schema minimum / exclusiveMinimum / maximum / exclusiveMaximum)."""
    kw = {"minimum": ge, "exclusiveMinimum": gt, "maximum": le, "exclusiveMaximum": lt}
    return Schema(**{k: v for k, v in kw.items() if v is not None})


def OneOf(*values: Any) -> Spec:  # noqa: N802
    return Schema(enum=list(values))


def Doc(text: str) -> Spec:  # noqa: N802
    return Schema(description=text)


def Nested(cls: Any) -> Spec:  # noqa: N802
    return Spec(nested=cls)


PosInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Prob = Annotated[float, Range(ge=0, le=1)]  # a probability / fraction in [0, 1]
Momentum = Annotated[float, Range(ge=0, lt=1)]  # an EMA / SGD momentum in [0, 1)
Optimizer = Annotated[str, OneOf("sgd", "adam")]
Schedule = Annotated[str, OneOf("onecycle", "cosine", "step", "constant")]
Milestones = Annotated[
    tuple[float, ...],
    Schema(items={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
           description="schedule 'step': LR x 0.1 at these fractions of training"),
]  # fmt: skip
AUGMENTS = ("rrc", "crop_flip", "none")  # rrc: RandomResizedCrop + flip; crop_flip: pad-crop + flip
Augment = Annotated[str, OneOf(*AUGMENTS)]


def from_dict(cls: type[T], d: dict[str, Any] | None, prefix: str) -> T:
    """Build dataclass ``cls`` from ``d``, validated against the dataclass's own schema section (unknown keys,
    types, bounds, choices); an invalid value raises a one-line ConfigError naming ``prefix.<key>``."""
    import jsonschema

    from zsqpipe.schema import dataclass_schema, tuple_fields

    d = dict(d or {})
    schema = dataclass_schema(cls, defaults=False)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(as_json(d)))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        raise ConfigError(_error_line(err, prefix))
    missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}: required key is missing")
    return cls(**{k: tuple(v) if k in tuple_fields(cls) and isinstance(v, list) else v for k, v in d.items()})


class ConfigBase:
    """Base of the config dataclasses: one :meth:`from_dict` (:func:`from_dict`: validated against the class's
    schema section, JSON lists back to tuples where a field is a tuple) and one :meth:`to_dict` (a plain,
    JSON-ready dict). ``prefix`` is how the class's own ``__post_init__`` errors name keys; ``from_dict`` with
    another prefix renames them, so an error names the key as the caller's config spells it."""

    prefix: ClassVar[str] = "config"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None = None, prefix: str | None = None):
        prefix = prefix or cls.prefix
        try:
            return from_dict(cls, d, prefix)
        except ConfigError as err:
            msg = str(err)
            if prefix != cls.prefix and msg.startswith(cls.prefix + "."):
                msg = prefix + msg[len(cls.prefix) :]
            raise ConfigError(msg) from None

    def to_dict(self) -> dict[str, Any]:
        return as_json(asdict(self))


def as_json(value: Any) -> Any:
    """Tuples as lists (JSON schema's arrays), recursively: what a config dict looks like after a JSON trip."""
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value


@dataclass(frozen=True)
class DataConfig(ConfigBase):
    prefix = "data"  # how its errors name keys (ConfigBase.from_dict renames)
    data_dir: Annotated[str, Doc("Where datasets are looked for first.")] = "data"
    allow_download: Annotated[bool, Doc("Let torchvision download missing data.")] = False
    val_size: Annotated[NonNegInt, Doc("Training images held out for validation.")] = 5000
    split_seed: NonNegInt = 0
    test_subset: Annotated[
        PosInt | None,
        Doc("Evaluate on the first N test images only (smoke tests); null = the full test set."),
    ] = None


@dataclass(frozen=True)
class FPConfig(ConfigBase):
    """Full-precision training recipe (or ``checkpoint``: load a local file instead of training)."""

    prefix = "fp_model"  # how its errors name keys (ConfigBase.from_dict renames)

    checkpoint: str | None = None
    epochs: PosInt = 2
    max_steps_per_epoch: Annotated[
        PosInt | None, Doc("Cap on optimizer steps per epoch (smoke tests); null = full epochs.")
    ] = None
    batch_size: PosInt = 128
    optimizer: Optimizer = "sgd"
    lr: PosFloat = 0.2
    momentum: Prob = 0.9
    nesterov: bool = True
    weight_decay: NonNegFloat = 5e-4
    schedule: Schedule = "onecycle"
    warmup_frac: Prob = 0.15
    milestones: Milestones = (0.5, 0.75)  # schedule "step": LR x 0.1 at these fractions of training
    label_smoothing: Prob = 0.1
    augment: bool = False
    seed: NonNegInt = 0
    eval_batch_size: PosInt = 1000
    channels_last: bool = True
    deterministic: bool = True
    grad_quant: Annotated[
        dict[str, Any] | None,
        Nested("zsqpipe.gradquant:GradQuantConfig"),
        Doc("LBT gradient quantization (docs/methods/lbt.md), e.g. {bits: 4}; null = FP gradients"),
    ] = None


# ----------------------------------------------------------------------------------------------------------
# Workflow config validation (used by workflow/rules/common.smk and by the tests)


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


def _error_line(err, prefix: str | None = None) -> str:
    """One line for a jsonschema error: ``config key 'a.b': ...`` (workflow config), or ``prefix.a.b: ...``
    (a stage config built by :func:`from_dict`)."""
    key, message = _error_parts(err)
    if prefix is not None:
        return f"{prefix}.{key}: {message}" if key != "<top level>" else f"{prefix}: {message}"
    return f"config key '{key}': {message}"


def _error_parts(err) -> tuple[str, str]:
    path = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        key = f"{path}.{extra[0]}" if path != "<top level>" else extra[0]
        return key, f"unknown key (allowed: {', '.join(sorted(err.schema.get('properties', {})))})"
    if err.validator == "enum":
        return path, f"{err.instance!r} is not one of {err.validator_value}"
    if err.validator in ("pattern", "anyOf", "oneOf") and err.schema.get("description"):
        return path, f"{err.instance!r} is invalid; expected {err.schema['description']}"
    if err.validator in ("anyOf", "oneOf"):  # jsonschema says only "not valid under any of the given schemas"
        options = " or ".join(_describe(sub) for sub in err.validator_value)
        return path, f"{err.instance!r} is invalid; expected {options}"
    return path, err.message


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

    from zsqpipe.schema import load_schema

    schema = load_schema(schema_path)
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


def resolve_checkpoint(path: str | os.PathLike, base: str | os.PathLike = ".",
                       repo: str | os.PathLike | None = None) -> Path:
    """Where an ``fp_model.checkpoints`` entry points: absolute as given; a relative one from ``base`` (the
    workflow's working directory) when the file is there, else from ``repo`` (the workflow's checkout, whose
    ``checkpoints/`` ships the default's FP model) when it is there."""
    path, local = Path(path), Path(base) / path
    if path.is_absolute() or local.exists() or repo is None or not (Path(repo) / path).is_file():
        return local
    return Path(repo) / path


def check_config_paths(config: dict, base: str | os.PathLike = ".", repo: str | os.PathLike | None = None) -> None:
    """Every file or folder a (validated) config names must exist, relative paths read from ``base`` (the
    workflow's working directory): each ``fp_model.checkpoints`` entry (keyed ``<dataset>/<arch>``) a file
    (there or, failing that, in ``repo``: ``resolve_checkpoint``),
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
        if path is None:  # null: train (overrides a checkpoint an earlier config file names)
            continue
        full = resolve_checkpoint(path, base, repo)
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
        if any(variant.get(k) is not None for k in ("inputs_seed", "samples_seed", "warmup_seed")):
            from zsqpipe.warmups import warmup_spec

            settings = {**instance.get("methods", {}).get(base, {}), **variant.get("methods", {})}
            has = {"samples_seed": base in METHOD_SYNTHESIZER, "warmup_seed": warmup_spec(base, settings) is not None}
            has["inputs_seed"] = has["samples_seed"] or has["warmup_seed"]
            what = {"inputs_seed": "reads no synthetic samples and replays no generator warm-up, so there is no "
                                   "input to fix",
                    "samples_seed": "reads no synthetic samples", "warmup_seed": "replays no generator warm-up"}
            for k in ("inputs_seed", "samples_seed", "warmup_seed"):
                if variant.get(k) is not None and not has[k]:
                    raise ConfigError(f"config key 'variants.{name}.{k}': method {base!r} {what[k]}")
        for section, key in parts:
            section_schema = props[section] if key is None else props[section]["properties"].get(key, {})
            sub_schema = {"type": "object", **section_schema, "definitions": schema["definitions"]}
            current = instance[section] if key is None else instance[section].get(key, {})
            merged = {**current, **variant.get(section, {})}
            errors = list(jsonschema.Draft202012Validator(sub_schema).iter_errors(merged))
            if errors:
                key, message = _error_parts(jsonschema.exceptions.best_match(errors))
                raise ConfigError(f"config key 'variants.{name}.{section}.{key}': {message}")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces): the form params take so Snakemake compares them stably."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
