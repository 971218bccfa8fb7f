"""``dhkd-pipe cache-teacher`` (stage 1) and ``verify-cache``.

The teacher runs once over ``views`` augmentation epochs of the training set. Each epoch's
training order and every view come from the ``ViewPlan``; logits are written in training order,
one write unit (whole chunks) at a time, by a background writer so the teacher never waits for the
disk. A unit's ``done`` flags are set after its data, so a killed run resumes where it stopped,
and under ``accelerate launch`` each process writes its own units.
"""

from __future__ import annotations

import os
import queue
import shlex
import sys
import threading
import time

import numpy as np
import torch

from dhkd_pipe import __version__
from dhkd_pipe.cache import LogitCache, check_encodable, codec_tolerance
from dhkd_pipe.config import CacheConfig
from dhkd_pipe.console import log_line
from dhkd_pipe.data import Dataset, Renderer, absolute_spec, load_data, load_store_data
from dhkd_pipe.engine import evaluate, make_accelerator, memory_format
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.options import flag_of, option_fields
from dhkd_pipe.store import StoreObjects, open_store
from dhkd_pipe.store_lock import LOCK_KEY, StoreLock
from dhkd_pipe.teacher import frozen_model, load_teacher, resolve_teacher
from dhkd_pipe.views import ViewPlan

FORMAT_VERSION = 1


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024


class _Writer:
    """Writes units in a background thread, so encoding and disk time hide behind the teacher."""

    def __init__(self, cache: LogitCache, depth: int = 2):
        self.cache, self.jobs, self.error = cache, queue.Queue(maxsize=depth), None
        self.thread = threading.Thread(target=self._run, daemon=True, name="store-writer")
        self.thread.start()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self.cache.write_unit(*job)
                except BaseException as e:  # surfaced to the caller at the next put or at close
                    self.error = e

    def put(self, *job):
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def close(self):
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def cache_teacher(cfg: CacheConfig, log=log_line, break_lock: bool = False) -> dict:
    """Stage 1. Everything that can be checked is checked before the store is touched (the
    location, every image header, the teacher on the first batch); then the main process takes
    the store's lock for the run, creates or reopens the store, verifies the units already written
    and has damaged ones rewritten. A run that fails before its first unit leaves no store.

    ``break_lock``: take over a lock held from another host (``--break-lock``)."""
    acc = make_accelerator(cfg.precision)
    data = load_data(cfg.data)
    fmt = memory_format(cfg)
    loaded = load_teacher(cfg.model, cfg.weights, data, data.default_plan(seed=cfg.seed), acc.device, cfg.resolution, acc, fmt)
    source, plan, preprocessing, teacher = loaded.source, loaded.plan, loaded.preprocessing, loaded.model
    if cfg.compile:  # the views' shapes are fixed: one graph for full batches, one for the last
        teacher = torch.compile(teacher)
    digest = source.digest()
    fingerprint = data.fingerprint()
    data_spec = absolute_spec(cfg.data)
    command = {
        "teacher": cfg.model,
        "weights_digest": digest,
        "dataset": fingerprint,
        "views": cfg.views,
        "seed": cfg.seed,
        "codec": cfg.codec,
        "chunk_rows": cfg.chunk_rows,
        "policy": plan.to_dict(),
        "precision": cfg.precision,
    }
    line = command_line(cfg, data_spec)
    attrs = {
        "teacher": {"arch": cfg.model, "weights_digest": digest, "weights": source.record, "weights_label": source.label,
                    "val_top1": None},
        "dataset": fingerprint,
        "data_spec": data_spec,  # where the data was; stage 2 and verify-cache use it when --data is not given
        "policy": plan.to_dict(),
        "preprocessing": preprocessing,
        "seed": cfg.seed,
        "codec": cfg.codec,
        "precision": cfg.precision,
        "tool_version": __version__,
        "command": command,
        "command_line": line,  # what re-runs this command (with --out): named by the messages that ask for a repair
    }
    geometry = dict(epochs=cfg.views, num_samples=data.num_train, num_classes=data.num_classes, chunk_rows=cfg.chunk_rows)

    # Before anything is written: what is at --out, every image's header, the teacher's first batch.
    objects = StoreObjects(open_store(cfg.out, read_only=False), cfg.out) if acc.is_main_process else None
    if objects is not None:
        LogitCache.check_target(objects, bool(cfg.overwrite))
    renderer = data.renderer(acc.device, plan, workers=cfg.workers)
    _check_inputs(data, plan, renderer, teacher, acc, cfg, fmt)

    lock = None
    if objects is not None:
        fresh = objects.is_empty()
        lock = StoreLock.acquire(objects, f"{line} --out {shlex.quote(str(cfg.out))}", break_lock=break_lock)
    try:
        return _cache(cfg, log, acc, data, plan, renderer, teacher, fmt, source, preprocessing, attrs, geometry, data_spec)
    except BaseException:
        if objects is not None:
            _remove_unwritten(objects)
        raise
    finally:
        if lock is not None:
            lock.release()
            if fresh:
                objects.remove_empty_root()


def _cache(cfg, log, acc, data, plan, renderer, teacher, fmt, source, preprocessing, attrs, geometry, data_spec) -> dict:
    """The store's part of stage 1, under the store's lock (main process)."""
    if acc.is_main_process:
        labels = data.train_labels.cpu().numpy()
        cache = LogitCache.create(cfg.out, labels=labels, codec=cfg.codec, attrs=attrs, overwrite=bool(cfg.overwrite), **geometry)
        if cache.attrs.get("data_spec") != data_spec:  # resumed from a data folder that has moved
            cache.update_attrs(data_spec=data_spec)
        if cache.attrs.get("command_line") != attrs["command_line"]:
            cache.update_attrs(command_line=attrs["command_line"])
        cache.remove_leftovers()
        written = len(cache.objects.list("done/c/"))  # the flags objects of the units written (the mask may be damaged)
        if written:
            log(f"verifying the {written} write units already written (presence and checksums)")
            damaged = cache.repair(labels)
            if damaged:
                more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
                log(f"{len(damaged)} damaged: {damaged[0]}{more}; rewriting them")
    acc.wait_for_everyone()
    if not acc.is_main_process:
        cache = LogitCache.open(cfg.out, mode="r+")

    done = cache.done_mask()
    units = [u for i, u in enumerate(cache.write_units()) if i % acc.num_processes == acc.process_index]
    todo = [(e, chunks) for e, chunks in units if not done[e, chunks].all()]
    if acc.is_main_process:
        log(f"teacher {cfg.model} ({source.label}); views {plan.resolution} px, {plan.interpolation}, "
            f"mean {list(plan.mean)} std {list(plan.std)}: {preprocessing['source']}")
        raw = LogitCache.estimate_bytes(cfg.views, data.num_train, data.num_classes, cfg.codec)
        remaining = int((~done).sum())
        log(
            f"writing {cfg.views} views x {data.num_train} samples x {data.num_classes} classes ({cfg.codec}) "
            f"to {cfg.out}: {_human(raw)} before compression"
            + (f"; resuming, {remaining} of {done.size} chunks left" if remaining < done.size else "")
        )

    if acc.is_main_process and cache.attrs["teacher"].get("val_top1") is None and data.num_val:
        acc_val = evaluate(teacher, renderer, cfg.batch_size, acc)
        cache.update_attrs(teacher={**cache.attrs["teacher"], "val_top1": acc_val["top1"], "val_top5": acc_val["top5"]})
        log(f"teacher {cfg.model}: validation top-1 {acc_val['top1']:.2f}%")

    images, elapsed = _write_units(cache, todo, plan, data, renderer, teacher, acc, cfg.batch_size, fmt)
    acc.wait_for_everyone()
    total_images = int(acc.reduce(torch.tensor(images, device=acc.device), "sum"))
    result = {"store": cfg.out, "images": total_images, "seconds": elapsed, "images_per_sec": total_images / elapsed if elapsed else None}
    if acc.is_main_process:
        cache.check_complete()
        result.update({k: cache.summary()[k] for k in ("shape", "codec", "bytes_on_disk", "bytes_per_logit")})
        result["teacher_val_top1"] = cache.attrs["teacher"].get("val_top1")
    return result


def _check_inputs(data: Dataset, plan: ViewPlan, renderer: Renderer, teacher, acc, cfg: CacheConfig, fmt):
    """What can be checked before the store is created: every image header (an image folder's
    zero-byte or foreign files), and the teacher's logits on the first batch of the first epoch
    (finite, and within the codec's range)."""
    data.train_sizes(np.arange(data.num_train))
    if data.num_val:
        data.val_views(plan)
    n = min(cfg.batch_size, data.num_train)
    order = plan.order(0, data.num_train)[:n]
    views = plan.views(0, order, data.train_sizes(order))
    x = next(iter(renderer.train_batches(order, views, n)))
    with torch.no_grad(), acc.autocast():
        logits = teacher(x.contiguous(memory_format=fmt))
    check_encodable(logits.float().cpu().numpy(), cfg.codec, "of the first batch")


def _remove_unwritten(objects: StoreObjects):
    """After a failure: a store in which no unit was written holds nothing worth keeping and would
    only stand in the way of the re-run; it is removed (the lock stays until released)."""
    try:
        if not objects.list("done/c/"):
            objects.delete_all(keep=(LOCK_KEY,))
    except DhkdError:
        pass  # the failure itself is what the user must see


def command_line(cfg: CacheConfig, data_spec: str) -> str:
    """The cache-teacher command that writes (and repairs) this store, as a shell line: the options
    ``CacheConfig`` marks as recorded (``record=True``), all but ``--out`` (the store records no
    location of its own: it may be copied or moved) and those unset."""
    weights = cfg.weights
    if weights and os.path.isfile(weights):
        weights = os.path.abspath(weights)
    values = {**{f.name: getattr(cfg, f.name) for f in option_fields(CacheConfig)}, "weights": weights, "data": data_spec}
    args = ["dhkd-pipe", "cache-teacher"]
    for f in option_fields(CacheConfig):
        if f.metadata["option"]["record"] and values[f.name] not in (None, ""):
            args += [flag_of(f), values[f.name]]
    return shlex.join(str(a) for a in args)


def _write_units(cache: LogitCache, todo, plan: ViewPlan, data: Dataset, renderer: Renderer, teacher, acc,
                 batch_size: int, fmt: torch.memory_format = torch.contiguous_format):
    """Runs the teacher over the units' positions epoch by epoch; returns (images, seconds)."""
    from tqdm.auto import tqdm

    total = sum(cache.rows(chunks[-1])[1] - cache.rows(chunks[0])[0] for _, chunks in todo)
    bar = tqdm(total=total, unit="img", disable=not acc.is_main_process or None, file=sys.stderr, dynamic_ncols=True)
    writer = _Writer(cache)
    start = time.perf_counter()
    images = 0
    try:
        for epoch in sorted({e for e, _ in todo}):
            units = [chunks for e, chunks in todo if e == epoch]
            bounds = [(cache.rows(chunks[0])[0], cache.rows(chunks[-1])[1]) for chunks in units]
            positions = np.concatenate([np.arange(a, b) for a, b in bounds])
            order = plan.order(epoch, data.num_train)[positions]
            views = plan.views(epoch, order, data.train_sizes(order))
            pending, unit, filled = [], 0, 0
            for x in renderer.train_batches(order, views, batch_size):
                with torch.no_grad(), acc.autocast():
                    logits = teacher(x.contiguous(memory_format=fmt))
                pending.append(logits.float().cpu())
                filled += len(x)
                bar.update(len(x))
                images += len(x)
                while unit < len(units) and filled >= bounds[unit][1] - bounds[unit][0]:
                    rows = bounds[unit][1] - bounds[unit][0]
                    block = torch.cat(pending)
                    lo = sum(b - a for a, b in bounds[:unit])
                    sl = slice(lo, lo + rows)
                    writer.put(epoch, units[unit][0], block[:rows].numpy(), order[sl], views[sl])
                    pending, filled = [block[rows:]], filled - rows
                    unit += 1
    finally:
        bar.close()
        writer.close()
    return images, time.perf_counter() - start


def verify_cache(store: str, data_spec: str | None = None, teacher_weights: str | None = None, samples: int = 256,
                 tolerance: float | None = None) -> dict:
    """Re-renders sampled stored views through the replay path, re-runs the teacher and compares.

    ``data_spec`` and ``teacher_weights`` default to what the store records; weights given here
    must be the store's (same digest)."""
    cache = LogitCache.open(store)
    cache.check_complete()
    data, _ = load_store_data(cache, data_spec)
    acc = make_accelerator(cache.attrs.get("precision", "no"))
    recorded = cache.attrs["teacher"]
    source = resolve_teacher(recorded["arch"], teacher_weights or recorded.get("weights"))
    if source.digest() != recorded.get("weights_digest"):
        raise DhkdError(f"teacher weights {source.label} are not the store's: digest {source.digest()}, "
                        f"the store was written with {recorded.get('weights_digest')} ({recorded.get('weights')})")
    plan = ViewPlan.from_dict(cache.attrs["policy"])
    teacher = frozen_model(source, data.num_classes, plan.resolution, acc.device)
    renderer = data.renderer(acc.device, plan)
    rng = np.random.default_rng(0)
    picks = rng.choice(cache.epochs * cache.num_samples, size=min(samples, cache.epochs * cache.num_samples), replace=False)
    worst, agree, total, tol_used = 0.0, 0, 0, 0.0
    for epoch in range(cache.epochs):
        pos = np.sort(picks[picks // cache.num_samples == epoch] % cache.num_samples)
        if len(pos) == 0:
            continue
        order, views = cache.read_order(epoch)[pos], cache.read_views(epoch)[pos]
        stored = torch.cat([cache.read_rows(epoch, c, pos[(pos // cache.chunk_rows) == c] - c * cache.chunk_rows) for c in np.unique(pos // cache.chunk_rows)])
        fresh = []
        for x in renderer.train_batches(order, views, 64):
            with torch.no_grad(), acc.autocast():
                fresh.append(teacher(x).float().cpu())
        fresh = torch.cat(fresh)
        worst = max(worst, float((fresh - stored).abs().max()))
        agree += int((fresh.argmax(1) == stored.argmax(1)).sum())
        total += len(pos)
        tol_used = max(tol_used, tolerance if tolerance is not None else codec_tolerance(cache.codec, fresh) + 1e-3 * (1 + float(fresh.abs().max())))
    ok = worst <= tol_used
    return {
        "store": store,
        "samples": total,
        "max_abs_diff": worst,
        "tolerance": tol_used,
        "top1_agreement": agree / max(total, 1),
        "ok": ok,
    }
