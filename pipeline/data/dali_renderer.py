"""The DALI renderer of image folders, shared by both stages.

Stage 1 (the teacher) and stage 2 (the student) render through the same ``DaliViews``, so the
teacher saw exactly the student's pixels. Per view ``(y, x, h, w, flip)`` (``views.py``: the box in
source pixels, possibly reaching past the image):

1. a parallel external source (run by Python worker processes) reads the file's encoded bytes;
2. the image is decoded (``mixed``: nvJPEG on the GPU; ``cpu``: libjpeg-turbo), either whole
   (``decoders.image``) or only the region of the box inside the image
   (``decoders.image_slice``, ``decode="region"``: the source reads the header size to clip it);
3. ``slice`` with ``out_of_bounds_policy="pad"`` cuts the box, zeros outside the image;
4. ``resize`` to R x R (the plan's interpolation, antialiased: ``DALI_INTERPOLATION``), then
   ``crop_mirror_normalize`` mirrors by the flip bit, normalises with the plan's mean/std x 255
   and writes CHW float32.

``train_batches`` renders one view per sample (stage 2's replay, the validation split);
``image_batches`` decodes each image once and renders all of its V views from that decode, one
slice/resize/normalise branch per view (stage 1). The branches are the per-view steps 3-4, so a
view's pixels are the same through both wherever a region decode equals the region of a full
decode: on the CPU (libjpeg-turbo) they are equal bit for bit (``tests/test_dali_views.py``);
on the GPU (nvJPEG) that is unverified, so there stage 2 decodes whole images too
(``decode="full"``), and ``dhkd-pipe bench all`` measures whether the region decode agrees.

Every operator is per sample, so a view's pixels never depend on the batch it is rendered in.
Requests reach the workers through schedule files (``dali_requests``).
"""

from __future__ import annotations

import os
import shutil
import weakref

import numpy as np

from dhkd_pipe.data.corrupt_images import find_corrupt
from dhkd_pipe.data.dali_folder import private_folder, write_file_table
from dhkd_pipe.data.dali_requests import DaliRequests
from dhkd_pipe.data.dali_sources import FILLER_SIZE, EncodedImageSource, EncodedViewSource, filler_jpeg
from dhkd_pipe.errors import DhkdError

DALI_INTERPOLATION = {"bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC"}
"""Box -> R x R resampling per ``ViewPlan.interpolation``: the DALI filter, with ``antialias=True``
(the filter widened by the scale factor when shrinking), the counterpart of torch's
``interpolate(mode=..., antialias=True, align_corners=False)`` used by ``render_reference`` and by
the in-memory renderer."""

DECODES = ("region", "full")  # stage 2's decode of a view: only the box's region, or the whole image
SKIP_HINT = "replace or remove it, or give cache-teacher --skip-corrupt to leave such images out of the store"


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


def worker_count(requested: int | None) -> int:
    """Reader processes for ``--workers``: ``requested`` (default: ``default_workers()``), at most one
    per usable CPU core. Each is a spawned interpreter holding its own memory; past the cores they
    only compete for them, and a thousand of them exhaust the machine before the first image."""
    if requested is None:
        return default_workers()
    return max(0, min(int(requested), len(os.sched_getaffinity(0))))


class DaliViews:
    """Renders views of an image folder with DALI: a ``data.Renderer``, as ``InMemoryViews`` is.

    ``train_batches(indices, views, batch_size)`` yields normalised float32 (n, 3, R, R) tensors on
    ``device`` in the given order; ``val_batches(batch_size)`` yields (images, labels) of the
    validation split's centre views; ``image_batches(indices, views, images)`` decodes each image
    once and yields (n, V, 3, R, R) tensors of all its views. One request is rendered at a time
    per method: starting a new one ends an unfinished earlier one, whose iterator then raises.

    ``device``: ``cpu`` decodes on the CPU (``device_id=None``); ``cuda[:k]`` decodes with nvJPEG
    on that GPU (``mixed``) and returns tensors there. ``decode``: how ``train_batches`` decodes
    (``DECODES``; default ``region`` on the CPU, ``full`` on a GPU: see the module's docstring).
    ``num_workers`` Python processes read files (``py_start_method`` ``spawn`` by default: safe
    after CUDA is initialised, about a second to start); ``num_threads`` DALI threads decode and
    resize. ``pipeline_batch_size`` samples go through DALI at a time (default: the first
    request's batch size, clamped to 32..256), and ``prefetch`` pipeline batches are rendered
    ahead of the caller. ``decoded_images`` counts the images decoded so far.
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
        decode: str | None = None,
    ):
        import torch

        self.data, self.plan = data, plan
        self.resolution = int(plan.resolution)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
        elif self.device.type != "cpu":
            raise DhkdError(f"DALI renders on cpu or cuda, not {self.device}")
        self.decode = decode or ("full" if self.device.type == "cuda" else "region")
        if self.decode not in DECODES:
            raise DhkdError(f"unknown decode {self.decode!r}; known: {', '.join(DECODES)}")
        self.num_workers = worker_count(num_workers)
        self.num_threads = num_threads or default_workers()
        self.pipeline_batch_size = pipeline_batch_size
        self.prefetch, self.start_method = prefetch, start_method
        self.files = list(data.train_files) + list(data.val_files)
        self.folder = private_folder()
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        write_file_table(self.folder, self.files)
        self._filler = filler_jpeg()
        self._views = None  # DaliRequests of train_batches/val_batches, built at the first request
        self._images = None  # DaliRequests of image_batches, per number of views
        self._images_views = None

    @property
    def decoded_images(self) -> int:
        """Images decoded so far (samples that came out of the pipelines; fillers not counted)."""
        return sum(r.samples_rendered for r in (self._views, self._images) if r is not None)

    # The renderer interface (data.Renderer).

    def train_batches(self, indices: np.ndarray, views: np.ndarray, batch_size: int):
        """Rendered views of training samples ``indices`` in the given order, ``batch_size`` at a
        time (the last batch may be short)."""
        indices = self._train_indices(indices)
        views = np.asarray(views).reshape(len(indices), 5)
        return self._render_views(indices, views, batch_size)

    def stream_batches(self, pieces, total: int, batch_size: int):
        """``train_batches`` of a schedule arriving as (indices, views) pieces, ``total`` samples
        in all: each piece is taken when DALI is about to need its rows."""
        blocks = (self._view_rows(self._train_indices(i), np.asarray(v).reshape(-1, 5)) for i, v in pieces)
        return self._render_rows(blocks, batch_size, total)

    def val_batches(self, batch_size: int):
        """(images, labels) of the un-augmented validation split."""
        n = self.data.num_val
        labels = self.data.val_labels.to(self.device)
        files = self.data.num_train + np.arange(n, dtype=np.int64)
        start = 0
        for x in self._render_views(files, self.data.val_views(self.plan), batch_size):
            yield x, labels[start : start + len(x)]
            start += len(x)

    def image_batches(self, indices: np.ndarray, views: np.ndarray, images: int):
        """All V views of each training sample ``indices``, each image decoded once: float32
        (n, V, 3, R, R) tensors, ``images`` samples at a time (the last batch may be short).
        ``views`` is (len(indices), V, 5); a view's pixels are ``train_batches``'s."""
        indices = self._train_indices(indices)
        views = np.asarray(views, dtype=np.int64)
        if views.ndim != 3 or views.shape[0] != len(indices) or views.shape[2] != 5 or views.shape[1] < 1:
            raise ValueError(f"views must be (len(indices), V, 5), got {views.shape}")
        _check_boxes(views.reshape(-1, 5))
        if images < 1:
            raise DhkdError(f"batch size must be positive, got {images}")
        count = views.shape[1]
        rows = np.concatenate([indices[:, None], views.reshape(len(indices), -1)], axis=1)
        return self._image_requests(count).render(
            rows, images, self._pipeline_batch(images, per_sample=count), self._fail
        )

    def start_images(self, count: int, images: int):
        """Starts the workers and builds the pipeline of ``image_batches`` (``count`` views,
        ``images`` at a time) now, so that the first request does not wait for it."""
        self._image_requests(count).start(self._pipeline_batch(images, per_sample=count))

    def close(self):
        """Stops the workers and removes the schedule folder (also done when collected)."""
        for r in (self._views, self._images):
            if r is not None:
                r.close()
        self._cleanup()

    # The pipelines.

    def _train_indices(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.data.num_train):
            raise DhkdError(f"training indices outside 0..{self.data.num_train - 1}")
        return indices

    def _image_requests(self, count: int) -> DaliRequests:
        if self._images is None or self._images_views != count:
            if self._images is not None:
                self._images.close()
            source = EncodedImageSource(self.folder, self._filler)
            filler = [-1] + [0, 0, FILLER_SIZE, FILLER_SIZE, 0] * count
            self._images = self._requests(source, self._image_graph(count), filler)
            self._images_views = count
        return self._images

    def _pipeline_batch(self, batch_size: int, per_sample: int = 1) -> int:
        """Samples per pipeline run: the given size, else about the request's batch of views."""
        if self.pipeline_batch_size and per_sample == 1:
            return self.pipeline_batch_size
        return max(1, min(256, max(32, batch_size * per_sample)) // per_sample)

    def _requests(self, source, graph, filler_row) -> DaliRequests:
        return DaliRequests(
            self.folder,
            source.name,
            source,
            graph,
            filler_row,
            self.device,
            num_workers=self.num_workers,
            num_threads=self.num_threads,
            prefetch=self.prefetch,
            start_method=self.start_method,
        )

    def _render_views(self, files: np.ndarray, views: np.ndarray, batch_size: int):
        return self._render_rows([self._view_rows(files, views)], batch_size, len(files))

    @staticmethod
    def _view_rows(files: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Schedule rows of the view source: file index, then the view (y, x, h, w, flip)."""
        views = np.asarray(views, dtype=np.int64)
        _check_boxes(views)
        return np.concatenate([files[:, None], views], axis=1)

    def _render_rows(self, blocks, batch_size: int, total: int):
        if batch_size < 1:
            raise DhkdError(f"batch size must be positive, got {batch_size}")
        if self._views is None:
            source = EncodedViewSource(self.folder, self._filler, regions=self.decode == "region")
            self._views = self._requests(source, self._view_graph, [-1, 0, 0, FILLER_SIZE, FILLER_SIZE, 0])
        return self._views.render(blocks, batch_size, self._pipeline_batch(batch_size), self._fail, total=total)

    def _normalise(self):
        """crop_mirror_normalize's arguments and the resize filter: the same for every graph."""
        from nvidia.dali import types

        mean, std = self.plan.normalization(self.data)
        return (
            [255 * float(m) for m in mean],
            [255 * float(s) for s in std],
            getattr(types, DALI_INTERPOLATION[self.plan.interpolation]),
        )

    def _render_box(self, image, start, shape, flip):
        """Steps 3-4 of the module's docstring: one view of a decoded image (or region)."""
        from nvidia.dali import fn, types

        mean, std, interp = self._normalise()
        box = fn.slice(image, start=start, shape=shape, axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
        x = fn.resize(
            box, size=[self.resolution, self.resolution], interp_type=interp, antialias=True, dtype=types.FLOAT
        )
        return fn.crop_mirror_normalize(x, mirror=flip, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")

    def _external(self, source, count: int, parallel: bool, prefetch: int, dtypes, ndim):
        from nvidia.dali import fn

        return fn.external_source(
            source=source,
            num_outputs=count,
            batch=False,
            parallel=parallel,
            dtype=dtypes,
            ndim=ndim,
            **({"prefetch_queue_depth": prefetch} if parallel else {}),
        )

    def _view_graph(self, source, parallel: bool, prefetch: int):
        from nvidia.dali import fn, types

        device = "mixed" if self.device.type == "cuda" else "cpu"
        # EXIF orientation is ignored: boxes are drawn against the stored (header) size.
        if source.regions:
            i32 = types.INT32
            encoded, start, shape, box_start, box_shape, flip = self._external(
                source, 6, parallel, prefetch, [types.UINT8, i32, i32, i32, i32, i32], [1, 1, 1, 1, 1, 0]
            )
            image = fn.decoders.image_slice(
                encoded,
                start=start,
                shape=shape,
                axis_names="HW",
                device=device,
                output_type=types.RGB,
                adjust_orientation=False,
            )
            return self._render_box(image, box_start, box_shape, flip)
        encoded, box_start, box_shape, flip = self._external(
            source, 4, parallel, prefetch, [types.UINT8, types.INT32, types.INT32, types.INT32], [1, 1, 1, 0]
        )
        image = fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=False)
        return self._render_box(image, box_start, box_shape, flip)

    def _image_graph(self, count: int):
        def graph(source, parallel: bool, prefetch: int):
            from nvidia.dali import fn, types

            device = "mixed" if self.device.type == "cuda" else "cpu"
            encoded, views = self._external(source, 2, parallel, prefetch, [types.UINT8, types.INT32], [1, 2])
            image = fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=False)
            rendered = [self._render_box(image, views[v, 0:2], views[v, 2:4], views[v, 4]) for v in range(count)]
            return fn.stack(*rendered)

        return graph

    def _fail(self, error: Exception | bytes, files: np.ndarray):
        """Names the file that made a pipeline run fail, or whose damaged data a decoder reported
        (``error``: the decoder's line; ``corrupt_images``), if one of ``files`` (indices; -1: a
        filler) is bad. The pipeline has stopped, so the files are checked one at a time with
        nothing beside them."""
        files = [int(f) for f in files if int(f) >= 0]
        found = find_corrupt([self.files[f] for f in files])
        if found is not None:
            raise DhkdError(f"cannot decode image {found[0]}: {found[1]}; {SKIP_HINT}") from None
        if isinstance(error, bytes):  # a warning no single file of the batch repeats: refuse all the same
            names = ", ".join(self.files[f] for f in files[:3])
            raise DhkdError(
                f"the JPEG decoder reported damaged data ({error.decode(errors='replace')}) in the images "
                f"from {names}, ...; none fails alone; check these files"
            )


def _check_boxes(views: np.ndarray):
    if len(views) and ((views[:, 2] < 1).any() or (views[:, 3] < 1).any()):
        raise DhkdError("views with an empty crop box: the store or plan is corrupt")


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
