"""Building blocks shared by several model families."""

import math

import torch.nn as nn
import torch.nn.functional as F


class PreactBlock(nn.Module):
    """A block whose output is relu(``preact(x)``): ``preact``, defined by each block, is the sum
    before the last activation (RepDistiller's ``preact_feats``); the plain forward and the
    feature tap share it."""

    def forward(self, x):
        return F.relu(self.preact(x))

    def forward_with_preact(self, x):
        preact = self.preact(x)
        return F.relu(preact), preact


class ShuffleBlock(nn.Module):
    """ShuffleNet's channel shuffle: (n, g*c, h, w) -> interleave the g groups. No parameters."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.size()
        g = self.groups
        return x.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def kaiming_fan_out_init(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False):
    """The KD repos' initialisation, one for every family: conv weights N(0, 2/fan_out) (He,
    fan-out, ReLU) and biases 0, BatchNorm (1, 0). Linear layers keep PyTorch's default unless
    ``linear_std`` (weights N(0, linear_std), biases 0: VGG, MobileNetV2 use 0.01) or
    ``zero_linear_bias`` (WRN) say otherwise; the ResNets leave them alone."""
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
            if linear_std is not None:
                m.weight.data.normal_(0, linear_std)
            if linear_std is not None or zero_linear_bias:
                m.bias.data.zero_()


def run_stage_with_preact(stage: nn.Sequential, x):
    """Runs ``stage`` (blocks in a Sequential) and also returns its last block's output before the
    final activation: every block but the last runs its plain forward, the last its
    ``forward_with_preact`` (a method each family's blocks define, returning (output, pre-activation))."""
    for block in stage[:-1]:
        x = block(x)
    return stage[-1].forward_with_preact(x)


def batch_norm_without_update(bn: nn.BatchNorm2d, x):
    """``bn(x)``'s value without touching its running statistics: batch statistics in training,
    running ones in evaluation (a tap that re-applies a BN the forward already applied must not
    count the batch twice)."""
    import torch.nn.functional as F

    if bn.training:
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return bn(x)
