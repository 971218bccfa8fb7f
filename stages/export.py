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
import shutil
import tempfile

import numpy as np
import torch

from dhkd_pipe.errors import DhkdError, io_error
from dhkd_pipe.files import check_replaceable
from dhkd_pipe.training.exported import load_exported
from dhkd_pipe.training.run_folder import ONNX, check_writable, claim_on_write, run_files

ONNX_EXTRA = 'pip install "dhkd-pipe[onnx]" (onnx, onnxscript, onnxruntime)'
# An ONNX metadata property of every file export writes: the one file it may later replace.
EXPORT_MARK = "written by dhkd-pipe export"
# Weights inline up to this size; larger ones go to OUT.data beside the file (protobuf's 2 GiB cap).
INLINE_BYTES = 1 << 30


def onnx_tolerance(reference: torch.Tensor) -> float:
    """Float32 kernels of two runtimes agree to a few ulps of the logits' scale."""
    return 1e-4 * (1.0 + float(reference.abs().max()))


def supported_opsets() -> tuple[int, int]:
    """The ONNX opsets this exporter and the installed onnx package can both write."""
    import onnx.defs
    from torch.onnx import _constants

    return int(_constants.ONNX_MIN_OPSET), min(int(_constants.ONNX_MAX_OPSET), int(onnx.defs.onnx_opset_version()))


def check_export_target(run_dir: str, out: str):
    """Refuses, before the export, an ``--out`` that is a folder, one of the run's own files, not
    an ``.onnx`` file name (the one format written here), or an existing file (or link) that
    export did not write (the run's ``model.onnx`` is the run's when its manifest claims it)."""
    if os.path.isdir(out):
        raise DhkdError(f"--out {out} is a folder; name the ONNX file to write")
    own = run_files(run_dir)
    if os.path.realpath(out) in own and own[os.path.realpath(out)] != ONNX:
        raise DhkdError(f"--out {out} is the run's own {own[os.path.realpath(out)]}; name another file")
    if (
        os.path.realpath(out) == os.path.realpath(os.path.join(run_dir, ONNX))
        and os.path.lexists(out)
        and os.path.realpath(out) not in own
    ):
        raise DhkdError(
            f"{out} was not written by dhkd-pipe (the run's manifest does not list it); "
            "name another --out, or move that file away"
        )
    if not out.lower().endswith(".onnx"):
        raise DhkdError(f"--out {out}: export writes ONNX; name a file ending in .onnx")
    if os.path.realpath(out) not in own:
        check_replaceable(out, EXPORT_MARK, "export")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise DhkdError(f"cannot write {out}: {parent} is not a folder")
    check_writable(parent, out)


def export_onnx(run_dir: str, out: str | None = None, opset: int | None = None, test_batch: int = 5) -> dict:
    """Writes ``out`` (default ``RUN/model.onnx``) and, with onnxruntime, checks it against PyTorch.

    The file is written beside its target under a temporary name and renamed into place once
    whole: a failure or a signal leaves the previous file as it was."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise DhkdError(f"export --format onnx needs {' and '.join(missing)}: {ONNX_EXTRA}")
    if opset is not None:
        low, high = supported_opsets()
        if not low <= opset <= high:
            raise DhkdError(f"bad --opset {opset}: this exporter writes opsets {low} to {high}")
    out = out or os.path.join(run_dir, ONNX)
    check_export_target(run_dir, out)
    model, facts = load_exported(run_dir)
    res = int(facts["resolution"])
    example = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(0))
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    # a private folder beside the target: the same name inside it, so external data keeps its reference
    staging = tempfile.mkdtemp(prefix=".export-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(out)))
    staged = os.path.join(staging, os.path.basename(out))
    try:
        try:
            torch.onnx.export(
                model,
                (example,),
                staged,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                dynamo=True,
                external_data=nbytes > INLINE_BYTES,
                verbose=False,
            )
        except OSError as e:  # the file cannot be written (a read-only folder, a full disk)
            raise io_error(out, e) from None
        except Exception as e:
            if opset is None:
                raise
            raise DhkdError(
                f"cannot export {facts['arch']} at --opset {opset}: {' '.join(str(e).split())[:200]}"
            ) from None
        import onnx

        proto = onnx.load(staged, load_external_data=False)
        written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is not None and written != opset:
            raise DhkdError(
                f"the exporter wrote opset {written}, not the asked --opset {opset}; choose an opset it writes"
            )
        mark = proto.metadata_props.add()
        mark.key, mark.value = "written_by", EXPORT_MARK
        onnx.save(proto, staged)  # external data, if any, stays where the exporter wrote it
        result = {
            "onnx": out,
            "arch": facts["arch"],
            "num_classes": int(facts["num_classes"]),
            "input": ["batch", 3, res, res],
            "opset": written,
            "mean": facts.get("mean"),
            "std": facts.get("std"),
            "bytes": os.path.getsize(staged),
        }
        result.update(check_onnx(staged, model, res, test_batch))
        claim_on_write(
            os.path.join(os.path.dirname(os.path.abspath(out)), os.path.basename(out))
        )  # the run's, if in its folder
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _move_into_place(staging: str, out: str):
    """Renames the staged file (external data first, then the model) over ``out``."""
    name = os.path.basename(out)
    try:
        for entry in sorted(os.listdir(staging), key=lambda n: n == name):
            os.replace(os.path.join(staging, entry), os.path.join(os.path.dirname(os.path.abspath(out)), entry))
    except OSError as e:
        raise io_error(out, e) from None


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
    return {
        "checked_with": f"onnxruntime {ort.__version__}",
        "test_batch": batch,
        "max_abs_diff": diff,
        "tolerance": tol,
        "ok": diff <= tol,
    }
