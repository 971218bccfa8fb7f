"""What opening, checking and reading a store costs as it grows: the done units come from one
listing (a LIST page per 1,000 keys on object storage), never a read per unit; a local listing walks
the folders itself; opening a local store visits only the objects it reads, each checked as it is
read; an object read on S3 is one GET."""

import os
import re
import threading

import pytest

from dhkd_pipe.benchmarks.scale_store import write_store


def small_store(location, rows=512, views=2):
    """A store of ``views`` x rows/views samples x 10 classes in chunks of 32 rows (8 units an epoch)."""
    return write_store(location, rows, views, classes=10, chunk_rows=32, codec="fp16", sharded=False)


def test_the_done_mask_is_read_from_the_listing_not_from_each_units_flags(tmp_path, monkeypatch):
    from dhkd_pipe.store.reader import LogitCache

    small_store(str(tmp_path / "s.zarr"))
    store = LogitCache.open(str(tmp_path / "s.zarr"), mode="r+")
    store.objects.delete(store.unit_keys(1, 3)["done"])  # unit (1, 3) undone, as a repair undoes it
    read = LogitCache.read

    def no_flags(self, name, *args, **kwargs):
        assert name != "done", "a flags object was read"
        return read(self, name, *args, **kwargs)

    monkeypatch.setattr(LogitCache, "read", no_flags)
    done = store.done_mask()
    assert done.shape == (2, 8) and (~done).sum() == 1 and not done[1, 3]
    with pytest.raises(Exception, match=r"incomplete: 1 of 16 chunks not written \(epochs 1\)"):
        store.check_complete()


def test_a_local_listing_is_zarrs_listing(tmp_path):
    from dhkd_pipe.store.objects import StoreObjects, open_store

    location = str(tmp_path / "s.zarr")
    small_store(location)
    objects = StoreObjects(open_store(location), location)

    async def zarrs(prefix):
        return {key: int(await objects.store.getsize(key)) async for key in objects.store.list_prefix(prefix)}

    for prefix in ("", "done/", "logits/c/1/", "nothing/"):
        assert objects.sizes(prefix) == objects.call("list", zarrs(prefix)), prefix
    assert len(objects.sizes()) == 6 + 1 + 4 * 16  # the group's and 5 arrays' zarr.json, the labels, 4 objects a unit


def unblock(fifo: str):
    """Ends a read blocked on ``fifo`` (it reads an empty file), if one is."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader
        pass


def test_opening_a_local_store_walks_none_of_its_objects_and_a_fifo_is_refused_when_read(tmp_path, monkeypatch):
    """A FIFO deep in a chunk folder stops no open (nothing walks the store), but a read of it is
    the one-line error, never a read that blocks; the listing that checks the store refuses it too."""
    from dhkd_pipe.errors import DhkdError
    from dhkd_pipe.store.reader import LogitCache

    location = str(tmp_path / "s.zarr")
    small_store(location)
    fifo = os.path.join(location, "logits", "c", "1", "5", "0")
    os.remove(fifo)
    os.mkfifo(fifo)
    walked, scandir, listdir = [], os.scandir, os.listdir
    monkeypatch.setattr(os, "scandir", lambda path=".": walked.append(path) or scandir(path))
    monkeypatch.setattr(os, "listdir", lambda path=".": walked.append(path) or listdir(path))
    store = LogitCache.open(location)
    assert walked == []
    monkeypatch.undo()
    assert store.read_chunk(1, 4)[0].shape == (32, 10)  # the objects beside it read as ever
    timer = threading.Timer(20, unblock, [fifo])  # a read that blocks fails the test, not the run
    timer.start()
    try:
        with pytest.raises(DhkdError, match=r"^store \S+: logits/c/1/5/0 is a FIFO, not a file; [^\n]*$"):
            store.read_chunk(1, 5)
        with pytest.raises(DhkdError, match=r"logits/c/1/5/0 is a FIFO"):
            store.check_complete()
    finally:
        timer.cancel()
        unblock(fifo)


@pytest.mark.parametrize("entry", ["logits/c/1/5/0", "logits/c/1"])
def test_a_read_through_a_link_that_leaves_the_store_is_refused(tmp_path, entry):
    """A chunk object, or a folder on its way, moved outside the store and linked back: the open
    reads neither, the read of the chunk is refused in one line naming the link."""
    from dhkd_pipe.errors import DhkdError
    from dhkd_pipe.store.reader import LogitCache

    location = str(tmp_path / "s.zarr")
    small_store(location)
    path, outside = os.path.join(location, entry), str(tmp_path / "outside")
    os.replace(path, outside)
    os.symlink(outside, path)
    store = LogitCache.open(location)
    assert store.read_chunk(0, 5)[0].shape == (32, 10)
    refused = rf"^store \S+: {entry} is a link that leaves the store \(to {re.escape(outside)}\); [^\n]*$"
    with pytest.raises(DhkdError, match=refused):
        store.read_chunk(1, 5)
    with pytest.raises(DhkdError, match=refused):
        store.check_complete()


@pytest.mark.slow
def test_on_s3_the_checks_cost_the_same_requests_whatever_the_units_and_a_read_is_one_get():
    from dhkd_pipe.benchmarks.local_s3 import local_s3_requests, local_s3_server
    from dhkd_pipe.store.inspection import inspection
    from dhkd_pipe.store.reader import LogitCache

    def requests(step):
        before = local_s3_requests()
        step()
        return {kind: n - before.get(kind, 0) for kind, n in local_s3_requests().items() if n != before.get(kind, 0)}

    with local_s3_server() as (bucket, _):
        costs = {}
        for rows in (128, 1024):  # 2 and 16 units an epoch
            location = f"{bucket}/s{rows}.zarr"
            small_store(location, rows=rows)
            store = LogitCache.open(location)
            quick = requests(lambda loc=location: inspection(loc, objects=False))
            costs[rows] = [requests(store.done_mask), requests(store.check_complete), requests(store.summary), quick]
            assert requests(lambda s=store: s.read_chunk(1, 0)) == {"GET": 1}  # the logits alone (fp16)
        assert costs[128] == costs[1024]
        done_mask, check_complete, summary, quick = costs[1024]
        assert done_mask == {"LIST": 1} and "GET" not in check_complete  # quick: the same at both sizes, above


def test_inspect_quick_lists_the_done_flags_alone_and_no_checksums_checks_every_object(tmp_path, monkeypatch):
    """``--quick`` reads the metadata and lists ``done/``, whatever the store's size: it counts the
    units done and checks no object; ``--no-checksums`` finds a truncated object from its listing."""
    from dhkd_pipe.store.inspection import inspection
    from dhkd_pipe.store.reader import LogitCache

    location = str(tmp_path / "s.zarr")
    small_store(location)
    store = LogitCache.open(location, mode="r+")
    store.objects.delete(store.unit_keys(1, 3)["done"])
    key = store.unit_keys(0, 2)["logits"]
    store.objects.write(key, store.objects.read(key)[:5])
    walked, scandir = [], os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": walked.append(os.fspath(path)) or scandir(path))
    summary, error = inspection(location, objects=False)
    monkeypatch.undo()
    assert walked and all(os.path.relpath(p, location).split(os.sep)[0] == "done" for p in walked), walked
    assert error is None and summary["complete"] == "15/16" and summary["damaged"] is None
    assert summary["bytes_on_disk"] is None
    summary, error = inspection(location, checksums=False)
    assert summary["damaged"] == [f"{store.what(key)} ({key}): truncated (5 bytes)"] and "is damaged" in error


def test_the_quick_check_bounds_each_shard_by_its_own_index_the_edge_shard_too(tmp_path):
    """Shards of 2 chunks over 7 chunks an epoch: three whole shards and one cut by the array's
    end, whose index lists fewer chunks inside. Each object cut one byte below its own bound is
    damage, at its bound it is not (a bound shared between objects alike must still be each one's)."""
    import numpy as np

    from dhkd_pipe.store.audit import _min_size, damage
    from dhkd_pipe.store.writer import StoreWriter

    location = str(tmp_path / "s.zarr")
    attrs = {"command": {"test": "shards"}}
    with StoreWriter(location, epochs=1, num_samples=200, num_classes=10, chunk_rows=32, labels=np.zeros(200, int),
                     attrs=attrs, shard_threshold=1, shard_bytes=2 * 32 * 10 * 2) as writer:  # fmt: skip
        store = writer.store
        assert store.shard_chunks == 2 and len(store.write_units()) == 4
        for e, chunks in store.write_units():
            a, b = store.unit_rows(chunks[0])
            writer.put(e, chunks[0], np.ones((b - a, 10), np.float32), np.arange(a, b), np.zeros((b - a, 5), int))
    keys = sorted(k for k in store.objects.sizes() if k.startswith("logits/c/"))
    bounds = {key: _min_size(store, key) for key in keys}
    assert bounds[keys[0]] == bounds[keys[1]] == bounds[keys[2]] != bounds[keys[3]]  # the edge shard's index differs
    whole = {key: store.objects.read(key) for key in keys}
    for key in keys:
        store.objects.write(key, whole[key][: bounds[key]])
        assert damage(store, checksums=False) == [], key
        store.objects.write(key, whole[key][: bounds[key] - 1])
        assert damage(store, checksums=False) == [f"{store.what(key)} ({key}): truncated ({bounds[key] - 1} bytes)"]
        store.objects.write(key, whole[key])
