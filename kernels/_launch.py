"""Host side shared by every fused loss: the checks, buffers and launch of ``launch_rows``, and the
``StoredGradLoss`` autograd base (the forward kernel stores the gradients; backward scales them).

Every loss kernel runs one program per row and takes its arguments in one order:

    head_ptr, head_stride (per head), [t_ptr, t_stride, t_scale_ptr], [y_ptr],
    g_ptr, g_stride (per head), loss_ptr, K, [inv_T], *weights, [HAS_SCALE], BLOCK, ...

(teacher and temperature arguments only when the op has a teacher, labels only when it has
labels). ``loss_ptr`` receives one float32 loss per row, already weighted (an op of several terms,
``terms=N``, writes N per row, row-major: ``loss_ptr + N * row + i``); the gradients are of their
sum, in each head's dtype (with several terms: of the one term that reaches that head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from dhkd_pipe.errors import DhkdError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TEACHER_DTYPES = FLOAT_DTYPES + (torch.int8,)
# default largest column block: big enough that one or two blocks cover ImageNet-sized K
DEFAULT_MAX_BLOCK = 4096


# the kernels' KD_MODE constexpr (``_rowmath.kd_mode_row``) for each name of losses.KD_LOSSES
# (tests/test_kernels.py checks that the two name the same losses)
KD_MODES = {"kd": 0, "binary_kl": 1, "binary_kl_norm": 2}


def kd_mode(kd_loss: str) -> int:
    try:
        return KD_MODES[kd_loss]
    except KeyError:
        raise DhkdError(f"unknown kd_loss {kd_loss!r}; choose one of {sorted(KD_MODES)}") from None


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    """x with unit column stride (any row stride is kept)."""
    return x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()


def _head(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise DhkdError(f"{name} must be (B, K) logits, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise DhkdError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.numel() == 0:
        raise DhkdError(f"{name} are empty (shape {tuple(x.shape)}); need B >= 1 rows of K >= 1 classes")
    return _unit_columns(x)


def _teacher(t: torch.Tensor, shape, teacher_scale):
    """(teacher rows, per-row float32 scale or None), checked against the heads' shape."""
    if t.shape != shape:
        raise DhkdError(f"teacher logits {tuple(t.shape)} do not match student logits {tuple(shape)}")
    if t.dtype not in TEACHER_DTYPES:
        raise DhkdError(f"teacher logits must be float16/bfloat16/float32 or int8, got {t.dtype}")
    t = _unit_columns(t.detach())
    if t.dtype != torch.int8:
        return t, None
    if teacher_scale is None:
        raise DhkdError("int8 teacher logits need teacher_scale (one float per row)")
    if teacher_scale.dim() != 1 or teacher_scale.shape[0] != shape[0]:
        raise DhkdError(f"teacher_scale must have shape ({shape[0]},), got {tuple(teacher_scale.shape)}")
    return t, teacher_scale.detach().to(device=t.device, dtype=torch.float32).contiguous()


def _labels(target: torch.Tensor, B: int, K: int) -> torch.Tensor:
    """int32/int64 labels (B,). Range is checked on CPU only (a check on CUDA would synchronise)."""
    if target.dim() != 1 or target.shape[0] != B:
        raise DhkdError(f"target must be (B,) = ({B},) labels, got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise DhkdError(f"target must be int64 or int32 labels, got {target.dtype}")
    if not target.is_cuda and (int(target.min()) < 0 or int(target.max()) >= K):
        raise DhkdError(f"labels must lie in [0, {K})")
    return target.contiguous()


def block_size(K: int, max_block: int | None = None) -> int:
    """Power-of-two column block: the whole row when it fits, else max_block."""
    max_block = max_block or DEFAULT_MAX_BLOCK
    return max(min(triton.next_power_of_2(K), max_block), min(16, max_block))


def num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


@dataclass(frozen=True)
class RowLaunch:
    """What ``launch_rows`` checked and launched: the row losses and the gradient buffers."""

    loss: torch.Tensor  # (B,) float32, one weighted loss per row; (B, terms) for ops of several terms
    grads: tuple  # one (B, K) gradient of loss.sum() per head, in the head's dtype


def launch_rows(
    kernel,
    heads,
    *,
    weights,
    teacher=None,
    teacher_scale=None,
    target=None,
    temperature=None,
    grads=None,
    max_block=None,
    terms=1,
    **constexprs,
) -> RowLaunch:
    """Checks the inputs, allocates the buffers and launches ``kernel`` one program per row.

    The kernel's parameter names say whether it reads a teacher (``t_ptr``) and labels (``y_ptr``).
    ``heads``: {name: (B, K) float logits} (names for error messages; several heads must share a
    shape); ``teacher`` float or int8 (with ``teacher_scale`` (B,)) of that shape, or None;
    ``target`` (B,) labels or None; ``temperature`` > 0 when there is a teacher; ``weights``: a
    function of (B, T) giving the kernel's float weights; ``grads``: optional (B, K) gradient
    buffers, one per head (None entries are allocated); ``terms``: row losses per row (the loss
    buffer is (B,) for 1, else (B, terms)). ``constexprs`` go to the kernel as keywords, with
    HAS_SCALE (teacher ops), BLOCK and num_warps added here.
    """
    rows = [_head(x, name) for name, x in heads.items()]
    B, K = rows[0].shape
    if any(x.shape != rows[0].shape for x in rows):
        raise DhkdError(f"the heads differ in shape: {', '.join(str(tuple(x.shape)) for x in rows)}")
    grads = [
        torch.empty((B, K), dtype=x.dtype, device=x.device) if g is None else g
        for x, g in zip(rows, grads or [None] * len(rows), strict=True)
    ]
    loss = torch.empty((B,) if terms == 1 else (B, terms), dtype=torch.float32, device=rows[0].device)
    args = [a for x in rows for a in (x, x.stride(0))]
    if ("t_ptr" in kernel.arg_names) != (teacher is not None):
        raise DhkdError("this loss needs teacher logits" if teacher is None else "this loss takes no teacher")
    if ("y_ptr" in kernel.arg_names) != (target is not None):
        raise DhkdError("this loss needs labels" if target is None else "this loss takes no labels")
    if teacher is not None:
        if temperature is None or temperature <= 0:
            raise DhkdError(f"temperature must be positive, got {temperature}")
        t, scale = _teacher(teacher, rows[0].shape, teacher_scale)
        args += [t, t.stride(0), loss if scale is None else scale]  # an unread pointer when no scale
        constexprs["HAS_SCALE"] = scale is not None
    if target is not None:
        args.append(_labels(target, B, K))
    args += [a for g in grads for a in (g, g.stride(0))]
    args += [loss, K]
    T = None if teacher is None else float(temperature)
    if T is not None:
        args.append(1.0 / T)
    block = block_size(K, max_block)
    kernel[(B,)](*args, *weights(B, T), BLOCK=block, num_warps=num_warps(block), **constexprs)
    return RowLaunch(loss, tuple(grads))


class StoredGradLoss(torch.autograd.Function):
    """Base of the fused losses. A subclass's ``forward`` takes the differentiable logits first,
    launches its kernel and returns ``stored(ctx, run)``: the loss, with the kernel's gradients
    saved; ``backward`` multiplies them by grad_output (no intermediate is kept or recomputed).
    An op of several terms (one per head: term i reaches head i only) returns one loss per term,
    and each head's gradient is scaled by its own term's grad_output, so the terms can be
    differentiated apart. Where two heads are one tensor, autograd adds their two gradients."""

    @staticmethod
    def backward(ctx, *grad_outputs):
        if len(grad_outputs) == 1:
            grads = tuple(g * grad_outputs[0] for g in ctx.saved_tensors)
        else:
            grads = tuple(g * go for g, go in zip(ctx.saved_tensors, grad_outputs, strict=True))
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


def stored(ctx, run: RowLaunch):
    """For ``StoredGradLoss.forward``: saves ``run``'s gradients, returns the summed loss (one
    scalar per term when the op has several)."""
    ctx.save_for_backward(*run.grads)
    if run.loss.dim() == 1:
        return run.loss.sum()
    return tuple(run.loss[:, i].sum() for i in range(run.loss.shape[1]))
