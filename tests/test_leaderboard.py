"""``dhkd-pipe report SWEEP``: the leaderboard of hand-made run folders: sorted by final top-1, the
mean and std over seeds, the epochs each ran and why it stopped, the markdown table, the JSON and
the pictures."""

import json
import os

import pytest
from click.testing import CliRunner

from dhkd_pipe.cli import main
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.stages.leaderboard import write_leaderboard


def run_folder(root, name: str, top1: list[float], summary: bool = True):
    folder = root / name
    folder.mkdir(parents=True)
    lines = [json.dumps({"epoch": i + 1, "train_loss": 1.0 / (i + 1), "val_top1": t}) for i, t in enumerate(top1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary:
        (folder / "summary.json").write_text(json.dumps({"model": "resnet8", "method": "kd", "val_top1": top1[-1]}))


@pytest.fixture
def sweep(tmp_path):
    """kd/dhkd x seeds 0,1; a third method whose one run is not finite after an epoch, one still
    'running' in the index but finished (the pass was killed before it rewrote the index)."""
    root = tmp_path / "sweep"
    runs = []

    def add(name, options, status, top1, summary=True, **extra):
        run_folder(root, name, top1, summary)
        runs.append({"folder": name, "options": options, "status": status, **extra})

    add("method=kd,seed=0", {"method": "kd", "seed": 0}, "finished", [50.0, 60.0])
    add("method=kd,seed=1", {"method": "kd", "seed": 1}, "finished", [52.0, 64.0])
    add("method=dhkd,seed=0", {"method": "dhkd", "seed": 0}, "finished", [55.0, 70.0])
    add("method=dhkd,seed=1", {"method": "dhkd", "seed": 1}, "running", [56.0, 72.0])
    add("method=dist,seed=0", {"method": "dist", "seed": 0}, "not finite", [90.0], False, reason="loss is not finite")
    (root / "sweep.json").write_text(json.dumps({"kind": "sweep", "swept": ["method", "seed"], "runs": runs}))
    return root


def test_the_leaderboard_sorts_by_top1_with_mean_and_std_over_seeds(sweep, tmp_path):
    out = tmp_path / "lb" / "report.png"
    text = write_leaderboard(str(sweep), str(out))
    lines = text.splitlines()
    assert lines[0] == "| # | method | seeds | top-1 (%) | epochs | stopped |"
    assert lines[2] == "| 1 | dhkd | 0,1 | 71.00 ± 1.41 | 2 | finished 2 |"
    assert lines[3] == "| 2 | kd | 0,1 | 62.00 ± 2.83 | 2 | finished 2 |"
    # a run that stopped early ranks after the finished ones, whatever its last top-1
    assert lines[4] == "| 3 | dist | 0 | 90.00 | 1 | not finite |"
    with open(tmp_path / "lb" / "report.json") as f:
        data = json.load(f)
    assert [g["options"]["method"] for g in data["groups"]] == ["dhkd", "kd", "dist"]
    assert data["groups"][0]["top1"] == pytest.approx(71.0) and data["groups"][0]["top1_std"] == pytest.approx(2**0.5)
    runs = {r["run"]: r for r in data["runs"]}
    assert runs["method=dhkd,seed=1"]["status"] == "finished"
    assert runs["method=dist,seed=0"]["reason"] == "loss is not finite" and runs["method=dist,seed=0"]["epochs"] == 1
    assert (tmp_path / "lb" / "report.md").read_text().splitlines()[1:] == lines
    for name in ("report.png", "report-method.png", "report-seed.png"):
        assert (tmp_path / "lb" / name).read_bytes()[:4] == b"\x89PNG", name


def test_report_on_a_sweep_folder_prints_its_leaderboard(sweep, tmp_path):
    result = CliRunner().invoke(main, ["report", str(sweep), "--out", str(tmp_path / "r.png")])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "| 1 | dhkd | 0,1 | 71.00 ± 1.41 | 2 | finished 2 |" in result.stdout
    # written again over its own files; never over a file report did not write
    assert CliRunner().invoke(main, ["report", str(sweep), "--out", str(tmp_path / "r.png")]).exit_code == 0
    (tmp_path / "mine.md").write_text("my notes\n")
    result = CliRunner().invoke(main, ["report", str(sweep), "--out", str(tmp_path / "mine.png")])
    assert result.exit_code == 2 and "not written by dhkd-pipe report" in result.stderr
    assert (tmp_path / "mine.md").read_text() == "my notes\n"


def test_a_killed_run_is_stopped_and_a_damaged_index_is_one_line(sweep, tmp_path):
    index = json.loads((sweep / "sweep.json").read_text())
    index["runs"].append({"folder": "method=ce,seed=0", "options": {"method": "ce", "seed": 0}, "status": "running"})
    run_folder(sweep, "method=ce,seed=0", [40.0], summary=False)
    (sweep / "sweep.json").write_text(json.dumps(index))
    write_leaderboard(str(sweep), str(tmp_path / "r.png"))
    data = json.loads((tmp_path / "r.json").read_text())
    assert {r["run"]: r["status"] for r in data["runs"]}["method=ce,seed=0"] == "stopped"
    (sweep / "sweep.json").write_text('{"runs": 3}')
    with pytest.raises(DhkdError, match="not a sweep's index"):
        write_leaderboard(str(sweep), str(tmp_path / "r.png"))
    (sweep / "sweep.json").write_text("{")
    with pytest.raises(DhkdError, match="is not JSON"):
        write_leaderboard(str(sweep), str(tmp_path / "r.png"))
    assert os.path.isfile(tmp_path / "r.png")
