"""ImageNet MobileNetV1 of the KD literature (the ResNet-34/50 -> MobileNet student).

Layout of mdistiller ``mdistiller/models/imagenet/mobilenetv1.py`` (from CRD/RepDistiller's
ImageNet code): ``model.0`` = (conv 3x3 s2, BN, ReLU), ``model.1..13`` = (dw conv, BN, ReLU,
pw conv, BN, ReLU), ``model.14`` = pooling, ``fc = Linear(1024, num_classes)``.
"""

import torch.nn as nn


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


def mobilenet_v1(num_classes):
    return MobileNetV1(num_classes=num_classes)
