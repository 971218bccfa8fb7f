"""ImageNet-style image folders: ``DIR/train/CLASS/*.JPEG`` and optionally ``DIR/val/CLASS/*``.

Images stay on disk as encoded files; views are rendered by DALI (``DaliViews``). Image sizes come
from the file headers (Pillow opens lazily, no decoding) and are cached per index.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from dhkd_pipe.data.views import ViewPlan, validation_views
from dhkd_pipe.errors import DhkdError

if TYPE_CHECKING:
    from dhkd_pipe.data.dali_renderer import DaliViews

EXTENSIONS = (".jpeg", ".jpg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dali_installed() -> bool:
    """Whether NVIDIA DALI (an extra of setup.cfg, one build per CUDA major) can be imported; looked
    up, not imported (an import takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no ``nvidia`` package at all (CPU torch); or the module set to None
        return False


def require_dali():
    """Refuses, in one line naming the extra to install, an image folder where DALI (its renderer)
    is not installed: DALI is an extra, so that each user gets the build their drivers run."""
    if not dali_installed():
        raise DhkdError(
            "image folders are rendered by NVIDIA DALI, which is not installed: "
            "pip install 'dhkd-pipe[cuda13]' (CUDA 13 drivers) or 'dhkd-pipe[cuda12]' (CUDA 12)"
        )


def _images_in(class_dir: str) -> list[str]:
    """Image files of one class folder, sorted by name (``scandir``: no stat per file on Linux)."""
    with os.scandir(class_dir) as entries:
        names = [e.name for e in entries if e.name.lower().endswith(EXTENSIONS) and e.is_file()]
    return [os.path.join(class_dir, n) for n in sorted(names)]


def _scan(split_dir: str, classes: list[str], require_all: bool):
    """Files and labels of a split; every class folder of ``train`` must hold images."""
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        found = _images_in(class_dir) if os.path.isdir(class_dir) else []
        if require_all and not found:
            raise DhkdError(f"class folder {class_dir} holds no images ({', '.join(EXTENSIONS)})")
        files += found
        labels += [label] * len(found)
    return files, labels


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception as e:
        raise DhkdError(
            f"cannot read image header of {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    return height, width


def _image_sizes(paths: list[str]) -> np.ndarray:
    """(n, 2) int64 (height, width) from the headers; threads hide file-system latency for many."""
    if len(paths) < 256:
        sizes = [_image_size(p) for p in paths]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            sizes = list(pool.map(_image_size, paths, chunksize=64))
    return np.array(sizes, dtype=np.int64).reshape(-1, 2)


class ImageFolderData:
    """An image folder: file lists, labels and what every ``data.Dataset`` provides."""

    kind = "imagefolder"
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, root: str, classes, train_files, train_labels, val_files, val_labels):
        self.root = os.path.abspath(root)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.train_files, self.val_files = list(train_files), list(val_files)
        self.train_labels = torch.as_tensor(np.asarray(train_labels, dtype=np.int64))
        self.val_labels = torch.as_tensor(np.asarray(val_labels, dtype=np.int64))
        self.source = self.root
        self._train_sizes = np.full((len(self.train_files), 2), -1, dtype=np.int64)
        self._val_sizes = None
        self._fingerprint = None
        self.skipped: tuple[str, ...] = ()  # files left out as corrupt (``without``), relative to the root

    @classmethod
    def from_folder(cls, root: str) -> "ImageFolderData":
        root = str(root)
        if not os.path.isdir(root):
            raise DhkdError(f"image folder not found: {root}")
        require_dali()  # before the scan: a large folder takes a while to list
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            raise DhkdError(f"image folder {root} has no train/ folder (expected train/CLASS/*.JPEG)")
        classes = sorted(e for e in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, e)))
        if not classes:
            raise DhkdError(f"no images (.JPEG, .jpg, .jpeg, .png) in {train_dir}/CLASS/: it has no class folders")
        train_files, train_labels = _scan(train_dir, classes, require_all=True)
        val_dir = os.path.join(root, "val")
        val_files, val_labels = [], []
        if os.path.isdir(val_dir):
            unknown = sorted(
                e for e in os.listdir(val_dir) if os.path.isdir(os.path.join(val_dir, e)) and e not in classes
            )
            if unknown:
                raise DhkdError(f"{val_dir} has class folders that train/ lacks: {', '.join(unknown[:5])}")
            val_files, val_labels = _scan(val_dir, classes, require_all=False)
        return cls(root, classes, train_files, train_labels, val_files, val_labels)

    @property
    def num_train(self) -> int:
        return len(self.train_files)

    @property
    def num_val(self) -> int:
        return len(self.val_files)

    def default_plan(self, seed: int = 0, resolution: int | None = None) -> ViewPlan:
        return ViewPlan(
            seed=seed, policy="random_resized_crop_flip", resolution=resolution or 224, mean=self.mean, std=self.std
        )

    def train_sizes(self, indices) -> np.ndarray:
        """(n, 2) int64 (height, width) of training images ``indices``, from their headers."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        missing = np.unique(indices[self._train_sizes[indices, 0] < 0])
        if len(missing):
            self._train_sizes[missing] = _image_sizes([self.train_files[i] for i in missing])
        return self._train_sizes[indices].copy()

    def val_sizes(self) -> np.ndarray:
        if self._val_sizes is None:
            self._val_sizes = _image_sizes(self.val_files)
        return self._val_sizes

    def val_views(self, plan: ViewPlan) -> np.ndarray:
        return validation_views(self.val_sizes(), plan.resolution, plan.policy, plan.crop_pct)

    def relative(self, path: str) -> str:
        """``path`` as stores record it: relative to the root, with ``/``."""
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def without(self, skipped) -> "ImageFolderData":
        """The same folder less the files ``skipped`` (relative paths, as ``relative`` gives them):
        what ``--skip-corrupt`` left out, replayed from the store's record."""
        gone = set(skipped)
        if not gone:
            return self

        def kept(files, labels):
            keep = [i for i, f in enumerate(files) if self.relative(f) not in gone]
            return [files[i] for i in keep], np.asarray(labels, dtype=np.int64)[keep]

        data = ImageFolderData(
            self.root, self.classes, *kept(self.train_files, self.train_labels.numpy()),
            *kept(self.val_files, self.val_labels.numpy()),
        )  # fmt: skip
        data.skipped = tuple(sorted(gone | set(self.skipped)))
        return data

    def without_corrupt(self, workers: int | None = None) -> "ImageFolderData":
        """The folder less every image that a full decode finds corrupt (``corrupt_images``)."""
        from dhkd_pipe.data.corrupt_images import scan_corrupt

        bad = scan_corrupt(self.train_files + self.val_files, workers)
        return self.without(self.relative(path) for path, _ in bad)

    def fingerprint(self) -> dict:
        """Kind, counts, a digest of the sorted relative training file list and labels, and of the
        class names (label ``k`` is the ``k``-th sorted class folder)."""
        if self._fingerprint is None:
            rel = [os.path.relpath(f, self.root).replace(os.sep, "/") for f in self.train_files]
            labels = self.train_labels.numpy()
            digest = hashlib.sha256()
            for i in sorted(range(len(rel)), key=rel.__getitem__):
                digest.update(f"{rel[i]}\t{int(labels[i])}\n".encode())
            self._fingerprint = {
                "kind": self.kind,
                "num_samples": self.num_train,
                "num_classes": self.num_classes,
                "digest": digest.hexdigest()[:32],
                "classes_digest": hashlib.sha256("\n".join(self.classes).encode()).hexdigest()[:32],
            }
            if self.skipped:  # stage 2 leaves out the same files (datasets.load_store_data)
                self._fingerprint["skipped"] = list(self.skipped)
        return self._fingerprint

    def renderer(self, device, plan: ViewPlan, workers: int | None = None) -> "DaliViews":
        from dhkd_pipe.data.dali_renderer import DaliViews

        require_dali()
        return DaliViews(self, plan, device, num_workers=workers)  # a data.Renderer
