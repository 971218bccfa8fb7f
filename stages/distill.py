"""``dhkd-pipe distill``: a student from a teacher, online (teacher run every step) or from a
stage-1 store (``--cache``); one code path, only the source of the teacher logits differs.
``distill_students``: several students from one pass over a store (``dhkd_pipe.training.students``,
``engine.train_runs``); ``distill_sweep``: the same for a sweep (``--student A,B --seeds 0,1``,
``--method kd,dhkd --temperature 1,2``, ``--sweep FILE``: ``dhkd_pipe.training.sweep``)."""

from __future__ import annotations

import os

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.console import log_line
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.training.engine import train, train_runs
from dhkd_pipe.training.run import prepare
from dhkd_pipe.training.run_folder import RunMode
from dhkd_pipe.training.students import StudentPlan, check_pass, prepare_pass
from dhkd_pipe.training.sweep import SweptRun, check_memory, write_sweep_index


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


def distill_sweep(
    runs: list[SweptRun], *, mode: RunMode | str = RunMode.NEW, memory_limit: float | None = None, log=log_line
) -> dict[str, dict | DhkdError]:
    """``dhkd-pipe distill --cache STORE`` with several runs (``--student A,B``, ``--seeds 0,1``,
    several values of an option that sweeps, ``--sweep FILE``; ``training.sweep.sweep_runs``):
    checks the pass and its memory (``check_memory``, ``memory_limit`` GiB overriding the device's)
    before any folder is created, trains every run from one pass, and records the runs and how
    each ended in OUT/sweep.json. Returns each run folder's summary or the DhkdError that stopped
    it alone."""
    from dhkd_pipe.data.replay import open_store

    cfgs = [r.cfg for r in runs]
    check_pass(cfgs)
    replay = open_store(cfgs[0].cache, cfgs[0].data)
    estimate = check_memory(cfgs, replay.resolution, replay.num_classes, memory_limit)
    planned = prepare_pass([StudentPlan(c, mode) for c in cfgs], replay=replay)
    out = os.path.dirname(os.path.normpath(cfgs[0].out))
    first = planned[0]
    if first.accelerator.is_main_process:  # the main process alone writes (and logs): the others would race it
        log(f"{len(runs)} runs in one pass; estimated memory {estimate.text()}")
        write_sweep_index(out, runs, {})
        log(
            f"distilling {len(runs)} runs from {first.cfg.cache} in one pass (each batch rendered and its logits "
            f"read once): {', '.join(r.name for r in runs)}; {first.cache.epochs} stored view-epochs, "
            f"{first.cfg.epochs} epochs"
        )
    results = train_runs(planned, log=log)
    if first.accelerator.is_main_process:
        write_sweep_index(out, runs, dict(zip((r.name for r in runs), results, strict=True)))
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
