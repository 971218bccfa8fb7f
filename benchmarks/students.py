"""``dhkd-pipe bench distill --students 1,2,4``: one S-student pass against S solo runs.

For each data kind (in-memory 32-pixel data; an image folder of JPEGs replayed at 224 pixels
through DALI) a one-view store is written, then DHKD students (seeds 0, 1, ...) train from it for
the same number of steps: S of them in one pass (``distill_students``) and, separately, each alone
(``distill``: prepare and train, as the CLI runs it). The table gives the wall time of the pass and
of the S solo runs (each including its set-up: store, data, model, run folder, the final
checkpoint), the steady-state step time of each (after ``warmup`` steps), and the loader's share of
a pass's step: the time spent waiting for the next batch (rendering, decoding, reading logits) over
the whole step (that batch fed to every student). On a CUDA device each step ends in a
synchronisation, so the split is honest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from dhkd_pipe.benchmarks.measure import clock, machine, print_table, write_results
from dhkd_pipe.config import TrainConfig
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.training.engine import train, train_runs
from dhkd_pipe.training.run import prepare
from dhkd_pipe.training.students import StudentPlan, prepare_pass


class TimedLoader:
    """A run's loader that records how long each batch took to arrive (rendering, decoding, the
    logits), and with ``step_done`` as the engine's ``on_step_end``, how long each whole step took."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.waits: list[float] = []
        self.steps: list[float] = []
        self._step_start = 0.0

    def __getattr__(self, name):  # everything but ``epoch`` is the loader's
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, skip_steps: int = 0):
        batches = self.loader.epoch(epoch, skip_steps)
        while True:
            self._step_start = clock(self.device)
            batch = next(batches, None)
            if batch is None:
                return
            self.waits.append(clock(self.device) - self._step_start)
            yield batch

    def step_done(self, epoch: int, step: int):
        self.steps.append(clock(self.device) - self._step_start)


def _student(store: str, arch: str, batch_size: int, steps: int, seed: int, out: str) -> TrainConfig:
    return TrainConfig(
        cache=store,
        model=arch,
        method="dhkd",
        batch_size=batch_size,
        epochs=1,
        max_steps=steps,
        seed=seed,
        val_every=0,
        workers=2,
        out=out,
    ).validate()


def _timed(runs: list, warmup: int) -> dict:
    """Trains ``runs`` in one pass (one run: as ``distill`` does) through a ``TimedLoader``: the
    mean step after ``warmup`` steps, and the share of it spent waiting for the batch."""
    timed = TimedLoader(runs[0].loader, runs[0].accelerator.device)
    for run in runs:
        run.loader = timed
    if len(runs) == 1:
        results = [train(runs[0], log=lambda *_: None, on_step_end=timed.step_done)]
    else:
        results = train_runs(runs, log=lambda *_: None, on_step_end=timed.step_done)
    failed = [r for r in results if isinstance(r, DhkdError)]
    if failed:
        raise failed[0]
    waits, steps = sum(timed.waits[warmup : len(timed.steps)]), sum(timed.steps[warmup:])
    return {
        "step_s": steps / max(len(timed.steps) - warmup, 1),
        "loader_share": waits / steps if steps else float("nan"),
    }


def _solo(store: str, arch: str, batch_size: int, steps: int, warmup: int, seed: int, out: str) -> dict:
    t0 = time.perf_counter()
    timed = _timed([prepare(_student(store, arch, batch_size, steps, seed, out), "overwrite")], warmup)
    return {"wall_s": time.perf_counter() - t0, **timed}


def _pass(store: str, arch: str, batch_size: int, steps: int, warmup: int, count: int, work: str) -> dict:
    t0 = time.perf_counter()
    plans = [
        StudentPlan(
            _student(store, arch, batch_size, steps, seed, os.path.join(work, f"pass{count}-s{seed}")), "overwrite"
        )
        for seed in range(count)
    ]
    timed = _timed(prepare_pass(plans), warmup)
    return {"wall_s": time.perf_counter() - t0, **timed}


def _measure(
    kind: str, store: str, arch: str, batch_size: int, steps: int, warmup: int, counts: list[int], work: str, log
) -> list[dict]:
    solo = []
    for seed in range(max(counts)):
        log(f"{kind}: solo run {seed + 1} of {max(counts)}")
        solo.append(_solo(store, arch, batch_size, warmup + steps, warmup, seed, os.path.join(work, f"solo-s{seed}")))
    rows = []
    for count in counts:
        log(f"{kind}: one pass of {count} students")
        together = _pass(store, arch, batch_size, warmup + steps, warmup, count, work)
        alone_wall = sum(r["wall_s"] for r in solo[:count])
        alone_step = sum(r["step_s"] for r in solo[:count])
        rows.append(
            {
                "data": kind,
                "student": arch,
                "students": count,
                "batch_size": batch_size,
                "pass_wall_s": together["wall_s"],
                "solo_wall_s": alone_wall,
                "wall_speedup": alone_wall / together["wall_s"],
                "pass_step_s": together["step_s"],
                "solo_step_s": alone_step,
                "step_speedup": alone_step / together["step_s"],
                "loader_share": together["loader_share"],
                "solo_loader_share": solo[0]["loader_share"],
            }
        )
    return rows


def bench_students(
    json_path: str,
    counts: list[int],
    steps: int = 20,
    warmup: int = 2,
    batch_size: int = 64,
    student: str = "resnet8x4",
    teacher: str = "resnet32x4",
    folder_student: str = "mobilenet_v3_small",
    folder_batch_size: int = 16,
    image_size: int = 224,
    folder: bool = True,
    log=print,
) -> list[dict]:
    """Measures every S of ``counts`` on in-memory data and (``folder``) on a JPEG folder; prints the
    table and writes ``json_path``."""
    from dhkd_pipe.benchmarks.synthetic import cifar_store, jpeg_store

    if not counts or min(counts) < 1 or steps < 1 or warmup < 0:
        raise DhkdError("--students takes counts of at least 1 (e.g. 1,2,4); --steps at least 1")
    work = tempfile.mkdtemp(prefix="dhkd-bench-students-")
    rows = []
    try:
        per_epoch = warmup + steps + 2  # the runs stop mid-epoch (--max-steps): no epoch end, no validation
        store = cifar_store(work, teacher, per_epoch * batch_size, batch_size)
        rows += _measure("in-memory 32 px", store, student, batch_size, steps, warmup, counts, work, log)
        if folder:
            store = jpeg_store(work, folder_student, per_epoch * folder_batch_size, folder_batch_size, image_size)
            rows += _measure(
                f"JPEG folder {image_size} px (DALI)",
                store,
                folder_student,
                folder_batch_size,
                steps,
                warmup,
                counts,
                work,
                log,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(
        f"bench distill --students: one S-student pass against S solo runs, {steps} timed steps after {warmup}, "
        f"cached DHKD, {machine()['device']}",
        rows,
        [
            ("data", "data", "s"),
            ("student", "student", "s"),
            ("students", "S", "d"),
            ("pass_wall_s", "pass wall s", ".1f"),
            ("solo_wall_s", "S solo wall s", ".1f"),
            ("wall_speedup", "x wall", ".2f"),
            ("pass_step_s", "pass step s", ".3f"),
            ("solo_step_s", "S solo step s", ".3f"),
            ("step_speedup", "x step", ".2f"),
            ("loader_share", "loader share of a pass step", ".0%"),
        ],
    )
    write_results(
        json_path,
        {
            "bench": "distill --students",
            "machine": machine(),
            "steps": steps,
            "warmup": warmup,
            "rows": rows,
            "load_average": _load(),
        },
    )
    return rows


def _load() -> str | None:
    """The machine's load averages when measured (``os.getloadavg``), for the record."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None
