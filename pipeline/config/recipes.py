"""A config built from its three sources: the dataclass's defaults, a YAML recipe, the command
line's options; each value read is checked against its field's type. Torch-free."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import fields

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.option_ranges import check_values


def build_config(cls, config_file: str | None, overrides: dict, defaults: dict | None = None):
    """Defaults, then the YAML file, then the command line's options (those not None)."""
    values = dict(defaults or {})
    if config_file:
        values.update(read_recipe(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DhkdError(f"unknown config option(s): {', '.join(unknown)}")
    for name, value in values.items():
        values[name] = _coerce(name, value, known[name].type)
    cfg = cls(**values)
    cfg = cfg.validate() if hasattr(cfg, "validate") else cfg
    check_values(values)  # every command's numeric options, ranges declared once (option_ranges)
    return cfg


def read_recipe(config_file: str) -> dict:
    """The options a YAML recipe sets, keys with ``_`` (as the dataclasses name them)."""
    from dhkd_pipe import bounded_yaml

    if not os.path.isfile(config_file):
        raise DhkdError(f"config file not found: {config_file}")
    loaded = bounded_yaml.load(bounded_yaml.read_text(config_file), config_file) or {}
    if not isinstance(loaded, dict):
        raise DhkdError(f"config {config_file} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def config_defaults(cls) -> dict:
    """The dataclass's own default of every field."""
    out = {}
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _coerce(name, value, annotation):
    """YAML gives ints for floats and strings for lists; accept what a person would write."""
    kind = str(annotation)
    try:
        if value is None:
            return None
        if kind.startswith("bool"):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind.startswith("tuple"):
            return tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if kind.startswith("list"):
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            return [int(v) for v in value]
        return value if isinstance(value, str) else str(value)
    except (TypeError, ValueError, OverflowError):
        raise DhkdError(f"bad value for {name}: {_short_repr(value)}") from None


def _short_repr(value) -> str:
    text = (
        repr(value)
        if not isinstance(value, (list, dict)) or len(value) < 100
        else f"a {type(value).__name__} of {len(value)} items"
    )
    return text if len(text) <= 80 else text[:77] + "..."
