"""Run configuration: plain data read from YAML, overridden from the command line.

The names a setting may take are declared by the module that owns them and imported here:
codecs by the store (``cache.CODECS``), aux heads by ``models.dual_head.AUX_HEADS``, loss
backends and kd losses by ``losses`` (``BACKENDS``, ``KD_LOSSES``). The
precisions are declared here: they are Accelerate's ``mixed_precision`` values, and both stages
pass them to ``engine.make_accelerator``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields

import yaml

from .codecs import CODECS
from .errors import DhkdError
from .losses import BACKENDS, KD_LOSSES
from .models.dual_head import AUX_HEADS

PRECISIONS = ("no", "bf16", "fp16")  # Accelerate's mixed_precision ("no": float32)
EXPORT_FORMATS = ("onnx",)  # `dhkd-pipe export`; training itself writes model.pt and model.safetensors


@dataclass
class TrainConfig:
    """Everything a training run (teacher, online or cached distillation) depends on.

    The method's options (``gamma``, ``alpha``, ``beta``, ``temperature``, ``kd_loss``,
    ``warmup_epochs``, ``kd_stop_epoch``) left as None take the method's published defaults; what each weighs depends
    on the method (``dhkd_pipe.methods``), and setting one the method does not take is an error.
    ``data`` has no default: it is named, or comes from the ``cache`` store, which records its data
    set.
    """

    data: str | None = None
    model: str = "resnet8"
    method: str = "ce"
    teacher: str | None = None
    teacher_weights: str | None = None
    cache: str | None = None
    kd_loss: str | None = None
    alpha: float | None = None
    gamma: float | None = None
    beta: float | None = None
    temperature: float | None = None
    warmup_epochs: int | None = None
    kd_stop_epoch: int | None = None  # kd, dhkd: alpha 0 from this 1-based epoch on (0/None: never)
    aux_head: str = "linear"
    grad_align: bool = False  # the published PCGrad over parameter gradients (dhkd_pipe.grad_align)
    grad_align_features: bool = False  # this project's per-sample feature variant (AlignedSplit)
    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    lr_decay: float = 0.1
    precision: str = "no"
    kernels: str = "auto"
    seed: int = 0
    workers: int = 2
    out: str = "runs/run"
    checkpoint_every: int = 0
    val_every: int = 1  # validate after every N-th epoch and after the last; 0: after the last only
    max_steps: int = 0
    log_with: str | None = None  # Accelerate trackers, comma-separated: tensorboard, wandb, ...
    channels_last: bool = False  # NHWC student (and online teacher) and inputs
    compile: bool = False  # torch.compile of the student (through Accelerate)
    resolution: int | None = None  # input side; None: the store's, else the data set's default
    max_nonfinite: int = 0  # steps with a non-finite loss skipped (no update) before the run stops

    def validate(self) -> "TrainConfig":
        def choose(name, value, allowed):
            if value not in allowed:
                raise DhkdError(f"bad {name} {value!r}; choose one of: {', '.join(allowed)}")

        choose("precision", self.precision, PRECISIONS)
        choose("kernels", self.kernels, BACKENDS)
        if self.kd_loss is not None:
            choose("kd_loss", self.kd_loss, tuple(KD_LOSSES))
        choose("aux_head", self.aux_head, AUX_HEADS)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise DhkdError(f"bad {name} {getattr(self, name)}: must be at least 1")
        if self.lr <= 0:
            raise DhkdError(f"bad lr {self.lr}: must be positive")
        if self.temperature is not None and self.temperature <= 0:
            raise DhkdError(f"bad temperature {self.temperature}: must be positive")
        if self.grad_align and self.grad_align_features:
            raise DhkdError("choose one gradient alignment: grad_align (published, parameters) or grad_align_features")
        if self.workers < 0 or self.checkpoint_every < 0 or self.max_steps < 0 or self.val_every < 0 or self.max_nonfinite < 0:
            raise DhkdError("workers, checkpoint_every, max_steps, val_every and max_nonfinite must not be negative")
        if self.resolution is not None and self.resolution < 8:
            raise DhkdError(f"bad resolution {self.resolution}: must be at least 8")
        if not self.data and not self.cache:
            raise DhkdError(missing_data("; or distil from a stage-1 store with --cache STORE, which records its data"))
        from .methods import from_config

        from_config(self)  # the method exists and takes the options that are set
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CacheConfig:
    """Stage 1: which teacher, which data, how many views, how the store is laid out.

    ``weights`` None means the architecture's published weights (torchvision ``DEFAULT``, timm
    ``pretrained``); KD-zoo models have none and need a file.
    """

    data: str | None = None
    model: str = "resnet32x4"
    weights: str | None = None
    views: int = 8
    seed: int = 0
    out: str = "logits.zarr"
    codec: str = "fp16"
    batch_size: int = 256
    precision: str = "no"
    chunk_rows: int = 1024
    resolution: int | None = None
    workers: int = 2
    channels_last: bool = False  # NHWC teacher and inputs
    compile: bool = False  # torch.compile of the teacher
    overwrite: bool = False

    def validate(self) -> "CacheConfig":
        if self.codec not in CODECS:
            raise DhkdError(f"bad codec {self.codec!r}; choose one of: {', '.join(CODECS)}")
        if self.precision not in PRECISIONS:
            raise DhkdError(f"bad precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        for name in ("views", "batch_size", "chunk_rows"):
            if getattr(self, name) < 1:
                raise DhkdError(f"bad {name} {getattr(self, name)}: must be at least 1")
        if self.resolution is not None and self.resolution < 8:
            raise DhkdError(f"bad resolution {self.resolution}: must be at least 8")
        if not self.data:
            raise DhkdError(missing_data())
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def missing_data(extra: str = "") -> str:
    """The one line for a command run without ``--data``: no data set is ever assumed."""
    from .data import DATA_SETS

    return f"missing --data: name the data set ({', '.join(DATA_SETS)}){extra}"


@dataclass
class AccuracyBenchConfig:
    """``dhkd-pipe bench accuracy``: the defaults made the table in the README (about 30 minutes on 2 cores)."""

    out: str = "bench_accuracy"
    data: str = "fashion-mnist"
    train_size: int = 6000
    teacher: str = "resnet20"
    student: str = "resnet8"
    teacher_epochs: int = 12
    epochs: int = 12
    seeds: int = 3
    batch_size: int = 64
    lr: float = 0.05
    val_every: int = 4
    threads: int = 0  # torch threads; 0: one per core

    def validate(self) -> "AccuracyBenchConfig":
        for name in ("train_size", "teacher_epochs", "epochs", "seeds", "batch_size"):
            if getattr(self, name) < 1:
                raise DhkdError(f"bad {name} {getattr(self, name)}: must be at least 1")
        if self.threads < 0 or self.val_every < 0:
            raise DhkdError("threads and val_every must not be negative")
        if self.lr <= 0:
            raise DhkdError(f"bad lr {self.lr}: must be positive")
        from .data import SUBSET_MARK

        if SUBSET_MARK in self.data:
            raise DhkdError(f"give the training subset as --train-size, not in --data {self.data!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    return cls(**values).validate()


def read_recipe(config_file: str) -> dict:
    """The options a YAML recipe sets, keys with ``_`` (as the dataclasses name them)."""
    if not os.path.isfile(config_file):
        raise DhkdError(f"config file not found: {config_file}")
    try:
        with open(config_file) as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise DhkdError(f"cannot parse config {config_file}: {str(e).splitlines()[0]}") from None
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
        if kind.startswith("list"):
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            return [int(v) for v in value]
        return value if isinstance(value, str) else str(value)
    except (TypeError, ValueError):
        raise DhkdError(f"bad value for {name}: {value!r}") from None
