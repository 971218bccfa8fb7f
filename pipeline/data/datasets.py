"""Datasets: the bundled digits, MNIST/Fashion-MNIST IDX files, CIFAR-10/100, ImageNet-style folders.

``load_data(spec)`` is the one door in. Small data sets are held whole as one uint8 tensor
(N, 3, H, W) and views are rendered by gathers on the training device (``in_memory``: the data
and its views; ``readers``: their files); image folders are lists of files rendered by DALI
(``dhkd_pipe.data.imagefolder``). Both kinds are a ``Dataset`` and their renderers a ``Renderer``
(the protocols below), so stages never branch on the data set beyond choosing the renderer.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

from dhkd_pipe.data.in_memory import SUBSET_MARK
from dhkd_pipe.errors import DhkdError

# numpy, torch and the views are imported where data is loaded: the CLI's help (DATA_SETS) stays light
if TYPE_CHECKING:
    import numpy as np
    import torch

    from dhkd_pipe.data.views import ViewPlan

__all__ = ["DATA_SETS", "SUBSET_MARK", "Dataset", "Renderer", "absolute_spec", "load_data", "load_store_data"]

DATA_SETS = (
    "digits",
    "fashion-mnist",
    "fashion-mnist:DIR",
    "mnist:DIR",
    "cifar10:DIR",
    "cifar100:DIR",
    "imagefolder:DIR",
)


@runtime_checkable
class Renderer(Protocol):
    """Renders views of a data set as normalised float32 (n, 3, R, R) batches on its device:
    ``InMemoryViews`` (gathers) and ``dali_views.DaliViews`` (decoding). The loader asks for
    training views, ``inference.evaluate`` for the validation split."""

    def train_batches(self, indices: np.ndarray, views: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
        """Views ``(y, x, h, w, flip)`` of training samples ``indices``, in the given order,
        ``batch_size`` at a time (the last batch may be short)."""
        ...

    def stream_batches(
        self, pieces: Iterator[tuple[np.ndarray, np.ndarray]], total: int, batch_size: int
    ) -> Iterator[torch.Tensor]:
        """``train_batches`` of a schedule that arrives as (indices, views) pieces, ``total``
        samples in all: the loader streams a stored epoch's order and views chunk by chunk, so the
        first batch waits for its own rows, never for the whole epoch's."""
        ...

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of the un-augmented validation split."""
        ...


@runtime_checkable
class Dataset(Protocol):
    """What the engine, the loader, the renderers and the stages ask of a data set:
    ``InMemoryData`` and ``imagefolder.ImageFolderData``. Labels are int64 ``0..num_classes-1``."""

    kind: str  # the data set's family ("digits", "cifar100", "imagefolder", ...)
    num_classes: int
    mean: tuple[float, float, float]  # normalisation, in [0, 1] pixel units
    std: tuple[float, float, float]
    train_labels: torch.Tensor
    val_labels: torch.Tensor

    @property
    def num_train(self) -> int: ...

    @property
    def num_val(self) -> int: ...

    def default_plan(self, seed: int = 0, resolution: int | None = None) -> ViewPlan:
        """The view plan a run without a store draws from (the data set's augmentation policy)."""
        ...

    def train_sizes(self, indices: np.ndarray) -> np.ndarray:
        """(n, 2) int64 (height, width) of training samples ``indices``: what views are drawn against."""
        ...

    def val_views(self, plan: ViewPlan) -> np.ndarray:
        """(num_val, 5) centre views of the validation split."""
        ...

    def fingerprint(self) -> dict:
        """What identifies the training split; a store records it and stage 2 compares it."""
        ...

    def renderer(self, device, plan: ViewPlan, workers: int | None = None) -> Renderer: ...


def absolute_spec(spec: str) -> str:
    """``spec`` with its folder made absolute (``imagefolder:/abs/DIR``): what a store records so
    that stage 2 finds the data from any working directory."""
    kind, sep, path = spec.partition(":")
    if not sep or not path or "://" in spec:
        return spec
    return f"{kind}:{os.path.abspath(os.path.expanduser(path))}"


def load_store_data(store, spec: str | None = None) -> tuple[Dataset, str]:
    """(data set, its spec) for a logit store: ``spec`` when given (say, the folder has moved),
    else the spec the store records; either way its fingerprint must match the store's."""
    recorded = store.attrs.get("data_spec")
    if spec:
        data = load_data(spec)
    elif not recorded:
        raise DhkdError(f"store {store.path} does not record its data set (written by an older dhkd-pipe): pass --data")
    else:
        try:
            data = load_data(recorded)
        except DhkdError as e:
            raise DhkdError(f"the store's data set {recorded}: {e}; pass --data SPEC if it has moved") from None
    skipped = (store.attrs.get("dataset") or {}).get("skipped") or []
    if skipped:  # cache-teacher --skip-corrupt left these out: replay the same set
        if not (hasattr(data, "without") and isinstance(skipped, list) and all(isinstance(p, str) for p in skipped)):
            raise DhkdError(
                f"store {store.path} records skipped images it cannot leave out of {data.kind}"
                " (not a list of paths in an image folder)"
            )
        data = data.without(skipped)
    store.check_matches(data.fingerprint())
    return data, spec or recorded


def load_data(spec: str) -> Dataset:
    """One of ``DATA_SETS``: ``digits``, ``fashion-mnist[:DIR]``, ``mnist:DIR``, ``cifar10:DIR``,
    ``cifar100:DIR`` or ``imagefolder:DIR``; an in-memory one may end in ``@N``, a fixed
    stratified subset of N training images (``stratified_subset``), e.g. ``fashion-mnist@10000``."""
    from dhkd_pipe.data import readers

    head, mark, size = spec.rpartition(SUBSET_MARK)
    if mark and size.isdigit():
        if head.partition(":")[0] == "imagefolder":  # refused before scanning a large folder
            raise DhkdError(f"a training subset ({SUBSET_MARK}N) is for in-memory data sets, not {head!r}")
        return load_data(head).train_subset(int(size))
    kind, _, path = spec.partition(":")
    if kind == "digits":
        return readers.load_digits()
    if kind in ("mnist", "fashion-mnist"):
        if not path and kind == "mnist":
            raise DhkdError("--data mnist needs a folder: mnist:DIR (with the four *-ubyte[.gz] IDX files)")
        return readers.load_mnist(kind, path or readers.FASHION_MNIST_DIR)
    if kind in ("cifar10", "cifar100"):
        if not path:
            raise DhkdError(f"--data {kind} needs a folder: {kind}:DIR")
        return readers.load_cifar(kind, path)
    if kind == "imagefolder":
        if not path:
            raise DhkdError("--data imagefolder needs a folder: imagefolder:DIR (with train/CLASS/*.JPEG)")
        from dhkd_pipe.data.imagefolder import ImageFolderData

        return ImageFolderData.from_folder(path)
    raise DhkdError(
        f"unknown data set {spec!r}; use {', '.join(DATA_SETS[:-1])} or {DATA_SETS[-1]} "
        f"(an in-memory one with {SUBSET_MARK}N for a subset of N training images)"
    )
