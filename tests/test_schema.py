"""The workflow schema is built from the config dataclasses (zsqpipe.schema): each key, default and bound is
written once, in the dataclass; the schema, `from_dict` and the workflow all read it from there."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any

import pytest

from zsqpipe import schema as schema_mod
from zsqpipe.config import (
    ConfigError,
    Doc,
    Milestones,
    Nested,
    OneOf,
    PosFloat,
    PosInt,
    Range,
    from_dict,
    validate_config,
)


@dataclass(frozen=True)
class _Inner:
    k: PosInt = 3
    mode: Annotated[str, OneOf("a", "b")] = "a"


@dataclass(frozen=True)
class _Toy:
    steps: PosInt = 20
    lr: Annotated[PosFloat, Doc("the step size")] = 0.1
    frac: Annotated[float | None, Range(ge=0, lt=1)] = None
    kind: Annotated[str, OneOf("x", "y")] = "x"
    flag: bool = True
    milestones: Milestones = (0.5, 0.75)
    names: tuple[str, ...] = ()
    inner: Annotated[dict[str, Any] | None, Nested(_Inner)] = None
    table: dict[str, int] = field(default_factory=dict)


def test_a_dataclass_becomes_its_schema_section():
    s = schema_mod.dataclass_schema(_Toy)
    assert s["type"] == "object" and s["additionalProperties"] is False and s["default"] == {}
    p = s["properties"]
    assert p["steps"] == {"type": "integer", "minimum": 1, "default": 20}
    assert p["lr"] == {"type": "number", "exclusiveMinimum": 0, "description": "the step size", "default": 0.1}
    assert p["frac"] == {"type": ["number", "null"], "minimum": 0, "exclusiveMaximum": 1, "default": None}
    assert p["kind"] == {"enum": ["x", "y"], "default": "x"}
    assert p["flag"] == {"type": "boolean", "default": True}
    assert p["milestones"]["default"] == [0.5, 0.75] and p["milestones"]["items"]["exclusiveMaximum"] == 1
    assert p["names"] == {"type": "array", "items": {"type": "string"}, "default": []}
    assert p["table"] == {"type": "object", "default": {}}
    # a nested config is checked key by key but gets no defaults (its consumer builds it)
    inner = p["inner"]
    assert inner["type"] == ["object", "null"] and inner["default"] is None
    assert inner["properties"] == {"k": {"type": "integer", "minimum": 1}, "mode": {"enum": ["a", "b"]}}
    assert "default" not in schema_mod.dataclass_schema(_Toy, defaults=False)["properties"]["steps"]


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"stepz": 1}, "toy.stepz: unknown key (allowed: "),
        ({"steps": 0}, "toy.steps: 0 is less than the minimum of 1"),
        ({"steps": 2.5}, "toy.steps: 2.5 is not of type 'integer'"),
        ({"lr": True}, "toy.lr: True is not of type 'number'"),
        ({"frac": 1.0}, "toy.frac: 1.0 is greater than or equal to the maximum of 1"),
        ({"kind": "z"}, "toy.kind: 'z' is not one of ['x', 'y']"),
        ({"inner": {"k": 0}}, "toy.inner.k: 0 is less than the minimum of 1"),
        ({"inner": {"q": 1}}, "toy.inner.q: unknown key"),
    ],
)
def test_from_dict_checks_what_the_schema_checks(d, message):
    with pytest.raises(ConfigError) as e:
        from_dict(_Toy, d, "toy")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_from_dict_builds_valid_configs():
    cfg = from_dict(_Toy, {"steps": 5, "milestones": (0.2,), "inner": {"k": 2}, "frac": None}, "toy")
    assert cfg.steps == 5 and cfg.milestones == (0.2,) and cfg.inner == {"k": 2} and cfg.lr == 0.1


def test_the_workflow_schema_takes_each_default_from_its_dataclass():
    """A changed dataclass default is the workflow's default, with no other file touched (built, not copied)."""
    from zsqpipe.methods import get_method

    hast = get_method("hast").Config
    built = schema_mod.build_schema()
    assert built["properties"]["methods"]["properties"]["hast"]["properties"]["lr"]["default"] == hast().lr
    assert validate_config({})["methods"]["hast"]["lr"] == hast().lr
    skeleton = schema_mod.SKELETON_PATH.read_text()
    assert "x-plugins: methods" in skeleton and "default: 0.00025" not in skeleton


def test_a_new_method_needs_no_schema_edit(monkeypatch):
    """Adding a method = its module (+ the name in zsqpipe.names): its settings, defaults and bounds reach the
    schema, the variants' base-method enum and the workflow validation without editing the schema."""
    from zsqpipe import names
    from zsqpipe.methods.base import METHODS, Method, register_method

    @dataclass(frozen=True)
    class ToyConfig:
        epochs: PosInt = 2
        sharpness: Annotated[float, Range(ge=0, le=1)] = 0.5

    monkeypatch.setattr(names, "METHOD_NAMES", (*names.METHOD_NAMES, "toy"))
    monkeypatch.setattr(METHODS, "declared", names.METHOD_NAMES)
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))

    @register_method("toy")
    class Toy(Method):
        Config = ToyConfig

    built = schema_mod.build_schema()
    monkeypatch.setattr(schema_mod, "load_schema", lambda skeleton=None: json.loads(json.dumps(built)))
    cfg = validate_config({"variants": {"toy_sharp": {"method": "toy", "methods": {"sharpness": 0.9}}}})
    assert cfg["methods"]["toy"] == {"epochs": 2, "sharpness": 0.5}
    with pytest.raises(ConfigError, match=r"variants\.toy_sharp\.methods\.sharpness"):
        validate_config({"variants": {"toy_sharp": {"method": "toy", "methods": {"sharpness": 2}}}})
    with pytest.raises(ConfigError, match=r"'methods\.toy\.epochs'"):
        validate_config({"methods": {"toy": {"epochs": 0}}})


def test_the_built_schema_is_cached_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSQPIPE_CACHE_DIR", str(tmp_path))
    first = schema_mod.load_schema()
    files = list(tmp_path.glob("config.schema.*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == first
    files[0].write_text(json.dumps({"marker": True}))  # a cache hit reads the file, builds nothing
    assert schema_mod.load_schema() == {"marker": True}
    monkeypatch.setattr(schema_mod, "source_key", lambda skeleton=None: "changed")  # edited sources: rebuilt
    assert schema_mod.load_schema() == first and (tmp_path / "config.schema.changed.json").is_file()


def test_schema_cli_prints_the_full_schema(capsys):
    import yaml

    assert schema_mod.main([]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(schema_mod.build_schema()))
