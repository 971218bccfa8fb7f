"""Several machines, simulated on this host: each "machine" is its own ``accelerate launch
--num_machines 2 --machine_rank R --main_process_ip 127.0.0.1`` launcher (gloo CPU ranks), and the
store lives on the local S3 server, as it would for machines that share no disk.

Stage 1 from 4 ranks on 2 machines writes the one-process store; stage 2 on 2 machines x 2
processes trains what 1 machine x 4 processes trains, bit for bit, for one student and for a pass
of two. A machine lost in the middle of stage 1 (killed) or of stage 2 (frozen, then killed) ends
the other machine's processes within the collective timeout, each with one line naming the loss
and the command to resume; the resume on both machines then completes to the uninterrupted result.
"""

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import S3_BUCKET, SMALL_DATA

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.store.objects import StoreObjects, open_store
from dhkd_pipe.store.reader import LogitCache

slow = pytest.mark.slow

ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
# The stage-1 options of conftest's small_store (digits@256, 2 views, chunks of 64, batches of 64).
STAGE1 = ["--model", "resnet8", "--data", SMALL_DATA, "--views", 2, "--seed", 0, "--chunk-rows", 64]
STAGE1 += ["--batch-size", 64]
STAGE2 = ["--data", SMALL_DATA, "--epochs", 1, "--batch-size", 16, "--lr-milestones", 1, "--workers", 0]
NUMBERS = ("epoch", "lr", "train_loss", "train_ce", "train_kd", "val_top1", "val_top5")  # metrics not of time
LOST = "lost the run's other processes"
TIMEOUT_S = 10  # DHKD_COLLECTIVE_TIMEOUT of the lost-machine cases


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Machines:
    """``machines`` launchers of ``per_machine`` processes each, one command; stderr per machine in
    ``logs``. One machine is a plain one-host launch."""

    def __init__(self, logs, args, machines=2, per_machine=2, env=None):
        self.logs, self.procs = logs, []
        logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
            "CUDA_VISIBLE_DEVICES": "",
            **(env or {}),
        }
        for rank in range(machines):
            where = ["--num_machines", "1", "--main_process_port", "0"]
            if machines > 1:
                where = ["--num_machines", machines, "--machine_rank", rank, "--main_process_ip", "127.0.0.1"]
                where += ["--main_process_port", port]
            cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", machines * per_machine, *where]
            cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dhkd_pipe.cli", *args]
            with open(self.log(rank), "w") as stderr:
                self.procs.append(
                    subprocess.Popen(list(map(str, cmd)), stdout=subprocess.DEVNULL, stderr=stderr, env=env)
                )

    def log(self, rank: int):
        return self.logs / f"machine{rank}.err"

    def stderr(self, rank: int) -> str:
        return self.log(rank).read_text()

    def wait(self, timeout=600) -> list[int]:
        try:
            return [p.wait(timeout) for p in self.procs]
        finally:
            self.stop()

    def check(self):
        codes = self.wait()
        assert codes == [0] * len(codes), [(c, self.stderr(r)[-3000:]) for r, c in enumerate(codes)]

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def tree(self, rank: int) -> list:
        """The machine's processes: its launcher, torchrun's agent and the workers (own sessions)."""
        launcher = psutil.Process(self.procs[rank].pid)
        return [launcher, *launcher.children(recursive=True)]

    def stop(self):
        for rank, p in enumerate(self.procs):
            if p.poll() is None:
                for q in self.tree(rank):
                    try:
                        q.kill()
                    except psutil.NoSuchProcess:
                        pass
                p.wait(30)


def launch(tmp_path, name, *args, machines=2, per_machine=2, env=None) -> Machines:
    machines_ = Machines(tmp_path / f"{name}-logs", args, machines, per_machine, env)
    machines_.check()
    return machines_


def all_objects(location) -> dict:
    objects = StoreObjects(open_store(str(location)), str(location))
    return {key: objects.read(key) for key in objects.list()}


def params(run) -> dict:
    return torch.load(os.path.join(run, "model.pt"), weights_only=True)["model"]


def same_params(a, b):
    a, b = params(a), params(b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metrics(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: row[k] for k in NUMBERS if k in row} for row in map(json.loads, f)]


def lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.fixture(scope="module")
def two_machine_store(s3, random_teacher, tmp_path_factory):
    """Stage 1 from 2 machines x 2 processes on the local S3 server (small_store's options)."""
    url = f"s3://{S3_BUCKET}/two-machines.zarr"
    logs = tmp_path_factory.mktemp("stage1")
    launch(logs, "stage1", "cache-teacher", *STAGE1, "--weights", random_teacher, "--out", url)
    return url


# ---- the collective timeout and the lost-process line (no processes started) --------------------


def test_collective_timeout_from_the_environment(monkeypatch):
    from dhkd_pipe.interrupts import DEFAULT_TIMEOUT_S, collective_timeout

    monkeypatch.delenv("DHKD_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == DEFAULT_TIMEOUT_S == 300
    monkeypatch.setenv("DHKD_COLLECTIVE_TIMEOUT", " 12.5 ")
    assert collective_timeout() == 12.5
    for bad in ("0", "-3", "ten", "nan", "inf", "86401"):
        monkeypatch.setenv("DHKD_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(DhkdError, match="DHKD_COLLECTIVE_TIMEOUT=.*in seconds, above 0 and at most 86400"):
            collective_timeout()


class FakeDist:
    """``torch.distributed`` as a failed collective finds it: initialized, ``world`` processes."""

    DistError = type("DistError", (RuntimeError,), {})

    def __init__(self, world=4, rank=1, initialized=True):
        self.world, self.rank, self.initialized = world, rank, initialized

    def is_available(self):
        return True

    def is_initialized(self):
        return self.initialized

    def get_world_size(self):
        return self.world

    def get_rank(self):
        return self.rank


GLOO_CLOSED = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:9369. "
    "This is typically caused by a remote worker crashing."
)
GLOO_TIMEOUT = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms for recv"


def test_a_failed_collective_names_the_lost_processes(monkeypatch):
    from dhkd_pipe.interrupts import lost_processes

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_RANK", "0")
    monkeypatch.setitem(sys.modules, "torch.distributed", FakeDist())
    me = "rank 1 of 4 (machine 0 of 2) lost the run's other processes: "
    assert lost_processes(RuntimeError(GLOO_CLOSED)) == (
        me + "the connection to the process at 10.0.0.2 was closed or reset: that process or its machine stopped"
    )
    reset = "[/pytorch/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.3]:61625: Connection reset by peer."
    assert lost_processes(RuntimeError(reset)).endswith(
        "the process at 10.0.0.3 was closed or reset: that process or its machine stopped"
    )
    assert lost_processes(RuntimeError(GLOO_TIMEOUT)) == (
        me + "another process did not answer within 10 s (DHKD_COLLECTIVE_TIMEOUT): it or its machine stopped, "
        "froze or was cut off"
    )
    assert lost_processes(FakeDist.DistError("NCCL error: remote process exited")).startswith(me + "another process")
    monkeypatch.setenv("DHKD_COLLECTIVE_TIMEOUT", "7")
    try:  # gloo's words need not name gloo: raised in torch.distributed's code, they count
        exec(compile("raise RuntimeError('Application timeout caused pair closure')", "torch/distributed/x.py", "exec"))
    except RuntimeError as e:
        assert lost_processes(e) == me + (
            "another process did not answer within 7 s (DHKD_COLLECTIVE_TIMEOUT): it or its machine stopped, "
            "froze or was cut off"
        )
    assert lost_processes(RuntimeError("Application timeout caused pair closure")) is None  # raised elsewhere
    # anything else is not a lost process: a bug keeps its traceback
    assert lost_processes(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert lost_processes(RuntimeError("Timed out waiting for the S3 read")) is None  # no process group's words
    for dist in (FakeDist(world=1, rank=0), FakeDist(initialized=False)):
        monkeypatch.setitem(sys.modules, "torch.distributed", dist)
        assert lost_processes(RuntimeError(GLOO_CLOSED)) is None


def test_the_resume_advice_drops_overwrite_and_resumes_a_checkpointed_run(monkeypatch, tmp_path):
    from dhkd_pipe.command_line import _resume_advice

    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["cli.py", "distill", "--student", "resnet8", "--out", str(run), "--overwrite"])
    expected = f"launch again on every machine: dhkd-pipe distill --student resnet8 --out {run}"
    assert _resume_advice({"out": str(run), "resume": False}).endswith(expected)  # no run folder: start again
    (run / "resnet8").mkdir(parents=True)
    (run / "resnet8" / "checkpoint.pt").write_bytes(b"")  # several students: a checkpoint in a student's folder
    assert _resume_advice({"out": str(run), "resume": False}).endswith(expected + " --resume")
    monkeypatch.setattr(sys, "argv", ["cli.py", "cache-teacher", "--out", "s3://b/s.zarr"])
    assert _resume_advice({"out": "s3://b/s.zarr"}).endswith("dhkd-pipe cache-teacher --out s3://b/s.zarr")


# ---- several machines ---------------------------------------------------------------------------


@slow
def test_stage_1_on_two_machines_writes_the_one_process_store(two_machine_store, small_store):
    LogitCache.open(two_machine_store).check_complete()
    # every object, metadata included, byte for byte: the decoded arrays, the recorded views, the attributes
    assert all_objects(two_machine_store) == all_objects(small_store)


@slow
def test_stage_2_on_two_machines_equals_one_machine_of_four_processes(two_machine_store, tmp_path):
    args = ["distill", "--student", "resnet8", "--cache", two_machine_store, *STAGE2]
    launch(tmp_path, "two", *args, "--out", tmp_path / "two")
    launch(tmp_path, "one", *args, "--out", tmp_path / "one", machines=1, per_machine=4)
    same_params(tmp_path / "two", tmp_path / "one")
    assert metrics(tmp_path / "two") == metrics(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 4


@slow
def test_a_pass_of_two_students_on_two_machines_equals_one_machine(two_machine_store, tmp_path):
    args = ["distill", "--student", "resnet8,resnet14", "--cache", two_machine_store, *STAGE2]
    launch(tmp_path, "two", *args, "--out", tmp_path / "two")
    launch(tmp_path, "one", *args, "--out", tmp_path / "one", machines=1, per_machine=4)
    for student in ("resnet8", "resnet14"):
        same_params(tmp_path / "two" / student, tmp_path / "one" / student)
        assert metrics(tmp_path / "two" / student) == metrics(tmp_path / "one" / student), student


# ---- a lost machine ---------------------------------------------------------------------------


def stop_survivors(machines: Machines, lost: int, freeze: bool) -> float:
    """Kills (or freezes: SIGSTOP, as a machine cut off sends nothing) machine ``lost``'s processes;
    returns the seconds the other machine's launcher took to end. A frozen machine is killed after."""
    victims = machines.tree(lost)
    start = time.perf_counter()
    for p in victims:
        p.suspend() if freeze else p.kill()
    survivor = machines.procs[1 - lost]
    try:
        survivor.wait(TIMEOUT_S + 120)
    finally:
        elapsed = time.perf_counter() - start
        machines.stop()
    return elapsed


def record(case: str, **figures):
    """Prints the case's figures (who was lost, how long the others took to stop, their lines)."""
    print(f"\n{case}: " + json.dumps(figures, indent=1))


@slow
def test_a_machine_lost_in_stage_1_ends_the_others_and_the_resume_completes(s3, random_teacher, tmp_path):
    from dhkd_pipe.config import CacheConfig
    from dhkd_pipe.stages.cache_teacher import cache_teacher

    # 768 digits in chunks of 32, 2 views: 48 write units, 12 a process, slow enough to stop in between
    options = dict(model="resnet8", data="digits@768", views=2, seed=0, chunk_rows=32, batch_size=32)
    reference = tmp_path / "reference.zarr"
    cache_teacher(
        CacheConfig(**options, weights=str(random_teacher), out=str(reference)).validate(), log=lambda *a: None
    )
    url = f"s3://{S3_BUCKET}/lost-in-stage-1.zarr"
    args = ["cache-teacher", "--weights", random_teacher, "--out", url]
    args += [x for k, v in options.items() for x in ("--" + k.replace("_", "-"), v)]
    env = {"DHKD_COLLECTIVE_TIMEOUT": str(TIMEOUT_S)}
    machines = Machines(tmp_path / "killed", args, env=env)
    flags, written, deadline = StoreObjects(open_store(url), url), 0, time.time() + 300
    try:
        while time.time() < deadline and machines.running():
            written = len([k for k in flags.list("done/") if k.startswith("done/c/")])
            if written:
                break
            time.sleep(0.05)
        assert machines.running() and 0 < written < 48, (written, machines.stderr(0)[-3000:])
        elapsed = stop_survivors(machines, lost=1, freeze=False)
    finally:
        machines.stop()
    said = lines(machines.stderr(0), LOST)
    assert machines.procs[0].returncode != 0 and len(said) == 2, machines.stderr(0)[-3000:]  # both ranks of machine 0
    for line in said:
        assert line.startswith("error: rank ") and "(machine 0 of 2)" in line
        assert line.endswith("launch again on every machine: dhkd-pipe " + " ".join(map(str, args))), line
    record("stage 1, machine 1 killed", seconds_to_stop=round(elapsed, 1), written_at_kill=written, lines=said)
    with pytest.raises(DhkdError, match="incomplete"):
        LogitCache.open(url).check_complete()  # what the lost ranks left is not taken for done
    launch(tmp_path, "resumed", *args, env=env)
    LogitCache.open(url).check_complete()
    assert all_objects(url) == all_objects(reference)


@slow
def test_a_machine_lost_in_stage_2_ends_the_others_and_the_resume_completes(two_machine_store, tmp_path):
    # one process per machine: two processes resume bit for bit on one machine too; four do not,
    # on one machine either (the resumed run differs in the last bits), so they are no measure here
    args = ["distill", "--student", "resnet8", "--cache", two_machine_store, *STAGE2]
    args[args.index("--epochs") + 1] = 4
    run = tmp_path / "lost"
    env = {"DHKD_COLLECTIVE_TIMEOUT": str(TIMEOUT_S)}
    machines = Machines(tmp_path / "frozen", [*args, "--out", run], per_machine=1, env=env)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and machines.running() and not (run / "checkpoint.pt").exists():
            time.sleep(0.02)
        assert machines.running() and (run / "checkpoint.pt").exists(), machines.stderr(0)[-3000:]
        elapsed = stop_survivors(machines, lost=1, freeze=True)
    finally:
        machines.stop()
    said = lines(machines.stderr(0), LOST)
    assert machines.procs[0].returncode != 0 and len(said) == 1, machines.stderr(0)[-3000:]
    assert f"did not answer within {TIMEOUT_S} s" in said[0] and said[0].endswith(
        f"dhkd-pipe {' '.join(map(str, args))} --out {run} --resume"
    ), said[0]
    assert elapsed < TIMEOUT_S + 60, elapsed
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    record(
        "stage 2, machine 1 frozen then killed",
        seconds_to_stop=round(elapsed, 1),
        checkpoint_at=(state["epoch"], state["step"]),
        lines=said,
    )
    assert len(metrics(run)) < 4 and not (run / "model.pt").exists()  # the run did not pass for finished
    launch(tmp_path, "resumed", *args, "--out", run, "--resume", per_machine=1, env=env)
    launch(tmp_path, "straight", *args, "--out", tmp_path / "straight", per_machine=1)
    same_params(run, tmp_path / "straight")
    assert metrics(run) == metrics(tmp_path / "straight")
