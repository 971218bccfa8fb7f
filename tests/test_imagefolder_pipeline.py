"""Stage 1 and stage 2 on a JPEG folder through the DALI CPU pipeline (the ImageNet path)."""

import json

import pytest
import torch

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.slow  # image-folder pipelines end to end: DALI workers, stage 1 and 2

from conftest import cli_here  # noqa: E402

from dhkd_pipe.config import CacheConfig, TrainConfig  # noqa: E402
from dhkd_pipe.stages.cache_teacher import cache_teacher  # noqa: E402
from dhkd_pipe.stages.verify_cache import verify_cache  # noqa: E402
from dhkd_pipe.store.reader import LogitCache  # noqa: E402
from dhkd_pipe.training.run import prepare  # noqa: E402

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="session")
def folder(digit_jpegs):
    """digits as JPEGs of different sizes: 3 classes, 24 training and 6 validation images."""
    return digit_jpegs


@pytest.fixture(scope="session")
def teacher_weights(random_teacher3):
    return random_teacher3


def test_stage1_and_stage2_replay_the_same_pixels(folder, teacher_weights, tmp_path):
    store = tmp_path / "logits.zarr"
    cfg = CacheConfig(
        data=f"imagefolder:{folder}",
        model="resnet8",
        weights=str(teacher_weights),
        views=2,
        resolution=32,
        batch_size=8,
        chunk_rows=8,
        codec="fp32",
        workers=1,
        out=str(store),
    ).validate()
    cache_teacher(cfg, **QUIET)
    c = LogitCache.open(str(store))
    assert c.attrs["policy"]["policy"] == "random_resized_crop_flip" and c.attrs["policy"]["resolution"] == 32
    views = c.read_views(0)
    assert (views[:, 2] < 48).any()  # real random-resized crops, not whole images
    # stage 2's replay path re-renders the stored views: the teacher gives the stored logits back
    result = verify_cache(str(store), f"imagefolder:{folder}", str(teacher_weights), samples=48)
    assert result["ok"] and result["max_abs_diff"] < 1e-4, result
    # and the training loader hands the student those views with the stored logits, in order
    run = prepare(
        TrainConfig(
            data=f"imagefolder:{folder}",
            model="resnet8",
            method="dhkd",
            cache=str(store),
            epochs=1,
            batch_size=8,
            out=str(tmp_path / "run"),
        ).validate()
    )
    teacher = run.teacher or _teacher(teacher_weights)
    for batch in run.loader.epoch(1):
        with torch.no_grad():
            assert (teacher(batch.images) - batch.teacher.float()).abs().max() < 1e-4


def _teacher(path):
    from dhkd_pipe.models import create_model, load_checkpoint

    model = create_model("resnet8", 3)
    load_checkpoint(model, str(path))
    return model.eval()


def test_distill_from_an_image_folder_store_through_the_cli(folder, teacher_weights, tmp_path):
    store, out = tmp_path / "s.zarr", tmp_path / "run"
    run = cli_here  # the commands' parsing and wiring; their processes are tested elsewhere
    run(
        "cache-teacher",
        "--model",
        "resnet8",
        "--weights",
        teacher_weights,
        "--data",
        f"imagefolder:{folder}",
        "--views",
        1,
        "--resolution",
        32,
        "--chunk-rows",
        8,
        "--batch-size",
        8,
        "--workers",
        1,
        "--out",
        store,
    )
    run(
        "distill",
        "--student",
        "resnet8",
        "--cache",
        store,
        "--data",
        f"imagefolder:{folder}",
        "--epochs",
        1,
        "--batch-size",
        8,
        "--workers",
        1,
        "--out",
        out,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_source"] == "cache" and summary["val_top1"] is not None
