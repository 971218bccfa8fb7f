"""``dhkd-pipe export RUN --format onnx``: the run's exported student as an ONNX file, checked.

The model is rebuilt from ``model.safetensors`` (or ``model.pt``) and exported with PyTorch's
``torch.export``-based ONNX exporter (``dynamo=True``, the default since PyTorch 2.9; it needs
``onnx`` and ``onnxscript``), with a dynamic batch axis. Where ``onnxruntime`` is installed the
command runs the file on a seeded test batch of another batch size and reports the largest
difference from PyTorch's logits.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from dhkd_pipe.errors import DhkdError, io_error
from dhkd_pipe.exported import load_exported
from dhkd_pipe.run_folder import check_writable

ONNX_EXTRA = 'pip install "dhkd-pipe[onnx]" (onnx, onnxscript, onnxruntime)'
# Weights inline up to this size; larger ones go to OUT.data beside the file (protobuf's 2 GiB cap).
INLINE_BYTES = 1 << 30


def onnx_tolerance(reference: torch.Tensor) -> float:
    """Float32 kernels of two runtimes agree to a few ulps of the logits' scale."""
    return 1e-4 * (1.0 + float(reference.abs().max()))


def export_onnx(run_dir: str, out: str | None = None, opset: int | None = None, test_batch: int = 5) -> dict:
    """Writes ``out`` (default ``RUN/model.onnx``) and, with onnxruntime, checks it against PyTorch."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise DhkdError(f"export --format onnx needs {' and '.join(missing)}: {ONNX_EXTRA}")
    model, facts = load_exported(run_dir)
    out = out or os.path.join(run_dir, "model.onnx")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise DhkdError(f"cannot write {out}: {parent} is not a folder")
    if os.path.isdir(out):
        raise DhkdError(f"--out {out} is a folder; name the ONNX file to write")
    check_writable(parent, out)  # before the export, which takes a while
    res = int(facts["resolution"])
    example = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(0))
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    try:
        torch.onnx.export(
            model, (example,), out, input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, dynamo=True,
            external_data=nbytes > INLINE_BYTES, verbose=False,
        )
    except OSError as e:  # the file cannot be written (a missing or read-only folder, a full disk)
        _remove(out)
        raise io_error(out, e) from None
    except BaseException:
        _remove(out)
        raise

    import onnx

    proto = onnx.load(out, load_external_data=False)
    result = {
        "onnx": out,
        "arch": facts["arch"],
        "num_classes": int(facts["num_classes"]),
        "input": ["batch", 3, res, res],
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "mean": facts.get("mean"),
        "std": facts.get("std"),
        "bytes": os.path.getsize(out),
    }
    result.update(check_onnx(out, model, res, test_batch))
    return result


def check_onnx(path: str, model: torch.nn.Module, resolution: int, batch: int) -> dict:
    """Largest |ONNX Runtime - PyTorch| over the logits of a seeded batch (not the export's size)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return {"checked_with": None, "max_abs_diff": None, "ok": None}
    import onnxruntime as ort

    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x).float()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    diff = float(np.abs(logits - reference.numpy()).max())
    tol = onnx_tolerance(reference)
    return {"checked_with": f"onnxruntime {ort.__version__}", "test_batch": batch, "max_abs_diff": diff,
            "tolerance": tol, "ok": diff <= tol}


def _remove(path: str):
    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)
