"""One linter and formatter for the code: ``ruff check`` (pycodestyle, pyflakes, bugbear, import
order, line length: the rules in pyproject.toml) and ``ruff format --check`` pass over every folder
of code the project ships or tests it with."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "stages", "kernels", "benchmarks", "tests")


def ruff() -> str:
    """The ruff beside this interpreter (the dev extra installs it there), else one on PATH."""
    beside = Path(sys.executable).with_name("ruff")
    found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]' installs it)")
    return found


@pytest.mark.parametrize(
    "command", [["check", "--output-format", "concise"], ["format", "--check"]], ids=["check", "format"]
)
def test_ruff_passes_over_the_code(command):
    result = subprocess.run(
        [ruff(), *command, "--no-cache", *FOLDERS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"ruff {command[0]}:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"
