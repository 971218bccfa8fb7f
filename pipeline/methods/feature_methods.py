"""The feature methods (online only): ``fitnet``, ``reviewkd`` and ``dhkd_reviewkd``.

They read both models' feature taps through a learnable connector: ``connector(student, teacher,
input_size)`` builds it from the taps' shapes (``methods.connectors``), and ``terms(...,
feature_loss=...)`` weighs its unweighted loss of the batch (the caller computes it from both
models' ``forward_taps``). A logit store holds no features (``CACHE_REFUSAL``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from dhkd_pipe.errors import BadArgument, DhkdError
from dhkd_pipe.methods.base import Method
from dhkd_pipe.methods.names import KD_LOSS_NAMES

CACHE_REFUSAL = (
    "--method {name} distils the teacher's intermediate features, which a logit store does not hold "
    "(about 1,000 times a view's logits); run it online: --teacher NAME [--teacher-weights FILE] "
    "instead of --cache"
)


def review_warmup(warmup_epochs: int, epoch: int) -> float:
    """ReviewKD's factor in (0-based) ``epoch``: mdistiller's min(epoch / warmup, 1), epochs from 1."""
    return min(1.0, (epoch + 1) / warmup_epochs) if warmup_epochs else 1.0


def _student_preact(input_size: int) -> bool:
    """mdistiller's ``STU_PREACT``: post-activation student levels on CIFAR (its default), pre-activation
    on ImageNet (its ImageNet recipes); told apart here by the input the student is built for."""
    return input_size > 64


@dataclass(frozen=True, kw_only=True)
class FeatureMethod(Method):
    """A method that reads both models' feature taps through a learnable connector."""

    needs_features: ClassVar[bool] = True

    def connector(self, student, teacher, input_size: int):
        """The method's learnable module, built from the taps' shapes (a forward on the meta device)."""
        raise NotImplementedError

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch=0, *, feature_loss=None):
        """As ``Method.terms``; ``feature_loss``: the connector's unweighted loss of the batch."""
        raise NotImplementedError

    def _check_feature_loss(self, feature_loss):
        if feature_loss is None:
            raise DhkdError(CACHE_REFUSAL.format(name=self.name))

    def _ce_plus_feature(self, outputs, target, weight: float, feature_loss) -> dict:
        """gamma * CE(outputs, y) + weight * feature_loss: the single-head feature methods' terms."""
        from dhkd_pipe.methods import losses

        self._check_feature_loss(feature_loss)
        ce = self.gamma * losses.cross_entropy(outputs, target, backend=self.backend)
        kd = weight * feature_loss
        return {"ce": ce, "kd": kd, "total": ce + kd}


@dataclass(frozen=True, kw_only=True)
class FitNet(FeatureMethod):
    """FitNets (Romero et al. 2015) as mdistiller's ``distillers/FitNet.py``: gamma * CE(s, y) +
    alpha * MSE(ConvReg(student feats[hint_layer]), teacher feats[hint_layer]); mdistiller's
    defaults: CE weight 1, feature weight 100, hint layer 2."""

    name = "fitnet"
    summary = "FitNet: CE + MSE of a regressed student feature map to the teacher's (online only)"
    knobs = {
        "gamma": "weight of CE",
        "alpha": "weight of the hint MSE",
        "hint_layer": "which feature tap (0 = stem) the regressor maps to the teacher's",
    }

    gamma: float = 1.0
    alpha: float = 100.0
    hint_layer: int = 2

    def connector(self, student, teacher, input_size):
        from dhkd_pipe.methods.connectors import FitNetHint
        from dhkd_pipe.models.feature_taps import tap_shapes

        return FitNetHint(tap_shapes(student, input_size), tap_shapes(teacher, input_size), self.hint_layer)

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch=0, *, feature_loss=None):
        return self._ce_plus_feature(outputs, target, self.alpha, feature_loss)


@dataclass(frozen=True, kw_only=True)
class ReviewKD(FeatureMethod):
    """ReviewKD (Chen et al. 2021) as mdistiller's ``distillers/ReviewKD.py``: gamma * CE(s, y) +
    alpha * min(1, (epoch + 1) / warmup_epochs) * HCL(ABF fusion of the student's levels, the
    teacher's preact_feats[1:] and pooled feature) (``feature_kd.ReviewKDFusion``). mdistiller's
    defaults: CE weight 1, ReviewKD weight 1, 20 warm-up epochs; its recipes: weight 5 for resnet32x4
    -> resnet8x4 on CIFAR-100, 1 for ResNet-34 -> ResNet-18 and 8 for ResNet-50 -> MobileNetV1 on
    ImageNet (warm-up 1). Student levels after their activation on CIFAR, before it on ImageNet."""

    name = "reviewkd"
    summary = "ReviewKD: CE + HCL of ABF-fused student features to the teacher's (online only)"
    knobs = {
        "gamma": "weight of CE",
        "alpha": "weight of the ReviewKD (HCL) term",
        "warmup_epochs": "epochs over which the ReviewKD term ramps up linearly",
    }

    gamma: float = 1.0
    alpha: float = 1.0
    warmup_epochs: int = 20

    def connector(self, student, teacher, input_size):
        from dhkd_pipe.methods.connectors import ReviewKDFusion
        from dhkd_pipe.models.feature_taps import tap_shapes

        return ReviewKDFusion(
            tap_shapes(student, input_size), tap_shapes(teacher, input_size), student_preact=_student_preact(input_size)
        )

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch=0, *, feature_loss=None):
        return self._ce_plus_feature(
            outputs, target, self.alpha * review_warmup(self.warmup_epochs, epoch), feature_loss
        )


@dataclass(frozen=True, kw_only=True)
class DHKDReviewKD(FeatureMethod):
    """The DHKD paper's "DHKD + ReviewKD": the DHKD loss (gamma * CE(head 1, y) + alpha *
    BinaryKL-norm(head 2, t) at T, its published defaults) plus the ReviewKD term on the shared
    backbone, beta * min(1, (epoch + 1) / warmup_epochs) * HCL, summed. ``kd`` = head 2's term + the
    ReviewKD term (logged apart as ``head2`` and ``review``), so ``--grad-align`` (this project's
    choice, the published DHKD code has no ReviewKD) projects alpha KD(head 2) + the ReviewKD term
    against gamma CE(head 1)."""

    name = "dhkd_reviewkd"
    summary = "DHKD + ReviewKD: DHKD's two heads plus the ReviewKD term on the backbone (online only)"
    knobs = {
        "gamma": "weight of CE on head 1",
        "alpha": "weight of the head-2 loss (--kd-loss)",
        "beta": "weight of the ReviewKD (HCL) term",
        "temperature": "T of the head-2 loss",
        "kd_loss": "head-2 loss, binary_kl_norm (as published), binary_kl or kd",
        "warmup_epochs": "epochs over which the ReviewKD term ramps up linearly",
    }
    term_names = ("ce", "kd", "head2", "review")
    dual_head = True

    gamma: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0
    temperature: float = 2.0
    kd_loss: str = dataclasses.field(default="binary_kl_norm", metadata={"choices": KD_LOSS_NAMES})
    warmup_epochs: int = 20

    def __post_init__(self):
        super().__post_init__()
        if self.kd_loss not in KD_LOSS_NAMES:
            raise BadArgument(f"unknown kd_loss {self.kd_loss!r}; choose one of: {', '.join(KD_LOSS_NAMES)}")

    connector = ReviewKD.connector

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch=0, *, feature_loss=None):
        self._check_feature_loss(feature_loss)
        head1, head2 = outputs
        fused = self._fused(head1, head2, teacher, target, teacher_scale, self.kd_loss)
        review = (self.beta * review_warmup(self.warmup_epochs, epoch)) * feature_loss
        kd = fused["kd"] + review
        return {"ce": fused["ce"], "kd": kd, "head2": fused["kd"], "review": review, "total": fused["ce"] + kd}


def is_feature_method(method) -> bool:
    return bool(getattr(method, "needs_features", False))
