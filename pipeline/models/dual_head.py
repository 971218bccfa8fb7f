"""``DualHead``: any classifier with a second linear (or small MLP) head on the same features.

Head 1 is the model's own final ``nn.Linear`` (same weights, trained with cross-entropy), head 2 is
new (trained with the distillation loss): a linear layer, or the small MLP of the published DHKD code
(nmihtrug/mdistiller ``mdistiller/models/cifar/classifier.py``). ``export()`` gives back a plain
single-head model whose state dict loads wherever the unwrapped architecture does.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models.aux_heads import AUX_HEADS


class AlignedSplit(torch.autograd.Function):
    """Identity into two branches whose gradients are merged per sample (``--grad-align-features``).

    This project's variant, NOT the published algorithm (that is ``dhkd_pipe.training.grad_align``, PCGrad
    over the parameter gradients, ``--grad-align``): it aligns only the gradient that reaches the
    shared features, row by row, and leaves the heads' own gradients alone.
    Forward returns two copies of the features (branch 1 feeds head 1, branch 2 feeds head 2).
    Backward, per row: where <g1, g2> < 0, g2 <- g2 - <g1, g2> / |g1|^2 * g1 (rows with g1 = 0 are
    left alone); the feature gradient is g1 + g2.
    """

    @staticmethod
    def forward(ctx, feat):
        return feat.clone(), feat.clone()

    @staticmethod
    def backward(ctx, g1, g2):
        if g1 is None or g2 is None:
            return g2 if g1 is None else g1
        return align_feature_gradients(g1, g2)


def align_feature_gradients(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """``g1 + g2'`` with ``g2'`` the part of ``g2`` that does not conflict with ``g1`` (per row)."""
    shape = g1.shape
    a = g1.reshape(shape[0], -1) if g1.dim() > 1 else g1.reshape(1, -1)
    b = g2.reshape(a.shape)
    dot = (a * b).sum(1, keepdim=True)
    norm2 = (a * a).sum(1, keepdim=True)
    conflict = (dot < 0) & (norm2 > 0)
    coef = torch.where(conflict, dot / torch.where(norm2 > 0, norm2, torch.ones_like(norm2)), torch.zeros_like(dot))
    return (a + b - coef * a).reshape(shape)


def nonlinear_head(in_features: int, num_classes: int, hidden: int = 200, drop: float = 0.1) -> nn.Sequential:
    """The published DHKD code's non-linear auxiliary head (its ``NonLinearClassifier``):
    Linear(in, 200) -> Dropout(0.1) -> BatchNorm1d(200) -> ReLU -> Linear(200, num_classes)."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.Dropout(p=drop),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def find_classifier(model: nn.Module, num_classes: int | None = None) -> tuple[str, nn.Linear]:
    """The classifier a model declares (timm's ``pretrained_cfg["classifier"]``), else the last
    ``nn.Linear`` in ``named_modules()`` with ``out_features == num_classes`` (any out_features
    when ``num_classes`` is None)."""
    declared = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(declared, (tuple, list)):
        raise DhkdError(
            f"cannot add a second head to {type(model).__name__}: it has {len(declared)} "
            f"classifiers ({', '.join(declared)}), a DualHead needs one"
        )
    if isinstance(declared, str):
        try:
            head = model.get_submodule(declared)
        except AttributeError:
            head = None
        if isinstance(head, nn.Linear) and (num_classes is None or head.out_features == num_classes):
            return declared, head
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (num_classes is None or m.out_features == num_classes):
            found = (name, m)
    if found is None:
        what = "" if num_classes is None else f" with {num_classes} outputs"
        raise DhkdError(f"cannot add a second head to {type(model).__name__}: it has no nn.Linear classifier{what}")
    return found


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, module)


class DualHead(nn.Module):
    """Wraps ``model``: ``forward(x) -> (logits1, logits2)``, both from the same features.

    ``align_features`` routes the features through ``AlignedSplit`` (the per-sample feature variant,
    ``--grad-align-features``); the published parameter alignment lives in the training step.
    """

    def __init__(
        self, model: nn.Module, aux_head: str = "linear", align_features: bool = False, num_classes: int | None = None
    ):
        super().__init__()
        if aux_head not in AUX_HEADS:
            raise DhkdError(f"aux_head must be one of {', '.join(AUX_HEADS)}, got {aux_head!r}")
        if isinstance(model, DualHead):
            raise DhkdError("model is already a DualHead")
        path, head = find_classifier(model, num_classes)
        if not path:
            raise DhkdError(f"{type(model).__name__} is a bare linear layer; there is no backbone to share")
        _set_submodule(model, path, nn.Identity())
        self.backbone = model
        self.head1 = head
        self.head_path = path
        self.aux_head = aux_head
        self.align_features = align_features
        d, k = head.in_features, head.out_features
        self.head2 = nn.Linear(d, k) if aux_head == "linear" else nonlinear_head(d, k)
        p = head.weight
        self.head2.to(device=p.device, dtype=p.dtype)

    @property
    def num_classes(self) -> int:
        return self.head1.out_features

    def forward(self, x):
        return self.heads(self.backbone(x))

    def heads(self, feat):
        """(head 1, head 2) logits of the backbone's feature."""
        if self.align_features and torch.is_grad_enabled() and feat.requires_grad:
            f1, f2 = AlignedSplit.apply(feat)
        else:
            f1 = f2 = feat
        return self.head1(f1), self.head2(f2)

    def forward_taps(self, x):
        """((head 1, head 2), FeatureTaps): the backbone's taps passed through."""
        from dhkd_pipe.models.feature_taps import forward_taps

        feat, taps = forward_taps(self.backbone, x)
        return self.heads(feat), taps

    def export(self) -> nn.Module:
        """A deep copy of the plain single-head model (head 1 back in place, head 2 dropped)."""
        model = copy.deepcopy(self.backbone)
        _set_submodule(model, self.head_path, copy.deepcopy(self.head1))
        return model

    def single_head_state_dict(self) -> dict:
        """State dict in the unwrapped architecture's layout (what ``export()`` would save)."""
        sd = {k[len("backbone.") :]: v for k, v in self.state_dict().items() if k.startswith("backbone.")}
        sd.update({f"{self.head_path}.{k}": v for k, v in self.head1.state_dict().items()})
        return sd

    def load_single_head_state_dict(self, state_dict: dict, strict: bool = True):
        """Loads a plain model's state dict into backbone + head 1 (head 2 keeps its values)."""
        prefix = self.head_path + "."
        head = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        body = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        r1 = self.backbone.load_state_dict(body, strict=strict)
        r2 = self.head1.load_state_dict(head, strict=strict)
        return type(r1)(
            r1.missing_keys + [prefix + k for k in r2.missing_keys],
            r1.unexpected_keys + [prefix + k for k in r2.unexpected_keys],
        )


def single_head(model: nn.Module) -> nn.Module:
    """The model to deploy: what a wrapper's ``export()`` gives (a ``DualHead`` drops head 2, a
    feature method's ``StudentWithConnector`` drops its connector), any other model as it is."""
    return model.export() if callable(getattr(model, "export", None)) else model
