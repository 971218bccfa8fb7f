"""The methods that distil from the teacher's logits alone, so a stage-1 store can serve them: ``ce``,
``kd``, ``dkd``, ``binary_kl``, ``dhkd`` and ``dist``, each a frozen dataclass of its options with
their published defaults (``registry`` names them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dhkd_pipe.errors import BadArgument
from dhkd_pipe.methods.base import BINARY_KL_LOSSES, KD_STOP_HELP, Method, alpha_at
from dhkd_pipe.methods.names import KD_LOSS_NAMES


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
        return self._fused(outputs, outputs, teacher, target, teacher_scale, "kd", alpha_at(self, epoch))


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
        return self._fused(head1, head2, teacher, target, teacher_scale, self.kd_loss, alpha_at(self, epoch))


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
