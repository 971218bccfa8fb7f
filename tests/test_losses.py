"""The reference losses against float64 transcriptions of their formulas, finite differences, the
published (clamped) DHKD code, mdistiller's DKD, and extreme logits."""

import math

import pytest
import torch
import torch.nn.functional as F
from tensors import random_labels, random_logits

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.methods import losses

T = 4.0


# --- float64 transcriptions of the formulas, written as literally as possible -------------------


def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _ce64(s, y):
    p = torch.exp(s) / torch.exp(s).sum(1, keepdim=True)
    return -torch.log(p[torch.arange(len(y)), y]).mean()


def _kd64(s, t, T):
    ps = torch.exp(s / T) / torch.exp(s / T).sum(1, keepdim=True)
    pt = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
    return T * T / s.shape[0] * (pt * torch.log(pt / ps)).sum()


def _bkl64(s, t, T):
    p, q = _sig(t / T), _sig(s / T)
    return T * T / s.shape[0] * (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum()


def _bkl_norm64(s, t, T):
    q = _sig((s - t) / T)
    return T * T / s.shape[0] * (0.5 * torch.log(0.5 / q) + 0.5 * torch.log(0.5 / (1 - q))).sum()


# --- the published code, transcribed (clamped sigmoid, KLDivLoss reduction="none") --------------


def _published_binary_kl(student, teacher, temperature, eps=1e-8):
    N = student.shape[0]
    student = torch.clamp(torch.sigmoid(student / temperature), min=eps, max=1 - eps)
    teacher = torch.clamp(torch.sigmoid(teacher / temperature), min=eps, max=1 - eps)
    crit = torch.nn.KLDivLoss(reduction="none")
    loss = crit(torch.log(student), teacher) + crit(torch.log(1 - student), 1 - teacher)
    return temperature**2 * loss.sum() / N


def _published_binary_kl_norm(student, teacher, temperature, eps=1e-8):
    N = student.shape[0]
    diff_st = torch.clamp(torch.sigmoid((student - teacher) / temperature), min=eps, max=1 - eps)
    target = torch.full_like(diff_st, 0.5)
    crit = torch.nn.KLDivLoss(reduction="none")
    loss = crit(torch.log(diff_st), target) + crit(torch.log(1 - diff_st), 1 - target)
    return temperature**2 * loss.sum() / N


# --- mdistiller's dkd_loss, transcribed ---------------------------------------------------------


def _mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1))
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1))
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


# ------------------------------------------------------------------------------------------------

PAIR_LOSSES = [
    (losses.kd_loss, _kd64),
    (losses.binary_kl_loss, _bkl64),
    (losses.binary_kl_norm_loss, _bkl_norm64),
]


@pytest.mark.parametrize("fn,ref", PAIR_LOSSES, ids=["kd", "binary_kl", "binary_kl_norm"])
def test_pair_losses_match_float64_formula(fn, ref):
    s, t = random_logits(5, 7, seed=1), random_logits(5, 7, seed=2)
    assert torch.allclose(fn(s, t, T), ref(s, t, T), rtol=1e-12, atol=1e-12)
    # float32 inputs: computed in float32, close to the float64 truth
    got32 = fn(s.float(), t.float(), T)
    assert got32.dtype == torch.float32
    assert torch.allclose(got32.double(), ref(s, t, T), rtol=1e-5, atol=1e-6)
    # half inputs are upcast: the value is the float32 loss of the rounded logits
    sb, tb = s.bfloat16(), t.bfloat16()
    assert fn(sb, tb, T).dtype == torch.float32
    assert torch.allclose(fn(sb, tb, T).double(), ref(sb.double(), tb.double(), T), rtol=1e-5, atol=1e-6)


def test_ce_matches_float64_formula():
    s, y = random_logits(6, 9, seed=3), random_labels(6, 9)
    assert torch.allclose(losses.ce_loss(s, y), _ce64(s, y), rtol=1e-12)
    assert torch.allclose(losses.ce_loss(s, y.int()), _ce64(s, y), rtol=1e-12)  # int32 labels
    assert torch.allclose(losses.ce_loss(s.float(), y).double(), _ce64(s, y), rtol=1e-5)


@pytest.mark.parametrize("fn", [f for f, _ in PAIR_LOSSES], ids=["kd", "binary_kl", "binary_kl_norm"])
def test_pair_losses_gradcheck(fn):
    s = random_logits(3, 5, seed=4).requires_grad_()
    t = random_logits(3, 5, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, T), (s, t))
    assert torch.autograd.gradgradcheck(lambda a, b: fn(a, b, 2.0), (s, t))


def test_ce_and_dkd_gradcheck():
    s, t, y = (
        random_logits(4, 6, seed=6).requires_grad_(),
        random_logits(4, 6, seed=7).requires_grad_(),
        random_labels(4, 6),
    )
    assert torch.autograd.gradcheck(lambda a: losses.ce_loss(a, y), (s,))
    assert torch.autograd.gradcheck(lambda a, b: losses.dkd_loss(a, b, y, alpha=1.0, beta=8.0, T=T), (s, t))


def _closed_form_grads(s, t, y, T):
    """The gradients of DESIGN.md's table, in float64."""
    B = s.shape[0]
    return {
        "ce": (torch.softmax(s, 1) - F.one_hot(y, s.shape[1])) / B,
        "kd": T * (torch.softmax(s / T, 1) - torch.softmax(t / T, 1)) / B,
        "binary_kl": T * (torch.sigmoid(s / T) - torch.sigmoid(t / T)) / B,
        "binary_kl_norm": T * (torch.sigmoid((s - t) / T) - 0.5) / B,
    }


def _grad(fn, s):
    s = s.detach().clone().requires_grad_()
    fn(s).backward()
    return s.grad


@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_gradients_are_the_closed_forms(scale):
    """At moderate logits and at +-1e4 (where clamped or naive forms saturate) the autograd gradient
    of each reference is the table's closed form."""
    s64, t64, y = (
        random_logits(4, 11, seed=8, scale=scale),
        random_logits(4, 11, seed=9, scale=scale),
        random_labels(4, 11),
    )
    want = _closed_form_grads(s64, t64, y, T)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        s, t = s64.to(dtype), t64.to(dtype)
        got = {
            "ce": _grad(lambda a: losses.ce_loss(a, y), s),
            "kd": _grad(lambda a, t=t: losses.kd_loss(a, t, T), s),
            "binary_kl": _grad(lambda a, t=t: losses.binary_kl_loss(a, t, T), s),
            "binary_kl_norm": _grad(lambda a, t=t: losses.binary_kl_norm_loss(a, t, T), s),
        }
        for name in want:
            assert torch.isfinite(got[name]).all(), name
            assert torch.allclose(got[name].double(), want[name], atol=tol, rtol=0), (name, dtype)


@pytest.mark.parametrize("name", ["binary_kl", "binary_kl_norm"])
def test_binary_kl_equals_published_clamped_form_where_clamp_inactive(name):
    ours = {"binary_kl": losses.binary_kl_loss, "binary_kl_norm": losses.binary_kl_norm_loss}[name]
    published = {"binary_kl": _published_binary_kl, "binary_kl_norm": _published_binary_kl_norm}[name]
    s, t = (
        random_logits(6, 10, seed=10, scale=8.0),
        random_logits(6, 10, seed=11, scale=8.0),
    )  # |x/T| << 18: sigma in (1e-8, 1-1e-8)
    assert (torch.sigmoid(torch.cat([s, t, s - t]) / T) > 1e-7).all()
    assert (torch.sigmoid(torch.cat([s, t, s - t]) / T) < 1 - 1e-7).all()
    sa, sb = s.clone().requires_grad_(), s.clone().requires_grad_()
    a, b = ours(sa, t, T), published(sb, t, T)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    a.backward(), b.backward()
    assert torch.allclose(sa.grad, sb.grad, rtol=1e-8, atol=1e-12)


def test_published_clamp_saturates_where_ours_does_not():
    """Why the stable form: at s = -1e4 the clamp is active and the published gradient is zero,
    although the student is maximally wrong; ours keeps the full gradient T (sigma(s/T) - sigma(t/T))/B."""
    s = torch.full((1, 3), -1e4, dtype=torch.float64, requires_grad=True)
    t = torch.full((1, 3), 1e4, dtype=torch.float64)
    _published_binary_kl(s, t, T).backward()
    assert (s.grad == 0).all()
    s.grad = None
    losses.binary_kl_loss(s, t, T).backward()
    assert torch.allclose(s.grad, torch.full_like(s, -T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_logits_finite(dtype):
    B, K = 4, 9
    sign = torch.where(random_logits(B, K, seed=12) > 0, 1.0, -1.0)
    big = min(1e4, torch.finfo(dtype).max / 4)
    s = (sign * big).to(dtype)
    t = (-torch.roll(sign, 1, dims=1) * big).to(dtype)
    y = random_labels(B, K)
    fns = {
        "ce": lambda a: losses.ce_loss(a, y),
        "dkd": lambda a: losses.dkd_loss(a, t, y, alpha=1.0, beta=8.0, T=T),
        **{n: (lambda a, f=f: f(a, t, T)) for n, f in losses.KD_LOSSES.items()},
    }
    for name, fn in fns.items():
        a = s.clone().requires_grad_()
        v = fn(a)
        v.backward()
        assert torch.isfinite(v), name
        assert v >= 0, name
        assert torch.isfinite(a.grad).all(), name
        assert a.grad.abs().max() <= 2 * T * 9, name  # bounded by 2 T (alpha + beta) / B at worst


def test_dkd_matches_mdistiller():
    s, t, y = random_logits(8, 10, seed=13), random_logits(8, 10, seed=14), random_labels(8, 10, seed=2)
    for alpha, beta, temp in ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0)):
        sa, sb = s.clone().requires_grad_(), s.clone().requires_grad_()
        a = losses.dkd_loss(sa, t, y, alpha=alpha, beta=beta, T=temp)
        b = _mdistiller_dkd(sb, t, y, alpha, beta, temp)
        assert torch.allclose(a, b, rtol=1e-10)
        a.backward(), b.backward()
        assert torch.allclose(sa.grad, sb.grad, rtol=1e-8, atol=1e-12)
    # float32 inputs are computed in float32
    assert torch.allclose(
        losses.dkd_loss(s.float(), t.float(), y, 1.0, 8.0, T).double(), _mdistiller_dkd(s, t, y, 1.0, 8.0, T), rtol=1e-5
    )


def test_dkd_small_k():
    s, t = random_logits(3, 1, seed=15).requires_grad_(), random_logits(3, 1, seed=16)
    v = losses.dkd_loss(s, t, torch.zeros(3, dtype=torch.long), 1.0, 8.0, T)
    v.backward()
    assert v == 0 and (s.grad == 0).all()
    s2, t2, y2 = random_logits(3, 2, seed=17), random_logits(3, 2, seed=18), random_labels(3, 2)
    # K = 2: NCKD is a KL between two one-point distributions, zero; TCKD is the whole loss
    assert torch.allclose(
        losses.dkd_loss(s2, t2, y2, 1.0, 8.0, T), _mdistiller_dkd(s2, t2, y2, 1.0, 8.0, T), rtol=1e-10
    )


def test_registry_and_dequantize():
    assert set(losses.KD_LOSSES) == {"kd", "binary_kl", "binary_kl_norm"}
    q = torch.randint(-127, 128, (3, 5), dtype=torch.int8)
    scale = torch.tensor([0.5, 0.1, 2.0])
    assert torch.equal(losses.dequantize(q, scale), q.float() * scale[:, None])
    # int8 always dequantises to the float32 product, whatever the scale's dtype (the kernels' formula)
    assert torch.equal(losses.dequantize(q, scale.double()), q.float() * scale[:, None])
    t = torch.randn(3, 5)
    assert losses.dequantize(t) is t
    with pytest.raises(DhkdError):
        losses.dequantize(q)
    with pytest.raises(DhkdError):
        losses.dequantize(q, scale[:2])
    with pytest.raises(DhkdError):
        losses.kd_loss(torch.randn(2, 3), torch.randn(2, 4), T)


def test_kl_losses_vanish_on_equal_logits():
    s = random_logits(3, 6, seed=19)
    for name, fn in losses.KD_LOSSES.items():
        assert math.isclose(fn(s, s.clone(), T).item(), 0.0, abs_tol=1e-12), name


def test_dispatch_reference_backend():
    """``losses.dhkd_loss`` / ``cross_entropy`` on CPU tensors ("auto" and "torch") are the reference
    composition exactly; bad names and shapes are user errors whatever the backend."""
    s1, s2, y = (
        random_logits(4, 6, seed=20, dtype=torch.float32),
        random_logits(4, 6, seed=21, dtype=torch.float32),
        random_labels(4, 6),
    )
    q = torch.randint(-127, 128, (4, 6), dtype=torch.int8, generator=torch.Generator().manual_seed(22))
    scale = torch.tensor([0.02, 0.05, 0.1, 0.03])
    for backend in ("auto", "torch"):
        for name, fn in losses.KD_LOSSES.items():
            got = losses.dhkd_loss(
                s1, s2, q, y, temperature=T, alpha=0.7, gamma=1.3, kd_loss=name, teacher_scale=scale, backend=backend
            )
            want = 1.3 * losses.ce_loss(s1, y) + 0.7 * fn(s2, q.float() * scale[:, None], T)
            assert torch.equal(got, want), (backend, name)
        ce_only = losses.dhkd_loss(s1, s2, None, y, temperature=T, alpha=0.0, gamma=1.3, kd_loss="kd", backend=backend)
        assert torch.equal(ce_only, 1.3 * losses.ce_loss(s1, y))
        assert torch.equal(losses.cross_entropy(s1, y, backend=backend), losses.ce_loss(s1, y))
    kw = dict(temperature=T, alpha=1.0, gamma=1.0, kd_loss="kd")
    with pytest.raises(DhkdError, match="backend"):
        losses.dhkd_loss(s1, s2, s2, y, **kw, backend="cuda")
    with pytest.raises(DhkdError, match="backend"):
        losses.cross_entropy(s1, y, backend="cuda")
    with pytest.raises(DhkdError, match="kd_loss"):
        losses.dhkd_loss(s1, s2, s2, y, **{**kw, "kd_loss": "mse"})
    with pytest.raises(DhkdError, match="teacher"):
        losses.dhkd_loss(s1, s2, None, y, **kw)
    with pytest.raises(DhkdError, match="shape"):
        losses.dhkd_loss(s1, s2[:, :3], s2, y, **kw)


# --- DIST (Huang et al. 2022) against a plain re-implementation from the paper's description ---------


def _pearson64(u, v, eps):
    """The Pearson correlation of two vectors, written out: sum((u - mean u)(v - mean v)) over the
    product of the two root sums of squares (the authors' code adds ``eps`` to that product)."""
    n = len(u)
    mu, mv = sum(u) / n, sum(v) / n
    cov = sum((u[i] - mu) * (v[i] - mv) for i in range(n))
    su = torch.sqrt(sum((u[i] - mu) ** 2 for i in range(n)))
    sv = torch.sqrt(sum((v[i] - mv) ** 2 for i in range(n)))
    return cov / (su * sv + eps)


def _dist64(s, t, T, beta, gamma, eps=1e-8):
    """DIST: Y = softmax(logits / T) row by row; inter-class relation = 1 - the mean over images of
    the Pearson correlation of the student's and the teacher's row; intra-class relation = 1 - the
    mean over classes of the correlation of their columns; both times T^2; beta inter + gamma intra."""
    ys = torch.exp(s / T) / torch.exp(s / T).sum(1, keepdim=True)
    yt = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
    B, K = s.shape
    inter = 1 - sum(_pearson64(ys[i], yt[i], eps) for i in range(B)) / B
    if gamma == 0:  # left out, not multiplied by 0 (its gradient may be undefined)
        return beta * T * T * inter
    intra = 1 - sum(_pearson64(ys[:, k], yt[:, k], eps) for k in range(K)) / K
    return beta * T * T * inter + gamma * T * T * intra


@pytest.mark.parametrize("B, K, temp", [(6, 7, 4.0), (5, 3, 1.0), (2, 10, 2.0), (1, 4, 1.0)])
def test_dist_matches_plain_reimplementation(B, K, temp):
    s = random_logits(B, K, seed=B + K).requires_grad_()
    t = random_logits(B, K, seed=100 + B)
    got = losses.dist_loss(s, t, temp, beta=1.5, gamma=0.5)
    want = _dist64(s, t, temp, 1.5, 0.5)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (float(got), float(want))
    (g_got,) = torch.autograd.grad(got, s)
    if B == 1:
        # one image: each class column has no variance, the intra term is the constant T^2 and its
        # correlation's gradient undefined (sqrt at 0); like the authors' torch.norm, ours gives 0
        want = _dist64(s, t, temp, 1.5, 0.0)
    (g_want,) = torch.autograd.grad(want, s)
    assert torch.isfinite(g_got).all()
    assert torch.allclose(g_got, g_want, rtol=1e-9, atol=1e-12)
    inter, intra = losses.dist_terms(s, t, temp)
    assert torch.allclose(1.5 * inter + 0.5 * intra, got, rtol=1e-14)


def test_dist_gradcheck_and_correlation():
    s, t = random_logits(5, 6, seed=3).requires_grad_(), random_logits(5, 6, seed=4)
    assert torch.autograd.gradcheck(lambda a: losses.dist_loss(a, t, 2.0, beta=1.0, gamma=2.0), (s,))
    # the correlation is Pearson's r: torch.corrcoef (no eps) agrees to the eps's size
    ys, yt = F.softmax(s / 2.0, 1), F.softmax(t / 2.0, 1)
    r = torch.stack([torch.corrcoef(torch.stack([ys[i], yt[i]]))[0, 1] for i in range(5)])
    inter, _ = losses.dist_terms(s, t, 2.0)
    assert torch.allclose(inter, 4.0 * (1 - r.mean()), rtol=1e-5)
    # a student that matches the teacher has no relation loss (but for the eps's share); a shifted
    # student neither (softmax); an unrelated one does
    assert 0 <= float(losses.dist_loss(t, t, 2.0)) < 1e-4
    assert abs(float(losses.dist_loss(t + 3.0, t, 2.0) - losses.dist_loss(t, t, 2.0))) < 1e-12
    assert float(losses.dist_loss(s.detach(), t, 2.0)) > 0.1


def test_dist_half_inputs_and_extremes():
    s, t = random_logits(4, 9, seed=5), random_logits(4, 9, seed=6)
    v = losses.dist_loss(s.to(torch.bfloat16), t.to(torch.float16), 1.0)
    assert v.dtype == torch.float32
    assert torch.allclose(v.double(), losses.dist_loss(s.bfloat16().double(), t.half().double(), 1.0), rtol=1e-5)
    big = (random_logits(4, 9, seed=7) * 1e4).float().requires_grad_()
    e = losses.dist_loss(big, random_logits(4, 9, seed=8).float() * 1e4, 4.0)
    e.backward()
    assert torch.isfinite(e) and torch.isfinite(big.grad).all()
