"""Where a logit store lives: a local folder, or an fsspec URL (``s3://``, ``gs://``, ``file://``,
``memory://``).

Everything the store logic needs from storage goes through Zarr's store API by key
(``zarr.storage.LocalStore`` for local paths, ``zarr.storage.FsspecStore`` for URLs), never
``os.path``, so the same code runs on a local disk, a shared filesystem and object storage.
:class:`StoreObjects` gives that API synchronously, a few small calls (exists, list, size, read,
write, delete) on which the store's checks are built. One exception, for speed: stage 1's writer
threads write a unit's files on a local disk themselves (:func:`write_local_object`, the same
files as the LocalStore's), instead of queueing them on Zarr's one I/O loop. Where a store may be
written at all (not a whole bucket, not inside the command's inputs) is ``targets``'s.

Credentials and endpoints come the usual way, from the environment: for ``s3://`` botocore's chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION``; ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for MinIO, moto or any other
S3-compatible server), for ``gs://`` Google's application default credentials.
"""

from __future__ import annotations

import os
import uuid

from dhkd_pipe.errors import DhkdError, one_line

# What a URL scheme needs installed: the optional extra `pip install "dhkd-pipe[s3]"` brings both.
SCHEME_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
# Object names that are Zarr metadata, not chunk data (v3, and the v2 names zarr probes for).
METADATA_NAMES = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")
# Object storage calls end: a frozen server fails a call within about CONNECT + READ seconds per
# attempt, ATTEMPTS attempts (the command then ends in one line, well within a minute). A slow link
# may need longer reads: DHKD_STORE_CONNECT_TIMEOUT and DHKD_STORE_READ_TIMEOUT (seconds) replace them.
CONNECT_TIMEOUT_S, READ_TIMEOUT_S, ATTEMPTS = 5, 8, 2
TIMEOUT_VARIABLES = {
    "connect_timeout": ("DHKD_STORE_CONNECT_TIMEOUT", CONNECT_TIMEOUT_S),
    "read_timeout": ("DHKD_STORE_READ_TIMEOUT", READ_TIMEOUT_S),
}


def storage_timeouts() -> dict:
    """botocore's ``connect_timeout`` and ``read_timeout`` in seconds: the defaults above, or the
    environment's ``DHKD_STORE_*_TIMEOUT`` (a positive number of seconds, at most an hour)."""
    timeouts = {}
    for key, (variable, default) in TIMEOUT_VARIABLES.items():
        text = os.environ.get(variable, "").strip()
        try:
            value = float(text) if text else float(default)
        except ValueError:
            value = float("nan")
        if not 0 < value <= 3600:  # NaN fails too
            raise DhkdError(f"{variable}={one_line(text, 40)} is not a number of seconds in (0, 3600]")
        timeouts[key] = value
    return timeouts


def is_url(location: str) -> bool:
    """A URL with a scheme (``s3://...``); anything else is a local path."""
    return "://" in str(location)


def is_local(location: str) -> bool:
    return not is_url(location) or str(location).startswith("file://")


def is_bucket_root(location: str) -> bool:
    """A URL naming a whole bucket (``s3://photos``, ``gs://b/``): no store is created there, where
    it would share the bucket with everything else in it."""
    if is_local(location):
        return False
    return "/" not in str(location).split("://", 1)[1].strip("/")


def local_path(location: str) -> str:
    """The filesystem path of a local location (a plain path or a ``file://`` URL)."""
    location = str(location)
    return location[len("file://") :] if location.startswith("file://") else location


def storage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the storage failed" (not a bug): OSError, which s3fs and gcsfs
    raise for most service errors, and the clients' own types where installed."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as HttpClientError

        errors.append(HttpClientError)
    except ImportError:
        pass
    return tuple(errors)


def write_local_object(store, key: str, parts, atomic: bool = True) -> None:
    """Writes object ``key`` (its bytes in ``parts``, one after the other) of a local store (a
    ``LocalStore``) from the calling thread. Writer threads then share the file system's work,
    which Zarr's one I/O loop would take in turn.

    ``atomic``: as Zarr's LocalStore writes one, into a ``*.partial`` file renamed into place, so
    no reader sees half an object and a killed writer leaves only ``*.partial`` files
    (``audit.remove_leftovers`` deletes them). Otherwise into the object's own file, one
    directory operation instead of two (renames cost CPU, more so with several threads renaming in
    the same folders): for a write unit's data objects, which nothing reads
    before the unit's ``done`` flags, written after them and atomically, say it is done. A writer
    killed meanwhile leaves a unit not done, which the resume rewrites. On an error the file is
    removed."""
    if store.read_only:  # as Zarr's own writes refuse
        raise ValueError(f"store {store.root} was opened read-only")
    path = os.path.join(store.root, key)
    target = f"{path}.{uuid.uuid4().hex}.partial" if atomic else path
    try:
        f = open(target, "wb")
    except FileNotFoundError:  # the object's folder is new
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(target, "wb")
    try:
        with f:
            for part in parts:
                f.write(part)
        if atomic:
            os.replace(target, path)
    except BaseException:
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        raise


def open_store(location: str, read_only: bool = True):
    """The Zarr store at ``location``: a ``LocalStore`` for local paths and ``file://`` (wrapped by
    ``bounds.contained``), an ``FsspecStore`` for any other fsspec URL. Nothing is created or contacted yet."""
    from zarr.storage import FsspecStore, LocalStore

    location = str(location)
    if is_local(location):
        from dhkd_pipe.store.bounds import contained

        return contained(LocalStore(local_path(location), read_only=read_only), location)
    scheme = location.split("://", 1)[0]
    try:
        # no listings cache: another process may write the objects this one checks
        options = {"use_listings_cache": False}
        if scheme in ("s3", "s3a"):
            options["config_kwargs"] = {**storage_timeouts(), "retries": {"max_attempts": 1, "mode": "standard"}}
            # one GET per object read: with more, s3fs asks each object's size first (a HEAD) to
            # split a read over 50 MB into parallel ranges, and no object of a store is that large
            options["max_concurrency"] = 1
        store = FsspecStore.from_url(location, read_only=read_only, storage_options=options)
        if hasattr(store.fs, "retries"):
            store.fs.retries = ATTEMPTS  # s3fs retries each call itself (5 by default: minutes on a frozen server)
        return store
    except ImportError:
        package = SCHEME_PACKAGES.get(scheme, f"the fsspec driver for {scheme}://")
        raise DhkdError(f"{scheme}:// stores need {package}: pip install 'dhkd-pipe[s3]'") from None
    except ValueError as e:  # fsspec: "Protocol not known: foo"
        raise DhkdError(f"cannot open {location}: {one_line(e)}") from None


def local_root(store) -> str | None:
    """The folder of a local store (as :func:`open_store` gives it); None for object storage."""
    root = getattr(store, "root", None)
    return None if root is None else os.fspath(root)


def is_chunk_key(key: str) -> bool:
    return key.rsplit("/", 1)[-1] not in METADATA_NAMES


class MissingObject(Exception):
    """A chunk object that should be in the store is not (Zarr would read its fill value)."""

    def __init__(self, key: str):
        super().__init__(f"object {key} is missing")
        self.key = key


def require_objects(store):
    """``store`` wrapped so that reading a chunk object that is not there raises
    :class:`MissingObject` instead of returning nothing (which Zarr turns into zeros).

    Costs no extra request: the check is on the answer of the read itself. Metadata reads keep
    their "absent" answer, since Zarr probes for names that need not exist.
    """
    from zarr.storage import WrapperStore

    class RequiredObjects(WrapperStore):
        async def get(self, key, prototype=None, byte_range=None):
            value = await self._store.get(key, prototype, byte_range)
            if value is None and is_chunk_key(key):
                raise MissingObject(key)
            return value

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            values = await self._store.get_partial_values(prototype, key_ranges)
            for (key, _), value in zip(key_ranges, values, strict=True):
                if value is None and is_chunk_key(key):
                    raise MissingObject(key)
            return values

    return RequiredObjects(store)


class StoreObjects:
    """The objects of one store, by key (``"logits/c/0/3"``), through Zarr's store API.

    Small synchronous calls for checks built on the store (missing chunks, sizes, half-created
    stores, overwrite, locks and repairs): each runs on Zarr's I/O event loop, where Zarr's own
    reads and writes of the same store run. Errors of the storage itself (no such bucket, access
    denied, disk full) become one-line ``DhkdError``s that name the store.
    """

    def __init__(self, store, location: str):
        self.store, self.location = store, str(location)

    def call(self, what: str, coro):
        """Runs ``coro`` (an I/O coroutine on this store) on Zarr's loop; a storage error becomes a
        DhkdError: ``store URL: cannot <what>: <reason>``."""
        from zarr.core.sync import sync

        try:
            return sync(coro)
        except DhkdError:
            raise
        except Exception as e:  # the storage's own errors (OSError, botocore, aiohttp ...)
            hint = (
                " (check the credentials for this store)"
                if isinstance(e, PermissionError) and is_url(self.location)
                else ""
            )
            raise DhkdError(f"store {self.location}: cannot {what}: {one_line(e)}{hint}") from None

    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key`` (a key that only prefixes other objects, a
        "folder", is not one; fsspec's own ``exists`` would say it is)."""
        from zarr.storage import FsspecStore

        store = self.store

        async def is_object():
            if isinstance(store, FsspecStore):
                try:
                    info = await store.fs._info(f"{store.path.rstrip('/')}/{key}")
                except FileNotFoundError:
                    return False
                return info.get("type") == "file"
            return await store.exists(key)

        return bool(self.call(f"check {key}", is_object()))

    def list(self, prefix: str = "") -> list[str]:
        """Keys of all objects under ``prefix`` (a folder-like prefix: ``"logits/"``), sorted."""

        async def collect():
            return [key async for key in self.store.list_prefix(prefix)]

        return sorted(self.call(f"list {prefix or 'the store'}", collect()))

    def is_file(self) -> bool:
        """Whether the location is a local file, not a folder (no store can be there)."""
        root = local_root(self.store)
        return root is not None and os.path.exists(root) and not os.path.isdir(root)

    def entries(self) -> list[str]:
        """Names directly under the store's root: objects and "folders" (``zarr.json``, ``logits``)."""

        async def collect():
            return [name.rstrip("/") async for name in self.store.list_dir("")]

        return sorted(set(self.call("list the store", collect())))

    def is_empty(self, ignore: tuple[str, ...] = ()) -> bool:
        """Whether no object is under the store's root but those named in ``ignore`` (top-level
        names, such as the lock); a local root that is a file is not empty."""
        if self.is_file():
            return False
        if self.call("list the store", self.store.is_empty("")):  # (a missing bucket fails here)
            return True
        return bool(ignore) and not set(self.entries()) - set(ignore)

    def size(self, key: str) -> int:
        """Bytes of object ``key`` (FileNotFoundError inside: a DhkdError)."""
        return int(self.call(f"read the size of {key}", self.store.getsize(key)))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: bytes} of every object under ``prefix``: one listing on object storage (a LIST
        answers with the sizes, a page per 1,000 keys), one walk of the folders on a local disk
        (``bounds.local_sizes``, which refuses what no store holds), ``getsize`` of each listed key elsewhere."""
        from zarr.storage import FsspecStore

        from dhkd_pipe.store.bounds import local_sizes

        store, root = self.store, local_root(self.store)
        if root is not None:
            try:
                return local_sizes(root, self.location, prefix)
            except OSError as e:
                raise DhkdError(f"store {self.location}: cannot list {prefix or 'the store'}: {one_line(e)}") from None

        async def listed():
            if isinstance(store, FsspecStore) and hasattr(store.fs, "_find"):
                root = store.path.rstrip("/") + "/"
                found = await store.fs._find(root + prefix, detail=True, withdirs=False)
                return {
                    path.removeprefix(root): int(info["size"])
                    for path, info in found.items()
                    if info.get("size") is not None
                }
            return {key: int(await store.getsize(key)) async for key in store.list_prefix(prefix)}

        return self.call(f"list {prefix or 'the store'}", listed())

    def read(self, key: str) -> bytes | None:
        """The bytes of object ``key``, or None if there is no such object."""
        from zarr.core.buffer import default_buffer_prototype

        value = self.call(f"read {key}", self.store.get(key, prototype=default_buffer_prototype()))
        return None if value is None else value.to_bytes()

    def write(self, key: str, data: bytes):
        """Writes object ``key`` whole (one PUT on object storage, write-and-rename on disk)."""
        from zarr.core.buffer import default_buffer_prototype

        self.call(f"write {key}", self.store.set(key, default_buffer_prototype().buffer.from_bytes(bytes(data))))

    def delete(self, key: str):
        """Deletes object ``key`` (nothing happens if it is not there)."""
        self.call(f"delete {key}", self.store.delete(key))

    def remove_empty_root(self):
        """Removes a local store's folder if it is empty (object storage has no empty folders)."""
        root = local_root(self.store)
        if root is not None:
            try:
                os.rmdir(root)
            except OSError:
                pass

    def delete_all(self, keep: tuple[str, ...] = (), only: tuple[str, ...] | None = None):
        """Deletes every object of the store, and nothing outside it; ``keep``: top-level objects
        to leave (the lock of the process that replaces the store); ``only``: the top-level names
        the store's owner wrote (anything else there is left as it is)."""
        if not keep and only is None:
            self.call("delete the store", self.store.delete_dir(""))
            return
        for name in self.entries():
            if name in keep or (only is not None and name not in only):
                continue
            if self.exists(name):
                self.delete(name)
            else:
                self.call(f"delete {name}", self.store.delete_dir(name))
