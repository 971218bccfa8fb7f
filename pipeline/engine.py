"""The training engine: one loop for teachers, online and cached distillation.

The loop is data, forward, loss, backward, step, log; checkpoints, validation, schedules and the
run directory are small functions it calls. The only difference between online and cached
distillation is where ``batch.teacher`` comes from: the store (``StoreEpochs``), or the teacher
run on the batch here.
"""

from __future__ import annotations

import os
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
from .interrupts import Interrupted, deferred, pending
from .loader import PlanEpochs, StoreEpochs, ViewLoader
from .methods import Method, from_config
from .run_folder import (CHECKPOINT, METRICS, SUMMARY, TRACKING_DIR, RunFolder, append_line, check_out, metrics_line,
                         write_atomic, write_json, write_metrics)
from .views import ViewPlan

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .cache import LogitCache

# Options that may change between a run and its resume.
RESUMABLE_CHANGES = {"epochs", "out", "workers", "max_steps", "checkpoint_every", "log_with", "val_every",
                     "channels_last", "compile", "max_nonfinite"}


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
    folder: RunFolder | None = None  # the locked run folder (main process)
    tally: EpochTally | None = None  # the running sums of the epoch a resume continues
    guard: NonFiniteGuard | None = None  # set by train()
    skipped: int = 0  # non-finite steps skipped before a resume (--max-nonfinite counts the whole run)

    def close(self, failed: bool = False):
        """Releases the run folder (see ``RunFolder.close``)."""
        if self.folder is not None:
            self.folder.close(failed)
            self.folder = None


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
    _fresh_state_for(precision)
    return Accelerator(mixed_precision=precision, cpu=cpu, log_with=trackers or None, project_dir=project_dir)


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
            "in a distributed launch, and Accelerate cannot change it there; give every stage of one launch the same --precision"
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
            raise DhkdError(f"--log-with {name}: the {name} package is not installed; pip install {_TRACKER_PACKAGES.get(name, name)}")
    return names


TRACKING_PROJECT = TRACKING_DIR  # trackers write under RUN/dhkd-pipe (TensorBoard) or this project (wandb, ...)


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
    from .models import check_finite_weights, check_input_size, create_model, default_weights, load_checkpoint

    loss = method = from_config(cfg)
    online = method.needs_teacher and not cfg.cache
    if online and not cfg.teacher:
        raise DhkdError(f"--method {method.name} needs a teacher: --cache STORE, or --teacher NAME [--teacher-weights FILE]")
    if online and not cfg.teacher_weights and default_weights(cfg.teacher) is None:
        raise DhkdError(f"--teacher {cfg.teacher} has no published weights (a KD-zoo model): pass --teacher-weights FILE")
    if (cfg.grad_align or cfg.grad_align_features) and not method.dual_head:
        flag = "--grad-align" if cfg.grad_align else "--grad-align-features"
        raise DhkdError(f"{flag} aligns head 1's CE with head 2's distillation gradient: only --method dhkd has two heads")
    out_plan = check_out(cfg.out, resume, overwrite)  # reads only; repeated under the folder's lock
    acc = make_accelerator(cfg.precision, cfg.log_with, cfg.out)
    torch.manual_seed(cfg.seed)

    cache = None
    if cfg.cache:  # the store's data, views and preprocessing (and, when the method needs them, its logits)
        from .cache import LogitCache

        cache = LogitCache.open(cfg.cache)
        cache.check_complete()
        data, data_spec = load_store_data(cache, cfg.data)
        plan = ViewPlan.from_dict(cache.attrs["policy"])
        if cfg.resolution and cfg.resolution != plan.resolution:
            raise DhkdError(f"--resolution {cfg.resolution}: the store {cfg.cache} holds views rendered at {plan.resolution}, "
                            f"which stage 2 replays as recorded; drop --resolution, or cache the teacher at {cfg.resolution}")
    else:
        data, data_spec = load_data(cfg.data), cfg.data
        plan = data.default_plan(seed=cfg.seed, resolution=cfg.resolution)

    model = create_model(cfg.model, data.num_classes, dual_head=method.dual_head, aux_head=cfg.aux_head,
                         align_features=cfg.grad_align_features)
    teacher = None
    if online:  # the teacher's weights, and for image folders the preprocessing they were trained with
        from .models import resolve_weights
        from .views import with_preprocessing

        with acc.main_process_first():
            source = resolve_weights(cfg.teacher, cfg.teacher_weights)
        if plan.policy == "random_resized_crop_flip":
            plan = with_preprocessing(plan, source.preprocessing(), cfg.resolution)
        check_input_size(cfg.teacher, plan.resolution, data.num_classes, "teacher")
        teacher = create_model(cfg.teacher, data.num_classes)
        load_checkpoint(teacher, source)
        check_finite_weights(teacher, source.label)
        teacher.eval().requires_grad_(False).to(acc.device, memory_format=memory_format(cfg))
    check_input_size(cfg.model, plan.resolution, data.num_classes, "student" if method.needs_teacher else "model")
    model.to(memory_format=memory_format(cfg))
    epochs = StoreEpochs(cache, acc.device, with_logits=method.needs_teacher) if cache is not None else PlanEpochs(plan, data)

    renderer = data.renderer(acc.device, plan, workers=cfg.workers)
    labels = data.train_labels.to(acc.device)
    loader = ViewLoader(epochs, renderer, labels, cfg.batch_size, acc.process_index, acc.num_processes,
                        memory_format=memory_format(cfg))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    run = Run(cfg, acc, data, loss, model, teacher, loader, renderer, plan, optimizer, cache, data_spec=data_spec)
    if acc.is_main_process:
        run.folder = RunFolder.open(out_plan, command=_command_line())
    acc.wait_for_everyone()
    try:
        if resume:
            _load_state(run)
        run.model, run.optimizer = acc.prepare(run.model, run.optimizer)
    except BaseException:
        run.close()
        raise
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


def _rng_state(device: torch.device) -> dict:
    """This process's random generators: the CPU one, and its CUDA device's where it has one."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_state(run: Run, epoch: int, step: int, tally: EpochTally | None = None, t0: float | None = None):
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
    running = None
    if tally is not None:  # mid-epoch: the epoch's running sums, so its train_loss survives a resume
        tally.elapsed = time.perf_counter() - t0
        running = tally.state(acc)
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
        "tally": running,
        "skipped_nonfinite": run.guard.skipped if run.guard is not None else run.skipped,
    }
    write_atomic(os.path.join(run.cfg.out, CHECKPOINT), lambda f: torch.save(state, f))


# What _save_state writes, with the types a resume relies on.
_STATE_KEYS = {"model": dict, "optimizer": dict, "epoch": int, "step": int, "config": dict, "history": list}


def read_state(path: str) -> dict:
    """A training checkpoint written by ``_save_state``; anything else is one DhkdError line."""
    from .models.checkpoint import torch_load_reason

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise DhkdError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except Exception as e:
        raise DhkdError(f"cannot read checkpoint {path}: not a weights-only torch file, or damaged ({torch_load_reason(e)})") from None
    lacking = [k for k, kind in _STATE_KEYS.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if lacking:
        raise DhkdError(f"{path} is not a dhkd-pipe training checkpoint (no {', '.join(lacking)}): --resume continues a run "
                        "this tool stopped; to start over in this folder pass --overwrite instead")
    return state


def _load_state(run: Run):
    path = os.path.join(run.cfg.out, CHECKPOINT)
    state = read_state(path)
    saved, now = state["config"], run.cfg.to_dict()
    for key in sorted(set(saved) | set(now)):
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key):
            raise DhkdError(f"--resume with a different config: {key} was {saved.get(key)!r}, now {now.get(key)!r}")
    acc = run.accelerator
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise DhkdError(f"{path} does not fit this run's model or optimizer: {' '.join(str(e).split())[:200]}") from None
    rng = state["rng"]
    if isinstance(rng, torch.Tensor):  # checkpoints written before per-process generators were kept
        rng = [{"cpu": rng, "cuda": None}]
    # a different process count cannot continue identically anyway; each rank takes a saved stream
    _set_rng_state(rng[acc.process_index % len(rng)], acc.device)
    scaler = getattr(acc, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    run.history = list(state["history"])
    run.skipped = int(state.get("skipped_nonfinite") or 0)
    epoch, step = state["epoch"], state["step"]
    run.start_epoch, run.start_step = (epoch + 1, 0) if step >= len(run.loader) else (epoch, step)
    if run.start_step and isinstance(state.get("tally"), dict):
        run.tally = EpochTally.from_state(state["tally"], 1 + len(run.loss.term_names), acc)
    if acc.is_main_process:  # metrics.jsonl says what the checkpoint says (a kill may have left it ahead)
        write_metrics(run.cfg.out, run.history)


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


class NonFiniteGuard:
    """Stops a run whose loss (or whose online teacher's logits) is not finite.

    ``--max-nonfinite 0`` (the default) stops at the first non-finite loss. Nothing is skipped, so
    nothing needs deciding before the optimizer step: a device flag records the first bad step with
    no host sync, and ``check`` reads it every ``CHECK_EVERY`` steps and before anything is saved,
    so a checkpoint never holds the weights a non-finite step produced. With ``N > 0`` a bad step
    must skip its update (no optimizer step), which needs its loss on the host before the step: one
    small sync per step, paid only by runs that ask for skipping (and a copy of the model's
    buffers, which the skipped forward pass moved and ``train_step`` puts back). A non-finite teacher is never
    skipped: the store refuses such logits in stage 1, and online distillation does the same.
    """

    CHECK_EVERY = 50

    def __init__(self, device: torch.device, max_nonfinite: int, num_processes: int, skipped: int = 0):
        self.max_nonfinite, self.num_processes = max_nonfinite, num_processes
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # steps seen, on the device
        # first step (1-based count) whose loss / teacher logits were not finite; 0: none yet
        self.first_bad = torch.zeros(2, dtype=torch.int64, device=device)
        self.step_names: dict[int, tuple[int, int]] = {}  # count -> (epoch, step), for the message
        self.skipped = skipped

    @property
    def skipping(self) -> bool:
        return self.max_nonfinite > 0

    def observe(self, loss: torch.Tensor, teacher: torch.Tensor | None):
        """Records (on the device) whether this step's loss and teacher logits are finite."""
        self.count += 1
        bad = torch.stack([~torch.isfinite(loss.detach()).all(),
                           ~torch.isfinite(teacher).all() if teacher is not None else torch.zeros((), dtype=torch.bool, device=loss.device)])
        self.first_bad.copy_(torch.where(bad & (self.first_bad == 0), self.count, self.first_bad))

    def skip(self, loss: torch.Tensor, teacher: torch.Tensor | None, acc, epoch: int, step: int) -> bool:
        """With skipping allowed: whether this step is skipped (one host sync; every process agrees)."""
        self.observe(loss, teacher)
        flags = self.first_bad.clone()
        if self.num_processes > 1:
            flags = acc.reduce(flags, "sum")
        loss_bad, teacher_bad = (int(v) for v in flags.tolist())
        if teacher_bad:
            raise self._error("teacher", epoch, step)
        if not loss_bad:
            return False
        self.first_bad.zero_()
        self.skipped += 1
        if self.skipped > self.max_nonfinite:
            raise self._error("loss", epoch, step)
        return True

    def check(self, acc, epoch: int):
        """Raises DhkdError if a recorded step was not finite (a sync; every process calls it)."""
        rows = (acc.gather(self.first_bad[None]) if self.num_processes > 1 else self.first_bad[None]).tolist()
        # the earliest bad step over the processes, loss and teacher apart (0: none)
        loss_bad, teacher_bad = (min((r[i] for r in rows if r[i]), default=0) for i in (0, 1))
        if not (loss_bad or teacher_bad):
            self.step_names.clear()
            return
        which, count = ("teacher", teacher_bad) if teacher_bad and (not loss_bad or teacher_bad <= loss_bad) else ("loss", loss_bad)
        raise self._error(which, *self.step_names.get(count, (epoch, 0)))

    def _error(self, which: str, epoch: int, step: int) -> DhkdError:
        where = f"at epoch {epoch + 1}, step {step + 1}"
        if which == "teacher":
            return DhkdError(f"the teacher's logits are not finite {where}: the run stopped (its weights from that step are "
                             "not saved); check the teacher and its weights (--teacher-weights)")
        skipped = f" after {self.skipped - 1} skipped non-finite steps" if self.skipped > 1 else ""
        return DhkdError(f"the loss is not finite {where}{skipped}: the run stopped (its weights from that step are not saved); "
                         f"lower --lr, check the data and the teacher, or let --max-nonfinite N skip up to N such steps "
                         f"(now {self.max_nonfinite})")


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
        outputs = model(batch.images)
        teacher = batch.teacher
        online = None
        if teacher is None and run.teacher is not None:
            with torch.no_grad():
                teacher = online = run.teacher(batch.images)
        terms = run.loss.terms(outputs, batch.labels, teacher, batch.teacher_scale, epoch)
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


def metric_names(method: Method) -> list[str]:
    """``metrics.jsonl`` keys of a method's per-epoch mean loss terms: ``train_loss`` (the total),
    then ``train_<term>`` for each named term."""
    return ["train_loss"] + [f"train_{name}" for name in method.term_names]


@dataclass
class EpochTally:
    """An epoch's running sums. They go into every mid-epoch checkpoint, so a resumed epoch reports
    the ``train_loss`` (and image count) an uninterrupted one would."""

    term_sums: torch.Tensor  # the loss terms (total first), summed on the device: no sync per step
    steps: int = 0  # steps whose terms are in the sums (skipped steps are not)
    seen: int = 0  # images this process trained on
    elapsed: float = 0.0  # training seconds before this process took the epoch over

    @classmethod
    def fresh(cls, terms: int, device) -> "EpochTally":
        return cls(torch.zeros(terms, dtype=torch.float32, device=device))

    def add(self, terms: dict[str, torch.Tensor], names: tuple[str, ...]):
        self.term_sums += torch.stack([terms[k].detach().float() for k in names])
        self.steps += 1

    def means(self, acc: Accelerator) -> list[float]:
        """Per-step means over all processes (a collective); NaN (null in metrics.jsonl) when every
        step of the epoch was skipped."""
        total = acc.reduce(self.term_sums, "sum")
        return (total / (self.steps * acc.num_processes)).tolist() if self.steps else [float("nan")] * len(total)

    def state(self, acc: Accelerator) -> dict:
        """The sums over all processes (every process calls this), for the checkpoint."""
        total = acc.reduce(self.term_sums.clone(), "sum") if acc.num_processes > 1 else self.term_sums
        seen = self.seen * acc.num_processes
        return {"term_sums": total.detach().cpu(), "steps": self.steps, "seen": seen, "elapsed": self.elapsed}

    @classmethod
    def from_state(cls, state: dict, terms: int, acc: Accelerator) -> "EpochTally | None":
        """The main process continues the saved sums; the others start from zero, so that the
        epoch's final sum over processes is the saved one plus what follows. None if the saved
        sums do not fit (another method's terms)."""
        sums = state.get("term_sums")
        if not isinstance(sums, torch.Tensor) or sums.shape != (terms,):
            return None
        main = acc.is_main_process
        sums = sums.to(acc.device, torch.float32) if main else torch.zeros(terms, device=acc.device)
        seen = int(state["seen"]) // acc.num_processes
        return cls(sums, int(state["steps"]), seen, float(state["elapsed"]))


def train(run: Run, log=log_line) -> dict:
    """Runs the loop from the run's start point to ``cfg.epochs``; returns the summary.

    Whatever way it ends, the run folder's lock is released; a run that fails before its first
    checkpoint leaves no folder it created behind.
    """
    try:
        summary = _train(run, log)
    except BaseException:
        _end_tracking(run)
        run.close(failed=True)
        raise
    _end_tracking(run)
    run.close()
    return summary


def _train(run: Run, log) -> dict:
    cfg, acc, model, loader, optimizer = run.cfg, run.accelerator, run.model, run.loader, run.optimizer
    main = acc.is_main_process
    names = ("total",) + run.loss.term_names
    steps_done = 0
    started = time.perf_counter()
    run.guard = NonFiniteGuard(acc.device, cfg.max_nonfinite, acc.num_processes, run.skipped)
    guard = run.guard
    _start_tracking(run)
    model.train()
    # one process: a signal stops the run at the next step, with a checkpoint there (interrupts.py)
    with deferred(enabled=acc.num_processes == 1):
        for epoch in range(run.start_epoch, cfg.epochs):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch)
            skip = run.start_step if epoch == run.start_epoch else 0
            tally = run.tally if (skip and run.tally is not None) else EpochTally.fresh(len(names), acc.device)
            run.tally = None
            t0 = time.perf_counter() - tally.elapsed
            bar = _progress(len(loader) - skip, f"epoch {epoch + 1}/{cfg.epochs}", main)
            for step, batch in enumerate(loader.epoch(epoch, skip), start=skip):
                guard.step_names[steps_done + 1] = (epoch, step)
                terms = train_step(run, batch, epoch, step)
                if terms is not None:
                    tally.add(terms, names)
                tally.seen += len(batch.labels)
                steps_done += 1
                if run.step_ends is not None:
                    if acc.device.type == "cuda":
                        torch.cuda.synchronize()
                    run.step_ends.append(time.perf_counter())
                bar.update(1)
                stop = pending()
                save = step + 1 < len(loader) and bool(stop or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0))
                if save or steps_done % guard.CHECK_EVERY == 0:
                    guard.check(acc, epoch)  # never save the weights of a non-finite step
                if save:
                    _save_state(run, epoch, step + 1, tally, t0)
                if stop:
                    bar.close()
                    if step + 1 >= len(loader):
                        break  # the epoch is finished: saved below, then stopped
                    raise Interrupted(stop, f"at epoch {epoch + 1}, step {step + 1}: its state is saved in {cfg.out}; "
                                            "continue with --resume")
                if cfg.max_steps and steps_done >= cfg.max_steps:
                    bar.close()
                    if step + 1 >= len(loader):
                        break
                    guard.check(acc, epoch)
                    _save_state(run, epoch, step + 1, tally, t0)
                    acc.wait_for_everyone()
                    return {"stopped_at": {"epoch": epoch, "step": step + 1}}
            bar.close()
            guard.check(acc, epoch)
            train_time = time.perf_counter() - t0
            metrics = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch)}
            metrics.update(zip(metric_names(run.loss), tally.means(acc)))
            metrics.update({"images_per_sec": tally.seen * acc.num_processes / train_time, "epoch_time": train_time})
            if guard.skipped:
                metrics["skipped_nonfinite"] = guard.skipped
            if _validates(cfg, epoch):
                metrics.update({f"val_{k}": v for k, v in evaluate(acc.unwrap_model(model), run.renderer, cfg.batch_size * 2, acc).items()})
            run.history.append(metrics)
            if main:
                append_line(os.path.join(cfg.out, METRICS), metrics_line(metrics))
                acc.log(metrics, step=metrics["epoch"])  # the trackers get exactly the metrics.jsonl line
                val = f"val top-1 {metrics['val_top1']:.2f}%  " if "val_top1" in metrics else ""
                parts = "  ".join(f"{k} {metrics['train_' + k]:.4f}" for k in run.loss.term_names)
                log(f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.4f} ({parts})  {val}{metrics['images_per_sec']:.0f} img/s")
            _save_state(run, epoch, len(loader))
            acc.wait_for_everyone()
            stop = pending()
            if stop:
                raise Interrupted(stop, f"after epoch {epoch + 1}: its state is saved in {cfg.out}; continue with --resume")
            if cfg.max_steps and steps_done >= cfg.max_steps and epoch + 1 < cfg.epochs:
                return {"stopped_at": {"epoch": epoch, "step": len(loader)}}
    return _finish(run, time.perf_counter() - started)


def _validates(cfg: TrainConfig, epoch: int) -> bool:
    """Whether validation runs after ``epoch`` (0-based): every ``val_every``-th and the last."""
    return epoch + 1 == cfg.epochs or (cfg.val_every > 0 and (epoch + 1) % cfg.val_every == 0)


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
        write_json(os.path.join(cfg.out, SUMMARY), summary)
    acc.wait_for_everyone()
    return summary
