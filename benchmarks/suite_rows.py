"""What ``bench all`` runs of each benchmark, at each size (``SIZES``), and the rows of its table
that each benchmark's results become (``kernel_rows``, ``cache_rows``, ``distill_rows``,
``store_rows``: each row a value with its unit and, where there is one, its ratio to a baseline)."""

from __future__ import annotations

import os

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


def kernel_rows(out: str, s: dict) -> list[dict]:
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


def cache_rows(out: str, s: dict) -> list[dict]:
    from dhkd_pipe.benchmarks.cache import bench_cache
    from dhkd_pipe.data.imagefolder import dali_installed

    has_dali = dali_installed()
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


def distill_rows(out: str, s: dict) -> list[dict]:
    from dhkd_pipe.benchmarks.distill import bench_distill

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
        pair = f"{s['distill_teacher']} -> {s['distill_student']}, batch {s['distill_batch']}"
        out_rows.append(
            {
                "bench": "distill",
                "what": f"{pair}: {r['path']}{whole}",
                "value": r["images_per_sec"],
                "unit": "img/s",
                "ratio": r["vs_cached"],
                "ratio_of": "x cached DHKD",
            }
        )
    return out_rows


S3_ROUND_TRIP_MS = 20.0  # the local S3 server's second run: a round trip of the order of a real object store's


def store_rows(out: str, s: dict) -> list[dict]:
    from dhkd_pipe.benchmarks.local_s3 import local_s3_available
    from dhkd_pipe.benchmarks.store import bench_store

    s3 = s["s3"] and local_s3_available()
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
            # the parallel writer against its baselines: one reader on disk, one thread on object storage
            ratio = {}
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
