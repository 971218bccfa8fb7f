"""Native libraries' log lines held back, so that a failed command ends in one line.

DALI (and the decoders under it) log failures straight to file descriptor 2 from C++ threads, e.g.
``[ERROR] [libjpeg_turbo_decoder] Could not decode jpeg code stream`` for a truncated JPEG, before
the Python exception that we turn into one ``DhkdError`` line. ``NativeStderr`` points fd 2 at a
pipe for the duration of a command; a thread forwards everything to the real stderr at once,
except log lines of the ``[ERROR]`` / ``[WARNING]`` / ``[INFO]`` form, which it holds. At the
end they are dropped when the command failed with a ``DhkdError`` (whose one line says what went
wrong) and written out otherwise (a success or a bug: nothing is lost).

Python's own ``sys.stderr`` is pointed past the pipe (at a copy of the real fd 2), so the
command's messages never wait on the thread; child processes inherit the pipe and their output is
forwarded like the native lines.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
from collections import deque

# DALI's and nvImageCodec's log format, with or without colour codes.
_LOG_LINE = re.compile(rb"^\s*(\x1b\[[0-9;]*m)*\[(ERROR|WARNING|INFO|WARN)\]")
_HELD_MAX = 200


class NativeStderr:
    """Context manager: fd 2 into a filtering pipe (see the module docstring); a no-op where fd 2
    cannot be duplicated."""

    def __init__(self):
        self.held: deque[bytes] = deque(maxlen=_HELD_MAX)
        self.drop = False  # set by the caller when the command ends in a DhkdError
        self._saved = self._write = None
        self._thread = None
        self._stderr = None
        self._drained = threading.Event()
        self._sentinel = b"\0dhkd-native-stderr-end-%d\0\n" % os.getpid()

    def __enter__(self):
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            read, write = os.pipe()
        except (OSError, ValueError, AttributeError):
            return self
        self._saved, self._write = saved, write
        os.dup2(write, 2)
        if _uses_fd2(sys.stderr):  # Python's writes go straight to the real stderr
            self._stderr = sys.stderr
            sys.stderr = io.TextIOWrapper(io.FileIO(os.dup(saved), "w"), line_buffering=True, errors="backslashreplace")
        self._thread = threading.Thread(target=self._forward, args=(read, saved), daemon=True, name="native-stderr")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is None:
            return False
        if self._stderr is not None:
            try:
                sys.stderr.flush()
                sys.stderr.close()
            except (OSError, ValueError):
                pass
            sys.stderr = self._stderr
        os.dup2(self._saved, 2)  # fd 2 is the real stderr again
        try:
            os.write(self._write, self._sentinel)
        except OSError:
            pass
        os.close(self._write)
        self._drained.wait(timeout=5)  # children may keep the pipe open: wait for our part only
        if not self.drop and self.held:
            try:
                os.write(2, b"".join(self.held))
            except OSError:
                pass
        return False

    def _forward(self, read: int, saved: int):
        partial = b""
        with os.fdopen(read, "rb", buffering=0) as pipe, os.fdopen(saved, "wb", buffering=0) as out:
            while True:
                try:
                    chunk = pipe.read(65536)
                except OSError:
                    break
                if not chunk:
                    break
                data = partial + chunk
                lines = data.split(b"\n")
                partial = lines.pop()
                for line in lines:
                    self._route(line + b"\n", out)
                # a line still open (a progress bar) is forwarded unless it may become a log line
                if partial and not partial.lstrip().startswith((b"\x1b", b"[", b"\0")):
                    self._route(partial, out)
                    partial = b""
            if partial:
                self._route(partial, out)
        self._drained.set()

    def _route(self, line: bytes, out):
        if line == self._sentinel:
            self._drained.set()
        elif _LOG_LINE.match(line):
            self.held.append(line)
        else:
            try:
                out.write(line)
            except OSError:
                pass


def _uses_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
