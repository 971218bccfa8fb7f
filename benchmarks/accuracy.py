"""``dhkd-pipe bench accuracy``: the DHKD paper's comparison in miniature, on Fashion-MNIST.

One teacher, one stage-1 store, then students trained from that store with every method of
``ROWS`` (the seeded rows with ``seeds`` seeds, the others with seed 0), all in this process
through the product's own stages (``train_teacher``, ``cache_teacher``, ``distill_students``: every
student not finished yet trains in one pass over the store, each as it would alone). The table
gives each method's final validation top-1: mean, standard deviation and min-max over its runs.

The training split is a fixed stratified subset of ``train_size`` images (``DATA@N``); the
validation split is the whole test split (Fashion-MNIST's 10,000 t10k images). The store holds as
many view-epochs as the students train epochs, so every epoch sees new views, as online training
would. Students of one seed differ only in their initialisation: the store fixes views and order.

Re-running reuses what is finished (``accuracy_steps``). Each step (teacher, store, each student run) has its folder
under ``out`` and a record ``out/records/STEP.json`` of what it was made from: its config and the
identity of its inputs (the teacher's weights digest for the store, the store's record for a
student). A step whose record matches and which finished is skipped; one that matches but was
stopped resumes; anything else is trained afresh in its folder.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from dhkd_pipe.benchmarks.accuracy_steps import Steps, run_store, run_students, run_training
from dhkd_pipe.benchmarks.measure import machine, write_results
from dhkd_pipe.config import AccuracyBenchConfig, CacheConfig, TrainConfig
from dhkd_pipe.data.datasets import SUBSET_MARK
from dhkd_pipe.files import write_atomic
from dhkd_pipe.models import file_digest
from dhkd_pipe.stages.cache_teacher import cache_teacher
from dhkd_pipe.stages.distill import distill, distill_students
from dhkd_pipe.stages.report import markdown_table, write_method_report
from dhkd_pipe.stages.train_teacher import train_teacher


@dataclass(frozen=True)
class Row:
    """A line of the table: a method with its options; ``seeded`` rows are trained with every seed."""

    name: str
    method: str
    options: tuple[tuple[str, object], ...] = ()
    seeded: bool = False
    online: bool = False  # the teacher runs every step (the feature methods: a store holds no features)

    @property
    def slug(self) -> str:
        return self.name.replace(" --", "-").replace(" ", "-")


ROWS = (
    Row("ce", "ce", seeded=True),
    Row("kd", "kd", seeded=True),
    Row("dkd", "dkd"),
    Row("dist", "dist"),
    Row("binary_kl", "binary_kl"),  # CE and BinaryKL on one head: the paper's collapsing ablation
    Row("dhkd", "dhkd", seeded=True),
    Row("dhkd --grad-align", "dhkd", (("grad_align", True),)),  # published PCGrad over parameters
    Row("dhkd --grad-align-features", "dhkd", (("grad_align_features", True),)),  # the per-sample feature variant
    # feature methods, online from the same teacher's weights
    Row("fitnet", "fitnet", online=True),
    Row("reviewkd", "reviewkd", online=True),
    Row("dhkd_reviewkd", "dhkd_reviewkd", online=True),
)

# Warm-ups of 20 epochs in mdistiller's 240-epoch recipes, scaled to the bench's epochs.
WARMED_UP = ("dkd", "reviewkd", "dhkd_reviewkd")

# Config fields that say where things are, not what they are: left out of the records.
WHERE = {
    "out",
    "cache",
    "weights",
    "teacher_weights",
    "workers",
    "log_with",
    "overwrite",
    "checkpoint_every",
    "max_steps",
}


def data_spec(bench: AccuracyBenchConfig) -> str:
    """The training subset as a data spec: ``DATA@N``."""
    return f"{bench.data}{SUBSET_MARK}{bench.train_size}"


def milestones(epochs: int) -> list[int]:
    """Step decay by 10x at half and three quarters of the epochs (the CIFAR recipes' shape)."""
    return sorted({m for m in (epochs // 2, (3 * epochs) // 4) if 0 < m < epochs})


def _what(cfg) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in WHERE}


def _spread(values: list[float]) -> dict:
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def bench_accuracy(bench: AccuracyBenchConfig, log=print) -> dict:
    """Runs (or reuses) every step, then writes ``bench_accuracy.{json,md,png}`` under ``out``."""
    bench.validate()
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(bench.threads or os.cpu_count() or 1)
    try:
        return _bench(bench, started, log)
    finally:
        torch.set_num_threads(threads_before)


def _bench(bench: AccuracyBenchConfig, started: float, log) -> dict:
    out = bench.out
    os.makedirs(out, exist_ok=True)
    steps = Steps(out)
    rows = ROWS

    def clock() -> float:
        return time.perf_counter() - started

    def say(msg: str):
        log(f"[{clock():7.0f} s] {msg}")

    def train_cfg(**kw) -> TrainConfig:
        base = dict(
            data=data_spec(bench), batch_size=bench.batch_size, lr=bench.lr, val_every=bench.val_every, workers=0
        )
        return TrainConfig(**{**base, **kw}).validate()

    teacher_cfg = train_cfg(
        model=bench.teacher,
        method="ce",
        epochs=bench.teacher_epochs,
        lr_milestones=milestones(bench.teacher_epochs),
        out=os.path.join(out, "teacher"),
    )
    teacher = run_training(steps, "teacher", {"config": _what(teacher_cfg)}, teacher_cfg, train_teacher, say)
    weights = os.path.join(teacher_cfg.out, "model.pt")

    store_cfg = CacheConfig(
        data=data_spec(bench),
        model=bench.teacher,
        weights=weights,
        views=bench.epochs,
        out=os.path.join(out, "logits.zarr"),
        workers=0,
    ).validate()
    store_key = {"config": _what(store_cfg), "teacher_weights": file_digest(weights)}
    store = run_store(steps, store_key, store_cfg, cache_teacher, say)

    students = []  # (row, seed, cfg, step, key) of every student run
    for row in rows:
        for seed in range(bench.seeds if row.seeded else 1):
            cfg, key = student_run(bench, row, seed, train_cfg, store_cfg.out, store_key, weights)
            students.append((row, seed, cfg, f"student-{row.slug}-s{seed}", key))
    # the store's students train together in one pass; the online rows (feature methods) one by one
    cached = [(step, key, cfg) for row, _, cfg, step, key in students if not row.online]
    results = dict(
        zip((step for step, _, _ in cached), run_students(steps, cached, distill_students, say), strict=True)
    )
    for row, _, cfg, step, key in students:
        if row.online:
            results[step] = run_training(steps, step, key, cfg, distill, say)
    runs = []
    for row, seed, cfg, step, _ in students:
        result = results[step]
        runs.append(
            {
                "row": row.name,
                "method": row.method,
                "options": dict(row.options),
                "seed": seed,
                "dir": cfg.out,
                "top1": result["summary"]["val_top1"],
                "images_per_sec": result["summary"]["images_per_sec"],
                "wall_s": result["wall_s"],
                "reused": result["reused"],
            }
        )
        say(f"{row.name} seed {seed}: top-1 {runs[-1]['top1']:.2f}%")

    return _write_results(bench, teacher, store, runs, rows, clock())


def student_run(
    bench, row: Row, seed: int, train_cfg, store: str, store_key: dict, weights: str
) -> tuple[TrainConfig, dict]:
    """A row's student config and the key of its record: from the store, or online from the
    teacher's weights file (``row.online``), whose digest is then in the key."""
    options = dict(row.options)
    if row.method in WARMED_UP:
        options["warmup_epochs"] = max(1, round(bench.epochs * 20 / 240))
    source = dict(teacher=bench.teacher, teacher_weights=weights) if row.online else dict(cache=store)
    cfg = train_cfg(
        model=bench.student,
        method=row.method,
        epochs=bench.epochs,
        seed=seed,
        lr_milestones=milestones(bench.epochs),
        out=os.path.join(bench.out, "students", f"{row.slug}-s{seed}"),
        **source,
        **options,
    )
    key = {"config": _what(cfg), **({"teacher_weights": file_digest(weights)} if row.online else {"store": store_key})}
    return cfg, key


def _write_results(bench, teacher, store, runs, rows, invocation_s) -> dict:
    out = bench.out
    teacher_top1 = teacher["summary"]["val_top1"]
    methods = []
    for row in rows:
        mine = [r for r in runs if r["row"] == row.name]
        methods.append(
            {
                "name": row.name,
                "method": row.method,
                "options": dict(row.options),
                "seeds": [r["seed"] for r in mine],
                "top1": [r["top1"] for r in mine],
                **_spread([r["top1"] for r in mine]),
                "images_per_sec": statistics.median(r["images_per_sec"] for r in mine),
                "wall_s": sum(r["wall_s"] for r in mine),
            }
        )
    ce_mean = next((m["mean"] for m in methods if m["name"] == "ce"), None)
    for m in methods:
        m["vs_ce"] = m["mean"] - ce_mean if ce_mean is not None else None
    wall = {"teacher": teacher["wall_s"], "store": store["wall_s"], "students": sum(r["wall_s"] for r in runs)}
    wall["total"] = sum(wall.values())
    wall["this_invocation"] = invocation_s
    settings = asdict(bench)
    settings.update(
        data_spec=data_spec(bench),
        views=bench.epochs,
        teacher_lr_milestones=milestones(bench.teacher_epochs),
        lr_milestones=milestones(bench.epochs),
    )
    result = {
        "bench": "accuracy",
        "machine": {**machine(), "torch_threads": bench.threads or os.cpu_count()},
        "settings": settings,
        "teacher": {
            "arch": bench.teacher,
            "val_top1": teacher_top1,
            "wall_s": teacher["wall_s"],
            "reused": teacher["reused"],
        },
        "store": {
            "path": os.path.join(out, "logits.zarr"),
            "views": bench.epochs,
            "wall_s": store["wall_s"],
            "reused": store["reused"],
            "bytes_on_disk": store["summary"].get("bytes_on_disk"),
        },
        "methods": methods,
        "runs": runs,
        "wall_s": wall,
    }
    title = (
        f"{bench.data}, {bench.train_size} training images (fixed stratified subset), validated on the whole "
        f"test split: {bench.teacher} teacher {teacher_top1:.2f}%, {bench.student} students from the store "
        f"(the feature methods online from the same teacher), {bench.epochs} epochs"
    )
    table = markdown_table(
        methods,
        [
            ("name", "method", "s"),
            ("n", "runs", "d"),
            ("mean", "top-1 mean", ".2f"),
            ("std", "std", ".2f"),
            ("min", "min", ".2f"),
            ("max", "max", ".2f"),
            ("vs_ce", "vs ce", "+.2f"),
            ("images_per_sec", "img/s", ".0f"),
            ("wall_s", "wall s", ".0f"),
        ],
    )
    stages = markdown_table(
        [
            {"stage": f"teacher {bench.teacher} ({bench.teacher_epochs} epochs)", "wall_s": wall["teacher"]},
            {"stage": f"store ({bench.epochs} views)", "wall_s": wall["store"]},
            {"stage": f"students ({len(runs)} runs)", "wall_s": wall["students"]},
            {"stage": "total", "wall_s": wall["total"]},
        ],
        [("stage", "stage", "s"), ("wall_s", "wall s", ".0f")],
    )
    markdown = (
        f"{title}.\n\nTop-1 (%) at the last epoch; std over runs (seeds 0..{bench.seeds - 1} for "
        f"{', '.join(r.name for r in rows if r.seeded)}, seed 0 for the others).\n\n{table}\n\n{stages}\n"
    )
    picture = os.path.join(out, "bench_accuracy.png")
    groups = [(m["name"], [r["dir"] for r in runs if r["row"] == m["name"]]) for m in methods]
    write_method_report(groups, picture, title=title, reference=(f"teacher {bench.teacher}", teacher_top1))
    result["files"] = {
        "json": os.path.join(out, "bench_accuracy.json"),
        "markdown": os.path.join(out, "bench_accuracy.md"),
        "png": picture,
    }
    write_atomic(result["files"]["markdown"], lambda f: f.write(markdown), mode="w")
    write_results(result["files"]["json"], result, log=lambda *_: None)
    result["markdown"] = markdown
    return result
