"""ImageNet-style image folders: ``DIR/train/CLASS/*.JPEG`` and optionally ``DIR/val/CLASS/*``.

Images stay on disk as encoded files; views are rendered by DALI (``DaliViews``). Image sizes come
from the file headers (Pillow opens lazily, no decoding) and are cached per index.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from .errors import DhkdError
from .views import ViewPlan, validation_views

EXTENSIONS = (".jpeg", ".jpg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _scan(split_dir: str, classes: list[str]):
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            continue
        for entry in sorted(os.listdir(class_dir)):
            if entry.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(class_dir, entry)):
                files.append(os.path.join(class_dir, entry))
                labels.append(label)
    return files, labels


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception as e:
        raise DhkdError(f"cannot read image header of {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return height, width


class ImageFolderData:
    """An image folder: file lists, labels and the fields every data set exposes."""

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

    @classmethod
    def from_folder(cls, root: str) -> "ImageFolderData":
        root = str(root)
        if not os.path.isdir(root):
            raise DhkdError(f"image folder not found: {root}")
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            raise DhkdError(f"image folder {root} has no train/ folder (expected train/CLASS/*.JPEG)")
        classes = sorted(e for e in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, e)))
        train_files, train_labels = _scan(train_dir, classes)
        if not train_files:
            raise DhkdError(f"no images (.JPEG, .jpg, .jpeg, .png) in {train_dir}/CLASS/")
        val_dir = os.path.join(root, "val")
        val_files, val_labels = _scan(val_dir, classes) if os.path.isdir(val_dir) else ([], [])
        return cls(root, classes, train_files, train_labels, val_files, val_labels)

    @property
    def num_train(self) -> int:
        return len(self.train_files)

    @property
    def num_val(self) -> int:
        return len(self.val_files)

    def default_plan(self, seed: int = 0, resolution: int | None = None) -> ViewPlan:
        return ViewPlan(seed=seed, policy="random_resized_crop_flip", resolution=resolution or 224)

    def train_sizes(self, indices) -> np.ndarray:
        """(n, 2) int64 (height, width) of training images ``indices``, from their headers."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        for i in indices[self._train_sizes[indices, 0] < 0]:
            self._train_sizes[i] = _image_size(self.train_files[i])
        return self._train_sizes[indices].copy()

    def val_sizes(self) -> np.ndarray:
        if self._val_sizes is None:
            self._val_sizes = np.array([_image_size(f) for f in self.val_files], dtype=np.int64).reshape(-1, 2)
        return self._val_sizes

    def val_views(self, plan: ViewPlan) -> np.ndarray:
        return validation_views(self.val_sizes(), plan.resolution, plan.policy)

    def fingerprint(self) -> dict:
        """Kind, counts, and a digest of the sorted relative training file list and labels."""
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
            }
        return self._fingerprint

    def renderer(self, device, plan: ViewPlan, workers: int | None = None):
        from .dali_views import DaliViews

        return DaliViews(self, plan, device, workers=workers)
