"""``dhkd-pipe eval``: top-1 and top-5 of a model on a data set's validation split.

Validation views are rendered as the weights expect: the plan a dhkd-pipe run recorded in its
``model.pt``, or a published weight's own preprocessing (image folders), else the data set's.
"""

from __future__ import annotations

import torch

from dhkd_pipe.config import missing_data
from dhkd_pipe.data import load_data
from dhkd_pipe.engine import evaluate as evaluate_model
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models import check_input_size, create_model, load_checkpoint, resolve_weights
from dhkd_pipe.views import ViewPlan, with_preprocessing


def _recorded_plan(path: str) -> dict | None:
    """The ``plan`` a dhkd-pipe run saved beside the weights in ``model.pt``, if any."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file (safetensors) or not ours: load_checkpoint reports real problems
        return None
    return obj.get("plan") if isinstance(obj, dict) and isinstance(obj.get("plan"), dict) else None


def evaluate(model: str, weights: str | None, data: str | None, batch_size: int = 256, resolution: int | None = None) -> dict:
    if not data:
        raise DhkdError(missing_data())
    if resolution is not None and resolution < 8:
        raise DhkdError(f"bad resolution {resolution}: must be at least 8")
    dataset = load_data(data)
    if dataset.num_val == 0:
        raise DhkdError(f"{data} has no validation split")
    source = resolve_weights(model, weights)
    plan = dataset.default_plan()
    recorded = _recorded_plan(source.path) if source.kind == "file" else None
    if recorded is not None and recorded.get("policy") == plan.policy:
        plan = ViewPlan.from_dict(recorded)
    elif plan.policy == "random_resized_crop_flip":
        plan = with_preprocessing(plan, source.preprocessing())
    plan = with_preprocessing(plan, None, resolution)
    check_input_size(model, plan.resolution, dataset.num_classes)
    net = create_model(model, dataset.num_classes)
    load_checkpoint(net, source)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    renderer = dataset.renderer(device, plan)
    result = evaluate_model(net, renderer, batch_size)
    return {"model": model, "weights": source.record, "data": data, "num_val": dataset.num_val,
            "resolution": plan.resolution, **result}
