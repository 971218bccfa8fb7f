"""Fused DHKD loss: gamma * CE(head 1, y) + alpha * KD(head 2, teacher) and both gradients in one
launch (Liger-Kernel style: kernel, then autograd.Function, then functional wrapper).

Grid: one program per row. Per row the program reads the label, the teacher's int8 scale if any,
and walks K in BLOCK-column blocks:

  pass 1  head 1 (online log-sum-exp for CE); head 2 + teacher (online KD statistics, or for the
          binary losses the per-class KL and its gradient, written to grad_kd right away);
  pass 2  head 1 again to write grad_ce = gamma/B (softmax - onehot); for kd_loss="kd" head 2 and
          the teacher again to write grad_kd = alpha T/B (softmax(s/T) - softmax(t/T)).

HBM traffic per row (e = element size, K classes): reads 2 K e_1 + K e_2 + K e_t (binary losses)
or 2 (K e_1 + K e_2 + K e_t) ("kd"); the second reads are of the row just read, usually still in
L2. Writes K e_1 + K e_2 of gradients (input dtype, pre-scaled) plus one float32 row loss. The
loss is the sum of the row-loss buffer in torch (deterministic); backward only multiplies the
stored gradients by grad_output, so no softmax / sigmoid / log intermediate is kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import DhkdError
from ._rowmath import (
    binary_kl_row,
    block_size,
    ce_grad_store,
    kd_grad_store,
    kd_row_stats,
    label_logit,
    labels,
    logits_rows,
    num_warps,
    row_lse,
    teacher_rows,
)

KD_MODES = {"kd": 0, "binary_kl": 1, "binary_kl_norm": 2}


@triton.jit
def _dhkd_kernel(
    h1_ptr, h1_stride, h2_ptr, h2_stride, t_ptr, t_stride, t_scale_ptr, y_ptr,
    g1_ptr, g1_stride, g2_ptr, g2_stride, loss_ptr,
    K, inv_T, ce_w, kd_w, kd_gw,
    KD_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    h1 = h1_ptr + row * h1_stride
    h2 = h2_ptr + row * h2_stride
    t = t_ptr + row * t_stride
    g1 = g1_ptr + row * g1_stride
    g2 = g2_ptr + row * g2_stride
    y = tl.load(y_ptr + row).to(tl.int64)
    if HAS_SCALE:
        t_scale = tl.load(t_scale_ptr + row).to(tl.float32)
    else:
        t_scale = 1.0

    m1, log_d1 = row_lse(h1, K, 1.0, BLOCK)
    ce = (m1 - label_logit(h1, y, K)) + log_d1
    if KD_MODE == 0:
        ms, log_ds, mt, log_dt, kl = kd_row_stats(h2, t, t_scale, K, inv_T, BLOCK)
        kd_grad_store(h2, t, t_scale, g2, ms, log_ds, mt, log_dt, K, inv_T, kd_gw, BLOCK)
    else:
        kl = binary_kl_row(h2, t, t_scale, g2, K, inv_T, kd_gw, KD_MODE == 2, BLOCK)
    ce_grad_store(h1, g1, y, m1, log_d1, K, ce_w, BLOCK)
    tl.store(loss_ptr + row, ce_w * ce + kd_w * kl)


def dhkd_forward(
    logits_ce, logits_kd, teacher, target, *, temperature, alpha, gamma, kd_loss,
    teacher_scale=None, grad_ce=None, grad_kd=None, max_block=None,
):
    """Launches the kernel: (row losses (B,) float32, grad_ce, grad_kd). The gradients are of the
    summed loss, in the input dtypes; ``grad_ce`` / ``grad_kd`` may be given (B, K) buffers."""
    if kd_loss not in KD_MODES:
        raise DhkdError(f"unknown kd_loss {kd_loss!r}; choose one of {sorted(KD_MODES)}")
    h1 = logits_rows(logits_ce, "head-1 logits")
    h2 = logits_rows(logits_kd, "head-2 logits")
    if h1.shape != h2.shape:
        raise DhkdError(f"the two heads differ in shape: {tuple(h1.shape)} and {tuple(h2.shape)}")
    if temperature <= 0:
        raise DhkdError(f"temperature must be positive, got {temperature}")
    B, K = h1.shape
    t, scale = teacher_rows(teacher, h1.shape, teacher_scale)
    y = labels(target, B, K)
    g1 = torch.empty((B, K), dtype=h1.dtype, device=h1.device) if grad_ce is None else grad_ce
    g2 = torch.empty((B, K), dtype=h2.dtype, device=h2.device) if grad_kd is None else grad_kd
    loss = torch.empty(B, dtype=torch.float32, device=h1.device)
    if B == 0 or K == 0:
        raise DhkdError("empty logits")
    T = float(temperature)
    block = block_size(K, max_block)
    _dhkd_kernel[(B,)](
        h1, h1.stride(0), h2, h2.stride(0), t, t.stride(0), scale if scale is not None else loss, y,
        g1, g1.stride(0), g2, g2.stride(0), loss,
        K, 1.0 / T, float(gamma) / B, float(alpha) * T * T / B, float(alpha) * T / B,
        KD_MODE=KD_MODES[kd_loss], HAS_SCALE=scale is not None, BLOCK=block, num_warps=num_warps(block),
    )
    return loss, g1, g2


class FusedDhkdLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_ce, logits_kd, teacher, target, temperature, alpha, gamma, kd_loss, teacher_scale, max_block):
        loss, g1, g2 = dhkd_forward(
            logits_ce, logits_kd, teacher, target, temperature=temperature, alpha=alpha, gamma=gamma,
            kd_loss=kd_loss, teacher_scale=teacher_scale, max_block=max_block,
        )
        ctx.save_for_backward(g1, g2)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        g1, g2 = ctx.saved_tensors
        # head 1 and head 2 may be one tensor: autograd then adds the two returned gradients
        return g1 * grad_output, g2 * grad_output, None, None, None, None, None, None, None, None


def fused_dhkd_loss(
    logits_ce, logits_kd, teacher, target, *, temperature, alpha, gamma,
    kd_loss="binary_kl_norm", teacher_scale=None, max_block=None,
):
    """gamma * CE(logits_ce, target) + alpha * KD(logits_kd, teacher) as one fused Triton launch;
    a float32 scalar whose backward scales the gradients stored by the forward pass.

    kd_loss: "binary_kl_norm" (published DHKD), "binary_kl" or "kd" (formulas in
    ``dhkd_pipe.losses``). Logits float32/bfloat16/float16 (B, K), any row stride; teacher
    float16/bfloat16/float32, or int8 with float ``teacher_scale`` (B,); target int64/int32 (B,).
    ``max_block`` caps the column block (tests use a small one to exercise several blocks).
    """
    return FusedDhkdLoss.apply(
        logits_ce, logits_kd, teacher, target, temperature, alpha, gamma, kd_loss, teacher_scale, max_block
    )
