"""``dhkd-pipe distill``: a student from a teacher, online (teacher run every step) or from a
stage-1 store (``--cache``); one code path, only the source of the teacher logits differs.
``distill_students``: several students from one pass over a store (``dhkd_pipe.training.students``,
``engine.train_runs``); ``distill_several``: the same for ``--student A,B --seeds 0,1``."""

from __future__ import annotations

import os

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.console import log_line
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.training.engine import train, train_runs
from dhkd_pipe.training.run import prepare
from dhkd_pipe.training.run_folder import RunMode
from dhkd_pipe.training.students import StudentPlan, prepare_pass, student_configs


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


def distill_students(plans: list[StudentPlan], log=log_line) -> list[dict | DhkdError]:
    """Trains every planned student from one pass over their store; returns, in plan order, each
    one's summary (as ``distill`` returns it) or the DhkdError that stopped it alone."""
    runs = prepare_pass(plans)
    first = runs[0]
    if first.accelerator.is_main_process:
        who = ", ".join(f"{_name(r)} ({r.cfg.model}, {r.cfg.method}, seed {r.cfg.seed})" for r in runs)
        log(
            f"distilling {len(runs)} students from {first.cfg.cache} in one pass (each batch rendered and its logits "
            f"read once): {who}; {first.cache.epochs} stored view-epochs, {first.cfg.epochs} epochs"
        )
    return train_runs(runs, log=log)


def distill_several(
    cfg: TrainConfig, students: list[str], seeds: list[int] | None, *, mode: RunMode | str = RunMode.NEW, log=log_line
) -> dict[str, dict | DhkdError]:
    """``dhkd-pipe distill --student A,B --seeds 0,1``: every student with every seed from one pass
    (``student_configs``); returns each run folder's summary or the DhkdError that stopped it alone."""
    cfgs = student_configs(cfg, students, seeds)
    results = distill_students([StudentPlan(c, mode) for c in cfgs], log=log)
    return {c.out: r for c, r in zip(cfgs, results, strict=True)}


def check_finished(results: dict[str, dict | DhkdError]) -> None:
    """Raises one line naming the students of a pass that stopped alone, if any did."""
    failed = [(out, r) for out, r in results.items() if isinstance(r, DhkdError)]
    if failed:
        raise DhkdError(
            f"{len(failed)} of {len(results)} students stopped, the others finished: "
            + "; ".join(f"{out}: {error}" for out, error in failed)
        )


def _name(run) -> str:
    return os.path.basename(os.path.normpath(run.cfg.out))
