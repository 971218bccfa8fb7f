"""SIGINT and SIGTERM: a training run stops at the next step with a checkpoint; elsewhere they stop
the command at once. Either way the CLI prints one line and exits with 128 + the signal number.

``handle_signals()`` (the CLI, around every command) makes both signals raise ``Interrupted``.
Inside ``deferred()`` (the training loop of a one-process run) the first signal is only recorded,
and the loop asks ``pending()`` after each step, saves its state and raises ``Interrupted``
itself, so the run resumes exactly there; a second signal raises at once. A multi-process run does
not defer: its processes would see the signal at different steps and could not agree on where to
save, so it stops at once and resumes from its last checkpoint.
"""

from __future__ import annotations

import signal
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
