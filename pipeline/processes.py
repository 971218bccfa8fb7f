"""Processes and the holders of locks: whether a process id is alive, and who holds a lock.

A lock of this tool (a run folder's ``run.lock``, ``training.run_lock``; a logit store's ``.lock``,
``store.lock``) names its holder as JSON (``new_holder``: host, pid, start time, command). One
rule judges it for both: a holder is gone only when it ran on this host and its pid is dead, a
zombie, or reused since (``holder_alive``); a live holder is refused with one line naming it
(``held_line``). The shared-memory folders a killed process leaves (``dali_views``) use the same
pid test. Linux's /proc also tells zombies and start times; elsewhere only ``kill(pid, 0)`` is
asked."""

from __future__ import annotations

import errno
import json
import os
import socket
import time

HOST = socket.gethostname()


def process_stat(pid: int) -> tuple[str, float] | None:
    """(state letter, start time as a Unix time) of a process from /proc, or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        state, ticks = fields[0], int(fields[19])
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return state, boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int, started_before: float | None = None) -> bool:
    """False when ``pid`` is dead, a zombie, or (given ``started_before``, a Unix time) a process
    started after that time, i.e. the pid was reused; True otherwise, including when unsure."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (a pid beyond the kernel's range never ran)
        return False
    except PermissionError:
        pass
    stat = process_stat(pid)
    if stat is None:
        return True
    state, started = stat
    if state in ("Z", "X"):
        return False
    return started_before is None or started <= started_before + 1


def holder_alive(holder: dict) -> bool:
    """Whether the holder a lock names (``{"host", "pid", "started"}``) may still run: False only
    when we can tell, i.e. it ran on this host and its pid is dead, a zombie, or reused since."""
    if holder.get("host") != HOST:
        return True
    started = holder.get("started")
    return pid_alive(int(holder["pid"]), started if isinstance(started, (int, float)) else None)


def new_holder(command: str = "", **extra) -> dict:
    """The holder record of a lock this process takes: host, pid, start time, command (and ``extra``)."""
    return {"host": HOST, "pid": os.getpid(), "started": time.time(), "command": command, **extra}


def parse_holder(data: bytes | None) -> dict | None:
    """The holder a lock file names, or None if it is empty or garbled (no integer pid, no host)."""
    try:
        holder = json.loads((data or b"").decode())
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str):
        return holder
    return None


def is_this_process(holder: dict) -> bool:
    return holder.get("host") == HOST and holder.get("pid") == os.getpid()


def held_line(what: str, holder: dict, elsewhere: str) -> str:
    """The one line refusing a lock that ``holder`` holds: ``WHAT: pid 1 on host-a, started ...;
    wait for it to finish or stop it (kill 1)``; ``elsewhere``: what to do when it runs on another
    host (whose processes cannot be judged from here)."""
    if holder.get("host") == HOST:
        how = f"wait for it to finish or stop it (kill {holder['pid']})"
    else:
        how = f"wait for it to finish; {elsewhere}"
    return f"{what}: {describe_holder(holder)}; {how}"


def describe_holder(holder: dict) -> str:
    """``pid 123 on host-a, started 2026-01-02 03:04:05 (the command)``."""
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    what = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder['pid']} on {holder.get('host')}, started {when}{what}"


def flock_exclusive(fd: int, block: bool = False) -> bool:
    """Whether this process now holds ``flock`` on ``fd`` (waiting for it when ``block``); True
    where the file system has no flock, so a lock file alone decides there."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return True
        raise
