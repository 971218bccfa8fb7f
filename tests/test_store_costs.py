"""What opening, checking and reading a store costs as it grows: the done units come from one
listing (a LIST page per 1,000 keys on object storage), never a read per unit; a local listing walks
the folders itself; an object read on S3 is one GET."""

import pytest

from dhkd_pipe.benchmarks.scale import write_store


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


@pytest.mark.slow
def test_on_s3_the_checks_cost_the_same_requests_whatever_the_units_and_a_read_is_one_get():
    from dhkd_pipe.benchmarks.local_s3 import local_s3_requests, local_s3_server
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
            costs[rows] = [requests(store.done_mask), requests(store.check_complete), requests(store.summary)]
            assert requests(lambda s=store: s.read_chunk(1, 0)) == {"GET": 1}  # the logits alone (fp16)
        assert costs[128] == costs[1024]
        done_mask, check_complete, summary = costs[1024]
        assert done_mask == {"LIST": 1} and "GET" not in check_complete
