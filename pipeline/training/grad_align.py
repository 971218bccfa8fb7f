"""Gradient alignment as the published DHKD code does it: PCGrad over the parameter gradients.

For the two objectives L1 = gamma * CE(head 1) and L2 = alpha * KD(head 2), g1 and g2 are their
gradients with respect to all trainable parameters, each flattened into one vector (a parameter an
objective does not reach contributes zeros). For each g in (g1, g2): if <g, g1> < 0, then
g <- g - <g, g1> / |g1|^2 * g1. The parameter gradient is the sum of the two. Since
<g1, g1> >= 0, g1 never changes; when g2 is projected, every parameter that g1 reaches (head 1
included) changes too. With |g1| = 0 nothing is projected. Weight decay and momentum stay in the
optimizer.

With several processes the projection runs on the all-reduced (mean) gradients, so N processes on a
global batch give the single-process result. ``torch.autograd.grad`` never runs the parameters'
AccumulateGrad nodes, so DDP's reducer hooks (registered on those nodes) never fire: DDP reduces
nothing, and the one all-reduce here replaces its own. (This holds with DDP's default
``find_unused_parameters=False``; with it True the reducer would mark unused parameters ready in
forward and expect a reduction to finish.) ``no_sync`` is not used: under it DDP's forward also stops
broadcasting buffers from rank 0.
"""

from __future__ import annotations

import torch

from dhkd_pipe.errors import DhkdError


def project_conflicting(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """``g1 + g2'``: g2' = g2 - <g2, g1>/|g1|^2 g1 where <g2, g1> < 0 and |g1| > 0, else g2.

    ``g1`` and ``g2`` are flat vectors. No host synchronisation (the branch is a ``torch.where``),
    and a non-finite input gives a non-finite result, so a grad scaler still sees an overflow.
    """
    dot = torch.dot(g2, g1)
    norm2 = torch.dot(g1, g1)
    conflict = (dot < 0) & (norm2 > 0)
    coef = torch.where(conflict, dot / torch.where(norm2 > 0, norm2, torch.ones_like(norm2)), torch.zeros_like(dot))
    # g1's own projection is a no-op (<g1, g1> >= 0), so only g2 is projected; one new vector.
    return torch.addcmul(g2, g1, -coef).add_(g1)


def aligned_backward(loss1: torch.Tensor, loss2: torch.Tensor, params, accelerator=None) -> None:
    """Writes the aligned gradient of ``loss1 + loss2`` into ``p.grad`` for every ``p`` in ``params``.

    ``loss1`` is the objective that is never projected (gamma * CE on head 1), ``loss2`` the one
    projected when it conflicts (alpha * KD on head 2). ``params``: the trainable parameters (those
    with ``requires_grad``). ``accelerator`` (optional) supplies what ``accelerator.backward`` would
    apply: division by the gradient-accumulation steps, fp16 loss scaling (the projection is
    unchanged by a common positive factor, and the optimizer's ``scaler.step`` still unscales and
    skips the step on inf/NaN), and the all-reduce across processes. Gradients are added to an
    existing ``p.grad`` (with gradient accumulation each micro-batch is aligned on its own).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise DhkdError("gradient alignment needs trainable parameters; the model has none")
    scaler = getattr(accelerator, "scaler", None)
    steps = getattr(accelerator, "gradient_accumulation_steps", 1)
    losses = []
    for loss in (loss1, loss2):
        loss = loss / steps if steps != 1 else loss
        losses.append(scaler.scale(loss) if scaler is not None else loss)

    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    sizes = [p.numel() for p in params]
    flat = torch.empty(2, sum(sizes), dtype=dtype, device=params[0].device)
    for row, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=row == 0, allow_unused=True, materialize_grads=True)
        torch.cat([g.reshape(-1) for g in grads], out=flat[row])
    _all_reduce_mean(flat, accelerator)

    total = project_conflicting(flat[0], flat[1])
    for p, g in zip(params, torch.split(total, sizes), strict=True):
        g = g.view_as(p).to(p.dtype)  # views into `total`: no copy
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


def _all_reduce_mean(t: torch.Tensor, accelerator) -> None:
    """In-place mean over the processes (one collective for both gradients)."""
    if accelerator is None or getattr(accelerator, "num_processes", 1) <= 1:
        return
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise DhkdError("gradient alignment across processes needs torch.distributed to be initialised")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t.div_(accelerator.num_processes)
