"""Data sets and the in-memory renderer."""

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dhkd_pipe.data.datasets import load_data
from dhkd_pipe.errors import DhkdError


def write_cifar(root, kind="cifar100", n_train=40, n_val=10, seed=0):
    rng = np.random.default_rng(seed)
    classes, key = (100, b"fine_labels") if kind == "cifar100" else (10, b"labels")
    files = (
        {"train": n_train, "test": n_val}
        if kind == "cifar100"
        else {**{f"data_batch_{i}": n_train // 5 for i in range(1, 6)}, "test_batch": n_val}
    )
    os.makedirs(root, exist_ok=True)
    for name, n in files.items():
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(
                {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}, f
            )
    return root


def test_digits_split_is_fixed_stratified_and_32px():
    d = load_data("digits")
    assert (d.num_train, d.num_val, d.num_classes) == (1437, 360, 10)
    assert d.train_images.shape == (1437, 3, 32, 32) and d.train_images.dtype == torch.uint8
    counts = torch.bincount(d.val_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert d.fingerprint() == load_data("digits").fingerprint()


def test_digits_are_scikit_learns_images_and_split():
    """The pixels and targets read from scikit-learn's bundled file equal its ``load_digits``; the
    recorded split equals its ``train_test_split``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from dhkd_pipe.data.readers import digits_arrays, digits_split

    bunch = load_digits()
    pixels, target = digits_arrays()
    assert np.array_equal(pixels, bunch.images) and np.array_equal(target, bunch.target)
    train, val = train_test_split(np.arange(len(target)), test_size=0.2, stratify=bunch.target, random_state=0)
    got_train, got_val = digits_split()
    assert np.array_equal(got_train, np.sort(train)) and np.array_equal(got_val, np.sort(val))


@pytest.mark.slow
def test_loading_digits_imports_no_scikit_learn():
    import subprocess
    import sys

    code = (
        "import sys; from dhkd_pipe.data.datasets import load_data; load_data('digits'); "
        "print(any(m.startswith('sklearn') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_folder_loads(tmp_path, kind):
    write_cifar(tmp_path / "c", kind)
    d = load_data(f"{kind}:{tmp_path / 'c'}")
    assert d.num_train == 40 and d.num_val == 10 and d.train_images.shape[1:] == (3, 32, 32)
    assert d.num_classes == (10 if kind == "cifar10" else 100)


class Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_unpickler_refuses_anything_but_arrays(tmp_path):
    root = write_cifar(tmp_path / "c")
    with open(os.path.join(root, "train"), "wb") as f:
        pickle.dump({b"data": Hostile(), b"fine_labels": [0]}, f)
    with pytest.raises(DhkdError, match="refusing to load"):
        load_data(f"cifar100:{root}")


def test_cifar_errors_are_one_line(tmp_path):
    with pytest.raises(DhkdError, match="not found"):
        load_data(f"cifar100:{tmp_path / 'missing'}")
    root = write_cifar(tmp_path / "c")
    with open(os.path.join(root, "test"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DhkdError, match="cannot read CIFAR file"):
        load_data(f"cifar100:{root}")
    with pytest.raises(DhkdError, match="unknown data set"):
        load_data("svhn")


def test_in_memory_render_equals_pad_crop_flip():
    d = load_data("digits")
    plan = d.default_plan(seed=3)
    idx = plan.order(0, d.num_train)[:64]
    views = plan.views(0, idx, d.train_sizes(idx))
    r = d.renderer("cpu", plan)
    out = r.train(idx, views)
    mean = torch.tensor(d.mean).view(3, 1, 1)
    std = torch.tensor(d.std).view(3, 1, 1)
    for j, i in enumerate(idx):
        y, x, h, w, flip = views[j]
        img = F.pad(d.train_images[i].float() / 255, (4, 4, 4, 4))[:, y + 4 : y + 4 + h, x + 4 : x + 4 + w]
        img = img.flip(-1) if flip else img
        torch.testing.assert_close(out[j], (img - mean) / std, atol=1e-5, rtol=1e-5)
    assert views[:, 4].any() and (views[:, 0] != 0).any()  # flips and shifts really happened


def test_train_batches_follow_the_given_order():
    d = load_data("digits")
    plan = d.default_plan()
    idx = np.arange(10)[::-1].copy()
    views = plan.views(0, idx, d.train_sizes(idx))
    r = d.renderer("cpu", plan)
    batches = list(r.train_batches(idx, views, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    torch.testing.assert_close(torch.cat(batches), r.train(idx, views))
