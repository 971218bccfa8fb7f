"""Datasets: the bundled digits, MNIST/Fashion-MNIST IDX files, CIFAR-10/100, ImageNet-style folders.

``load_data(spec)`` is the one door in. Small data sets are held whole as one uint8 tensor
(N, 3, H, W) and views are rendered by gathers on the training device (``InMemoryViews``);
image folders are lists of files rendered by DALI (``dhkd_pipe.data.imagefolder``). Both kinds are a
``Dataset`` and their renderers a ``Renderer`` (the protocols below), so stages never branch on the
data set beyond choosing the renderer.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

from dhkd_pipe.errors import DhkdError

if (
    TYPE_CHECKING
):  # numpy, torch and the views are imported where data is loaded: the CLI's help (DATA_SETS) stays light
    import numpy as np
    import torch

    from dhkd_pipe.data.views import ViewPlan

DATA_SETS = (
    "digits",
    "fashion-mnist",
    "fashion-mnist:DIR",
    "mnist:DIR",
    "cifar10:DIR",
    "cifar100:DIR",
    "imagefolder:DIR",
)
# ``SPEC@N``: a fixed stratified subset of N training images of an in-memory data set.
SUBSET_MARK = "@"

# Where Debian's ``dataset-fashion-mnist`` package installs the four IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@runtime_checkable
class Renderer(Protocol):
    """Renders views of a data set as normalised float32 (n, 3, R, R) batches on its device:
    ``InMemoryViews`` (gathers) and ``dali_views.DaliViews`` (decoding). The loader asks for
    training views, ``inference.evaluate`` for the validation split."""

    def train_batches(self, indices: np.ndarray, views: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
        """Views ``(y, x, h, w, flip)`` of training samples ``indices``, in the given order,
        ``batch_size`` at a time (the last batch may be short)."""
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
    store.check_matches(data.fingerprint())
    return data, spec or recorded


def load_data(spec: str) -> Dataset:
    """One of ``DATA_SETS``: ``digits``, ``fashion-mnist[:DIR]``, ``mnist:DIR``, ``cifar10:DIR``,
    ``cifar100:DIR`` or ``imagefolder:DIR``; an in-memory one may end in ``@N``, a fixed
    stratified subset of N training images (``stratified_subset``), e.g. ``fashion-mnist@10000``."""
    head, mark, size = spec.rpartition(SUBSET_MARK)
    if mark and size.isdigit():
        if head.partition(":")[0] == "imagefolder":  # refused before scanning a large folder
            raise DhkdError(f"a training subset ({SUBSET_MARK}N) is for in-memory data sets, not {head!r}")
        return load_data(head).train_subset(int(size))
    kind, _, path = spec.partition(":")
    if kind == "digits":
        return load_digits()
    if kind in ("mnist", "fashion-mnist"):
        if not path and kind == "mnist":
            raise DhkdError("--data mnist needs a folder: mnist:DIR (with the four *-ubyte[.gz] IDX files)")
        return load_mnist(kind, path or FASHION_MNIST_DIR)
    if kind in ("cifar10", "cifar100"):
        if not path:
            raise DhkdError(f"--data {kind} needs a folder: {kind}:DIR")
        return load_cifar(kind, path)
    if kind == "imagefolder":
        if not path:
            raise DhkdError("--data imagefolder needs a folder: imagefolder:DIR (with train/CLASS/*.JPEG)")
        from dhkd_pipe.data.imagefolder import ImageFolderData

        return ImageFolderData.from_folder(path)
    raise DhkdError(
        f"unknown data set {spec!r}; use {', '.join(DATA_SETS[:-1])} or {DATA_SETS[-1]} "
        f"(an in-memory one with {SUBSET_MARK}N for a subset of N training images)"
    )


# The digits validation split: a bit mask over the 1,797 images (packed, hex), recorded from
# scikit-learn's train_test_split(arange(1797), test_size=0.2, stratify=target, random_state=0)
# (scikit-learn 1.9; a test recomputes it). Recorded, the split cannot move with the installed
# scikit-learn, and a process that loads digits does not import scikit-learn (about 1 s).
DIGITS_VAL_MASK = (
    "000004883524104000064100934205001a00080100240028062c12001000940a009019120420f8a0028110a000080a8820441524494240a0"
    "0a0000004004d80000818020004805c400104008a0100005404800301000020ec409000224840083a8013c20a6980a0000000b08400804a0"
    "184802024041c1008004404684376a810216004480004042a0a4180a5000840b8561c608108008004c80c02004068e00010882008100380"
    "803c008190000100e01008410a0210033282904c044c080680e0102830082008822a6402c24042108a860809081a00c02820242120138a41500"
)


def digits_arrays():
    """(images (1797, 8, 8) float64 in 0..16, targets (1797,) int64): scikit-learn's bundled
    digits, read from the package's CSV file without importing scikit-learn; its ``load_digits``
    where that file is not where scikit-learn 1.x keeps it."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.isfile(path):
        with gzip.open(path) as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    return bunch.images, bunch.target.astype(np.int64)


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of the digits images, sorted: the recorded stratified 80/20 split."""
    import numpy as np

    val = np.unpackbits(np.frombuffer(bytes.fromhex(DIGITS_VAL_MASK), np.uint8))[:1797].astype(bool)
    return np.flatnonzero(~val), np.flatnonzero(val)


def load_digits() -> InMemoryData:
    """scikit-learn's bundled 8x8 digits, upsampled x4 to 32x32 RGB; fixed stratified 80/20 split."""
    import numpy as np
    import torch

    pixels, target = digits_arrays()
    images = torch.from_numpy(pixels.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    images = torch.nn.functional.interpolate(images, scale_factor=4, mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(target)
    train_idx, val_idx = digits_split()
    train = images[train_idx].float() / 255
    mean = tuple(round(float(v), 4) for v in train.mean(dim=(0, 2, 3)))
    std = tuple(round(float(v), 4) for v in train.std(dim=(0, 2, 3)))
    return InMemoryData(
        kind="digits",
        train_images=images[train_idx].contiguous(),
        train_labels=labels[train_idx],
        val_images=images[val_idx].contiguous(),
        val_labels=labels[val_idx],
        num_classes=10,
        mean=mean,
        std=std,
        source="sklearn.datasets.load_digits",
    )


IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # ubyte data, 3 dims / 1 dim
MNIST_SIZE, MNIST_PAD = 28, 2  # 28x28 images, zero-padded to 32x32


def read_idx(path: str, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed or raw) as a uint8 array of its dims.

    Layout: a big-endian int32 magic (``0x0803`` images, ``0x0801`` labels: type byte 0x08,
    then the number of dims), one big-endian int32 per dim, then the bytes in C order.
    """
    import numpy as np

    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip's magic; an IDX file starts with two zero bytes
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DhkdError(f"missing IDX file {path}") from None
    except (OSError, EOFError, zlib.error) as e:  # unreadable, truncated or corrupt gzip stream
        raise DhkdError(f"cannot read IDX file {path}: {e}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        what = "images (idx3)" if magic == IDX_IMAGES else "labels (idx1)"
        found = f"magic 0x{raw[:4].hex()}" if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise DhkdError(f"malformed IDX file {path}: {found}, expected 0x{magic:08x} for {what}")
    if len(raw) < header:
        raise DhkdError(f"malformed IDX file {path}: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DhkdError(
            f"malformed IDX file {path}: dims {'x'.join(map(str, dims))} need {expected} bytes of data, "
            f"found {len(raw) - header}" + (" (truncated)" if len(raw) - header < expected else "")
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(root: str, name: str) -> str:
    """``name.gz`` if present, else ``name`` (the missing-file message names both)."""
    for candidate in (os.path.join(root, name + ".gz"), os.path.join(root, name)):
        if os.path.isfile(candidate):
            return candidate
    raise DhkdError(f"missing IDX file {os.path.join(root, name)}[.gz]")


def _mnist_split(root: str, split: str, classes: int):
    import numpy as np

    images_path = _idx_path(root, f"{split}-images-idx3-ubyte")
    labels_path = _idx_path(root, f"{split}-labels-idx1-ubyte")
    images, labels = read_idx(images_path, IDX_IMAGES), read_idx(labels_path, IDX_LABELS)
    if images.shape[1:] != (MNIST_SIZE, MNIST_SIZE):
        raise DhkdError(
            f"malformed IDX file {images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28"
        )
    if len(images) != len(labels):
        raise DhkdError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(labels) == 0:
        raise DhkdError(f"malformed IDX file {labels_path}: no samples")
    if labels.max() >= classes:
        raise DhkdError(f"malformed IDX file {labels_path}: label {int(labels.max())} outside 0..{classes - 1}")
    padded = np.pad(images, ((0, 0), (MNIST_PAD, MNIST_PAD), (MNIST_PAD, MNIST_PAD)))
    return padded, labels.astype(np.int64)


def _grey_stats(pixels: np.ndarray) -> tuple[float, float]:
    """Mean and (unbiased) std in [0, 1] of uint8 pixels, exact from their histogram."""
    import numpy as np

    counts = np.bincount(pixels.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255
    n = counts.sum()
    mean = float((counts * values).sum() / n)
    var = float((counts * (values - mean) ** 2).sum() / (n - 1))
    return mean, var**0.5


def load_mnist(kind: str, root: str) -> InMemoryData:
    """MNIST or Fashion-MNIST from the four IDX files in ``root`` (``*-ubyte.gz`` or ``*-ubyte``).

    The 28x28 grey images are zero-padded to 32x32 and repeated to 3 channels; the normalisation is
    the mean and std of the padded training images (what the network sees), rounded to 4 places.
    """
    import torch

    if not os.path.isdir(root):
        hint = " (install Debian's dataset-fashion-mnist or use fashion-mnist:DIR)" if root == FASHION_MNIST_DIR else ""
        raise DhkdError(f"{kind} folder not found: {root}{hint}")
    train_grey, train_labels = _mnist_split(root, "train", 10)
    val_grey, val_labels = _mnist_split(root, "t10k", 10)
    mean, std = (round(v, 4) for v in _grey_stats(train_grey))

    def rgb(grey: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(grey)[:, None].expand(-1, 3, -1, -1).contiguous()

    return InMemoryData(
        kind=kind,
        train_images=rgb(train_grey),
        train_labels=torch.from_numpy(train_labels),
        val_images=rgb(val_grey),
        val_labels=torch.from_numpy(val_labels),
        num_classes=10,
        mean=(mean,) * 3,
        std=(std,) * 3,
        source=os.path.abspath(root),
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Accepts only what the CIFAR python pickles hold: dicts, lists, bytes and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except FileNotFoundError:
        raise DhkdError(f"missing CIFAR file {path}") from None
    except Exception as e:  # any malformed or hostile pickle is the user's file, not a bug
        raise DhkdError(f"cannot read CIFAR file {path}: {e}") from None
    if not isinstance(obj, dict):
        raise DhkdError(f"malformed CIFAR file {path}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_arrays(path: str, label_key: str):
    import numpy as np

    d = _read_pickle(path)
    if "data" not in d or label_key not in d:
        raise DhkdError(f"malformed CIFAR file {path}: needs 'data' and '{label_key}'")
    data, labels = np.asarray(d["data"]), np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DhkdError(f"malformed CIFAR file {path}: data must be uint8 (N, 3072) with N labels")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(kind: str, root: str) -> InMemoryData:
    """The python-pickle CIFAR release: ``DIR`` or ``DIR/cifar-10-batches-py`` / ``DIR/cifar-100-python``."""
    import numpy as np
    import torch

    if not os.path.isdir(root):
        raise DhkdError(f"{kind} folder not found: {root}")
    sub = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    if os.path.isdir(os.path.join(root, sub)):
        root = os.path.join(root, sub)
    if kind == "cifar10":
        train_files, val_files, key, classes = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10
    else:
        train_files, val_files, key, classes = ["train"], ["test"], "fine_labels", 100

    def read(files):
        parts = [_cifar_arrays(os.path.join(root, f), key) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    (xt, yt), (xv, yv) = read(train_files), read(val_files)
    for y in (yt, yv):
        if y.min() < 0 or y.max() >= classes:
            raise DhkdError(f"malformed {kind} data in {root}: labels outside 0..{classes - 1}")
    mean, std = CIFAR_STATS[kind]
    return InMemoryData(
        kind=kind,
        train_images=torch.from_numpy(xt.copy()),
        train_labels=torch.from_numpy(yt),
        val_images=torch.from_numpy(xv.copy()),
        val_labels=torch.from_numpy(yv),
        num_classes=classes,
        mean=mean,
        std=std,
        source=os.path.abspath(root),
    )


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

    def val_batches(self, batch_size: int):
        """(images, labels) of the un-augmented validation split."""
        import numpy as np

        for start in range(0, self.data.num_val, batch_size):
            idx = np.arange(start, min(start + batch_size, self.data.num_val))
            yield self.val(idx), self.data.val_labels[start : start + len(idx)]
