"""A DenseNet for small images, built like DenseNet-121 at a CPU's scale.

DenseNet-121 (Huang et al. 2017) has four dense blocks of 6, 12, 24 and 16 bottleneck layers
(BN-ReLU-1x1 conv to ``bn_size * growth`` channels, BN-ReLU-3x3 conv to ``growth``, the
output concatenated to the input), joined by transitions (BN-ReLU-1x1 conv halving the
channels, 2x2 average pooling), after a 7x7 stride-2 stem with max pooling. Here: the same
four blocks and three transitions, half as many layers per block (3, 6, 12, 8: DenseNet-63,
counting as DenseNet-121 does: the stem, two convolutions per dense layer, the transitions
and the classifier), growth rate 12 instead of 32, and a 3x3 stride-1 stem without pooling,
so a 32-px image meets the blocks at 32, 16, 8 and 4 px.

Parameter names follow torchvision's DenseNet (``features.conv0``,
``features.denseblockI.denselayerJ.conv1/conv2``, ``features.transitionI.conv``,
``classifier``), so the DenseNet layer map (one point per dense layer, one per transition)
and fingerprint apply unchanged.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        for i in range(layers):
            self[f"denselayer{i + 1}"] = DenseLayer(in_channels + i * growth, growth, bn_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(OrderedDict(
            norm=nn.BatchNorm2d(in_channels), relu=nn.ReLU(inplace=True),
            conv=nn.Conv2d(in_channels, out_channels, 1, bias=False), pool=nn.AvgPool2d(2, stride=2)))


class CifarDenseNet(nn.Module):
    """DenseNet-BC for small images: ``block_config`` dense layers per block, growth rate
    ``growth``, ``bn_size * growth`` channels inside each layer, transitions that keep
    ``compression`` of the channels, a 3x3 stem of ``init_features`` channels. The defaults
    make DenseNet-63 (see the module's text)."""

    def __init__(self, block_config: tuple[int, ...] = (3, 6, 12, 8), growth: int = 12, bn_size: int = 4,
                 init_features: int = 24, compression: float = 0.5, num_classes: int = 10) -> None:
        super().__init__()
        modules: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(3, init_features, 3, padding=1, bias=False),
            norm0=nn.BatchNorm2d(init_features), relu0=nn.ReLU(inplace=True))
        channels = init_features
        for i, layers in enumerate(block_config):
            modules[f"denseblock{i + 1}"] = DenseBlock(layers, channels, growth, bn_size)
            channels += layers * growth
            if i != len(block_config) - 1:
                out = int(channels * compression)
                modules[f"transition{i + 1}"] = Transition(channels, out)
                channels = out
        modules["norm5"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(modules)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():  # torchvision's DenseNet initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))
