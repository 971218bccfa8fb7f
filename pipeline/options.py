"""Each option declared once: a config dataclass field says its flag, help, choices and kind in its
metadata (``option(...)``), and ``click_params`` makes the command's click parameters from it.

A field's CLI flag is ``--`` + its name with ``-`` for ``_``, unless ``flag=`` names another
(``--student`` fills ``model``); its type comes from the annotation; ``switch`` makes a
``--x/--no-x`` pair, ``is_flag`` a bare flag, ``argument`` a positional argument. ``sweep``
declares that runs of one pass may differ in the option: a command that trains several runs
(``click_params(..., sweeps=True)``) takes it as comma-separated values, one run each; its other
numeric options take one value each. Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

_MISSING = dataclasses.MISSING


def option(
    default=_MISSING,
    help: str | None = None,
    *,
    flag: str | None = None,
    choices=None,
    switch: bool = False,
    is_flag: bool = False,
    argument: bool = False,
    nargs: int = 1,
    multiple: bool = False,
    required: bool = False,
    default_factory=_MISSING,
    record: bool = False,
    commands: tuple[str, ...] | None = None,
    per_command: dict | None = None,
    sweep: bool = False,
):
    """A config field that is also a command-line option (see the module docstring). ``record``:
    part of the command line a logit store records (``cache_teacher.command_line``); ``commands``:
    the only commands that offer it (default: every command of its config); ``per_command``:
    command -> {"flag": ..., "help": ...} where a command names it otherwise (distill's ``--student``);
    ``sweep``: the runs of one pass may differ in it (a sweep)."""
    meta = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "switch": switch,
        "is_flag": is_flag,
        "argument": argument,
        "nargs": nargs,
        "multiple": multiple,
        "required": required,
        "record": record,
        "commands": commands,
        "per_command": per_command or {},
        "sweep": sweep,
    }
    if default_factory is not _MISSING:
        return field(default_factory=default_factory, metadata={"option": meta})
    return field(default=default, metadata={"option": meta})


def flag_of(f: dataclasses.Field, command: str | None = None) -> str:
    """The field's command-line flag: ``--batch-size`` for ``batch_size``."""
    meta = _meta(f, command)
    return meta.get("flag") or "--" + f.name.replace("_", "-")


def _meta(f: dataclasses.Field, command: str | None) -> dict:
    meta = dict(f.metadata.get("option") or {})
    meta.update(meta.get("per_command", {}).get(command, {}))
    return meta


def option_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "option" in f.metadata]


def sweepable(f: dataclasses.Field) -> bool:
    """Whether runs of one pass may differ in the field (declared with ``sweep=True``)."""
    return bool((f.metadata.get("option") or {}).get("sweep"))


def listed_on_command_line(f: dataclasses.Field) -> bool:
    """Whether a sweep takes the field's values comma-separated on the command line: a switch or
    a list (``lr_milestones``) cannot say several values there, only in a sweep file."""
    meta = f.metadata.get("option") or {}
    return sweepable(f) and not (meta.get("switch") or meta.get("is_flag")) and not str(f.type).startswith("list")


def value_type(annotation) -> type | None:
    """The Python type of an annotation string (``"int | None"`` -> int); None for text."""
    kind = str(annotation).split("|")[0].strip()
    return {"int": int, "float": float, "bool": bool}.get(kind)


def click_params(cls, command: str, skip: tuple[str, ...] = (), sweeps: bool = False) -> list:
    """The click parameters of ``cls``'s option fields that ``command`` offers, in declaration order.
    Their click default is None (a flag's False), so a value not given on the command line comes
    from the recipe or the dataclass (``config.build_config``); ``--help`` shows the effective
    default (``command_line.ConfigCommand``). With ``sweeps`` (a command that trains several runs
    in one pass) an option declared ``sweep`` is text, its comma-separated values read by the
    sweep (``training.sweep``), and a numeric option that is not refuses a list in one line."""
    import click

    params = []
    for f in option_fields(cls):
        meta = _meta(f, command)
        if f.name in skip or (meta["commands"] is not None and command not in meta["commands"]):
            continue
        kind = click.Choice(tuple(meta["choices"])) if meta["choices"] else value_type(f.type)
        if kind is bool:
            kind = None
        if sweeps and listed_on_command_line(f):
            kind = _values(kind)
        elif sweeps and kind in (int, float):
            kind = _one_value(kind, flag_of(f, command))
        if meta["argument"]:
            params.append(click.Argument([f.name], type=kind, nargs=meta["nargs"], required=meta["required"]))
        elif meta["switch"]:
            flag = flag_of(f, command)
            params.append(click.Option([f"{flag}/--no-{flag[2:]}", f.name], default=None, help=meta["help"]))
        elif meta["is_flag"]:
            params.append(click.Option([flag_of(f, command), f.name], is_flag=True, default=None, help=meta["help"]))
        else:
            params.append(
                click.Option(
                    [flag_of(f, command), f.name],
                    type=kind,
                    multiple=meta["multiple"],
                    required=meta["required"],
                    help=meta["help"],
                )
            )
    return params


def _values(kind):
    """A click type for an option that sweeps: comma-separated values, each checked as ``kind``
    (a type or a ``click.Choice``) would check one; the text is kept (``training.sweep`` reads it).
    Its metavar is the one value's (``FLOAT``, ``[kd|dhkd]``)."""
    import click

    one = {int: click.INT, float: click.FLOAT, None: click.STRING}.get(kind, kind)

    class Values(click.ParamType):
        name = one.name
        choices = getattr(one, "choices", None)  # the names each value is one of, as a Choice has them

        def get_metavar(self, param, ctx=None):
            return one.get_metavar(param, ctx) if isinstance(one, click.Choice) else None

        def convert(self, value, param, ctx):
            for part in str(value).split(","):
                if part.strip():
                    one.convert(part.strip(), param, ctx)
            return value

    return Values()


def _one_value(kind: type, flag: str):
    """A click type for a numeric option that a pass cannot sweep: a list of values is refused in
    one line that says why (the option is one for every run of the pass)."""
    import click

    class OneValue(click.ParamType):
        name = (click.INT if kind is int else click.FLOAT).name

        def convert(self, value, param, ctx):
            if isinstance(value, str) and "," in value:
                self.fail(f"{flag} takes one value: every run of a pass shares it (the options that sweep say so)")
            return (click.INT if kind is int else click.FLOAT).convert(value, param, ctx)

    return OneValue()


def given(options: dict) -> dict:
    """The options given on the command line: those not None (and not an empty ``multiple``)."""
    return {k: v for k, v in options.items() if v is not None and v != ()}
