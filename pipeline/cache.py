"""The logit store (Zarr v3): the one place that knows its schema.

Arrays (E augmentation epochs, N samples, K classes, C rows per chunk):

========== ========= ================================================ =====================
array      shape     dtype                                            chunks
========== ========= ================================================ =====================
logits     (E, N, K) float16 / uint16 (bfloat16 bits) / float32 / int8 (1, C, K)
logit_scale (E, N)   float32, int8 codec only: max|row| / 127         (1, C)
order      (E, N)    int32: dataset index at each training position    (1, C)
views      (E, N, 5) int32: y, x, h, w, flip                           (1, C, 5)
labels     (N,)      int32                                             whole
done       (E, ceil(N/C)) bool: the chunk is written and final        (1, S)
========== ========= ================================================ =====================

When ``logits`` would have ``shard_threshold`` chunks or more, the per-epoch arrays are sharded
along N in shards of S chunks (a shard of logits is tens of MB); otherwise S = 1. A *write unit* is
S consecutive chunks of one epoch (one shard, or one chunk unsharded). Zarr writes whole chunk or
shard objects, so processes writing disjoint write units never touch the same object; ``done`` is
chunked (1, S) so each unit's flags are an object of their own, written after the unit's data.

Every chunk and shard object ends in a CRC32C checksum (zarr's ``crc32c`` codec after Blosc zstd):
Blosc has none of its own, and a flipped bit in a compressed logit chunk otherwise decodes to
wrong numbers without a word.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict

import numpy as np
import torch

from .codecs import CODECS  # declared apart, torch-free (the CLI names them)
from .errors import DhkdError, one_line
from .losses import dequantize
from .store import (MissingObject, StoreObjects, is_chunk_key, is_local, local_path, object_problem, open_store, require_objects,
                    shard_in_bounds, storage_errors)
from .store_lock import LOCK_KEY

FORMAT_VERSION = 1
_STORED_DTYPE = {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32, "int8": np.int8}
_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "int8": 1}
_DTYPE_NAME = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "int8": "int8"}
_FP16_MAX = 65504.0
_GEOMETRY = ("epochs", "num_samples", "num_classes", "chunk_rows", "codec")
_PER_EPOCH = ("logits", "logit_scale", "order", "views", "done")  # arrays chunked (epoch, unit, ...)

# Round-trip error bounds of the codecs (round to nearest):
FP16_RELATIVE_ERROR = 2.0**-11  # |x| in fp16's normal range (6.1e-5 .. 65504); below, 2^-25 absolute
FP16_ABSOLUTE_FLOOR = 2.0**-25
BF16_RELATIVE_ERROR = 2.0**-8  # 8-bit significand, fp32's exponent range
INT8_LEVELS = 127  # per-row scale max|row| / 127: absolute error <= scale / 2 = max|row| / 254


def _check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise DhkdError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")
    return codec


def codec_tolerance(codec: str, logits: torch.Tensor) -> float:
    """The largest absolute error the codec's round trip allows for these logits.

    fp32: 0. fp16: max|x| * 2^-11 (half an ulp, 11-bit significand) plus the subnormal floor
    2^-25. bf16: max|x| * 2^-8. int8 (per-row scale max|row|/127): max over rows of
    max|row| / 254, plus float32 rounding of the dequantising multiply.
    """
    _check_codec(codec)
    x = torch.as_tensor(logits).detach().float()
    if x.numel() == 0 or codec == "fp32":
        return 0.0
    amax = float(x.abs().max())
    if codec == "fp16":
        return amax * FP16_RELATIVE_ERROR + FP16_ABSOLUTE_FLOOR
    if codec == "bf16":
        return amax * BF16_RELATIVE_ERROR
    # max|row| / 254 for the worst row, plus float32 rounding of scale and of q * scale
    return amax / (2 * INT8_LEVELS) + amax * 2.0**-22


def check_encodable(logits, codec: str, where: str = "") -> np.ndarray:
    """Refuses teacher logits the store must not hold: non-finite ones (they would poison every
    student trained from the store), and for fp16 values beyond its range. Returns max|row|.
    ``where``: how the message names the rows ("of the unit", "of the first batch")."""
    x = np.asarray(logits, dtype=np.float32)
    amax = np.abs(x).max(axis=1) if x.size else np.zeros(len(x), np.float32)
    if not np.all(np.isfinite(amax)):
        bad = int(np.flatnonzero(~np.isfinite(amax))[0])
        kind = "NaN" if np.isnan(x[bad]).any() else "infinite"
        raise DhkdError(f"teacher logits are not finite ({kind} in row {bad} {where}".rstrip() + "); check the teacher and its weights")
    if codec == "fp16" and not np.all(amax <= _FP16_MAX):
        raise DhkdError(f"teacher logits exceed the fp16 range (|x| <= {_FP16_MAX:g}); use --codec bf16 or fp32")
    return amax


def decode_logits(values, scale=None, device="cpu") -> torch.Tensor:
    """float32 (rows, K) logits on ``device`` from what :meth:`LogitCache.read_chunk` returns.

    The stored bytes move to the device first and are widened there: float16 / float32 as is,
    uint16 as bfloat16 bit patterns, int8 by ``losses.dequantize`` (float32 ``q * scale[:, None]``,
    ``scale`` float32 (rows,)), the formula the kernels' teacher-row loader computes too.
    """
    t = _stored_tensor(values) if isinstance(values, np.ndarray) else values
    if t.dtype in (torch.int16, torch.uint16):
        t = t.view(torch.bfloat16)
    t = t.to(device)
    if t.dtype == torch.int8:
        if scale is None:
            raise ValueError("int8 logits need their per-row scale")
        scale = torch.from_numpy(np.ascontiguousarray(scale)) if isinstance(scale, np.ndarray) else torch.as_tensor(scale)
    return dequantize(t, scale)


def _stored_tensor(values: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing the stored bytes; uint16 (bfloat16 bit patterns) becomes bfloat16."""
    values = np.ascontiguousarray(values)
    if values.dtype == np.uint16:
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def _jsonable(value):
    """Round-trips through JSON, as attributes do (tuples become lists, numpy scalars numbers)."""

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    return json.loads(json.dumps(value, default=default))



def _location(path) -> str:
    """A local path (str or PathLike) or a URL, as a string."""
    return os.fspath(path) if isinstance(path, os.PathLike) else str(path)


class LogitCache:
    """A teacher-logit store, on disk or on object storage. Build with :meth:`create` or :meth:`open`.

    ``path`` is a local path or an fsspec URL (``s3://bucket/logits.zarr``, ``gs://``, ``file://``,
    ``memory://``); :attr:`objects` gives the store's objects by key (exists, list, size, read,
    write, delete) for checks built on the store.
    """

    def __init__(self, path: str, objects: StoreObjects, group, mode: str):
        import zarr
        from zarr.storage import StorePath

        self._path, self._objects, self._group, self._mode = path, objects, group, mode
        try:
            self._attrs = dict(group.attrs)
            # write_empty_chunks is not stored in the metadata: every unit writes all its objects,
            # so an all-zero chunk is stored like any other (and a missing one is never "data")
            arr = lambda name: group[name].with_config({"write_empty_chunks": True})  # noqa: E731
            self._logits = arr("logits")
            self._order = arr("order")
            self._views = arr("views")
            self._labels = arr("labels")
            self._done = arr("done")
            self._codec = _check_codec(self._attrs["codec"])
            self._scale = arr("logit_scale") if self._codec == "int8" else None
        except DhkdError:
            raise
        except Exception as e:
            raise DhkdError(f"{path} is not a complete logit store ({one_line(e)})") from None
        # Data is read through a store that raises on a missing chunk object (Zarr would read
        # zeros); writes and the done flags (absent = not done) use the plain one.
        strict = require_objects(self._logits.store_path.store)

        def reader(a):
            return zarr.Array(zarr.AsyncArray(metadata=a.metadata, store_path=StorePath(strict, a.path), config=a.async_array.config))

        self._readers = {"done": self._done}
        for name, a in (("logits", self._logits), ("logit_scale", self._scale), ("order", self._order), ("views", self._views), ("labels", self._labels)):
            if a is not None:
                self._readers[name] = reader(a)
        self._epochs, self._num_samples, self._num_classes = (int(s) for s in self._logits.shape)
        self._chunk_rows = int(self._logits.chunks[1])
        shards = self._logits.shards
        self._shard_chunks = 1 if shards is None else int(shards[1]) // self._chunk_rows
        self._cached: OrderedDict = OrderedDict()  # (name, epoch) -> array, read-only stores only
        self._label_cache = None

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
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
    ) -> "LogitCache":
        """Creates the store (or, for the same command and geometry, reopens it "r+" to resume)."""
        import zarr
        from zarr.codecs import BloscCodec, Crc32cCodec

        path = _location(path)
        _check_codec(codec)
        epochs, num_samples, num_classes, chunk_rows = int(epochs), int(num_samples), int(num_classes), int(chunk_rows)
        for name, v in (("epochs", epochs), ("num_samples", num_samples), ("num_classes", num_classes), ("chunk_rows", chunk_rows)):
            if v < 1:
                raise DhkdError(f"{name} must be at least 1, got {v}")
        labels = np.asarray(labels)
        if labels.shape != (num_samples,):
            raise DhkdError(f"labels have shape {labels.shape}, expected ({num_samples},)")
        attrs = _jsonable(dict(attrs or {}))
        attrs["codec"] = codec

        objects = StoreObjects(open_store(path, read_only=False), path)
        cls.check_target(objects, overwrite)
        if objects.exists("zarr.json"):
            existing = None if overwrite else cls._existing(path, objects, attrs)
            if existing is not None:
                cls._check_same(existing, attrs, dict(epochs=epochs, num_samples=num_samples, num_classes=num_classes,
                                                      chunk_rows=chunk_rows, codec=codec))
                return existing
            # --overwrite; or a store of ours that holds no data: replaced (the lock, if held, stays)
            objects.delete_all(keep=(LOCK_KEY,))

        num_chunks = -(-num_samples // chunk_rows)
        itemsize = _ITEMSIZE[codec]
        if epochs * num_chunks >= shard_threshold:
            s = max(1, round(shard_bytes / (chunk_rows * num_classes * itemsize)))
            shard_chunks = min(s, num_chunks)
        else:
            shard_chunks = 1
        sharded = shard_chunks > 1
        rows_per_unit = shard_chunks * chunk_rows

        def blosc(shuffle: str):
            return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()]

        def array(group, name, shape, chunks, dtype, compressors, fill_value, shard=True):
            shards = None
            if sharded and shard:
                shards = (1, rows_per_unit) + tuple(chunks[2:])
            return group.create_array(
                name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, compressors=compressors,
                fill_value=fill_value, config={"write_empty_chunks": True},
            )

        try:
            # format_version is written last: a half-created store does not open.
            group = zarr.open_group(store=objects.store, mode="a", zarr_format=3, attributes={k: v for k, v in attrs.items() if k != "format_version"})
            # byte shuffle: measured smaller than bitshuffle for fp16/bf16/fp32 and int8 logits
            array(group, "logits", (epochs, num_samples, num_classes), (1, chunk_rows, num_classes),
                  _STORED_DTYPE[codec], blosc("shuffle"), 0)
            if codec == "int8":
                array(group, "logit_scale", (epochs, num_samples), (1, chunk_rows), np.float32, blosc("shuffle"), 1.0)
            array(group, "order", (epochs, num_samples), (1, chunk_rows), np.int32, blosc("shuffle"), -1)
            array(group, "views", (epochs, num_samples, 5), (1, chunk_rows, 5), np.int32, blosc("shuffle"), 0)
            lab = array(group, "labels", (num_samples,), (num_samples,), np.int32, blosc("shuffle"), 0, shard=False)
            lab[:] = labels.astype(np.int32)
            array(group, "done", (epochs, num_chunks), (1, shard_chunks), bool, [Crc32cCodec()], False, shard=False)
            group.attrs.update({"format_version": FORMAT_VERSION})
        except DhkdError:
            raise
        except storage_errors() as e:
            raise DhkdError(f"cannot create the store at {path}: {one_line(e)}") from None
        return cls.open(path, mode="r+")

    @staticmethod
    def check_target(objects: StoreObjects, overwrite: bool = False):
        """Refuses, reading only, a location that holds something other than a logit store: a
        file, a folder or prefix with other objects, another Zarr store. ``--overwrite`` replaces
        only a logit store (a store whose group carries this tool's ``command``)."""
        location = objects.location
        if objects.is_file():
            raise DhkdError(f"{location} is a file, not a logit store; choose another path"
                            + (" (--overwrite replaces only a logit store, never a file)" if overwrite else ""))
        if not objects.exists("zarr.json"):
            if not objects.is_empty(ignore=(LOCK_KEY,)):
                advice = "refusing to delete it with --overwrite" if overwrite else "choose another path or remove it"
                raise DhkdError(f"{location} exists and is not a logit store; {advice}")
            return
        try:
            meta = json.loads(objects.read("zarr.json") or b"")
        except ValueError:
            meta = None
        if not (isinstance(meta, dict) and meta.get("node_type") == "group" and "command" in (meta.get("attributes") or {})):
            advice = "refusing to delete it with --overwrite" if overwrite else "choose another path or remove it"
            raise DhkdError(f"{location} holds a Zarr store that is not a logit store; {advice}")

    @classmethod
    def _existing(cls, path: str, objects: StoreObjects, attrs: dict) -> "LogitCache | None":
        """The logit store at ``path`` to resume, or None where it holds no data and is replaced:
        a creation of the same command that never reached format_version, or a store in which no
        unit was ever written (a run that failed or was killed before its first unit, whatever
        its command: a re-run after the user fixed the input just works)."""
        import zarr

        try:
            old = dict(zarr.open_group(store=objects.store, mode="r", zarr_format=3).attrs)
        except Exception:
            old = None
        if old is not None and "format_version" not in old and attrs.get("command") is not None and old.get("command") == attrs.get("command"):
            return None  # our own creation, killed before format_version
        existing = cls.open(path, mode="r+")
        if existing.attrs.get("command") != attrs.get("command") and not existing.objects.list("done/c/"):
            return None  # no unit was written: nothing to keep
        return existing

    @staticmethod
    def _check_same(existing: "LogitCache", attrs: dict, geometry: dict):
        old, new = existing.attrs.get("command"), attrs.get("command")
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):
                field = next((k for k in list(new) + list(old) if old.get(k) != new.get(k)), "command")
            else:
                field = "command"
            raise DhkdError(f"a different store exists at {existing.path} ({field} differs); pass --overwrite")
        for key in _GEOMETRY:
            if getattr(existing, key) != geometry[key]:
                raise DhkdError(f"a different store exists at {existing.path} ({key} differs); pass --overwrite")

    @classmethod
    def open(cls, path, mode: str = "r") -> "LogitCache":
        import zarr

        path = _location(path)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        objects = StoreObjects(open_store(path, read_only=mode == "r"), path)
        if not objects.exists("zarr.json"):
            if objects.is_empty(ignore=(LOCK_KEY,)):
                if objects.exists(LOCK_KEY):
                    raise DhkdError(f"no logit store at {path} yet: cache-teacher is creating it")
                raise DhkdError(f"no logit store at {path}")
            raise DhkdError(f"{path} is not a logit store (no zarr.json)")
        try:
            group = zarr.open_group(store=objects.store, mode=mode, zarr_format=3)
            version = dict(group.attrs).get("format_version")
        except Exception as e:
            raise DhkdError(f"{path} is not a logit store ({one_line(e)})") from None
        if version is None:
            raise DhkdError(f"{path} is not a logit store, or is still being created (no format_version)")
        if version != FORMAT_VERSION:
            raise DhkdError(f"store {path} has format version {version}; this tool reads version {FORMAT_VERSION}")
        return cls(path, objects, group, mode)

    @staticmethod
    def estimate_bytes(epochs: int, num_samples: int, num_classes: int, codec: str = "fp16", chunk_rows: int = 1024) -> int:
        """Uncompressed size of all arrays: logits (+ int8 scales), order, views, labels, done."""
        en = int(epochs) * int(num_samples)
        logits = en * int(num_classes) * _ITEMSIZE[_check_codec(codec)]
        scale = en * 4 if codec == "int8" else 0
        return logits + scale + en * 4 + en * 20 + int(num_samples) * 4 + int(epochs) * -(-int(num_samples) // int(chunk_rows))

    # ---- geometry ---------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    @property
    def epochs(self) -> int:
        return self._epochs

    @property
    def num_samples(self) -> int:
        return self._num_samples

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def chunk_rows(self) -> int:
        return self._chunk_rows

    @property
    def num_chunks(self) -> int:
        """Chunks per epoch."""
        return -(-self._num_samples // self._chunk_rows)

    @property
    def shard_chunks(self) -> int:
        """Chunks per write unit (1 when the store is not sharded)."""
        return self._shard_chunks

    @property
    def codec(self) -> str:
        return self._codec

    @property
    def chunk_nbytes(self) -> int:
        """Stored bytes of one chunk's logits (and int8 scales) before compression."""
        return self._chunk_rows * (self._num_classes * _ITEMSIZE[self._codec] + (4 if self._scale is not None else 0))

    @property
    def is_local(self) -> bool:
        """On a local (or shared) filesystem, not object storage."""
        return is_local(self._path)

    @property
    def labels(self) -> np.ndarray:
        if self._label_cache is None:
            self._label_cache = np.asarray(self._read("labels", (slice(None),), None, None), dtype=np.int64)
        return self._label_cache.copy()

    def rows(self, chunk: int) -> tuple[int, int]:
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} out of range 0..{self.num_chunks - 1}")
        start = chunk * self._chunk_rows
        return start, min(start + self._chunk_rows, self._num_samples)

    def write_units(self) -> list[tuple[int, list[int]]]:
        s, n = self._shard_chunks, self.num_chunks
        return [(e, list(range(c, min(c + s, n)))) for e in range(self._epochs) for c in range(0, n, s)]

    @property
    def objects(self) -> StoreObjects:
        """The store's objects by key: ``exists``, ``list``, ``size``, ``sizes``, ``read``,
        ``write``, ``delete`` (through Zarr's store API, on disk and on object storage)."""
        return self._objects

    def unit_keys(self, epoch: int, first_chunk: int) -> dict[str, str]:
        """{array: object key} of the objects that write unit (epoch, first_chunk) writes: its data
        objects, then ``done`` (written last)."""
        s = self._shard_chunks
        if first_chunk % s or not 0 <= first_chunk < self.num_chunks or not 0 <= epoch < self._epochs:
            raise ValueError(f"(epoch {epoch}, chunk {first_chunk}) does not start a write unit of {s} chunks")
        unit = first_chunk // s
        keys = {}
        for name in _PER_EPOCH:
            arr = self._done if name == "done" else self._readers.get(name)
            if arr is not None:
                keys[name] = f"{name}/" + arr.metadata.encode_chunk_key((epoch, unit) + (0,) * (arr.ndim - 2))
        return keys

    def update_attrs(self, **kv):
        kv = _jsonable(kv)
        try:
            self._group.attrs.update(kv)
        except storage_errors() as e:
            raise DhkdError(f"cannot write to store {self._path}: {one_line(e)}") from None
        self._attrs.update(kv)

    # ---- writing ----------------------------------------------------------------------------

    def _encode(self, logits: np.ndarray):
        """(stored values, float32 per-row scale or None). Non-finite logits are refused: a teacher
        that produced them would poison every student trained from the store."""
        x = np.ascontiguousarray(logits, dtype=np.float32)
        amax = check_encodable(x, self._codec, "of the unit")
        if self._codec == "fp32":
            return x, None
        if self._codec == "fp16":
            return x.astype(np.float16), None
        if self._codec == "bf16":
            bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
            return bits.view(np.uint16), None
        scale = (amax / np.float32(127.0)).astype(np.float32)
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(x.astype(np.float64) / scale.astype(np.float64)[:, None]), -127, 127).astype(np.int8)
        return q, scale

    def write_unit(self, epoch: int, first_chunk: int, logits, order, views):
        """Writes one write unit (all its rows), then its ``done`` flags."""
        from zarr.core.sync import sync

        s = self._shard_chunks
        if first_chunk % s:
            raise ValueError(f"chunk {first_chunk} does not start a write unit of {s} chunks")
        last = min(first_chunk + s, self.num_chunks) - 1
        start, stop = self.rows(first_chunk)[0], self.rows(last)[1]
        n = stop - start
        logits = np.asarray(logits)
        order, views = np.asarray(order), np.asarray(views)
        if logits.shape != (n, self._num_classes) or order.shape != (n,) or views.shape != (n, 5):
            raise ValueError(
                f"unit (epoch {epoch}, chunks {first_chunk}-{last}) needs ({n}, {self._num_classes}) logits, ({n},) order, "
                f"({n}, 5) views; got {logits.shape}, {order.shape}, {views.shape}"
            )
        values, scale = self._encode(logits)
        rows = (epoch, slice(start, stop))
        data = [(self._logits, values), (self._order, order.astype(np.int32)), (self._views, views.astype(np.int32))]
        if self._scale is not None:
            data.append((self._scale, scale))

        async def write_data():  # the unit's objects at once: one round trip on object storage, not four
            await asyncio.gather(*(arr.async_array.setitem(rows, v) for arr, v in data))

        try:
            sync(write_data())
            self._done[epoch, first_chunk : last + 1] = True  # only after all of the unit's data
        except storage_errors() as e:
            raise DhkdError(f"cannot write to store {self._path}: {one_line(e)}") from None

    def done_mask(self) -> np.ndarray:
        return self._read("done", (slice(None),), None, None).astype(bool)

    # ---- reading ----------------------------------------------------------------------------

    def _read(self, name: str, selection, epoch, chunk):
        try:
            return self._readers[name][selection]
        except DhkdError:
            raise
        except MissingObject as e:
            raise DhkdError(self._missing(e.key)) from None
        except Exception as e:
            where = "" if epoch is None else f" epoch {epoch}" + ("" if chunk is None else f" chunk {chunk}")
            if "checksum" in str(e).lower():  # zarr's crc32c codec: the stored bytes changed
                raise DhkdError(f"store {self._path}: {name}{where} is damaged (checksum mismatch); {self.repair_hint()}") from None
            raise DhkdError(f"store {self._path}: cannot read {name}{where}: {one_line(e)}") from None

    def _missing(self, key: str) -> str:
        """The message for a chunk object that is not in the store: Zarr would have read zeros."""
        where = "not on disk" if is_local(self._path) else "missing from the store"
        return f"store {self._path}: {self.what(key)} {where} ({key}); the store is incomplete or damaged; {self.repair_hint()}"

    def what(self, key: str) -> str:
        """What an object key holds, in words: ``logits epoch 1 chunk 3`` (``chunks 3-5`` sharded)."""
        parts = key.split("/")
        name = parts[0]
        if name in _PER_EPOCH and len(parts) >= 4 and parts[1] == "c":
            epoch, unit = int(parts[2]), int(parts[3])
            first = unit * self._shard_chunks
            last = min(first + self._shard_chunks, self.num_chunks) - 1
            return f"{name} epoch {epoch} chunk {first}" if first == last else f"{name} epoch {epoch} chunks {first}-{last}"
        return name

    def repair_hint(self) -> str:
        """How to repair the store: cache-teacher with the command that wrote it rewrites what is
        missing or damaged (the command line is recorded in the store since this version)."""
        import shlex

        line = self._attrs.get("command_line")
        return "re-run cache-teacher with the same command to rewrite it" + (f": {line} --out {shlex.quote(self._path)}" if line else "")

    def _epoch_array(self, name: str, epoch: int, dtype):
        key = (name, epoch)
        if key in self._cached:
            self._cached.move_to_end(key)
            return self._cached[key]
        if not 0 <= epoch < self._epochs:
            raise IndexError(f"epoch {epoch} out of range 0..{self._epochs - 1}")
        out = np.asarray(self._read(name, (epoch,), epoch, None), dtype=dtype)
        if self._mode == "r":  # a read-only store does not change under us
            out.flags.writeable = False
            self._cached[key] = out
            while len(self._cached) > 4:
                self._cached.popitem(last=False)
        return out

    def read_order(self, epoch: int) -> np.ndarray:
        return self._epoch_array("order", epoch, np.int64)

    def read_views(self, epoch: int) -> np.ndarray:
        return self._epoch_array("views", epoch, np.int32)

    def read_chunk(self, epoch: int, chunk: int):
        """(values, scale) of one chunk of one epoch, as stored: values (rows, K) float16 /
        uint16 (bfloat16 bit patterns) / float32 / int8 numpy, scale float32 (rows,) for int8
        else None. :func:`decode_logits` turns them into float32 on any device."""
        if not 0 <= epoch < self._epochs:
            raise IndexError(f"epoch {epoch} out of range 0..{self._epochs - 1}")
        start, stop = self.rows(chunk)
        values = self._read("logits", (epoch, slice(start, stop)), epoch, chunk)
        scale = None
        if self._scale is not None:
            scale = np.asarray(self._read("logit_scale", (epoch, slice(start, stop)), epoch, chunk), np.float32)
        return values, scale

    def read_chunk_tensors(self, epoch: int, chunk: int):
        """CPU tensors: float16 / bfloat16 / float32 / int8 values, float32 (rows,) scale or None."""
        values, scale = self.read_chunk(epoch, chunk)
        return _stored_tensor(values), None if scale is None else torch.from_numpy(np.ascontiguousarray(scale))

    def read_rows(self, epoch: int, chunk: int, rows=None, device="cpu") -> torch.Tensor:
        """Dequantised float32 (n, K) logits of rows (indices within the chunk; None = all)."""
        values, scale = self.read_chunk(epoch, chunk)
        if rows is not None:
            idx = np.asarray(rows, dtype=np.int64)
            values = values[idx]
            scale = None if scale is None else scale[idx]
        return decode_logits(values, scale, device)

    # ---- checks -----------------------------------------------------------------------------

    def check_complete(self, objects: bool = True):
        """Refuses a store that is not complete: a unit not marked done, or (``objects``) an object
        of a unit marked done that is missing or shorter than a sound one (one listing of the
        store; changed bytes are found by their checksums when read, or by ``inspect``)."""
        done = self.done_mask()
        missing = int((~done).sum())
        if missing:
            epochs = [int(e) for e in np.flatnonzero((~done).any(axis=1))]
            listed = ", ".join(map(str, epochs[:8])) + (", ..." if len(epochs) > 8 else "")
            raise DhkdError(
                f"store {self._path} is incomplete: {missing} of {done.size} chunks not written "
                f"(epochs {listed}); re-run cache-teacher to finish it"
            )
        if objects:
            damaged = self.damage(checksums=False)
            if damaged:
                more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
                raise DhkdError(f"store {self._path} is damaged: {damaged[0]}{more}; {self.repair_hint()}")

    def check_matches(self, fingerprint: dict):
        stored = self._attrs.get("dataset") or {}
        data = _jsonable(dict(fingerprint))
        for key in list(data) + [k for k in stored if k not in data]:
            a, b = stored.get(key), data.get(key)
            if a != b:
                raise DhkdError(f"store does not match the data: {key} is {_short(a)} in the store, {_short(b)} in the data")

    # ---- damage: objects missing or failing their checksums ------------------------------------

    def _array(self, name: str):
        return {"logits": self._logits, "logit_scale": self._scale, "order": self._order, "views": self._views,
                "labels": self._labels, "done": self._done}[name]

    def _checks(self, key: str):
        """(codecs, in_bounds) to check object ``key`` with (see ``store.object_problem``)."""
        name, _, coords = key.partition("/c/")
        metadata = self._array(name).metadata
        return metadata.codecs, shard_in_bounds(metadata, tuple(int(v) for v in coords.split("/")))

    def _min_size(self, key: str) -> int:
        """The fewest bytes a sound object ``key`` can have: a listing's size below it is damage.

        Per chunk a Blosc frame (16-byte header at least) and the 4-byte CRC32C; an uncompressed
        chunk (``done``) has exactly its bytes and the CRC; a shard its index (16 bytes per entry
        and its CRC) besides its chunks.
        """
        from zarr.codecs import BloscCodec

        arr = self._array(key.split("/", 1)[0])
        codecs, in_bounds = self._checks(key)
        if in_bounds is not None:
            return 16 * in_bounds.size + 4 + 20 * int(in_bounds.sum())
        if any(isinstance(c, BloscCodec) for c in codecs):
            return 20
        return int(np.prod(arr.chunks)) * arr.dtype.itemsize + 4

    def object_problems(self, keys, checksums: bool = True, sizes: dict | None = None) -> dict[str, str]:
        """{key: problem} of the objects ``keys`` that are damaged.

        ``checksums``: every object is read and its CRC32C checked (shards through their index),
        no decoding; else one listing answers presence and size (an object shorter than any
        sound one is damaged), which finds deletions and truncations but not changed bytes.
        """
        keys = list(keys)
        if not checksums:
            sizes = self._objects.sizes() if sizes is None else sizes
            problems = {}
            for key in keys:
                if key not in sizes:
                    problems[key] = "missing"
                elif sizes[key] < self._min_size(key):
                    problems[key] = f"truncated ({sizes[key]} bytes)"
            return problems
        from zarr.core.buffer import default_buffer_prototype

        store, prototype = self._objects.store, default_buffer_prototype()
        # a few objects in flight: latency-bound on object storage, bounded memory (shards: tens of MB)
        limit = asyncio.Semaphore(4 if self.is_local else 16)

        async def check(key):
            async with limit:
                value = await store.get(key, prototype=prototype)
                codecs, in_bounds = self._checks(key)
                return key, object_problem(None if value is None else value.as_numpy_array(), codecs, in_bounds)

        async def check_all():
            return await asyncio.gather(*(check(key) for key in keys))

        found = self._objects.call("read the objects to check them", check_all()) if keys else []
        return {key: problem for key, problem in found if problem}

    def damage(self, checksums: bool = True) -> list[str]:
        """What is damaged in the store, one line each: data objects of units marked done (and the
        labels, and any ``done`` object) that are missing or fail their checksum (listing only
        with ``checksums=False``). Units not marked done are not damage: they are still to write."""
        return [f"{self.what(key)} ({key}): {problem}" for key, problem in sorted(self._damage(checksums).items())]

    def _damage(self, checksums: bool) -> dict[str, str]:
        sizes = None if checksums else self._objects.sizes()
        done_keys = [self.unit_keys(e, chunks[0])["done"] for e, chunks in self.write_units()]
        flag_problems = {k: p for k, p in self.object_problems(done_keys, checksums, sizes).items() if p != "missing"}
        done = self._done_units(set(flag_problems))
        keys = ["labels/c/0"]
        for e, chunks in self.write_units():
            if done[e, chunks].all():
                keys += [k for name, k in self.unit_keys(e, chunks[0]).items() if name != "done"]
        return {**flag_problems, **self.object_problems(keys, checksums, sizes)}

    def _done_units(self, damaged: set) -> np.ndarray:
        """The done mask, a unit whose flags object is in ``damaged`` counted as not done."""
        if not damaged:
            return self.done_mask()
        done = np.zeros((self._epochs, self.num_chunks), bool)
        for e, chunks in self.write_units():
            if self.unit_keys(e, chunks[0])["done"] not in damaged:
                done[e, chunks[0] : chunks[-1] + 1] = self._read("done", (e, slice(chunks[0], chunks[-1] + 1)), e, chunks[0])
        return done

    def remove_leftovers(self) -> list[str]:
        """Deletes what writers killed mid-write leave in a local store (Zarr's ``*.partial`` temp
        files, the lock's ``.lock.*.tmp``; object storage writes whole objects and leaves none);
        only while holding the store's lock, when no writer can be running. Returns their keys."""
        if not self.is_local:
            return []
        keys = [k for k in self._objects.list() if k.endswith(".partial") or (k.startswith(LOCK_KEY + ".") and k.endswith(".tmp"))]
        for key in keys:
            self._objects.delete(key)
        return keys

    def repair(self, labels=None) -> list[str]:
        """Before a resume: finds what is damaged (every object of the units marked done read and
        checked, see :meth:`damage`) and undoes it, so the resume rewrites it: a damaged unit's
        ``done`` object is deleted first (a crash meanwhile leaves it "not done"), then its data
        objects (a rewrite of a short last shard reads the old one back). Damaged labels are
        rewritten from ``labels``. Returns the damage found, one line each."""
        problems = self._damage(checksums=True)
        if not problems:
            return []
        damaged_keys = set(problems)
        for e, chunks in self.write_units():
            keys = self.unit_keys(e, chunks[0])
            if damaged_keys & set(keys.values()):
                self._objects.delete(keys["done"])
                for name, key in keys.items():
                    if name != "done":
                        self._objects.delete(key)
        if "labels/c/0" in damaged_keys:
            if labels is None:
                raise DhkdError(f"store {self._path}: its labels are damaged; {self.repair_hint()}")
            try:
                self._labels[:] = np.asarray(labels).astype(np.int32)
            except storage_errors() as e:
                raise DhkdError(f"cannot write to store {self._path}: {one_line(e)}") from None
        return [f"{self.what(key)} ({key}): {problem}" for key, problem in sorted(problems.items())]

    # ---- inspection -------------------------------------------------------------------------

    def summary(self) -> dict:
        done = self.done_mask()
        sizes = self._objects.sizes()
        lock = sizes.pop(LOCK_KEY, None)
        logit_bytes = sum(n for key, n in sizes.items() if key.split("/")[0] in ("logits", "logit_scale") and is_chunk_key(key))
        count = self._epochs * self._num_samples * self._num_classes
        shards = self._logits.shards
        return {
            "path": os.path.abspath(local_path(self._path)) if is_local(self._path) else self._path,
            "shape": [self._epochs, self._num_samples, self._num_classes],
            "dtype": _DTYPE_NAME[self._codec],
            "codec": self._codec,
            "chunks": [int(c) for c in self._logits.chunks],
            "shards": None if shards is None else [int(s) for s in shards],
            "bytes_on_disk": sum(sizes.values()),
            "bytes_per_logit": logit_bytes / count if count else 0.0,
            "complete": f"{int(done.sum())}/{done.size}",
            "writer": self._writer() if lock is not None else None,
            "teacher": self._attrs.get("teacher"),
            "dataset": self._attrs.get("dataset"),
            "policy": self._attrs.get("policy"),
            "seed": self._attrs.get("seed"),
            "format_version": self._attrs.get("format_version"),
            "tool_version": self._attrs.get("tool_version"),
        }

    def _writer(self) -> str | None:
        """Who holds the store's lock (a cache-teacher run writing it), in words."""
        from .processes import describe_holder
        from .store_lock import read_holder

        holder = read_holder(self._objects)
        return None if holder is None else describe_holder(holder)

    def __repr__(self):
        return f"LogitCache({self._path!r}, {self._epochs}x{self._num_samples}x{self._num_classes}, {self._codec})"


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
