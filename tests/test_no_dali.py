"""Without NVIDIA DALI (an extra: ``dhkd-pipe[cuda13]`` or ``[cuda12]``), in-memory data sets and the
store commands work, and an image folder is refused in one line naming the extras to install.

DALI is hidden the way an install without it looks to Python: ``sys.modules["nvidia.dali"] = None``
makes every ``import nvidia.dali...`` fail with ImportError.
"""

import json
import os
import subprocess
import sys

import pytest

DALI_MISSING = (
    "error: image folders are rendered by NVIDIA DALI, which is not installed: "
    "pip install 'dhkd-pipe[cuda13]' (CUDA 13 drivers) or 'dhkd-pipe[cuda12]' (CUDA 12)\n"
)

# The console script with DALI hidden: what an install without the cuda12/cuda13 extra runs.
WITHOUT_DALI = """
import sys
sys.modules["nvidia.dali"] = None
from dhkd_pipe.cli import main
main(sys.argv[1:])
"""


def image_folder(root):
    os.makedirs(root / "train" / "a")
    (root / "train" / "a" / "x.jpg").write_bytes(b"")
    return root


@pytest.mark.parametrize(
    "command",
    [
        ["cache-teacher", "--model", "resnet18", "--data", "{folder}", "--out", "{out}"],
        ["train-teacher", "--model", "resnet18", "--data", "{folder}", "--epochs", "1", "--out", "{out}"],
    ],
)
def test_an_image_folder_without_dali_is_one_line_naming_the_extras(tmp_path, monkeypatch, command):
    from conftest import cli_here

    folder = image_folder(tmp_path / "images")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    args = [a.format(folder=f"imagefolder:{folder}", out=tmp_path / "out") for a in command]
    result = cli_here(*args, check=False)
    assert (result.exit_code, result.stderr) == (2, DALI_MISSING), result.exception
    assert not (tmp_path / "out").exists()


def test_the_renderer_of_an_image_folder_without_dali_is_refused(tmp_path, monkeypatch):
    from dhkd_pipe.data.imagefolder import ImageFolderData
    from dhkd_pipe.errors import DhkdError

    data = ImageFolderData.from_folder(str(image_folder(tmp_path / "images")))  # DALI installed here
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(DhkdError, match=r"^image folders are rendered by NVIDIA DALI, which is not installed"):
        data.renderer("cpu", data.default_plan())


@pytest.mark.parametrize("hidden", ["nvidia.dali", "nvidia"])  # no DALI; no nvidia package at all (CPU torch)
def test_dali_installed_says_no_without_dali_or_without_any_nvidia_package(monkeypatch, hidden):
    from dhkd_pipe.data.imagefolder import dali_installed

    assert dali_installed()  # the dev extra brings it
    for name in [m for m in sys.modules if m.startswith(hidden + ".")]:  # as if never imported in this process
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, hidden, None)
    assert not dali_installed()


@pytest.mark.slow
def test_digits_stages_and_store_commands_run_without_dali(tmp_path, random_teacher):
    """cache-teacher, inspect and distill on digits in processes where DALI cannot be imported (an
    image folder's one line there is the in-process tests' above)."""

    def run(*args):
        return subprocess.run(
            [sys.executable, "-c", WITHOUT_DALI, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    store, out = tmp_path / "logits.zarr", tmp_path / "run"
    cached = run(
        "cache-teacher", "--weights", random_teacher, "--model", "resnet8", "--data", "digits@256",
        "--views", "2", "--chunk-rows", "64", "--out", store,
    )  # fmt: skip
    assert cached.returncode == 0, cached.stderr[-2000:]
    inspected = run("inspect", store, "--json")
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    summary = json.loads(inspected.stdout)
    assert summary["complete"] == "8/8" and summary["damaged"] == []  # 2 views x 256 rows in chunks of 64
    distilled = run(
        "distill", "--cache", store, "--student", "resnet8", "--method", "dhkd", "--epochs", "1",
        "--batch-size", "32", "--out", out,
    )  # fmt: skip
    assert distilled.returncode == 0, distilled.stderr[-2000:]
    assert (out / "model.safetensors").exists()
