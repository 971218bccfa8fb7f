"""``dhkd-pipe``: parses options and calls the stages; user errors are one line and exit code 2."""

from __future__ import annotations

import functools
import json
import sys

import click

from .codecs import CODECS
from .config import EXPORT_FORMATS, PRECISIONS, AccuracyBenchConfig, CacheConfig, TrainConfig, build_config
from .errors import ENVIRONMENT_ERRNOS, DhkdError, os_reason
from .losses import BACKENDS, KD_LOSSES
from .methods import KD_STOP_HELP, METHODS, methods_taking, option_defaults, option_help
from .models.dual_head import AUX_HEADS
from .native_stderr import NativeStderr


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _exit_with(line: str, code: int):
    """Prints ``line`` as one line on stderr and exits; native log lines held back are dropped."""
    if _CAPTURE is not None:
        _CAPTURE.drop = True
    click.echo(_one_line(line), err=True)
    sys.exit(code)

DATA_HELP = ("digits | fashion-mnist | fashion-mnist:DIR | mnist:DIR | cifar10:DIR | cifar100:DIR | imagefolder:DIR; "
             "SPEC@N: a fixed stratified subset of N training images.")
WEIGHTS_HELP = ("a checkpoint file, or a published weight's name (torchvision: DEFAULT, IMAGENET1K_V2, ...; "
                "timm: pretrained or a tag); default: the architecture's published weights, fetched into the "
                "torch hub / Hugging Face cache when online (KD-zoo models have none)")


def user_errors(fn):
    """User mistakes and environment faults end the command with one line on stderr and exit 2;
    an interrupt (SIGINT, SIGTERM) with one line and 128 + the signal number. Anything else is a
    bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .interrupts import Interrupted

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
            _exit_with(f"error: {where}{os_reason(e)}", 2)

    return wrapper


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
        from .config import config_defaults, read_recipe

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
        with formatter.section("Defaults"):
            if recipe and note is None:
                formatter.write_text(f"Shown defaults: the command's, overridden by the recipe {recipe}.")
            else:
                formatter.write_text("Shown defaults: the command's" + (f" {note}." if note else
                                     ". Give --config FILE before --help to see a recipe's values."))


_CAPTURE: NativeStderr | None = None  # the running command's, while main() runs


class OneLineGroup(click.Group):
    """The command group: a usage mistake is one line too, native library chatter is held back
    (``NativeStderr``) and SIGINT/SIGTERM stop a command cleanly (``interrupts``)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        global _CAPTURE
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from .interrupts import Interrupted, handle_signals

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
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dhkd-pipe")
def main():
    """dhkd-pipe: cache a teacher's logits once, distil many students from the store (DHKD)."""


def training_options(fn):
    """The options every training command shares; None means "from the config or default"."""
    opts = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe; options given here override it."),
        click.option("--data", help=f"{DATA_HELP} Required, except for distill --cache (the store records it)."),
        click.option("--out", help="Run folder."),
        click.option("--epochs", type=int),
        click.option("--batch-size", type=int),
        click.option("--lr", type=float),
        click.option("--momentum", type=float),
        click.option("--weight-decay", type=float),
        click.option("--lr-milestones", help="Epochs at which the learning rate decays, e.g. 150,180,210."),
        click.option("--lr-decay", type=float),
        click.option("--precision", type=click.Choice(PRECISIONS)),
        click.option("--seed", type=int),
        click.option("--workers", type=int, help="Loader worker processes (DALI)."),
        click.option("--checkpoint-every", type=int, help="Also checkpoint every N steps within an epoch."),
        click.option("--val-every", type=int, help="Validate after every N-th epoch and after the last (0: the last only; default 1)."),
        click.option("--max-steps", type=int, help="Stop (with a checkpoint) after N steps; for smoke runs and benchmarks."),
        click.option("--resolution", type=int, help="Input side in pixels (default: the store's, else the data set's: "
                     "32 for the in-memory sets, 224 for image folders); the model must take it."),
        click.option("--max-nonfinite", type=int, help="Skip up to N steps whose loss is not finite (no update) before "
                     "the run stops (default 0: stop at the first)."),
        click.option("--log-with", help="Experiment trackers (Accelerate's), comma-separated: tensorboard, wandb, mlflow, ...; "
                     "they get the per-epoch metrics of metrics.jsonl."),
        click.option("--channels-last/--no-channels-last", default=None, help="NHWC weights and inputs (faster convolutions on tensor-core GPUs)."),
        click.option("--compile/--no-compile", default=None, help="torch.compile the student (through Accelerate; the first steps compile)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped."),
        click.option("--overwrite", is_flag=True, help="Replace a finished or stopped run in --out."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _train_config(config_file, defaults=None, **options) -> TrainConfig:
    options.pop("resume"), options.pop("overwrite")
    return build_config(TrainConfig, config_file, options, defaults)


TEACHER_FIXED = {"method": "ce"}  # train-teacher trains with cross-entropy, whatever a recipe says
DISTILL_DEFAULTS = {"method": "dhkd"}


@main.command("train-teacher", cls=ConfigCommand, config_cls=TrainConfig, fixed=TEACHER_FIXED)
@click.option("--model", help="Architecture (see `dhkd-pipe models`).")
@training_options
@user_errors
def train_teacher_cmd(config_file, resume, overwrite, **options):
    """Train a model alone with cross-entropy (a teacher for later distillation)."""
    from .stages.train_teacher import train_teacher

    cfg = _train_config(config_file, resume=resume, overwrite=overwrite, **TEACHER_FIXED, **options)
    _echo_json(_short(train_teacher(cfg, resume=resume, overwrite=overwrite)))


def _distill_help() -> str:
    width = max(len(name) for name in METHODS)
    lines = "\n".join(f"  {name:<{width}}  {cls.summary}" for name, cls in METHODS.items())
    return (
        "Distil a student, online from a teacher or from a stage-1 store (--cache).\n\n"
        "Methods (--method; default dhkd). What --gamma, --alpha, --beta, --temperature, --kd-loss, "
        "--warmup-epochs and --kd-stop-epoch set depends on the method (each option's help says it, with each "
        "method's default); an option the method does not take is refused.\n\n\b\n" + lines
    )


@main.command("distill", cls=ConfigCommand, config_cls=TrainConfig, defaults=DISTILL_DEFAULTS, help=_distill_help())
@click.option("--student", "model", help="Student architecture.")
@click.option("--teacher", help="Teacher architecture (online distillation).")
@click.option("--teacher-weights", help=f"Teacher weights (online distillation): {WEIGHTS_HELP}.")
@click.option("--cache", help="Stage-1 logit store (a path or a URL: s3://, gs://, file://): distil with no teacher forward pass.")
@click.option("--method", type=click.Choice(list(METHODS)), help="Distillation method (see above).")
@click.option("--kd-loss", type=click.Choice(tuple(KD_LOSSES)), help=option_help("kd_loss"))
@click.option("--alpha", type=float, help=option_help("alpha"))
@click.option("--gamma", type=float, help=option_help("gamma"))
@click.option("--beta", type=float, help=option_help("beta"))
@click.option("--temperature", type=float, help=option_help("temperature"))
@click.option("--warmup-epochs", type=int, help=option_help("warmup_epochs"))
@click.option("--kd-stop-epoch", type=int,
              help=f"{', '.join(methods_taking('kd_stop_epoch'))} only: {KD_STOP_HELP}.")
@click.option("--aux-head", type=click.Choice(AUX_HEADS))
@click.option("--grad-align/--no-grad-align", default=None,
              help="dhkd only: gradient alignment as published (PCGrad over all parameter gradients): where the "
                   "distillation gradient conflicts with the CE gradient, its component along the CE gradient is removed.")
@click.option("--grad-align-features/--no-grad-align-features", default=None,
              help="dhkd only: this project's per-sample variant (not the published algorithm): aligns only the "
                   "gradient reaching the shared features, row by row. Excludes --grad-align.")
@click.option("--kernels", type=click.Choice(BACKENDS), help="Fused Triton losses (CUDA) or the PyTorch reference.")
@training_options
@user_errors
def distill_cmd(config_file, resume, overwrite, **options):
    from .stages.distill import distill

    cfg = _train_config(config_file, DISTILL_DEFAULTS, resume=resume, overwrite=overwrite, **options)
    _echo_json(_short(distill(cfg, resume=resume, overwrite=overwrite)))


def _short(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "config"}


@main.command("eval")
@click.option("--model", required=True)
@click.option("--weights", help=f"Model weights: {WEIGHTS_HELP}.")
@click.option("--data", help=f"{DATA_HELP} Required.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--resolution", type=int, help="Input side in pixels (default: the run's recorded one, the weights' own, "
              "else the data set's).")
@user_errors
def eval_cmd(model, weights, data, batch_size, resolution):
    """Top-1 and top-5 accuracy on the validation split."""
    from .stages.evaluate import evaluate

    _echo_json(evaluate(model, weights, data, batch_size, resolution=resolution))


@main.command("export")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="onnx", show_default=True)
@click.option("--out", help="Output file (default: RUN/model.onnx).")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's recommended one).")
@user_errors
def export_cmd(run, fmt, out, opset):
    """Export a run's student (single head) for deployment; checks it against PyTorch.

    Training already writes RUN/model.safetensors; this adds an ONNX file with a dynamic batch
    axis and, where onnxruntime is installed, runs it on a test batch and reports the largest
    difference from PyTorch's logits (exit 1 if over the tolerance).
    """
    from .stages.export import export_onnx

    result = export_onnx(run, out, opset=opset)
    _echo_json(result)
    if result["ok"] is False:
        sys.exit(1)


@main.command("models")
def models_cmd():
    """List the registered architectures: 32-pixel CIFAR models and ImageNet ones."""
    from .models import list_families, list_models
    from .models.registry import CIFAR_INPUT, case_twins, model_input_size, model_kind

    names = list_models()
    cifar = [n for n in names if model_input_size(n) == CIFAR_INPUT]
    imagenet = [n if model_input_size(n) == 224 else f"{n} ({model_input_size(n)}px)" for n in names if n not in cifar]
    click.echo(f"CIFAR models, {CIFAR_INPUT}x{CIFAR_INPUT} inputs (cifar10/100, digits, mnist): the KD zoo, with the "
               "public CIFAR-100 teachers' module names")
    _echo_wrapped(cifar)
    click.echo("ImageNet models, 224x224 inputs unless noted (imagefolder data): torchvision architectures, MobileNetV1")
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


@main.command("cache-teacher", cls=ConfigCommand, config_cls=CacheConfig)
@click.option("--config", "config_file", type=click.Path(dir_okay=False))
@click.option("--model", help="Teacher architecture (see `dhkd-pipe models`; timm:NAME for timm models).")
@click.option("--weights", help=f"Teacher weights: {WEIGHTS_HELP}.")
@click.option("--data", help=f"{DATA_HELP} Required; recorded in the store (absolute path).")
@click.option("--views", type=int, help="Augmentation epochs (views per image) to record.")
@click.option("--seed", type=int)
@click.option("--out", help="Store path or URL, e.g. logits.zarr or s3://bucket/logits.zarr.")
@click.option("--codec", type=click.Choice(CODECS))
@click.option("--batch-size", type=int)
@click.option("--precision", type=click.Choice(PRECISIONS))
@click.option("--chunk-rows", type=int)
@click.option("--resolution", type=int, help="View side in pixels (default: the teacher weights' own, else the data set's).")
@click.option("--workers", type=int)
@click.option("--channels-last/--no-channels-last", default=None, help="NHWC teacher and inputs.")
@click.option("--compile/--no-compile", default=None, help="torch.compile the teacher (the first batches compile).")
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace a logit store written by a different command (never a file or a folder that is not a logit store).")
@click.option("--break-lock", is_flag=True,
              help="Take over the store's lock held by a process on another host; only when you know that process is gone.")
@user_errors
def cache_teacher_cmd(config_file, break_lock, **options):
    """Stage 1: run the teacher once over seeded views and write the logit store.

    Re-run on an existing store, the same command resumes it: it verifies the chunks already
    written (presence and checksums) and rewrites damaged ones. One process writes a store at a
    time (its lock object, STORE/.lock, names the writer)."""
    from .stages.cache_teacher import cache_teacher

    cfg = build_config(CacheConfig, config_file, options)
    _echo_json(cache_teacher(cfg, break_lock=break_lock))


@main.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quick", is_flag=True, help="Check presence and sizes from one listing only, not the checksums "
              "(which read every written object once).")
@user_errors
def inspect_cmd(store, as_json, quick):
    """What a logit store holds (STORE: a path or a URL such as s3://bucket/logits.zarr), and what
    of it is damaged: every written object is checked (present, and its CRC32C checksums right).
    A damaged store exits 1, with one line on stderr naming the fix."""
    from .cache import LogitCache
    from .store_audit import damage

    cache = LogitCache.open(store)
    summary = cache.summary()
    # where the data is and how views become pixels: attributes stage 1 writes
    summary["data"] = cache.attrs.get("data_spec")
    summary["preprocessing"] = cache.attrs.get("preprocessing")
    damaged = damage(cache, checksums=not quick)
    summary["damaged"] = damaged
    if as_json:
        _echo_json(summary)
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            click.echo(f"{key:<{width}}  {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if damaged:
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        click.echo(f"error: store {cache.path} is damaged: {damaged[0]}{more}; {cache.repair_hint()}", err=True)
        sys.exit(1)


@main.command("verify-cache")
@click.argument("store")
@click.option("--data", help="The store's data set, if it has moved (default: the spec the store records).")
@click.option("--teacher-weights", help="The teacher's weights (default: those the store records; must be the same).")
@click.option("--samples", type=int, default=256, show_default=True)
@click.option("--tolerance", type=float, default=None, help="Largest allowed logit difference (default: from the codec).")
@user_errors
def verify_cache_cmd(store, data, teacher_weights, samples, tolerance):
    """Re-render sampled views, re-run the teacher and compare with the store (a path or a URL)."""
    from .stages.cache_teacher import verify_cache

    result = verify_cache(store, data, teacher_weights, samples=samples, tolerance=tolerance)
    _echo_json(result)
    if not result["ok"]:
        sys.exit(1)


@main.command("report")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", default="report.png", show_default=True)
@user_errors
def report_cmd(runs, out):
    """Plot validation accuracy and training loss per epoch of runs; print a markdown table."""
    from .report import write_report

    click.echo(write_report(list(runs), out))


@main.command("quickstart")
@click.option("--out", default="runs/quickstart", show_default=True)
@click.option("--overwrite", is_flag=True)
@user_errors
def quickstart_cmd(out, overwrite):
    """The whole job on the bundled digits: teacher, cache, ce/kd/dhkd students, report."""
    from .stages.quickstart import quickstart

    quickstart(out, overwrite=overwrite)


@main.group("bench")
def bench():
    """Benchmarks: print a table and write JSON."""


@bench.command("cache")
@click.option("--json", "json_path", default="bench_cache.json", show_default=True)
@click.option("--model", default="resnet32x4", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--teacher-weights", help="A trained digits resnet8 teacher for the codec table (default: train one, ~30 s).")
@user_errors
def bench_cache_cmd(json_path, model, batch_size, steps, teacher_weights):
    """Stage-1 images/s against the teacher's bare forward pass; bytes per logit per codec."""
    from .stages.bench import bench_cache

    bench_cache(json_path, model=model, batch_size=batch_size, steps=steps, teacher_weights=teacher_weights)


AB = AccuracyBenchConfig  # its defaults are the options' defaults


@bench.command("accuracy")
@click.option("--out", default=AB.out, show_default=True, help="Folder of the runs, the store and the results; re-running reuses what is finished.")
@click.option("--data", default=AB.data, show_default=True, help="An in-memory data set (fashion-mnist, fashion-mnist:DIR, mnist:DIR, ...).")
@click.option("--train-size", type=int, default=AB.train_size, show_default=True, help="A fixed stratified subset of the training split.")
@click.option("--teacher", default=AB.teacher, show_default=True)
@click.option("--student", default=AB.student, show_default=True)
@click.option("--teacher-epochs", type=int, default=AB.teacher_epochs, show_default=True)
@click.option("--epochs", type=int, default=AB.epochs, show_default=True, help="Student epochs (and the store's view-epochs).")
@click.option("--seeds", type=int, default=AB.seeds, show_default=True, help="Seeds of the ce, kd and dhkd rows (the others: seed 0).")
@click.option("--batch-size", type=int, default=AB.batch_size, show_default=True)
@click.option("--lr", type=float, default=AB.lr, show_default=True)
@click.option("--val-every", type=int, default=AB.val_every, show_default=True, help="Also validate every N epochs (0: the last only).")
@click.option("--threads", type=int, default=AB.threads, show_default=True, help="torch threads (0: one per core).")
@user_errors
def bench_accuracy_cmd(**options):
    """The paper's comparison in miniature: one teacher, one store, students by method and seed."""
    from .stages.bench_accuracy import bench_accuracy

    result = bench_accuracy(AccuracyBenchConfig(**options))
    click.echo("\n" + result["markdown"] + f"\nwrote {', '.join(result['files'].values())}")


@bench.command("distill")
@click.option("--json", "json_path", default="bench_distill.json", show_default=True)
@click.option("--teacher", default="resnet32x4", show_default=True)
@click.option("--student", default="resnet8x4", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=30, show_default=True)
@user_errors
def bench_distill_cmd(json_path, teacher, student, batch_size, steps):
    """Online vs cached DHKD vs the student alone; loader-only throughput."""
    from .stages.bench import bench_distill

    bench_distill(json_path, teacher=teacher, student=student, batch_size=batch_size, steps=steps)


@bench.command("store")
@click.option("--json", "json_path", default="bench_store.json", show_default=True)
@click.option("--rows", type=int, default=100_000, show_default=True)
@click.option("--classes", type=int, default=1000, show_default=True)
@click.option("--chunk-rows", type=int, default=1024, show_default=True)
@click.option("--codec", type=click.Choice(CODECS), default="fp16", show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True, help="Rows per step when streaming, as stage 2 cuts them.")
@click.option("--url", "urls", multiple=True, help="Also measure a store at this URL or path (s3://bucket/x.zarr); it is deleted afterwards.")
@click.option("--s3-local", is_flag=True, help="Also measure against a moto S3 server this command starts on 127.0.0.1.")
@click.option("--local/--no-local", default=True, show_default=True, help="Measure a store in a temporary folder on local disk.")
@user_errors
def bench_store_cmd(json_path, rows, classes, chunk_rows, codec, batch_size, urls, s3_local, local):
    """Store write and read rows/s of one process (stage 1's writer, stage 2's streaming), local and at URLs."""
    from .stages.bench import bench_store

    bench_store(json_path, rows=rows, classes=classes, chunk_rows=chunk_rows, codec=codec, batch_size=batch_size,
                urls=tuple(urls), s3_local=s3_local, local=local)


if __name__ == "__main__":
    main()
