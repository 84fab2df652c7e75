"""CIFAR-style ResNet-20 with pytorchcv's topology and parameter names.

Same modules and ``state_dict`` keys as ``pytorchcv.model_provider.get_model("resnet20_cifar10")``
(``features.init_block.conv.weight``, ``features.stage1.unit1.body.conv1.conv.weight``, ...), so a user's local
pytorchcv checkpoint loads with ``load_state_dict``. Shortcuts with a change of shape use a 1x1 conv + BN
(``identity_conv``), as in pytorchcv. The only change is the final pool: adaptive average pooling instead of
``AvgPool2d(8)``, so 28x28 inputs (Fashion-MNIST) work; it has no parameters and equals ``AvgPool2d(8)`` on the
8x8 maps of a 32x32 input.
"""

from __future__ import annotations

from torch import nn

from zsqpipe.models.registry import register_model


class ConvBlock(nn.Module):
    """Conv -> BN -> optional ReLU (pytorchcv ``ConvBlock``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, activation: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        if activation:
            self.activ = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if hasattr(self, "activ"):
            x = self.activ(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = ConvBlock(cin, cout, 3, stride, activation=True)
        self.conv2 = ConvBlock(cout, cout, 3, 1, activation=False)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class ResUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.resize_identity = cin != cout or stride != 1
        self.body = ResBlock(cin, cout, stride)
        if self.resize_identity:
            self.identity_conv = ConvBlock(cin, cout, 1, stride, activation=False)
        self.activ = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = self.identity_conv(x) if self.resize_identity else x
        return self.activ(self.body(x) + identity)


class CIFARResNet(nn.Module):
    def __init__(self, channels: list[list[int]], init_channels: int, in_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("init_block", ConvBlock(in_channels, init_channels, 3, 1, activation=True))
        cin = init_channels
        for i, stage_channels in enumerate(channels):
            stage = nn.Sequential()
            for j, cout in enumerate(stage_channels):
                stride = 2 if (j == 0 and i != 0) else 1
                stage.add_module(f"unit{j + 1}", ResUnit(cin, cout, stride))
                cin = cout
            self.features.add_module(f"stage{i + 1}", stage)
        self.features.add_module("final_pool", nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight)

    def forward(self, x):
        x = self.features(x)
        return self.output(x.flatten(1))


def _cifar_resnet(blocks: int, num_classes: int, in_channels: int) -> CIFARResNet:
    per_stage = (blocks - 2) // 6
    channels = [[c] * per_stage for c in (16, 32, 64)]
    return CIFARResNet(channels, 16, in_channels, num_classes)


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-20 (He et al. 2016, CIFAR variant; pytorchcv ``resnet20_cifar10`` layout)."""
    return _cifar_resnet(20, num_classes, in_channels)
