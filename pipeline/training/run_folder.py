"""A training run's folder: what it holds, one writer at a time, and no half-written file.

A run folder holds ``checkpoint.pt`` (the state a resume starts from), ``metrics.jsonl`` (one line
per finished epoch), the exported student and ``summary.json`` (the run finished), and
``run.lock`` while a process trains in it. Every file is written to ``NAME.tmp`` and renamed, so a
kill or a full disk leaves the previous version; the environment's write errors (ENOSPC, EACCES,
EROFS, ...) become one ``DhkdError`` naming the path and the errno.

``check_out`` decides, reading only, what a command may do with ``--out``; ``RunFolder.open``
then creates the folder, takes the lock and, for ``--overwrite``, removes the old run's files.

What the tool owns is recorded, not guessed from names: ``dhkd-run.json`` (the manifest) lists the
entries a run claimed when it opened the folder, those of ``RUN_ENTRIES`` that were not there
yet. ``--overwrite``, the clean-up after a run killed before its first checkpoint, and ``export``
remove or replace only those; a folder without a manifest is a run only if it holds a run's
checkpoint or summary as this tool writes them (runs from before the manifest), and a folder of
other files (a ``metrics.jsonl`` of the user's own) is never one.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from dhkd_pipe.errors import DhkdError, io_error
from dhkd_pipe.processes import HOST, describe_holder, flock_exclusive, holder_alive

CHECKPOINT = "checkpoint.pt"
EXPORTED = "model.pt"  # the exported single-head student (exported.py writes it)
EXPORTED_SAFETENSORS = "model.safetensors"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOCK = "run.lock"
TRACKING_DIR = "dhkd-pipe"  # Accelerate's trackers write under RUN/dhkd-pipe (TensorBoard)
ONNX = "model.onnx"  # `dhkd-pipe export`'s default output
MANIFEST = "dhkd-run.json"  # the entries this tool wrote in the folder
# What a run may write; a run claims (in the manifest) those not already there, and --overwrite
# removes the claimed ones (and their .tmp files), nothing else.
RUN_ENTRIES = (CHECKPOINT, METRICS, SUMMARY, EXPORTED, EXPORTED_SAFETENSORS, ONNX, TRACKING_DIR)


# ---- files written whole ------------------------------------------------------------------------


def write_atomic(path: str, write: Callable, mode: str = "wb"):
    """Writes ``path`` through ``write(file)`` into ``path.tmp``, flushes it to disk and renames it.

    An OSError (full disk, no permission, read-only file system) is a DhkdError naming the path and
    the errno; on any failure or interrupt the ``.tmp`` file is removed and ``path`` is untouched.
    """
    claim_on_write(path)
    tmp = path + ".tmp"
    # serialised in memory first: a full disk then fails the plain write below with its errno
    # (torch's zip writer reports a failed write as a RuntimeError about positions)
    buffer = io.BytesIO() if "b" in mode else io.StringIO()
    try:
        write(buffer)
        with open(tmp, mode) as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise io_error(path, e) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def json_safe(value):
    """``value`` with non-finite floats as None: strict JSON (``json.dumps(allow_nan=False)``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str, obj, indent: int | None = 2):
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False, default=str)
    write_atomic(path, lambda f: f.write(text + "\n"), mode="w")


def append_line(path: str, line: str):
    """Appends one line; on an OSError the file is cut back to its old length (no partial line)."""
    claim_on_write(path)
    try:
        with open(path, "a") as f:
            start = f.tell()
            try:
                f.write(line.rstrip("\n") + "\n")
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                f.truncate(start)
                raise
    except OSError as e:
        raise io_error(path, e) from None


def metrics_line(metrics: dict) -> str:
    """One ``metrics.jsonl`` line: strict JSON, a non-finite value written as null."""
    return json.dumps(json_safe(metrics), allow_nan=False)


def write_metrics(out: str, history: list[dict]):
    """Rewrites ``metrics.jsonl`` from the run's history (a resume makes the file match its checkpoint)."""
    text = "".join(metrics_line(m) + "\n" for m in history)
    write_atomic(os.path.join(out, METRICS), lambda f: f.write(text), mode="w")


def _remove_quietly(path: str):
    try:
        os.remove(path)
    except OSError:
        pass


# ---- what the tool owns in a run folder -----------------------------------------------------------


def read_manifest(folder: str) -> set[str] | None:
    """The entries the manifest of ``folder`` claims, or None if it has none (or not ours)."""
    path = os.path.join(folder, MANIFEST)
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > 65536:
            return None
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and data.get("tool") == "dhkd-pipe" and isinstance(data.get("entries"), list)):
        return None
    return {name for name in data["entries"] if isinstance(name, str) and name in RUN_ENTRIES}


def _is_legacy_run(folder: str, names: set) -> bool:
    """A run written before the manifest: a checkpoint as torch saves it (a zip) beside the run's
    metrics or summary, or a summary that records the run's config."""
    import zipfile

    if SUMMARY in names:
        try:
            with open(os.path.join(folder, SUMMARY), encoding="utf-8") as f:
                if isinstance(summary := json.load(f), dict) and isinstance(summary.get("config"), dict):
                    return True
        except (OSError, ValueError):
            pass
    path = os.path.join(folder, CHECKPOINT)
    return bool(names & {METRICS, SUMMARY}) and os.path.isfile(path) and zipfile.is_zipfile(path)


def owned_entries(folder: str, names: set | None = None) -> set[str] | None:
    """The entries of ``folder`` this tool wrote (claimed in its manifest; for a run from before
    the manifest, those of ``RUN_ENTRIES`` present), or None if the folder holds no run of ours."""
    if names is None:
        try:
            names = set(os.listdir(folder))
        except OSError:
            return None
    claimed = read_manifest(folder)
    if claimed is not None:
        return claimed
    if _is_legacy_run(folder, names):
        return set(RUN_ENTRIES) & names
    return None


def run_files(folder: str) -> dict[str, str]:
    """{real path: name} of the files a run folder holds that are the run's own (its manifest's
    entries, the manifest and the lock, or for a run from before the manifest the names a run
    writes): what ``export`` and ``report`` must never write over."""
    if not os.path.isdir(folder):
        return {}
    owned = owned_entries(folder) or set()
    names = owned | {MANIFEST, LOCK} | (set(RUN_ENTRIES) - {ONNX} if read_manifest(folder) is None else set())
    return {os.path.realpath(os.path.join(folder, n)): n for n in names if n != ONNX or n in owned}


_PENDING: dict[str, set] = {}  # real path of a run folder this process opened -> entries to claim with its first write


def claim_on_write(path: str):
    """Before a run's file is written: its name joins the manifest of the run folder it is in (a
    folder this tool opened as a run; any other folder is left alone)."""
    folder, name = os.path.split(path)
    folder = folder or "."
    if name not in RUN_ENTRIES:
        return
    pending = _PENDING.get(os.path.realpath(folder))
    if pending is not None:
        claim(folder, pending | {name})
        pending.clear()
        return
    claimed = read_manifest(folder)
    if claimed is not None and name not in claimed:
        claim(folder, [name])


def claim(folder: str, names, force: bool = False) -> set[str]:
    """Adds ``names`` to the manifest (written whole; ``force``: written even if it claims nothing
    new, so that a run folder always has one); returns what it now claims."""
    before = read_manifest(folder)
    entries = (before or set()) | set(names)
    if entries == before and (before is not None or not force):
        return entries  # unchanged: not rewritten (a refused resume leaves the folder byte for byte)
    write_json(os.path.join(folder, MANIFEST), {"tool": "dhkd-pipe", "entries": sorted(entries)})
    return entries


def check_inputs_outside(plan: "OutPlan", inputs: dict):
    """Refuses an input of the command (``{option: path}``: weights, config, store, data) that lies
    inside what this run would remove from ``--out`` (``--overwrite``, or a killed run's
    clean-up), before anything is touched."""
    if not (plan.exists and plan.replace):
        return
    owned = owned_entries(plan.path) or set()
    removed = [os.path.realpath(os.path.join(plan.path, name)) for name in owned]
    for option, path in inputs.items():
        if not path or "://" in str(path):
            continue
        path = (
            str(path).split(":", 1)[1]
            if str(path).startswith(("imagefolder:", "cifar10:", "cifar100:", "mnist:", "fashion-mnist:"))
            else str(path)
        )
        real = os.path.realpath(path.split("@", 1)[0])
        for target in removed:
            if real == target or real.startswith(target + os.sep):
                how = "--overwrite" if plan.mode is RunMode.OVERWRITE else "the clean-up of the run killed there"
                raise DhkdError(
                    f"{option} {path} lies inside what {how} would remove from {plan.path} "
                    f"({os.path.basename(target)}); copy it elsewhere first"
                )


# ---- what --out may be ----------------------------------------------------------------------------


class RunMode(str, Enum):
    """What a training command does with the run in ``--out``: start one where none is (``new``),
    continue it (``resume``, ``--resume``) or replace it (``overwrite``, ``--overwrite``)."""

    NEW = "new"
    RESUME = "resume"
    OVERWRITE = "overwrite"

    @classmethod
    def from_flags(cls, resume: bool, overwrite: bool) -> "RunMode":
        """The mode the CLI's ``--resume`` / ``--overwrite`` flags ask for (at most one)."""
        if resume and overwrite:
            raise DhkdError("--resume continues the run in --out and --overwrite replaces it: choose one")
        return cls.RESUME if resume else cls.OVERWRITE if overwrite else cls.NEW


@dataclass
class OutPlan:
    """What ``check_out`` found: the folder, whether it exists, and whether an old run's files are
    to be removed before this one starts (``--overwrite``, or a run killed before its first
    checkpoint, which holds nothing to resume); ``mode`` as asked."""

    path: str
    exists: bool
    replace: bool
    mode: RunMode = RunMode.NEW


def check_out(out: str, mode: RunMode | str = RunMode.NEW, locked: bool = False) -> OutPlan:
    """Refuses what must not happen to ``--out``, before anything is written (reads only).

    ``locked``: this process holds the folder's lock (the check is repeated under it).
    """
    mode = RunMode(mode)
    resume, overwrite = mode is RunMode.RESUME, mode is RunMode.OVERWRITE
    if not out:
        raise DhkdError("--out is empty: name a run folder")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise DhkdError(
            f"--out {out} is a file, not a run folder; choose another --out "
            "(--overwrite replaces only a run folder, never a file)"
        )
    if not os.path.isdir(out):
        if resume:
            raise DhkdError(f"--resume: {out} does not exist, so there is no run to continue")
        _check_creatable(out)
        return OutPlan(out, exists=False, replace=False, mode=mode)
    try:
        names = set(os.listdir(out))
    except OSError as e:
        raise io_error(out, e, "read") from None
    if locked:
        names.discard(LOCK)
    elif LOCK in names:
        check_not_held(out)
    plan = OutPlan(out, exists=True, replace=False, mode=mode)
    has_checkpoint, finished = CHECKPOINT in names, SUMMARY in names
    owned = owned_entries(out, names)
    foreign = names - {LOCK, MANIFEST} - {n + ".tmp" for n in RUN_ENTRIES + (MANIFEST,)} - (owned or set())
    if resume:
        if not has_checkpoint:
            raise DhkdError(f"--resume: no {CHECKPOINT} in {out}" + (" (the run there finished)" if finished else ""))
    elif owned is None and foreign:
        raise DhkdError(
            f"--out {out} is a folder that holds no run of dhkd-pipe ({len(foreign)} entries it did not write, "
            f"such as {sorted(foreign)[0]}); choose a new or empty folder (--overwrite replaces only a run folder)"
        )
    elif has_checkpoint or finished:
        if not overwrite:
            raise DhkdError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        plan.replace = True
    else:  # empty, or a run killed before its first checkpoint: nothing in it can be resumed
        plan.replace = bool(names - foreign)
    check_writable(out)
    return plan


def _check_creatable(out: str):
    existing = os.path.abspath(out)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DhkdError(f"cannot create {out}: {existing} is a file")
    check_writable(existing, out)


def check_writable(folder: str, out: str | None = None):
    """Refuses a folder on a read-only file system or without write permission (for ``out`` in it)."""
    out = out or folder
    if _read_only(folder):
        raise DhkdError(f"cannot write to {out}: {folder} is on a read-only file system (EROFS)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DhkdError(f"cannot write to {out}: {folder} is not writable (EACCES)")


def _read_only(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


# ---- the folder and its lock ------------------------------------------------------------------------


class RunFolder:
    """An open run folder: created (or found), locked, and cleared of a replaced run's files.

    ``close(failed)`` releases the lock; a folder this process created, whose run failed before its
    first checkpoint, is removed again (it holds nothing to resume).
    """

    def __init__(self, path: str, lock: "RunLock", created: bool):
        self.path, self.lock, self.created = path, lock, created

    @classmethod
    def open(cls, plan: OutPlan, command: str = "") -> "RunFolder":
        created = False
        if not plan.exists:
            try:
                os.makedirs(plan.path)
                created = True
            except FileExistsError:  # another process made it meanwhile; the lock decides
                if not os.path.isdir(plan.path):
                    raise DhkdError(f"--out {plan.path} is a file, not a run folder; choose another --out") from None
            except OSError as e:
                raise io_error(plan.path, e, "create") from None
        try:
            lock = RunLock.acquire(plan.path, command)
        except BaseException:
            if created:
                _remove_empty(plan.path)
            raise
        folder = cls(plan.path, lock, created)
        try:
            if not created:  # the folder may have changed while this process checked its inputs
                if check_out(plan.path, plan.mode, locked=True).replace:
                    remove_run_files(plan.path)
                else:
                    remove_run_files(plan.path, only_tmp=True)  # a killed writer's half-written files
            present = set(os.listdir(plan.path))
            # the manifest holds what this run already owns and the trackers' folder (Accelerate writes it); every
            # file joins as it is first written (claim_on_write). A resume writes it with its first file: a refused
            # resume leaves the folder as it was.
            start = (owned_entries(plan.path, present) or set()) | ({TRACKING_DIR} - present)
            if plan.mode is RunMode.RESUME:
                _PENDING[os.path.realpath(plan.path)] = start
            else:
                claim(plan.path, start, force=True)
        except BaseException:
            folder.close()
            raise
        return folder

    def close(self, failed: bool = False):
        """Releases the lock; after a failure before the first checkpoint, removes what this run made."""
        _PENDING.pop(os.path.realpath(self.path), None)
        if failed and not os.path.exists(os.path.join(self.path, CHECKPOINT)):
            remove_run_files(self.path, manifest=True)
        self.lock.release()
        if failed and self.created:
            _remove_empty(self.path)


def remove_run_files(folder: str, only_tmp: bool = False, manifest: bool = False):
    """Removes the entries this tool wrote in ``folder`` (its manifest's) and their ``.tmp`` files
    (``only_tmp``: just those); ``manifest``: the manifest too. Nothing else: a link is removed,
    never what it points to."""
    owned = owned_entries(folder) or set()
    for name in os.listdir(folder):
        base = name[: -len(".tmp")] if name.endswith(".tmp") else name
        if base == MANIFEST:
            if not manifest and base == name:
                continue
        elif base not in owned or (only_tmp and base == name):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError as e:
            raise io_error(path, e, "remove") from None


def _remove_empty(folder: str):
    try:
        os.rmdir(folder)
    except OSError:
        pass


class RunLock:
    """``run.lock``: one process trains in a run folder at a time.

    The file is created with ``O_CREAT | O_EXCL`` and names its holder (host, pid, start time,
    command); the holder keeps it open under ``flock`` while the run lives. A lock is stale when
    its holder is on this host and its pid is dead (or is a zombie, or belongs to a process started
    after the lock): it is taken over, under ``flock`` so two takers cannot both win. A lock held
    on another host, or by a live process, is refused with the holder named and how to clear it.
    A process that already holds a folder's lock takes it again (stages run one after another).
    """

    _held: dict[str, "RunLock"] = {}  # realpath -> the lock this process holds

    def __init__(self, path: str, fd: int, holder: dict):
        self.path, self.fd, self.holder, self.count = path, fd, holder, 1

    @classmethod
    def acquire(cls, folder: str, command: str = "") -> "RunLock":
        path = os.path.join(folder, LOCK)
        key = os.path.realpath(path)
        mine = cls._held.get(key)
        if mine is not None and mine._still_mine():
            mine.count += 1
            return mine
        cls._held.pop(key, None)
        holder = {"host": HOST, "pid": os.getpid(), "started": time.time(), "command": command}
        for _ in range(100):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                fd = _take_over(path)
                if fd is None:  # changing under us: look again
                    time.sleep(0.02)
                    continue
            except OSError as e:
                raise io_error(path, e, "create") from None
            else:
                flock_exclusive(fd)
            try:
                data = (json.dumps(holder) + "\n").encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            except OSError as e:
                os.close(fd)
                _remove_quietly(path)
                raise io_error(path, e) from None
            lock = cls(path, fd, holder)
            cls._held[key] = lock
            return lock
        raise DhkdError(f"cannot take {path}: it keeps changing; is another run starting in {folder}?")

    def _still_mine(self) -> bool:
        try:
            return self.fd >= 0 and os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False

    def release(self):
        self.count -= 1
        if self.count > 0 or self.fd < 0:
            return
        if self._still_mine():
            _remove_quietly(self.path)
        os.close(self.fd)
        self.fd = -1
        type(self)._held.pop(os.path.realpath(self.path), None)


def _read_holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode())
        if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
            return holder
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return None


def _take_over(path: str) -> int | None:
    """An fd of the existing lock if it is stale (flocked, to be rewritten by the caller); None if
    it changed meanwhile; raises DhkdError if it is held."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise io_error(path, e, "open") from None
    try:
        holder = _read_holder(fd)
        if not flock_exclusive(fd):  # a live holder keeps it under flock
            if holder is None:
                os.close(fd)
                return None  # being written
            raise _held_error(path, holder)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            os.close(fd)
            return None  # replaced meanwhile
        holder = _read_holder(fd)
        if holder is None:
            if time.time() - os.fstat(fd).st_mtime < 2:
                os.close(fd)
                return None  # its creator is about to write it
            return fd  # an empty or garbled lock whose writer is gone
        if holder_alive(holder):
            raise _held_error(path, holder)
        return fd
    except FileNotFoundError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


def check_not_held(folder: str):
    """Refuses a folder whose lock a live process (not this one) holds: a clear line before any work."""
    path = os.path.join(folder, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        holder = _read_holder(fd)
    finally:
        os.close(fd)
    if (
        holder is not None
        and not (holder.get("host") == HOST and holder["pid"] == os.getpid())
        and holder_alive(holder)
    ):
        raise _held_error(path, holder)


def _held_error(path: str, holder: dict) -> DhkdError:
    folder = os.path.dirname(path)
    if holder.get("host") == HOST:
        how = f"wait for it to finish or stop it (kill {holder['pid']})"
    else:
        how = f"wait for it to finish; if it is gone, remove {path}"
    return DhkdError(f"{folder} is in use by another run: {describe_holder(holder)}; {how}")
