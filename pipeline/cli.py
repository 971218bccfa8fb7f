"""``dhkd-pipe``: parses options and calls the stages; user errors are one line and exit code 2."""

from __future__ import annotations

import sys

import click

from dhkd_pipe.cli_bench import bench
from dhkd_pipe.command_line import (
    ConfigCommand,
    OneLineGroup,
    config_command,
    config_from,
    config_params,
    echo_json,
    user_errors,
)
from dhkd_pipe.config import (
    CacheConfig,
    EvalConfig,
    ExportConfig,
    InspectConfig,
    PassMemory,
    QuickstartConfig,
    ReportConfig,
    RunStart,
    StoreLockOptions,
    StudentSeeds,
    SweepOptions,
    TrainConfig,
    TuneOptions,
    VerifyCacheConfig,
    build_config,
)
from dhkd_pipe.errors import DhkdError, one_line
from dhkd_pipe.methods.registry import METHODS, OPTIONS
from dhkd_pipe.options import given


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dhkd-pipe")
def main():
    """dhkd-pipe: cache a teacher's logits once, distil many students from the store (DHKD)."""


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
    params=config_params(TrainConfig, "train-teacher", ("model",), extra=(RunStart,)),
)
@user_errors
def train_teacher_cmd(config_file, resume, overwrite, **options):
    """Train a model alone with cross-entropy (a teacher for later distillation)."""
    from dhkd_pipe.stages.train_teacher import train_teacher
    from dhkd_pipe.training.run_folder import RunMode

    cfg = _train_config(config_file, resume=resume, overwrite=overwrite, **TEACHER_FIXED, **options)
    echo_json(_short(train_teacher(cfg, mode=RunMode.from_flags(bool(resume), bool(overwrite)))))


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
    params=config_params(
        TrainConfig, "distill", DISTILL_FIRST, extra=(StudentSeeds, SweepOptions, PassMemory, RunStart), sweeps=True
    ),
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
        echo_json(_short(distill(cfg, mode=mode)))
        return
    results = distill_sweep(sweep_runs(cfg, grid, file_runs), mode=mode, memory_limit=memory_limit)
    echo_json({out: ({"error": str(r)} if isinstance(r, DhkdError) else _short(r)) for out, r in results.items()})
    check_finished(results)


TUNE_DEFAULTS = {**DISTILL_DEFAULTS, "out": "runs/study"}


@main.command(
    "tune",
    cls=ConfigCommand,
    config_cls=TrainConfig,
    defaults=TUNE_DEFAULTS,
    params=config_params(TrainConfig, "distill", DISTILL_FIRST, extra=(TuneOptions, PassMemory)),
)
@user_errors
def tune_cmd(config_file, memory_limit, **options):
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
    echo_json(tune(cfg, opts, memory_limit=memory_limit))


def _short(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "config"}


@config_command(main, "eval", EvalConfig)
@user_errors
def eval_cmd(**options):
    """Top-1 and top-5 accuracy on the validation split."""
    from dhkd_pipe.stages.evaluate import evaluate

    cfg = config_from(EvalConfig, options)
    echo_json(evaluate(cfg.model, cfg.weights, cfg.data, cfg.batch_size, resolution=cfg.resolution))


@config_command(main, "export", ExportConfig)
@user_errors
def export_cmd(**options):
    """Export a run's student (single head) for deployment; checks it against PyTorch.

    Training already writes RUN/model.safetensors; this adds an ONNX file with a dynamic batch
    axis and, where onnxruntime is installed, runs it on a test batch and reports the largest
    difference from PyTorch's logits (exit 1 if over the tolerance).
    """
    from dhkd_pipe.stages.export import export_onnx

    cfg = config_from(ExportConfig, options)
    result = export_onnx(cfg.run, cfg.out, opset=cfg.opset)
    echo_json(result)
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
    params=config_params(CacheConfig, "cache-teacher", extra=(StoreLockOptions,)),
)
@user_errors
def cache_teacher_cmd(config_file, break_lock, **options):
    """Stage 1: run the teacher once over seeded views and write the logit store.

    Re-run on an existing store, the same command resumes it: it verifies the chunks already
    written (presence and checksums) and rewrites damaged ones. One process writes a store at a
    time (its lock object, STORE/.lock, names the writer)."""
    from dhkd_pipe.stages.cache_teacher import cache_teacher

    cfg = build_config(CacheConfig, config_file, options)
    echo_json(cache_teacher(cfg, break_lock=bool(break_lock)))


@config_command(main, "inspect", InspectConfig)
@user_errors
def inspect_cmd(**options):
    """What a logit store holds (STORE: a path or a URL such as s3://bucket/logits.zarr), and what
    of it is damaged: every written object is checked (present, and its CRC32C checksums right;
    --no-checksums: present and of a sound size, from one listing; --quick: no object, only the
    metadata and which units are done, as fast for a store of any size). Its metadata is compared
    with a logit store's (attributes, each array's dtype and codecs). A damaged store, or one whose
    metadata differs, exits 1, with one line on stderr naming the fix."""
    from dhkd_pipe.stages.inspect import inspect_store

    cfg = config_from(InspectConfig, options)
    result = inspect_store(cfg)
    if cfg.as_json:
        echo_json(result.summary)
    else:
        for line in result.lines():
            click.echo(line)
    if result.error:
        click.echo(one_line(result.error), err=True)
        sys.exit(1)


@config_command(main, "verify-cache", VerifyCacheConfig)
@user_errors
def verify_cache_cmd(**options):
    """Re-render sampled views, re-run the teacher and compare with the store (a path or a URL)."""
    from dhkd_pipe.stages.verify_cache import verify_cache

    cfg = config_from(VerifyCacheConfig, options)
    result = verify_cache(cfg.store, cfg.data, cfg.teacher_weights, samples=cfg.samples, tolerance=cfg.tolerance)
    echo_json(result)
    if not result["ok"]:
        sys.exit(1)


@config_command(main, "report", ReportConfig)
@user_errors
def report_cmd(**options):
    """Plot validation accuracy and training loss per epoch of runs; print a markdown table.

    Given a sweep's folder (distill --cache with several runs) or a study's (tune): its leaderboard,
    runs sorted by final top-1 (mean and std over seeds), what they differ in, the epochs each ran and
    why it stopped; OUT's name with .md and .json beside the picture, and OUT-OPTION pictures of
    top-1 against each swept option."""
    from dhkd_pipe.stages.leaderboard import is_leaderboard_folder, write_leaderboard
    from dhkd_pipe.stages.report import write_report

    cfg = config_from(ReportConfig, options)
    if len(cfg.runs) == 1 and is_leaderboard_folder(cfg.runs[0]):
        click.echo(write_leaderboard(cfg.runs[0], cfg.out))
        return
    click.echo(write_report(list(cfg.runs), cfg.out))


@config_command(main, "quickstart", QuickstartConfig)
@user_errors
def quickstart_cmd(**options):
    """The whole job on the bundled digits: teacher, cache, ce/kd/dhkd students, report."""
    from dhkd_pipe.stages.quickstart import quickstart

    cfg = config_from(QuickstartConfig, options)
    quickstart(cfg.out, overwrite=cfg.overwrite)


main.add_command(bench)


if __name__ == "__main__":
    main()
