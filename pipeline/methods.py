"""The loss registry: one entry per ``--method``, shared by online and cached distillation.

Every method maps (student outputs, labels, teacher logits) to a scalar loss. The distillation
methods that the fused kernel covers (``kd``, ``binary_kl``, ``dhkd``) go through
``dhkd_pipe.losses.dhkd_loss``, which uses Triton on CUDA tensors and the PyTorch reference
elsewhere; a single-head method passes the same logits as both heads, and autograd sums the two
gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import losses
from .errors import DhkdError


@dataclass(frozen=True)
class Method:
    name: str
    dual_head: bool
    needs_teacher: bool
    gamma: float  # weight of cross-entropy on the (first) head
    alpha: float  # weight of the distillation term
    temperature: float
    summary: str


METHODS = {
    m.name: m
    for m in (
        Method("ce", False, False, 1.0, 0.0, 1.0, "the student alone, cross-entropy on the labels"),
        Method("kd", False, True, 0.1, 0.9, 4.0, "Hinton KD: CE + softmax KL at temperature T"),
        Method("dkd", False, True, 1.0, 1.0, 4.0, "decoupled KD (Zhao et al. 2022), warmed up"),
        Method("binary_kl", False, True, 1.0, 1.0, 4.0, "CE and BinaryKL on one head (the collapsing ablation)"),
        Method("dhkd", True, True, 1.0, 1.0, 4.0, "dual-head KD: CE on head 1, BinaryKL on head 2"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise DhkdError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class LossSpec:
    """A method with its weights resolved from the config."""

    method: Method
    kd_loss: str
    alpha: float
    gamma: float
    temperature: float
    beta: float
    warmup_epochs: int
    backend: str

    @classmethod
    def from_config(cls, cfg) -> "LossSpec":
        m = get_method(cfg.method)
        return cls(
            method=m,
            kd_loss=cfg.kd_loss,
            alpha=m.alpha if cfg.alpha is None else cfg.alpha,
            gamma=m.gamma if cfg.gamma is None else cfg.gamma,
            temperature=m.temperature if cfg.temperature is None else cfg.temperature,
            beta=cfg.beta,
            warmup_epochs=cfg.warmup_epochs,
            backend=cfg.kernels,
        )

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch: int = 0) -> dict:
        """dhkd's two objectives apart, for gradient alignment: ``{"ce": gamma * CE(head 1),
        "kd": alpha * KD(head 2), "total": their sum}`` (same backend as ``__call__``)."""
        from .losses import dhkd_loss

        if self.method.name != "dhkd":
            raise DhkdError(f"--method {self.method.name} has no separate CE and distillation heads")
        head1, head2 = outputs
        kw = dict(temperature=self.temperature, kd_loss=self.kd_loss, teacher_scale=teacher_scale, backend=self.backend)
        ce = dhkd_loss(head1, head2, None, target, alpha=0.0, gamma=self.gamma, **kw)
        kd = dhkd_loss(head1, head2, teacher, target, alpha=self.alpha, gamma=0.0, **kw)
        return {"ce": ce, "kd": kd, "total": ce + kd}

    def __call__(self, outputs, target, teacher=None, teacher_scale=None, epoch: int = 0) -> torch.Tensor:
        """The batch loss. ``outputs`` is one logits tensor, or (head 1, head 2) for dual-head
        methods; ``teacher`` may be float or int8 with ``teacher_scale`` (B,)."""
        from .losses import dhkd_loss

        name = self.method.name
        if name == "ce":
            return self.gamma * losses.cross_entropy(outputs, target, backend=self.backend)
        if name == "dkd":
            t = losses.dequantize(teacher, teacher_scale)
            warm = min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs else 1.0
            kd = losses.dkd_loss(outputs, t, target, alpha=self.alpha, beta=self.beta, T=self.temperature)
            return self.gamma * losses.ce_loss(outputs, target) + warm * kd
        if name == "dhkd":
            head1, head2 = outputs
            kd_loss = self.kd_loss
        else:
            head1 = head2 = outputs
            kd_loss = "kd" if name == "kd" else self.kd_loss
        return dhkd_loss(
            head1,
            head2,
            teacher,
            target,
            temperature=self.temperature,
            alpha=self.alpha,
            gamma=self.gamma,
            kd_loss=kd_loss,
            teacher_scale=teacher_scale,
            backend=self.backend,
        )
