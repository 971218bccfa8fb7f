"""The logit store's declared metadata schema and its validation: every metadata document of a
logit store (the group's ``zarr.json`` with its attributes, each array's ``zarr.json``) as the
writer writes it, and the one error line for a store whose metadata differs.

Checked when a store is opened (``LogitCache.open``), from the documents ``bounds.check_store``
has read once; ``inspect`` lists every mismatch. A store whose metadata differs is not something
a resume repairs (a resume trusts the metadata to rewrite objects): it is restored or written anew.
"""

from __future__ import annotations

import shlex

import numpy as np

from dhkd_pipe.store.codecs import CODECS, codec_named
from dhkd_pipe.store.layout import PER_EPOCH, brief
from dhkd_pipe.terminal_text import escaped, quoted_command

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
            return [f"{where} is {brief(value)}, where a logit store has {self.describe()}"]
        if self.choices is not None and value not in self.choices:
            return [f"{where} is {brief(value)}, where a logit store has one of {', '.join(map(str, self.choices))}"]
        if self.minimum is not None and value < self.minimum:
            return [f"{where} is {brief(value)}, where a logit store has at least {self.minimum}"]
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
            return [f"{where} is {brief(value)}, where a logit store has a list of {size}values"]
        return [p for i, v in enumerate(value) for p in self.item.problems(v, f"{where}[{i}]")]


class Doc:
    """A JSON object: ``required`` and ``optional`` keys with their specs; ``closed``: no other keys."""

    def __init__(self, required: dict, optional: dict | None = None, closed: bool = True):
        self.required, self.optional, self.closed = required, optional or {}, closed

    def problems(self, value, where: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{where} is {brief(value)}, where a logit store has an object"]
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
                f"attribute {brief(key)} nests {depth} levels deep, a logit store's at most {MAX_ATTRIBUTE_DEPTH}"
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
            found.append(f"attribute dataset.{key} is {brief(dataset[key])} where the arrays hold {value}")
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
        found.append(f"{name} has data type {brief(meta.get('data_type'))}, where this store's is {dtype}")
    value = meta.get("fill_value")
    if isinstance(value, bool) != isinstance(fill, bool) or not isinstance(value, (int, float)) or value != fill:
        found.append(f"{name} has fill value {brief(meta.get('fill_value'))}, where a logit store's is {brief(fill)}")
    grid = meta.get("chunk_grid")
    shape = list(chunks)
    if sharded:
        shape[1] *= shard_chunks
    if grid != {"name": "regular", "configuration": {"chunk_shape": shape}}:
        found.append(f"{name} has chunk grid {brief(grid)}, where a logit store's is regular, {brief(shape)}")
    if meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}:
        found.append(
            f"{name} has chunk key encoding {brief(meta.get('chunk_key_encoding'))}, "
            "where a logit store's is default, '/'"
        )
    if not isinstance(meta.get("attributes", {}), dict):
        found.append(f"{name} has attributes {brief(meta.get('attributes'))}, where a logit store's are an object")
    if meta.get("storage_transformers", []) != []:
        found.append(
            f"{name} has storage transformers {brief(meta.get('storage_transformers'))}; a logit store's have none"
        )
    if meta.get("dimension_names") is not None:
        found.append(f"{name} has dimension names {brief(meta.get('dimension_names'))}; a logit store's have none")
    codecs = meta.get("codecs")
    itemsize = np.dtype(dtype).itemsize
    if sharded:
        problem = _sharding_problem(codecs, list(chunks), itemsize)
    else:
        problem = _chain_problem(codecs, itemsize, name in DATA_ARRAYS)
    if problem:
        names = (
            ", ".join(str(c.get("name")) if isinstance(c, dict) else brief(c) for c in codecs)
            if isinstance(codecs, list)
            else brief(codecs)
        )
        found.append(f"{name} has codecs {brief(names)}: {problem}")
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


def metadata_error(path: str, attrs: dict, problems: list[str]) -> str:
    """The one line for a store whose metadata differs from a logit store's, and what to do: a
    resume trusts the metadata, so it cannot repair it; a copy of the metadata can, or writing the
    store anew (``--overwrite`` replaces only a store whose group names its command)."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    line = quoted_command(attrs.get("command_line"))  # a forged line is never suggested
    where = escaped(shlex.quote(path))
    if "command" in attrs:
        anew = f"write it anew with --overwrite{f': {line} --out {where} --overwrite' if line else ''}"
    else:
        anew = "move it aside and write it anew with cache-teacher"
    return (
        f"store {path}: its metadata differs from a logit store's: {problems[0]}{more}; a resume cannot repair "
        f"metadata: restore the store's zarr.json files from a copy, or {anew}"
    )
