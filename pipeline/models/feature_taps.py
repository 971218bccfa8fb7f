"""Feature taps: a model's intermediate features, on request, for the feature distillation methods.

``forward_taps(model, x) -> (logits, FeatureTaps)`` for every model of the zoo:

- the CIFAR zoo (and MobileNetV1) define ``forward_taps`` themselves, returning what mdistiller's zoo
  (``mdistiller/models/cifar``, ``models/imagenet/mobilenetv1.py``) returns beside the logits:
  ``feats`` (the stem and each stage after its activation), ``preact_feats`` (the same before the
  stage's last activation) and ``pooled`` (the feature the classifier reads);
- torchvision ResNets through ``torchvision.models.feature_extraction`` (the taps of mdistiller's
  ImageNet ResNet: stem and stages before / after their ReLU, the stem taken before max-pooling);
- timm models through their ``forward_intermediates`` (timm has no pre-activation taps, so there
  ``preact_feats`` are the stage outputs too);
- ``DualHead`` through its backbone, with both heads' logits.

The plain ``forward`` of every model is untouched (same code path, same state-dict keys); the taps
are a second forward that shares the weights. ``tap_shapes`` finds the taps' shapes by one forward
on the ``meta`` device (no memory, no compute, no BatchNorm statistics touched).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn as nn

from dhkd_pipe.errors import DhkdError


class FeatureTaps(NamedTuple):
    """One forward's taps: lists of (B, C, H, W) tensors, shallow to deep, and the (B, D) pooled feature."""

    feats: list
    preact_feats: list
    pooled: torch.Tensor


class TapShapes(NamedTuple):
    """Per-sample shapes (C, H, W) of each tap, and the pooled feature's width."""

    feats: list
    preact_feats: list
    pooled: int


def forward_taps(model: nn.Module, x: torch.Tensor):
    """``(logits, FeatureTaps)`` of ``model`` on ``x`` (logits as the plain forward returns them:
    a tensor, or ``DualHead``'s pair)."""
    own = getattr(model, "forward_taps", None)
    if own is not None:
        return own(x)
    if hasattr(model, "forward_intermediates") and hasattr(model, "forward_head"):
        return _timm_taps(model, x)
    if _is_torchvision_resnet(model):
        return _torchvision_resnet_taps(model, x)
    raise DhkdError(
        f"{type(model).__name__} has no feature taps: the feature methods take the CIFAR zoo, "
        "MobileNetV1, torchvision ResNets and timm models with forward_intermediates"
    )


class _TapForward(nn.Module):
    """``forward_taps`` as a module's ``forward``, for ``torch.func.functional_call``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return forward_taps(self.model, x)


def tap_shapes(model: nn.Module, input_size: int, channels: int = 3) -> TapShapes:
    """The taps' per-sample shapes for a ``channels`` x ``input_size`` x ``input_size`` input,
    from one forward on the ``meta`` device (the model's own tensors are neither read nor changed)."""
    wrapper = _TapForward(model)
    meta = {
        name: torch.empty_like(t, device="meta") for name, t in [*wrapper.named_parameters(), *wrapper.named_buffers()]
    }
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.empty(2, channels, input_size, input_size, device="meta", dtype=dtype)  # 2: BatchNorm in training
    with torch.no_grad():
        _, taps = torch.func.functional_call(wrapper, meta, (x,))
    return TapShapes(
        [tuple(f.shape[1:]) for f in taps.feats],
        [tuple(f.shape[1:]) for f in taps.preact_feats],
        int(taps.pooled.shape[1]),
    )


# --- torchvision: ResNet-family graphs through torchvision.models.feature_extraction -----------------


def _is_torchvision_resnet(model) -> bool:
    return type(model).__name__ == "ResNet" and type(model).__module__.startswith("torchvision.")


_EXTRACTORS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _torchvision_resnet_taps(model, x):
    graph_module = _EXTRACTORS.get(model)
    if graph_module is None:
        graph_module = _EXTRACTORS[model] = _torchvision_resnet_extractor(model)
    graph_module.train(model.training)
    out = graph_module(x)
    taps = FeatureTaps([out[f"post{i}"] for i in range(5)], [out[f"pre{i}"] for i in range(5)], out["pooled"])
    return out["logits"], taps


def _torchvision_resnet_extractor(model):
    """A graph module (sharing ``model``'s weights) returning mdistiller's ImageNet ResNet taps: the
    stem's BN output before / after its ReLU (before max-pooling), each stage's last residual sum
    before / after its ReLU, the pooled feature and the logits. torchvision's ReLUs are in place, so
    each pre-activation tap is cloned before its ReLU runs."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    names, _ = get_graph_node_names(model)
    nodes = {"bn1": "pre0", "relu": "post0", "flatten": "pooled", "fc": "logits"}
    for i in range(1, 5):
        block = f"layer{i}.{len(getattr(model, f'layer{i}')) - 1}"
        nodes[f"{block}.add"] = f"pre{i}"
        nodes[[n for n in names if n.startswith(f"{block}.relu")][-1]] = f"post{i}"  # the block's last ReLU
    graph_module = create_feature_extractor(model, return_nodes=nodes)
    for graph in (graph_module.train_graph, graph_module.eval_graph):
        output = next(n for n in graph.nodes if n.op == "output")
        returned = dict(output.args[0])
        for key in [k for k in returned if k.startswith("pre")]:
            with graph.inserting_after(returned[key]):
                returned[key] = graph.call_function(torch.clone, (returned[key],))
        output.args = (returned,)
    graph_module.recompile()
    return graph_module


# --- timm ----------------------------------------------------------------------------------------------


def _timm_taps(model, x):
    try:
        final, stages = model.forward_intermediates(x)
    except NotImplementedError as e:
        raise DhkdError(f"timm model {type(model).__name__} has no forward_intermediates: no feature taps") from e
    stages = [s for s in stages if s.dim() == 4]
    pooled = model.forward_head(final, pre_logits=True)
    return model.forward_head(final), FeatureTaps(stages, stages, pooled)
