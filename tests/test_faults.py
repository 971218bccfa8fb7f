"""The fault matrix, run side: every user mistake and environment fault of a training
command is one line on stderr and exit 2 (no traceback, no native library chatter), an interrupt
exits cleanly and resumes, and nothing is half-written or lost.

One table (``CASES``) drives one test. A case names its command line (``{out}``, ``{teacher}``,
... are filled from the case's work folder and the shared fixtures), how to set the scene, the
exit code and the error line it expects, and what must hold of the files afterwards. By default a
failed case must leave ``--out`` exactly as it was (absent, or byte for byte the same), and no
case may leave a ``.tmp`` file or a lock behind. Commands run in-process through click's
``CliRunner``; cases about signals, kills, native output and concurrent processes run the CLI as a
subprocess and are marked slow.

The store side of the matrix (locks, checks and repairs of logit stores) is in its own table.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import invoke
from console_script import BIN, CHATTER

from dhkd_pipe.models import create_model

ERROR_LINE = re.compile(r"^(error: |interrupted by )")

TRAIN = "train-teacher --model resnet8 --data digits@100 --epochs 1 --batch-size 32 --out {out}"
# long enough to be stopped mid-run: 2 epochs of 10 steps, a checkpoint after every step
LONG = "train-teacher --model resnet8 --data digits@300 --epochs 2 --batch-size 32 --checkpoint-every 1 --out {out}"
IMAGES = "distill --method ce --student resnet8 --data imagefolder:{images} --resolution 32 --batch-size 4 --out {out}"
ONLINE = (
    "distill --student resnet8 --teacher resnet8 --teacher-weights {teacher} --data digits@100 --epochs 1 "
    "--batch-size 32 --out {out}"
)


# ---- shared fixtures (once per session) ------------------------------------------------------------


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """A trained digits teacher (its run folder is a finished run), and a tiny JPEG folder."""
    root = tmp_path_factory.mktemp("faults-shared")
    run = root / "teacher"
    code, _, err = invoke(shlex.split(TRAIN.format(out=run)))
    assert code == 0, err
    images = root / "images"
    _write_images(images, val=True)
    noval = root / "images-noval"
    _write_images(noval, val=False)
    return {"teacher": run / "model.pt", "run": run, "images": images, "noval": noval, "root": root}


def _write_images(root: Path, val: bool, size=(48, 40)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)) if val else (("train", 4),):
        for c in range(2):
            os.makedirs(root / split / f"c{c}", exist_ok=True)
            for k in range(n):
                pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{k}.JPEG", quality=90)


@pytest.fixture(scope="session")
def store(shared, tmp_path_factory):
    from dhkd_pipe.config import CacheConfig
    from dhkd_pipe.stages.cache_teacher import cache_teacher

    out = tmp_path_factory.mktemp("faults-store") / "logits.zarr"
    cfg = CacheConfig(
        data="digits@100",
        model="resnet8",
        weights=str(shared["teacher"]),
        views=1,
        chunk_rows=64,
        batch_size=64,
        out=str(out),
    ).validate()
    cache_teacher(cfg, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """``LONG`` run uninterrupted (in this process): what every stopped and resumed run must equal."""
    out = tmp_path_factory.mktemp("faults-reference") / "run"
    code, _, err = invoke(shlex.split(LONG.format(out=out)))
    assert code == 0, err
    return out


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def _umount(path: Path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="session")
def tmpfs(tmp_path_factory):
    """A 6 MB tmpfs to fill up (disk-full cases); skipped where this user cannot mount one."""
    path = tmp_path_factory.mktemp("faults-tmpfs") / "disk"
    if not _mount(path, "size=6m"):
        pytest.skip("cannot mount a tmpfs here (needs root): disk-full cases skipped")
    yield path
    _umount(path)


@pytest.fixture(scope="session")
def readonly(tmp_path_factory, shared):
    """A read-only tmpfs holding a copy of a finished run (EROFS cases)."""
    path = tmp_path_factory.mktemp("faults-ro") / "ro"
    if not _mount(path, "size=4m"):
        pytest.skip("cannot mount a tmpfs here (needs root): read-only cases skipped")
    shutil.copytree(shared["run"], path / "run")
    proc = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True)
    if proc.returncode != 0:
        _umount(path)
        pytest.skip("cannot remount a tmpfs read-only here")
    yield path
    _umount(path)


# ---- the work folder of one case ----------------------------------------------------------------


@dataclass
class Work:
    """One case's folder and the shared fixtures; ``vars`` fill the command line."""

    tmp: Path
    shared: dict
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch
    cleanup: list = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.vars["out"]

    @property
    def vars(self) -> dict:
        v = {
            "out": self.tmp / "run",
            "run": self.tmp / "run",
            "tmp": self.tmp,
            "teacher": self.shared["teacher"],
            "images": self.shared["images"],
            "noval": self.shared["noval"],
            "file": self.tmp / "notes.txt",
        }
        v.update(getattr(self, "_extra", {}))
        return v

    def set(self, **kw):
        self._extra = {**getattr(self, "_extra", {}), **kw}

    def fixture(self, name):
        return self.request.getfixturevalue(name)

    def copy_run(self, to: Path | None = None) -> Path:
        to = to or self.out
        shutil.copytree(self.shared["run"], to)
        return to


def snapshot(path: Path) -> dict | None:
    """Everything under ``path``: relative name -> (size, bytes digest); None if absent."""
    if not os.path.lexists(path):
        return None
    if not path.is_dir():
        return {".": path.read_bytes()}
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = p.read_bytes()
        else:
            out[str(p.relative_to(path))] = "dir"
    return out


def assert_one_error_line(err: str, pattern: str, only_line: bool = True):
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert not CHATTER.search(err), err[-3000:]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    assert len(errors) == 1 and errors[0] == lines[-1], err[-3000:]
    if only_line:
        assert len(lines) == 1, err[-3000:]
    assert re.search(pattern, lines[-1]), f"{pattern!r} not in {lines[-1]!r}"


def assert_no_leftovers(root: Path):
    tmp = [p for p in root.rglob("*.tmp")]
    assert not tmp, f"half-written files left: {tmp}"


def read_metrics(run: Path) -> list[dict]:
    def refuse(token):
        raise AssertionError(f"metrics.jsonl holds {token}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- scene setters --------------------------------------------------------------------------------


def make_file(w: Work):
    w.vars["file"].write_text("the user's notes\n")


def make_user_folder(w: Work):
    w.out.mkdir()
    (w.out / "photo.jpg").write_bytes(b"not ours")
    (w.out / "sub").mkdir()
    (w.out / "sub" / "data.csv").write_text("1,2\n")


def make_finished_run(w: Work):
    w.copy_run()


def make_run_with_user_file(w: Work):
    w.copy_run()
    (w.out / "notes.txt").write_text("kept by --overwrite\n")


def make_empty_folder(w: Work):
    w.out.mkdir()


def checkpoint_file(w: Work, obj=None, raw: bytes | None = None):
    """A run folder of the tool's (its manifest claims the checkpoint) whose checkpoint is ``obj`` or ``raw``."""
    w.out.mkdir()
    (w.out / "dhkd-run.json").write_text(json.dumps({"tool": "dhkd-pipe", "entries": ["checkpoint.pt"]}))
    path = w.out / "checkpoint.pt"
    if raw is not None:
        path.write_bytes(raw)
    else:
        torch.save(obj, path)


class Payload:
    """Pickles to a call of os.system: a weights-only load must refuse it without running it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_checkpoint(w: Work):
    checkpoint_file(
        w,
        {
            "model": {},
            "optimizer": {},
            "epoch": 0,
            "step": 1,
            "config": {},
            "history": [],
            "x": Payload(w.tmp / "PWNED"),
        },
    )


def hostile_teacher(w: Work):
    path = w.tmp / "evil.pt"
    torch.save({"model": Payload(w.tmp / "PWNED")}, path)
    w.set(teacher=path)


def truncated_checkpoint(w: Work):
    data = (w.shared["run"] / "checkpoint.pt").read_bytes()
    checkpoint_file(w, raw=data[: len(data) // 2])


def teacher_variant(huge: bool = False, nan: bool = False):
    """The shared teacher with a NaN weight, or with finite weights whose logits overflow to inf."""

    def setup(w: Work):
        sd = torch.load(w.shared["teacher"], weights_only=True)["model"]
        key = "fc.weight"
        sd[key] = sd[key].clone()
        if nan:
            sd[key][0, 0] = float("nan")
        if huge:
            sd[key][0] = 3e38  # finite, but class 0's logit sums past float32's largest value
        path = w.tmp / "teacher-variant.pt"
        torch.save({"model": sd}, path)
        w.set(teacher=path)

    return setup


def plant_lock(holder: dict | None = None, raw: bytes | None = None, age: float = 0.0, checkpoint: bool = False):
    def setup(w: Work):
        if checkpoint:
            w.copy_run()
            (w.out / "summary.json").unlink()
        else:
            w.out.mkdir()
        lock = w.out / "run.lock"
        lock.write_bytes(raw if raw is not None else json.dumps(holder(w) if callable(holder) else holder).encode())
        if age:
            t = time.time() - age
            os.utime(lock, (t, t))

    return setup


def dead_pid(w: Work) -> dict:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return {"host": socket.gethostname(), "pid": proc.pid, "started": time.time() - 5, "command": "an old run"}


def zombie_pid(w: Work) -> dict:
    proc = subprocess.Popen(["true"])  # never waited for: a zombie until the test ends
    for _ in range(100):
        if open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.02)
    w.cleanup.append(proc.wait)
    return {"host": socket.gethostname(), "pid": proc.pid, "started": time.time() - 5, "command": "a killed run"}


def live_pid(w: Work) -> dict:
    proc = subprocess.Popen(["sleep", "60"])
    w.cleanup.append(lambda: (proc.kill(), proc.wait()))
    return {
        "host": socket.gethostname(),
        "pid": proc.pid,
        "started": time.time() - 1,
        "command": "dhkd-pipe distill ...",
    }


def other_host(w: Work) -> dict:
    return {"host": "elsewhere.example", "pid": 4242, "started": time.time() - 60, "command": "dhkd-pipe distill ..."}


def fill_disk(leave: int):
    """--out on the tmpfs, filled so that ``leave`` bytes stay free."""

    def setup(w: Work):
        disk = w.fixture("tmpfs")
        for p in disk.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        st = os.statvfs(disk)
        free = st.f_bavail * st.f_frsize
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - leave))
        w.set(out=disk / "run", disk=disk)

    return setup


def on_readonly(name: str):
    def setup(w: Work):
        w.set(out=w.fixture("readonly") / name)

    return setup


def fail_fsync_of(suffix: str, code: int = errno.ENOSPC, after: int = 0):
    """os.fsync fails with ``code`` for files whose name ends in ``suffix`` (a quota, an NFS server),
    from its ``after + 1``-th call on."""

    def setup(w: Work):
        real, calls = os.fsync, []

        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
                calls.append(fd)
                if len(calls) > after:
                    raise OSError(code, os.strerror(code))
            return real(fd)

        w.monkeypatch.setattr(os, "fsync", fsync)

    return setup


def fail_makedirs(code: int):
    def setup(w: Work):
        def makedirs(path, *a, **k):
            raise OSError(code, os.strerror(code), str(path))

        w.monkeypatch.setattr("dhkd_pipe.training.run_folder.os.makedirs", makedirs)

    return setup


def eacces(path: str):
    """A function failing as a forbidden file would, where no code of ours catches it (the CLI's net)."""

    def fail(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    return fail


def several(*setups):
    def setup(w: Work):
        for s in setups:
            s(w)

    return setup


def bad_config(text: str):
    def setup(w: Work):
        (w.tmp / "recipe.yaml").write_text(text)

    return setup


def truncated_jpeg_folder(w: Work):
    root = w.tmp / "jpegs"
    shutil.copytree(w.shared["images"], root)
    path = root / "train" / "c1" / "2.JPEG"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    w.set(images=root)


# ---- processes --------------------------------------------------------------------------------------


def start(args: str, w: Work) -> subprocess.Popen:
    """The CLI in its own process (same thread count as this one, so results compare bitwise)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    err = open(w.tmp / f"stderr-{len(list(w.tmp.glob('stderr-*')))}.txt", "w+")
    proc = subprocess.Popen(
        [BIN, *shlex.split(args.format(**w.vars))], stdout=subprocess.DEVNULL, stderr=err, text=True, env=env
    )
    proc.stderr_file = err
    w.cleanup.append(lambda: (proc.kill(), proc.wait()) if proc.poll() is None else None)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    code = proc.wait(timeout=timeout)
    proc.stderr_file.seek(0)
    return code, proc.stderr_file.read()


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 180, what: str = ""):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}: {finish(proc)[1][-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def holds_lock(w: Work, proc: subprocess.Popen) -> bool:
    try:
        return json.loads((w.out / "run.lock").read_text())["pid"] == proc.pid
    except (OSError, ValueError, KeyError):
        return False


# ---- procedures of the cases that stop processes ------------------------------------------------------


def same_as_reference(w: Work):
    """The run in --out ended exactly as the uninterrupted reference: weights and every epoch's
    train_loss (a resumed epoch continues its running loss from the checkpoint)."""
    ref = w.fixture("reference")
    a = torch.load(ref / "model.pt", weights_only=True)["model"]
    b = torch.load(w.out / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["train_loss"] for m in read_metrics(ref)] == [m["train_loss"] for m in read_metrics(w.out)]


def resume_then_same(w: Work):
    code, _, err = invoke(shlex.split(LONG.format(out=w.out)) + ["--resume"])
    assert code == 0, err
    same_as_reference(w)


def interrupt(sig: int):
    """``LONG`` stopped by ``sig`` once it has checkpointed: it saves where it is and exits."""

    def run(w: Work):
        proc = start(LONG, w)
        wait_for(lambda: (w.out / "checkpoint.pt").exists(), proc, what="the first checkpoint")
        proc.send_signal(sig)
        return finish(proc)

    return run


def kill_at_random_point(seed: int):
    """``LONG`` killed (SIGKILL) at a random moment, then run again (--resume when it had
    checkpointed): the end is the reference's. Returns the second command's outcome."""

    def run(w: Work):
        proc = start(LONG, w)
        wait_for(lambda: holds_lock(w, proc), proc, what="the run to start")
        time.sleep(random.Random(seed).uniform(0.0, 1.5))
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
        resume = ["--resume"] if (w.out / "checkpoint.pt").exists() else []
        code, _, err = invoke(shlex.split(LONG.format(out=w.out)) + resume)
        return code, err

    return run


def second_run_while_the_first_runs(w: Work):
    """A second train-teacher on the --out of a running one is refused; the first ends undisturbed."""
    proc = start(LONG.replace("--epochs 2", "--epochs 3"), w)
    wait_for(lambda: holds_lock(w, proc), proc, what="the first run's lock")
    code, _, err = invoke(shlex.split(LONG.format(out=w.out)) + ["--epochs", "3"])
    first, first_err = finish(proc)
    assert first == 0, first_err
    assert [m["epoch"] for m in read_metrics(w.out)] == [1, 2, 3]  # one writer, no interleaving
    assert str(proc.pid) in err
    return code, err


def kill_image_folder_run(w: Work):
    """SIGKILL of an image-folder distill with 2 DALI workers: the workers end within seconds,
    and the next start removes the dead run's shared-memory folder."""
    proc = start(IMAGES + " --epochs 500 --workers 2", w)
    wait_for(lambda: (w.out / "checkpoint.pt").exists(), proc, what="a finished epoch")
    kids = children(proc.pid)
    workers = [k for k in kids if "spawn_main" in open(f"/proc/{k}/cmdline").read()]
    assert len(workers) == 2, kids
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    folders = [os.path.join(shm, f) for f in os.listdir(shm) if f.startswith(f"dhkd-dali-{proc.pid}-")]
    assert folders
    proc.kill()
    proc.wait()
    wait_for(lambda: not any(running(k) for k in kids), timeout=5, what="the workers to end")
    assert all(os.path.exists(f) for f in folders)  # a SIGKILLed process cleans nothing up itself
    # the next start (a resume that only exports: --epochs 1 is behind it) removes the folder, and
    # the half-written checkpoint.pt.tmp the kill may have left
    code, _, err = invoke(shlex.split(IMAGES.format(**w.vars)) + ["--epochs", "1", "--workers", "0", "--resume"])
    assert code == 0, err
    assert not any(os.path.exists(f) for f in folders)
    return code, err


def resumed_epoch_same_train_loss(w: Work):
    """In this process: a run stopped mid-epoch (--max-steps) and resumed reports the train_loss
    of the uninterrupted run for that epoch, and ends with the same weights."""
    base = shlex.split(LONG.format(out=w.out))
    code, _, err = invoke(base + ["--max-steps", "13"])  # epoch 2, step 3
    assert code == 0, err
    state = torch.load(w.out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["tally"]["steps"]) == (1, 3, 3)
    code, _, err = invoke(base + ["--resume"])
    return code, err


# ---- checks afterwards ------------------------------------------------------------------------------


def payload_not_run(w: Work):
    assert not (w.tmp / "PWNED").exists()


def finished(w: Work):
    summary = json.loads((w.out / "summary.json").read_text())
    assert summary["epochs"] >= 1
    read_metrics(w.out)


def user_file_kept(w: Work):
    finished(w)
    assert (w.out / "notes.txt").read_text() == "kept by --overwrite\n"


def lock_untouched(w: Work):
    assert (w.out / "run.lock").exists()


def metrics_valid_with_null_val(w: Work):
    m = read_metrics(w.out)
    assert m and m[-1]["val_top1"] is None
    json.loads((w.out / "summary.json").read_text(), parse_constant=lambda t: pytest.fail(t))


def first_epoch_kept(w: Work):
    m = read_metrics(w.out)
    assert [row["epoch"] for row in m] == [1]
    state = torch.load(w.out / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert (state["epoch"], len(state["history"])) == (0, 1)


def disk_freed_then(resume: bool):
    def check(w: Work):
        (w.vars["disk"] / "filler").unlink()
        args = shlex.split(TRAIN.format(out=w.out)) + (["--resume"] if resume else [])
        code, _, err = invoke(args)
        assert code == 0, err
        finished(w)

    return check


def checkpoint_intact(w: Work):
    state = torch.load(w.out / "checkpoint.pt", weights_only=True)
    assert state["step"] >= 1
    disk_freed_then(resume=True)(w)


def metrics_not_partial(w: Work):
    """The failed append left no partial line; the resumed run writes epoch 2 after epoch 1."""
    assert [m["epoch"] for m in read_metrics(w.out)] == [1]
    w.monkeypatch.undo()
    code, _, err = invoke(shlex.split(TRAIN.format(out=w.out)) + ["--epochs", "2", "--resume"])
    assert code == 0, err
    assert [m["epoch"] for m in read_metrics(w.out)] == [1, 2]


# ---- the table --------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    args: str = ""  # the command line, with {out}, {teacher}, ... placeholders
    match: str = ""  # a regex the error line must match
    code: int = 2
    setup: Callable | None = None
    check: Callable | None = None  # what must hold afterwards (beyond the defaults)
    changes_out: bool = False  # a successful or partly successful case may change --out
    only_line: bool = True  # the error is the only stderr line (False: a run's own lines may precede it)
    run: Callable | None = None  # a custom procedure: (w) -> (code, stderr); replaces the CLI call
    sub: bool = False  # run the command line in its own process (native output, signals)
    slow: bool = False
    keep: Callable | None = None  # (w) -> more of the user's paths that must be byte-identical afterwards
    bound: float | None = None  # seconds the command may take


# ---- ownership, atomic exports and reports, values checked where they enter ----------------------------


def user_folder_with_metrics(w: Work):
    """The user's own folder that happens to hold a ``metrics.jsonl`` (a log of theirs)."""
    w.out.mkdir()
    (w.out / "metrics.jsonl").write_text("time,value\n1,2\n")
    (w.out / "photo.jpg").write_bytes(b"\xff\xd8 the user's photo")


def user_folder_with_lock_and_tool_named_folder(w: Work):
    """Another program's ``run.lock`` and a folder of notes named after the tool."""
    w.out.mkdir()
    (w.out / "run.lock").write_text("the lock of another program\n")
    (w.out / "dhkd-pipe").mkdir()
    (w.out / "dhkd-pipe" / "paper-notes.md").write_text("notes on the paper\n")


def users_onnx_in_a_run(w: Work):
    w.copy_run()
    (w.out / "model.onnx").write_bytes(b"the user's own onnx file")


def users_onnx_kept(w: Work):
    assert (w.out / "model.onnx").read_bytes() == b"the user's own onnx file"
    finished(w)


def killed_run_with_user_file(w: Work):
    """A run killed before its first checkpoint (its manifest and first metrics line), and a
    file the user put beside them."""
    w.out.mkdir()
    (w.out / "dhkd-run.json").write_text(json.dumps({"tool": "dhkd-pipe", "entries": ["metrics.jsonl"]}))
    (w.out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (w.out / "notes.txt").write_text("mine\n")


def notes_kept(w: Work):
    assert (w.out / "notes.txt").read_text() == "mine\n"
    finished(w)


def run_with_onnx(w: Work):
    """A finished run whose model.onnx the tool exported (claimed in its manifest)."""
    w.copy_run()
    code, _, err = invoke(["export", str(w.out)])
    assert code == 0, err


def failing_onnx_export(w: Work):
    run_with_onnx(w)

    def fail(model, args, f, **kw):
        Path(f).write_bytes(b"half an onnx file")
        raise OSError(errno.ENOSPC, "No space left on device")

    w.monkeypatch.setattr("torch.onnx.export", fail)


def report_exists(w: Work):
    w.copy_run()
    code, _, err = invoke(["report", str(w.out), "--out", str(w.tmp / "r.png")])
    assert code == 0, err


def failing_savefig(w: Work):
    report_exists(w)
    from matplotlib.figure import Figure

    def fail(self, f, **kw):
        f.write(b"half a png")
        raise OSError(errno.ENOSPC, "No space left on device")

    w.monkeypatch.setattr(Figure, "savefig", fail)


def sigterm_during_export(w: Work):
    proc = start(f"export {w.out}", w)
    wait_for(
        lambda: any(p.name.startswith(".export-") for p in w.out.iterdir()), proc, what="the export's staging folder"
    )
    proc.send_signal(signal.SIGTERM)
    return finish(proc)


def nan_weights(w: Work):
    sd = torch.load(w.shared["teacher"], weights_only=True)
    sd = {k: v.clone() for k, v in sd.get("model", sd).items()}
    sd["fc.weight"][:] = float("nan")
    torch.save({"model": sd}, w.tmp / "nan.pt")


def raises(target: str, exc: BaseException):
    def setup(w: Work):
        def fail(*a, **k):
            raise exc

        w.monkeypatch.setattr(target, fail)

    return setup


def file_of(name: str):
    return lambda w: [w.tmp / name]


BILLION_LAUGHS = (
    "lr_milestones:\n  - &a ["
    + ",".join(["x"] * 10)
    + "]\n"
    + "".join(f"  - &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8))
)
RECIPE = TRAIN + " --config {tmp}/recipe.yaml"
IMG = "train-teacher --model resnet18 --data imagefolder:{images} --workers 0 --epochs 1 --batch-size 2 --out {out}"
REFUSED = dict(bound=60)


def recipe(text: str | bytes):
    data = text if isinstance(text, bytes) else text.encode()
    return lambda w: (w.tmp / "recipe.yaml").write_bytes(data)


RECIPE_KEPT = dict(bound=60, keep=file_of("recipe.yaml"))
OWNERSHIP_AND_VALUE_CASES = [
    # ownership: a folder is a run only by what the tool recorded; --overwrite removes only that
    Case(
        "own-user-folder-with-metrics-is-no-run",
        TRAIN,
        "holds no run of dhkd-pipe .*such as",
        setup=user_folder_with_metrics,
        **REFUSED,
    ),
    Case(
        "own-user-folder-with-metrics-overwrite",
        TRAIN + " --overwrite",
        "holds no run of dhkd-pipe",
        setup=user_folder_with_metrics,
        **REFUSED,
    ),
    Case(
        "own-foreign-lock-and-tool-named-folder",
        TRAIN,
        "holds no run of dhkd-pipe",
        setup=user_folder_with_lock_and_tool_named_folder,
        check=lock_untouched,
        **REFUSED,
    ),
    Case(
        "own-users-onnx-kept-by-overwrite",
        TRAIN + " --overwrite",
        code=0,
        setup=users_onnx_in_a_run,
        check=users_onnx_kept,
        changes_out=True,
        bound=120,
    ),
    Case(
        "own-killed-run-cleared-user-file-kept",
        TRAIN,
        code=0,
        setup=killed_run_with_user_file,
        check=notes_kept,
        changes_out=True,
        bound=120,
    ),
    Case(
        "own-overwrite-refuses-its-teacher-inside",
        ONLINE.replace("{teacher}", "{out}/model.pt") + " --overwrite",
        "--teacher-weights \\S+/model.pt lies inside what --overwrite would remove",
        setup=make_finished_run,
        **REFUSED,
    ),
    Case(
        "own-overwrite-refuses-its-safetensors-inside",
        ONLINE.replace("{teacher}", "{out}/model.safetensors") + " --overwrite",
        "lies inside what --overwrite would remove .*model.safetensors",
        setup=make_finished_run,
        **REFUSED,
    ),
    # export and report: never over the run's own files, a folder, or a format they cannot write; written whole
    Case(
        "export-over-the-runs-checkpoint",
        "export {run} --out {run}/checkpoint.pt",
        "is the run's own checkpoint.pt",
        setup=make_finished_run,
        **REFUSED,
    ),
    Case(
        "export-over-the-runs-metrics",
        "export {run} --out {run}/metrics.jsonl",
        "is the run's own metrics.jsonl",
        setup=make_finished_run,
        **REFUSED,
    ),
    Case(
        "export-over-the-runs-manifest",
        "export {run} --out {run}/dhkd-run.json",
        "is the run's own dhkd-run.json",
        setup=make_finished_run,
        **REFUSED,
    ),
    Case(
        "export-to-a-text-file",
        "export {run} --out {tmp}/m.txt",
        "export writes ONNX; name a file ending in .onnx",
        setup=make_finished_run,
        **REFUSED,
    ),
    Case(
        "export-over-a-users-onnx",
        "export {run}",
        "model.onnx was not written by dhkd-pipe",
        setup=users_onnx_in_a_run,
        **REFUSED,
    ),
    Case(
        "export-opset-too-high",
        "export {run} --opset 999",
        "bad --opset 999: this exporter writes opsets \\d+ to \\d+",
        setup=make_finished_run,
        **REFUSED,
    ),
    Case("export-opset-too-low", "export {run} --opset 1", "bad --opset 1", setup=make_finished_run, **REFUSED),
    Case(
        "export-failure-keeps-the-previous-onnx",
        "export {run}",
        "cannot write .*model.onnx: No space left on device",
        setup=failing_onnx_export,
        **REFUSED,
    ),
    Case(
        "export-sigterm-keeps-the-previous-onnx",
        "",
        "interrupted by SIGTERM",
        code=143,
        setup=run_with_onnx,
        run=sigterm_during_export,
        slow=True,
        bound=180,
    ),
    Case(
        "report-over-the-runs-summary",
        "report {run} --out {run}/summary.json",
        "is the run's own summary.json",
        setup=make_finished_run,
        **REFUSED,
    ),
    Case(
        "report-over-the-runs-checkpoint",
        "report {run} --out {run}/checkpoint.pt",
        "is the run's own checkpoint.pt",
        setup=make_finished_run,
        **REFUSED,
    ),
    Case(
        "report-to-a-folder",
        "report {run} --out {tmp}",
        "is a folder; name the image file",
        setup=make_finished_run,
        **REFUSED,
    ),
    Case(
        "report-to-a-text-file",
        "report {run} --out {tmp}/r.txt",
        "report writes images",
        setup=make_finished_run,
        **REFUSED,
    ),
    Case(
        "report-failure-keeps-the-previous-png",
        "report {run} --out {tmp}/r.png",
        "cannot write .*r.png: No space left on device",
        setup=failing_savefig,
        keep=file_of("r.png"),
        **REFUSED,
    ),
    # every option checked where it enters: ranges and finiteness, before any work
    Case("seed-negative", TRAIN + " --seed -1", "bad --seed -1: must be at least 0", **REFUSED),
    Case(
        "seed-beyond-64-bits",
        TRAIN + " --seed 99999999999999999999999",
        "bad --seed 99999999999999999999999: must be at most",
        **REFUSED,
    ),
    Case("lr-nan", TRAIN + " --lr nan", "bad --lr nan: must be a finite number", **REFUSED),
    Case(
        "lr-inf-from-a-recipe",
        RECIPE,
        "bad --lr inf: must be a finite number",
        setup=recipe("lr: .inf\n"),
        **RECIPE_KEPT,
    ),
    Case("momentum-negative", TRAIN + " --momentum -1", "bad --momentum -1: must be at least 0", **REFUSED),
    Case("weight-decay-nan", TRAIN + " --weight-decay nan", "bad --weight-decay nan", **REFUSED),
    Case("lr-decay-negative", TRAIN + " --lr-decay -1", "bad --lr-decay -1: must be greater than 0", **REFUSED),
    Case(
        "lr-milestones-negative",
        TRAIN + " --lr-milestones 0,-5",
        "bad --lr-milestones 0: must be at least 1",
        **REFUSED,
    ),
    Case("alpha-infinite", ONLINE + " --method kd --alpha inf", "bad --alpha inf: must be a finite number", **REFUSED),
    Case("temperature-nan", ONLINE + " --method kd --temperature nan", "bad --temperature nan", **REFUSED),
    Case(
        "temperature-tiny",
        ONLINE + " --method kd --temperature 1e-30",
        "bad --temperature 1e-30: must be at least 0.0001",
        **REFUSED,
    ),
    Case(
        "alpha-overflows-float32",
        ONLINE + " --method dhkd --alpha 1e39",
        "bad --alpha 1e\\+39: must be at most",
        **REFUSED,
    ),
    Case(
        "eval-batch-size-zero",
        "eval --model resnet8 --weights {teacher} --data digits --batch-size 0",
        "bad --batch-size 0",
        **REFUSED,
    ),
    Case(
        "eval-nan-weights",
        "eval --model resnet8 --weights {tmp}/nan.pt --data digits",
        "the weights in .*nan.pt are not finite",
        setup=nan_weights,
        keep=file_of("nan.pt"),
        bound=60,
    ),
    Case("absurd-resolution", IMG + " --resolution 100000", "bad --resolution 100000: must be at most 8192", **REFUSED),
    # recipes: UTF-8, bounded size, aliases and nesting
    Case(
        "config-not-utf8",
        RECIPE,
        "recipe.yaml is not UTF-8 text \\(byte 0xe9 at offset \\d+\\)",
        setup=recipe("# r\xe9glages\nepochs: 1\n".encode("latin-1")),
        **RECIPE_KEPT,
    ),
    Case(
        "config-billion-laughs",
        RECIPE,
        "expands \\(through YAML aliases\\) to more than 100000 values",
        setup=recipe(BILLION_LAUGHS),
        **RECIPE_KEPT,
    ),
    Case(
        "config-nested-deep",
        RECIPE,
        "cannot parse config .*nested deeper than 64 levels",
        setup=recipe("lr_milestones: " + "[" * 5000 + "]" * 5000 + "\n"),
        **RECIPE_KEPT,
    ),
    Case(
        "config-alias-to-itself",
        RECIPE,
        "an alias refers to itself",
        setup=recipe("lr_milestones: &a [1, *a]\n"),
        **RECIPE_KEPT,
    ),
    Case(
        "config-larger-than-a-megabyte",
        RECIPE,
        "larger than 1 MiB",
        setup=recipe("# " + "x" * (2 << 20) + "\nepochs: 1\n"),
        **RECIPE_KEPT,
    ),
    Case(
        "config-python-tag-not-run",
        RECIPE,
        "cannot parse config",
        setup=recipe("epochs: !!python/object/apply:os.system ['true']\n"),
        **RECIPE_KEPT,
    ),
    # memory and recursion failures: one line naming what to change
    Case(
        "out-of-memory-names-the-options",
        TRAIN,
        "out of memory; lower --batch-size \\(now 32\\)",
        setup=raises("dhkd_pipe.models.create_model", MemoryError()),
        **REFUSED,
    ),
    Case(
        "cpu-allocator-failure-names-the-options",
        TRAIN,
        "out of memory \\(.*can't allocate memory.*\\); lower --batch-size",
        setup=raises(
            "dhkd_pipe.models.create_model",
            RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
        ),
        **REFUSED,
    ),
    Case(
        "recursion-is-one-line",
        TRAIN,
        "nests too deep to be read \\(RecursionError\\)",
        setup=raises("dhkd_pipe.data.datasets.load_data", RecursionError()),
        **REFUSED,
    ),
]


# ---- a folder or file is the tool's only by what it recorded: nothing of the user's is replaced ----------


def plain_torch_folder(w: Work):
    """A plain PyTorch training folder of the user's: checkpoint, model and metrics, no manifest."""
    w.out.mkdir()
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, w.out / "checkpoint.pt")
    torch.save({"w": torch.ones(2)}, w.out / "model.pt")
    (w.out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n')


def users_summary_with_config(w: Work):
    """The user's folder whose summary.json happens to record a config (another tool's)."""
    w.out.mkdir()
    (w.out / "summary.json").write_text(json.dumps({"config": {"lr": 0.1}, "accuracy": 0.9}))
    (w.out / "notes.txt").write_text("mine\n")


def other_tools_manifest(w: Work):
    """A manifest-named file another program wrote, beside a checkpoint of the user's."""
    plain_torch_folder(w)
    (w.out / "dhkd-run.json").write_text(json.dumps({"tool": "other", "entries": ["checkpoint.pt", "model.pt"]}))


def killed_run_and_users(name: str):
    """A run killed before its first checkpoint (its manifest claims only metrics.jsonl), and a file
    of the user's named as a run's file would be, which the run must not write over."""

    def setup(w: Work):
        w.out.mkdir()
        (w.out / "dhkd-run.json").write_text(json.dumps({"tool": "dhkd-pipe", "entries": ["metrics.jsonl"]}))
        (w.out / "metrics.jsonl").write_text('{"epoch": 1}\n')
        if name == "checkpoint.pt":
            torch.save({"model": {}, "epoch": 0}, w.out / name)
        else:
            (w.out / name).write_bytes(b"the user's own " + name.encode())

    return setup


def store_as_out(w: Work):
    w.set(out=w.fixture("store"))


def users_file(name: str, data: bytes = b"\x89PNG\r\n\x1a\n the user's picture"):
    def setup(w: Work):
        w.copy_run(w.tmp / "run")
        (w.tmp / name).write_bytes(data)

    return setup


def users_file_behind_a_link(name: str, link: str):
    def setup(w: Work):
        users_file(name)(w)
        os.symlink(w.tmp / name, w.tmp / link)

    return setup


def users_onnx_in_another_run(w: Work):
    """A second run folder of the tool's whose model.onnx is the user's (its manifest does not list it)."""
    w.copy_run(w.tmp / "run")
    other = w.copy_run(w.tmp / "other")
    (other / "model.onnx").write_bytes(b"the user's own onnx file")


def exported_there(name: str):
    def setup(w: Work):
        w.copy_run(w.tmp / "run")
        code, _, err = invoke(["export", str(w.tmp / "run"), "--out", str(w.tmp / name)])
        assert code == 0, err

    return setup


def reported_there(name: str):
    def setup(w: Work):
        w.copy_run(w.tmp / "run")
        code, _, err = invoke(["report", str(w.tmp / "run"), "--out", str(w.tmp / name)])
        assert code == 0, err

    return setup


def replaced(name: str):
    def check(w: Work):
        assert (w.tmp / name).stat().st_size > 1000, "the tool's own earlier output was not replaced"

    return check


def files_of(*names: str):
    return lambda w: [w.tmp / n for n in names]


def users_notes_in_the_trackers_folder(w: Work):
    """A finished run (its manifest claims the trackers' folder, which no tracker wrote) where the
    user later keeps notes in a folder of that name, beside a TensorBoard file of the run's."""
    w.copy_run()
    (w.out / "dhkd-pipe" / "plots").mkdir(parents=True)
    (w.out / "dhkd-pipe" / "plots" / "notes.md").write_text("mine\n")
    (w.out / "dhkd-pipe" / "events.out.tfevents.1.host").write_bytes(b"the run's")


def users_notes_kept_tracker_file_gone(w: Work):
    finished(w)
    assert (w.out / "dhkd-pipe" / "plots" / "notes.md").read_text() == "mine\n"
    assert not (w.out / "dhkd-pipe" / "events.out.tfevents.1.host").exists()


def out_links_to_a_plain_torch_folder(w: Work):
    plain_torch_folder(w)
    w.out.rename(w.tmp / "mine")
    os.symlink(w.tmp / "mine", w.out)


def users_folder_named_like_a_quickstart(parts: dict):
    """The user's folder whose entries happen to bear a quickstart's names (``parts``: name -> bytes,
    or None for a folder of photos)."""

    def setup(w: Work):
        w.out.mkdir()
        for name, data in parts.items():
            if data is None:
                (w.out / name).mkdir()
                (w.out / name / "photo.jpg").write_bytes(b"\xff\xd8 the user's photo")
            else:
                (w.out / name).write_bytes(data)

    return setup


NO_RUN = "holds no run of dhkd-pipe"
NOT_OURS = "was not written by dhkd-pipe"
OWNERSHIP_CASES = [
    Case("own-plain-torch-folder-overwrite", TRAIN + " --overwrite", NO_RUN, setup=plain_torch_folder, **REFUSED),
    Case("own-plain-torch-folder", TRAIN, NO_RUN, setup=plain_torch_folder, **REFUSED),
    Case("own-plain-torch-folder-resume", TRAIN + " --resume", NO_RUN, setup=plain_torch_folder, **REFUSED),
    Case(
        "own-users-summary-with-config-overwrite",
        TRAIN + " --overwrite",
        NO_RUN,
        setup=users_summary_with_config,
        **REFUSED,
    ),
    Case("own-other-tools-manifest-overwrite", TRAIN + " --overwrite", NO_RUN, setup=other_tools_manifest, **REFUSED),
    Case("own-store-as-out-overwrite", TRAIN + " --overwrite", NO_RUN, setup=store_as_out, **REFUSED),
    Case(
        "own-users-notes-in-the-trackers-folder-overwrite",
        TRAIN + " --overwrite",
        code=0,
        setup=users_notes_in_the_trackers_folder,
        check=users_notes_kept_tracker_file_gone,
        changes_out=True,
        bound=120,
    ),
    Case(
        "own-out-links-to-a-plain-torch-folder-overwrite",
        TRAIN + " --overwrite",
        NO_RUN,
        setup=out_links_to_a_plain_torch_folder,
        keep=lambda w: [w.tmp / "mine"],
        **REFUSED,
    ),
    Case(
        "quickstart-overwrite-a-users-teacher-folder-and-picture",
        "quickstart --out {out} --overwrite",
        "was not written by dhkd-pipe",
        setup=users_folder_named_like_a_quickstart({"teacher": None, "report.png": b"\x89PNG the user's"}),
        **REFUSED,
    ),
    Case(
        "quickstart-overwrite-a-users-store-named-folder",
        "quickstart --out {out} --overwrite",
        "was not written by dhkd-pipe",
        setup=users_folder_named_like_a_quickstart({"logits.zarr": None}),
        **REFUSED,
    ),
    Case(
        "own-users-model-beside-a-killed-run",
        TRAIN,
        "holds model.pt, which dhkd-pipe did not write",
        setup=killed_run_and_users("model.pt"),
        **REFUSED,
    ),
    Case(
        "own-users-safetensors-beside-a-killed-run-overwrite",
        TRAIN + " --overwrite",
        "holds model.safetensors, which dhkd-pipe did not write",
        setup=killed_run_and_users("model.safetensors"),
        **REFUSED,
    ),
    Case(
        "own-users-checkpoint-beside-a-killed-run-resume",
        TRAIN + " --resume",
        "holds checkpoint.pt, which dhkd-pipe did not write",
        setup=killed_run_and_users("checkpoint.pt"),
        **REFUSED,
    ),
    Case(
        "report-over-a-users-image",
        "report {run} --out {tmp}/photo.png",
        NOT_OURS,
        setup=users_file("photo.png"),
        keep=files_of("photo.png"),
        **REFUSED,
    ),
    Case(
        "report-over-a-users-pdf",
        "report {run} --out {tmp}/paper.pdf",
        NOT_OURS,
        setup=users_file("paper.pdf", b"%PDF-1.4 the user's paper"),
        keep=files_of("paper.pdf"),
        **REFUSED,
    ),
    Case(
        "report-through-a-link-to-a-users-image",
        "report {run} --out {tmp}/link.png",
        NOT_OURS,
        setup=users_file_behind_a_link("photo.png", "link.png"),
        keep=files_of("photo.png", "link.png"),
        **REFUSED,
    ),
    Case(
        "report-replaces-its-own-image",
        "report {run} --out {tmp}/r.png",
        code=0,
        setup=reported_there("r.png"),
        check=replaced("r.png"),
        bound=120,
    ),
    Case(
        "export-over-a-users-onnx-named-by-out",
        "export {run} --out {tmp}/mine.onnx",
        NOT_OURS,
        setup=users_file("mine.onnx", b"\x08\x07\x12\x07the user's own onnx"),
        keep=files_of("mine.onnx"),
        **REFUSED,
    ),
    Case(
        "export-through-a-link-to-a-users-onnx",
        "export {run} --out {tmp}/link.onnx",
        NOT_OURS,
        setup=users_file_behind_a_link("mine.onnx", "link.onnx"),
        keep=files_of("mine.onnx", "link.onnx"),
        **REFUSED,
    ),
    Case(
        "export-over-a-users-onnx-in-another-run",
        "export {run} --out {tmp}/other/model.onnx",
        NOT_OURS,
        setup=users_onnx_in_another_run,
        keep=lambda w: [w.tmp / "other"],
        **REFUSED,
    ),
    Case(
        "export-replaces-its-own-onnx",
        "export {run} --out {tmp}/m.onnx",
        code=0,
        setup=exported_there("m.onnx"),
        check=replaced("m.onnx"),
        bound=180,
    ),
]


# ---- files and values read back: run files, checkpoints and recipes that are not what the tool wrote ----

REPORT = "report {run} --out {tmp}/r.png"
RECIPE = "train-teacher --config {tmp}/recipe.yaml --out {out}"
RECIPE_BASE = "data: digits@100\nmodel: resnet8\nbatch_size: 32\n"


def run_file(name: str, data):
    """A finished run whose ``name`` holds ``data`` (bytes, text, or a function of the path) instead
    of what the tool wrote."""

    def setup(w: Work):
        w.copy_run()
        path = w.out / name
        if callable(data):
            data(path)
        else:
            path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def sparse_file(size: int):
    def write(path: Path):
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)

    return write


def no_report(w: Work):
    assert not (w.tmp / "r.png").exists(), "a report was written from a damaged run"


def tampered_checkpoint(change: Callable):
    """A stopped run (no summary) whose checkpoint is the tool's own with ``change`` applied."""

    def setup(w: Work):
        w.copy_run()
        (w.out / "summary.json").unlink()
        state = torch.load(w.out / "checkpoint.pt", weights_only=True)
        change(state)
        torch.save(state, w.out / "checkpoint.pt")

    return setup


def _mid_epoch_tally_without_seen(state: dict):
    state["step"] = 1
    state["tally"] = {"term_sums": torch.zeros(2), "steps": 1, "elapsed": 0.5}


READ_BACK_CASES = [
    Case(
        "report-metrics-line-a-json-list",
        REPORT,
        "corrupt metrics in .*: metrics.jsonl line 2 is a JSON list, not a JSON object",
        setup=run_file("metrics.jsonl", '{"epoch": 1, "train_loss": 1.0}\n[1, 2]\n'),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-line-without-epoch",
        REPORT,
        "metrics.jsonl line 1: epoch is missing or null, not an epoch number",
        setup=run_file("metrics.jsonl", '{"train_loss": 1.0, "val_top1": 50.0}\n'),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-not-utf8",
        REPORT,
        "metrics.jsonl is not UTF-8 text \\(byte 0xff at offset 10\\)",
        setup=run_file("metrics.jsonl", b'{"epoch": \xff1}\n'),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-huge",
        REPORT,
        "metrics.jsonl is larger than 64 MiB: not a file this tool wrote",
        setup=run_file("metrics.jsonl", sparse_file((64 << 20) + 1)),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-nan-as-text",
        REPORT,
        'metrics.jsonl line 1: val_top1 is "NaN", not a number',
        setup=run_file("metrics.jsonl", '{"epoch": 1, "train_loss": 1.0, "val_top1": "NaN"}\n'),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-nan-token",
        REPORT,
        "metrics.jsonl line 1: NaN is not JSON",
        setup=run_file("metrics.jsonl", '{"epoch": 1, "train_loss": NaN}\n'),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-overflowing-number",
        REPORT,
        "metrics.jsonl line 1: train_loss is inf, not a finite number",
        setup=run_file("metrics.jsonl", '{"epoch": 1, "train_loss": 1e400}\n'),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-null-line",
        REPORT,
        "metrics.jsonl line 1 is missing or null, not a JSON object",
        setup=run_file("metrics.jsonl", "null\n"),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-epoch-as-text",
        REPORT,
        'metrics.jsonl line 1: epoch is "1", not an epoch number',
        setup=run_file("metrics.jsonl", '{"epoch": "1", "train_loss": 1.0}\n'),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-epoch-a-bool",
        REPORT,
        "metrics.jsonl line 1: epoch is true, not an epoch number",
        setup=run_file("metrics.jsonl", '{"epoch": true, "train_loss": 1.0}\n'),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-without-train-loss",
        REPORT,
        "metrics.jsonl line 1: no train_loss",
        setup=run_file("metrics.jsonl", '{"epoch": 1, "val_top1": 50.0}\n'),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-term-an-object",
        REPORT,
        "metrics.jsonl line 1: train_kd is a JSON object, not a number",
        setup=run_file("metrics.jsonl", '{"epoch": 1, "train_loss": 1.0, "train_kd": {"x": 1}}\n'),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-metrics-nested-deep",
        REPORT,
        "metrics.jsonl line 1: nested too deep",
        setup=run_file("metrics.jsonl", "[" * 200_000 + "]" * 200_000 + "\n"),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-summary-a-list",
        REPORT,
        "corrupt summary in .*: summary.json is a JSON list, not a JSON object",
        setup=run_file("summary.json", "[1, 2, 3]"),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-summary-speed-as-text",
        REPORT,
        'summary.json: images_per_sec is "fast", not a number',
        setup=run_file("summary.json", '{"model": "resnet8", "images_per_sec": "fast"}'),
        check=no_report,
        bound=20,
    ),
    Case(
        "report-summary-not-utf8",
        REPORT,
        "summary.json is not UTF-8 text",
        setup=run_file("summary.json", b'{"model": "r\xe9snet"}'),
        check=no_report,
        bound=20,
    ),
    Case(
        "resume-checkpoint-without-generators",
        TRAIN + " --resume",
        "checkpoint.pt is damaged: its random generators' states are missing or not byte tensors",
        setup=tampered_checkpoint(lambda s: s.pop("rng")),
        bound=30,
    ),
    Case(
        "resume-checkpoint-generator-of-another-size",
        TRAIN + " --resume",
        "checkpoint.pt is damaged: its random generators' states",
        setup=tampered_checkpoint(lambda s: s.update(rng=[{"cpu": torch.zeros(7, dtype=torch.uint8)}])),
        bound=30,
    ),
    Case(
        "resume-checkpoint-history-not-metrics",
        TRAIN + " --resume",
        "checkpoint.pt is damaged: history entry 1 is not an epoch's metrics",
        setup=tampered_checkpoint(lambda s: s.update(history=[1, 2])),
        bound=30,
    ),
    Case(
        "resume-checkpoint-history-holds-a-tensor",
        TRAIN + " --resume",
        "checkpoint.pt is damaged: history entry 1 holds 'train_loss': Tensor, not a number",
        setup=tampered_checkpoint(lambda s: s["history"][0].update(train_loss=torch.ones(2))),
        bound=30,
    ),
    Case(
        "resume-checkpoint-tally-without-image-count",
        TRAIN + " --resume",
        "checkpoint.pt is damaged: the stopped epoch's step, image and time counts are not counts",
        setup=tampered_checkpoint(_mid_epoch_tally_without_seen),
        bound=30,
    ),
    Case(
        "resume-checkpoint-skipped-count-as-text",
        TRAIN + " --resume",
        "checkpoint.pt is damaged: skipped_nonfinite is 'many', not a count",
        setup=tampered_checkpoint(lambda s: s.update(skipped_nonfinite="many")),
        bound=30,
    ),
    Case(
        "resume-checkpoint-negative-epoch",
        TRAIN + " --resume",
        "checkpoint.pt is damaged: epoch -3, step 0 are not a position in a run",
        setup=tampered_checkpoint(lambda s: s.update(epoch=-3, step=0)),
        bound=30,
    ),
    Case(
        "config-true-for-an-integer",
        RECIPE,
        "bad value for epochs: True; give an integer",
        setup=bad_config(RECIPE_BASE + "epochs: true\n"),
        bound=10,
    ),
    Case(
        "config-null-seed",
        RECIPE,
        "bad value for seed: null; give an integer, or leave seed out for its default",
        setup=bad_config(RECIPE_BASE + "seed: null\n"),
        bound=10,
    ),
    Case(
        "config-lr-past-float32",
        RECIPE,
        "bad --lr 1e\\+308: the learning rate must stay at most 3.403e\\+38",
        setup=bad_config(RECIPE_BASE + "lr: 1.0e308\n"),
        bound=10,
    ),
    Case(
        "config-weight-decay-past-float32",
        RECIPE,
        "bad --weight-decay 1e\\+308: must be at most 3.403e\\+38",
        setup=bad_config(RECIPE_BASE + "weight_decay: 1.0e308\n"),
        bound=10,
    ),
    Case(
        "config-cli-lr-past-float32",
        TRAIN + " --lr 1e308",
        "bad --lr 1e\\+308: the learning rate must stay at most",
        bound=10,
    ),
]


# ---- several students from one store: every name and seed checked before anything is created ------------


def with_store(w: Work):
    w.set(store=w.fixture("store"))


def store_copy_as_out(w: Work):
    shutil.copytree(w.fixture("store"), w.tmp / "s.zarr")
    w.set(out=w.tmp / "s.zarr", store=w.tmp / "s.zarr")


def no_out(w: Work):
    assert not os.path.lexists(w.out), f"{w.out} was created"


def no_run_in_store(w: Work):
    assert not os.path.lexists(w.tmp / "s.zarr" / "run"), "a run folder was made inside the store"


SEVERAL = "distill --student {students} --cache {store} --epochs 1 --batch-size 64 --out {out}"
SEVERAL_STUDENTS_CASES = [
    Case(
        "students-one-unknown-no-folder",
        SEVERAL.replace("{students}", "resnet8,nosuch,resnet14"),
        r"unknown model 'nosuch'",
        setup=with_store,
        check=no_out,
        bound=30,
    ),
    Case(
        "students-seed-out-of-range-no-folder",
        SEVERAL.replace("{students}", "resnet8,resnet14") + " --seeds 0,-1",
        r"bad --seed -1: must be at least 0",
        setup=with_store,
        check=no_out,
        bound=30,
    ),
    Case(
        "students-out-is-the-cache",
        SEVERAL.replace("{students}", "resnet8,resnet14"),
        r"--out \S+/s.zarr/resnet8 lies inside the folder of --cache \(\S+/s.zarr\): a run folder there would become "
        r"part of the store; write it elsewhere",
        setup=store_copy_as_out,
        bound=30,
    ),
    Case(
        "run-folder-inside-the-store",
        "distill --student resnet8 --cache {store} --epochs 1 --batch-size 64 --out {store}/run",
        r"--out \S+/s.zarr/run lies inside the folder of --cache",
        setup=store_copy_as_out,
        check=no_run_in_store,
        bound=30,
    ),
]

# ---- corrupt images: refused by every command that decodes them, or left out by --skip-corrupt ----

STAGE1_IMAGES = (
    "cache-teacher --model resnet8 --weights {teacher2} --data imagefolder:{images} --resolution 32 --views 2 "
    "--batch-size 4 --chunk-rows 4 --workers 1 --out {tmp}/logits.zarr"
)
DAMAGED = "c1.1\\.JPEG"  # the file damage_images damages


def damage_images(kind: str = "noise", store_first: bool = False, at: float = 0.5):
    """A copy of the JPEG folder with one training image's entropy data damaged (``kind``, ``at``
    of the way through it), a two-class teacher for it, and, with ``store_first``, a store written
    before the damage. Stage 2 decodes only each view's region, and libjpeg stops after the
    region's last row: damage near the start reaches every view."""

    def setup(w: Work):
        from conftest import damage_jpeg_entropy

        root = w.tmp / "jpegs"
        shutil.copytree(w.shared["images"], root)
        torch.manual_seed(0)
        torch.save({"model": create_model("resnet8", 2).state_dict()}, w.tmp / "teacher2.pt")
        w.set(images=root, teacher2=w.tmp / "teacher2.pt")
        if store_first:
            code, _, err = invoke(shlex.split(STAGE1_IMAGES.format(**w.vars)))
            assert code == 0, err
        damage_jpeg_entropy(root / "train" / "c1" / "1.JPEG", kind, at)

    return setup


def the_images(w: Work) -> list:
    return [w.vars["images"]]


def skipped_and_replayed(w: Work):
    """The store records the damaged file as left out, and stage 2 trains on the others."""
    import zarr

    attrs = zarr.open_group(str(w.tmp / "logits.zarr"), mode="r").attrs.asdict()
    assert attrs["dataset"]["skipped"] == ["train/c1/1.JPEG"] and attrs["dataset"]["num_samples"] == 7
    code, _, err = invoke(
        shlex.split(f"distill --cache {w.tmp}/logits.zarr --student resnet8 --method kd --epochs 1 --batch-size 4")
        + ["--workers", "1", "--out", str(w.tmp / "student")]
    )
    assert code == 0, err
    assert json.loads((w.tmp / "student" / "summary.json").read_text())["epochs"] == 1


def tampered_skip_record(w: Work):
    damage_images("noise")(w)
    code, _, err = invoke(shlex.split(STAGE1_IMAGES.format(**w.vars)) + ["--skip-corrupt"])
    assert code == 0, err
    import zarr

    group = zarr.open_group(str(w.tmp / "logits.zarr"), mode="r+")
    group.attrs["dataset"] = {**group.attrs["dataset"], "skipped": "train/c1/1.JPEG"}


def damaged_png(w: Work):
    """The folder with one training image a PNG whose compressed pixels are damaged."""
    from PIL import Image

    damage_images("noise", at=0.9)(w)  # the teacher and the copy; the PNG replaces the damaged JPEG
    jpeg = w.vars["images"] / "train" / "c1" / "1.JPEG"
    png = jpeg.with_suffix(".png")
    Image.open(w.vars["images"] / "train" / "c1" / "2.JPEG").save(png)
    jpeg.unlink()
    data = bytearray(png.read_bytes())
    at = data.index(b"IDAT") + 28
    data[at : at + 16] = bytes(16)
    png.write_bytes(bytes(data))


def without_libpng_lines(w: Work):
    """Stage 1 in its own process: libpng writes its lines to fd 2, which only a process shows."""
    code, err = finish(start(STAGE1_IMAGES, w))
    assert "libpng" not in err, err[-2000:]
    return code, err


def without_decoder_lines(w: Work):
    """Stage 1 in its own process: libjpeg's warnings reach only fd 2."""
    code, err = finish(start(STAGE1_IMAGES, w))
    assert not [line for line in err.splitlines() if line.startswith("Corrupt JPEG")], err[-2000:]
    return code, err


CORRUPT_IMAGE_CASES = [
    Case(
        "cache-teacher-refuses-damaged-jpeg-without-decoder-lines",
        "",
        f"cannot decode image .*{DAMAGED}: the JPEG decoder reports 'Corrupt JPEG data",
        setup=damage_images("noise"),
        run=without_decoder_lines,
        only_line=False,
        keep=the_images,
        slow=True,
    ),
    Case(
        "cache-teacher-refuses-a-damaged-png-without-libpng-lines",
        "",
        "cannot decode image .*c1.1\\.png: OSError: broken data stream",
        setup=damaged_png,
        run=without_libpng_lines,
        only_line=False,
        keep=the_images,
        slow=True,
    ),
    Case(
        "cache-teacher-refuses-damaged-entropy-data",
        STAGE1_IMAGES,
        f"cannot decode image .*{DAMAGED}: the JPEG decoder reports 'Corrupt JPEG data.*--skip-corrupt",
        setup=damage_images("noise"),
        only_line=False,
        keep=the_images,
        bound=90,
    ),
    Case(
        "cache-teacher-refuses-a-stray-end-marker",
        STAGE1_IMAGES,
        f"cannot decode image .*{DAMAGED}: the JPEG decoder reports 'Corrupt JPEG data",
        setup=damage_images("marker"),
        only_line=False,
        keep=the_images,
        bound=90,
    ),
    Case(
        "cache-teacher-skip-corrupt-records-and-stage-2-replays",
        STAGE1_IMAGES + " --skip-corrupt",
        code=0,
        setup=damage_images("zeros"),
        check=skipped_and_replayed,
        keep=the_images,
        bound=180,
    ),
    Case(
        "cache-teacher-skip-corrupt-on-in-memory-data",
        "cache-teacher --model resnet8 --weights {teacher} --data digits@100 --views 1 --skip-corrupt "
        "--out {tmp}/logits.zarr",
        "--skip-corrupt is for image folders; digits@100 is decoded already",
        check=lambda w: not (w.tmp / "logits.zarr").exists() or pytest.fail("a store was left"),
        bound=60,
    ),
    Case(
        "distill-from-a-store-whose-image-was-damaged-since",
        "distill --cache {tmp}/logits.zarr --student resnet8 --method kd --epochs 1 --batch-size 4 --workers 1 "
        "--out {out}",
        f"cannot decode image .*{DAMAGED}: the JPEG decoder reports",
        setup=damage_images("marker", store_first=True, at=0.05),
        only_line=False,
        changes_out=True,
        keep=the_images,
        bound=180,
    ),
    Case(
        "verify-cache-on-an-image-damaged-since",
        "verify-cache {tmp}/logits.zarr --samples 16",  # every row: the damaged image among them
        f"cannot decode image .*{DAMAGED}: the JPEG decoder reports",
        setup=damage_images("marker", store_first=True, at=0.05),
        only_line=False,
        keep=the_images,
        bound=180,
    ),
    Case(
        "distill-online-from-a-damaged-folder",
        IMAGES + " --epochs 1 --workers 1",
        f"cannot decode image .*{DAMAGED}: the JPEG decoder reports",
        setup=damage_images("marker"),
        only_line=False,
        changes_out=True,
        keep=the_images,
        bound=120,
    ),
    Case(
        "distill-from-a-store-whose-skip-record-is-not-a-list",
        "distill --cache {tmp}/logits.zarr --student resnet8 --method kd --epochs 1 --out {out}",
        "records skipped images it cannot leave out of imagefolder|skipped",
        setup=tampered_skip_record,
        keep=the_images,
        bound=180,
    ),
]


CASES = [
    # --out: a run folder, never anything else
    Case("out-is-a-file", TRAIN.replace("{out}", "{file}"), "is a file, not a run folder", setup=make_file),
    Case("out-is-a-file-overwrite", TRAIN.replace("{out}", "{file}") + " --overwrite", "never a file", setup=make_file),
    Case("out-under-a-file", TRAIN.replace("{out}", "{file}/run"), "is a file", setup=make_file),
    Case("out-folder-of-user-files", TRAIN, "holds no run", setup=make_user_folder),
    Case("out-folder-of-user-files-overwrite", TRAIN + " --overwrite", "holds no run", setup=make_user_folder),
    Case("out-holds-a-run", TRAIN, "already holds a run; pass --resume", setup=make_finished_run),
    Case(
        "out-holds-a-run-overwrite",
        TRAIN + " --overwrite",
        code=0,
        setup=make_run_with_user_file,
        check=user_file_kept,
        changes_out=True,
    ),
    Case("out-empty-folder", TRAIN, code=0, setup=make_empty_folder, check=finished, changes_out=True),
    Case("out-empty-string", TRAIN.replace("{out}", "''"), "--out is empty"),
    Case("out-read-only-fs", TRAIN, "read-only file system \\(EROFS\\)", setup=on_readonly("new-run")),
    Case(
        "out-cannot-create-eacces",
        TRAIN,
        "cannot create .*Permission denied \\(EACCES\\)",
        setup=fail_makedirs(errno.EACCES),
    ),
    # --resume
    Case("resume-and-overwrite", TRAIN + " --resume --overwrite", "choose one", setup=make_finished_run),
    Case("resume-missing-folder", TRAIN + " --resume", "does not exist"),
    Case("resume-empty-folder", TRAIN + " --resume", "no checkpoint.pt", setup=make_empty_folder),
    Case("resume-finished-run", TRAIN + " --resume", code=0, setup=make_finished_run, check=finished, changes_out=True),
    Case(
        "resume-weights-only-file",
        TRAIN + " --resume",
        "not a dhkd-pipe training checkpoint \\(no optimizer, epoch",
        setup=lambda w: checkpoint_file(w, {"model": create_model("resnet8", 10).state_dict()}),
    ),
    Case(
        "resume-hostile-pickle",
        TRAIN + " --resume",
        "cannot read checkpoint .*(GLOBAL|global)",
        setup=hostile_checkpoint,
        check=payload_not_run,
    ),
    Case(
        "resume-garbage",
        TRAIN + " --resume",
        "cannot read checkpoint",
        setup=lambda w: checkpoint_file(w, raw=b"garbage" * 99),
    ),
    Case(
        "resume-empty-checkpoint",
        TRAIN + " --resume",
        "cannot read checkpoint",
        setup=lambda w: checkpoint_file(w, raw=b""),
    ),
    Case("resume-truncated-checkpoint", TRAIN + " --resume", "cannot read checkpoint", setup=truncated_checkpoint),
    Case(
        "resume-bare-tensor",
        TRAIN + " --resume",
        "not a dhkd-pipe training checkpoint",
        setup=lambda w: checkpoint_file(w, torch.zeros(3)),
    ),
    Case(
        "resume-checkpoint-is-a-folder",
        TRAIN + " --resume",
        "cannot read checkpoint",
        setup=lambda w: (
            checkpoint_file(w, raw=b""),
            (w.out / "checkpoint.pt").unlink(),
            (w.out / "checkpoint.pt").mkdir(),
        ),
    ),
    Case("resume-different-lr", TRAIN + " --resume --lr 0.5", "different config: lr", setup=make_finished_run),
    Case(
        "resume-different-model",
        TRAIN.replace("resnet8", "resnet20") + " --resume",
        "different config: model",
        setup=make_finished_run,
    ),
    Case(
        "resume-read-only-fs",
        TRAIN.replace("{out}", "{ro}/run") + " --resume",
        "read-only file system",
        setup=lambda w: w.set(ro=w.fixture("readonly")),
    ),
    # teacher weights (online distillation)
    Case("teacher-weights-missing", ONLINE.replace("{teacher}", "{tmp}/nope.pt"), "not found"),
    Case(
        "teacher-weights-hostile",
        ONLINE,
        "cannot read checkpoint .*(GLOBAL|global)",
        setup=hostile_teacher,
        check=payload_not_run,
    ),
    Case("teacher-weights-nan", ONLINE, "weights in .* are not finite", setup=teacher_variant(nan=True)),
    Case("teacher-weights-a-folder", ONLINE.replace("{teacher}", "{tmp}"), "not found"),
    Case("teacher-wrong-architecture", ONLINE.replace("--teacher resnet8", "--teacher resnet20"), "missing|unexpected"),
    Case(
        "teacher-logits-overflow",
        ONLINE,
        "teacher's logits are not finite at epoch 1, step 1",
        setup=teacher_variant(huge=True),
        only_line=False,
    ),
    # options and configs
    Case("unknown-option", TRAIN + " --bogus", "No such option"),
    Case("option-without-value", TRAIN + " --epochs", "requires an argument"),
    Case("option-not-a-number", TRAIN + " --lr fast", "not a valid float"),
    Case("epochs-zero", TRAIN + " --epochs 0", "bad epochs 0"),
    Case("max-nonfinite-negative", TRAIN + " --max-nonfinite -1", "must not be negative"),
    Case("resolution-too-small", TRAIN + " --resolution 4", "bad resolution 4"),
    Case("config-missing", TRAIN + " --config {tmp}/none.yaml", "config file not found"),
    Case(
        "config-bad-yaml",
        TRAIN + " --config {tmp}/recipe.yaml",
        "cannot parse config",
        setup=bad_config("epochs: [1, 2\n"),
    ),
    Case("config-a-list", TRAIN + " --config {tmp}/recipe.yaml", "must be a mapping", setup=bad_config("- 1\n- 2\n")),
    Case(
        "config-unknown-key",
        TRAIN + " --config {tmp}/recipe.yaml",
        "unknown config option\\(s\\): epochz",
        setup=bad_config("epochz: 3\n"),
    ),
    Case("config-bad-value", TRAIN + " --config {tmp}/recipe.yaml", "bad value for lr", setup=bad_config("lr: fast\n")),
    Case("unknown-model", TRAIN.replace("resnet8", "resnet9000"), "unknown model"),
    Case("unknown-method", ONLINE + " --method magic", "unknown method|Invalid value for '--method'"),
    Case("unknown-data", TRAIN.replace("digits@100", "svhn"), "unknown data set|svhn"),
    Case("data-folder-missing", TRAIN.replace("digits@100", "imagefolder:{tmp}/none"), "not found"),
    Case("fp16-without-gpu", TRAIN + " --precision fp16", "needs a GPU"),
    Case("unknown-tracker", TRAIN + " --log-with tensorbord", "unknown tracker"),
    Case(
        "method-needs-a-teacher",
        "distill --student resnet8 --data digits@100 --method kd --out {out}",
        "needs a teacher",
    ),
    Case("grad-align-single-head", ONLINE + " --method kd --grad-align", "only --method dhkd"),
    # the model's input size against the data
    Case(
        "cifar-model-on-image-folder",
        "train-teacher --model resnet8 --data imagefolder:{images} --workers 0 --out {out}",
        "resnet8 is built for 32x32 inputs and cannot take the data's 224x224 images; pass --resolution 32",
    ),
    Case(
        "cifar-teacher-on-image-folder",
        "distill --student resnet18 --teacher resnet8 --teacher-weights {teacher} "
        "--data imagefolder:{images} --workers 0 --out {out}",
        "the teacher resnet8 is built for 32x32",
    ),
    Case("cifar-model-at-64-pixels", TRAIN + " --resolution 64", "cannot take the data's 64x64 images"),
    Case(
        "image-folder-at-32-pixels",
        "train-teacher --model resnet8 --data imagefolder:{images} --resolution 32 --workers 0 "
        "--epochs 1 --batch-size 4 --out {out}",
        code=0,
        check=finished,
        changes_out=True,
    ),
    Case(
        "resolution-against-the-store",
        "distill --student resnet8 --cache {store} --data digits@100 --resolution 64 --out {out}",
        "the store .* holds views rendered at 32",
        setup=lambda w: w.set(store=w.fixture("store")),
    ),
    Case(
        "image-folder-without-val-split",
        "train-teacher --model resnet8 --data imagefolder:{noval} --resolution 32 --workers 0 "
        "--epochs 1 --batch-size 4 --out {out}",
        code=0,
        check=metrics_valid_with_null_val,
        changes_out=True,
    ),
    # non-finite training
    Case(
        "loss-diverges-in-epoch-2",
        TRAIN + " --epochs 2 --lr-milestones 1 --lr-decay 1e30",
        "loss is not finite at epoch 2, step",
        check=first_epoch_kept,
        changes_out=True,
        only_line=False,
    ),
    Case(
        "loss-diverges-after-skips",
        TRAIN + " --epochs 2 --lr-milestones 1 --lr-decay 1e30 --max-nonfinite 2",
        "loss is not finite at epoch 2, step \\d+ after 2 skipped",
        check=first_epoch_kept,
        changes_out=True,
        only_line=False,
    ),
    # disk full, permissions (tmpfs where root can mount one; else skipped)
    Case(
        "disk-full-at-first-checkpoint",
        TRAIN,
        "cannot write .*checkpoint.pt: No space left on device \\(ENOSPC\\)",
        setup=fill_disk(100_000),
        check=disk_freed_then(resume=False),
        only_line=False,
    ),
    Case(
        "disk-full-at-second-checkpoint",
        TRAIN + " --checkpoint-every 1",
        "checkpoint.pt: No space left on device \\(ENOSPC\\)",
        setup=fill_disk(1_000_000),
        check=checkpoint_intact,
        changes_out=True,
        only_line=False,
    ),
    Case(
        "metrics-append-fails-enospc",
        TRAIN + " --epochs 2",
        "cannot write .*metrics.jsonl: No space left on device \\(ENOSPC\\)",
        setup=fail_fsync_of("metrics.jsonl", after=1),
        check=metrics_not_partial,
        changes_out=True,
        only_line=False,
    ),
    Case(
        "export-fails-eio",
        TRAIN,
        "cannot write .*model.safetensors: Input/output error \\(EIO\\)",
        setup=fail_fsync_of("model.safetensors.tmp", errno.EIO),
        check=lambda w: disk_ok_resume(w),
        changes_out=True,
        only_line=False,
    ),
    # one writer per run folder
    Case(
        "lock-held-by-a-live-process",
        TRAIN,
        "in use by another run: pid \\d+ on .*kill \\d+",
        setup=plant_lock(live_pid),
        check=lock_untouched,
    ),
    Case(
        "lock-held-on-another-host",
        TRAIN + " --resume",
        "in use by another run: pid 4242 on elsewhere.example.*remove .*run.lock",
        setup=plant_lock(other_host, checkpoint=True),
        check=lock_untouched,
    ),
    Case("lock-of-a-dead-process", TRAIN, code=0, setup=plant_lock(dead_pid), check=finished, changes_out=True),
    Case("lock-of-a-zombie", TRAIN, code=0, setup=plant_lock(zombie_pid), check=finished, changes_out=True),
    Case(
        "lock-garbled-and-old",
        TRAIN,
        code=0,
        setup=plant_lock(raw=b"\0\0garbage", age=60),
        check=finished,
        changes_out=True,
    ),
    # the other commands of the run side
    Case(
        "eval-hostile-weights",
        "eval --model resnet8 --weights {teacher} --data digits",
        "cannot read checkpoint .*(GLOBAL|global)",
        setup=hostile_teacher,
        check=payload_not_run,
    ),
    Case("eval-weights-missing", "eval --model resnet8 --weights {tmp}/none.pt --data digits", "not found"),
    Case(
        "eval-cifar-model-on-image-folder",
        "eval --model resnet8 --weights {teacher} --data imagefolder:{images}",
        "built for 32x32 inputs and cannot take the data's 224x224",
    ),
    Case(
        "eval-data-without-val-split",
        "eval --model resnet8 --weights {teacher} --data imagefolder:{noval} --resolution 32",
        "has no validation split",
    ),
    Case("export-not-a-run", "export {tmp}", "holds no exported model"),
    Case(
        "export-out-in-a-missing-folder",
        "export {run} --out {tmp}/no/such/folder/m.onnx",
        "is not a folder",
        setup=make_finished_run,
    ),
    Case(
        "export-out-is-a-folder", "export {run} --out {tmp}", "is a folder; name the ONNX file", setup=make_finished_run
    ),
    Case(
        "export-out-read-only-fs",
        "export {run} --out {ro}/m.onnx",
        "cannot write to .*m.onnx: .* read-only file system \\(EROFS\\)",
        setup=several(make_finished_run, lambda w: w.set(ro=w.fixture("readonly"))),
    ),
    Case("report-not-a-run", "report {tmp} --out {tmp}/r.png", "is not a run folder: no metrics.jsonl"),
    Case(
        "report-garbled-metrics",
        "report {run} --out {tmp}/r.png",
        "corrupt metrics",
        setup=several(make_finished_run, lambda w: (w.out / "metrics.jsonl").write_text('{"epoch": 1, "train_lo')),
        check=None,
    ),
    Case(
        "report-out-read-only-fs",
        "report {run} --out {ro}/r.png",
        "cannot write .*r.png: Read-only file system \\(EROFS\\)",
        setup=several(make_finished_run, lambda w: w.set(ro=w.fixture("readonly"))),
    ),
    Case("quickstart-out-a-file", "quickstart --out {file}", "is a file", setup=make_file),
    Case(
        "quickstart-overwrite-a-user-folder",
        "quickstart --out {out} --overwrite",
        "is not a quickstart folder",
        setup=make_user_folder,
    ),
    Case(
        "environment-error-anywhere",
        TRAIN,
        "cannot access /data/x: Permission denied \\(EACCES\\)",
        setup=lambda w: w.monkeypatch.setattr("dhkd_pipe.data.datasets.load_data", eacces("/data/x")),
    ),
    Case(
        "resume-past-a-stale-lock",
        TRAIN + " --resume",
        code=0,
        setup=plant_lock(dead_pid, checkpoint=True),
        check=finished,
        changes_out=True,
    ),
    Case(
        "resumed-epoch-reports-the-same-train-loss",
        code=0,
        run=resumed_epoch_same_train_loss,
        check=same_as_reference,
        changes_out=True,
        slow=True,
    ),  # two training runs
    # processes: signals, kills, native output, two writers (slow)
    Case(
        "truncated-jpeg-no-native-chatter",
        IMAGES + " --epochs 1 --workers 2",
        "cannot decode image .*2.JPEG: .*truncated",
        setup=truncated_jpeg_folder,
        sub=True,
        slow=True,
        only_line=False,
    ),
    Case(
        "sigterm-mid-run-saves-and-resumes",
        "",
        "interrupted by SIGTERM (at epoch \\d+, step \\d+|after epoch \\d+): .*--resume",
        code=143,
        run=interrupt(signal.SIGTERM),
        check=resume_then_same,
        changes_out=True,
        only_line=False,
        slow=True,
    ),
    Case(
        "sigint-mid-run-saves-and-resumes",
        "",
        "interrupted by SIGINT (at epoch \\d+, step \\d+|after epoch \\d+): .*--resume",
        code=130,
        run=interrupt(signal.SIGINT),
        check=resume_then_same,
        changes_out=True,
        only_line=False,
        slow=True,
    ),
    Case(
        "sigkill-at-a-random-point-1",
        code=0,
        run=kill_at_random_point(1),
        check=same_as_reference,
        changes_out=True,
        slow=True,
    ),
    Case(
        "sigkill-at-a-random-point-2",
        code=0,
        run=kill_at_random_point(2),
        check=same_as_reference,
        changes_out=True,
        slow=True,
    ),
    Case(
        "second-run-on-a-busy-folder",
        "",
        "in use by another run: pid \\d+",
        run=second_run_while_the_first_runs,
        changes_out=True,
        slow=True,
    ),
    Case("sigkill-image-folder-run-leaves-no-workers", code=0, run=kill_image_folder_run, changes_out=True, slow=True),
    *OWNERSHIP_AND_VALUE_CASES,
    *READ_BACK_CASES,
    *CORRUPT_IMAGE_CASES,
    *OWNERSHIP_CASES,
    *SEVERAL_STUDENTS_CASES,
]


def disk_ok_resume(w: Work):
    """After a failed export the run's last checkpoint is there: --resume writes the export."""
    w.monkeypatch.undo()
    assert not (w.out / "summary.json").exists()
    code, _, err = invoke(shlex.split(TRAIN.format(out=w.out)) + ["--resume"])
    assert code == 0, err
    finished(w)


def _param(case: Case):
    return pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else [])


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_fault(case: Case, shared, tmp_path, request, monkeypatch):
    w = Work(tmp_path, shared, request, monkeypatch)
    try:
        if case.setup:
            case.setup(w)
        before = snapshot(w.out)
        kept = {str(p): snapshot(Path(p)) for p in case.keep(w)} if case.keep else {}
        began = time.perf_counter()
        if case.run is not None:
            code, err = case.run(w)
        elif case.sub:
            code, err = finish(start(case.args, w))
        else:
            args = shlex.split(case.args.format(**w.vars))
            code, _, err = invoke(args)
        seconds = time.perf_counter() - began
        assert code == case.code, err[-3000:]
        if case.bound is not None:
            assert seconds <= case.bound, f"took {seconds:.1f} s (bound {case.bound:.0f} s)"
        assert {str(p): snapshot(Path(p)) for p in kept} == kept, "a file the user had changed or went away"
        if case.code != 0:
            assert_one_error_line(err, case.match, case.only_line)
            if not case.changes_out:
                assert snapshot(w.out) == before, "a failed command changed --out"
        if case.check:
            case.check(w)
        assert_no_leftovers(tmp_path)
        if os.path.isdir(w.out) and case.check is not lock_untouched:
            assert not (w.out / "run.lock").exists(), "the lock was not released"
    finally:
        for fn in w.cleanup:
            fn()


def test_a_skipped_step_does_no_update(tmp_path, monkeypatch):
    """--max-nonfinite: a step whose loss is not finite changes neither the weights nor the
    optimizer's state; one more than allowed stops the run with one DhkdError naming the step."""
    import copy

    from dhkd_pipe.config import TrainConfig
    from dhkd_pipe.errors import DhkdError
    from dhkd_pipe.training.engine import train_step
    from dhkd_pipe.training.nonfinite import NonFiniteGuard
    from dhkd_pipe.training.run import prepare

    cfg = TrainConfig(
        data="digits@100",
        model="resnet8",
        method="ce",
        epochs=1,
        batch_size=32,
        max_nonfinite=1,
        out=str(tmp_path / "run"),
    ).validate()
    run = prepare(cfg)
    try:
        run.guard = NonFiniteGuard(run.accelerator.device, cfg.max_nonfinite, 1, run.progress)
        batches = run.loader.epoch(0)
        assert train_step(run, next(batches), 0, 0) is not None  # a real step: momentum buffers exist
        weights = copy.deepcopy(run.model.state_dict())
        optimizer = copy.deepcopy(run.optimizer.state_dict())
        real = type(run.method).terms
        monkeypatch.setattr(
            type(run.method),
            "terms",
            lambda self, *a, **k: {n: t * float("nan") for n, t in real(self, *a, **k).items()},
        )
        assert train_step(run, next(batches), 0, 1) is None
        after = run.model.state_dict()
        assert all(torch.equal(weights[k], after[k]) for k in weights)
        state = run.optimizer.state_dict()["state"]
        assert all(torch.equal(optimizer["state"][i]["momentum_buffer"], state[i]["momentum_buffer"]) for i in state)
        with pytest.raises(DhkdError, match="loss is not finite at epoch 1, step 3 after 1 skipped"):
            train_step(run, next(batches), 0, 2)
    finally:
        run.close()
