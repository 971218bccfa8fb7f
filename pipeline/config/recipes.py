"""A config built from its three sources: the dataclass's defaults, a YAML recipe, the command
line's options; each value read is checked against its field's type. Torch-free."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import fields

from dhkd_pipe.config.values import coerce
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
        values[name] = coerce(name, value, known[name].type)
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
    options = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name in options:  # batch-size and batch_size: which one was meant?
            raise DhkdError(f"config {config_file} sets {name} twice (as {_spelled(loaded, name)}); keep one")
        options[name] = value
    return options


def _spelled(loaded: dict, name: str) -> str:
    return " and ".join(str(k) for k in loaded if str(k).replace("-", "_") == name)


def config_defaults(cls) -> dict:
    """The dataclass's own default of every field."""
    out = {}
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out
