"""A training run's folder: what the tool owns in it, what ``--out`` may be, and its life cycle.

A run folder holds ``checkpoint.pt`` (the state a resume starts from), ``metrics.jsonl`` (one line
per finished epoch), the exported student and ``summary.json`` (the run finished), and
``run.lock`` while a process trains in it (``training.run_lock``). Every file is written whole
(``dhkd_pipe.files``), so a kill or a full disk leaves the previous version.

``check_out`` decides, reading only, what a command may do with ``--out``; ``RunFolder.open``
then creates the folder, takes the lock and, for ``--overwrite``, removes the old run's files.

What the tool owns is recorded, never guessed from names or contents: ``dhkd-run.json`` (the
manifest) lists the entries a run claimed when it opened the folder, those of ``RUN_ENTRIES``
that were not there yet. ``--overwrite``, ``--resume``, the clean-up after a run killed before its
first checkpoint, and ``export`` remove, continue or replace only those. A folder without the
manifest is the user's, whatever it holds (a plain PyTorch folder's ``checkpoint.pt``,
``model.pt`` and ``metrics.jsonl`` included), and a run refuses a folder where a file it would
write is there but not claimed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from dhkd_pipe.errors import DhkdError, io_error
from dhkd_pipe.files import append_line, json_safe, json_text, write_atomic, write_json
from dhkd_pipe.training.run_lock import LOCK, RunLock, check_not_held

CHECKPOINT = "checkpoint.pt"
EXPORTED = "model.pt"  # the exported single-head student (exported.py writes it)
EXPORTED_SAFETENSORS = "model.safetensors"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TRACKING_DIR = "dhkd-pipe"  # Accelerate's trackers write under RUN/dhkd-pipe (TensorBoard)
ONNX = "model.onnx"  # `dhkd-pipe export`'s default output
MANIFEST = "dhkd-run.json"  # the entries this tool wrote in the folder
# What a run may write; a run claims (in the manifest) those not already there, and --overwrite
# removes the claimed ones (and their .tmp files), nothing else.
RUN_ENTRIES = (CHECKPOINT, METRICS, SUMMARY, EXPORTED, EXPORTED_SAFETENSORS, ONNX, TRACKING_DIR)


# ---- a run's files: recorded in the manifest, then written whole (``dhkd_pipe.files``) --------------------


def write_run_file(path: str, write: Callable, mode: str = "wb"):
    """``files.write_atomic`` for a file of a run folder: its name joins the run's manifest first."""
    claim_on_write(path)
    write_atomic(path, write, mode)


def write_run_json(path: str, obj, indent: int | None = 2):
    text = json_text(obj, indent)
    write_run_file(path, lambda f: f.write(text), mode="w")


def append_run_line(path: str, line: str):
    """``files.append_line`` for a file of a run folder (``metrics.jsonl``), recorded first."""
    claim_on_write(path)
    append_line(path, line)


def metrics_line(metrics: dict) -> str:
    """One ``metrics.jsonl`` line: strict JSON, a non-finite value written as null."""
    return json.dumps(json_safe(metrics), allow_nan=False)


def write_metrics(out: str, history: list[dict]):
    """Rewrites ``metrics.jsonl`` from the run's history (a resume makes the file match its checkpoint)."""
    text = "".join(metrics_line(m) + "\n" for m in history)
    write_run_file(os.path.join(out, METRICS), lambda f: f.write(text), mode="w")


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


def owned_entries(folder: str, names: set | None = None) -> set[str] | None:
    """The entries of ``folder`` this tool wrote (those its manifest claims), or None if the folder
    holds no run of ours (no manifest of dhkd-pipe): then everything in it is the user's."""
    return read_manifest(folder)


def run_files(folder: str) -> dict[str, str]:
    """{real path: name} of the files a run folder holds that are the run's own (its manifest's
    entries, the manifest and the lock): what ``report`` must never write over, and ``export``
    only over the run's own ``model.onnx``."""
    if not os.path.isdir(folder):
        return {}
    names = (owned_entries(folder) or set()) | {MANIFEST, LOCK}
    return {os.path.realpath(os.path.join(folder, n)): n for n in names}


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
    owned = owned_entries(out, names)
    foreign = names - {LOCK, MANIFEST} - {n + ".tmp" for n in RUN_ENTRIES + (MANIFEST,)} - (owned or set())
    if owned is None and foreign:
        what = f"{len(foreign)} entries it did not write, such as {sorted(foreign)[0]}"
        if resume:
            raise DhkdError(f"--resume: {out} holds no run of dhkd-pipe (no {MANIFEST}; {what}): nothing to continue")
        raise DhkdError(
            f"--out {out} is a folder that holds no run of dhkd-pipe ({what}); "
            "choose a new or empty folder (--overwrite replaces only a run folder)"
        )
    clash = sorted(foreign & (set(RUN_ENTRIES) - {ONNX}))  # a run writes these names: never over the user's
    if clash:
        raise DhkdError(
            f"--out {out} holds {clash[0]}, which dhkd-pipe did not write (its {MANIFEST} does not list it) "
            "and this run would write over; move it away or choose another --out"
        )
    has_checkpoint, finished = CHECKPOINT in names, SUMMARY in names
    if resume:
        if not has_checkpoint:
            raise DhkdError(f"--resume: no {CHECKPOINT} in {out}" + (" (the run there finished)" if finished else ""))
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

    def __init__(self, path: str, lock: RunLock, created: bool):
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
    never what it points to, and of the trackers' folder only the trackers' files (``_clear_tracking``)."""
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
                _clear_tracking(path)
            else:
                os.remove(path)
        except OSError as e:
            raise io_error(path, e, "remove") from None


TRACKER_FILE_PREFIXES = ("events.out.tfevents.",)  # TensorBoard's event files: what trackers write under RUN


def _clear_tracking(path: str):
    """Removes the trackers' files under the folder ``path`` (the run claims the folder when it
    opens, before it knows whether a tracker will write there) and the folders left empty; a file
    of any other name is the user's and stays, with the folders that hold it."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            if name.startswith(TRACKER_FILE_PREFIXES):
                os.remove(os.path.join(root, name))
        for name in dirs:
            _remove_empty(os.path.join(root, name))
    _remove_empty(path)


def _remove_empty(folder: str):
    try:
        os.rmdir(folder)
    except OSError:
        pass
