"""FitNet and ReviewKD against a re-implementation written here from the published description
(mdistiller's ``distillers/FitNet.py``, ``ReviewKD.py`` and its CIFAR zoo's feature taps): three SGD
steps in float64 from the same weights and batch give the same parameters within 1e-6 relative,
while the steps move them by far more than that."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dhkd_pipe.methods.registry import get_method
from dhkd_pipe.models import create_model
from dhkd_pipe.models.feature_taps import forward_taps

STEPS, BATCH, CLASSES, LR, MOMENTUM, WEIGHT_DECAY = 3, 4, 100, 0.05, 0.9, 5e-4
TOLERANCE = 1e-6


# --- the reference: mdistiller's feature taps, written out per family ----------------------------------


def ref_resnet_taps(m, x):
    """CIFAR ResNet: stem after ReLU; per stage, each block's conv-BN-ReLU-conv-BN plus shortcut;
    the stage's last sum is its pre-activation feature, its ReLU the stage's feature."""
    f0 = F.relu(m.bn1(m.conv1(x)))
    feats, pre = [f0], [f0]
    h = f0
    for stage in (m.layer1, m.layer2, m.layer3):
        for block in stage:
            out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(h)))))
            shortcut = h if block.downsample is None else block.downsample(h)
            s = out + shortcut
            h = F.relu(s)
        pre.append(s)
        feats.append(h)
    pooled = F.avg_pool2d(h, 8).flatten(1)
    return m.fc(pooled), feats, pre, pooled


def _shuffle(x, groups=2):
    n, c, hh, ww = x.shape
    return x.view(n, groups, c // groups, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)


def ref_shufflev2_taps(m, x):
    """CIFAR ShuffleNetV2: a down block (two stride-2 branches, concatenated and shuffled) then basic
    blocks (half passes, half through 1x1-ReLU, depthwise, 1x1, ReLU; shuffled); the stage's last
    basic block's pass-through half concatenated with its branch before the last ReLU is the
    pre-activation feature; pooled after conv2-BN-ReLU and a 4x4 average."""
    h = F.relu(m.bn1(m.conv1(x)))
    feats, pre = [h], [h]
    for stage in (m.layer1, m.layer2, m.layer3):
        down, *basics = stage
        left = F.relu(down.bn2(down.conv2(down.bn1(down.conv1(h)))))
        right = F.relu(down.bn3(down.conv3(h)))
        right = F.relu(down.bn5(down.conv5(down.bn4(down.conv4(right)))))
        h = _shuffle(torch.cat([left, right], 1))
        for b in basics:
            half = h.shape[1] // 2
            x1, x2 = h[:, :half], h[:, half:]
            branch = b.bn3(b.conv3(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x2)))))))
            s = torch.cat([x1, branch], 1)
            h = _shuffle(torch.cat([x1, F.relu(branch)], 1))
        pre.append(s)
        feats.append(h)
    pooled = F.avg_pool2d(F.relu(m.bn2(m.conv2(h))), 4).flatten(1)
    return m.linear(pooled), feats, pre, pooled


REF_TAPS = {"resnet8x4": ref_resnet_taps, "ShuffleV2": ref_shufflev2_taps}


# --- the reference connectors and losses ------------------------------------------------------------


class RefConvReg(nn.Module):
    def __init__(self, s, t):
        super().__init__()
        (sc, sh, sw), (tc, th, tw) = s, t
        if sh == 2 * th:
            self.conv = nn.Conv2d(sc, tc, 3, stride=2, padding=1)
        elif 2 * sh == th:
            self.conv = nn.ConvTranspose2d(sc, tc, 4, stride=2, padding=1)
        else:
            self.conv = nn.Conv2d(sc, tc, (1 + sh - th, 1 + sw - tw))
        self.bn = nn.BatchNorm2d(tc)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class RefFitNet(nn.Module):
    def __init__(self, s_feats, t_feats, hint=2):
        super().__init__()
        self.hint = hint
        self.conv_reg = RefConvReg(tuple(s_feats[hint].shape[1:]), tuple(t_feats[hint].shape[1:]))

    def loss(self, s_feats, s_pre, s_pooled, t_feats, t_pre, t_pooled):
        return F.mse_loss(self.conv_reg(s_feats[self.hint]), t_feats[self.hint])


class RefABF(nn.Module):
    def __init__(self, cin, mid, cout, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x, residual, out_size):
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            a = self.att_conv(torch.cat([x, residual], 1))
            x = x * a[:, :1] + residual * a[:, 1:]
        if x.shape[-1] != out_size:
            x = F.interpolate(x, size=(out_size, out_size), mode="nearest")
        return self.conv2(x), x


def ref_hcl(fs, ft):
    loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
    for side in (4, 2, 1):
        if side < fs.shape[-1]:
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, side), F.adaptive_avg_pool2d(ft, side))
            weights += weight
    return loss / weights


class RefReviewKD(nn.Module):
    """The student's stages (post-activation on CIFAR) and pooled feature, as many of the deepest as
    the teacher has pre-activation stages after the stem plus its pooled feature; one ABF each from
    the deepest up, ``abfs[0]`` the deepest."""

    def __init__(self, s_feats, s_pooled, t_pre, t_pooled):
        super().__init__()
        teacher = [f.shape[1:] for f in t_pre[1:]] + [(t_pooled.shape[1], 1, 1)]
        student = ([f.shape[1:] for f in s_feats] + [(s_pooled.shape[1], 1, 1)])[-len(teacher) :]
        mid = min(512, student[-1][0])
        self.abfs = nn.ModuleList(
            [RefABF(s[0], mid, t[0], i > 0) for i, (s, t) in enumerate(zip(student[::-1], teacher[::-1], strict=True))]
        )

    def loss(self, s_feats, s_pre, s_pooled, t_feats, t_pre, t_pooled):
        levels = (list(s_feats) + [s_pooled[:, :, None, None]])[-len(self.abfs) :][::-1]
        targets = (list(t_pre[1:]) + [t_pooled[:, :, None, None]])[::-1]
        total, residual = 0.0, None
        for x, abf, target in zip(levels, self.abfs, targets, strict=True):
            out, residual = abf(x, residual, target.shape[-1])
            total = total + ref_hcl(out, target)
        return total


def ref_steps(student, ref_taps, teacher, connector, method, x, y):
    with torch.no_grad():
        _, t_feats, t_pre, t_pooled = ref_resnet_taps(teacher, x)
    opt = torch.optim.SGD(
        [*student.parameters(), *connector.parameters()], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    for epoch in range(1, STEPS + 1):  # the reference counts epochs from 1
        opt.zero_grad()
        logits, s_feats, s_pre, s_pooled = ref_taps(student, x)
        feature = connector.loss(s_feats, s_pre, s_pooled, t_feats, t_pre, t_pooled)
        if method == "fitnet":
            loss = F.cross_entropy(logits, y) + 100.0 * feature
        else:
            loss = F.cross_entropy(logits, y) + 5.0 * min(epoch / 20, 1.0) * feature
        loss.backward()
        opt.step()


def ours_steps(student, teacher, connector, method, x, y):
    with torch.no_grad():
        _, t_taps = forward_taps(teacher, x)
    opt = torch.optim.SGD(
        [*student.parameters(), *connector.parameters()], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    for epoch in range(STEPS):
        opt.zero_grad()
        logits, s_taps = forward_taps(student, x)
        terms = method.terms(logits, y, epoch=epoch, feature_loss=connector(s_taps, t_taps))
        terms["total"].backward()
        opt.step()


def _relative(a: dict, b: dict, scale: dict) -> list[float]:
    """Per tensor of ``scale``: max |a - b| over max |scale| (the reference after the steps: never all zero)."""
    return [((a[k] - b[k]).abs().max() / scale[k].abs().max()).item() for k in scale if scale[k].is_floating_point()]


def _state(student, connector):
    return {
        **{f"s.{k}": v.detach().clone() for k, v in student.state_dict().items()},
        **{f"c.{k}": v.detach().clone() for k, v in connector.state_dict().items()},
    }


@pytest.mark.slow
@pytest.mark.parametrize("method_name", ["fitnet", "reviewkd"])
@pytest.mark.parametrize("student_name", ["resnet8x4", "ShuffleV2"])
def test_three_float64_steps_equal_the_reference(method_name, student_name):
    torch.manual_seed(0)
    teacher = create_model("resnet32x4", CLASSES).double().eval()
    student = create_model(student_name, CLASSES).double().train()
    method = get_method(method_name)(**({"alpha": 5.0} if method_name == "reviewkd" else {}))
    connector = method.connector(student, teacher, 32).double().train()
    x = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (BATCH,))

    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    with torch.no_grad():
        _, s_feats, s_pre, s_pooled = REF_TAPS[student_name](copy.deepcopy(student), x)
        _, t_feats, t_pre, t_pooled = ref_resnet_taps(teacher, x)
    ref_connector = (
        (RefFitNet(s_feats, t_feats) if method_name == "fitnet" else RefReviewKD(s_feats, s_pooled, t_pre, t_pooled))
        .double()
        .train()
    )
    ref_connector.load_state_dict(connector.state_dict())  # the same starting weights, name for name

    before = _state(student, connector)
    ours_steps(student, teacher, connector, method, x, y)
    ref_steps(ref_student, REF_TAPS[student_name], ref_teacher, ref_connector, method_name, x, y)
    ours, ref = _state(student, connector), _state(ref_student, ref_connector)

    difference = max(_relative(ours, ref, ref))
    params = {f"s.{k}" for k, _ in ref_student.named_parameters()} | {
        f"c.{k}" for k, _ in ref_connector.named_parameters()
    }
    moved = sorted(_relative({k: ref[k] for k in params}, before, {k: ref[k] for k in params}))
    print(
        f"{method_name} resnet32x4->{student_name}: relative max difference {difference:.3g}; "
        f"parameters moved: median tensor {moved[len(moved) // 2]:.3g}, largest {moved[-1]:.3g}"
    )
    assert difference <= TOLERANCE
    assert moved[len(moved) // 2] > 1e3 * TOLERANCE  # the steps move most tensors far beyond the tolerance


# --- the recipes' ReviewKD weights ------------------------------------------------------------------

# dvlab-research/ReviewKD, CIFAR-100/script/reviewKD.sh: each run's --kd-loss-weight, by (teacher, student).
# vgg13 -> vgg8, vgg13 -> MobileNetV2 and ResNet50 -> MobileNetV2 have no run there: the authors'
# train.py default, 1.0.
AUTHORS_REVIEWKD_WEIGHTS = {
    ("wrn_40_2", "wrn_16_2"): 5.0,
    ("wrn_40_2", "wrn_40_1"): 5.0,
    ("wrn_40_2", "ShuffleV1"): 5.0,
    ("resnet32x4", "resnet8x4"): 5.0,
    ("resnet32x4", "ShuffleV1"): 5.0,
    ("resnet32x4", "ShuffleV2"): 8.0,
    ("resnet56", "resnet20"): 0.6,
    ("resnet110", "resnet32"): 1.0,
    ("vgg13", "vgg8"): 1.0,
    ("vgg13", "MobileNetV2"): 1.0,
    ("ResNet50", "MobileNetV2"): 1.0,
}


@pytest.mark.parametrize("method, weight_key", [("reviewkd", "alpha"), ("dhkd_reviewkd", "beta")])
def test_cifar_reviewkd_recipes_hold_the_authors_per_pair_weights(method, weight_key):
    """Every CIFAR-100 ReviewKD and DHKD + ReviewKD recipe weighs the review term as the ReviewKD
    authors' script does for its pair, and its comment names that script and the weight."""
    import glob
    import os
    import re

    from dhkd_pipe.config import TrainConfig, build_config

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cifar100", method)
    seen = set()
    for path in sorted(glob.glob(os.path.join(root, "*.yaml"))):
        cfg = build_config(TrainConfig, path, {})
        pair = (cfg.teacher, cfg.model)
        assert getattr(cfg, weight_key) == AUTHORS_REVIEWKD_WEIGHTS[pair], path
        with open(path) as f:
            comment = " ".join(line[1:].strip() for line in f if line.startswith("#"))
        assert "dvlab-research/ReviewKD" in " ".join(comment.split()), path
        assert re.search(rf"{weight_key}\)? {AUTHORS_REVIEWKD_WEIGHTS[pair]:g}\b", comment), path
        seen.add(pair)
    assert seen == set(AUTHORS_REVIEWKD_WEIGHTS)
