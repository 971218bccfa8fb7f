"""CIFAR MobileNetV2 of the KD literature (``MobileNetV2`` = ``mobile_half``: T=6, width 0.5).

Layout of RepDistiller ``models/mobilenetv2.py`` / mdistiller ``mdistiller/models/cifar/mobilenetv2.py``:
``conv1.{0,1}``, ``blocks.{s}.{i}.conv.{0..7}`` (pw conv, BN, ReLU, dw conv, BN, ReLU, pw conv, BN),
``conv2.{0,1}``, ``classifier.0`` (a Linear inside a Sequential).
"""

import torch.nn as nn

from dhkd_pipe.models.blocks import kaiming_fan_out_init
from dhkd_pipe.models.feature_taps import FeatureTaps


def conv_bn(inp, oup, stride):
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp, oup):
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        assert stride in (1, 2)
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        hidden = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, T, num_classes, input_size=32, width_mult=1.0):
        super().__init__()
        setting = [  # t, c, n, s
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        assert input_size % 32 == 0
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)
        self.blocks = nn.ModuleList([])
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)
        kaiming_fan_out_init(self, linear_std=0.01)

    def forward(self, x):
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.avgpool(self.conv2(out))
        return self.classifier(out.reshape(out.size(0), -1))

    def forward_taps(self, x):
        """(logits, FeatureTaps) as mdistiller's MobileNetV2: the stem and the outputs of block
        groups 1, 2, 4 and 6 (each where the resolution is about to change, and the last), the
        pooled feature. Neither mdistiller nor RepDistiller defines pre-activation taps here
        (RepDistiller's ``preact`` flag returns the same tensors), so ``preact_feats`` = ``feats``."""
        out = self.conv1(x)
        feats = [out]
        for i, block in enumerate(self.blocks):
            out = block(out)
            if i in (1, 2, 4, 6):
                feats.append(out)
        pooled = self.avgpool(self.conv2(out)).reshape(x.size(0), -1)
        return self.classifier(pooled), FeatureTaps(feats, list(feats), pooled)


def mobile_half(num_classes):
    return MobileNetV2(T=6, num_classes=num_classes, width_mult=0.5)
