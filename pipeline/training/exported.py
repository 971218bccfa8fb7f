"""The exported student of a run: the single-head model as ``model.pt`` and ``model.safetensors``.

Both files hold the same weights (head 2 dropped) and say how to rebuild and feed the model: the
registry name, the number of classes, the input resolution and the normalisation. ``model.pt`` is a
dict read with ``torch.load(weights_only=True)``; ``model.safetensors`` keeps the same facts as
string metadata, so a deployment needs neither pickle nor this package to read it.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.training.run_folder import EXPORTED, EXPORTED_SAFETENSORS, write_run_file


def write_exported(
    out: str, model: nn.Module, arch: str, num_classes: int, resolution: int, mean, std, plan: dict | None = None
):
    """Writes ``out/model.pt`` and ``out/model.safetensors`` (each atomically); ``plan`` (the
    run's ``ViewPlan.to_dict()``: crop, interpolation, normalisation) is kept beside the facts."""
    from safetensors.torch import save as safetensors_bytes

    # own, contiguous CPU copies: safetensors refuses views and tensors that share storage
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    facts = {
        "arch": arch,
        "num_classes": int(num_classes),
        "resolution": int(resolution),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }
    if plan is not None:
        facts["plan"] = plan
    write_run_file(os.path.join(out, EXPORTED), lambda f: torch.save({"model": weights, **facts}, f))
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in facts.items()}
    metadata["format"] = "dhkd-pipe exported student (single head)"
    data = safetensors_bytes(weights, metadata=metadata)
    write_run_file(os.path.join(out, EXPORTED_SAFETENSORS), lambda f: f.write(data))


def read_exported(run_dir: str) -> tuple[dict, dict]:
    """(state dict, facts) of a run's exported student; ``model.safetensors`` first."""
    st, pt = os.path.join(run_dir, EXPORTED_SAFETENSORS), os.path.join(run_dir, EXPORTED)
    if os.path.isfile(st):
        from safetensors import safe_open

        try:
            with safe_open(st, framework="pt") as f:
                meta = f.metadata() or {}
                weights = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own types for a damaged header
            raise DhkdError(f"cannot read {st}: {e}") from None
        try:
            facts = {k: v if k == "arch" else json.loads(v) for k, v in meta.items() if k != "format"}
        except json.JSONDecodeError:
            raise DhkdError(f"{st}: metadata is not what dhkd-pipe writes") from None
    elif os.path.isfile(pt):
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DhkdError(f"cannot read {pt}: {e}") from None
        if not isinstance(state, dict) or "model" not in state:
            raise DhkdError(f"{pt} is not an exported dhkd-pipe model")
        weights, facts = state["model"], {k: v for k, v in state.items() if k != "model"}
    else:
        raise DhkdError(
            f"{run_dir} holds no exported model ({EXPORTED_SAFETENSORS} or {EXPORTED}); is the run finished?"
        )
    missing = [k for k in ("arch", "num_classes") if k not in facts]
    if missing:
        raise DhkdError(f"the exported model in {run_dir} does not say its {' or '.join(missing)}")
    return weights, facts


def load_exported(run_dir: str) -> tuple[nn.Module, dict]:
    """The run's exported student rebuilt from the registry (eval mode, CPU), and its facts."""
    from dhkd_pipe.models import create_model
    from dhkd_pipe.models.checkpoint import check_state_dict

    weights, facts = read_exported(run_dir)
    model = create_model(facts["arch"], int(facts["num_classes"]))
    check_state_dict(model.state_dict(), weights, run_dir)
    model.load_state_dict(weights, strict=False)
    if "resolution" not in facts:  # runs exported before the resolution was recorded
        from dhkd_pipe.models import model_input_size

        facts["resolution"] = model_input_size(facts["arch"])
    return model.eval(), facts
