"""``dhkd-pipe bench distill``: online distillation, cached DHKD and the student alone, each through
the training engine, and the loader alone, on a synthetic CIFAR-100-shaped folder; one run in one
process, so the ratios compare like with like."""

from __future__ import annotations

import os
import tempfile
import time

from dhkd_pipe.benchmarks.measure import clock, machine, print_table, write_results
from dhkd_pipe.benchmarks.synthetic import random_teacher, write_synthetic_cifar
from dhkd_pipe.config import CacheConfig, TrainConfig
from dhkd_pipe.training.engine import train
from dhkd_pipe.training.run import prepare


def _timed_training(cfg: TrainConfig, warmup: int) -> dict:
    """Images per second of the engine's steps after ``warmup`` steps, and over the whole run from
    the start of training (compiling included) (one run, one process)."""
    ends = []
    run = prepare(cfg, mode="overwrite")
    start = clock(run.accelerator.device)
    train(run, log=lambda *_: None, on_step_end=lambda epoch, step: ends.append(clock(run.accelerator.device)))
    steady = ends[warmup:]
    return {
        "images_per_sec": cfg.batch_size * (len(steady) - 1) / (steady[-1] - steady[0]),
        "run_images_per_sec": cfg.batch_size * len(ends) / (ends[-1] - start),
    }


def _timed_loader(run, steps: int) -> float:
    """Loader alone: views rendered and logits streamed, no model."""
    it = run.loader.epoch(0)
    first = next(it)
    t0, n = time.perf_counter(), 0
    for i, batch in enumerate(it):
        n += len(batch.labels)
        if batch.teacher is not None:
            batch.teacher.sum()  # touch the logits so a lazy copy is paid for
        if i + 1 >= steps:
            break
    del first
    return n / (clock(run.accelerator.device) - t0)


def bench_distill(
    json_path: str,
    teacher: str = "resnet32x4",
    student: str = "resnet8x4",
    batch_size: int = 64,
    steps: int = 30,
    warmup: int = 3,
    compile_row: bool = True,
):
    from dhkd_pipe.stages.cache_teacher import cache_teacher

    work = tempfile.mkdtemp(prefix="dhkd-bench-")
    per_epoch = steps + warmup + 2
    data = write_synthetic_cifar(os.path.join(work, "cifar"), num_train=per_epoch * batch_size)
    weights = random_teacher(teacher, 100, os.path.join(work, "teacher.pt"))
    store = os.path.join(work, "logits.zarr")
    cache_teacher(
        CacheConfig(data=data, model=teacher, weights=weights, views=1, out=store, batch_size=batch_size).validate(),
        log=lambda *_: None,
    )

    def cfg(name, method, channels_last=False, **kw):  # NCHW unless a row says otherwise, on every device
        return TrainConfig(
            data=data,
            model=student,
            method=method,
            batch_size=batch_size,
            epochs=1,
            max_steps=warmup + steps,
            out=os.path.join(work, name),
            channels_last=channels_last,
            **kw,
        ).validate()

    rows = [
        {
            "path": "online DHKD (teacher forward every step)",
            **_timed_training(cfg("online", "dhkd", teacher=teacher, teacher_weights=weights), warmup),
        },
        {"path": "cached DHKD (logits from the store)", **_timed_training(cfg("cached", "dhkd", cache=store), warmup)},
        {
            "path": "student alone, CE (same loader, stored views)",
            **_timed_training(cfg("alone", "ce", cache=store), warmup),
        },
    ]
    loader_run = prepare(cfg("loader", "dhkd", cache=store), mode="overwrite")
    rows.append({"path": "loader only (views + logits, no model)", "images_per_sec": _timed_loader(loader_run, steps)})
    # timm's speed switches on the cached path; compiling happens in the warm-up steps
    rows.append(
        {
            "path": "cached DHKD, --channels-last (the default on CUDA)",
            **_timed_training(cfg("channels-last", "dhkd", cache=store, channels_last=True), warmup),
        }
    )
    if compile_row:
        rows.append(
            {
                "path": "cached DHKD, --compile (student)",
                **_timed_training(cfg("compile", "dhkd", cache=store, compile=True), warmup),
            }
        )
    # a feature method cannot use the store: online ReviewKD against online DHKD (its connector and the teacher's taps)
    rows.append(
        {
            "path": "online ReviewKD (teacher features every step)",
            **_timed_training(cfg("reviewkd", "reviewkd", teacher=teacher, teacher_weights=weights), warmup),
        }
    )
    online, cached, alone, loader, channels_last = (r["images_per_sec"] for r in rows[:5])
    reviewkd = rows[-1]["images_per_sec"]
    ratios = {
        "reviewkd_over_online_dhkd": reviewkd / online,
        "cached_over_alone": cached / alone,
        "cached_over_online": cached / online,
        "loader_over_cached": loader / cached,
        "channels_last_over_cached": channels_last / cached,
    }
    if compile_row:
        ratios["compile_over_cached"] = rows[5]["images_per_sec"] / cached
    for r in rows:
        r["vs_cached"] = r["images_per_sec"] / cached
        if r.get("run_images_per_sec"):  # the whole run, compiling included
            r["run_vs_cached"] = r["run_images_per_sec"] / rows[1]["run_images_per_sec"]
    print_table(
        f"bench distill: {teacher} -> {student}, batch {batch_size}, {steps} timed steps, 32x32, 100 classes, "
        f"NCHW unless said, {machine()['device']}",
        rows,
        [
            ("path", "path", "s"),
            ("images_per_sec", "img/s", ".1f"),
            ("vs_cached", "x cached", ".2f"),
            ("run_images_per_sec", "img/s, whole run", ".1f"),
            ("run_vs_cached", "x cached, whole run", ".2f"),
        ],
    )
    print("\n" + "  ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    write_results(
        json_path,
        {
            "bench": "distill",
            "machine": machine(),
            "teacher": teacher,
            "student": student,
            "batch_size": batch_size,
            "steps": steps,
            "rows": rows,
            "ratios": ratios,
        },
    )
    return rows, ratios
