"""SIGINT and SIGTERM: a training run stops at the next step with a checkpoint; elsewhere they stop
the command at once. Either way the CLI prints one line and exits with 128 + the signal number.

``handle_signals()`` (the CLI, around every command) makes both signals raise ``Interrupted``.
Inside ``deferred()`` (the training loop of a one-process run) the first signal is only recorded,
and the loop asks ``pending()`` after each step, saves its state and raises ``Interrupted``
itself, so the run resumes exactly there; a second signal raises at once. A multi-process run does
not defer: its processes would see the signal at different steps and could not agree on where to
save, so it stops at once and resumes from its last checkpoint.

A distributed run that loses a process (a machine killed, frozen or cut off) fails in its next
collective: at once where the lost process's connections close, else after the collective
timeout. ``lost_processes`` turns that failure into the line the CLI prints.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The command was stopped by a signal (a BaseException, like KeyboardInterrupt, so that
    ``except Exception`` clean-up code does not swallow it)."""

    def __init__(self, signum: int, where: str = ""):
        self.signum, self.where = signum, where
        super().__init__(signal.Signals(signum).name + (f" {where}" if where else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_pending: int | None = None
_deferring = 0


def _handler(signum, frame):
    global _pending
    if _deferring and _pending is None:
        _pending = signum
        return
    raise Interrupted(signum)


@contextmanager
def handle_signals():
    """SIGINT and SIGTERM raise ``Interrupted`` (or are deferred, see ``deferred``) while inside."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    _pending = None
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def deferred(enabled: bool = True):
    """Inside, a first signal only sets ``pending()``; the caller stops at a safe point."""
    global _deferring, _pending
    if not enabled:
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def pending() -> int | None:
    """The signal received inside ``deferred()`` and not yet acted on, if any."""
    return _pending


def clear():
    global _pending
    _pending = None


# How long a collective (and the processes' first meeting) may wait for another process before the
# run stops: a lost machine ends the others within this time, not torch's 30 minutes. The main
# process's work alone (a resume's verification of the units written, the teacher's validation)
# happens while the others wait in a barrier, so it must fit too.
TIMEOUT_VARIABLE = "DHKD_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


def collective_timeout() -> float:
    """Seconds a distributed run's processes wait for one another: ``DHKD_COLLECTIVE_TIMEOUT`` (a
    positive number of seconds, at most a day), else ``DEFAULT_TIMEOUT_S``."""
    from dhkd_pipe.errors import DhkdError

    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return float(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 86400:
        raise DhkdError(
            f"{TIMEOUT_VARIABLE}={text!r}: give the collective timeout in seconds, above 0 and at most 86400"
        )
    return seconds


# What torch's gloo and NCCL process groups say when a peer is gone or silent; gloo's words do not
# always name gloo ("Application timeout caused pair closure"), so where the failure was raised counts too.
_LOST = re.compile(
    r"connection closed by peer|connection reset by peer|broken pipe|connection refused|timed out|timeout|"
    r"pair closure|communicator was aborted",
    re.IGNORECASE,
)
_BACKEND = re.compile(r"gloo|nccl|processgroup|c10d", re.IGNORECASE)
_PEER = re.compile(r"\[([^\]\s]+)\]:\d+")  # gloo's "[10.0.0.2]:9369"; its source positions read "[.../pair.cc:545]"
_WAITED = re.compile(r"timed out waiting (\d+)\s*ms", re.IGNORECASE)
_COLLECTIVES = (f"torch{os.sep}distributed{os.sep}", f"torch{os.sep}nn{os.sep}parallel{os.sep}")


def _raised_in_collective(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if any(part in tb.tb_frame.f_code.co_filename for part in _COLLECTIVES):
            return True
        tb = tb.tb_next
    return False


def lost_processes(exc: BaseException) -> str | None:
    """``rank 1 of 4 (machine 0 of 2) lost ...: what the failed collective says`` when ``exc`` is a
    distributed run's collective that failed for a process gone or silent; None for anything else
    (no process group in this process, or another error). torch is never imported here."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    text = " ".join(str(exc).split())
    comms = isinstance(exc, getattr(dist, "DistError", ())) or (
        _LOST.search(text) and (_BACKEND.search(text) or _raised_in_collective(exc))
    )
    if world < 2 or not comms:
        return None
    rank = dist.get_rank()
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    machine = os.environ.get("GROUP_RANK") or str(rank // max(per_machine, 1))
    me = f"rank {rank} of {world} (machine {machine} of {max(world // max(per_machine, 1), 1)})"
    peer, waited = _PEER.search(text), _WAITED.search(text)
    if waited or re.search(r"timeout|timed out", text, re.IGNORECASE):
        try:
            seconds = int(waited.group(1)) / 1000 if waited else collective_timeout()
        except Exception:  # a bad variable was refused when the run started; the line must still come
            seconds = DEFAULT_TIMEOUT_S
        what = (
            f"another process did not answer within {seconds:g} s ({TIMEOUT_VARIABLE}): it or its machine "
            "stopped, froze or was cut off"
        )
    elif peer:
        what = (
            f"the connection to the process at {peer.group(1)} was closed or reset: that process or its machine stopped"
        )
    else:
        what = f"another process or its machine is gone ({text[:160]})"
    return f"{me} lost the run's other processes: {what}"
