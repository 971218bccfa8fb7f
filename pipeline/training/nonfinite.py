"""``--max-nonfinite``: a run whose loss (or whose online teacher's logits) is not finite stops,
or skips up to N such steps, and never saves the weights a non-finite step produced."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dhkd_pipe.errors import DhkdError

if TYPE_CHECKING:
    from dhkd_pipe.training.state import Progress


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

    def __init__(self, device: torch.device, max_nonfinite: int, num_processes: int, progress: Progress):
        self.max_nonfinite, self.num_processes = max_nonfinite, num_processes
        self.progress = progress  # counts the skipped steps, which its checkpoint keeps
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # steps seen, on the device
        # first step (1-based count) whose loss / teacher logits were not finite; 0: none yet
        self.first_bad = torch.zeros(2, dtype=torch.int64, device=device)
        self.step_names: dict[int, tuple[int, int]] = {}  # count -> (epoch, step), for the message

    @property
    def skipping(self) -> bool:
        return self.max_nonfinite > 0

    def observe(self, loss: torch.Tensor, teacher: torch.Tensor | None):
        """Records (on the device) whether this step's loss and teacher logits are finite."""
        self.count += 1
        bad = torch.stack(
            [
                ~torch.isfinite(loss.detach()).all(),
                ~torch.isfinite(teacher).all()
                if teacher is not None
                else torch.zeros((), dtype=torch.bool, device=loss.device),
            ]
        )
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
        self.progress.skipped += 1
        if self.progress.skipped > self.max_nonfinite:
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
        which, count = (
            ("teacher", teacher_bad)
            if teacher_bad and (not loss_bad or teacher_bad <= loss_bad)
            else ("loss", loss_bad)
        )
        raise self._error(which, *self.step_names.get(count, (epoch, 0)))

    def _error(self, which: str, epoch: int, step: int) -> DhkdError:
        where = f"at epoch {epoch + 1}, step {step + 1}"
        if which == "teacher":
            return DhkdError(
                f"the teacher's logits are not finite {where}: the run stopped (its weights from that step are "
                "not saved); check the teacher and its weights (--teacher-weights)"
            )
        skipped = f" after {self.progress.skipped - 1} skipped non-finite steps" if self.progress.skipped > 1 else ""
        return DhkdError(
            f"the loss is not finite {where}{skipped}: the run stopped (its weights from that step are not saved); "
            f"lower --lr, check the data and the teacher, or let --max-nonfinite N skip up to N such steps "
            f"(now {self.max_nonfinite})"
        )
