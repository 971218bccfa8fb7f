"""The losses: PyTorch references (the ground truth the Triton kernels in ``dhkd_pipe.kernels``
match) and the dispatch between the two backends.

``dhkd_terms`` (with its sum ``dhkd_loss``) and ``cross_entropy`` are what training calls: with
backend "auto" they run the fused Triton kernel on CUDA tensors (when triton imports) and the
reference otherwise; "triton" forces the kernel, "torch" the reference (``BACKENDS``). The
reference path never imports triton.

Notation: B rows, K classes, temperature T, student logits s, teacher logits t (both (B, K)),
sigma the sigmoid, softplus(x) = log(1 + e^x). Every loss is computed in float32 (float16 and
bfloat16 are upcast; float64 stays float64) through log-softmax / log-sigmoid / softplus forms,
never log(clamp(sigmoid)), so values and gradients stay finite at logits of +-1e4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.kernels import triton_available
from dhkd_pipe.methods.names import BACKENDS, KD_LOSS_NAMES
from dhkd_pipe.teacher_logits import dequantize


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _upcast(s: torch.Tensor, t: torch.Tensor | None = None):
    if t is None:
        return s.to(_compute_dtype(s))
    if s.shape != t.shape:
        raise DhkdError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
    dt = _compute_dtype(s, t)
    return s.to(dt), t.to(dt)


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


def dkd_terms(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor, T: float):
    """Decoupled KD's two terms (Zhao et al. 2022), unweighted: (T^2/B * TCKD, T^2/B * NCKD).

    With p = softmax(t/T), q = softmax(s/T) and y the label:
      TCKD = sum_i KL([p_y, 1-p_y] || [q_y, 1-q_y])   (target class against the rest)
      NCKD = sum_i KL(p_hat || q_hat), p_hat / q_hat the softmax over the non-target classes only.
    mdistiller forms these as log(sum of softmax) and masks the target with -1000; here
    log q_y = s_y/T - lse(s/T), log(1-q_y) = lse_{k!=y}(s/T) - lse(s/T) and the target is masked
    exactly, so large logits stay finite. For K = 1 both terms are 0.
    """
    s, t = _upcast(s, t)
    B, K = s.shape
    if K == 1:
        zero = s.sum() * 0.0
        return zero, zero
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
    scale = T * T / B
    return scale * tckd, scale * nckd


def dkd_loss(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, T: float):
    """Decoupled KD, the value mdistiller's ``dkd_loss`` computes: alpha * TCKD + beta * NCKD, both
    scaled by T^2/B (``dkd_terms``). alpha weighs only the target-class term, beta only the
    non-target term."""
    tckd, nckd = dkd_terms(s, t, target, T)
    return alpha * tckd + beta * nckd


DIST_EPS = 1e-8  # the authors' code adds it to the product of norms in the correlation's denominator


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: the cosine of the
    mean-centred rows, cov / (|a - mean| |b - mean| + DIST_EPS)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + DIST_EPS)


def dist_terms(s: torch.Tensor, t: torch.Tensor, T: float):
    """DIST's two relations (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger
    Teacher"), unweighted: (inter, intra), each scaled by T^2.

    With Y_s = softmax(s/T), Y_t = softmax(t/T) (B x K) and rho the Pearson correlation:
      inter = T^2 * (1 - (1/B) sum_i rho(Y_s[i, :], Y_t[i, :]))   (each image's class ranking)
      intra = T^2 * (1 - (1/K) sum_k rho(Y_s[:, k], Y_t[:, k]))   (each class over the batch)
    as in the authors' ``DIST(beta, gamma, tau)`` (hunto/image_classification_sota,
    lib/models/losses/dist_kd.py), including its 1e-8 in the correlation's denominator. The intra
    term depends on the batch: with several processes each computes it over its own batch.
    """
    s, t = _upcast(s, t)
    ys, yt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
    inter = T * T * (1.0 - _pearson_rows(ys, yt).mean())
    intra = T * T * (1.0 - _pearson_rows(ys.t(), yt.t()).mean())
    return inter, intra


def dist_loss(s: torch.Tensor, t: torch.Tensor, T: float, beta: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """DIST: beta * inter + gamma * intra (``dist_terms``), the value of the authors'
    ``DIST(beta, gamma, tau=T)`` (their ``beta`` weighs the inter-class, ``gamma`` the intra-class
    relation; their recipes use beta = gamma = 1 with a distillation weight of 2)."""
    inter, intra = dist_terms(s, t, T)
    return beta * inter + gamma * intra


KD_LOSSES = {name: globals()[f"{name}_loss"] for name in KD_LOSS_NAMES}  # each name's loss is NAME_loss


def get_kd_loss(name: str):
    """The distillation loss registered as ``name`` (a key of ``KD_LOSSES``)."""
    try:
        return KD_LOSSES[name]
    except KeyError:
        raise DhkdError(f"unknown kd_loss {name!r}; choose one of {sorted(KD_LOSSES)}") from None


# --- dispatch: the fused Triton kernels on CUDA, the references above elsewhere ------------------


def _use_triton(backend: str, logits: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise DhkdError(f"unknown loss backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "triton":
        if not triton_available():
            raise DhkdError("backend 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on CPU)")
        return True
    # CPU tensors never ask triton_available(), which imports triton
    return backend == "auto" and logits.is_cuda and triton_available()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``ce_loss(logits, target)``, run by ``backend`` (a name of ``BACKENDS``): "auto" is the fused
    Triton kernel (``kernels.fused_cross_entropy_loss``) on CUDA tensors, the reference elsewhere."""
    if _use_triton(backend, logits):
        from dhkd_pipe.kernels import fused_cross_entropy_loss

        return fused_cross_entropy_loss(logits, target)
    return ce_loss(logits, target)


def dhkd_terms(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma * CE(logits_ce, target), alpha * KD_LOSSES[kd_loss](logits_kd, teacher)): two float32
    scalars, each with its own gradient, so the two objectives can be logged and differentiated
    apart; on the Triton path both come from one fused launch.

    ``teacher`` is float16/bfloat16/float32 logits, or int8 with a per-row float ``teacher_scale``
    (B,) (see ``dequantize``), or None (CE only: the KD term is a constant 0; then ``alpha`` must be
    0). ``logits_ce`` and ``logits_kd`` may be the same tensor (single-head methods): autograd sums
    both gradients. ``backend`` (a name of ``BACKENDS``): "auto" runs the fused Triton kernel
    (``kernels.fused_dhkd_terms``) on CUDA tensors when triton imports and the reference losses
    otherwise; "triton" forces the kernel (DhkdError if it cannot run here); "torch" the
    reference. No gradient flows to the teacher.
    """
    kd = get_kd_loss(kd_loss)
    if teacher is None and alpha != 0:
        raise DhkdError("this loss needs teacher logits (alpha != 0) but none were given")
    if logits_ce.dim() != 2 or logits_ce.shape != logits_kd.shape:
        raise DhkdError(
            f"both heads must be (B, K) logits of one shape, got {tuple(logits_ce.shape)} and {tuple(logits_kd.shape)}"
        )
    if teacher is None:
        ce = gamma * cross_entropy(logits_ce, target, backend=backend)
        return ce, ce.new_zeros(())
    if _use_triton(backend, logits_ce):
        from dhkd_pipe.kernels import fused_dhkd_terms

        return fused_dhkd_terms(
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
    return gamma * ce_loss(logits_ce, target), alpha * kd(logits_kd, dequantize(teacher, teacher_scale), temperature)


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
    """gamma * CE(logits_ce, target) + alpha * KD_LOSSES[kd_loss](logits_kd, teacher), a float32
    scalar: the sum of ``dhkd_terms`` (same arguments and checks; one fused launch on the Triton
    path)."""
    ce, kd = dhkd_terms(
        logits_ce,
        logits_kd,
        teacher,
        target,
        temperature=temperature,
        alpha=alpha,
        gamma=gamma,
        kd_loss=kd_loss,
        teacher_scale=teacher_scale,
        backend=backend,
    )
    return ce + kd
