"""Distillation methods: one small object per ``--method``, shared by online and cached distillation.

A method is a frozen dataclass built with keywords (``DKD(beta=4.0)``); its fields are its options
with their published defaults, and ``knobs`` says in words what each one weighs. ``terms(outputs,
target, teacher, teacher_scale, epoch)`` returns the batch's named loss terms, float32 scalars:

- ``ce``: the weighted cross-entropy (head 1 for dual-head methods),
- ``kd``: the weighted distillation term (absent for ``ce``),
- ``total`` = ce + kd, what training back-propagates,

each with its own gradient, so a caller can differentiate ``ce`` and ``kd`` apart. A method may add
the weighted parts of ``kd`` for logging (``term_names`` lists every term but ``total``): dkd's
``tckd`` / ``nckd``, dist's ``inter`` / ``intra``. CE with KD or a binary KL goes through
``dhkd_pipe.methods.losses.dhkd_terms`` (one fused Triton launch on CUDA tensors, the PyTorch reference
elsewhere; a single-head method passes its logits as both heads); CE alone through
``losses.cross_entropy``; DKD's and DIST's terms are PyTorch references.

Adding a method: its class here and one entry in ``METHODS``; its fields become config fields and
``distill`` options by themselves (``config.MethodOptions``), its ``knobs`` their help.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from dhkd_pipe.errors import BadArgument, DhkdError, WrongType
from dhkd_pipe.methods.names import BACKENDS, KD_LOSS_NAMES
from dhkd_pipe.option_ranges import RANGES, number_text

if TYPE_CHECKING:  # the losses (torch) are imported where a batch is computed, so --help stays light
    import torch

BINARY_KL_LOSSES = ("binary_kl_norm", "binary_kl")


KD_STOP_HELP = (
    "distillation off from this epoch on, counting epochs from 1 as the published DHKD ImageNet script "
    "(--early_stop_epoch) does: with N, epochs 1 to N-1 distil and from epoch N on alpha is 0 (CE only); "
    "0 or unset: never"
)


def check_options(method) -> None:
    """Refuses an option of ``method`` of the wrong type (``WrongType``, a TypeError) or outside
    the range ``option_ranges`` declares for it (``BadArgument``, a ValueError: a NaN or negative
    weight, a temperature that is not positive): the same rule for the CLI and the Python API."""
    where = f"for --method {method.name}"
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        if f.name == "backend":
            if value not in BACKENDS:
                raise BadArgument(f"bad backend {value!r} {where}: choose one of {', '.join(BACKENDS)}")
            continue
        kind = str(f.type).split("|")[0].strip()
        if value is None and "None" in str(f.type):
            continue
        if kind == "str":
            if not isinstance(value, str):
                raise WrongType(f"{f.name} {where} must be a name (str), not {type(value).__name__} {value!r}")
            continue
        integral = kind == "int"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if integral else numbers.Real):
            what = "an integer" if integral else "a number"
            raise WrongType(f"{f.name} {where} must be {what}, not {type(value).__name__} {value!r}")
        problem = RANGES[f.name].problem(value) if f.name in RANGES else None
        if problem:
            raise BadArgument(f"bad {f.name} {number_text(value)} {where}: {problem}")


def _describe(value) -> str:
    """A value as an error line names it: a tensor by dtype, shape and device, else by type."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"a {str(value.dtype).replace('torch.', '')} tensor {tuple(shape)} on {getattr(value, 'device', 'cpu')}"
    return type(value).__name__


def _alpha_at(method, epoch: int) -> float:
    """``alpha`` in (0-based) ``epoch``: 0 from the published script's 1-based ``early_stop_epoch``
    on (its ``if epoch >= args.early_stop_epoch: args.alpha = 0``, epochs counted from 1)."""
    stop = method.kd_stop_epoch
    return 0.0 if stop and epoch + 1 >= stop else method.alpha


@dataclass(frozen=True, kw_only=True)
class Method:
    """Base of every method: what the engine asks of it."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for ``dhkd-pipe distill --help``
    knobs: ClassVar[dict[str, str]]  # option -> what it weighs / sets, in words
    term_names: ClassVar[tuple[str, ...]] = ("ce", "kd")
    dual_head: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True

    backend: str = "auto"  # losses: "auto" (Triton on CUDA), "triton" or "torch"

    def __post_init__(self):
        check_options(self)

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch: int = 0) -> dict[str, torch.Tensor]:
        """The named loss terms of one batch. ``outputs``: the student's logits, or (head 1, head 2)
        for dual-head methods; ``teacher``: float logits, or int8 with ``teacher_scale`` (B,);
        ``epoch``: 0-based, for schedules (DKD's warm-up, kd/dhkd's ``kd_stop_epoch``)."""
        raise NotImplementedError

    def check_batch(self, outputs, target, teacher=None, teacher_scale=None) -> None:
        """Refuses a batch this method cannot compute, with the argument named: ``outputs`` one
        (B, K) float tensor, or for dual-head methods the pair (head 1, head 2) a ``DualHead``
        returns; ``target`` (B,) integer class indices below K; ``teacher`` (B, K) float logits, or
        int8 with ``teacher_scale`` (B,); B at least 1; all on one device. Called by the loss
        modules (a user's loop), not per training step (the engine's batches are built checked)."""
        import torch

        name = f"--method {self.name}"
        if self.dual_head:
            if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2):
                raise WrongType(
                    f"student: {name} needs the pair (head 1, head 2) that DualHead returns, not {_describe(outputs)}"
                )
            heads = tuple(outputs)
        else:
            if isinstance(outputs, (tuple, list)):
                raise WrongType(f"student: {name} takes one tensor of logits (B, K), not a pair of heads")
            heads = (outputs,)
        for head in heads:
            if not isinstance(head, torch.Tensor) or not head.is_floating_point():
                raise WrongType(f"student: logits must be a float tensor, not {_describe(head)}")
            if head.dim() != 2 or head.shape != heads[0].shape:
                raise BadArgument(
                    "student: logits must be (B, K), one shape for both heads; got "
                    + " and ".join(str(tuple(h.shape)) for h in heads)
                )
        rows, classes = heads[0].shape
        if rows == 0 or classes == 0:
            raise BadArgument(f"student: an empty batch ({rows} rows, {classes} classes) has no loss")
        device = heads[0].device
        if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex():
            raise WrongType(f"labels: must be a tensor of integer class indices, not {_describe(target)}")
        if target.dtype == torch.bool or tuple(target.shape) != (rows,):
            raise BadArgument(f"labels: must be ({rows},) class indices, got {_describe(target)}")
        if target.device != device:
            raise BadArgument(f"labels: on {target.device}, the student's logits on {device}")
        if target.device.type == "cpu":  # on a GPU this would wait for the device at every call
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= classes:
                raise BadArgument(f"labels: class {low if low < 0 else high} is outside 0..{classes - 1}")
        if teacher is None:
            if self.needs_teacher:
                raise BadArgument(f"teacher: {name} needs the teacher's logits ({rows}, {classes})")
            return
        if not isinstance(teacher, torch.Tensor) or not (teacher.is_floating_point() or teacher.dtype == torch.int8):
            raise WrongType(f"teacher: logits must be a float (or int8) tensor, not {_describe(teacher)}")
        if tuple(teacher.shape) != (rows, classes):
            raise BadArgument(
                f"teacher: logits must be ({rows}, {classes}) like the student's, got {tuple(teacher.shape)}"
            )
        if teacher.device != device:
            raise BadArgument(f"teacher: on {teacher.device}, the student's logits on {device}")
        if teacher.dtype == torch.int8:
            if not isinstance(teacher_scale, torch.Tensor) or tuple(teacher_scale.shape) != (rows,):
                raise BadArgument(f"teacher_scale: int8 teacher logits need their ({rows},) row scales")
            if not teacher_scale.is_floating_point() or teacher_scale.device != device:
                raise WrongType(f"teacher_scale: must be a float tensor on {device}, not {_describe(teacher_scale)}")

    def params(self) -> dict:
        """The method's options as resolved (defaults filled in)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "backend"}

    def _fused(self, head_ce, head_kd, teacher, target, teacher_scale, kd_loss, alpha=None):
        from dhkd_pipe.methods.losses import dhkd_terms

        alpha = self.alpha if alpha is None else alpha
        ce, kd = dhkd_terms(
            head_ce,
            head_kd,
            teacher,
            target,
            temperature=self.temperature,
            alpha=alpha,
            gamma=self.gamma,
            kd_loss=kd_loss,
            teacher_scale=teacher_scale,
            backend=self.backend,
        )
        return {"ce": ce, "kd": kd, "total": ce + kd}


@dataclass(frozen=True, kw_only=True)
class CE(Method):
    """The student alone: gamma * CE(s, y)."""

    name = "ce"
    summary = "the student alone: cross-entropy on the labels"
    knobs = {"gamma": "weight of CE"}
    term_names = ("ce",)
    needs_teacher = False

    gamma: float = 1.0

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch=0):
        from dhkd_pipe.methods import losses

        ce = self.gamma * losses.cross_entropy(outputs, target, backend=self.backend)
        return {"ce": ce, "total": ce}


@dataclass(frozen=True, kw_only=True)
class KD(Method):
    """Hinton et al. 2015 with mdistiller's defaults (``configs/cifar100/kd.yaml``: CE weight 0.1,
    KD weight 0.9, T 4): gamma * CE(s, y) + alpha * T^2 KL(softmax(t/T) || softmax(s/T)).
    ``kd_stop_epoch`` (unset: never) sets alpha to 0 from that (1-based) epoch on, as the published
    DHKD ImageNet script's ``--early_stop_epoch`` does for both its methods, kd and dhkd."""

    name = "kd"
    summary = "Hinton KD: CE + softmax KL at temperature T (mdistiller: 0.1 CE + 0.9 KL, T 4)"
    knobs = {
        "gamma": "weight of CE",
        "alpha": "weight of the softmax KL",
        "temperature": "T of the KL",
        "kd_stop_epoch": KD_STOP_HELP,
    }

    gamma: float = 0.1
    alpha: float = 0.9
    temperature: float = 4.0
    kd_stop_epoch: int | None = None

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch=0):
        return self._fused(outputs, outputs, teacher, target, teacher_scale, "kd", _alpha_at(self, epoch))


@dataclass(frozen=True, kw_only=True)
class DKD(Method):
    """Decoupled KD (Zhao et al. 2022) as mdistiller's ``distillers/DKD.py``:
    gamma * CE(s, y) + min(1, (epoch + 1) / warmup_epochs) * (alpha * TCKD + beta * NCKD), both
    KL terms at temperature T with T^2 (``losses.dkd_terms``). alpha weighs only the target-class
    term TCKD, beta only the non-target term NCKD; mdistiller's CIFAR-100 defaults: CE weight 1,
    alpha 1, beta 8, T 4, 20 warm-up epochs (its epochs count from 1, ours from 0)."""

    name = "dkd"
    summary = "decoupled KD (Zhao et al. 2022): CE + alpha TCKD + beta NCKD, linear warm-up"
    knobs = {
        "gamma": "weight of CE",
        "alpha": "weight of TCKD (the target-class binary KL)",
        "beta": "weight of NCKD (the KL among the non-target classes)",
        "temperature": "T of TCKD and NCKD",
        "warmup_epochs": "epochs over which alpha*TCKD + beta*NCKD ramps up linearly",
    }
    term_names = ("ce", "kd", "tckd", "nckd")

    gamma: float = 1.0
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup_epochs: int = 20

    def warmup(self, epoch: int) -> float:
        """The distillation term's factor in (0-based) ``epoch``: mdistiller's min(epoch / warmup, 1)
        with its 1-based epochs."""
        return min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs else 1.0

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch=0):
        from dhkd_pipe.methods import losses

        t = losses.dequantize(teacher, teacher_scale)
        tckd, nckd = losses.dkd_terms(outputs, t, target, self.temperature)
        warm = self.warmup(epoch)
        tckd, nckd = (warm * self.alpha) * tckd, (warm * self.beta) * nckd
        ce = self.gamma * losses.cross_entropy(outputs, target, backend=self.backend)
        kd = tckd + nckd
        return {"ce": ce, "kd": kd, "tckd": tckd, "nckd": nckd, "total": ce + kd}


@dataclass(frozen=True, kw_only=True)
class BinaryKL(Method):
    """CE and BinaryKL on one head, the ablation the DHKD paper shows degrading:
    gamma * CE(s, y) + alpha * BinaryKL(s, t) at temperature T. ``kd_loss`` picks the binary KL form
    (``binary_kl_norm`` by default, the form the published DHKD code trains with, so that this
    differs from ``dhkd`` only in having one head); softmax KL on one head is ``--method kd``.
    T defaults to 2 like ``dhkd`` (the published code's ``--BinaryKL_T`` default)."""

    name = "binary_kl"
    summary = "CE and BinaryKL on ONE head (the ablation the DHKD paper shows degrading)"
    knobs = {
        "gamma": "weight of CE",
        "alpha": "weight of the BinaryKL(-norm) on the same head",
        "temperature": "T of the BinaryKL",
        "kd_loss": "which binary KL, binary_kl_norm or binary_kl",
    }

    gamma: float = 1.0
    alpha: float = 1.0
    temperature: float = 2.0
    kd_loss: str = "binary_kl_norm"

    def __post_init__(self):
        super().__post_init__()
        if self.kd_loss not in BINARY_KL_LOSSES:
            raise BadArgument(
                f"--method binary_kl takes --kd-loss {' or '.join(BINARY_KL_LOSSES)}, not {self.kd_loss!r} "
                "(softmax KL on one head is --method kd)"
            )

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch=0):
        return self._fused(outputs, outputs, teacher, target, teacher_scale, self.kd_loss)


@dataclass(frozen=True, kw_only=True)
class DHKD(Method):
    """Dual-head KD (Yang et al., arXiv 2411.08937): gamma * CE(head 1, y) + alpha * KD(head 2, t),
    KD = BinaryKL-norm by default (the published code's ``BinaryKLNorm``), or ``binary_kl`` / ``kd``.
    Defaults as published (penghui-yang/DHKD ``train_student.py``): ``-r`` gamma 1, ``--BinaryKL_T``
    T 2; ``-a`` alpha has no default there, its CIFAR-100 command uses 1 (its ImageNet command 0.1,
    in ``configs/imagenet/``). ``kd_stop_epoch`` (unset: never) sets alpha to 0 from that (1-based)
    epoch on: the ImageNet script's ``--early_stop_epoch``, default 50 there; its CIFAR script has
    no such switch."""

    name = "dhkd"
    summary = "dual-head KD: CE on head 1, BinaryKL(-norm) on head 2 (dropped at export)"
    knobs = {
        "gamma": "weight of CE on head 1",
        "alpha": "weight of the head-2 loss (--kd-loss)",
        "temperature": "T of the head-2 loss",
        "kd_loss": "head-2 loss, binary_kl_norm (as published), binary_kl or kd",
        "kd_stop_epoch": KD_STOP_HELP,
    }
    dual_head = True

    gamma: float = 1.0
    alpha: float = 1.0
    temperature: float = 2.0
    kd_loss: str = dataclasses.field(default="binary_kl_norm", metadata={"choices": KD_LOSS_NAMES})
    kd_stop_epoch: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.kd_loss not in KD_LOSS_NAMES:
            raise BadArgument(f"unknown kd_loss {self.kd_loss!r}; choose one of: {', '.join(KD_LOSS_NAMES)}")

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch=0):
        head1, head2 = outputs
        return self._fused(head1, head2, teacher, target, teacher_scale, self.kd_loss, _alpha_at(self, epoch))


@dataclass(frozen=True, kw_only=True)
class DIST(Method):
    """DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"):
    gamma * CE(s, y) + alpha * inter + beta * intra, with (``losses.dist_terms``, both times T^2)
    inter = 1 - mean Pearson correlation of softmax(s/T) and softmax(t/T) over the rows (each
    image's class scores) and intra = the same over the columns (each class across the batch).

    Defaults from the authors' code (hunto/DIST_KD, classification = hunto/image_classification_sota):
    the loss is ``DIST(beta=1, gamma=1, tau)`` (lib/models/losses/dist_kd.py) weighted by
    ``kd_loss_weight: 2`` next to ``ori_loss_weight: 1`` for CE, in both published recipes
    (configs/strategies/distill/resnet_dist.yaml for ImageNet, dist_cifar.yaml for CIFAR-100): so
    CE weight 1, inter-class weight 2, intra-class weight 2. Temperature 1: the ImageNet recipe's
    ``kd: dist`` (tau = 1, also the class default); the CIFAR-100 recipe uses ``kd: dist_t4``
    (T 4: pass --temperature 4). The intra term is computed over each process's own batch, as the
    authors' DDP training does."""

    name = "dist"
    summary = "DIST (Huang et al. 2022): CE + Pearson-correlation inter- and intra-class relations"
    knobs = {
        "gamma": "weight of CE",
        "alpha": "weight of the inter-class relation (per image, 1 - Pearson correlation)",
        "beta": "weight of the intra-class relation (per class over the batch)",
        "temperature": "T of both softmaxes (both terms times T^2)",
    }
    term_names = ("ce", "kd", "inter", "intra")

    gamma: float = 1.0
    alpha: float = 2.0
    beta: float = 2.0
    temperature: float = 1.0

    def terms(self, outputs, target, teacher=None, teacher_scale=None, epoch=0):
        from dhkd_pipe.methods import losses

        inter, intra = losses.dist_terms(outputs, losses.dequantize(teacher, teacher_scale), self.temperature)
        inter, intra = self.alpha * inter, self.beta * intra
        ce = self.gamma * losses.cross_entropy(outputs, target, backend=self.backend)
        kd = inter + intra
        return {"ce": ce, "kd": kd, "inter": inter, "intra": intra, "total": ce + kd}


# --- feature methods (online only): fitnet, reviewkd, dhkd_reviewkd ----------------------------------------
# They read both models' feature taps through a learnable connector: ``connector(student, teacher,
# input_size)`` builds it from the taps' shapes (``feature_kd``), and ``terms(..., feature_loss=...)``
# weighs its unweighted loss of the batch (the caller computes it from both models' ``forward_taps``).

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


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (CE, KD, DKD, BinaryKL, DHKD, DIST, FitNet, ReviewKD, DHKDReviewKD)
}
# the config options the methods own (TrainConfig fields, from the methods' own fields); None there
# means "the chosen method's default"
OPTIONS: tuple[str, ...] = tuple(
    dict.fromkeys(f.name for cls in METHODS.values() for f in dataclasses.fields(cls) if f.name != "backend")
)


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise BadArgument(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def option_defaults(cls: type[Method]) -> dict:
    """The config options ``cls`` takes (its fields but ``backend``) with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name != "backend"}


def option_names(cls: type[Method]) -> tuple[str, ...]:
    """The config options ``cls`` takes."""
    return tuple(option_defaults(cls))


def from_config(cfg) -> Method:
    """The config's method with its options: those set in ``cfg`` (not None) override the method's
    defaults; an option the method does not take is a user error, not silently ignored."""
    cls = get_method(cfg.method)
    given = {k: getattr(cfg, k) for k in OPTIONS if getattr(cfg, k, None) is not None}
    stray = [k for k in given if k not in option_names(cls)]
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        takes = ", ".join("--" + k.replace("_", "-") for k in option_names(cls))
        raise DhkdError(f"--method {cls.name} does not use {flags} (it takes {takes})")
    return cls(backend=cfg.kernels, **given)


def methods_taking(option: str) -> tuple[str, ...]:
    """The names of the methods that take ``option``."""
    return tuple(name for name, cls in METHODS.items() if option in option_names(cls))


def method_option_fields() -> list[tuple]:
    """``(name, type, field)`` of each option of ``OPTIONS`` for ``dataclasses.make_dataclass``: the
    methods' own type (``float``) made optional, default None, with its help and choices."""
    from dhkd_pipe.options import option

    out = []
    for name in OPTIONS:
        declared = [f for cls in METHODS.values() for f in dataclasses.fields(cls) if f.name == name]
        kind = str(declared[0].type).replace(" | None", "")
        choices = next((f.metadata["choices"] for f in declared if "choices" in f.metadata), None)
        out.append(
            (
                name,
                f"{kind} | None",
                option(None, option_help(name), choices=choices, commands=("distill",), sweep=True),
            )
        )
    return out


def option_help(option: str) -> str:
    """What ``option`` means for each method that takes it, with the default: for ``--help``; one
    text shared by every method that takes it is said once (``kd, dhkd only: ...``)."""
    texts = {cls.knobs[option] for cls in METHODS.values() if option in cls.knobs}
    if len(texts) == 1 and option_defaults(METHODS[methods_taking(option)[0]])[option] is None:
        return f"{', '.join(methods_taking(option))} only: {texts.pop()}."
    parts = []
    for cls in METHODS.values():
        if option in cls.knobs:
            parts.append(f"{cls.name}: {cls.knobs[option]}, default {option_defaults(cls)[option]}")
    return "; ".join(parts) + "."
