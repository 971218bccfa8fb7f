"""Fused Hinton KD: T^2/B * sum_i KL(softmax(t_i/T) || softmax(s_i/T)) and its gradient in one launch.

One program per row: pass 1 reads student and teacher rows once for the online statistics
(both log-sum-exps and the KL), pass 2 re-reads them and writes grad = T (softmax(s/T) -
softmax(t/T)) / B in the student's dtype. Backward scales the stored grad.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import DhkdError
from ._rowmath import block_size, kd_grad_store, kd_row_stats, logits_rows, num_warps, teacher_rows


@triton.jit
def _kd_kernel(
    s_ptr, s_stride, t_ptr, t_stride, t_scale_ptr, g_ptr, g_stride, loss_ptr, K, inv_T, w, gw,
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = s_ptr + row * s_stride
    t = t_ptr + row * t_stride
    if HAS_SCALE:
        t_scale = tl.load(t_scale_ptr + row).to(tl.float32)
    else:
        t_scale = 1.0
    ms, log_ds, mt, log_dt, kl = kd_row_stats(s, t, t_scale, K, inv_T, BLOCK)
    kd_grad_store(s, t, t_scale, g_ptr + row * g_stride, ms, log_ds, mt, log_dt, K, inv_T, gw, BLOCK)
    tl.store(loss_ptr + row, w * kl)


def kd_forward(student, teacher, temperature, *, teacher_scale=None, grad=None, max_block=None):
    """(row losses (B,) float32 with the T^2/B factor, gradient of their sum in the student's dtype)."""
    s = logits_rows(student, "student logits")
    if temperature <= 0:
        raise DhkdError(f"temperature must be positive, got {temperature}")
    B, K = s.shape
    t, scale = teacher_rows(teacher, s.shape, teacher_scale)
    g = torch.empty((B, K), dtype=s.dtype, device=s.device) if grad is None else grad
    loss = torch.empty(B, dtype=torch.float32, device=s.device)
    T = float(temperature)
    block = block_size(K, max_block)
    _kd_kernel[(B,)](
        s, s.stride(0), t, t.stride(0), scale if scale is not None else loss, g, g.stride(0), loss,
        K, 1.0 / T, T * T / B, T / B, HAS_SCALE=scale is not None, BLOCK=block, num_warps=num_warps(block),
    )
    return loss, g


class FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, teacher_scale, max_block):
        loss, g = kd_forward(student, teacher, temperature, teacher_scale=teacher_scale, max_block=max_block)
        ctx.save_for_backward(g)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        (g,) = ctx.saved_tensors
        return g * grad_output, None, None, None, None


def fused_kd_loss(student, teacher, temperature, *, teacher_scale=None, max_block=None):
    """KD loss T^2/B sum KL(softmax(t/T) || softmax(s/T)) as one Triton launch (float32 scalar);
    teacher float or int8 with per-row ``teacher_scale``. No gradient flows to the teacher."""
    return FusedKD.apply(student, teacher, temperature, teacher_scale, max_block)
