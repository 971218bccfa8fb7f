"""The store on object storage: fsspec URLs through Zarr's store API.

Fast tests use ``memory://`` (fsspec's in-process filesystem). The slow ones run a real S3 server
(moto, server mode) on 127.0.0.1 for the module's lifetime, with IAM authentication switched on so
that bad credentials are refused as a real service refuses them, and drive the CLI against it.
"""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest
import torch
from conftest import BIN, S3_BUCKET, cli_here
from conftest import cli_process as cli

from dhkd_pipe.data.loader import StoreEpochs, read_ahead_chunks, row_batches
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.store.objects import StoreObjects, open_store
from dhkd_pipe.store.reader import LogitCache
from dhkd_pipe.store.writer import create_or_resume, write_unit

E, N, K, C = 2, 300, 10, 64  # 5 chunks per epoch, the last one short


def fake_logits(epochs=E, n=N, k=K, seed=0):
    return (np.random.default_rng(seed).standard_normal((epochs, n, k)) * 5).astype(np.float32)


def attrs(**kw):
    return {"dataset": {"kind": "digits"}, "command": {"teacher": "resnet8", "views": E, **kw}}


def create(location, n=N, k=K, codec="fp16", **kw):
    return create_or_resume(
        location,
        epochs=E,
        num_samples=n,
        num_classes=k,
        chunk_rows=C,
        labels=np.arange(n) % k,
        codec=codec,
        attrs=kw.pop("attrs", attrs()),
        **kw,
    )


def write(cache, x, units=None):
    for e, chunks in cache.write_units() if units is None else units:
        a, b = cache.rows(chunks[0])[0], cache.rows(chunks[-1])[1]
        write_unit(cache, e, chunks[0], x[e, a:b], np.arange(a, b) + e, np.full((b - a, 5), e, np.int32))


def read_all(location):
    c = LogitCache.open(location)
    return (
        np.stack([np.concatenate([c.read_chunk(e, k)[0] for k in range(c.num_chunks)]) for e in range(c.epochs)]),
        np.stack([c.read_order(e) for e in range(c.epochs)]),
        np.stack([c.read_views(e) for e in range(c.epochs)]),
    )


def all_objects(location) -> dict:
    objects = StoreObjects(open_store(location), location)
    return {key: objects.read(key) for key in objects.list()}


def memory_url(name="s.zarr"):
    return f"memory://dhkd-{uuid.uuid4().hex[:8]}/{name}"


# ---- store primitives on memory:// ----------------------------------------------------------------


def test_object_primitives():
    root = memory_url()
    objects = StoreObjects(open_store(root, read_only=False), root)
    sibling = StoreObjects(open_store(root + "2", read_only=False), root + "2")
    assert objects.is_empty() and objects.list() == [] and not objects.exists("a/b")
    objects.write("a/b", b"12345")
    objects.write("a/c/d", b"x")
    objects.write("e", b"")
    sibling.write("a/b", b"sibling")
    assert objects.exists("a/b") and not objects.exists("a") and not objects.exists("a/x")
    assert (
        objects.list() == ["a/b", "a/c/d", "e"]
        and objects.list("a/") == ["a/b", "a/c/d"]
        and objects.list("a/c/") == ["a/c/d"]
    )
    assert (
        objects.size("a/b") == 5
        and objects.sizes() == {"a/b": 5, "a/c/d": 1, "e": 0}
        and objects.sizes("a/c/") == {"a/c/d": 1}
    )
    assert objects.read("a/b") == b"12345" and objects.read("nope") is None
    objects.write("a/b", b"9")  # whole-object replace
    assert objects.read("a/b") == b"9"
    objects.delete("a/b")
    objects.delete("a/b")  # deleting what is not there is not an error
    assert objects.list() == ["a/c/d", "e"] and not objects.is_empty()
    objects.delete_all()
    assert objects.is_empty() and sibling.list() == ["a/b"]  # nothing outside the store is touched
    with pytest.raises(DhkdError, match="cannot read the size of nope"):
        objects.size("nope")
    read_only = StoreObjects(open_store(root + "2"), root + "2")
    with pytest.raises(DhkdError, match=r"cannot write x: .*read-only"):
        read_only.write("x", b"1")


def test_urls_that_cannot_be_opened():
    with pytest.raises(DhkdError, match="cannot open foo://x/s.zarr: Protocol not known: foo"):
        LogitCache.open("foo://x/s.zarr")
    with pytest.raises(DhkdError, match="no logit store at memory://"):
        LogitCache.open(memory_url())


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_memory_store_round_trip_and_summary(codec):
    url = memory_url()
    x = fake_logits()
    c = create(url, codec=codec)
    assert c.path == url and not c.is_local
    write(c, x)
    c = LogitCache.open(url)
    c.check_complete()
    got = torch.cat([c.read_rows(1, k) for k in range(c.num_chunks)])
    assert float((got - torch.from_numpy(x[1])).abs().max()) <= 0.05 * 20
    assert np.array_equal(c.read_order(1), np.arange(N) + 1) and np.array_equal(c.labels, np.arange(N) % K)
    s = c.summary()
    sizes = c.objects.sizes()
    assert s["path"] == url and s["bytes_on_disk"] == sum(sizes.values()) > 0
    logit_keys = [k for k in sizes if k.split("/")[0] in ("logits", "logit_scale") and not k.endswith("zarr.json")]
    assert len(logit_keys) == E * 5 * (2 if codec == "int8" else 1)
    assert s["bytes_per_logit"] == pytest.approx(sum(sizes[k] for k in logit_keys) / (E * N * K))


def test_unit_keys_are_the_objects_a_unit_writes_with_done_last(monkeypatch):
    from zarr.storage import FsspecStore

    n, k = 1000, 16
    url = memory_url()
    c = create(url, n=n, k=k, codec="int8", shard_threshold=8, shard_bytes=3 * C * k)
    assert c.shard_chunks == 3
    before = set(c.objects.list())
    written = []
    real_set = FsspecStore.set

    async def recording_set(self, key, value, byte_range=None):
        written.append(key)
        return await real_set(self, key, value)

    monkeypatch.setattr(FsspecStore, "set", recording_set)
    write(c, fake_logits(n=n, k=k), [(1, [3, 4, 5])])
    keys = c.unit_keys(1, 3)
    assert keys == {
        "logits": "logits/c/1/1/0",
        "logit_scale": "logit_scale/c/1/1",
        "order": "order/c/1/1",
        "views": "views/c/1/1/0",
        "done": "done/c/1/1",
    }
    assert set(c.objects.list()) - before == set(keys.values())
    assert (
        sorted(written[:-1]) == sorted(v for name, v in keys.items() if name != "done") and written[-1] == keys["done"]
    )
    with pytest.raises(ValueError):
        c.unit_keys(1, 4)


def test_a_missing_object_on_object_storage_is_refused():
    url = memory_url()
    c = create(url, codec="int8")
    write(c, fake_logits())
    c.objects.delete(c.unit_keys(1, 3)["logits"])
    c.objects.delete(c.unit_keys(0, 2)["order"])
    c = LogitCache.open(url)
    c.check_complete(objects=False)  # the flags still say done
    with pytest.raises(DhkdError, match=r"is damaged: logits epoch 1 chunk 3 \(logits/c/1/3/0\): missing and 1 more"):
        c.check_complete()  # one listing finds both
    with pytest.raises(
        DhkdError,
        match=r"^store memory://\S+: logits epoch 1 chunk 3 missing from the store \(logits/c/1/3/0\); "
        r"the store is incomplete or damaged; re-run cache-teacher with the same command to rewrite it$",
    ):
        c.read_chunk(1, 3)
    with pytest.raises(DhkdError, match=r"order epoch 0 chunk 2 missing from the store \(order/c/0/2\)"):
        c.read_order(0)
    c.read_chunk(1, 2)
    c.read_order(1)


def test_create_overwrite_half_created_and_foreign_stores_on_object_storage():
    import zarr

    url = memory_url()
    c = create(url)
    write(c, fake_logits(), c.write_units()[:2])
    assert create(url).done_mask().sum() == 2  # same command: resumed
    with pytest.raises(
        DhkdError, match=r"a different store exists at memory://\S+ \(views differs\); pass --overwrite"
    ):
        create(url, attrs=attrs(views=3))
    assert create(url, attrs=attrs(views=3), overwrite=True).done_mask().sum() == 0
    group = zarr.open_group(store=open_store(url, read_only=False), mode="r+")
    del group.attrs["format_version"]  # as if killed before the last step of create()
    with pytest.raises(DhkdError, match="still being created"):
        LogitCache.open(url)
    assert create(url, attrs=attrs(views=3)).attrs["format_version"] == 1

    foreign = memory_url()
    StoreObjects(open_store(foreign, read_only=False), foreign).write("notes.txt", b"hello")
    with pytest.raises(DhkdError, match="exists and is not a logit store; choose another path"):
        create(foreign)
    with pytest.raises(DhkdError, match="refusing to delete it with --overwrite"):
        create(foreign, overwrite=True)
    with pytest.raises(DhkdError, match=r"is not a logit store \(no zarr.json\)"):
        LogitCache.open(foreign)
    assert StoreObjects(open_store(foreign), foreign).list() == ["notes.txt"]


# ---- read-ahead ------------------------------------------------------------------------------------


class SlowChunks:
    """A stand-in store whose chunk reads take ``delay`` seconds; records how many run at once."""

    def __init__(self, num_chunks=12, chunk_rows=8, k=3, delay=0.05, fail_at=None):
        self.epochs, self.chunk_rows, self.num_classes, self.codec = 1, chunk_rows, k, "fp16"
        self.num_samples, self.chunk_nbytes, self.is_local, self.path = (
            num_chunks * chunk_rows,
            chunk_rows * k * 2,
            False,
            "memory://x",
        )
        self.delay, self.fail_at, self.lock = delay, fail_at, threading.Lock()
        self.active = self.most = 0
        self.started = []

    def rows(self, chunk):
        return chunk * self.chunk_rows, (chunk + 1) * self.chunk_rows

    def read_chunk_tensors(self, epoch, chunk):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.started.append(chunk)
        time.sleep(self.delay * (1 + (chunk % 3)))  # uneven latencies: later chunks may finish first
        with self.lock:
            self.active -= 1
        if chunk == self.fail_at:
            raise DhkdError(f"chunk {chunk} is broken")
        a, b = self.rows(chunk)
        return torch.arange(a, b, dtype=torch.float16)[:, None].expand(-1, self.num_classes).contiguous(), None


def test_read_ahead_is_concurrent_bounded_and_in_order():
    store = SlowChunks()
    epochs = StoreEpochs(store, "cpu", prefetch_chunks=4)
    t0 = time.perf_counter()
    got = torch.cat([v for v, _ in epochs.logits(0, list(range(12)), 3, 90)])
    elapsed = time.perf_counter() - t0
    assert torch.equal(got[:, 0], torch.arange(3, 90, dtype=torch.float16))  # rows skip_rows:total_rows, in order
    assert store.most == 4 and sorted(store.started) == list(range(12))  # 12 chunks, 4 at a time
    assert elapsed < 1.0  # one at a time: 1.2 s

    store = SlowChunks()
    stream = StoreEpochs(store, "cpu", prefetch_chunks=3).logits(0, list(range(12)), 0, 96)
    next(stream), next(stream)
    time.sleep(0.4)
    assert len(store.started) <= 2 + 3  # consumed two: at most three more in flight, however long we wait
    stream.close()


def test_read_ahead_hands_on_a_failed_read_and_batches_as_before():
    store = SlowChunks(fail_at=5, delay=0.01)
    batches = row_batches(StoreEpochs(store, "cpu", prefetch_chunks=4).logits(0, list(range(12)), 0, 96), 10)
    seen = []
    with pytest.raises(DhkdError, match="chunk 5 is broken"):
        for values, _ in batches:
            seen.append(values)
    assert torch.equal(torch.cat(seen)[:, 0], torch.arange(0, 40, dtype=torch.float16))  # chunks 0-4, cut in tens


def test_read_ahead_depth():
    local = SlowChunks()
    local.is_local = True
    assert read_ahead_chunks(local) == 4
    remote = SlowChunks(chunk_rows=1024, k=1000)  # 2 MB chunks: 16 in flight; 44 MB chunks: 2
    assert read_ahead_chunks(remote) == 16
    remote.chunk_nbytes = 1024 * 21843 * 2
    assert read_ahead_chunks(remote) == 2


# ---- a real S3 server (moto) on 127.0.0.1 ---------------------------------------------------------

BUCKET = S3_BUCKET  # the moto server is the session fixture ``s3`` (conftest.py)


def assert_one_line_error(proc, *fragments):
    """Exit 2 and the error as one line, the last on stderr (progress logs may come before it);
    ``proc``: a subprocess or a click Result."""
    assert getattr(proc, "returncode", getattr(proc, "exit_code", None)) == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert sum(line.startswith("error") for line in lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], proc.stderr


@pytest.mark.slow
def test_s3_store_round_trip(s3):
    url = f"s3://{BUCKET}/unit.zarr"
    x = fake_logits()
    c = create(url, codec="int8")
    write(c, x)
    local_like = memory_url()
    write(create(local_like, codec="int8"), x)
    for a, b in zip(read_all(url), read_all(local_like), strict=True):
        assert np.array_equal(a, b)
    assert all_objects(url) == all_objects(local_like)  # the same objects, byte for byte
    s = LogitCache.open(url).summary()
    assert (
        s["path"] == url
        and s["complete"] == "10/10"
        and s["bytes_on_disk"] == sum(LogitCache.open(url).objects.sizes().values())
    )
    c = create(url, codec="int8", attrs=attrs(views=3), overwrite=True)
    assert not c.done_mask().any()
    c.objects.delete_all()
    with pytest.raises(DhkdError, match=f"no logit store at {url}"):
        LogitCache.open(url)


def _writer_process(location, parity):
    c = LogitCache.open(location, mode="r+")
    write(c, fake_logits(n=1000, k=16), [u for i, u in enumerate(c.write_units()) if i % 2 == parity])


@pytest.mark.slow
def test_two_processes_write_on_s3_what_one_process_writes(s3):
    geometry = dict(n=1000, k=16, shard_threshold=8, shard_bytes=3 * C * 16)
    one, two = memory_url(), f"s3://{BUCKET}/two.zarr"
    write(create(one, **geometry), fake_logits(n=1000, k=16))
    create(two, **geometry)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(two, p)) for p in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    LogitCache.open(two).check_complete()
    assert all_objects(two) == all_objects(one)


@pytest.fixture(scope="session")
def teacher_weights(random_teacher):
    """An untrained digits resnet8: the store need not be good, only the same every time."""
    return random_teacher


DATA = "digits@480"  # a fixed stratified subset: 15 chunks of 32 per view
STAGE1 = ["--model", "resnet8", "--data", DATA, "--views", "3", "--chunk-rows", "32", "--batch-size", "32"]


@pytest.fixture(scope="module")
def resumed_store(s3, teacher_weights, tmp_path_factory):
    """A stage-1 store on S3 written by a run killed mid-way and finished by a second run, and the
    store an uninterrupted run writes on local disk."""
    from dhkd_pipe.config import CacheConfig
    from dhkd_pipe.stages.cache_teacher import cache_teacher

    local = tmp_path_factory.mktemp("reference") / "logits.zarr"
    cache_teacher(
        CacheConfig(
            model="resnet8",
            data=DATA,
            views=3,
            chunk_rows=32,
            batch_size=32,
            weights=str(teacher_weights),
            out=str(local),
        ).validate(),
        log=lambda *a: None,
    )

    url = f"s3://{BUCKET}/killed.zarr"
    args = [BIN, "cache-teacher", *STAGE1, "--weights", str(teacher_weights), "--out", url]
    log = tmp_path_factory.mktemp("killed") / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    done_flags = StoreObjects(open_store(url), url)
    total = 3 * 15  # 480 samples in chunks of 32: 15 chunks per view
    written, deadline = 0, time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            # flags objects only: a listing on S3 may also name the prefix itself ("done") before any unit
            written = len([k for k in done_flags.list("done/") if k.startswith("done/c/")])
            if 0 < written < total:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL and 0 < written < total, (
        proc.returncode,
        written,
        log.read_text()[-2000:],
    )
    with pytest.raises(DhkdError, match="incomplete"):
        LogitCache.open(url).check_complete()
    cli_here(*args[1:])  # the resume: in this process, which need not die
    return url, str(local)


@pytest.mark.slow
def test_killed_stage_1_on_s3_resumes_to_the_uninterrupted_store(resumed_store):
    url, local = resumed_store
    LogitCache.open(url).check_complete()
    assert all_objects(url) == all_objects(local)  # every object, metadata included, byte for byte


@pytest.mark.slow
def test_inspect_verify_and_distill_from_s3(resumed_store, teacher_weights, tmp_path):
    url, _ = resumed_store
    info = json.loads(cli_here("inspect", url, "--json").stdout)
    assert (
        info["path"] == url
        and info["shape"] == [3, 480, 10]
        and info["complete"] == "45/45"
        and 0 < info["bytes_per_logit"] <= 2.5
    )
    result = json.loads(
        cli_here("verify-cache", url, "--data", DATA, "--teacher-weights", teacher_weights, "--samples", 64).stdout
    )
    assert result["ok"] and result["samples"] == 64 and result["top1_agreement"] == 1.0
    out = tmp_path / "run"
    proc = cli_here(
        "distill",
        "--student",
        "resnet8",
        "--cache",
        url,
        "--data",
        DATA,
        "--epochs",
        1,
        "--batch-size",
        64,
        "--max-steps",
        3,
        "--out",
        out,
    )
    assert f"from {url}: 3 stored view-epochs" in proc.stderr
    assert json.loads(proc.stdout) == {"stopped_at": {"epoch": 0, "step": 3}}


@pytest.mark.slow
def test_a_deleted_chunk_object_on_s3_is_refused(resumed_store, tmp_path):
    url, _ = resumed_store
    damaged = f"s3://{BUCKET}/damaged.zarr"
    source, target = StoreObjects(open_store(url), url), StoreObjects(open_store(damaged, read_only=False), damaged)
    for key in source.list():
        target.write(key, source.read(key))
    key = LogitCache.open(damaged).unit_keys(0, 0)["logits"]
    target.delete(key)
    proc = cli_here(
        "distill",
        "--student",
        "resnet8",
        "--cache",
        damaged,
        "--data",
        DATA,
        "--epochs",
        1,
        "--max-steps",
        2,
        "--out",
        tmp_path / "run",
        check=False,
    )
    # found by the listing before training starts, with the fix
    assert_one_line_error(
        proc,
        f"store {damaged} is damaged: logits epoch 0 chunk 0 ({key}): missing; re-run cache-teacher with the same "
        "command to rewrite it: dhkd-pipe cache-teacher --model resnet8 ",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_missing_bucket_and_bad_credentials_are_one_line(s3, resumed_store, teacher_weights, tmp_path):
    url, _ = resumed_store
    proc = cli_here("inspect", "s3://no-such-bucket/logits.zarr", check=False)
    assert_one_line_error(proc, "s3://no-such-bucket/logits.zarr", "bucket does not exist")
    proc = cli_here(
        "cache-teacher", *STAGE1, "--weights", teacher_weights, "--out", "s3://no-such-bucket/logits.zarr", check=False
    )
    assert_one_line_error(proc, "s3://no-such-bucket/logits.zarr", "bucket does not exist")

    # credentials in their own processes: a process keeps the file-system objects it made
    wrong = {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    proc = cli("inspect", url, check=False, env=wrong)
    assert_one_line_error(proc, url, "check the credentials")
    proc = cli(
        "cache-teacher",
        *STAGE1,
        "--weights",
        teacher_weights,
        "--out",
        f"s3://{BUCKET}/new.zarr",
        check=False,
        env=wrong,
    )
    assert_one_line_error(proc, f"s3://{BUCKET}/new.zarr", "check the credentials")
    unknown = {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000", "AWS_SECRET_ACCESS_KEY": "x"}
    proc = cli(
        "distill",
        "--student",
        "resnet8",
        "--cache",
        url,
        "--data",
        DATA,
        "--out",
        tmp_path / "run",
        check=False,
        env=unknown,
    )
    assert_one_line_error(proc, url)
    assert not (tmp_path / "run").exists()
    assert StoreObjects(open_store(f"s3://{BUCKET}/new.zarr"), "new").list() == []  # nothing half-written


@pytest.mark.slow
def test_bench_stores_local_server_adds_the_round_trip_it_is_given(caplog):
    """``bench store --s3-latency-ms``: every request to the local server waits that long, the
    server's CPU seconds can be read, and the environment is restored afterwards, the clients'
    sessions closed (none is reported unclosed when collected)."""
    import gc

    pytest.importorskip("moto")
    from dhkd_pipe.benchmarks.local_s3 import local_s3_server

    before = os.environ.get("AWS_ENDPOINT_URL_S3")
    timings = {}
    for latency in (0.0, 500.0):
        with local_s3_server(latency_ms=latency) as (bucket, server_cpu):
            objects = StoreObjects(open_store(f"{bucket}/t.zarr", read_only=False), bucket)
            writes = []
            for i in range(3 if latency == 0 else 1):  # the bare server: its quickest write once connected
                t0 = time.perf_counter()
                objects.write(f"a{i}", b"x")
                writes.append(time.perf_counter() - t0)
            timings[latency] = min(writes[1:] or writes)
            assert objects.read("a0") == b"x" and server_cpu() > 0
    assert timings[500.0] >= 0.5 and timings[0.0] < 0.5, timings  # every request of the second server waits 0.5 s
    assert os.environ.get("AWS_ENDPOINT_URL_S3") == before
    del objects
    gc.collect()
    assert "Unclosed" not in caplog.text
