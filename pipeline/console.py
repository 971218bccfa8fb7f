"""Where a command's output goes: progress and log lines to stderr, results (tables, JSON) to
stdout, so ``dhkd-pipe distill ... > summary.json`` captures the result alone."""

from __future__ import annotations

import sys


def log_line(*parts):
    """A progress or log line: stderr, flushed (the default ``log`` of every stage)."""
    print(*parts, file=sys.stderr, flush=True)
