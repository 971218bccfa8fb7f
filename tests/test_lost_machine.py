"""A machine lost in the middle of stage 1 (killed) or of stage 2 (frozen, then killed) ends the
other machine's processes within the collective timeout, each with one line naming the loss and
the command to resume; the resume on both machines then completes to the uninterrupted result.
Each "machine" is an ``accelerate launch`` of its own on this host (tests/machines.py)."""

import json
import time

import pytest
import torch
from conftest import S3_BUCKET
from machines import LOST, STAGE2, Machines, all_objects, launch, lines, metrics, same_params

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.store.objects import StoreObjects, open_store
from dhkd_pipe.store.reader import LogitCache

slow = pytest.mark.slow
TIMEOUT_S = 10  # DHKD_COLLECTIVE_TIMEOUT of these cases: a process start on a loaded 2-core host can take seconds


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

    # 768 digits in chunks of 32, 2 views: 48 write units, 24 a process, slow enough to stop in between
    options = dict(model="resnet8", data="digits@768", views=2, seed=0, chunk_rows=32, batch_size=32)
    reference = tmp_path / "reference.zarr"
    cache_teacher(
        CacheConfig(**options, weights=str(random_teacher), out=str(reference)).validate(), log=lambda *a: None
    )
    url = f"s3://{S3_BUCKET}/lost-in-stage-1.zarr"
    args = ["cache-teacher", "--weights", random_teacher, "--out", url]
    args += [x for k, v in options.items() for x in ("--" + k.replace("_", "-"), v)]
    env = {"DHKD_COLLECTIVE_TIMEOUT": str(TIMEOUT_S)}
    machines = Machines(tmp_path / "killed", args, per_machine=1, env=env)  # one process a machine: cheaper
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
    assert machines.procs[0].returncode != 0 and len(said) == 1, machines.stderr(0)[-3000:]
    for line in said:
        assert line.startswith("error: rank ") and "(machine 0 of 2)" in line
        assert line.endswith("launch again on every machine: dhkd-pipe " + " ".join(map(str, args))), line
    record("stage 1, machine 1 killed", seconds_to_stop=round(elapsed, 1), written_at_kill=written, lines=said)
    with pytest.raises(DhkdError, match="incomplete"):
        LogitCache.open(url).check_complete()  # what the lost ranks left is not taken for done
    launch(tmp_path, "resumed", *args, per_machine=1, env=env)
    LogitCache.open(url).check_complete()
    assert all_objects(url) == all_objects(reference)


@slow
def test_a_machine_lost_in_stage_2_ends_the_others_and_the_resume_completes(small_store, tmp_path):
    # one process per machine: two processes resume bit for bit on one machine too; four do not,
    # on one machine either (the resumed run differs in the last bits), so they are no measure here
    args = ["distill", "--student", "resnet8", "--cache", small_store, *STAGE2]
    args[args.index("--epochs") + 1] = 2
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
    assert len(metrics(run)) < 2 and not (run / "model.pt").exists()  # the run did not pass for finished
    launch(tmp_path, "resumed", *args, "--out", run, "--resume", per_machine=1, env=env)
    launch(tmp_path, "straight", *args, "--out", tmp_path / "straight", per_machine=1)
    same_params(run, tmp_path / "straight")
    assert metrics(run) == metrics(tmp_path / "straight")
