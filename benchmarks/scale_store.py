"""What ``bench scale`` does at one size: the synthetic data set stage 2 replays (one image seen N
times, labels i mod K), a store of that size written through stage 1's writer, and what a reader
waits for (``STEPS``), timed in a fresh process of its own
(``python -m dhkd_pipe.benchmarks.scale_store LOCATION BATCH_SIZE local|s3``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

RESOLUTION = 32
# What the child process times, in this order (the first batch first: the reader's resident memory
# is its peak up to there); table headers beside them.
STEPS = {
    "open": "open s",
    "first_batch": "first batch s",
    "inspect_quick": "inspect --quick s",
    "inspect": "inspect s",
    "resume": "resume s",
    "audit": "audit s",
}


# ---- the synthetic data set stage 2 replays ------------------------------------------------------


def synthetic_plan():
    from dhkd_pipe.data.views import ViewPlan

    return ViewPlan(seed=0, policy="pad_crop_flip", resolution=RESOLUTION, mean=(0.5,) * 3, std=(0.25,) * 3)


def synthetic_data(num_samples: int, num_classes: int):
    """An in-memory data set of ``num_samples`` copies of one image (a broadcast view: no memory
    per sample), labels ``i mod num_classes``; its fingerprint names its size, not its bytes."""
    import torch

    from dhkd_pipe.data.in_memory import InMemoryData

    image = torch.arange(3 * RESOLUTION * RESOLUTION, dtype=torch.int64).remainder(256).to(torch.uint8)
    image = image.view(1, 3, RESOLUTION, RESOLUTION)
    labels = torch.arange(num_samples, dtype=torch.int64).remainder(num_classes)
    return InMemoryData(
        kind="synthetic",
        train_images=image.expand(num_samples, -1, -1, -1),
        train_labels=labels,
        val_images=image.expand(num_classes, -1, -1, -1),
        val_labels=torch.arange(num_classes, dtype=torch.int64),
        num_classes=num_classes,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        source="bench scale",
        _fingerprint={
            "kind": "synthetic",
            "num_samples": num_samples,
            "num_classes": num_classes,
            "image_size": [RESOLUTION, RESOLUTION],
            "digest": "one image, labels i mod K",
        },
    )


# ---- writing a store -----------------------------------------------------------------------------


def write_store(location: str, rows: int, views: int, classes: int, chunk_rows: int, codec: str, sharded: bool):
    """Writes a store of ``rows`` rows (``views`` view-epochs of rows/views samples) at ``location``
    through ``StoreWriter``; returns its timings and layout."""
    import zarr.codecs  # noqa: F401  (imported before the clock starts, as a writer's process has it)

    from dhkd_pipe.benchmarks.synthetic import teacher_like_blocks
    from dhkd_pipe.store.writer import StoreWriter
    from dhkd_pipe.version import tool_version

    samples = rows // views
    data, plan = synthetic_data(samples, classes), synthetic_plan()
    command = {"bench": "scale", "rows": rows, "views": views, "classes": classes, "chunk_rows": chunk_rows}
    attrs = {
        "command": command,
        "tool_version": tool_version(),
        "teacher": {"arch": "none: teacher-like random logits", "weights_digest": "none"},
        "seed": plan.seed,
        "dataset": data.fingerprint(),
        "data_spec": "synthetic (bench scale)",
        "policy": plan.to_dict(),
    }
    t0 = time.perf_counter()
    writer = StoreWriter(
        location,
        epochs=views,
        num_samples=samples,
        num_classes=classes,
        chunk_rows=chunk_rows,
        labels=data.train_labels.numpy(),
        codec=codec,
        attrs=attrs,
        holder="dhkd-pipe bench scale",
        **({"shard_threshold": 1} if sharded else {}),
    )
    with writer:
        create_s = time.perf_counter() - t0
        store = writer.store
        blocks = teacher_like_blocks(min(store.shard_chunks * chunk_rows, samples), classes)
        sizes = data.train_sizes(np.arange(samples))
        t0 = time.perf_counter()
        units = store.write_units()
        for epoch in range(views):
            order = plan.order(epoch, samples)
            recorded = plan.views(epoch, order, sizes)
            for i, (e, chunks) in enumerate(u for u in units if u[0] == epoch):
                a, b = store.unit_rows(chunks[0])
                writer.put(e, chunks[0], blocks[i % len(blocks)][: b - a], order[a:b], recorded[a:b])
        writer.wait()
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
    finish_s = time.perf_counter() - t0  # leaving the writer: the completeness check, the lock released
    sizes = store.objects.sizes()
    return {
        "samples": samples,
        "views": views,
        "write_units": len(units),
        "chunks_per_unit": store.shard_chunks,
        "objects": len(sizes),
        "stored_mb": sum(sizes.values()) / 1e6,
        "create_s": create_s,
        "write_s": write_s,
        "write_rows_per_sec": rows / write_s,
        "finish_s": finish_s,
    }


# ---- what a reader waits for (in its own process) ------------------------------------------------


def _memory_mb(field: str) -> float | None:
    """``VmHWM`` (peak) or ``VmRSS`` of this process in MB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def measure_reader(location: str, batch_size: int, s3: bool) -> dict:
    """Times each of ``STEPS`` on the finished store at ``location`` in this process (one that has
    not opened it before), with the requests of each on the local S3 server (``s3``)."""
    import torch  # noqa: F401  (imported before anything is timed, as a training process has it)

    from dhkd_pipe.benchmarks.local_s3 import local_s3_requests
    from dhkd_pipe.config import InspectConfig
    from dhkd_pipe.data.replay import StoreReplay
    from dhkd_pipe.data.views import ViewPlan
    from dhkd_pipe.stages.inspect import inspect_store
    from dhkd_pipe.store.audit import damage
    from dhkd_pipe.store.reader import LogitCache
    from dhkd_pipe.store.writer import StoreWriter

    results = {"rss_before_mb": _memory_mb("VmRSS")}
    geometry = LogitCache.open(location)  # the data set's size; the steps open the store afresh
    samples, classes = geometry.num_samples, geometry.num_classes
    data = synthetic_data(samples, classes)
    del geometry

    def first_batch():
        cache = LogitCache.open(location)  # what open_store does, with the synthetic data set
        cache.check_complete()
        cache.check_matches(data.fingerprint())
        replay = StoreReplay(cache, data, "synthetic", ViewPlan.from_dict(cache.attrs["policy"]))
        batch = next(iter(replay.loader(batch_size, device="cpu").epoch(0)))
        assert batch.teacher.shape == (len(batch.images), classes)

    def resume():
        cache = LogitCache.open(location)
        writer = StoreWriter(
            location,
            epochs=cache.epochs,
            num_samples=cache.num_samples,
            num_classes=cache.num_classes,
            chunk_rows=cache.chunk_rows,
            labels=cache.labels,
            codec=cache.codec,
            attrs=cache.attrs,
            holder="dhkd-pipe bench scale (resume)",
        )
        with writer:
            assert writer.todo() == []

    steps = {
        "open": lambda: LogitCache.open(location),
        "first_batch": first_batch,
        "inspect_quick": lambda: inspect_store(InspectConfig(store=location, quick=True)),
        "inspect": lambda: inspect_store(InspectConfig(store=location)),
        "resume": resume,
        "audit": lambda: damage(LogitCache.open(location), checksums=True),
    }
    for name in STEPS:
        before = local_s3_requests() if s3 else None
        t0 = time.perf_counter()
        steps[name]()
        results[name] = time.perf_counter() - t0
        if s3:
            after = local_s3_requests()
            results[f"{name}_requests"] = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
        if name == "first_batch":
            results["reader_rss_mb"] = _memory_mb("VmHWM")
    return results


READER_RUNS = 3  # fresh reader processes per size: a single cold run of a step varies by milliseconds


def reader_in_child(location: str, batch_size: int, s3: bool, runs: int = READER_RUNS) -> dict:
    """``measure_reader`` in ``runs`` fresh processes, one after another: each step's median time
    (each run is a cold start, as a user's command is), the largest resident memory, and the
    request counts of the first run (the same in every run)."""
    found, kind = [], "s3" if s3 else "local"
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-m", "dhkd_pipe.benchmarks.scale_store", location, str(batch_size), kind],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the reader process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        found.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = dict(found[0], reader_runs=runs)
    for step in STEPS:
        out[step] = float(np.median([run[step] for run in found]))
    for key in ("reader_rss_mb", "rss_before_mb"):
        if all(run.get(key) is not None for run in found):
            out[key] = max(run[key] for run in found)
    return out


# the reader's process: python -m dhkd_pipe.benchmarks.scale_store LOCATION BATCH_SIZE local|s3
if __name__ == "__main__":
    where, size, kind = sys.argv[1:4]
    print(json.dumps(measure_reader(where, int(size), kind == "s3")))
