"""The model zoo: ``create_model(name, num_classes)`` for every architecture, ``DualHead``,
and checkpoint loading.

The names below are imported on first use (PEP 562), so importing a torch-free module of this
package (``aux_heads``) costs nothing; the registry imports the families at its first look-up."""

import importlib

_HOMES = {
    "check_input_size": "registry",
    "create_model": "registry",
    "default_weights": "registry",
    "list_families": "registry",
    "list_models": "registry",
    "model_input_size": "registry",
    "register_model": "registry",
    "torchvision_arch": "registry",
    "check_finite_weights": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_state_dict": "checkpoint",
    "DualHead": "dual_head",
    "single_head": "dual_head",
    "FeatureTaps": "feature_taps",
    "forward_taps": "feature_taps",
    "tap_shapes": "feature_taps",
    "WeightsSource": "pretrained",
    "file_digest": "pretrained",
    "resolve_weights": "pretrained",
}

__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
