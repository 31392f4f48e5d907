"""CIFAR-style ResNets (He et al. 2016, section 4.2): 3x3 stem, three stages of 16/32/64
channels, 6n+2 layers of basic blocks (ResNet-20, the counterpart of ResNet-34), or 9n+2
layers of bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by 4, as in ResNet-50 and in He et
al. 2016b's CIFAR ResNet-164: ResNet-29 with n = 3). Small enough to pre-train and fine-tune
on a CPU in minutes.

Parameter names follow torchvision's ResNet (``conv1``, ``layerI.J.convK``, ``downsample``,
``fc``), so the ResNet layer map applies unchanged: one point per block, made of its two
(basic) or three (bottleneck) convolutions.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 to ``planes``, 3x3 (with the stride, as torchvision's ResNet-50 v1.5), 1x1 to
    ``4 * planes``; a projection shortcut where the shape changes."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of basic blocks (``depth`` 20, 32, 44, 56, 110...) or, with
    ``bottleneck``, ResNet-(9n+2) of bottleneck blocks (29, 47, 164...), for small images."""

    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16, bottleneck: bool = False) -> None:
        super().__init__()
        per_block = 9 if bottleneck else 6
        if (depth - 2) % per_block or depth < 2 + per_block:
            raise ValueError(f"CIFAR ResNet depth must be {per_block}n+2, got {depth}")
        blocks = (depth - 2) // per_block
        block = Bottleneck if bottleneck else BasicBlock
        expansion = Bottleneck.expansion if bottleneck else 1
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            layers = []
            for j in range(blocks):
                layers.append(block(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes * expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
