"""ImageNet MobileNetV1 of the KD literature (the ResNet-34/50 -> MobileNet student).

Layout of mdistiller ``mdistiller/models/imagenet/mobilenetv1.py`` (from CRD/RepDistiller's
ImageNet code): ``model.0`` = (conv 3x3 s2, BN, ReLU), ``model.1..13`` = (dw conv, BN, ReLU,
pw conv, BN, ReLU), ``model.14`` = pooling, ``fc = Linear(1024, num_classes)``.
"""

import torch.nn as nn
import torch.nn.functional as F

from dhkd_pipe.models.feature_taps import FeatureTaps


def conv_bn(inp, oup, stride):
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_dw(inp, oup, stride):
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.model = nn.Sequential(
            conv_bn(3, 32, 2),
            conv_dw(32, 64, 1),
            conv_dw(64, 128, 2),
            conv_dw(128, 128, 1),
            conv_dw(128, 256, 2),
            conv_dw(256, 256, 1),
            conv_dw(256, 512, 2),
            conv_dw(512, 512, 1),
            conv_dw(512, 512, 1),
            conv_dw(512, 512, 1),
            conv_dw(512, 512, 1),
            conv_dw(512, 512, 1),
            conv_dw(512, 1024, 2),
            conv_dw(1024, 1024, 1),
            # the reference uses AvgPool2d(7), i.e. 224x224 input only; global average pooling is
            # the same there and also works at other sizes (no parameters, same state dict)
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = self.model(x)
        return self.fc(x.reshape(x.size(0), 1024))

    def forward_taps(self, x):
        """(logits, FeatureTaps) as mdistiller's ImageNet MobileNetV1: the outputs of layers 3, 5,
        11 and 13 (the last of each resolution) before their final ReLU (``preact_feats``) and after
        it (``feats``), no stem; the pooled feature."""
        feats, preacts = [], []
        out = x
        for start, end in ((0, 3), (4, 5), (6, 11), (12, 13)):
            preacts.append(self.model[end][:-1](self.model[start:end](out)))  # layer ``end`` without its last ReLU
            out = F.relu(preacts[-1])
            feats.append(out)
        pooled = self.model[14](out).reshape(x.size(0), 1024)
        return self.fc(pooled), FeatureTaps(feats, preacts, pooled)


def mobilenet_v1(num_classes):
    return MobileNetV1(num_classes=num_classes)
