"""Config: YAML then command line; every shipped recipe parses."""

import glob
import os

import pytest

from dhkd_pipe.config import CacheConfig, TrainConfig, build_config
from dhkd_pipe.errors import DhkdError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_command_line_overrides_yaml(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("data: digits\nmodel: resnet20\nepochs: 3\nlr: 1\nlr_milestones: [1, 2]\ngrad_align: true\n")
    cfg = build_config(TrainConfig, str(f), {"epochs": 5, "lr": None})
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.lr_milestones, cfg.grad_align) == ("resnet20", 5, 1.0, [1, 2], True)
    assert build_config(TrainConfig, None, {"data": "digits", "lr_milestones": "3,4"}).lr_milestones == [3, 4]


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: 0\n", "bad epochs"),
        ("precision: fp8\n", "bad precision"),
        ("colour: red\n", "unknown config option"),
        ("epochs: three\n", "bad value for epochs"),
        ("- a\n- b\n", "must be a mapping"),
        ("a: [\n", "cannot parse"),
    ],
)
def test_bad_configs_are_user_errors(tmp_path, text, message):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(DhkdError, match=message):
        build_config(TrainConfig, str(f), {})


def test_missing_config_file():
    with pytest.raises(DhkdError, match="config file not found"):
        build_config(TrainConfig, "/nonexistent.yaml", {})


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml"))))
def test_every_recipe_parses(path):
    from dhkd_pipe.models import list_models

    is_cache = os.path.basename(path).startswith("cache")
    # digits recipes leave the teacher's weights and the store to the quickstart that runs them
    cfg = build_config(CacheConfig, path, {"weights": "given.pt"}) if is_cache else build_config(TrainConfig, path, {})
    assert cfg.model in list_models()
    if not is_cache:
        from dhkd_pipe.methods.registry import from_config

        from_config(cfg)  # the recipe's method takes every option the recipe sets
    if not is_cache and cfg.method == "dhkd" and "digits" not in path:
        assert cfg.teacher in list_models() or cfg.cache


def _recipe(name):
    return build_config(TrainConfig, os.path.join(ROOT, "configs", name), {})


def test_recipes_follow_the_published_commands():
    # the published DHKD code's CIFAR-100 command (resnet32x4 -> ShuffleV2) and ImageNet command
    # (ResNet-34 -> ResNet-18)
    c = _recipe("cifar100/resnet32x4_ShuffleV2.yaml")
    assert (c.alpha, c.gamma, c.temperature, c.aux_head, c.grad_align, c.kd_loss) == (
        1.0,
        1.0,
        2.0,
        "nonlinear",
        True,
        "binary_kl_norm",
    )
    assert (c.lr, c.weight_decay, c.batch_size, c.epochs, c.lr_milestones) == (0.01, 5e-4, 64, 240, [150, 180, 210])
    i = _recipe("imagenet/resnet34_resnet18.yaml")
    assert (i.alpha, i.gamma, i.temperature, i.aux_head, i.grad_align) == (0.1, 1.0, 2.0, "linear", False)
    assert (i.lr, i.weight_decay, i.momentum, i.epochs, i.lr_milestones, i.lr_decay) == (
        0.1,
        1e-4,
        0.9,
        100,
        [30, 60, 90],
        0.1,
    )
    # train_student_imagenet.py's --early_stop_epoch default (alpha 0 from its 1-based epoch 50 on),
    # in both ImageNet recipes; its CIFAR script has no such switch
    for name in ("imagenet/resnet34_resnet18.yaml", "imagenet/resnet50_mobilenet.yaml"):
        assert _recipe(name).kd_stop_epoch == 50, name
    for path in glob.glob(os.path.join(ROOT, "configs", "cifar100", "*.yaml")):
        if not os.path.basename(path).startswith("cache"):
            assert build_config(TrainConfig, path, {}).kd_stop_epoch is None, path


@pytest.mark.parametrize(
    "path",
    sorted(
        glob.glob(os.path.join(ROOT, "configs", "cifar100", "*.yaml"))
        + glob.glob(os.path.join(ROOT, "configs", "imagenet", "*.yaml"))
    ),
)
def test_every_distillation_recipe_says_what_it_follows(path):
    if os.path.basename(path).startswith("cache"):
        return
    with open(path) as f:
        comment = " ".join(line for line in f if line.startswith("#"))
    assert "published" in comment and "penghui-yang/DHKD" in comment
    assert build_config(TrainConfig, path, {}).temperature == 2.0  # --BinaryKL_T, the published T


# Values read back from a recipe, each refused in one line before any work: what a person may write
# by mistake (a YAML bool or null where a number is meant, a key twice), and what no float32
# optimizer can take. (recipe text, the message, a regex)
READ_BACK_CASES = [
    ("epochs: true\n", r"bad value for epochs: True; give an integer"),
    ("seed: null\n", r"bad value for seed: null; give an integer, or leave seed out"),
    ("lr: 1.0e308\n", r"bad --lr 1e\+308: the learning rate must stay at most 3.403e\+38"),
    ("weight_decay: 1.0e308\n", r"bad --weight-decay 1e\+308: must be at most 3.403e\+38"),
    ("compile: 5\n", r"bad value for compile: 5; give true or false"),
    ("compile: maybe\n", r"bad value for compile: 'maybe'; give true or false"),
    ("lr: true\n", r"bad value for lr: True; give a number"),
    ("workers: true\n", r"bad value for workers: True; give an integer"),
    ("resolution: false\n", r"bad value for resolution: False; give an integer"),
    ("lr_milestones: [true, 2]\n", r"bad value for lr_milestones: \[True, 2\]; give a list of integers"),
    ("lr_milestones: [1.5, 2]\n", r"bad value for lr_milestones: \[1.5, 2\]; give a list of integers"),
    ("max_nonfinite: null\n", r"bad value for max_nonfinite: null"),
    ("method: null\n", r"bad value for method: null"),
    ("teacher: [resnet8, resnet20]\n", r"bad value for teacher: \['resnet8', 'resnet20'\]; give text"),
    ("log_with: {tensorboard: 1}\n", r"bad value for log_with: \{'tensorboard': 1\}; give text"),
    ("epochs: 1\nepochs: 3\n", r"sets 'epochs' twice \(lines 2 and 3\); keep one"),
    ("batch_size: 32\nbatch-size: 16\n", r"sets batch_size twice \(as batch_size and batch-size\)"),
    ("epochs: 1" + "0" * 5000 + "\n", r"cannot parse config .*: a value cannot be read"),
    ("teacher_weights: 2024-13-45\n", r"cannot parse config .*: a value cannot be read"),
    (
        "epochs: 3\nlr: 1.0\nlr_decay: 1.0e20\nlr_milestones: [1, 2]\n",
        r"bad --lr 1: the learning rate \(reached after 2 decays by 1e\+20\) must stay at most",
    ),
]


@pytest.mark.parametrize(
    "text, message", READ_BACK_CASES, ids=[c[0].split(":")[0] + f"-{i}" for i, c in enumerate(READ_BACK_CASES)]
)
def test_recipe_values_read_back_are_checked(tmp_path, text, message):
    """One DhkdError line naming the option, within a second; the recipe is left as it was."""
    import time

    f = tmp_path / "r.yaml"
    f.write_text("data: digits\n" + text)
    before = f.read_bytes()
    began = time.perf_counter()
    with pytest.raises(DhkdError, match=message) as info:
        build_config(TrainConfig, str(f), {})
    assert time.perf_counter() - began < 1.0
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert f.read_bytes() == before


@pytest.mark.parametrize(
    "options, message",
    [
        ({"epochs": True}, "bad value for epochs: True"),
        ({"seed": None}, "bad value for seed: None"),
        ({"lr": 1e308}, "bad --lr 1e\\+308"),
        ({"weight_decay": 1e308}, "bad --weight-decay"),
        ({"lr_milestones": [1.5]}, "bad value for lr_milestones"),
        ({"compile": 1}, "bad value for compile: 1; give true or false"),
        ({"model": None}, "bad value for model: None; give text"),
    ],
)
def test_configs_built_in_python_are_checked_as_recipes_are(options, message):
    with pytest.raises(DhkdError, match=message):
        TrainConfig(data="digits", **options).validate()
    with pytest.raises(DhkdError, match="bad value for views: True"):
        CacheConfig(data="digits", views=True).validate()
