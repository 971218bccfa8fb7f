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
