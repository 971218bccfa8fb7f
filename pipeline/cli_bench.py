"""``dhkd-pipe bench``: the benchmark commands. Each parses its options into its config and calls
its benchmark in ``dhkd_pipe.benchmarks``; ``cli.py`` adds the group to the command line."""

from __future__ import annotations

import click

from dhkd_pipe.command_line import config_command, config_from, user_errors
from dhkd_pipe.config import (
    AccuracyBenchConfig,
    AllBenchConfig,
    CacheBenchConfig,
    DistillBenchConfig,
    ScaleBenchConfig,
    StoreBenchConfig,
    SweepBenchConfig,
)


@click.group("bench")
def bench():
    """Benchmarks: print a table and write JSON."""


@config_command(bench, "cache", CacheBenchConfig)
@user_errors
def bench_cache_cmd(**options):
    """Stage-1 images/s against the teacher's bare forward pass (in-memory data and a JPEG folder,
    with images decoded per stored row and decoding alone); bytes per logit per codec."""
    from dhkd_pipe.benchmarks.cache import bench_cache

    cfg = config_from(CacheBenchConfig, options)
    bench_cache(
        cfg.json_path,
        model=cfg.model,
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        teacher_weights=cfg.teacher_weights,
        image_model=None if cfg.image_model == "none" else cfg.image_model,
        images=cfg.images,
        views=cfg.views,
    )


@config_command(bench, "accuracy", AccuracyBenchConfig)
@user_errors
def bench_accuracy_cmd(**options):
    """The paper's comparison in miniature: one teacher, one store, students by method and seed."""
    from dhkd_pipe.benchmarks.accuracy import bench_accuracy

    result = bench_accuracy(config_from(AccuracyBenchConfig, options))
    click.echo("\n" + result["markdown"] + f"\nwrote {', '.join(result['files'].values())}")


@config_command(bench, "all", AllBenchConfig)
@user_errors
def bench_all_cmd(**options):
    """Every benchmark in one command (kernels, stage 1 in memory and on a JPEG folder, distill,
    store): one markdown table and one JSON naming the device. The command to run on a GPU."""
    from dhkd_pipe.benchmarks.suite import bench_all

    cfg = config_from(AllBenchConfig, options)
    bench_all(cfg.out, size="tiny" if cfg.tiny else cfg.size, only=tuple(cfg.only))


@config_command(bench, "distill", DistillBenchConfig)
@user_errors
def bench_distill_cmd(**options):
    """Online vs cached DHKD vs the student alone; loader-only throughput. With --students: one
    S-student pass against S solo runs (wall time, step time, the loader's share of a step)."""
    cfg = config_from(DistillBenchConfig, options)
    if cfg.students is not None:
        from dhkd_pipe.benchmarks.students import bench_students
        from dhkd_pipe.training.students import int_list

        bench_students(
            cfg.json_path,
            int_list("--students", cfg.students),
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            student=cfg.student,
            teacher=cfg.teacher,
            folder_student=cfg.folder_student,
            folder_batch_size=cfg.folder_batch_size,
            image_size=cfg.image_size,
            folder=cfg.folder,
        )
        return
    from dhkd_pipe.benchmarks.distill import bench_distill

    bench_distill(cfg.json_path, teacher=cfg.teacher, student=cfg.student, batch_size=cfg.batch_size, steps=cfg.steps)


@config_command(bench, "sweep", SweepBenchConfig)
@user_errors
def bench_sweep_cmd(**options):
    """A K-run sweep (--methods x --temperatures) in one pass against the K runs alone, from one
    store, in memory and on a JPEG folder: wall time, step time, the loader's share of a step."""
    from dhkd_pipe.benchmarks.sweep import bench_sweep

    cfg = config_from(SweepBenchConfig, options)
    bench_sweep(
        cfg.json_path,
        cfg.methods,
        cfg.temperatures,
        steps=cfg.steps,
        warmup=cfg.warmup,
        batch_size=cfg.batch_size,
        student=cfg.student,
        teacher=cfg.teacher,
        folder=cfg.folder,
        folder_student=cfg.folder_student,
        folder_batch_size=cfg.folder_batch_size,
        image_size=cfg.image_size,
    )


@config_command(bench, "store", StoreBenchConfig)
@user_errors
def bench_store_cmd(**options):
    """Store write and read rows/s of one process (stage 1's writer, stage 2's streaming), local and at URLs."""
    from dhkd_pipe.benchmarks.store import bench_store

    cfg = config_from(StoreBenchConfig, options)
    bench_store(
        cfg.json_path,
        rows=cfg.rows,
        classes=cfg.classes,
        chunk_rows=cfg.chunk_rows,
        codec=cfg.codec,
        batch_size=cfg.batch_size,
        urls=tuple(cfg.urls),
        s3_local=cfg.s3_local,
        local=cfg.local,
        s3_latency_ms=cfg.s3_latency_ms,
        sharded=cfg.sharded,
    )


@config_command(bench, "scale", ScaleBenchConfig)
@user_errors
def bench_scale_cmd(**options):
    """How the store's costs grow with its size: per size, on disk and on a local S3 server, the
    write, open, inspect --quick, inspect, a resume, the audit and stage 2's first batch, with the
    reader's memory and the S3 requests; a table, a JSON and a log-log plot."""
    from dhkd_pipe.benchmarks.scale import bench_scale, parse_sizes

    cfg = config_from(ScaleBenchConfig, options)
    bench_scale(
        cfg.json_path,
        sizes=parse_sizes(cfg.sizes),
        views=cfg.views,
        classes=cfg.classes,
        chunk_rows=cfg.chunk_rows,
        codec=cfg.codec,
        batch_size=cfg.batch_size,
        local=cfg.local,
        s3_local=cfg.s3_local,
        s3_max_rows=cfg.s3_max_rows,
        sharded=cfg.sharded,
        before=cfg.before,
        reader_runs=cfg.reader_runs,
    )
