"""Distillation methods: one small object per ``--method``, shared by online and cached distillation.

A method is a frozen dataclass built with keywords (``DKD(beta=4.0)``); its fields are its options
with their published defaults, and ``knobs`` says in words what each one weighs. ``terms(outputs,
target, teacher, teacher_scale, epoch)`` returns the batch's named loss terms, float32 scalars:

- ``ce``: the weighted cross-entropy (head 1 for dual-head methods),
- ``kd``: the weighted distillation term (absent for ``ce``),
- ``total`` = ce + kd, what training back-propagates,

each with its own gradient, so a caller can differentiate ``ce`` and ``kd`` apart. A method may add
the weighted parts of ``kd`` for logging (``term_names`` lists every term but ``total``): dkd's
``tckd`` / ``nckd``, dist's ``inter`` / ``intra``. CE with KD or a binary KL goes through
``dhkd_pipe.methods.losses.dhkd_terms`` (one fused Triton launch on CUDA tensors, the PyTorch reference
elsewhere; a single-head method passes its logits as both heads); CE alone through
``losses.cross_entropy``; DKD's and DIST's terms are PyTorch references.

The base class and its checks are in ``base``, the methods in ``logit_methods`` and
``feature_methods``; this module names them (``METHODS``) and turns a config into one. Adding a
method: its class there and one entry in ``METHODS``; its fields become config fields and
``distill`` options by themselves (``config.MethodOptions``), its ``knobs`` their help.
"""

from __future__ import annotations

import dataclasses

from dhkd_pipe.errors import BadArgument, DhkdError
from dhkd_pipe.methods.base import Method
from dhkd_pipe.methods.feature_methods import DHKDReviewKD, FitNet, ReviewKD
from dhkd_pipe.methods.logit_methods import CE, DHKD, DIST, DKD, KD, BinaryKL

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (CE, KD, DKD, BinaryKL, DHKD, DIST, FitNet, ReviewKD, DHKDReviewKD)
}


# the config options the methods own (TrainConfig fields, from the methods' own fields); None there
# means "the chosen method's default"
OPTIONS: tuple[str, ...] = tuple(
    dict.fromkeys(f.name for cls in METHODS.values() for f in dataclasses.fields(cls) if f.name != "backend")
)


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise BadArgument(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def option_defaults(cls: type[Method]) -> dict:
    """The config options ``cls`` takes (its fields but ``backend``) with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name != "backend"}


def option_names(cls: type[Method]) -> tuple[str, ...]:
    """The config options ``cls`` takes."""
    return tuple(option_defaults(cls))


def from_config(cfg) -> Method:
    """The config's method with its options: those set in ``cfg`` (not None) override the method's
    defaults; an option the method does not take is a user error, not silently ignored."""
    cls = get_method(cfg.method)
    given = {k: getattr(cfg, k) for k in OPTIONS if getattr(cfg, k, None) is not None}
    stray = [k for k in given if k not in option_names(cls)]
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        takes = ", ".join("--" + k.replace("_", "-") for k in option_names(cls))
        raise DhkdError(f"--method {cls.name} does not use {flags} (it takes {takes})")
    return cls(backend=cfg.kernels, **given)


def methods_taking(option: str) -> tuple[str, ...]:
    """The names of the methods that take ``option``."""
    return tuple(name for name, cls in METHODS.items() if option in option_names(cls))


def method_option_fields() -> list[tuple]:
    """``(name, type, field)`` of each option of ``OPTIONS`` for ``dataclasses.make_dataclass``: the
    methods' own type (``float``) made optional, default None, with its help and choices."""
    from dhkd_pipe.options import option

    out = []
    for name in OPTIONS:
        declared = [f for cls in METHODS.values() for f in dataclasses.fields(cls) if f.name == name]
        kind = str(declared[0].type).replace(" | None", "")
        choices = next((f.metadata["choices"] for f in declared if "choices" in f.metadata), None)
        out.append(
            (
                name,
                f"{kind} | None",
                option(None, option_help(name), choices=choices, commands=("distill",), sweep=True),
            )
        )
    return out


def option_help(option: str) -> str:
    """What ``option`` means for each method that takes it, with the default: for ``--help``; one
    text shared by every method that takes it is said once (``kd, dhkd only: ...``)."""
    texts = {cls.knobs[option] for cls in METHODS.values() if option in cls.knobs}
    if len(texts) == 1 and option_defaults(METHODS[methods_taking(option)[0]])[option] is None:
        return f"{', '.join(methods_taking(option))} only: {texts.pop()}."
    parts = []
    for cls in METHODS.values():
        if option in cls.knobs:
            parts.append(f"{cls.name}: {cls.knobs[option]}, default {option_defaults(cls)[option]}")
    return "; ".join(parts) + "."
