"""The documentation site builds with ``mkdocs build --strict``, offline, and its generated pages
hold what the code declares: every command, every method, every result file."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# mkdocs run with every socket refused: no plugin, theme or font may reach the network
OFFLINE_MKDOCS = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("the docs build must not use the network")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from mkdocs.__main__ import cli
sys.exit(cli())
"""


def _hook():
    spec = importlib.util.spec_from_file_location("docs_hook", ROOT / "docs" / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _command_names(group, prefix="dhkd-pipe") -> list[str]:
    names = []
    for name, command in group.commands.items():
        names.append(f"{prefix} {name}")
        if hasattr(command, "commands"):
            names += _command_names(command, f"{prefix} {name}")
    return names


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_MKDOCS, "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow  # a whole site build: several seconds
def test_the_site_builds_strict_and_offline_with_every_command_in_the_cli_reference(site):
    from dhkd_pipe.cli import main

    page = (site / "reference" / "cli" / "index.html").read_text()
    names = _command_names(main)
    assert "dhkd-pipe bench all" in names and "dhkd-pipe distill" in names
    missing = [n for n in names if n not in page]
    assert not missing, f"commands missing from the CLI reference: {missing}"
    assert "Sentinel.UNSET" not in page
    for html in site.rglob("*.html"):
        text = html.read_text()
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, html


@pytest.mark.slow  # the same build
def test_the_generated_pages_hold_every_method_and_the_public_api(site):
    import dhkd_pipe
    from dhkd_pipe.methods.registry import METHODS

    methods = (site / "guide" / "methods" / "index.html").read_text()
    for name in METHODS:
        assert f'id="{name}"' in methods, name
    api = (site / "reference" / "api" / "index.html").read_text()
    missing = [n for n in dhkd_pipe.__all__ if not n.startswith("_") and f'id="dhkd_pipe.{n}"' not in api]
    assert not missing, f"public names missing from the API reference: {missing}"
    assert (site / "benchmarks" / "results" / "index.html").exists() and (site / "changelog" / "index.html").exists()


def test_the_results_page_renders_each_result_file_with_its_provenance(tmp_path):
    hook = _hook()
    folder = tmp_path / "nvidia-h200"
    folder.mkdir()
    payload = {
        "bench": "store",
        "machine": {"device": "NVIDIA H200", "gpu": "NVIDIA H200", "gpu_count": 1, "cpu": "Xeon", "cores": 16},
        "date": "2026-01-02T03:04:05+00:00",
        "commit": "abc1234+dirty",
        "command": "dhkd-pipe bench store --json 'benchmarks/results/{machine}/bench_store.json'",
        "version": "0.1.0",
        "results": [{"location": "local", "write_rows_per_sec": 123456.7, "ok": True, "nested": {"x": 1}}],
    }
    (folder / "bench_store.json").write_text(json.dumps(payload))
    page = hook.results_markdown(str(tmp_path))
    assert "## nvidia-h200" in page and "### bench_store.json" in page
    assert "| date (UTC) | 2026-01-02T03:04:05+00:00 |" in page and "| commit | abc1234+dirty |" in page
    assert "`dhkd-pipe bench store --json 'benchmarks/results/{machine}/bench_store.json'`" in page
    assert "GPU NVIDIA H200 x1" in page
    assert "| location | write_rows_per_sec | ok |" in page and "| local | 123,457 | True |" in page


def test_the_results_page_says_so_when_there_are_no_result_files(tmp_path):
    page = _hook().results_markdown(str(tmp_path))
    assert "No result files yet" in page and "| " not in page


def test_the_readmes_links_point_at_files_that_exist():
    """The README is the front page on a forge, outside the site build: its relative links are checked here."""
    import re

    text = (ROOT / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)]+)\)", text) if "://" not in t]
    assert len(links) > 10
    for target in links:
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
            assert anchor in {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}, target
