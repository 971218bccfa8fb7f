"""Text that came from a file or a store, made safe to print: control characters escaped, and a
recorded command line re-quoted so that pasting it into a shell runs that command and nothing else.

A store records strings (its command line, its data set's name, the tool's version) that anyone
who can write the store can forge; printed raw, an escape sequence rewrites the user's terminal
(clears it, retitles it, hides text) and a ``;`` in a suggested command runs a second command.
"""

from __future__ import annotations

import re
import shlex

# C0 controls (but tab), DEL, C1 controls, and the Unicode line and paragraph separators
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def escaped(text) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\n``): one line,
    nothing the terminal would act on."""
    return _CONTROL.sub(_escape, str(text))


def _escape(match: re.Match) -> str:
    c = match.group()
    named = {"\n": "\\n", "\r": "\\r"}
    if c in named:
        return named[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def quoted_command(line, program: tuple[str, ...] = ("dhkd-pipe", "cache-teacher")) -> str | None:
    """A recorded command line, re-quoted argument by argument (``shlex.join``), or None if it is
    not ``program``'s command (it does not parse, or starts otherwise): a forged line is never
    suggested. Control characters inside arguments are escaped as well."""
    if not isinstance(line, str):
        return None
    try:
        argv = shlex.split(line)
    except ValueError:
        return None
    if tuple(argv[: len(program)]) != program:
        return None
    return escaped(shlex.join(argv))
