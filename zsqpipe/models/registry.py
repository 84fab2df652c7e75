"""A small timm-like model registry."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name; ``fn(num_classes, in_channels, image_size)`` builds the model."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def available_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build the registered architecture ``name`` with freshly initialised weights."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; expected one of {available_models()}")
    return _MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
