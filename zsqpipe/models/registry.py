"""A small timm-like model registry."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from zsqpipe.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", key="archs")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name; ``fn(num_classes, in_channels, image_size)`` builds the model."""
    return MODELS.register()(fn)


def available_models() -> list[str]:
    return MODELS.names()


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build the registered architecture ``name`` with freshly initialised weights."""
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
