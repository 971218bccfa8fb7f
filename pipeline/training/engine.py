"""The training engine: one loop for teachers, online and cached distillation, one run or several
from one pass.

The loop is data, forward, loss, backward, step, log; checkpoints, validation, schedules and the
run directory are small functions it calls (``training.epoch_end``). What a run is set up with is
a ``Run`` (``training.run``); what changes as it trains is its ``Progress`` (``training.state``),
which the checkpoint holds. The only difference between online and cached distillation is where
``batch.teacher`` comes from: the store (``StoreEpochs``), or the teacher run on the batch here.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable

import torch

from dhkd_pipe.console import log_line
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.interrupts import Interrupted, deferred, pending
from dhkd_pipe.methods.feature_methods import is_feature_method
from dhkd_pipe.training.accelerator import end_tracking, start_tracking
from dhkd_pipe.training.epoch_end import end_epoch, finish, lr_at
from dhkd_pipe.training.grad_align import aligned_backward
from dhkd_pipe.training.run import Run
from dhkd_pipe.training.state import rng_state, save_training_state, set_rng_state

__all__ = ["train", "train_runs", "Trainee", "train_step"]


def train_step(run: Run, batch, epoch: int, step: int = 0) -> dict[str, torch.Tensor] | None:
    """Forward, loss, backward, optimizer step on one batch; returns the method's named loss terms
    (``ce``, ``kd``, ..., ``total``), still attached to the graph, or None when the step was
    skipped for a non-finite loss (``--max-nonfinite``: no optimizer step).

    With ``cfg.grad_align`` the two objectives' parameter gradients (``terms["ce"]``,
    ``terms["kd"]``) are aligned as published (``dhkd_pipe.training.grad_align``) instead of back-propagating
    ``terms["total"]``.
    """
    acc, model, optimizer = run.accelerator, run.model, run.optimizer
    guard = run.guard
    # a skipped step must leave the model as it was: the forward pass moves BatchNorm's running
    # statistics, so they are kept aside first (small: two numbers per channel)
    buffers = [b.detach().clone() for b in model.buffers()] if guard is not None and guard.skipping else None
    with acc.autocast():
        terms, online = _loss_terms(run, batch, epoch)
    if guard is not None:
        if guard.skipping:
            if guard.skip(terms["total"], online, acc, epoch, step):
                with torch.no_grad():
                    for b, saved in zip(model.buffers(), buffers, strict=True):
                        b.copy_(saved)
                return None
        else:
            guard.observe(terms["total"], online)
    optimizer.zero_grad(set_to_none=True)
    if run.cfg.grad_align:
        aligned_backward(terms["ce"], terms["kd"], model.parameters(), acc)
    else:
        acc.backward(terms["total"])
    optimizer.step()
    return terms


def _loss_terms(run: Run, batch, epoch: int):
    """(the method's named loss terms of the batch, the online teacher's logits or None)."""
    if is_feature_method(run.method):  # online only: the teacher's taps, then the student through the connector
        from dhkd_pipe.models.feature_taps import forward_taps

        with torch.no_grad():
            teacher, teacher_taps = forward_taps(run.teacher, batch.images)
        outputs, feature_loss = run.model(batch.images, teacher_taps)
        return run.method.terms(outputs, batch.labels, teacher, None, epoch, feature_loss=feature_loss), teacher
    outputs = run.model(batch.images)
    teacher, online = batch.teacher, None
    if teacher is None and run.teacher is not None:
        with torch.no_grad():
            teacher = online = run.teacher(batch.images)
    return run.method.terms(outputs, batch.labels, teacher, batch.teacher_scale, epoch), online


StepCallback = Callable[[int, int], None]  # (epoch, step) after each training step
# (run, epoch) after each epoch's end of each run still training; True stops that run there (a
# study's pruner: its folder keeps the epoch's checkpoint) while the others go on
EpochCallback = Callable[[Run, int], bool]


def train(run: Run, log=log_line, on_step_end: StepCallback | None = None) -> dict:
    """Runs the loop from the run's progress to ``cfg.epochs``; returns the summary, or
    ``{"stopped_at": ...}`` when ``--max-steps`` stopped it first. ``on_step_end(epoch, step)``
    is called after every step (a benchmark's clock). The loop of ``train_runs``, with one run.

    Whatever way it ends, the run folder's lock is released; a run that fails before its first
    checkpoint leaves no folder it created behind.
    """
    return train_runs([run], log, on_step_end)[0]


def train_runs(
    runs: list[Run],
    log=log_line,
    on_step_end: StepCallback | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> list[dict | DhkdError]:
    """Trains several runs from one pass over their shared loader (``runs[0].loader``): each batch
    is rendered and its logits read once, then every run takes its step on it (``Trainee``).
    Returns each run's summary, its ``{"stopped_at": ...}``, its ``{"pruned_at": {"epoch": e}}``
    where ``on_epoch_end`` stopped it after (0-based) epoch e, or (several runs only) the DhkdError
    that stopped it alone while the others went on; one run's error is raised, as it always was.
    Every run folder is released however the pass ends."""
    trainees = [Trainee(run, shared=len(runs) > 1) for run in runs]
    try:
        results = _train(trainees, log, on_step_end, on_epoch_end)
    except BaseException:
        for t in trainees:
            if t.error is None:
                end_tracking(t.run.accelerator)
                t.run.close(failed=True)
        raise
    for t in trainees:
        if t.error is None:
            end_tracking(t.run.accelerator)
            t.run.close()
    return results


class Trainee:
    """A run's place in a pass: its own random generators (swapped in for its steps when the pass
    is ``shared``, so dropout draws what it would alone), its steps done, and how it ended."""

    def __init__(self, run: Run, shared: bool):
        self.run, self.shared = run, shared
        self.name = os.path.basename(os.path.normpath(run.cfg.out))
        self.generators = run.generators
        self.steps_done = 0  # steps of this invocation (--max-steps counts them)
        self.skip = 0  # steps of the current epoch done before this invocation
        self.error: DhkdError | None = None  # what stopped it alone (a non-finite loss)
        self.stopped_at: dict | None = None  # where --max-steps stopped it
        self.pruned_at: dict | None = None  # the epoch after which on_epoch_end stopped it

    @property
    def training(self) -> bool:
        return self.error is None and self.stopped_at is None and self.pruned_at is None

    @contextmanager
    def turn(self, log):
        """Its generators in place while inside; in a shared pass its DhkdError stops it alone."""
        device = self.run.accelerator.device
        if self.shared:
            set_rng_state(self.generators, device)
        try:
            yield
        except DhkdError as e:
            if not self.shared:
                raise
            self.error = e
            end_tracking(self.run.accelerator)
            self.run.close(failed=True)
            log(f"{self.name}: stopped alone, the others go on: {e}")
        finally:
            if self.shared:
                self.generators = rng_state(device)

    def begin_epoch(self, epoch: int):
        run = self.run
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(run.cfg, epoch)
        self.skip = run.progress.begin_epoch(epoch, 1 + len(run.method.term_names), run.accelerator.device)

    def step(self, batch, epoch: int, step: int):
        run, progress = self.run, self.run.progress
        run.guard.step_names[self.steps_done + 1] = (epoch, step)
        progress.tally.add(train_step(run, batch, epoch, step), len(batch.labels), ("total",) + run.method.term_names)
        progress.step, self.steps_done = step + 1, self.steps_done + 1

    def after_step(self, epoch: int, signal: int | None):
        """Checks and checkpoints within the epoch (its end does its own): at a signal, at
        ``--max-steps`` (which stops this run here) and every ``--checkpoint-every`` steps."""
        run, cfg, progress = self.run, self.run.cfg, self.run.progress
        if progress.step == len(run.loader):
            return  # the epoch's end checks, saves and stops
        limit = bool(cfg.max_steps and self.steps_done >= cfg.max_steps)
        save = signal or limit or (cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0)
        if save or self.steps_done % run.guard.CHECK_EVERY == 0:
            run.guard.check(run.accelerator, epoch)  # never save the weights of a non-finite step
        if save:
            save_training_state(run)
        if limit:
            self.stopped_at = {"epoch": epoch, "step": progress.step}

    def end_epoch(self, epoch: int, log):
        cfg = self.run.cfg
        end_epoch(self.run, epoch, (lambda line: log(f"{self.name}: {line}")) if self.shared else log)
        if cfg.max_steps and self.steps_done >= cfg.max_steps and epoch + 1 < cfg.epochs:
            self.stopped_at = {"epoch": epoch, "step": len(self.run.loader)}


def _train(
    trainees: list[Trainee], log, on_step_end: StepCallback | None, on_epoch_end: EpochCallback | None = None
) -> list[dict | DhkdError]:
    first = trainees[0].run
    acc, loader, epochs = first.accelerator, first.loader, first.cfg.epochs
    started = time.perf_counter()
    for t in trainees:
        start_tracking(t.run.accelerator, t.run.cfg)
        t.run.model.train()

    def each(group: list[Trainee], action, *args):
        """``action(t, *args)`` for each trainee still training, in its turn."""
        for t in group:
            if t.training:
                with t.turn(log):
                    action(t, *args)

    # one process: a signal stops the run at the next step, with a checkpoint there (interrupts.py)
    with deferred(enabled=acc.num_processes == 1):
        for epoch in range(min(t.run.progress.epoch for t in trainees), epochs):
            active = [t for t in trainees if t.training and t.run.progress.epoch <= epoch]
            each(active, Trainee.begin_epoch, epoch)
            active = [t for t in active if t.training]
            if not active:
                continue
            skip = min(t.skip for t in active)
            bar = _progress_bar(len(loader) - skip, f"epoch {epoch + 1}/{epochs}", acc.is_main_process)
            for step, batch in enumerate(loader.epoch(epoch, skip), start=skip):
                due = [t for t in active if t.training and t.skip <= step]
                each(due, Trainee.step, batch, epoch, step)
                if on_step_end is not None:
                    on_step_end(epoch, step)
                bar.update(1)
                signal = pending()
                each(due, Trainee.after_step, epoch, signal)
                if signal and step + 1 < len(loader):
                    bar.close()
                    _interrupted(trainees, signal, f"at epoch {epoch + 1}, step {step + 1}")
                if not any(t.training for t in active):
                    break  # every run stopped (--max-steps) or failed: no more batches
            bar.close()
            each(active, Trainee.end_epoch, epoch, log)
            if on_epoch_end is not None:
                for t in active:
                    if t.training and on_epoch_end(t.run, epoch):
                        t.pruned_at = {"epoch": epoch}
            signal = pending()
            if signal:
                _interrupted(trainees, signal, f"after epoch {epoch + 1}")
    acc.wait_for_everyone()
    wall = time.perf_counter() - started
    results = []
    for t in trainees:
        summary = None
        if t.training:
            with t.turn(log):
                summary = finish(t.run, wall)
        ended = {"pruned_at": t.pruned_at} if t.pruned_at is not None else {"stopped_at": t.stopped_at}
        results.append(summary if summary is not None else t.error or ended)
    return results


def _interrupted(trainees: list[Trainee], signal: int, where: str):
    """The early exit at a signal, every run's state saved: raises ``Interrupted``."""
    trainees[0].run.accelerator.wait_for_everyone()
    saved = (
        f"its state is saved in {trainees[0].run.cfg.out}"
        if len(trainees) == 1
        else "every student's state is saved in its folder"
    )
    raise Interrupted(signal, f"{where}: {saved}; continue with --resume")


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or None, leave=False, dynamic_ncols=True, file=sys.stderr)
