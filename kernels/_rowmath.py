"""Row helpers shared by the fused loss kernels: ``@triton.jit`` functions that each walk one row
of K logits in blocks of BLOCK columns (device code only; the host side is ``_launch.py``).

Every helper computes in float32 whatever the storage dtype, and uses log-sum-exp / softplus forms
(softplus(x) = max(x, 0) + log(1 + exp(-|x|))) so logits of +-1e4 stay finite. A teacher row is
read by ``load_teacher`` only: float32(stored value) * t_scale, the float32 ``q * scale`` of
``dhkd_pipe.teacher_logits.dequantize`` (t_scale = 1 for float teachers, so their values are exact).
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # a plain global is not visible inside @triton.jit


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
def load_block(x_ptr, offs, mask):
    """x[offs] as float32, 0 where masked."""
    return tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def row_scale(t_scale_ptr, row, HAS_SCALE: tl.constexpr):
    """The teacher row's float32 dequantisation scale (int8 teachers), else 1."""
    t_scale = 1.0
    if HAS_SCALE:
        t_scale = tl.load(t_scale_ptr + row).to(tl.float32)
    return t_scale


@triton.jit
def load_teacher(t_ptr, offs, mask, t_scale):
    """Teacher logits t[offs] as float32: float32(stored) * t_scale, the one dequantise formula
    (``dhkd_pipe.teacher_logits.dequantize``), rounded once, before any temperature is applied."""
    return load_block(t_ptr, offs, mask) * t_scale


@triton.jit
def load_student_teacher(s_ptr, t_ptr, t_scale, offs, mask, inv_T):
    """(s/T, t/T) at offs in float32, the teacher read through ``load_teacher``."""
    return load_block(s_ptr, offs, mask) * inv_T, load_teacher(t_ptr, offs, mask, t_scale) * inv_T


@triton.jit
def dequantize_kernel(
    t_ptr, t_stride, t_scale_ptr, out_ptr, out_stride, K, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr
):
    """Writes the float32 teacher rows exactly as the loss kernels read them (``load_teacher``),
    so tests can compare them bit for bit with the store's decode and the reference dequantise."""
    row = tl.program_id(0).to(tl.int64)
    t_scale = row_scale(t_scale_ptr, row, HAS_SCALE)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        tl.store(
            out_ptr + row * out_stride + offs, load_teacher(t_ptr + row * t_stride, offs, mask, t_scale), mask=mask
        )


@triton.jit
def row_lse(x_ptr, K, BLOCK: tl.constexpr):
    """log sum_k exp(x_k) as (m, log d) with m the row max, by the online (running max)
    log-sum-exp. Kept apart so callers form (z - m) - log d: at |z| ~ 1e4, z - (m + log d) would
    lose log d to float32 rounding of the sum."""
    m = float("-inf")
    d = 0.0
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        z = tl.where(mask, load_block(x_ptr, offs, mask), float("-inf"))
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
def ce_row(x_ptr, y, g_ptr, K, g_scale, BLOCK: tl.constexpr):
    """Cross-entropy -log softmax(x)[y] of one row, storing g_scale * (softmax(x) - onehot(y)),
    its gradient, in g's dtype (two passes: online log-sum-exp, then the gradient)."""
    m, log_d = row_lse(x_ptr, K, BLOCK)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        g = tl.exp((load_block(x_ptr, offs, mask) - m) - log_d) - tl.where(offs == y, 1.0, 0.0)
        tl.store(g_ptr + offs, (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask)
    return (m - label_logit(x_ptr, y, K)) + log_d


@triton.jit
def kd_row(s_ptr, t_ptr, t_scale, g_ptr, K, inv_T, g_scale, BLOCK: tl.constexpr):
    """KL(softmax(zt) || softmax(zs)) of one row, zs = s/T, zt = t/T, storing its gradient
    g_scale * (softmax(zs) - softmax(zt)) in g's dtype.

    Pass 1 (online): lse(zs) = ms + log ds, lse(zt) = mt + log dt as in ``row_lse``, and
    KL = sum_k p_k (zt_k - zs_k) - lse(zt) + lse(zs), with sum_k e^{zt_k - mt} (zt_k - zs_k)
    accumulated alongside the teacher's running max mt and rescaled when mt grows.
    Pass 2 re-reads both rows to write the gradient.
    """
    ms = float("-inf")
    ds = 0.0
    mt = float("-inf")
    dt = 0.0
    acc = 0.0
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        zs, zt = load_student_teacher(s_ptr, t_ptr, t_scale, offs, mask, inv_T)
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
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        zs, zt = load_student_teacher(s_ptr, t_ptr, t_scale, offs, mask, inv_T)
        g = tl.exp((zs - ms) - log_ds) - tl.exp((zt - mt) - log_dt)
        tl.store(g_ptr + offs, (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask)
    return acc / dt - (mt - ms) - log_dt + log_ds


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
        b, a = load_student_teacher(s_ptr, t_ptr, t_scale, offs, mask, inv_T)
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


@triton.jit
def kd_mode_row(s_ptr, t_ptr, t_scale, g_ptr, K, inv_T, g_scale, KD_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """The distillation term of one row by KD_MODE (0 "kd", 1 "binary_kl", 2 "binary_kl_norm"),
    storing its gradient; the one switch both the DHKD and the single KD kernels go through."""
    if KD_MODE == 0:
        kl = kd_row(s_ptr, t_ptr, t_scale, g_ptr, K, inv_T, g_scale, BLOCK)
    else:
        kl = binary_kl_row(s_ptr, t_ptr, t_scale, g_ptr, K, inv_T, g_scale, KD_MODE == 2, BLOCK)
    return kl
