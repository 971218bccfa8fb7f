"""``run.lock``: one process trains in a run folder at a time.

The file is created with ``O_CREAT | O_EXCL`` and names its holder (``processes.new_holder``:
host, pid, start time, command); the holder keeps it open under ``flock`` while the run lives. A
lock is stale when ``processes.holder_alive`` says its holder is gone (on this host, its pid dead,
a zombie, or reused since): it is taken over, under ``flock`` so two takers cannot both win. A lock
held on another host, or by a live process, is refused with the holder named and how to clear it.
A process that already holds a folder's lock takes it again (stages run one after another).
"""

from __future__ import annotations

import json
import os
import time

from dhkd_pipe.errors import DhkdError, io_error
from dhkd_pipe.files import remove_quietly
from dhkd_pipe.processes import flock_exclusive, held_line, holder_alive, is_this_process, new_holder, parse_holder

LOCK = "run.lock"


class RunLock:
    """The lock of one run folder while this process holds it: :meth:`acquire`, :meth:`release`."""

    _held: dict[str, "RunLock"] = {}  # realpath -> the lock this process holds

    def __init__(self, path: str, fd: int, holder: dict):
        self.path, self.fd, self.holder, self.count = path, fd, holder, 1

    @classmethod
    def acquire(cls, folder: str, command: str = "") -> "RunLock":
        path = os.path.join(folder, LOCK)
        key = os.path.realpath(path)
        mine = cls._held.get(key)
        if mine is not None and mine._still_mine():
            mine.count += 1
            return mine
        cls._held.pop(key, None)
        holder = new_holder(command)
        for _ in range(100):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                fd = _take_over(path)
                if fd is None:  # changing under us: look again
                    time.sleep(0.02)
                    continue
            except OSError as e:
                raise io_error(path, e, "create") from None
            else:
                flock_exclusive(fd)
            try:
                data = (json.dumps(holder) + "\n").encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            except OSError as e:
                os.close(fd)
                remove_quietly(path)
                raise io_error(path, e) from None
            lock = cls(path, fd, holder)
            cls._held[key] = lock
            return lock
        raise DhkdError(f"cannot take {path}: it keeps changing; is another run starting in {folder}?")

    def _still_mine(self) -> bool:
        try:
            return self.fd >= 0 and os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False

    def release(self):
        self.count -= 1
        if self.count > 0 or self.fd < 0:
            return
        if self._still_mine():
            remove_quietly(self.path)
        os.close(self.fd)
        self.fd = -1
        type(self)._held.pop(os.path.realpath(self.path), None)


def _read_holder(fd: int) -> dict | None:
    try:
        return parse_holder(os.pread(fd, 4096, 0))
    except OSError:
        return None


def _take_over(path: str) -> int | None:
    """An fd of the existing lock if it is stale (flocked, to be rewritten by the caller); None if
    it changed meanwhile; raises DhkdError if it is held."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise io_error(path, e, "open") from None
    try:
        holder = _read_holder(fd)
        if not flock_exclusive(fd):  # a live holder keeps it under flock
            if holder is None:
                os.close(fd)
                return None  # being written
            raise _held_error(path, holder)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            os.close(fd)
            return None  # replaced meanwhile
        holder = _read_holder(fd)
        if holder is None:
            if time.time() - os.fstat(fd).st_mtime < 2:
                os.close(fd)
                return None  # its creator is about to write it
            return fd  # an empty or garbled lock whose writer is gone
        if holder_alive(holder):
            raise _held_error(path, holder)
        return fd
    except FileNotFoundError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


def check_not_held(folder: str):
    """Refuses a folder whose lock a live process (not this one) holds: a clear line before any work."""
    path = os.path.join(folder, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        holder = _read_holder(fd)
    finally:
        os.close(fd)
    if holder is not None and not is_this_process(holder) and holder_alive(holder):
        raise _held_error(path, holder)


def _held_error(path: str, holder: dict) -> DhkdError:
    folder = os.path.dirname(path)
    return DhkdError(held_line(f"{folder} is in use by another run", holder, f"if it is gone, remove {path}"))
