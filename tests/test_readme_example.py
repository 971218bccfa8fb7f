"""The README's "Use it from your own training loop" example runs as written, on a digits store
made here: the fenced block after the ``<!-- readme-example: own-training-loop -->`` marker."""

import ast
import os
import re

import pytest
import torch

import dhkd_pipe

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MARKER = "<!-- readme-example: own-training-loop -->"


def readme_example() -> str:
    with open(README) as f:
        text = f.read()
    assert text.count(MARKER) == 1, f"README.md must hold one {MARKER}"
    found = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)\n```", text, re.S)
    assert found, f"no ```python block right after {MARKER}"
    return found.group(1)


@pytest.mark.slow  # the example trains a student over the store
def test_readme_example_trains_a_student_from_a_store(tmp_path, monkeypatch, capsys, quick_store):
    code = readme_example()
    assert len(code.splitlines()) <= 30, "the README promises an example of about 30 lines at most"
    (tmp_path / "logits.zarr").symlink_to(quick_store)  # the session's digits store, only read
    monkeypatch.chdir(tmp_path)  # the example names its store logits.zarr and writes student.pt here
    torch.manual_seed(0)
    exec(compile(code, README, "exec"), {"__name__": "readme_example"})
    printed = [line.split(" ", 1) for line in capsys.readouterr().out.splitlines()]
    assert [epoch for epoch, _ in printed] == ["0", "1"]
    student = dhkd_pipe.create_model("resnet8", 10)  # the saved weights are a plain single-head resnet8
    student.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))
    top1 = ast.literal_eval(printed[-1][1])["top1"]  # the dict evaluate returned, as printed
    assert top1 > 10.0  # above chance (10 classes): it learned from the random teacher's labels + CE


def test_the_guide_shows_the_example_the_readme_runs():
    """The docs' "Your own training loop" page holds the same example, so the tested copy is the one both show."""
    guide = os.path.join(os.path.dirname(README), "docs", "guide", "own-training-loop.md")
    with open(guide) as f:
        assert "```python\n" + readme_example() + "\n```" in f.read()
