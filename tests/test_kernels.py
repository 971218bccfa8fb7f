"""The fused Triton losses (``dhkd_pipe.kernels``) and the backend dispatch (``dhkd_pipe.methods.losses``)
against float64 references of ``dhkd_pipe.methods.losses``: values and both gradients, every kd_loss and
teacher dtype, awkward shapes and strides, extreme logits, gradient buffers poisoned with NaN so
an element the kernel fails to write shows up, and the one int8 dequantise.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); a small
column block (BLOCK) makes small K span several blocks."""

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from tensors import assert_close, generator, random_labels, random_logits  # noqa: E402

from dhkd_pipe.errors import DhkdError  # noqa: E402
from dhkd_pipe.kernels import (  # noqa: E402
    fused_cross_entropy_loss,
    fused_dhkd_loss,
    fused_kd_loss,
    triton_available,
)
from dhkd_pipe.kernels.fused_dhkd import dhkd_forward  # noqa: E402
from dhkd_pipe.methods import losses  # noqa: E402
from dhkd_pipe.methods.losses import cross_entropy, dhkd_loss, dhkd_terms  # noqa: E402
from dhkd_pipe.store.codecs import decode_logits  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_DEV = dict(dtype=torch.float32, device=DEV)  # the kernels' inputs
BLOCK = 16
T, ALPHA, GAMMA = 4.0, 0.7, 1.3
KD_NAMES = ["kd", "binary_kl", "binary_kl_norm"]


def _teacher(B, K, dtype, seed):
    """(teacher as stored, teacher_scale or None)."""
    if dtype == torch.int8:
        q = torch.randint(-127, 128, (B, K), generator=generator(seed), dtype=torch.int8)
        scale = torch.rand(B, generator=generator(seed + 1)) * 0.05 + 0.01
        return q.to(DEV), scale.to(DEV)
    return random_logits(B, K, seed, **ON_DEV).to(dtype), None


def _reference(h1, h2, teacher, scale, y, kd_loss, T=T, alpha=ALPHA, gamma=GAMMA):
    """Loss and (grad head 1, grad head 2) in float64 from the PyTorch reference."""
    a = h1.detach().double().requires_grad_()
    b = h2.detach().double().requires_grad_()
    t = losses.dequantize(teacher, scale).double()
    loss = gamma * losses.ce_loss(a, y) + alpha * losses.KD_LOSSES[kd_loss](b, t, T)
    ga, gb = torch.autograd.grad(loss, (a, b))
    return loss.detach(), ga, gb


def _poisoned(x):
    return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)


def _launch(h1, h2, teacher, scale, y, kd_loss, **kw):
    """The kernel with NaN-filled gradient buffers: (loss, grad head 1, grad head 2)."""
    g1, g2 = _poisoned(h1), _poisoned(h2)
    run = dhkd_forward(
        h1,
        h2,
        teacher,
        y,
        temperature=kw.get("T", T),
        alpha=ALPHA,
        gamma=GAMMA,
        kd_loss=kd_loss,
        teacher_scale=scale,
        grad_ce=g1,
        grad_kd=g2,
        max_block=BLOCK,
    )
    assert run.grads[0] is g1 and run.grads[1] is g2
    return run.loss.sum(), g1, g2


# (B, K): one row; K < block; K = 1; K = the block; K spanning several blocks, not a multiple
SHAPES = [(1, 37), (2, 5), (3, 1), (4, 16), (5, 50)]
TEACHER_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


@pytest.mark.parametrize("B,K", SHAPES)
@pytest.mark.parametrize("kd_loss", KD_NAMES)
@pytest.mark.parametrize("tdtype", TEACHER_DTYPES, ids=str)
def test_fused_dhkd_matches_reference(B, K, kd_loss, tdtype):
    h1, h2 = random_logits(B, K, 1, **ON_DEV), random_logits(B, K, 2, **ON_DEV)
    teacher, scale = _teacher(B, K, tdtype, 3)
    y = random_labels(B, K, 4, dtype=torch.int32 if K % 2 else torch.int64, device=DEV)
    loss, g1, g2 = _launch(h1, h2, teacher, scale, y, kd_loss)
    want, w1, w2 = _reference(h1, h2, teacher, scale, y, kd_loss)
    assert_close(loss, want, 1e-5, 1e-5, "loss")
    assert_close(g1, w1, 1e-4, 1e-6, "grad head 1")
    assert_close(g2, w2, 1e-4, 1e-6, "grad head 2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kd_loss", KD_NAMES)
def test_half_inputs(dtype, kd_loss):
    """Half logits: float32 arithmetic, so the loss is tight; gradients are stored rounded."""
    B, K = 3, 37
    h1, h2 = random_logits(B, K, 5, **ON_DEV).to(dtype), random_logits(B, K, 6, **ON_DEV).to(dtype)
    teacher, scale = _teacher(B, K, dtype, 7)
    y = random_labels(B, K, 8, device=DEV)
    loss, g1, g2 = _launch(h1, h2, teacher, scale, y, kd_loss)
    assert g1.dtype == dtype and g2.dtype == dtype
    want, w1, w2 = _reference(h1, h2, teacher, scale, y, kd_loss)
    assert_close(loss, want, 1e-5, 1e-5, "loss")
    eps = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close(g1, w1, eps, eps * w1.abs().max().item(), "grad head 1")
    assert_close(g2, w2, eps, eps * w2.abs().max().item(), "grad head 2")


@pytest.mark.parametrize("kd_loss", KD_NAMES)
def test_row_and_column_strided_inputs(kd_loss):
    B, K = 4, 21
    h1 = random_logits(B, K + 9, 9, **ON_DEV)[:, 3 : 3 + K]  # row stride K + 9
    h2 = random_logits(B, 2 * K, 10, **ON_DEV)[:, ::2]  # column stride 2: copied to unit stride
    tbig, scale = _teacher(B, K + 5, torch.int8, 11)
    teacher = tbig[:, :K]
    y = random_labels(B, K, 12, device=DEV)
    assert h1.stride(0) != K and h2.stride(1) == 2 and teacher.stride(0) != K
    loss, g1, g2 = _launch(h1, h2, teacher, scale, y, kd_loss)
    want, w1, w2 = _reference(h1, h2, teacher, scale, y, kd_loss)
    assert_close(loss, want, 1e-5, 1e-5, "loss")
    assert_close(g1, w1, 1e-4, 1e-6, "grad head 1")
    assert_close(g2, w2, 1e-4, 1e-6, "grad head 2")


@pytest.mark.parametrize("kd_loss", KD_NAMES)
def test_extreme_logits(kd_loss):
    B, K = 3, 20

    def sign(seed):
        return torch.where(random_logits(B, K, seed, **ON_DEV) > 0, 1.0, -1.0)

    h1, h2, teacher = sign(13) * 1e4, sign(14) * 1e4, sign(15) * 1e4
    y = random_labels(B, K, 16, device=DEV)
    loss, g1, g2 = _launch(h1, h2, teacher, None, y, kd_loss)
    want, w1, w2 = _reference(h1, h2, teacher, None, y, kd_loss)
    assert_close(loss, want, 1e-4, 1e-3, "loss")
    assert_close(g1, w1, 1e-4, 1e-6, "grad head 1")
    assert_close(g2, w2, 1e-4, 1e-6, "grad head 2")


@pytest.mark.parametrize("kd_loss", KD_NAMES)
def test_backends_agree_including_one_head(kd_loss):
    B, K = 3, 23
    teacher, scale = _teacher(B, K, torch.int8, 17)
    y = random_labels(B, K, 18, device=DEV)
    for same in (False, True):
        grads, values = [], []
        for backend in ("torch", "triton"):
            h1 = random_logits(B, K, 19, **ON_DEV).requires_grad_()
            h2 = h1 if same else random_logits(B, K, 20, **ON_DEV).requires_grad_()
            v = dhkd_loss(
                h1,
                h2,
                teacher,
                y,
                temperature=T,
                alpha=ALPHA,
                gamma=GAMMA,
                kd_loss=kd_loss,
                teacher_scale=scale,
                backend=backend,
            )
            (3.0 * v).backward()  # a grad_output other than 1
            values.append(v.detach())
            grads.append((h1.grad, h2.grad))
        assert_close(values[1], values[0].double(), 1e-5, 1e-5, f"loss same={same}")
        for a, b in zip(grads[1], grads[0], strict=True):
            assert_close(a, b.double(), 1e-4, 1e-6, f"grad same={same}")


@pytest.mark.parametrize("kd_loss", KD_NAMES)
def test_terms_apart_match_reference(kd_loss):
    """dhkd_terms: each term's value, and the gradient of each term alone (what gradient alignment
    takes), equal the reference's; one head or two."""
    B, K = 3, 23
    teacher, scale = _teacher(B, K, torch.int8, 31)
    y = random_labels(B, K, 32, device=DEV)
    for same in (False, True):
        got = {}
        for backend in ("torch", "triton"):
            h1 = random_logits(B, K, 33, **ON_DEV).requires_grad_()
            h2 = h1 if same else random_logits(B, K, 34, **ON_DEV).requires_grad_()
            ce, kd = dhkd_terms(
                h1,
                h2,
                teacher,
                y,
                temperature=T,
                alpha=ALPHA,
                gamma=GAMMA,
                kd_loss=kd_loss,
                teacher_scale=scale,
                backend=backend,
            )
            g_ce = torch.autograd.grad(ce, (h1, h2), retain_graph=True, allow_unused=True, materialize_grads=True)
            g_kd = torch.autograd.grad(2.0 * kd, (h1, h2), allow_unused=True, materialize_grads=True)
            got[backend] = (ce.detach(), kd.detach(), g_ce, g_kd)
        (ce0, kd0, gce0, gkd0), (ce1, kd1, gce1, gkd1) = got["torch"], got["triton"]
        assert_close(ce1, ce0.double(), 1e-5, 1e-5, f"ce same={same}")
        assert_close(kd1, kd0.double(), 1e-5, 1e-5, f"kd same={same}")
        for a, b in zip(gce1 + gkd1, gce0 + gkd0, strict=True):
            assert_close(a, b.double(), 1e-4, 1e-6, f"grad of one term, same={same}")


def test_single_fused_losses():
    B, K = 4, 37
    s = random_logits(B, K, 21, **ON_DEV)
    for tdtype in (torch.float32, torch.int8):
        teacher, scale = _teacher(B, K, tdtype, 22)
        t = losses.dequantize(teacher, scale).double()
        for name, ref in losses.KD_LOSSES.items():
            a, b = s.clone().requires_grad_(), s.double().requires_grad_()
            got = fused_kd_loss(a, teacher, T, kd_loss=name, teacher_scale=scale, max_block=BLOCK)
            want = ref(b, t, T)
            got.backward(), want.backward()
            assert_close(got.detach(), want.detach(), 1e-5, 1e-5, name)
            assert_close(a.grad, b.grad, 1e-4, 1e-6, name + " grad")
    for K in (1, 37):
        s, y = random_logits(B, K, 23, **ON_DEV), random_labels(B, K, 24, device=DEV)
        a, b = s.clone().requires_grad_(), s.double().requires_grad_()
        got, want = fused_cross_entropy_loss(a, y, max_block=BLOCK), losses.ce_loss(b, y)
        got.backward(), want.backward()
        assert_close(got.detach(), want.detach(), 1e-5, 1e-5, "ce")
        assert_close(a.grad, b.grad, 1e-4, 1e-6, "ce grad")


def test_dispatch_and_errors():
    assert triton_available()
    B, K = 2, 6
    s, t, y = random_logits(B, K, 25, **ON_DEV), random_logits(B, K, 26, **ON_DEV), random_labels(B, K, 27, device=DEV)
    kw = dict(temperature=T, alpha=ALPHA, gamma=GAMMA, kd_loss="binary_kl_norm")
    # no teacher and alpha 0: CE only, both backends
    ce = [dhkd_loss(s, s, None, y, **{**kw, "alpha": 0.0}, backend=b) for b in ("torch", "triton")]
    assert torch.allclose(ce[0], ce[1], rtol=1e-5)
    # CE alone (the "ce" method): the fused kernel, same value and gradient as the reference
    grads = []
    for b in ("torch", "triton"):
        a = s.clone().requires_grad_()
        v = cross_entropy(a, y, backend=b)
        v.backward()
        grads.append((v.detach(), a.grad))
    assert_close(grads[1][0], grads[0][0].double(), 1e-5, 1e-6, "cross_entropy")
    assert_close(grads[1][1], grads[0][1].double(), 1e-4, 1e-6, "cross_entropy grad")
    with pytest.raises(DhkdError):
        cross_entropy(s, y, backend="cuda")
    with pytest.raises(DhkdError):
        dhkd_loss(s, s, t, y, **kw, backend="cuda")
    with pytest.raises(DhkdError):
        dhkd_loss(s, s, t, y, **{**kw, "kd_loss": "mse"}, backend="triton")
    with pytest.raises(DhkdError):
        dhkd_loss(s, s, None, y, **kw, backend="triton")
    with pytest.raises(DhkdError):
        dhkd_loss(s, s, t.to(torch.int8), y, **kw, backend="triton")  # int8 without a scale
    with pytest.raises(DhkdError):
        dhkd_loss(s, s, t[:, :3], y, **kw, backend="triton")
    if s.is_cuda:  # not checked on the host (a sync per step): the kernel reads no logit and the loss is NaN
        assert dhkd_loss(s, s, t, y + K, **kw, backend="triton").isnan()
    else:
        with pytest.raises(DhkdError):
            dhkd_loss(s, s, t, y + K, **kw, backend="triton")


def test_empty_batch_and_bad_label_in_kernel():
    e = torch.empty(0, 5, device=DEV)
    y0 = torch.empty(0, dtype=torch.long, device=DEV)
    for call in (
        lambda: fused_cross_entropy_loss(e, y0),
        *(lambda name=name: fused_kd_loss(e, e, T, kd_loss=name) for name in KD_NAMES),
        lambda: fused_dhkd_loss(e, e, e, y0, temperature=T, alpha=ALPHA, gamma=GAMMA),
    ):
        with pytest.raises(DhkdError):
            call()
    # The host checks label range on CPU only (a CUDA check would sync); a bad label that reaches
    # the kernel must read nothing out of bounds and give that row a NaN loss.
    from dhkd_pipe.kernels.fused_cross_entropy import _ce_kernel
    from dhkd_pipe.kernels.fused_dhkd import _dhkd_kernel

    B, K = 3, 5
    x, t = random_logits(B, K, 28, **ON_DEV), random_logits(B, K, 29, **ON_DEV)
    y = torch.tensor([1, K, -1], device=DEV)
    g1, g2, rows = _poisoned(x), _poisoned(x), torch.empty(B, device=DEV)
    _ce_kernel[(B,)](x, K, y, g1, K, rows, K, 1.0 / B, BLOCK=8)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1:]).all()
    rows2 = torch.empty(B, 2, device=DEV)  # (CE term, KD term) per row
    _dhkd_kernel[(B,)](
        x, K, x, K, t, K, rows, y, g1, K, g2, K, rows2, K, 1.0 / T, 1.0, 1.0, 1.0, KD_MODE=2, HAS_SCALE=False, BLOCK=8
    )
    assert torch.isfinite(rows2[0, 0]) and torch.isnan(rows2[1:, 0]).all()


def test_torch_backend_does_not_import_triton():
    """Importing the kernels package, the CLI, and every loss on CPU tensors through the dispatch
    (auto and torch) leave triton unimported; the last line shows the check can fail."""
    code = (
        "import sys, torch\n"
        "import dhkd_pipe.kernels, dhkd_pipe.cli, dhkd_pipe.methods.registry\n"
        "from dhkd_pipe.methods.losses import cross_entropy, dhkd_loss\n"
        "s, y = torch.randn(2, 3, requires_grad=True), torch.tensor([0, 2])\n"
        "q, scale = torch.randint(-127, 128, (2, 3), dtype=torch.int8), torch.rand(2)\n"
        "for backend in ('auto', 'torch'):\n"
        "    for kd in ('kd', 'binary_kl', 'binary_kl_norm'):\n"
        "        dhkd_loss(s, s, q, y, temperature=2.0, alpha=1.0, gamma=1.0, kd_loss=kd,\n"
        "                  teacher_scale=scale, backend=backend).backward()\n"
        "    cross_entropy(s, y, backend=backend).backward()\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "dhkd_pipe.kernels.fused_kd_loss\n"
        "assert 'triton' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_int8_dequantise_bit_identical(tmp_path):
    """The store's decode, the reference dequantise and the kernels' teacher-row loader give the
    same float32 teacher rows to the bit; and a loss kernel fed int8 rows equals the kernel fed
    those float32 rows exactly (so every loss kernel reads teachers through that loader)."""
    from test_cache import create, fake_logits, write

    from dhkd_pipe.kernels._rowmath import dequantize_kernel

    store = create(tmp_path / "s.zarr", "int8")
    write(store, fake_logits())
    values, scale = store.read_chunk(1, 2)
    values, scale = values[:8], scale[:8]  # rows enough: the interpreter runs one program per row
    assert values.dtype == np.int8 and scale.dtype == np.float32
    decoded = decode_logits(values, scale, DEV)
    q, s = torch.from_numpy(values).to(DEV), torch.from_numpy(scale).to(DEV)
    reference = losses.dequantize(q, s)
    B, K = q.shape
    kernel = _poisoned(reference)
    dequantize_kernel[(B,)](q, q.stride(0), s, kernel, kernel.stride(0), K, HAS_SCALE=True, BLOCK=8)
    assert decoded.dtype == reference.dtype == kernel.dtype == torch.float32
    bits = lambda x: x.cpu().view(torch.int32)  # noqa: E731
    assert torch.equal(bits(decoded), bits(reference)) and torch.equal(bits(kernel), bits(reference))
    assert not torch.equal(bits(reference), bits(q.float()))  # the scale was applied
    h1, h2, y = (
        random_logits(B, K, 30, **ON_DEV),
        random_logits(B, K, 31, **ON_DEV),
        random_labels(B, K, 32, device=DEV),
    )
    kw = dict(temperature=3.0, alpha=ALPHA, gamma=GAMMA, max_block=BLOCK)  # 1/3 rounds: scale first
    for kd_loss in KD_NAMES:
        from_int8 = dhkd_forward(h1, h2, q, y, kd_loss=kd_loss, teacher_scale=s, **kw)
        from_f32 = dhkd_forward(h1, h2, reference, y, kd_loss=kd_loss, **kw)
        assert torch.equal(from_int8.loss, from_f32.loss), kd_loss
        assert all(torch.equal(a, b) for a, b in zip(from_int8.grads, from_f32.grads, strict=True)), kd_loss


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dhkd_pipe.kernels._rowmath import dequantize_kernel
from dhkd_pipe.kernels.fused_cross_entropy import _ce_kernel
from dhkd_pipe.kernels.fused_dhkd import _dhkd_kernel
from dhkd_pipe.kernels.fused_kd import _kd_kernel

FLOATS = {"inv_T", "ce_w", "kd_w", "kd_gw", "w", "gw"}

def build(fn, ptrs, consts, num_warps=4):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in FLOATS else "i32") for n in fn.arg_names}
    source = ASTSource(fn=fn, signature=sig, constexprs=consts)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))

for mode in (0, 1, 2):
    for tptr, has_scale in (("*bf16", False), ("*i8", True)):
        build(_dhkd_kernel, dict(h1_ptr="*bf16", h2_ptr="*bf16", t_ptr=tptr, t_scale_ptr="*fp32", y_ptr="*i64",
              g1_ptr="*bf16", g2_ptr="*bf16", loss_ptr="*fp32"), dict(KD_MODE=mode, HAS_SCALE=has_scale, BLOCK=4096), 8)
build(_ce_kernel, dict(x_ptr="*fp32", y_ptr="*i32", g_ptr="*fp32", loss_ptr="*fp32"), dict(BLOCK=16))
build(_kd_kernel, dict(s_ptr="*fp16", t_ptr="*i8", t_scale_ptr="*fp32", g_ptr="*fp16", loss_ptr="*fp32"),
      dict(KD_MODE=0, HAS_SCALE=True, BLOCK=1024))
for mode in (1, 2):
    build(_kd_kernel, dict(s_ptr="*fp32", t_ptr="*fp16", t_scale_ptr="*fp32", g_ptr="*fp32", loss_ptr="*fp32"),
          dict(KD_MODE=mode, HAS_SCALE=False, BLOCK=256))
build(dequantize_kernel, dict(t_ptr="*i8", t_scale_ptr="*fp32", out_ptr="*fp32"), dict(HAS_SCALE=True, BLOCK=128))
"""


@pytest.mark.slow  # compiles every kernel variant for sm_90 in a subprocess: seconds per variant
def test_kernels_compile_for_gpu(tmp_path):
    """The interpreter accepts code the compiler rejects (e.g. a non-constexpr global): compile
    every kernel variant ahead of time for sm_90, no GPU needed."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    if r.returncode and "No module named 'triton.backends.nvidia'" in r.stderr:
        pytest.skip("triton built without the CUDA backend")
    assert r.returncode == 0, r.stderr[-3000:]


def test_every_kd_loss_has_a_kernel_mode():
    # was an import-time assert in kernels/_launch.py, which made kernels and losses import each other
    from dhkd_pipe.kernels._launch import KD_MODES

    assert set(KD_MODES) == set(losses.KD_LOSSES), "a kd loss without a kernel mode, or the reverse"
