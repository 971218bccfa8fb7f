"""A model run over rendered views outside training: its top-1/top-5 on the validation split, and
the memory format its weights and inputs share. Stage 1, ``eval`` and the training loop use both."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dhkd_pipe.data.datasets import Renderer


def memory_format(cfg, device=None) -> torch.memory_format:
    """``--channels-last``: NHWC weights and inputs (what tensor cores and oneDNN prefer). Not given
    (None): on for a CUDA ``device``, off elsewhere; stage 2's default, chosen by ``bench distill``."""
    on = cfg.channels_last
    if on is None:
        on = device is not None and torch.device(device).type == "cuda"
    return torch.channels_last if on else torch.contiguous_format


@torch.no_grad()
def evaluate(model, renderer: Renderer, batch_size: int, accelerator: Accelerator | None = None) -> dict:
    """Top-1 and top-5 accuracy (%) of head 1 on the un-augmented validation split."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    ctx = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        for images, labels in renderer.val_batches(batch_size):
            out = model(images)
            out = out[0] if isinstance(out, tuple) else out
            top = out.float().topk(min(5, out.shape[1]), dim=1).indices
            hit = top == labels.to(top.device)[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=1).sum())
            total += len(labels)
    model.train(was_training)
    if total == 0:
        return {"top1": float("nan"), "top5": float("nan")}
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}
