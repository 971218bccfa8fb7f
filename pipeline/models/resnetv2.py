"""CIFAR ResNet18 / ResNet34 / ResNet50 of the KD literature (ImageNet-style stages, 3x3 stem).

Layout of RepDistiller ``models/resnetv2.py`` / mdistiller ``mdistiller/models/cifar/resnetv2.py``:
``conv1, bn1, layer{1..4}.{i}.{conv1,bn1,conv2,bn2[,conv3,bn3],shortcut.{0,1}}, linear``.
"""

import torch.nn as nn
import torch.nn.functional as F

from dhkd_pipe.models.blocks import PreactBlock, kaiming_fan_out_init, run_stage_with_preact
from dhkd_pipe.models.feature_taps import FeatureTaps


def _shortcut(in_planes, out_planes, stride):
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(PreactBlock):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def preact(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + self.shortcut(x)


class Bottleneck(PreactBlock):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def preact(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x)


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=100, zero_init_residual=False):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        kaiming_fan_out_init(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(out)
        return self.linear(out.reshape(out.size(0), -1))

    def forward_taps(self, x):
        """(logits, FeatureTaps) as mdistiller's CIFAR ResNet18/34/50: the stem and the four stages
        after their ReLU, each stage's last residual sum before it, the pooled feature."""
        f0 = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [f0], [f0]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            f, p = run_stage_with_preact(stage, feats[-1])
            feats.append(f)
            preacts.append(p)
        pooled = self.avgpool(feats[-1]).reshape(x.size(0), -1)
        return self.linear(pooled), FeatureTaps(feats, preacts, pooled)


def resnet(block: str, num_blocks, num_classes: int) -> ResNet:
    """A ResNet of ``block`` ("basic" or "bottleneck") with ``num_blocks`` per stage (``catalog.ZOO``)."""
    return ResNet({"basic": BasicBlock, "bottleneck": Bottleneck}[block], num_blocks, num_classes=num_classes)
