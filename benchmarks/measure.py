"""What every benchmark shares (``bench cache|distill|store|accuracy|all``, ``benchmarks/kernels.py``):
the machine it ran on, a clock that waits for the device, a markdown table, and its result file.

A result file is data the docs are generated from: ``write_results`` records in it the machine
(CPU and GPU model, cores, memory), the date (UTC), the git commit (``+dirty`` when tracked files
differ from it), the command line and the tool's version, and writes it atomically
(``files.write_json``: a kill leaves the previous file, never half of one). Results worth
keeping live in ``benchmarks/results/<machine>/``; ``{machine}`` in a result path is replaced by
``machine_slug()``, so ``bench all --out 'benchmarks/results/{machine}'`` files them there."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from dhkd_pipe.console import log_line
from dhkd_pipe.files import write_json
from dhkd_pipe.stages.report import markdown_table
from dhkd_pipe.version import tool_version

Column = tuple[str, str, str]  # (row key, header, format spec)

MACHINE_PLACEHOLDER = "{machine}"
# the checkout this package runs from (benchmarks/ sits at its top)
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo's ``model name``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def memory_gib() -> float | None:
    """The machine's physical memory in GiB (None where the OS does not say)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return None


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", text.lower())  # trademarks, "CPU @ 2.70GHz"
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_slug(m: dict | None = None) -> str:
    """A short folder name for the machine: the GPU model (with ``-xN`` for N GPUs), else
    ``cpu-`` the CPU model and its core count, e.g. ``nvidia-h200`` or ``cpu-intel-xeon-gold-6338-2c``."""
    m = m or machine()
    if m.get("gpu"):
        count = m.get("gpu_count") or 1
        return _slug(m["gpu"]) + (f"-x{count}" if count > 1 else "")
    return f"cpu-{_slug(m.get('cpu') or '')}-{m.get('cores')}c".replace("cpu--", "cpu-")


def machine() -> dict:
    """The device (a GPU's name, else the CPU's cores), the CPU's and GPU's models, cores, memory,
    torch's and Python's versions, torch's threads, and the machine's slug."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    m = {
        "device": gpu or f"cpu ({os.cpu_count()} cores)",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
        "os": platform.platform(terse=True),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }
    m["slug"] = machine_slug(m)
    return m


def git_commit(root: str = SOURCE_ROOT) -> str | None:
    """The checkout's short commit hash, with ``+dirty`` when tracked files differ from it; None
    outside a git checkout (an installed copy) or without git."""

    def git(*args) -> str:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        if git("rev-parse", "--show-toplevel") != os.path.realpath(root):
            return None  # the package sits inside some other repository, not in its own checkout
        commit = git("rev-parse", "--short", "HEAD")
        # untracked files are left out: result files written a moment ago must not mark the code dirty
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: the console script (or a script's file name) and its arguments."""
    argv = list(sys.argv if argv is None else argv)
    head = [os.path.basename(argv[0])] if argv else []
    if head and head[0] == "cli.py":  # python -m dhkd_pipe.cli, accelerate launch -m dhkd_pipe.cli
        head = ["dhkd-pipe"]
    elif head and head[0].endswith(".py"):  # a script: python benchmarks/kernels.py
        head = ["python", argv[0]]
    return shlex.join([*head, *argv[1:]])


def provenance(argv: list[str] | None = None) -> dict:
    """What a result file records beside its figures, apart from the machine."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": command_line(argv),
        "version": tool_version(),
    }


def results_path(path: str, m: dict | None = None) -> str:
    """``path`` with ``{machine}`` replaced by the machine's slug."""
    return path.replace(MACHINE_PLACEHOLDER, machine_slug(m)) if MACHINE_PLACEHOLDER in path else path


def clock(device) -> float:
    """``perf_counter()`` once the device's queued work is done (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def median_seconds(step: Callable[[], object], device, reps: int, warmup: int = 0) -> float:
    """Median wall time of ``step()`` over ``reps`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = clock(device)
        step()
        times.append(clock(device) - t0)
    return statistics.median(times)


def print_table(title: str, rows: list[dict], columns: list[Column]):
    print(f"\n{title}\n")
    print(markdown_table(rows, columns))


def write_results(path: str, payload: dict, log=log_line) -> str:
    """The benchmark's JSON at ``path`` (``{machine}`` replaced by the machine's slug, folders made),
    with the machine, date, commit, command line and version recorded beside ``payload``; written
    atomically, non-finite numbers as null. Returns the path written."""
    m = {**machine(), **(payload.get("machine") or {})}  # a benchmark may say more (its threads)
    path = results_path(path, m)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json(path, {**payload, "machine": m, **provenance()})
    log(f"wrote {path}")
    return path


def memory_formats() -> list[tuple]:
    """(name, format): stage 1's default first, then the other (``--channels-last`` measured)."""
    import torch

    from dhkd_pipe.config import CacheConfig
    from dhkd_pipe.data.inference import memory_format

    both = [("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)]
    return sorted(both, key=lambda f: f[1] != memory_format(CacheConfig()))
