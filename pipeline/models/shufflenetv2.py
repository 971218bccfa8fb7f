"""CIFAR ShuffleNetV2 of the KD literature (``ShuffleV2``: net size 1, 116/232/464/1024 channels).

Layout of RepDistiller ``models/ShuffleNetv2.py`` / mdistiller ``mdistiller/models/cifar/ShuffleNetv2.py``:
``conv1, bn1, layer{1,2,3}.0`` (DownBlock: ``conv1..conv5, bn1..bn5``), ``layer{1,2,3}.{i>=1}``
(BasicBlock: ``conv1..conv3, bn1..bn3``), ``conv2, bn2, linear``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from dhkd_pipe.models.blocks import ShuffleBlock, run_stage_with_preact
from dhkd_pipe.models.feature_taps import FeatureTaps


class SplitBlock(nn.Module):
    def __init__(self, ratio):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        c = int(x.size(1) * self.ratio)
        return x[:, :c, :, :], x[:, c:, :, :]


def add_branch(block: nn.Module, first: int, in_channels: int, channels: int, stride: int):
    """Adds ShuffleNetV2's main branch to ``block`` as ``conv{first..first+2}`` / ``bn{...}`` (the
    published checkpoints' names): 1x1 conv, depthwise 3x3 conv with ``stride``, 1x1 conv."""
    convs = [
        nn.Conv2d(in_channels, channels, kernel_size=1, bias=False),
        nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1, groups=channels, bias=False),
        nn.Conv2d(channels, channels, kernel_size=1, bias=False),
    ]
    for i, conv in enumerate(convs, start=first):
        setattr(block, f"conv{i}", conv)
        setattr(block, f"bn{i}", nn.BatchNorm2d(channels))


def run_branch(block: nn.Module, first: int, x, last_relu: bool = True):
    """The branch ``add_branch`` added: ReLU after the two 1x1 convs (the last one unless
    ``last_relu`` is False), none after the depthwise one."""
    for i, relu in zip(range(first, first + 3), (True, False, last_relu), strict=True):
        x = getattr(block, f"bn{i}")(getattr(block, f"conv{i}")(x))
        x = F.relu(x) if relu else x
    return x


class BasicBlock(nn.Module):
    """Half the channels pass through, the other half through the branch; then a shuffle."""

    def __init__(self, in_channels, split_ratio=0.5):
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        add_branch(self, 1, c, c, stride=1)
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        x1, x2 = self.split(x)
        return self.shuffle(torch.cat([x1, run_branch(self, 1, x2)], 1))

    def forward_with_preact(self, x):
        """(output, pre-activation) as mdistiller's ShuffleNetV2 block: the pre-activation is the
        pass-through half concatenated with the branch before its last ReLU, not shuffled."""
        x1, x2 = self.split(x)
        branch = run_branch(self, 1, x2, last_relu=False)
        return self.shuffle(torch.cat([x1, F.relu(branch)], 1)), torch.cat([x1, branch], 1)


class DownBlock(nn.Module):
    """Stride 2: a depthwise 3x3 + 1x1 on the left, the branch on the right; then a shuffle."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        add_branch(self, 3, in_channels, mid, stride=2)
        self.shuffle = ShuffleBlock()

    def forward(self, x):
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        return self.shuffle(torch.cat([left, run_branch(self, 3, x)], 1))


CONFIGS = {
    0.2: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 3, 3)},
    0.3: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 7, 3)},
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class ShuffleNetV2(nn.Module):
    def __init__(self, net_size, num_classes=100):
        super().__init__()
        out_channels = CONFIGS[net_size]["out_channels"]
        num_blocks = CONFIGS[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels, num_blocks):
        layers = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.reshape(out.size(0), -1))

    def forward_taps(self, x):
        """(logits, FeatureTaps) as mdistiller's ShuffleNetV2: the stem and each stage's output,
        each stage's last block before its last ReLU, and the pooled feature (after conv2)."""
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage_with_preact(self.layer1, f0)
        f2, p2 = run_stage_with_preact(self.layer2, f1)
        f3, p3 = run_stage_with_preact(self.layer3, f2)
        pooled = F.avg_pool2d(F.relu(self.bn2(self.conv2(f3))), 4).reshape(x.size(0), -1)
        return self.linear(pooled), FeatureTaps([f0, f1, f2, f3], [f0, p1, p2, p3], pooled)


def shufflev2(num_classes):
    return ShuffleNetV2(net_size=1, num_classes=num_classes)
