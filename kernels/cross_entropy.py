"""Fused cross-entropy: mean over rows of -log softmax(s)[y] and its gradient in one launch.

One program per row: pass 1 reads the row for the online log-sum-exp, pass 2 re-reads it and
writes grad = (softmax(s) - onehot(y)) / B in the input dtype. Backward scales the stored grad.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rowmath import block_size, ce_grad_store, label_logit, labels, logits_rows, num_warps, row_lse


@triton.jit
def _ce_kernel(x_ptr, x_stride, y_ptr, g_ptr, g_stride, loss_ptr, K, w, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x = x_ptr + row * x_stride
    y = tl.load(y_ptr + row).to(tl.int64)
    m, log_d = row_lse(x, K, 1.0, BLOCK)
    ce = (m - label_logit(x, y, K)) + log_d
    ce_grad_store(x, g_ptr + row * g_stride, y, m, log_d, K, w, BLOCK)
    tl.store(loss_ptr + row, w * ce)


def ce_forward(logits, target, *, grad=None, max_block=None):
    """(row losses (B,) float32 already divided by B, gradient of their sum in the input dtype)."""
    x = logits_rows(logits, "logits")
    B, K = x.shape
    y = labels(target, B, K)
    g = torch.empty((B, K), dtype=x.dtype, device=x.device) if grad is None else grad
    loss = torch.empty(B, dtype=torch.float32, device=x.device)
    block = block_size(K, max_block)
    _ce_kernel[(B,)](x, x.stride(0), y, g, g.stride(0), loss, K, 1.0 / B, BLOCK=block, num_warps=num_warps(block))
    return loss, g


class FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, max_block):
        loss, g = ce_forward(logits, target, max_block=max_block)
        ctx.save_for_backward(g)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        (g,) = ctx.saved_tensors
        return g * grad_output, None, None


def fused_ce_loss(logits, target, *, max_block=None):
    """Cross-entropy (1/B) sum_i -log softmax(s_i)[y_i] as one Triton launch (float32 scalar)."""
    return FusedCrossEntropy.apply(logits, target, max_block)
