"""``SPEC@N``: a fixed stratified subset of an in-memory data set's training split."""

import numpy as np
import pytest
import torch
from test_idx import NAMES, idx_bytes, write_file

from dhkd_pipe.data.datasets import load_data
from dhkd_pipe.data.in_memory import stratified_subset
from dhkd_pipe.errors import DhkdError


def write_labelled_mnist(root, train_labels, n_val=7, seed=0):
    """IDX files whose training labels are given; images random."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    train_labels = np.asarray(train_labels, dtype=np.uint8)
    splits = {
        "train": (rng.integers(0, 256, (len(train_labels), 28, 28), dtype=np.uint8), train_labels),
        "t10k": (rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_val).astype(np.uint8)),
    }
    for split, (images, labels) in splits.items():
        write_file(root, NAMES[split, "images"], idx_bytes(images), True)
        write_file(root, NAMES[split, "labels"], idx_bytes(labels), True)
    return splits


def test_subset_is_stratified_fixed_and_a_slice_of_the_split(tmp_path):
    # Class c has 10 + 2c images (N = 190);
    labels = np.repeat(np.arange(10), 10 + 2 * np.arange(10))
    np.random.default_rng(1).shuffle(labels)
    write_labelled_mnist(tmp_path / "m", labels)
    full = load_data(f"fashion-mnist:{tmp_path / 'm'}")
    sub = load_data(f"fashion-mnist:{tmp_path / 'm'}@57")
    assert sub.num_train == 57 and sub.num_val == full.num_val
    # 57 = 30% of them: 3.0, 3.6, 4.2, 4.8, 5.4, 6.0, 6.6, 7.2, 7.8, 8.4; floors sum to 53, the 4 left
    # go to the largest fractions: .8 (classes 3, 8), .6 (classes 1, 6).
    expect = [3, 4, 4, 5, 5, 6, 7, 7, 8, 8]
    assert np.bincount(sub.train_labels.numpy(), minlength=10).tolist() == expect
    keep = stratified_subset(full.train_labels.numpy(), 57, 10)
    assert np.all(np.diff(keep) > 0)  # sorted, no repeats: the split's order is kept
    assert torch.equal(sub.train_images, full.train_images[keep]) and torch.equal(
        sub.train_labels, full.train_labels[keep]
    )
    assert torch.equal(sub.val_images, full.val_images) and (sub.mean, sub.std) == (full.mean, full.std)
    again = load_data(f"fashion-mnist:{tmp_path / 'm'}@57")
    assert again.fingerprint() == sub.fingerprint()
    assert sub.fingerprint()["num_samples"] == 57 and sub.fingerprint()["digest"] != full.fingerprint()["digest"]
    assert full.fingerprint()["num_samples"] == 190  # the subset left the source untouched
    assert load_data(f"fashion-mnist:{tmp_path / 'm'}@190").fingerprint() == full.fingerprint()


def test_subset_within_a_class_follows_one_fixed_permutation():
    labels = np.array([0, 1] * 50)
    keep = stratified_subset(labels, 10, 2)
    perm = np.random.default_rng(0).permutation(100)
    assert keep.tolist() == sorted([i for i in perm if labels[i] == 0][:5] + [i for i in perm if labels[i] == 1][:5])


def test_subset_of_digits_and_its_errors():
    d = load_data("digits@200")
    assert d.num_train == 200 and sorted(set(d.train_labels.tolist())) == list(range(10))
    with pytest.raises(DhkdError, match=r"between 10 \(one per class\) and 1437"):
        load_data("digits@5")
    with pytest.raises(DhkdError, match="between 10"):
        load_data("digits@2000")
    with pytest.raises(DhkdError, match="unknown data set 'digits@x'"):
        load_data("digits@x")
    with pytest.raises(DhkdError, match="in-memory data sets"):
        load_data("imagefolder:/nonexistent@10")  # refused before the folder is read
