"""Gradient alignment as published (PCGrad over parameter gradients) against a plain
re-implementation of the published step written here from its description:

    L1 = gamma * CE(head 1), L2 = alpha * KD(head 2); g1, g2 = their gradients w.r.t. all trainable
    parameters, flattened (zeros where an objective does not reach); for each g in (g1, g2): if
    <g, g1> < 0, g <- g - <g, g1>/|g1|^2 g1; the parameter gradient is the sum; SGD with momentum
    and weight decay.
"""

import copy
import math
import os
from types import SimpleNamespace

import grad_align_case as case
import pytest
import torch
import torch.nn.functional as F
from conftest import accelerate_launch

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.training.accelerator import make_accelerator
from dhkd_pipe.training.grad_align import aligned_backward, project_conflicting
from dhkd_pipe.training.run import prepare

TOL = 1e-10


# ---- the published step, re-implemented ---------------------------------------------------------


def reference_losses(model, x, y, t):
    s = case.SETTINGS
    head1, head2 = model(x)
    l1 = s["gamma"] * F.cross_entropy(head1, y)
    T = s["temperature"]
    d = (head2 - t) / T  # BinaryKL-norm: KL([1/2, 1/2] || [sigma(d), 1 - sigma(d)]) per logit
    kl = 0.5 * (-F.logsigmoid(d) - F.logsigmoid(-d)) - math.log(2.0)
    l2 = s["alpha"] * T * T / x.shape[0] * kl.sum()
    return l1, l2


def flat_grad(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).clone()


def reference_run(aux_head, align, steps, bn_eval=False, dtype=torch.float64):
    """Returns (state dict, <g2, g1> of each step)."""
    s = case.SETTINGS
    model = case.build_model(aux_head, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    model.train(not bn_eval)
    params = [p for p in model.parameters() if p.requires_grad]
    dots = []
    for x, y, t in steps:
        l1, l2 = reference_losses(model, x, y, t)
        opt.zero_grad(set_to_none=True)
        if not align:
            (l1 + l2).backward()
        else:
            l1.backward(retain_graph=True)
            g1 = flat_grad(params)
            opt.zero_grad(set_to_none=True)
            l2.backward()
            g2 = flat_grad(params)
            projected = []
            for g in (g1, g2):
                dot = torch.dot(g, g1)
                if dot < 0:
                    g = g - dot / torch.dot(g1, g1) * g1
                projected.append(g)
            dots.append(float(torch.dot(g2, g1)))
            total = projected[0] + projected[1]
            offset = 0
            for p in params:
                p.grad = total[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, dots


def max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# ---- the product's training step against it ----------------------------------------------------


@pytest.mark.parametrize("align", [False, True], ids=["plain", "grad_align"])
@pytest.mark.parametrize("aux_head", ["linear", "nonlinear"])
def test_train_step_is_the_published_step(aux_head, align):
    steps = case.batches()
    got = case.product_run(make_accelerator("no"), aux_head, align, steps)
    want, dots = reference_run(aux_head, align, steps)
    assert max_diff(got, want) < TOL
    if align:
        # both branches ran (a conflicting step and an aligned one), and the projection mattered
        assert any(d < 0 for d in dots) and any(d >= 0 for d in dots), dots
        plain, _ = reference_run(aux_head, False, steps)
        assert max_diff(want, plain) > 1e-4


@pytest.mark.parametrize("aux_head", ["linear", "nonlinear"])
def test_fused_kernel_terms_align_like_the_reference(aux_head, monkeypatch):
    """The fused Triton launch gives ce and kd as two outputs of one autograd node; each is
    differentiated alone here. float32 (the kernel's compute type), in Triton's interpreter on CPU:
    agreement to 1e-5, where alignment itself moves the parameters by 2e-3 to 1e-2."""
    from dhkd_pipe.kernels import triton_available

    if not triton_available():
        pytest.skip("triton is not installed, or neither a GPU nor TRITON_INTERPRET=1")
    monkeypatch.setitem(case.SETTINGS, "kernels", "triton")
    # on a GPU the product's run is there and the reference on the CPU: float32 on both (cuDNN's
    # convolutions default to TF32, whose 10-bit mantissa put the runs 2e-3 to 2e-2 apart on an H200)
    steps = [tuple(a.float() if a.is_floating_point() else a for a in s) for s in case.batches()]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = case.product_run(make_accelerator("no"), aux_head, True, steps, dtype=torch.float32)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    want, _ = reference_run(aux_head, True, steps, dtype=torch.float32)
    assert max_diff(got, want) < 1e-5


def test_projection_cases():
    g1 = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    # conflict: g2 loses its component along g1; the sum keeps g1 whole
    g2 = torch.tensor([-3.0, 1.0, 0.0], dtype=torch.float64)
    out = project_conflicting(g1, g2)
    assert torch.allclose(out, g1 + g2 - (-3.0 / 5.0) * g1)
    assert torch.dot(out - g1, g1).abs() < 1e-12  # projected g2 is orthogonal to g1
    # no conflict, and g1 = 0: the plain sum
    g2 = torch.tensor([1.0, 5.0, -0.1], dtype=torch.float64)
    assert torch.equal(project_conflicting(g1, g2), g1 + g2)
    assert torch.equal(project_conflicting(torch.zeros(3, dtype=torch.float64), -g2), -g2)
    # an overflow stays visible to a grad scaler
    assert not project_conflicting(torch.tensor([math.inf, 0.0]), torch.tensor([-1.0, 1.0])).isfinite().all()
    assert not project_conflicting(torch.tensor([1.0, 0.0]), torch.tensor([math.nan, 1.0])).isfinite().all()


def test_unreached_parameters_get_zeros_and_head1_changes():
    """g2 = -2 g1 + h, h on head 2 only: the projection removes -2 g1 entirely, so head 1 and the
    body get g1 (the plain sum would give -g1), head 2 gets h, an unused parameter gets zeros."""
    torch.manual_seed(0)
    body, head1, head2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    spare = torch.nn.Parameter(torch.ones(3))
    x = torch.randn(6, 3, dtype=torch.float64)
    for m in (body, head1, head2):
        m.double()
    f = body(x)
    l1 = head1(f).pow(2).sum()
    l2 = -2 * head1(f).pow(2).sum() + head2(f.detach()).sum()
    shared, own2 = [*body.parameters(), *head1.parameters()], list(head2.parameters())
    g1 = torch.autograd.grad(l1, shared, retain_graph=True)
    h = torch.autograd.grad(l2, own2, retain_graph=True)
    aligned_backward(l1, l2, [*shared, *own2, spare])
    for p, g in zip(shared + own2, g1 + h, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-12, atol=1e-12)
    assert torch.equal(spare.grad, torch.zeros(3))


def test_grad_scaler_sees_the_scaled_aligned_gradient():
    """fp16's loss scaling: gradients come out scaled by the scaler's factor, the optimizer's
    scaler.step unscales them, and an overflow skips the step."""
    steps = case.batches()
    x, y, t = steps[0]

    def grads(scaler):
        model = case.build_model("linear")
        params = list(model.parameters())
        l1, l2 = reference_losses(model, x, y, t)
        acc = SimpleNamespace(scaler=scaler, gradient_accumulation_steps=1, num_processes=1)
        aligned_backward(l1, l2, params, acc)
        return model, torch.cat([p.grad.reshape(-1) for p in params])

    _, plain = grads(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model, scaled = grads(scaler)
    assert torch.allclose(scaled, 1024.0 * plain, rtol=1e-12, atol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    scaler.step(opt)
    scaler.update()
    assert max_diff(model.state_dict(), before) > 0
    # an inf in one gradient: the scaler skips the step
    next(model.parameters()).grad[0] = math.inf
    before = copy.deepcopy(model.state_dict())
    scaler.step(opt)
    assert max_diff(model.state_dict(), before) == 0


def test_bf16_autocast_step():
    # whatever precision an earlier test's Accelerator set in this process (make_accelerator resets it)
    steps = [tuple(a.float() if a.is_floating_point() else a for a in s) for s in case.batches()]
    acc = make_accelerator("bf16")
    got = case.product_run(acc, "linear", True, steps, dtype=torch.float32)
    assert all(v.isfinite().all() for v in got.values() if v.is_floating_point())
    start = case.build_model("linear", dtype=torch.float32).state_dict()
    assert max_diff(got, start) > 1e-3


def _autocast_dtype(acc):
    # on the accelerator's device: CUDA autocast leaves a CPU tensor's matmul in float32
    with acc.autocast():
        return torch.nn.Linear(4, 3).to(acc.device)(torch.randn(2, 4, device=acc.device)).dtype


def test_one_process_runs_stages_of_different_precision(monkeypatch):
    # a float32 teacher, then bf16 students, then float32 again, as the quickstart or a notebook does:
    # Accelerate's per-process AcceleratorState would refuse the second ("already been initialized")
    from accelerate.state import AcceleratorState, PartialState

    first = make_accelerator("no")
    assert first.mixed_precision == "no" and _autocast_dtype(first) == torch.float32
    partial = dict(PartialState._shared_state)
    second = make_accelerator("bf16")
    assert second.mixed_precision == "bf16" and _autocast_dtype(second) == torch.bfloat16
    assert dict(PartialState._shared_state) == partial  # device and process state kept
    assert make_accelerator("bf16").mixed_precision == "bf16"  # the same setting: nothing reset
    third = make_accelerator("no")
    assert third.mixed_precision == "no" and _autocast_dtype(third) == torch.float32
    # with a live process group (accelerate launch) nothing is torn down: a different precision is refused
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(DhkdError, match="--precision bf16: .* distributed launch"):
        make_accelerator("bf16")
    assert AcceleratorState().mixed_precision == "no"
    assert make_accelerator("no").mixed_precision == "no"


def test_grad_align_needs_dhkd(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(method="kd", teacher="resnet8", teacher_weights="t.pt", grad_align=True, out=str(out))
    with pytest.raises(DhkdError, match="--grad-align .*only --method dhkd"):
        prepare(cfg)
    cfg = TrainConfig(method="ce", grad_align_features=True, out=str(out))
    with pytest.raises(DhkdError, match="--grad-align-features"):
        prepare(cfg)
    assert not out.exists()
    with pytest.raises(DhkdError, match="choose one gradient alignment"):
        TrainConfig(method="dhkd", grad_align=True, grad_align_features=True).validate()


# ---- several processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(tmp_path):
    out = tmp_path / "ranks.pt"
    script = os.path.join(os.path.dirname(__file__), "grad_align_case.py")
    accelerate_launch(out, script=script)
    saved = torch.load(out, weights_only=True)
    assert saved["world"] == 2
    steps = case.batches()
    for aux, align in case.MULTI_CASES:
        ranks = saved["results"][f"{aux}-{align}"]
        one = case.product_run(make_accelerator("no"), aux, align, steps, bn_eval=True)
        want, dots = reference_run(aux, align, steps, bn_eval=True)
        assert max_diff(ranks, one) < TOL
        assert max_diff(ranks, want) < TOL
        assert not align or any(d < 0 for d in dots)
