"""What every benchmark shares (``bench cache|distill|store|accuracy``, ``benchmarks/kernels.py``): the
machine it ran on, a clock that waits for the device, a markdown table, and its JSON written
atomically (``run_folder.write_json``: a kill leaves the previous file, never half of one)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch

from dhkd_pipe.console import log_line
from dhkd_pipe.stages.report import markdown_table
from dhkd_pipe.training.run_folder import write_json

Column = tuple[str, str, str]  # (row key, header, format spec)


def machine() -> dict:
    """The device (a GPU's name, else the CPU's cores), torch's and Python's versions, torch's threads."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "device": gpu or f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


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


def write_results(path: str, payload: dict, log=log_line):
    """The benchmark's JSON at ``path``, written atomically; non-finite numbers become null."""
    write_json(path, payload)
    log(f"wrote {path}")


def memory_formats() -> list[tuple]:
    """(name, format): stage 1's default first, then the other (``--channels-last`` measured)."""
    import torch

    from dhkd_pipe.config import CacheConfig
    from dhkd_pipe.data.inference import memory_format

    both = [("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)]
    return sorted(both, key=lambda f: f[1] != memory_format(CacheConfig()))
