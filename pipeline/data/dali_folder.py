"""The renderer's private folder: the file table and schedules its workers map, in /dev/shm where
it can (``DaliViews`` makes one per renderer and removes it when closed or collected); the folders
of processes that died without removing theirs are removed by the next renderer."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from dhkd_pipe.processes import pid_alive

FOLDER_PREFIX = "dhkd-dali-"


def private_folder() -> str:
    """``dhkd-dali-PID-XXXX`` in /dev/shm (else the temp folder); first removes the folders of
    processes that died without removing theirs (SIGKILL)."""
    shm = "/dev/shm"
    parent = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    remove_orphan_folders(parent)
    return tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=parent)


def remove_orphan_folders(parent: str) -> list[str]:
    """Removes this user's ``dhkd-dali-PID-*`` folders under ``parent`` whose PID is dead; returns them."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(FOLDER_PREFIX):
            continue
        pid = entry.name[len(FOLDER_PREFIX) :].split("-", 1)[0]
        try:
            if (
                not pid.isdigit()
                or not entry.is_dir(follow_symlinks=False)
                or entry.stat(follow_symlinks=False).st_uid != os.getuid()
            ):
                continue
        except OSError:
            continue
        if pid_alive(int(pid)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def write_file_table(folder: str, files: list[str]):
    """All file paths as one UTF-8 blob plus offsets: workers map them instead of unpickling a list."""
    encoded = [os.path.abspath(p).encode() for p in files]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    np.save(os.path.join(folder, "offsets.npy"), offsets)
    with open(os.path.join(folder, "names.bin"), "wb") as f:
        f.write(b"".join(encoded) or b"\0")  # np.memmap refuses empty files
