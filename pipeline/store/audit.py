"""Finding and undoing damage in a logit store: objects of units marked done that are missing,
short or fail their checksums, and what writers killed mid-write leave behind.

``inspect`` and ``LogitCache.check_complete`` find; ``writer.StoreWriter`` repairs before a
resume, so the resume rewrites what was damaged.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING

import numpy as np

from dhkd_pipe.errors import DhkdError, one_line
from dhkd_pipe.store.chunk_objects import object_problem, shard_in_bounds
from dhkd_pipe.store.layout import STORE_ENTRIES
from dhkd_pipe.store.lock import LOCK_KEY
from dhkd_pipe.store.objects import storage_errors

if TYPE_CHECKING:
    from dhkd_pipe.store.reader import LogitCache

LABELS_KEY = "labels/c/0"


def _checks(cache: "LogitCache", key: str):
    """(codecs, in_bounds) to check object ``key`` with (see ``chunk_objects.object_problem``)."""
    name, _, coords = key.partition("/c/")
    metadata = cache.array(name).metadata
    return metadata.codecs, shard_in_bounds(metadata, tuple(int(v) for v in coords.split("/")))


def _min_size(cache: "LogitCache", key: str) -> int:
    """The fewest bytes a sound object ``key`` can have: a listing's size below it is damage.

    Per chunk a Blosc frame (16-byte header at least) and the 4-byte CRC32C; an uncompressed
    chunk (``done``) has exactly its bytes and the CRC; a shard its index (16 bytes per entry
    and its CRC) besides its chunks.
    """
    from zarr.codecs import BloscCodec

    arr = cache.array(key.split("/", 1)[0])
    codecs, in_bounds = _checks(cache, key)
    if in_bounds is not None:
        return 16 * in_bounds.size + 4 + 20 * int(in_bounds.sum())
    if any(isinstance(c, BloscCodec) for c in codecs):
        return 20
    return int(np.prod(arr.chunks)) * arr.dtype.itemsize + 4


def _too_short(cache: "LogitCache"):
    """``too_short(key, size)``: whether ``size`` bytes are fewer than any sound object ``key`` has
    (``_min_size``), the bound computed once per array for the objects wholly inside it (every
    chunk and shard but an epoch's last), once per object for the others (a shard's bound costs its
    index's bounds)."""
    grids, fewest = {}, {}

    def too_short(key: str, size: int) -> bool:
        name, _, coords = key.partition("/c/")
        if size >= fewest.get(name, size + 1):
            return False  # an object at the array's edge holds no more than one inside it: no key to parse
        if name not in grids:
            metadata = cache.array(name).metadata
            grids[name] = tuple(zip(metadata.chunk_grid.chunk_shape, metadata.shape, strict=True))
        at, grid = coords.split("/"), grids[name]
        inside = len(at) == len(grid) and all((int(c) + 1) * g <= n for c, (g, n) in zip(at, grid, strict=True))
        alike = name if inside else key
        if alike not in fewest:
            fewest[alike] = _min_size(cache, key)
        return size < fewest[alike]

    return too_short


def object_problems(cache: "LogitCache", keys, checksums: bool = True, sizes: dict | None = None) -> dict[str, str]:
    """{key: problem} of the objects ``keys`` that are damaged.

    ``checksums``: every object is read and its CRC32C checked (shards through their index),
    no decoding; else one listing answers presence and size (an object shorter than any
    sound one is damaged), which finds deletions and truncations but not changed bytes.
    """
    keys = list(keys)
    if not checksums:
        sizes = cache.objects.sizes() if sizes is None else sizes
        problems, too_short = {}, _too_short(cache)
        for key in keys:
            size = sizes.get(key)
            if size is None:
                problems[key] = "missing"
            elif too_short(key, size):
                problems[key] = f"truncated ({size} bytes)"
        return problems
    from zarr.core.buffer import default_buffer_prototype

    store, prototype = cache.objects.store, default_buffer_prototype()
    # a few objects in flight: latency-bound on object storage, bounded memory (shards: tens of MB)
    limit = asyncio.Semaphore(4 if cache.is_local else 16)

    async def check(key):
        async with limit:
            value = await store.get(key, prototype=prototype)
            codecs, in_bounds = _checks(cache, key)
            return key, object_problem(None if value is None else value.as_numpy_array(), codecs, in_bounds)

    async def check_all():
        return await asyncio.gather(*(check(key) for key in keys))

    found = cache.objects.call("read the objects to check them", check_all()) if keys else []
    return {key: problem for key, problem in found if problem}


def damage(cache: "LogitCache", checksums: bool = True, sizes: dict | None = None) -> list[str]:
    """What is damaged in the store, one line each: data objects of units marked done (and the
    labels, and any ``done`` object) that are missing or fail their checksum (listing only
    with ``checksums=False``; ``sizes``: that listing, if the caller has it). Units not marked
    done are not damage: they are still to write."""
    return _lines(cache, _damaged_objects(cache, checksums, sizes))


def _lines(cache: "LogitCache", problems: dict) -> list[str]:
    return [f"{cache.what(key)} ({key}): {problem}" for key, problem in sorted(problems.items())]


def _damaged_objects(cache: "LogitCache", checksums: bool, sizes: dict | None = None) -> dict[str, str]:
    sizes = cache.objects.sizes() if sizes is None else sizes  # one listing: the done units, and (quick) the sizes
    table = cache.unit_key_table()  # {array: its object in each write unit}
    flags = table.pop("done")
    # a unit without its flags object is not done, not damaged: only the flags objects there are checked
    done_keys = [key for key in flags if key in sizes]
    flag_problems = {k: p for k, p in object_problems(cache, done_keys, checksums, sizes).items() if p != "missing"}
    done = _done_units(cache, flags, set(flag_problems), sizes).ravel()
    keys = [LABELS_KEY] + [key for unit_keys in table.values() for key in itertools.compress(unit_keys, done)]
    return {**flag_problems, **object_problems(cache, keys, checksums, sizes)}


def _done_units(cache: "LogitCache", flags: list[str], damaged: set, sizes: dict) -> np.ndarray:
    """(epochs, units) bools: the units all of whose chunks are marked done in the listing ``sizes``,
    a unit whose flags object (of ``flags``, one per unit) is in ``damaged`` counted as not done."""
    done = cache.unit_mask(cache.done_mask(sizes))
    if damaged:
        done &= ~np.array([key in damaged for key in flags], bool).reshape(done.shape)
    return done


def remove_leftovers(cache: "LogitCache") -> list[str]:
    """Deletes what writers killed mid-write leave in a local store (Zarr's ``*.partial`` temp
    files, the lock's ``.lock.*.tmp``; object storage writes whole objects and leaves none);
    only while holding the store's lock, when no writer can be running. Returns their keys."""
    if not cache.is_local:
        return []
    # Zarr's temp files inside the store's arrays, the lock's at its root; a user's own file is never one of them
    keys = [
        k
        for k in cache.objects.list()
        if (k.endswith(".partial") and "/" in k and k.split("/", 1)[0] in STORE_ENTRIES)
        or (k.startswith(LOCK_KEY + ".") and k.endswith(".tmp") and "/" not in k)
    ]
    for key in keys:
        cache.objects.delete(key)
    return keys


def repair(cache: "LogitCache", labels=None) -> list[str]:
    """Before a resume: finds what is damaged (every object of the units marked done read and
    checked, see :func:`damage`) and undoes it, so the resume rewrites it: a damaged unit's
    ``done`` object is deleted first (a crash meanwhile leaves it "not done"), then its data
    objects (a rewrite of a short last shard reads the old one back). Damaged labels are
    rewritten from ``labels``. Returns the damage found, one line each."""
    problems = _damaged_objects(cache, checksums=True)
    if not problems:
        return []
    damaged_keys = set(problems)
    for e, chunks in cache.write_units():
        keys = cache.unit_keys(e, chunks[0])
        if damaged_keys & set(keys.values()):
            cache.objects.delete(keys["done"])
            for name, key in keys.items():
                if name != "done":
                    cache.objects.delete(key)
    if LABELS_KEY in damaged_keys:
        if labels is None:
            raise DhkdError(f"store {cache.path}: its labels are damaged; {cache.repair_hint()}")
        try:
            cache.array("labels")[:] = np.asarray(labels).astype(np.int32)
        except storage_errors() as e:
            raise DhkdError(f"cannot write to store {cache.path}: {one_line(e)}") from None
    return _lines(cache, problems)
