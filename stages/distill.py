"""``dhkd-pipe distill``: a student from a teacher, online (teacher run every step) or from a
stage-1 store (``--cache``); one code path, only the source of the teacher logits differs."""

from __future__ import annotations

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.console import log_line
from dhkd_pipe.engine import prepare, train
from dhkd_pipe.run_folder import RunMode


def distill(cfg: TrainConfig, *, mode: RunMode | str = RunMode.NEW, log=log_line) -> dict:
    run = prepare(cfg, mode)
    if run.accelerator.is_main_process:
        if run.cache is not None:
            views = run.cache.epochs
            log(
                f"distilling {cfg.model} ({cfg.method}) from {cfg.cache}: {views} stored view-epochs; "
                f"{cfg.epochs} epochs replay view-epoch k mod {views}, so the run sees "
                f"{min(cfg.epochs, views)} distinct views of each image"
            )
        elif run.teacher is not None:
            log(f"distilling {cfg.model} ({cfg.method}) online from {cfg.teacher}: the teacher runs every step")
        else:
            log(f"training {cfg.model} alone ({cfg.method})")
    return train(run, log=log)
