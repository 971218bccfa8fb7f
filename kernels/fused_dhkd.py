"""Fused DHKD loss: gamma * CE(head 1, y) and alpha * KD(head 2, teacher), both values and both
gradients in one launch (Liger-Kernel style: kernel, then autograd.Function, then functional wrapper).

Grid: one program per row. Per row the program reads the label, the teacher's int8 scale if any,
and walks K in BLOCK-column blocks:

  head 1  online log-sum-exp for CE, then again to write grad_ce = gamma/B (softmax - onehot);
  head 2 + teacher  for the binary losses one pass: the per-class KL, its gradient written to
          grad_kd right away; for kd_loss="kd" one pass for the online KD statistics and one to
          write grad_kd = alpha T/B (softmax(s/T) - softmax(t/T)).

HBM traffic per row (e = element size, K classes): reads 2 K e_1 + K e_2 + K e_t (binary losses)
or 2 (K e_1 + K e_2 + K e_t) ("kd"); the second reads are of the row just read, usually still in
L2. Writes K e_1 + K e_2 of gradients (input dtype, pre-scaled) plus two float32 row losses (the
CE term and the KD term). Each term is the sum of its column of the (B, 2) row-loss buffer in torch
(deterministic) and is its own autograd output: backward multiplies head 1's stored gradient by the
CE term's grad_output and head 2's by the KD term's, so a caller can differentiate the two terms
apart (gradient alignment) and no softmax / sigmoid / log intermediate is kept.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dhkd_pipe.kernels._launch import StoredGradLoss, kd_mode, launch_rows, stored
from dhkd_pipe.kernels._rowmath import ce_row, kd_mode_row, row_scale


@triton.jit
def _dhkd_kernel(
    h1_ptr,
    h1_stride,
    h2_ptr,
    h2_stride,
    t_ptr,
    t_stride,
    t_scale_ptr,
    y_ptr,
    g1_ptr,
    g1_stride,
    g2_ptr,
    g2_stride,
    loss_ptr,
    K,
    inv_T,
    ce_w,
    kd_w,
    kd_gw,
    KD_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row).to(tl.int64)
    t_scale = row_scale(t_scale_ptr, row, HAS_SCALE)
    ce = ce_row(h1_ptr + row * h1_stride, y, g1_ptr + row * g1_stride, K, ce_w, BLOCK)
    kl = kd_mode_row(
        h2_ptr + row * h2_stride,
        t_ptr + row * t_stride,
        t_scale,
        g2_ptr + row * g2_stride,
        K,
        inv_T,
        kd_gw,
        KD_MODE,
        BLOCK,
    )
    tl.store(loss_ptr + 2 * row, ce_w * ce)
    tl.store(loss_ptr + 2 * row + 1, kd_w * kl)


def dhkd_forward(
    logits_ce,
    logits_kd,
    teacher,
    target,
    *,
    temperature,
    alpha,
    gamma,
    kd_loss,
    teacher_scale=None,
    grad_ce=None,
    grad_kd=None,
    max_block=None,
):
    """Launches the kernel; ``.loss``: row losses (B, 2) float32 (column 0 the CE term, column 1 the
    KD term), ``.grads``: (grad_ce, grad_kd), the gradients of the CE term w.r.t. head 1 and of the
    KD term w.r.t. head 2, in the heads' dtypes (into ``grad_ce`` / ``grad_kd`` when given)."""
    return launch_rows(
        _dhkd_kernel,
        {"head-1 logits": logits_ce, "head-2 logits": logits_kd},
        teacher=teacher,
        teacher_scale=teacher_scale,
        target=target,
        temperature=temperature,
        grads=[grad_ce, grad_kd],
        max_block=max_block,
        terms=2,
        KD_MODE=kd_mode(kd_loss),
        weights=lambda B, T: (float(gamma) / B, float(alpha) * T * T / B, float(alpha) * T / B),
    )


class FusedDhkdLoss(StoredGradLoss):
    """Two outputs, the CE term (head 1) and the KD term (head 2), of one launch."""

    @staticmethod
    def forward(
        ctx, logits_ce, logits_kd, teacher, target, temperature, alpha, gamma, kd_loss, teacher_scale, max_block
    ):
        return stored(
            ctx,
            dhkd_forward(
                logits_ce,
                logits_kd,
                teacher,
                target,
                temperature=temperature,
                alpha=alpha,
                gamma=gamma,
                kd_loss=kd_loss,
                teacher_scale=teacher_scale,
                max_block=max_block,
            ),
        )


def fused_dhkd_terms(
    logits_ce,
    logits_kd,
    teacher,
    target,
    *,
    temperature,
    alpha,
    gamma,
    kd_loss="binary_kl_norm",
    teacher_scale=None,
    max_block=None,
):
    """(gamma * CE(logits_ce, target), alpha * KD(logits_kd, teacher)) from one fused Triton launch:
    two float32 scalars, each with its own backward (scaling the gradient stored by the forward).

    kd_loss: "binary_kl_norm" (published DHKD), "binary_kl" or "kd" (formulas in
    ``dhkd_pipe.methods.losses``). Logits float32/bfloat16/float16 (B, K), any row stride; teacher
    float16/bfloat16/float32, or int8 with float ``teacher_scale`` (B,); target int64/int32 (B,).
    ``max_block`` caps the column block (tests use a small one to exercise several blocks).
    """
    return FusedDhkdLoss.apply(
        logits_ce, logits_kd, teacher, target, temperature, alpha, gamma, kd_loss, teacher_scale, max_block
    )


def fused_dhkd_loss(
    logits_ce,
    logits_kd,
    teacher,
    target,
    *,
    temperature,
    alpha,
    gamma,
    kd_loss="binary_kl_norm",
    teacher_scale=None,
    max_block=None,
):
    """gamma * CE(logits_ce, target) + alpha * KD(logits_kd, teacher): the sum of
    ``fused_dhkd_terms`` (same arguments), one launch."""
    ce, kd = fused_dhkd_terms(
        logits_ce,
        logits_kd,
        teacher,
        target,
        temperature=temperature,
        alpha=alpha,
        gamma=gamma,
        kd_loss=kd_loss,
        teacher_scale=teacher_scale,
        max_block=max_block,
    )
    return ce + kd
