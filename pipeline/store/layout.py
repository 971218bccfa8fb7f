"""The logit store's layout (Zarr v3): its arrays, how they are chunked and sharded into write units,
creating them, and where each unit's objects are (``StoreLayout``). The metadata documents this
writes, declared as a schema and checked on open, are ``schema``'s.

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

The group's attributes: ``format_version`` (written last: a half-created store does not open),
``codec``, ``command`` (what wrote the store; a resume must match it) and what stage 1 records
(teacher, dataset fingerprint, policy, ...).
"""

from __future__ import annotations

import json
import os

import numpy as np

from dhkd_pipe.errors import DhkdError, one_line
from dhkd_pipe.store.codecs import codec_named
from dhkd_pipe.store.objects import StoreObjects, storage_errors

FORMAT_VERSION = 1
GEOMETRY = ("epochs", "num_samples", "num_classes", "chunk_rows", "codec")  # a resume must match all of them
PER_EPOCH = ("logits", "logit_scale", "order", "views", "done")  # arrays chunked (epoch, unit, ...); done last
# The top-level entries a logit store writes: replacing or clearing a store removes these and nothing else.
STORE_ENTRIES = ("zarr.json", "logits", "logit_scale", "order", "views", "labels", "done")


def jsonable(value):
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


def location(path) -> str:
    """A local path (str or PathLike) or a URL, as a string."""
    return os.fspath(path) if isinstance(path, os.PathLike) else str(path)


def estimate_bytes(epochs: int, num_samples: int, num_classes: int, codec: str = "fp16", chunk_rows: int = 1024) -> int:
    """Uncompressed size of all arrays: logits (+ int8 scales), order, views, labels, done."""
    c = codec_named(codec)
    en = int(epochs) * int(num_samples)
    logits = en * int(num_classes) * c.bytes_per_logit
    scale = en * 4 if c.has_scale else 0
    return (
        logits + scale + en * 4 + en * 20 + int(num_samples) * 4 + int(epochs) * -(-int(num_samples) // int(chunk_rows))
    )


def check_fingerprint(stored: dict, fingerprint: dict):
    """Refuses data whose fingerprint differs from the one the store records, naming the field."""
    data = jsonable(dict(fingerprint))
    for key in list(data) + [k for k in stored if k not in data]:
        a, b = stored.get(key), data.get(key)
        if a != b:
            raise DhkdError(f"store does not match the data: {key} is {brief(a)} in the store, {brief(b)} in the data")


def brief(value) -> str:
    """``value`` for a one-line message: a string as it is, anything else as JSON, cut to 80 characters."""
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def check_geometry(epochs: int, num_samples: int, num_classes: int, chunk_rows: int, labels) -> np.ndarray:
    """The labels as an array, after refusing a geometry no store can have."""
    for name, v in (
        ("epochs", epochs),
        ("num_samples", num_samples),
        ("num_classes", num_classes),
        ("chunk_rows", chunk_rows),
    ):
        if v < 1:
            raise DhkdError(f"{name} must be at least 1, got {v}")
    labels = np.asarray(labels)
    if labels.shape != (num_samples,):
        raise DhkdError(f"labels have shape {labels.shape}, expected ({num_samples},)")
    return labels


def create_arrays(
    objects: StoreObjects,
    *,
    epochs: int,
    num_samples: int,
    num_classes: int,
    chunk_rows: int,
    labels: np.ndarray,
    codec: str,
    attrs: dict,
    shard_threshold: int,
    shard_bytes: int,
):
    """Writes the group, its arrays and the labels into an empty location; ``format_version`` last."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    c = codec_named(codec)
    num_chunks = -(-num_samples // chunk_rows)
    if epochs * num_chunks >= shard_threshold:
        shard_chunks = min(max(1, round(shard_bytes / (chunk_rows * num_classes * c.bytes_per_logit))), num_chunks)
    else:
        shard_chunks = 1
    sharded = shard_chunks > 1
    rows_per_unit = shard_chunks * chunk_rows

    def blosc(shuffle: str):
        # zstd level 1 in 512 KiB blocks: on teacher-like logits it compresses as well as level 5 with
        # Blosc's own block size and is several times faster to compress (stage 1's writer was
        # compression-bound) and faster to decompress.
        # Stores written before keep their codec in their metadata and read as before.
        return [BloscCodec(cname="zstd", clevel=1, shuffle=shuffle, blocksize=512 << 10), Crc32cCodec()]

    def array(group, name, shape, chunks, dtype, compressors, fill_value, shard=True):
        shards = (1, rows_per_unit) + tuple(chunks[2:]) if sharded and shard else None
        return group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            shards=shards,
            dtype=dtype,
            compressors=compressors,
            fill_value=fill_value,
            config={"write_empty_chunks": True},
        )

    try:
        group = zarr.open_group(
            store=objects.store,
            mode="a",
            zarr_format=3,
            attributes={k: v for k, v in attrs.items() if k != "format_version"},
        )
        # byte shuffle: measured smaller than bitshuffle for fp16/bf16/fp32 and int8 logits
        array(
            group,
            "logits",
            (epochs, num_samples, num_classes),
            (1, chunk_rows, num_classes),
            np.dtype(c.stored_dtype),
            blosc("shuffle"),
            0,
        )
        if c.has_scale:
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
        raise DhkdError(f"cannot create the store at {objects.location}: {one_line(e)}") from None


class StoreLayout:
    """Where things are in an opened store: its geometry, its write units and their object keys.

    Built from the store's arrays ({name: zarr array}, ``logit_scale`` only for int8)."""

    def __init__(self, arrays: dict, codec: str):
        self._arrays = arrays
        logits = arrays["logits"]
        self._epochs, self._num_samples, self._num_classes = (int(s) for s in logits.shape)
        self._chunk_rows = int(logits.chunks[1])
        shards = logits.shards
        self._shard_chunks = 1 if shards is None else int(shards[1]) // self._chunk_rows
        self._codec = codec
        self._encoders: dict | None = None

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
        c = codec_named(self._codec)
        return self._chunk_rows * (self._num_classes * c.bytes_per_logit + (4 if c.has_scale else 0))

    def array(self, name: str):
        """The Zarr array ``name`` (for metadata; reads go through the store's strict readers)."""
        return self._arrays[name]

    def rows(self, chunk: int) -> tuple[int, int]:
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} out of range 0..{self.num_chunks - 1}")
        start = chunk * self._chunk_rows
        return start, min(start + self._chunk_rows, self._num_samples)

    def unit_rows(self, first_chunk: int) -> tuple[int, int]:
        """(start, stop) rows of the write unit that starts at ``first_chunk``."""
        s = self._shard_chunks
        if first_chunk % s:
            raise ValueError(f"chunk {first_chunk} does not start a write unit of {s} chunks")
        last = min(first_chunk + s, self.num_chunks) - 1
        return self.rows(first_chunk)[0], self.rows(last)[1]

    def write_units(self) -> list[tuple[int, list[int]]]:
        s, n = self._shard_chunks, self.num_chunks
        return [(e, list(range(c, min(c + s, n)))) for e in range(self._epochs) for c in range(0, n, s)]

    def unit_key_table(self, names: tuple[str, ...] = PER_EPOCH) -> dict[str, list[str]]:
        """{array: its object in each write unit, in the order of :meth:`write_units`} for the arrays
        ``names`` the store has: :meth:`unit_keys` for every unit at once, each array's key encoding
        looked up once (a store of 10^7 rows has hundreds of units, checked whenever it is opened to train)."""
        units = range(-(-self.num_chunks // self._shard_chunks))
        table = {}
        for name in names:
            arr = self._arrays.get(name)
            if arr is not None:
                encode, rest = arr.metadata.chunk_key_encoding.encode_chunk_key, (0,) * (arr.ndim - 2)
                table[name] = [f"{name}/{encode((e, u) + rest)}" for e in range(self._epochs) for u in units]
        return table

    def chunk_mask(self, units: np.ndarray) -> np.ndarray:
        """(epochs, chunks) bools from (epochs, units) ones: each unit's for each of its chunks."""
        return np.repeat(units, self._shard_chunks, axis=1)[:, : self.num_chunks]

    def unit_mask(self, chunks: np.ndarray) -> np.ndarray:
        """(epochs, units) bools from (epochs, chunks) ones: whether all of a unit's chunks are set."""
        return np.logical_and.reduceat(chunks, np.arange(0, self.num_chunks, self._shard_chunks), axis=1)

    def unit_keys(self, epoch: int, first_chunk: int) -> dict[str, str]:
        """{array: object key} of the objects that write unit (epoch, first_chunk) writes: its data
        objects, then ``done`` (written last)."""
        s = self._shard_chunks
        if first_chunk % s or not 0 <= first_chunk < self.num_chunks or not 0 <= epoch < self._epochs:
            raise ValueError(f"(epoch {epoch}, chunk {first_chunk}) does not start a write unit of {s} chunks")
        unit = first_chunk // s
        keys = {}
        for name in PER_EPOCH:
            arr = self._arrays.get(name)
            if arr is not None:
                keys[name] = f"{name}/" + arr.metadata.encode_chunk_key((epoch, unit) + (0,) * (arr.ndim - 2))
        return keys

    def encoders(self) -> dict:
        """{array: ObjectEncoder or None} of the arrays a write unit writes (None: Zarr encodes that
        array's objects, its codec chain being one the encoder does not know)."""
        if self._encoders is None:
            from dhkd_pipe.store.chunk_objects import ObjectEncoder

            self._encoders = {
                name: ObjectEncoder.of(self._arrays[name].metadata) for name in PER_EPOCH if name in self._arrays
            }
        return self._encoders

    def what(self, key: str) -> str:
        """What an object key holds, in words: ``logits epoch 1 chunk 3`` (``chunks 3-5`` sharded)."""
        parts = key.split("/")
        name = parts[0]
        if name in PER_EPOCH and len(parts) >= 4 and parts[1] == "c":
            epoch, unit = int(parts[2]), int(parts[3])
            first = unit * self._shard_chunks
            last = min(first + self._shard_chunks, self.num_chunks) - 1
            return (
                f"{name} epoch {epoch} chunk {first}"
                if first == last
                else f"{name} epoch {epoch} chunks {first}-{last}"
            )
        return name
