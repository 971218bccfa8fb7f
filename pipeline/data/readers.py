"""The files of the in-memory data sets, read into ``InMemoryData``: scikit-learn's bundled
digits, MNIST/Fashion-MNIST IDX files and the CIFAR-10/100 python pickles. Every malformed file is
a user error that names it."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zlib
from typing import TYPE_CHECKING

from dhkd_pipe.data.in_memory import InMemoryData
from dhkd_pipe.errors import DhkdError

if TYPE_CHECKING:
    import numpy as np
    import torch

# Where Debian's ``dataset-fashion-mnist`` package installs the four IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


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
