"""The logit store's layout (Zarr v3): the one place that knows its schema.

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
from dhkd_pipe.store.codecs import CODECS, codec_named
from dhkd_pipe.store.lock import LOCK_KEY
from dhkd_pipe.store.objects import StoreObjects, storage_errors
from dhkd_pipe.terminal_text import quoted_command

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


def check_target(objects: StoreObjects, overwrite: bool = False):
    """Refuses, reading only, a location that holds something other than a logit store: a
    file, a folder or prefix with other objects, another Zarr store. ``--overwrite`` replaces
    only a logit store (a store whose group carries this tool's ``command``)."""
    from dhkd_pipe.store.bounds import check_local_tree, read_metadata
    from dhkd_pipe.store.objects import is_bucket_root, is_local, local_path

    where = objects.location
    if is_bucket_root(where):
        raise DhkdError(
            f"{where} is a whole bucket: a store there would share it with everything else in it; "
            f"name a prefix such as {where.rstrip('/')}/logits.zarr"
        )
    if objects.is_file():
        raise DhkdError(
            f"{where} is a file, not a logit store; choose another path"
            + (" (--overwrite replaces only a logit store, never a file)" if overwrite else "")
        )
    if is_local(where):  # before anything is read: a FIFO or a link to a device would never end
        check_local_tree(local_path(where), where)
    if not objects.exists("zarr.json"):
        if not objects.is_empty(ignore=(LOCK_KEY,)):
            advice = "refusing to delete it with --overwrite" if overwrite else "choose another path or remove it"
            raise DhkdError(f"{where} exists and is not a logit store; {advice}")
        return
    try:
        meta = read_metadata(objects, "zarr.json")
    except DhkdError:
        meta = None
    if not (
        isinstance(meta, dict) and meta.get("node_type") == "group" and "command" in (meta.get("attributes") or {})
    ):
        advice = "refusing to delete it with --overwrite" if overwrite else "choose another path or remove it"
        raise DhkdError(f"{where} holds a Zarr store that is not a logit store; {advice}")


def check_fingerprint(stored: dict, fingerprint: dict):
    """Refuses data whose fingerprint differs from the one the store records, naming the field."""
    data = jsonable(dict(fingerprint))
    for key in list(data) + [k for k in stored if k not in data]:
        a, b = stored.get(key), data.get(key)
        if a != b:
            raise DhkdError(
                f"store does not match the data: {key} is {_short(a)} in the store, {_short(b)} in the data"
            )


def _short(value) -> str:
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


# ---- the schema: every metadata document of a logit store, as the writer writes it ---------------------
#
# Checked when a store is opened (``LogitCache.open``), from the documents ``bounds.check_store``
# has read once; ``inspect`` lists every mismatch. A store whose metadata differs is not something
# a resume repairs (a resume trusts the metadata to rewrite objects): it is restored or written anew.

_BLOSC_NAMES = ("blosclz", "lz4", "lz4hc", "snappy", "zlib", "zstd")
_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")


class Kind:
    """A JSON value of one of ``types`` (a bool is never a number), in ``choices`` when given, at
    least ``minimum`` when given; ``None`` in ``types`` allows null."""

    def __init__(self, *types, choices=None, minimum=None):
        self.types, self.choices, self.minimum = types, choices, minimum

    def problems(self, value, where: str) -> list[str]:
        wanted = tuple(t for t in self.types if t is not None)
        if value is None and None in self.types:
            return []
        if isinstance(value, bool) and bool not in wanted or not isinstance(value, wanted):
            return [f"{where} is {_short(value)}, where a logit store has {self.describe()}"]
        if self.choices is not None and value not in self.choices:
            return [f"{where} is {_short(value)}, where a logit store has one of {', '.join(map(str, self.choices))}"]
        if self.minimum is not None and value < self.minimum:
            return [f"{where} is {_short(value)}, where a logit store has at least {self.minimum}"]
        return []

    def describe(self) -> str:
        names = {str: "text", int: "a whole number", float: "a number", dict: "an object", list: "a list"}
        words = [names.get(t, "null") if t is not None else "null" for t in self.types]
        if int in self.types and float in self.types:
            words = [w for w in words if w != "a whole number"]
        return " or ".join(words)


class ListOf:
    """A JSON list of ``length`` values (any length when None), each an ``item``."""

    def __init__(self, item, length: int | None = None, nullable: bool = False):
        self.item, self.length, self.nullable = item, length, nullable

    def problems(self, value, where: str) -> list[str]:
        if value is None and self.nullable:
            return []
        if not isinstance(value, list) or (self.length is not None and len(value) != self.length):
            size = f"{self.length} " if self.length is not None else ""
            return [f"{where} is {_short(value)}, where a logit store has a list of {size}values"]
        return [p for i, v in enumerate(value) for p in self.item.problems(v, f"{where}[{i}]")]


class Doc:
    """A JSON object: ``required`` and ``optional`` keys with their specs; ``closed``: no other keys."""

    def __init__(self, required: dict, optional: dict | None = None, closed: bool = True):
        self.required, self.optional, self.closed = required, optional or {}, closed

    def problems(self, value, where: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{where} is {_short(value)}, where a logit store has an object"]
        top = where == "attribute"  # the group's attributes: "attribute teacher has no 'arch'"
        missing = (lambda key: f"no attribute {key!r}") if top else (lambda key: f"{where} has no {key!r}")
        found = [missing(key) for key in self.required if key not in value]
        for key, item in value.items():
            spec = self.required.get(key) or self.optional.get(key)
            if spec is not None:
                found += spec.problems(item, f"{where} {key}" if top else f"{where}.{key}")
            elif self.closed:
                found.append(f"{where} has {key!r}, which no logit store has")
        return found


TEXT, INT, NUMBER = Kind(str), Kind(int), Kind(int, float)
COUNT = Kind(int, minimum=1)
# The group's attributes. Every logit store has its format version and codec; what stage 1 records
# (``stages.cache_teacher.TeacherPass.store_attrs``: the teacher, the data set, the views' policy,
# ...) is checked wherever it is present, and required in a store whose recorded command line is
# cache-teacher's (``STAGE1_RECORDS``); a reader that needs a record asks ``LogitCache.recorded``.
# Others' own attributes are left alone.
ATTRIBUTES = Doc(
    required={"format_version": INT, "codec": Kind(str, choices=CODECS)},
    optional={
        "command": Doc({}, closed=False),
        "teacher": Doc(
            required={"arch": TEXT, "weights_digest": TEXT},
            optional={
                "weights": Kind(str, None),
                "weights_label": Kind(str, None),
                "weights_bytes": Kind(int, minimum=0),
                "val_top1": Kind(int, float, None),
                "val_top5": Kind(int, float, None),
            },
        ),
        "dataset": Doc(
            {}, optional={"kind": TEXT, "num_samples": COUNT, "num_classes": COUNT, "digest": TEXT}, closed=False
        ),
        "policy": Doc(
            required={"scale": ListOf(NUMBER, 2), "ratio": ListOf(NUMBER, 2)},
            optional={
                "seed": Kind(int, minimum=0),
                "policy": TEXT,
                "resolution": COUNT,
                "padding": Kind(int, minimum=0),
                "crop_pct": NUMBER,
                "interpolation": TEXT,
                "mean": ListOf(NUMBER, 3, nullable=True),
                "std": ListOf(NUMBER, 3, nullable=True),
            },
        ),
        "seed": Kind(int, minimum=0),
        "data_spec": TEXT,
        "preprocessing": Doc({}, closed=False),
        "precision": TEXT,
        "tool_version": TEXT,
        "command_line": TEXT,
    },
    closed=False,
)
MAX_ATTRIBUTE_DEPTH = 16  # lists and objects inside one attribute (stage 1 writes 3)
STAGE1_RECORDS = ("teacher", "dataset", "policy", "seed", "data_spec")
_ROOT = Doc(
    required={
        "zarr_format": Kind(int, choices=(3,)),
        "node_type": Kind(str, choices=("group",)),
        "attributes": Doc({}, closed=False),
    },
    optional={"consolidated_metadata": Kind(None)},  # Zarr would read the arrays' metadata from here instead
)
_ARRAY_KEYS = (
    "zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs",
    "attributes", "storage_transformers", "dimension_names",
)  # fmt: skip
# (stored dtype, fill value) of each array; logits' dtype is the codec's
ARRAY_TYPES = {
    "logit_scale": ("float32", 1.0),
    "order": ("int32", -1),
    "views": ("int32", 0),
    "labels": ("int32", 0),
    "done": ("bool", False),
}
DATA_ARRAYS = ("logits", "logit_scale", "order", "views", "labels")  # Blosc and CRC32C; done: CRC32C only


def metadata_problems(root: dict, arrays: dict[str, dict | None]) -> list[str]:
    """Every way the store's metadata documents differ from what the writer writes, one line each:
    ``root`` the group's ``zarr.json``, ``arrays`` {name: its ``zarr.json`` or None} (shapes and
    chunk counts already bounded by ``bounds.check_shapes``)."""
    found = _ROOT.problems(root, "zarr.json")
    attrs = root.get("attributes") if isinstance(root, dict) else None
    attrs = attrs if isinstance(attrs, dict) else {}
    found += ATTRIBUTES.problems(attrs, "attribute")
    for key, value in attrs.items():
        depth = _depth(value)
        if depth > MAX_ATTRIBUTE_DEPTH:  # readers walk them (a resume compares the command): bounded
            found.append(
                f"attribute {_short(key)} nests {depth} levels deep, a logit store's at most {MAX_ATTRIBUTE_DEPTH}"
            )
    if quoted_command(attrs.get("command_line")) is not None:  # cache-teacher wrote it: its records are there
        found += [f"no attribute {key!r}, which cache-teacher records" for key in STAGE1_RECORDS if key not in attrs]
    codec = attrs.get("codec") if attrs.get("codec") in CODECS else None
    if codec is None:
        return found  # the arrays' dtypes follow the codec
    c = codec_named(codec)
    names = ("logits", "order", "views", "labels", "done") + (("logit_scale",) if c.has_scale else ())
    if not c.has_scale and arrays.get("logit_scale") is not None:
        found.append("logit_scale is an array only an int8 store has")
    logits = arrays["logits"]
    e, n, k = logits["shape"]
    inner = _inner_chunks(logits)
    rows, grid_rows = inner[1], logits["chunk_grid"]["configuration"]["chunk_shape"][1]
    sharded = grid_rows != rows
    shard_chunks = grid_rows // rows if grid_rows % rows == 0 else 0
    if not shard_chunks:
        found.append(f"logits has shards of {grid_rows} rows, not a whole number of chunks of {rows}")
        shard_chunks = 1
    dataset = attrs.get("dataset") if isinstance(attrs.get("dataset"), dict) else {}
    for key, value in (("num_samples", n), ("num_classes", k)):
        if key in dataset and dataset[key] != value:
            found.append(f"attribute dataset.{key} is {_short(dataset[key])} where the arrays hold {value}")
    expected = {
        "logits": ((1, rows, k), c.stored_dtype, 0),
        "logit_scale": ((1, rows), *ARRAY_TYPES["logit_scale"]),
        "order": ((1, rows), *ARRAY_TYPES["order"]),
        "views": ((1, rows, 5), *ARRAY_TYPES["views"]),
        "labels": ((n,), *ARRAY_TYPES["labels"]),
        "done": ((1, shard_chunks), *ARRAY_TYPES["done"]),
    }
    for name in names:
        chunks, dtype, fill = expected[name]
        found += _array_problems(
            name, arrays[name], chunks, dtype, fill, sharded and name in PER_EPOCH[:-1], shard_chunks
        )
    return found


def _depth(value) -> int:
    """How deep lists and objects nest in a JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            level += 1
            deepest = max(deepest, level)
            stack += [(v, level) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _inner_chunks(meta: dict) -> list:
    codecs = meta.get("codecs") if isinstance(meta.get("codecs"), list) else []
    if codecs and isinstance(codecs[0], dict) and codecs[0].get("name") == "sharding_indexed":
        return codecs[0]["configuration"]["chunk_shape"]
    return meta["chunk_grid"]["configuration"]["chunk_shape"]


def _array_problems(name, meta, chunks, dtype, fill, sharded, shard_chunks) -> list[str]:
    found = [f"{name} has {key!r}, which no logit store's array has" for key in meta if key not in _ARRAY_KEYS]
    if meta.get("data_type") != dtype:
        found.append(f"{name} has data type {_short(meta.get('data_type'))}, where this store's is {dtype}")
    value = meta.get("fill_value")
    if isinstance(value, bool) != isinstance(fill, bool) or not isinstance(value, (int, float)) or value != fill:
        found.append(f"{name} has fill value {_short(meta.get('fill_value'))}, where a logit store's is {_short(fill)}")
    grid = meta.get("chunk_grid")
    shape = list(chunks)
    if sharded:
        shape[1] *= shard_chunks
    if grid != {"name": "regular", "configuration": {"chunk_shape": shape}}:
        found.append(f"{name} has chunk grid {_short(grid)}, where a logit store's is regular, {_short(shape)}")
    if meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}:
        found.append(
            f"{name} has chunk key encoding {_short(meta.get('chunk_key_encoding'))}, "
            "where a logit store's is default, '/'"
        )
    if not isinstance(meta.get("attributes", {}), dict):
        found.append(f"{name} has attributes {_short(meta.get('attributes'))}, where a logit store's are an object")
    if meta.get("storage_transformers", []) != []:
        found.append(
            f"{name} has storage transformers {_short(meta.get('storage_transformers'))}; a logit store's have none"
        )
    if meta.get("dimension_names") is not None:
        found.append(f"{name} has dimension names {_short(meta.get('dimension_names'))}; a logit store's have none")
    codecs = meta.get("codecs")
    itemsize = np.dtype(dtype).itemsize
    if sharded:
        problem = _sharding_problem(codecs, list(chunks), itemsize)
    else:
        problem = _chain_problem(codecs, itemsize, name in DATA_ARRAYS)
    if problem:
        names = (
            ", ".join(str(c.get("name")) if isinstance(c, dict) else _short(c) for c in codecs)
            if isinstance(codecs, list)
            else _short(codecs)
        )
        found.append(f"{name} has codecs {_short(names)}: {problem}")
    return found


def _sharding_problem(codecs, inner: list, itemsize: int) -> str | None:
    if not (isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict)):
        return "a sharded logit store's arrays have one sharding codec"
    codec = codecs[0]
    config = codec.get("configuration")
    if (
        codec.get("name") != "sharding_indexed"
        or set(codec) - {"name", "configuration"}
        or not isinstance(config, dict)
    ):
        return "a sharded logit store's arrays have one sharding codec"
    if set(config) != {"chunk_shape", "codecs", "index_codecs", "index_location"} or config["chunk_shape"] != inner:
        return f"a sharded logit store's shards hold chunks of {inner}, with codecs, index codecs and index location"
    if config["index_location"] not in ("start", "end"):
        return "a shard's index is at its start or end"
    return _chain_problem(config["codecs"], itemsize, True) or _chain_problem(config["index_codecs"], 8, False)


def _chain_problem(codecs, itemsize: int, compressed: bool) -> str | None:
    """What is wrong with a chain of codecs that should be the writer's: ``bytes`` (little-endian),
    Blosc where ``compressed``, then CRC32C (the checksum every object carries)."""
    names = ["bytes"] + (["blosc"] if compressed else []) + ["crc32c"]
    if (
        not (isinstance(codecs, list) and all(isinstance(c, dict) for c in codecs))
        or [c.get("name") for c in codecs] != names
    ):
        return f"a logit store's are {', '.join(names)}"
    for codec in codecs:
        config = codec.get("configuration")
        if set(codec) - {"name", "configuration"}:
            return f"{codec['name']} has keys a logit store's has not"
        if codec["name"] == "bytes":
            if config not in (None, {}) if itemsize == 1 else config != {"endian": "little"}:
                return "a logit store's values are little-endian"
        elif codec["name"] == "crc32c":
            if config not in (None, {}):
                return "crc32c takes no configuration"
        elif not (
            isinstance(config, dict)
            and set(config) == {"typesize", "cname", "clevel", "shuffle", "blocksize"}
            and config["typesize"] == itemsize
            and config["cname"] in _BLOSC_NAMES
            and config["shuffle"] in _SHUFFLES
            and isinstance(config["clevel"], int) and 0 <= config["clevel"] <= 9
            and isinstance(config["blocksize"], int) and config["blocksize"] >= 0
        ):  # fmt: skip
            return "Blosc of a logit store: its cname, clevel 0-9, shuffle, blocksize, and typesize the dtype's"
    return None


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
