"""The view loader: batches of (rendered views, labels, teacher logits) in training order.

One loader serves online and cached training; they differ only in where an epoch's order, views
and teacher logits come from:

- ``PlanEpochs``: the ``ViewPlan`` draws them (online distillation, teacher training); there
  are no stored logits, the engine runs the teacher.
- ``StoreEpochs``: the store recorded them in stage 1; training epoch ``k`` replays stored
  view-epoch ``k mod E`` and a few reader threads stream that epoch's logits chunk by chunk, in
  training order, ahead of the step. Its order and views stream too, a write unit at a time, so
  the first batch waits for its own unit's rows, never for a whole epoch's (ImageNet's 1.28M).

Both are an ``EpochSource`` (the protocol below). Positions are split across processes in whole
chunks (rank ``r`` of ``W`` takes chunks ``r, r+W, ...``), and every rank runs the same number of
steps so collective ops line up.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from dhkd_pipe.data.datasets import Dataset, Renderer
from dhkd_pipe.data.views import ViewPlan, cut_batches
from dhkd_pipe.option_ranges import RANGES, check_integer

if TYPE_CHECKING:
    from dhkd_pipe.store.reader import LogitCache


@dataclass
class Batch:
    """One step's data: ``images`` (B, 3, R, R) float32 normalised, ``labels`` (B,) int64 and the
    teacher's logits as stored (``teacher``, with ``teacher_scale`` for int8), all on the device.
    Unpacks as ``images, labels, teacher_logits = batch`` (``teacher_logits`` dequantised)."""

    images: torch.Tensor
    labels: torch.Tensor
    teacher: torch.Tensor | None = None  # stored dtype: fp16/bf16/fp32, or int8 with teacher_scale
    teacher_scale: torch.Tensor | None = None

    @property
    def teacher_logits(self) -> torch.Tensor | None:
        """The teacher's logits as float32 (``teacher_logits.dequantize``), or None where none are streamed."""
        from dhkd_pipe.teacher_logits import dequantize

        return dequantize(self.teacher, self.teacher_scale)

    def __iter__(self):
        return iter((self.images, self.labels, self.teacher_logits))


def rank_chunks(num_chunks: int, rank: int, world: int) -> list[int]:
    return list(range(rank, num_chunks, world))


@runtime_checkable
class EpochSource(Protocol):
    """Where a training epoch's order, views and (when ``has_logits``) teacher logits come from:
    ``PlanEpochs`` and ``StoreEpochs``. Positions are grouped in chunks of ``chunk_rows``."""

    has_logits: bool  # whether ``logits`` streams the teacher's logits
    num_samples: int
    chunk_rows: int

    def view_epoch(self, epoch: int) -> int:
        """The augmentation epoch that training epoch ``epoch`` replays."""
        ...

    def distinct_views(self, epochs: int) -> int:
        """How many distinct views of each sample a run of ``epochs`` epochs sees."""
        ...

    def schedule(
        self, epoch: int, chunks: list[int], skip_rows: int, total_rows: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(dataset indices, views) of rows ``skip_rows:total_rows`` of the concatenated
        ``chunks``, a piece per chunk, in training order."""
        ...

    def logits(
        self, epoch: int, chunks: list[int], skip_rows: int, total_rows: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(teacher, scale) on the device for rows ``skip_rows:total_rows`` of the concatenated
        ``chunks``, in training order; called only when ``has_logits``."""
        ...


class PlanEpochs:
    """Order and views drawn from the plan; each training epoch is its own augmentation epoch."""

    has_logits = False

    def __init__(self, plan: ViewPlan, data: Dataset, chunk_rows: int = 1024):
        self.plan, self.data, self.chunk_rows = plan, data, chunk_rows
        self.num_samples = data.num_train

    def view_epoch(self, epoch: int) -> int:
        return epoch

    def distinct_views(self, epochs: int) -> int:
        return epochs

    def schedule(self, epoch: int, chunks: list[int], skip_rows: int, total_rows: int):
        order, c = self.plan.order(self.view_epoch(epoch), self.num_samples), self.chunk_rows
        for chunk, lo, hi in spans(c, self.num_samples, chunks, skip_rows, total_rows):
            indices = order[chunk * c + lo : chunk * c + hi]
            yield indices, self.plan.views(self.view_epoch(epoch), indices, self.data.train_sizes(indices))

    def logits(self, epoch: int, chunks: list[int], skip_rows: int, total_rows: int):
        # has_logits is False: the engine runs the teacher itself, so a call here is a bug
        raise RuntimeError("PlanEpochs holds no teacher logits (has_logits is False)")


class StoreEpochs:
    """Order, views and logits recorded by stage 1 in a ``LogitCache``.

    Logits stream chunk by chunk with several chunks fetched at once ahead of the step: from
    object storage each chunk is a request whose latency, not the bandwidth, limits one fetch at a
    time. At most ``prefetch_chunks`` chunks are in flight (bounded memory), yielded in order.
    """

    def __init__(self, cache: LogitCache, device, with_logits: bool = True, prefetch_chunks: int | None = None):
        self.cache, self.device = cache, torch.device(device)
        self.prefetch = prefetch_chunks or read_ahead_chunks(cache)
        self.has_logits = with_logits
        self.num_samples, self.chunk_rows = cache.num_samples, cache.chunk_rows

    def view_epoch(self, epoch: int) -> int:
        return epoch % self.cache.epochs

    def distinct_views(self, epochs: int) -> int:
        return min(epochs, self.cache.epochs)

    def schedule(self, epoch: int, chunks: list[int], skip_rows: int, total_rows: int):
        """Reads the order and views a write unit at a time (the objects stage 1 wrote: one read
        each), the next unit read in a thread while this one's chunks are handed out."""
        e, cache, per_unit = self.view_epoch(epoch), self.cache, self.cache.shard_chunks
        wanted = spans(self.chunk_rows, self.num_samples, chunks, skip_rows, total_rows)
        units = [(u, list(group)) for u, group in groupby(wanted, key=lambda span: span[0] // per_unit)]

        def read_unit(unit: int):
            start, stop = cache.unit_rows(unit * per_unit)
            rows, where = (e, slice(start, stop)), unit * per_unit
            order = np.asarray(cache.read("order", rows, e, where), np.int64)
            return start, order, np.asarray(cache.read("views", rows, e, where), np.int32)

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="schedule-reader")
        try:
            following = pool.submit(read_unit, units[0][0]) if units else None
            for k, (_, unit_spans) in enumerate(units):
                start, order, views = following.result()
                if k + 1 < len(units):
                    following = pool.submit(read_unit, units[k + 1][0])
                for c, lo, hi in unit_spans:
                    a = c * self.chunk_rows - start
                    yield order[a + lo : a + hi], views[a + lo : a + hi]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _fetch(self, epoch: int, chunk: int, lo: int, hi: int, pin: bool):
        values, scale = self.cache.read_chunk_tensors(epoch, chunk)
        values = values[lo:hi]
        scale = None if scale is None else scale[lo:hi]
        if pin:
            values = values.pin_memory()
            scale = None if scale is None else scale.pin_memory()
        return values, scale

    def logits(self, epoch: int, chunks: list[int], skip_rows: int, total_rows: int):
        """Yields (teacher, scale) tensors on the device, chunk by chunk, for rows
        ``skip_rows:total_rows`` of the concatenated chunks; up to ``prefetch`` chunks are read
        concurrently ahead of the consumer."""
        e = self.view_epoch(epoch)
        pin = self.device.type == "cuda"
        todo = iter(spans(self.chunk_rows, self.num_samples, chunks, skip_rows, total_rows))
        pool = ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="logit-reader")
        in_flight: deque = deque()

        def submit():
            for c, lo, hi in todo:
                in_flight.append(pool.submit(self._fetch, e, c, lo, hi, pin))
                return

        try:
            for _ in range(self.prefetch):
                submit()
            while in_flight:
                values, scale = in_flight.popleft().result()
                submit()
                yield (
                    values.to(self.device, non_blocking=True),
                    None if scale is None else scale.to(self.device, non_blocking=True),
                )
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def spans(chunk_rows: int, num_samples: int, chunks: list[int], skip_rows: int, total_rows: int):
    """(chunk, lo, hi) for rows ``skip_rows:total_rows`` of the concatenated ``chunks``: rows
    ``lo:hi`` within each chunk that has any."""
    wanted, seen = [], 0
    for c in chunks:
        n = min(chunk_rows, num_samples - c * chunk_rows)
        lo, hi = max(skip_rows - seen, 0), min(total_rows - seen, n)
        seen += n
        if hi > lo:
            wanted.append((c, lo, hi))
        if seen >= total_rows:
            break
    return wanted


READ_AHEAD_BYTES = 64 << 20  # bound on stored logit bytes in flight per process


def read_ahead_chunks(cache) -> int:
    """Chunks to fetch at once: 4 from a local disk; from object storage as many as fit in
    ``READ_AHEAD_BYTES`` (2 to 16), since each fetch there waits mostly on the request's latency."""
    if cache.is_local:
        return 4
    return max(2, min(16, READ_AHEAD_BYTES // max(cache.chunk_nbytes, 1)))


def row_batches(chunks, batch_size: int):
    """Re-cuts a stream of (values, scale) chunks into batches of ``batch_size`` rows."""
    return cut_batches(chunks, batch_size, torch.cat)


def check_batch_size(batch_size) -> int:
    """``batch_size`` as an int, or a ``WrongType`` (TypeError) / ``BadArgument`` (ValueError)
    naming it: a loader's batches hold 1 to ``option_ranges``' most images."""
    rule = RANGES["batch_size"]
    return check_integer("batch_size", batch_size, int(rule.low), int(rule.high))


def check_slot(rank, world_size) -> tuple[int, int]:
    """(rank, world_size) as ints, or an error naming them: a rank is 0..world_size-1."""
    world_size, rank = check_integer("world_size", world_size), check_integer("rank", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        from dhkd_pipe.errors import BadArgument

        raise BadArgument(f"bad process slot: rank {rank} of world_size {world_size} (a rank is 0..world_size-1)")
    return rank, world_size


class ViewLoader:
    """Batches for one process: its share of each epoch's positions, ``batch_size`` at a time."""

    def __init__(
        self,
        epochs: EpochSource,
        renderer: Renderer,
        labels: torch.Tensor,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        batch_size, (rank, world) = check_batch_size(batch_size), check_slot(rank, world)
        self.epochs, self.renderer, self.labels = epochs, renderer, labels
        self.memory_format = memory_format  # of the images handed out (channels_last for NHWC models)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        n, c = epochs.num_samples, epochs.chunk_rows
        self.num_chunks = -(-n // c)
        if self.num_chunks < world:
            from dhkd_pipe.errors import DhkdError

            raise DhkdError(f"{n} samples in chunks of {c} give {self.num_chunks} chunks, fewer than {world} processes")
        rows = [sum(min(c, n - k * c) for k in rank_chunks(self.num_chunks, r, world)) for r in range(world)]
        self.steps = min(-(-r // batch_size) for r in rows)
        # Every rank runs the same number of steps; a lone trailing sample would break BatchNorm.
        if world == 1 and rows[0] % batch_size == 1 and self.steps > 1:
            self.steps -= 1
        self.rows = min(rows[rank], self.steps * batch_size)
        self.my_chunks = rank_chunks(self.num_chunks, rank, world)

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, skip_steps: int = 0):
        """Yields ``Batch``es of training epoch ``epoch`` (0, 1, ...), starting after ``skip_steps``
        batches (0 to ``len(self)``)."""
        epoch, skip_steps = check_integer("epoch", epoch, 0), check_integer("skip_steps", skip_steps, 0, self.steps)
        return self._batches(epoch, skip_steps)  # checked now, not at the first batch

    def _batches(self, epoch: int, skip_steps: int):
        skip = skip_steps * self.batch_size
        handed = deque()  # the labels of the pieces the renderer has taken: one look-up a piece, not a batch

        def pieces():
            for indices, views in self.epochs.schedule(epoch, self.my_chunks, skip, self.rows):
                handed.append(self.labels[torch.as_tensor(indices, device=self.labels.device)])
                yield indices, views

        images = self.renderer.stream_batches(pieces(), self.rows - skip, self.batch_size)
        if self.epochs.has_logits:
            logits = row_batches(self.epochs.logits(epoch, self.my_chunks, skip, self.rows), self.batch_size)
        else:
            logits = None
        for x in images:
            x = x.contiguous(memory_format=self.memory_format)
            lab = _take(handed, len(x))
            if logits is None:
                yield Batch(x, lab)
            else:
                t, s = next(logits)
                yield Batch(x, lab, t, s)


def _take(pieces: deque, n: int) -> torch.Tensor:
    """The first ``n`` rows of the queued pieces, removed from it."""
    out, have = [], 0
    while have < n:
        head = pieces.popleft()
        if have + len(head) > n:
            pieces.appendleft(head[n - have :])
            head = head[: n - have]
        out.append(head)
        have += len(head)
    return torch.cat(out) if len(out) > 1 else out[0]
