"""``dhkd-pipe``: parses options and calls the stages; user errors are one line and exit code 2."""

from __future__ import annotations

import json
import sys

import click

from dhkd_pipe.command_line import ConfigCommand, OneLineGroup, user_errors
from dhkd_pipe.config import (
    AccuracyBenchConfig,
    AllBenchConfig,
    CacheBenchConfig,
    CacheConfig,
    DistillBenchConfig,
    EvalConfig,
    ExportConfig,
    InspectConfig,
    QuickstartConfig,
    ReportConfig,
    RunStart,
    ScaleBenchConfig,
    StoreBenchConfig,
    StoreLockOptions,
    StudentSeeds,
    SweepBenchConfig,
    SweepOptions,
    TrainConfig,
    TuneOptions,
    VerifyCacheConfig,
    build_config,
)
from dhkd_pipe.errors import DhkdError, one_line
from dhkd_pipe.methods.registry import METHODS, OPTIONS
from dhkd_pipe.options import click_params, given


def _echo_json(obj):
    """Strict JSON (a non-finite number is null, never NaN)."""
    from dhkd_pipe.files import json_safe

    click.echo(json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False))


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dhkd-pipe")
def main():
    """dhkd-pipe: cache a teacher's logits once, distil many students from the store (DHKD)."""


# the one option that is no config field: the recipe the others override
CONFIG_FILE = click.Option(
    ["--config", "config_file"], type=click.Path(dir_okay=False), help="YAML recipe; options given here override it."
)


def _params(cls, command: str, first: tuple[str, ...] = (), extra: tuple = (), sweeps: bool = False) -> list:
    """``cls``'s options that ``command`` offers: those named in ``first`` first (in that order),
    then ``--config`` where a recipe applies, the rest in declaration order, then ``extra``'s.
    ``sweeps``: the options declared ``sweep`` take comma-separated values (``options.click_params``)."""
    params = click_params(cls, command, sweeps=sweeps)
    head = sorted((p for p in params if p.name in first), key=lambda p: first.index(p.name))
    recipe = [CONFIG_FILE] if cls in (TrainConfig, CacheConfig) else []
    more = [p for e in extra for p in click_params(e, command)]
    return head + recipe + [p for p in params if p.name not in first] + more


def _train_config(config_file, defaults=None, **options) -> TrainConfig:
    options.pop("resume"), options.pop("overwrite")
    return build_config(TrainConfig, config_file, options, defaults)


TEACHER_FIXED = {"method": "ce"}  # train-teacher trains with cross-entropy, whatever a recipe says
DISTILL_DEFAULTS = {"method": "dhkd"}
DISTILL_FIRST = (
    "model",
    "teacher",
    "teacher_weights",
    "cache",
    "method",
    *OPTIONS,
    "aux_head",
    "grad_align",
    "grad_align_features",
    "kernels",
)


@main.command(
    "train-teacher",
    cls=ConfigCommand,
    config_cls=TrainConfig,
    fixed=TEACHER_FIXED,
    params=_params(TrainConfig, "train-teacher", ("model",), extra=(RunStart,)),
)
@user_errors
def train_teacher_cmd(config_file, resume, overwrite, **options):
    """Train a model alone with cross-entropy (a teacher for later distillation)."""
    from dhkd_pipe.stages.train_teacher import train_teacher
    from dhkd_pipe.training.run_folder import RunMode

    cfg = _train_config(config_file, resume=resume, overwrite=overwrite, **TEACHER_FIXED, **options)
    _echo_json(_short(train_teacher(cfg, mode=RunMode.from_flags(bool(resume), bool(overwrite)))))


def _distill_help() -> str:
    width = max(len(name) for name in METHODS)
    lines = "\n".join(f"  {name:<{width}}  {cls.summary}" for name, cls in METHODS.items())
    flags = ", ".join("--" + name.replace("_", "-") for name in OPTIONS)
    return (
        "Distil a student, online from a teacher or from a stage-1 store (--cache).\n\n"
        f"Methods (--method; default dhkd). What {flags} set depends on the method (each option's help says it, with "
        "each method's default); an option the method does not take is refused.\n\n\b\n" + lines + "\n\n"
        "Several students (with --cache): --student A,B (comma-separated) and/or --seeds 0,1,2 train every student "
        "with every seed in one pass over the store (each batch rendered and its logits read once), each in "
        "OUT/NAME (OUT/NAME-sSEED with --seeds) with its own optimizer, metrics, checkpoint, --resume and export, "
        "exactly as if run alone; a student whose loss is not finite stops alone and is named at the end (exit 2)."
        "\n\nSweeps (with --cache): " + ", ".join(_sweeps(on_command_line=True)) + " take comma-separated values "
        "(a --sweep FILE may set them and " + ", ".join(_sweeps(on_command_line=False)) + "), e.g. "
        "--method kd,dhkd --temperature 1,2,4 --seeds 0,1: the whole product trains in one pass, each run in "
        "OUT/NAME, NAME the values it differs in (method=kd,temperature=2,seed=0), each equal to its solo run; "
        "OUT/sweep.json lists the runs for 'dhkd-pipe report OUT'. The other options are one for every run. "
        "Before any folder is created the pass's memory (parameters, gradients, optimizer state, one batch's "
        "activations) is estimated and a pass over the device's free memory refused (--memory-limit)."
    )


def _sweeps(on_command_line: bool) -> list[str]:
    """The flags of the options that sweep: with comma-separated values, or (switches and lists)
    in a sweep file only."""
    from dhkd_pipe.options import flag_of, listed_on_command_line, option_fields, sweepable

    return [
        flag_of(f, "distill")
        for f in option_fields(TrainConfig)
        if sweepable(f) and listed_on_command_line(f) == on_command_line
    ]


@main.command(
    "distill",
    cls=ConfigCommand,
    config_cls=TrainConfig,
    defaults=DISTILL_DEFAULTS,
    help=_distill_help(),
    params=_params(TrainConfig, "distill", DISTILL_FIRST, extra=(StudentSeeds, SweepOptions, RunStart), sweeps=True),
)
@user_errors
def distill_cmd(config_file, resume, overwrite, seeds, sweep, memory_limit, **options):
    from dhkd_pipe.stages.distill import check_finished, distill, distill_sweep
    from dhkd_pipe.training.run_folder import RunMode
    from dhkd_pipe.training.students import seed_list
    from dhkd_pipe.training.sweep import merge, read_sweep_file, split_command_line, sweep_runs

    seed_values = seed_list(seeds, options["seed"])
    options, grid = split_command_line(options)
    if seed_values is not None:
        grid["seed"] = seed_values
    file_grid, file_runs = read_sweep_file(sweep) if sweep else ({}, [{}])
    grid = merge(grid, file_grid, file_runs, sweep)
    cfg = _train_config(config_file, DISTILL_DEFAULTS, resume=resume, overwrite=overwrite, **options)
    mode = RunMode.from_flags(bool(resume), bool(overwrite))
    if not grid and file_runs == [{}]:
        _echo_json(_short(distill(cfg, mode=mode)))
        return
    results = distill_sweep(sweep_runs(cfg, grid, file_runs), mode=mode, memory_limit=memory_limit)
    _echo_json({out: ({"error": str(r)} if isinstance(r, DhkdError) else _short(r)) for out, r in results.items()})
    check_finished(results)


TUNE_DEFAULTS = {**DISTILL_DEFAULTS, "out": "runs/study"}


@main.command(
    "tune",
    cls=ConfigCommand,
    config_cls=TrainConfig,
    defaults=TUNE_DEFAULTS,
    params=_params(TrainConfig, "distill", DISTILL_FIRST, extra=(TuneOptions,)),
)
@user_errors
def tune_cmd(config_file, **options):
    """An Optuna study over the options that sweep (--space FILE), from a stage-1 store (--cache).

    Trials are sampled (TPE by default; random, grid) and trained --per-pass at a time in one pass over
    the store, each in OUT/trial-NNNN; each reports its validation top-1 at every epoch's end, and a
    trial the pruner prunes (median by default; successive halving, Hyperband, a threshold) stops there
    while the pass goes on. The study lives in Optuna's storage (OUT/study.db, or --storage URL shared
    by tune processes on several machines): tune resumes after a kill (the killed trials are marked
    failed and re-queued, resuming from their checkpoints) and stops at --trials ended trials. The
    other options are the trials' training options, as distill takes them; 'dhkd-pipe report OUT'
    shows the leaderboard."""
    import dataclasses

    from dhkd_pipe.stages.tune import tune

    names = [f.name for f in dataclasses.fields(TuneOptions)]
    opts = build_config(TuneOptions, None, given({name: options.pop(name) for name in names}))
    cfg = build_config(TrainConfig, config_file, options, TUNE_DEFAULTS)
    _echo_json(tune(cfg, opts))


def _short(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "config"}


def _command(group, name: str, config_cls, **kwargs):
    """A command whose options are ``config_cls``'s, each declared once, there."""
    return group.command(name, cls=ConfigCommand, config_cls=config_cls, params=_params(config_cls, name), **kwargs)


def _config(cls, options: dict):
    return build_config(cls, None, given(options))


@_command(main, "eval", EvalConfig)
@user_errors
def eval_cmd(**options):
    """Top-1 and top-5 accuracy on the validation split."""
    from dhkd_pipe.stages.evaluate import evaluate

    cfg = _config(EvalConfig, options)
    _echo_json(evaluate(cfg.model, cfg.weights, cfg.data, cfg.batch_size, resolution=cfg.resolution))


@_command(main, "export", ExportConfig)
@user_errors
def export_cmd(**options):
    """Export a run's student (single head) for deployment; checks it against PyTorch.

    Training already writes RUN/model.safetensors; this adds an ONNX file with a dynamic batch
    axis and, where onnxruntime is installed, runs it on a test batch and reports the largest
    difference from PyTorch's logits (exit 1 if over the tolerance).
    """
    from dhkd_pipe.stages.export import export_onnx

    cfg = _config(ExportConfig, options)
    result = export_onnx(cfg.run, cfg.out, opset=cfg.opset)
    _echo_json(result)
    if result["ok"] is False:
        sys.exit(1)


@main.command("models")
def models_cmd():
    """List the registered architectures: 32-pixel CIFAR models and ImageNet ones."""
    from dhkd_pipe.stages.models import model_listing

    for line in model_listing():
        click.echo(line)


@main.command(
    "cache-teacher",
    cls=ConfigCommand,
    config_cls=CacheConfig,
    params=_params(CacheConfig, "cache-teacher", extra=(StoreLockOptions,)),
)
@user_errors
def cache_teacher_cmd(config_file, break_lock, **options):
    """Stage 1: run the teacher once over seeded views and write the logit store.

    Re-run on an existing store, the same command resumes it: it verifies the chunks already
    written (presence and checksums) and rewrites damaged ones. One process writes a store at a
    time (its lock object, STORE/.lock, names the writer)."""
    from dhkd_pipe.stages.cache_teacher import cache_teacher

    cfg = build_config(CacheConfig, config_file, options)
    _echo_json(cache_teacher(cfg, break_lock=bool(break_lock)))


@_command(main, "inspect", InspectConfig)
@user_errors
def inspect_cmd(**options):
    """What a logit store holds (STORE: a path or a URL such as s3://bucket/logits.zarr), and what
    of it is damaged: every written object is checked (present, and its CRC32C checksums right).
    A damaged store exits 1, with one line on stderr naming the fix."""
    from dhkd_pipe.stages.inspect import inspect_store

    cfg = _config(InspectConfig, options)
    result = inspect_store(cfg)
    if cfg.as_json:
        _echo_json(result.summary)
    else:
        for line in result.lines():
            click.echo(line)
    if result.error:
        click.echo(one_line(result.error), err=True)
        sys.exit(1)


@_command(main, "verify-cache", VerifyCacheConfig)
@user_errors
def verify_cache_cmd(**options):
    """Re-render sampled views, re-run the teacher and compare with the store (a path or a URL)."""
    from dhkd_pipe.stages.cache_teacher import verify_cache

    cfg = _config(VerifyCacheConfig, options)
    result = verify_cache(cfg.store, cfg.data, cfg.teacher_weights, samples=cfg.samples, tolerance=cfg.tolerance)
    _echo_json(result)
    if not result["ok"]:
        sys.exit(1)


@_command(main, "report", ReportConfig)
@user_errors
def report_cmd(**options):
    """Plot validation accuracy and training loss per epoch of runs; print a markdown table.

    Given a sweep's folder (distill --cache with several runs) or a study's (tune): its leaderboard,
    runs sorted by final top-1 (mean and std over seeds), what they differ in, the epochs each ran and
    why it stopped; OUT's name with .md and .json beside the picture, and OUT-OPTION pictures of
    top-1 against each swept option."""
    from dhkd_pipe.stages.leaderboard import is_leaderboard_folder, write_leaderboard
    from dhkd_pipe.stages.report import write_report

    cfg = _config(ReportConfig, options)
    if len(cfg.runs) == 1 and is_leaderboard_folder(cfg.runs[0]):
        click.echo(write_leaderboard(cfg.runs[0], cfg.out))
        return
    click.echo(write_report(list(cfg.runs), cfg.out))


@_command(main, "quickstart", QuickstartConfig)
@user_errors
def quickstart_cmd(**options):
    """The whole job on the bundled digits: teacher, cache, ce/kd/dhkd students, report."""
    from dhkd_pipe.stages.quickstart import quickstart

    cfg = _config(QuickstartConfig, options)
    quickstart(cfg.out, overwrite=cfg.overwrite)


@main.group("bench")
def bench():
    """Benchmarks: print a table and write JSON."""


@_command(bench, "cache", CacheBenchConfig)
@user_errors
def bench_cache_cmd(**options):
    """Stage-1 images/s against the teacher's bare forward pass (in-memory data and a JPEG folder,
    with images decoded per stored row and decoding alone); bytes per logit per codec."""
    from dhkd_pipe.benchmarks.cache import bench_cache

    cfg = _config(CacheBenchConfig, options)
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


@_command(bench, "accuracy", AccuracyBenchConfig)
@user_errors
def bench_accuracy_cmd(**options):
    """The paper's comparison in miniature: one teacher, one store, students by method and seed."""
    from dhkd_pipe.benchmarks.accuracy import bench_accuracy

    result = bench_accuracy(_config(AccuracyBenchConfig, options))
    click.echo("\n" + result["markdown"] + f"\nwrote {', '.join(result['files'].values())}")


@_command(bench, "all", AllBenchConfig)
@user_errors
def bench_all_cmd(**options):
    """Every benchmark in one command (kernels, stage 1 in memory and on a JPEG folder, distill,
    store): one markdown table and one JSON naming the device. The command to run on a GPU."""
    from dhkd_pipe.benchmarks.suite import bench_all

    cfg = _config(AllBenchConfig, options)
    bench_all(cfg.out, size="tiny" if cfg.tiny else cfg.size, only=tuple(cfg.only))


@_command(bench, "distill", DistillBenchConfig)
@user_errors
def bench_distill_cmd(**options):
    """Online vs cached DHKD vs the student alone; loader-only throughput. With --students: one
    S-student pass against S solo runs (wall time, step time, the loader's share of a step)."""
    cfg = _config(DistillBenchConfig, options)
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


@_command(bench, "sweep", SweepBenchConfig)
@user_errors
def bench_sweep_cmd(**options):
    """A K-run sweep (--methods x --temperatures) in one pass against the K runs alone, from one
    store, in memory and on a JPEG folder: wall time, step time, the loader's share of a step."""
    from dhkd_pipe.benchmarks.sweep import bench_sweep

    cfg = _config(SweepBenchConfig, options)
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


@_command(bench, "store", StoreBenchConfig)
@user_errors
def bench_store_cmd(**options):
    """Store write and read rows/s of one process (stage 1's writer, stage 2's streaming), local and at URLs."""
    from dhkd_pipe.benchmarks.store import bench_store

    cfg = _config(StoreBenchConfig, options)
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


@_command(bench, "scale", ScaleBenchConfig)
@user_errors
def bench_scale_cmd(**options):
    """How the store's costs grow with its size: per size, on disk and on a local S3 server, the
    write, open, inspect --quick, inspect, a resume, the audit and stage 2's first batch, with the
    reader's memory and the S3 requests; a table, a JSON and a log-log plot."""
    from dhkd_pipe.benchmarks.scale import bench_scale, parse_sizes

    cfg = _config(ScaleBenchConfig, options)
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
    )


if __name__ == "__main__":
    main()
