"""The training engine: one loop for teachers, online and cached distillation.

The loop is data, forward, loss, backward, step, log; checkpoints, validation, schedules and the
run directory are small functions it calls. The only difference between online and cached
distillation is where ``batch.teacher`` comes from: the store (``StoreEpochs``), or the teacher
run on the batch here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import PRECISIONS, TrainConfig
from .console import log_line
from .data import Dataset, Renderer
from .errors import DhkdError
from .exported import write_exported
from .grad_align import aligned_backward
from .loader import PlanEpochs, StoreEpochs, ViewLoader
from .methods import Method, from_config
from .views import ViewPlan

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .cache import LogitCache

CHECKPOINT = "checkpoint.pt"
# Options that may change between a run and its resume.
RESUMABLE_CHANGES = {"epochs", "out", "workers", "max_steps", "checkpoint_every", "log_with", "val_every",
                     "channels_last", "compile"}


@dataclass
class Run:
    """What a prepared run holds: everything is checked before the run directory is touched."""

    cfg: TrainConfig
    accelerator: Accelerator
    data: Dataset
    loss: Method
    model: torch.nn.Module
    teacher: torch.nn.Module | None
    loader: ViewLoader  # its ``epochs`` is an EpochSource: PlanEpochs or StoreEpochs
    renderer: Renderer
    plan: ViewPlan
    optimizer: torch.optim.Optimizer
    cache: LogitCache | None = None
    start_epoch: int = 0
    start_step: int = 0
    history: list = field(default_factory=list)
    step_ends: list | None = None  # perf_counter() after each step, when a benchmark asks
    data_spec: str | None = None  # the data set trained on (--data, or the store's)


def make_accelerator(precision: str, log_with: str | None = None, project_dir: str | None = None) -> Accelerator:
    """The run's ``Accelerator``; ``log_with`` (comma-separated tracker names) is checked first."""
    from accelerate import Accelerator

    if precision not in PRECISIONS:
        raise DhkdError(f"bad precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    cpu = not torch.cuda.is_available()
    if cpu and precision == "fp16":
        raise DhkdError("--precision fp16 needs a GPU; use bf16 or no on the CPU")
    trackers = tracker_names(log_with)
    return Accelerator(mixed_precision=precision, cpu=cpu, log_with=trackers or None, project_dir=project_dir)


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
            raise DhkdError(f"--log-with {name}: the {name} package is not installed; pip install {_TRACKER_PACKAGES.get(name, name)}")
    return names


TRACKING_PROJECT = "dhkd-pipe"  # trackers write under RUN/dhkd-pipe (TensorBoard) or this project (wandb, ...)


def _start_tracking(run: Run):
    """Opens the trackers (if any) with the run's config as hyper-parameters."""
    acc, cfg = run.accelerator, run.cfg
    if not acc.log_with:
        return
    # TensorBoard's hparams take scalars and strings only
    config = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in cfg.to_dict().items()}
    run_name = os.path.basename(os.path.normpath(cfg.out))
    acc.init_trackers(TRACKING_PROJECT, config=config, init_kwargs={"wandb": {"name": run_name}})


def _end_tracking(run: Run):
    """Closes the trackers. Not ``end_training``: that also destroys the process group, which a
    process running several stages (quickstart, bench, tests) still needs."""
    acc = run.accelerator
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers = []


def prepare(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Run:
    """Loads and checks data, store, models and weights, then sets up the run directory."""
    from .data import load_data, load_store_data
    from .models import create_model, default_weights, load_checkpoint

    loss = method = from_config(cfg)
    online = method.needs_teacher and not cfg.cache
    if online and not cfg.teacher:
        raise DhkdError(f"--method {method.name} needs a teacher: --cache STORE, or --teacher NAME [--teacher-weights FILE]")
    if online and not cfg.teacher_weights and default_weights(cfg.teacher) is None:
        raise DhkdError(f"--teacher {cfg.teacher} has no published weights (a KD-zoo model): pass --teacher-weights FILE")
    if (cfg.grad_align or cfg.grad_align_features) and not method.dual_head:
        flag = "--grad-align" if cfg.grad_align else "--grad-align-features"
        raise DhkdError(f"{flag} aligns head 1's CE with head 2's distillation gradient: only --method dhkd has two heads")
    replace_out = _check_out(cfg.out, resume, overwrite)
    acc = make_accelerator(cfg.precision, cfg.log_with, cfg.out)
    torch.manual_seed(cfg.seed)

    cache = None
    if cfg.cache:  # the store's data, views and preprocessing (and, when the method needs them, its logits)
        from .cache import LogitCache

        cache = LogitCache.open(cfg.cache)
        cache.check_complete()
        data, data_spec = load_store_data(cache, cfg.data)
        plan = ViewPlan.from_dict(cache.attrs["policy"])
    else:
        data, data_spec = load_data(cfg.data), cfg.data
        plan = data.default_plan(seed=cfg.seed)

    model = create_model(cfg.model, data.num_classes, dual_head=method.dual_head, aux_head=cfg.aux_head,
                         align_features=cfg.grad_align_features)
    teacher = None
    if online:  # the teacher's weights, and for image folders the preprocessing they were trained with
        from .models import resolve_weights
        from .views import with_preprocessing

        with acc.main_process_first():
            source = resolve_weights(cfg.teacher, cfg.teacher_weights)
        if plan.policy == "random_resized_crop_flip":
            plan = with_preprocessing(plan, source.preprocessing())
        teacher = create_model(cfg.teacher, data.num_classes)
        load_checkpoint(teacher, source)
        teacher.eval().requires_grad_(False).to(acc.device, memory_format=memory_format(cfg))
    model.to(memory_format=memory_format(cfg))
    epochs = StoreEpochs(cache, acc.device, with_logits=method.needs_teacher) if cache is not None else PlanEpochs(plan, data)

    renderer = data.renderer(acc.device, plan, workers=cfg.workers)
    labels = data.train_labels.to(acc.device)
    loader = ViewLoader(epochs, renderer, labels, cfg.batch_size, acc.process_index, acc.num_processes,
                        memory_format=memory_format(cfg))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    run = Run(cfg, acc, data, loss, model, teacher, loader, renderer, plan, optimizer, cache, data_spec=data_spec)
    if resume:
        _load_state(run)
    run.model, run.optimizer = acc.prepare(run.model, run.optimizer)
    if cfg.compile:
        # here, not through Accelerate's dynamo_backend: its process-wide state keeps the first
        # Accelerator's setting, so a later run in the same process (bench, quickstart) would not compile
        run.model = torch.compile(run.model)
    if acc.is_main_process:
        if replace_out:
            shutil.rmtree(cfg.out)
        os.makedirs(cfg.out, exist_ok=True)
    acc.wait_for_everyone()
    return run


def memory_format(cfg) -> torch.memory_format:
    """``--channels-last``: NHWC weights and inputs (what tensor cores and oneDNN prefer)."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def _check_out(out: str, resume: bool, overwrite: bool) -> bool:
    """Refuses to mix runs in one folder; returns whether an old run is to be replaced."""
    has_run = os.path.isfile(os.path.join(out, CHECKPOINT)) or os.path.isfile(os.path.join(out, "summary.json"))
    if resume and not os.path.isfile(os.path.join(out, CHECKPOINT)):
        raise DhkdError(f"--resume: no checkpoint in {out}")
    if has_run and not resume:
        if not overwrite:
            raise DhkdError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    existing = os.path.abspath(out)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise DhkdError(f"cannot write to {out}: {existing} is not writable")
    return has_run and not resume


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    return cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.lr_milestones)


def _rng_state(device: torch.device) -> dict:
    """This process's random generators: the CPU one, and its CUDA device's where it has one."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_state(run: Run, epoch: int, step: int):
    """The run's state after ``step`` steps of ``epoch`` (step == len(loader): epoch finished).

    Everything a resumed run needs to continue as if never stopped: weights, optimizer, every
    process's CPU and CUDA generators (dropout; views need none, they are keyed by position), the
    fp16 grad scaler and the loader position (epoch, step). All ranks call this;
    rank 0 writes one ``checkpoint.pt`` of tensors and plain values, read back with
    ``weights_only=True`` (Accelerate's ``save_state`` pickles its RNG files, which only a full
    unpickler reads).
    """
    from accelerate.utils import gather_object

    acc = run.accelerator
    rng = gather_object([_rng_state(acc.device)])  # one entry per process, in rank order
    if not acc.is_main_process:
        return
    scaler = getattr(acc, "scaler", None)
    state = {
        "model": acc.unwrap_model(run.model, keep_torch_compile=False).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng": rng,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "config": run.cfg.to_dict(),
        "history": run.history,
    }
    path = os.path.join(run.cfg.out, CHECKPOINT)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _load_state(run: Run):
    path = os.path.join(run.cfg.out, CHECKPOINT)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DhkdError(f"cannot read checkpoint {path}: {e}") from None
    saved, now = state["config"], run.cfg.to_dict()
    for key in sorted(set(saved) | set(now)):
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key):
            raise DhkdError(f"--resume with a different config: {key} was {saved.get(key)!r}, now {now.get(key)!r}")
    acc = run.accelerator
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"]
    if isinstance(rng, torch.Tensor):  # checkpoints written before per-process generators were kept
        rng = [{"cpu": rng, "cuda": None}]
    # a different process count cannot continue identically anyway; each rank takes a saved stream
    _set_rng_state(rng[acc.process_index % len(rng)], acc.device)
    scaler = getattr(acc, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    run.history = list(state["history"])
    epoch, step = state["epoch"], state["step"]
    run.start_epoch, run.start_step = (epoch + 1, 0) if step >= len(run.loader) else (epoch, step)


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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or None, leave=False, dynamic_ncols=True, file=sys.stderr)


def train_step(run: Run, batch, epoch: int) -> dict[str, torch.Tensor]:
    """Forward, loss, backward, optimizer step on one batch; returns the method's named loss terms
    (``ce``, ``kd``, ..., ``total``), still attached to the graph.

    With ``cfg.grad_align`` the two objectives' parameter gradients (``terms["ce"]``,
    ``terms["kd"]``) are aligned as published (``dhkd_pipe.grad_align``) instead of back-propagating
    ``terms["total"]``.
    """
    acc, model, optimizer = run.accelerator, run.model, run.optimizer
    with acc.autocast():
        outputs = model(batch.images)
        teacher = batch.teacher
        if teacher is None and run.teacher is not None:
            with torch.no_grad():
                teacher = run.teacher(batch.images)
        terms = run.loss.terms(outputs, batch.labels, teacher, batch.teacher_scale, epoch)
    optimizer.zero_grad(set_to_none=True)
    if run.cfg.grad_align:
        aligned_backward(terms["ce"], terms["kd"], model.parameters(), acc)
    else:
        acc.backward(terms["total"])
    optimizer.step()
    return terms


def metric_names(method: Method) -> list[str]:
    """``metrics.jsonl`` keys of a method's per-epoch mean loss terms: ``train_loss`` (the total),
    then ``train_<term>`` for each named term."""
    return ["train_loss"] + [f"train_{name}" for name in method.term_names]


def train(run: Run, log=log_line) -> dict:
    """Runs the loop from the run's start point to ``cfg.epochs``; returns the summary."""
    cfg, acc, model, loader, optimizer = run.cfg, run.accelerator, run.model, run.loader, run.optimizer
    main = acc.is_main_process
    names = ("total",) + run.loss.term_names
    total_steps = steps_done = 0
    started = time.perf_counter()
    _start_tracking(run)
    model.train()
    for epoch in range(run.start_epoch, cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        skip = run.start_step if epoch == run.start_epoch else 0
        term_sums = torch.zeros(len(names), device=acc.device)  # summed on the device: no sync per step
        seen, t0 = 0, time.perf_counter()
        bar = _progress(len(loader) - skip, f"epoch {epoch + 1}/{cfg.epochs}", main)
        for step, batch in enumerate(loader.epoch(epoch, skip), start=skip):
            terms = train_step(run, batch, epoch)
            term_sums += torch.stack([terms[k].detach().float() for k in names])
            seen += len(batch.labels)
            steps_done += 1
            if run.step_ends is not None:
                if acc.device.type == "cuda":
                    torch.cuda.synchronize()
                run.step_ends.append(time.perf_counter())
            bar.update(1)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < len(loader):
                _save_state(run, epoch, step + 1)
            if cfg.max_steps and steps_done >= cfg.max_steps:
                bar.close()
                _save_state(run, epoch, step + 1)
                _end_tracking(run)
                acc.wait_for_everyone()
                return {"stopped_at": {"epoch": epoch, "step": step + 1}}
        bar.close()
        train_time = time.perf_counter() - t0
        total_steps += len(loader) - skip
        means = (acc.reduce(term_sums, "sum") / max(1, (len(loader) - skip) * acc.num_processes)).tolist()
        metrics = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch)}
        metrics.update(zip(metric_names(run.loss), means))
        metrics.update({"images_per_sec": seen * acc.num_processes / train_time, "epoch_time": train_time})
        if _validates(cfg, epoch):
            metrics.update({f"val_{k}": v for k, v in evaluate(acc.unwrap_model(model), run.renderer, cfg.batch_size * 2, acc).items()})
        run.history.append(metrics)
        if main:
            _append_metrics(cfg.out, metrics)
            acc.log(metrics, step=metrics["epoch"])  # the trackers get exactly the metrics.jsonl line
            val = f"val top-1 {metrics['val_top1']:.2f}%  " if "val_top1" in metrics else ""
            parts = "  ".join(f"{k} {metrics['train_' + k]:.4f}" for k in run.loss.term_names)
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.4f} ({parts})  {val}{metrics['images_per_sec']:.0f} img/s")
        _save_state(run, epoch, len(loader))
        acc.wait_for_everyone()
    _end_tracking(run)
    return _finish(run, time.perf_counter() - started)


def _validates(cfg: TrainConfig, epoch: int) -> bool:
    """Whether validation runs after ``epoch`` (0-based): every ``val_every``-th and the last."""
    return epoch + 1 == cfg.epochs or (cfg.val_every > 0 and (epoch + 1) % cfg.val_every == 0)


def _append_metrics(out: str, metrics: dict):
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")


def _finish(run: Run, wall: float) -> dict:
    """Writes the exported single-head model (``model.pt``, ``model.safetensors``) and ``summary.json``."""
    acc, cfg = run.accelerator, run.cfg
    model = acc.unwrap_model(run.model, keep_torch_compile=False)
    exported = model.export() if hasattr(model, "export") else model
    history = run.history
    validated = [h for h in history if "val_top1" in h]
    summary = {
        "model": cfg.model,
        "method": cfg.method,
        "method_params": run.loss.params(),
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
        "teacher_source": "cache" if run.loader.epochs.has_logits else ("online" if run.teacher is not None else None),
        "distinct_views": run.loader.epochs.distinct_views(cfg.epochs),
        "config": cfg.to_dict(),
    }
    if acc.is_main_process:
        # the plan says how images became pixels in training, so `eval` renders validation the same way
        mean, std = run.plan.normalization(run.data)
        write_exported(cfg.out, exported, cfg.model, run.data.num_classes, run.plan.resolution, mean, std,
                       plan=run.plan.to_dict())
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    acc.wait_for_everyone()
    return summary
