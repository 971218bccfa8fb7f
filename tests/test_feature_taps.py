"""Feature taps: every model gives mdistiller's ``feats`` / ``preact_feats`` / pooled feature on request,
with the plain forward's logits and BatchNorm updates unchanged; shapes from a meta-device forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.methods.connectors import ConvReg, ReviewKDFusion, hcl_loss
from dhkd_pipe.models import DualHead, create_model
from dhkd_pipe.models.blocks import ShuffleBlock
from dhkd_pipe.models.feature_taps import forward_taps, tap_shapes

CIFAR = [
    "resnet8",
    "resnet56",
    "resnet8x4",
    "resnet32x4",
    "ResNet18",
    "ResNet50",
    "wrn_16_2",
    "wrn_40_1",
    "vgg8",
    "vgg13",
    "MobileNetV2",
    "ShuffleV1",
    "ShuffleV2",
]
IMAGENET = ["MobileNetV1", "resnet18", "resnet50"]


def _input(name, batch=2):
    side = 224 if name in IMAGENET else 32
    return torch.randn(batch, 3, side, side), side


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_taps_leave_the_plain_forward_alone(name):
    torch.manual_seed(0)
    model = create_model(name, 10)
    keys = list(model.state_dict())
    x, side = _input(name)
    plain = copy.deepcopy(model)
    for mode in (True, False):
        model.train(mode), plain.train(mode)
        logits, taps = forward_taps(model, x)
        torch.testing.assert_close(logits, plain(x), rtol=0, atol=0)
        for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):  # BN counted once
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert list(model.state_dict()) == keys
    shapes = tap_shapes(model, side)
    assert shapes.feats == [tuple(f.shape[1:]) for f in taps.feats]
    assert shapes.preact_feats == [tuple(f.shape[1:]) for f in taps.preact_feats]
    assert shapes.pooled == taps.pooled.shape[1]
    # the pooled feature is what the classifier reads; activations are the ReLU of pre-activations
    head = {"vgg8": "classifier", "vgg13": "classifier", "MobileNetV2": "classifier.0"}.get(name)
    if head is None:
        head = "linear" if name in ("ResNet18", "ResNet50", "ShuffleV1", "ShuffleV2") else "fc"
    torch.testing.assert_close(model.get_submodule(head)(taps.pooled), logits)
    if name == "MobileNetV2":  # linear bottlenecks: no activation to tap before (as RepDistiller)
        assert all(pre is post for pre, post in zip(taps.preact_feats, taps.feats, strict=True))
    elif name == "ShuffleV2":  # its pre-activation is taken before the block's channel shuffle
        for pre, post in zip(taps.preact_feats[1:], taps.feats[1:], strict=True):
            torch.testing.assert_close(ShuffleBlock(2)(F.relu(pre)), post)
    elif not name.startswith("wrn"):  # WRN's pre-activations are the next BN's output (checked below)
        for pre, post in zip(taps.preact_feats, taps.feats, strict=True):
            torch.testing.assert_close(F.relu(pre), post)


def test_preact_taps_hold_negative_values_where_the_family_defines_them():
    for name in ("resnet8x4", "ShuffleV1", "ShuffleV2", "vgg8", "ResNet18", "resnet18", "MobileNetV1"):
        x, _ = _input(name)
        _, taps = forward_taps(create_model(name, 10).train(), x)
        assert all((p < 0).any() for p in taps.preact_feats[1:]), name


def test_wrn_preact_is_the_following_batchnorm_without_counting_the_batch_twice():
    model = create_model("wrn_16_2", 10).train()
    x, _ = _input("wrn_16_2")
    before = copy.deepcopy(model.bn1.running_mean)
    _, taps = forward_taps(model, x)
    f3 = taps.feats[3]
    expected = F.batch_norm(f3, None, None, model.bn1.weight, model.bn1.bias, True, 0.0, model.bn1.eps)
    torch.testing.assert_close(taps.preact_feats[3], expected)
    mean = f3.mean((0, 2, 3)).detach()
    torch.testing.assert_close(model.bn1.running_mean, 0.9 * before + 0.1 * mean)  # one update, not two


def test_tap_shapes_touch_nothing_and_dual_head_passes_taps_through():
    model = create_model("resnet8x4", 10)
    state = copy.deepcopy(model.state_dict())
    tap_shapes(model, 32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    dual = DualHead(create_model("resnet8x4", 10), aux_head="nonlinear").eval()
    x, _ = _input("resnet8x4")
    (h1, h2), taps = forward_taps(dual, x)
    p1, p2 = dual(x)
    torch.testing.assert_close(h1, p1, rtol=0, atol=0)
    torch.testing.assert_close(h2, p2, rtol=0, atol=0)
    _, plain_taps = forward_taps(dual.backbone, x)
    torch.testing.assert_close(taps.pooled, plain_taps.pooled)
    assert tap_shapes(dual, 32).feats == tap_shapes(model, 32).feats


def test_timm_models_tap_through_forward_intermediates():
    pytest.importorskip("timm")
    model = create_model("timm:resnet18", 10).eval()
    x = torch.randn(2, 3, 64, 64)
    logits, taps = forward_taps(model, x)
    torch.testing.assert_close(logits, model(x))
    assert [f.shape[1] for f in taps.feats] == [64, 64, 128, 256, 512]
    assert tap_shapes(model, 224).feats[-1] == (512, 7, 7)


def test_models_without_taps_are_refused_in_one_line():
    with pytest.raises(DhkdError, match="no feature taps"):
        forward_taps(torch.nn.Linear(3, 2), torch.randn(1, 3))


@pytest.mark.parametrize(
    "s_side,t_side,kind",
    [(16, 8, torch.nn.Conv2d), (8, 16, torch.nn.ConvTranspose2d), (16, 16, torch.nn.Conv2d), (10, 8, torch.nn.Conv2d)],
)
def test_conv_reg_maps_the_student_to_the_teacher_shape(s_side, t_side, kind):
    reg = ConvReg((7, s_side, s_side), (5, t_side, t_side))
    assert type(reg.conv) is kind
    assert reg(torch.randn(2, 7, s_side, s_side)).shape == (2, 5, t_side, t_side)


def test_conv_reg_refuses_a_student_map_smaller_than_the_teachers():
    with pytest.raises(DhkdError, match="hint-layer"):
        ConvReg((7, 4, 4), (5, 16, 16))


def test_hcl_weights_halve_over_the_pooled_levels():
    fs, ft = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    parts = [F.mse_loss(fs, ft)] + [
        F.mse_loss(F.adaptive_avg_pool2d(fs, s), F.adaptive_avg_pool2d(ft, s)) for s in (4, 2, 1)
    ]
    expected = (parts[0] + parts[1] / 2 + parts[2] / 4 + parts[3] / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    torch.testing.assert_close(hcl_loss([fs], [ft]), expected)
    one = torch.randn(2, 3, 1, 1), torch.randn(2, 3, 1, 1)
    torch.testing.assert_close(hcl_loss([one[0]], [one[1]]), F.mse_loss(*one))  # no pooled levels at 1x1


def test_reviewkd_fusion_matches_mdistillers_recipes():
    """mdistiller's configs: resnet32x4 -> resnet8x4 (CIFAR defaults) and ResNet-34 -> ResNet-18,
    ResNet-50 -> MobileNetV1 (its ImageNet reviewkd.yaml: SHAPES, IN_CHANNELS, OUT_CHANNELS)."""
    cases = [
        ("resnet8x4", "resnet32x4", 32, False, [1, 8, 16, 32], [64, 128, 256, 256], [64, 128, 256, 256]),
        ("resnet18", "resnet34", 224, True, [1, 7, 14, 28, 56], [64, 128, 256, 512, 512], [64, 128, 256, 512, 512]),
        (
            "MobileNetV1",
            "resnet50",
            224,
            True,
            [1, 7, 14, 28, 56],
            [128, 256, 512, 1024, 1024],
            [256, 512, 1024, 2048, 2048],
        ),
    ]
    for student, teacher, side, preact, sizes, in_channels, out_channels in cases:
        fusion = ReviewKDFusion(
            tap_shapes(create_model(student, 10), side),
            tap_shapes(create_model(teacher, 10), side),
            student_preact=preact,
        )
        assert fusion.sizes == sizes and fusion.out_sizes == sizes
        assert [abf.conv1[0].in_channels for abf in fusion.abfs][::-1] == in_channels
        assert [abf.conv2[0].out_channels for abf in fusion.abfs][::-1] == out_channels
        assert {abf.conv1[0].out_channels for abf in fusion.abfs} == {min(512, in_channels[-1])}
        assert fusion.abfs[0].att_conv is None and all(abf.att_conv is not None for abf in fusion.abfs[1:])
