"""Model registry: ``create_model(name, num_classes=..., in_channels=..., image_size=...)`` (timm-style)."""

from zsqpipe.models.registry import available_models, create_model, register_model

# Importing the families registers their entry points.
from zsqpipe.models import resnet_cifar, torchvision_models  # noqa: E402,F401  isort: skip

__all__ = ["available_models", "create_model", "register_model"]
