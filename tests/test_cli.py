"""CLI manners: effective defaults in --help, results on stdout and logs on stderr, model names."""

import json

import pytest
from click.testing import CliRunner

from dhkd_pipe.cli import main
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models import create_model


def help_text(*args) -> str:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())  # one line: click wraps at the terminal's width


def test_help_shows_the_commands_defaults():
    text = help_text("distill")
    assert (
        "--method [ce|kd|dkd|binary_kl|dhkd|dist|fitnet|reviewkd|dhkd_reviewkd] Distillation method (see above). "
        "[default: dhkd]" in text
    )
    assert "--epochs INTEGER [default: 240]" in text and "[default: 150, 180, 210]" in text
    # each method's meaning and default, then the chosen method's (dhkd's published weight)
    assert "--alpha FLOAT kd: weight of the softmax KL, default 0.9; dkd: weight of TCKD" in text
    assert "dhkd: weight of the head-2 loss (--kd-loss), default 1.0;" in text
    assert "dist: weight of the inter-class relation (per image, 1 - Pearson correlation), default 2.0;" in text
    assert "dhkd_reviewkd: weight of the head-2 loss (--kd-loss), default 1.0. [default: 1.0]" in text
    assert "dkd decoupled KD" in text  # the methods with their one-line summaries
    assert "--grad-align / --no-grad-align" in text and "Give --config FILE before --help" in text
    assert "--views INTEGER Augmentation epochs (views per image) to record. [default: 8]" in help_text("cache-teacher")


def test_help_shows_the_recipes_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: kd\nepochs: 7\nlr-milestones: [3, 5]\nmodel: resnet20\n")
    text = help_text("distill", "--config", str(recipe))
    assert "--epochs INTEGER [default: 7]" in text and "[default: 3, 5]" in text
    assert "--student TEXT Student architecture. [default: resnet20]" in text
    assert "[default: kd]" in text and "(--kd-loss), default 1.0. [default: 0.9]" in text  # kd's alpha
    assert "overridden by the recipe" in text
    # train-teacher trains with ce whatever the recipe says; its defaults are computed for ce
    assert "[default: resnet20]" in help_text("train-teacher", "--config", str(recipe))
    # an unreadable recipe still gives the help, and says why its values are missing
    assert "config file not found" in help_text("distill", "--config", str(tmp_path / "none.yaml"))
    # help does not keep the recipe's values for a later command
    assert "--epochs INTEGER [default: 240]" in help_text("distill")


def test_results_on_stdout_progress_on_stderr(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "train-teacher",
            "--model",
            "resnet8",
            "--data",
            "digits",
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"stopped_at": {"epoch": 0, "step": 2}}  # the result alone
    assert "training resnet8 on digits" in result.stderr


def test_unknown_model_suggests_close_names():
    with pytest.raises(DhkdError, match=r"unknown model 'resnet8x5'; did you mean resnet8x4 \(CIFAR 32px\)") as e:
        create_model("resnet8x5", 10)
    assert "vit_b_16" not in str(e.value)  # the closest names, not all of them
    with pytest.raises(DhkdError, match="lists the names; timm:NAME for timm's models"):
        create_model("qwertyuiop", 10)


def test_names_that_differ_only_in_case_are_explained():
    msg = (
        r"unknown model 'Resnet50': names are case-sensitive; did you mean ResNet50 \(CIFAR 32px\), "
        r"resnet50 \(ImageNet 224px, torchvision\)\?"
    )
    with pytest.raises(DhkdError, match=msg):
        create_model("Resnet50", 10)
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    assert "CIFAR models, 32x32 inputs" in result.stdout and "ImageNet models, 224x224 inputs" in result.stdout
    assert "ResNet50 (CIFAR 32px) / resnet50 (ImageNet 224px, torchvision)" in result.stdout
    assert "inception_v3 (299px)" in result.stdout
