"""The configs of the commands that do not train: stage 1 (``CacheConfig``, ``StoreLockOptions``),
``eval``, ``export``, ``inspect``, ``verify-cache``, ``report``, ``quickstart``. Torch-free."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dhkd_pipe.config.common import EXPORT_FORMATS, PRECISIONS, WEIGHTS_HELP, data_help, missing_data
from dhkd_pipe.config.values import check_types
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.option_ranges import check_values
from dhkd_pipe.options import option
from dhkd_pipe.store.codecs import CODECS


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
    workers: int = option(2, "Image reader processes (DALI); at most one per usable CPU core, more are clamped.")
    channels_last: bool = option(
        True,
        "NHWC teacher and inputs (on by default: as fast or faster for the teachers tried, with the logits within "
        "the fp16 codec's tolerance; bench cache compares both formats on your machine).",
        switch=True,
    )
    compile: bool = option(False, "torch.compile the teacher (the first batches compile).", switch=True)
    skip_corrupt: bool = option(
        False,
        "Image folders: decode every image fully first (one decode of the folder, in parallel) and leave out "
        "those that are corrupt (damaged, truncated or unreadable) instead of refusing them; the store records "
        "which, and distill and verify-cache leave out the same.",
        is_flag=True,
        record=True,
    )
    overwrite: bool = option(
        False,
        "Replace a logit store written by a different command (never a file or a folder that is not a logit store).",
        is_flag=True,
    )

    def validate(self) -> "CacheConfig":
        check_types(self)
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
        "Only the metadata and which write units are done (one listing of the done flags): as fast for a "
        "store of any size; no object is checked.",
        is_flag=True,
    )
    no_checksums: bool = option(
        False,
        "Check every object's presence and size from one listing, not its checksums (which read every "
        "written object once).",
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
