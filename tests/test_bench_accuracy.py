"""``dhkd-pipe bench accuracy`` on a tiny IDX folder written here: table, JSON, picture, reuse."""

import dataclasses
import json

import pytest
from click.testing import CliRunner
from test_idx import write_mnist

from dhkd_pipe.benchmarks import accuracy as bench_module
from dhkd_pipe.benchmarks.accuracy import ROWS, bench_accuracy, milestones
from dhkd_pipe.cli import main
from dhkd_pipe.config import AccuracyBenchConfig
from dhkd_pipe.errors import DhkdError

TINY = [
    "--train-size",
    "200",
    "--teacher",
    "resnet8",
    "--student",
    "resnet8",
    "--teacher-epochs",
    "1",
    "--epochs",
    "1",
    "--batch-size",
    "100",
    "--val-every",
    "0",
    "--threads",
    "1",
]


def tiny(tmp_path) -> AccuracyBenchConfig:
    return AccuracyBenchConfig(
        out=str(tmp_path / "bench"),
        data=f"fashion-mnist:{tmp_path / 'fm'}",
        train_size=200,
        teacher="resnet8",
        student="resnet8",
        teacher_epochs=1,
        epochs=1,
        seeds=1,
        batch_size=100,
        val_every=0,
        threads=1,
    )


# what each count counts: teacher trainings, stores written, students distilled (alone, or several in one pass)
COUNTED = {
    "train_teacher": {"train_teacher": lambda args: 1},
    "cache_teacher": {"cache_teacher": lambda args: 1},
    "distill": {"distill": lambda args: 1, "distill_students": lambda args: len(args[0])},
}


def count_calls(monkeypatch, names=("train_teacher", "cache_teacher", "distill")) -> dict:
    calls = {name: 0 for name in names}
    for name in names:
        for function, count in COUNTED[name].items():
            original = getattr(bench_module, function)

            def wrapper(*args, _name=name, _original=original, _count=count, **kwargs):
                calls[_name] += _count(args)
                return _original(*args, **kwargs)

            monkeypatch.setattr(bench_module, function, wrapper)
    return calls


@pytest.mark.slow
def test_table_json_picture_and_reuse(tmp_path, monkeypatch):
    write_mnist(tmp_path / "fm", n_train=300, n_val=100)
    rows = ROWS
    names = [r.name for r in rows]
    assert {"ce", "kd", "dhkd", "binary_kl", "dhkd --grad-align"} <= set(names)

    first = bench_accuracy(tiny(tmp_path), log=lambda *a: None)
    out = tmp_path / "bench"
    saved = json.loads((out / "bench_accuracy.json").read_text())
    assert [m["name"] for m in saved["methods"]] == names and "missing_rows" not in saved  # every row is in the build
    for m in saved["methods"]:
        assert m["n"] == 1 and m["seeds"] == [0] and m["std"] is None
        assert m["min"] == m["max"] == m["mean"] == m["top1"][0] and 0 <= m["mean"] <= 100
    assert len(saved["runs"]) == len(names) and not any(r["reused"] for r in saved["runs"])
    assert saved["settings"]["data_spec"].endswith("@200") and saved["store"]["views"] == 1
    assert 0 <= saved["teacher"]["val_top1"] <= 100
    wall = saved["wall_s"]
    assert wall["total"] == pytest.approx(wall["teacher"] + wall["store"] + wall["students"]) and wall["students"] > 0
    markdown = (out / "bench_accuracy.md").read_text()
    assert "| method | runs | top-1 mean | std | min | max |" in markdown
    for name in names:
        assert f"| {name} | 1 |" in markdown
    assert (out / "bench_accuracy.png").stat().st_size > 10_000
    assert (out / "students" / "dhkd-grad-align-s0" / "summary.json").is_file()

    # The same command again trains nothing and gives the same table.
    for name in ("train_teacher", "cache_teacher", "distill", "distill_students"):
        monkeypatch.setattr(bench_module, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran on a re-run"))
    again = bench_accuracy(tiny(tmp_path), log=lambda *a: None)
    assert all(r["reused"] for r in again["runs"]) and again["teacher"]["reused"] and again["store"]["reused"]
    assert [m["top1"] for m in again["methods"]] == [m["top1"] for m in first["methods"]]
    assert again["wall_s"]["total"] == pytest.approx(wall["total"])  # the recorded stage times, not this re-run's
    monkeypatch.undo()

    # Two seeds through the CLI: only the seeded rows' seed-1 runs are trained.
    calls = count_calls(monkeypatch)
    result = CliRunner().invoke(
        main,
        ["bench", "accuracy", "--out", str(out), "--data", f"fashion-mnist:{tmp_path / 'fm'}", "--seeds", "2", *TINY],
    )
    assert result.exit_code == 0, result.output
    seeded = [r.name for r in rows if r.seeded]
    assert calls == {"train_teacher": 0, "cache_teacher": 0, "distill": len(seeded)}
    saved = json.loads((out / "bench_accuracy.json").read_text())
    for m in saved["methods"]:
        assert m["seeds"] == ([0, 1] if m["name"] in seeded else [0])
        assert (m["std"] is not None) == (m["name"] in seeded)
        assert m["min"] <= m["mean"] <= m["max"]
    assert "| ce | 2 |" in result.output and "bench_accuracy.json" in result.output


@pytest.mark.slow
def test_changed_teacher_retrains_everything_downstream(tmp_path, monkeypatch):
    write_mnist(tmp_path / "fm", n_train=300, n_val=100)
    monkeypatch.setattr(bench_module, "ROWS", tuple(r for r in bench_module.ROWS if r.name == "kd"))
    bench_accuracy(tiny(tmp_path), log=lambda *a: None)
    calls = count_calls(monkeypatch)
    # Only the teacher's settings change: its new weights make a new store, so the student (whose own
    # config is the same) is trained again from it.
    bench_accuracy(dataclasses.replace(tiny(tmp_path), teacher_epochs=2), log=lambda *a: None)
    assert calls == {"train_teacher": 1, "cache_teacher": 1, "distill": 1}


def test_settings_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(DhkdError, match="--train-size"):
        bench_accuracy(AccuracyBenchConfig(out=str(tmp_path / "b"), data="fashion-mnist@100"))
    with pytest.raises(DhkdError, match="seeds"):
        bench_accuracy(AccuracyBenchConfig(out=str(tmp_path / "b"), seeds=0))
    assert not (tmp_path / "b").exists()
    result = CliRunner().invoke(main, ["bench", "accuracy", "--out", str(tmp_path / "b"), "--epochs", "0"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert milestones(12) == [6, 9] and milestones(1) == [] and milestones(3) == [1, 2]


def test_records_accept_options_added_since_at_their_defaults(tmp_path):
    from dhkd_pipe.benchmarks.accuracy import _what
    from dhkd_pipe.benchmarks.accuracy_steps import plain, same_key, same_method
    from dhkd_pipe.config import CacheConfig, TrainConfig

    cfg = TrainConfig(data="digits", method="kd", val_every=3, out=str(tmp_path))
    key = plain(
        {
            "config": _what(cfg),
            "store": {"config": _what(CacheConfig(data="digits", weights="w")), "teacher_weights": "ab"},
        }
    )
    assert same_key(key, key, TrainConfig)
    older = json.loads(json.dumps(key))
    del (
        older["config"]["compile"],
        older["store"]["config"]["channels_last"],
    )  # options the tool gained later, at their defaults
    assert same_key(older, key, TrainConfig)
    del older["config"]["val_every"]  # this one is not at its default (1): the run differs
    assert not same_key(older, key, TrainConfig)
    assert not same_key({**key, "store": {**key["store"], "teacher_weights": "cd"}}, key, TrainConfig)

    from dhkd_pipe.methods.registry import from_config

    params = plain(from_config(cfg).params())
    for recorded, same in (
        (params, True),
        ({k: v for k, v in params.items() if v is not None}, True),  # gained options at their defaults
        ({**params, "temperature": 2.0}, False),
    ):  # the default changed since: train again
        (tmp_path / "summary.json").write_text(json.dumps({"method_params": recorded}))
        assert same_method(cfg) is same, recorded
