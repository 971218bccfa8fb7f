"""Teacher logits as stored (float16, bfloat16 or float32; int8 with one scale per row) to the
float32 rows every loss computes with. The store's decoder and the losses share this one
function, so it sits below both."""

from __future__ import annotations

import torch

from dhkd_pipe.errors import DhkdError

_FLOAT_TEACHER = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dequantize(teacher: torch.Tensor | None, teacher_scale: torch.Tensor | None = None):
    """Teacher logits as float32 (float64 stays float64): the project's one dequantise.

    float16 / bfloat16 / float32 teacher logits are upcast; int8 logits are the float32 product
    ``float32(q) * float32(scale)[:, None]`` with one scale per row (``teacher_scale`` of shape
    (B,), moved to the logits' device); ``None`` gives ``None``. The store's decode
    (``store.codecs.decode_logits``) is this function, and the kernels' teacher-row loader
    (``kernels/_rowmath.py`` ``load_teacher``) computes the same float32 product, so all three
    give bit-identical rows.
    """
    if teacher is None:
        return None
    if teacher.dtype == torch.int8:
        if teacher_scale is None:
            raise DhkdError("int8 teacher logits need teacher_scale (one float per row)")
        if teacher_scale.dim() != 1 or teacher_scale.shape[0] != teacher.shape[0]:
            raise DhkdError(f"teacher_scale must have shape ({teacher.shape[0]},), got {tuple(teacher_scale.shape)}")
        return teacher.float() * teacher_scale.to(device=teacher.device, dtype=torch.float32)[:, None]
    if teacher.dtype not in _FLOAT_TEACHER:
        raise DhkdError(f"teacher logits must be float16/bfloat16/float32 or int8, got {teacher.dtype}")
    return teacher if teacher.dtype == torch.float64 else teacher.float()
