"""``dhkd-pipe bench all --tiny``: every benchmark runs and lands in one table and one JSON."""

import json
import tempfile

import pytest
from click.testing import CliRunner

from dhkd_pipe.cli import main


@pytest.mark.slow  # every benchmark, at tiny sizes: about a minute
def test_bench_all_tiny_writes_one_table_and_one_json(tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", "all", "--tiny", "--out", str(out)])
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    payload = json.loads((out / "bench_all.json").read_text())
    assert payload["size"] == "tiny" and payload["machine"]["device"].startswith("cpu")
    assert set(payload["seconds"]) == {"kernels", "cache", "distill", "store"}
    benches = {r["bench"] for r in payload["rows"]}
    assert benches == {"kernels", "cache", "distill", "store"}
    table = (out / "bench_all.md").read_text()
    assert (
        table.startswith("# dhkd-pipe bench all: cpu") and table.count("\n| ") == len(payload["rows"]) + 2
    )  # header, rule, rows
    for name in ("kernels", "cache", "distill", "store", "store_sharded"):
        assert (out / f"bench_{name}.json").exists()
    sharded = [r["what"] for r in payload["rows"] if "local, sharded" in r["what"]]
    assert (
        len(sharded) == 3 and json.loads((out / "bench_store_sharded.json").read_text())["sharded"] is True
    )  # 2 writes, 1 read
    # the parallel writer's row on disk: its rate against one reader's, the goal (>= 1)
    for r in json.loads((out / "bench_store.json").read_text())["results"][1:]:
        row = next(
            x
            for x in payload["rows"]
            if x["what"] == f"2048 rows x 100 fp16, local, {r['writer_threads']} writer threads: write"
        )
        assert row["ratio_of"] == "x one reader" and row["ratio"] == r["write_rows_per_sec"] / r["read_rows_per_sec"]
    assert list(payload["seconds"]) == [
        "kernels",
        "store",
        "cache",
        "distill",
    ]  # the store before the others delete files
    # the image-folder rows: each image decoded once for its views (1/2 with 2 views), counted
    once = [r for r in payload["rows"] if "decode once (after)" in r["what"]]
    assert len(once) == 1 and "(0.500 decoded/row)" in once[0]["what"] and once[0]["value"] > 0
    per_view = [r for r in payload["rows"] if "view by view (before)" in r["what"]]
    assert len(per_view) == 1 and "(1.000 decoded/row)" in per_view[0]["what"]
    assert any("region decode == whole decode" in r["what"] and r["value"] == 1.0 for r in payload["rows"])


def test_bench_all_refuses_an_unknown_benchmark(tmp_path):
    result = CliRunner().invoke(main, ["bench", "all", "--tiny", "--only", "nothing", "--out", str(tmp_path)])
    assert result.exit_code == 2


def test_one_failing_benchmark_keeps_the_others_figures(tmp_path, monkeypatch, capsys):
    """A lent GPU's minutes are few: a benchmark that breaks is a row of the table and an exit 2 at
    the end, after the others ran and the table and the JSON were written."""
    from dhkd_pipe.benchmarks import suite as bench_all

    def broken(out, s):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def fine(out, s):
        return [
            {"bench": "store", "what": "local write", "value": 123.0, "unit": "rows/s", "ratio": None, "ratio_of": ""}
        ]

    monkeypatch.setattr(bench_all, "BENCHES", {"kernels": broken, "store": fine})
    result = CliRunner().invoke(main, ["bench", "all", "--tiny", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "1 benchmark(s) failed (kernels" in result.output
    payload = json.loads((tmp_path / "bench_all.json").read_text())
    assert payload["failed"] == {"kernels": "CUDA error: an illegal memory access was encountered"}
    assert [r["what"] for r in payload["rows"]] == [
        "failed: CUDA error: an illegal memory access was encountered",
        "local write",
    ]
    assert "| store | local write | 123.0 |" in (tmp_path / "bench_all.md").read_text()


@pytest.mark.parametrize("sharded", [False, True])
def test_bench_store_lays_the_stores_out_as_asked(tmp_path, monkeypatch, sharded):
    """``bench store --sharded`` writes its stores in shards (several chunks per write unit),
    as an ImageNet-sized store is; without it a small store has one chunk per unit."""
    from dhkd_pipe.store.writer import write_threads

    args = [
        "bench",
        "store",
        "--rows",
        "1000",
        "--classes",
        "10",
        "--chunk-rows",
        "64",
        "--json",
        str(tmp_path / "b.json"),
    ]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the stores' temporary folder
    result = CliRunner().invoke(main, args + (["--sharded"] if sharded else []))
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    payload = json.loads((tmp_path / "b.json").read_text())
    assert payload["sharded"] is sharded and [r["writer_threads"] for r in payload["results"]] == [
        1,
        max(2, write_threads(str(tmp_path))),
    ]
    assert {r["chunks_per_write_unit"] for r in payload["results"]} == ({16} if sharded else {1})
    assert (
        all(r["write_rows_per_sec"] > 0 for r in payload["results"]) and payload["results"][1]["read_rows_per_sec"] > 0
    )
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]  # both stores deleted, and their temporary folder


def test_a_result_file_records_machine_date_commit_command_and_version(tmp_path, monkeypatch):
    """Result files are data the docs are made from: each says where, when, from which code and
    by which command its figures were measured."""
    import datetime
    import sys

    from dhkd_pipe.benchmarks import measure
    from dhkd_pipe.version import tool_version

    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/dhkd-pipe", "bench", "store", "--json", "b.json"])
    written = measure.write_results(str(tmp_path / "b.json"), {"bench": "store", "results": [{"rows": 1}]}, log=print)
    payload = json.loads((tmp_path / "b.json").read_text())
    assert written == str(tmp_path / "b.json") and payload["results"] == [{"rows": 1}]
    assert payload["command"] == "dhkd-pipe bench store --json b.json" and payload["version"] == tool_version()
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(payload["date"])
    assert payload["date"].endswith("+00:00") and abs(age.total_seconds()) < 60
    m = payload["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["memory_gib"] > 0 and m["slug"] == measure.machine_slug(m)
    assert m["device"] and "torch" in m and "python" in m
    assert payload["commit"] == measure.git_commit()


def test_a_benchmarks_own_machine_fields_are_kept(tmp_path):
    from dhkd_pipe.benchmarks import measure

    measure.write_results(str(tmp_path / "a.json"), {"machine": {"torch_threads": 7}}, log=print)
    m = json.loads((tmp_path / "a.json").read_text())["machine"]
    assert m["torch_threads"] == 7 and m["cores"] >= 1


def _git(repo, *args):
    import subprocess

    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True, capture_output=True
    )


def test_the_commit_is_the_short_hash_and_dirty_only_when_tracked_files_differ(tmp_path):
    import shutil
    import subprocess

    from dhkd_pipe.benchmarks.measure import git_commit

    if shutil.which("git") is None:
        pytest.skip("no git")
    assert git_commit(str(tmp_path)) is None  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "commit", "-q", "-m", "c")
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert git_commit(str(tmp_path)) == head
    (tmp_path / "bench_all.json").write_text("{}")  # a result just written: untracked, not a change of the code
    assert git_commit(str(tmp_path)) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(str(tmp_path)) == head + "+dirty"
    (tmp_path / "sub").mkdir()
    assert git_commit(str(tmp_path / "sub")) is None  # a folder inside another repository is not its checkout


@pytest.mark.parametrize(
    "m, slug",
    [
        ({"gpu": "NVIDIA H200", "gpu_count": 1}, "nvidia-h200"),
        ({"gpu": "NVIDIA H100 80GB HBM3", "gpu_count": 8}, "nvidia-h100-80gb-hbm3-x8"),
        (
            {"gpu": None, "cpu": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cores": 2},
            "cpu-intel-xeon-platinum-8481c-2c",
        ),
        (
            {"gpu": None, "cpu": "AMD EPYC 7B13 64-Core Processor", "cores": 16},
            "cpu-amd-epyc-7b13-64-core-processor-16c",
        ),
    ],
)
def test_the_machine_slug_names_the_device(m, slug):
    from dhkd_pipe.benchmarks.measure import machine_slug

    assert machine_slug(m) == slug


def test_bench_all_files_its_results_under_the_machines_folder(tmp_path, monkeypatch):
    """``--out 'DIR/{machine}'`` puts every result file in DIR/<machine slug>/, as benchmarks/results/ keeps them."""
    import sys

    from dhkd_pipe.benchmarks import suite as bench_all
    from dhkd_pipe.benchmarks.measure import machine_slug

    def fine(out, s):
        return [
            {"bench": "store", "what": "local write", "value": 1.0, "unit": "rows/s", "ratio": None, "ratio_of": ""}
        ]

    monkeypatch.setattr(bench_all, "BENCHES", {"store": fine})
    args = ["bench", "all", "--tiny", "--out", str(tmp_path / "{machine}")]
    monkeypatch.setattr(sys, "argv", ["dhkd-pipe", *args])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    folder = tmp_path / machine_slug()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    payload = json.loads((folder / "bench_all.json").read_text())
    assert payload["machine"]["slug"] == folder.name and "bench all --tiny --out" in payload["command"]
    assert (folder / "bench_all.md").exists()
