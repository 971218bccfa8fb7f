"""Several machines, simulated on this host: each "machine" is its own ``accelerate launch
--num_machines 2 --machine_rank R --main_process_ip 127.0.0.1`` launcher (gloo CPU ranks), and the
store lives on the local S3 server, as it would for machines that share no disk (the launchers:
tests/machines.py).

Stage 1 from 4 ranks on 2 machines writes the one-process store; stage 2 on 2 machines x 2
processes trains what 1 machine x 4 processes trains, bit for bit, for one student and for a pass
of two. The collective timeout and the line that names lost processes are checked here without
processes; a machine really lost is tests/test_lost_machine.py.
"""

import json
import sys

import pytest
from conftest import S3_BUCKET
from machines import STAGE1, STAGE2, all_objects, launch, metrics, same_params

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.store.reader import LogitCache

slow = pytest.mark.slow


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
    """A pass of two students on 2 machines x 2 processes equals the pass on 1 machine x 4, and one
    student alone on 2 machines equals that pass's student: so, under several processes on several
    machines, a run equals its run on one machine and a pass's student equals its solo run."""
    args = ["distill", "--cache", two_machine_store, *STAGE2]
    students = ("resnet8", "resnet14")
    launch(tmp_path, "two", *args, "--student", ",".join(students), "--out", tmp_path / "two")
    launch(
        tmp_path, "one", *args, "--student", ",".join(students), "--out", tmp_path / "one", machines=1, per_machine=4
    )
    launch(tmp_path, "solo", *args, "--student", "resnet14", "--out", tmp_path / "solo")
    for student in students:
        same_params(tmp_path / "two" / student, tmp_path / "one" / student)
        assert metrics(tmp_path / "two" / student) == metrics(tmp_path / "one" / student), student
    same_params(tmp_path / "solo", tmp_path / "one" / "resnet14")
    assert metrics(tmp_path / "solo") == metrics(tmp_path / "one" / "resnet14")
    assert json.loads((tmp_path / "solo" / "summary.json").read_text())["processes"] == 4
