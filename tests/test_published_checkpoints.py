"""Checkpoints saved by the published DHKD training scripts load with ``load_checkpoint``.

The published layouts are written here from reading penghui-yang/DHKD (``models/*.py``,
``train_student.py``, ``train_student_imagenet.py``, ``train_teacher.py``) and, for the
distiller wrapper, megvii-research/mdistiller's trainer; none of that code is imported:

- a dual-head student's second head is named after its first plus ``2``: ``fc2`` (resnet, wrn),
  ``linear2`` (ShuffleV1/V2, ResNet18/34/50), ``classifier2`` (vgg, MobileNetV1/V2);
- its non-linear head is ``NonLinearClassifier``: ``net = Sequential(Linear(d, 200), Dropout,
  BatchNorm1d(200), ReLU, Linear(200, K))``, so its keys are ``<head>.net.{0,2,4}.*``;
- its MobileNetV1/V2 classifier is a plain ``classifier`` Linear (our zoo: ``fc`` / ``classifier.0``);
- students are saved as ``{"epoch", "model", "best_acc"}`` (best) and ``{"args": Namespace,
  "model"}`` (last); ImageNet students under DDP (``module.``) with ``"opt": Namespace``; teachers
  under DataParallel (``module.``) with the optimizer state; mdistiller's full checkpoints hold
  ``DataParallel(distiller)``, i.e. ``module.student.*`` and ``module.teacher.*``.
"""

import argparse

import pytest
import torch
import torch.nn as nn

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models import DualHead, create_model, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Our classifier name -> the published code's, where they differ.
PUBLISHED_CLASSIFIER = {"MobileNetV2": ("classifier.0", "classifier"), "MobileNetV1": ("fc", "classifier")}
# Published head-1 name of each architecture tested (its head 2 is this + "2").
PUBLISHED_HEAD1 = {"resnet8x4": "fc", "ShuffleV2": "linear", "MobileNetV2": "classifier", "MobileNetV1": "classifier"}
CLASSES = {"resnet8x4": 100, "ShuffleV2": 100, "MobileNetV2": 100, "MobileNetV1": 1000}
SIDE = {"resnet8x4": 32, "ShuffleV2": 32, "MobileNetV2": 32, "MobileNetV1": 64}

# Hand-checked against penghui-yang/DHKD models/*.py: key -> shape.
PUBLISHED_KEYS = {
    ("resnet8x4", "linear"): {
        "conv1.weight": (32, 3, 3, 3),
        "layer3.0.downsample.1.running_var": (256,),
        "fc.weight": (100, 256),
        "fc2.weight": (100, 256),
        "fc2.bias": (100,),
    },
    ("resnet8x4", "nonlinear"): {
        "fc.weight": (100, 256),
        "fc2.net.0.weight": (200, 256),
        "fc2.net.0.bias": (200,),
        "fc2.net.2.weight": (200,),
        "fc2.net.2.running_mean": (200,),
        "fc2.net.2.num_batches_tracked": (),
        "fc2.net.4.weight": (100, 200),
    },
    ("ShuffleV2", "nonlinear"): {
        "layer1.0.conv1.weight": (24, 1, 3, 3),
        "conv2.weight": (1024, 464, 1, 1),
        "linear.weight": (100, 1024),
        "linear2.net.0.weight": (200, 1024),
        "linear2.net.2.running_var": (200,),
        "linear2.net.4.bias": (100,),
    },
    ("MobileNetV2", "linear"): {
        "conv2.0.weight": (1280, 160, 1, 1),
        "classifier.weight": (100, 1280),
        "classifier.bias": (100,),
        "classifier2.weight": (100, 1280),
    },
    ("MobileNetV2", "nonlinear"): {
        "blocks.6.0.conv.7.running_mean": (160,),
        "classifier.weight": (100, 1280),
        "classifier2.net.0.weight": (200, 1280),
        "classifier2.net.4.weight": (100, 200),
    },
    ("MobileNetV1", "nonlinear"): {
        "model.13.3.weight": (1024, 1024, 1, 1),
        "classifier.weight": (1000, 1024),
        "classifier2.net.0.weight": (200, 1024),
        "classifier2.net.4.weight": (1000, 200),
    },
}


class NonLinearHead(nn.Module):
    """The published head's structure, written from its description (parameters under ``net``)."""

    def __init__(self, d, k):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 200), nn.Dropout(0.1), nn.BatchNorm1d(200), nn.ReLU(), nn.Linear(200, k))

    def forward(self, x):
        return self.net(x)


def _randomize(model, seed):
    """Non-trivial weights and BN statistics, so a key that went to the wrong place would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def published_plain_keys(arch, sd):
    """A plain model's state dict renamed the published way (only the MobileNets' classifier differs)."""
    ours, theirs = PUBLISHED_CLASSIFIER.get(arch, (None, None))
    if ours is None:
        return dict(sd)
    return {theirs + k[len(ours) :] if k.startswith(ours + ".") else k: v for k, v in sd.items()}


def published_student(arch, kind):
    """(state dict in the published layout, reference forward giving both heads' logits)."""
    plain = _randomize(create_model(arch, CLASSES[arch]), seed=1)
    d = plain.state_dict()[f"{PUBLISHED_CLASSIFIER.get(arch, (PUBLISHED_HEAD1[arch],))[0]}.weight"].shape[1]
    head2 = _randomize(nn.Linear(d, CLASSES[arch]) if kind == "linear" else NonLinearHead(d, CLASSES[arch]), seed=2)
    sd = published_plain_keys(arch, plain.state_dict())
    sd.update({f"{PUBLISHED_HEAD1[arch]}2.{k}": v for k, v in head2.state_dict().items()})

    def reference(x):
        feats = []
        name = PUBLISHED_CLASSIFIER.get(arch, (PUBLISHED_HEAD1[arch],))[0]
        hook = plain.get_submodule(name).register_forward_hook(lambda m, i, o: feats.append(i[0]))
        with torch.no_grad():
            logits1 = plain(x)
            logits2 = head2(feats[0])
        hook.remove()
        return logits1, logits2

    return sd, reference


def save_as_published(sd, path, how):
    """The dictionaries the published scripts write (see the module docstring)."""
    opts = argparse.Namespace(model_s="x", lr_decay_epochs=[150, 180, 210], gamma=1.0, alpha=1.0, ga=True)
    obj = {
        "best": {"epoch": 240, "model": sd, "best_acc": torch.tensor(73.5)},
        "last": {"args": opts, "model": sd},
        "imagenet_ddp": {"epoch": 100, "opt": opts, "model": {f"module.{k}": v for k, v in sd.items()}},
    }[how]
    torch.save(obj, path)
    return path


CASES = [
    ("resnet8x4", "linear"),
    ("resnet8x4", "nonlinear"),
    ("ShuffleV2", "nonlinear"),
    ("MobileNetV2", "linear"),
    ("MobileNetV2", "nonlinear"),
    ("MobileNetV1", "nonlinear"),
]


@pytest.mark.parametrize("arch,kind", CASES)
def test_published_layout_is_what_the_code_names(arch, kind):
    sd, _ = published_student(arch, kind)
    for key, shape in PUBLISHED_KEYS[arch, kind].items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("backbone.", "head1.", "head2.", "classifier.0.")) for k in sd)


@pytest.mark.parametrize("how", ["best", "last", "imagenet_ddp"])
@pytest.mark.parametrize("arch,kind", CASES)
def test_published_student_loads_into_dual_head_and_plain_model(arch, kind, how, tmp_path):
    sd, reference = published_student(arch, kind)
    path = save_as_published(sd, tmp_path / f"{arch}_{how}.pth", how)
    x = torch.randn(3, 3, SIDE[arch], SIDE[arch], generator=torch.Generator().manual_seed(5))
    want1, want2 = reference(x)

    dual = create_model(arch, CLASSES[arch], dual_head=True, aux_head=kind).eval()
    assert isinstance(dual, DualHead)
    result = load_checkpoint(dual, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        got1, got2 = dual(x)
    assert torch.equal(got1, want1) and torch.equal(got2, want2)
    if kind == "nonlinear":
        assert int(dual.head2[2].num_batches_tracked) == 7

    plain = create_model(arch, CLASSES[arch]).eval()  # a student for evaluation: head 2 dropped
    result = load_checkpoint(plain, path)
    head2 = PUBLISHED_HEAD1[arch] + "2."
    assert sorted(result.unexpected_keys) == sorted(k for k in sd if k.startswith(head2))
    with torch.no_grad():
        assert torch.equal(plain(x), want1)


@pytest.mark.parametrize("arch", ["resnet8x4", "ShuffleV2", "MobileNetV2", "MobileNetV1"])
def test_published_teacher_loads(arch, tmp_path):
    """train_teacher.py: a DataParallel model, with the optimizer state (best) or args (last)."""
    teacher = _randomize(create_model(arch, CLASSES[arch]), seed=3)
    sd = {f"module.{k}": v for k, v in published_plain_keys(arch, teacher.state_dict()).items()}
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(2, 3, SIDE[arch], SIDE[arch])
    with torch.no_grad():
        want = teacher(x)
    for i, obj in enumerate(
        [
            {"epoch": 240, "model": sd, "best_acc": torch.tensor(79.4), "optimizer": optimizer.state_dict()},
            {"args": argparse.Namespace(model=arch), "model": sd, "optimizer": optimizer.state_dict()},
        ]
    ):
        torch.save(obj, tmp_path / f"t{i}.pth")
        fresh = create_model(arch, CLASSES[arch]).eval()
        assert load_checkpoint(fresh, tmp_path / f"t{i}.pth") == ([], [])
        with torch.no_grad():
            assert torch.equal(fresh(x), want)
        dual = create_model(arch, CLASSES[arch], dual_head=True).eval()  # a teacher as a student's start
        load_checkpoint(dual, tmp_path / f"t{i}.pth")
        with torch.no_grad():
            assert torch.equal(dual(x)[0], want)


def test_mdistiller_distiller_checkpoint_gives_the_student(tmp_path):
    """mdistiller's ``latest``/``best``: DataParallel(distiller) with student and teacher inside;
    its MobileNetV2 keeps ``classifier.0`` and names head 2 ``classifier2``."""
    student = _randomize(create_model("MobileNetV2", 100), seed=4)
    head2 = _randomize(nn.Linear(1280, 100), seed=5)
    teacher = create_model("resnet8", 100)
    sd = {f"module.student.{k}": v for k, v in student.state_dict().items()}
    sd.update({f"module.student.classifier2.{k}": v for k, v in head2.state_dict().items()})
    sd.update({f"module.teacher.{k}": v for k, v in teacher.state_dict().items()})
    torch.save(
        {"epoch": 3, "model": sd, "optimizer": {"state": {}, "param_groups": []}, "best_acc": 1.0}, tmp_path / "latest"
    )
    dual = create_model("MobileNetV2", 100, dual_head=True).eval()
    load_checkpoint(dual, tmp_path / "latest")
    assert torch.equal(dual.head1.weight, student.classifier[0].weight)
    assert torch.equal(dual.head2.weight, head2.weight)
    assert torch.equal(dual.backbone.conv2[1].running_var, student.conv2[1].running_var)


def test_wrong_aux_head_and_missing_keys_are_one_line(tmp_path):
    sd, _ = published_student("resnet8x4", "nonlinear")
    path = save_as_published(sd, tmp_path / "s.pth", "best")
    with pytest.raises(DhkdError, match=r"has a nonlinear head 2, the model a linear one \(--aux-head nonlinear\)"):
        load_checkpoint(create_model("resnet8x4", 100, dual_head=True, aux_head="linear"), path)
    sd.pop("fc2.net.2.running_mean")
    sd.pop("layer1.0.bn1.weight")
    sd["fc2.net.9.weight"] = torch.zeros(1)
    path = save_as_published(sd, tmp_path / "bad.pth", "last")
    with pytest.raises(
        DhkdError,
        match=r"2 missing keys \(backbone.layer1.0.bn1.weight, head2.2.running_mean\); "
        r"1 unexpected keys \(head2.9.weight\)",
    ) as e:
        load_checkpoint(create_model("resnet8x4", 100, dual_head=True, aux_head="nonlinear"), path)
    assert "\n" not in str(e.value)
    result = load_checkpoint(create_model("resnet8x4", 100, dual_head=True, aux_head="nonlinear"), path, strict=False)
    assert result.missing_keys == ["backbone.layer1.0.bn1.weight", "head2.2.running_mean"]
