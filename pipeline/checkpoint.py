"""Checkpoint reading and loading: one function for the formats people actually have.

Accepted files: a plain state dict, ``{"model": ...}`` (RepDistiller / mdistiller CIFAR teachers),
``{"state_dict": ...}`` (.pt/.pth/.tar, read with ``torch.load(weights_only=True)`` only) and
``.safetensors``. A ``module.`` prefix (DataParallel) is stripped. For torchvision architectures a
named weight (``IMAGENET1K_V2``, ``DEFAULT``, ``ResNet50_Weights.IMAGENET1K_V2``) is read from the
torch hub cache; nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile

import torch
import torch.nn as nn

from .errors import DhkdError

_SHOW = 5  # keys shown per category in a mismatch message


def file_digest(path) -> str:
    """First 16 hex digits of the file's sha256."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise DhkdError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()[:16]


def _strip_module(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
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
            raise DhkdError(f"cannot read checkpoint {path}: not a valid safetensors file ({_short(e)})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
                AttributeError, ImportError, IndexError, KeyError, TypeError, OSError) as e:
            raise DhkdError(f"cannot read checkpoint {path}: corrupt or not a weights-only torch file "
                            f"({_short(e)})") from None
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


def _short(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:160] + ("..." if len(text) > 160 else "")


def _keys_text(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
    return f"{len(keys)} {label} ({shown})"


def check_state_dict(model_sd: dict, sd: dict, source: str, strict: bool = True) -> tuple[list, list]:
    """Raises DhkdError on shape mismatches (always) and missing/unexpected keys (strict)."""
    # BatchNorm counters absent from old (PyTorch < 0.4.1) checkpoints are not an error
    missing = [k for k in model_sd if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in model_sd]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
              for k in model_sd if k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)]
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


def torchvision_weight_file(arch: str, name: str) -> str:
    """Path of the cached file of torchvision weight ``name`` for ``arch``; DhkdError if absent."""
    import torchvision

    short = name.rsplit(".", 1)[-1]
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise DhkdError(f"{arch} is not a torchvision architecture; pass a checkpoint file") from None
    try:
        weights = enum[short]
    except KeyError:
        names = ", ".join(enum.__members__)
        raise DhkdError(f"no torchvision weight {name!r} for {arch}; known: {names}") from None
    fname = os.path.basename(weights.url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
    if not os.path.isfile(path):
        raise DhkdError(f"torchvision weight {arch} {enum.__name__}.{weights.name} is not cached: place "
                        f"{fname} (from {weights.url}) at {path}, or pass a checkpoint file path")
    return path


def _without_aux(model: nn.Module) -> bool:
    from torchvision.models import GoogLeNet, Inception3

    net = getattr(model, "backbone", model)
    return isinstance(net, (GoogLeNet, Inception3)) and not net.aux_logits


def _looks_like_weight_name(spec: str) -> bool:
    return os.sep not in spec and "/" not in spec and not os.path.splitext(spec)[1].lower() in (
        ".pt", ".pth", ".tar", ".bin", ".ckpt", ".safetensors")


def load_checkpoint(model: nn.Module, path_or_weight_name, strict: bool = True, arch: str | None = None):
    """Loads a checkpoint file, or a cached torchvision named weight for torchvision ``arch``.

    ``arch`` (the registry name) defaults to the name ``create_model`` built the model under.
    A ``DualHead`` model accepts both its own state dict and a plain single-head one (loaded into
    backbone + head 1). Returns ``(missing_keys, unexpected_keys)`` like ``load_state_dict``;
    mismatches (and, with ``strict``, missing/unexpected keys) raise DhkdError.
    """
    spec = os.fspath(path_or_weight_name)
    path = spec
    arch = arch if arch is not None else getattr(model, "arch_name", None)
    tv_arch = None
    if not os.path.exists(spec) and arch is not None and _looks_like_weight_name(spec):
        from .models.registry import torchvision_arch

        tv_arch = torchvision_arch(arch)
        if tv_arch is None:
            raise DhkdError(f"checkpoint file not found: {spec} (named weights exist only for torchvision "
                            f"architectures, and {arch} is not one)")
        path = torchvision_weight_file(tv_arch, spec)
    sd = read_state_dict(path)

    from .models.dual_head import DualHead

    target_sd = model.state_dict()
    single = isinstance(model, DualHead) and not any(k.startswith("backbone.") for k in sd)
    if single:
        target_sd = model.single_head_state_dict()
    if _without_aux(model):
        # torchvision's GoogLeNet / Inception-v3 weights hold auxiliary classifiers that our
        # logits-only builds lack; torchvision itself drops them after loading
        sd = {k: v for k, v in sd.items() if k in target_sd or not k.startswith(("aux1.", "aux2.", "AuxLogits."))}
    missing, unexpected = check_state_dict(target_sd, sd, path, strict)
    if single:
        model.load_single_head_state_dict(sd, strict=False)
    else:
        model.load_state_dict(sd, strict=False)
    return nn.modules.module._IncompatibleKeys(missing, unexpected)
