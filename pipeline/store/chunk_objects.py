"""What a stored chunk object is, byte for byte: :class:`ObjectEncoder` writes whole objects the way
Zarr encodes them, and :func:`object_problem` checks one from the checksums it carries.

Both know the codec chains a logit store uses (Zarr v3): ``bytes`` (little-endian), then Blosc
and/or CRC32C; or one ``sharding_indexed`` codec of such chains, its inner chunks followed (or
preceded) by an index of (offset, nbytes) pairs with its own CRC32C.
"""

from __future__ import annotations

import numpy as np

_NO_CHUNK = 2**64 - 1  # a shard index entry (offset, nbytes) of (this, this): the chunk is not stored
_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}  # Blosc's own numbers for Zarr's names


# ---- encoding whole objects ---------------------------------------------------------------------------


def _chain(codecs, dtype: np.dtype):
    """The steps of a codec chain (``bytes`` first, then Blosc or CRC32C steps), each from an
    object's bytes in parts to its encoded parts; None for a chain this module does not encode
    (Zarr then does)."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    if dtype.itemsize > 1 and (codecs[0].endian is None or codecs[0].endian.value != "little"):
        return None
    steps = []
    for codec in codecs[1:]:
        if isinstance(codec, Crc32cCodec):
            steps.append(_with_crc32c)
        elif isinstance(codec, BloscCodec):
            from numcodecs import Blosc

            config = codec.to_dict()["configuration"]
            blosc = Blosc.from_config(
                {
                    "cname": config["cname"],
                    "clevel": config["clevel"],
                    "shuffle": _SHUFFLES[config["shuffle"]],
                    "blocksize": config["blocksize"],
                    "typesize": config.get("typesize") or dtype.itemsize,
                }
            )
            steps.append(lambda parts, encode=blosc.encode: [encode(parts[0] if len(parts) == 1 else b"".join(parts))])
        else:
            return None
    return steps


def _with_crc32c(parts: list) -> list:
    """Zarr's ``crc32c`` codec: the bytes, then their CRC32C, little-endian (a part of its own:
    the bytes before it are not copied)."""
    import google_crc32c

    parts = [
        p if isinstance(p, bytes) else bytes(p) for p in parts
    ]  # google_crc32c takes bytes (views only where no compressor ran)
    crc = 0
    for part in parts:
        crc = google_crc32c.extend(crc, part)
    return parts + [crc.to_bytes(4, "little")]


def _run(steps, values: np.ndarray) -> list:
    parts = [memoryview(np.ascontiguousarray(values)).cast("B")]
    for step in steps:
        parts = step(parts)
    return parts


class ObjectEncoder:
    """Encodes whole objects (chunks, or shards) of one Zarr v3 array, byte for byte as Zarr does
    for the store's arrays (``write_empty_chunks``: every inner chunk inside the array is stored,
    as ``object_problem`` requires), on the caller's thread. Through Zarr's setitem each of a
    unit's small objects (order, views, flags) costs a Python round through Zarr, and every write
    of every writer thread passes through Zarr's one I/O loop thread, so parallel writer threads
    gain little; encoding here lets them run side by side (``bench store`` compares one thread with
    the parallel writer). :meth:`of` gives
    None for a codec chain it does not know; the caller then writes through Zarr.
    """

    def __init__(
        self,
        shape,
        dtype: np.dtype,
        fill_value,
        steps,
        inner_shape=None,
        index_steps=None,
        index_at_start: bool = False,
    ):
        self.shape, self.dtype, self._fill = tuple(shape), dtype, fill_value
        self._steps, self._inner, self._index_steps, self._index_at_start = (
            steps,
            inner_shape,
            index_steps,
            index_at_start,
        )

    @classmethod
    def of(cls, metadata) -> "ObjectEncoder | None":
        """The encoder of the array whose Zarr metadata is ``metadata``, or None."""
        from zarr.codecs import ShardingCodec
        from zarr.codecs.sharding import ShardingCodecIndexLocation

        dtype = np.dtype(metadata.data_type.to_native_dtype()).newbyteorder("<")  # the bytes codec's order, on any host
        shape = tuple(int(s) for s in metadata.chunk_grid.chunk_shape)
        fill = np.asarray(metadata.fill_value, dtype=dtype)
        codecs = metadata.codecs
        if codecs and isinstance(codecs[0], ShardingCodec):
            sharding = codecs[0]
            inner = tuple(int(s) for s in sharding.chunk_shape)
            steps, index_steps = _chain(sharding.codecs, dtype), _chain(sharding.index_codecs, np.dtype("<u8"))
            per_shard = [s // c for s, c in zip(shape, inner, strict=True)]
            # inner chunks are stored in Morton order, which is C order when at most one axis has several
            if len(codecs) > 1 or steps is None or index_steps is None or sum(n > 1 for n in per_shard) > 1:
                return None
            return cls(
                shape,
                dtype,
                fill,
                steps,
                inner,
                index_steps,
                sharding.index_location == ShardingCodecIndexLocation.start,
            )
        steps = _chain(codecs, dtype)
        return None if steps is None else cls(shape, dtype, fill, steps)

    def encode(self, values) -> bytes:
        """The object holding ``values`` (see :meth:`parts`), in one piece."""
        return b"".join(self.parts(values))

    def parts(self, values) -> list:
        """The object holding ``values``, as the pieces that make it up in order (written one
        after the other, they need no copy into one buffer): ``values`` is the part of one
        object's region that lies in the array (its shape at most the object's, starting at the
        object's corner); the rest is the fill value, as Zarr pads an edge chunk."""
        values = np.asarray(values, dtype=self.dtype)
        if values.ndim != len(self.shape) or any(v > s for v, s in zip(values.shape, self.shape, strict=True)):
            raise ValueError(f"values of shape {values.shape} do not fit an object of shape {self.shape}")
        if self._inner is None:
            return _run(self._steps, self._padded(values, self.shape))
        per_shard = tuple(s // c for s, c in zip(self.shape, self._inner, strict=True))
        table = np.full(per_shard + (2,), _NO_CHUNK, dtype="<u8")
        parts, offset = [], 0
        for local in np.ndindex(*per_shard):
            corner = [i * c for i, c in zip(local, self._inner, strict=True)]
            if any(at >= v for at, v in zip(corner, values.shape, strict=True)):
                continue  # outside the array: not stored
            region = values[tuple(slice(at, at + c) for at, c in zip(corner, self._inner, strict=True))]
            chunk = _run(self._steps, self._padded(region, self._inner))
            nbytes = sum(len(p) for p in chunk)
            table[local] = (offset, nbytes)
            parts += chunk
            offset += nbytes
        if self._index_at_start:
            index_size = sum(len(p) for p in _run(self._index_steps, table))
            table[table[..., 0] != _NO_CHUNK, 0] += index_size
            return _run(self._index_steps, table) + parts
        return parts + _run(self._index_steps, table)

    def _padded(self, values: np.ndarray, shape: tuple) -> np.ndarray:
        if values.shape == shape:
            return values
        full = np.full(shape, self._fill, dtype=self.dtype)
        full[tuple(slice(0, v) for v in values.shape)] = values
        return full


# ---- checking stored objects from their checksums (no decoding) -------------------------------------


def _crc_problem(data, codecs) -> str | None:
    """Why an object whose codec chain is ``codecs`` is damaged, from its trailing CRC32C (zarr's
    ``crc32c`` codec appends the little-endian CRC32C of the bytes before it); None if it is
    sound or carries no checksum."""
    from zarr.codecs import Crc32cCodec

    if not codecs or not isinstance(codecs[-1], Crc32cCodec):
        return None
    if len(data) < 4:
        return "truncated"
    import google_crc32c

    view = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data  # slices without copies
    if google_crc32c.value(view[:-4]).to_bytes(4, "little") != view[-4:].tobytes():
        return "checksum mismatch"
    return None


def shard_in_bounds(metadata, coords) -> "np.ndarray | None":
    """For the sharded array ``metadata``, which inner chunks of the shard at grid ``coords`` lie
    inside the array (bools, C order of the shard's index); None if the array is not sharded."""
    from zarr.codecs import ShardingCodec

    codecs = metadata.codecs
    if not codecs or not isinstance(codecs[0], ShardingCodec):
        return None
    shard = np.asarray(metadata.chunk_grid.chunk_shape)
    inner = np.asarray(codecs[0].chunk_shape)
    per_shard = shard // inner
    chunks_in_array = -(-np.asarray(metadata.shape) // inner)
    local = np.indices(tuple(per_shard)).reshape(len(per_shard), -1).T  # C order
    return np.all(np.asarray(coords) * per_shard + local < chunks_in_array, axis=1)


def object_problem(data, codecs, in_bounds=None) -> str | None:
    """Why a stored chunk object is damaged ("missing", "truncated", "checksum mismatch", ...), or
    None if it is sound, from the checksums it carries; nothing is decoded.

    A sharded object (``codecs`` is one ``ShardingCodec``) is checked through its index: the
    index's own CRC32C, every stored inner chunk inside the object with its CRC32C, and every
    inner chunk that lies inside the array (``in_bounds``: one bool per index entry, C order;
    default all) stored.
    """
    from zarr.codecs import ShardingCodec

    if data is None:
        return "missing"
    if not codecs or not isinstance(codecs[0], ShardingCodec):
        return _crc_problem(data, codecs)
    from zarr.codecs import Crc32cCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation

    sharding = codecs[0]
    view = np.frombuffer(data, dtype=np.uint8)
    if in_bounds is None:
        raise ValueError("a sharded object needs in_bounds (one bool per index entry)")
    entries = int(np.asarray(in_bounds).size)
    index_nbytes = 16 * entries + (4 if any(isinstance(c, Crc32cCodec) for c in sharding.index_codecs) else 0)
    if len(view) < index_nbytes:
        return "truncated (no shard index)"
    at_start = sharding.index_location == ShardingCodecIndexLocation.start
    index = view[:index_nbytes] if at_start else view[len(view) - index_nbytes :]
    problem = _crc_problem(index, sharding.index_codecs)
    if problem:
        return f"shard index {problem}"
    table = index[: 16 * entries].view("<u8").reshape(entries, 2)
    lo, hi = (index_nbytes, len(view)) if at_start else (0, len(view) - index_nbytes)
    for j, (offset, nbytes) in enumerate(table.tolist()):
        if offset == _NO_CHUNK and nbytes == _NO_CHUNK:
            if in_bounds.reshape(-1)[j]:
                return f"inner chunk {j} missing"
            continue
        if offset < lo or offset + nbytes > hi:
            return f"truncated (inner chunk {j} lies outside the object)"
        problem = _crc_problem(view[offset : offset + nbytes], sharding.codecs)
        if problem:
            return f"inner chunk {j} {problem}"
    return None
