"""``dhkd-pipe``: parses options and calls the stages; user errors are one line and exit code 2."""

from __future__ import annotations

import functools
import json
import sys

import click

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
    StoreBenchConfig,
    StoreLockOptions,
    StudentSeeds,
    TrainConfig,
    VerifyCacheConfig,
    build_config,
)
from dhkd_pipe.errors import ENVIRONMENT_ERRNOS, DhkdError, one_line
from dhkd_pipe.methods.registry import METHODS, OPTIONS, option_defaults
from dhkd_pipe.native_stderr import NativeStderr
from dhkd_pipe.options import click_params, given

# loggers of the object-storage stack: after the error line, a failed store's pending requests
# must not add their tracebacks ("Task exception was never retrieved", "Unclosed client session")
STORAGE_LOGGERS = ("asyncio", "aiohttp", "aiobotocore", "botocore", "s3fs", "fsspec", "zarr")


def _exit_with(line: str, code: int):
    """Prints ``line`` as one line on stderr and exits; native log lines held back are dropped, and
    nothing the interpreter's shutdown reports (pending I/O tasks, unclosed sessions) follows it."""
    import logging

    if _CAPTURE is not None:
        _CAPTURE.drop = True
    click.echo(one_line(line), err=True)
    for name in STORAGE_LOGGERS:
        logging.getLogger(name).disabled = True
    sys.unraisablehook = lambda unraisable: None
    sys.exit(code)


def user_errors(fn):
    """User mistakes and environment faults end the command with one line on stderr and exit 2;
    an interrupt (SIGINT, SIGTERM) with one line and 128 + the signal number. Anything else is a
    bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dhkd_pipe.interrupts import Interrupted

        try:
            return fn(*args, **kwargs)
        except DhkdError as e:
            _exit_with(f"error: {e}", 2)
        except Interrupted as e:
            _exit_with(f"interrupted by {e}", e.exit_code)
        except OSError as e:
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f"cannot access {e.filename}: " if e.filename else ""
            _exit_with(f"error: {where}{one_line(e)}", 2)
        except MemoryError:
            _exit_with(f"error: out of memory; {_size_options(kwargs)}", 2)
        except RecursionError:
            _exit_with(
                "error: an input nests too deep to be read (RecursionError); check the files this command reads", 2
            )
        except RuntimeError as e:
            if not _allocation_failed(e):
                raise
            _exit_with(f"error: out of memory ({one_line(e, 120)}); {_size_options(kwargs)}", 2)

    return wrapper


# options whose value sets how much memory a command takes, as the advice to an out-of-memory end names them
SIZE_OPTIONS = ("batch_size", "resolution", "chunk_rows", "views", "samples", "rows", "classes")


def _size_options(options: dict) -> str:
    named = [f"--{k.replace('_', '-')} (now {v})" for k, v in options.items() if k in SIZE_OPTIONS and v is not None]
    if not named:
        return "the input is larger than this machine's memory"
    return "lower " + " or ".join(named) if len(named) < 3 else "lower " + ", ".join(named[:-1]) + " or " + named[-1]


def _allocation_failed(exc: RuntimeError) -> bool:
    """torch's allocators fail with a RuntimeError (CPU) or its OutOfMemoryError subclass (CUDA)."""
    text = str(exc)
    return (
        type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text.lower()
    )


class ConfigCommand(click.Command):
    """A command whose options fill a config dataclass. ``--help`` shows each option's effective
    default: the dataclass's, then the command's own, then the recipe's where ``--config FILE``
    is on the command line; the method's options (alpha, gamma, ...) show the chosen method's values."""

    def __init__(self, *args, config_cls, defaults=None, fixed=None, **kwargs):
        super().__init__(*args, **kwargs)
        # defaults: under a recipe (distill's method); fixed: over it (train-teacher's ce)
        self.config_cls, self.defaults, self.fixed = config_cls, dict(defaults or {}), dict(fixed or {})

    def parse_args(self, ctx, args):
        # --help is eager and prints before --config is parsed: find the recipe here first
        for i, arg in enumerate(args):
            if arg == "--config" and i + 1 < len(args):
                ctx.meta["recipe"] = args[i + 1]
            elif arg.startswith("--config="):
                ctx.meta["recipe"] = arg.split("=", 1)[1]
        return super().parse_args(ctx, args)

    def effective_defaults(self, ctx) -> tuple[dict, str | None]:
        """(option name -> value, a note on the recipe that could not be read)."""
        from dhkd_pipe.config import config_defaults, read_recipe

        values, note = {**config_defaults(self.config_cls), **self.defaults}, None
        recipe = ctx.meta.get("recipe")
        if recipe:
            try:
                values.update(read_recipe(recipe))
            except DhkdError as e:
                note = f"(not from the recipe: {e})"
        values.update(self.fixed)
        if self.config_cls is TrainConfig and values.get("method") in METHODS:
            for name, default in option_defaults(METHODS[values["method"]]).items():
                if values.get(name) is None:
                    values[name] = default
        return values, note

    def format_options(self, ctx, formatter):
        values, note = self.effective_defaults(ctx)
        shown = []
        for param in self.get_params(ctx):
            if isinstance(param, click.Option) and values.get(param.name) is not None:
                shown.append((param, param.default, param.show_default))
                param.default, param.show_default = values[param.name], True
        try:
            super().format_options(ctx, formatter)
        finally:  # help ends the command; restored all the same
            for param, default, show in shown:
                param.default, param.show_default = default, show
        recipe = ctx.meta.get("recipe")
        if not any(p.name == "config_file" for p in self.get_params(ctx)):
            return
        with formatter.section("Defaults"):
            if recipe and note is None:
                formatter.write_text(f"Shown defaults: the command's, overridden by the recipe {recipe}.")
            else:
                formatter.write_text(
                    "Shown defaults: the command's"
                    + (f" {note}." if note else ". Give --config FILE before --help to see a recipe's values.")
                )


_CAPTURE: NativeStderr | None = None  # the running command's, while main() runs


class OneLineGroup(click.Group):
    """The command group: a usage mistake is one line too, native library chatter is held back
    (``NativeStderr``) and SIGINT/SIGTERM stop a command cleanly (``interrupts``)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        global _CAPTURE
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from dhkd_pipe.interrupts import Interrupted, handle_signals

        with NativeStderr() as capture, handle_signals():
            _CAPTURE = capture
            try:
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.exceptions.UsageError as e:
                hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
                _exit_with(f"error: {e.format_message()}{hint}", e.exit_code)
            except click.ClickException as e:
                _exit_with(f"error: {e.format_message()}", e.exit_code)
            except click.exceptions.Abort:
                _exit_with("interrupted", 130)
            except Interrupted as e:
                _exit_with(f"interrupted by {e}", e.exit_code)
            finally:
                _CAPTURE = None
        sys.exit(code if isinstance(code, int) else 0)


def _echo_json(obj):
    """Strict JSON (a non-finite number is null, never NaN)."""
    from dhkd_pipe.training.run_folder import json_safe

    click.echo(json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False))


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dhkd-pipe")
def main():
    """dhkd-pipe: cache a teacher's logits once, distil many students from the store (DHKD)."""


# the one option that is no config field: the recipe the others override
CONFIG_FILE = click.Option(
    ["--config", "config_file"], type=click.Path(dir_okay=False), help="YAML recipe; options given here override it."
)


def _params(cls, command: str, first: tuple[str, ...] = (), extra: tuple = ()) -> list:
    """``cls``'s options that ``command`` offers: those named in ``first`` first (in that order),
    then ``--config`` where a recipe applies, the rest in declaration order, then ``extra``'s."""
    params = click_params(cls, command)
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
    )


@main.command(
    "distill",
    cls=ConfigCommand,
    config_cls=TrainConfig,
    defaults=DISTILL_DEFAULTS,
    help=_distill_help(),
    params=_params(TrainConfig, "distill", DISTILL_FIRST, extra=(StudentSeeds, RunStart)),
)
@user_errors
def distill_cmd(config_file, resume, overwrite, seeds, **options):
    from dhkd_pipe.stages.distill import distill
    from dhkd_pipe.training.run_folder import RunMode

    students = [name.strip() for name in (options["model"] or "").split(",") if name.strip()] or [None]
    seed_list = _int_list("--seeds", seeds)
    if seed_list is not None and options["seed"] is not None:
        raise DhkdError("give --seed (one run) or --seeds (several), not both")
    cfg = _train_config(
        config_file, DISTILL_DEFAULTS, resume=resume, overwrite=overwrite, **{**options, "model": students[0]}
    )
    mode = RunMode.from_flags(bool(resume), bool(overwrite))
    if len(students) == 1 and seed_list is None:
        _echo_json(_short(distill(cfg, mode=mode)))
        return
    _distill_several(cfg, [name or cfg.model for name in students], seed_list, mode)


def _int_list(flag: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DhkdError(f"{flag} takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise DhkdError(f"{flag} needs distinct integers, e.g. 0,1,2; got {text!r}")
    return values


def _distill_several(cfg, students, seeds, mode):
    """Several students from one pass: the summaries as JSON (by run folder), then exit 2 with one
    line naming the students that stopped alone, if any did."""
    from dhkd_pipe.stages.distill import distill_students, student_configs
    from dhkd_pipe.training.students import StudentPlan

    if not cfg.cache:
        raise DhkdError(
            "several students (--student A,B or --seeds) train from one pass over a stage-1 store: give --cache STORE"
        )
    if len(set(students)) != len(students):
        raise DhkdError(f"--student names a student twice: {','.join(students)}")
    cfgs = student_configs(cfg, students, seeds)
    results = distill_students([StudentPlan(c, mode) for c in cfgs])
    _echo_json({c.out: ({"error": str(r)} if isinstance(r, DhkdError) else _short(r)) for c, r in zip(cfgs, results)})
    failed = [(c.out, r) for c, r in zip(cfgs, results) if isinstance(r, DhkdError)]
    if failed:
        raise DhkdError(
            f"{len(failed)} of {len(cfgs)} students stopped, the others finished: "
            + "; ".join(f"{out}: {error}" for out, error in failed)
        )


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
    from dhkd_pipe.models import list_families, list_models
    from dhkd_pipe.models.registry import CIFAR_INPUT, case_twins, model_input_size, model_kind

    names = list_models()
    cifar = [n for n in names if model_input_size(n) == CIFAR_INPUT]
    imagenet = [n if model_input_size(n) == 224 else f"{n} ({model_input_size(n)}px)" for n in names if n not in cifar]
    click.echo(
        f"CIFAR models, {CIFAR_INPUT}x{CIFAR_INPUT} inputs (cifar10/100, digits, mnist): the KD zoo, with the "
        "public CIFAR-100 teachers' module names"
    )
    _echo_wrapped(cifar)
    click.echo(
        "ImageNet models, 224x224 inputs unless noted (imagefolder data): torchvision architectures, MobileNetV1"
    )
    _echo_wrapped(imagenet)
    twins = case_twins()
    if twins:
        click.echo("Names are case-sensitive; these differ only in case:")
        for group in twins:
            click.echo("  " + " / ".join(f"{n} ({model_kind(n)})" for n in group))
    families = list_families()
    if families:
        click.echo("Model families, any name the library knows (teachers or students):")
        for family in families:
            click.echo(f"  {family.describe}")


def _echo_wrapped(items: list[str], width: int = 100):
    line = ""
    for item in items:
        if line and len(line) + 2 + len(item) > width:
            click.echo(line)
            line = ""
        line = f"{line}  {item}" if line else f"  {item}"
    if line:
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
    from dhkd_pipe.store.audit import damage
    from dhkd_pipe.store.reader import LogitCache
    from dhkd_pipe.terminal_text import escaped

    cfg = _config(InspectConfig, options)
    cache = LogitCache.open(cfg.store)
    summary = cache.summary()
    # where the data is and how views become pixels: attributes stage 1 writes
    summary["data"] = cache.attrs.get("data_spec")
    summary["preprocessing"] = cache.attrs.get("preprocessing")
    damaged = damage(cache, checksums=not cfg.quick)
    summary["damaged"] = damaged
    if cfg.as_json:
        _echo_json(summary)
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            click.echo(f"{key:<{width}}  {json.dumps(value) if isinstance(value, (dict, list)) else escaped(value)}")
    if damaged:
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        click.echo(
            one_line(f"error: store {cache.path} is damaged: {damaged[0]}{more}; {cache.repair_hint()}"), err=True
        )
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
    """Plot validation accuracy and training loss per epoch of runs; print a markdown table."""
    from dhkd_pipe.stages.report import write_report

    cfg = _config(ReportConfig, options)
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
    from dhkd_pipe.benchmarks.bench import bench_cache

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

        bench_students(
            cfg.json_path,
            _int_list("--students", cfg.students),
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
    from dhkd_pipe.benchmarks.bench import bench_distill

    bench_distill(cfg.json_path, teacher=cfg.teacher, student=cfg.student, batch_size=cfg.batch_size, steps=cfg.steps)


@_command(bench, "store", StoreBenchConfig)
@user_errors
def bench_store_cmd(**options):
    """Store write and read rows/s of one process (stage 1's writer, stage 2's streaming), local and at URLs."""
    from dhkd_pipe.benchmarks.bench import bench_store

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


if __name__ == "__main__":
    main()
