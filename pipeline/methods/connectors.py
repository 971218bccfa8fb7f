"""Feature distillation's connectors and losses: FitNet's hint regressor, ReviewKD's ABF fusion and
HCL loss, as mdistiller defines them (``distillers/_common.py``, ``FitNet.py``, ``ReviewKD.py``).

A connector is a method's learnable module between the student's and the teacher's features; it is
built from the two models' tap shapes (``models.tap_shapes``, a forward on the ``meta`` device),
trains in the student's optimizer, is checkpointed with the run and never exported.

- FitNet (Romero et al. 2015): ``ConvReg`` maps the student's ``feats[hint]`` to the teacher's shape
  (a 3x3 stride-2 conv when the student's map is twice the teacher's, a 4x4 stride-2 transposed conv
  when half, else a valid conv of size 1 + the difference), then BN and ReLU; loss
  MSE(regressed, teacher ``feats[hint]``).
- ReviewKD (Chen et al. 2021): the student's levels (its stages and pooled feature, deepest first)
  go through one ABF each: 1x1 conv + BN to ``mid = min(512, C of the deepest level)`` channels; all
  but the deepest fuse with the level below's (upsampled, nearest) result through a 2-channel sigmoid
  attention computed from their concatenation; the fused map is resized (nearest) to the teacher's
  resolution, kept as the next level's residual, and a 3x3 conv + BN gives the teacher's channels.
  HCL compares each output with the teacher's ``preact_feats[1:]`` and pooled feature: MSE plus the
  MSEs of 4x4, 2x2 and 1x1 adaptive average pools (those smaller than the map) weighted 1/2, 1/4,
  1/8, divided by the sum of the weights used; summed over the levels.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from dhkd_pipe.errors import DhkdError


class ConvReg(nn.Module):
    """FitNet's regressor from a student feature map (C, H, W) to the teacher's: conv, BN, ReLU."""

    def __init__(self, student_shape, teacher_shape, use_relu: bool = True):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = student_shape, teacher_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise DhkdError(
                f"FitNet cannot regress a {s_h}x{s_w} student feature to the teacher's {t_h}x{t_w} "
                "(it takes the same size, twice, half, or larger); choose another --hint-layer"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)
        self.use_relu = use_relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


class FitNetHint(nn.Module):
    """FitNet's connector: the ``ConvReg`` of hint layer ``hint_layer`` (an index into ``feats``)."""

    def __init__(self, student_shapes, teacher_shapes, hint_layer: int):
        super().__init__()
        for who, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
            if not -len(shapes.feats) <= hint_layer < len(shapes.feats):
                raise DhkdError(
                    f"--hint-layer {hint_layer} is out of range: the {who} has {len(shapes.feats)} "
                    f"feature taps (0 to {len(shapes.feats) - 1})"
                )
        self.hint_layer = hint_layer
        self.conv_reg = ConvReg(student_shapes.feats[hint_layer], teacher_shapes.feats[hint_layer])

    def forward(self, student_taps, teacher_taps):
        """MSE(ConvReg(student feats[hint]), teacher feats[hint]), unweighted."""
        regressed = self.conv_reg(student_taps.feats[self.hint_layer])
        return F.mse_loss(regressed, teacher_taps.feats[self.hint_layer])


class ABF(nn.Module):
    """ReviewKD's attention-based fusion block for one level."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channels * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, residual=None, size: int | None = None, out_size: int | None = None):
        """(output with the teacher's channels at ``out_size``, the fused map for the next level)."""
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, (size, size), mode="nearest")
            att = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * att[:, 0].view(n, 1, h, w) + residual * att[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_size:
            x = F.interpolate(x, (out_size, out_size), mode="nearest")
        return self.conv2(x), x


def review_levels(taps, preact: bool, count: int | None = None) -> list:
    """The (B, C, H, W) levels ReviewKD reads from ``taps``, shallow to deep: ``feats`` (or
    ``preact_feats``) then the pooled feature as a 1x1 map; the deepest ``count`` of them."""
    maps = list(taps.preact_feats if preact else taps.feats) + [taps.pooled[:, :, None, None]]
    return maps if count is None else maps[len(maps) - count :]


def teacher_review_levels(taps) -> list:
    """The teacher's side of ReviewKD: ``preact_feats[1:]`` and the pooled feature as a 1x1 map."""
    return list(taps.preact_feats[1:]) + [taps.pooled[:, :, None, None]]


def _level_shapes(shapes, preact: bool):
    maps = list(shapes.preact_feats if preact else shapes.feats) + [(shapes.pooled, 1, 1)]
    return maps


class ReviewKDFusion(nn.Module):
    """ReviewKD's connector: one ABF per level, ``abfs[0]`` the deepest (mdistiller's order and names)."""

    def __init__(self, student_shapes, teacher_shapes, student_preact: bool):
        super().__init__()
        teacher = list(teacher_shapes.preact_feats[1:]) + [(teacher_shapes.pooled, 1, 1)]
        student = _level_shapes(student_shapes, student_preact)
        if len(student) < len(teacher):
            raise DhkdError(
                f"ReviewKD needs as many student feature levels as the teacher's {len(teacher)}; "
                f"the student has {len(student)}"
            )
        student = student[len(student) - len(teacher) :]
        self.student_preact = student_preact
        self.levels = len(teacher)
        self.sizes = [s[1] for s in student][::-1]  # deepest first, as the ABFs run
        self.out_sizes = [t[1] for t in teacher][::-1]
        mid = min(512, student[-1][0])
        abfs = [
            ABF(s[0], mid, t[0], fuse=i < len(student) - 1)
            for i, (s, t) in enumerate(zip(student, teacher, strict=True))
        ]
        self.abfs = nn.ModuleList(abfs[::-1])

    def forward(self, student_taps, teacher_taps):
        """HCL(fused student levels, teacher levels), unweighted."""
        x = review_levels(student_taps, self.student_preact, self.levels)[::-1]
        out, residual = self.abfs[0](x[0], out_size=self.out_sizes[0])
        results = [out]
        for feature, abf, size, out_size in zip(x[1:], self.abfs[1:], self.sizes[1:], self.out_sizes[1:], strict=True):
            out, residual = abf(feature, residual, size, out_size)
            results.insert(0, out)
        return hcl_loss(results, teacher_review_levels(teacher_taps))


def hcl_loss(student_maps, teacher_maps) -> torch.Tensor:
    """ReviewKD's hierarchical context loss, summed over the levels (see the module docstring)."""
    total = 0.0
    for fs, ft in zip(student_maps, teacher_maps, strict=True):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        weight, weights = 1.0, 1.0
        for side in (4, 2, 1):
            if side >= h:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(
                F.adaptive_avg_pool2d(fs, (side, side)), F.adaptive_avg_pool2d(ft, (side, side))
            )
            weights += weight
        total = total + loss / weights
    return total


class StudentWithConnector(nn.Module):
    """The module a feature method trains: the student and the method's connector, in one optimizer
    (the same weight decay) and one checkpoint, under one DDP wrapper (so the connector's gradients
    are reduced too). ``forward(x)`` is the student's plain forward (validation);
    ``forward(x, teacher_taps)`` returns (the student's logits, the connector's unweighted loss).
    ``export()`` gives the student alone: the connector is never exported."""

    def __init__(self, student: nn.Module, connector: nn.Module):
        super().__init__()
        self.student = student
        self.connector = connector

    def forward(self, x, teacher_taps=None):
        if teacher_taps is None:
            return self.student(x)
        from dhkd_pipe.models.feature_taps import forward_taps

        outputs, taps = forward_taps(self.student, x)
        return outputs, self.connector(taps, teacher_taps)

    def export(self) -> nn.Module:
        return self.student.export() if hasattr(self.student, "export") else copy.deepcopy(self.student)
