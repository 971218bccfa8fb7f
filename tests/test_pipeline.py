"""End to end on digits: teacher, stage 1 (store), stage 2 (cached distillation), resume, errors.

Two tiers. The fast tests use a random-weights teacher and a store made from it (the mechanics do
not need a good teacher) and call the CLI in this process (``CliRunner``); one test checks the
console script's real process. The ``slow`` tests train, launch processes or kill them; the
trained teacher and its store serve only the tests that look at what the teacher learned or
compare whole stores. Every test writes into its own ``tmp_path``; the module's fixtures are
built once and only read, so any test runs alone (``-k``) or in any order.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import BIN, SMALL_DATA, accelerate_launch, cli_here
from conftest import cli_process as cli

from dhkd_pipe.config import CacheConfig, TrainConfig
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.stages.cache_teacher import cache_teacher
from dhkd_pipe.stages.distill import distill
from dhkd_pipe.stages.verify_cache import verify_cache
from dhkd_pipe.store.codecs import codec_tolerance
from dhkd_pipe.store.reader import LogitCache
from dhkd_pipe.training.run import prepare

QUIET = dict(log=lambda *a: None)
slow = pytest.mark.slow


def assert_one_line_error(result, message):
    """Exit code 2 and one line ``error: ...`` naming ``message`` (a subprocess or a click Result)."""
    code = result.returncode if hasattr(result, "returncode") else result.exit_code
    assert code == 2, result.stderr
    assert message in result.stderr and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (
        result.stderr
    )


def store_cfg(teacher, out, **kw):
    base = dict(
        data="digits",
        model="resnet8",
        weights=str(teacher),
        views=2,
        seed=0,
        out=str(out),
        batch_size=64,
        chunk_rows=256,
    )
    return CacheConfig(**{**base, **kw}).validate()


STORE_ARGS = [
    "--model",
    "resnet8",
    "--data",
    "digits",
    "--views",
    2,
    "--chunk-rows",
    256,
    "--batch-size",
    64,
]  # = store_cfg


# random_teacher, quick_store, trained_teacher and trained_store: session fixtures of conftest.py


def read_all(path):
    c = LogitCache.open(str(path))
    return {
        "logits": np.stack(
            [np.concatenate([c.read_chunk(e, k)[0] for k in range(c.num_chunks)]) for e in range(c.epochs)]
        ),
        "order": np.stack([c.read_order(e) for e in range(c.epochs)]),
        "views": np.stack([c.read_views(e) for e in range(c.epochs)]),
    }


def assert_same_store(a, b):
    a, b = read_all(a), read_all(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


# ---- stage 1 ------------------------------------------------------------------------------------


@slow
def test_store_records_the_plan_and_the_teacher(trained_store, trained_teacher):
    c = LogitCache.open(str(trained_store))
    assert (c.epochs, c.num_samples, c.num_classes) == (2, 1437, 10)
    c.check_complete()
    plan_order = np.random.Generator(np.random.Philox(key=[0, 1])).permutation(1437)
    assert np.array_equal(c.read_order(1), plan_order)
    assert c.attrs["teacher"]["val_top1"] > 50
    result = verify_cache(str(trained_store), "digits", str(trained_teacher), samples=128)
    # fp16 storage rounds each logit by up to half a step (0.004 at 8..16): where the teacher's top
    # two are that close the stored argmax may differ; with two torch threads (-n 0) one of 128 did
    assert result["ok"] and result["top1_agreement"] >= 126 / 128, result


@slow
def test_store_does_not_depend_on_batch_size(tmp_path, random_teacher, quick_store):
    other = tmp_path / "batch100.zarr"
    cache_teacher(store_cfg(random_teacher, other, batch_size=100, codec="fp16"), **QUIET)
    a, b = read_all(quick_store), read_all(other)
    assert np.array_equal(a["order"], b["order"]) and np.array_equal(a["views"], b["views"])
    np.testing.assert_allclose(a["logits"].astype(np.float32), b["logits"].astype(np.float32), atol=2e-2, rtol=2e-3)


@slow
def test_killed_run_resumes_to_the_same_store(tmp_path, random_teacher, quick_store):
    out = tmp_path / "killed.zarr"
    args = [BIN, "cache-teacher", "--weights", str(random_teacher), *map(str, STORE_ARGS), "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    done_at_kill = None
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                done = LogitCache.open(str(out)).done_mask()
            except DhkdError:  # not created yet
                done = np.zeros(1, bool)
            if done.any() and done.sum() <= done.size // 2:  # mid-store: chunks written, half still to do
                os.kill(proc.pid, signal.SIGKILL)
                done_at_kill = done
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and done_at_kill is None:
            proc.kill()
        code = proc.wait()
    assert done_at_kill is not None, "the writer ended (or stalled) before it was seen mid-store"
    # it was still running: a process that had ended on its own would report its own exit code
    assert code == -signal.SIGKILL, code
    with pytest.raises(DhkdError, match="incomplete"):
        LogitCache.open(str(out)).check_complete()
    cli_here(*args[1:])  # the resume: in this process, which need not die
    assert_same_store(quick_store, out)


def test_a_different_command_is_refused_unless_overwrite(tmp_path, random_teacher, quick_store):
    store = tmp_path / "logits.zarr"
    shutil.copytree(quick_store, store)
    before = read_all(store)
    result = cli_here(
        "cache-teacher",
        "--model",
        "resnet8",
        "--weights",
        random_teacher,
        "--data",
        "digits",
        "--views",
        3,
        "--chunk-rows",
        256,
        "--out",
        store,
        check=False,
    )
    assert_one_line_error(result, "--overwrite")
    after = read_all(store)
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weights", "BAD"], "missing"),
        (["--weights", "NOPE"], "nope.pt"),
        (["--codec", "int4"], "int4"),
        (["--data", "cifar100:MISSING"], "not found"),
    ],
)
def test_cache_teacher_user_errors(tmp_path, random_teacher, args, message):
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"nonsense": torch.zeros(1)}}, bad)
    given = {"--weights": random_teacher, "--data": "digits"}
    given.update(zip(args[::2], args[1::2], strict=True))
    given["--weights"] = {"BAD": bad, "NOPE": tmp_path / "nope.pt"}.get(given["--weights"], given["--weights"])
    given["--data"] = given["--data"].replace("MISSING", str(tmp_path / "missing"))
    out = tmp_path / "err.zarr"
    result = cli_here(
        "cache-teacher", "--model", "resnet8", "--out", out, *[x for kv in given.items() for x in kv], check=False
    )
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_inspect(quick_store):
    info = json.loads(cli_here("inspect", quick_store, "--json").stdout)
    assert info["codec"] == "fp16" and info["shape"] == [2, 1437, 10]
    assert 0 < info["bytes_per_logit"] <= 2.5
    assert "resnet8" in cli_here("inspect", quick_store).stdout


# ---- online distillation and user errors through the CLI ------------------------------------------


@slow
def test_online_dhkd_through_the_cli(tmp_path, random_teacher):
    out = tmp_path / "online"
    cli_here(
        "distill",
        "--student",
        "resnet8",
        "--teacher",
        "resnet8",
        "--teacher-weights",
        random_teacher,
        "--data",
        SMALL_DATA,
        "--method",
        "dhkd",
        "--epochs",
        1,
        "--aux-head",
        "nonlinear",
        "--grad-align",
        "--out",
        out,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_source"] == "online" and summary["method"] == "dhkd"
    exported = torch.load(out / "model.pt", weights_only=True)["model"]
    assert not any("head2" in k for k in exported)  # the auxiliary head is dropped at export


DISTILL_ERRORS = [
    (["--student", "resnet9000"], "did you mean ResNet50 (CIFAR 32px), resnet50"),  # the closest names
    (["--data", "cifar100:MISSING"], "not found"),  # MISSING: a folder under tmp_path that is not there
    (["--teacher-weights", "WRONG"], "WRONG"),
    (["--epochs", "0"], "bad epochs"),
    (["--method", "magic"], "magic"),
    (["--config", "MISSING.yaml"], "config file not found"),
]


def distill_args(teacher, out, args):
    base = {
        "--student": "resnet8",
        "--teacher": "resnet8",
        "--teacher-weights": str(teacher),
        "--data": "digits",
        "--method": "dhkd",
    }
    base.update(
        (flag, value.replace("MISSING", str(out.parent / "missing")))
        for flag, value in zip(args[::2], args[1::2], strict=True)
    )
    return ["distill", *[x for kv in base.items() for x in kv], "--out", out]


@pytest.mark.parametrize("args, message", DISTILL_ERRORS)
def test_user_errors_are_one_line_and_leave_nothing(tmp_path, random_teacher, args, message):
    out = tmp_path / "never"
    result = cli_here(*distill_args(random_teacher, out, args), check=False)
    if args[0] == "--method":  # a click.Choice: click's usage error, exit 2
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr
    else:
        assert_one_line_error(result, message)
    assert not out.exists()


@slow  # the real console script, a process of its own
def test_a_user_error_from_the_console_script_is_one_line(tmp_path, random_teacher):
    # the real process: nothing else (a warning, a traceback) reaches stderr
    out = tmp_path / "never"
    assert_one_line_error(
        cli(*distill_args(random_teacher, out, ["--student", "resnet9000"]), check=False), "did you mean"
    )
    assert not out.exists()


def test_teacher_checkpoint_that_does_not_fit(tmp_path, random_teacher):
    result = cli_here(
        "distill",
        "--student",
        "resnet8",
        "--teacher",
        "resnet20",
        "--teacher-weights",
        random_teacher,
        "--data",
        "digits",
        "--out",
        tmp_path / "never",
        check=False,
    )
    assert result.exit_code == 2 and ("missing" in result.stderr or "unexpected" in result.stderr)
    assert not (tmp_path / "never").exists()


# ---- stage 2 ------------------------------------------------------------------------------------


def train_cfg(out, **kw):
    base = dict(data="digits", model="resnet8", method="dhkd", epochs=2, batch_size=64, lr_milestones=[1], out=str(out))
    return TrainConfig(**{**base, **kw}).validate()


def test_cached_and_online_runs_see_the_same_teacher_logits(tmp_path, random_teacher, quick_store):
    cached = prepare(train_cfg(tmp_path / "cmp-cached", cache=str(quick_store)))
    online = prepare(train_cfg(tmp_path / "cmp-online", teacher="resnet8", teacher_weights=str(random_teacher)))
    for epoch in (0, 1):
        for a, b, _ in zip(cached.loader.epoch(epoch), online.loader.epoch(epoch), range(6), strict=False):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)  # the same replayed pixels
            with torch.no_grad():
                fresh = online.teacher(b.images)
            tol = codec_tolerance("fp16", fresh) + 1e-4
            assert (a.teacher.float() - fresh).abs().max() <= tol


@slow
def test_resume_mid_epoch_continues_identically(tmp_path, small_store):
    small = dict(cache=str(small_store), data=SMALL_DATA, batch_size=32)
    straight = distill(train_cfg(tmp_path / "straight", **small), **QUIET)
    cfg = train_cfg(tmp_path / "stopped", **small, max_steps=3)
    assert distill(cfg, **QUIET)["stopped_at"] == {"epoch": 0, "step": 3}
    resumed = distill(train_cfg(tmp_path / "stopped", **small), mode="resume", **QUIET)
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "stopped" / "model.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["val_top1"] == straight["val_top1"]
    assert straight["teacher_source"] == "cache" and straight["distinct_views"] == 2
    # the method's named terms are logged per epoch; the total is their sum
    for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        assert m["train_loss"] == pytest.approx(m["train_ce"] + m["train_kd"], rel=1e-5)
    assert straight["method_params"]["kd_loss"] == "binary_kl_norm"


@slow
def test_dist_trains_online_and_from_the_store(tmp_path, random_teacher, small_store):
    for name, source in (
        ("cache", dict(cache=str(small_store))),
        ("online", dict(teacher="resnet8", teacher_weights=str(random_teacher))),
    ):
        summary = distill(
            train_cfg(tmp_path / name, method="dist", epochs=1, batch_size=64, data=SMALL_DATA, **source), **QUIET
        )
        assert summary["teacher_source"] == name and summary["method_params"]["alpha"] == 2.0
        (m,) = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert m["train_kd"] == pytest.approx(m["train_inter"] + m["train_intra"], rel=1e-5)
        assert m["train_loss"] == pytest.approx(m["train_ce"] + m["train_kd"], rel=1e-5) and m["train_kd"] > 0


@slow
def test_resume_restores_the_generators_dropout_draws_from(tmp_path, small_store):
    # the nonlinear head's Dropout draws from the CPU generator: a resume that did not restore it
    # would train on other masks; the stop is mid-epoch and again at an epoch boundary
    small = dict(cache=str(small_store), data=SMALL_DATA, batch_size=32, aux_head="nonlinear")
    straight = train_cfg(tmp_path / "dropout-straight", **small)
    distill(straight, **QUIET)
    for stop in (3, 8):  # 8 = one epoch of 256 digits in batches of 32
        out = tmp_path / f"dropout-stopped-{stop}"
        distill(train_cfg(out, **small, max_steps=stop), **QUIET)
        torch.manual_seed(12345)  # whatever the generator holds now must not matter
        distill(train_cfg(out, **small), mode="resume", **QUIET)
        a = torch.load(tmp_path / "dropout-straight" / "model.pt", weights_only=True)["model"]
        b = torch.load(out / "model.pt", weights_only=True)["model"]
        for key in a:
            assert torch.equal(a[key], b[key]), (stop, key)


def test_checkpoint_holds_the_grad_scaler_and_every_generator(tmp_path, quick_store):
    from dhkd_pipe.training.run_folder import CHECKPOINT
    from dhkd_pipe.training.state import restore_training_state, save_training_state

    run = prepare(train_cfg(tmp_path / "scaler", cache=str(quick_store)), mode="overwrite")
    run.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=7)
    run.progress.epoch, run.progress.step = 0, 3
    save_training_state(run)
    state = torch.load(tmp_path / "scaler" / CHECKPOINT, weights_only=True)
    assert state["scaler"]["scale"] == 2.0**10 and state["scaler"]["growth_interval"] == 7
    assert len(state["rng"]) == 1 and torch.equal(state["rng"][0]["cpu"], torch.get_rng_state())

    expected = torch.rand(4)  # what the generator gives right after the save
    resumed = prepare(train_cfg(tmp_path / "scaler", cache=str(quick_store)), mode="resume")
    assert resumed.progress.epoch == 0 and resumed.progress.step == 3
    fresh = prepare(train_cfg(tmp_path / "scaler", cache=str(quick_store)), mode="resume")
    fresh.accelerator.scaler = torch.amp.GradScaler("cpu")
    torch.manual_seed(99)
    restore_training_state(fresh)
    assert torch.equal(torch.rand(4), expected)
    assert fresh.accelerator.scaler.get_scale() == 2.0**10 and fresh.accelerator.scaler.get_growth_interval() == 7


def test_resume_with_a_different_config_is_refused(tmp_path, quick_store):
    assert distill(train_cfg(tmp_path / "run", cache=str(quick_store), max_steps=1), **QUIET)["stopped_at"]
    with pytest.raises(DhkdError, match="different config: lr"):
        distill(train_cfg(tmp_path / "run", cache=str(quick_store), lr=0.5), mode="resume", **QUIET)


@slow
def test_two_process_training_and_its_checkpoint(tmp_path, small_store):
    out = tmp_path / "ddp"
    accelerate_launch(
        "distill",
        "--student",
        "resnet8",
        "--cache",
        small_store,
        "--data",
        SMALL_DATA,
        "--method",
        "dhkd",
        "--epochs",
        1,
        "--out",
        out,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    assert not (out / "run.lock").exists()  # taken once, by the main process, and released
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # written once
    m = json.loads(lines[0])  # terms reduced over the processes like the total
    assert m["train_loss"] == pytest.approx(m["train_ce"] + m["train_kd"], rel=1e-5)
    result = json.loads(
        cli_here("eval", "--model", "resnet8", "--weights", out / "model.pt", "--data", "digits").stdout
    )
    assert result["top1"] == pytest.approx(summary["val_top1"])


def test_store_errors_in_stage_2(tmp_path, quick_store):
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(quick_store, incomplete)
    done_dir = incomplete / "done"
    shutil.rmtree(done_dir / "c")  # no chunk is done any more
    result = cli_here(
        "distill",
        "--student",
        "resnet8",
        "--cache",
        incomplete,
        "--data",
        "digits",
        "--out",
        tmp_path / "r1",
        check=False,
    )
    assert_one_line_error(result, "incomplete")
    assert not (tmp_path / "r1").exists()

    from dhkd_pipe.benchmarks.synthetic import write_synthetic_cifar

    spec = write_synthetic_cifar(str(tmp_path / "cifar"), num_train=50, num_val=10)
    result = cli_here(
        "distill", "--student", "resnet8", "--cache", quick_store, "--data", spec, "--out", tmp_path / "r2", check=False
    )
    assert_one_line_error(result, "does not match")
    assert not (tmp_path / "r2").exists()

    corrupt = tmp_path / "corrupt.zarr"
    shutil.copytree(quick_store, corrupt)
    chunk = sorted(p for p in (corrupt / "logits").rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    chunk.write_bytes(b"garbage" * 10)
    result = cli_here(
        "distill",
        "--student",
        "resnet8",
        "--cache",
        corrupt,
        "--data",
        "digits",
        "--epochs",
        1,
        "--out",
        tmp_path / "r3",
        check=False,
    )
    assert result.exit_code == 2 and "chunk" in result.stderr and "Traceback" not in result.stderr


@slow
def test_report_draws_runs(tmp_path, small_store):
    for name, method in (("straight", "dhkd"), ("alone", "ce")):
        distill(
            train_cfg(tmp_path / name, cache=str(small_store), data=SMALL_DATA, method=method, batch_size=64), **QUIET
        )
    out = tmp_path / "report.png"
    table = cli_here("report", tmp_path / "straight", tmp_path / "alone", "--out", out).stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "| run |" in table and "straight" in table
