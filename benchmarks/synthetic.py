"""Synthetic inputs of the benchmarks: a CIFAR-100-shaped folder of random pixels (100 classes: the
arithmetic of 32x32 data, not its accuracy), a randomly initialised teacher's weights, and logits
shaped like a trained teacher's."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from dhkd_pipe.config import CacheConfig
from dhkd_pipe.models import create_model


def write_synthetic_cifar(
    root: str, num_train: int = 2560, num_val: int = 256, classes: int = 100, seed: int = 0
) -> str:
    """A CIFAR-100 python-pickle folder of random images; returns the ``cifar100:DIR`` spec."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for name, n in (("train", num_train), ("test", num_val)):
        blob = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": rng.integers(0, classes, n).tolist(),
        }
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(blob, f)
    return f"cifar100:{root}"


def random_teacher(arch: str, num_classes: int, path: str) -> str:
    torch.manual_seed(0)
    torch.save({"model": create_model(arch, num_classes).state_dict()}, path)
    return path


def teacher_like_blocks(rows: int, classes: int, count: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Logits shaped like a trained teacher's: N(0, 2^2) with one class 8-12 above the rest (their
    fp16 bytes compress about as much as real logits do, which is little)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(count):
        x = (rng.standard_normal((rows, classes)) * 2.0).astype(np.float32)
        x[np.arange(rows), rng.integers(0, classes, rows)] += rng.uniform(8, 12, rows).astype(np.float32)
        blocks.append(x)
    return blocks


def cifar_store(work: str, teacher: str, num_train: int, batch_size: int) -> str:
    """A one-view stage-1 store of a random ``teacher`` over a synthetic CIFAR-100-shaped folder of
    ``num_train`` training and 64 validation images, both in ``work``; returns the store's path."""
    from dhkd_pipe.stages.cache_teacher import cache_teacher

    data = write_synthetic_cifar(os.path.join(work, "cifar"), num_train=num_train, num_val=64)
    weights = random_teacher(teacher, 100, os.path.join(work, "teacher.pt"))
    store = os.path.join(work, "cifar.zarr")
    cfg = CacheConfig(data=data, model=teacher, weights=weights, views=1, out=store, batch_size=batch_size)
    cache_teacher(cfg.validate(), log=lambda *_: None)
    return store


def jpeg_store(work: str, teacher: str, num_train: int, batch_size: int, resolution: int) -> str:
    """A one-view stage-1 store of a random 10-class ``teacher`` over a folder of ``num_train``
    400 x 300 training JPEGs (and 10 for validation) replayed at ``resolution``, both in ``work``;
    returns the store's path."""
    from dhkd_pipe.benchmarks.images import write_jpeg_folder
    from dhkd_pipe.stages.cache_teacher import cache_teacher

    images = write_jpeg_folder(os.path.join(work, "jpegs"), num_train, classes=10, num_val=10, size=(400, 300))
    weights = random_teacher(teacher, 10, os.path.join(work, "folder-teacher.pt"))
    store = os.path.join(work, "jpegs.zarr")
    cfg = CacheConfig(
        data=images,
        model=teacher,
        weights=weights,
        views=1,
        out=store,
        resolution=resolution,
        batch_size=batch_size,
        chunk_rows=batch_size * 4,
    )
    cache_teacher(cfg.validate(), log=lambda *_: None)
    return store
