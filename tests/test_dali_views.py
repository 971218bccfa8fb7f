"""The image-folder data set and its DALI replay pipeline (CPU), against a Pillow oracle."""

import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from dhkd_pipe.data.dali_renderer import DaliViews, render_reference  # noqa: E402
from dhkd_pipe.data.datasets import load_data  # noqa: E402
from dhkd_pipe.data.imagefolder import ImageFolderData  # noqa: E402
from dhkd_pipe.errors import DhkdError  # noqa: E402

RES = 32
HEIGHT, WIDTH = 40, 48


def _write_folder(root, per_class=5, val_per_class=2):
    """scikit-learn digits as coloured 48x40 JPEGs: 3 classes, train and val."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {}
    for image, label in zip(digits.images, digits.target, strict=True):
        if label >= 3 or counts.get(label, 0) >= per_class + val_per_class:
            continue
        k = counts[label] = counts.get(label, 0) + 1
        split = "val" if k > per_class else "train"
        gray = Image.fromarray((image / 16 * 255).astype(np.uint8)).resize((WIDTH, HEIGHT), Image.BILINEAR)
        g = np.asarray(gray)
        rgb = np.stack([g, 255 - g, np.full_like(g, 30 * k)], axis=-1)
        os.makedirs(root / split / f"class{label}", exist_ok=True)
        Image.fromarray(rgb).save(root / split / f"class{label}" / f"{k:03d}.JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("jpegs"))


@pytest.fixture(scope="module")
def data(folder):
    return load_data(f"imagefolder:{folder}")


@pytest.fixture(scope="module")
def renderer(data):
    r = DaliViews(data, data.default_plan(resolution=RES), "cpu", num_workers=2)
    # the first call sizes the pipeline for batches of 8: smaller batches reuse it
    list(
        r.train_batches(
            np.arange(8), data.default_plan(resolution=RES).views(0, np.arange(8), data.train_sizes(np.arange(8))), 8
        )
    )
    yield r
    r.close()


def _views(data, indices, epoch=0):
    plan = data.default_plan(seed=3, resolution=RES)
    return plan.views(epoch, indices, data.train_sizes(indices))


def test_folder_parsing_and_fingerprint(folder, data):
    assert isinstance(data, ImageFolderData) and data.kind == "imagefolder"
    assert data.num_classes == 3 and data.num_train == 15 and data.num_val == 6
    assert data.train_labels.dtype == torch.int64 and data.train_labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert data.val_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.train_files[0].endswith(os.path.join("train", "class0", "001.JPEG"))
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    plan = data.default_plan(seed=5)
    assert plan.policy == "random_resized_crop_flip" and plan.resolution == 224 and plan.seed == 5
    fp = data.fingerprint()
    assert fp["kind"] == "imagefolder" and fp["num_samples"] == 15 and fp["num_classes"] == 3
    # the digest depends on the relative file list only, not on where the folder lives
    moved = folder.parent / (folder.name + "_copy")
    shutil.copytree(folder, moved)
    assert ImageFolderData.from_folder(str(moved)).fingerprint() == fp
    os.rename(moved / "train" / "class2" / "005.JPEG", moved / "train" / "class2" / "006.JPEG")
    assert ImageFolderData.from_folder(str(moved)).fingerprint()["digest"] != fp["digest"]
    shutil.rmtree(moved)


def test_train_sizes_and_val_views(data):
    sizes = data.train_sizes(np.array([3, 0, 14]))
    assert sizes.dtype == np.int64 and sizes.tolist() == [[HEIGHT, WIDTH]] * 3
    v = data.val_views(data.default_plan(resolution=RES))
    assert v.shape == (6, 5) and v[0].tolist() == [2, 6, 35, 35, 0]


def test_user_errors(tmp_path):
    with pytest.raises(DhkdError, match="not found"):
        load_data(f"imagefolder:{tmp_path / 'nowhere'}")
    with pytest.raises(DhkdError, match="train"):
        load_data(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DhkdError, match="no images"):
        load_data(f"imagefolder:{tmp_path}")


def test_shape_order_and_batch_size_invariance(data, renderer):
    idx = np.array([14, 0, 7, 3, 3, 11, 5, 9, 1, 12, 2])
    views = _views(data, idx)
    full = {}
    for bs in (8, 3, 1):
        batches = list(renderer.train_batches(idx, views, bs))
        assert [len(b) for b in batches] == [min(bs, len(idx) - s) for s in range(0, len(idx), bs)]
        assert all(b.dtype == torch.float32 and b.shape[1:] == (3, RES, RES) for b in batches)
        full[bs] = torch.cat(batches)
    assert torch.equal(full[8], full[3]) and torch.equal(full[8], full[1])
    # the same view of a sample gives the same pixels wherever it sits
    assert torch.equal(full[8][3], full[8][4])
    # order: each row is its own sample (rendered alone it matches)
    alone = torch.cat(list(renderer.train_batches(idx[5:6], views[5:6], 4)))
    assert torch.equal(alone[0], full[8][5])


def test_close_to_the_pillow_reference(data, renderer):
    idx = np.arange(data.num_train)
    views = _views(data, idx, epoch=1)
    views[:, 4] = np.arange(len(idx)) % 2  # both flips
    out = torch.cat(list(renderer.train_batches(idx, views, 8)))
    for i in idx:
        ref = render_reference(data.train_files[i], views[i], RES, data.mean, data.std)
        diff = (out[i] - ref).abs()
        assert diff.mean() < 0.02 and diff.max() < 0.3, (i, diff.mean(), diff.max())
    # and a flipped view is the mirror of the unflipped one
    flipped = views.copy()
    flipped[:, 4] ^= 1
    out2 = torch.cat(list(renderer.train_batches(idx, flipped, 8)))
    assert torch.allclose(out2, out.flip(-1), atol=1e-5)


def test_box_outside_the_image_pads_with_zero(data, renderer):
    views = np.array([[-10, -12, 30, 30, 0], [HEIGHT - 15, WIDTH - 20, 30, 30, 1], [100, 100, 8, 8, 0]], np.int32)
    out = torch.cat(list(renderer.train_batches(np.array([2, 2, 2]), views, 8)))
    zero = (-torch.tensor(data.mean) / torch.tensor(data.std)).view(3, 1)
    assert torch.allclose(out[0, :, :8, :8].reshape(3, -1), zero.expand(3, 64), atol=1e-5)  # top-left padding
    assert torch.allclose(out[1, :, -8:, :8].reshape(3, -1), zero.expand(3, 64), atol=1e-5)  # bottom, mirrored right
    assert torch.allclose(out[2].reshape(3, -1), zero.expand(3, RES * RES), atol=1e-5)  # wholly outside
    for i in range(2):
        ref = render_reference(data.train_files[2], views[i], RES, data.mean, data.std)
        assert (out[i] - ref).abs().mean() < 0.02


def test_val_batches(data, renderer):
    batches = list(renderer.val_batches(4))
    assert [len(x) for x, _ in batches] == [4, 2]
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels, data.val_labels)
    images = torch.cat([x for x, _ in batches])
    views = data.val_views(renderer.plan)
    for i in range(data.num_val):
        ref = render_reference(data.val_files[i], views[i], RES, data.mean, data.std)
        assert (images[i] - ref).abs().mean() < 0.02


def test_abandoned_generator_then_new_epoch(data, renderer):
    idx = np.arange(12)
    views = _views(data, idx, epoch=2)
    gen = renderer.train_batches(idx, views, 2)
    first = next(gen)
    del gen
    again = torch.cat(list(renderer.train_batches(idx, views, 2)))
    assert torch.equal(again[:2], first) and len(again) == 12


def test_corrupt_image_names_the_file(folder, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(folder, root)
    bad = root / "train" / "class1" / "003.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" + bytes(range(256)) * 4)
    data = ImageFolderData.from_folder(str(root))
    i = data.train_files.index(str(bad))
    with pytest.raises(DhkdError, match="003.JPEG"):
        data.train_sizes([i])
    r = DaliViews(data, data.default_plan(resolution=RES), "cpu", num_workers=0)  # the in-process reader
    idx = np.array([0, i, 1])
    views = np.array([[0, 0, HEIGHT, WIDTH, 0]] * 3, np.int32)
    with pytest.raises(DhkdError, match=r"class1.003\.JPEG"):
        list(r.train_batches(idx, views, 2))
    # the renderer recovers for good files
    out = torch.cat(list(r.train_batches(idx[[0, 2]], views[[0, 2]], 2)))
    assert out.shape == (2, 3, RES, RES)
    r.close()


def test_empty_class_and_unknown_val_class_are_user_errors(folder, tmp_path):
    root = tmp_path / "f"
    shutil.copytree(folder, root)
    (root / "train" / "class9").mkdir()
    with pytest.raises(DhkdError, match=r"class9 holds no images"):
        ImageFolderData.from_folder(str(root))
    (root / "train" / "class9").rmdir()
    (root / "val" / "extra").mkdir()
    with pytest.raises(DhkdError, match="train/ lacks: extra"):
        ImageFolderData.from_folder(str(root))


def test_classes_digest_and_threaded_header_reads(folder, data, tmp_path):
    from dhkd_pipe.data.imagefolder import _image_sizes

    root = tmp_path / "renamed"
    shutil.copytree(folder, root)
    os.rename(root / "train" / "class2", root / "train" / "zebra")
    os.rename(root / "val" / "class2", root / "val" / "zebra")
    fp = ImageFolderData.from_folder(str(root)).fingerprint()
    assert fp["classes_digest"] != data.fingerprint()["classes_digest"]
    paths = data.train_files * 20  # enough to take the thread pool
    assert _image_sizes(paths).tolist() == [[HEIGHT, WIDTH]] * len(paths)


def test_truncated_jpeg_through_the_parallel_workers_names_the_file(folder, tmp_path):
    root = tmp_path / "trunc"
    shutil.copytree(folder, root)
    bad = root / "train" / "class0" / "002.JPEG"
    data_bytes = bad.read_bytes()
    bad.write_bytes(data_bytes[: len(data_bytes) // 2])  # the header parses; the pixels are cut short
    data = ImageFolderData.from_folder(str(root))
    i = data.train_files.index(str(bad))
    assert data.train_sizes([i]).tolist() == [[HEIGHT, WIDTH]]
    r = DaliViews(data, data.default_plan(resolution=RES), "cpu", num_workers=1)
    idx = np.array([0, 2, i, 3])
    views = np.array([[0, 0, HEIGHT, WIDTH, 0]] * 4, np.int32)
    with pytest.raises(DhkdError, match=r"class0.002\.JPEG"):
        list(r.train_batches(idx, views, 2))
    r.close()


def test_one_decode_renders_every_view_with_the_replayed_pixels(data):
    """Stage 1's decode-once rendering (``image_batches``) gives, for every view of every image,
    exactly the pixels stage 2 replays (``train_batches``), with the region decode (the CPU's
    default) and with the whole-image decode; it decodes each image once, the replay once a view."""
    idx = np.arange(data.num_train)[::-1].copy()
    plan = data.default_plan(seed=3, resolution=RES)
    count = 4
    views = np.stack([plan.views(e, idx, data.train_sizes(idx)) for e in range(count)], axis=1)
    views[:, 3] = [-9, -7, 30, 30, 1]  # boxes that reach past the image too
    views[::2, 3] = [HEIGHT - 12, WIDTH - 9, 20, 25, 0]
    for decode in ("region", "full"):
        r = DaliViews(data, plan, "cpu", num_workers=1, decode=decode)
        batches = list(r.image_batches(idx, views, 4))
        assert [tuple(b.shape) for b in batches] == [(4, count, 3, RES, RES)] * 3 + [(3, count, 3, RES, RES)]
        assert r.decoded_images == len(idx)
        once = torch.cat(batches)
        replayed = torch.cat(list(r.train_batches(np.repeat(idx, count), views.reshape(-1, 5), 8)))
        assert r.decoded_images == len(idx) * (1 + count)
        assert torch.equal(once, replayed.view(len(idx), count, 3, RES, RES)), decode
        r.close()
    with pytest.raises(ValueError, match=r"\(len\(indices\), V, 5\)"):
        DaliViews(data, plan, "cpu", num_workers=0).image_batches(idx, views[:, 0], 4)


def test_region_decode_equals_the_region_of_a_whole_decode(tmp_path):
    """libjpeg-turbo's region decode (``decoders.image_slice``) against a whole decode and a slice,
    for JPEGs in every chroma subsampling, progressive and grayscale, at random boxes: equal bit
    for bit, so on the CPU stage 2 may decode regions while stage 1 decodes each image once."""
    from PIL import Image

    rng = np.random.default_rng(0)
    height, width = 75, 101  # not a multiple of the 16-pixel MCU
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 2.5, yy * 3.0, 128 + 100 * np.sin(xx / 3.0) * np.cos(yy / 2.0)], -1)
    pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
    variants = {
        "420": dict(subsampling=2),
        "422": dict(subsampling=1),
        "444": dict(subsampling=0),
        "progressive": dict(progressive=True),
    }
    os.makedirs(tmp_path / "train" / "a")
    for name, options in variants.items():
        Image.fromarray(pixels).save(tmp_path / "train" / "a" / f"{name}.jpg", quality=90, **options)
    Image.fromarray(pixels).convert("L").save(tmp_path / "train" / "a" / "gray.jpg", quality=90)
    data = load_data(f"imagefolder:{tmp_path}")
    n, per = data.num_train, 40
    h = rng.integers(1, height + 1, (n, per))
    w = rng.integers(1, width + 1, (n, per))
    views = np.stack(
        [rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w, rng.integers(0, 2, (n, per))], -1
    )
    plan = data.default_plan(resolution=RES)
    rendered = {}
    for decode in ("region", "full"):
        r = DaliViews(data, plan, "cpu", num_workers=0, decode=decode)
        rendered[decode] = torch.cat(list(r.train_batches(np.repeat(np.arange(n), per), views.reshape(-1, 5), 40)))
        r.close()
    assert torch.equal(rendered["region"], rendered["full"])


# --- corrupt images: damaged entropy data is refused, naming the file --------------------------------


@pytest.mark.parametrize("kind", ["noise", "zeros", "marker", "cut"])
def test_decode_problem_finds_damaged_entropy_data(folder, tmp_path, kind):
    """Pillow decodes these without a word; the check reads libjpeg's warning back."""
    from conftest import damage_jpeg_entropy
    from PIL import Image

    from dhkd_pipe.data.corrupt_images import check_image, decode_problem

    sound = folder / "train" / "class0" / "001.JPEG"
    assert decode_problem(str(sound)) is None
    bad = tmp_path / "bad.JPEG"
    shutil.copy(sound, bad)
    damage_jpeg_entropy(bad, kind)
    with Image.open(bad) as im:
        im.load()  # no error: the decoder only warned
    assert check_image(str(bad)) is None
    assert "Corrupt JPEG data" in (decode_problem(str(bad)) or "")


def _damaged_copy(folder, tmp_path, name="class1/003.JPEG", split="train", kind="noise", at=0.5):
    from conftest import damage_jpeg_entropy

    root = tmp_path / "damaged"
    shutil.copytree(folder, root)
    damage_jpeg_entropy(root / split / name, kind, at)
    return root, str(root / split / name)


@pytest.mark.parametrize("workers", [0, 1])
def test_damaged_jpeg_in_replayed_views_names_the_file(folder, tmp_path, workers):
    root, bad = _damaged_copy(folder, tmp_path)
    data = ImageFolderData.from_folder(str(root))
    i = data.train_files.index(bad)
    r = DaliViews(data, data.default_plan(resolution=RES), "cpu", num_workers=workers)
    idx = np.array([0, 1, i, 2])
    views = np.array([[0, 0, HEIGHT, WIDTH, 0]] * 4, np.int32)
    try:
        with pytest.raises(DhkdError, match=r"cannot decode image .*class1.003\.JPEG: the JPEG decoder reports"):
            list(r.train_batches(idx, views, 2))
        out = torch.cat(list(r.train_batches(idx[[0, 1, 3]], views[[0, 1, 3]], 2)))  # the sound ones still render
        assert out.shape == (3, 3, RES, RES)
    finally:
        r.close()


def test_damaged_jpeg_in_decode_once_and_validation_names_the_file(folder, tmp_path):
    root, bad = _damaged_copy(folder, tmp_path, kind="marker")
    data = ImageFolderData.from_folder(str(root))
    i = data.train_files.index(bad)
    r = DaliViews(data, data.default_plan(resolution=RES), "cpu", num_workers=1)
    idx = np.array([i, 0])
    views = np.array([[[0, 0, HEIGHT, WIDTH, 0], [2, 2, 20, 20, 1]]] * 2, np.int32)
    try:
        with pytest.raises(DhkdError, match=r"class1.003\.JPEG"):
            list(r.image_batches(idx, views, 2))
    finally:
        r.close()
    # whole decodes (as on a GPU): a region decode stops after the region's last row, before libjpeg
    # could notice that the codes it read were damaged
    root2, bad_val = _damaged_copy(folder, tmp_path / "v", name="class2/006.JPEG", split="val", kind="marker")
    data2 = ImageFolderData.from_folder(str(root2))
    r2 = DaliViews(data2, data2.default_plan(resolution=RES), "cpu", num_workers=1, decode="full")
    try:
        with pytest.raises(DhkdError, match=r"val.class2.006\.JPEG"):
            list(r2.val_batches(4))
    finally:
        r2.close()


def test_skipped_images_are_left_out_and_recorded_in_the_fingerprint(folder, tmp_path):
    root, bad = _damaged_copy(folder, tmp_path)
    data = ImageFolderData.from_folder(str(root))
    kept = data.without_corrupt(workers=0)
    assert kept.skipped == ("train/class1/003.JPEG",) and bad not in kept.train_files
    assert kept.num_train == data.num_train - 1 and kept.num_val == data.num_val
    assert kept.fingerprint()["skipped"] == ["train/class1/003.JPEG"]
    assert kept.fingerprint()["digest"] != data.fingerprint()["digest"]
    again = data.without(["train/class1/003.JPEG"])  # what stage 2 replays from the store's record
    assert again.fingerprint() == kept.fingerprint()
    assert "skipped" not in data.fingerprint()  # a folder with nothing skipped keeps its old fingerprint


def test_a_schedule_streamed_in_pieces_renders_as_one_and_is_taken_as_needed(data):
    """The loader hands DALI an epoch's schedule chunk by chunk: the first batch does not wait for
    the last piece, and the pixels equal those of the whole schedule given at once."""
    r = DaliViews(data, data.default_plan(resolution=RES), "cpu", num_workers=1, pipeline_batch_size=4, prefetch=1)
    try:
        idx = np.arange(60) % data.num_train
        views = _views(data, idx, epoch=3)
        whole = torch.cat(list(r.train_batches(idx, views, 4)))
        taken = []

        def pieces():
            for start in range(0, 60, 4):
                taken.append(start)
                yield idx[start : start + 4], views[start : start + 4]

        stream = r.stream_batches(pieces(), 60, 4)
        first = next(stream)
        assert len(taken) < 15
        assert torch.equal(torch.cat([first, *stream]), whole) and len(taken) == 15
    finally:
        r.close()


def test_a_worker_waits_for_rows_not_yet_written_and_stops_when_abandoned(tmp_path):
    import threading
    from types import SimpleNamespace

    from dhkd_pipe.data.dali_requests import Schedule, ScheduleReader, schedule_path

    rows = np.arange(12, dtype=np.int32).reshape(6, 2)
    filler = np.array([-1, 0], np.int32)
    schedule = Schedule(schedule_path(str(tmp_path), "t", 0), [rows[:2], rows[2:]], 6, 8, filler)
    schedule.ensure(2)
    reader = ScheduleReader(str(tmp_path), "t")

    def row(epoch, index):
        return reader.row(SimpleNamespace(epoch_idx=epoch, idx_in_epoch=index))

    assert list(row(0, 1)) == [2, 3]
    got = {}
    waiting = threading.Thread(target=lambda: got.update(row=row(0, 4)))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and not got  # row 4 is not written yet
    schedule.ensure(8)
    waiting.join(10)
    assert list(got["row"]) == [8, 9] and list(row(0, 7)) == [-1, 0]  # a row, then a filler
    with pytest.raises(StopIteration):
        row(0, 8)
    abandoned = Schedule(schedule_path(str(tmp_path), "t", 1), [rows], 6, 8, filler)
    stopped = []

    def wait_then_stop():
        try:
            row(1, 0)
        except StopIteration:
            stopped.append(True)

    waiting = threading.Thread(target=wait_then_stop)
    waiting.start()
    abandoned.abandon()
    waiting.join(10)
    assert stopped == [True]
    schedule.close()
    abandoned.close()
