"""One writer per logit store: the lock object ``<store>/.lock``.

``cache-teacher`` takes the lock before it creates, checks, repairs or writes a store and releases
it when it ends, however it ends (an error, an interrupt); under ``accelerate launch`` the main
process takes it for the whole run (the lock is per run, not per rank). The lock holds its holder's
host, pid, start time and command, and a token that tells this holder's lock from another's.

Taking it is a create-if-absent, atomic where the storage has one:

- local disk (and shared filesystems with POSIX semantics): the lock is written to a private file
  and hard-linked into place (``link`` fails if the name exists), then kept open under ``flock``
  while the holder lives;
- S3: a conditional PUT (``If-None-Match: *``, s3fs's ``mode="create"``); AWS S3, MinIO and moto
  refuse the second writer with 412;
- other fsspec stores: fsspec's ``mode="create"`` where the backend implements it (in-memory: an
  exclusive open); a backend without a conditional write gets "check, then write" (or a plain
  write, if it ignores the mode), and the lock is read back afterwards, so of two racing writers
  at least the later one sees that it lost; two that write within the same moment may both go on.

A lock is stale when its holder is on this host and its pid is dead (or is a zombie, or is another
process started after the lock): it is taken over, atomically where the storage allows (a flock
on the lock file on disk; on S3 a PUT conditional on the stale lock's ETag, ``If-Match``). A lock
whose holder runs on another host cannot be judged from here: it is refused with the holder named,
and ``--break-lock`` takes it over once the user knows that holder is gone.
"""

from __future__ import annotations

import json
import os
import time
import uuid

from dhkd_pipe.errors import DhkdError, one_line
from dhkd_pipe.files import remove_quietly
from dhkd_pipe.processes import HOST, flock_exclusive, held_line, holder_alive, new_holder, parse_holder
from dhkd_pipe.store.objects import StoreObjects, local_root

LOCK_KEY = ".lock"
BREAK_LOCK = "--break-lock"  # the cache-teacher option that takes over a lock judged alive


# ---- who holds it (the rule is processes'; the advice for another host is --break-lock) ---------------


def _held_error(location: str, holder: dict) -> DhkdError:
    return DhkdError(
        held_line(
            f"store {location} is being written by another process",
            holder,
            f"if it is no longer running, run again with {BREAK_LOCK}",
        )
    )


def read_holder(objects: StoreObjects) -> dict | None:
    """The holder of the store's lock, or None if nobody holds it (for ``inspect``)."""
    return parse_holder(objects.read(LOCK_KEY))


# ---- the lock ------------------------------------------------------------------------------------


class StoreLock:
    """The store's lock while this process holds it. :meth:`acquire` takes it; :meth:`release`
    (or leaving the ``with`` block) gives it back."""

    def __init__(self, objects: StoreObjects, backend, holder: dict):
        self.objects, self.backend, self.holder = objects, backend, holder

    @classmethod
    def acquire(cls, objects: StoreObjects, command: str = "", break_lock: bool = False) -> "StoreLock":
        """Takes the lock of the store ``objects`` or raises a one-line DhkdError naming its holder.

        ``break_lock``: take over a lock whose holder cannot be judged dead from here (another
        host), for when the user knows it is gone; a live process on this host is still refused.
        """
        holder = new_holder(command[:300], token=uuid.uuid4().hex)
        data = (json.dumps(holder) + "\n").encode()
        backend = _backend(objects)
        for _ in range(100):
            if backend.create(data):
                if backend.confirm(holder["token"]):
                    return cls(objects, backend, holder)
                current = parse_holder(backend.read())
                raise _held_error(objects.location, current or {"pid": "?", "host": "?"})
            found = backend.read_current()
            if found is None:  # released meanwhile: try again
                continue
            current, version = found
            if current is None:  # empty or garbled: being written, or its writer died mid-write
                if backend.age(version) < 10:
                    time.sleep(0.05)
                    continue
            elif holder_alive(current) and not (break_lock and current.get("host") != HOST):
                raise _held_error(objects.location, current)
            if backend.replace(version, data, current):
                return cls(objects, backend, holder)
            time.sleep(0.02)  # changed under us: look again
        raise DhkdError(f"store {objects.location}: cannot take its lock ({LOCK_KEY}): it keeps changing")

    def release(self):
        """Removes the lock if it is still this holder's (a lock broken by another is left to it)."""
        if self.backend is not None:
            backend, self.backend = self.backend, None
            backend.release(self.holder["token"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _backend(objects: StoreObjects):
    from zarr.storage import FsspecStore

    root = local_root(objects.store)
    if root is not None:
        return _FileLock(root, objects.location)
    if isinstance(objects.store, FsspecStore):
        return _ObjectLock(objects)
    raise DhkdError(f"store {objects.location}: cannot lock a {type(objects.store).__name__}")


class _FileLock:
    """The lock on a local or shared filesystem: hard-link creation, then ``flock`` while held."""

    def __init__(self, root: str, location: str):
        self.root, self.location = root, location
        self.path = os.path.join(root, LOCK_KEY)
        self.fd = -1

    def _fail(self, what: str, e: OSError) -> DhkdError:
        return DhkdError(f"store {self.location}: cannot {what} {LOCK_KEY}: {one_line(e)}")

    def create(self, data: bytes) -> bool:
        try:
            os.makedirs(self.root, exist_ok=True)
        except FileExistsError:
            raise DhkdError(f"store {self.location} is a file, not a store folder") from None
        except OSError as e:
            raise DhkdError(f"store {self.location}: cannot create its folder: {one_line(e)}") from None
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.path)  # fails if the name exists: the atomic create
            except FileExistsError:
                return False
            except (
                FileNotFoundError
            ):  # the holder's clean-up of killed writers' leftovers took our temp file: it is held
                return False
            self.fd = os.open(self.path, os.O_RDWR)
            flock_exclusive(self.fd, block=True)  # a taker may hold it for a moment while it reads us
            return True
        except OSError as e:
            raise self._fail("write", e) from None
        finally:
            remove_quietly(tmp)

    def confirm(self, token: str) -> bool:
        return True  # link() is atomic

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read(65536)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._fail("read", e) from None

    def read_current(self):
        """(holder or None, (inode, mtime) of the current lock file) or None if there is none."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                return parse_holder(f.read(65536)), (st.st_ino, st.st_mtime)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._fail("read", e) from None

    def age(self, version) -> float:
        return time.time() - version[1]

    def replace(self, version, data: bytes, judged: dict | None) -> bool:
        """Takes over the lock file judged stale: under its flock (a live holder keeps it), if it
        is still the file and the holder judged, rewritten in place."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise self._fail("open", e) from None
        keep = False
        try:
            if not flock_exclusive(fd, block=False):  # its process (or a child that inherited the file) lives
                holder = parse_holder(os.pread(fd, 65536, 0)) or judged
                if holder is None:
                    return False
                raise _held_error(self.location, holder)
            if os.fstat(fd).st_ino != version[0] or parse_holder(os.pread(fd, 65536, 0)) != judged:
                return False  # changed between the judgement and the flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            keep = True
            return True
        except OSError as e:
            raise self._fail("take over", e) from None
        finally:
            if keep:
                self.fd = fd
            else:
                os.close(fd)

    def release(self, token: str):
        if self.fd < 0:
            return
        try:
            mine = parse_holder(os.pread(self.fd, 65536, 0)) or {}
            if mine.get("token") == token and os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.remove(self.path)
        except OSError:
            pass  # gone already (the store was removed with it)
        finally:
            os.close(self.fd)
            self.fd = -1


class _ObjectLock:
    """The lock on object storage (fsspec): a conditional create, and on S3 a takeover conditional
    on the stale lock's ETag."""

    def __init__(self, objects: StoreObjects):
        self.objects = objects
        self.fs = objects.store.fs
        self.path = f"{objects.store.path.rstrip('/')}/{LOCK_KEY}"
        self.s3 = "s3" in _protocols(self.fs)

    def _call(self, what: str, coro):
        return self.objects.call(f"{what} {LOCK_KEY}", coro)

    def create(self, data: bytes) -> bool:
        fs, path = self.fs, self.path

        async def put():
            try:
                await fs._pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            except TypeError:  # a backend without conditional writes: check, then write
                if await fs._exists(path):
                    return False
                await fs._pipe_file(path, data)
            except OSError as e:
                if self.s3 and _status(e) == 409:  # ConditionalRequestConflict: another create in flight
                    return False
                raise
            return True

        return bool(self._call("write", put()))

    def confirm(self, token: str) -> bool:
        return (parse_holder(self.read()) or {}).get("token") == token

    def read(self) -> bytes | None:
        fs, path = self.fs, self.path

        async def cat():
            try:
                return await fs._cat_file(path)
            except FileNotFoundError:
                return None

        return self._call("read", cat())

    def read_current(self):
        """(holder or None, (ETag, mtime)) of one version of the lock, or None if there is none."""
        fs, path = self.fs, self.path

        async def current():
            for _ in range(10):
                try:
                    before = await fs._info(path)
                    data = await fs._cat_file(path)
                    after = await fs._info(path)
                except FileNotFoundError:
                    return None
                if before.get("ETag") == after.get("ETag"):  # data is the version the ETag names
                    return parse_holder(data), (after.get("ETag"), _mtime(after))
            return None

        return self._call("read", current())

    def age(self, version) -> float:
        mtime = version[1]
        return 0.0 if mtime is None else time.time() - mtime

    def replace(self, version, data: bytes, judged: dict | None) -> bool:
        fs, path, etag = self.fs, self.path, version[0]

        async def swap():
            if self.s3 and etag:
                try:
                    await fs._pipe_file(path, data, IfMatch=etag)  # only if still the judged version
                except OSError as e:
                    if _status(e) in (409, 412) or "pre-condition" in str(e) or "precondition" in str(e).lower():
                        return False
                    raise
                return True
            # no compare-and-swap here: remove the stale lock, then create ours as above
            await fs._rm_file(path)
            return None

        done = self._call("take over", swap())
        if done is None:
            return self.create(data) and self.confirm(json.loads(data)["token"])
        return bool(done)

    def release(self, token: str):
        try:
            if (parse_holder(self.read()) or {}).get("token") == token:
                self.objects.delete(LOCK_KEY)
        except DhkdError:
            pass  # the lock outlives us; the stale-lock rule clears it


def _protocols(fs) -> tuple:
    inner = getattr(fs, "fs", None) or getattr(fs, "sync_fs", None)  # fsspec's async wrapper
    protocol = getattr(inner or fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _status(e: BaseException) -> int | None:
    response = getattr(e.__cause__, "response", None) or getattr(e, "response", None)
    try:
        return int(response["ResponseMetadata"]["HTTPStatusCode"])
    except (TypeError, KeyError, ValueError):
        return None


def _mtime(info: dict) -> float | None:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if hasattr(value, "timestamp"):
        return value.timestamp()
    return float(value) if isinstance(value, (int, float)) else None
