"""The distillation methods as ``torch.nn.Module`` losses, for users' own training loops.

Each module wraps the method object the CLI trains with (``dhkd_pipe.methods.registry``): the same
published defaults, the same options (refused when the method does not take them), the same
backend dispatch (``backend="auto"``: the fused Triton kernel on CUDA tensors, the PyTorch
reference elsewhere; ``"triton"`` or ``"torch"`` to force one). ``loss(student, labels, teacher)``
is the method's ``total`` (what ``dhkd-pipe distill`` back-propagates); ``loss.terms(...)`` gives
the named parts (``ce``, ``kd``, ...) it logs. A module holds no parameters.

``student`` is the student's logits (B, K), or for ``DHKDLoss`` the pair (head 1, head 2) that a
``DualHead`` returns; ``teacher`` float logits (B, K), or int8 with ``teacher_scale`` (B,) as a store
holds them; ``epoch`` (0-based) drives the schedules (DKD's warm-up, ``kd_stop_epoch``).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

import torch

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.methods.base import Method
from dhkd_pipe.methods.logit_methods import CE, DHKD, DIST, DKD, KD, BinaryKL
from dhkd_pipe.methods.registry import get_method
from dhkd_pipe.option_ranges import check_integer


class MethodLoss(torch.nn.Module):
    """A method of ``dhkd_pipe.methods.registry`` as a loss module; subclasses name the method."""

    method_class: ClassVar[type[Method]]

    def __init__(self, *, backend: str = "auto", **options):
        super().__init__()
        self.method = self.method_class(backend=backend, **options)

    @property
    def dual_head(self) -> bool:
        """Whether the student must return (head 1, head 2): wrap it in ``DualHead``."""
        return self.method.dual_head

    @property
    def term_names(self) -> tuple[str, ...]:
        return self.method.term_names

    def forward(
        self,
        student,
        labels: torch.Tensor,
        teacher: torch.Tensor | None = None,
        teacher_scale: torch.Tensor | None = None,
        epoch: int = 0,
    ) -> torch.Tensor:
        """The method's total loss of the batch, a float32 scalar."""
        return self.terms(student, labels, teacher, teacher_scale, epoch)["total"]

    def terms(
        self,
        student,
        labels: torch.Tensor,
        teacher: torch.Tensor | None = None,
        teacher_scale: torch.Tensor | None = None,
        epoch: int = 0,
    ) -> dict[str, torch.Tensor]:
        """The named terms (``total`` and ``term_names``), each with its own gradient. A batch the
        method cannot compute (one head where it needs two, float labels, an empty batch, shapes
        that differ, an epoch that is not 0, 1, ...) is refused first, naming the argument
        (``Method.check_batch``)."""
        self.method.check_batch(student, labels, teacher, teacher_scale)
        epoch = check_integer("epoch", epoch, 0)  # a negative one would flip a warm-up's sign
        return self.method.terms(student, labels, teacher, teacher_scale, epoch)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**self.method.params(), "backend": self.method.backend}.items())


def _loss_class(name: str, method: type[Method]) -> type[MethodLoss]:
    """A ``MethodLoss`` subclass for ``method`` whose signature and docstring are the method's."""
    fields = sorted(dataclasses.fields(method), key=lambda f: f.name == "backend")  # the options, then backend
    params = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type) for f in fields
    ]
    doc = (
        f"``--method {method.name}`` as a loss module. {inspect.cleandoc(method.__doc__ or '')}\n\n"
        f"Options (keywords, the CLI's defaults): {', '.join(f'{p.name}={p.default!r}' for p in params)}."
    )
    cls = type(name, (MethodLoss,), {"method_class": method, "__doc__": doc, "__module__": __name__})
    cls.__signature__ = inspect.Signature(params)
    return cls


CELoss = _loss_class("CELoss", CE)
KDLoss = _loss_class("KDLoss", KD)
DKDLoss = _loss_class("DKDLoss", DKD)
BinaryKLLoss = _loss_class("BinaryKLLoss", BinaryKL)
DHKDLoss = _loss_class("DHKDLoss", DHKD)
DISTLoss = _loss_class("DISTLoss", DIST)

# method name -> its loss module, for the methods named above
LOSS_MODULES: dict[str, type[MethodLoss]] = {
    c.method_class.name: c for c in (CELoss, KDLoss, DKDLoss, BinaryKLLoss, DHKDLoss, DISTLoss)
}


def loss_class(method: str) -> type[MethodLoss]:
    """The loss module class of ``--method NAME`` (one is made for a method not named above)."""
    if method not in LOSS_MODULES:
        cls = get_method(method)  # an unknown name is one DhkdError line
        if getattr(cls, "needs_features", False):
            raise DhkdError(
                f"--method {method} distils the teacher's intermediate features, not its logits: it has no "
                "loss module of (student, labels, teacher logits); train it with `dhkd-pipe distill --teacher`"
            )
        LOSS_MODULES[method] = _loss_class(f"{cls.__name__}Loss", cls)
    return LOSS_MODULES[method]


def create_loss(method: str, *, backend: str = "auto", **options) -> MethodLoss:
    """The loss module of ``--method NAME`` with its options, e.g. ``create_loss("dkd", beta=4.0)``."""
    return loss_class(method)(backend=backend, **options)


__all__ = [
    "MethodLoss",
    "CELoss",
    "KDLoss",
    "DKDLoss",
    "BinaryKLLoss",
    "DHKDLoss",
    "DISTLoss",
    "LOSS_MODULES",
    "loss_class",
    "create_loss",
]
