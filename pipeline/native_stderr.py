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
# libjpeg(-turbo)'s messages about damaged data (jerror.h): a decoder that only warns fills what it
# could not decode with grey and reports success, so these lines are the only sign of it; and
# libpng's, which come before the error that DALI raises.
DECODER_LINE = re.compile(
    rb"^\s*(Corrupt JPEG data|Premature end of JPEG file|Invalid SOS parameters|Inconsistent progression"
    rb"|Unsupported marker type|Bogus (marker|Huffman|DQT|DHT|input)|Huffman table 0x|Invalid JPEG file structure"
    rb"|libpng (error|warning):)"
)


def is_decoder_damage(line: bytes) -> bool:
    """A libjpeg line that says part of an image was not decoded (and was filled in)."""
    # "N extraneous bytes before marker 0xd9" too: a decoder that lost its place in damaged data
    # may finish early and say no more than that (some ImageNet files say it of padding: still refused)
    # a libpng warning ("iCCP: known incorrect sRGB profile") is about metadata, not pixels
    return bool(DECODER_LINE.match(line)) and not line.lstrip().startswith(b"libpng warning:")


_HELD_MAX = 200


def active() -> "NativeStderr | None":
    """The capture that holds fd 2 now (the innermost), or None."""
    return _ACTIVE[-1] if _ACTIVE else None


_ACTIVE: list["NativeStderr"] = []


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
        self.decoder_damage = 0  # lines of is_decoder_damage seen (held, as log lines are)
        self.last_damage = b""
        self._synced = threading.Condition()
        self._sync_sent = self._sync_seen = 0

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
        _ACTIVE.append(self)
        return self

    def sync(self, timeout: float = 5.0) -> bool:
        """Waits until everything written to fd 2 before this call has been routed (counted), so
        that ``decoder_damage`` covers it; False if the forwarding thread did not get there."""
        if self._thread is None:
            return False
        with self._synced:
            self._sync_sent += 1
            ticket = self._sync_sent
        try:
            os.write(2, self._sync_line(ticket))
        except OSError:
            return False
        with self._synced:
            return self._synced.wait_for(lambda: self._sync_seen >= ticket, timeout)

    def _sync_line(self, ticket: int) -> bytes:
        return b"\0dhkd-native-stderr-sync-%d-%d\0\n" % (os.getpid(), ticket)

    def __exit__(self, *exc):
        if self._thread is None:
            return False
        if self in _ACTIVE:
            _ACTIVE.remove(self)
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
        elif line.startswith(b"\0dhkd-native-stderr-sync-%d-" % os.getpid()):
            with self._synced:
                self._sync_seen = max(self._sync_seen, int(line.rstrip(b"\0\n").rsplit(b"-", 1)[1]))
                self._synced.notify_all()
        elif DECODER_LINE.match(line):
            if is_decoder_damage(line):
                self.decoder_damage += 1
                self.last_damage = line.strip()
            self.held.append(line)
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
