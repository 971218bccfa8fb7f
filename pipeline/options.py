"""Each option declared once: a config dataclass field says its flag, help, choices and kind in its
metadata (``option(...)``), and ``click_params`` makes the command's click parameters from it.

A field's CLI flag is ``--`` + its name with ``-`` for ``_``, unless ``flag=`` names another
(``--student`` fills ``model``); its type comes from the annotation; ``switch`` makes a
``--x/--no-x`` pair, ``is_flag`` a bare flag, ``argument`` a positional argument. Torch-free.
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
):
    """A config field that is also a command-line option (see the module docstring). ``record``:
    part of the command line a logit store records (``cache_teacher.command_line``); ``commands``:
    the only commands that offer it (default: every command of its config); ``per_command``:
    command -> {"flag": ..., "help": ...} where a command names it otherwise (distill's ``--student``)."""
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


def value_type(annotation) -> type | None:
    """The Python type of an annotation string (``"int | None"`` -> int); None for text."""
    kind = str(annotation).split("|")[0].strip()
    return {"int": int, "float": float, "bool": bool}.get(kind)


def click_params(cls, command: str, skip: tuple[str, ...] = ()) -> list:
    """The click parameters of ``cls``'s option fields that ``command`` offers, in declaration order.
    Their click default is None (a flag's False), so a value not given on the command line comes
    from the recipe or the dataclass (``config.build_config``); ``--help`` shows the effective
    default (``command_line.ConfigCommand``)."""
    import click

    params = []
    for f in option_fields(cls):
        meta = _meta(f, command)
        if f.name in skip or (meta["commands"] is not None and command not in meta["commands"]):
            continue
        kind = click.Choice(tuple(meta["choices"])) if meta["choices"] else value_type(f.type)
        if kind is bool:
            kind = None
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


def given(options: dict) -> dict:
    """The options given on the command line: those not None (and not an empty ``multiple``)."""
    return {k: v for k, v in options.items() if v is not None and v != ()}
