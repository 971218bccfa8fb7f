"""Each concrete data set, renderer and epoch source provides what its protocol declares.

The protocols (``data.Dataset``, ``data.Renderer``, ``loader.EpochSource``) are what the engine,
the loader and the stages are typed against; this keeps the declarations and the classes in step:
every declared member exists on a real instance, and every declared method accepts the declared
parameters (same names, same kinds; extra parameters only with defaults).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from dhkd_pipe.data.datasets import Dataset, Renderer
from dhkd_pipe.data.imagefolder import ImageFolderData
from dhkd_pipe.data.in_memory import InMemoryData, InMemoryViews
from dhkd_pipe.data.loader import EpochSource, PlanEpochs, StoreEpochs
from dhkd_pipe.store.writer import create_or_resume


def _members(proto) -> dict:
    """Declared members of a protocol: name -> the declared method or property (None for fields)."""
    found = {name: None for name in getattr(proto, "__annotations__", {})}
    for name, value in vars(proto).items():
        if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
            found[name] = value
    return found


def _mismatches(obj, proto) -> list[str]:
    """What ``obj`` lacks of ``proto``, or where its methods' parameters differ; empty if it conforms."""
    problems = []
    for name, declared in _members(proto).items():
        if not hasattr(obj, name):
            problems.append(f"no {name}")
            continue
        if not inspect.isfunction(declared):
            continue
        actual = getattr(type(obj), name, None)
        if not callable(actual):
            problems.append(f"{name} is not a method")
            continue
        want = list(inspect.signature(declared).parameters.values())[1:]
        have = {p.name: p for p in list(inspect.signature(actual).parameters.values())[1:]}
        for p in want:
            if p.name not in have or have[p.name].kind != p.kind:
                problems.append(f"{name}() lacks parameter {p.name}")
            elif p.default is not inspect.Parameter.empty and have[p.name].default is inspect.Parameter.empty:
                problems.append(f"{name}() parameter {p.name} has no default")
        extra = [
            n
            for n, p in have.items()
            if n not in {q.name for q in want}
            and p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        problems += [f"{name}() requires undeclared parameter {n}" for n in extra]
    return problems


def _in_memory() -> InMemoryData:
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)  # noqa: E731
    return InMemoryData(
        "tiny", images(6), torch.arange(6) % 3, images(3), torch.arange(3), 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    )


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> ImageFolderData:
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (12, 10), (40, 80, 120)).save(root / split / name / "0.png")
    return ImageFolderData.from_folder(str(root))


def test_data_sets_are_datasets(image_folder):
    for data in (_in_memory(), image_folder):
        assert isinstance(data, Dataset)
        assert _mismatches(data, Dataset) == [], type(data).__name__


def test_renderers_are_renderers(image_folder):
    data = _in_memory()
    assert isinstance(data.renderer("cpu", data.default_plan()), InMemoryViews)
    dali = image_folder.renderer("cpu", image_folder.default_plan(resolution=8), workers=0)
    try:
        for renderer in (data.renderer("cpu", data.default_plan()), dali):
            assert isinstance(renderer, Renderer)
            assert _mismatches(renderer, Renderer) == [], type(renderer).__name__
    finally:
        dali.close()


def test_epoch_sources_are_epoch_sources(tmp_path):
    data = _in_memory()
    cache = create_or_resume(
        str(tmp_path / "s.zarr"),
        epochs=1,
        num_samples=data.num_train,
        num_classes=data.num_classes,
        chunk_rows=4,
        labels=data.train_labels.numpy(),
    )
    for source in (PlanEpochs(data.default_plan(), data), StoreEpochs(cache, "cpu")):
        assert isinstance(source, EpochSource)
        assert _mismatches(source, EpochSource) == [], type(source).__name__


def test_the_check_finds_a_missing_member_and_a_wrong_signature():
    class NoVal:
        def train_batches(self, indices, views, batch_size):
            return iter(())

        def stream_batches(self, pieces, total, batch_size):
            return iter(())

    class WrongName(NoVal):
        def val_batches(self, size):
            return iter(())

    assert not isinstance(NoVal(), Renderer)
    assert _mismatches(NoVal(), Renderer) == ["no val_batches"]
    assert _mismatches(WrongName(), Renderer) == [
        "val_batches() lacks parameter batch_size",
        "val_batches() requires undeclared parameter size",
    ]
    assert set(_members(EpochSource)) == {
        "has_logits",
        "num_samples",
        "chunk_rows",
        "view_epoch",
        "distinct_views",
        "schedule",
        "logits",
    }
