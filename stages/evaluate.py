"""``dhkd-pipe eval``: top-1 and top-5 of a model on a data set's validation split.

Validation views are rendered as the weights expect: the plan a dhkd-pipe run recorded in its
``model.pt``, or a published weight's own preprocessing (image folders), else the data set's.
"""

from __future__ import annotations

import torch

from dhkd_pipe.config import missing_data
from dhkd_pipe.data.datasets import load_data
from dhkd_pipe.data.inference import evaluate as evaluate_model
from dhkd_pipe.data.teacher import frozen_model, resolve_teacher, teacher_plan
from dhkd_pipe.data.views import ViewPlan, with_preprocessing
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.option_ranges import check_value


def _recorded_plan(path: str) -> dict | None:
    """The ``plan`` a dhkd-pipe run saved beside the weights in ``model.pt``, if any."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file (safetensors) or not ours: load_checkpoint reports real problems
        return None
    return obj.get("plan") if isinstance(obj, dict) and isinstance(obj.get("plan"), dict) else None


def evaluate(
    model: str, weights: str | None, data: str | None, batch_size: int = 256, resolution: int | None = None
) -> dict:
    if not data:
        raise DhkdError(missing_data())
    if resolution is not None and resolution < 8:
        raise DhkdError(f"bad resolution {resolution}: must be at least 8")
    check_value("batch_size", batch_size)
    check_value("resolution", resolution)
    dataset = load_data(data)
    if dataset.num_val == 0:
        raise DhkdError(f"{data} has no validation split")
    source = resolve_teacher(model, weights)
    plan = dataset.default_plan()
    recorded = _recorded_plan(source.path) if source.kind == "file" else None
    if recorded is not None and recorded.get("policy") == plan.policy:  # how the run that wrote them rendered its views
        plan = with_preprocessing(ViewPlan.from_dict(recorded), None, resolution)
    else:
        plan, _ = teacher_plan(plan, source, dataset.kind, resolution)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = frozen_model(
        source, dataset.num_classes, plan.resolution, device, role="model"
    )  # NaN weights: refused, not a NaN accuracy
    renderer = dataset.renderer(device, plan)
    result = evaluate_model(net, renderer, batch_size)
    return {
        "model": model,
        "weights": source.record,
        "data": data,
        "num_val": dataset.num_val,
        "resolution": plan.resolution,
        **result,
    }
