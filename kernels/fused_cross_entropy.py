"""Fused cross-entropy: mean over rows of -log softmax(s)[y] and its gradient in one launch.

One program per row: pass 1 reads the row for the online log-sum-exp, pass 2 re-reads it and
writes grad = (softmax(s) - onehot(y)) / B in the input dtype. Backward scales the stored grad.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dhkd_pipe.kernels._launch import StoredGradLoss, launch_rows, stored
from dhkd_pipe.kernels._rowmath import ce_row


@triton.jit
def _ce_kernel(x_ptr, x_stride, y_ptr, g_ptr, g_stride, loss_ptr, K, w, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ce = ce_row(x_ptr + row * x_stride, tl.load(y_ptr + row).to(tl.int64), g_ptr + row * g_stride, K, w, BLOCK)
    tl.store(loss_ptr + row, w * ce)


def cross_entropy_forward(logits, target, *, grad=None, max_block=None):
    """Launches the kernel; ``.loss``: row losses (B,) float32 already divided by B, ``.grads``:
    the gradient of their sum in the input dtype (into ``grad`` when a buffer is given)."""
    return launch_rows(
        _ce_kernel,
        {"logits": logits},
        target=target,
        grads=[grad],
        max_block=max_block,
        weights=lambda B, T: (1.0 / B,),
    )


class FusedCrossEntropyLoss(StoredGradLoss):
    @staticmethod
    def forward(ctx, logits, target, max_block):
        return stored(ctx, cross_entropy_forward(logits, target, max_block=max_block))


def fused_cross_entropy_loss(logits, target, *, max_block=None):
    """Cross-entropy (1/B) sum_i -log softmax(s_i)[y_i] as one Triton launch (float32 scalar);
    ``losses.ce_loss`` is the reference."""
    return FusedCrossEntropyLoss.apply(logits, target, max_block)
