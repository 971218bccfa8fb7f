"""``dhkd-pipe cache-teacher`` (stage 1; ``verify-cache`` checks its store: ``stages.verify_cache``).

The teacher runs once over ``views`` augmentation epochs of the training set. Each epoch's
training order and every view come from the ``ViewPlan``; logits are written in training order,
one write unit (whole chunks) at a time, by a background writer so the teacher never waits for the
disk. A unit's ``done`` flags are set after its data, so a killed run resumes where it stopped,
and under ``accelerate launch`` each process writes its own units.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from dhkd_pipe.config import CacheConfig
from dhkd_pipe.console import log_line
from dhkd_pipe.data.datasets import Dataset, Renderer, absolute_spec, load_data
from dhkd_pipe.data.decode_once import group_jobs, images_per_batch, run_jobs
from dhkd_pipe.data.in_memory import SUBSET_MARK
from dhkd_pipe.data.inference import evaluate, memory_format
from dhkd_pipe.data.teacher import load_teacher
from dhkd_pipe.data.views import UnitGroups, ViewPlan
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.options import flag_of, option_fields
from dhkd_pipe.store.codecs import check_encodable
from dhkd_pipe.store.layout import STORE_ENTRIES, estimate_bytes
from dhkd_pipe.store.reader import LogitCache
from dhkd_pipe.store.targets import check_inputs_outside, check_outside_folders
from dhkd_pipe.store.writer import StoreWriter
from dhkd_pipe.training.accelerator import make_accelerator
from dhkd_pipe.version import tool_version


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024


@dataclass
class TeacherPass:
    """Stage 1, prepared: the teacher, frozen and placed, the data, the views' plan and what the
    store records of them. Built by :func:`prepare`; nothing is written yet."""

    cfg: CacheConfig
    acc: object  # accelerate.Accelerator
    data: Dataset
    source: object  # models.WeightSource
    plan: ViewPlan
    preprocessing: dict
    teacher: torch.nn.Module
    fmt: torch.memory_format
    renderer: Renderer | None = None
    groups: UnitGroups | None = None  # image folders: the unit-grouped order (decode once), set once the store is open

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 CPU logits of a batch of rendered views."""
        with torch.inference_mode(), self.acc.autocast():
            return self.teacher(x.contiguous(memory_format=self.fmt)).float().cpu()

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's training order: unit-grouped for image folders, else the plan's permutation."""
        if self.groups is not None:
            return self.groups.epoch(epoch)[0]
        return self.plan.order(epoch, self.data.num_train)

    def store_layout(self) -> dict:
        """The store's geometry and labels, as ``StoreWriter`` takes them."""
        cfg, data = self.cfg, self.data
        return dict(
            epochs=cfg.views,
            num_samples=data.num_train,
            num_classes=data.num_classes,
            chunk_rows=cfg.chunk_rows,
            codec=cfg.codec,
            labels=data.train_labels.cpu().numpy(),
        )

    def store_attrs(self) -> dict:
        """What the store records: the teacher, the data, the plan, and the command that wrote it
        (which a resume must match) with its shell line (which repair messages name)."""
        cfg, digest, fingerprint = self.cfg, self.source.digest(), self.data.fingerprint()
        data_spec = absolute_spec(cfg.data)
        command = {
            "teacher": cfg.model,
            "weights_digest": digest,
            "dataset": fingerprint,
            "views": cfg.views,
            "seed": cfg.seed,
            "codec": cfg.codec,
            "chunk_rows": cfg.chunk_rows,
            "policy": self.plan.to_dict(),
            "precision": cfg.precision,
        }
        if self.data.kind == "imagefolder":  # a unit holds the same samples in every epoch (views.UnitGroups)
            command["order"] = "unit_groups"
        return {
            "teacher": {
                "arch": cfg.model,
                "weights_digest": digest,
                "weights": self.source.record,
                "weights_label": self.source.label,
                "weights_bytes": os.path.getsize(self.source.path),  # verify-cache reads only a file of this size
                "val_top1": None,
            },
            "dataset": fingerprint,
            "data_spec": data_spec,  # where the data was; stage 2 and verify-cache use it when --data is not given
            "policy": self.plan.to_dict(),
            "preprocessing": self.preprocessing,
            "seed": cfg.seed,
            "codec": cfg.codec,
            "precision": cfg.precision,
            "tool_version": tool_version(),
            "command": command,
            "command_line": command_line(
                cfg, data_spec
            ),  # what re-runs this command (with --out): named by repair messages
        }


def prepare(cfg: CacheConfig) -> TeacherPass:
    """The accelerator, the data, the teacher (weights resolved, checked, frozen, placed) and the plan."""
    acc = make_accelerator(cfg.precision)
    data = load_data(cfg.data)
    if cfg.skip_corrupt:
        if not hasattr(data, "without_corrupt"):
            raise DhkdError(f"--skip-corrupt is for image folders; {cfg.data} is decoded already")
        data = data.without_corrupt(cfg.workers or None)
    fmt = memory_format(cfg, acc.device)
    loaded = load_teacher(
        cfg.model, cfg.weights, data, data.default_plan(seed=cfg.seed), acc.device, cfg.resolution, acc, fmt
    )
    source, plan, preprocessing, teacher = loaded.source, loaded.plan, loaded.preprocessing, loaded.model
    if cfg.compile:  # the views' shapes are fixed: one graph for full batches, one for the last
        teacher = torch.compile(teacher)
    return TeacherPass(cfg, acc, data, source, plan, preprocessing, teacher, fmt)


def cache_teacher(cfg: CacheConfig, log=log_line, break_lock: bool = False, decode_once: bool | None = None) -> dict:
    """Stage 1. Everything that can be checked is checked before the store is touched (the
    location, every image header, the teacher on the first batch); then the store's writer takes
    the store's lock for the run, creates or reopens the store, verifies the units already written
    and has damaged ones rewritten. A run that fails before its first unit leaves no store.

    ``break_lock``: take over a lock held from another host (``--break-lock``). ``decode_once``:
    for image folders, decode each image once for all its views (the default) or once per view
    (False: the same store, slower; the check that they agree)."""
    check_outside_folders(cfg.out, {"--data": data_folder(cfg.data)})  # before the data and the teacher load
    run = prepare(cfg)
    acc, attrs = run.acc, run.store_attrs()
    writer = StoreWriter(
        cfg.out,
        attrs=attrs,
        overwrite=bool(cfg.overwrite),
        refresh=("data_spec", "command_line"),
        holder=f"{attrs['command_line']} --out {shlex.quote(str(cfg.out))}",
        break_lock=break_lock,
        main=acc.is_main_process,
        barrier=acc.wait_for_everyone,
        log=log,
        **run.store_layout(),
    )
    if cfg.overwrite:  # an input inside what replacing the store removes is refused before anything is touched
        check_inputs_outside(cfg.out, STORE_ENTRIES, {"--weights": cfg.weights, "--data": cfg.data})
    run.renderer = run.data.renderer(acc.device, run.plan, workers=cfg.workers)
    check_inputs(run)
    with writer:
        store = writer.store
        if attrs["command"].get("order") == "unit_groups":
            run.groups = UnitGroups(run.plan.seed, run.data.num_train, store.shard_chunks * store.chunk_rows)
        if acc.is_main_process:
            announce(run, store, log)
            validate_teacher(run, store, log)
        decoded = getattr(run.renderer, "decoded_images", 0)
        if run.groups is not None and decode_once is not False:
            jobs = group_jobs(
                run.groups,
                run.plan,
                run.data.train_sizes,
                cfg.views,
                store.shard_chunks,
                store.done_mask(),
                acc.process_index,
                acc.num_processes,
            )
            images, elapsed = write_groups(run, writer, jobs)
        else:
            images, elapsed = write_units(run, writer, writer.todo(acc.process_index, acc.num_processes))
        writer.wait()
        decoded = getattr(run.renderer, "decoded_images", 0) - decoded
        acc.wait_for_everyone()
        total_images = int(acc.reduce(torch.tensor(images, device=acc.device), "sum"))
        total_decoded = int(acc.reduce(torch.tensor(decoded, device=acc.device), "sum"))
    result = {
        "store": cfg.out,
        "images": total_images,
        "seconds": elapsed,
        "images_per_sec": total_images / elapsed if elapsed else None,
        "decoded_images": total_decoded,
        "decoded_per_row": total_decoded / total_images if total_images else None,
    }
    if acc.is_main_process:
        result.update({k: store.summary()[k] for k in ("shape", "codec", "bytes_on_disk", "bytes_per_logit")})
        result["teacher_val_top1"] = store.attrs["teacher"].get("val_top1")
    return result


def announce(run: TeacherPass, store: LogitCache, log):
    """The teacher, its views, and what is to be written (and how much is left on a resume)."""
    cfg, plan, data = run.cfg, run.plan, run.data
    log(
        f"teacher {cfg.model} ({run.source.label}); views {plan.resolution} px, {plan.interpolation}, "
        f"mean {list(plan.mean)} std {list(plan.std)}: {run.preprocessing['source']}"
    )
    if getattr(data, "skipped", ()):
        log(
            f"--skip-corrupt: left out {len(data.skipped)} corrupt images: {', '.join(data.skipped[:5])}"
            + (", ..." if len(data.skipped) > 5 else "")
        )
    done = store.done_mask()
    raw = estimate_bytes(cfg.views, data.num_train, data.num_classes, cfg.codec)
    remaining = int((~done).sum())
    log(
        f"writing {cfg.views} views x {data.num_train} samples x {data.num_classes} classes ({cfg.codec}) "
        f"to {cfg.out}: {_human(raw)} before compression"
        + (f"; resuming, {remaining} of {done.size} chunks left" if remaining < done.size else "")
    )


def validate_teacher(run: TeacherPass, store: LogitCache, log):
    """The teacher's validation accuracy, recorded in the store once (not again on a resume)."""
    if store.attrs["teacher"].get("val_top1") is not None or not run.data.num_val:
        return
    acc_val = evaluate(run.teacher, run.renderer, run.cfg.batch_size, run.acc)
    store.update_attrs(teacher={**store.attrs["teacher"], "val_top1": acc_val["top1"], "val_top5": acc_val["top5"]})
    log(f"teacher {run.cfg.model}: validation top-1 {acc_val['top1']:.2f}%")


def check_inputs(run: TeacherPass):
    """What can be checked before the store is created: every image header (an image folder's
    zero-byte or foreign files), and the teacher's logits on the first batch of the first epoch
    (finite, and within the codec's range)."""
    data, plan, n = run.data, run.plan, min(run.cfg.batch_size, run.data.num_train)
    data.train_sizes(np.arange(data.num_train))
    if data.num_val:
        data.val_views(plan)
    order = plan.order(0, data.num_train)[:n]
    views = plan.views(0, order, data.train_sizes(order))
    x = next(iter(run.renderer.train_batches(order, views, n)))
    check_encodable(run.logits(x).numpy(), run.cfg.codec, "of the first batch")


def data_folder(spec: str) -> str | None:
    """The folder a data spec reads (``imagefolder:DIR``, ``cifar10:DIR``, ``mnist:DIR@N``), or None
    (``digits``, bundled)."""
    kind, sep, path = spec.partition(":")
    if not sep or not path or "://" in spec:
        return None
    head, mark, size = path.rpartition(SUBSET_MARK)
    return head if mark and size.isdigit() else path


def command_line(cfg: CacheConfig, data_spec: str) -> str:
    """The cache-teacher command that writes (and repairs) this store, as a shell line: the options
    ``CacheConfig`` marks as recorded (``record=True``), all but ``--out`` (the store records no
    location of its own: it may be copied or moved) and those unset."""
    weights = cfg.weights
    if weights and os.path.isfile(weights):
        weights = os.path.abspath(weights)
    values = {
        **{f.name: getattr(cfg, f.name) for f in option_fields(CacheConfig)},
        "weights": weights,
        "data": data_spec,
    }
    args = ["dhkd-pipe", "cache-teacher"]
    for f in option_fields(CacheConfig):
        if f.metadata["option"]["record"] and values[f.name] not in (None, ""):
            args += [flag_of(f), values[f.name]]
    return shlex.join(str(a) for a in args)


def write_units(run: TeacherPass, writer: StoreWriter, todo) -> tuple[int, float]:
    """Runs the teacher over the units' positions epoch by epoch and hands each filled unit to the
    writer; returns (images, seconds)."""
    from tqdm.auto import tqdm

    store = writer.store
    total = sum(store.unit_rows(chunks[0])[1] - store.unit_rows(chunks[0])[0] for _, chunks in todo)
    bar = tqdm(
        total=total, unit="img", disable=not run.acc.is_main_process or None, file=sys.stderr, dynamic_ncols=True
    )
    start, images = time.perf_counter(), 0
    try:
        for epoch in sorted({e for e, _ in todo}):
            images += _write_epoch(run, writer, epoch, [chunks for e, chunks in todo if e == epoch], bar)
    finally:
        bar.close()
    return images, time.perf_counter() - start


def _write_epoch(run: TeacherPass, writer: StoreWriter, epoch: int, units: list, bar) -> int:
    """One epoch's units: their positions' views rendered in batches, the logits cut into units."""
    bounds = [writer.store.unit_rows(chunks[0]) for chunks in units]
    positions = np.concatenate([np.arange(a, b) for a, b in bounds])
    order = run.order(epoch)[positions]
    views = run.plan.views(epoch, order, run.data.train_sizes(order))
    pending, unit, filled, images, lo = [], 0, 0, 0, 0
    for x in run.renderer.train_batches(order, views, run.cfg.batch_size):
        pending.append(run.logits(x))
        filled += len(x)
        images += len(x)
        bar.update(len(x))
        while unit < len(units) and filled >= bounds[unit][1] - bounds[unit][0]:
            rows = bounds[unit][1] - bounds[unit][0]
            block = torch.cat(pending)
            writer.put(epoch, units[unit][0], block[:rows].numpy(), order[lo : lo + rows], views[lo : lo + rows])
            pending, filled, lo = [block[rows:]], filled - rows, lo + rows
            unit += 1
    return images


def write_groups(run: TeacherPass, writer: StoreWriter, jobs) -> tuple[int, float]:
    """Decodes each image of the jobs' groups once, runs the teacher over all its views and hands
    each group's units to the writer (``decode_once``); returns (views, seconds)."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(j.num_views for j in jobs),
        unit="img",
        disable=not run.acc.is_main_process or None,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    if jobs:  # the decoding pipeline's workers start before the clock does, as the view-by-view pipeline's did
        count = len(jobs[0].epochs)
        run.renderer.start_images(count, images_per_batch(run.cfg.batch_size, count))
    start = time.perf_counter()
    try:
        images = sum(
            run_jobs(jobs, run.renderer, run.logits, writer.put, run.cfg.batch_size, bar.update, codec=run.cfg.codec)
        )
    finally:
        bar.close()
    return images, time.perf_counter() - start
