"""The training engine: one loop for teachers, online and cached distillation.

The loop is data, forward, loss, backward, step, log; checkpoints, validation, schedules and the
run directory are small functions it calls. What a run is set up with is a ``Run``; what changes
as it trains is its ``Progress`` (``training_state.py``), which the checkpoint holds. The only
difference between online and cached distillation is where ``batch.teacher`` comes from: the
store (``StoreEpochs``), or the teacher run on the batch here.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.console import log_line
from dhkd_pipe.data.datasets import Dataset, Renderer
from dhkd_pipe.data.inference import evaluate, memory_format
from dhkd_pipe.data.loader import PlanEpochs, ViewLoader
from dhkd_pipe.data.views import ViewPlan
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.interrupts import Interrupted, deferred, pending
from dhkd_pipe.methods.registry import CACHE_REFUSAL, Method, from_config, is_feature_method
from dhkd_pipe.training.accelerator import end_tracking, make_accelerator, start_tracking
from dhkd_pipe.training.exported import write_exported
from dhkd_pipe.training.grad_align import aligned_backward
from dhkd_pipe.training.nonfinite import NonFiniteGuard
from dhkd_pipe.training.run_folder import (
    METRICS,
    SUMMARY,
    RunFolder,
    RunMode,
    append_line,
    check_inputs_outside,
    check_out,
    metrics_line,
    write_json,
)
from dhkd_pipe.training.state import Progress, restore_training_state, rng_state, save_training_state, set_rng_state

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dhkd_pipe.data.replay import StoreReplay
    from dhkd_pipe.store.reader import LogitCache

__all__ = ["Run", "prepare", "train", "train_runs", "Trainee", "train_step", "lr_at", "metric_names"]


@dataclass
class Run:
    """What a prepared run is set up with; everything is checked before the run folder is touched.
    What changes as it trains is ``progress``."""

    cfg: TrainConfig
    accelerator: Accelerator
    method: Method
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: ViewLoader | None = None  # its ``epochs`` is an EpochSource: PlanEpochs or StoreEpochs
    renderer: Renderer | None = None
    data: Dataset | None = None
    data_spec: str | None = None  # the data set trained on (--data, or the store's)
    plan: ViewPlan | None = None
    teacher: torch.nn.Module | None = None  # online distillation's frozen teacher
    cache: LogitCache | None = None
    folder: RunFolder | None = None  # the locked run folder (main process)
    progress: Progress = field(default_factory=Progress)
    guard: NonFiniteGuard | None = None  # --max-nonfinite; None: every step is taken
    generators: dict | None = None  # this process's random generators as prepare left them (rng_state)

    def close(self, failed: bool = False):
        """Releases the run folder (see ``RunFolder.close``)."""
        if self.folder is not None:
            self.folder.close(failed)
            self.folder = None


def prepare(
    cfg: TrainConfig,
    mode: RunMode | str = RunMode.NEW,
    replay: StoreReplay | None = None,
    loader: ViewLoader | None = None,
) -> Run:
    """Loads and checks data, store, models and weights, then sets up the run folder (``mode``:
    start a new run, resume the one in ``cfg.out``, or overwrite it).

    The store is opened and its loader built through the Python API (``replay.open_store``,
    ``StoreReplay.loader``); ``replay`` and ``loader`` are those of a pass that several students
    share (``dhkd_pipe.training.students``), by default the run's own."""
    from dhkd_pipe.data.datasets import load_data
    from dhkd_pipe.models import check_input_size, create_model, default_weights

    mode = RunMode(mode)
    method = from_config(cfg)
    if cfg.cache and is_feature_method(method):
        raise DhkdError(CACHE_REFUSAL.format(name=method.name))
    online = method.needs_teacher and not cfg.cache
    if online and not cfg.teacher:
        raise DhkdError(
            f"--method {method.name} needs a teacher: --cache STORE, or --teacher NAME [--teacher-weights FILE]"
        )
    if online and not cfg.teacher_weights and default_weights(cfg.teacher) is None:
        raise DhkdError(
            f"--teacher {cfg.teacher} has no published weights (a KD-zoo model): pass --teacher-weights FILE"
        )
    if (cfg.grad_align or cfg.grad_align_features) and not method.dual_head:
        flag = "--grad-align" if cfg.grad_align else "--grad-align-features"
        raise DhkdError(
            f"{flag} aligns head 1's CE with head 2's distillation gradient: only --method dhkd and "
            "dhkd_reviewkd have two heads"
        )
    out_plan = check_out(cfg.out, mode)  # reads only; repeated under the folder's lock
    check_inputs_outside(out_plan, {"--teacher-weights": cfg.teacher_weights, "--cache": cfg.cache, "--data": cfg.data})
    acc = make_accelerator(cfg.precision, cfg.log_with, cfg.out)
    torch.manual_seed(cfg.seed)

    cache = None
    if cfg.cache:  # the store's data, views and preprocessing (and, when the method needs them, its logits)
        from dhkd_pipe.data.replay import open_store

        replay = replay or open_store(cfg.cache, cfg.data)
        cache, data, data_spec, plan = replay.cache, replay.data, replay.data_spec, replay.plan
        if cfg.resolution and cfg.resolution != plan.resolution:
            raise DhkdError(
                f"--resolution {cfg.resolution}: the store {cfg.cache} holds views rendered at {plan.resolution}, "
                f"which stage 2 replays as recorded; drop --resolution, or cache the teacher at {cfg.resolution}"
            )
    else:
        data, data_spec = load_data(cfg.data), cfg.data
        plan = data.default_plan(seed=cfg.seed, resolution=cfg.resolution)

    fmt = memory_format(cfg, acc.device)
    model = create_model(
        cfg.model,
        data.num_classes,
        dual_head=method.dual_head,
        aux_head=cfg.aux_head,
        align_features=cfg.grad_align_features,
    )
    teacher = None
    if online:  # the teacher's weights, and for image folders the preprocessing they were trained with
        from dhkd_pipe.data.teacher import load_teacher

        loaded = load_teacher(cfg.teacher, cfg.teacher_weights, data, plan, acc.device, cfg.resolution, acc, fmt)
        teacher, plan = loaded.model, loaded.plan
    check_input_size(cfg.model, plan.resolution, data.num_classes, "student" if method.needs_teacher else "model")
    if is_feature_method(method):  # the connector trains, checkpoints and reduces with the student
        from dhkd_pipe.methods.connectors import StudentWithConnector

        model = StudentWithConnector(model, method.connector(model, teacher, plan.resolution))
    model.to(memory_format=fmt)
    if loader is None and replay is not None:  # the store's replay, as the Python API hands it out
        loader = replay.loader(
            cfg.batch_size,
            device=acc.device,
            rank=acc.process_index,
            world_size=acc.num_processes,
            workers=cfg.workers,
            with_logits=method.needs_teacher,
            memory_format=fmt,
        )
    elif loader is None:
        loader = ViewLoader(
            PlanEpochs(plan, data),
            data.renderer(acc.device, plan, workers=cfg.workers),
            data.train_labels.to(acc.device),
            cfg.batch_size,
            acc.process_index,
            acc.num_processes,
            memory_format=fmt,
        )
    renderer = loader.renderer
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    run = Run(cfg, acc, method, model, optimizer, loader, renderer, data, data_spec, plan, teacher, cache)
    acc.wait_for_everyone()  # every process has checked --out (check_out) before the main one locks it
    if acc.is_main_process:
        run.folder = RunFolder.open(out_plan, command=_command_line())
    acc.wait_for_everyone()
    try:
        if mode is RunMode.RESUME:
            restore_training_state(run)
        run.model, run.optimizer = acc.prepare(run.model, run.optimizer)
    except BaseException:
        run.close()
        raise
    run.guard = NonFiniteGuard(acc.device, cfg.max_nonfinite, acc.num_processes, run.progress)
    run.generators = rng_state(acc.device)  # seeded, or restored from the checkpoint: what its steps start from
    if cfg.compile:
        # here, not through Accelerate's dynamo_backend: its process-wide state keeps the first
        # Accelerator's setting, so a later run in the same process (bench, quickstart) would not compile
        run.model = torch.compile(run.model)
    return run


def _command_line() -> str:
    return " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300]


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    return cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.lr_milestones)


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
                    for b, saved in zip(model.buffers(), buffers):
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


def metric_names(method: Method) -> list[str]:
    """``metrics.jsonl`` keys of a method's per-epoch mean loss terms: ``train_loss`` (the total),
    then ``train_<term>`` for each named term."""
    return ["train_loss"] + [f"train_{name}" for name in method.term_names]


def metric_names(method: Method) -> list[str]:
    """``metrics.jsonl`` keys of a method's per-epoch mean loss terms: ``train_loss`` (the total),
    then ``train_<term>`` for each named term."""
    return ["train_loss"] + [f"train_{name}" for name in method.term_names]


StepCallback = Callable[[int, int], None]  # (epoch, step) after each training step


def train(run: Run, log=log_line, on_step_end: StepCallback | None = None) -> dict:
    """Runs the loop from the run's progress to ``cfg.epochs``; returns the summary, or
    ``{"stopped_at": ...}`` when ``--max-steps`` stopped it first. ``on_step_end(epoch, step)``
    is called after every step (a benchmark's clock). The loop of ``train_runs``, with one run.

    Whatever way it ends, the run folder's lock is released; a run that fails before its first
    checkpoint leaves no folder it created behind.
    """
    return train_runs([run], log, on_step_end)[0]


def train_runs(runs: list[Run], log=log_line, on_step_end: StepCallback | None = None) -> list[dict | DhkdError]:
    """Trains several runs from one pass over their shared loader (``runs[0].loader``): each batch
    is rendered and its logits read once, then every run takes its step on it (``Trainee``).
    Returns each run's summary, its ``{"stopped_at": ...}``, or (several runs only) the DhkdError
    that stopped it alone while the others went on; one run's error is raised, as it always was.
    Every run folder is released however the pass ends."""
    trainees = [Trainee(run, shared=len(runs) > 1) for run in runs]
    try:
        results = _train(trainees, log, on_step_end)
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

    @property
    def training(self) -> bool:
        return self.error is None and self.stopped_at is None

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
        _end_epoch(self.run, epoch, (lambda line: log(f"{self.name}: {line}")) if self.shared else log)
        if cfg.max_steps and self.steps_done >= cfg.max_steps and epoch + 1 < cfg.epochs:
            self.stopped_at = {"epoch": epoch, "step": len(self.run.loader)}


def _train(trainees: list[Trainee], log, on_step_end: StepCallback | None) -> list[dict | DhkdError]:
    first = trainees[0].run
    acc, loader, epochs = first.accelerator, first.loader, first.cfg.epochs
    started = time.perf_counter()
    for t in trainees:
        start_tracking(t.run.accelerator, t.run.cfg)
        t.run.model.train()

    def each(group: list[Trainee], action):
        for t in group:
            if t.training:
                with t.turn(log):
                    action(t)

    # one process: a signal stops the run at the next step, with a checkpoint there (interrupts.py)
    with deferred(enabled=acc.num_processes == 1):
        for epoch in range(min(t.run.progress.epoch for t in trainees), epochs):
            active = [t for t in trainees if t.training and t.run.progress.epoch <= epoch]
            each(active, lambda t: t.begin_epoch(epoch))
            active = [t for t in active if t.training]
            if not active:
                continue
            skip = min(t.skip for t in active)
            bar = _progress_bar(len(loader) - skip, f"epoch {epoch + 1}/{epochs}", acc.is_main_process)
            for step, batch in enumerate(loader.epoch(epoch, skip), start=skip):
                due = [t for t in active if t.training and t.skip <= step]
                each(due, lambda t: t.step(batch, epoch, step))
                if on_step_end is not None:
                    on_step_end(epoch, step)
                bar.update(1)
                signal = pending()
                each(due, lambda t: t.after_step(epoch, signal))
                if signal and step + 1 < len(loader):
                    bar.close()
                    _interrupted(trainees, signal, f"at epoch {epoch + 1}, step {step + 1}")
                if not any(t.training for t in active):
                    break  # every run stopped (--max-steps) or failed: no more batches
            bar.close()
            each(active, lambda t: t.end_epoch(epoch, log))
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
                summary = _finish(t.run, wall)
        results.append(summary if summary is not None else t.error or {"stopped_at": t.stopped_at})
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


def _end_epoch(run: Run, epoch: int, log):
    """After an epoch's last step: the non-finite check, the metrics line, validation, the checkpoint."""
    cfg, acc, progress = run.cfg, run.accelerator, run.progress
    run.guard.check(acc, epoch)
    train_time = time.perf_counter() - progress.tally.clock_start
    metrics = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch)}
    metrics.update(zip(metric_names(run.method), progress.tally.means(acc)))
    metrics.update({"images_per_sec": progress.tally.seen * acc.num_processes / train_time, "epoch_time": train_time})
    if progress.skipped:
        metrics["skipped_nonfinite"] = progress.skipped
    if _validates(cfg, epoch):
        metrics.update(
            {
                f"val_{k}": v
                for k, v in evaluate(acc.unwrap_model(run.model), run.renderer, cfg.batch_size * 2, acc).items()
            }
        )
    progress.end_epoch(metrics)
    if acc.is_main_process:
        append_line(os.path.join(cfg.out, METRICS), metrics_line(metrics))
        acc.log(metrics, step=metrics["epoch"])  # the trackers get exactly the metrics.jsonl line
        val = f"val top-1 {metrics['val_top1']:.2f}%  " if "val_top1" in metrics else ""
        parts = "  ".join(f"{k} {metrics['train_' + k]:.4f}" for k in run.method.term_names)
        log(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.4f} ({parts})  {val}{metrics['images_per_sec']:.0f} img/s"
        )
    save_training_state(run)
    acc.wait_for_everyone()


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or None, leave=False, dynamic_ncols=True, file=sys.stderr)


def _validates(cfg: TrainConfig, epoch: int) -> bool:
    """Whether validation runs after ``epoch`` (0-based): every ``val_every``-th and the last."""
    return epoch + 1 == cfg.epochs or (cfg.val_every > 0 and (epoch + 1) % cfg.val_every == 0)


def _finish(run: Run, wall: float) -> dict:
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
        write_json(os.path.join(cfg.out, SUMMARY), summary)
    acc.wait_for_everyone()
    return summary
