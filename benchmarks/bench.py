"""``dhkd-pipe bench cache``, ``bench distill`` and ``bench store``: tables and JSON, measured in one run.

Both run the product's own code paths (``cache_teacher``, the training engine) on one machine in
one process, so the ratios compare like with like. Speed figures use a synthetic CIFAR-100-shaped
folder (random pixels, 100 classes: the arithmetic of 32x32 data, not its accuracy); the codec
figures use a trained digits teacher's real logits.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from dhkd_pipe.benchmarks.measure import clock, machine, memory_formats, print_table, write_results
from dhkd_pipe.config import CacheConfig, TrainConfig
from dhkd_pipe.models import create_model
from dhkd_pipe.training.engine import train
from dhkd_pipe.training.run import prepare


def write_synthetic_cifar(
    root: str, num_train: int = 2560, num_val: int = 256, classes: int = 100, seed: int = 0
) -> str:
    """A CIFAR-100 python-pickle folder of random images; returns the ``cifar100:DIR`` spec."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for name, n in (("train", num_train), ("test", num_val)):
        blob = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": rng.integers(0, classes, n).tolist(),
        }
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(blob, f)
    return f"cifar100:{root}"


def _random_teacher(arch: str, num_classes: int, path: str) -> str:
    torch.manual_seed(0)
    torch.save({"model": create_model(arch, num_classes).state_dict()}, path)
    return path


def _timed_training(cfg: TrainConfig, warmup: int) -> dict:
    """Images per second of the engine's steps after ``warmup`` steps, and over the whole run from
    the start of training (compiling included) (one run, one process)."""
    ends = []
    run = prepare(cfg, mode="overwrite")
    start = clock(run.accelerator.device)
    train(run, log=lambda *_: None, on_step_end=lambda epoch, step: ends.append(clock(run.accelerator.device)))
    steady = ends[warmup:]
    return {
        "images_per_sec": cfg.batch_size * (len(steady) - 1) / (steady[-1] - steady[0]),
        "run_images_per_sec": cfg.batch_size * len(ends) / (ends[-1] - start),
    }


def _timed_loader(run, steps: int) -> float:
    """Loader alone: views rendered and logits streamed, no model."""
    it = run.loader.epoch(0)
    first = next(it)
    t0, n = time.perf_counter(), 0
    for i, batch in enumerate(it):
        n += len(batch.labels)
        if batch.teacher is not None:
            batch.teacher.sum()  # touch the logits so a lazy copy is paid for
        if i + 1 >= steps:
            break
    del first
    return n / (clock(run.accelerator.device) - t0)


def bench_distill(
    json_path: str,
    teacher: str = "resnet32x4",
    student: str = "resnet8x4",
    batch_size: int = 64,
    steps: int = 30,
    warmup: int = 3,
    compile_row: bool = True,
):
    from dhkd_pipe.stages.cache_teacher import cache_teacher

    work = tempfile.mkdtemp(prefix="dhkd-bench-")
    per_epoch = steps + warmup + 2
    data = write_synthetic_cifar(os.path.join(work, "cifar"), num_train=per_epoch * batch_size)
    weights = _random_teacher(teacher, 100, os.path.join(work, "teacher.pt"))
    store = os.path.join(work, "logits.zarr")
    cache_teacher(
        CacheConfig(data=data, model=teacher, weights=weights, views=1, out=store, batch_size=batch_size).validate(),
        log=lambda *_: None,
    )

    def cfg(name, method, channels_last=False, **kw):  # NCHW unless a row says otherwise, on every device
        return TrainConfig(
            data=data,
            model=student,
            method=method,
            batch_size=batch_size,
            epochs=1,
            max_steps=warmup + steps,
            out=os.path.join(work, name),
            channels_last=channels_last,
            **kw,
        ).validate()

    rows = [
        {
            "path": "online DHKD (teacher forward every step)",
            **_timed_training(cfg("online", "dhkd", teacher=teacher, teacher_weights=weights), warmup),
        },
        {"path": "cached DHKD (logits from the store)", **_timed_training(cfg("cached", "dhkd", cache=store), warmup)},
        {
            "path": "student alone, CE (same loader, stored views)",
            **_timed_training(cfg("alone", "ce", cache=store), warmup),
        },
    ]
    loader_run = prepare(cfg("loader", "dhkd", cache=store), mode="overwrite")
    rows.append({"path": "loader only (views + logits, no model)", "images_per_sec": _timed_loader(loader_run, steps)})
    # timm's speed switches on the cached path; compiling happens in the warm-up steps
    rows.append(
        {
            "path": "cached DHKD, --channels-last (the default on CUDA)",
            **_timed_training(cfg("channels-last", "dhkd", cache=store, channels_last=True), warmup),
        }
    )
    if compile_row:
        rows.append(
            {
                "path": "cached DHKD, --compile (student)",
                **_timed_training(cfg("compile", "dhkd", cache=store, compile=True), warmup),
            }
        )
    # a feature method cannot use the store: online ReviewKD against online DHKD (its connector and the teacher's taps)
    rows.append(
        {
            "path": "online ReviewKD (teacher features every step)",
            **_timed_training(cfg("reviewkd", "reviewkd", teacher=teacher, teacher_weights=weights), warmup),
        }
    )
    online, cached, alone, loader, channels_last = (r["images_per_sec"] for r in rows[:5])
    reviewkd = rows[-1]["images_per_sec"]
    ratios = {
        "reviewkd_over_online_dhkd": reviewkd / online,
        "cached_over_alone": cached / alone,
        "cached_over_online": cached / online,
        "loader_over_cached": loader / cached,
        "channels_last_over_cached": channels_last / cached,
    }
    if compile_row:
        ratios["compile_over_cached"] = rows[5]["images_per_sec"] / cached
    for r in rows:
        r["vs_cached"] = r["images_per_sec"] / cached
        if r.get("run_images_per_sec"):  # the whole run, compiling included
            r["run_vs_cached"] = r["run_images_per_sec"] / rows[1]["run_images_per_sec"]
    print_table(
        f"bench distill: {teacher} -> {student}, batch {batch_size}, {steps} timed steps, 32x32, 100 classes, NCHW unless said, {machine()['device']}",
        rows,
        [
            ("path", "path", "s"),
            ("images_per_sec", "img/s", ".1f"),
            ("vs_cached", "x cached", ".2f"),
            ("run_images_per_sec", "img/s, whole run", ".1f"),
            ("run_vs_cached", "x cached, whole run", ".2f"),
        ],
    )
    print("\n" + "  ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    write_results(
        json_path,
        {
            "bench": "distill",
            "machine": machine(),
            "teacher": teacher,
            "student": student,
            "batch_size": batch_size,
            "steps": steps,
            "rows": rows,
            "ratios": ratios,
        },
    )
    return rows, ratios


def _bare_forward(
    arch: str,
    num_classes: int,
    batch_size: int,
    steps: int,
    precision: str = "no",
    fmt: torch.memory_format = torch.contiguous_format,
) -> float:
    """The teacher's forward pass alone on a pre-made batch, as stage 1 runs it (inference mode,
    memory format ``fmt``): the ceiling for stage 1."""
    from dhkd_pipe.training.accelerator import make_accelerator

    acc = make_accelerator(precision)
    torch.manual_seed(0)
    model = create_model(arch, num_classes).eval().to(acc.device, memory_format=fmt)
    x = torch.randn(batch_size, 3, 32, 32, device=acc.device).contiguous(memory_format=fmt)
    with torch.inference_mode(), acc.autocast():
        for _ in range(2):
            model(x)
        t0 = clock(acc.device)
        for _ in range(steps):
            model(x).float().cpu()
        elapsed = clock(acc.device) - t0
    return batch_size * steps / elapsed


def bench_cache(
    json_path: str,
    model: str = "resnet32x4",
    batch_size: int = 64,
    steps: int = 20,
    teacher_weights: str | None = None,
    image_model: str | None = "resnet18",
    images: int = 48,
    views: int = 4,
    resolution: int = 224,
    image_batch: int = 32,
    codecs: bool = True,
):
    """Stage 1 against the teacher's bare forward pass on in-memory data and (``image_model``
    not None, DALI installed) on a generated JPEG folder at 224 px; then the codecs' errors."""
    import importlib.util

    from dhkd_pipe.benchmarks.images import bench_image_folder
    from dhkd_pipe.stages.cache_teacher import cache_teacher
    from dhkd_pipe.stages.train_teacher import train_teacher
    from dhkd_pipe.store.codecs import CODECS
    from dhkd_pipe.store.reader import LogitCache

    work = tempfile.mkdtemp(prefix="dhkd-bench-")
    data = write_synthetic_cifar(os.path.join(work, "cifar"), num_train=steps * batch_size)
    weights = _random_teacher(model, 100, os.path.join(work, "teacher.pt"))
    (name, fmt), (other_name, other_fmt) = memory_formats()
    bare = _bare_forward(model, 100, batch_size, steps, fmt=fmt)
    other = _bare_forward(model, 100, batch_size, steps, fmt=other_fmt)
    result = cache_teacher(
        CacheConfig(
            data=data,
            model=model,
            weights=weights,
            views=1,
            out=os.path.join(work, "speed.zarr"),
            batch_size=batch_size,
        ).validate(),
        log=lambda *_: None,
    )
    stage1 = result["images_per_sec"]
    speed_rows = [
        {
            "path": f"{model} bare forward, pre-made tensors ({name}, stage 1's default)",
            "images_per_sec": bare,
            "ratio": 1.0,
        },
        {
            "path": f"{model} bare forward, pre-made tensors ({other_name})",
            "images_per_sec": other,
            "ratio": other / bare,
        },
        {"path": "stage 1: render + teacher + encode + write", "images_per_sec": stage1, "ratio": stage1 / bare},
    ]
    print_table(
        f"bench cache: {model}, batch {batch_size}, {steps * batch_size} images, {machine()['device']}",
        speed_rows,
        [("path", "path", "s"), ("images_per_sec", "img/s", ".1f"), ("ratio", "x bare", ".2f")],
    )
    folder = None
    if image_model and importlib.util.find_spec("nvidia.dali") is not None:
        folder = bench_image_folder(
            work, image_model, images=images, views=views, resolution=resolution, batch_size=image_batch
        )
        print_table(
            f"bench cache, image folder: {image_model}, {images} JPEGs 500x375 x {views} views at {resolution} px, batch {image_batch}, "
            f"DALI on {folder['device']} (goal: decoded per row = 1/{views}, stage 1 >= 0.9 x bare)",
            folder["rows"],
            [
                ("path", "path", "s"),
                ("views_per_sec", "views/s", ".1f"),
                ("decoded_per_row", "decoded / row", ".3f"),
                ("ratio", "x bare", ".2f"),
            ],
        )
    payload = {
        "bench": "cache",
        "machine": machine(),
        "model": model,
        "batch_size": batch_size,
        "speed": speed_rows,
        "stage1_over_bare_forward": stage1 / bare,
        "image_folder": folder,
    }
    if not codecs:
        write_results(json_path, payload)
        return payload

    if teacher_weights is None:
        teacher_out = os.path.join(work, "digits-teacher")
        train_teacher(
            TrainConfig(
                data="digits", model="resnet8", epochs=8, lr=0.05, lr_milestones=[6], out=teacher_out
            ).validate(),
            log=lambda *_: None,
        )
        teacher_weights, teacher_arch = os.path.join(teacher_out, "model.pt"), "resnet8"
    else:
        teacher_arch = "resnet8"
    codec_rows, reference = [], None
    for codec in sorted(CODECS, key=lambda c: c != "fp32"):  # fp32 first: the others' reference
        out = os.path.join(work, f"digits-{codec}.zarr")
        cache_teacher(
            CacheConfig(
                data="digits", model=teacher_arch, weights=teacher_weights, views=2, codec=codec, out=out
            ).validate(),
            log=lambda *_: None,
        )
        store = LogitCache.open(out)
        logits = torch.cat([store.read_rows(e, c) for e in range(store.epochs) for c in range(store.num_chunks)])
        reference = logits if reference is None else reference
        err = (logits - reference).abs()
        summary = store.summary()
        codec_rows.append(
            {
                "codec": codec,
                "bytes_per_logit": summary["bytes_per_logit"],
                "bytes_on_disk": summary["bytes_on_disk"],
                "max_abs_err": float(err.max()),
                "max_rel_err": float((err / reference.abs().amax(1, keepdim=True)).max()),
                "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean()),
            }
        )
    print_table(
        f"codecs: digits {teacher_arch} teacher logits, 2 views x 1437 x 10 (errors against fp32)",
        codec_rows,
        [
            ("codec", "codec", "s"),
            ("bytes_per_logit", "bytes/logit on disk", ".3f"),
            ("max_abs_err", "max abs err", ".2e"),
            ("max_rel_err", "max err / row max", ".2e"),
            ("top1_agreement", "top-1 agree", ".4f"),
        ],
    )
    payload["codecs"] = codec_rows
    write_results(json_path, payload)
    return payload


# ---- bench store -------------------------------------------------------------------------------

STORE_READ_TARGETS = {"local": 50_000, "s3-local": 10_000}  # rows/s per reading process, K = 1000, fp16


def _teacher_like_blocks(rows: int, classes: int, count: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Logits shaped like a trained teacher's: N(0, 2^2) with one class 8-12 above the rest (their
    fp16 bytes compress about as much as real logits do, which is little)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(count):
        x = (rng.standard_normal((rows, classes)) * 2.0).astype(np.float32)
        x[np.arange(rows), rng.integers(0, classes, rows)] += rng.uniform(8, 12, rows).astype(np.float32)
        blocks.append(x)
    return blocks


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
        blocks = _teacher_like_blocks(min(store.shard_chunks * chunk_rows, rows), classes)
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


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used (Linux /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def local_s3_server(bucket: str = "dhkd-bench", latency_ms: float = 0.0):
    """A moto S3 server on 127.0.0.1 in a child process for the length of the block, with
    ``bucket`` created and this process's AWS_* variables pointing at it (dummy credentials);
    yields (``s3://bucket``, a function giving the server's CPU seconds so far, or None where
    they cannot be read). ``latency_ms``: added to every request before the server handles it
    (each request has its own server thread, so waits overlap as a network's do). The child
    exits when its stdin closes, so it never outlives us."""
    import importlib.util

    from dhkd_pipe.errors import DhkdError

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
        raise DhkdError("--s3-local needs moto and s3fs: pip install 'moto[server]' s3fs")
    import s3fs

    code = (
        "import logging, sys, time\n"
        "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
        "from moto.moto_server.werkzeug_app import DomainDispatcherApplication\n"
        "latency = float(sys.argv[1]) / 1000\n"
        "if latency > 0:\n"
        "    handle = DomainDispatcherApplication.__call__\n"
        "    def delayed(self, environ, start_response):\n"
        "        time.sleep(latency)\n"
        "        return handle(self, environ, start_response)\n"
        "    DomainDispatcherApplication.__call__ = delayed\n"
        "from moto.server import ThreadedMotoServer\n"
        "server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
        "server.start()\n"
        "print(server.get_host_and_port()[1], flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(float(latency_ms))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    try:
        port = proc.stdout.readline().strip()
        if not port.isdigit():
            raise DhkdError("the local S3 server (moto) did not start")
        os.environ.update(
            {
                "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            os.environ.pop(k, None)
        _forget_s3_instances()  # one made for another endpoint (--url s3://..., the previous server) is not reused
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        yield f"s3://{bucket}", (lambda: _cpu_seconds(proc.pid)) if _cpu_seconds(proc.pid) is not None else None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_s3_instances()
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _forget_s3_instances():
    """Closes the sessions of the cached s3fs instances, then drops them (dropped open, each would
    print "Unclosed client session" when collected)."""
    import s3fs
    from zarr.core.sync import sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        if getattr(fs, "_s3", None) is not None:
            try:
                if fs.loop is None:  # an asynchronous instance, Zarr's: its session lives on Zarr's loop
                    sync(fs._s3.__aexit__(None, None, None))
                else:
                    fs.close_session(fs.loop, fs._s3)
            except Exception:  # tidying only: a session that will not close must not cost the figures
                pass
    s3fs.S3FileSystem.clear_instance_cache()


_S3_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
)


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
        f"bench store: {rows} rows x {classes} classes ({codec}), chunks of {chunk_rows} rows{', sharded' if sharded else ''}, one process, {machine()['device']}, "
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
