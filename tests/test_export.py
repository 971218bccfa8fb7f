"""The exported student: model.safetensors beside model.pt, and `dhkd-pipe export --format onnx`."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import cli_here
from console_script import BIN

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models import create_model, load_checkpoint
from dhkd_pipe.training.exported import load_exported, read_exported, write_exported


def trained_like(arch="resnet8", classes=10, seed=0):
    """A dual-head model with random weights and non-trivial BatchNorm statistics, exported."""
    torch.manual_seed(seed)
    model = create_model(arch, classes, dual_head=True, aux_head="nonlinear")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    return model.export().eval()


def test_safetensors_and_pt_give_the_models_outputs(tmp_path):
    model = trained_like()
    write_exported(str(tmp_path), model, "resnet8", 10, 32, (0.1, 0.2, 0.3), (1.0, 0.9, 0.8))
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)

    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "resnet8" and json.loads(meta["num_classes"]) == 10 and json.loads(meta["resolution"]) == 32
    assert json.loads(meta["mean"]) == pytest.approx([0.1, 0.2, 0.3])
    assert not any("head2" in k or k.startswith("backbone.") for k in read_exported(str(tmp_path))[0])

    for weights in ("model.safetensors", "model.pt"):  # through the one checkpoint loader
        fresh = create_model("resnet8", 10)
        load_checkpoint(fresh, str(tmp_path / weights))
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), expected), weights
    rebuilt, facts = load_exported(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
    assert facts["std"] == pytest.approx([1.0, 0.9, 0.8])


def test_an_unfinished_run_has_nothing_to_export(tmp_path):
    with pytest.raises(DhkdError, match="no exported model"):
        read_exported(str(tmp_path))


def test_onnx_export_matches_pytorch(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from dhkd_pipe.stages.export import export_onnx

    model = trained_like()
    write_exported(str(tmp_path), model, "resnet8", 10, 32, (0.5,) * 3, (0.25,) * 3)
    result = export_onnx(str(tmp_path))
    assert result["ok"] is True and result["max_abs_diff"] <= result["tolerance"]
    assert result["onnx"] == str(tmp_path / "model.onnx") and result["input"] == ["batch", 3, 32, 32]
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.pt", "model.safetensors"]  # weights inline

    # our own check, at a third batch size: the batch axis is dynamic and the logits agree
    session = ort.InferenceSession(result["onnx"], providers=["CPUExecutionProvider"])
    x = torch.randn(11, 3, 32, 32)
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert logits.shape == (11, 10)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * (1 + np.abs(expected).max()))


@pytest.mark.slow
def test_training_writes_safetensors_and_the_export_command_checks_onnx(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli_here("train-teacher", "--model", "resnet8", "--data", "digits@256", "--epochs", "1", "--out", run)
    assert (run / "model.safetensors").is_file() and (run / "model.pt").is_file()
    out = tmp_path / "student.onnx"
    proc = subprocess.run(
        [BIN, "export", str(run), "--format", "onnx", "--out", str(out)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout is the JSON result alone
    assert result["ok"] is True and out.is_file() and result["checked_with"].startswith("onnxruntime")

    result = cli_here("export", tmp_path / "nowhere", check=False)
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
