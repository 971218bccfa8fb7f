"""``dhkd-pipe bench all``: every benchmark of the project in one command, one markdown table and
one JSON that name the device. It is the command to run when a GPU is lent for a few minutes:

- the fused losses of ``benchmarks/kernels.py`` against the eager and compiled published code;
- ``bench cache``: stage 1 against the teacher's bare forward pass on in-memory data and on a
  generated JPEG folder (DALI decoding on the GPU where one is present), decoding alone, images
  decoded per stored row;
- ``bench distill``: online, cached, student alone, loader alone, ``--channels-last``, ``--compile``;
- ``bench store``: write and read rows/s, local and on a local S3 server (moto) when installed.

What each size runs and the rows each benchmark gives are in ``suite_rows``. Sizes: ``gpu``
(chosen on a CUDA machine: long enough for stage 1's fixed costs to fade), ``cpu`` (a few minutes)
and ``tiny`` (seconds: the test's).
"""

from __future__ import annotations

import os
import time
import traceback

from dhkd_pipe.benchmarks.suite_rows import SIZES, cache_rows, distill_rows, kernel_rows, store_rows


def default_size() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


# The store before stage 1's and distill's benchmarks delete their stores and folders: on an ext4
# without a journal a file created within minutes of many deletions is slower to create (ext4
# skips the inodes freed recently), a cost of the benchmark's order, not of the writer.
BENCHES = {"kernels": kernel_rows, "store": store_rows, "cache": cache_rows, "distill": distill_rows}


def bench_all(out: str, size: str | None = None, only: tuple = ()) -> dict:
    """Runs the benchmarks (``only``: a subset of ``BENCHES``) at ``size``; writes
    ``out/bench_all.md`` and ``out/bench_all.json`` (and each benchmark's own JSON beside them)."""
    from dhkd_pipe.benchmarks.measure import machine as describe_machine
    from dhkd_pipe.benchmarks.measure import results_path, write_results
    from dhkd_pipe.errors import DhkdError, one_line
    from dhkd_pipe.files import write_atomic

    out = results_path(out)  # --out 'benchmarks/results/{machine}': this machine's results folder
    size = size or default_size()
    if size not in SIZES:
        raise DhkdError(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}")
    unknown = [b for b in only if b not in BENCHES]
    if unknown:
        raise DhkdError(f"unknown benchmark {unknown[0]!r}; choose from: {', '.join(BENCHES)}")
    os.makedirs(out, exist_ok=True)
    s, rows, seconds, failed = SIZES[size], [], {}, {}
    start = time.perf_counter()
    for name, run in BENCHES.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            rows += run(out, s)
        except Exception as e:  # a lent GPU's minutes are few: one broken benchmark must not cost the others' figures
            traceback.print_exc()
            failed[name] = one_line(e, limit=300)
            rows.append(
                {
                    "bench": name,
                    "what": f"failed: {failed[name]}",
                    "value": None,
                    "unit": "",
                    "ratio": None,
                    "ratio_of": "",
                }
            )
        seconds[name] = time.perf_counter() - t0
    machine = describe_machine()
    total = time.perf_counter() - start
    payload = {
        "bench": "all",
        "machine": machine,
        "size": size,
        "sizes": s,
        "seconds": seconds,
        "total_seconds": total,
        "rows": rows,
        "failed": failed,
    }
    table = _markdown(rows, machine, size, seconds, total)
    write_atomic(os.path.join(out, "bench_all.md"), lambda f: f.write(table), mode="w")
    write_results(os.path.join(out, "bench_all.json"), payload)
    print("\n" + table)
    if failed:
        raise DhkdError(
            f"{len(failed)} benchmark(s) failed ({', '.join(failed)}; tracebacks above); "
            f"the others' figures are in {out}"
        )
    return payload


def _markdown(rows: list[dict], machine: dict, size: str, seconds: dict, total: float) -> str:
    from dhkd_pipe.stages.report import markdown_table

    for r in rows:
        r["ratio_text"] = "" if r["ratio"] is None else f"{r['ratio']:.2f} {r['ratio_of']}"
    each = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    head = (
        f"# dhkd-pipe bench all: {machine['device']}\n\n"
        f"torch {machine['torch']}, python {machine['python']}; size {size}; {total:.0f} s in all ({each})\n\n"
    )
    return (
        head
        + markdown_table(
            rows,
            [
                ("bench", "bench", "s"),
                ("what", "what", "s"),
                ("value", "value", ",.1f"),
                ("unit", "unit", "s"),
                ("ratio_text", "ratio", "s"),
            ],
        )
        + "\n"
    )
