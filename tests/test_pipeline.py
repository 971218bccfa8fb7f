"""End to end on digits: teacher, stage 1 (store), stage 2 (cached distillation), resume, errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dhkd_pipe.cache import LogitCache, codec_tolerance
from dhkd_pipe.config import CacheConfig, TrainConfig
from dhkd_pipe.engine import prepare
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.stages.cache_teacher import cache_teacher, verify_cache
from dhkd_pipe.stages.distill import distill
from dhkd_pipe.stages.train_teacher import train_teacher

BIN = os.path.join(os.path.dirname(sys.executable), "dhkd-pipe")
QUIET = dict(log=lambda *a: None)


def cli(*args, check=True, **kw):
    proc = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"dhkd-pipe {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def accelerate(*args, processes=2):
    # accelerate 1.15's `--cpu` launcher starts one process; torchrun's (`--multi_gpu`) on a machine
    # without a GPU gives MULTI_CPU (gloo) ranks, which is what we test.
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dhkd_pipe.cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def teacher(work):
    """A small digits teacher, trained through the CLI."""
    out = work / "teacher"
    cli("train-teacher", "--model", "resnet8", "--data", "digits", "--epochs", "6", "--lr", "0.1", "--lr-milestones", "5", "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_top1"] > 50  # 6 epochs of resnet8: far above chance (10%)
    return out / "model.pt"


def store_cfg(teacher, out, **kw):
    base = dict(data="digits", model="resnet8", weights=str(teacher), views=2, seed=0, out=str(out), batch_size=64, chunk_rows=256)
    return CacheConfig(**{**base, **kw}).validate()


@pytest.fixture(scope="module")
def store(work, teacher):
    cache_teacher(store_cfg(teacher, work / "logits.zarr"), **QUIET)
    return work / "logits.zarr"


def read_all(path):
    c = LogitCache.open(str(path))
    return {
        "logits": np.stack([np.concatenate([c.read_chunk(e, k)[0] for k in range(c.num_chunks)]) for e in range(c.epochs)]),
        "order": np.stack([c.read_order(e) for e in range(c.epochs)]),
        "views": np.stack([c.read_views(e) for e in range(c.epochs)]),
    }


def assert_same_store(a, b):
    a, b = read_all(a), read_all(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


# ---- stage 1 ------------------------------------------------------------------------------------


def test_store_records_the_plan_and_the_teacher(store, teacher):
    c = LogitCache.open(str(store))
    assert (c.epochs, c.num_samples, c.num_classes) == (2, 1437, 10)
    c.check_complete()
    plan_order = np.random.Generator(np.random.Philox(key=[0, 1])).permutation(1437)
    assert np.array_equal(c.read_order(1), plan_order)
    assert c.attrs["teacher"]["val_top1"] > 50
    result = verify_cache(str(store), "digits", str(teacher), samples=128)
    assert result["ok"] and result["top1_agreement"] == 1.0, result


def test_store_does_not_depend_on_batch_size(work, teacher, store):
    other = work / "batch100.zarr"
    cache_teacher(store_cfg(teacher, other, batch_size=100, codec="fp16"), **QUIET)
    a, b = read_all(store), read_all(other)
    assert np.array_equal(a["order"], b["order"]) and np.array_equal(a["views"], b["views"])
    np.testing.assert_allclose(a["logits"].astype(np.float32), b["logits"].astype(np.float32), atol=2e-2, rtol=2e-3)


def test_two_processes_write_the_one_process_store(work, teacher, store):
    out = work / "two.zarr"
    accelerate("cache-teacher", "--model", "resnet8", "--weights", teacher, "--data", "digits", "--views", 2,
               "--chunk-rows", 256, "--batch-size", 64, "--out", out)
    assert_same_store(store, out)
    assert LogitCache.open(str(out)).attrs["teacher"]["val_top1"] == LogitCache.open(str(store)).attrs["teacher"]["val_top1"]


def test_killed_run_resumes_to_the_same_store(work, teacher, store):
    out = work / "killed.zarr"
    args = [BIN, "cache-teacher", "--model", "resnet8", "--weights", str(teacher), "--data", "digits", "--views", "2",
            "--chunk-rows", "256", "--batch-size", "64", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        try:
            done = LogitCache.open(str(out)).done_mask()
        except DhkdError:
            done = np.zeros(1, bool)
        if done.any() and not done.all():
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    if killed:
        with pytest.raises(DhkdError, match="incomplete"):
            LogitCache.open(str(out)).check_complete()
    cli(*args[1:])
    assert_same_store(store, out)


def test_a_different_command_is_refused_unless_overwrite(work, teacher, store):
    proc = cli("cache-teacher", "--model", "resnet8", "--weights", teacher, "--data", "digits", "--views", 3,
               "--chunk-rows", 256, "--out", store, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and proc.stderr.count("\n") == 1


def test_cache_teacher_user_errors(work, teacher):
    bad = work / "bad.pt"
    torch.save({"model": {"nonsense": torch.zeros(1)}}, bad)
    for args, message in [
        (["--weights", bad], "missing"),
        (["--weights", work / "nope.pt"], "nope.pt"),
        (["--weights", teacher, "--codec", "int4"], "int4"),
        (["--weights", teacher, "--data", "cifar100:/nonexistent"], "not found"),
    ]:
        out = work / "err.zarr"
        proc = cli("cache-teacher", "--model", "resnet8", "--data", "digits", "--out", out, *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()


def test_inspect(store):
    info = json.loads(cli("inspect", store, "--json").stdout)
    assert info["codec"] == "fp16" and info["shape"] == [2, 1437, 10]
    assert 0 < info["bytes_per_logit"] <= 2.5
    assert "resnet8" in cli("inspect", store).stdout


# ---- online distillation and user errors through the CLI ------------------------------------------


def test_online_dhkd_through_the_cli(work, teacher):
    out = work / "online"
    cli("distill", "--student", "resnet8", "--teacher", "resnet8", "--teacher-weights", teacher, "--data", "digits",
        "--method", "dhkd", "--epochs", 1, "--aux-head", "nonlinear", "--grad-align", "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_source"] == "online" and summary["method"] == "dhkd"
    exported = torch.load(out / "model.pt", weights_only=True)["model"]
    assert not any("head2" in k for k in exported)  # the auxiliary head is dropped at export


@pytest.mark.parametrize(
    "args, message",
    [
        (["--student", "resnet9000"], "did you mean ResNet50 (CIFAR 32px), resnet50"),  # the message suggests the closest names
        (["--data", "cifar100:/nonexistent"], "not found"),
        (["--teacher-weights", "WRONG"], "WRONG"),
        (["--epochs", "0"], "bad epochs"),
        (["--method", "magic"], "unknown method"),
        (["--config", "/nonexistent.yaml"], "config file not found"),
    ],
)
def test_user_errors_are_one_line_and_leave_nothing(work, teacher, args, message):
    out = work / "never"
    base = {"--student": "resnet8", "--teacher": "resnet8", "--teacher-weights": str(teacher), "--data": "digits", "--method": "dhkd"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    proc = cli("distill", *[x for kv in base.items() for x in kv], "--out", out, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert not out.exists()


def test_teacher_checkpoint_that_does_not_fit(work, teacher):
    proc = cli("distill", "--student", "resnet8", "--teacher", "resnet20", "--teacher-weights", teacher,
               "--data", "digits", "--out", work / "never2", check=False)
    assert proc.returncode == 2 and ("missing" in proc.stderr or "unexpected" in proc.stderr)
    assert not (work / "never2").exists()


# ---- stage 2 ------------------------------------------------------------------------------------


def train_cfg(out, **kw):
    base = dict(data="digits", model="resnet8", method="dhkd", epochs=2, batch_size=64, lr_milestones=[1], out=str(out))
    return TrainConfig(**{**base, **kw}).validate()


def test_cached_and_online_runs_see_the_same_teacher_logits(work, teacher, store):
    cached = prepare(train_cfg(work / "cmp-cached", cache=str(store)))
    online = prepare(train_cfg(work / "cmp-online", teacher="resnet8", teacher_weights=str(teacher)))
    tol = None
    for epoch in (0, 1):
        for a, b, _ in zip(cached.loader.epoch(epoch), online.loader.epoch(epoch), range(6)):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)  # the same replayed pixels
            with torch.no_grad():
                fresh = online.teacher(b.images)
            tol = codec_tolerance("fp16", fresh) + 1e-4
            assert (a.teacher.float() - fresh).abs().max() <= tol


def test_resume_mid_epoch_continues_identically(work, store):
    straight = distill(train_cfg(work / "straight", cache=str(store)), **QUIET)
    cfg = train_cfg(work / "stopped", cache=str(store), max_steps=7)
    assert distill(cfg, **QUIET)["stopped_at"] == {"epoch": 0, "step": 7}
    resumed = distill(train_cfg(work / "stopped", cache=str(store)), resume=True, **QUIET)
    a = torch.load(work / "straight" / "model.pt", weights_only=True)["model"]
    b = torch.load(work / "stopped" / "model.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["val_top1"] == straight["val_top1"]
    assert straight["teacher_source"] == "cache" and straight["distinct_views"] == 2


def test_resume_restores_the_generators_dropout_draws_from(work, store):
    # the nonlinear head's Dropout draws from the CPU generator: a resume that did not restore it
    # would train on other masks; the stop is mid-epoch and again at an epoch boundary
    straight = train_cfg(work / "dropout-straight", cache=str(store), aux_head="nonlinear")
    distill(straight, **QUIET)
    for stop in (5, 22):  # 22 = one epoch of 1437 digits in batches of 64
        out = work / f"dropout-stopped-{stop}"
        distill(train_cfg(out, cache=str(store), aux_head="nonlinear", max_steps=stop), **QUIET)
        torch.manual_seed(12345)  # whatever the generator holds now must not matter
        distill(train_cfg(out, cache=str(store), aux_head="nonlinear"), resume=True, **QUIET)
        a = torch.load(work / "dropout-straight" / "model.pt", weights_only=True)["model"]
        b = torch.load(out / "model.pt", weights_only=True)["model"]
        for key in a:
            assert torch.equal(a[key], b[key]), (stop, key)


def test_checkpoint_holds_the_grad_scaler_and_every_generator(work, store):
    from dhkd_pipe.engine import CHECKPOINT, _load_state, _save_state

    run = prepare(train_cfg(work / "scaler", cache=str(store)), overwrite=True)
    run.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=7)
    _save_state(run, 0, 3)
    state = torch.load(work / "scaler" / CHECKPOINT, weights_only=True)
    assert state["scaler"]["scale"] == 2.0**10 and state["scaler"]["growth_interval"] == 7
    assert len(state["rng"]) == 1 and torch.equal(state["rng"][0]["cpu"], torch.get_rng_state())

    expected = torch.rand(4)  # what the generator gives right after the save
    resumed = prepare(train_cfg(work / "scaler", cache=str(store)), resume=True)
    assert resumed.start_epoch == 0 and resumed.start_step == 3
    fresh = prepare(train_cfg(work / "scaler", cache=str(store)), resume=True)
    fresh.accelerator.scaler = torch.amp.GradScaler("cpu")
    torch.manual_seed(99)
    _load_state(fresh)
    assert torch.equal(torch.rand(4), expected)
    assert fresh.accelerator.scaler.get_scale() == 2.0**10 and fresh.accelerator.scaler.get_growth_interval() == 7


def test_resume_with_a_different_config_is_refused(work, store):
    with pytest.raises(DhkdError, match="different config: lr"):
        distill(train_cfg(work / "straight", cache=str(store), lr=0.5), resume=True, **QUIET)


def test_two_process_training_and_its_checkpoint(work, store):
    out = work / "ddp"
    accelerate("distill", "--student", "resnet8", "--cache", store, "--data", "digits", "--method", "dhkd",
               "--epochs", 1, "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # written once
    result = json.loads(cli("eval", "--model", "resnet8", "--weights", out / "model.pt", "--data", "digits").stdout)
    assert result["top1"] == pytest.approx(summary["val_top1"])


def test_store_errors_in_stage_2(work, store, tmp_path):
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(store, incomplete)
    done_dir = incomplete / "done"
    shutil.rmtree(done_dir / "c")  # no chunk is done any more
    proc = cli("distill", "--student", "resnet8", "--cache", incomplete, "--data", "digits", "--out", tmp_path / "r1", check=False)
    assert proc.returncode == 2 and "incomplete" in proc.stderr and not (tmp_path / "r1").exists()

    from dhkd_pipe.stages.bench import write_synthetic_cifar

    spec = write_synthetic_cifar(str(tmp_path / "cifar"), num_train=50, num_val=10)
    proc = cli("distill", "--student", "resnet8", "--cache", store, "--data", spec, "--out", tmp_path / "r2", check=False)
    assert proc.returncode == 2 and "does not match" in proc.stderr and not (tmp_path / "r2").exists()

    corrupt = tmp_path / "corrupt.zarr"
    shutil.copytree(store, corrupt)
    chunk = sorted(p for p in (corrupt / "logits").rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    chunk.write_bytes(b"garbage" * 10)
    proc = cli("distill", "--student", "resnet8", "--cache", corrupt, "--data", "digits", "--epochs", 1, "--out", tmp_path / "r3", check=False)
    assert proc.returncode == 2 and "chunk" in proc.stderr and "Traceback" not in proc.stderr


def test_report_draws_runs(work, store):
    out = work / "report.png"
    table = cli("report", work / "straight", work / "stopped", "--out", out).stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "| run |" in table and "straight" in table
