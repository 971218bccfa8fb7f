"""What a logit store may claim, checked against what its objects can hold before anything is
allocated or read in bulk.

A store is input like any other: whoever can write it can forge it. Zarr trusts its metadata (a
shape of a billion rows is a billion rows of labels, an 931 GiB ``done`` mask, a walk over
millions of chunk keys) and reads whatever a path holds (a FIFO blocks forever, a link to
``/dev/zero`` never ends). These checks come first:

- on a local disk, every entry of the store is a regular file or folder inside it: FIFOs,
  devices, sockets and links that leave the store (or end anywhere but a regular file or folder)
  are refused, each object as it is read (``check_local_object``: opening a store visits none but
  those it reads) and every entry when the store is listed or about to be written;
- a metadata document is at most ``MAX_METADATA_BYTES`` and nests at most as deep as JSON allows;
- the arrays' shapes and chunks agree with the schema and with each other, no array has more than
  ``MAX_CHUNKS`` chunks or a chunk over ``MAX_CHUNK_BYTES``, and the labels object (written when
  the store is created) holds exactly the rows the shapes claim.
"""

from __future__ import annotations

import functools
import json
import os
import stat

from dhkd_pipe.errors import DhkdError

MAX_METADATA_BYTES = 1 << 20
MAX_CHUNKS = 10_000_000  # per array: ImageNet x 1000 views in chunks of 1024 rows is 1.25 million
MAX_CHUNK_BYTES = 1 << 30  # one decoded chunk (a shard: tens of MB)
ARRAYS = ("logits", "order", "views", "labels", "done")


def check_local_tree(root: str, location: str):
    """Refuses a local store holding an entry that is not a regular file or folder inside it (a walk
    of the whole store: for commands about to write it; readers check each object as they read it)."""
    try:
        local_sizes(root, location)
    except OSError as e:
        from dhkd_pipe.errors import io_error

        raise io_error(root, e, "read") from None


def local_sizes(root: str, location: str, prefix: str = "") -> dict[str, int]:
    """{key: bytes} of the files under the folder ``root``/``prefix``, as Zarr's ``LocalStore``
    lists them (links to files inside the store included), refusing on the way any entry that is
    not a regular file or folder inside the store: the listing a reader makes anyway is the walk
    that finds them. A ``scandir`` per folder and a ``stat`` per file, no ``getsize`` per key
    through Zarr's I/O loop, which costs several times as much (a store of a million rows has
    thousands of objects)."""
    real_root = os.path.realpath(root)
    start = os.path.join(root, prefix) if prefix else root
    if prefix:  # a prefix that is a link leaving the store is refused before it is listed
        check_local_object(root, real_root, prefix.rstrip("/"), location)
    sizes = {}
    stack = [(start, prefix.rstrip("/") + "/" if prefix else "")]
    while stack:
        folder, at = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            # the entry's type from the folder listing itself: only what is neither file nor folder is looked at
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, f"{at}{entry.name}/"))
                continue
            if not entry.is_file(follow_symlinks=False):  # a link or a special file
                mode = entry.stat(follow_symlinks=False).st_mode
                _check_entry(entry.path, at + entry.name, mode, real_root, location)
            if entry.is_file():
                sizes[at + entry.name] = entry.stat().st_size
    return sizes


def check_local_object(root: str, real_root: str, key: str, location: str):
    """Refuses object ``key`` of the local store at ``root`` (``real_root``: its real path) where it,
    or a folder on its way, is not a regular file or folder inside the store: called as the object
    is read, so a FIFO never blocks a read and a link never leads outside, with no walk of the
    whole store when it is opened. A missing object passes: the read answers that."""
    at, parts = root, key.split("/")
    for i, part in enumerate(parts):  # an lstat per entry on the way; a real path only where one is a link
        at = os.path.join(at, part)
        try:
            mode = os.lstat(at).st_mode
        except OSError:
            return
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            _check_entry(at, "/".join(parts[: i + 1]), mode, real_root, location)


def contained(store, location: str):
    """The local ``store`` (a ``LocalStore``) wrapped so that each object is checked just before it
    is read, sized or looked for (:func:`check_local_object`): a FIFO, device or socket, or a link
    leaving the store, is a one-line error when a command first touches it, and opening a store
    walks none of its objects (a store of 10^7 rows has thousands)."""
    return _contained_class()(store, location)


@functools.cache
def _contained_class():
    from zarr.storage import WrapperStore

    class ContainedStore(WrapperStore):
        def __init__(self, store, location: str):
            super().__init__(store)
            # links inside the store's own path are the user's: only what lies beyond its real path leaves it
            self.location, self._real_root = location, os.path.realpath(store.root)

        def _with_store(self, store):
            return type(self)(store, self.location)

        @property
        def root(self):
            return self._store.root

        def check(self, key: str):
            check_local_object(os.fspath(self._store.root), self._real_root, key, self.location)

        async def get(self, key, prototype=None, byte_range=None):
            self.check(key)
            return await self._store.get(key, prototype, byte_range)

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            for key in dict.fromkeys(key for key, _ in key_ranges):
                self.check(key)
            return await self._store.get_partial_values(prototype, key_ranges)

        async def _get_many(self, requests):
            for key, prototype, byte_range in requests:
                yield key, await self.get(key, prototype, byte_range)

        async def exists(self, key):
            self.check(key)
            return await self._store.exists(key)

        async def getsize(self, key):
            self.check(key)
            return await self._store.getsize(key)

    return ContainedStore


def _inside(path: str, real_root: str) -> bool:
    return path == real_root or path.startswith(real_root + os.sep)


def _check_entry(path: str, key: str, mode: int, real_root: str, location: str):
    """Refuses entry ``key`` of a local store (at ``path``, ``mode`` its own, links not followed)
    unless it is a regular file or folder, or a link inside the store to one."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    if not stat.S_ISLNK(mode):
        raise DhkdError(f"store {location}: {key} is {_kind(mode)}, not a file; a store holds regular files only")
    target = os.path.realpath(path)
    if not _inside(target, real_root):
        raise DhkdError(
            f"store {location}: {key} is a link that leaves the store (to {target}); a store holds its own objects only"
        )
    try:
        kind = os.stat(path).st_mode
    except OSError:
        kind = 0
    if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
        raise DhkdError(f"store {location}: {key} is a link to {_kind(kind)}, not to a file")


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "nothing (a dangling link)" if mode == 0 else "a special file"


def parse_metadata(data: bytes | None, key: str, location: str) -> dict | None:
    """A metadata document (``zarr.json``) as a dict, bounded; None if absent."""
    if data is None:
        return None
    if len(data) > MAX_METADATA_BYTES:
        raise DhkdError(
            f"store {location}: {key} is {len(data)} bytes, more than any logit store's metadata "
            f"({MAX_METADATA_BYTES >> 20} MiB at most)"
        )
    try:
        meta = json.loads(data)
    except RecursionError:
        raise DhkdError(f"store {location}: {key} nests too deep to be a logit store's metadata") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DhkdError(f"{location} is not a logit store: {key} is not JSON ({' '.join(str(e).split())})") from None
    if not isinstance(meta, dict):
        raise DhkdError(f"{location} is not a logit store: {key} is not a metadata document")
    return meta


def _ints(value, what: str, location: str, minimum: int) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value
    ):
        raise DhkdError(f"store {location}: {what} is {_short(value)}; a logit store's are whole numbers >= {minimum}")
    return value


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _object(value) -> dict:
    """``value`` where it is a JSON object, else an empty one (what it lacks is then reported)."""
    return value if isinstance(value, dict) else {}


def _geometry(meta: dict, name: str, location: str) -> tuple[list[int], list[int], list[int]]:
    """(shape, grid chunk shape (shard shape if sharded), inner chunk shape) of array ``name``."""
    if meta.get("node_type") != "array":
        raise DhkdError(f"store {location}: {name} is not an array")
    shape = _ints(meta.get("shape"), f"the shape of {name}", location, 0)
    grid = _object(_object(meta.get("chunk_grid")).get("configuration"))
    chunks = _ints(grid.get("chunk_shape"), f"the chunk shape of {name}", location, 1)
    inner = chunks
    codecs = meta.get("codecs") if isinstance(meta.get("codecs"), list) else []
    if codecs and isinstance(codecs[0], dict) and codecs[0].get("name") == "sharding_indexed":
        inner = _ints(
            _object(codecs[0].get("configuration")).get("chunk_shape"), f"the inner chunk shape of {name}", location, 1
        )
    if not (len(shape) == len(chunks) == len(inner)):
        raise DhkdError(f"store {location}: {name} has shape {_short(shape)} but chunks {_short(chunks)}")
    count, nbytes = 1, 1
    for s, c in zip(shape, inner, strict=True):
        count *= -(-s // c)
    for c in chunks:
        nbytes *= c
    nbytes *= 8  # the widest dtype a logit store holds is 4 bytes (8 as int64 once read): an upper bound
    if count > MAX_CHUNKS:
        raise DhkdError(
            f"store {location}: {name} claims {count} chunks (shape {_short(shape)}, chunks {_short(inner)}); "
            f"a logit store has at most {MAX_CHUNKS}"
        )
    if nbytes > MAX_CHUNK_BYTES * 2:
        raise DhkdError(
            f"store {location}: {name} claims chunks of {_short(chunks)} values, more than any logit store's"
        )
    return shape, chunks, inner


def check_shapes(metas: dict[str, dict | None], location: str, int8: bool = False) -> tuple[int, int, int]:
    """Refuses arrays whose shapes or chunks disagree with the schema or with each other; returns
    (epochs, samples, classes)."""
    names = ARRAYS + (("logit_scale",) if int8 else ())
    missing = [n for n in names if metas.get(n) is None]
    if missing:
        raise DhkdError(f"{location} is not a complete logit store (no {', '.join(missing)} array)")
    geo = {n: _geometry(metas[n], n, location) for n in names}
    shape = geo["logits"][0]
    if len(shape) != 3 or min(shape) < 1:
        raise DhkdError(
            f"store {location}: logits have shape {_short(shape)}; a logit store's is (views, samples, classes), "
            "each at least 1"
        )
    e, n, k = shape
    rows = geo["logits"][2][1]
    expected = {"order": [e, n], "views": [e, n, 5], "labels": [n], "done": [e, -(-n // rows)]}
    if int8:
        expected["logit_scale"] = [e, n]
    for name, want in expected.items():
        if geo[name][0] != want:
            raise DhkdError(
                f"store {location}: {name} has shape {_short(geo[name][0])} where logits of shape {_short(shape)} "
                f"need {_short(want)}; the store is damaged or forged"
            )
    return e, n, k


def check_labels_object(data: bytes | None, num_samples: int, location: str):
    """The labels object (Blosc frame and CRC32C) must decode to exactly ``num_samples`` int32
    values: its frame header states its size, so a forged shape is found before any allocation."""
    if data is None or len(data) < 20:
        return  # missing or truncated: the ordinary read reports it
    nbytes = int.from_bytes(data[4:8], "little")
    if nbytes != 4 * num_samples:
        raise DhkdError(
            f"store {location}: its metadata claims {num_samples} samples but its labels object holds "
            f"{nbytes // 4}; the store is damaged or forged"
        )


def read_metadata(objects, key: str) -> dict | None:
    """The metadata document ``key`` of the store ``objects`` (``logits/zarr.json``), its size
    checked before it is read; None if there is no such object."""
    if not objects.exists(key):
        return None
    size = objects.size(key)
    if size > MAX_METADATA_BYTES:
        raise DhkdError(
            f"store {objects.location}: {key} is {size} bytes, more than any logit store's metadata "
            f"({MAX_METADATA_BYTES >> 20} MiB at most)"
        )
    return parse_metadata(objects.read(key), key, objects.location)


def check_store(objects) -> tuple[dict, dict[str, dict | None]] | None:
    """Before Zarr reads anything of the store ``objects``: every metadata document bounded, and the
    shapes agreeing with the schema, with each other and with the labels object's own size. (A
    local store's objects are checked as they are read, by ``check_local_object``.) Returns the documents read,
    (the group's, {array: its own or None}), for the schema's check (``schema.metadata_problems``);
    None where the group is not (yet) a logit store's."""
    root = read_metadata(objects, "zarr.json")
    attrs = (root or {}).get("attributes") or {}
    if not isinstance(attrs, dict) or "format_version" not in attrs:
        return None  # not (yet) a logit store: opening refuses it by its attributes
    names = ARRAYS + ("logit_scale",)
    metas = {name: read_metadata(objects, f"{name}/zarr.json") for name in names}
    _, num_samples, _ = check_shapes(metas, objects.location, int8=attrs.get("codec") == "int8")
    check_labels_object(
        objects.read("labels/c/0") if objects.exists("labels/c/0") else None, num_samples, objects.location
    )
    return root, metas
