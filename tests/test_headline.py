"""The headline commands as typed: published teacher weights (torchvision, timm) found in their
caches without network, --data required unless a store records it, the store's data spec and
preprocessing, and stage 2 rendering with exactly the teacher's preprocessing."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import cli_here
from conftest import cli_process as run_cli

from dhkd_pipe.cli import main
from dhkd_pipe.data.views import ViewPlan, validation_views, with_preprocessing
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models import create_model, resolve_weights

QUIET = dict(log=lambda *a: None)
TV_ARCH = "mobilenet_v3_small"  # small and fast on a CPU; DEFAULT is IMAGENET1K_V1
TV_FILE = "mobilenet_v3_small-047dcff4.pth"  # the file name torchvision's DEFAULT weight URL ends in


def one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and no downloads, whether or not this machine is online."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DHKD_OFFLINE", "1")
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="session")
def folder(digit_jpegs):
    return digit_jpegs


# ---- --data is required wherever no store supplies it ----------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["train-teacher", "--model", "resnet8"],
        ["cache-teacher", "--model", "resnet8", "--weights", "t.pt"],
        ["distill", "--student", "resnet8", "--teacher", "resnet8", "--teacher-weights", "t.pt"],
        ["distill", "--student", "resnet8", "--method", "ce"],
        ["eval", "--model", "resnet8", "--weights", "t.pt"],
    ],
)
def test_missing_data_is_one_line(tmp_path, args):
    out = tmp_path / "out"
    extra = [] if args[0] == "eval" else ["--out", str(out)]
    err = one_line_error(CliRunner().invoke(main, args + extra), "missing --data", "imagefolder:DIR")
    assert ("--cache" in err) == (args[0] in ("train-teacher", "distill"))  # training configs may name a store
    assert not out.exists()


def test_a_zoo_teacher_without_weights_is_one_line(tmp_path):
    out = tmp_path / "s.zarr"
    one_line_error(
        CliRunner().invoke(main, ["cache-teacher", "--model", "resnet8", "--data", "digits", "--out", str(out)]),
        "resnet8 has no published weights",
        "--weights FILE",
    )
    one_line_error(
        CliRunner().invoke(
            main,
            [
                "distill",
                "--student",
                "resnet8",
                "--teacher",
                "resnet20",
                "--data",
                "digits",
                "--out",
                str(tmp_path / "r"),
            ],
        ),
        "resnet20 has no published weights",
    )
    assert not out.exists() and not (tmp_path / "r").exists()


# ---- torchvision's published weights ---------------------------------------------------------------


def test_uncached_default_weight_offline_names_the_file(offline_hub):
    with pytest.raises(DhkdError) as e:
        resolve_weights(TV_ARCH, None)
    msg = str(e.value)
    assert "\n" not in msg and "MobileNet_V3_Small_Weights.IMAGENET1K_V1 is not cached" in msg
    assert f"place {TV_FILE}" in msg and str(offline_hub / TV_FILE) in msg


def test_unreachable_host_is_one_line_and_quick(offline_hub, monkeypatch):
    import time

    from dhkd_pipe.models import pretrained

    monkeypatch.delenv("DHKD_OFFLINE")
    monkeypatch.setattr(pretrained, "reachable", lambda url, timeout=None: False)
    t0 = time.perf_counter()
    with pytest.raises(DhkdError, match=r"not cached: place .* offline: download.pytorch.org cannot be reached"):
        resolve_weights("resnet50", "IMAGENET1K_V2")
    assert time.perf_counter() - t0 < 5


def test_probe_of_a_host_that_never_answers_is_bounded():
    import time

    from dhkd_pipe.models.pretrained import reachable

    t0 = time.perf_counter()
    assert not reachable("https://192.0.2.1/x.pth", timeout=0.5)  # TEST-NET-1: routed nowhere
    assert time.perf_counter() - t0 < 3


def test_default_weight_is_fetched_by_torchvision_into_the_hub_cache(offline_hub, monkeypatch):
    """Online, the file comes through ``Weights.get_state_dict`` (torch.hub's download, into
    $TORCH_HOME/hub/checkpoints); the transfer itself is simulated here."""
    from dhkd_pipe.models import pretrained

    monkeypatch.delenv("DHKD_OFFLINE")
    monkeypatch.setattr(pretrained, "reachable", lambda url, timeout=None: True)
    state = create_model(TV_ARCH, 1000).state_dict()
    fetched = []

    def download(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, hash_prefix))
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    source = resolve_weights(TV_ARCH, None)
    assert fetched and fetched[0][0].endswith(TV_FILE) and fetched[0][1] == "047dcff4"  # torch.hub checks the hash
    assert source.path == str(offline_hub / TV_FILE) and os.path.isfile(source.path)
    assert source.record == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    fetched.clear()
    assert resolve_weights(TV_ARCH, "DEFAULT").path == source.path and not fetched  # cached now: no second fetch


def test_weights_flag_still_overrides(offline_hub, tmp_path):
    f = tmp_path / "mine.pt"
    torch.save(create_model(TV_ARCH, 3).state_dict(), f)
    source = resolve_weights(TV_ARCH, str(f))
    assert source.kind == "file" and source.path == str(f) and source.preprocessing() is None


# ---- preprocessing from the weights' metadata ------------------------------------------------------


def test_torchvision_and_timm_preprocessing():
    import torchvision

    from dhkd_pipe.models.pretrained import timm_preprocessing, torchvision_preprocessing

    for arch in ("resnet50", "efficientnet_b0", "efficientnet_b1"):
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        t = weights.transforms()
        pre = torchvision_preprocessing(arch, "DEFAULT")
        assert pre["resolution"] == t.crop_size[0] and pre["resize"] == t.resize_size[0]
        assert pre["crop_pct"] == pytest.approx(t.crop_size[0] / t.resize_size[0])
        assert (
            pre["interpolation"] == t.interpolation.value and pre["mean"] == list(t.mean) and pre["std"] == list(t.std)
        )
    assert torchvision_preprocessing("resnet50", "DEFAULT")["resize"] == 232  # IMAGENET1K_V2
    assert torchvision_preprocessing("efficientnet_b0", "DEFAULT")["interpolation"] == "bicubic"
    pytest.importorskip("timm")
    pre = timm_preprocessing("test_resnet")
    assert (pre["resolution"], pre["crop_pct"], pre["interpolation"], pre["mean"]) == (160, 0.95, "bilinear", [0.5] * 3)


def test_the_plan_carries_preprocessing_and_reads_old_plans():
    plan = ViewPlan(seed=1, policy="random_resized_crop_flip", resolution=224)
    pre = {"resolution": 240, "crop_pct": 240 / 255, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3}
    moved = with_preprocessing(plan, pre)
    assert (moved.resolution, moved.interpolation, moved.mean, moved.std) == (240, "bicubic", (0.5,) * 3, (0.25,) * 3)
    assert with_preprocessing(plan, pre, resolution=64).resolution == 64  # --resolution wins
    assert ViewPlan.from_dict(json.loads(json.dumps(moved.to_dict()))) == moved
    old = {k: v for k, v in plan.to_dict().items() if k not in ("crop_pct", "interpolation", "mean", "std")}
    assert ViewPlan.from_dict(old) == plan  # stores written before these fields
    # the validation box covers what resize-shorter-side-to-255 then centre-crop-240 covers
    v = validation_views(np.array([[255, 300]]), 240, "random_resized_crop_flip", 240 / 255)[0]
    assert v.tolist() == [7, 30, 240, 240, 0]
    with pytest.raises(DhkdError, match="interpolation"):
        ViewPlan(interpolation="lanczos")


def test_dali_renders_the_plans_interpolation_and_normalisation(folder):
    pytest.importorskip("nvidia.dali")
    from dhkd_pipe.data.dali_renderer import DaliViews, render_reference
    from dhkd_pipe.data.datasets import load_data

    data = load_data(f"imagefolder:{folder}")
    plan = with_preprocessing(
        data.default_plan(seed=2),
        {
            "resolution": 24,
            "crop_pct": 0.95,
            "interpolation": "bicubic",
            "mean": [0.5, 0.4, 0.3],
            "std": [0.2, 0.25, 0.3],
        },
    )
    idx = np.arange(data.num_train)
    views = plan.views(0, idx, data.train_sizes(idx))
    r = DaliViews(data, plan, "cpu", num_workers=0)
    out = torch.cat(list(r.train_batches(idx, views, 8)))
    for i in idx:
        ref = render_reference(data.train_files[i], views[i], 24, plan.mean, plan.std, interpolation="bicubic")
        assert (out[i] - ref).abs().mean() < 0.03, i
        # the plan's normalisation, not the data set's (ImageNet's): far apart at this tolerance
        assert (
            out[i] - render_reference(data.train_files[i], views[i], 24, data.mean, data.std, "bicubic")
        ).abs().mean() > 0.1
    val = torch.cat([x for x, _ in r.val_batches(8)])
    vv = data.val_views(plan)
    assert vv[0, 2] == round(min(data.val_sizes()[0]) * 0.95)
    ref = render_reference(data.val_files[0], vv[0], 24, plan.mean, plan.std, interpolation="bicubic")
    assert (val[0] - ref).abs().mean() < 0.03
    r.close()


# ---- the store records its data and preprocessing; stage 2 uses them ------------------------------


@pytest.fixture(scope="session")
def resnet8_file(random_teacher3):
    return random_teacher3


def test_moved_folder_with_data_works_and_a_wrong_one_is_refused(folder, resnet8_file, tmp_path):
    pytest.importorskip("nvidia.dali")
    from dhkd_pipe.config import CacheConfig, TrainConfig
    from dhkd_pipe.stages.cache_teacher import cache_teacher
    from dhkd_pipe.stages.verify_cache import verify_cache
    from dhkd_pipe.store.reader import LogitCache
    from dhkd_pipe.training.run import prepare

    here = tmp_path / "here"
    shutil.copytree(folder, here)
    store = tmp_path / "s.zarr"
    cache_teacher(
        CacheConfig(
            data=f"imagefolder:{os.path.relpath(here)}",
            model="resnet8",
            weights=str(resnet8_file),
            views=1,
            resolution=32,
            batch_size=8,
            chunk_rows=8,
            workers=1,
            out=str(store),
        ).validate(),
        **QUIET,
    )
    assert LogitCache.open(str(store)).attrs["data_spec"] == f"imagefolder:{here}"  # absolute, whatever was typed

    def train(**kw):
        return TrainConfig(
            model="resnet8", method="dhkd", cache=str(store), epochs=1, batch_size=8, workers=1, **kw
        ).validate()

    run = prepare(train(out=str(tmp_path / "r0")))  # no --data: the store's
    assert run.data.root == str(here) and run.data_spec == f"imagefolder:{here}"
    assert verify_cache(str(store), samples=8)["ok"]  # data and teacher weights from the store too

    moved = tmp_path / "moved"
    os.rename(here, moved)
    with pytest.raises(
        DhkdError, match=r"the store's data set imagefolder:.*here: image folder not found.*pass --data"
    ):
        prepare(train(out=str(tmp_path / "r1")))
    run = prepare(train(out=str(tmp_path / "r2"), data=f"imagefolder:{moved}"))  # the fingerprint still matches
    assert run.data.root == str(moved) and run.data_spec == f"imagefolder:{moved}"
    assert verify_cache(str(store), f"imagefolder:{moved}", samples=8)["ok"]

    wrong = tmp_path / "wrong"
    shutil.copytree(moved, wrong)
    os.rename(wrong / "train" / "class1" / "003.JPEG", wrong / "train" / "class1" / "103.JPEG")
    with pytest.raises(DhkdError, match="store does not match the data: digest is"):
        prepare(train(out=str(tmp_path / "r3"), data=f"imagefolder:{wrong}"))
    shutil.rmtree(wrong / "train" / "class2")
    shutil.rmtree(wrong / "val" / "class2")
    with pytest.raises(
        DhkdError, match="store does not match the data: num_samples is 24 in the store, 16 in the data"
    ):
        verify_cache(str(store), f"imagefolder:{wrong}", samples=8)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists()

    other = tmp_path / "other.pt"
    torch.save({"model": create_model("resnet8", 3).state_dict()}, other)
    with pytest.raises(DhkdError, match="are not the store's: digest"):
        verify_cache(str(store), f"imagefolder:{moved}", str(other), samples=8)


@pytest.mark.slow
def test_headline_pair_as_typed_offline(folder, tmp_path):
    """cache-teacher --model ARCH --data imagefolder:DIR --out logits.zarr (no --weights: the
    DEFAULT weight, found in the torch hub cache), then distill --student mobilenet --cache
    logits.zarr (no --data: the store's). No network: DHKD_OFFLINE=1."""
    import torchvision

    from dhkd_pipe.models import file_digest
    from dhkd_pipe.store.reader import LogitCache

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(create_model(TV_ARCH, 3).state_dict(), hub / TV_FILE)  # random weights under the DEFAULT file name
    env = {"TORCH_HOME": str(tmp_path / "torch"), "DHKD_OFFLINE": "1"}
    work = tmp_path / "work"
    work.mkdir()
    data = tmp_path / "imagenet"
    # 2 images of each of the 3 classes and split: 8 views of 6 images at 224 px (the defaults) is
    # the longest part of this test; the whole folder adds time, not cases
    shutil.copytree(
        folder, data, ignore=lambda d, names: [n for n in names if n.endswith(".JPEG") and n not in sorted(names)[:2]]
    )

    run_cli(
        "cache-teacher",
        "--model",
        TV_ARCH,
        "--data",
        f"imagefolder:{os.path.relpath(data, work)}",
        "--out",
        "logits.zarr",
        env=env,
        cwd=work,
    )
    store = LogitCache.open(str(work / "logits.zarr"))
    attrs = store.attrs
    assert attrs["data_spec"] == f"imagefolder:{data}"
    assert attrs["teacher"]["weights"] == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert attrs["teacher"]["weights_digest"] == file_digest(hub / TV_FILE)
    t = torchvision.models.get_model_weights(TV_ARCH).DEFAULT.transforms()
    pre = attrs["preprocessing"]
    assert pre["source"] == "torchvision MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert (pre["resolution"], pre["resize"], pre["interpolation"]) == (
        t.crop_size[0],
        t.resize_size[0],
        t.interpolation.value,
    )
    assert pre["mean"] == list(t.mean) and pre["std"] == list(t.std)
    assert store.epochs == 8 and store.num_samples == 6  # the defaults: 8 views of every image

    # the two stages in their own processes, as typed; the checks of what they wrote in this one
    info = json.loads(cli_here("inspect", "logits.zarr", "--json", env=env, cwd=work).stdout)
    assert info["data"] == f"imagefolder:{data}" and info["preprocessing"]["resolution"] == 224
    assert f"imagefolder:{data}" in cli_here("inspect", "logits.zarr", env=env, cwd=work).stdout

    run_cli(
        "distill",
        "--student",
        "mobilenet",
        "--cache",
        "logits.zarr",
        "--out",
        "runs/s",
        "--epochs",
        1,
        env=env,
        cwd=work,
    )
    summary = json.loads((work / "runs" / "s" / "summary.json").read_text())
    assert summary["teacher_source"] == "cache" and summary["data"] == f"imagefolder:{data}"
    saved = torch.load(work / "runs" / "s" / "model.pt", weights_only=True)
    assert ViewPlan.from_dict(saved["plan"]) == ViewPlan.from_dict(
        attrs["policy"]
    )  # stage 2 rendered with the store's plan

    result = json.loads(cli_here("verify-cache", "logits.zarr", "--samples", 16, env=env, cwd=work).stdout)
    assert result["ok"], result


@pytest.mark.slow
def test_distill_without_data_after_the_folder_moved_is_one_line(folder, resnet8_file, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(folder, data)
    cli_here(
        "cache-teacher",
        "--model",
        "resnet8",
        "--weights",
        resnet8_file,
        "--data",
        f"imagefolder:{data}",
        "--views",
        1,
        "--resolution",
        32,
        "--workers",
        1,
        "--out",
        tmp_path / "s.zarr",
    )
    os.rename(data, tmp_path / "d2")
    result = cli_here(
        "distill", "--student", "resnet8", "--cache", tmp_path / "s.zarr", "--out", tmp_path / "r", check=False
    )
    assert (
        result.exit_code == 2 and result.stderr.count("\n") == 1 and "pass --data SPEC if it has moved" in result.stderr
    )
    assert not (tmp_path / "r").exists()


# ---- timm models -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, head",
    [
        ("test_resnet", "fc"),
        ("test_vit", "head"),
        ("test_convnext", "head.fc"),
        ("mobilenetv3_small_050", "classifier"),
    ],
)
def test_timm_models_wrap_in_a_dual_head(name, head):
    timm = pytest.importorskip("timm")
    from dhkd_pipe.models import model_input_size

    model = create_model(f"timm:{name}", 5, dual_head=True)
    assert (
        model.head_path == head
        and model_input_size(f"timm:{name}") == timm.models.get_pretrained_cfg(name).input_size[-1]
    )
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    a, b = model(x)
    assert a.shape == b.shape == (2, 5)
    plain = timm.create_model(name, pretrained=False, num_classes=5).eval()
    plain.load_state_dict(model.export().state_dict())  # export is timm's own layout
    assert torch.allclose(plain(x), a, atol=1e-5)


def test_timm_names_are_checked_through_the_registry():
    pytest.importorskip("timm")
    with pytest.raises(DhkdError, match="unknown timm model 'resnet1'; closest: resnet18"):
        create_model("timm:resnet1", 3)
    with pytest.raises(DhkdError, match="no pretrained tag 'resnet18.bogus'; known: resnet18.a1_in1k"):
        create_model("timm:resnet18.bogus", 3)
    with pytest.raises(DhkdError, match="2 classifiers .head, head_dist."):
        create_model("timm:deit_tiny_distilled_patch16_224", 3, dual_head=True)


def test_timm_pretrained_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """timm's pretrained file, placed in a temporary Hugging Face cache, is loaded by timm; an
    empty cache offline is one line naming the repository and the cache."""
    timm = pytest.importorskip("timm")
    import huggingface_hub.constants as hf_constants
    from safetensors.torch import save_file

    from dhkd_pipe.models import load_checkpoint

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("DHKD_OFFLINE", "1")
    with pytest.raises(
        DhkdError,
        match=r"test_resnet.r160_in1k are not cached: put model.safetensors of "
        r"https://huggingface.co/timm/test_resnet.r160_in1k in the Hugging Face cache .*hf",
    ):
        resolve_weights("timm:test_resnet", None)
    repo = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(1)
    published = timm.create_model("test_resnet", pretrained=False)
    save_file(
        {k: v.contiguous() for k, v in published.state_dict().items()},
        repo / "snapshots" / commit / "model.safetensors",
    )

    source = resolve_weights("timm:test_resnet", None)
    assert source.kind == "timm" and source.record == "r160_in1k" and source.label == "timm test_resnet.r160_in1k"
    teacher = create_model("timm:test_resnet", 1000)
    load_checkpoint(teacher, source)
    for key, value in published.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key
    student = create_model("timm:test_resnet", 1000, dual_head=True)
    load_checkpoint(student, "r160_in1k")  # a tag names the same file; into backbone + head 1
    assert torch.equal(student.head1.weight, published.fc.weight)
    with pytest.raises(DhkdError, match=r"does not match the model: .*fc.weight \(1000, 96\) vs model \(3, 96\)"):
        load_checkpoint(create_model("timm:test_resnet", 3), "pretrained")


@pytest.mark.slow
def test_timm_teacher_and_student_through_both_stages(folder, tmp_path):
    timm = pytest.importorskip("timm")
    from dhkd_pipe.store.reader import LogitCache

    torch.manual_seed(0)
    weights = tmp_path / "teacher.pth"
    torch.save(
        {"state_dict": timm.create_model("test_resnet", num_classes=3).state_dict()}, weights
    )  # timm's train.py layout
    store, out = tmp_path / "s.zarr", tmp_path / "run"
    cli_here(
        "cache-teacher",
        "--model",
        "timm:test_resnet",
        "--weights",
        weights,
        "--data",
        f"imagefolder:{folder}",
        "--resolution",
        48,
        "--views",
        2,
        "--batch-size",
        8,
        "--workers",
        1,
        "--out",
        store,
    )
    attrs = LogitCache.open(str(store)).attrs
    pre = attrs["preprocessing"]
    assert pre["source"] == "timm test_resnet.r160_in1k pretrained_cfg" and pre["resolution"] == 48  # --resolution wins
    assert (pre["crop_pct"], pre["interpolation"], pre["mean"], pre["std"]) == (0.95, "bilinear", [0.5] * 3, [0.5] * 3)
    assert attrs["teacher"]["val_top1"] is not None
    cli_here(
        "distill",
        "--student",
        "timm:test_efficientnet",
        "--cache",
        store,
        "--epochs",
        1,
        "--batch-size",
        8,
        "--workers",
        1,
        "--out",
        out,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_source"] == "cache" and summary["model"] == "timm:test_efficientnet"
    saved = torch.load(out / "model.pt", weights_only=True)
    plan = ViewPlan.from_dict(saved["plan"])
    assert (plan.resolution, plan.crop_pct, plan.mean, plan.std) == (48, 0.95, (0.5,) * 3, (0.5,) * 3)
    timm.create_model("test_efficientnet", num_classes=3).load_state_dict(saved["model"])  # a plain timm model again
    result = json.loads(
        cli_here(
            "eval",
            "--model",
            "timm:test_efficientnet",
            "--weights",
            out / "model.pt",
            "--data",
            f"imagefolder:{folder}",
        ).stdout
    )
    assert result["resolution"] == 48 and result["top1"] == pytest.approx(summary["val_top1"])
