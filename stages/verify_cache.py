"""``dhkd-pipe verify-cache``: re-renders sampled stored views through the replay path, re-runs the
teacher and compares its logits with the store's, within the codec's tolerance. The teacher's
weights are the ones the user names, or the store's record only where it can be the file the store
was written with."""

from __future__ import annotations

import os

import numpy as np
import torch

from dhkd_pipe.console import log_line
from dhkd_pipe.data.datasets import load_store_data
from dhkd_pipe.data.teacher import frozen_model, resolve_teacher
from dhkd_pipe.data.views import ViewPlan
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models.pretrained import WeightsSource
from dhkd_pipe.option_ranges import check_value
from dhkd_pipe.store.codecs import codec_tolerance
from dhkd_pipe.store.reader import LogitCache
from dhkd_pipe.training.accelerator import make_accelerator

MAX_UNSIZED_WEIGHTS_BYTES = 4 << 30  # a store that records no size: the largest file read as its teacher


def verified_weights(recorded: dict, given: str | None, log) -> WeightsSource:
    """The teacher weights ``verify-cache`` reads: the file (or named weights) the user gave, else
    the store's record, read only where it can be the teacher the store's digest names: a regular
    file of the size the store records (at most ``MAX_UNSIZED_WEIGHTS_BYTES`` where it records
    none), so a record naming some other large file is refused before a byte of it is hashed."""
    arch = recorded["arch"]
    if given:
        source = resolve_teacher(arch, given)
        log(f"verify-cache: teacher weights {source.label} (--teacher-weights)")
        return source
    if not recorded.get("weights"):
        raise DhkdError("the store records no teacher weights: pass --teacher-weights FILE")
    source = resolve_teacher(arch, recorded["weights"])
    size, expected = os.path.getsize(source.path), recorded.get("weights_bytes")
    if (size != expected) if expected is not None else size > MAX_UNSIZED_WEIGHTS_BYTES:
        wanted = f"{expected} bytes" if expected is not None else f"at most {MAX_UNSIZED_WEIGHTS_BYTES >> 30} GiB"
        raise DhkdError(
            f"the store's recorded teacher weights {source.label} are {size} bytes where its teacher's are "
            f"{wanted}: not the file it was written with; pass --teacher-weights FILE"
        )
    log(f"verify-cache: teacher weights {source.label}, as the store records them")
    return source


def verify_cache(
    store: str,
    data_spec: str | None = None,
    teacher_weights: str | None = None,
    samples: int = 256,
    tolerance: float | None = None,
    log=log_line,
) -> dict:
    """Re-renders sampled stored views through the replay path, re-runs the teacher and compares.

    ``data_spec`` and ``teacher_weights`` default to what the store records; weights given here
    must be the store's (same digest). Which weights are read is said in a line (``log``)."""
    check_value("samples", samples)
    check_value("tolerance", tolerance)
    cache = LogitCache.open(store)
    cache.check_complete()
    data, _ = load_store_data(cache, data_spec)
    acc = make_accelerator(cache.attrs.get("precision", "no"))
    recorded = cache.recorded("teacher")
    source = verified_weights(recorded, teacher_weights, log)
    if source.digest() != recorded.get("weights_digest"):
        raise DhkdError(
            f"teacher weights {source.label} are not the store's: digest {source.digest()}, "
            f"the store was written with {recorded.get('weights_digest')} ({recorded.get('weights')})"
        )
    plan = ViewPlan.from_dict(cache.recorded("policy"))
    teacher = frozen_model(source, data.num_classes, plan.resolution, acc.device)
    renderer = data.renderer(acc.device, plan)
    rng = np.random.default_rng(0)
    picks = rng.choice(
        cache.epochs * cache.num_samples, size=min(samples, cache.epochs * cache.num_samples), replace=False
    )
    worst, agree, total, tol_used = 0.0, 0, 0, 0.0
    for epoch in range(cache.epochs):
        pos = np.sort(picks[picks // cache.num_samples == epoch] % cache.num_samples)
        if len(pos) == 0:
            continue
        order, views = cache.read_order(epoch)[pos], cache.read_views(epoch)[pos]
        stored = torch.cat(
            [
                cache.read_rows(epoch, c, pos[(pos // cache.chunk_rows) == c] - c * cache.chunk_rows)
                for c in np.unique(pos // cache.chunk_rows)
            ]
        )
        fresh = []
        for x in renderer.train_batches(order, views, 64):
            with torch.inference_mode(), acc.autocast():
                fresh.append(teacher(x).float().cpu())
        fresh = torch.cat(fresh)
        worst = max(worst, float((fresh - stored).abs().max()))
        agree += int((fresh.argmax(1) == stored.argmax(1)).sum())
        total += len(pos)
        tol_used = max(
            tol_used,
            tolerance
            if tolerance is not None
            else codec_tolerance(cache.codec, fresh) + 1e-3 * (1 + float(fresh.abs().max())),
        )
    ok = worst <= tol_used
    return {
        "store": store,
        "teacher_weights": source.label,
        "samples": total,
        "max_abs_diff": worst,
        "tolerance": tol_used,
        "top1_agreement": agree / max(total, 1),
        "ok": ok,
    }
