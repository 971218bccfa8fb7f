"""The run's ``Accelerator`` (mixed precision, device, processes, the collective timeout) and its
experiment trackers."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from dhkd_pipe.config import PRECISIONS
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.interrupts import collective_timeout
from dhkd_pipe.training.run_folder import TRACKING_DIR

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dhkd_pipe.config import TrainConfig


def make_accelerator(precision: str, log_with: str | None = None, project_dir: str | None = None) -> Accelerator:
    """The run's ``Accelerator``; ``log_with`` (comma-separated tracker names) is checked first.

    Accelerate keeps one ``AcceleratorState`` per process and refuses a second ``Accelerator`` with
    another mixed precision. A process that runs several stages (a ``no`` teacher, then ``bf16``
    students: the quickstart, a benchmark, a notebook) gets a fresh ``AcceleratorState`` here
    instead, when no distributed process group is active; the ``PartialState`` (device, process
    group) is kept. The earlier run's ``Accelerator`` shares that state, so it is not to be used
    after this. Under ``accelerate launch`` (a live process group) the state is left alone and a
    different precision is a user error."""
    from accelerate import Accelerator

    if precision not in PRECISIONS:
        raise DhkdError(f"bad precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    cpu = not torch.cuda.is_available()
    if cpu and precision == "fp16":
        raise DhkdError("--precision fp16 needs a GPU; use bf16 or no on the CPU")
    trackers = tracker_names(log_with)
    timeout = collective_timeout()
    _fresh_state_for(precision)
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    # applies where this Accelerator starts the process group (the first of the process)
    process_group = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout))
    return Accelerator(
        mixed_precision=precision,
        cpu=cpu,
        log_with=trackers or None,
        project_dir=project_dir,
        kwargs_handlers=[process_group],
    )


def _fresh_state_for(precision: str) -> None:
    """Resets Accelerate's ``AcceleratorState`` (not its ``PartialState``) when an earlier
    ``Accelerator`` of this process set another mixed precision and no process group is active."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state  # the per-process dict (Accelerate's SharedDict storage)
    initialized = bool(state) and state != PartialState._shared_state  # AcceleratorState.initialized
    if not initialized or state.get("_mixed_precision") == precision:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise DhkdError(
            f"--precision {precision}: this process already trains with precision {state.get('_mixed_precision')} "
            "in a distributed launch, and Accelerate cannot change it there; "
            "give every stage of one launch the same --precision"
        )
    AcceleratorState._reset_state(reset_partial_state=False)


# pip names of trackers whose package is not named like the tracker
_TRACKER_PACKAGES = {"comet_ml": "comet-ml", "tensorboard": '"dhkd-pipe[tensorboard]" (or tensorboard)'}


def tracker_names(log_with: str | None) -> list[str]:
    """Accelerate's tracker names in ``log_with``; a DhkdError names an unknown tracker or one
    whose package is missing (Accelerate itself would silently log nothing)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [n.strip() for n in (log_with or "").split(",") if n.strip()]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LoggerType.list():
            raise DhkdError(f"unknown tracker {name!r} for --log-with; choose from: {', '.join(LoggerType.list())}")
        if name != "all" and name not in available:
            raise DhkdError(
                f"--log-with {name}: the {name} package is not installed; "
                f"pip install {_TRACKER_PACKAGES.get(name, name)}"
            )
    return names


TRACKING_PROJECT = TRACKING_DIR  # trackers write under RUN/dhkd-pipe (TensorBoard) or this project (wandb, ...)


def start_tracking(acc: Accelerator, cfg: TrainConfig):
    """Opens the trackers (if any) with the run's config as hyper-parameters."""
    if not acc.log_with:
        return
    # TensorBoard's hparams take scalars and strings only
    config = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in cfg.to_dict().items()}
    run_name = os.path.basename(os.path.normpath(cfg.out))
    acc.init_trackers(TRACKING_PROJECT, config=config, init_kwargs={"wandb": {"name": run_name}})


def end_tracking(acc: Accelerator):
    """Closes the trackers. Not ``end_training``: that also destroys the process group, which a
    process running several stages (quickstart, bench, tests) still needs."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers = []
