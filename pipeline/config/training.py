"""The configs of the training commands (``train-teacher``, ``distill``): ``TrainConfig``, and the
options of a command line that are not part of a run's config (``RunStart``, ``StudentSeeds``,
``SweepOptions``, ``PassMemory``).
Torch-free."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dhkd_pipe.config.common import PRECISIONS, WEIGHTS_HELP, data_help, missing_data
from dhkd_pipe.config.values import check_optimizer_scale, check_types
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.methods.names import BACKENDS, KD_LOSS_NAMES
from dhkd_pipe.methods.registry import METHODS, method_option_fields
from dhkd_pipe.models.aux_heads import AUX_HEADS
from dhkd_pipe.option_ranges import check_values
from dhkd_pipe.options import option

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
        sweep=True,
    )
    method: str = option(
        "ce", "Distillation method (see above).", choices=tuple(METHODS), commands=_DISTILL, sweep=True
    )
    teacher: str | None = option(None, "Teacher architecture (online distillation).", commands=_DISTILL)
    teacher_weights: str | None = option(
        None, f"Teacher weights (online distillation): {WEIGHTS_HELP}.", commands=_DISTILL
    )
    cache: str | None = option(
        None,
        "Stage-1 logit store (a path or a URL: s3://, gs://, file://): distil with no teacher forward pass.",
        commands=_DISTILL,
    )
    aux_head: str = option("linear", choices=AUX_HEADS, commands=_DISTILL, sweep=True)
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
        sweep=True,
    )
    # this project's per-sample feature variant (AlignedSplit)
    grad_align_features: bool = option(
        False,
        "dhkd only: this project's per-sample variant (not the published algorithm): "
        "aligns only the gradient reaching the shared features, row by row. Excludes "
        "--grad-align.",
        switch=True,
        commands=_DISTILL,
        sweep=True,
    )
    kernels: str = option(
        "auto", "Fused Triton losses (CUDA) or the PyTorch reference.", choices=BACKENDS, commands=_DISTILL
    )
    out: str = option("runs/run", "Run folder.")
    epochs: int = option(240)
    batch_size: int = option(64)
    lr: float = option(0.05, sweep=True)
    momentum: float = option(0.9, sweep=True)
    weight_decay: float = option(5e-4, sweep=True)
    lr_milestones: list[int] = option(
        help="Epochs at which the learning rate decays, e.g. 150,180,210.",
        default_factory=lambda: [150, 180, 210],
        sweep=True,
    )
    lr_decay: float = option(0.1, sweep=True)
    precision: str = option("no", choices=PRECISIONS)
    seed: int = option(0, sweep=True)
    workers: int = option(2, "Loader worker processes (DALI); at most one per usable CPU core, more are clamped.")
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
        "NHWC weights and inputs (default: on a CUDA device, where it is faster; off on the CPU, where it is not "
        "reliably faster; bench distill compares both on your machine).",
        switch=True,
    )
    compile: bool = option(
        False, "torch.compile the student (through Accelerate; the first steps compile).", switch=True
    )

    def validate(self) -> "TrainConfig":
        check_types(self)

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
        check_optimizer_scale(
            self.lr, self.weight_decay, self.lr_decay, sum(1 for m in self.lr_milestones if m < self.epochs)
        )
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
class SweepOptions:
    """``distill``'s sweep file (not part of a run's config)."""

    sweep: str | None = option(
        None,
        "With --cache: a YAML sweep file, a grid (option: [values, ...]; its product taken with the command "
        "line's) or a list of runs (- option: value ...); see 'Sweeps' above.",
    )


@dataclass
class PassMemory:
    """The memory check of a pass of several runs (``distill``'s sweeps, ``tune``'s passes)."""

    memory_limit: float | None = option(
        None,
        "With several runs: the memory in GiB the pass may take, instead of the device's free memory "
        "(GPU, else available RAM) that its estimate is checked against; 0 skips the check.",
    )
