"""In-memory data sets: ``InMemoryData`` (a small data set held whole as uint8 images and labels,
and its fixed stratified training subsets) and ``InMemoryViews`` (its views rendered on the
training device, crop and flip as one gather). Their files are read by ``readers``."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dhkd_pipe.errors import DhkdError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from dhkd_pipe.data.views import ViewPlan

# ``SPEC@N``: a fixed stratified subset of N training images of an in-memory data set.
SUBSET_MARK = "@"


@dataclass
class InMemoryData:
    """A small data set held whole: uint8 images (N, 3, H, W) and int64 labels, train and val."""

    kind: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = ""
    _fingerprint: dict | None = field(default=None, repr=False)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_val(self) -> int:
        return len(self.val_labels)

    @property
    def resolution(self) -> int:
        return int(self.train_images.shape[-1])

    def default_plan(self, seed: int = 0, resolution: int | None = None) -> ViewPlan:
        from dhkd_pipe.data.views import ViewPlan

        return ViewPlan(
            seed=seed, policy="pad_crop_flip", resolution=resolution or self.resolution, mean=self.mean, std=self.std
        )

    def train_sizes(self, indices: np.ndarray) -> np.ndarray:
        import numpy as np

        h, w = self.train_images.shape[-2:]
        return np.tile(np.array([[h, w]], dtype=np.int64), (len(indices), 1))

    def val_views(self, plan: ViewPlan) -> np.ndarray:
        import numpy as np

        from dhkd_pipe.data.views import validation_views

        h, w = self.val_images.shape[-2:]
        return validation_views(np.tile([[h, w]], (self.num_val, 1)), plan.resolution, plan.policy, plan.crop_pct)

    def to(self, device) -> "InMemoryData":
        for name in ("train_images", "train_labels", "val_images", "val_labels"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def renderer(self, device, plan: ViewPlan, workers: int | None = None) -> "InMemoryViews":
        """Gathers on the device; ``workers`` is for the DALI renderer's signature and unused here."""
        return InMemoryViews(self.to(device), plan)

    def fingerprint(self) -> dict:
        """What identifies the training split: kind, counts, and a digest of its bytes and labels."""
        import numpy as np

        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(self.train_images.cpu().numpy().tobytes())
            digest.update(self.train_labels.cpu().numpy().astype(np.int64).tobytes())
            self._fingerprint = {
                "kind": self.kind,
                "num_samples": self.num_train,
                "num_classes": self.num_classes,
                "image_size": list(self.train_images.shape[-2:]),
                "digest": digest.hexdigest()[:32],
            }
        return self._fingerprint

    def train_subset(self, size: int) -> "InMemoryData":
        """The same data set with ``stratified_subset(train_labels, size)`` as its training split.

        Validation split and normalisation stay those of the whole data set, so a subset changes
        only how many images are trained on; the fingerprint follows the subset's bytes.
        """
        import torch

        keep = torch.from_numpy(stratified_subset(self.train_labels.cpu().numpy(), size, self.num_classes))
        return dataclasses.replace(
            self,
            train_images=self.train_images[keep].contiguous(),
            train_labels=self.train_labels[keep].contiguous(),
            source=f"{self.source}{SUBSET_MARK}{size}",
            _fingerprint=None,
        )


def stratified_subset(labels: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    """Sorted indices of ``size`` samples, each class in proportion to its share of ``labels``.

    Class c gets floor(size * n_c / N) samples, the remainder going one each to the classes with the
    largest fractional parts (ties: lower class first); within a class, the first ones in a
    permutation of all indices drawn by ``numpy.random.default_rng(0)``. Fixed for given labels.
    """
    import numpy as np

    n = len(labels)
    if not num_classes <= size <= n:
        raise DhkdError(f"bad training subset @{size}: choose between {num_classes} (one per class) and {n} images")
    share = size * np.bincount(labels, minlength=num_classes).astype(np.int64)
    quota, fraction = share // n, share % n  # integers: no float ties
    by_fraction = sorted(range(num_classes), key=lambda c: (-fraction[c], c))
    quota[by_fraction[: size - int(quota.sum())]] += 1
    taken = np.zeros(num_classes, dtype=np.int64)
    keep = []
    for i in np.random.default_rng(0).permutation(n):
        c = labels[i]
        if taken[c] < quota[c]:
            taken[c] += 1
            keep.append(i)
    return np.sort(np.array(keep, dtype=np.int64))


class InMemoryViews:
    """Renders views of an in-memory data set on its device: crop + flip are one gather.

    ``render(images, indices, views)`` returns normalised float32 (n, 3, R, R); pixels of a crop
    box outside the image are zero (the padding of a padded crop).
    """

    def __init__(self, data: InMemoryData, plan: ViewPlan):
        import torch

        if plan.policy != "pad_crop_flip":
            raise DhkdError(f"in-memory data sets replay pad_crop_flip views, not {plan.policy}")
        self.data, self.plan = data, plan
        device = data.train_images.device
        mean, std = plan.normalization(data)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)

    def render(self, images: torch.Tensor, indices, views) -> torch.Tensor:
        import torch

        device = images.device
        idx = torch.as_tensor(indices, device=device, dtype=torch.long)
        v = torch.as_tensor(views, device=device, dtype=torch.long)
        h, w = int(v[0, 2]), int(v[0, 3])
        if not bool(((v[:, 2] == h) & (v[:, 3] == w)).all()):
            raise DhkdError("in-memory views must share one crop size")
        ar_h, ar_w = torch.arange(h, device=device), torch.arange(w, device=device)
        rows = v[:, 0:1] + ar_h  # (n, h)
        flip = v[:, 4:5].bool()
        cols = v[:, 1:2] + torch.where(flip, w - 1 - ar_w, ar_w)  # (n, w)
        height, width = images.shape[-2:]
        inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
        pixels = images[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, 3)
        pixels = pixels.permute(0, 3, 1, 2).float() * inside[:, None]
        if (h, w) != (self.plan.resolution,) * 2:
            pixels = torch.nn.functional.interpolate(
                pixels, size=(self.plan.resolution,) * 2, mode=self.plan.interpolation, antialias=True
            )
        return (pixels - self.mean) * self.inv_std

    def train(self, indices, views) -> torch.Tensor:
        return self.render(self.data.train_images, indices, views)

    def val(self, indices) -> torch.Tensor:
        import numpy as np

        views = self.data.val_views(self.plan)[np.asarray(indices)]
        return self.render(self.data.val_images, indices, views)

    def train_batches(self, indices: np.ndarray, views: np.ndarray, batch_size: int):
        """Rendered views in the given order, ``batch_size`` at a time (the last batch may be short)."""
        for start in range(0, len(indices), batch_size):
            yield self.train(indices[start : start + batch_size], views[start : start + batch_size])

    def stream_batches(self, pieces, total: int, batch_size: int):
        """``train_batches`` of a schedule arriving as (indices, views) pieces, ``total`` samples in all."""
        from dhkd_pipe.data.views import cut_batches

        for indices, views in cut_batches(pieces, batch_size):
            yield self.train(indices, views)

    def val_batches(self, batch_size: int):
        """(images, labels) of the un-augmented validation split."""
        import numpy as np

        for start in range(0, self.data.num_val, batch_size):
            idx = np.arange(start, min(start + batch_size, self.data.num_val))
            yield self.val(idx), self.data.val_labels[start : start + len(idx)]
