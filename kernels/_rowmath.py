"""Row helpers shared by the fused loss kernels: ``@triton.jit`` functions that each walk one row
of K logits in blocks of BLOCK columns, plus the small host-side checks every launcher does.

Every helper computes in float32 whatever the storage dtype, and uses log-sum-exp / softplus forms
(softplus(x) = max(x, 0) + log(1 + exp(-|x|))) so logits of +-1e4 stay finite. A teacher row is
read as ``stored value (float, or int8) * t_scale`` (t_scale = 1 for float teachers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import DhkdError

LN2 = tl.constexpr(0.6931471805599453)  # a plain global is not visible inside @triton.jit
# default largest column block: big enough that one or two blocks cover ImageNet-sized K
DEFAULT_MAX_BLOCK = 4096


@triton.jit
def softplus(x):
    """log(1 + e^x) without overflow."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    """1 / (1 + e^-x) through e^{-|x|}, so no exp overflows (inf) at large |x|."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def row_lse(x_ptr, K, scale, BLOCK: tl.constexpr):
    """log sum_k exp(scale * x_k) as (m, log d) with m the row max, by the online (running max)
    log-sum-exp. Kept apart so callers form (z - m) - log d: at |z| ~ 1e4, z - (m + log d) would
    lose log d to float32 rounding of the sum."""
    m = float("-inf")
    d = 0.0
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        z = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    return m, tl.log(d)


@triton.jit
def label_logit(x_ptr, y, K):
    """x[y] in float32, or NaN when y is outside [0, K): a bad label on CUDA (where the host does
    not check, to avoid a sync) shows up as a NaN loss instead of an out-of-bounds read."""
    return tl.load(x_ptr + y, mask=(y >= 0) & (y < K), other=float("nan")).to(tl.float32)


@triton.jit
def ce_grad_store(x_ptr, g_ptr, y, m, log_d, K, g_scale, BLOCK: tl.constexpr):
    """Stores g_scale * (softmax(x) - onehot(y)), the cross-entropy gradient, in g's dtype;
    softmax(x) = exp((x - m) - log d) from ``row_lse``."""
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp((x - m) - log_d) - tl.where(offs == y, 1.0, 0.0)
        tl.store(g_ptr + offs, (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def kd_row_stats(s_ptr, t_ptr, t_scale, K, inv_T, BLOCK: tl.constexpr):
    """For zs = s/T, zt = t/T, one pass: (ms, log ds, mt, log dt, KL(softmax(zt) || softmax(zs)))
    with lse(zs) = ms + log ds and lse(zt) = mt + log dt as in ``row_lse``.

    KL = sum_k p_k (zt_k - zs_k) - lse(zt) + lse(zs), with sum_k e^{zt_k - mt} (zt_k - zs_k)
    accumulated alongside the teacher's running max mt and rescaled when mt grows.
    """
    ms = float("-inf")
    ds = 0.0
    mt = float("-inf")
    dt = 0.0
    acc = 0.0
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        zs = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_T
        zt = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * (t_scale * inv_T)
        zs_m = tl.where(mask, zs, float("-inf"))
        zt_m = tl.where(mask, zt, float("-inf"))
        ms_new = tl.maximum(ms, tl.max(zs_m, 0))
        ds = ds * tl.exp(ms - ms_new) + tl.sum(tl.exp(zs_m - ms_new), 0)
        ms = ms_new
        mt_new = tl.maximum(mt, tl.max(zt_m, 0))
        rescale = tl.exp(mt - mt_new)
        et = tl.exp(zt_m - mt_new)
        dt = dt * rescale + tl.sum(et, 0)
        acc = acc * rescale + tl.sum(tl.where(mask, et * (zt - zs), 0.0), 0)
        mt = mt_new
    log_ds = tl.log(ds)
    log_dt = tl.log(dt)
    kl = acc / dt - (mt - ms) - log_dt + log_ds
    return ms, log_ds, mt, log_dt, kl


@triton.jit
def kd_grad_store(s_ptr, t_ptr, t_scale, g_ptr, ms, log_ds, mt, log_dt, K, inv_T, g_scale, BLOCK: tl.constexpr):
    """Stores g_scale * (softmax(s/T) - softmax(t/T)) in g's dtype."""
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        zs = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_T
        zt = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * (t_scale * inv_T)
        g = tl.exp((zs - ms) - log_ds) - tl.exp((zt - mt) - log_dt)
        tl.store(g_ptr + offs, (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def binary_kl_row(s_ptr, t_ptr, t_scale, g_ptr, K, inv_T, g_scale, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """sum_k of the per-class binary KL, storing its gradient as it goes (one pass).

    BinaryKL (NORM False), a = t/T, b = s/T: KL = softplus(b) - softplus(a) - sigma(a)(b - a),
    gradient g_scale * (sigma(b) - sigma(a)).
    BinaryKL-norm (NORM True), d = (s - t)/T: KL = |d|/2 + log(1 + e^{-|d|}) - log 2,
    gradient g_scale * (sigma(d) - 1/2).
    """
    total = 0.0
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        b = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_T
        a = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32) * (t_scale * inv_T)
        if NORM:
            d = b - a
            ad = tl.abs(d)
            kl = 0.5 * ad + tl.log(1.0 + tl.exp(-ad)) - LN2
            g = sigmoid(d) - 0.5
        else:
            sig_a = sigmoid(a)
            kl = softplus(b) - softplus(a) - sig_a * (b - a)
            g = sigmoid(b) - sig_a
        total += tl.sum(tl.where(mask, kl, 0.0), 0)
        tl.store(g_ptr + offs, (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask)
    return total


# --- host side ------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TEACHER_DTYPES = FLOAT_DTYPES + (torch.int8,)


def logits_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x as (B, K) float logits with unit column stride (any row stride is kept)."""
    if x.dim() != 2:
        raise DhkdError(f"{name} must be (B, K) logits, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise DhkdError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.numel() == 0:
        raise DhkdError(f"{name} are empty (shape {tuple(x.shape)}); need B >= 1 rows of K >= 1 classes")
    return x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()


def teacher_rows(t: torch.Tensor, shape, teacher_scale):
    """(teacher rows, per-row float32 scale or None), checked against the student's shape."""
    if t.shape != shape:
        raise DhkdError(f"teacher logits {tuple(t.shape)} do not match student logits {tuple(shape)}")
    if t.dtype not in TEACHER_DTYPES:
        raise DhkdError(f"teacher logits must be float16/bfloat16/float32 or int8, got {t.dtype}")
    t = t.detach()
    t = t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()
    if t.dtype == torch.int8:
        if teacher_scale is None:
            raise DhkdError("int8 teacher logits need teacher_scale (one float per row)")
        if teacher_scale.dim() != 1 or teacher_scale.shape[0] != shape[0]:
            raise DhkdError(f"teacher_scale must have shape ({shape[0]},), got {tuple(teacher_scale.shape)}")
        return t, teacher_scale.detach().to(device=t.device, dtype=torch.float32).contiguous()
    return t, None


def labels(target: torch.Tensor, B: int, K: int) -> torch.Tensor:
    """int32/int64 labels (B,). Range is checked on CPU only (a check on CUDA would synchronise)."""
    if target.dim() != 1 or target.shape[0] != B:
        raise DhkdError(f"target must be (B,) = ({B},) labels, got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise DhkdError(f"target must be int64 or int32 labels, got {target.dtype}")
    if not target.is_cuda and B and (int(target.min()) < 0 or int(target.max()) >= K):
        raise DhkdError(f"labels must lie in [0, {K})")
    return target.contiguous()


def block_size(K: int, max_block: int | None) -> int:
    """Power-of-two column block: the whole row when it fits, else max_block."""
    max_block = max_block or DEFAULT_MAX_BLOCK
    return max(min(triton.next_power_of_2(K), max_block), min(16, max_block))


def num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16
