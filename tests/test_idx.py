"""MNIST / Fashion-MNIST from IDX files: the reader, padding, normalisation and one-line errors.

The tests write their own small IDX files (never the Debian package's), raw and gzip-compressed.
"""

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dhkd_pipe.cli import main
from dhkd_pipe.data import readers
from dhkd_pipe.data.datasets import load_data
from dhkd_pipe.errors import DhkdError

NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("t10k", "images"): "t10k-images-idx3-ubyte",
    ("t10k", "labels"): "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """The IDX encoding written out by hand: big-endian magic 0x08 0x0D (ubyte, D dims), dims, bytes."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_file(root, name: str, payload: bytes, compress: bool):
    path = os.path.join(root, name + (".gz" if compress else ""))
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if compress else payload)
    return path


def write_mnist(root, compress=True, n_train=12, n_val=5, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_val)):
        arrays[split] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8))
        write_file(root, NAMES[split, "images"], idx_bytes(arrays[split][0]), compress)
        write_file(root, NAMES[split, "labels"], idx_bytes(arrays[split][1]), compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_idx_files_load_padded_rgb_with_train_statistics(tmp_path, compress):
    arrays = write_mnist(tmp_path / "m", compress=compress)
    d = load_data(f"mnist:{tmp_path / 'm'}")
    assert (d.kind, d.num_train, d.num_val, d.num_classes) == ("mnist", 12, 5, 10)
    assert d.train_images.shape == (12, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.val_images.shape == (5, 3, 32, 32)
    for images, (src, labels), split_labels in (
        (d.train_images, arrays["train"], d.train_labels),
        (d.val_images, arrays["t10k"], d.val_labels),
    ):
        assert torch.equal(split_labels, torch.from_numpy(labels.astype(np.int64)))
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
        assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(src))
        border = images.clone()
        border[:, :, 2:30, 2:30] = 0
        assert int(border.sum()) == 0  # a 2-pixel zero frame around the 28x28 image
    padded = np.pad(arrays["train"][0], ((0, 0), (2, 2), (2, 2))).astype(np.float64) / 255
    assert d.mean == (round(padded.mean(), 4),) * 3
    assert d.std == (round(padded.std(ddof=1), 4),) * 3
    # Validation views render the whole padded image, normalised with the training statistics.
    r = d.renderer("cpu", d.default_plan())
    expect = (torch.from_numpy(np.pad(arrays["t10k"][0], ((0, 0), (2, 2), (2, 2)))).float() / 255 - d.mean[0]) / d.std[
        0
    ]
    assert torch.allclose(r.val(np.arange(5)), expect[:, None].expand(-1, 3, -1, -1), atol=1e-5)


def test_fingerprint_is_stable_and_follows_the_content(tmp_path):
    write_mnist(tmp_path / "gz", compress=True)
    write_mnist(tmp_path / "raw", compress=False)
    write_mnist(tmp_path / "other", seed=1)
    fp = load_data(f"fashion-mnist:{tmp_path / 'gz'}").fingerprint()
    assert fp == load_data(f"fashion-mnist:{tmp_path / 'gz'}").fingerprint()
    assert fp == load_data(f"fashion-mnist:{tmp_path / 'raw'}").fingerprint()
    assert fp["kind"] == "fashion-mnist" and fp["num_samples"] == 12 and fp["image_size"] == [32, 32]
    assert fp["digest"] != load_data(f"fashion-mnist:{tmp_path / 'other'}").fingerprint()["digest"]
    assert fp["kind"] != load_data(f"mnist:{tmp_path / 'gz'}").fingerprint()["kind"]


def test_plain_fashion_mnist_reads_the_debian_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "FASHION_MNIST_DIR", str(tmp_path / "deb"))
    with pytest.raises(DhkdError, match="dataset-fashion-mnist"):
        load_data("fashion-mnist")
    write_mnist(tmp_path / "deb")
    d = load_data("fashion-mnist")
    assert d.kind == "fashion-mnist" and d.source == str(tmp_path / "deb")


def one_line_error(spec: str, match: str) -> str:
    with pytest.raises(DhkdError, match=match) as e:
        load_data(spec)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_truncated_file_is_one_line(tmp_path, compress):
    root = tmp_path / "m"
    arrays = write_mnist(root, compress=compress)
    payload = idx_bytes(arrays["train"][0])
    write_file(root, NAMES["train", "images"], payload[:-100], compress)
    msg = one_line_error(f"mnist:{root}", r"truncated")
    assert "train-images-idx3-ubyte" in msg and "12x28x28" in msg
    if compress:  # a gzip stream cut short is also a one-line error
        path = write_file(root, NAMES["train", "images"], payload, True)
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[: len(blob) // 2])
        one_line_error(f"mnist:{root}", r"cannot read IDX file .*train-images")
    write_file(root, NAMES["train", "images"], payload[:6], compress)  # cut inside the dims
    one_line_error(f"mnist:{root}", r"truncated header")


def test_wrong_magic_is_one_line(tmp_path):
    root = tmp_path / "m"
    arrays = write_mnist(root)
    write_file(root, NAMES["t10k", "labels"], idx_bytes(arrays["t10k"][0]), True)  # images where labels go
    one_line_error(f"mnist:{root}", r"t10k-labels.*magic 0x00000803, expected 0x00000801")
    write_file(root, NAMES["t10k", "labels"], idx_bytes(arrays["t10k"][1], magic=0x00000D01), True)  # float32 type
    one_line_error(f"mnist:{root}", r"magic 0x00000d01")
    write_file(root, NAMES["t10k", "labels"], b"\x00\x00", True)
    one_line_error(f"mnist:{root}", r"only 2 bytes")


def test_label_out_of_range_is_one_line(tmp_path):
    root = tmp_path / "m"
    arrays = write_mnist(root)
    labels = arrays["train"][1].copy()
    labels[3] = 10
    write_file(root, NAMES["train", "labels"], idx_bytes(labels), True)
    one_line_error(f"mnist:{root}", r"train-labels.*label 10 outside 0\.\.9")


def test_missing_file_dims_and_count_mismatch_are_one_line(tmp_path):
    root = tmp_path / "m"
    arrays = write_mnist(root, compress=False)
    one_line_error(f"mnist:{tmp_path / 'absent'}", r"mnist folder not found")
    one_line_error("mnist", r"needs a folder: mnist:DIR")
    os.remove(os.path.join(root, NAMES["t10k", "labels"]))
    one_line_error(f"mnist:{root}", r"missing IDX file .*t10k-labels-idx1-ubyte\[\.gz\]")
    write_file(root, NAMES["t10k", "labels"], idx_bytes(arrays["t10k"][1][:4]), False)
    one_line_error(f"mnist:{root}", r"holds 5 images but .* holds 4 labels")
    write_file(root, NAMES["t10k", "images"], idx_bytes(arrays["t10k"][0][:, :, :27]), False)
    one_line_error(f"mnist:{root}", r"images are 28x27, expected 28x28")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = CliRunner().invoke(
        main, ["eval", "--model", "resnet8", "--weights", "w.pt", "--data", f"mnist:{tmp_path}"]
    )
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "missing IDX file" in result.output
