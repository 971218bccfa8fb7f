"""Fused distillation loss of one student head against the teacher, value and gradient in one
launch: any of ``dhkd_pipe.methods.losses.KD_LOSSES`` (Hinton KD, BinaryKL, BinaryKL-norm), each
T^2/B * sum_i KL_i.

One program per row. "kd": pass 1 reads student and teacher rows once for the online statistics
(both log-sum-exps and the KL), pass 2 re-reads them and writes grad = T (softmax(s/T) -
softmax(t/T)) / B. The binary losses: one pass, each block's per-class KL summed and its gradient
written before the next block. HBM traffic per row: K (e_s + e_t) read (twice for "kd"), K e_s
written, one float32 row loss. Gradients in the student's dtype; backward scales them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dhkd_pipe.kernels._launch import StoredGradLoss, kd_mode, launch_rows, stored
from dhkd_pipe.kernels._rowmath import kd_mode_row, row_scale


@triton.jit
def _kd_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    t_scale_ptr,
    g_ptr,
    g_stride,
    loss_ptr,
    K,
    inv_T,
    w,
    gw,
    KD_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t_scale = row_scale(t_scale_ptr, row, HAS_SCALE)
    kl = kd_mode_row(
        s_ptr + row * s_stride, t_ptr + row * t_stride, t_scale, g_ptr + row * g_stride, K, inv_T, gw, KD_MODE, BLOCK
    )
    tl.store(loss_ptr + row, w * kl)


def kd_forward(student, teacher, temperature, *, kd_loss="kd", teacher_scale=None, grad=None, max_block=None):
    """Launches the kernel; ``.loss``: row losses (B,) float32 with the T^2/B factor, ``.grads``:
    the gradient of their sum in the student's dtype (into ``grad`` when a (B, K) buffer is given)."""
    return launch_rows(
        _kd_kernel,
        {"student logits": student},
        teacher=teacher,
        teacher_scale=teacher_scale,
        temperature=temperature,
        grads=[grad],
        max_block=max_block,
        KD_MODE=kd_mode(kd_loss),
        weights=lambda B, T: (T * T / B, T / B),
    )


class FusedKdLoss(StoredGradLoss):
    @staticmethod
    def forward(ctx, student, teacher, temperature, kd_loss, teacher_scale, max_block):
        return stored(
            ctx,
            kd_forward(
                student, teacher, temperature, kd_loss=kd_loss, teacher_scale=teacher_scale, max_block=max_block
            ),
        )


def fused_kd_loss(student, teacher, temperature, *, kd_loss="kd", teacher_scale=None, max_block=None):
    """``losses.KD_LOSSES[kd_loss](student, teacher, temperature)`` as one Triton launch (a float32
    scalar). Student float32/bfloat16/float16 (B, K), any row stride; teacher float, or int8 with
    per-row float ``teacher_scale`` (B,). No gradient flows to the teacher. ``max_block`` caps the
    column block (tests use a small one to exercise several blocks)."""
    return FusedKdLoss.apply(student, teacher, temperature, kd_loss, teacher_scale, max_block)
