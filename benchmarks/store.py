"""``dhkd-pipe bench store``: write rows/s of one process with one writer thread and with the
parallel writer (stage 1's ``StoreWriter``), and read rows/s of one stage-2 process, per store
location: a local disk, URLs, a local S3 server (``local_s3``)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

from dhkd_pipe.benchmarks.local_s3 import local_s3_server
from dhkd_pipe.benchmarks.measure import machine, print_table, write_results
from dhkd_pipe.benchmarks.synthetic import teacher_like_blocks

STORE_READ_TARGETS = {"local": 50_000, "s3-local": 10_000}  # rows/s per reading process, K = 1000, fp16


def _is_bench_store(location: str) -> bool:
    from dhkd_pipe.errors import DhkdError
    from dhkd_pipe.store.reader import LogitCache

    try:
        return (LogitCache.open(location).attrs.get("command") or {}).get("bench") == "store"
    except DhkdError:
        return False


def _timed_store_write(
    location: str, rows: int, classes: int, chunk_rows: int, codec: str, threads: int, sharded: bool = False
):
    """Writes a one-epoch teacher-like store at ``location`` through ``StoreWriter`` (the way stage
    1 does) with ``threads`` writer threads, ``sharded`` as a store of many chunks is (write units
    of about 32 MB) whatever its size; returns (seconds, the writer's store)."""
    from dhkd_pipe.store.writer import StoreWriter
    from dhkd_pipe.version import tool_version

    command = {
        "bench": "store",
        "rows": rows,
        "classes": classes,
        "chunk_rows": chunk_rows,
        "codec": codec,
        "sharded": sharded,
    }
    writer = StoreWriter(
        location,
        epochs=1,
        num_samples=rows,
        num_classes=classes,
        chunk_rows=chunk_rows,
        labels=np.zeros(rows, np.int32),
        codec=codec,
        attrs={"command": command, "tool_version": tool_version()},
        overwrite=_is_bench_store(location),
        holder="dhkd-pipe bench store",
        threads=threads,
        **({"shard_threshold": 1} if sharded else {}),
    )
    with writer:
        store = writer.store
        blocks = teacher_like_blocks(min(store.shard_chunks * chunk_rows, rows), classes)
        order, views = np.arange(rows, dtype=np.int32), np.zeros((rows, 5), np.int32)
        t0 = time.perf_counter()
        for i, (e, chunks) in enumerate(store.write_units()):
            a, b = store.unit_rows(chunks[0])
            writer.put(e, chunks[0], blocks[i % len(blocks)][: b - a], order[a:b], views[a:b])
        writer.wait()
        seconds = time.perf_counter() - t0
    return seconds, store


def _timed_store_read(location: str, rows: int, batch_size: int) -> dict:
    """Streams the store at ``location`` the way stage 2 does (one process)."""
    from dhkd_pipe.data.loader import StoreEpochs, row_batches
    from dhkd_pipe.store.reader import LogitCache

    reader = LogitCache.open(location)
    reader.check_complete()
    epochs = StoreEpochs(reader, "cpu")
    t0 = time.perf_counter()
    streamed = 0
    for values, _ in row_batches(epochs.logits(0, list(range(reader.num_chunks)), 0, rows), batch_size):
        streamed += len(values)
    seconds = time.perf_counter() - t0
    if streamed != rows:
        raise RuntimeError(f"streamed {streamed} rows of {rows}")
    return {"read_rows_per_sec": rows / seconds, "read_ahead_chunks": epochs.prefetch, "summary": reader.summary()}


def _bench_store_at(
    location: str,
    rows: int,
    classes: int,
    chunk_rows: int,
    codec: str,
    batch_size: int,
    server_cpu=None,
    sharded: bool = False,
) -> list[dict]:
    """Two rows for one location: the store written by one writer thread, then by the parallel
    writer (stage 1's default thread count there), which is then streamed as stage 2 does. The
    two stores lie side by side (``location``-single and ``location``) and are deleted at the end: a
    write just after the other's deletion would, on an ext4 without a journal, pay
    for the freed inodes it skips (``recently_deleted`` in its inode allocation), a cost of the
    benchmark, not of the writer.
    ``server_cpu``: the CPU seconds a local server has used so far; its share of one core while
    writing goes in the rows (near 1, the server sets the rate)."""
    from dhkd_pipe.store.writer import write_threads

    results, stores = [], []
    try:
        for threads in (1, max(2, write_threads(location))):
            cpu = server_cpu() if server_cpu else None
            at = location.rstrip("/") + "-single" if threads == 1 else location
            write_s, store = _timed_store_write(at, rows, classes, chunk_rows, codec, threads, sharded)
            stores.append(store)
            busy = {} if cpu is None else {"server_cpu_share": (server_cpu() - cpu) / write_s}
            read = _timed_store_read(at, rows, batch_size) if threads > 1 else {}
            summary = read.pop("summary", None) or store.summary()
            stored = summary["bytes_per_logit"] * rows * classes
            results.append(
                {
                    "writer_threads": threads,
                    "chunks_per_write_unit": store.shard_chunks,
                    "write_rows_per_sec": rows / write_s,
                    "write_mb_per_sec": stored / write_s / 1e6,
                    "bytes_per_logit": summary["bytes_per_logit"],
                    "stored_mb": summary["bytes_on_disk"] / 1e6,
                    **busy,
                    **read,
                }
            )
    finally:
        for store in stores:
            store.objects.delete_all()
    single, parallel = results
    parallel["write_speedup"] = parallel["write_rows_per_sec"] / single["write_rows_per_sec"]
    parallel["read_mb_per_sec"] = parallel["read_rows_per_sec"] * classes * parallel["bytes_per_logit"] / 1e6
    parallel["write_keeps_up"] = (
        parallel["write_rows_per_sec"] >= parallel["read_rows_per_sec"]
    )  # vs one stage-2 reader
    return results


def bench_store(
    json_path: str,
    rows: int = 100_000,
    classes: int = 1000,
    chunk_rows: int = 1024,
    codec: str = "fp16",
    batch_size: int = 256,
    urls: tuple = (),
    s3_local: bool = False,
    local: bool = True,
    s3_latency_ms: float = 0.0,
    sharded: bool = False,
):
    """Write rows/s (and MB/s of stored bytes) of one process with one writer thread and with the
    parallel writer, and read rows/s of one stage-2 process, per store location. With
    ``s3_local``, the local S3 server as it is and, for ``s3_latency_ms`` > 0, a second server
    that adds that many milliseconds to each request: on a small machine the bare local server
    shares the cores with the writer and sets the rate, which says little about a real object
    store, where each request waits mostly on its round trip. ``sharded``: the stores in shards
    of about 32 MB, as stage 1 lays out a store of 10,000 chunks or more (ImageNet's)."""
    from dhkd_pipe.errors import DhkdError

    if rows < 1 or classes < 1 or chunk_rows < 1 or batch_size < 1:
        raise DhkdError("--rows, --classes, --chunk-rows and --batch-size must be at least 1")
    if s3_latency_ms > 0 and not s3_local:
        raise DhkdError("--s3-latency-ms is added to the local S3 server's requests: give --s3-local too")
    results = []

    def run(name: str, location: str, target, server_cpu=None):
        for result in _bench_store_at(location, rows, classes, chunk_rows, codec, batch_size, server_cpu, sharded):
            result = {"location": name, "url": location, **result}
            if "read_rows_per_sec" in result:
                result["read_target_rows_per_sec"] = target
                result["meets_target"] = None if target is None else result["read_rows_per_sec"] >= target
            results.append(result)

    if local:
        work = tempfile.mkdtemp(prefix="dhkd-bench-store-")
        try:
            run("local", os.path.join(work, "store.zarr"), STORE_READ_TARGETS["local"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for url in urls:
        run(url, url, None)
    if s3_local:
        for latency in (0.0, float(s3_latency_ms)) if s3_latency_ms > 0 else (0.0,):
            with local_s3_server(latency_ms=latency) as (bucket, server_cpu):
                name = "s3-local" if latency == 0 else f"s3-local +{latency:g} ms"
                run(name, f"{bucket}/store.zarr", STORE_READ_TARGETS["s3-local"], server_cpu)
    if not results:
        raise DhkdError("nothing to measure: drop --no-local, or give --url or --s3-local")
    print_table(
        f"bench store: {rows} rows x {classes} classes ({codec}), chunks of {chunk_rows} rows"
        f"{', sharded' if sharded else ''}, one process, {machine()['device']}, "
        f"load {os.getloadavg()[0]:.2f}",
        results,
        [
            ("location", "location", "s"),
            ("writer_threads", "writer threads", "d"),
            ("write_rows_per_sec", "write rows/s", ",.0f"),
            ("write_mb_per_sec", "write MB/s", ".1f"),
            ("write_speedup", "vs 1 thread", ".2f"),
            ("read_rows_per_sec", "read rows/s", ",.0f"),
            ("write_keeps_up", "write >= read", ""),
            ("server_cpu_share", "server CPU", ".2f"),
            ("bytes_per_logit", "bytes/logit", ".3f"),
            ("read_target_rows_per_sec", "read target", ",.0f"),
            ("meets_target", "meets", ""),
        ],
    )
    write_results(
        json_path,
        {
            "bench": "store",
            "machine": machine(),
            "load_1min": os.getloadavg()[0],
            "rows": rows,
            "classes": classes,
            "codec": codec,
            "chunk_rows": chunk_rows,
            "batch_size": batch_size,
            "s3_latency_ms": s3_latency_ms,
            "sharded": sharded,
            "results": results,
        },
    )
    return results
