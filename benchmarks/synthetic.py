"""Synthetic inputs of the benchmarks: a CIFAR-100-shaped folder of random pixels (100 classes: the
arithmetic of 32x32 data, not its accuracy), a randomly initialised teacher's weights, and logits
shaped like a trained teacher's."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

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
