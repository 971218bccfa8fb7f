"""What a run does between and after its epochs: the learning-rate schedule (``lr_at``), the
metric names of a method's loss terms, an epoch's end (the non-finite check, the metrics line,
validation, the checkpoint) and a run's end (the exported single-head model and ``summary.json``).
The loop that calls them is ``training.engine``."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import numpy as np

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.data.inference import evaluate
from dhkd_pipe.methods.base import Method
from dhkd_pipe.training.exported import write_exported
from dhkd_pipe.training.run_folder import METRICS, SUMMARY, append_run_line, metrics_line, write_run_json
from dhkd_pipe.training.state import save_training_state

if TYPE_CHECKING:
    from dhkd_pipe.training.run import Run

__all__ = ["lr_at", "metric_names", "end_epoch", "finish"]


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    return cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.lr_milestones)


def metric_names(method: Method) -> list[str]:
    """``metrics.jsonl`` keys of a method's per-epoch mean loss terms: ``train_loss`` (the total),
    then ``train_<term>`` for each named term."""
    return ["train_loss"] + [f"train_{name}" for name in method.term_names]


def end_epoch(run: Run, epoch: int, log):
    """After an epoch's last step: the non-finite check, the metrics line, validation, the checkpoint."""
    cfg, acc, progress = run.cfg, run.accelerator, run.progress
    run.guard.check(acc, epoch)
    train_time = time.perf_counter() - progress.tally.clock_start
    metrics = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch)}
    metrics.update(zip(metric_names(run.method), progress.tally.means(acc), strict=True))
    metrics.update({"images_per_sec": progress.tally.seen * acc.num_processes / train_time, "epoch_time": train_time})
    if progress.skipped:
        metrics["skipped_nonfinite"] = progress.skipped
    if validates(cfg, epoch):
        metrics.update(
            {
                f"val_{k}": v
                for k, v in evaluate(acc.unwrap_model(run.model), run.renderer, cfg.batch_size * 2, acc).items()
            }
        )
    progress.end_epoch(metrics)
    if acc.is_main_process:
        append_run_line(os.path.join(cfg.out, METRICS), metrics_line(metrics))
        acc.log(metrics, step=metrics["epoch"])  # the trackers get exactly the metrics.jsonl line
        val = f"val top-1 {metrics['val_top1']:.2f}%  " if "val_top1" in metrics else ""
        parts = "  ".join(f"{k} {metrics['train_' + k]:.4f}" for k in run.method.term_names)
        speed = f"{metrics['images_per_sec']:.0f} img/s"
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.4f} ({parts})  {val}{speed}")
    save_training_state(run)
    acc.wait_for_everyone()


def validates(cfg: TrainConfig, epoch: int) -> bool:
    """Whether validation runs after ``epoch`` (0-based): every ``val_every``-th and the last."""
    return epoch + 1 == cfg.epochs or (cfg.val_every > 0 and (epoch + 1) % cfg.val_every == 0)


def finish(run: Run, wall: float) -> dict:
    """Writes the exported single-head model (``model.pt``, ``model.safetensors``) and ``summary.json``."""
    from dhkd_pipe.models import single_head

    acc, cfg = run.accelerator, run.cfg
    exported = single_head(acc.unwrap_model(run.model, keep_torch_compile=False))
    history = run.progress.history
    validated = [h for h in history if "val_top1" in h]
    summary = {
        "model": cfg.model,
        "method": cfg.method,
        "method_params": run.method.params(),
        "data": run.data_spec or cfg.data,
        "num_classes": run.data.num_classes,
        "epochs": cfg.epochs,
        "val_top1": validated[-1]["val_top1"] if validated else None,
        "val_top5": validated[-1]["val_top5"] if validated else None,
        "best_val_top1": max((h["val_top1"] for h in validated), default=None),
        "images_per_sec": float(np.median([h["images_per_sec"] for h in history])) if history else None,
        "train_time": sum(h["epoch_time"] for h in history),
        "wall_time": wall,
        "processes": acc.num_processes,
        "teacher_source": (
            "cache"
            if run.loader.epochs.has_logits and run.method.needs_teacher
            else "online"
            if run.teacher is not None
            else None
        ),
        "distinct_views": run.loader.epochs.distinct_views(cfg.epochs),
        "config": cfg.to_dict(),
    }
    if acc.is_main_process:
        # the plan says how images became pixels in training, so `eval` renders validation the same way
        mean, std = run.plan.normalization(run.data)
        write_exported(
            cfg.out, exported, cfg.model, run.data.num_classes, run.plan.resolution, mean, std, plan=run.plan.to_dict()
        )
        write_run_json(os.path.join(cfg.out, SUMMARY), summary)
    acc.wait_for_everyone()
    return summary
