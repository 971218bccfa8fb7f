"""Each config value checked against its field's type, wherever it comes from (a YAML recipe, the
command line, the Python API): one line naming the option, never a value taken for another kind.

A recipe is YAML, so ``epochs: true`` is a bool and ``seed: null`` a None; neither is an integer,
though Python would count the first as 1. Ints are accepted for floats, integral floats
(``epochs: 10.0``) and digit strings for ints, and a comma-separated string for a list of ints,
as a person writes them. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import fields

from dhkd_pipe.errors import DhkdError

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
# the largest float32: the optimizer scales float32 weights by the learning rate and the weight
# decay, and a larger factor cannot be converted (an overflow, not a diverging run)
FLOAT32_MAX = 3.4028234663852886e38

_WANTS = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "text",
    "list": "a list of integers",
    "tuple": "a list of names",
}


def kind_of(annotation) -> tuple[str, bool]:
    """(the field's kind: bool, int, float, str, list or tuple; whether None is allowed)."""
    text = str(annotation).replace(" ", "")
    parts = text.split("|")
    base = parts[0].split("[")[0]
    return (base if base in _WANTS else "str"), "None" in parts


def coerce(name: str, value, annotation):
    """``value`` as the field's type; a DhkdError naming the option where it is not one."""
    kind, optional = kind_of(annotation)
    if value is None:
        if optional:
            return None
        raise DhkdError(f"bad value for {name}: null; give {_WANTS[kind]}, or leave {name} out for its default")
    try:
        return _CONVERT[kind](value)
    except (TypeError, ValueError, OverflowError):
        raise DhkdError(f"bad value for {name}: {short_repr(value)}; give {_WANTS[kind]}") from None


def _to_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ValueError


def _to_int(value) -> int:
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():  # also refuses inf and nan
            raise ValueError
        return int(value)
    if isinstance(value, str):
        return int(value.strip())  # digits only: "1e3" and "1.5" are refused
    raise TypeError


def _to_float(value) -> float:
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return float(value.strip())  # YAML 1.1 reads 1e-3 (no dot) as text
    raise TypeError


def _to_str(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a number where a name is meant (``data: 100``) is its text
    raise TypeError


def _to_list(value) -> list[int]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)):
        raise TypeError
    return [_to_int(v) for v in value]


def _to_tuple(value) -> tuple:
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return tuple(_to_str(v) for v in items)


_CONVERT = {
    "bool": _to_bool,
    "int": _to_int,
    "float": _to_float,
    "str": _to_str,
    "list": _to_list,
    "tuple": _to_tuple,
}


def check_types(cfg):
    """Every field of the dataclass ``cfg`` holds a value of its type (the Python API builds configs
    without a recipe: ``TrainConfig(epochs=True)`` is refused as ``epochs: true`` is)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        kind, optional = kind_of(f.type)
        if not ((value is None and optional) or _holds(kind, value)):
            raise DhkdError(f"bad value for {f.name}: {short_repr(value)}; give {_WANTS[kind]}")


def _holds(kind: str, value) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {
        "bool": lambda: isinstance(value, bool),
        "int": lambda: isinstance(value, int) and not isinstance(value, bool),
        "float": lambda: number,
        "str": lambda: isinstance(value, str),
        "list": lambda: isinstance(value, list) and all(_holds("int", v) for v in value),
        "tuple": lambda: isinstance(value, tuple) and all(isinstance(v, str) for v in value),
    }[kind]()


def check_optimizer_scale(lr: float, weight_decay: float, lr_decay: float = 1.0, milestones: int = 0):
    """The learning rate at its largest over the schedule, and the weight decay, fit a float32."""
    if not all(math.isfinite(v) for v in (lr, weight_decay, lr_decay)):
        return  # option_ranges says "must be a finite number"
    if weight_decay > FLOAT32_MAX:
        raise DhkdError(f"bad --weight-decay {weight_decay:g}: must be at most {FLOAT32_MAX:.4g} (the largest float32)")
    peak = math.log(lr) + milestones * max(0.0, math.log(lr_decay)) if lr > 0 and lr_decay > 0 else -math.inf
    if peak > math.log(FLOAT32_MAX):
        where = f" (reached after {milestones} decays by {lr_decay:g})" if milestones and lr_decay > 1 else ""
        raise DhkdError(
            f"bad --lr {lr:g}: the learning rate{where} must stay at most {FLOAT32_MAX:.4g} (the largest float32)"
        )


def short_repr(value) -> str:
    """``repr`` cut to one short line (a list by its length, an integer of thousands of digits by its size)."""
    if isinstance(value, int) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    text = (
        repr(value)
        if not isinstance(value, (list, dict, tuple)) or len(value) < 100
        else f"a {type(value).__name__} of {len(value)} items"
    )
    return text if len(text) <= 80 else text[:77] + "..."
