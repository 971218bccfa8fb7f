"""Fused Triton losses (Liger-Kernel style) and the dispatching ``dhkd_loss``.

One file per fused op (``dhkd_loss.py``, ``binary_kl.py``, ``kd.py``, ``cross_entropy.py``), each a
Triton kernel, the ``torch.autograd.Function`` launching it and a functional wrapper; shared
``@triton.jit`` row helpers live in ``_rowmath.py``. Triton is imported lazily: importing this
package, or calling ``dhkd_loss(..., backend="torch")`` on CPU tensors, never imports triton (the
tests set ``TRITON_INTERPRET=1`` before triton's first import).
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import torch

from .. import losses
from ..errors import DhkdError

__all__ = [
    "dhkd_loss",
    "triton_available",
    "fused_dhkd_loss",
    "fused_binary_kl_loss",
    "fused_binary_kl_norm_loss",
    "fused_kd_loss",
    "fused_ce_loss",
]

BACKENDS = ("auto", "triton", "torch")

# wrapper name -> submodule defining it; resolved on first attribute access (imports triton then)
_LAZY = {
    "fused_dhkd_loss": "dhkd_loss",
    "fused_binary_kl_loss": "binary_kl",
    "fused_binary_kl_norm_loss": "binary_kl",
    "fused_kd_loss": "kd",
    "fused_ce_loss": "cross_entropy",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    # Importing the submodule ``dhkd_loss.py`` would rebind this package's ``dhkd_loss`` attribute
    # to that module, shadowing the dispatching function; keep the function.
    def __setattr__(self, name, value):
        if name == "dhkd_loss" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def triton_available() -> bool:
    """Whether the Triton kernels can run here: triton imports, and there is a CUDA device or the
    Triton interpreter is on (``TRITON_INTERPRET=1``, CPU tensors)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _torch_dhkd(logits_ce, logits_kd, teacher, target, temperature, alpha, gamma, kd_loss, teacher_scale):
    loss = gamma * losses.ce_loss(logits_ce, target)
    if teacher is not None:
        t = losses.dequantize(teacher, teacher_scale)
        loss = loss + alpha * losses.KD_LOSSES[kd_loss](logits_kd, t, temperature)
    return loss


def dhkd_loss(
    logits_ce: torch.Tensor,
    logits_kd: torch.Tensor,
    teacher: torch.Tensor | None,
    target: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    gamma: float,
    kd_loss: str,
    teacher_scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """gamma * CE(logits_ce, target) + alpha * KD(logits_kd, teacher), a float32 scalar.

    ``kd_loss`` is a key of ``losses.KD_LOSSES`` ("kd", "binary_kl", "binary_kl_norm"); ``teacher``
    is float16/bfloat16/float32 logits or int8 with a per-row float ``teacher_scale`` (B,), or None
    (CE only; then ``alpha`` must be 0). ``logits_ce`` and ``logits_kd`` may be the same tensor
    (single-head methods): autograd sums both gradients. ``backend``: "auto" runs the fused Triton
    kernel on CUDA tensors (when triton imports) and the PyTorch reference otherwise; "triton"
    forces the kernel (DhkdError if it cannot run here); "torch" the reference. No gradient flows
    to the teacher.
    """
    if backend not in BACKENDS:
        raise DhkdError(f"unknown loss backend {backend!r}; choose one of {list(BACKENDS)}")
    if kd_loss not in losses.KD_LOSSES:
        raise DhkdError(f"unknown kd_loss {kd_loss!r}; choose one of {sorted(losses.KD_LOSSES)}")
    if teacher is None and alpha != 0:
        raise DhkdError("this loss needs teacher logits (alpha != 0) but none were given")
    if logits_ce.dim() != 2 or logits_ce.shape != logits_kd.shape:
        raise DhkdError(
            f"both heads must be (B, K) logits of one shape, got {tuple(logits_ce.shape)} and {tuple(logits_kd.shape)}"
        )
    if backend == "triton":
        if not triton_available():
            raise DhkdError("backend 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on CPU)")
        use_triton = True
    elif backend == "auto":
        use_triton = logits_ce.is_cuda and triton_available()
    else:
        use_triton = False
    if not use_triton:
        return _torch_dhkd(logits_ce, logits_kd, teacher, target, temperature, alpha, gamma, kd_loss, teacher_scale)
    if teacher is None:
        from .cross_entropy import fused_ce_loss

        return gamma * fused_ce_loss(logits_ce, target)
    from .dhkd_loss import fused_dhkd_loss

    return fused_dhkd_loss(
        logits_ce,
        logits_kd,
        teacher,
        target,
        temperature=temperature,
        alpha=alpha,
        gamma=gamma,
        kd_loss=kd_loss,
        teacher_scale=teacher_scale,
    )
