"""The machinery under ``cli.py``'s commands: ``OneLineGroup`` (a usage mistake is one line, native
library chatter is held back, SIGINT/SIGTERM stop a command cleanly), ``user_errors`` (a user's
mistake or an environment fault ends a command with one line and exit code 2) and
``ConfigCommand`` (a command whose options fill a config dataclass, with effective defaults in
``--help``), ``config_command`` and ``config_from`` (such a command and its config), ``echo_json``.
``cli.py`` and ``cli_bench.py`` declare the commands with them."""

from __future__ import annotations

import functools
import sys

import click

from dhkd_pipe.config import CacheConfig, TrainConfig, build_config
from dhkd_pipe.errors import ENVIRONMENT_ERRNOS, DhkdError, one_line
from dhkd_pipe.methods.registry import METHODS, option_defaults
from dhkd_pipe.native_stderr import NativeStderr
from dhkd_pipe.options import click_params, given

# loggers of the object-storage stack: after the error line, a failed store's pending requests
# must not add their tracebacks ("Task exception was never retrieved", "Unclosed client session")
STORAGE_LOGGERS = ("asyncio", "aiohttp", "aiobotocore", "botocore", "s3fs", "fsspec", "zarr")


def exit_with(line: str, code: int):
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
        from dhkd_pipe.interrupts import Interrupted, lost_processes

        try:
            return fn(*args, **kwargs)
        except DhkdError as e:
            exit_with(f"error: {e}", 2)
        except Interrupted as e:
            exit_with(f"interrupted by {e}", e.exit_code)
        except OSError as e:
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f"cannot access {e.filename}: " if e.filename else ""
            exit_with(f"error: {where}{one_line(e)}", 2)
        except MemoryError:
            exit_with(f"error: out of memory; {_size_options(kwargs)}", 2)
        except RecursionError:
            exit_with(
                "error: an input nests too deep to be read (RecursionError); check the files this command reads", 2
            )
        except RuntimeError as e:
            if not _allocation_failed(e):
                lost = lost_processes(e)  # a distributed run's failed collective: a process or machine gone
                if lost is None:
                    raise
                exit_with(f"error: {lost}; {_resume_advice(kwargs)}", 2)
            exit_with(f"error: out of memory ({one_line(e, 120)}); {_size_options(kwargs)}", 2)

    return wrapper


def _resume_advice(options: dict) -> str:
    """What to run after a lost process: the same command on every machine, without ``--overwrite``
    (it would discard what was written), with ``--resume`` where a training run left a checkpoint
    in its folder (or, several students, in one of theirs); a store resumes by the same command."""
    import os
    import shlex

    from dhkd_pipe.training.run_folder import CHECKPOINT

    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    out = options.get("out")
    if "resume" in options and "--resume" not in args and out and os.path.isdir(out):
        folders = [out] + [os.path.join(out, name) for name in os.listdir(out)]
        if any(os.path.isfile(os.path.join(folder, CHECKPOINT)) for folder in folders):
            args.append("--resume")
    return "nothing half-written counts as done; launch again on every machine: dhkd-pipe " + shlex.join(args)


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
                exit_with(f"error: {e.format_message()}{hint}", e.exit_code)
            except click.ClickException as e:
                exit_with(f"error: {e.format_message()}", e.exit_code)
            except click.exceptions.Abort:
                exit_with("interrupted", 130)
            except Interrupted as e:
                exit_with(f"interrupted by {e}", e.exit_code)
            finally:
                _CAPTURE = None
        sys.exit(code if isinstance(code, int) else 0)


def echo_json(obj):
    """Strict JSON (a non-finite number is null, never NaN)."""
    import json

    from dhkd_pipe.files import json_safe

    click.echo(json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False))


# the one option that is no config field: the recipe the others override
CONFIG_FILE = click.Option(
    ["--config", "config_file"], type=click.Path(dir_okay=False), help="YAML recipe; options given here override it."
)


def config_params(cls, command: str, first: tuple[str, ...] = (), extra: tuple = (), sweeps: bool = False) -> list:
    """``cls``'s options that ``command`` offers: those named in ``first`` first (in that order),
    then ``--config`` where a recipe applies, the rest in declaration order, then ``extra``'s.
    ``sweeps``: the options declared ``sweep`` take comma-separated values (``options.click_params``)."""
    params = click_params(cls, command, sweeps=sweeps)
    head = sorted((p for p in params if p.name in first), key=lambda p: first.index(p.name))
    recipe = [CONFIG_FILE] if cls in (TrainConfig, CacheConfig) else []
    more = [p for e in extra for p in click_params(e, command)]
    return head + recipe + [p for p in params if p.name not in first] + more


def config_command(group, name: str, config_cls, **kwargs):
    """A command whose options are ``config_cls``'s, each declared once, there."""
    return group.command(
        name, cls=ConfigCommand, config_cls=config_cls, params=config_params(config_cls, name), **kwargs
    )


def config_from(cls, options: dict):
    """The config of a command without a recipe: the options given on the command line."""
    return build_config(cls, None, given(options))
