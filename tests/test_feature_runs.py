"""Feature methods in the engine: online only, the connector trained and checkpointed with the student
(``--resume`` continues bitwise) and never exported (model.pt, model.safetensors, ONNX)."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import torch

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.methods.registry import get_method
from dhkd_pipe.models import create_model
from dhkd_pipe.stages.distill import distill
from dhkd_pipe.training.exported import read_exported
from dhkd_pipe.training.run import prepare

QUIET = dict(log=lambda *a: None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("feature-teacher") / "model.pt"
    torch.save({"model": create_model("resnet8", 10).state_dict()}, path)
    return str(path)


def feature_cfg(out, teacher_file, method, **kw):
    base = dict(
        data="digits@96",
        model="resnet8",
        teacher="resnet8",
        teacher_weights=teacher_file,
        method=method,
        epochs=2,
        batch_size=32,
        lr_milestones=[1],
        out=str(out),
    )
    return TrainConfig(**{**base, **kw}).validate()


def _checkpoint(out):
    return torch.load(f"{out}/checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("method", ["fitnet", "reviewkd", "dhkd_reviewkd"])
def test_a_feature_method_with_a_store_is_refused_in_one_line(tmp_path, method):
    cfg = TrainConfig(
        data="digits", model="resnet8", method=method, cache=str(tmp_path / "logits.zarr"), out=str(tmp_path / "run")
    ).validate()
    with pytest.raises(DhkdError, match=r"--method .* intermediate features.* run it online: --teacher") as e:
        prepare(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_a_feature_method_with_a_store_with_exit_2(tmp_path):
    from click.testing import CliRunner

    from dhkd_pipe.cli import main

    result = CliRunner().invoke(
        main,
        [
            "distill",
            "--student",
            "resnet8",
            "--data",
            "digits",
            "--method",
            "reviewkd",
            "--cache",
            str(tmp_path / "logits.zarr"),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "run it online: --teacher" in result.output and not (tmp_path / "run").exists()


def test_connector_trains_with_the_student_and_is_checkpointed_not_exported(tmp_path, teacher_file):
    out = tmp_path / "run"
    run = prepare(feature_cfg(out, teacher_file, "dhkd_reviewkd"))
    connector = run.model.connector
    in_optimizer = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in connector.parameters())
    assert all(g["weight_decay"] == run.cfg.weight_decay for g in run.optimizer.param_groups)
    run.close()
    before = {k: v.clone() for k, v in connector.state_dict().items()}

    distill(feature_cfg(out, teacher_file, "dhkd_reviewkd"), mode="overwrite", **QUIET)
    saved = _checkpoint(out)["model"]
    connector_keys = [k for k in saved if k.startswith("connector.")]
    assert connector_keys and any(not torch.equal(saved[k], before[k[len("connector.") :]]) for k in connector_keys)
    exported, _ = read_exported(str(out))
    plain = create_model("resnet8", 10).state_dict()
    assert set(exported) == set(plain)  # the student alone, in the plain architecture's layout
    pt = torch.load(out / "model.pt", weights_only=True)["model"]
    assert set(pt) == set(plain)


@pytest.mark.slow  # three runs with a teacher forward every step
def test_resume_continues_a_feature_run_bitwise(tmp_path, teacher_file):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    distill(feature_cfg(whole, teacher_file, "reviewkd"), **QUIET)
    assert distill(feature_cfg(parts, teacher_file, "reviewkd", max_steps=4), **QUIET)["stopped_at"]
    distill(feature_cfg(parts, teacher_file, "reviewkd"), mode="resume", **QUIET)
    a, b = _checkpoint(whole), _checkpoint(parts)
    assert a["model"].keys() == b["model"].keys() and any(k.startswith("connector.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_dhkd_reviewkd_kd_term_is_head_two_plus_review():
    """``--grad-align`` projects ``kd`` (alpha KD(head 2) + the ReviewKD term) against ``ce``."""
    method = get_method("dhkd_reviewkd")(warmup_epochs=4, beta=3.0)
    torch.manual_seed(0)
    h1, h2, t = torch.randn(5, 10), torch.randn(5, 10), torch.randn(5, 10)
    y = torch.randint(0, 10, (5,))
    terms = method.terms((h1, h2), y, t, epoch=1, feature_loss=torch.tensor(2.0))
    torch.testing.assert_close(terms["review"], torch.tensor(3.0 * 2 / 4 * 2.0))
    torch.testing.assert_close(terms["kd"], terms["head2"] + terms["review"])
    dhkd = get_method("dhkd")().terms((h1, h2), y, t)
    torch.testing.assert_close(terms["head2"], dhkd["kd"])
    torch.testing.assert_close(terms["ce"], dhkd["ce"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="needs onnx and onnxscript")
def test_a_dhkd_reviewkd_run_exports_to_onnx_without_connector_weights(tmp_path, teacher_file):
    import onnx

    from dhkd_pipe.stages.export import export_onnx

    out = tmp_path / "run"
    distill(feature_cfg(out, teacher_file, "dhkd_reviewkd", epochs=1), **QUIET)
    connector_shapes = {
        tuple(v.shape) for k, v in _checkpoint(out)["model"].items() if k.startswith("connector.") and v.dim() > 1
    }
    student = create_model("resnet8", 10).state_dict()
    result = export_onnx(str(out))
    proto = onnx.load(result["onnx"])
    weights = {tuple(i.dims): i.name for i in proto.graph.initializer}
    assert not any("connector" in name or "abfs" in name for name in weights.values())
    assert not [s for s in connector_shapes if s in weights and s not in {tuple(v.shape) for v in student.values()}]
    held = sum(int(torch.Size(i.dims).numel()) for i in proto.graph.initializer)
    assert held <= sum(v.numel() for v in student.values())


FEATURE_RECIPES = sorted(
    glob.glob(os.path.join(ROOT, "configs", "*", "reviewkd", "*.yaml"))
    + glob.glob(os.path.join(ROOT, "configs", "*", "dhkd_reviewkd", "*.yaml"))
)


@pytest.mark.parametrize("path", FEATURE_RECIPES)
def test_every_feature_recipe_parses_runs_online_and_names_its_source(path):
    from dhkd_pipe.config import build_config
    from dhkd_pipe.methods.registry import from_config
    from dhkd_pipe.models import list_models

    cfg = build_config(TrainConfig, path, {})
    method = from_config(cfg)
    assert method.name == os.path.basename(os.path.dirname(path))
    assert cfg.model in list_models() and cfg.teacher in list_models() and not cfg.cache
    with open(path) as f:
        comment = " ".join(line for line in f if line.startswith("#"))
    assert "mdistiller" in comment
    if method.name == "dhkd_reviewkd":
        assert "penghui-yang/DHKD" in comment and cfg.temperature == 2.0


def test_feature_recipes_hold_mdistillers_weights():
    from dhkd_pipe.config import build_config

    def recipe(name):
        return build_config(TrainConfig, os.path.join(ROOT, "configs", name), {})

    r = recipe("cifar100/reviewkd/resnet32x4_resnet8x4.yaml")
    assert (r.alpha, r.gamma, r.warmup_epochs, r.lr, r.batch_size, r.epochs) == (5.0, 1.0, 20, 0.05, 64, 240)
    assert recipe("cifar100/dhkd_reviewkd/resnet32x4_resnet8x4.yaml").beta == 5.0
    for name, weight in (("resnet34_resnet18", 1.0), ("resnet50_mobilenet", 8.0)):
        i = recipe(f"imagenet/reviewkd/{name}.yaml")
        assert (i.alpha, i.warmup_epochs, i.lr, i.weight_decay, i.epochs) == (weight, 1, 0.1, 1e-4, 100), name
    assert len(FEATURE_RECIPES) == 2 * 11 + 2


def test_bench_accuracy_trains_the_feature_rows_online_from_the_same_teacher(tmp_path):
    from dhkd_pipe.benchmarks import accuracy as bench_module
    from dhkd_pipe.config import AccuracyBenchConfig

    rows = {r.name: r for r in bench_module.ROWS}
    assert {"fitnet", "reviewkd", "dhkd_reviewkd"} <= set(rows)
    bench = AccuracyBenchConfig(out=str(tmp_path / "b"), epochs=12)
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"weights")
    store_key = {"config": {}, "teacher_weights": "digest"}

    def train_cfg(**kw):
        return TrainConfig(**{**dict(data="digits", batch_size=64), **kw}).validate()

    for name in ("fitnet", "reviewkd", "dhkd_reviewkd"):
        assert rows[name].online and not rows[name].seeded  # one seed by default
        cfg, key = bench_module.student_run(bench, rows[name], 0, train_cfg, "store.zarr", store_key, str(weights))
        assert (cfg.teacher, cfg.teacher_weights, cfg.cache, cfg.method) == (bench.teacher, str(weights), None, name)
        assert "store" not in key and key["teacher_weights"] == bench_module.file_digest(str(weights))
        assert cfg.warmup_epochs == (1 if name != "fitnet" else None)  # 20 of 240 epochs, scaled to 12
    cfg, key = bench_module.student_run(bench, rows["dhkd"], 0, train_cfg, "store.zarr", store_key, str(weights))
    assert cfg.cache == "store.zarr" and cfg.teacher is None and key["store"] == store_key


@pytest.mark.slow
def test_bench_distill_has_an_online_reviewkd_row(tmp_path):
    from dhkd_pipe.benchmarks.distill import bench_distill

    rows, ratios = bench_distill(
        str(tmp_path / "bench.json"), teacher="resnet8", student="resnet8", batch_size=8, steps=2, warmup=1
    )
    row = next(r for r in rows if r["path"].startswith("online ReviewKD"))
    assert row["images_per_sec"] > 0
    online = next(r for r in rows if r["path"].startswith("online DHKD"))["images_per_sec"]
    assert ratios["reviewkd_over_online_dhkd"] == pytest.approx(row["images_per_sec"] / online)


@pytest.mark.slow
def test_a_feature_method_runs_in_two_processes(tmp_path, teacher_file):
    from conftest import accelerate_launch

    out = tmp_path / "mp"
    accelerate_launch(
        "distill",
        "--student",
        "resnet8",
        "--teacher",
        "resnet8",
        "--teacher-weights",
        teacher_file,
        "--data",
        "digits",
        "--method",
        "dhkd_reviewkd",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "16",
        "--out",
        str(out),
    )
    saved = _checkpoint(out)
    assert saved["step"] == 2 and any(k.startswith("connector.abfs.") for k in saved["model"])
