"""``dhkd-pipe bench all --tiny``: every benchmark runs and lands in one table and one JSON."""

import json

import pytest
from click.testing import CliRunner

from dhkd_pipe.cli import main

pytestmark = pytest.mark.slow  # every benchmark, at tiny sizes: about a minute


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
    assert table.startswith("# dhkd-pipe bench all: cpu") and table.count("\n| ") == len(payload["rows"]) + 2  # header, rule, rows
    for name in ("kernels", "cache", "distill", "store"):
        assert (out / f"bench_{name}.json").exists()
    # the image-folder rows: each image decoded once for its views (1/2 with 2 views), counted
    once = [r for r in payload["rows"] if "decode once (after)" in r["what"]]
    assert len(once) == 1 and "(0.500 decoded/row)" in once[0]["what"] and once[0]["value"] > 0
    per_view = [r for r in payload["rows"] if "view by view (before)" in r["what"]]
    assert len(per_view) == 1 and "(1.000 decoded/row)" in per_view[0]["what"]
    assert any("region decode == whole decode" in r["what"] and r["value"] == 1.0 for r in payload["rows"])


def test_bench_all_refuses_an_unknown_benchmark(tmp_path):
    result = CliRunner().invoke(main, ["bench", "all", "--tiny", "--only", "nothing", "--out", str(tmp_path)])
    assert result.exit_code == 2
