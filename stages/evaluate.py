"""``dhkd-pipe eval``: top-1 and top-5 of a model on a data set's validation split."""

from __future__ import annotations

import torch

from dhkd_pipe.data import load_data
from dhkd_pipe.engine import evaluate as evaluate_model
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models import create_model, load_checkpoint


def evaluate(model: str, weights: str, data: str, batch_size: int = 256) -> dict:
    dataset = load_data(data)
    if dataset.num_val == 0:
        raise DhkdError(f"{data} has no validation split")
    net = create_model(model, dataset.num_classes)
    load_checkpoint(net, weights, arch=model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    renderer = dataset.renderer(device, dataset.default_plan())
    result = evaluate_model(net, renderer, batch_size)
    return {"model": model, "weights": weights, "data": data, "num_val": dataset.num_val, **result}
