"""The behaviour record: a digits store's bytes and a two-epoch cached DHKD run's final parameters
and metrics, as the code made them before it was restructured into one home per concept.

``python tests/identity_case.py`` writes ``tests/data/identity_digits.json`` (run once, on the code
before the change); ``tests/test_identity.py`` recomputes the same digests and compares. Only the
command line and Zarr itself are used, so the record does not depend on the project's internals.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import numpy as np
import torch

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "identity_digits.json")
# --no-channels-last: the record was made with the NCHW teacher, stage 1's default before channels-last
# became the default (its logits differ from NCHW's by float rounding, within the codec's tolerance)
STORE_ARGS = [
    "--model",
    "resnet8",
    "--data",
    "digits",
    "--views",
    "2",
    "--chunk-rows",
    "256",
    "--batch-size",
    "64",
    "--no-channels-last",
]
RUN_ARGS = [
    "--student",
    "resnet8",
    "--method",
    "dhkd",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--lr-milestones",
    "1",
    "--seed",
    "0",
]
# the per-epoch metrics that depend on the numbers alone (not on time or the machine)
METRIC_KEYS = ("epoch", "lr", "train_loss", "train_ce", "train_kd", "val_top1", "val_top5", "val_loss")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def store_digests(path: str) -> dict:
    """sha256 of every array's values (shape and dtype included) and of the stored labels."""
    import zarr

    group = zarr.open_group(path, mode="r")
    out = {}
    for name in ("logits", "logit_scale", "order", "views", "labels", "done"):
        if name in group:
            values = np.asarray(group[name][...])
            out[name] = {"shape": list(values.shape), "dtype": str(values.dtype), "sha256": _digest(values)}
    return out


def params_digests(model_file: str) -> dict:
    """sha256 of every tensor of the run's ``model.safetensors`` (the exported student)."""
    from safetensors.torch import load_file

    state = load_file(model_file)
    return {k: _digest(v.reshape(-1).contiguous().view(torch.uint8).numpy()) for k, v in sorted(state.items())}


def metrics_record(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: row[k] for k in METRIC_KEYS if k in row} for row in rows]


def make(work: str) -> dict:
    """Builds the seeded random teacher, the store and the two-epoch cached DHKD run in ``work``."""
    from click.testing import CliRunner

    from dhkd_pipe.cli import main
    from dhkd_pipe.models import create_model

    torch.set_num_threads(1)  # float sums in one order, whatever the machine
    torch.manual_seed(0)
    teacher = os.path.join(work, "teacher.pt")
    torch.save({"model": create_model("resnet8", 10).state_dict()}, teacher)
    store, run = os.path.join(work, "logits.zarr"), os.path.join(work, "run")

    def cli(*args):
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code == 0, (args, result.stderr, result.exception)

    cli("cache-teacher", "--weights", teacher, *STORE_ARGS, "--out", store)
    cli("distill", "--cache", store, *RUN_ARGS, "--out", run)
    return {
        "store": store_digests(store),
        "params": params_digests(os.path.join(run, "model.safetensors")),
        "metrics": metrics_record(run),
    }


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as work:
        record = make(work)
    os.makedirs(os.path.dirname(RECORD), exist_ok=True)
    with open(RECORD, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {RECORD}", file=sys.stderr)
