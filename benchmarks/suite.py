"""``dhkd-pipe bench all``: every benchmark of the project in one command, one markdown table and
one JSON that name the device. It is the command to run when a GPU is lent for a few minutes:

- the fused losses of ``benchmarks/kernels.py`` against the eager and compiled published code;
- ``bench cache``: stage 1 against the teacher's bare forward pass on in-memory data and on a
  generated JPEG folder (DALI decoding on the GPU where one is present), decoding alone, images
  decoded per stored row;
- ``bench distill``: online, cached, student alone, loader alone, ``--channels-last``, ``--compile``;
- ``bench store``: write and read rows/s, local and on a local S3 server (moto) when installed.

Sizes: ``gpu`` (chosen on a CUDA machine: long enough for stage 1's fixed costs to fade), ``cpu``
(a few minutes) and ``tiny`` (seconds: the test's).
"""

from __future__ import annotations

import importlib.util
import os
import time
import traceback

SIZES = {
    "gpu": dict(
        kernel_sizes=None,
        kernel_reps=100,
        kernel_compile=True,
        cache_model="resnet32x4",
        cache_batch=256,
        cache_steps=400,
        image_model="resnet50",
        images=1024,
        views=8,
        resolution=224,
        image_batch=256,
        distill_teacher="resnet32x4",
        distill_student="resnet8x4",
        distill_batch=256,
        distill_steps=300,
        distill_compile=True,
        store_rows=200_000,
        store_s3_rows=100_000,
        store_sharded_rows=400_000,
        store_classes=1000,
        s3=True,
    ),
    "cpu": dict(
        kernel_sizes=["64,100,fp32", "256,1000,fp32"],
        kernel_reps=5,
        kernel_compile=True,
        cache_model="resnet8x4",
        cache_batch=64,
        cache_steps=4,
        image_model="resnet18",
        images=16,
        views=4,
        resolution=224,
        image_batch=16,
        distill_teacher="resnet8x4",
        distill_student="resnet8",
        distill_batch=32,
        distill_steps=6,
        distill_compile=True,
        store_rows=100_000,
        store_s3_rows=20_000,
        store_sharded_rows=400_000,
        store_classes=1000,
        s3=True,
    ),
    "tiny": dict(
        kernel_sizes=["16,10,fp32"],
        kernel_reps=2,
        kernel_compile=False,
        cache_model="resnet8",
        cache_batch=16,
        cache_steps=2,
        image_model="resnet8",
        images=4,
        views=2,
        resolution=32,
        image_batch=8,
        distill_teacher="resnet8",
        distill_student="resnet8",
        distill_batch=16,
        distill_steps=2,
        distill_compile=False,
        store_rows=2048,
        store_s3_rows=2048,
        store_sharded_rows=2048,
        store_classes=100,
        s3=False,
    ),
}


def default_size() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _kernels(out: str, s: dict) -> list[dict]:
    from dhkd_pipe.benchmarks import kernels as kernel_bench

    result = kernel_bench.run(
        s["kernel_sizes"],
        json_path=os.path.join(out, "bench_kernels.json"),
        reps=s["kernel_reps"],
        compile=s["kernel_compile"],
    )
    eager = {
        (r["B"], r["K"], r["dtype"]): r["median_ms"] for r in result["results"] if r["method"] == "eager published"
    }
    return [
        {
            "bench": "kernels",
            "what": f"DHKD loss fwd+bwd B={r['B']} K={r['K']} {r['dtype']}: {r['method']}",
            "value": r["median_ms"],
            "unit": "ms",
            "ratio": eager[(r["B"], r["K"], r["dtype"])] / r["median_ms"],
            "ratio_of": "speed-up over eager published",
        }
        for r in result["results"]
    ]


def _cache(out: str, s: dict) -> list[dict]:
    from dhkd_pipe.benchmarks.bench import bench_cache

    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    result = bench_cache(
        os.path.join(out, "bench_cache.json"),
        model=s["cache_model"],
        batch_size=s["cache_batch"],
        steps=s["cache_steps"],
        image_model=s["image_model"] if has_dali else None,
        images=s["images"],
        views=s["views"],
        resolution=s["resolution"],
        image_batch=s["image_batch"],
        codecs=False,
    )
    rows = [
        {
            "bench": "cache",
            "what": f"in-memory {s['cache_model']}: {r['path']}",
            "value": r["images_per_sec"],
            "unit": "img/s",
            "ratio": r["ratio"],
            "ratio_of": "x bare forward",
        }
        for r in result["speed"]
    ]
    folder = result["image_folder"]
    if folder is None:
        rows.append(
            {
                "bench": "cache",
                "what": "image folder: skipped (DALI not installed)",
                "value": None,
                "unit": "",
                "ratio": None,
                "ratio_of": "",
            }
        )
        return rows
    for r in folder["rows"]:
        decoded = "" if r["decoded_per_row"] is None else f" ({r['decoded_per_row']:.3f} decoded/row)"
        rows.append(
            {
                "bench": "cache",
                "what": f"JPEG folder {folder['model']} {folder['resolution']} px, {folder['views']} views, DALI on "
                f"{folder['device']}: {r['path']}{decoded}",
                "value": r["views_per_sec"],
                "unit": "views/s",
                "ratio": r["ratio"],
                "ratio_of": "x bare forward",
            }
        )
    agree = folder.get("region_equals_full")
    if agree is not None:
        rows.append(
            {
                "bench": "cache",
                "what": f"region decode == whole decode + slice on {folder['device']} (max |diff| "
                f"{folder['region_max_abs_diff']:.3g})",
                "value": float(agree),
                "unit": "1 = equal",
                "ratio": None,
                "ratio_of": "",
            }
        )
    return rows


def _distill(out: str, s: dict) -> list[dict]:
    from dhkd_pipe.benchmarks.bench import bench_distill

    rows, _ = bench_distill(
        os.path.join(out, "bench_distill.json"),
        teacher=s["distill_teacher"],
        student=s["distill_student"],
        batch_size=s["distill_batch"],
        steps=s["distill_steps"],
        compile_row=s["distill_compile"],
    )
    out_rows = []
    for r in rows:
        whole = f" (whole run, compiling included: x{r['run_vs_cached']:.2f})" if r.get("run_vs_cached") else ""
        out_rows.append(
            {
                "bench": "distill",
                "what": f"{s['distill_teacher']} -> {s['distill_student']}, batch {s['distill_batch']}: {r['path']}{whole}",
                "value": r["images_per_sec"],
                "unit": "img/s",
                "ratio": r["vs_cached"],
                "ratio_of": "x cached DHKD",
            }
        )
    return out_rows


S3_ROUND_TRIP_MS = 20.0  # the local S3 server's second run: a round trip of the order of a real object store's


def _store(out: str, s: dict) -> list[dict]:
    from dhkd_pipe.benchmarks.bench import bench_store

    s3 = s["s3"] and all(importlib.util.find_spec(m) is not None for m in ("moto", "s3fs"))
    # on disk with enough write units to take a time worth measuring (a few units pass too fast);
    # on the local S3 server fewer rows, each unit waiting on its requests
    runs = [
        (
            "",
            s["store_rows"],
            bench_store(os.path.join(out, "bench_store.json"), rows=s["store_rows"], classes=s["store_classes"]),
        )
    ]
    if s3:
        runs.append(
            (
                "",
                s["store_s3_rows"],
                bench_store(
                    os.path.join(out, "bench_store_s3.json"),
                    rows=s["store_s3_rows"],
                    classes=s["store_classes"],
                    local=False,
                    s3_local=True,
                    s3_latency_ms=S3_ROUND_TRIP_MS,
                ),
            )
        )
    # on disk again in ~32 MB shards, the layout of an ImageNet-sized store
    runs.append(
        (
            ", sharded",
            s["store_sharded_rows"],
            bench_store(
                os.path.join(out, "bench_store_sharded.json"),
                rows=s["store_sharded_rows"],
                classes=s["store_classes"],
                sharded=True,
            ),
        )
    )
    rows = []
    for layout, count, results in runs:
        for r in results:
            label = (
                f"{r['location']}{layout}, {r['writer_threads']} writer thread{'s' if r['writer_threads'] > 1 else ''}"
            )
            ratio = {}  # the parallel writer against the baselines: one reader on disk, one thread on object storage
            if r["writer_threads"] > 1:
                local = r["location"] == "local"
                ratio = {
                    "ratio": r["write_rows_per_sec"] / r["read_rows_per_sec"] if local else r["write_speedup"],
                    "ratio_of": "x one reader" if local else "x 1 thread",
                }
            rows.append(
                {
                    "bench": "store",
                    "what": f"{count} rows x {s['store_classes']} fp16, {label}: write",
                    "value": r["write_rows_per_sec"],
                    "unit": "rows/s",
                    "ratio": None,
                    "ratio_of": "",
                    **ratio,
                }
            )
            if r.get("read_rows_per_sec") is not None:
                rows.append(
                    {
                        "bench": "store",
                        "what": f"{count} rows x {s['store_classes']} fp16, {label}: read",
                        "value": r["read_rows_per_sec"],
                        "unit": "rows/s",
                        "ratio": None,
                        "ratio_of": "",
                    }
                )
    return rows


# The store before stage 1's and distill's benchmarks delete their stores and folders: on an ext4
# without a journal a file created within minutes of many deletions is slower to create (ext4
# skips the inodes freed recently), a cost of the benchmark's order, not of the writer.
BENCHES = {"kernels": _kernels, "store": _store, "cache": _cache, "distill": _distill}


def bench_all(out: str, size: str | None = None, only: tuple = ()) -> dict:
    """Runs the benchmarks (``only``: a subset of ``BENCHES``) at ``size``; writes
    ``out/bench_all.md`` and ``out/bench_all.json`` (and each benchmark's own JSON beside them)."""
    from dhkd_pipe.benchmarks.measure import machine as describe_machine
    from dhkd_pipe.benchmarks.measure import results_path, write_results
    from dhkd_pipe.errors import DhkdError, one_line

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
    _write(os.path.join(out, "bench_all.md"), table)
    write_results(os.path.join(out, "bench_all.json"), payload)
    print("\n" + table)
    if failed:
        raise DhkdError(
            f"{len(failed)} benchmark(s) failed ({', '.join(failed)}; tracebacks above); the others' figures are in {out}"
        )
    return payload


def _markdown(rows: list[dict], machine: dict, size: str, seconds: dict, total: float) -> str:
    from dhkd_pipe.stages.report import markdown_table

    for r in rows:
        r["ratio_text"] = "" if r["ratio"] is None else f"{r['ratio']:.2f} {r['ratio_of']}"
    head = (
        f"# dhkd-pipe bench all: {machine['device']}\n\ntorch {machine['torch']}, python {machine['python']}; size {size}; "
        f"{total:.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})\n\n"
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


def _write(path: str, text: str):
    """Whole or not at all: a temporary file renamed over the target."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
