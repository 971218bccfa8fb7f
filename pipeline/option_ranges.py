"""The range of every numeric option, declared once, checked where the value enters (the command
line, a recipe, the Python API) before any work starts. Torch-free.

A value outside its range, or not finite (``--lr nan``: click and YAML both read ``nan`` and
``inf`` as floats), is refused with one line naming the option and what it must be.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from dhkd_pipe.errors import DhkdError


@dataclass(frozen=True)
class Range:
    """``low``/``high``: bounds (None: open); ``strict_low``: the value must exceed ``low``."""

    low: float | None = None
    high: float | None = None
    strict_low: bool = False
    why: str = ""

    def problem(self, value) -> str | None:
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return "must be a finite number"
        if self.low is not None and (value <= self.low if self.strict_low else value < self.low):
            return f"must be {'greater than' if self.strict_low else 'at least'} {number_text(self.low)}" + (
                f" ({self.why})" if self.why else ""
            )
        if self.high is not None and value > self.high:
            return f"must be at most {number_text(self.high)}" + (f" ({self.why})" if self.why else "")
        return None


def number_text(v) -> str:
    if isinstance(v, int) and v.bit_length() > 200:  # str() of thousands of digits is refused (and no help)
        return f"(an integer of {v.bit_length()} bits)"
    return f"{v:g}" if isinstance(v, float) else str(v)


SEED_MAX = 2**63 - 1  # torch.manual_seed and numpy's counter-based generators both take it
POSITIVE = Range(0.0, strict_low=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1)
# a loss weight or temperature past these bounds gives a float32 loss of inf or NaN, or (a temperature
# below 1e-4 squared) no distillation term at all
WEIGHT = Range(0, 1e6)
TEMPERATURE = Range(1e-4, 1e4, why="the losses scale by T squared")

# option (config field) name -> its range; one table for every command that takes the option
RANGES: dict[str, Range] = {
    "epochs": Range(1, 1_000_000),
    "batch_size": Range(1, 1 << 20, why="images in one step"),
    "lr": POSITIVE,
    "momentum": Range(0.0, 1.0),
    "weight_decay": NON_NEGATIVE,
    "lr_decay": POSITIVE,
    "lr_milestones": Range(1, 1_000_000),
    "seed": Range(0, SEED_MAX),
    "workers": Range(0, 1024),
    "checkpoint_every": NON_NEGATIVE,
    "val_every": NON_NEGATIVE,
    "max_steps": NON_NEGATIVE,
    "max_nonfinite": NON_NEGATIVE,
    "resolution": Range(8, 8192, why="pixels per side"),
    "alpha": WEIGHT,
    "beta": WEIGHT,
    "gamma": WEIGHT,
    "temperature": TEMPERATURE,
    "warmup_epochs": NON_NEGATIVE,
    "kd_stop_epoch": NON_NEGATIVE,
    "views": Range(1, 100_000),
    "chunk_rows": Range(1, 1 << 20),
    "samples": COUNT,
    "tolerance": NON_NEGATIVE,
    "train_size": COUNT,
    "teacher_epochs": Range(1, 1_000_000),
    "seeds": Range(1, 1000),
    "threads": Range(0, 4096),
    "s3_latency_ms": Range(0.0, 10_000.0, why="milliseconds added to each request"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` of the argument ``name`` as an int: a ``WrongType`` (TypeError) if it is not an
    integer (a bool, a float, a string), a ``BadArgument`` (ValueError) outside ``low``..``high``."""
    from dhkd_pipe.errors import BadArgument, WrongType

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise WrongType(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    problem = Range(low, high).problem(int(value))
    if problem:
        raise BadArgument(f"bad {name} {value}: {problem}")
    return int(value)


def check_value(name: str, value, flag_name: str | None = None):
    """Refuses ``value`` of option ``name`` outside its declared range (lists: each element)."""
    rule = RANGES.get(name)
    if rule is None:
        return
    for v in value if isinstance(value, (list, tuple)) else (value,):
        problem = rule.problem(v)
        if problem:
            text = number_text(v) if isinstance(v, (int, float)) else repr(v)
            raise DhkdError(f"bad {flag_name or flag(name)} {text}: {problem}")


def check_values(values: dict):
    """Every option of ``values`` (``{name: value}``) that has a declared range."""
    for name, value in values.items():
        check_value(name, value)
