"""``dhkd-pipe bench scale`` at a tiny size: its table, JSON and plot, each with every column."""

import json

import pytest

TINY = ["--sizes", "512,2048", "--views", "2", "--classes", "10", "--chunk-rows", "64", "--batch-size", "32"]
TINY += ["--reader-runs", "1"]


def test_bench_scale_writes_its_table_json_and_plot_with_every_column(tmp_path):
    """Two sizes on disk, and an earlier run's row shown beside them (``--before``)."""
    from conftest import cli_here

    from dhkd_pipe.benchmarks.scale import COLUMNS, GOALS, STEPS

    earlier = {"location": "local", "rows": 512, "open": 9.5, "run": "now"}
    (tmp_path / "before.json").write_text(json.dumps({"bench": "scale", "results": [earlier]}))
    out = tmp_path / "scale.json"
    result = cli_here("bench", "scale", *TINY, "--before", tmp_path / "before.json", "--json", out)
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| location |"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [header for _, header, _ in COLUMNS]
    shown = [line for line in lines if line.startswith("| local")]
    assert shown[0].startswith("| local (before) | 512 |") and "| 9.500 |" in shown[0]
    assert [line.split("|")[1:3] for line in shown[1:]] == [[" local ", " 512 "], [" local ", " 2,048 "]]
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert [(r["location"], r["rows"]) for r in rows] == [("local", 512), ("local", 2048)]
    for row in rows:
        assert all(row.get(key) is not None for key, _, _ in COLUMNS), row
        assert row["samples"] == row["rows"] // 2 and row["objects"] >= 4 * row["write_units"]
        assert 0 < row["reader_rss_mb"] and all(row[step] > 0 for step in STEPS)
    assert [g["step"] for g in payload["goals"]] == [step for step, _, _ in GOALS]
    assert all(g["met"] is not None and g["largest_rows"] == 2048 for g in payload["goals"])
    assert payload["before"] == [dict(earlier, run="before")]
    assert payload["machine"]["cores"] and "commit" in payload and "command" in payload
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sizes", "10000,ten"], "error: bad --sizes '10000,ten': comma-separated whole numbers of rows"),
        (["--sizes", "4", "--views", "8"], "error: --sizes must be at least --views rows"),
        (["--no-local"], "error: nothing to measure: drop --no-local, or give --s3-local"),
        (["--reader-runs", "0"], "error: --reader-runs must be 1 to 100, got 0"),
    ],
)
def test_bench_scale_refuses_what_it_cannot_measure_in_one_line(tmp_path, args, message):
    from conftest import cli_here

    result = cli_here("bench", "scale", *args, "--json", tmp_path / "x.json", check=False)
    assert result.exit_code == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_bench_scale_reads_no_before_file_that_is_not_its_own(tmp_path):
    from conftest import cli_here

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"bench": "store", "results": []}))
    result = cli_here("bench", "scale", "--before", other, "--json", tmp_path / "x.json", check=False)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: --before {other} is not a bench scale JSON")
