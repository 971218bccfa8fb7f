"""The DALI replay pipeline: renders recorded views of encoded images, shared by both stages.

Stage 1 (the teacher) and stage 2 (the student) render through the same ``DaliViews``, so the
teacher saw exactly the student's pixels. Per view ``(y, x, h, w, flip)`` (``views.py``: the box in
source pixels, possibly reaching past the image):

1. a parallel external source (``EncodedViewSource``, run by Python worker processes) reads the
   file's encoded bytes and its header size, and splits the box into the part inside the image
   (the region to decode) and where that region sits in the box;
2. ``decoders.image_slice`` decodes only that region (``mixed``: nvJPEG on the GPU; ``cpu``:
   libjpeg-turbo);
3. ``slice`` with ``out_of_bounds_policy="pad"`` puts the region back into the whole box, zeros
   outside the image (``image_slice`` itself refuses windows outside the image);
4. ``resize`` to R x R (the plan's interpolation, antialiased: ``DALI_INTERPOLATION``), then
   ``crop_mirror_normalize`` mirrors by the flip bit, normalises with the plan's mean/std x 255
   and writes CHW float32.

Every operator is per sample, so a view's pixels never depend on the batch it is rendered in.

How requests reach the workers: the workers are started once, so each request (one call of
``train_batches`` or ``val_batches``) is one DALI epoch whose positions are written to a
schedule file in a private folder (``/dev/shm`` where it exists) that the workers map read-only;
``SampleInfo.epoch_idx`` names the file and ``idx_in_epoch`` the row. The schedule is padded
with a tiny filler image to whole pipeline batches, and its first row holds the row count, which
the main process sets to 0 to end an abandoned request early.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import weakref

import numpy as np

from .errors import DhkdError
from .processes import pid_alive

# Spawned DALI workers import this module to unpickle ``EncodedViewSource``; torch and DALI's
# graph API are imported inside the functions that need them so the workers start in a second.

DALI_INTERPOLATION = {"bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC"}
"""Box -> R x R resampling per ``ViewPlan.interpolation``: the DALI filter, with ``antialias=True``
(the filter widened by the scale factor when shrinking), the counterpart of torch's
``interpolate(mode=..., antialias=True, align_corners=False)`` used by ``render_reference`` and by
the in-memory renderer."""

DALI_IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000")

_SCHEDULE_COLUMNS = 6  # file index (-1: filler), y, x, h, w, flip
_FILLER_SIZE = 8


def _filler_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (_FILLER_SIZE, _FILLER_SIZE), (0, 0, 0)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


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


class EncodedViewSource:
    """Parallel external source, one sample per call: the encoded file and its view's geometry.

    Outputs: encoded bytes (uint8), region start and shape (int32 (2,), rows then cols), box start
    relative to the region and box shape (int32 (2,)), flip (int32 scalar). Holds only the folder
    of its file table and schedules, so it pickles small for spawned workers.
    """

    def __init__(self, folder: str, filler: bytes, parent: int | None = None):
        self.folder, self.filler = folder, filler
        self.parent = os.getpid() if parent is None else parent
        self._files = self._names = None
        self._epoch, self._schedule = -1, None

    def __getstate__(self):
        return {"folder": self.folder, "filler": self.filler, "parent": self.parent}

    def __setstate__(self, state):
        # unpickled in a spawned DALI worker, before it serves anything
        self.__init__(state["folder"], state["filler"], state.get("parent"))
        if os.getpid() != self.parent:
            die_with_parent(self.parent)

    def path(self, index: int) -> str:
        if self._files is None:
            self._files = np.load(os.path.join(self.folder, "offsets.npy"), mmap_mode="r")
            self._names = np.memmap(os.path.join(self.folder, "names.bin"), dtype=np.uint8, mode="r")
        a, b = int(self._files[index]), int(self._files[index + 1])
        return self._names[a:b].tobytes().decode()

    def schedule(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._schedule = np.load(schedule_path(self.folder, epoch), mmap_mode="r")
            self._epoch = epoch
        return self._schedule

    def __call__(self, info):
        rows = self.schedule(info.epoch_idx)
        if info.idx_in_epoch >= rows[0, 0]:  # the end of the request, or the request was abandoned
            raise StopIteration
        f, y, x, h, w, flip = (int(v) for v in rows[1 + info.idx_in_epoch])
        if f < 0:
            encoded, (height, width) = self.filler, (_FILLER_SIZE, _FILLER_SIZE)
        else:
            path = self.path(f)
            with open(path, "rb") as fh:
                encoded = fh.read()
            height, width = _header_size(encoded, path)
        start, shape, box_start = decode_box(y, x, h, w, height, width)
        return (
            np.frombuffer(encoded, dtype=np.uint8),
            np.array(start, dtype=np.int32),
            np.array(shape, dtype=np.int32),
            np.array(box_start, dtype=np.int32),
            np.array((h, w), dtype=np.int32),
            np.array(flip, dtype=np.int32),
        )


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


def schedule_path(folder: str, epoch: int) -> str:
    return os.path.join(folder, f"schedule-{epoch}.npy")


def check_image(path: str) -> str | None:
    """Why ``path`` cannot be rendered (missing, not an image, corrupt, truncated), or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt = im.format
            im.load()  # a full decode: truncated or corrupt data raises here
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if fmt not in DALI_IMAGE_FORMATS:
        return f"unsupported image format {fmt}"
    return None


class DaliViews:
    """Renders views of an image folder with DALI: a ``data.Renderer``, as ``InMemoryViews`` is.

    ``train_batches(indices, views, batch_size)`` yields normalised float32 (n, 3, R, R) tensors on
    ``device`` in the given order; ``val_batches(batch_size)`` yields (images, labels) of the
    validation split's centre views. One request is rendered at a time: starting a new one ends
    an unfinished earlier one, whose iterator then raises.

    ``device``: ``cpu`` decodes on the CPU (``device_id=None``); ``cuda[:k]`` decodes with nvJPEG
    on that GPU (``mixed``) and returns tensors there. ``num_workers`` Python processes read files
    (``py_start_method`` ``spawn`` by default: safe after CUDA is initialised, about a second to
    start); ``num_threads`` DALI threads decode and resize. ``pipeline_batch_size`` samples go
    through DALI at a time (default: the first request's batch size, clamped to 32..256), and
    ``prefetch`` pipeline batches are rendered ahead of the caller.
    """

    def __init__(
        self,
        data,
        plan,
        device="cpu",
        num_workers: int | None = None,
        num_threads: int | None = None,
        pipeline_batch_size: int | None = None,
        prefetch: int = 2,
        start_method: str = "spawn",
    ):
        import torch

        self.data, self.plan = data, plan
        self.resolution = int(plan.resolution)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise DhkdError(f"DALI renders on cpu or cuda, not {self.device}")
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.num_threads = num_threads or default_workers()
        self.pipeline_batch_size = pipeline_batch_size
        self.prefetch, self.start_method = prefetch, start_method
        self.files = list(data.train_files) + list(data.val_files)
        self.folder = _private_folder()
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        _write_file_table(self.folder, self.files)
        self.source = EncodedViewSource(self.folder, _filler_jpeg())
        self._pipe = None
        self._epoch = 0  # DALI's epoch index: one per request
        self._open = None  # the schedule of a request that has not reached its end
        self._copied = None  # CUDA event: the last output copy is done and DALI may reuse its buffer

    # The renderer interface (data.Renderer).

    def train_batches(self, indices: np.ndarray, views: np.ndarray, batch_size: int):
        """Rendered views of training samples ``indices`` in the given order, ``batch_size`` at a
        time (the last batch may be short)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        views = np.asarray(views).reshape(len(indices), 5)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.data.num_train):
            raise DhkdError(f"training indices outside 0..{self.data.num_train - 1}")
        return self._render(indices, views, batch_size)

    def val_batches(self, batch_size: int):
        """(images, labels) of the un-augmented validation split."""
        n = self.data.num_val
        labels = self.data.val_labels.to(self.device)
        files = self.data.num_train + np.arange(n, dtype=np.int64)
        start = 0
        for x in self._render(files, self.data.val_views(self.plan), batch_size):
            yield x, labels[start : start + len(x)]
            start += len(x)

    def close(self):
        """Stops the workers and removes the schedule folder (also done when collected)."""
        self._pipe = None
        self._open = None
        self._cleanup()

    # The pipeline.

    def _build(self, batch_size: int):
        from nvidia.dali import Pipeline, fn, types

        self.pipeline_batch_size = self.pipeline_batch_size or min(256, max(32, batch_size))
        gpu = self.device.type == "cuda"
        mean, std = self.plan.normalization(self.data)
        mean = [255 * float(m) for m in mean]
        std = [255 * float(s) for s in std]
        interp = getattr(types, DALI_INTERPOLATION[self.plan.interpolation])
        pipe = Pipeline(
            batch_size=self.pipeline_batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
            # 0 workers: the source runs in the main process (no parallel external source)
            **(dict(py_num_workers=self.num_workers, py_start_method=self.start_method) if self.num_workers > 0 else {}),
        )
        with pipe:
            encoded, start, shape, box_start, box_shape, flip = fn.external_source(
                source=self.source,
                num_outputs=6,
                batch=False,
                parallel=self.num_workers > 0,
                **({"prefetch_queue_depth": self.prefetch} if self.num_workers > 0 else {}),
                dtype=[types.UINT8, types.INT32, types.INT32, types.INT32, types.INT32, types.INT32],
                ndim=[1, 1, 1, 1, 1, 0],
            )
            # EXIF orientation is ignored: boxes are drawn against the stored (header) size.
            image = fn.decoders.image_slice(
                encoded,
                start=start,
                shape=shape,
                axis_names="HW",
                device="mixed" if gpu else "cpu",
                output_type=types.RGB,
                adjust_orientation=False,
            )
            image = fn.slice(image, start=box_start, shape=box_shape, axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
            image = fn.resize(
                image,
                size=[self.resolution, self.resolution],
                interp_type=interp,
                antialias=True,
                dtype=types.FLOAT,
            )
            image = fn.crop_mirror_normalize(image, mirror=flip, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")
            pipe.set_outputs(image)
        pipe.build()  # starts the workers
        self._pipe = pipe

    def _run(self):
        if self._copied is not None:
            self._copied.synchronize()  # DALI reuses the buffer the last copy read from
            self._copied = None
        (out,) = self._pipe.run()
        return out

    def _to_torch(self, out):
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = out.as_tensor()
        x = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            feed_ndarray(dense, x, cuda_stream=stream)  # ordered after the caller's work on x's memory
            self._copied = torch.cuda.Event()
            self._copied.record(stream)
        else:
            feed_ndarray(dense, x)
        return x

    def _finish(self):
        """Ends the current DALI epoch: runs the pipeline to its StopIteration, then resets it."""
        if self._open is None:
            return
        self._open[0, 0] = 0  # workers stop at the next sample of an unfinished request
        try:
            while True:
                self._run()
        except StopIteration:
            pass
        self._pipe.reset()
        self._epoch += 1
        self._open = None
        stale = schedule_path(self.folder, self._epoch - 2)  # workers may still map the last one
        if os.path.exists(stale):
            os.remove(stale)

    def _render(self, files: np.ndarray, views: np.ndarray, batch_size: int):
        import torch

        if batch_size < 1:
            raise DhkdError(f"batch size must be positive, got {batch_size}")
        n = len(files)
        if n == 0:
            return
        views = np.asarray(views, dtype=np.int64)
        if (views[:, 2] < 1).any() or (views[:, 3] < 1).any():
            raise DhkdError("views with an empty crop box: the store or plan is corrupt")
        if self._pipe is None:
            self._build(batch_size)
        self._finish()
        epoch, b = self._epoch, self.pipeline_batch_size
        batches = -(-n // b)
        schedule = np.lib.format.open_memmap(
            schedule_path(self.folder, epoch), mode="w+", dtype=np.int32, shape=(1 + batches * b, _SCHEDULE_COLUMNS)
        )
        schedule[0] = 0
        schedule[0, 0] = batches * b
        schedule[1 : n + 1, 0] = files
        schedule[1 : n + 1, 1:] = views
        schedule[n + 1 :] = (-1, 0, 0, _FILLER_SIZE, _FILLER_SIZE, 0)
        schedule.flush()
        self._open = schedule

        pending, have = [], 0
        try:
            for k in range(batches):
                if self._epoch != epoch or self._open is None:
                    raise RuntimeError("this DaliViews iterator was ended by a later request; iterate one request at a time")
                try:
                    out = self._run()
                except StopIteration:
                    raise RuntimeError(f"DALI ended request {epoch} after {k} of {batches} batches") from None
                except Exception as e:
                    self._fail(e, files, k)
                x = self._to_torch(out)[: min(b, n - k * b)]
                pending.append(x)
                have += len(x)
                while have >= batch_size:
                    whole = torch.cat(pending) if len(pending) > 1 else pending[0]
                    yield whole[:batch_size]
                    pending = [whole[batch_size:]] if len(whole) > batch_size else []
                    have -= batch_size
            if have:
                yield torch.cat(pending) if len(pending) > 1 else pending[0]
            self._finish()
        finally:
            if self._epoch == epoch and self._open is not None:
                self._open[0, 0] = 0  # abandoned: let the workers stop; the next request drains

    def _fail(self, error: Exception, files: np.ndarray, batch: int):
        """Maps a failed pipeline run to the file that caused it; the pipeline is unusable after."""
        self._pipe, self._open = None, None
        self._epoch = 0
        b = self.pipeline_batch_size
        # The failing batch is this one or one the workers were already preparing.
        suspects = files[batch * b : (batch + self.prefetch + 2) * b]
        for f in dict.fromkeys(int(v) for v in suspects):
            reason = check_image(self.files[f])
            if reason is not None:
                raise DhkdError(f"cannot decode image {self.files[f]}: {reason}") from None
        raise error


FOLDER_PREFIX = "dhkd-dali-"


def _private_folder() -> str:
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
        pid = entry.name[len(FOLDER_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if pid_alive(int(pid)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def _write_file_table(folder: str, files: list[str]):
    """All file paths as one UTF-8 blob plus offsets: workers map them instead of unpickling a list."""
    encoded = [os.path.abspath(p).encode() for p in files]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    np.save(os.path.join(folder, "offsets.npy"), offsets)
    with open(os.path.join(folder, "names.bin"), "wb") as f:
        f.write(b"".join(encoded) or b"\0")  # np.memmap refuses empty files


def render_reference(path: str, view, resolution: int, mean, std, interpolation: str = "bilinear"):
    """The same view rendered with Pillow and torch: a check on DALI's pixels, not a loader.

    Decodes the whole image, crops the box with zeros outside the image, resizes with torch's
    antialiased ``interpolation`` (``DALI_INTERPOLATION``), mirrors and normalises.
    Returns float32 (3, R, R). JPEG decoders differ by a grey level or so, and the resamplers at
    the box's edges, so compare with a tolerance.
    """
    import torch
    import torch.nn.functional as F
    from PIL import Image

    y, x, h, w, flip = (int(v) for v in view)
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    height, width = pixels.shape[:2]
    box = np.zeros((h, w, 3), dtype=np.uint8)
    y0, y1, x0, x1 = max(y, 0), min(y + h, height), max(x, 0), min(x + w, width)
    if y1 > y0 and x1 > x0:
        box[y0 - y : y1 - y, x0 - x : x1 - x] = pixels[y0:y1, x0:x1]
    t = torch.from_numpy(box).permute(2, 0, 1)[None].float()
    if (h, w) != (resolution, resolution):
        t = F.interpolate(t, size=(resolution, resolution), mode=interpolation, align_corners=False, antialias=True)
    if flip:
        t = t.flip(-1)
    mean_t = torch.tensor([255 * float(m) for m in mean]).view(1, 3, 1, 1)
    std_t = torch.tensor([255 * float(s) for s in std]).view(1, 3, 1, 1)
    return ((t - mean_t) / std_t)[0]
