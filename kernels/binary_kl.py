"""Fused BinaryKL and BinaryKL-norm (DHKD's distillation losses) and their gradients in one launch.

One program per row, one pass: each block of student and teacher logits is read once, its
per-class binary KL summed and its gradient written (student dtype) before the next block.
HBM traffic per row: K (e_s + e_t) read, K e_s written, one float32 row loss. Backward scales the
stored grad. Formulas: ``dhkd_pipe.losses.binary_kl_loss`` / ``binary_kl_norm_loss``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import DhkdError
from ._rowmath import binary_kl_row, block_size, logits_rows, num_warps, teacher_rows


@triton.jit
def _binary_kl_kernel(
    s_ptr, s_stride, t_ptr, t_stride, t_scale_ptr, g_ptr, g_stride, loss_ptr, K, inv_T, w, gw,
    NORM: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_SCALE:
        t_scale = tl.load(t_scale_ptr + row).to(tl.float32)
    else:
        t_scale = 1.0
    kl = binary_kl_row(s_ptr + row * s_stride, t_ptr + row * t_stride, t_scale, g_ptr + row * g_stride, K, inv_T, gw, NORM, BLOCK)
    tl.store(loss_ptr + row, w * kl)


def binary_kl_forward(student, teacher, temperature, *, norm, teacher_scale=None, grad=None, max_block=None):
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
    _binary_kl_kernel[(B,)](
        s, s.stride(0), t, t.stride(0), scale if scale is not None else loss, g, g.stride(0), loss,
        K, 1.0 / T, T * T / B, T / B, NORM=bool(norm), HAS_SCALE=scale is not None, BLOCK=block,
        num_warps=num_warps(block),
    )
    return loss, g


class FusedBinaryKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, norm, teacher_scale, max_block):
        loss, g = binary_kl_forward(student, teacher, temperature, norm=norm, teacher_scale=teacher_scale, max_block=max_block)
        ctx.save_for_backward(g)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        (g,) = ctx.saved_tensors
        return g * grad_output, None, None, None, None, None


def fused_binary_kl_loss(student, teacher, temperature, *, teacher_scale=None, max_block=None):
    """BinaryKL T^2/B sum_{i,k} KL([σ(t/T), 1-σ(t/T)] || [σ(s/T), 1-σ(s/T)]), one Triton launch."""
    return FusedBinaryKL.apply(student, teacher, temperature, False, teacher_scale, max_block)


def fused_binary_kl_norm_loss(student, teacher, temperature, *, teacher_scale=None, max_block=None):
    """BinaryKL-norm T^2/B sum_{i,k} KL([1/2, 1/2] || [σ(d), 1-σ(d)]), d = (s-t)/T, one Triton launch."""
    return FusedBinaryKL.apply(student, teacher, temperature, True, teacher_scale, max_block)
