"""``dhkd-pipe tune``: an Optuna study over the options that sweep, K trials at a time in one pass
over a stage-1 store (``training.sweep``'s machinery: one loader, each trial a run of its own).

Each trial reports its validation top-1 at every epoch's end (``trial.report``, step = the epoch
number); a trial the pruner prunes stops there (its folder keeps that epoch's checkpoint) while the
rest of the pass goes on, and its slot takes a new trial at the next pass. A trial ends in Optuna's
states: COMPLETE with its final top-1, PRUNED, or FAIL (a loss that is not finite, options its
method refuses, a killed process): pruned and failed trials are never results.

The study lives in Optuna's storage: SQLite in ``--out`` (``study.db``) by default, a database URL
for tune processes on several machines (Optuna's distributed mode): each asks the storage for its
trials, so several processes share one study, and together they stop at ``--trials`` ended trials.
A running trial records a heartbeat; one silent for twice ``--heartbeat`` seconds (its process was
killed) is marked FAIL by the next tune that looks, and a copy with the same parameters is queued
(Optuna's ``RetryHeartbeatStaleTrialCallback``); the tune that takes the copy resumes the killed
trial's run folder from its last checkpoint, so a kill costs at most the epoch in progress, and the
copy reports the epochs the folder holds. A
signal stops a tune the same way, its trials failed and queued at once. ``DIR/study.json``
names the study and its storage for ``dhkd-pipe report DIR`` (``stages.leaderboard``).
"""

from __future__ import annotations

import dataclasses
import os
import time

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.config.tuning import TuneOptions
from dhkd_pipe.config.values import short_repr
from dhkd_pipe.console import log_line
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.training.study import (
    distributions,
    grid_points,
    open_storage,
    pruner,
    queue_grid,
    quiet_optuna,
    read_space,
    recorded,
    sampler,
)
from dhkd_pipe.training.sweep import check_memory

STUDY_FILE = "study.json"
STUDY_DB = "study.db"


def storage_url(cfg: TrainConfig, opts: TuneOptions) -> str:
    return opts.storage or "sqlite:///" + os.path.join(os.path.abspath(cfg.out), STUDY_DB)


def tune(cfg: TrainConfig, opts: TuneOptions, log=log_line, memory_limit: float | None = None) -> dict:
    """Runs the study (module docstring) until it has ``opts.trials`` ended trials; returns its
    summary. Each pass's memory is checked as a sweep's is (``check_memory``; ``memory_limit`` GiB
    overrides the device's free memory, 0 skips the check)."""
    with quiet_optuna():
        return _tune(cfg, opts, log, memory_limit)


def _tune(cfg: TrainConfig, opts: TuneOptions, log, memory_limit: float | None) -> dict:
    import optuna
    from optuna.trial import TrialState

    from dhkd_pipe.data.replay import open_store
    from dhkd_pipe.files import write_json

    if not cfg.cache:
        raise DhkdError("tune trains its trials from one pass over a stage-1 store: give --cache STORE")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a pruning decision is one process's, never agreed across ranks
        raise DhkdError(
            "tune runs in one process per worker: start several tune processes on one --storage instead of "
            "accelerate launch"
        )
    space = read_space(opts.space)
    if cfg.val_every != 1:
        log(f"tune validates every epoch (the pruner needs each epoch's top-1): --val-every {cfg.val_every} ignored")
        cfg = dataclasses.replace(cfg, val_every=1)
    points = grid_points(space) if opts.sampler == "grid" else None
    replay = open_store(cfg.cache, cfg.data)
    os.makedirs(cfg.out, exist_ok=True)
    url = storage_url(cfg, opts)
    storage = open_storage(url, opts.heartbeat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=opts.study_name,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=sampler(opts),
        pruner=pruner(opts, cfg.epochs),
    )
    if points is not None:
        queue_grid(study, points, opts.trials)
    write_json(
        os.path.join(cfg.out, STUDY_FILE),
        {"kind": "study", "study_name": opts.study_name, "storage": recorded(opts.storage), "space": space},
    )
    dists, started = distributions(space), time.perf_counter()
    passes = 0
    while True:
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        ended = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if ended >= opts.trials:
            break
        failed = [t for t in trials if t.state == TrialState.FAIL and "reason" in t.user_attrs]
        if len(failed) >= opts.trials:
            raise DhkdError(f"{len(failed)} trials failed, the last: {failed[-1].user_attrs['reason']}")
        slots = min(opts.per_pass, opts.trials - ended - running)
        if slots <= 0:  # other processes' trials (or a killed one's, until its heartbeat is stale)
            time.sleep(min(opts.heartbeat, 5))
            continue
        asked = []
        for _ in range(slots):
            study.sampler = sampler(opts, len(study.get_trials(deepcopy=False)))
            asked.append(study.ask(dists))
        for trial in asked:  # at once: a trial without a heartbeat would never be found stale if this process dies
            storage.record_heartbeat(trial._trial_id)  # Optuna's ask-and-tell trials expose no public id
        passes += 1
        log(f"pass {passes}: trials {', '.join(str(t.number) for t in asked)} ({ended} of {opts.trials} ended)")
        _train_pass(study, storage, asked, cfg, replay, opts, log, memory_limit)
    return summary(study, cfg.epochs, time.perf_counter() - started, opts.trials)


def _frozen(study, number: int):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _trial_run(trial, cfg: TrainConfig, study):
    """A trial's config and run mode: its own folder ``trial-NNNN``, or, for a re-queued copy of a
    killed trial, the killed trial's folder, resumed."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from dhkd_pipe.training.run_folder import CHECKPOINT, RunMode

    folder = os.path.join(cfg.out, f"trial-{trial.number:04d}")
    mode = RunMode.NEW
    original = RetryHeartbeatStaleTrialCallback.retried_trial_number(_frozen(study, trial.number))
    if original is not None:
        folder = _frozen(study, original).user_attrs.get("folder", folder)
        if os.path.isfile(os.path.join(folder, CHECKPOINT)):
            mode = RunMode.RESUME
        elif os.path.isdir(folder):  # killed before its first checkpoint: nothing to resume
            mode = RunMode.OVERWRITE
    trial.set_user_attr("folder", folder)
    run_cfg = dataclasses.replace(cfg, **trial.params, out=folder).validate()
    return run_cfg, mode


def _train_pass(study, storage, asked, cfg: TrainConfig, replay, opts: TuneOptions, log, memory_limit):
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from dhkd_pipe.interrupts import Interrupted
    from dhkd_pipe.training.engine import train_runs
    from dhkd_pipe.training.students import StudentPlan, prepare_pass

    plans, trials = [], []
    for trial in asked:
        try:
            run_cfg, mode = _trial_run(trial, cfg, study)
        except DhkdError as e:  # options its method refuses: a failed trial, never a result
            trial.set_user_attr("reason", str(e))
            study.tell(trial, state=TrialState.FAIL)
            log(f"trial {trial.number} failed: {e}")
            continue
        plans.append(StudentPlan(run_cfg, mode))
        trials.append(trial)
    if not plans:
        return
    try:
        check_memory([p.cfg for p in plans], replay.resolution, replay.num_classes, memory_limit)
        runs = prepare_pass(plans, replay=replay)
    except DhkdError as e:
        for trial in trials:
            trial.set_user_attr("reason", str(e))
            study.tell(trial, state=TrialState.FAIL)
        raise
    by_run = {id(run): trial for run, trial in zip(runs, trials, strict=True)}
    for run, trial in zip(runs, trials, strict=True):  # a resumed copy: the epochs its folder holds
        reported = _frozen(study, trial.number).intermediate_values
        for h in run.progress.history:
            if h.get("val_top1") is not None and h["epoch"] not in reported:
                trial.report(h["val_top1"], h["epoch"])
    beat = [time.monotonic()]  # every trial's first heartbeat was recorded as it was asked

    def heartbeat(epoch: int, step: int):
        if time.monotonic() - beat[0] >= opts.heartbeat / 2:
            beat[0] = time.monotonic()
            for trial in trials:
                storage.record_heartbeat(trial._trial_id)

    def report(run, epoch: int) -> bool:
        trial = by_run[id(run)]
        top1 = run.progress.history[-1].get("val_top1")
        if top1 is None:
            return False
        trial.report(top1, epoch + 1)
        storage.record_heartbeat(trial._trial_id)
        if epoch + 1 < cfg.epochs and trial.should_prune():
            log(f"trial {trial.number}: pruned after epoch {epoch + 1} (top-1 {top1:.2f}%)")
            return True
        return False

    try:
        results = train_runs(runs, log=log, on_step_end=heartbeat, on_epoch_end=report)
    except Interrupted:  # each trial's state is saved: failed now and re-queued, the next tune resumes it
        retry = RetryHeartbeatStaleTrialCallback(max_retry=2, inherit_intermediate_values=True)
        for trial in trials:
            study.tell(trial, state=TrialState.FAIL)
            retry(study, _frozen(study, trial.number))
        raise
    for trial, result in zip(trials, results, strict=True):
        if isinstance(result, DhkdError):
            trial.set_user_attr("reason", str(result))
            study.tell(trial, state=TrialState.FAIL)
        elif "pruned_at" in result:
            study.tell(trial, state=TrialState.PRUNED)
        elif result.get("val_top1") is None:
            trial.set_user_attr("reason", f"ended without a final top-1: {short_repr(result)}")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, result["val_top1"])


def summary(study, epochs: int, wall: float, goal: int) -> dict:
    """The study's best trial, its trials by state, and the epochs trained against every ended trial run to the end."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    ended = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    trained = sum(max(t.intermediate_values, default=0) for t in ended)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value, default=None)
    return {
        "study": study.study_name,
        "trials": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState},
        "goal": goal,
        "best": None if best is None else {"trial": best.number, "val_top1": best.value, "params": best.params},
        "epochs_trained": trained,
        "epochs_to_the_end": len(ended) * epochs,
        "epochs_saved_by_pruning": len(ended) * epochs - trained,
        "wall_time": wall,
    }


def study_entries(folder: str) -> tuple[list[str], list[dict], dict]:
    """(the searched options, one leaderboard entry per trial, what the study is) of a tune folder,
    from its ``study.json`` and the study's storage: each trial's curve is the top-1 it reported."""
    import json

    with quiet_optuna():
        import optuna
        from optuna.trial import TrialState

    try:
        with open(os.path.join(folder, STUDY_FILE)) as f:
            about = json.load(f)
        name = about["study_name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DhkdError(f"{folder}/{STUDY_FILE} is not a study's record: {' '.join(str(e).split())[:120]}") from None
    url = about.get("storage") or "sqlite:///" + os.path.join(os.path.abspath(folder), STUDY_DB)
    if "***" in url:
        raise DhkdError(f"the study's storage {url} needs its password, which {STUDY_FILE} does not record")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with quiet_optuna():
            study = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise DhkdError(f"the storage {url} holds no study {name!r}") from None
    status = {
        TrialState.COMPLETE: "finished",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "queued",
    }
    entries = []
    for t in study.get_trials(deepcopy=False):
        curve = sorted(t.intermediate_values.items())
        reason = t.user_attrs.get("reason")
        state = status[t.state]
        if state == "failed" and reason and "not finite" in reason:
            state = "not finite"
        entries.append(
            {
                "run": f"trial-{t.number:04d}",
                "options": dict(t.params),
                "status": state,
                "reason": reason,
                "epochs": len(curve),
                # a pruned trial's last report, shown as what it reached; a failed one has none
                "top1": t.value
                if t.state == TrialState.COMPLETE
                else (curve[-1][1] if curve and t.state == TrialState.PRUNED else None),
                "best_top1": max((v for _, v in curve), default=None),
                "curve": curve,
            }
        )
    return list(about.get("space") or {}), entries, {"kind": "study", "study_name": name, "folder": folder}
