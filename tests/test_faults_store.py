"""The fault matrix, store side: one writer per logit store, nothing half-written, damage
found and repaired.

One table (``CASES``) drives one test. A case names its command line (``{out}``, ``{teacher}``, ...
filled from the case's work folder and the module's fixtures), how to set the scene, the exit code
and the one stderr line it expects, and what must hold of the store afterwards (often: the re-run
after the fix just works, and the store equals the reference store, value for value). Commands run
in this process (``CliRunner``); cases that need another process (a concurrent writer, a launch
of two ranks) or a server run it and are marked slow. Every case checks that no traceback reached
stderr and, where the store is local, that no temporary file of a write is left.

Locks are planted as another process would leave them: a live pid on this host (a ``sleep``), a
dead one, a zombie, a reused pid (alive, but started after the lock), another host, a garbled file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import tracemalloc
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import hostile_stores as hs
import numpy as np
import pytest
import torch
from conftest import S3_BUCKET as BUCKET  # the moto server is the session fixture ``s3``
from conftest import accelerate_launch, invoke
from console_script import BIN, CHATTER
from test_faults import (
    assert_one_error_line,
    dead_pid,
    live_pid,
    other_host,
    zombie_pid,
)  # the run side's matrix helpers

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models import create_model
from dhkd_pipe.store.audit import damage
from dhkd_pipe.store.lock import LOCK_KEY, StoreLock, read_holder
from dhkd_pipe.store.objects import StoreObjects, is_url, open_store
from dhkd_pipe.store.reader import LogitCache
from dhkd_pipe.store.writer import create_or_resume

HOST = socket.gethostname()

CACHE = (
    "cache-teacher --model resnet8 --weights {teacher} --data digits@256 --views 2 --chunk-rows 64 "
    "--batch-size 64 --out {out}"
)
IMAGES = (
    "cache-teacher --model resnet8 --weights {teacher2} --data imagefolder:{images} --resolution 32 --views 2 "
    "--chunk-rows 8 --batch-size 16 --out {out}"
)
DISTILL = "distill --student resnet8 --cache {out} --epochs 1 --batch-size 64 --out {run}"
HELD = r"store \S+ is being written by another process: pid \d+ on "


# ---- module fixtures (built once, only read) -------------------------------------------------------


def _save_teacher(path: Path, num_classes: int, scale: float | None = None, nan: bool = False, huge: bool = False):
    torch.manual_seed(0)
    sd = create_model("resnet8", num_classes).state_dict()
    sd["fc.weight"] = sd["fc.weight"].clone()
    if nan:
        sd["fc.weight"][0, 0] = float("nan")
    if huge:  # finite, but class 0's logit sums past float32's largest value
        sd["fc.weight"][0] = 3e38
        sd["fc.bias"] = sd["fc.bias"].clone()
        sd["fc.bias"][0] = 3e38
    if scale is not None:  # finite weights whose logits leave a codec's range
        sd["fc.weight"] = sd["fc.weight"] * scale
        sd["fc.bias"] = sd["fc.bias"] + scale
    torch.save({"model": sd}, path)
    return path


def _write_images(root: Path, size=(48, 40)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in range(2):
            os.makedirs(root / split / f"c{c}", exist_ok=True)
            for k in range(n):
                pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{k}.JPEG", quality=90)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Random-weights teachers (digits, and two classes for the image folder), a tiny JPEG folder,
    and the reference store of ``CACHE``, written once."""
    root = tmp_path_factory.mktemp("faults-store")
    teacher = _save_teacher(root / "teacher.pt", 10)
    shared = {
        "root": root,
        "teacher": teacher,
        "teacher2": _save_teacher(root / "teacher2.pt", 2),
        "images": root / "images",
    }
    _write_images(shared["images"])
    reference = root / "reference.zarr"
    code, _, err = invoke(shlex.split(CACHE.format(teacher=teacher, out=reference)))
    assert code == 0, err
    shared["reference"] = reference
    return shared


# ---- one case's work folder ------------------------------------------------------------------------


@dataclass
class Work:
    tmp: Path
    shared: dict
    request: pytest.FixtureRequest
    vars: dict = field(default_factory=dict)
    cleanup: list = field(default_factory=list)
    before: dict | None = None  # the store's objects before the command, where a case keeps them

    def __post_init__(self):
        self.vars = {
            "out": str(self.tmp / "s.zarr"),
            "run": str(self.tmp / "run"),
            "tmp": str(self.tmp),
            "file": str(self.tmp / "notes.txt"),
            **{k: str(v) for k, v in self.shared.items()},
        }

    @property
    def out(self) -> str:
        return self.vars["out"]

    def command(self, template: str) -> list[str]:
        return shlex.split(template.format(**self.vars))

    def objects(self, location: str | None = None) -> StoreObjects:
        location = location or self.out
        return StoreObjects(open_store(location, read_only=False), location)


def store_objects(location: str) -> dict[str, bytes] | None:
    """Every object of the store at ``location`` (None if nothing is there)."""
    if not is_url(location) and not os.path.lexists(location):
        return None
    if not is_url(location) and not os.path.isdir(location):
        return {".": Path(location).read_bytes()}
    objects = StoreObjects(open_store(location), location)
    return {key: objects.read(key) for key in objects.list()}


def copy_store(src: str, dst: str):
    """The objects of store ``src`` written to ``dst`` (any location)."""
    target = StoreObjects(open_store(dst, read_only=False), dst)
    for key, data in store_objects(src).items():
        target.write(key, data)


def assert_no_partial_writes(location: str):
    if is_url(location) or not os.path.isdir(location):
        return
    root = Path(location)  # a file of the user's at the store's root is theirs, whatever its name
    left = [
        p
        for p in root.rglob("*")
        if p.name.endswith((".partial", ".tmp")) and (p.parent != root or p.name.startswith(".lock"))
    ]
    assert not left, f"half-written files left: {left}"


# ---- scene setters -------------------------------------------------------------------------------------


def reference_copy(w: Work):
    copy_store(w.shared["reference"], w.out)


def memory_store(w: Work):
    w.vars["out"] = f"memory://faults-{uuid.uuid4().hex[:8]}/s.zarr"


def s3_store(w: Work):
    w.request.getfixturevalue("s3")
    w.vars["out"] = f"s3://{BUCKET}/faults-{uuid.uuid4().hex[:8]}/s.zarr"


def reused_pid(w: Work) -> dict:
    holder = live_pid(w)  # alive, but started after the lock was taken: not the lock's process
    return {**holder, "started": time.time() - 3600}


def plant_lock(holder: Callable | None = None, raw: bytes | None = None, age: float = 0.0, store: bool = True):
    """A lock left in the store (a copy of the reference, or nothing else when ``store`` is False)."""

    def setup(w: Work):
        if store:
            reference_copy(w)
        data = raw if raw is not None else json.dumps(holder(w)).encode()
        w.objects().write(LOCK_KEY, data)
        if age and not is_url(w.out):
            t = time.time() - age
            os.utime(os.path.join(w.out, LOCK_KEY), (t, t))
        w.before = store_objects(w.out)

    return setup


def user_file(w: Work):
    Path(w.vars["file"]).write_text("the user's notes\n")
    w.vars["out"] = w.vars["file"]
    w.before = store_objects(w.out)


def user_folder(w: Work):
    folder = Path(w.out)
    (folder / "sub").mkdir(parents=True)
    (folder / "photo.jpg").write_bytes(b"not ours")
    (folder / "sub" / "data.csv").write_text("1,2\n")
    w.before = store_objects(w.out)


def foreign_zarr(w: Work):
    import zarr

    group = zarr.open_group(w.out, mode="w", attributes={"title": "someone's climate data"})
    group.create_array("t2m", shape=(4,), dtype="f4")[:] = np.arange(4)
    w.before = store_objects(w.out)


def teacher_file(**kw):
    def setup(w: Work):
        w.vars["teacher"] = str(_save_teacher(w.tmp / "bad-teacher.pt", 10, **kw))

    return setup


def image_folder(damage: str):
    def setup(w: Work):
        root = w.tmp / "images"
        shutil.copytree(w.shared["images"], root)
        path = root / "train" / "c1" / "2.JPEG"
        w.vars["images"], w.vars["damaged_image"] = str(root), str(path)
        data = path.read_bytes()
        path.write_bytes(b"" if damage == "empty" else data[: len(data) * 6 // 10])

    return setup


def empty_store_of_another_command(w: Work):
    """What an earlier failed or killed stage 1 left: a created store with no unit written."""
    create_or_resume(
        w.out,
        epochs=2,
        num_samples=256,
        num_classes=10,
        chunk_rows=64,
        labels=np.zeros(256),
        attrs={"command": {"teacher": "resnet8", "weights_digest": "of the NaN weights"}},
    )


def damage_unit(array: str, how: str, epoch: int = 1, chunk: int = 2):
    """A copy of the reference store with one object of a unit marked done damaged."""

    def setup(w: Work):
        reference_copy(w)
        cache = LogitCache.open(w.out)
        key = "labels/c/0" if array == "labels" else cache.unit_keys(epoch, chunk)[array]
        objects = w.objects()
        data = objects.read(key)
        if how == "delete":
            objects.delete(key)
        elif how == "flip":
            data = bytearray(data)
            data[len(data) // 2] ^= 0x10
            objects.write(key, bytes(data))
        elif how == "truncate":
            objects.write(key, data[: len(data) - 9])
        elif how == "empty":
            objects.write(key, b"")
        w.vars["damaged"] = key

    return setup


def killed_writers_leftovers(w: Work):
    """A copy of the reference with what writers killed mid-write leave on disk."""
    reference_copy(w)
    (Path(w.out) / "logits" / "c" / "1" / "0" / "0.5f3a9c.partial").write_bytes(b"half a chunk")
    (Path(w.out) / ".lock.9e1b.tmp").write_bytes(b'{"host": ')


def several(*setups):
    def setup(w: Work):
        for s in setups:
            s(w)

    return setup


# ---- checks afterwards ------------------------------------------------------------------------------


def same_as_reference(location: str, reference: str):
    a, b = LogitCache.open(location), LogitCache.open(reference)
    a.check_complete()
    assert damage(a) == []
    for e in range(b.epochs):
        assert np.array_equal(
            np.concatenate([a.read_chunk(e, k)[0] for k in range(a.num_chunks)]),
            np.concatenate([b.read_chunk(e, k)[0] for k in range(b.num_chunks)]),
        ), e
        assert np.array_equal(a.read_order(e), b.read_order(e)) and np.array_equal(a.read_views(e), b.read_views(e))
    assert np.array_equal(a.labels, b.labels)


def complete_and_unlocked(w: Work):
    same_as_reference(w.out, w.shared["reference"])
    assert read_holder(w.objects()) is None


def unchanged(w: Work):
    assert store_objects(w.out) == w.before


def no_store(w: Work):
    found = store_objects(w.out)
    assert not found, f"left behind at {w.out}: {sorted(found)[:10]}"


def rerun(
    fix: Callable[[Work], None] | None = None,
    template: str = CACHE,
    check: Callable[[Work], None] = complete_and_unlocked,
):
    """After the fix (if any), the same command just works."""

    def after(w: Work):
        if fix is not None:
            fix(w)
        code, _, err = invoke(w.command(template))
        assert code == 0, err[-3000:]
        assert not CHATTER.search(err), err[-3000:]
        check(w)

    return after


def good_teacher(w: Work):
    w.vars["teacher"] = w.shared["teacher"]


def restore_image(w: Work):
    name = Path(w.vars["damaged_image"]).relative_to(w.vars["images"])
    shutil.copyfile(Path(w.shared["images"]) / name, w.vars["damaged_image"])


def image_store_sound(w: Work):
    cache = LogitCache.open(w.out)
    cache.check_complete()
    assert damage(cache) == [] and read_holder(w.objects()) is None


def inspect_clean(w: Work):
    code, out, err = invoke(["inspect", "--json", w.out])
    assert code == 0 and json.loads(out)["damaged"] == [], err


def inspect_names_damage(w: Work):
    code, out, err = invoke(["inspect", "--json", w.out])
    assert code == 1, err
    assert_one_error_line(
        err, rf"is damaged: .*\({re.escape(w.vars['damaged'])}\).*re-run cache-teacher with the same command"
    )
    assert any(w.vars["damaged"] in line for line in json.loads(out)["damaged"])


def then(*checks):
    def after(w: Work):
        for check in checks:
            check(w)

    return after


def no_run_folder(w: Work):
    assert not os.path.exists(w.vars["run"])


def holder_kept(w: Work):
    unchanged(w)
    assert read_holder(w.objects()) is not None


def broken_by_us(w: Work):
    complete_and_unlocked(w)


# ---- the disk-full fixture -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory):
    """A 2 MB tmpfs to fill up; skipped where this user cannot mount one."""
    path = tmp_path_factory.mktemp("faults-store-tmpfs") / "disk"
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("cannot mount a tmpfs here (needs root): disk-full cases skipped")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def full_disk(leave: int):
    """--out on the tmpfs, filled so that ``leave`` bytes stay free."""

    def setup(w: Work):
        disk = w.request.getfixturevalue("tmpfs")
        for p in disk.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        st = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
        w.vars["out"] = str(disk / "s.zarr")
        w.vars["filler"] = str(disk / "filler")

    return setup


def free_disk(w: Work):
    os.remove(w.vars["filler"])


def units_kept(w: Work):
    done = LogitCache.open(w.out).done_mask()
    assert 0 < done.sum() < done.size, done  # some units written, kept for the resume
    assert read_holder(w.objects()) is None


# ---- the table -------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    command: str
    setup: Callable[[Work], None] | None = None
    code: int = 2
    error: str | None = None  # the one stderr line (regex); None: success
    only_line: bool = True  # False: log lines may come before the error line
    after: Callable[[Work], None] | None = None
    slow: bool = False
    keep: Callable[[Work], list] | None = (
        None  # the user's paths: byte-identical afterwards (links and FIFOs as they were)
    )
    bound: float | None = None  # seconds the command may take: a hostile input must not make it hang
    measure: bool = False  # record the command's time and peak memory (tracemalloc): the hostile-store family


# ---- hostile stores, foreign objects, stored strings, a replaced store ----------------------------------


def hostile(fn, *args, extra: Callable[[Work], tuple] = lambda w: ()):
    """A copy of the reference store made hostile by ``hostile_stores.fn`` (``extra``: more
    arguments from the work folder)."""

    def setup(w: Work):
        reference_copy(w)
        fn(Path(w.out), *args, *extra(w))

    return setup


def the_store(w: Work) -> list:
    return [w.out]


def store_and(*names):
    return lambda w: [w.out] + [str(w.tmp / n) for n in names]


def a_socket(w: Work):
    reference_copy(w)
    sock = hs.socket_in(Path(w.out))
    w.cleanup.append(sock.close)


def damaged_chunk(w: Work):
    hs.delete_first_chunk(Path(w.out))


def foreign_entry(name: str, data: bytes | None = b"the user's own\n"):
    """The reference store with an entry of the user's at its root (a file, or a folder of one)."""

    def setup(w: Work):
        reference_copy(w)
        path = Path(w.out) / name
        if data is None:
            path.mkdir()
            (path / "a.txt").write_text("a note\n")
        else:
            path.write_bytes(data)

    return setup


def weights_inside_the_stores_own_entry(w: Work):
    reference_copy(w)
    shutil.copy(w.shared["teacher"], Path(w.out) / "logits" / "teacher.pt")
    w.vars["teacher"] = str(Path(w.out) / "logits" / "teacher.pt")


def weights_inside_the_store(w: Work):
    reference_copy(w)
    shutil.copy(w.shared["teacher"], Path(w.out) / "teacher.pt")
    w.vars["teacher"] = str(Path(w.out) / "teacher.pt")


def no_raw_control(w: Work):
    found = re.search(r"[\x00-\x08\x0b-\x1f\x7f]", w.vars["stdout"] + w.vars["stderr"])
    assert found is None, f"a raw control character {found.group()!r} reached the terminal"


def hint_is_quoted(w: Work):
    no_raw_control(w)
    hint = w.vars["stderr"].strip().splitlines()[-1].split("rewrite it: ", 1)[1]
    tokens = list(shlex.shlex(hint, posix=False, punctuation_chars=True))  # quotes kept: a quoted "|" is an argument
    assert tokens[:2] == ["dhkd-pipe", "cache-teacher"] and not [t for t in tokens if set(t) <= set("();<>|&")], hint


def forged_command_not_suggested(w: Work):
    assert (
        w.vars["stderr"].strip().splitlines()[-1].endswith("re-run cache-teacher with the same command to rewrite it")
    ), w.vars["stderr"]


def replaced_after_a_stopped_run(w: Work):
    """distill stopped with a checkpoint on the reference store; then another store (seed 1) is
    put at the same path."""
    reference_copy(w)
    code, _, err = invoke(w.command(DISTILL + " --epochs 2 --max-steps 2"))
    assert code == 0, err
    other = w.tmp / "seed1.zarr"
    code, _, err = invoke(shlex.split(CACHE.format(**{**w.vars, "out": other}) + " --seed 1"))
    assert code == 0, err
    shutil.rmtree(w.out)
    shutil.copytree(other, w.out)


def s3_bucket(name: str, store_at_root: bool = False, foreign: bool = True):
    """A bucket of its own; with ``store_at_root`` a logit store at its root (as older versions
    made one) beside the user's photo."""

    def setup(w: Work):
        w.request.getfixturevalue("s3")
        bucket = f"{name}-{uuid.uuid4().hex[:6]}"
        root = StoreObjects(open_store(f"s3://{BUCKET}/x", read_only=False), f"s3://{BUCKET}/x")
        root.call("create a bucket", root.store.fs._mkdir(bucket))
        w.vars["out"] = f"s3://{bucket}"
        objects = w.objects()
        if store_at_root:
            for key, data in store_objects(w.shared["reference"]).items():
                objects.write(key, data)
        if foreign:
            objects.write("holiday/cat.jpg", b"a cat")
        w.before = store_objects(w.out)

    return setup


def s3_prefix_with_foreign(w: Work):
    s3_store(w)
    reference_copy(w)
    w.objects().write("notes.txt", b"the user's notes")


def s3_foreign_kept(w: Work):
    assert w.objects().read("notes.txt") == b"the user's notes"


FORGED = r"store \S+: "
HOSTILE = dict(keep=the_store, bound=30, measure=True)
HOSTILE_CASES = [
    # forged shapes: checked against the objects before anything is allocated
    Case(
        "hostile-forged-samples-inspect",
        "inspect {out}",
        hostile(hs.forge_samples, 10**8),
        error=FORGED + r"its metadata claims 100000000 samples but its labels object holds 256",
        **HOSTILE,
    ),
    Case(
        "hostile-forged-samples-distill",
        DISTILL,
        hostile(hs.forge_samples, 10**8),
        error=r"claims 100000000 samples .* holds 256",
        after=no_run_folder,
        **HOSTILE,
    ),
    Case(
        "hostile-forged-samples-resume",
        CACHE,
        hostile(hs.forge_samples, 10**8),
        error=r"claims 100000000 samples",
        only_line=False,
        **{**HOSTILE, "bound": 60},
    ),
    Case(
        "hostile-forged-billion-samples",
        "inspect {out}",
        hostile(hs.forge_samples, 10**9),
        error=FORGED + r"logits claims 31250000 chunks .*a logit store has at most 10000000",
        **HOSTILE,
    ),
    Case(
        "hostile-forged-done-chunks",
        "inspect {out}",
        hostile(hs.forge_done_chunks),
        error=FORGED + r"done claims \d+ chunks",
        **HOSTILE,
    ),
    Case(
        "hostile-chunk-rows-zero",
        "inspect {out}",
        hostile(hs.forge_chunk_rows, 0),
        error=FORGED + r"the chunk shape of logits is",
        **HOSTILE,
    ),
    Case(
        "hostile-chunk-rows-not-a-number",
        "inspect {out}",
        hostile(hs.forge_chunk_rows, "many"),
        error=r"the chunk shape of logits is",
        **HOSTILE,
    ),
    Case(
        "hostile-labels-shorter-than-logits",
        DISTILL,
        hostile(hs.forge_labels_short),
        error=FORGED + r"labels has shape \[50\]",
        after=no_run_folder,
        **HOSTILE,
    ),
    Case(
        "hostile-negative-shape",
        "inspect {out}",
        hostile(hs.forge_shape, "logits", [2, -5, 10]),
        error=r"the shape of logits is",
        **HOSTILE,
    ),
    Case(
        "hostile-shape-not-a-list",
        DISTILL,
        hostile(hs.forge_shape, "order", "big"),
        error=r"the shape of order is \"big\"",
        **HOSTILE,
    ),
    # nested, inflated, garbled metadata
    Case(
        "hostile-nested-root-metadata",
        "inspect {out}",
        hostile(hs.nest_metadata),
        error=FORGED + r"zarr.json nests too deep",
        **HOSTILE,
    ),
    Case(
        "hostile-nested-array-metadata",
        DISTILL,
        hostile(hs.nest_metadata, "views"),
        error=r"views/zarr.json nests too deep",
        **HOSTILE,
    ),
    Case(
        "hostile-inflated-metadata",
        "inspect {out}",
        hostile(hs.inflate_metadata),
        error=r"zarr.json is \d+ bytes, more than any",
        **HOSTILE,
    ),
    Case(
        "hostile-garbled-array-metadata",
        "inspect {out}",
        hostile(hs.garble_metadata, "logits"),
        error=r"logits/zarr.json is not JSON",
        **HOSTILE,
    ),
    # special files and links
    Case(
        "hostile-chunk-fifo-inspect",
        "inspect {out}",
        hostile(hs.chunk_fifo),
        error=FORGED + r"logits/c/0/0/0 is a FIFO, not a file",
        **HOSTILE,
    ),
    Case(
        "hostile-chunk-fifo-distill",
        DISTILL,
        hostile(hs.chunk_fifo),
        error=r"is a FIFO",
        after=no_run_folder,
        **HOSTILE,
    ),
    Case(
        "hostile-chunk-fifo-resume",
        CACHE,
        hostile(hs.chunk_fifo, "order"),
        error=r"order/c/0/0 is a FIFO",
        only_line=False,
        **{**HOSTILE, "bound": 60},
    ),
    Case(
        "hostile-chunk-links-to-dev-zero",
        "inspect {out}",
        hostile(hs.chunk_link, "/dev/zero"),
        error=r"logits/c/0/0/0 is a link that leaves the store \(to /dev/zero\)",
        **HOSTILE,
    ),
    Case(
        "hostile-chunk-links-outside",
        "inspect {out}",
        hostile(hs.chunk_link_outside, extra=lambda w: (w.tmp / "outside.bin",)),
        error=r"is a link that leaves the store",
        **{**HOSTILE, "keep": store_and("outside.bin")},
    ),
    Case(
        "hostile-array-links-outside",
        DISTILL,
        hostile(hs.array_link_outside, extra=lambda w: (w.tmp / "elsewhere",)),
        error=r"order is a link that leaves the store",
        after=no_run_folder,
        **{**HOSTILE, "keep": store_and("elsewhere")},
    ),
    Case(
        "hostile-metadata-links-to-dev-zero",
        "inspect {out}",
        hostile(hs.metadata_link),
        error=r"zarr.json is a link that leaves the store",
        **HOSTILE,
    ),
    Case(
        "hostile-lock-is-a-fifo-inspect", "inspect {out}", hostile(hs.lock_fifo), error=r"\.lock is a FIFO", **HOSTILE
    ),
    Case(
        "hostile-lock-is-a-fifo-cache",
        CACHE,
        hostile(hs.lock_fifo),
        error=r"\.lock is a FIFO",
        only_line=False,
        **{**HOSTILE, "bound": 60},
    ),
    Case("hostile-socket-in-the-store", "inspect {out}", a_socket, error=r"logits/sock is a socket", **HOSTILE),
    Case(
        "hostile-dangling-link",
        "inspect {out}",
        hostile(hs.dangling_link),
        error=r"is a link to nothing \(a dangling link\)",
        **HOSTILE,
    ),
    # foreign objects: a store removes and replaces only what it wrote
    Case(
        "foreign-notes-kept-by-overwrite",
        CACHE + " --seed 3 --overwrite",
        foreign_entry("notes.txt"),
        code=0,
        keep=lambda w: [Path(w.out) / "notes.txt"],
        bound=120,
    ),
    Case(
        "foreign-folder-kept-by-overwrite",
        CACHE + " --seed 3 --overwrite",
        foreign_entry("my-notes", None),
        code=0,
        keep=lambda w: [Path(w.out) / "my-notes"],
        bound=120,
    ),
    Case(
        "foreign-partial-file-kept-by-resume",
        CACHE,
        foreign_entry("download.partial"),
        code=0,
        keep=lambda w: [Path(w.out) / "download.partial"],
        bound=120,
        after=complete_and_unlocked,
    ),
    Case(
        "weights-inside-the-store-kept-by-overwrite",
        CACHE + " --seed 3 --overwrite",
        weights_inside_the_store,
        code=0,
        keep=lambda w: [Path(w.out) / "teacher.pt"],
        bound=120,
    ),
    Case(
        "weights-inside-what-overwrite-removes-refused",
        CACHE + " --seed 3 --overwrite",
        weights_inside_the_stores_own_entry,
        error=r"--weights \S+/logits/teacher.pt lies inside what --overwrite would remove from the store",
        only_line=False,
        keep=the_store,
        bound=120,
    ),
    Case(
        "s3-no-store-at-an-empty-bucket-root",
        CACHE,
        s3_bucket("empty", foreign=False),
        only_line=False,
        error=r"s3://empty-\w+ is a whole bucket: .*name a prefix such as s3://empty-\w+/logits.zarr",
        after=unchanged,
        slow=True,
    ),
    Case(
        "s3-bucket-root-store-not-replaced",
        CACHE + " --seed 3 --overwrite",
        s3_bucket("photos", store_at_root=True),
        only_line=False,
        error=r"is a whole bucket",
        after=unchanged,
        slow=True,
    ),
    Case(
        "s3-foreign-object-kept-by-overwrite",
        CACHE + " --seed 3 --overwrite",
        s3_prefix_with_foreign,
        code=0,
        after=s3_foreign_kept,
        slow=True,
    ),
    # stored strings shown safely
    Case(
        "strings-control-characters-escaped",
        "inspect {out}",
        several(
            hostile(hs.set_attr, "command_line", "dhkd-pipe cache-teacher --model resnet8 " + hs.ESCAPES), damaged_chunk
        ),
        code=1,
        error=r"is damaged: .*\\x1b\[2J",
        after=no_raw_control,
        keep=the_store,
        bound=30,
    ),
    Case(
        "strings-repair-hint-quoted",
        "inspect {out}",
        several(
            hostile(hs.set_attr, "command_line", "dhkd-pipe cache-teacher --model resnet8" + hs.SHELL_TAIL),
            damaged_chunk,
        ),
        code=1,
        error=r"is damaged",
        after=hint_is_quoted,
        keep=the_store,
        bound=30,
    ),
    Case(
        "strings-forged-command-not-suggested",
        "inspect {out}",
        several(hostile(hs.set_attr, "command_line", "rm -rf ~"), damaged_chunk),
        code=1,
        error=r"is damaged",
        after=forged_command_not_suggested,
        keep=the_store,
        bound=30,
    ),
    Case(
        "strings-tool-version-escaped",
        "inspect {out}",
        hostile(hs.set_attr, "tool_version", "1.0" + hs.ESCAPES),
        code=0,
        after=no_raw_control,
        keep=the_store,
        bound=30,
    ),
    Case(
        "strings-dataset-name-escaped",
        DISTILL + " --data digits@256",
        hostile(hs.set_dataset_field, "kind", "digits" + hs.ESCAPES),
        error=r"store does not match the data: kind is digits\\x1b",
        after=no_raw_control,
        keep=the_store,
        bound=60,
    ),
    # a resumed run refuses another store; values checked where they enter
    Case(
        "resume-refuses-a-replaced-store",
        DISTILL + " --epochs 2 --resume",
        replaced_after_a_stopped_run,
        error=r"--resume: the store is not the one this run started from: it started from \S+ \(command \w+\), "
        r"--cache now holds "
        r"\S+ \(command \w+\); seed was 0, now 1",
        keep=the_store,
        bound=120,
    ),
    Case(
        "verify-cache-zero-samples",
        "verify-cache {out} --samples 0",
        reference_copy,
        error=r"bad --samples 0: must be at least 1",
        keep=the_store,
        bound=30,
    ),
    Case(
        "verify-cache-nan-tolerance",
        "verify-cache {out} --tolerance nan",
        reference_copy,
        error=r"bad --tolerance nan: must be a finite",
        keep=the_store,
        bound=30,
    ),
    Case(
        "verify-cache-negative-tolerance",
        "verify-cache {out} --tolerance -1",
        reference_copy,
        error=r"bad --tolerance -1",
        keep=the_store,
        bound=30,
    ),
]


# ---- issue 27: the store's metadata against its schema; inputs stage 1 and verify-cache refuse -----------


def inspect_lists(pattern: str):
    """``inspect --json`` names the difference in ``metadata`` and exits 1, without a damage scan."""

    def after(w: Work):
        code, out, err = invoke(["inspect", "--json", w.out])
        summary = json.loads(out)
        assert code == 1 and summary["damaged"] is None, err
        assert any(re.search(pattern, line) for line in summary["metadata"]), summary["metadata"]

    return after


def says_which_weights(w: Work):
    assert re.search(r"teacher weights \S+teacher.pt, as the store records them", w.vars["stderr"]), w.vars["stderr"]


def weights_record_names(kind: str):
    """The store's teacher record names another file: a sparse 8 GiB disk image, or a FIFO."""

    def setup(w: Work):
        reference_copy(w)
        path = w.tmp / "disk.img"
        if kind == "fifo":
            os.mkfifo(path)
        else:
            with open(path, "wb") as f:
                f.truncate(8 << 30)
        hs.set_record_field(Path(w.out), "teacher", "weights", str(path))

    return setup


def images_copy(link: bool = False):
    """The image folder copied into the work folder (``keep`` holds it); ``link``: and a link to its train/."""

    def setup(w: Work):
        root = w.tmp / "images"
        shutil.copytree(w.shared["images"], root)
        w.vars["images"] = str(root)
        if link:
            os.symlink(root / "train", w.tmp / "link")

    return setup


def the_images(w: Work) -> list:
    return [w.vars["images"]]


def symlinked_store(w: Work):
    copy_store(w.shared["reference"], str(w.tmp / "real.zarr"))
    os.symlink(w.tmp / "real.zarr", w.out)


METADATA = r"its metadata differs from a logit store's: "
NO_RESUME = r"a resume cannot repair metadata: restore the store's zarr.json files from a copy, or write it anew"
SCHEMA = dict(keep=the_store, bound=30, measure=True)
SCHEMA_CASES = [
    # attributes missing or of the wrong type: one line where a traceback was
    Case(
        "schema-policy-missing-distill",
        DISTILL,
        hostile(hs.drop_attr, "policy"),
        error=METADATA + r"no attribute 'policy', which cache-teacher records; " + NO_RESUME,
        after=no_run_folder,
        **SCHEMA,
    ),
    Case(
        "schema-data-spec-not-text-distill",
        DISTILL,
        hostile(hs.set_attr, "data_spec", 5),
        error=METADATA + r"attribute data_spec is 5, where a logit store has text",
        after=no_run_folder,
        **SCHEMA,
    ),
    Case(
        "schema-teacher-missing-verify",
        "verify-cache {out}",
        hostile(hs.drop_attr, "teacher"),
        error=METADATA + r"no attribute 'teacher'",
        **SCHEMA,
    ),
    Case(
        "schema-teacher-not-an-object-verify",
        "verify-cache {out}",
        hostile(hs.set_attr, "teacher", [1]),
        error=METADATA + r"attribute teacher is \[1\], where a logit store has an object",
        **SCHEMA,
    ),
    Case(
        "schema-policy-not-an-object-verify",
        "verify-cache {out}",
        hostile(hs.set_attr, "policy", "x"),
        error=METADATA + r"attribute policy is x, where a logit store has an object",
        **SCHEMA,
    ),
    # an array's dtype or codecs changed: inspect names it, and the advice is one that works
    Case(
        "schema-dtype-changed-inspect",
        "inspect {out}",
        hostile(hs.set_array_field, "logits", "data_type", "float32"),
        code=1,
        error=METADATA + r"logits has data type float32, where this store's is float16; " + NO_RESUME,
        after=inspect_lists(r"logits has data type float32"),
        **SCHEMA,
    ),
    Case(
        "schema-dtype-changed-distill-overwrite-repairs",
        DISTILL,
        hostile(hs.set_array_field, "logits", "data_type", "float32"),
        error=METADATA + r"logits has data type float32.* with --overwrite: dhkd-pipe cache-teacher .* --overwrite$",
        after=then(no_run_folder, rerun(template=CACHE + " --overwrite")),
        **SCHEMA,
    ),
    Case(
        "schema-checksum-dropped-resume",
        CACHE,
        hostile(hs.drop_checksum),
        error=METADATA + r"logits has codecs bytes, blosc: a logit store's are bytes, blosc, crc32c; " + NO_RESUME,
        only_line=False,
        **{**SCHEMA, "bound": 60},
    ),
    # a hostile pass over the arrays' metadata
    Case(
        "schema-order-chunk-shape",
        "inspect {out}",
        hostile(hs.set_chunk_shape, "order", [1, 32]),
        code=1,
        error=METADATA + r"order has chunk grid .*\[1, 32\].*, where a logit store's is regular, \[1, 64\]",
        **SCHEMA,
    ),
    Case(
        "schema-fill-value",
        "inspect {out}",
        hostile(hs.set_array_field, "logits", "fill_value", 7),
        code=1,
        error=METADATA + r"logits has fill value 7, where a logit store's is 0",
        **SCHEMA,
    ),
    Case(
        "schema-dimension-names-distill",
        DISTILL,
        hostile(hs.set_array_field, "views", "dimension_names", ["epoch", "row", "box"]),
        error=METADATA + r"views has dimension names",
        after=no_run_folder,
        **SCHEMA,
    ),
    Case(
        "schema-unknown-array-key",
        "inspect {out}",
        hostile(hs.set_array_field, "labels", "storage_hint", {"must_understand": False}),
        code=1,
        error=METADATA + r"labels has 'storage_hint', which no logit store's array has",
        **SCHEMA,
    ),
    Case(
        "schema-key-separator-distill",
        DISTILL,
        hostile(hs.set_key_separator, "order", "."),
        error=METADATA + r"order has chunk key encoding",
        after=no_run_folder,
        **SCHEMA,
    ),
    Case(
        "schema-blosc-typesize",
        "inspect {out}",
        hostile(hs.set_blosc, "views", "typesize", 1),
        code=1,
        error=METADATA + r"views has codecs bytes, blosc, crc32c: Blosc of a logit store",
        **SCHEMA,
    ),
    Case(
        "schema-scale-array-in-fp16-store",
        "inspect {out}",
        hostile(hs.scale_array_in_fp16_store),
        code=1,
        error=METADATA + r"logit_scale is an array only an int8 store has",
        **SCHEMA,
    ),
    Case(
        "schema-consolidated-metadata",
        DISTILL,
        hostile(hs.consolidate),
        error=METADATA + r"zarr.json.consolidated_metadata is .*, where a logit store has null",
        after=no_run_folder,
        **SCHEMA,
    ),
    Case(
        "schema-chunk-grid-not-an-object",
        "inspect {out}",
        hostile(hs.set_array_field, "logits", "chunk_grid", "regular"),
        error=FORGED + r"the chunk shape of logits is null",
        **SCHEMA,
    ),
    Case(
        "schema-codecs-an-object",
        "inspect {out}",
        hostile(hs.set_array_field, "logits", "codecs", {"bytes": {}}),
        error=METADATA + r"logits has codecs \{\"bytes\": \{\}\}: a logit store's are bytes, blosc, crc32c",
        **SCHEMA,
    ),
    # a hostile pass over the attributes
    Case(
        "schema-format-version-text",
        "inspect {out}",
        hostile(hs.set_attr, "format_version", "1"),
        error=r"has format version \"1\"; this tool reads version 1$",
        **SCHEMA,
    ),
    Case(
        "schema-unknown-codec",
        "inspect {out}",
        hostile(hs.set_attr, "codec", "fp8"),
        error=METADATA + r"attribute codec is fp8, where a logit store has one of fp16, bf16, fp32, int8",
        **SCHEMA,
    ),
    Case(
        "schema-deep-command",
        "inspect {out}",
        hostile(hs.nest_attr, "command"),
        code=1,
        error=METADATA + r"attribute command nests 900 levels deep, a logit store's at most 16",
        **SCHEMA,
    ),
    Case(
        "schema-huge-scale-list-distill",
        DISTILL,
        hostile(hs.set_record_field, "policy", "scale", [0.5] * 100_000),
        error=METADATA + r"attribute policy.scale is \[0.5, 0.5, .*\.\.\., where a logit store has a list of 2 values",
        after=no_run_folder,
        **SCHEMA,
    ),
    Case(
        "schema-dataset-count-differs-from-arrays",
        DISTILL,
        hostile(hs.set_dataset_field, "num_samples", 300),
        error=METADATA + r"attribute dataset.num_samples is 300 where the arrays hold 256",
        after=no_run_folder,
        **SCHEMA,
    ),
    Case(
        "schema-negative-seed",
        "inspect {out}",
        hostile(hs.set_attr, "seed", -1),
        code=1,
        error=METADATA + r"attribute seed is -1, where a logit store has at least 0",
        **SCHEMA,
    ),
    Case(
        "schema-teacher-digest-a-number-verify",
        "verify-cache {out}",
        hostile(hs.set_record_field, "teacher", "weights_digest", 750),
        error=METADATA + r"attribute teacher.weights_digest is 750, where a logit store has text",
        **SCHEMA,
    ),
    Case(
        "store-path-is-a-file-distill",
        DISTILL,
        user_file,
        error=r"notes.txt is not a logit store \(no zarr.json\)",
        after=no_run_folder,
        keep=the_store,
        bound=30,
    ),
    Case(
        "schema-symlinked-store-reads", "inspect {out}", symlinked_store, code=0, keep=store_and("real.zarr"), bound=30
    ),
]

INPUT_CASES = [
    Case(
        "store-inside-the-image-folders-train",
        IMAGES.replace("--out {out}", "--out {images}/train/s.zarr"),
        images_copy(),
        error=r"--out \S+/images/train/s.zarr lies inside the folder of --data \(\S+/images\): a store there would "
        r"become part of the data set; write it elsewhere",
        keep=the_images,
        bound=30,
    ),
    Case(
        "store-at-the-data-root",
        IMAGES.replace("--out {out}", "--out {images}"),
        images_copy(),
        error=r"lies inside the folder of --data",
        keep=the_images,
        bound=30,
    ),
    Case(
        "store-through-a-link-into-the-data",
        IMAGES.replace("--out {out}", "--out {tmp}/link/s.zarr"),
        images_copy(link=True),
        error=r"--out \S+/link/s.zarr lies inside the folder of --data",
        keep=the_images,
        bound=30,
    ),
    Case(
        "workers-beyond-the-cores-clamped",
        IMAGES + " --workers 1024",
        code=0,
        after=image_store_sound,
        bound=180,
    ),
    Case(
        "verify-cache-says-which-weights",
        "verify-cache {out} --samples 16",
        reference_copy,
        code=0,
        after=says_which_weights,
        keep=the_store,
        bound=60,
    ),
    Case(
        "verify-cache-record-names-a-large-file",
        "verify-cache {out} --samples 16",
        weights_record_names("big"),
        error=r"teacher weights \S+/disk.img are 8589934592 bytes where its teacher's are \d+ bytes: not the file "
        r"it was written with; pass --teacher-weights FILE",
        keep=the_store,
        bound=15,
    ),
    Case(
        "verify-cache-record-names-a-fifo",
        "verify-cache {out} --samples 16",
        weights_record_names("fifo"),
        error=r"checkpoint file not found: \S+/disk.img",
        keep=store_and("disk.img"),
        bound=15,
    ),
]


CASES = [
    # one writer per store: the lock, its holder and the stale-lock rule
    Case(
        "lock-held-by-live-process",
        CACHE,
        plant_lock(live_pid),
        error=HELD + r".*\(dhkd-pipe distill \.\.\.\); wait for it to finish or stop it \(kill \d+\)",
        after=holder_kept,
    ),
    Case("lock-held-on-empty-location", CACHE, plant_lock(live_pid, store=False), error=HELD, after=holder_kept),
    Case("overwrite-refused-while-held", CACHE + " --overwrite", plant_lock(live_pid), error=HELD, after=holder_kept),
    Case(
        "lock-held-on-another-host",
        CACHE,
        plant_lock(other_host),
        error=HELD + r"elsewhere\.example, .*if it is no longer running, run again with --break-lock",
        after=holder_kept,
    ),
    Case(
        "break-lock-of-another-host",
        CACHE + " --break-lock",
        plant_lock(other_host),
        code=0,
        after=complete_and_unlocked,
    ),
    Case(
        "break-lock-refuses-a-live-local-holder",
        CACHE + " --break-lock",
        plant_lock(live_pid),
        error=HELD,
        after=holder_kept,
    ),
    Case("stale-lock-dead-pid", CACHE, plant_lock(dead_pid), code=0, after=complete_and_unlocked),
    Case("stale-lock-zombie", CACHE, plant_lock(zombie_pid), code=0, after=complete_and_unlocked),
    Case("stale-lock-reused-pid", CACHE, plant_lock(reused_pid), code=0, after=complete_and_unlocked),
    Case("garbled-old-lock", CACHE, plant_lock(raw=b"\x00garbage", age=60), code=0, after=complete_and_unlocked),
    Case("memory-lock-held", CACHE, several(memory_store, plant_lock(live_pid)), error=HELD, after=holder_kept),
    Case("memory-stale-lock", CACHE, several(memory_store, plant_lock(dead_pid)), code=0, after=complete_and_unlocked),
    # --overwrite replaces only a logit store
    Case(
        "overwrite-a-file",
        CACHE + " --overwrite",
        user_file,
        error=r"is a file, not a logit store; .*never a file",
        after=unchanged,
    ),
    Case(
        "out-is-a-file", CACHE, user_file, error=r"is a file, not a logit store; choose another path$", after=unchanged
    ),
    Case(
        "overwrite-a-user-folder",
        CACHE + " --overwrite",
        user_folder,
        error=r"exists and is not a logit store; refusing to delete it",
        after=unchanged,
    ),
    Case(
        "overwrite-another-zarr-store",
        CACHE + " --overwrite",
        foreign_zarr,
        error=r"holds a Zarr store that is not a logit store; refusing to delete it",
        after=unchanged,
    ),
    # nothing half-written: inputs checked before the store exists, a failed store removed
    Case(
        "nan-teacher-weights",
        CACHE,
        teacher_file(nan=True),
        error=r"the weights in \S+bad-teacher\.pt are not finite",
        after=then(no_store, rerun(good_teacher)),
    ),
    Case(
        "teacher-logits-overflow",
        CACHE,
        teacher_file(huge=True),
        error=r"teacher logits are not finite \(infinite in row \d+ of the first batch\)",
        after=then(no_store, rerun(good_teacher)),
    ),
    Case(
        "fp16-range-exceeded",
        CACHE,
        teacher_file(scale=1e5),
        error=r"exceed the fp16 range .*use --codec bf16 or fp32",
        after=then(no_store, rerun(good_teacher)),
    ),
    Case(
        "nan-teacher-on-memory",
        CACHE,
        several(memory_store, teacher_file(nan=True)),
        error=r"not finite",
        after=then(no_store, rerun(good_teacher)),
    ),
    Case(
        "teacher-cannot-take-the-images",
        IMAGES.replace(" --resolution 32", ""),
        code=2,
        error=r"the teacher resnet8 is built for 32x32 inputs and cannot take the data's 224x224 images; "
        r"pass --resolution 32",
        after=no_store,
    ),
    Case("empty-store-of-a-failed-run", CACHE, empty_store_of_another_command, code=0, after=complete_and_unlocked),
    Case(
        "zero-byte-image",
        IMAGES,
        image_folder("empty"),
        error=r"cannot read image header of \S+2\.JPEG",
        after=then(no_store, rerun(restore_image, IMAGES, image_store_sound)),
        slow=True,
    ),
    Case(
        "truncated-image",
        IMAGES,
        image_folder("truncated"),
        error=r"2\.JPEG",
        after=then(no_store, rerun(restore_image, IMAGES, image_store_sound)),
        slow=True,
    ),
    # damage is found and repaired
    Case(
        "inspect-deleted-chunk",
        "inspect {out}",
        damage_unit("logits", "delete"),
        code=1,
        error=r"is damaged: logits epoch 1 chunk 2 \(logits/c/1/2/0\): missing; re-run cache-teacher with the same "
        r"command to rewrite it: dhkd-pipe cache-teacher ",
        after=then(rerun(), inspect_clean),
    ),
    Case(
        "inspect-flipped-bit",
        "inspect {out}",
        damage_unit("logits", "flip"),
        code=1,
        error=r"logits epoch 1 chunk 2 \(\S+\): checksum mismatch",
        after=then(rerun(), inspect_clean),
    ),
    Case(
        "inspect-no-checksums-truncated",
        "inspect --no-checksums {out}",
        damage_unit("views", "empty"),
        code=1,
        error=r"views epoch 1 chunk 2 \(\S+\): truncated",
        after=then(inspect_names_damage, rerun(), inspect_clean),
    ),
    Case("leftovers-of-killed-writers-removed", CACHE, killed_writers_leftovers, code=0, after=complete_and_unlocked),
    Case(
        "repair-deleted-chunk",
        CACHE,
        damage_unit("order", "delete", epoch=0, chunk=3),
        code=0,
        after=then(complete_and_unlocked, inspect_clean),
    ),
    Case(
        "repair-flipped-bit",
        CACHE,
        damage_unit("logits", "flip"),
        code=0,
        after=then(complete_and_unlocked, inspect_clean),
    ),
    Case(
        "repair-truncated-chunk",
        CACHE,
        damage_unit("views", "truncate", epoch=0, chunk=0),
        code=0,
        after=complete_and_unlocked,
    ),
    Case("repair-done-flags", CACHE, damage_unit("done", "flip"), code=0, after=complete_and_unlocked),
    Case("repair-labels", CACHE, damage_unit("labels", "flip"), code=0, after=complete_and_unlocked),
    Case(
        "repair-on-memory",
        CACHE,
        several(memory_store, damage_unit("logits", "flip", epoch=0, chunk=1)),
        code=0,
        after=complete_and_unlocked,
    ),
    Case(
        "distill-deleted-chunk",
        DISTILL,
        damage_unit("logits", "delete"),
        error=r"store \S+ is damaged: logits epoch 1 chunk 2 \(logits/c/1/2/0\): missing; re-run cache-teacher "
        r"with the same command",
        after=then(no_run_folder, rerun()),
    ),
    Case(
        "distill-truncated-chunk",
        DISTILL,
        damage_unit("views", "empty", epoch=0, chunk=0),
        error=r"views epoch 0 chunk 0 .*truncated",
        after=no_run_folder,
    ),
    Case(
        "distill-flipped-bit",
        DISTILL,
        damage_unit("logits", "flip", epoch=0, chunk=0),
        only_line=False,
        error=r"logits epoch 0 chunk 0 is damaged \(checksum mismatch\); re-run cache-teacher with the same command",
    ),
    # the disk fills up during stage 1
    Case(
        "disk-full-before-first-unit",
        CACHE,
        full_disk(12 << 10),
        only_line=False,
        error=r"No space left on device \(ENOSPC\)",
        after=then(no_store, rerun(free_disk)),
    ),
    Case(
        "disk-full-mid-store",
        CACHE,
        full_disk(96 << 10),
        only_line=False,
        error=r"No space left on device \(ENOSPC\)",
        after=then(units_kept, rerun(free_disk)),
    ),
    # the same on S3 (a moto server): conditional PUTs make the lock
    Case(
        "s3-lock-held",
        CACHE,
        several(s3_store, plant_lock(live_pid)),
        error=HELD + r".*kill \d+\)$",
        after=holder_kept,
        slow=True,
    ),
    Case(
        "s3-lock-of-another-host",
        CACHE,
        several(s3_store, plant_lock(other_host)),
        error=HELD + r".*--break-lock$",
        after=then(holder_kept, rerun(template=CACHE + " --break-lock")),
        slow=True,
    ),
    Case(
        "s3-stale-lock", CACHE, several(s3_store, plant_lock(dead_pid)), code=0, after=complete_and_unlocked, slow=True
    ),
    Case(
        "s3-nan-teacher",
        CACHE,
        several(s3_store, teacher_file(nan=True)),
        error=r"not finite",
        after=then(no_store, rerun(good_teacher)),
        slow=True,
    ),
    Case(
        "s3-repair-flipped-bit",
        CACHE,
        several(s3_store, damage_unit("logits", "flip")),
        code=0,
        after=complete_and_unlocked,
        slow=True,
    ),
    Case(
        "s3-distill-deleted-chunk",
        DISTILL,
        several(s3_store, damage_unit("order", "delete", epoch=0, chunk=1)),
        error=r"is damaged: order epoch 0 chunk 1 \(order/c/0/1\): missing; re-run cache-teacher",
        after=no_run_folder,
        slow=True,
    ),
    *HOSTILE_CASES,
    *SCHEMA_CASES,
    *INPUT_CASES,
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES])
def test_fault(case: Case, shared, tmp_path, request):
    w = Work(tmp_path, shared, request)
    try:
        if case.setup is not None:
            case.setup(w)
        kept = hs.files_of(case.keep(w)) if case.keep else None
        code, out, err, seconds, peak = _timed(w.command(case.command), case)
        w.vars["stdout"], w.vars["stderr"] = out, err
        assert code == case.code, err[-3000:]
        if case.error is not None:
            assert_one_error_line(err, case.error, case.only_line)
        else:
            assert not CHATTER.search(err), err[-3000:]
        if case.bound is not None:
            assert seconds <= case.bound, f"took {seconds:.1f} s (bound {case.bound:.0f} s)"
        if case.measure:
            _record(request, case.id, seconds, peak)
            assert peak <= HOSTILE_PEAK_BYTES, f"peak memory {peak / 2**20:.0f} MiB"
        if kept is not None:
            assert hs.files_of(case.keep(w)) == kept, "a file the user had changed or went away"
        assert_no_partial_writes(w.out)
        if case.after is not None:
            case.after(w)
            assert_no_partial_writes(w.out)
    finally:
        for undo in reversed(w.cleanup):
            undo()


HOSTILE_PEAK_BYTES = 256 << 20  # Python-side allocations of one hostile case (numpy and zarr included)


def _timed(args: list[str], case: Case):
    """(code, stdout, stderr, seconds, peak bytes traced or 0); past the case's bound plus a margin
    an alarm ends the command (a hang fails the case instead of the suite)."""

    def expire(signum, frame):
        raise TimeoutError(f"{case.id}: no end within {case.bound + 30:.0f} s")

    old = signal.signal(signal.SIGALRM, expire) if case.bound else None
    if case.bound:
        signal.alarm(int(case.bound + 30))
    if case.measure:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        code, out, err = invoke(args)
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if case.measure else 0
        if case.measure:
            tracemalloc.stop()
        if case.bound:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    return code, out, err, seconds, peak


def _record(request, case_id: str, seconds: float, peak: int):
    """One line per hostile case (time, peak memory), printed at the end of the session."""
    lines = request.config.stash.setdefault(_HOSTILE_KEY, [])
    lines.append(f"{case_id:<40} {seconds:6.2f} s  {peak / 2**20:7.1f} MiB")


_HOSTILE_KEY = pytest.StashKey[list]()


@pytest.fixture(scope="module", autouse=True)
def hostile_report(request):
    """After the module: the hostile-store family's time and peak memory, one line per case."""
    yield
    lines = request.config.stash.get(_HOSTILE_KEY, [])
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if lines and reporter is not None:
        reporter.write_line("\nhostile stores: time and peak Python memory (tracemalloc) of each command")
        for line in lines:
            reporter.write_line("  " + line)


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 20


def test_inspect_names_the_writer(shared, tmp_path, request):
    w = Work(tmp_path, shared, request)
    try:
        plant_lock(live_pid)(w)
        code, out, err = invoke(["inspect", "--json", w.out])
        assert code == 0, err
        writer = json.loads(out)["writer"]
        assert re.match(rf"pid \d+ on {re.escape(HOST)}, started .*\(dhkd-pipe distill \.\.\.\)$", writer), writer
    finally:
        for undo in reversed(w.cleanup):
            undo()


# ---- the lock itself: races, release ----------------------------------------------------------------


def _race(location: str, n: int = 6) -> tuple[list, list]:
    """``n`` threads take the lock of ``location`` at once: (locks taken, errors)."""
    import threading

    objects = StoreObjects(open_store(location, read_only=False), location)
    start, taken, refused = threading.Barrier(n), [], []

    def take():
        start.wait()
        try:
            taken.append(StoreLock.acquire(objects, "racer"))
        except Exception as e:  # noqa: BLE001 (collected and asserted)
            refused.append(e)

    threads = [threading.Thread(target=take) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return taken, refused


def _assert_one_winner(location: str, stale: dict | None = None):
    if stale is not None:
        StoreObjects(open_store(location, read_only=False), location).write(LOCK_KEY, json.dumps(stale).encode())
    taken, refused = _race(location)
    assert len(taken) == 1, (taken, refused)
    assert all(re.match(HELD, str(e)) for e in refused), refused
    objects = StoreObjects(open_store(location), location)
    assert read_holder(objects)["token"] == taken[0].holder["token"]
    taken[0].release()
    assert not objects.exists(LOCK_KEY)


def test_one_of_racing_takers_wins_on_disk(tmp_path):
    _assert_one_winner(str(tmp_path / "s.zarr"))


def test_one_of_racing_takers_of_a_stale_lock_wins_on_disk(tmp_path):
    _assert_one_winner(str(tmp_path / "s.zarr"), stale=dead_pid(None))


@pytest.mark.slow
def test_one_of_racing_takers_wins_on_s3(s3):
    location = f"s3://{BUCKET}/race-{uuid.uuid4().hex[:8]}/s.zarr"
    _assert_one_winner(location)  # If-None-Match: *
    _assert_one_winner(location, stale=dead_pid(None))  # If-Match: the stale lock's ETag


def test_a_lock_broken_by_another_is_left_to_it(tmp_path):
    """Release removes only this holder's lock: one that another process took over is theirs."""
    location = str(tmp_path / "s.zarr")
    objects = StoreObjects(open_store(location, read_only=False), location)
    lock = StoreLock.acquire(objects, "first")
    other = {"host": "node-7.cluster.example", "pid": 1, "started": time.time(), "token": "theirs"}
    os.remove(os.path.join(location, LOCK_KEY))  # as --break-lock elsewhere would replace it
    objects.write(LOCK_KEY, json.dumps(other).encode())
    lock.release()
    assert read_holder(objects)["token"] == "theirs"


def test_the_lock_is_released_on_an_interrupt(shared, tmp_path, monkeypatch):
    """The lock is held while units are written; a KeyboardInterrupt in the middle of stage 1
    releases it and keeps the units written, and the re-run completes the store."""
    from dhkd_pipe.config import CacheConfig
    from dhkd_pipe.stages import cache_teacher as stage
    from dhkd_pipe.store import writer as store_writer

    out = tmp_path / "s.zarr"
    calls = []
    real = store_writer.write_unit

    def write_then_stop(cache, *a, **k):
        holder = read_holder(cache.objects)  # held, by this process, while the units are written
        assert holder is not None and holder["pid"] == os.getpid(), holder
        real(cache, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(store_writer, "write_unit", write_then_stop)
    monkeypatch.setattr(store_writer, "WRITE_THREADS", 1)  # one unit at a time: exactly two are written before the stop
    cfg = CacheConfig(
        data="digits@256",
        model="resnet8",
        weights=str(shared["teacher"]),
        views=2,
        chunk_rows=64,
        batch_size=64,
        out=str(out),
    ).validate()
    with pytest.raises(KeyboardInterrupt):
        stage.cache_teacher(cfg, log=lambda *a: None)
    objects = StoreObjects(open_store(str(out)), str(out))
    assert not objects.exists(LOCK_KEY)
    assert LogitCache.open(str(out)).done_mask().sum() == 2
    monkeypatch.undo()
    stage.cache_teacher(cfg, log=lambda *a: None)
    same_as_reference(str(out), str(shared["reference"]))


# ---- real processes -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_cache_teacher_runs_on_one_store(shared, tmp_path):
    """Two processes started together on one --out: one writes the store, the other exits 2 with the
    lock's line naming the first; the store is whole and unlocked afterwards."""
    out = tmp_path / "s.zarr"
    args = [BIN, *shlex.split(CACHE.format(teacher=shared["teacher"], out=out))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close(), p.stderr.close()
    codes = sorted(code for code, _ in results)
    refused = [err for code, err in results if code == 2]
    if codes == [0, 0]:  # the first had finished before the second looked: the second found the store whole
        pytest.skip("the two runs did not overlap on this machine")
    assert codes == [0, 2], results
    assert_one_error_line(refused[0], HELD + r".*cache-teacher")
    same_as_reference(str(out), str(shared["reference"]))
    assert not (out / LOCK_KEY).exists()


@pytest.mark.slow
def test_a_second_run_while_one_writes(shared, tmp_path):
    """While a cache-teacher process writes the store, a second run (here, in this process) is
    refused at once; the first completes."""
    out = tmp_path / "s.zarr"
    args = [
        BIN,
        *shlex.split(
            CACHE.replace("digits@256", "digits")
            .replace("--views 2", "--views 6")
            .format(teacher=shared["teacher"], out=out)
        ),
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "done").exists() and (out / LOCK_KEY).exists():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        code, _, err = invoke(shlex.split(CACHE.format(teacher=shared["teacher"], out=out)) + ["--overwrite"])
        assert code == 2
        assert_one_error_line(
            err, rf"is being written by another process: pid {proc.pid} on {re.escape(HOST)}, .*\(kill {proc.pid}\)$"
        )
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    cache = LogitCache.open(str(out))
    cache.check_complete()
    assert damage(cache) == [] and not (out / LOCK_KEY).exists()


@pytest.mark.slow
def test_sigterm_mid_store_releases_the_lock_and_keeps_the_units(shared, tmp_path):
    """SIGTERM while units are being written: one line, exit 143, the lock gone, the units written
    kept (done flags after data), and the re-run completes the store."""
    import signal

    out = tmp_path / "s.zarr"
    command = (
        CACHE.replace("digits@256", "digits")
        .replace("--views 2", "--views 6")
        .format(teacher=shared["teacher"], out=out)
    )
    proc = subprocess.Popen(
        [BIN, *shlex.split(command)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "done" / "c").exists() and any((out / "done" / "c").rglob("*")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert code == 128 + signal.SIGTERM, err
    assert_one_error_line(err, r"^interrupted by SIGTERM", only_line=False)
    assert not (out / LOCK_KEY).exists()
    done = LogitCache.open(str(out)).done_mask()
    assert 0 < done.sum() < done.size
    assert_no_partial_writes(str(out))
    code, _, err = invoke(shlex.split(command))
    assert code == 0, err
    cache = LogitCache.open(str(out))
    cache.check_complete()
    assert damage(cache) == []


@pytest.mark.slow
def test_two_ranks_write_one_store_under_one_lock(shared, tmp_path):
    """accelerate launch: rank 0 takes the lock for the run, both ranks write; the store is the
    one-process store and the lock is gone."""
    out = tmp_path / "s.zarr"
    accelerate_launch(*shlex.split(CACHE.format(teacher=shared["teacher"], out=out)), timeout=600)
    same_as_reference(str(out), str(shared["reference"]))
    assert not (out / LOCK_KEY).exists()


@pytest.mark.slow
def test_a_frozen_object_store_ends_in_one_line_by_the_storage_timeouts(shared, tmp_path):
    """An S3 endpoint that accepts connections and never answers (a listening socket nobody
    serves): ``inspect`` and ``cache-teacher`` end by the storage timeouts, in one line. The
    timeouts are cut to 1 s (connect) and 2 s (read) through the environment, and both commands
    wait at once: with the defaults (5 s and 8 s) the same ending took 35-44 s here, all of it waiting."""
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(64)
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{frozen.getsockname()[1]}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "DHKD_STORE_CONNECT_TIMEOUT": "1",
        "DHKD_STORE_READ_TIMEOUT": "2",
    }
    commands = {
        "inspect": ["inspect", "s3://dhkd/frozen.zarr"],
        "cache-teacher": shlex.split(CACHE.format(teacher=shared["teacher"], out="s3://dhkd/frozen.zarr")),
    }
    began, ended, procs = time.monotonic(), {}, {}
    try:
        for name, args in commands.items():
            procs[name] = subprocess.Popen(
                [BIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        outputs = {}
        for name, proc in procs.items():  # each one's end is known no later than its communicate returns
            outputs[name] = proc.communicate(timeout=120)
            ended[name] = time.monotonic()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        frozen.close()
    for name, proc in procs.items():
        stderr = outputs[name][1]
        assert proc.returncode == 2, (name, stderr[-3000:])
        assert_one_error_line(
            stderr,
            r"store s3://dhkd/frozen.zarr: cannot .*(timeout|timed out|Read timeout|Connect timeout)",
            only_line=name == "inspect",
        )
        assert ended[name] - began < 30, (
            f"{name} took {ended[name] - began:.0f} s"
        )  # (1 + 2) s x 2 attempts per call, a few calls


def test_storage_timeouts_come_from_the_environment(monkeypatch):
    from dhkd_pipe.store.objects import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, storage_timeouts

    monkeypatch.delenv("DHKD_STORE_CONNECT_TIMEOUT", raising=False)
    monkeypatch.delenv("DHKD_STORE_READ_TIMEOUT", raising=False)
    assert (
        storage_timeouts()
        == {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S}
        == {"connect_timeout": 5, "read_timeout": 8}
    )
    monkeypatch.setenv("DHKD_STORE_READ_TIMEOUT", "120.5")
    assert storage_timeouts() == {"connect_timeout": 5, "read_timeout": 120.5}
    for bad in ("0", "-1", "nan", "inf", "soon", "7200"):
        monkeypatch.setenv("DHKD_STORE_CONNECT_TIMEOUT", bad)
        with pytest.raises(DhkdError, match=r"DHKD_STORE_CONNECT_TIMEOUT=.* is not a number of seconds in \(0, 3600\]"):
            storage_timeouts()
