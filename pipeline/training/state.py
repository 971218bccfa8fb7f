"""What changes as a run trains (``Progress``), and the checkpoint that holds it.

``checkpoint.pt`` is one weights-only torch file: the model's and optimizer's state dicts, every
process's random generators, the fp16 grad scaler, the config, and ``Progress.to_state()`` (the
loader position, the history of finished epochs, the running sums of a stopped epoch, the steps
skipped as non-finite). ``torch.load(..., weights_only=True)`` reads it back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.training.run_folder import CHECKPOINT, write_metrics, write_run_file

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dhkd_pipe.config import TrainConfig
    from dhkd_pipe.data.loader import ViewLoader
    from dhkd_pipe.methods.base import Method
    from dhkd_pipe.store.reader import LogitCache

# Options that may change between a run and its resume.
RESUMABLE_CHANGES = {
    "epochs",
    "out",
    "workers",
    "max_steps",
    "checkpoint_every",
    "log_with",
    "val_every",
    "channels_last",
    "compile",
    "max_nonfinite",
}

# What save_training_state writes, with the types a resume relies on.
_STATE_KEYS = {"model": dict, "optimizer": dict, "epoch": int, "step": int, "config": dict, "history": list}


@dataclass
class EpochTally:
    """An epoch's running sums. They go into every mid-epoch checkpoint, so a resumed epoch reports
    the ``train_loss`` (and image count) an uninterrupted one would."""

    term_sums: torch.Tensor  # the loss terms (total first), summed on the device: no sync per step
    steps: int = 0  # steps whose terms are in the sums (skipped steps are not)
    seen: int = 0  # images this process trained on
    elapsed: float = 0.0  # training seconds before this process took the epoch over
    clock_start: float = 0.0  # perf_counter() at which this epoch would have started, uninterrupted

    @classmethod
    def fresh(cls, terms: int, device) -> "EpochTally":
        return cls(torch.zeros(terms, dtype=torch.float32, device=device))

    def add(self, terms: dict[str, torch.Tensor] | None, images: int, names: tuple[str, ...]):
        """One step's images, and its terms unless the step was skipped (None)."""
        if terms is not None:
            self.term_sums += torch.stack([terms[k].detach().float() for k in names])
            self.steps += 1
        self.seen += images

    def means(self, acc: Accelerator) -> list[float]:
        """Per-step means over all processes (a collective); NaN (null in metrics.jsonl) when every
        step of the epoch was skipped."""
        total = acc.reduce(self.term_sums, "sum")
        return (total / (self.steps * acc.num_processes)).tolist() if self.steps else [float("nan")] * len(total)

    def state(self, acc: Accelerator) -> dict:
        """The sums over all processes (every process calls this), for the checkpoint."""
        self.elapsed = time.perf_counter() - self.clock_start
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


@dataclass
class Progress:
    """Where a run stands: ``step`` steps of ``epoch`` done (``step`` == steps per epoch: the epoch
    is finished), the metrics of the finished epochs, the running sums of the current one, and the
    steps skipped as non-finite over the whole run (``--max-nonfinite`` counts them all)."""

    epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    tally: EpochTally | None = None
    skipped: int = 0

    def begin_epoch(self, epoch: int, terms: int, device) -> int:
        """Starts (or, resumed mid-epoch, continues) ``epoch``; returns the steps already done."""
        skip = self.step if epoch == self.epoch else 0
        if not (skip and self.tally is not None):
            self.tally = EpochTally.fresh(terms, device)
        self.epoch, self.step = epoch, skip
        self.tally.clock_start = time.perf_counter() - self.tally.elapsed
        return skip

    def end_epoch(self, metrics: dict):
        self.history.append(metrics)
        self.tally = None

    def to_state(self, acc: Accelerator) -> dict:
        """The checkpoint's training state (a collective: every process calls it)."""
        running = (
            self.tally.state(acc) if self.tally is not None else None
        )  # mid-epoch: its train_loss survives a resume
        return {
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "tally": running,
            "skipped_nonfinite": self.skipped,
        }

    @classmethod
    def from_state(cls, state: dict, steps_per_epoch: int, terms: int, acc: Accelerator) -> "Progress":
        epoch, step = state["epoch"], state["step"]
        epoch, step = (epoch + 1, 0) if step >= steps_per_epoch else (epoch, step)
        tally = (
            EpochTally.from_state(state["tally"], terms, acc) if step and isinstance(state.get("tally"), dict) else None
        )
        return cls(epoch, step, list(state["history"]), tally, int(state.get("skipped_nonfinite") or 0))


class Checkpointed(Protocol):
    """What a checkpoint is saved from and restored into (``run.Run``)."""

    cfg: TrainConfig
    accelerator: Accelerator
    method: Method
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: ViewLoader
    progress: Progress
    cache: LogitCache | None  # the store a cached run reads: its identity is saved, and a resume compares


def rng_state(device: torch.device) -> dict:
    """This process's random generators: the CPU one, and its CUDA device's where it has one."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict, device: torch.device):
    """Puts back what ``rng_state`` took."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_state(run: Checkpointed):
    """The run's state at its ``progress`` (all ranks call this; rank 0 writes ``checkpoint.pt``).

    Everything a resumed run needs to continue as if never stopped: weights, optimizer, every
    process's CPU and CUDA generators (dropout; views need none, they are keyed by position), the
    fp16 grad scaler and the progress. Plain values and tensors only, read back with
    ``weights_only=True`` (Accelerate's ``save_state`` pickles its RNG files, which only a full
    unpickler reads).
    """
    from accelerate.utils import gather_object

    acc = run.accelerator
    rng = gather_object([rng_state(acc.device)])  # one entry per process, in rank order
    progress = run.progress.to_state(acc)
    if not acc.is_main_process:
        return
    scaler = getattr(acc, "scaler", None)
    state = {
        "model": acc.unwrap_model(run.model, keep_torch_compile=False).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "epoch": progress.pop("epoch"),
        "step": progress.pop("step"),
        "rng": rng,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "config": run.cfg.to_dict(),
        "store": run.cache.identity if run.cache is not None else None,  # a resume refuses another store
        **progress,  # history, tally, skipped_nonfinite
    }
    write_run_file(os.path.join(run.cfg.out, CHECKPOINT), lambda f: torch.save(state, f))


def read_state(path: str) -> dict:
    """A training checkpoint written by ``save_training_state``; anything else is one DhkdError line."""
    from dhkd_pipe.models.checkpoint import torch_load_reason

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise DhkdError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except Exception as e:
        raise DhkdError(
            f"cannot read checkpoint {path}: not a weights-only torch file, or damaged ({torch_load_reason(e)})"
        ) from None
    lacking = [
        k for k, kind in _STATE_KEYS.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)
    ]
    if lacking:
        raise DhkdError(
            f"{path} is not a dhkd-pipe training checkpoint (no {', '.join(lacking)}): --resume continues a run "
            "this tool stopped; to start over in this folder pass --overwrite instead"
        )
    problem = _state_problem(state)
    if problem:
        raise DhkdError(
            f"{path} is damaged: {problem}; --resume cannot continue from it (to start over in this folder pass "
            "--overwrite instead)"
        )
    return state


MAX_EPOCHS = 1_000_000  # option_ranges' bound of --epochs


def _state_problem(state: dict) -> str | None:
    """What in a checkpoint's training state is not what ``save_training_state`` writes: counters
    that are not counts, history lines that metrics.jsonl cannot hold, generator states that are not
    byte tensors, running sums of another shape. None when all is well."""

    def count(value, high=None) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= (high or value)

    if not count(state["epoch"], MAX_EPOCHS) or not count(state["step"]):
        return f"epoch {_brief(state['epoch'])}, step {_brief(state['step'])} are not a position in a run"
    history = state["history"]
    if len(history) > MAX_EPOCHS:
        return f"its history holds {len(history)} epochs"
    for number, entry in enumerate(history, 1):
        if not isinstance(entry, dict) or not count(entry.get("epoch")):
            return f"history entry {number} is not an epoch's metrics"
        for key, value in entry.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, (int, float, str))):
                return f"history entry {number} holds {_brief(key)}: {type(value).__name__}, not a number"
    rng = state.get("rng")
    if not isinstance(rng, list) or not rng or not all(_is_rng(r) for r in rng):
        return "its random generators' states are missing or not byte tensors"
    if state.get("skipped_nonfinite") is not None and not count(state["skipped_nonfinite"]):
        return f"skipped_nonfinite is {_brief(state['skipped_nonfinite'])}, not a count"
    tally = state.get("tally")
    if tally is not None:
        sums = tally.get("term_sums") if isinstance(tally, dict) else None
        if not (isinstance(sums, torch.Tensor) and sums.dim() == 1 and sums.is_floating_point()):
            return "the stopped epoch's running sums are not a vector of numbers"
        elapsed = tally.get("elapsed")
        if not (count(tally.get("steps")) and count(tally.get("seen"))) or not (
            isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool) and 0 <= elapsed < float("inf")
        ):
            return "the stopped epoch's step, image and time counts are not counts"
    if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
        return "the grad scaler's state is not a mapping"
    return None


def _is_rng(entry) -> bool:
    def byte_tensor(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1

    cpu = entry.get("cpu") if isinstance(entry, dict) else None
    return (
        byte_tensor(cpu)
        and cpu.numel() == torch.get_rng_state().numel()  # the CPU generator's state has one size
        and (entry.get("cuda") is None or byte_tensor(entry["cuda"]))
    )


def _brief(value) -> str:
    text = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def restore_training_state(run: Checkpointed):
    """Continues ``run`` from its folder's checkpoint: weights, optimizer, generators, scaler, progress."""
    path = os.path.join(run.cfg.out, CHECKPOINT)
    state = read_state(path)
    saved, now = state["config"], run.cfg.to_dict()
    for key in sorted(set(saved) | set(now)):
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key):
            raise DhkdError(f"--resume with a different config: {key} was {saved.get(key)!r}, now {now.get(key)!r}")
    if run.cache is not None:
        run.cache.check_same_store(state.get("store"))
    acc = run.accelerator
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise DhkdError(
            f"{path} does not fit this run's model or optimizer: {' '.join(str(e).split())[:200]}"
        ) from None
    rng = state["rng"]
    # a different process count cannot continue identically anyway; each rank takes a saved stream
    set_rng_state(rng[acc.process_index % len(rng)], acc.device)
    scaler = getattr(acc, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    run.progress = Progress.from_state(state, len(run.loader), 1 + len(run.method.term_names), acc)
    if acc.is_main_process:  # metrics.jsonl says what the checkpoint says (a kill may have left it ahead)
        write_metrics(run.cfg.out, run.progress.history)
