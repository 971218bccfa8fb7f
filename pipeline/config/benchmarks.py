"""The configs of ``dhkd-pipe bench``'s commands. Torch-free."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dhkd_pipe.config.values import check_optimizer_scale, check_types
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.option_ranges import check_values
from dhkd_pipe.options import option
from dhkd_pipe.store.codecs import CODECS


@dataclass
class AccuracyBenchConfig:
    """``dhkd-pipe bench accuracy``: the defaults made the tables in CHANGELOG.md."""

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
        check_types(self)
        for name in ("train_size", "teacher_epochs", "epochs", "seeds", "batch_size"):
            if getattr(self, name) < 1:
                raise DhkdError(f"bad {name} {getattr(self, name)}: must be at least 1")
        if self.threads < 0 or self.val_every < 0:
            raise DhkdError("threads and val_every must not be negative")
        if self.lr <= 0:
            raise DhkdError(f"bad lr {self.lr}: must be positive")
        check_optimizer_scale(self.lr, 0.0)
        from dhkd_pipe.data.datasets import SUBSET_MARK

        if SUBSET_MARK in self.data:
            raise DhkdError(f"give the training subset as --train-size, not in --data {self.data!r}")
        check_values(self.to_dict())
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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

    out: str = option(
        "bench-all",
        "Folder for bench_all.md, bench_all.json and each benchmark's JSON; {machine} in it is replaced by this "
        "machine's folder name: --out 'benchmarks/results/{machine}' files results to keep.",
    )
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
class SweepBenchConfig:
    """``dhkd-pipe bench sweep``."""

    json_path: str = option("bench_sweep.json", flag="--json")
    methods: str = option("kd,dhkd", "The sweep's methods, comma-separated.")
    temperatures: str = option("1,4", "The sweep's temperatures, comma-separated: K = methods x temperatures.")
    teacher: str = option("resnet32x4")
    student: str = option("resnet8x4")
    batch_size: int = option(64)
    steps: int = option(20, "Timed steps of each run, after --warmup.")
    warmup: int = option(2)
    folder: bool = option(True, "Also the JPEG folder (DALI).", switch=True)
    folder_student: str = option("mobilenet_v3_small", "The folder's student (and random teacher).")
    folder_batch_size: int = option(16, "The folder's batch size.")
    image_size: int = option(224, "The folder's view side in pixels.")


@dataclass
class ScaleBenchConfig:
    """``dhkd-pipe bench scale``."""

    json_path: str = option(
        "bench_scale.json", "The result file; the log-log plot is written beside it (.png).", flag="--json"
    )
    sizes: str = option(
        "10000,100000,1000000",
        "Store sizes in rows (views x samples), comma-separated; 10000000 where the disk holds 17 GB more.",
    )
    views: int = option(8, "View-epochs per store (ImageNet's stores: 8); rows / views samples each.")
    classes: int = option(1000)
    chunk_rows: int = option(1024)
    codec: str = option("fp16", choices=CODECS)
    batch_size: int = option(256, "Stage 2's batch, for the first batch.")
    local: bool = option(True, "Measure stores in a temporary folder on local disk.", switch=True)
    s3_local: bool = option(
        False, "Also measure on a moto S3 server this command starts on 127.0.0.1, its requests counted.", is_flag=True
    )
    s3_max_rows: int = option(100_000, "With --s3-local: the largest size put there (the server holds it in memory).")
    sharded: bool = option(
        False, "Lay every store out in shards, as stage 1 does a store of 10,000 chunks or more.", is_flag=True
    )
    before: str | None = option(
        None, "The JSON of an earlier run (before a change), shown and plotted beside this one; {machine} as in --json."
    )
    reader_runs: int = option(
        3, "Fresh reader processes per size: each step's time is their median, as one cold run varies by milliseconds."
    )


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
