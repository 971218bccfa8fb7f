"""Building blocks shared by several model families."""

import math

import torch.nn as nn


class ShuffleBlock(nn.Module):
    """ShuffleNet's channel shuffle: (n, g*c, h, w) -> interleave the g groups. No parameters."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.size()
        g = self.groups
        return x.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def kaiming_fan_out_init(model: nn.Module):
    """The KD repos' init for VGG and MobileNetV2: conv N(0, 2/fan_out), BN (1, 0), linear N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / fan))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()
