"""``dhkd-pipe train-teacher``: a model trained alone with cross-entropy."""

from __future__ import annotations

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.console import log_line
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.training.engine import train
from dhkd_pipe.training.run import prepare
from dhkd_pipe.training.run_folder import RunMode


def train_teacher(cfg: TrainConfig, *, mode: RunMode | str = RunMode.NEW, log=log_line) -> dict:
    if cfg.method != "ce":
        raise DhkdError("train-teacher trains with cross-entropy only (method ce)")
    run = prepare(cfg, mode)
    if run.accelerator.is_main_process:
        log(
            f"training {cfg.model} on {cfg.data}: {run.data.num_train} images, {run.data.num_classes} classes, "
            f"{cfg.epochs} epochs"
        )
    return train(run, log=log)
