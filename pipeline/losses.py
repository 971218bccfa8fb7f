"""PyTorch reference losses: the ground truth the Triton kernels in ``dhkd_pipe.kernels`` match.

Notation: B rows, K classes, temperature T, student logits s, teacher logits t (both (B, K)),
sigma the sigmoid, softplus(x) = log(1 + e^x). Every loss is computed in float32 (float16 and
bfloat16 are upcast; float64 stays float64) through log-softmax / log-sigmoid / softplus forms,
never log(clamp(sigmoid)), so values and gradients stay finite at logits of +-1e4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import DhkdError

_FLOAT_TEACHER = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _upcast(s: torch.Tensor, t: torch.Tensor | None = None):
    if t is None:
        return s.to(_compute_dtype(s))
    if s.shape != t.shape:
        raise DhkdError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
    dt = _compute_dtype(s, t)
    return s.to(dt), t.to(dt)


def dequantize(teacher: torch.Tensor | None, teacher_scale: torch.Tensor | None = None):
    """Teacher logits as float32 (float64 stays float64).

    float16 / bfloat16 / float32 teacher logits are upcast; int8 logits are ``q * scale[:, None]``
    with one float scale per row (``teacher_scale`` of shape (B,)); ``None`` gives ``None``.
    """
    if teacher is None:
        return None
    if teacher.dtype == torch.int8:
        if teacher_scale is None:
            raise DhkdError("int8 teacher logits need teacher_scale (one float per row)")
        if teacher_scale.dim() != 1 or teacher_scale.shape[0] != teacher.shape[0]:
            raise DhkdError(
                f"teacher_scale must have shape ({teacher.shape[0]},), got {tuple(teacher_scale.shape)}"
            )
        dt = torch.float64 if teacher_scale.dtype == torch.float64 else torch.float32
        return teacher.to(dt) * teacher_scale.to(dt)[:, None]
    if teacher.dtype not in _FLOAT_TEACHER:
        raise DhkdError(f"teacher logits must be float16/bfloat16/float32 or int8, got {teacher.dtype}")
    return teacher if teacher.dtype == torch.float64 else teacher.float()


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy: (1/B) sum_i -log softmax(s_i)[y_i]; gradient (softmax(s) - onehot(y)) / B."""
    return F.cross_entropy(_upcast(logits), target.long())


def kd_loss(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton KD: T^2/B * sum_i KL(softmax(t_i/T) || softmax(s_i/T)).

    KL(p || q) = sum_k p_k (log p_k - log q_k) with both logs from log_softmax (p_k = 0 terms are 0).
    Gradient w.r.t. s: T (softmax(s/T) - softmax(t/T)) / B.
    """
    s, t = _upcast(s, t)
    log_q = F.log_softmax(s / T, dim=1)
    log_p = F.log_softmax(t / T, dim=1)
    return (T * T / s.shape[0]) * (log_p.exp() * (log_p - log_q)).sum()


def binary_kl_loss(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """BinaryKL: T^2/B * sum_{i,k} KL([sigma(a), 1-sigma(a)] || [sigma(b), 1-sigma(b)]),
    a = t/T, b = s/T.

    With log sigma(x) = -softplus(-x) and log(1 - sigma(x)) = -softplus(x) each term is
    KL = softplus(b) - softplus(a) - sigma(a) (b - a), which stays finite for any logits.
    Gradient w.r.t. s: T (sigma(s/T) - sigma(t/T)) / B.
    """
    s, t = _upcast(s, t)
    a, b = t / T, s / T
    kl = F.softplus(b) - F.softplus(a) - torch.sigmoid(a) * (b - a)
    return (T * T / s.shape[0]) * kl.sum()


def binary_kl_norm_loss(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """BinaryKL-norm (the form the published DHKD code trains with):
    T^2/B * sum_{i,k} KL([1/2, 1/2] || [sigma(d), 1-sigma(d)]), d = (s - t)/T.

    Each term is (softplus(d) + softplus(-d))/2 - log 2 (>= 0, zero at d = 0).
    Gradient w.r.t. s: T (sigma(d) - 1/2) / B.
    """
    s, t = _upcast(s, t)
    d = (s - t) / T
    kl = 0.5 * (F.softplus(d) + F.softplus(-d)) - math.log(2.0)
    return (T * T / s.shape[0]) * kl.sum()


def dkd_loss(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, T: float):
    """Decoupled KD (Zhao et al. 2022), the value mdistiller's ``dkd_loss`` computes:
    alpha * TCKD + beta * NCKD, both scaled by T^2/B.

    With p = softmax(t/T), q = softmax(s/T) and y the label:
      TCKD = sum_i KL([p_y, 1-p_y] || [q_y, 1-q_y])
      NCKD = sum_i KL(p_hat || q_hat), p_hat / q_hat the softmax over the non-target classes only.
    mdistiller forms these as log(sum of softmax) and masks the target with -1000; here
    log q_y = s_y/T - lse(s/T), log(1-q_y) = lse_{k!=y}(s/T) - lse(s/T) and the target is masked
    exactly, so large logits stay finite. For K = 1 both terms are 0.
    """
    s, t = _upcast(s, t)
    B, K = s.shape
    if K == 1:
        return s.sum() * 0.0
    zs, zt = s / T, t / T
    y = target.long().view(-1, 1)
    gt = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, y, True)
    lse_s, lse_t = zs.logsumexp(1), zt.logsumexp(1)
    lse_nt_s = zs.masked_fill(gt, float("-inf")).logsumexp(1)
    lse_nt_t = zt.masked_fill(gt, float("-inf")).logsumexp(1)
    # target-class binary distributions, in log space
    lq_y, lq_o = zs.gather(1, y).squeeze(1) - lse_s, lse_nt_s - lse_s
    lp_y, lp_o = zt.gather(1, y).squeeze(1) - lse_t, lse_nt_t - lse_t
    tckd = (lp_y.exp() * (lp_y - lq_y) + lp_o.exp() * (lp_o - lq_o)).sum()
    # non-target distributions; the target entry is replaced by 0 (not -inf) so no NaN reaches autograd
    lq_hat = torch.where(gt, torch.zeros_like(zs), zs - lse_nt_s[:, None])
    lp_hat = torch.where(gt, torch.zeros_like(zt), zt - lse_nt_t[:, None])
    p_hat = torch.where(gt, torch.zeros_like(zt), lp_hat.exp())
    nckd = (p_hat * (lp_hat - lq_hat)).sum()
    return (T * T / B) * (alpha * tckd + beta * nckd)


KD_LOSSES = {
    "kd": kd_loss,
    "binary_kl": binary_kl_loss,
    "binary_kl_norm": binary_kl_norm_loss,
}


def get_kd_loss(name: str):
    """The distillation loss registered as ``name`` (a key of ``KD_LOSSES``)."""
    try:
        return KD_LOSSES[name]
    except KeyError:
        raise DhkdError(f"unknown kd_loss {name!r}; choose one of {sorted(KD_LOSSES)}") from None
