"""Several students from one pass over a store: each equals its solo run bit for bit (in-memory
path), a failing student stops alone, a stopped pass resumes every student, and the CLI's
``--student A,B --seeds ...`` lays the runs out one folder each."""

import dataclasses
import hashlib
import json
import os

import pytest
import torch
from click.testing import CliRunner

from dhkd_pipe.cli import main
from dhkd_pipe.config import TrainConfig
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.stages.distill import check_finished, distill, distill_students
from dhkd_pipe.training.students import StudentPlan, check_pass

QUIET = dict(log=lambda *a: None)
# the per-epoch metrics that depend on the numbers alone (not on time)
NUMBERS = ("epoch", "lr", "train_loss", "train_ce", "train_kd", "val_top1", "val_top5")


@pytest.fixture(scope="session")
def store(small_store):
    """A digits store of 256 training images in chunks of 64: 8 steps an epoch at batch 32."""
    return str(small_store)


def params(run: str) -> dict:
    from safetensors.torch import load_file

    return {
        k: hashlib.sha256(v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, v in load_file(os.path.join(run, "model.safetensors")).items()
    }


def metrics(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: row[k] for k in NUMBERS if k in row} for row in map(json.loads, f)]


def students(store, out, **kw) -> list[TrainConfig]:
    """Four different students: dhkd seed 0, dhkd with the non-linear head (dropout: the generators
    must be each student's own) seed 1, kd seed 2 on another architecture, ce (no logits needed)."""
    base = dict(cache=store, epochs=2, batch_size=32, lr=0.05, lr_milestones=[1], val_every=0, workers=0, **kw)
    return [
        TrainConfig(**base, model="resnet8", method="dhkd", seed=0, out=str(out / "dhkd")).validate(),
        TrainConfig(
            **base, model="resnet8", method="dhkd", aux_head="nonlinear", seed=1, out=str(out / "dhkd-mlp")
        ).validate(),
        TrainConfig(**base, model="resnet14", method="kd", seed=2, out=str(out / "kd")).validate(),
        TrainConfig(**base, model="resnet8", method="ce", seed=3, out=str(out / "ce")).validate(),
    ]


@pytest.fixture(scope="module")
def solo(store, tmp_path_factory):
    """Each student trained alone, the ordinary way (``distill``)."""
    out = tmp_path_factory.mktemp("solo")
    cfgs = students(store, out)
    for cfg in cfgs:
        distill(cfg, **QUIET)
    return {os.path.basename(c.out): c.out for c in cfgs}


@pytest.mark.slow  # four solo runs and a pass of the four, two epochs each
def test_each_student_of_a_pass_equals_its_solo_run(store, solo, tmp_path):
    cfgs = students(store, tmp_path)
    lines = []
    results = distill_students([StudentPlan(c) for c in cfgs], log=lines.append)
    assert not any(isinstance(r, DhkdError) for r in results)
    for cfg, summary in zip(cfgs, results, strict=True):
        name = os.path.basename(cfg.out)
        assert params(cfg.out) == params(solo[name]), name
        assert metrics(cfg.out) == metrics(solo[name]), name
        with open(os.path.join(solo[name], "summary.json")) as f:
            alone = json.load(f)
        same = ("model", "method", "method_params", "val_top1", "distinct_views", "teacher_source")
        assert {k: summary[k] for k in same} == {k: alone[k] for k in same}
    assert any(line.startswith("kd: epoch 2/2") for line in lines)


@pytest.mark.slow  # a pass of four students for two epochs, and more
def test_a_failing_student_stops_alone_and_the_others_go_on(store, solo, tmp_path):
    cfgs = students(store, tmp_path)
    cfgs[1] = dataclasses.replace(cfgs[1], lr=1e30).validate()  # diverges: a non-finite loss within the first epoch
    lines = []
    results = distill_students([StudentPlan(c) for c in cfgs], log=lines.append)
    assert isinstance(results[1], DhkdError) and "not finite" in str(results[1])
    assert any(line.startswith("dhkd-mlp: stopped alone") for line in lines)
    assert not os.path.exists(cfgs[1].out)  # it failed before its first checkpoint: nothing left, as alone
    for i in (0, 2, 3):
        assert params(cfgs[i].out) == params(solo[os.path.basename(cfgs[i].out)])


@pytest.mark.slow  # a pass of four students for two epochs, and more
def test_a_stopped_pass_resumes_every_student(store, solo, tmp_path):
    cfgs = students(store, tmp_path, max_steps=11)  # stops in epoch 2, step 3, with every student's checkpoint
    results = distill_students([StudentPlan(c) for c in cfgs], **QUIET)
    assert all(r == {"stopped_at": {"epoch": 1, "step": 3}} for r in results)
    resumed = [dataclasses.replace(c, max_steps=0).validate() for c in cfgs]
    distill_students([StudentPlan(c, "resume") for c in resumed], **QUIET)
    for cfg in resumed:
        name = os.path.basename(cfg.out)
        assert params(cfg.out) == params(solo[name]), name
        assert metrics(cfg.out) == metrics(solo[name]), name


@pytest.mark.slow  # a pass of four students for two epochs, and more
def test_students_at_different_points_each_continue_from_their_own(store, solo, tmp_path):
    """One student finished, one stopped mid-epoch, one fresh: the pass feeds each only what it lacks."""
    cfgs = students(store, tmp_path)[:3]
    distill(cfgs[0], **QUIET)
    distill(dataclasses.replace(cfgs[1], max_steps=5).validate(), **QUIET)
    plans = [StudentPlan(cfgs[0], "resume"), StudentPlan(cfgs[1], "resume"), StudentPlan(cfgs[2])]
    distill_students(plans, **QUIET)
    for cfg in cfgs:
        assert params(cfg.out) == params(solo[os.path.basename(cfg.out)])


def test_a_pass_refuses_students_that_cannot_share_its_loader(store, tmp_path):
    a, b = students(store, tmp_path)[:2]
    with pytest.raises(DhkdError, match="batch_size must be the same"):
        check_pass([a, dataclasses.replace(b, batch_size=16)])
    with pytest.raises(DhkdError, match="share the run folder"):
        check_pass([a, dataclasses.replace(b, out=a.out)])
    with pytest.raises(DhkdError, match="--cache"):
        check_pass(
            [dataclasses.replace(a, cache=None, data="digits"), dataclasses.replace(b, cache=None, data="digits")]
        )
    assert not os.listdir(tmp_path)


def test_a_pass_with_stopped_students_ends_with_one_line_naming_them():
    check_finished({"out/a": {"epochs": 1}})
    with pytest.raises(DhkdError, match=r"^1 of 2 students stopped, the others finished: out/b: loss is not finite$"):
        check_finished({"out/a": {"epochs": 1}, "out/b": DhkdError("loss is not finite")})


def test_cli_students_and_seeds(store, tmp_path):
    out = tmp_path / "sweep"
    args = [
        "distill",
        "--cache",
        store,
        "--student",
        "resnet8,resnet14",
        "--seeds",
        "0,1",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.stderr, result.exception)
    names = sorted(n for n in os.listdir(out) if n != "sweep.json")  # the pass's index of its runs
    assert names == ["resnet14-s0", "resnet14-s1", "resnet8-s0", "resnet8-s1"]
    assert set(json.loads(result.stdout)) == {str(out / n) for n in names}
    for name in names:
        assert os.path.isfile(out / name / "checkpoint.pt")
    seed = torch.load(out / "resnet8-s1" / "checkpoint.pt", weights_only=True)["config"]["seed"]
    assert seed == 1
    for bad, message in (
        (["--seeds", "0,x"], "comma-separated integers"),
        (["--seeds", "1", "--seed", "1"], "not both"),
        (["--student", "resnet8,resnet8"], "twice"),
    ):
        result = CliRunner().invoke(main, ["distill", "--cache", store, "--out", str(tmp_path / "bad"), *bad])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    result = CliRunner().invoke(
        main,
        [
            "distill",
            "--data",
            "digits",
            "--student",
            "resnet8,resnet14",
            "--method",
            "ce",
            "--out",
            str(tmp_path / "bad"),
        ],
    )
    assert result.exit_code == 2 and "--cache" in result.stderr
    assert not os.path.exists(tmp_path / "bad")


@pytest.mark.slow
def test_bench_students_table(tmp_path, capsys):
    from dhkd_pipe.benchmarks.students import bench_students

    rows = bench_students(
        str(tmp_path / "b.json"),
        [1, 2],
        steps=1,
        warmup=1,
        batch_size=16,
        student="resnet8",
        teacher="resnet8",
        folder=False,
        log=lambda *a: None,
    )
    assert [r["students"] for r in rows] == [1, 2]
    for r in rows:
        assert r["pass_wall_s"] > 0 and r["solo_wall_s"] > 0 and 0 <= r["loader_share"] <= 1
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["rows"] == rows and "| S |" in capsys.readouterr().out


@pytest.mark.slow  # a pass of four students for two epochs, and more
def test_a_signal_stops_the_pass_with_every_student_saved_and_resume_continues(store, solo, tmp_path, monkeypatch):
    import signal

    from dhkd_pipe.interrupts import Interrupted
    from dhkd_pipe.training import engine

    asked = {"n": 0}

    def pending():  # asked after each step and each epoch: SIGINT arrives in epoch 2, step 2 (8 steps + 1 + 2)
        asked["n"] += 1
        return signal.SIGINT if asked["n"] >= 11 else None

    monkeypatch.setattr(engine, "pending", pending)
    cfgs = students(store, tmp_path)
    with pytest.raises(Interrupted, match="every student's state is saved"):
        distill_students([StudentPlan(c) for c in cfgs], **QUIET)
    for cfg in cfgs:
        state = torch.load(os.path.join(cfg.out, "checkpoint.pt"), weights_only=True)
        assert (state["epoch"], state["step"]) == (1, 2)
    monkeypatch.undo()
    distill_students([StudentPlan(c, "resume") for c in cfgs], **QUIET)
    for cfg in cfgs:
        name = os.path.basename(cfg.out)
        assert params(cfg.out) == params(solo[name]) and metrics(cfg.out) == metrics(solo[name]), name
