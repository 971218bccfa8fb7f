"""``dhkd-pipe models``: the registered architectures, CIFAR and ImageNet, and the model families."""

from __future__ import annotations


def model_listing(width: int = 100) -> list[str]:
    """The lines ``dhkd-pipe models`` prints: 32-pixel CIFAR models, ImageNet ones, names that
    differ only in case, and the families of names a library resolves."""
    from dhkd_pipe.models import list_families, list_models
    from dhkd_pipe.models.registry import CIFAR_INPUT, case_twins, model_input_size, model_kind

    names = list_models()
    cifar = [n for n in names if model_input_size(n) == CIFAR_INPUT]
    imagenet = [n if model_input_size(n) == 224 else f"{n} ({model_input_size(n)}px)" for n in names if n not in cifar]
    lines = [
        f"CIFAR models, {CIFAR_INPUT}x{CIFAR_INPUT} inputs (cifar10/100, digits, mnist): the KD zoo, with the "
        "public CIFAR-100 teachers' module names",
        *_wrapped(cifar, width),
        "ImageNet models, 224x224 inputs unless noted (imagefolder data): torchvision architectures, MobileNetV1",
        *_wrapped(imagenet, width),
    ]
    twins = case_twins()
    if twins:
        lines.append("Names are case-sensitive; these differ only in case:")
        lines += ["  " + " / ".join(f"{n} ({model_kind(n)})" for n in group) for group in twins]
    families = list_families()
    if families:
        lines.append("Model families, any name the library knows (teachers or students):")
        lines += [f"  {family.describe}" for family in families]
    return lines


def _wrapped(items: list[str], width: int) -> list[str]:
    """``items`` two spaces apart, indented by two, in lines of at most ``width`` characters."""
    lines, line = [], ""
    for item in items:
        if line and len(line) + 2 + len(item) > width:
            lines.append(line)
            line = ""
        line = f"{line}  {item}" if line else f"  {item}"
    if line:
        lines.append(line)
    return lines
