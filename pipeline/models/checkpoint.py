"""Checkpoint reading and loading: one function for the formats people actually have.

Accepted files: a plain state dict, ``{"model": ...}`` (RepDistiller / mdistiller CIFAR teachers,
the published DHKD code's teachers and students, with their ``args`` / ``opt`` namespace),
``{"state_dict": ...}`` (.pt/.pth/.tar, read with ``torch.load(weights_only=True)`` only) and
``.safetensors``. A ``module.`` prefix (DataParallel / DDP) is stripped; of an mdistiller distiller
checkpoint (``module.student.*``, ``module.teacher.*``) the student is taken. For torchvision and
timm architectures a named weight (``DEFAULT``, ``IMAGENET1K_V2``, ``pretrained``) is the library's
cached file, fetched when absent and online (``pretrained.py``).

Dual-head layouts: ours (``DualHead``: ``backbone.*``, ``head1.*``, ``head2.*``) and the published
DHKD code's (penghui-yang/DHKD ``models/*.py``): head 1 under the model's classifier name, head 2
under that name + ``2`` (``fc2``, ``linear2``, ``classifier2``), a non-linear head 2's layers under
``.net.`` (its ``NonLinearClassifier``), and MobileNetV1/V2 classifiers named ``classifier`` (a
plain Linear) where our zoo has ``fc`` / ``classifier.0``. Either loads into a ``DualHead`` or, with
head 2 dropped as ``export()`` drops it, into the plain model.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from typing import NamedTuple

import torch
import torch.nn as nn

from dhkd_pipe.errors import DhkdError, one_line
from dhkd_pipe.models.dual_head import DualHead, find_classifier
from dhkd_pipe.models.pretrained import (
    WeightsSource,
    looks_like_weight_name,
    resolve_weights,
    timm_pretrained_state_dict,
)

_SHOW = 5  # keys shown per category in a mismatch message

# The names the published KD code bases give a model's classifier (ours may differ: MobileNetV2
# ``classifier.0``, MobileNetV1 ``fc``); the published DHKD code names head 2 after head 1 + "2".
CLASSIFIER_NAMES = ("fc", "linear", "classifier")


def _strip_module(sd: dict) -> dict:
    """Drops a DataParallel/DDP ``module.`` prefix; of a distiller's state (mdistiller's
    ``student.*`` / ``teacher.*`` and the method's own modules) keeps the student."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if any(k.startswith("student.") for k in sd):
        sd = {k[len("student.") :]: v for k, v in sd.items() if k.startswith("student.")}
    return sd


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (see the module docstring for the formats)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DhkdError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise DhkdError(
                f"cannot read checkpoint {path}: not a valid safetensors file ({one_line(e, 160)})"
            ) from None
    else:
        try:
            # the training scripts of RepDistiller and the published DHKD code store their
            # argparse options beside the weights; a Namespace is a plain attribute bag
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except (
            pickle.UnpicklingError,
            RuntimeError,
            EOFError,
            zipfile.BadZipFile,
            ValueError,
            AttributeError,
            ImportError,
            IndexError,
            KeyError,
            TypeError,
            OSError,
        ) as e:
            raise DhkdError(
                f"cannot read checkpoint {path}: corrupt or not a weights-only torch file ({torch_load_reason(e)})"
            ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and _is_tensor_dict(inner):
                return _strip_module(dict(inner))
        if obj and _is_tensor_dict(obj):
            return _strip_module(dict(obj))
    what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
    raise DhkdError(f"no state dict in {path}: found {what}, expected tensors or a 'model'/'state_dict' entry")


def _is_tensor_dict(d: dict) -> bool:
    return all(isinstance(k, str) for k in d) and all(isinstance(v, torch.Tensor) for v in d.values())


# torch.load's advice around the reason (including to retry with weights_only=False: never do)
_TORCH_LOAD_BOILERPLATE = (
    "Weights only load failed",
    "Check the documentation",
    "Please file an issue",
    "In PyTorch 2.6",
)


def torch_load_reason(e: Exception) -> str:
    """The reason a ``torch.load(weights_only=True)`` failed, on one line, without torch's advice."""
    lines = [line.strip() for line in str(e).splitlines()]
    reason = [line for line in lines if line and not line.startswith(_TORCH_LOAD_BOILERPLATE)]
    text = " ".join(reason).replace("WeightsUnpickler error:", "").strip()
    if not text:
        return one_line(e, 160)
    return one_line(text, 200)


def _keys_text(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
    return f"{len(keys)} {label} ({shown})"


def check_state_dict(model_sd: dict, sd: dict, source: str, strict: bool = True) -> tuple[list, list]:
    """Raises DhkdError on shape mismatches (always) and missing/unexpected keys (strict)."""
    # BatchNorm counters absent from old (PyTorch < 0.4.1) checkpoints are not an error
    missing = [k for k in model_sd if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in model_sd]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
        for k in model_sd
        if k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)
    ]
    parts = []
    if strict and missing:
        parts.append(_keys_text("missing keys", missing))
    if strict and unexpected:
        parts.append(_keys_text("unexpected keys", unexpected))
    if shapes:
        parts.append(_keys_text("shape mismatches", shapes))
    if parts:
        raise DhkdError(f"checkpoint {source} does not match the model: " + "; ".join(parts))
    return missing, unexpected


def _without_aux(model: nn.Module) -> bool:
    from torchvision.models import GoogLeNet, Inception3

    net = getattr(model, "backbone", model)
    return isinstance(net, (GoogLeNet, Inception3)) and not net.aux_logits


class Heads(NamedTuple):
    body: dict  # named as in the plain model, without its classifier
    head1: dict  # relative to the head: weight, bias
    head2: dict  # empty for a single-head checkpoint; a non-linear one as our nn.Sequential (0.weight, ...)
    head2_keys: list  # head 2's keys as the checkpoint names them


def split_heads(sd: dict, head_path: str, body_keys) -> Heads:
    """Body and heads of a checkpoint in any layout the module docstring lists.

    ``head_path`` is our model's classifier and ``body_keys`` the plain model's other keys, so a
    layer of the body is never taken for a head.
    """
    if any(k.startswith("backbone.") for k in sd):
        body, heads, names = {}, {"head1.": {}, "head2.": {}}, []
        for k, v in sd.items():
            prefix = next((p for p in heads if k.startswith(p)), None)
            if prefix is None:
                body[k[len("backbone.") :] if k.startswith("backbone.") else k] = v
            else:
                heads[prefix][k[len(prefix) :]] = v
                names += [k] if prefix == "head2." else []
        return Heads(body, heads["head1."], heads["head2."], names)
    h1 = _head1_name(sd, head_path, body_keys)
    if h1 is None:
        return Heads(dict(sd), {}, {}, [])
    h2 = next(
        (
            n
            for n in (h1 + "2", h1.split(".")[0] + "2")
            if any(k.startswith(n + ".") for k in sd) and not any(k.startswith(n + ".") for k in body_keys)
        ),
        None,
    )
    body, head1, head2, names = {}, {}, {}, []
    for k, v in sd.items():
        if k.startswith(h1 + "."):
            head1[k[len(h1) + 1 :]] = v
        elif h2 is not None and k.startswith(h2 + "."):
            head2[k[len(h2) + 1 :]] = v
            names.append(k)
        else:
            body[k] = v
    if head2 and all(k.startswith("net.") for k in head2):  # the published NonLinearClassifier
        head2 = {k[len("net.") :]: v for k, v in head2.items()}
    return Heads(body, head1, head2, names)


def _head1_name(sd: dict, head_path: str, body_keys) -> str | None:
    """Our classifier's name if the checkpoint has it, else the one published name it uses."""
    if f"{head_path}.weight" in sd:
        return head_path
    found = [
        n
        for n in CLASSIFIER_NAMES
        if f"{n}.weight" in sd and f"{n}.weight" not in body_keys and sd[f"{n}.weight"].dim() == 2
    ]
    return found[0] if len(found) == 1 else None


def _classifier_path(model: nn.Module) -> str | None:
    try:
        return find_classifier(model)[0] or None
    except DhkdError:  # no Linear classifier (SqueezeNet): nothing to rename
        return None


def _check_aux_head(model, head2: dict, source: str) -> None:
    """A clear line when a checkpoint's head 2 is of the other kind than the model's."""
    expected = {k for k in model.head2.state_dict() if not k.endswith("num_batches_tracked")}
    if expected <= set(head2):
        return
    kind = "nonlinear" if "0.weight" in head2 else "linear" if "weight" in head2 else None
    if kind is not None and kind != model.aux_head:
        raise DhkdError(
            f"checkpoint {source} has a {kind} head 2, the model a {model.aux_head} one (--aux-head {kind})"
        )


def source_state_dict(source: WeightsSource) -> dict:
    """The state dict of resolved weights: timm's loading for timm's files, ours for the rest."""
    return timm_pretrained_state_dict(source) if source.kind == "timm" else read_state_dict(source.path)


def named_state_dict(arch: str, spec: str) -> tuple[dict, str]:
    """(state dict, its file) of a named weight of ``arch`` (see the module docstring)."""
    source = resolve_weights(arch, spec)
    return source_state_dict(source), source.path


def load_checkpoint(model: nn.Module, path_or_weight_name, strict: bool = True, arch: str | None = None):
    """Loads a checkpoint file, a named weight of a torchvision or timm ``arch``, or a resolved
    ``WeightsSource``.

    ``arch`` (the registry name) defaults to the name ``create_model`` built the model under.
    A ``DualHead`` model accepts a dual-head checkpoint (ours or the published DHKD code's) and a
    plain single-head one (loaded into backbone + head 1; head 2 keeps its values). A plain model
    accepts a dual-head checkpoint too: head 2 is dropped, as ``export()`` drops it, and its keys
    come back in ``unexpected_keys`` without an error. Returns ``(missing_keys, unexpected_keys)``
    like ``load_state_dict``; mismatches (and, with ``strict``, missing/unexpected keys) raise
    DhkdError.
    """
    arch = arch if arch is not None else getattr(model, "arch_name", None)
    if isinstance(path_or_weight_name, WeightsSource):  # already resolved (stage 1 records it)
        sd, path = source_state_dict(path_or_weight_name), path_or_weight_name.path
    else:
        spec = path = os.fspath(path_or_weight_name)
        if not os.path.exists(spec) and arch is not None and looks_like_weight_name(spec):
            sd, path = named_state_dict(arch, spec)
        else:
            sd = read_state_dict(path)

    dual = isinstance(model, DualHead)
    plain_sd = model.single_head_state_dict() if dual else model.state_dict()
    if _without_aux(model):
        # torchvision's GoogLeNet / Inception-v3 weights hold auxiliary classifiers that our
        # logits-only builds lack; torchvision itself drops them after loading
        sd = {k: v for k, v in sd.items() if k in plain_sd or not k.startswith(("aux1.", "aux2.", "AuxLogits."))}
    head_path = model.head_path if dual else None
    if not dual and set(sd) != set(plain_sd):
        head_path = _classifier_path(model)  # only needed when the names differ
    dropped, single = [], True
    if head_path is not None:
        body_keys = {k for k in plain_sd if not k.startswith(head_path + ".")}
        heads = split_heads(sd, head_path, body_keys)
        if dual and heads.head2:
            _check_aux_head(model, heads.head2, path)
            single = False
            sd = {
                **{f"backbone.{k}": v for k, v in heads.body.items()},
                **{f"head1.{k}": v for k, v in heads.head1.items()},
                **{f"head2.{k}": v for k, v in heads.head2.items()},
            }
        else:
            dropped = heads.head2_keys
            sd = {**heads.body, **{f"{head_path}.{k}": v for k, v in heads.head1.items()}}
    target_sd = model.state_dict() if dual and not single else plain_sd
    missing, unexpected = check_state_dict(target_sd, sd, path, strict)
    if dual and single:
        model.load_single_head_state_dict(sd, strict=False)
    else:
        model.load_state_dict(sd, strict=False)
    return nn.modules.module._IncompatibleKeys(missing, unexpected + dropped)


def check_finite_weights(model: nn.Module, source) -> None:
    """Refuses weights (parameters and buffers) holding NaN or infinity: such a teacher gives
    non-finite logits for every image, so it is refused before anything is written."""
    bad = [
        name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise DhkdError(
            f"the weights in {source} are not finite ({_keys_text('tensors hold NaN or inf', bad)}); "
            "the file is damaged or the run that wrote it diverged"
        )
