"""A frozen model with the view plan its inputs are rendered with: the teacher of online
distillation and of stage 1, the teacher ``verify-cache`` re-runs, and the model ``eval`` scores.

Weights bring their own preprocessing only for image folders (a published torchvision or timm
weight's resize, crop, interpolation, mean and std); the in-memory data sets keep their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dhkd_pipe.data.views import ViewPlan, describe_preprocessing, with_preprocessing

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dhkd_pipe.data.datasets import Dataset
    from dhkd_pipe.models.pretrained import WeightsSource

# the view policy whose pixels depend on the weights' preprocessing (image folders)
WEIGHTS_PREPROCESS_POLICY = "random_resized_crop_flip"


def teacher_plan(
    plan: ViewPlan, source: WeightsSource, data_kind: str, resolution: int | None = None
) -> tuple[ViewPlan, dict]:
    """The plan the weights' views are rendered with, and what a store records of it: the
    weights' own preprocessing for image folders (torchvision transforms, timm's pretrained
    config), else the data set's; ``resolution`` (``--resolution``) wins over both."""
    pre = source.preprocessing() if plan.policy == WEIGHTS_PREPROCESS_POLICY else None
    plan = with_preprocessing(plan, pre, resolution)
    return plan, describe_preprocessing(plan, pre["source"] if pre else f"data set {data_kind}")


def resolve_teacher(arch: str, weights: str | None, accelerator: Accelerator | None = None) -> WeightsSource:
    """``weights`` of ``arch`` (a file, a published weight's name, or None for the default);
    under several processes one fetches a published weight and the others find it cached."""
    from dhkd_pipe.models import resolve_weights

    if accelerator is None:
        return resolve_weights(arch, weights)
    with accelerator.main_process_first():
        return resolve_weights(arch, weights)


def frozen_model(
    source: WeightsSource,
    num_classes: int,
    resolution: int,
    device,
    role: str = "teacher",
    memory_format: torch.memory_format = torch.contiguous_format,
    check_finite: bool = True,
) -> torch.nn.Module:
    """``source``'s architecture with its weights, in eval mode and without gradients, on ``device``.
    Refused before anything is written: a model that cannot take ``resolution`` inputs, and
    (``check_finite``) weights holding NaN or infinity."""
    from dhkd_pipe.models import check_finite_weights, check_input_size, create_model, load_checkpoint

    check_input_size(source.arch, resolution, num_classes, role)
    model = create_model(source.arch, num_classes)
    load_checkpoint(model, source)
    if check_finite:
        check_finite_weights(model, source.label)
    return model.eval().requires_grad_(False).to(device, memory_format=memory_format)


@dataclass
class Teacher:
    """A loaded frozen teacher: its weights' source, the model, the plan its views are rendered
    with, and what a store records of that plan (``preprocessing``)."""

    source: WeightsSource
    model: torch.nn.Module
    plan: ViewPlan
    preprocessing: dict


def load_teacher(
    arch: str,
    weights: str | None,
    data: Dataset,
    plan: ViewPlan,
    device,
    resolution: int | None = None,
    accelerator: Accelerator | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Teacher:
    """The teacher ``arch`` with ``weights`` for ``data``, its views rendered from ``plan`` with the
    weights' preprocessing (``teacher_plan``)."""
    source = resolve_teacher(arch, weights, accelerator)
    plan, preprocessing = teacher_plan(plan, source, data.kind, resolution)
    model = frozen_model(source, data.num_classes, plan.resolution, device, memory_format=memory_format)
    return Teacher(source, model, plan, preprocessing)
