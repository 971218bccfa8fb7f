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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .accelerator import end_tracking, make_accelerator, start_tracking
from .config import TrainConfig
from .console import log_line
from .data import Dataset, Renderer
from .errors import DhkdError
from .exported import write_exported
from .grad_align import aligned_backward
from .interrupts import Interrupted, deferred, pending
from .loader import PlanEpochs, ViewLoader
from .methods import CACHE_REFUSAL, Method, from_config, is_feature_method
from .nonfinite import NonFiniteGuard
from .run_folder import METRICS, SUMMARY, RunFolder, RunMode, append_line, check_inputs_outside, check_out, metrics_line, write_json
from .training_state import Progress, restore_training_state, save_training_state
from .views import ViewPlan

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .cache import LogitCache
    from .replay import StoreReplay

__all__ = ["Run", "prepare", "train", "train_step", "evaluate", "make_accelerator", "memory_format", "lr_at", "metric_names"]


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

    def close(self, failed: bool = False):
        """Releases the run folder (see ``RunFolder.close``)."""
        if self.folder is not None:
            self.folder.close(failed)
            self.folder = None


def prepare(cfg: TrainConfig, mode: RunMode | str = RunMode.NEW, replay: StoreReplay | None = None,
            loader: ViewLoader | None = None) -> Run:
    """Loads and checks data, store, models and weights, then sets up the run folder (``mode``:
    start a new run, resume the one in ``cfg.out``, or overwrite it).

    The store is opened and its loader built through the Python API (``replay.open_store``,
    ``StoreReplay.loader``); ``replay`` and ``loader`` are those of a pass that several students
    share (``dhkd_pipe.students``), by default the run's own."""
    from .data import load_data
    from .models import check_input_size, create_model, default_weights

    mode = RunMode(mode)
    method = from_config(cfg)
    if cfg.cache and is_feature_method(method):
        raise DhkdError(CACHE_REFUSAL.format(name=method.name))
    online = method.needs_teacher and not cfg.cache
    if online and not cfg.teacher:
        raise DhkdError(f"--method {method.name} needs a teacher: --cache STORE, or --teacher NAME [--teacher-weights FILE]")
    if online and not cfg.teacher_weights and default_weights(cfg.teacher) is None:
        raise DhkdError(f"--teacher {cfg.teacher} has no published weights (a KD-zoo model): pass --teacher-weights FILE")
    if (cfg.grad_align or cfg.grad_align_features) and not method.dual_head:
        flag = "--grad-align" if cfg.grad_align else "--grad-align-features"
        raise DhkdError(f"{flag} aligns head 1's CE with head 2's distillation gradient: only --method dhkd and "
                        "dhkd_reviewkd have two heads")
    out_plan = check_out(cfg.out, mode)  # reads only; repeated under the folder's lock
    check_inputs_outside(out_plan, {"--teacher-weights": cfg.teacher_weights, "--cache": cfg.cache, "--data": cfg.data})
    acc = make_accelerator(cfg.precision, cfg.log_with, cfg.out)
    torch.manual_seed(cfg.seed)

    cache = None
    if cfg.cache:  # the store's data, views and preprocessing (and, when the method needs them, its logits)
        from .replay import open_store

        replay = replay or open_store(cfg.cache, cfg.data)
        cache, data, data_spec, plan = replay.cache, replay.data, replay.data_spec, replay.plan
        if cfg.resolution and cfg.resolution != plan.resolution:
            raise DhkdError(f"--resolution {cfg.resolution}: the store {cfg.cache} holds views rendered at {plan.resolution}, "
                            f"which stage 2 replays as recorded; drop --resolution, or cache the teacher at {cfg.resolution}")
    else:
        data, data_spec = load_data(cfg.data), cfg.data
        plan = data.default_plan(seed=cfg.seed, resolution=cfg.resolution)

    fmt = memory_format(cfg)
    model = create_model(cfg.model, data.num_classes, dual_head=method.dual_head, aux_head=cfg.aux_head,
                         align_features=cfg.grad_align_features)
    teacher = None
    if online:  # the teacher's weights, and for image folders the preprocessing they were trained with
        from .teacher import load_teacher

        loaded = load_teacher(cfg.teacher, cfg.teacher_weights, data, plan, acc.device, cfg.resolution, acc, fmt)
        teacher, plan = loaded.model, loaded.plan
    check_input_size(cfg.model, plan.resolution, data.num_classes, "student" if method.needs_teacher else "model")
    if is_feature_method(method):  # the connector trains, checkpoints and reduces with the student
        from .feature_kd import StudentWithConnector

        model = StudentWithConnector(model, method.connector(model, teacher, plan.resolution))
    model.to(memory_format=fmt)
    if loader is None and replay is not None:  # the store's replay, as the Python API hands it out
        loader = replay.loader(cfg.batch_size, device=acc.device, rank=acc.process_index, world_size=acc.num_processes,
                               workers=cfg.workers, with_logits=method.needs_teacher, memory_format=fmt)
    elif loader is None:
        loader = ViewLoader(PlanEpochs(plan, data), data.renderer(acc.device, plan, workers=cfg.workers),
                            data.train_labels.to(acc.device), cfg.batch_size, acc.process_index, acc.num_processes,
                            memory_format=fmt)
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
    if cfg.compile:
        # here, not through Accelerate's dynamo_backend: its process-wide state keeps the first
        # Accelerator's setting, so a later run in the same process (bench, quickstart) would not compile
        run.model = torch.compile(run.model)
    return run


def _command_line() -> str:
    return " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300]


def memory_format(cfg) -> torch.memory_format:
    """``--channels-last``: NHWC weights and inputs (what tensor cores and oneDNN prefer)."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    return cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.lr_milestones)


def train_step(run: Run, batch, epoch: int, step: int = 0) -> dict[str, torch.Tensor] | None:
    """Forward, loss, backward, optimizer step on one batch; returns the method's named loss terms
    (``ce``, ``kd``, ..., ``total``), still attached to the graph, or None when the step was
    skipped for a non-finite loss (``--max-nonfinite``: no optimizer step).

    With ``cfg.grad_align`` the two objectives' parameter gradients (``terms["ce"]``,
    ``terms["kd"]``) are aligned as published (``dhkd_pipe.grad_align``) instead of back-propagating
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
        from .models.feature_taps import forward_taps

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
    is called after every step (a benchmark's clock).

    Whatever way it ends, the run folder's lock is released; a run that fails before its first
    checkpoint leaves no folder it created behind.
    """
    try:
        summary = _train(run, log, on_step_end)
    except BaseException:
        end_tracking(run.accelerator)
        run.close(failed=True)
        raise
    end_tracking(run.accelerator)
    run.close()
    return summary


def _train(run: Run, log, on_step_end: StepCallback | None) -> dict:
    cfg, acc, loader, progress, guard = run.cfg, run.accelerator, run.loader, run.progress, run.guard
    names = ("total",) + run.method.term_names
    steps_done, started = 0, time.perf_counter()
    start_tracking(acc, cfg)
    run.model.train()
    # one process: a signal stops the run at the next step, with a checkpoint there (interrupts.py)
    with deferred(enabled=acc.num_processes == 1):
        for epoch in range(progress.epoch, cfg.epochs):
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch)
            skip = progress.begin_epoch(epoch, len(names), acc.device)
            bar = _progress_bar(len(loader) - skip, f"epoch {epoch + 1}/{cfg.epochs}", acc.is_main_process)
            for step, batch in enumerate(loader.epoch(epoch, skip), start=skip):
                guard.step_names[steps_done + 1] = (epoch, step)
                progress.tally.add(train_step(run, batch, epoch, step), len(batch.labels), names)
                progress.step, steps_done = step + 1, steps_done + 1
                if on_step_end is not None:
                    on_step_end(epoch, step)
                bar.update(1)
                signal, limit = pending(), bool(cfg.max_steps and steps_done >= cfg.max_steps)
                if progress.step == len(loader):
                    continue  # the epoch's end checks, saves and stops
                save = signal or limit or (cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0)
                if save or steps_done % guard.CHECK_EVERY == 0:
                    guard.check(acc, epoch)  # never save the weights of a non-finite step
                if save:
                    save_training_state(run)
                if signal or limit:
                    bar.close()
                    return _stopped(run, signal, epoch, progress.step)
            bar.close()
            _end_epoch(run, epoch, log)
            signal = pending()
            if signal or (cfg.max_steps and steps_done >= cfg.max_steps and epoch + 1 < cfg.epochs):
                return _stopped(run, signal, epoch, len(loader))
    return _finish(run, time.perf_counter() - started)


def _stopped(run: Run, signal: int | None, epoch: int, step: int) -> dict:
    """The one early exit, its state saved: a signal (raises ``Interrupted``) or ``--max-steps``."""
    run.accelerator.wait_for_everyone()
    where = f"after epoch {epoch + 1}" if step == len(run.loader) else f"at epoch {epoch + 1}, step {step}"
    if signal:
        raise Interrupted(signal, f"{where}: its state is saved in {run.cfg.out}; continue with --resume")
    return {"stopped_at": {"epoch": epoch, "step": step}}


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
        metrics.update({f"val_{k}": v for k, v in evaluate(acc.unwrap_model(run.model), run.renderer, cfg.batch_size * 2, acc).items()})
    progress.end_epoch(metrics)
    if acc.is_main_process:
        append_line(os.path.join(cfg.out, METRICS), metrics_line(metrics))
        acc.log(metrics, step=metrics["epoch"])  # the trackers get exactly the metrics.jsonl line
        val = f"val top-1 {metrics['val_top1']:.2f}%  " if "val_top1" in metrics else ""
        parts = "  ".join(f"{k} {metrics['train_' + k]:.4f}" for k in run.method.term_names)
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.4f} ({parts})  {val}{metrics['images_per_sec']:.0f} img/s")
    save_training_state(run)
    acc.wait_for_everyone()


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or None, leave=False, dynamic_ncols=True, file=sys.stderr)


@torch.no_grad()
def evaluate(model, renderer: Renderer, batch_size: int, accelerator: Accelerator | None = None) -> dict:
    """Top-1 and top-5 accuracy (%) of head 1 on the un-augmented validation split."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    ctx = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        for images, labels in renderer.val_batches(batch_size):
            out = model(images)
            out = out[0] if isinstance(out, tuple) else out
            top = out.float().topk(min(5, out.shape[1]), dim=1).indices
            hit = top == labels.to(top.device)[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=1).sum())
            total += len(labels)
    model.train(was_training)
    if total == 0:
        return {"top1": float("nan"), "top5": float("nan")}
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def _validates(cfg: TrainConfig, epoch: int) -> bool:
    """Whether validation runs after ``epoch`` (0-based): every ``val_every``-th and the last."""
    return epoch + 1 == cfg.epochs or (cfg.val_every > 0 and (epoch + 1) % cfg.val_every == 0)


def _finish(run: Run, wall: float) -> dict:
    """Writes the exported single-head model (``model.pt``, ``model.safetensors``) and ``summary.json``."""
    from .models import single_head

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
        "teacher_source": ("cache" if run.loader.epochs.has_logits and run.method.needs_teacher
                           else "online" if run.teacher is not None else None),
        "distinct_views": run.loader.epochs.distinct_views(cfg.epochs),
        "config": cfg.to_dict(),
    }
    if acc.is_main_process:
        # the plan says how images became pixels in training, so `eval` renders validation the same way
        mean, std = run.plan.normalization(run.data)
        write_exported(cfg.out, exported, cfg.model, run.data.num_classes, run.plan.resolution, mean, std,
                       plan=run.plan.to_dict())
        write_json(os.path.join(cfg.out, SUMMARY), summary)
    acc.wait_for_everyone()
    return summary
