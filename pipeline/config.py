"""Run configuration: plain data read from YAML, overridden from the command line.

Each option is declared once, here, as a field with its flag, help and choices in its metadata
(``options.option``); the CLI's options are generated from these fields, YAML recipes use their
names, and a method's options come from the method classes' own fields (``methods``). The names a
setting may take are declared by the module that owns them, in torch-free modules: codecs
(``codecs.CODECS``), aux heads (``models.aux_heads.AUX_HEADS``), loss backends and kd losses
(``loss_names``), data sets (``data.DATA_SETS``). The precisions are declared here: they are
Accelerate's ``mixed_precision`` values, and both stages pass them to ``training.accelerator.make_accelerator``.
This module imports no torch: the CLI's help and usage errors cost nothing.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.methods.names import BACKENDS, KD_LOSS_NAMES
from dhkd_pipe.methods.registry import METHODS, method_option_fields
from dhkd_pipe.models.aux_heads import AUX_HEADS
from dhkd_pipe.option_ranges import check_values
from dhkd_pipe.options import option
from dhkd_pipe.store.codecs import CODECS

PRECISIONS = ("no", "bf16", "fp16")  # Accelerate's mixed_precision ("no": float32)
EXPORT_FORMATS = ("onnx",)  # `dhkd-pipe export`; training itself writes model.pt and model.safetensors

WEIGHTS_HELP = (
    "a checkpoint file, or a published weight's name (torchvision: DEFAULT, IMAGENET1K_V2, ...; "
    "timm: pretrained or a tag); default: the architecture's published weights, fetched into the "
    "torch hub / Hugging Face cache when online (KD-zoo models have none)"
)


def data_help(extra: str = "") -> str:
    """``--data``'s help, from the data sets ``data`` declares."""
    from dhkd_pipe.data.datasets import DATA_SETS, SUBSET_MARK

    return f"{' | '.join(DATA_SETS)}; SPEC{SUBSET_MARK}N: a fixed stratified subset of N training images." + (
        f" {extra}" if extra else ""
    )


# A method's options (gamma, alpha, ...), declared by the method classes' own fields: None means the
# chosen method's default. TrainConfig inherits them.
MethodOptions = dataclasses.make_dataclass("MethodOptions", method_option_fields())

_DISTILL = ("distill",)  # options of distillation only (not train-teacher)


@dataclass
class TrainConfig(MethodOptions):
    """Everything a training run (teacher, online or cached distillation) depends on.

    The method's options (``gamma``, ``alpha``, ``beta``, ``temperature``, ``kd_loss``,
    ``warmup_epochs``, ``kd_stop_epoch``) left as None take the method's published defaults; what each weighs depends
    on the method (``dhkd_pipe.methods.registry``), and setting one the method does not take is an error.
    ``data`` has no default: it is named, or comes from the ``cache`` store, which records its data
    set.
    """

    data: str | None = option(None, data_help("Required, except for distill --cache (the store records it)."))
    model: str = option(
        "resnet8",
        "Architecture (see `dhkd-pipe models`).",
        per_command={"distill": {"flag": "--student", "help": "Student architecture."}},
    )
    method: str = option("ce", "Distillation method (see above).", choices=tuple(METHODS), commands=_DISTILL)
    teacher: str | None = option(None, "Teacher architecture (online distillation).", commands=_DISTILL)
    teacher_weights: str | None = option(
        None, f"Teacher weights (online distillation): {WEIGHTS_HELP}.", commands=_DISTILL
    )
    cache: str | None = option(
        None,
        "Stage-1 logit store (a path or a URL: s3://, gs://, file://): distil with no teacher forward pass.",
        commands=_DISTILL,
    )
    aux_head: str = option("linear", choices=AUX_HEADS, commands=_DISTILL)
    # the published PCGrad over parameter gradients (dhkd_pipe.training.grad_align)
    grad_align: bool = option(
        False,
        "dhkd, dhkd_reviewkd only: gradient alignment as published (PCGrad over all "
        "parameter gradients): where the distillation gradient conflicts with the CE gradient, its "
        "component along the CE gradient is removed. With dhkd_reviewkd the projected objective is "
        "alpha KD(head 2) + the ReviewKD term, against gamma CE(head 1) (this project's choice: the "
        "published DHKD code has no ReviewKD).",
        switch=True,
        commands=_DISTILL,
    )
    # this project's per-sample feature variant (AlignedSplit)
    grad_align_features: bool = option(
        False,
        "dhkd only: this project's per-sample variant (not the published algorithm): "
        "aligns only the gradient reaching the shared features, row by row. Excludes "
        "--grad-align.",
        switch=True,
        commands=_DISTILL,
    )
    kernels: str = option(
        "auto", "Fused Triton losses (CUDA) or the PyTorch reference.", choices=BACKENDS, commands=_DISTILL
    )
    out: str = option("runs/run", "Run folder.")
    epochs: int = option(240)
    batch_size: int = option(64)
    lr: float = option(0.05)
    momentum: float = option(0.9)
    weight_decay: float = option(5e-4)
    lr_milestones: list[int] = option(
        help="Epochs at which the learning rate decays, e.g. 150,180,210.", default_factory=lambda: [150, 180, 210]
    )
    lr_decay: float = option(0.1)
    precision: str = option("no", choices=PRECISIONS)
    seed: int = option(0)
    workers: int = option(2, "Loader worker processes (DALI).")
    checkpoint_every: int = option(0, "Also checkpoint every N steps within an epoch.")
    val_every: int = option(1, "Validate after every N-th epoch and after the last (0: the last only; default 1).")
    max_steps: int = option(0, "Stop (with a checkpoint) after N steps; for smoke runs and benchmarks.")
    resolution: int | None = option(
        None,
        "Input side in pixels (default: the store's, else the data set's: 32 for the "
        "in-memory sets, 224 for image folders); the model must take it.",
    )
    max_nonfinite: int = option(
        0,
        "Skip up to N steps whose loss is not finite (no update) before the run stops (default 0: stop at the first).",
    )
    log_with: str | None = option(
        None,
        "Experiment trackers (Accelerate's), comma-separated: tensorboard, wandb, "
        "mlflow, ...; they get the per-epoch metrics of metrics.jsonl.",
    )
    channels_last: bool | None = option(
        None,
        "NHWC weights and inputs (default: on a CUDA device, where bench distill measured "
        "1.53x on an H200; off on the CPU, where it measured 0.61x-1.42x).",
        switch=True,
    )
    compile: bool = option(
        False, "torch.compile the student (through Accelerate; the first steps compile).", switch=True
    )

    def validate(self) -> "TrainConfig":
        def choose(name, value, allowed):
            if value not in allowed:
                raise DhkdError(f"bad {name} {value!r}; choose one of: {', '.join(allowed)}")

        choose("precision", self.precision, PRECISIONS)
        choose("kernels", self.kernels, BACKENDS)
        if self.kd_loss is not None:
            choose("kd_loss", self.kd_loss, KD_LOSS_NAMES)
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
        if (
            self.workers < 0
            or self.checkpoint_every < 0
            or self.max_steps < 0
            or self.val_every < 0
            or self.max_nonfinite < 0
        ):
            raise DhkdError("workers, checkpoint_every, max_steps, val_every and max_nonfinite must not be negative")
        if self.resolution is not None and self.resolution < 8:
            raise DhkdError(f"bad resolution {self.resolution}: must be at least 8")
        if not self.data and not self.cache:
            raise DhkdError(missing_data("; or distil from a stage-1 store with --cache STORE, which records its data"))
        check_values(self.to_dict())
        from dhkd_pipe.methods.registry import from_config

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

    model: str = option(
        "resnet32x4", "Teacher architecture (see `dhkd-pipe models`; timm:NAME for timm models).", record=True
    )
    weights: str | None = option(None, f"Teacher weights: {WEIGHTS_HELP}.", record=True)
    data: str | None = option(None, data_help("Required; recorded in the store (absolute path)."), record=True)
    views: int = option(8, "Augmentation epochs (views per image) to record.", record=True)
    seed: int = option(0, record=True)
    out: str = option("logits.zarr", "Store path or URL, e.g. logits.zarr or s3://bucket/logits.zarr.")
    codec: str = option("fp16", choices=CODECS, record=True)
    batch_size: int = option(256)
    chunk_rows: int = option(1024, record=True)
    precision: str = option("no", choices=PRECISIONS, record=True)
    resolution: int | None = option(
        None, "View side in pixels (default: the teacher weights' own, else the data set's).", record=True
    )
    workers: int = option(2)
    channels_last: bool = option(
        True,
        "NHWC teacher and inputs (on by default: measured as fast or faster for every teacher on a CPU, README).",
        switch=True,
    )
    compile: bool = option(False, "torch.compile the teacher (the first batches compile).", switch=True)
    overwrite: bool = option(
        False,
        "Replace a logit store written by a different command (never a file or a folder that is not a logit store).",
        is_flag=True,
    )

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
        check_values(self.to_dict())
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def missing_data(extra: str = "") -> str:
    """The one line for a command run without ``--data``: no data set is ever assumed."""
    from dhkd_pipe.data.datasets import DATA_SETS

    return f"missing --data: name the data set ({', '.join(DATA_SETS)}){extra}"


@dataclass
class AccuracyBenchConfig:
    """``dhkd-pipe bench accuracy``: the defaults made the table in the README (about 30 minutes on 2 cores)."""

    out: str = option(
        "bench_accuracy", "Folder of the runs, the store and the results; re-running reuses what is finished."
    )
    data: str = option("fashion-mnist", "An in-memory data set (fashion-mnist, fashion-mnist:DIR, mnist:DIR, ...).")
    train_size: int = option(6000, "A fixed stratified subset of the training split.")
    teacher: str = option("resnet20")
    student: str = option("resnet8")
    teacher_epochs: int = option(12)
    epochs: int = option(12, "Student epochs (and the store's view-epochs).")
    seeds: int = option(3, "Seeds of the ce, kd and dhkd rows (the others: seed 0).")
    batch_size: int = option(64)
    lr: float = option(0.05)
    val_every: int = option(4, "Also validate every N epochs (0: the last only).")
    threads: int = option(0, "torch threads (0: one per core).")

    def validate(self) -> "AccuracyBenchConfig":
        for name in ("train_size", "teacher_epochs", "epochs", "seeds", "batch_size"):
            if getattr(self, name) < 1:
                raise DhkdError(f"bad {name} {getattr(self, name)}: must be at least 1")
        if self.threads < 0 or self.val_every < 0:
            raise DhkdError("threads and val_every must not be negative")
        if self.lr <= 0:
            raise DhkdError(f"bad lr {self.lr}: must be positive")
        from dhkd_pipe.data.datasets import SUBSET_MARK

        if SUBSET_MARK in self.data:
            raise DhkdError(f"give the training subset as --train-size, not in --data {self.data!r}")
        check_values(self.to_dict())
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunStart:
    """How a training command treats an existing run in ``--out`` (not part of the run's config)."""

    resume: bool = option(False, "Continue the run in --out exactly where it stopped.", is_flag=True)
    overwrite: bool = option(False, "Replace a finished or stopped run in --out.", is_flag=True)


@dataclass
class StudentSeeds:
    """``distill``'s seeds of several students in one pass (each student's config gets one)."""

    seeds: str | None = option(
        None,
        "With --cache: train each --student with each of these seeds (comma-separated, "
        "e.g. 0,1,2) in one pass over the store, each in OUT/NAME-sSEED; instead of --seed "
        "(see 'Several students' above).",
    )


@dataclass
class StoreLockOptions:
    """``cache-teacher``'s handling of another writer's lock (not part of the store's config)."""

    break_lock: bool = option(
        False,
        "Take over the store's lock held by a process on another host; only when you know that process is gone.",
        is_flag=True,
    )


@dataclass
class EvalConfig:
    """``dhkd-pipe eval``."""

    model: str | None = option(None, required=True)
    weights: str | None = option(None, f"Model weights: {WEIGHTS_HELP}.")
    data: str | None = option(None, data_help("Required."))
    batch_size: int = option(256)
    resolution: int | None = option(
        None, "Input side in pixels (default: the run's recorded one, the weights' own, else the data set's)."
    )


@dataclass
class ExportConfig:
    """``dhkd-pipe export``."""

    run: str | None = option(None, argument=True, required=True)
    fmt: str = option("onnx", choices=EXPORT_FORMATS, flag="--format")
    out: str | None = option(None, "Output file (default: RUN/model.onnx).")
    opset: int | None = option(None, "ONNX opset (default: the exporter's recommended one).")


@dataclass
class InspectConfig:
    """``dhkd-pipe inspect``."""

    store: str | None = option(None, argument=True, required=True)
    as_json: bool = option(False, flag="--json", is_flag=True)
    quick: bool = option(
        False,
        "Check presence and sizes from one listing only, not the checksums (which read every written object once).",
        is_flag=True,
    )


@dataclass
class VerifyCacheConfig:
    """``dhkd-pipe verify-cache``."""

    store: str | None = option(None, argument=True, required=True)
    data: str | None = option(None, "The store's data set, if it has moved (default: the spec the store records).")
    teacher_weights: str | None = option(
        None, "The teacher's weights (default: those the store records; must be the same)."
    )
    samples: int = option(256)
    tolerance: float | None = option(None, "Largest allowed logit difference (default: from the codec).")


@dataclass
class ReportConfig:
    """``dhkd-pipe report``."""

    runs: tuple = option((), argument=True, nargs=-1, required=True)
    out: str = option("report.png")


@dataclass
class QuickstartConfig:
    """``dhkd-pipe quickstart``."""

    out: str = option("runs/quickstart")
    overwrite: bool = option(False, is_flag=True)


@dataclass
class CacheBenchConfig:
    """``dhkd-pipe bench cache``."""

    json_path: str = option("bench_cache.json", flag="--json")
    model: str = option("resnet32x4")
    batch_size: int = option(64)
    steps: int = option(20)
    teacher_weights: str | None = option(
        None, "A trained digits resnet8 teacher for the codec table (default: train one, ~30 s)."
    )
    image_model: str = option(
        "resnet18", "Teacher of the image-folder rows (generated JPEGs at 224 px, DALI); 'none' skips them."
    )
    images: int = option(48, "JPEGs in the generated folder.")
    views: int = option(4, "Views per image of the image-folder rows.")


BENCHMARKS = ("kernels", "cache", "distill", "store")  # what ``bench all`` runs (benchmarks/suite.py)
BENCH_SIZES = ("gpu", "cpu", "tiny")


@dataclass
class AllBenchConfig:
    """``dhkd-pipe bench all``."""

    out: str = option("bench-all", "Folder for bench_all.md, bench_all.json and each benchmark's JSON.")
    size: str | None = option(None, "Sizes to run at (default: gpu on a CUDA machine, else cpu).", choices=BENCH_SIZES)
    tiny: bool = option(
        False, "The same as --size tiny: every benchmark in about a minute (a smoke run).", is_flag=True
    )
    only: tuple = option((), "Run only these (repeatable).", choices=BENCHMARKS, multiple=True)


@dataclass
class DistillBenchConfig:
    """``dhkd-pipe bench distill``."""

    json_path: str = option("bench_distill.json", flag="--json")
    teacher: str = option("resnet32x4")
    student: str = option("resnet8x4")
    batch_size: int = option(64)
    steps: int = option(30)
    students: str | None = option(
        None,
        "Instead: one S-student pass against S solo runs for each S given (e.g. 1,2,4), "
        "on in-memory data and on a JPEG folder, with the loader's share of a step.",
    )
    folder: bool = option(True, "With --students: also the JPEG folder (DALI).", switch=True)
    folder_student: str = option("mobilenet_v3_small", "With --students: the folder's student (and random teacher).")
    folder_batch_size: int = option(16, "With --students: the folder's batch size.")
    image_size: int = option(224, "With --students: the folder's view side in pixels.")


@dataclass
class StoreBenchConfig:
    """``dhkd-pipe bench store``."""

    json_path: str = option("bench_store.json", flag="--json")
    rows: int = option(100_000)
    classes: int = option(1000)
    chunk_rows: int = option(1024)
    codec: str = option("fp16", choices=CODECS)
    batch_size: int = option(256, "Rows per step when streaming, as stage 2 cuts them.")
    urls: tuple = option(
        (),
        "Also measure a store at this URL or path (s3://bucket/x.zarr); it is deleted afterwards.",
        flag="--url",
        multiple=True,
    )
    s3_local: bool = option(
        False, "Also measure against a moto S3 server this command starts on 127.0.0.1.", is_flag=True
    )
    s3_latency_ms: float = option(
        0.0,
        "With --s3-local: also measure with this many milliseconds added to each request "
        "of the local server, as a network round trip adds them (0: only the bare server).",
    )
    local: bool = option(True, "Measure a store in a temporary folder on local disk.", switch=True)
    sharded: bool = option(
        False,
        "Lay the stores out in shards of about 32 MB (16 chunks at K=1000 fp16), as stage 1 does for a "
        "store of 10,000 chunks or more (ImageNet); give --rows for several shards per writer thread.",
        is_flag=True,
    )


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
