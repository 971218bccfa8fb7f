"""Every torchvision classification architecture, registered under its torchvision name.

Built with ``torchvision.models.get_model(name, weights=None, num_classes=...)``; pretrained
weights are loaded separately by ``load_checkpoint`` (a file, or a cached named weight). Names the
CIFAR zoo already uses (``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``) are registered as
``tv_<name>`` instead. GoogLeNet and Inception-v3 are built without their auxiliary classifiers
(logits only) and with ``transform_input=True``, as torchvision does when it loads their weights.
Registered at the registry's first look-up (``register_deferred``), so importing the model zoo
does not import torchvision.
"""

import functools

from .registry import IMAGENET_INPUT, is_registered, register_deferred, register_model

_INPUT_SIZE = {"inception_v3": 299}
_EXTRA = {
    "googlenet": {"aux_logits": False, "transform_input": True, "init_weights": True},
    "inception_v3": {"aux_logits": False, "transform_input": True, "init_weights": True},
}


def _build(arch, num_classes):
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **_EXTRA.get(arch, {}))


def register_torchvision_models():
    import torchvision

    for arch in torchvision.models.list_models(module=torchvision.models):
        name = arch if not is_registered(arch) else f"tv_{arch}"
        register_model(name, input_size=_INPUT_SIZE.get(arch, IMAGENET_INPUT), torchvision_arch=arch)(
            functools.partial(_build, arch))


register_deferred(register_torchvision_models)
