"""Several machines simulated on one host, for the tests of several machines and of a lost one:
each "machine" is its own ``accelerate launch --num_machines 2 --machine_rank R --main_process_ip
127.0.0.1`` launcher of gloo CPU ranks."""

import json
import os
import socket
import subprocess
import sys

import psutil
import torch
from conftest import SMALL_DATA

from dhkd_pipe.store.objects import StoreObjects, open_store

ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
# The stage-1 options of conftest's small_store (digits@256, 2 views, chunks of 64, batches of 64).
STAGE1 = ["--model", "resnet8", "--data", SMALL_DATA, "--views", 2, "--seed", 0, "--chunk-rows", 64]
STAGE1 += ["--batch-size", 64]
STAGE2 = ["--data", SMALL_DATA, "--epochs", 1, "--batch-size", 16, "--lr-milestones", 1, "--workers", 0]
NUMBERS = ("epoch", "lr", "train_loss", "train_ce", "train_kd", "val_top1", "val_top5")  # metrics not of time
LOST = "lost the run's other processes"


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
