"""What DALI's Python worker processes run: the parallel external sources that read each
position's encoded file and its recorded box (one view per sample for ``train_batches``, one image
with all its views for ``image_batches``), the box arithmetic of region decodes, and the watch that
ends a worker with its parent. Spawned workers import this module to unpickle the sources, so it
imports neither torch nor DALI: a worker starts in a second."""

from __future__ import annotations

import io
import os

import numpy as np

from dhkd_pipe.data.dali_requests import ScheduleReader

FILLER_SIZE = 8  # side of the black JPEG that pads a request to whole pipeline batches


def filler_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (FILLER_SIZE, FILLER_SIZE), (0, 0, 0)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def decode_box(y: int, x: int, h: int, w: int, height: int, width: int):
    """Splits a box into the region of the image to decode and where the box starts in it.

    Returns ``(region_start, region_shape, box_start)`` as (row, col) pairs: the region is the
    box clipped to the image (at least 1 x 1 at the nearest edge when the box misses the image
    entirely, so there is always something to decode), and ``box_start`` is the box's top-left
    corner relative to the region (negative where the box reaches above or left of the image).
    """
    ry = min(max(y, 0), height - 1)
    rx = min(max(x, 0), width - 1)
    rh = min(max(y + h, ry + 1), height) - ry
    rw = min(max(x + w, rx + 1), width) - rx
    return (ry, rx), (rh, rw), (y - ry, x - rx)


class _EncodedFiles:
    """What both sources share: the file table and schedules of a ``DaliViews`` folder, read in a
    worker; pickles small (the folder's name, the filler, the parent pid)."""

    name = ""

    def __init__(self, folder: str, filler: bytes, parent: int | None = None):
        self.folder, self.filler = folder, filler
        self.parent = os.getpid() if parent is None else parent
        self._files = self._names = None
        self._schedule = ScheduleReader(folder, self.name)

    def __getstate__(self):
        return {"folder": self.folder, "filler": self.filler, "parent": self.parent}

    def __setstate__(self, state):
        # unpickled in a spawned DALI worker, before it serves anything
        _EncodedFiles.__init__(self, state["folder"], state["filler"], state.get("parent"))
        if os.getpid() != self.parent:
            die_with_parent(self.parent)

    def path(self, index: int) -> str:
        if self._files is None:
            self._files = np.load(os.path.join(self.folder, "offsets.npy"), mmap_mode="r")
            self._names = np.memmap(os.path.join(self.folder, "names.bin"), dtype=np.uint8, mode="r")
        a, b = int(self._files[index]), int(self._files[index + 1])
        return self._names[a:b].tobytes().decode()

    def encoded(self, f: int) -> tuple[bytes, str | None]:
        if f < 0:
            return self.filler, None
        path = self.path(f)
        with open(path, "rb") as fh:
            return fh.read(), path


class EncodedViewSource(_EncodedFiles):
    """Parallel external source of ``train_batches``, one view per sample.

    Schedule row: file index, y, x, h, w, flip. Outputs: encoded bytes (uint8); then for
    ``regions`` the region start and shape, the box start relative to the region (int32 (2,)
    each, rows then cols), else the box start (int32 (2,)); the box shape (int32 (2,)); flip
    (int32 scalar).
    """

    name = "views"

    def __init__(self, folder: str, filler: bytes, parent: int | None = None, regions: bool = True):
        super().__init__(folder, filler, parent)
        self.regions = regions

    def __getstate__(self):
        return {**super().__getstate__(), "regions": self.regions}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.regions = state["regions"]

    def __call__(self, info):
        f, y, x, h, w, flip = (int(v) for v in self._schedule.row(info))
        encoded, path = self.encoded(f)
        box = (np.array((h, w), dtype=np.int32), np.array(flip, dtype=np.int32))
        if not self.regions:
            return (np.frombuffer(encoded, dtype=np.uint8), np.array((y, x), dtype=np.int32)) + box
        height, width = _header_size(encoded, path) if path else (FILLER_SIZE, FILLER_SIZE)
        start, shape, box_start = decode_box(y, x, h, w, height, width)
        return (
            np.frombuffer(encoded, dtype=np.uint8),
            np.array(start, dtype=np.int32),
            np.array(shape, dtype=np.int32),
            np.array(box_start, dtype=np.int32),
        ) + box


class EncodedImageSource(_EncodedFiles):
    """Parallel external source of ``image_batches``, one image with all its views per sample.

    Schedule row: file index, then V views (y, x, h, w, flip). Outputs: encoded bytes (uint8)
    and the views, int32 (V, 5).
    """

    name = "images"

    def __call__(self, info):
        row = self._schedule.row(info)
        encoded, _ = self.encoded(int(row[0]))
        return np.frombuffer(encoded, dtype=np.uint8), np.array(row[1:], dtype=np.int32).reshape(-1, 5)


def _header_size(encoded: bytes, path: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded)) as im:
            width, height = im.size
    except Exception as e:  # reported to the main process, which names the file in a DhkdError
        raise ValueError(f"cannot read the image header of {path}: {e}") from None
    return height, width


def die_with_parent(parent: int):
    """Makes this worker process end when its parent dies, however the parent dies (SIGKILL too).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a watchdog thread polls the parent pid.
    SIGINT is ignored: a Ctrl-C reaches the whole process group, and the parent decides (it stops
    the workers), so a worker never prints a KeyboardInterrupt traceback of its own.
    """
    import signal
    import sys
    import threading
    import time

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before the prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()
