"""Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) of the KD literature.

Layout of RepDistiller ``models/wrn.py`` / mdistiller ``mdistiller/models/cifar/wrn.py``:
``conv1, block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2[,convShortcut]}, bn1, fc`` (pre-activation
blocks; ``convShortcut`` only where the channel count changes).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from dhkd_pipe.models.blocks import batch_norm_without_update, kaiming_fan_out_init
from dhkd_pipe.models.feature_taps import FeatureTaps


class BasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        # equal in/out: the shortcut is the raw input; otherwise both paths start from the activation
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(pre), out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, num_classes, widen_factor=1, drop_rate=0.0):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        assert (depth - 4) % 6 == 0, "depth must be 6n+4"
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]
        kaiming_fan_out_init(self, zero_linear_bias=True)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        return self.fc(out.reshape(-1, self.nChannels))

    def forward_taps(self, x):
        """(logits, FeatureTaps) as mdistiller's WRN: ``feats`` are the stem and the three blocks'
        outputs (pre-activation blocks: no ReLU at their end), ``preact_feats`` the stem and each of
        them through the BatchNorm that follows it (the next block's first ``bn1``, or the final
        ``bn1``), before its ReLU. Those BNs are re-applied without counting the batch in their
        running statistics a second time (mdistiller's re-application counts it twice)."""
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        pooled = F.avg_pool2d(self.relu(self.bn1(f3)), 8).reshape(-1, self.nChannels)
        preacts = [
            f0,
            batch_norm_without_update(self.block2.layer[0].bn1, f1),
            batch_norm_without_update(self.block3.layer[0].bn1, f2),
            batch_norm_without_update(self.bn1, f3),
        ]
        return self.fc(pooled), FeatureTaps([f0, f1, f2, f3], preacts, pooled)
