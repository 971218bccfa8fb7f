"""The base of every distillation method (``Method``): what the engine asks of a method, the checks
of its options and of the tensors it is given, and the fused CE + KD terms the logit methods share.
The methods themselves are in ``logit_methods`` and ``feature_methods``; ``registry`` names them."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from dhkd_pipe.errors import BadArgument, WrongType
from dhkd_pipe.methods.names import BACKENDS
from dhkd_pipe.option_ranges import RANGES, number_text

if TYPE_CHECKING:  # the losses (torch) are imported where a batch is computed, so --help stays light
    import torch


BINARY_KL_LOSSES = ("binary_kl_norm", "binary_kl")


KD_STOP_HELP = (
    "distillation off from this epoch on, counting epochs from 1 as the published DHKD ImageNet script "
    "(--early_stop_epoch) does: with N, epochs 1 to N-1 distil and from epoch N on alpha is 0 (CE only); "
    "0 or unset: never"
)


def check_options(method) -> None:
    """Refuses an option of ``method`` of the wrong type (``WrongType``, a TypeError) or outside
    the range ``option_ranges`` declares for it (``BadArgument``, a ValueError: a NaN or negative
    weight, a temperature that is not positive): the same rule for the CLI and the Python API."""
    where = f"for --method {method.name}"
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        if f.name == "backend":
            if value not in BACKENDS:
                raise BadArgument(f"bad backend {value!r} {where}: choose one of {', '.join(BACKENDS)}")
            continue
        kind = str(f.type).split("|")[0].strip()
        if value is None and "None" in str(f.type):
            continue
        if kind == "str":
            if not isinstance(value, str):
                raise WrongType(f"{f.name} {where} must be a name (str), not {type(value).__name__} {value!r}")
            continue
        integral = kind == "int"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if integral else numbers.Real):
            what = "an integer" if integral else "a number"
            raise WrongType(f"{f.name} {where} must be {what}, not {type(value).__name__} {value!r}")
        problem = RANGES[f.name].problem(value) if f.name in RANGES else None
        if problem:
            raise BadArgument(f"bad {f.name} {number_text(value)} {where}: {problem}")


def _describe(value) -> str:
    """A value as an error line names it: a tensor by dtype, shape and device, else by type."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"a {str(value.dtype).replace('torch.', '')} tensor {tuple(shape)} on {getattr(value, 'device', 'cpu')}"
    return type(value).__name__


def alpha_at(method, epoch: int) -> float:
    """``alpha`` in (0-based) ``epoch``: 0 from the published script's 1-based ``early_stop_epoch``
    on (its ``if epoch >= args.early_stop_epoch: args.alpha = 0``, epochs counted from 1)."""
    stop = method.kd_stop_epoch
    return 0.0 if stop and epoch + 1 >= stop else method.alpha


@dataclass(frozen=True, kw_only=True)
class Method:
    """Base of every method: what the engine asks of it."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for ``dhkd-pipe distill --help``
    knobs: ClassVar[dict[str, str]]  # option -> what it weighs / sets, in words
    term_names: ClassVar[tuple[str, ...]] = ("ce", "kd")
    dual_head: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True

    backend: str = "auto"  # losses: "auto" (Triton on CUDA), "triton" or "torch"

    def __post_init__(self):
        check_options(self)

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch: int = 0) -> dict[str, torch.Tensor]:
        """The named loss terms of one batch. ``outputs``: the student's logits, or (head 1, head 2)
        for dual-head methods; ``teacher``: float logits, or int8 with ``teacher_scale`` (B,);
        ``epoch``: 0-based, for schedules (DKD's warm-up, kd/dhkd's ``kd_stop_epoch``)."""
        raise NotImplementedError

    def check_batch(self, outputs, target, teacher=None, teacher_scale=None) -> None:
        """Refuses a batch this method cannot compute, with the argument named: ``outputs`` one
        (B, K) float tensor, or for dual-head methods the pair (head 1, head 2) a ``DualHead``
        returns; ``target`` (B,) integer class indices below K; ``teacher`` (B, K) float logits, or
        int8 with ``teacher_scale`` (B,); B at least 1; all on one device. Called by the loss
        modules (a user's loop), not per training step (the engine's batches are built checked)."""
        import torch

        name = f"--method {self.name}"
        if self.dual_head:
            if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2):
                raise WrongType(
                    f"student: {name} needs the pair (head 1, head 2) that DualHead returns, not {_describe(outputs)}"
                )
            heads = tuple(outputs)
        else:
            if isinstance(outputs, (tuple, list)):
                raise WrongType(f"student: {name} takes one tensor of logits (B, K), not a pair of heads")
            heads = (outputs,)
        for head in heads:
            if not isinstance(head, torch.Tensor) or not head.is_floating_point():
                raise WrongType(f"student: logits must be a float tensor, not {_describe(head)}")
            if head.dim() != 2 or head.shape != heads[0].shape:
                raise BadArgument(
                    "student: logits must be (B, K), one shape for both heads; got "
                    + " and ".join(str(tuple(h.shape)) for h in heads)
                )
        rows, classes = heads[0].shape
        if rows == 0 or classes == 0:
            raise BadArgument(f"student: an empty batch ({rows} rows, {classes} classes) has no loss")
        device = heads[0].device
        if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex():
            raise WrongType(f"labels: must be a tensor of integer class indices, not {_describe(target)}")
        if target.dtype == torch.bool or tuple(target.shape) != (rows,):
            raise BadArgument(f"labels: must be ({rows},) class indices, got {_describe(target)}")
        if target.device != device:
            raise BadArgument(f"labels: on {target.device}, the student's logits on {device}")
        if target.device.type == "cpu":  # on a GPU this would wait for the device at every call
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= classes:
                raise BadArgument(f"labels: class {low if low < 0 else high} is outside 0..{classes - 1}")
        if teacher is None:
            if self.needs_teacher:
                raise BadArgument(f"teacher: {name} needs the teacher's logits ({rows}, {classes})")
            return
        if not isinstance(teacher, torch.Tensor) or not (teacher.is_floating_point() or teacher.dtype == torch.int8):
            raise WrongType(f"teacher: logits must be a float (or int8) tensor, not {_describe(teacher)}")
        if tuple(teacher.shape) != (rows, classes):
            raise BadArgument(
                f"teacher: logits must be ({rows}, {classes}) like the student's, got {tuple(teacher.shape)}"
            )
        if teacher.device != device:
            raise BadArgument(f"teacher: on {teacher.device}, the student's logits on {device}")
        if teacher.dtype == torch.int8:
            if not isinstance(teacher_scale, torch.Tensor) or tuple(teacher_scale.shape) != (rows,):
                raise BadArgument(f"teacher_scale: int8 teacher logits need their ({rows},) row scales")
            if not teacher_scale.is_floating_point() or teacher_scale.device != device:
                raise WrongType(f"teacher_scale: must be a float tensor on {device}, not {_describe(teacher_scale)}")

    def params(self) -> dict:
        """The method's options as resolved (defaults filled in)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "backend"}

    def _fused(self, head_ce, head_kd, teacher, target, teacher_scale, kd_loss, alpha=None):
        from dhkd_pipe.methods.losses import dhkd_terms

        alpha = self.alpha if alpha is None else alpha
        ce, kd = dhkd_terms(
            head_ce,
            head_kd,
            teacher,
            target,
            temperature=self.temperature,
            alpha=alpha,
            gamma=self.gamma,
            kd_loss=kd_loss,
            teacher_scale=teacher_scale,
            backend=self.backend,
        )
        return {"ce": ce, "kd": kd, "total": ce + kd}
