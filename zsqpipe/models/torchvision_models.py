"""torchvision ResNet-18 and MobileNetV2, adapted to small inputs and any channel count.

Parameter names stay torchvision's, so a local torchvision ImageNet checkpoint loads for 224x224 / 3-channel
use. For inputs of 64 px or less (CIFAR, Fashion-MNIST) the stem is made CIFAR-style: ResNet-18 gets a 3x3
stride-1 first conv and no max-pool, MobileNetV2 a stride-1 first conv (the usual CIFAR adaptations).
Each ReLU module is used exactly once, so quantize_model() gives every activation its own quantizer
(torchvision's BasicBlock calls ``self.relu`` twice; we split it into ``relu`` and ``relu_out``).
"""

from __future__ import annotations

import types

from torch import nn

from zsqpipe.models.registry import register_model

# torchvision is imported inside the builders: it costs seconds at start-up and most jobs never need it.

SMALL_INPUT = 64


def _basic_block_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu_out(out + identity)


@register_model
def resnet18(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """torchvision ResNet-18; CIFAR-style stem for inputs <= 64 px."""
    from torchvision.models import resnet18 as tv_resnet18
    from torchvision.models.resnet import BasicBlock

    model = tv_resnet18(weights=None, num_classes=num_classes)
    small = image_size <= SMALL_INPUT
    if small or in_channels != 3:
        k, s, p = (3, 1, 1) if small else (7, 2, 3)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=k, stride=s, padding=p, bias=False)
    if small:
        model.maxpool = nn.Identity()
    for m in model.modules():
        if isinstance(m, BasicBlock):
            m.relu_out = nn.ReLU(inplace=True)
            m.forward = types.MethodType(_basic_block_forward, m)
    return model


def _mobilenet_v2(num_classes: int, in_channels: int, image_size: int, width_mult: float) -> nn.Module:
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    model = tv_mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    first = model.features[0][0]
    stride = 1 if image_size <= SMALL_INPUT else 2
    if stride != 2 or in_channels != 3:
        model.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, stride, 1, bias=False)
    return model


@register_model
def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """torchvision MobileNetV2 (width 1.0); stride-1 stem for inputs <= 64 px."""
    return _mobilenet_v2(num_classes, in_channels, image_size, width_mult=1.0)


@register_model
def mobilenet_v2_small(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """torchvision MobileNetV2 at width 0.5 (0.7 M parameters for 10 classes): the "small MobileNetV2" of the
    QAT-technique tables on CPU; stride-1 stem for inputs <= 64 px."""
    return _mobilenet_v2(num_classes, in_channels, image_size, width_mult=0.5)
