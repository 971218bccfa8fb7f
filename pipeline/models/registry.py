"""One registry for every architecture: ``create_model(name, num_classes)`` is the only door in.

The names come from ``catalog.CATALOG`` (torch-free): each entry's family module is imported when
the model is built, so listing and checking names import no torch. ``register_model`` adds more
(a decorator of ``build(num_classes=...)``); every build returns a model whose ``forward`` returns
logits only.
Families too large to list (timm's) register a name prefix with ``register_family``:
``timm:NAME`` is resolved when asked.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models.aux_heads import AUX_HEADS
from dhkd_pipe.models.catalog import CATALOG, CIFAR_INPUT, Architecture

if TYPE_CHECKING:
    import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[[int], nn.Module]
    input_size: int
    torchvision_arch: str | None = None  # the torchvision builder name, for its named weights
    family: str | None = None  # the prefix of a registered family (``timm``), else None


@dataclass(frozen=True)
class ModelFamily:
    """Models named ``PREFIX:NAME``: ``check(name)`` raises DhkdError for names the family lacks,
    ``build(name, num_classes)`` builds one, ``input_size(name)`` is its input side, ``default_weights``
    the ``--weights`` value that means its published weights."""

    prefix: str
    check: Callable[[str], None]
    build: Callable[[str, int], nn.Module]
    input_size: Callable[[str], int]
    default_weights: str
    describe: str


_REGISTRY: dict[str, ModelEntry] = {}
# Registered at the first look-up instead of at import: the catalog's names, then the timm family.
_DEFERRED: list[Callable[[], None]] = []


def _builder(arch: Architecture) -> Callable:
    def build(num_classes: int):
        module = importlib.import_module(f"{__package__}.{arch.module}")
        return getattr(module, arch.builder)(*arch.args, num_classes=num_classes, **arch.kwargs)

    return build


def _register_catalog() -> None:
    for name, arch in CATALOG.items():
        _REGISTRY[name] = ModelEntry(name, _builder(arch), arch.input_size, arch.torchvision_arch)


def _register_families() -> None:
    importlib.import_module(f"{__package__}.timm_models")


def _complete() -> None:
    while _DEFERRED:
        _DEFERRED.pop(0)()


_DEFERRED += [_register_catalog, _register_families]

_FAMILIES: dict[str, ModelFamily] = {}
_FAMILY_ENTRIES: dict[str, ModelEntry] = {}  # family names resolved so far


def register_model(*names: str, input_size: int = CIFAR_INPUT, torchvision_arch: str | None = None):
    """Registers the decorated ``build(num_classes=...) -> nn.Module`` under each of ``names``."""

    def deco(build):
        _complete()
        for name in names or (build.__name__,):
            if name in _REGISTRY:
                raise ValueError(f"model name registered twice: {name}")
            _REGISTRY[name] = ModelEntry(name, build, input_size, torchvision_arch)
        return build

    return deco


def register_family(family: ModelFamily):
    if family.prefix in _FAMILIES:
        raise ValueError(f"model family registered twice: {family.prefix}")
    _FAMILIES[family.prefix] = family


def list_families() -> list[ModelFamily]:
    _complete()
    return list(_FAMILIES.values())


def _entry(name: str) -> ModelEntry:
    _complete()
    if isinstance(name, str) and name not in _REGISTRY:
        prefix, sep, rest = name.partition(":")
        if sep and prefix in _FAMILIES:
            family = _FAMILIES[prefix]
            if not rest:
                raise DhkdError(f"{prefix}: needs a model name, e.g. {family.describe}")
            if name not in _FAMILY_ENTRIES:
                family.check(rest)
                _FAMILY_ENTRIES[name] = ModelEntry(
                    name, lambda num_classes: family.build(rest, num_classes), family.input_size(rest), family=prefix
                )
            return _FAMILY_ENTRIES[name]
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise _unknown_model(name) from None


def _unknown_model(name) -> DhkdError:
    """Names the registered models closest to ``name`` (case-insensitive, difflib), each with its
    kind, so ``Resnet50`` is answered with both ``ResNet50`` (CIFAR) and ``resnet50`` (ImageNet)."""
    by_lower: dict[str, list[str]] = {}
    for n in list_models():
        by_lower.setdefault(n.lower(), []).append(n)
    # families take names the registry cannot list: say how to name them
    listing = "`dhkd-pipe models` lists the names" + "".join(
        f"; {f.prefix}:NAME for {f.prefix}'s models" for f in _FAMILIES.values()
    )
    if not isinstance(name, str):
        return DhkdError(f"unknown model {name!r}; {listing}")
    if name.lower() in by_lower:
        twins = ", ".join(f"{n} ({model_kind(n)})" for n in by_lower[name.lower()])
        return DhkdError(f"unknown model {name!r}: names are case-sensitive; did you mean {twins}?")
    close = [n for key in difflib.get_close_matches(name.lower(), by_lower, n=5, cutoff=0.6) for n in by_lower[key]]
    if not close:
        return DhkdError(f"unknown model {name!r}; {listing}")
    shown = ", ".join(f"{n} ({model_kind(n)})" for n in close)
    return DhkdError(f"unknown model {name!r}; did you mean {shown}? ({listing})")


def model_kind(name: str) -> str:
    """What ``name`` is built for: ``CIFAR 32px`` (the KD zoo) or ``ImageNet 224px``, and whose."""
    entry = _entry(name)
    if entry.family is not None:
        return f"{entry.family} {entry.input_size}px"
    if entry.input_size == CIFAR_INPUT:
        return f"CIFAR {CIFAR_INPUT}px"
    return f"ImageNet {entry.input_size}px" + (", torchvision" if entry.torchvision_arch else "")


def case_twins() -> list[list[str]]:
    """Groups of registered names that differ only in case (``ResNet50`` / ``resnet50``)."""
    groups: dict[str, list[str]] = {}
    for n in list_models():
        groups.setdefault(n.lower(), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def list_models() -> list[str]:
    """All registered names: the CIFAR zoo first, then the ImageNet ones, each group sorted."""
    _complete()
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].input_size != CIFAR_INPUT, n.lower(), n))


def model_input_size(name: str) -> int:
    """Side of the square input the architecture is built for (32 for CIFAR, 224 for ImageNet)."""
    return _entry(name).input_size


def torchvision_arch(name: str) -> str | None:
    """The torchvision builder behind ``name`` (for named weights), or None for the KD zoo."""
    _complete()
    return _REGISTRY[name].torchvision_arch if name in _REGISTRY else None


def model_family(name: str) -> str | None:
    """The registered family prefix of ``name`` (``timm`` for ``timm:NAME``), else None."""
    _complete()
    prefix, sep, _ = name.partition(":") if isinstance(name, str) else ("", "", "")
    return prefix if sep and prefix in _FAMILIES else None


def is_timm(name: str) -> bool:
    return model_family(name) == "timm"


def default_weights(name: str) -> str | None:
    """The ``--weights`` value meaning the architecture's published weights (``DEFAULT`` for
    torchvision, ``pretrained`` for timm), or None: KD-zoo models have none."""
    family = model_family(name)
    if family is not None:
        return _FAMILIES[family].default_weights
    _entry(name)  # an unknown name is an error here too
    return "DEFAULT" if torchvision_arch(name) else None


def create_model(
    name: str, num_classes: int, dual_head: bool = False, aux_head: str = "linear", align_features: bool = False
) -> nn.Module:
    """Builds ``name`` with ``num_classes`` outputs; ``dual_head`` wraps it in ``DualHead``
    (``aux_head`` and ``align_features`` are passed on to it)."""
    entry = _entry(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DhkdError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = entry.build(num_classes=num_classes)
    model.arch_name = name  # lets load_checkpoint resolve a torchvision weight name without arch=
    if dual_head:
        from dhkd_pipe.models.dual_head import DualHead

        model = DualHead(model, aux_head=aux_head, align_features=align_features, num_classes=num_classes)
        model.arch_name = name
    elif aux_head not in AUX_HEADS:
        raise DhkdError(f"aux_head must be one of {', '.join(AUX_HEADS)}, got {aux_head!r}")
    return model


def check_input_size(name: str, resolution: int, num_classes: int, role: str = "model"):
    """Refuses, before anything is written, a model that cannot take ``resolution`` x ``resolution``
    inputs: the CIFAR zoo's fixed pooling expects its 32-pixel input (``model_input_size``), and any
    network stops working below some size. The check is a forward pass of a model built on the
    ``meta`` device (shapes only: no weights, no arithmetic), so it costs milliseconds.
    """
    import torch

    expected = model_input_size(name)
    try:
        with torch.device("meta"):
            model = _entry(name).build(num_classes=num_classes)
            out = model.eval()(torch.zeros(2, 3, resolution, resolution))
        out = out[0] if isinstance(out, (tuple, list)) else out
        fits = tuple(out.shape) == (2, num_classes)
    except NotImplementedError:  # an operator without a meta kernel: cannot tell, let training say
        return
    except (RuntimeError, ValueError, IndexError):  # shapes that do not fit (e.g. the classifier's input)
        fits = False
    if not fits:
        raise DhkdError(
            f"the {role} {name} is built for {expected}x{expected} inputs and cannot take the data's "
            f"{resolution}x{resolution} images; pass --resolution {expected} or choose a model for "
            f"{resolution}-pixel images (see `dhkd-pipe models`)"
        )
