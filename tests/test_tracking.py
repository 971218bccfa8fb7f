"""Experiment tracking through Accelerate's trackers: the same per-epoch metrics as metrics.jsonl."""

import glob
import json
import os

import pytest

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.training.engine import train
from dhkd_pipe.training.run import prepare


def teacher_cfg(out, **kw):
    base = dict(data="digits", model="resnet8", method="ce", epochs=2, batch_size=128, lr_milestones=[1], out=str(out))
    return TrainConfig(**{**base, **kw}).validate()


def read_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_gets_the_metrics_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(prepare(teacher_cfg(out, log_with="tensorboard")), log=lambda *a: None)
    events = glob.glob(str(out / "dhkd-pipe" / "events.out.tfevents.*"))
    assert events, os.listdir(out)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(str(out / "dhkd-pipe"))
    assert set(history[0]) <= set(scalars), (sorted(history[0]), sorted(scalars))
    for key in history[0]:
        assert [step for step, _ in scalars[key]] == [h["epoch"] for h in history], key
        # TensorBoard stores float32
        assert [v for _, v in scalars[key]] == pytest.approx([float(h[key]) for h in history], rel=1e-6), key


def test_unknown_tracker_is_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(DhkdError, match="unknown tracker 'tensorbord'.*tensorboard"):
        prepare(teacher_cfg(tmp_path / "run", log_with="tensorbord"))
    assert not (tmp_path / "run").exists()


def test_missing_tracker_package_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(
        DhkdError, match=r"--log-with tensorboard: the tensorboard package is not installed; pip install"
    ):
        prepare(teacher_cfg(tmp_path / "run", log_with="tensorboard"))
    assert not (tmp_path / "run").exists()
