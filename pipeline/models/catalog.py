"""Every registered architecture by name, torch-free: its family module, the builder there and its
arguments, its input side. ``registry`` builds from it (importing the family module on first use),
so ``dhkd-pipe models`` and the name checks import no torch; ``create_model`` stays the only door.

Adding a KD-zoo model: its class in a family module and one line here.
"""

from __future__ import annotations

from typing import NamedTuple

CIFAR_INPUT = 32
IMAGENET_INPUT = 224


class Architecture(NamedTuple):
    module: str  # the family module under dhkd_pipe.models
    builder: str  # called as builder(*args, num_classes=..., **kwargs)
    args: tuple = ()
    kwargs: dict = {}
    input_size: int = CIFAR_INPUT
    torchvision_arch: str | None = None  # the torchvision builder name, for its named weights


_SMALL = (16, 16, 32, 64)  # CIFAR ResNets: channels of the stem and the three stages
_WIDE = (32, 64, 128, 256)

# The KD zoo (the CIFAR-100 teachers' and students' module names), then MobileNetV1 (ImageNet).
ZOO = {
    **{
        f"resnet{d}": Architecture("cifar_resnet", "CifarResNet", (d, list(_SMALL)))
        for d in (8, 14, 20, 32, 44, 56, 110)
    },
    "resnet8x4": Architecture("cifar_resnet", "CifarResNet", (8, list(_WIDE))),
    "resnet32x4": Architecture("cifar_resnet", "CifarResNet", (32, list(_WIDE))),
    "ResNet18": Architecture("resnetv2", "resnet", ("basic", (2, 2, 2, 2))),
    "ResNet34": Architecture("resnetv2", "resnet", ("basic", (3, 4, 6, 3))),
    "ResNet50": Architecture("resnetv2", "resnet", ("bottleneck", (3, 4, 6, 3))),
    **{f"wrn_{d}_{w}": Architecture("wrn", "WideResNet", (d,), {"widen_factor": w}) for d in (16, 40) for w in (1, 2)},
    **{
        f"vgg{n}": Architecture("vgg", "vgg_bn", (layers,))
        for n, layers in (("8", "S"), ("11", "A"), ("13", "B"), ("16", "D"), ("19", "E"))
    },
    "MobileNetV2": Architecture("mobilenetv2", "mobile_half"),
    "mobile_half": Architecture("mobilenetv2", "mobile_half"),
    "ShuffleV1": Architecture("shufflenetv1", "shufflev1"),
    "ShuffleV2": Architecture("shufflenetv2", "shufflev2"),
    "MobileNetV1": Architecture("mobilenetv1", "mobilenet_v1", input_size=IMAGENET_INPUT),
    "mobilenet": Architecture("mobilenetv1", "mobilenet_v1", input_size=IMAGENET_INPUT),
}

# torchvision's classification architectures (``torchvision.models.list_models(module=torchvision.models)``;
# tests/test_models.py checks this list against the installed torchvision), built by
# torchvision_models.build; a name the zoo already uses is registered as tv_NAME.
TORCHVISION_ARCHS = (
    "alexnet",
    "convnext_base",
    "convnext_large",
    "convnext_small",
    "convnext_tiny",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "efficientnet_v2_l",
    "efficientnet_v2_m",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mnasnet0_75",
    "mnasnet1_0",
    "mnasnet1_3",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "regnet_x_16gf",
    "regnet_x_1_6gf",
    "regnet_x_32gf",
    "regnet_x_3_2gf",
    "regnet_x_400mf",
    "regnet_x_800mf",
    "regnet_x_8gf",
    "regnet_y_128gf",
    "regnet_y_16gf",
    "regnet_y_1_6gf",
    "regnet_y_32gf",
    "regnet_y_3_2gf",
    "regnet_y_400mf",
    "regnet_y_800mf",
    "regnet_y_8gf",
    "resnet101",
    "resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
    "squeezenet1_0",
    "squeezenet1_1",
    "swin_b",
    "swin_s",
    "swin_t",
    "swin_v2_b",
    "swin_v2_s",
    "swin_v2_t",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "vit_b_16",
    "vit_b_32",
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
    "wide_resnet101_2",
    "wide_resnet50_2",
)
_TORCHVISION_INPUT = {"inception_v3": 299}

CATALOG: dict[str, Architecture] = {
    **ZOO,
    **{
        (arch if arch not in ZOO else f"tv_{arch}"): Architecture(
            "torchvision_models",
            "build",
            (arch,),
            input_size=_TORCHVISION_INPUT.get(arch, IMAGENET_INPUT),
            torchvision_arch=arch,
        )
        for arch in TORCHVISION_ARCHS
    },
}
