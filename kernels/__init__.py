"""Fused Triton losses (Liger-Kernel style): each a kernel, the ``torch.autograd.Function``
launching it and a functional wrapper, all named ``Fused<Op>Loss`` / ``fused_<op>_loss``:

    fused_dhkd.py           FusedDhkdLoss, fused_dhkd_terms,        (gamma CE(head 1), alpha KD(head 2)),
                            fused_dhkd_loss                         and their sum
    fused_kd.py             FusedKdLoss, fused_kd_loss              one of losses.KD_LOSSES (kd_loss=)
    fused_cross_entropy.py  FusedCrossEntropyLoss, fused_cross_entropy_loss

``_launch.py`` holds the host side every op shares (input checks, buffers, block size and warps,
the launch, the stored-gradient autograd base); ``_rowmath.py`` the ``@triton.jit`` row helpers,
among them ``load_teacher``, the kernels' only teacher-row loader (float32 ``q * scale``, the
formula of ``teacher_logits.dequantize``).

Which backend runs (Triton on CUDA tensors, the PyTorch reference elsewhere) is decided next to
the reference losses, in ``dhkd_pipe.methods.losses`` (``dhkd_loss``, ``cross_entropy``). Triton is
imported lazily: importing this package, or computing a loss on CPU tensors with backend "auto"
or "torch", never imports triton (the tests set ``TRITON_INTERPRET=1`` before triton's first
import); the names below load their module on first access.
"""

from __future__ import annotations

import importlib
import os

import torch

# public name -> module defining it; imported (with triton) on first attribute access
_LAZY = {
    "FusedDhkdLoss": "fused_dhkd",
    "fused_dhkd_loss": "fused_dhkd",
    "fused_dhkd_terms": "fused_dhkd",
    "FusedKdLoss": "fused_kd",
    "fused_kd_loss": "fused_kd",
    "FusedCrossEntropyLoss": "fused_cross_entropy",
    "fused_cross_entropy_loss": "fused_cross_entropy",
}

__all__ = ["triton_available", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def triton_available() -> bool:
    """Whether the Triton kernels can run here: triton imports, and there is a CUDA device or the
    Triton interpreter is on (``TRITON_INTERPRET=1``, CPU tensors)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
