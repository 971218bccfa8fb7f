"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) of the KD literature.

Module names and state-dict layout are those of the CIFAR-100 teacher checkpoints of RepDistiller
(HobbitLong/RepDistiller ``models/resnet.py``) and mdistiller (``mdistiller/models/cifar/resnet.py``):
``conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,downsample.{0,1}}, fc``.
"""

import torch.nn as nn

from dhkd_pipe.models.blocks import PreactBlock, kaiming_fan_out_init, run_stage_with_preact
from dhkd_pipe.models.feature_taps import FeatureTaps


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(PreactBlock):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def preact(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class Bottleneck(PreactBlock):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def preact(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class CifarResNet(nn.Module):
    """Three stages of ``n`` blocks on 32x32 input; depth = 6n+2 (basic) or 9n+2 (bottleneck)."""

    def __init__(self, depth, num_filters, block_name="basicblock", num_classes=100):
        super().__init__()
        if block_name.lower() == "basicblock":
            assert (depth - 2) % 6 == 0, "basic-block depth must be 6n+2"
            n, block = (depth - 2) // 6, BasicBlock
        elif block_name.lower() == "bottleneck":
            assert (depth - 2) % 9 == 0, "bottleneck depth must be 9n+2"
            n, block = (depth - 2) // 9, Bottleneck
        else:
            raise ValueError("block_name must be basicblock or bottleneck")
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)
        kaiming_fan_out_init(self)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.fc(x.reshape(x.size(0), -1))

    def forward_taps(self, x):
        """(logits, FeatureTaps) as mdistiller's CIFAR ResNet returns them: the stem and each
        stage after its ReLU, each stage's last residual sum before it, the pooled feature."""
        f0 = self.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage_with_preact(self.layer1, f0)
        f2, p2 = run_stage_with_preact(self.layer2, f1)
        f3, p3 = run_stage_with_preact(self.layer3, f2)
        pooled = self.avgpool(f3).reshape(f3.size(0), -1)
        return self.fc(pooled), FeatureTaps([f0, f1, f2, f3], [f0, p1, p2, p3], pooled)
