"""Model zoo, DualHead and checkpoint loading."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models import (
    DualHead,
    create_model,
    file_digest,
    list_models,
    load_checkpoint,
    model_input_size,
    read_state_dict,
    torchvision_arch,
)
from dhkd_pipe.models.dual_head import AlignedSplit, align_feature_gradients

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CIFAR_ZOO = [
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "MobileNetV2",
    "ShuffleV1",
    "ShuffleV2",
    "ResNet18",
    "ResNet34",
    "ResNet50",
]
IMAGENET = ["MobileNetV1", "resnet18", "mobilenet_v2"]
ALIASES = {"mobile_half": "MobileNetV2", "mobilenet": "MobileNetV1"}


def _input(name, n=2):
    side = 32 if model_input_size(name) == 32 else 64
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))


def _randomize_bn_statistics(model):
    """Non-trivial BN buffers (as after training), so a round trip that drops them would show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("name", CIFAR_ZOO + IMAGENET)
def test_zoo_model_builds_roundtrips_and_wraps(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, 100)
    x = _input(name)
    _randomize_bn_statistics(model)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 100)

    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": 240}, path)
    torch.manual_seed(1)
    fresh = create_model(name, 100).eval()
    load_checkpoint(fresh, str(path))
    with torch.no_grad():
        assert torch.equal(fresh(x), out)

    keys = list(model.state_dict())
    dual = DualHead(model).eval()
    with torch.no_grad():
        l1, l2 = dual(x)
        exported = dual.export().eval()
        assert torch.equal(exported(x), l1)
    assert l1.shape == l2.shape == (2, 100)
    assert torch.allclose(l1, out, atol=1e-5)
    assert list(exported.state_dict()) == keys


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases(alias):
    a, b = create_model(alias, 100).state_dict(), create_model(ALIASES[alias], 100).state_dict()
    assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()]


def test_input_sizes_and_listing():
    assert model_input_size("resnet32x4") == 32 and model_input_size("MobileNetV1") == 224
    assert model_input_size("resnet50") == 224 and model_input_size("inception_v3") == 299
    names = list_models()
    assert set(CIFAR_ZOO + IMAGENET + list(ALIASES)) <= set(names)
    assert "tv_vgg13" in names and "vit_b_16" in names  # torchvision's vgg13 yields to the CIFAR one


def test_importing_the_zoo_leaves_torchvision_to_the_first_lookup():
    # the CLI imports the zoo for its option choices; torchvision costs seconds to import
    code = "import sys, dhkd_pipe.cli; assert 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert torchvision_arch("resnet18") == "resnet18"  # registered at the look-up
    assert torchvision_arch("tv_vgg11") == "vgg11" and torchvision_arch("vgg11") is None


def test_unknown_model_suggests_close_names():
    with pytest.raises(DhkdError, match=r"unknown model 'resnet9'; did you mean resnet8 \(CIFAR 32px\)"):
        create_model("resnet9", 100)
    with pytest.raises(DhkdError, match="num_classes"):
        create_model("resnet8", 0)


# Exact layout of the public CIFAR-100 teacher/student checkpoints. Key names and shapes are those
# of HobbitLong/RepDistiller models/*.py and megvii-research/mdistiller mdistiller/models/cifar/*.py
# (MobileNetV1: mdistiller/models/imagenet/mobilenetv1.py); parameter counts match those code bases
# (the CRD / DKD papers list them rounded: resnet32x4 7.43M, wrn_40_2 2.26M, vgg13 9.46M,
# MobileNetV2 0.81M, ShuffleV1 0.95M, ShuffleV2 1.36M, ResNet50 23.71M, resnet8x4 1.23M).
LAYOUT = {
    "resnet8x4": (
        1233540,
        {
            "conv1.weight": (32, 3, 3, 3),
            "layer1.0.downsample.0.weight": (64, 32, 1, 1),
            "layer3.0.bn2.running_var": (256,),
            "fc.weight": (100, 256),
        },
    ),
    "resnet32x4": (
        7433860,
        {
            "layer1.4.conv2.weight": (64, 64, 3, 3),
            "layer3.4.bn2.num_batches_tracked": (),
            "layer2.0.downsample.1.weight": (128,),
            "fc.bias": (100,),
        },
    ),
    "wrn_40_2": (
        2255156,
        {
            "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
            "block3.layer.5.conv2.weight": (128, 128, 3, 3),
            "bn1.weight": (128,),
            "fc.weight": (100, 128),
        },
    ),
    "vgg13": (
        9462180,
        {
            "block0.0.weight": (64, 3, 3, 3),
            "block0.0.bias": (64,),
            "block0.4.weight": (64,),
            "block4.3.weight": (512, 512, 3, 3),
            "classifier.weight": (100, 512),
        },
    ),
    "MobileNetV2": (
        812836,
        {
            "conv1.0.weight": (16, 3, 3, 3),
            "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
            "blocks.6.0.conv.7.running_mean": (160,),
            "conv2.0.weight": (1280, 160, 1, 1),
            "classifier.0.weight": (100, 1280),
        },
    ),
    "ShuffleV1": (
        949258,
        {
            "conv1.weight": (24, 3, 1, 1),
            "layer1.0.conv1.weight": (54, 24, 1, 1),
            "layer1.1.conv1.weight": (60, 80, 1, 1),
            "layer3.3.conv3.weight": (960, 80, 1, 1),
            "linear.weight": (100, 960),
        },
    ),
    "ShuffleV2": (
        1355528,
        {
            "layer1.0.conv1.weight": (24, 1, 3, 3),
            "layer1.0.conv5.weight": (58, 58, 1, 1),
            "layer2.7.bn3.weight": (116,),
            "conv2.weight": (1024, 464, 1, 1),
            "linear.weight": (100, 1024),
        },
    ),
    "ResNet50": (
        23705252,
        {
            "conv1.weight": (64, 3, 3, 3),
            "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
            "layer4.2.conv3.weight": (2048, 512, 1, 1),
            "linear.weight": (100, 2048),
        },
    ),
    "MobileNetV1": (
        3309476,
        {
            "model.0.0.weight": (32, 3, 3, 3),
            "model.1.0.weight": (32, 1, 3, 3),
            "model.13.3.weight": (1024, 1024, 1, 1),
            "fc.weight": (100, 1024),
        },
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_public_layout(name):
    count, shapes = LAYOUT[name]
    model = create_model(name, 100)
    sd = model.state_dict()
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(p.numel() for p in model.parameters()) == count
    if name == "MobileNetV1":  # 4.23M with the 1000-way ImageNet classifier
        assert sum(p.numel() for p in create_model(name, 1000).parameters()) == 4231976


# ---- DualHead ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_dual_head_on_torchvision(arch):
    model = create_model(arch, 10, dual_head=True, aux_head="nonlinear")
    assert isinstance(model, DualHead) and isinstance(model.head2, nn.Sequential)
    # the published DHKD code's NonLinearClassifier (nmihtrug/mdistiller mdistiller/models/cifar/classifier.py)
    d = {"resnet18": 512, "mobilenet_v2": 1280}[arch]
    assert [type(m) for m in model.head2] == [nn.Linear, nn.Dropout, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert model.head2[0].weight.shape == (200, d) and model.head2[4].weight.shape == (10, 200)
    assert model.head_path == {"resnet18": "fc", "mobilenet_v2": "classifier.1"}[arch]
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        l1, l2 = model(x)
        assert l1.shape == l2.shape == (2, 10)
        assert torch.equal(model.export().eval()(x), l1)
    plain = create_model(arch, 10)
    assert list(model.export().state_dict()) == list(plain.state_dict())


def test_dual_head_keeps_head1_weights_and_loads_single_head(tmp_path):
    model = create_model("resnet8", 100)
    w = model.fc.weight.detach().clone()
    dual = DualHead(model)
    assert torch.equal(dual.head1.weight, w) and isinstance(dual.backbone.fc, nn.Identity)
    path = tmp_path / "plain.pt"
    torch.save(create_model("resnet8", 100).state_dict(), path)
    load_checkpoint(dual, path)  # a single-head checkpoint goes into backbone + head 1
    assert torch.equal(dual.head1.weight, read_state_dict(path)["fc.weight"])
    torch.save(dual.state_dict(), tmp_path / "dual.pt")
    load_checkpoint(create_model("resnet8", 100, dual_head=True), tmp_path / "dual.pt")
    with pytest.raises(DhkdError, match="aux_head"):
        DualHead(create_model("resnet8", 100), aux_head="mlp")


def test_dual_head_without_classifier():
    with pytest.raises(DhkdError, match="SqueezeNet: it has no nn.Linear classifier with 10 outputs"):
        create_model("squeezenet1_0", 10, dual_head=True)


def test_align_feature_gradients_projects_conflicts_only():
    """The per-sample feature variant (--grad-align-features), row by row."""
    g1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    g2 = torch.tensor([[-1.0, 1.0], [2.0, 3.0], [-5.0, 1.0]])
    out = align_feature_gradients(g1, g2)
    # row 0 conflicts: g2 -> (0, 1); row 1 is aligned: unchanged; row 2 has g1 = 0: unchanged
    assert torch.allclose(out, torch.tensor([[1.0, 1.0], [3.0, 3.0], [-5.0, 1.0]]))


def test_feature_grad_align_in_autograd():
    feat = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    f1, f2 = AlignedSplit.apply(feat)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[-2.0, 1.0], [1.0, 1.0]])
    ((f1 * a).sum() + (f2 * b).sum()).backward()
    # row 0: <a,b> = -2 < 0 -> b - (-2) a = (0, 1); row 1: aligned -> unchanged
    assert torch.allclose(feat.grad, torch.tensor([[1.0, 1.0], [1.0, 2.0]]))

    torch.manual_seed(0)
    model = create_model("resnet8", 10, dual_head=True, align_features=True)
    plain = create_model("resnet8", 10, dual_head=True)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for m in (model, plain):
        l1, l2 = m(x)
        (l1.sum() - l2.sum()).backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    # the heads' own gradients are untouched; the shared features' gradient is aligned
    assert torch.equal(model.head1.weight.grad, plain.head1.weight.grad)
    assert not torch.allclose(model.backbone.conv1.weight.grad, plain.backbone.conv1.weight.grad)


# ---- checkpoint formats -----------------------------------------------------------------------


@pytest.fixture
def small():
    torch.manual_seed(0)
    return create_model("resnet8", 10)


@pytest.mark.parametrize("fmt", ["plain", "model", "state_dict", "module", "safetensors", "tar"])
def test_checkpoint_formats(fmt, small, tmp_path):
    sd = small.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / ("w.tar" if fmt == "tar" else "w.pth")
        obj = {
            "plain": sd,
            "model": {"model": sd, "epoch": 3},
            "state_dict": {"state_dict": sd},
            "module": {f"module.{k}": v for k, v in sd.items()},
            "tar": {"state_dict": sd},
        }[fmt]
        torch.save(obj, path)
    got = read_state_dict(path)
    assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    fresh = create_model("resnet8", 10)
    load_checkpoint(fresh, str(path))
    assert torch.equal(fresh.fc.weight, small.fc.weight)
    assert len(file_digest(path)) == 16


def test_checkpoint_mismatch_names_keys(small, tmp_path):
    sd = small.state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(DhkdError, match=r"1 missing keys \(fc.bias\).*1 unexpected keys \(extra.weight\)"):
        load_checkpoint(create_model("resnet8", 10), tmp_path / "bad.pth")
    res = load_checkpoint(create_model("resnet8", 10), tmp_path / "bad.pth", strict=False)
    assert res.missing_keys == ["fc.bias"] and res.unexpected_keys == ["extra.weight"]
    torch.save(create_model("resnet8", 100).state_dict(), tmp_path / "c100.pth")
    with pytest.raises(DhkdError, match=r"shape mismatches \(fc.weight \(100, 64\) vs model \(10, 64\)"):
        load_checkpoint(create_model("resnet8", 10), tmp_path / "c100.pth", strict=False)


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(DhkdError, match="corrupt.pth"):
        read_state_dict(bad)
    badst = tmp_path / "corrupt.safetensors"
    badst.write_bytes(b"\xff" * 40)
    with pytest.raises(DhkdError, match="corrupt.safetensors"):
        read_state_dict(badst)
    with pytest.raises(DhkdError, match="not found: .*nope.pth"):
        load_checkpoint(create_model("resnet8", 10), tmp_path / "nope.pth")
    torch.save({"epoch": 1}, tmp_path / "nosd.pth")
    with pytest.raises(DhkdError, match="no state dict"):
        read_state_dict(tmp_path / "nosd.pth")


def test_uncached_torchvision_weight(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("DHKD_OFFLINE", "1")  # never download in tests, whether or not the machine is online
    model = create_model("resnet50", 1000)
    with pytest.raises(DhkdError, match=r"not cached: place resnet50-11ad3fa6.pth .* at .*hub/checkpoints/"):
        load_checkpoint(model, "IMAGENET1K_V2", arch="resnet50")
    with pytest.raises(DhkdError, match=r"not cached: .*or pass a checkpoint file path"):
        load_checkpoint(model, "IMAGENET1K_V2")  # the architecture is known from create_model
    with pytest.raises(DhkdError, match="no torchvision weight 'IMAGENET9K'"):
        load_checkpoint(model, "IMAGENET9K", arch="resnet50")
    with pytest.raises(DhkdError, match="not a torchvision architecture|only for torchvision"):
        load_checkpoint(create_model("resnet8", 10), "IMAGENET1K_V1", arch="resnet8")
    # a cached weight file is picked up by name
    small = create_model("resnet18", 1000)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(small.state_dict(), cache / "resnet18-f37072fd.pth")
    fresh = create_model("resnet18", 1000)
    load_checkpoint(fresh, "ResNet18_Weights.IMAGENET1K_V1", arch="resnet18")
    assert torch.equal(fresh.fc.weight, small.fc.weight)
    dual = create_model("resnet18", 1000, dual_head=True)
    load_checkpoint(dual, "IMAGENET1K_V1")  # into backbone + head 1
    assert torch.equal(dual.head1.weight, small.fc.weight)
