"""Files written whole: a kill, a full disk or a signal leaves the previous version, never half a file.

Every file is written to ``NAME.tmp``, flushed to disk and renamed into place; the environment's
write errors (ENOSPC, EACCES, EROFS, ...) become one ``DhkdError`` naming the path and the errno.
A run folder's files go through ``training.run_folder``'s writers, which first record the file in
the run's manifest and then call these.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Callable

from dhkd_pipe.errors import DhkdError, io_error


def write_atomic(path: str, write: Callable, mode: str = "wb"):
    """Writes ``path`` through ``write(file)`` into ``path.tmp``, flushes it to disk and renames it.

    An OSError (full disk, no permission, read-only file system) is a DhkdError naming the path and
    the errno; on any failure or interrupt the ``.tmp`` file is removed and ``path`` is untouched.
    """
    tmp = path + ".tmp"
    # serialised in memory first: a full disk then fails the plain write below with its errno
    # (torch's zip writer reports a failed write as a RuntimeError about positions)
    buffer = io.BytesIO() if "b" in mode else io.StringIO()
    try:
        write(buffer)
        with open(tmp, mode) as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise io_error(path, e) from None
    except BaseException:
        remove_quietly(tmp)
        raise


def json_safe(value):
    """``value`` with non-finite floats as None: strict JSON (``json.dumps(allow_nan=False)``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(obj, indent: int | None = 2) -> str:
    """``obj`` as strict JSON text (non-finite floats as null), with a final newline."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False, default=str) + "\n"


def write_json(path: str, obj, indent: int | None = 2):
    text = json_text(obj, indent)
    write_atomic(path, lambda f: f.write(text), mode="w")


def append_line(path: str, line: str):
    """Appends one line; on an OSError the file is cut back to its old length (no partial line)."""
    try:
        with open(path, "a") as f:
            start = f.tell()
            try:
                f.write(line.rstrip("\n") + "\n")
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                f.truncate(start)
                raise
    except OSError as e:
        raise io_error(path, e) from None


def remove_quietly(path: str):
    try:
        os.remove(path)
    except OSError:
        pass


def holds_mark(path: str, mark: bytes, whole: int = 1 << 28, ends: int = 1 << 22) -> bool:
    """Whether the file at ``path`` (followed through links) carries ``mark``, the text a command
    embeds in what it writes (image metadata, an ONNX property) so that it may replace that file
    later and nothing else. A file up to ``whole`` bytes is read whole; a larger one only its first
    and last ``ends`` bytes (where the formats written here keep their metadata)."""
    try:
        if not os.path.isfile(path):
            return False
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size <= whole:
                return mark in f.read()
            head = f.read(ends)
            f.seek(size - ends)
            return mark in head or mark in f.read(ends)
    except OSError:
        return False


def check_replaceable(out: str, mark: str, command: str):
    """Refuses an existing ``--out`` that ``command`` did not write (it carries no ``mark``), or a
    link: a command replaces only its own earlier output, never a file of the user's."""
    if os.path.lexists(out) and (os.path.islink(out) or not holds_mark(out, mark.encode())):
        what = "a link" if os.path.islink(out) else "a file"
        raise DhkdError(
            f"--out {out} is {what} that was not written by dhkd-pipe {command}; "
            "name another --out, or move that file away"
        )
