"""Writing a logit store: create or resume, one write unit at a time, and :class:`StoreWriter`, the
context manager that owns a store's whole life while it is written.

A unit's data objects are written first and its ``done`` flags after them, so a run killed at any
point resumes exactly: a unit is either marked done with all its data, or rewritten.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dhkd_pipe.errors import DhkdError, one_line
from dhkd_pipe.store.audit import remove_leftovers, repair
from dhkd_pipe.store.codecs import EncodedRows, codec_named, encode_logits
from dhkd_pipe.store.layout import (
    GEOMETRY,
    STORE_ENTRIES,
    check_geometry,
    create_arrays,
    jsonable,
    location,
)
from dhkd_pipe.store.lock import LOCK_KEY, StoreLock
from dhkd_pipe.store.objects import StoreObjects, is_local, local_root, open_store, storage_errors, write_local_object
from dhkd_pipe.store.reader import LogitCache
from dhkd_pipe.store.targets import check_target

# Units written at once by one process; None: on a filesystem one per core up to 4 (there a unit
# is CPU work, its encoding, so threads beyond the cores only add switching: fewer rows/s, more CPU
# per unit), 8 on object storage, where each unit waits mostly on round trips (bench store measures
# one thread against these).
WRITE_THREADS: int | None = None
QUEUED_UNITS = 2  # units waiting for a writer thread: with the threads, what bounds the memory held for writing


def write_threads(path: str) -> int:
    """How many units one process writes at once to the store at ``path``."""
    if WRITE_THREADS is not None:
        return WRITE_THREADS
    return max(1, min(4, len(os.sched_getaffinity(0)))) if is_local(path) else 8


def create_or_resume(
    path,
    *,
    epochs: int,
    num_samples: int,
    num_classes: int,
    chunk_rows: int,
    labels,
    codec: str = "fp16",
    attrs: dict | None = None,
    overwrite: bool = False,
    shard_threshold: int = 10_000,
    shard_bytes: int = 32 << 20,
) -> LogitCache:
    """Creates the store (or, for the same command and geometry, reopens it "r+" to resume)."""
    path = location(path)
    epochs, num_samples, num_classes, chunk_rows = int(epochs), int(num_samples), int(num_classes), int(chunk_rows)
    labels = check_geometry(epochs, num_samples, num_classes, chunk_rows, labels)
    codec_named(codec)
    attrs = jsonable(dict(attrs or {}))
    attrs["codec"] = codec

    objects = StoreObjects(open_store(path, read_only=False), path)
    check_target(objects, overwrite)
    if objects.exists("zarr.json"):
        existing = None if overwrite else _existing(path, objects, attrs)
        if existing is not None:
            _check_same(
                existing,
                attrs,
                dict(
                    epochs=epochs, num_samples=num_samples, num_classes=num_classes, chunk_rows=chunk_rows, codec=codec
                ),
            )
            return existing
        # --overwrite; or a store of ours that holds no data: replaced (the lock, if held, stays)
        objects.delete_all(
            keep=(LOCK_KEY,), only=STORE_ENTRIES
        )  # what else is there, the store did not write: it stays
    create_arrays(
        objects,
        epochs=epochs,
        num_samples=num_samples,
        num_classes=num_classes,
        chunk_rows=chunk_rows,
        labels=labels,
        codec=codec,
        attrs=attrs,
        shard_threshold=shard_threshold,
        shard_bytes=shard_bytes,
    )
    return LogitCache.open(path, mode="r+")


def _existing(path: str, objects: StoreObjects, attrs: dict) -> LogitCache | None:
    """The logit store at ``path`` to resume, or None where it holds no data and is replaced:
    a creation of the same command that never reached format_version, or a store in which no
    unit was ever written (a run that failed or was killed before its first unit, whatever
    its command: a re-run after the user fixed the input just works)."""
    import zarr

    try:
        old = dict(zarr.open_group(store=objects.store, mode="r", zarr_format=3).attrs)
    except Exception:
        old = None
    if (
        old is not None
        and "format_version" not in old
        and attrs.get("command") is not None
        and old.get("command") == attrs.get("command")
    ):
        return None  # our own creation, killed before format_version
    existing = LogitCache.open(path, mode="r+")
    if existing.attrs.get("command") != attrs.get("command") and not existing.objects.list("done/c/"):
        return None  # no unit was written: nothing to keep
    return existing


def _check_same(existing: LogitCache, attrs: dict, geometry: dict):
    old, new = existing.attrs.get("command"), attrs.get("command")
    if old != new:
        if isinstance(old, dict) and isinstance(new, dict):
            field = next((k for k in list(new) + list(old) if old.get(k) != new.get(k)), "command")
        else:
            field = "command"
        raise DhkdError(f"a different store exists at {existing.path} ({field} differs); pass --overwrite")
    for key in GEOMETRY:
        if getattr(existing, key) != geometry[key]:
            raise DhkdError(f"a different store exists at {existing.path} ({key} differs); pass --overwrite")


def write_unit(
    cache: LogitCache, epoch: int, first_chunk: int, logits, order, views, scratch: threading.local | None = None
):
    """Writes one write unit (all its rows) of an opened store, then its ``done`` flags.
    ``logits``: float32 (rows, K), or :class:`EncodedRows` in the store's codec. ``scratch``: the
    calling thread's own, where it keeps a buffer to encode the rows into, reused unit after unit
    (nothing refers to it once the call returns). A new array per unit costs page faults: a
    sharded unit's rows are large enough that glibc maps them afresh each time (in arenas left by
    other threads too).

    The calling thread encodes the unit's objects (``chunk_objects.ObjectEncoder``: the bytes Zarr
    would write) and, on a local disk, writes their files too; elsewhere Zarr's store takes the
    data objects at once (their round trips overlap), then the flags."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    start, stop = cache.unit_rows(first_chunk)
    last = min(first_chunk + cache.shard_chunks, cache.num_chunks) - 1
    n = stop - start
    encoded = logits if isinstance(logits, EncodedRows) else None
    logits = np.asarray(encoded.values if encoded is not None else logits)
    order, views = np.asarray(order), np.asarray(views)
    if logits.shape != (n, cache.num_classes) or order.shape != (n,) or views.shape != (n, 5):
        raise ValueError(
            f"unit (epoch {epoch}, chunks {first_chunk}-{last}) needs ({n}, {cache.num_classes}) logits, ({n},) order, "
            f"({n}, 5) views; got {logits.shape}, {order.shape}, {views.shape}"
        )
    codec = codec_named(cache.codec)
    if encoded is None:
        values, scale = encode_logits(
            logits, cache.codec, out=_buffer(scratch, codec.stored_dtype, logits.shape) if codec.fills_out else None
        )
    else:
        values, scale = logits, encoded.scale
        if values.dtype != np.dtype(codec.stored_dtype) or (scale is None) == codec.has_scale:
            raise ValueError(f"rows encoded as {values.dtype} (scale: {scale is not None}) for a {cache.codec} store")
    data = {"logits": values, "order": order.astype(np.int32), "views": views.astype(np.int32)}
    if scale is not None:
        data["logit_scale"] = scale
    data["done"] = np.ones(last + 1 - first_chunk, bool)
    keys = cache.unit_keys(epoch, first_chunk)
    # encoded on this thread (Blosc and CRC32C release the GIL), so writer threads share the work;
    # None: an array whose codec chain only Zarr encodes
    parts = {
        name: None if encoder is None else encoder.parts(data[name][None]) for name, encoder in cache.encoders().items()
    }
    store = cache.array("logits").store_path.store

    async def put(name):
        if parts[name] is None:
            columns = slice(first_chunk, last + 1) if name == "done" else slice(start, stop)
            await cache.array(name).async_array.setitem((epoch, columns), data[name])
        else:
            await store.set(keys[name], default_buffer_prototype().buffer.from_bytes(b"".join(parts[name])))

    # the unit's data objects at once (one round trip on object storage, not four), then its flags
    async def write_all():
        await asyncio.gather(*(put(name) for name in data if name != "done"))
        await put("done")

    try:
        if local_root(store) is not None and all(p is not None for p in parts.values()):
            for name in data:  # done last, and atomically: until it is, nothing reads the others
                write_local_object(store, keys[name], parts[name], atomic=name == "done")
        else:
            sync(write_all())
    except storage_errors() as e:
        raise DhkdError(f"cannot write to store {cache.path}: {one_line(e)}") from None


def _buffer(scratch: threading.local | None, dtype: str, shape: tuple) -> np.ndarray | None:
    """An array of ``shape`` in the thread's reused buffer (grown when too small), or None
    without ``scratch``."""
    if scratch is None:
        return None
    size = int(np.prod(shape))
    buffer = getattr(scratch, "buffer", None)
    if buffer is None or buffer.dtype != np.dtype(dtype) or buffer.size < size:
        buffer = scratch.buffer = np.empty(size, dtype)
    return buffer[:size].reshape(shape)


def _ignore():
    pass


class StoreWriter:
    """A store while it is written, from the target check to the lock's release.

    Constructing it checks the target, reading only (``--overwrite`` replaces only a logit store).
    Entering takes the store's lock (main process), creates the store or reopens it to resume,
    removes what killed writers left, verifies the units already written and undoes damaged ones
    so they are written again; ``barrier`` (every process calls it) then lets the other processes
    open the store. :meth:`put` writes units in background threads (``threads`` at once, default
    :func:`write_threads`; at most ``QUEUED_UNITS`` more waiting, so memory stays bounded; each unit
    still writes its data before its done flags, so order between units does not matter to a
    resume); leaving waits for them, verifies that
    the store is complete and releases the lock. A store that failed before its first unit is
    removed; one that was fresh and stays empty leaves no folder.

    ``holder``: the command the lock names; ``refresh``: attributes rewritten on a resume (where the
    data lies, the command line), unlike the command, which a resume must match.
    """

    def __init__(
        self,
        path,
        *,
        labels,
        attrs: dict | None = None,
        overwrite: bool = False,
        refresh: tuple = (),
        holder: str = "",
        break_lock: bool = False,
        main: bool = True,
        barrier=_ignore,
        log=None,
        threads: int | None = None,
        **layout,
    ):
        self.path = location(path)
        self._create = dict(labels=labels, attrs=attrs, overwrite=bool(overwrite), **layout)
        self._refresh = {k: (attrs or {})[k] for k in refresh}
        self._holder, self._break_lock, self._main, self._barrier = holder, break_lock, main, barrier
        self._log = log or (lambda line: None)
        self._threads = max(1, int(threads or write_threads(self.path)))
        self._objects = StoreObjects(open_store(self.path, read_only=False), self.path) if main else None
        if main:
            try:
                check_target(self._objects, bool(overwrite))
            except DhkdError:
                # another writer may be creating the store right now: then its lock answers (in
                # __enter__), and create_or_resume checks the target again under our own lock
                if not self._objects.exists(LOCK_KEY):
                    raise
        self.store: LogitCache | None = None
        self._lock = self._pool = None
        self._fresh = False

    def __enter__(self) -> "StoreWriter":
        if self._main:
            self._fresh = self._objects.is_empty()
            self._lock = StoreLock.acquire(self._objects, self._holder, break_lock=self._break_lock)
        try:
            if self._main:
                self.store = self._create_or_resume()
            self._barrier()
            if not self._main:
                self.store = LogitCache.open(self.path, mode="r+")
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="store-writer")
            self._scratch = threading.local()  # each writer thread's buffer for its units' encoded rows
            self._slots = threading.BoundedSemaphore(self._threads + QUEUED_UNITS)
            self._futures, self._error = [], None
        except BaseException:
            self._fail()
            raise
        return self

    def _create_or_resume(self) -> LogitCache:
        store = create_or_resume(self.path, **self._create)
        changed = {k: v for k, v in self._refresh.items() if store.attrs.get(k) != v}
        if changed:
            store.update_attrs(**changed)
        remove_leftovers(store)
        written = len(store.objects.list("done/c/"))  # the flags objects of the units written (the mask may be damaged)
        if written:
            self._log(f"verifying the {written} write units already written (presence and checksums)")
            damaged = repair(store, self._create["labels"])
            if damaged:
                more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
                self._log(f"{len(damaged)} damaged: {damaged[0]}{more}; rewriting them")
        return store

    @property
    def threads(self) -> int:
        return self._threads

    def todo(self, rank: int = 0, world: int = 1) -> list[tuple[int, list[int]]]:
        """The write units not yet done that process ``rank`` of ``world`` writes (every world-th)."""
        done = self.store.done_mask()
        units = [u for i, u in enumerate(self.store.write_units()) if i % world == rank]
        return [(e, chunks) for e, chunks in units if not done[e, chunks].all()]

    def put(self, epoch: int, first_chunk: int, logits, order, views):
        """Queues one unit for writing; waits while the queue is full. Raises the first failure of
        an earlier unit."""
        self._raise()
        self._slots.acquire()
        try:
            future = self._pool.submit(self._write, epoch, first_chunk, logits, order, views)
        except BaseException:
            self._slots.release()
            raise
        self._futures = [f for f in self._futures if not f.done()] + [future]  # at most threads + QUEUED_UNITS

    def _write(self, *unit):
        try:
            if self._error is None:  # after a failure, what is queued is not written
                write_unit(self.store, *unit, scratch=self._scratch)
        except BaseException as e:  # surfaced to the caller at the next put, wait or exit
            if self._error is None:
                self._error = e
        finally:
            self._slots.release()

    def _raise(self):
        if self._error is not None:
            raise self._error

    def wait(self):
        """Waits until every unit put so far is written; raises the first failure."""
        for future in self._futures:
            future.result()
        self._futures = []
        self._raise()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._fail()
            return False
        try:
            self.wait()
            self._pool.shutdown()
            self._barrier()
            if self._main:
                self.store.check_complete()
        except BaseException:
            self._fail()
            raise
        self._release()
        return False

    def _fail(self):
        """After a failure: writes in flight end, queued ones are dropped; a store in which no unit
        was written holds nothing worth keeping and would only stand in the way of the re-run, so
        it is removed (the lock stays until released)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._main:
            try:
                if not self._objects.list("done/c/"):
                    self._objects.delete_all(keep=(LOCK_KEY,), only=STORE_ENTRIES)
            except DhkdError:
                pass  # the failure itself is what the user must see
        self._release()

    def _release(self):
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()
            if self._fresh:
                self._objects.remove_empty_root()
