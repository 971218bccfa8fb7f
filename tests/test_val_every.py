"""``--val-every N``: validation after every N-th epoch and always after the last."""

import json

import pytest

from dhkd_pipe.config import TrainConfig, build_config
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.stages.report import write_report
from dhkd_pipe.stages.train_teacher import train_teacher


@pytest.mark.slow  # five epochs of training per case
@pytest.mark.parametrize("val_every, validated", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (0, [5])])
def test_validation_epochs_and_summary(tmp_path, val_every, validated):
    cfg = TrainConfig(
        data="digits@60",
        model="resnet8",
        epochs=5,
        batch_size=30,
        lr_milestones=[4],
        val_every=val_every,
        out=str(tmp_path / "run"),
    )
    summary = train_teacher(cfg, log=lambda *a: None)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["epoch"] for h in history if "val_top1" in h] == validated
    assert all(("val_top5" in h) == ("val_top1" in h) for h in history)
    assert summary["val_top1"] == history[-1]["val_top1"]
    assert summary["best_val_top1"] == max(h["val_top1"] for h in history if "val_top1" in h)
    table = write_report([str(tmp_path / "run")], str(tmp_path / "r.png"))
    assert f"{history[-1]['val_top1']:.2f}" in table and (tmp_path / "r.png").stat().st_size > 0


def test_negative_val_every_is_a_user_error():
    with pytest.raises(DhkdError, match="val_every"):
        build_config(TrainConfig, None, {"val_every": -1})
