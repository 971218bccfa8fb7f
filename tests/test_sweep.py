"""Sweeps in one pass: the product of the swept values, one folder per run named by what differs,
each run equal to its solo run bit for bit, and the refusals (an option that shapes the loader
swept, a bad sweep file, a pass over the memory limit) made before anything is created."""

import json
import os

import pytest
from click.testing import CliRunner
from test_students import metrics, params

from dhkd_pipe.cli import main
from dhkd_pipe.config import TrainConfig
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.stages.distill import distill
from dhkd_pipe.training.sweep import estimate_memory, read_sweep_file, split_command_line, sweep_runs


@pytest.fixture(scope="session")
def store(small_store):
    """A digits store of 256 training images in chunks of 64: 8 steps an epoch at batch 32."""
    return str(small_store)


def base(out, **kw) -> TrainConfig:
    return TrainConfig(cache="store.zarr", method="kd", out=str(out), **kw).validate()


def names(runs) -> list[str]:
    return [r.name for r in runs]


def test_the_sweep_is_the_product_of_the_values_each_named_by_what_differs(tmp_path):
    runs = sweep_runs(base(tmp_path), {"temperature": [1.0, 2.0], "method": ["kd", "dhkd"], "seed": [0, 1]})
    assert len(runs) == 8
    assert names(runs)[:3] == [
        "method=kd,temperature=1,seed=0",
        "method=kd,temperature=1,seed=1",
        "method=kd,temperature=2,seed=0",
    ]
    assert len(set(names(runs))) == 8
    run = runs[4]
    assert (run.cfg.method, run.cfg.temperature, run.cfg.seed) == ("dhkd", 1.0, 0)
    assert run.cfg.out == str(tmp_path / "method=dhkd,temperature=1,seed=0")
    assert run.options == {"method": "dhkd", "temperature": 1.0, "seed": 0}
    # only the students and seeds differ: the names --student A,B --seeds 0,1 always gave
    assert names(sweep_runs(base(tmp_path), {"model": ["resnet8", "resnet14"], "seed": [3]})) == [
        "resnet8-s3",
        "resnet14-s3",
    ]
    # a list of runs, each taken with every value of the grid; a value the runs share is not in the name
    runs = sweep_runs(
        base(tmp_path), {"lr": [0.1, 0.01]}, [{"weight_decay": 1e-4, "seed": 0}, {"weight_decay": 5e-4, "seed": 0}]
    )
    assert names(runs) == [
        "lr=0.1,weight_decay=0.0001",
        "lr=0.1,weight_decay=0.0005",
        "lr=0.01,weight_decay=0.0001",
        "lr=0.01,weight_decay=0.0005",
    ]


def test_the_command_lines_values_split_into_one_value_options_and_a_grid():
    single, grid = split_command_line({"method": "kd,dhkd", "temperature": "2", "lr": "0.1, 0.2", "epochs": 3})
    assert grid == {"method": ["kd", "dhkd"], "lr": [0.1, 0.2]}
    assert single == {"method": None, "temperature": "2", "lr": None, "epochs": 3}
    for options, message in (
        ({"method": "kd,kd"}, "--method names kd twice"),
        ({"lr": "0.1,"}, "--lr takes comma-separated values"),
        ({"lr": "0.1,x"}, "bad value for lr: 'x'"),
    ):
        with pytest.raises(DhkdError, match=message):
            split_command_line(options)


def test_a_sweep_run_that_its_method_refuses_is_named_in_one_line(tmp_path):
    with pytest.raises(DhkdError, match=r"^run method=ce of the sweep: .*temperature"):
        sweep_runs(base(tmp_path, temperature=2.0), {"method": ["kd", "ce"]})
    with pytest.raises(DhkdError, match="--cache"):
        sweep_runs(TrainConfig(data="digits", out=str(tmp_path)).validate(), {"seed": [0, 1]})
    with pytest.raises(DhkdError, match="unknown model|nonesuch"):
        sweep_runs(base(tmp_path), {"model": ["resnet8", "nonesuch"]})
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: [1, 2]\n", "epochs shapes the loader that every run of a pass shares"),
        ("batch-size: [16, 32]\n", "batch_size shapes the loader"),
        ("out: [a, b]\n", "out cannot be swept"),
        ("tempreature: [1, 2]\n", "unknown option 'tempreature'"),
        ("temperature: [1, x]\n", "bad value for temperature: 'x'"),
        ("temperature: []\n", "temperature has no values"),
        ("temperature: [1, 1]\n", "lists a value twice"),
        ("- method: kd\n- 3\n", "must be a grid"),
        ("- method: kd\n  lr: 0.1\n  lr: 0.2\n", "lr"),
        ("just text\n", "must be a grid"),
        ("a: [b\n", "cannot parse sweep file"),
    ],
)
def test_a_bad_sweep_file_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(DhkdError, match=message) as caught:
        read_sweep_file(str(path))
    assert "\n" not in str(caught.value) and ("sweep file" in str(caught.value))


def test_a_sweep_file_is_a_grid_or_a_list_of_runs(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("method: [kd, dhkd]\ntemperature: [1, 2]\nlr-milestones: [[1], [2]]\ngrad-align: false\n")
    assert read_sweep_file(str(path)) == (
        {"method": ["kd", "dhkd"], "temperature": [1.0, 2.0], "lr_milestones": [[1], [2]], "grad_align": [False]},
        [{}],
    )
    path.write_text("- {method: kd, temperature: 4}\n- {method: dhkd}\n")
    assert read_sweep_file(str(path)) == ({}, [{"method": "kd", "temperature": 4.0}, {"method": "dhkd"}])


def test_the_memory_estimate_adds_every_runs_state_and_one_runs_activations(tmp_path):
    one = base(tmp_path, batch_size=8)
    a = estimate_memory([one], 32, 10)
    b = estimate_memory([one, one], 32, 10)
    assert a.parameters > 0 and a.gradients == a.parameters == a.optimizer and a.activations > 0
    assert (b.parameters, b.gradients, b.optimizer) == (2 * a.parameters, 2 * a.gradients, 2 * a.optimizer)
    assert b.activations == a.activations and b.batch == a.batch
    big = estimate_memory([base(tmp_path, batch_size=64)], 32, 10)
    assert big.activations == pytest.approx(8 * a.activations, rel=0.1)  # all but the saved weights scale


def one_line_error(result, message):
    assert result.exit_code == 2, (result.output, result.exception)
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_the_cli_refuses_before_anything_is_created(store, tmp_path):
    out = tmp_path / "sweep"
    args = ["distill", "--cache", store, "--out", str(out), "--epochs", "1", "--method", "kd,dhkd"]
    one_line_error(CliRunner().invoke(main, [*args, "--batch-size", "16,32"]), "--batch-size takes one value")
    bad = tmp_path / "bad.yaml"
    bad.write_text("precision: [no, bf16]\n")
    one_line_error(CliRunner().invoke(main, [*args, "--sweep", str(bad)]), "precision shapes the loader")
    bad.write_text("method: [kd]\n")
    one_line_error(CliRunner().invoke(main, [*args, "--sweep", str(bad)]), "method is swept both")
    one_line_error(
        CliRunner().invoke(main, [*args, "--memory-limit", "0.001"]),
        "the 2 runs of this pass need about",
    )
    result = CliRunner().invoke(main, [*args, "--memory-limit", "0.001"])
    assert "--memory-limit is 1.0 MiB" in result.stderr and "activations" in result.stderr
    assert not out.exists()


def test_each_swept_run_equals_its_solo_run_bit_for_bit(store, tmp_path):
    out = tmp_path / "sweep"
    common = ["--cache", store, "--epochs", "1", "--batch-size", "32", "--val-every", "0", "--workers", "0"]
    result = CliRunner().invoke(
        main, ["distill", *common, "--method", "kd,dhkd", "--temperature", "1,4", "--out", str(out)]
    )
    assert result.exit_code == 0, (result.stderr, result.exception)
    folders = ["method=kd,temperature=1", "method=kd,temperature=4", "method=dhkd,temperature=1"]
    assert sorted(os.listdir(out)) == sorted([*folders, "method=dhkd,temperature=4", "sweep.json"])
    with open(out / "sweep.json") as f:
        index = json.load(f)
    assert index["swept"] == ["method", "temperature"]
    assert {r["folder"]: r["status"] for r in index["runs"]}[folders[0]] == "finished"
    for folder, (method, temperature) in zip(folders, [("kd", 1.0), ("kd", 4.0), ("dhkd", 1.0)], strict=True):
        cfg = TrainConfig(
            cache=store,
            epochs=1,
            batch_size=32,
            val_every=0,
            workers=0,
            method=method,
            temperature=temperature,
            out=str(tmp_path / "solo" / folder),
        ).validate()
        distill(cfg, log=lambda *a: None)
        assert params(str(out / folder)) == params(cfg.out), folder
        assert metrics(str(out / folder)) == metrics(cfg.out), folder


@pytest.mark.slow  # a store written, then four runs alone and in one pass
def test_bench_sweep_table(tmp_path, capsys):
    from dhkd_pipe.benchmarks.sweep import bench_sweep

    rows = bench_sweep(
        str(tmp_path / "b.json"),
        "kd,dhkd",
        "1,4",
        steps=1,
        warmup=1,
        batch_size=16,
        student="resnet8",
        teacher="resnet8",
        folder=False,
        log=lambda *a: None,
    )
    assert [(r["runs"], r["swept"]) for r in rows] == [(4, "method kd,dhkd, temperature 1.0,4.0")]
    for r in rows:
        assert r["pass_wall_s"] > 0 and r["solo_wall_s"] > 0 and 0 <= r["loader_share"] <= 1
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["rows"] == rows and "| K |" in capsys.readouterr().out


def test_a_stopped_sweep_resumes_every_run_and_its_index_says_how_each_ended(store, tmp_path):
    out = tmp_path / "sweep"
    args = ["distill", "--cache", store, "--epochs", "1", "--batch-size", "32", "--val-every", "0"]
    args += ["--workers", "0", "--method", "kd,ce", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--max-steps", "3"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    index = json.loads((out / "sweep.json").read_text())
    assert [(r["folder"], r["status"]) for r in index["runs"]] == [("method=kd", "stopped"), ("method=ce", "stopped")]
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    index = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["finished", "finished"]
    for run in ("method=kd", "method=ce"):
        assert (out / run / "summary.json").is_file()
