"""The model zoo: ``create_model(name, num_classes)`` for every architecture, ``DualHead``,
and checkpoint loading. Importing this package registers every family."""

from . import cifar_resnet, mobilenetv1, mobilenetv2, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
from . import torchvision_models  # noqa: F401  (last: it skips names the KD zoo already uses)
from .checkpoint import check_finite_weights, load_checkpoint, read_state_dict
from . import timm_models  # noqa: F401  (the timm: family; timm itself is imported on first use)
from .dual_head import DualHead
from .pretrained import WeightsSource, file_digest, resolve_weights
from .registry import (check_input_size, create_model, default_weights, list_families, list_models, model_input_size,
                       register_model, torchvision_arch)

__all__ = [
    "check_input_size", "create_model", "list_models", "list_families", "model_input_size", "register_model", "torchvision_arch",
    "default_weights", "resolve_weights", "WeightsSource",
    "DualHead", "check_finite_weights", "load_checkpoint", "read_state_dict", "file_digest",
]
