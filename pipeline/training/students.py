"""Several students from one loader pass: their options (``--student A,B``, ``--seeds``), the checks
that refuse a pass they cannot share, and the set-up. Each student is a whole run of its own
(``run.Run``: its accelerator, model, optimizer, run folder, metrics, checkpoint and export);
what they share is the store's replay and one loader, so the options that shape the loader must
agree (``SHARED``). ``engine.train_runs`` then trains them from one pass: each batch rendered and
its logits read once, then fed to every student in turn, each with its own random generators, so
on the in-memory path every student's final parameters are bit-identical to its solo run.

A student whose loss is not finite stops alone (its folder keeps its last checkpoint, as a solo
run's would) and the pass goes on. A signal stops the pass after the current step with every
student's state saved, and resuming continues each from its own checkpoint: students at different
points (one finished, one stopped earlier) are fed only the batches they have not trained on.
Under several processes every rank steps the students in the same order, and a failure is agreed
through the non-finite guard's collectives, so all ranks drop the same student at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.store.targets import RUN_IN_STORE, check_outside_folders
from dhkd_pipe.training.run_folder import RunMode

# TrainConfig fields that shape the loader or the pass, so every student of a pass has the same
SHARED = ("cache", "data", "epochs", "batch_size", "precision", "workers", "channels_last", "max_steps", "resolution")


@dataclass
class StudentPlan:
    """One student of a pass: its config, and whether its run folder is new, resumed or overwritten."""

    cfg: TrainConfig
    mode: RunMode | str = RunMode.NEW


def int_list(flag: str, text: str | None) -> list[int] | None:
    """``text`` (``0,1,2``) as distinct integers; None where the option was not given."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DhkdError(f"{flag} takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise DhkdError(f"{flag} needs distinct integers, e.g. 0,1,2; got {text!r}")
    return values


def seed_list(seeds: str | None, seed: int | None) -> list[int] | None:
    """``--seeds 0,1,2`` as integers; refused beside ``--seed``."""
    values = int_list("--seeds", seeds)
    if values is not None and seed is not None:
        raise DhkdError("give --seed (one run) or --seeds (several), not both")
    return values


def check_pass(cfgs: list[TrainConfig]) -> None:
    """Refuses a pass its students cannot share: no store, loader options that differ, one folder
    twice, a folder inside the store."""
    if not cfgs:
        raise DhkdError("no students to train")
    if len(cfgs) > 1 and not all(cfg.cache for cfg in cfgs):
        raise DhkdError("several students train from one pass over a stage-1 store: give --cache STORE")
    first = cfgs[0]
    for cfg in cfgs[1:]:
        for name in SHARED:
            if getattr(cfg, name) != getattr(first, name):
                raise DhkdError(
                    f"the students of one pass share its loader, so {name} must be the same: "
                    f"{getattr(first, name)!r} for {first.out}, {getattr(cfg, name)!r} for {cfg.out}"
                )
    for cfg in cfgs:  # before any student's folder is made
        check_outside_folders(cfg.out, {"--cache": cfg.cache}, RUN_IN_STORE)
    outs = [cfg.out for cfg in cfgs]
    twice = sorted({o for o in outs if outs.count(o) > 1})
    if twice:
        raise DhkdError(f"two students would share the run folder {twice[0]}: give each its own --out")


def prepare_pass(plans: list[StudentPlan], replay=None):
    """Prepares every student's run (``run.prepare``) around one store replay (``replay``, by
    default the store opened here) and one loader, which streams the logits if any student's
    method needs them. Returns the runs, for
    ``engine.train_runs``. A student that cannot be prepared releases the runs prepared before it
    (folders they created are removed) and raises."""
    from dhkd_pipe.data.inference import memory_format
    from dhkd_pipe.data.replay import open_store
    from dhkd_pipe.methods.registry import from_config
    from dhkd_pipe.training.accelerator import make_accelerator
    from dhkd_pipe.training.run import prepare, process_loader

    cfgs = [plan.cfg for plan in plans]
    check_pass(cfgs)
    first, runs = cfgs[0], []
    loader = None
    if first.cache:
        replay = replay or open_store(first.cache, first.data)
        slot = make_accelerator(first.precision)  # the process's slot, set up as each student's run will see it
        needs_teacher = any(from_config(c).needs_teacher for c in cfgs)
        loader = process_loader(replay, first, slot, needs_teacher, memory_format(first, slot.device))
    try:
        for plan in plans:
            runs.append(prepare(plan.cfg, plan.mode, replay=replay, loader=loader))
    except BaseException:
        for run in runs:
            run.close(failed=True)
        raise
    return runs
