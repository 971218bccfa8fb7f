"""CIFAR VGGs with BatchNorm (vgg8, vgg11, vgg13, vgg16, vgg19) of the KD literature.

The registered names are the BN variants, as in RepDistiller / mdistiller (``"vgg13": vgg13_bn``).
Layout of mdistiller ``mdistiller/models/cifar/vgg.py``: five ``block{0..4}`` Sequentials of
(Conv2d with bias, BatchNorm2d, ReLU) with the last ReLU of each block dropped, then
``classifier = Linear(512, num_classes)``; ``pool0..pool4`` hold no parameters.
"""

import torch.nn as nn
import torch.nn.functional as F

from dhkd_pipe.models.blocks import kaiming_fan_out_init
from dhkd_pipe.models.feature_taps import FeatureTaps

CFG = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def make_block(cfg, batch_norm, in_channels):
    layers = []
    for v in cfg:
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers[:-1])  # the block's last ReLU is applied in forward


class VGG(nn.Module):
    def __init__(self, cfg, batch_norm=True, num_classes=100):
        super().__init__()
        self.block0 = make_block(cfg[0], batch_norm, 3)
        self.block1 = make_block(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = make_block(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = make_block(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = make_block(cfg[4], batch_norm, cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        kaiming_fan_out_init(self, linear_std=0.01)

    def forward(self, x):
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:  # as in the reference: a fourth max-pool only for 64x64 (Tiny-ImageNet) input
            x = self.pool3(x)
        x = self.pool4(F.relu(self.block4(x)))
        return self.classifier(x.reshape(x.size(0), -1))

    def forward_taps(self, x):
        """(logits, FeatureTaps) as mdistiller's VGG: each block's output after its ReLU (before
        the max-pool that follows), the same before the ReLU (the first block's after it), the
        pooled feature."""
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        p1 = self.block1(self.pool0(f0))
        f1 = F.relu(p1)
        p2 = self.block2(self.pool1(f1))
        f2 = F.relu(p2)
        p3 = self.block3(self.pool2(f2))
        f3 = F.relu(p3)
        p4 = self.block4(self.pool3(f3) if h == 64 else f3)
        f4 = F.relu(p4)
        pooled = self.pool4(f4).reshape(x.size(0), -1)
        return self.classifier(pooled), FeatureTaps([f0, f1, f2, f3, f4], [f0, p1, p2, p3, p4], pooled)


def vgg_bn(layers: str, num_classes: int) -> VGG:
    """The VGG of layer configuration ``layers`` (a key of ``CFG``) with BatchNorm (``catalog.ZOO``)."""
    return VGG(CFG[layers], batch_norm=True, num_classes=num_classes)
