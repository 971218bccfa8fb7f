"""CIFAR ShuffleNetV1 of the KD literature (``ShuffleV1``: groups 3, 240/480/960 channels).

Layout of RepDistiller ``models/ShuffleNetv1.py`` / mdistiller ``mdistiller/models/cifar/ShuffleNetv1.py``:
``conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}, linear``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from dhkd_pipe.models.blocks import PreactBlock, ShuffleBlock, run_stage_with_preact
from dhkd_pipe.models.feature_taps import FeatureTaps


class Bottleneck(PreactBlock):
    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def preact(self, x):
        """The block's output before its last ReLU: the branch concatenated with (stride 2) or added to its shortcut."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return torch.cat([out, res], 1) if self.stride == 2 else out + res


class ShuffleNet(nn.Module):
    def __init__(self, out_planes, num_blocks, groups, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes, num_blocks, groups):
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0  # the stride-2 block concatenates its input
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride=stride, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.reshape(out.size(0), -1))

    def forward_taps(self, x):
        """(logits, FeatureTaps) as mdistiller's ShuffleNetV1: the stem and each stage after its
        ReLU, each stage's last block before it, the pooled feature."""
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage_with_preact(self.layer1, f0)
        f2, p2 = run_stage_with_preact(self.layer2, f1)
        f3, p3 = run_stage_with_preact(self.layer3, f2)
        pooled = F.avg_pool2d(f3, 4).reshape(x.size(0), -1)
        return self.linear(pooled), FeatureTaps([f0, f1, f2, f3], [f0, p1, p2, p3], pooled)


def shufflev1(num_classes):
    return ShuffleNet([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes)
