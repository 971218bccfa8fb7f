"""``dhkd-pipe bench sweep``: a K-run sweep (methods x temperatures) trained in one pass against
the same K runs trained alone, from the same store.

For each data kind (in-memory 32-pixel data; an image folder of JPEGs replayed through DALI) a
one-view store is written from a random teacher, then the sweep's runs (``training.sweep``:
``--method kd,dhkd --temperature 1,4`` is four runs) train for the same number of steps: all of
them in one pass (``prepare_pass``, ``train_runs``), and each alone (``prepare``, ``train``, as
``distill`` runs it). The table gives the wall time of the pass and of the K solo runs (each with
its set-up: store, data, model, run folder, final checkpoint), the steady-state step time of each
(after ``warmup`` steps) and the loader's share of a pass's step (``students.TimedLoader``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

from dhkd_pipe.benchmarks.measure import machine, print_table, write_results
from dhkd_pipe.benchmarks.students import TimedLoader
from dhkd_pipe.config import TrainConfig
from dhkd_pipe.config.values import coerce
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.training.engine import train, train_runs
from dhkd_pipe.training.run import prepare
from dhkd_pipe.training.students import StudentPlan, prepare_pass
from dhkd_pipe.training.sweep import SweptRun, sweep_fields, sweep_runs


def _quiet(*_):
    """The runs' epoch lines: not the benchmark's output."""


def _timed(runs: list, warmup: int) -> dict:
    """Trains ``runs`` (one: as ``distill`` does; several: one pass) through a ``TimedLoader``: the
    mean step after ``warmup`` steps and the share of it spent waiting for the batch."""
    timed = TimedLoader(runs[0].loader, runs[0].accelerator.device)
    for run in runs:
        run.loader = timed
    if len(runs) == 1:
        results = [train(runs[0], log=_quiet, on_step_end=timed.step_done)]
    else:
        results = train_runs(runs, log=_quiet, on_step_end=timed.step_done)
    failed = [r for r in results if isinstance(r, DhkdError)]
    if failed:
        raise failed[0]
    waits, steps = sum(timed.waits[warmup : len(timed.steps)]), sum(timed.steps[warmup:])
    return {
        "step_s": steps / max(len(timed.steps) - warmup, 1),
        "loader_share": waits / steps if steps else float("nan"),
    }


def sweep_of(store: str, arch: str, batch_size: int, steps: int, grid: dict, out: str) -> list[SweptRun]:
    """The sweep's runs from ``store``: ``grid``'s product, each stopping after ``steps`` steps."""
    base = TrainConfig(
        cache=store, model=arch, method="kd", batch_size=batch_size, epochs=1, max_steps=steps, val_every=0, out=out
    ).validate()
    return sweep_runs(base, grid)


def _measure(kind: str, store: str, arch: str, batch_size: int, steps: int, warmup: int, grid: dict, work, log):
    runs = sweep_of(store, arch, batch_size, warmup + steps, grid, os.path.join(work, "pass"))
    solo_wall, solo_step = 0.0, 0.0
    for i, run in enumerate(runs):
        log(f"{kind}: run {run.name} alone ({i + 1} of {len(runs)})")
        t0 = time.perf_counter()
        alone = dataclasses.replace(run.cfg, out=os.path.join(work, "solo", run.name))
        solo_step += _timed([prepare(alone, "overwrite")], warmup)["step_s"]
        solo_wall += time.perf_counter() - t0
    log(f"{kind}: the {len(runs)} runs in one pass")
    t0 = time.perf_counter()
    together = _timed(prepare_pass([StudentPlan(r.cfg, "overwrite") for r in runs]), warmup)
    pass_wall = time.perf_counter() - t0
    return {
        "data": kind,
        "student": arch,
        "runs": len(runs),
        "swept": ", ".join(f"{k} {','.join(map(str, v))}" for k, v in grid.items()),
        "batch_size": batch_size,
        "pass_wall_s": pass_wall,
        "solo_wall_s": solo_wall,
        "wall_speedup": solo_wall / pass_wall,
        "pass_step_s": together["step_s"],
        "solo_step_s": solo_step,
        "step_speedup": solo_step / together["step_s"],
        "loader_share": together["loader_share"],
    }


def bench_sweep(
    json_path: str,
    methods: str,
    temperatures: str,
    steps: int = 20,
    warmup: int = 2,
    batch_size: int = 64,
    student: str = "resnet8x4",
    teacher: str = "resnet32x4",
    folder: bool = True,
    folder_student: str = "mobilenet_v3_small",
    folder_batch_size: int = 16,
    image_size: int = 224,
    log=print,
) -> list[dict]:
    """Measures the sweep ``methods`` x ``temperatures`` (comma-separated) on in-memory data and
    (``folder``) on a JPEG folder; prints the table and writes ``json_path``."""
    from dhkd_pipe.benchmarks.synthetic import cifar_store, jpeg_store

    if steps < 1 or warmup < 0:
        raise DhkdError("--steps must be at least 1 and --warmup not negative")
    fields = sweep_fields()
    grid = {
        name: [coerce(name, v.strip(), fields[name].type) for v in text.split(",") if v.strip()]
        for name, text in (("method", methods), ("temperature", temperatures))
    }
    work = tempfile.mkdtemp(prefix="dhkd-bench-sweep-")
    rows = []
    try:
        per_epoch = warmup + steps + 2  # the runs stop mid-epoch (--max-steps): no epoch end, no validation
        store = cifar_store(work, teacher, per_epoch * batch_size, batch_size)
        rows.append(_measure("in-memory 32 px", store, student, batch_size, steps, warmup, grid, work, log))
        if folder:
            store = jpeg_store(work, folder_student, per_epoch * folder_batch_size, folder_batch_size, image_size)
            kind = f"JPEG folder {image_size} px (DALI)"
            rows.append(_measure(kind, store, folder_student, folder_batch_size, steps, warmup, grid, work, log))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(
        f"bench sweep: a {rows[0]['runs']}-run sweep ({rows[0]['swept']}) in one pass against its runs alone, "
        f"{steps} timed steps after {warmup}, {machine()['device']}",
        rows,
        [
            ("data", "data", "s"),
            ("student", "student", "s"),
            ("runs", "K", "d"),
            ("pass_wall_s", "pass wall s", ".1f"),
            ("solo_wall_s", "K solo wall s", ".1f"),
            ("wall_speedup", "x wall", ".2f"),
            ("pass_step_s", "pass step s", ".3f"),
            ("solo_step_s", "K solo step s", ".3f"),
            ("step_speedup", "x step", ".2f"),
            ("loader_share", "loader share of a pass step", ".0%"),
        ],
    )
    write_results(json_path, {"bench": "sweep", "machine": machine(), "steps": steps, "warmup": warmup, "rows": rows})
    return rows
