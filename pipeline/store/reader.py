"""An opened logit store and its streaming reads: what stage 2, ``verify-cache`` and ``inspect`` use.

The arrays' layout is in ``layout``, the metadata schema in ``schema``, the codecs in ``codecs``;
writing (create or resume, units, the lock) is ``writer``'s, finding and repairing damage
``audit``'s, what ``inspect`` shows ``inspection``'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict

import numpy as np

from dhkd_pipe.errors import DhkdError, one_line
from dhkd_pipe.store.bounds import check_store
from dhkd_pipe.store.codecs import codec_named, decode_logits, stored_tensor
from dhkd_pipe.store.layout import FORMAT_VERSION, StoreLayout, brief, check_fingerprint, jsonable, location
from dhkd_pipe.store.lock import LOCK_KEY
from dhkd_pipe.store.objects import (
    MissingObject,
    StoreObjects,
    is_chunk_key,
    is_local,
    local_path,
    open_store,
    require_objects,
    storage_errors,
)
from dhkd_pipe.store.schema import metadata_error, metadata_problems


class LogitCache(StoreLayout):
    """A teacher-logit store, on disk or on object storage, opened with :meth:`open`.

    ``path`` is a local path or an fsspec URL (``s3://bucket/logits.zarr``, ``gs://``, ``file://``,
    ``memory://``); :attr:`objects` gives the store's objects by key (exists, list, size, read,
    write, delete) for checks built on the store. Data is read through a store that raises on a
    missing chunk object (Zarr would read zeros); the done flags (absent = not done) and writes
    use the plain one.
    """

    def __init__(self, path: str, objects: StoreObjects, group, mode: str):
        import zarr
        from zarr.storage import StorePath

        self._path, self._objects, self._group, self._mode = path, objects, group, mode
        try:
            self._attrs = dict(group.attrs)
            codec = codec_named(self._attrs["codec"])
            names = ("logits", "order", "views", "labels", "done") + (("logit_scale",) if codec.has_scale else ())
            # write_empty_chunks is not stored in the metadata: every unit writes all its objects,
            # so an all-zero chunk is stored like any other (and a missing one is never "data")
            arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in names}
        except DhkdError:
            raise
        except Exception as e:
            raise DhkdError(f"{path} is not a complete logit store ({one_line(e)})") from None
        super().__init__(arrays, codec.name)
        strict = require_objects(arrays["logits"].store_path.store)
        self._readers = {
            name: a
            if name == "done"
            else zarr.Array(
                zarr.AsyncArray(metadata=a.metadata, store_path=StorePath(strict, a.path), config=a.async_array.config)
            )
            for name, a in arrays.items()
        }
        self._metadata_problems: list[str] = []
        self._cached: OrderedDict = OrderedDict()  # (name, epoch) -> array, read-only stores only
        self._label_cache = None

    @classmethod
    def open(cls, path, mode: str = "r", schema: bool = True) -> "LogitCache":
        """The store at ``path``, its metadata checked against the schema (``schema.metadata_problems``):
        a store whose metadata differs is refused, or with ``schema=False`` (``inspect``) opened where
        it can be and its differences kept in :attr:`metadata_problems`."""
        import zarr

        path = location(path)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        # a local store's objects are checked as they are read (``bounds.contained``), not walked here
        objects = StoreObjects(open_store(path, read_only=mode == "r"), path)
        if not objects.exists("zarr.json"):
            if objects.is_empty(ignore=(LOCK_KEY,)):
                if objects.exists(LOCK_KEY):
                    raise DhkdError(f"no logit store at {path} yet: cache-teacher is creating it")
                raise DhkdError(f"no logit store at {path}")
            raise DhkdError(f"{path} is not a logit store (no zarr.json)")
        # metadata bounded, shapes against the objects: before Zarr allocates anything; then the schema
        documents = check_store(objects)
        problems = []
        if documents is not None:
            attrs = documents[0]["attributes"]
            if attrs["format_version"] != FORMAT_VERSION:  # another version's schema is not this one's
                raise DhkdError(
                    f"store {path} has format version {brief(json.dumps(attrs['format_version']))}; "
                    f"this tool reads version {FORMAT_VERSION}"
                )
            problems = metadata_problems(*documents)
            if problems and schema:
                raise DhkdError(metadata_error(path, attrs, problems))
        try:
            group = zarr.open_group(store=objects.store, mode=mode, zarr_format=3)
            version = dict(group.attrs).get("format_version")
        except Exception as e:
            if problems:  # what Zarr stumbled on is among them
                raise DhkdError(metadata_error(path, documents[0]["attributes"], problems)) from None
            raise DhkdError(f"{path} is not a logit store ({one_line(e)})") from None
        if version is None:
            raise DhkdError(f"{path} is not a logit store, or is still being created (no format_version)")
        if version != FORMAT_VERSION:
            raise DhkdError(f"store {path} has format version {version}; this tool reads version {FORMAT_VERSION}")
        if not problems:
            return cls(path, objects, group, mode)
        try:
            cache = cls(path, objects, group, mode)
        except DhkdError:  # the metadata does not describe a store to show
            raise DhkdError(metadata_error(path, documents[0]["attributes"], problems)) from None
        cache._metadata_problems = problems
        return cache

    @property
    def path(self) -> str:
        return self._path

    def recorded(self, key: str):
        """The attribute ``key`` that stage 1 records (``policy``, ``teacher``, ...), its type checked
        when the store was opened; a store without it is a one-line error."""
        if key not in self._attrs:
            raise DhkdError(
                f"store {self._path} records no {key}: cache-teacher did not write it, or its metadata was edited; "
                "write it anew with cache-teacher"
            )
        return self._attrs[key]

    @property
    def metadata_problems(self) -> list[str]:
        """How the metadata differs from a logit store's (only a store opened with ``schema=False`` has any)."""
        return list(self._metadata_problems)

    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    @property
    def identity(self) -> dict:
        """What tells this store from another at the same path: the command that wrote it (teacher
        and its weights' digest, data fingerprint, views, seed, codec, ...) and its digest; a
        checkpoint records it, and ``--resume`` compares."""
        command = self._attrs.get("command")
        text = json.dumps(command, sort_keys=True, default=str)
        return {
            "path": self._path,
            "command": jsonable(command),
            "command_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        }

    def check_same_store(self, recorded):
        """Refuses this store when ``recorded`` (the :attr:`identity` a checkpoint saved) names another, or is none."""
        if not isinstance(recorded, dict):  # every checkpoint of a run that reads a store records it
            raise DhkdError(
                f"--resume: the checkpoint records no store, though this run reads {self._path}: it is damaged or "
                "was not written by this tool; start over with --overwrite"
            )
        now = self.identity
        if recorded.get("command_sha256") == now["command_sha256"]:
            return
        old, new = recorded.get("command") or {}, now["command"] or {}
        fields = (
            [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if isinstance(old, dict) and isinstance(new, dict)
            else []
        )
        field = next(
            (k for k in fields if not isinstance(new.get(k), (dict, list))), fields[0] if fields else None
        )  # a plain value first
        differs = f"; {field} was {brief(old.get(field))}, now {brief(new.get(field))}" if field else ""
        raise DhkdError(
            f"--resume: the store is not the one this run started from: it started from {recorded.get('path')} "
            f"(command {recorded.get('command_sha256')}), --cache now holds {now['path']} "
            f"(command {now['command_sha256']})"
            f"{differs}; resume with that store, or start over with --overwrite"
        )

    @property
    def is_local(self) -> bool:
        """On a local (or shared) filesystem, not object storage."""
        return is_local(self._path)

    @property
    def objects(self) -> StoreObjects:
        """The store's objects by key: ``exists``, ``list``, ``size``, ``sizes``, ``read``,
        ``write``, ``delete`` (through Zarr's store API, on disk and on object storage)."""
        return self._objects

    @property
    def labels(self) -> np.ndarray:
        if self._label_cache is None:
            self._label_cache = np.asarray(self.read("labels", (slice(None),)), dtype=np.int64)
        return self._label_cache.copy()

    def update_attrs(self, **kv):
        kv = jsonable(kv)
        try:
            self._group.attrs.update(kv)
        except storage_errors() as e:
            raise DhkdError(f"cannot write to store {self._path}: {one_line(e)}") from None
        self._attrs.update(kv)

    def done_mask(self, listed=None) -> np.ndarray:
        """(epochs, chunks) bools: which chunks are written and final.

        A write unit's ``done`` object is written whole, every flag set, after the unit's data, and
        deleted first when the unit is undone: the units done are those whose object is there. So
        one listing answers (on object storage a LIST page per 1,000 units), not a read per unit.
        ``listed``: the store's keys, already listed (``objects.sizes()``). A flags object whose
        bytes changed still counts as done here; the checksum audit (``inspect``, a resume's
        repair) finds it."""
        done_array = self.array("done")
        if tuple(done_array.chunks) != (1, self.shard_chunks):  # not a unit per object: read the flags
            return self.read("done", (slice(None),)).astype(bool)
        listed = set(self._objects.list("done/")) if listed is None else listed
        flags = self.unit_key_table(("done",))["done"]
        return self.chunk_mask(np.fromiter((key in listed for key in flags), bool, len(flags)).reshape(self.epochs, -1))

    # ---- reading ----------------------------------------------------------------------------

    def read(self, name: str, selection, epoch=None, chunk=None):
        """``selection`` of array ``name``; a missing or damaged object is a one-line error naming
        it (``epoch``, ``chunk``: how the message names the place)."""
        try:
            return self._readers[name][selection]
        except DhkdError:
            raise
        except MissingObject as e:
            where = "not on disk" if self.is_local else "missing from the store"
            raise DhkdError(
                f"store {self._path}: {self.what(e.key)} {where} ({e.key}); the store is incomplete or damaged; "
                f"{self.repair_hint()}"
            ) from None
        except Exception as e:
            where = "" if epoch is None else f" epoch {epoch}" + ("" if chunk is None else f" chunk {chunk}")
            if "checksum" in str(e).lower():  # zarr's crc32c codec: the stored bytes changed
                raise DhkdError(
                    f"store {self._path}: {name}{where} is damaged (checksum mismatch); {self.repair_hint()}"
                ) from None
            raise DhkdError(f"store {self._path}: cannot read {name}{where}: {one_line(e)}") from None

    def repair_hint(self) -> str:
        """How to repair the store: cache-teacher with the command that wrote it (recorded in the
        store) rewrites what is missing or damaged."""
        import shlex

        from dhkd_pipe.terminal_text import escaped, quoted_command

        line = quoted_command(self._attrs.get("command_line"))  # a forged line is never suggested
        return "re-run cache-teacher with the same command to rewrite it" + (
            f": {line} --out {escaped(shlex.quote(self._path))}" if line else ""
        )

    def _epoch_array(self, name: str, epoch: int, dtype):
        key = (name, epoch)
        if key in self._cached:
            self._cached.move_to_end(key)
            return self._cached[key]
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"epoch {epoch} out of range 0..{self.epochs - 1}")
        out = np.asarray(self.read(name, (epoch,), epoch), dtype=dtype)
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
        else None. ``codecs.decode_logits`` turns them into float32 on any device."""
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"epoch {epoch} out of range 0..{self.epochs - 1}")
        start, stop = self.rows(chunk)
        values = self.read("logits", (epoch, slice(start, stop)), epoch, chunk)
        scale = None
        if "logit_scale" in self._readers:
            scale = np.asarray(self.read("logit_scale", (epoch, slice(start, stop)), epoch, chunk), np.float32)
        return values, scale

    def read_chunk_tensors(self, epoch: int, chunk: int):
        """CPU tensors: float16 / bfloat16 / float32 / int8 values, float32 (rows,) scale or None."""
        import torch

        values, scale = self.read_chunk(epoch, chunk)
        return stored_tensor(values), None if scale is None else torch.from_numpy(np.ascontiguousarray(scale))

    def read_rows(self, epoch: int, chunk: int, rows=None, device="cpu"):
        """Dequantised float32 (n, K) logits of rows (indices within the chunk; None = all)."""
        values, scale = self.read_chunk(epoch, chunk)
        if rows is not None:
            idx = np.asarray(rows, dtype=np.int64)
            values = values[idx]
            scale = None if scale is None else scale[idx]
        return decode_logits(values, scale, device)

    # ---- checks and inspection ----------------------------------------------------------------

    def check_complete(self, objects: bool = True):
        """Refuses a store that is not complete: a unit not marked done, or (``objects``) an object
        of a unit marked done that is missing or shorter than a sound one (one listing of the
        store; changed bytes are found by their checksums when read, or by ``inspect``)."""
        from dhkd_pipe.store.audit import damage

        sizes = self._objects.sizes()  # the one listing both checks need
        done = self.done_mask(sizes)
        missing = int((~done).sum())
        if missing:
            epochs = [int(e) for e in np.flatnonzero((~done).any(axis=1))]
            listed = ", ".join(map(str, epochs[:8])) + (", ..." if len(epochs) > 8 else "")
            raise DhkdError(
                f"store {self._path} is incomplete: {missing} of {done.size} chunks not written "
                f"(epochs {listed}); re-run cache-teacher to finish it"
            )
        if objects:
            damaged = damage(self, checksums=False, sizes=sizes)
            if damaged:
                more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
                raise DhkdError(f"store {self._path} is damaged: {damaged[0]}{more}; {self.repair_hint()}")

    def check_matches(self, fingerprint: dict):
        check_fingerprint(self._attrs.get("dataset") or {}, fingerprint)

    def summary(self, sizes: dict | None = None, counted: bool = True) -> dict:
        """What ``inspect`` shows of the store; ``sizes``: its listing (``objects.sizes()``), if the
        caller has it. ``counted=False``: ``sizes`` lists the done flags alone (``inspect --quick``),
        and the bytes on disk are not counted (None)."""
        from dhkd_pipe.processes import describe_holder
        from dhkd_pipe.store.lock import read_holder

        sizes = self._objects.sizes() if sizes is None else sizes
        done = self.done_mask(sizes)
        lock = sizes.get(LOCK_KEY) if counted else (0 if self._objects.exists(LOCK_KEY) else None)
        holder = read_holder(self._objects) if lock is not None else None
        logit_bytes = sum(
            n for key, n in sizes.items() if key.split("/")[0] in ("logits", "logit_scale") and is_chunk_key(key)
        )
        count = self.epochs * self.num_samples * self.num_classes
        logits = self.array("logits")
        return {
            "path": os.path.abspath(local_path(self._path)) if is_local(self._path) else self._path,
            "shape": [self.epochs, self.num_samples, self.num_classes],
            "dtype": codec_named(self.codec).dtype_name,
            "codec": self.codec,
            "chunks": [int(c) for c in logits.chunks],
            "shards": None if logits.shards is None else [int(s) for s in logits.shards],
            "bytes_on_disk": sum(sizes.values()) - (lock or 0) if counted else None,
            "bytes_per_logit": (logit_bytes / count if count else 0.0) if counted else None,
            "complete": f"{int(done.sum())}/{done.size}",
            "writer": None
            if holder is None
            else describe_holder(holder),  # who holds the lock: a cache-teacher run writing it
            "teacher": self._attrs.get("teacher"),
            "dataset": self._attrs.get("dataset"),
            "policy": self._attrs.get("policy"),
            "seed": self._attrs.get("seed"),
            "format_version": self._attrs.get("format_version"),
            "tool_version": self._attrs.get("tool_version"),
        }

    def __repr__(self):
        return f"LogitCache({self._path!r}, {self.epochs}x{self.num_samples}x{self.num_classes}, {self.codec})"
