"""Every torchvision classification architecture, registered under its torchvision name.

Built with ``torchvision.models.get_model(name, weights=None, num_classes=...)``; pretrained
weights are loaded separately by ``load_checkpoint`` (a file, or a cached named weight). Names the
CIFAR zoo already uses (``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``) are registered as
``tv_<name>`` instead. GoogLeNet and Inception-v3 are built without their auxiliary classifiers
(logits only) and with ``transform_input=True``, as torchvision does when it loads their weights.
Their names are listed in ``catalog.TORCHVISION_ARCHS`` (torch-free); torchvision is imported
when one is built.
"""

_EXTRA = {
    "googlenet": {"aux_logits": False, "transform_input": True, "init_weights": True},
    "inception_v3": {"aux_logits": False, "transform_input": True, "init_weights": True},
}


def build(arch: str, num_classes: int):
    """torchvision's ``arch`` with ``num_classes`` outputs and no weights (``catalog.TORCHVISION_ARCHS``)."""
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **_EXTRA.get(arch, {}))
