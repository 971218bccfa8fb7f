"""``dhkd-pipe tune``: the search space read with one-line refusals; a study on digits whose trials
the pruner stops (recorded PRUNED, never as results); a study killed mid-pass and run again, which
ends with the trials it was asked for, the killed ones failed and their copies resumed from their
run folders, no result twice."""

import json
import os
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner
from console_script import BIN

from dhkd_pipe.cli import main
from dhkd_pipe.config import TrainConfig, TuneOptions
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.stages.leaderboard import write_leaderboard
from dhkd_pipe.stages.tune import tune
from dhkd_pipe.training.study import read_space

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="session")
def store(small_store):
    """A digits store of 256 training images in chunks of 64: 8 steps an epoch at batch 32."""
    return str(small_store)


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: {type: int, low: 1, high: 3}\n", "epochs: shapes the loader"),
        ("out: {type: categorical, choices: [a, b]}\n", "out: is not an option that sweeps"),
        ("lr: {type: float, low: 0.1}\n", "lr: low and high (and step) must be numbers"),
        ("lr: {type: float, low: 0.1, high: 0.01}\n", "lr: low 0.1 must be below high 0.01"),
        ("lr: {type: float, low: 0, high: 1, log: true}\n", "lr: a log scale needs low > 0"),
        ("lr: {type: float, low: 0.1, high: 1, log: yes please}\n", "lr: log is true or false"),
        ("lr: {type: uniform, low: 0, high: 1}\n", "lr: type must be one of float, int, categorical"),
        ("lr: {type: float, low: 0, high: 1, spread: 2}\n", "lr: unknown key 'spread'"),
        ("lr: 0.1\n", "lr: give {type: float|int|categorical, ...}"),
        ("method: {type: categorical, choices: []}\n", "method: categorical takes choices"),
        ("temperature: {type: categorical, choices: [1, x]}\n", "bad value for temperature: 'x'"),
        ("method: {type: float, low: 0, high: 1}\n", "method: is not a number of type float"),
        ("- lr\n", "must map each option"),
    ],
)
def test_a_bad_search_space_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(DhkdError, match="search space") as caught:
        read_space(str(path))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_search_space_reads_each_kind(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "lr: {type: float, low: 0.01, high: 0.2, log: true}\n"
        "kd-stop-epoch: {type: int, low: 1, high: 9, step: 2}\n"
        "method: {type: categorical, choices: [kd, dhkd]}\n"
    )
    assert read_space(str(path)) == {
        "lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True, "step": None},
        "kd_stop_epoch": {"type": "int", "low": 1, "high": 9, "log": False, "step": 2},
        "method": {"type": "categorical", "choices": ["kd", "dhkd"]},
    }


def trial_config(store, out, epochs: int) -> TrainConfig:
    return TrainConfig(
        cache=store, method="kd", epochs=epochs, batch_size=32, workers=0, lr_milestones=[10], out=str(out)
    ).validate()


def study_states(out) -> dict:
    import optuna

    study = optuna.load_study(study_name="dhkd", storage=f"sqlite:///{out}/study.db")
    return {t.number: (t.state.name, t.value, t.user_attrs.get("folder")) for t in study.get_trials()}


def reported(out, number: int) -> list[int]:
    """The epochs whose top-1 a trial reported (its own and, for a copy, the killed trial's)."""
    import optuna

    study = optuna.load_study(study_name="dhkd", storage=f"sqlite:///{out}/study.db")
    return sorted(next(t for t in study.get_trials() if t.number == number).intermediate_values)


def temperature(out, number: int) -> float:
    import optuna

    study = optuna.load_study(study_name="dhkd", storage=f"sqlite:///{out}/study.db")
    return next(t for t in study.get_trials() if t.number == number).params["temperature"]


def test_the_pruner_stops_trials_and_records_them_pruned(store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("temperature: {type: float, low: 1, high: 4}\n")
    out = tmp_path / "study"
    # a threshold no top-1 reaches: every trial is pruned at its first epoch's end
    opts = TuneOptions(
        space=str(space), trials=3, per_pass=2, pruner="threshold", prune_below=101.0, prune_after=0
    ).validate()
    result = tune(trial_config(store, out, epochs=2), opts, **QUIET)
    assert result["trials"]["pruned"] == 3 and result["trials"]["complete"] == 0 and result["best"] is None
    assert (result["epochs_trained"], result["epochs_to_the_end"], result["epochs_saved_by_pruning"]) == (3, 6, 3)
    states = study_states(out)
    assert sorted(states) == [0, 1, 2] and {s for s, _, _ in states.values()} == {"PRUNED"}
    for _, _, folder in states.values():
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            assert [json.loads(line)["epoch"] for line in f] == [1]
        assert not os.path.exists(os.path.join(folder, "summary.json"))
    text = write_leaderboard(str(out), str(tmp_path / "lb.png"))
    assert text.count("| pruned |") == 3 and "| temperature |" in text.splitlines()[0]
    assert (tmp_path / "lb-temperature.png").is_file()


def test_tune_refuses_several_processes_of_one_launch(store, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 0.01, high: 0.1}\n")
    with pytest.raises(DhkdError, match="start several tune processes on one --storage"):
        tune(trial_config(store, tmp_path / "s", epochs=1), TuneOptions(space=str(space)).validate(), **QUIET)
    assert not (tmp_path / "s").exists()


def test_tune_on_the_command_line_refuses_in_one_line(store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 0.01, high: 0.1}\n")
    args = ["tune", "--cache", store, "--space", str(space), "--out", str(tmp_path / "s")]
    for extra, message in (
        (["--pruner", "threshold"], "--pruner threshold takes --prune-below"),
        (["--trials", "0"], "bad trials 0"),
        (["--sampler", "grid"], "--sampler grid takes categorical and int options"),
        (["--memory-limit", "0.000001", "--per-pass", "2"], "the 2 runs of this pass need about"),
    ):
        result = CliRunner().invoke(main, [*args, *extra])
        last = result.stderr.splitlines()[-1]  # the error line, after the passes' progress lines
        assert result.exit_code == 2 and last.startswith("error: ") and message in last, result.stderr
    # the pass refused for its memory: its trials failed (never left running), no run folder made
    assert {s for s, _, _ in study_states(tmp_path / "s").values()} == {"FAIL"}
    assert sorted(os.listdir(tmp_path / "s")) == ["study.db", "study.json"]


@pytest.mark.slow  # a study killed in its first pass, then run to its end: three trials of three epochs
@pytest.mark.parametrize("killed_at", ["first epoch", "set-up"])
def test_a_killed_study_resumes_and_ends_with_its_trials_once_each(store, tmp_path, killed_at):
    space = tmp_path / "space.yaml"
    space.write_text("temperature: {type: float, low: 1, high: 4}\n")
    out = tmp_path / "study"
    common = ["--cache", store, "--space", str(space), "--trials", "3", "--per-pass", "2", "--pruner", "none"]
    args = [*common, "--method", "kd", "--epochs", "3", "--batch-size", "32", "--workers", "0"]
    args += ["--lr-milestones", "10", "--heartbeat", "1", "--out", str(out)]
    proc = subprocess.Popen([BIN, "tune", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # after the first trial's first epoch (its copy resumes it), or while the pass's runs are set up
    # (before any step: the copies start their folders again)
    first = out / "trial-0000" / "metrics.jsonl"
    made = out / "trial-0001" / "dhkd-run.json"

    def reached() -> bool:
        return made.is_file() if killed_at == "set-up" else first.is_file() and first.read_text().count("\n") >= 1

    deadline = time.monotonic() + 300
    while not reached() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed = study_states(out)
    assert sorted(killed) == [0, 1] and {s for s, _, _ in killed.values()} == {"RUNNING"}

    result = CliRunner().invoke(main, ["tune", *args])
    assert result.exit_code == 0, (result.stderr, result.exception)
    summary = json.loads(result.stdout)
    assert summary["trials"]["complete"] == 3 and summary["best"]["val_top1"] is not None
    states = study_states(out)
    complete = {n: folder for n, (s, _, folder) in states.items() if s == "COMPLETE"}
    failed = {n: folder for n, (s, _, folder) in states.items() if s == "FAIL"}
    assert len(complete) == 3 and len(set(complete.values())) == 3  # no result twice
    assert set(failed) == {0, 1}  # the killed trials: failed, never results
    # their copies resumed the killed trials' folders: each epoch trained once
    assert set(failed.values()) <= set(complete.values())
    # the trial the second process drew is a new one, not the first process's draw again
    assert len({temperature(out, n) for n in complete}) == 3
    for n, folder in complete.items():
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            assert [json.loads(line)["epoch"] for line in f] == [1, 2, 3], folder
        assert reported(out, n) == [1, 2, 3]
    text = write_leaderboard(str(out), str(tmp_path / "lb.png"))
    assert text.count("| finished |") == 3 and text.count("| failed |") == 2


@pytest.mark.slow  # a study stopped by a signal in its first pass, then run to its end: two epochs a trial
def test_a_signal_fails_the_passs_trials_and_their_copies_resume_them(store, tmp_path, monkeypatch):
    from dhkd_pipe.interrupts import Interrupted
    from dhkd_pipe.training import engine

    asked = {"n": 0}

    def pending():  # asked after each step and each epoch: SIGINT in epoch 2, at its second step (8 + 1 + 2)
        asked["n"] += 1
        return signal.SIGINT if asked["n"] >= 11 else None

    monkeypatch.setattr(engine, "pending", pending)
    space = tmp_path / "space.yaml"
    space.write_text("temperature: {type: categorical, choices: [1, 4]}\n")
    out = tmp_path / "study"
    opts = TuneOptions(space=str(space), trials=2, per_pass=2, pruner="none", sampler="grid").validate()
    with pytest.raises(Interrupted):
        tune(trial_config(store, out, epochs=2), opts, **QUIET)
    states = study_states(out)
    assert [states[n][0] for n in sorted(states)] == ["FAIL", "FAIL", "WAITING", "WAITING"]  # failed, re-queued
    monkeypatch.undo()
    result = tune(trial_config(store, out, epochs=2), opts, **QUIET)
    assert result["trials"]["complete"] == 2 and result["trials"]["fail"] == 2
    states = study_states(out)
    assert states[2][2] == states[0][2] and states[3][2] == states[1][2]  # the copies trained in the same folders
    for n in (2, 3):
        with open(os.path.join(states[n][2], "metrics.jsonl")) as f:
            assert [json.loads(line)["epoch"] for line in f] == [1, 2]
        assert reported(out, n) == [1, 2]


@pytest.mark.slow  # two tune processes at once, two one-epoch trials each
def test_two_tune_processes_share_one_study(store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("temperature: {type: float, low: 1, high: 4}\n")
    out = tmp_path / "study"
    args = ["tune", "--cache", store, "--space", str(space), "--trials", "4", "--per-pass", "1", "--epochs", "1"]
    args += ["--method", "kd", "--batch-size", "32", "--workers", "0", "--lr-milestones", "10", "--out", str(out)]
    procs = [subprocess.Popen([BIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    states = study_states(out)
    assert sorted(states) == [0, 1, 2, 3] and {s for s, _, _ in states.values()} == {"COMPLETE"}
    assert len({folder for _, _, folder in states.values()}) == 4
