"""The one registry type (zsqpipe/registry.py) behind methods, synthesizers, strategies, quantizers, models and
datasets: declared names, lazy import, one-line errors, no drift between zsqpipe.names and the entries."""

import pytest

from zsqpipe.errors import ConfigError, DataError
from zsqpipe.registry import Registry


def test_register_get_and_errors():
    r = Registry("widget", key="things.widget")

    @r.register()
    def small():
        return 1

    r.add("big", 2)
    assert r.get("small") is small and r["big"] == 2 and r.names() == ["big", "small"]
    assert "big" in r and "huge" not in r and len(r) == 2 and list(r) == ["big", "small"]
    with pytest.raises(
        ConfigError, match=r"^things.widget: unknown widget 'huge'; expected one of \['big', 'small'\]$"
    ):
        r.get("huge")
    with pytest.raises(ConfigError, match=r"^other.key: unknown widget"):
        r.get("huge", key="other.key")
    with pytest.raises(ValueError, match="registered twice"):
        r.add("big", 3)


def test_declared_names_bound_what_can_register_and_load_lazily():
    r = Registry("method", declared=("a", "b"), module="zsqpipe.methods.{}")
    r.register("a", wrap=lambda name, obj: (name, obj))(len)
    assert r.get("a") == ("a", len) and r.names() == ["a", "b"]
    with pytest.raises(ValueError, match="not declared in zsqpipe.names"):
        r.add("c", 1)


def test_every_shipped_registry_is_one_type_and_matches_the_declared_names():
    from zsqpipe.data import DATASETS, dataset_info
    from zsqpipe.methods.base import METHODS
    from zsqpipe.models.registry import MODELS
    from zsqpipe.names import ARCH_NAMES, DATASET_NAMES, METHOD_NAMES, SYNTHESIZER_NAMES
    from zsqpipe.nas.strategies.base import STRATEGIES, STRATEGY_NAMES
    from zsqpipe.quant.quantizers import QUANTIZERS
    from zsqpipe.zsq.synthesis import SYNTHESIZERS

    for reg in (DATASETS, METHODS, MODELS, STRATEGIES, QUANTIZERS, SYNTHESIZERS):
        assert isinstance(reg, Registry)
    for reg, names in ((METHODS, METHOD_NAMES), (SYNTHESIZERS, SYNTHESIZER_NAMES), (STRATEGIES, STRATEGY_NAMES),
                       (DATASETS, DATASET_NAMES)):  # fmt: skip
        assert reg.names() == list(names)
        for name in names:  # every declared entry loads (lazily, from its module)
            assert reg.get(name) is not None
    assert set(ARCH_NAMES) <= set(MODELS.names())
    with pytest.raises(DataError, match="datasets: unknown dataset 'svhn'"):
        dataset_info("svhn")
