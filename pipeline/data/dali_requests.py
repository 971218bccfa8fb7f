"""One DALI pipeline that renders requests read from schedule files by its Python workers.

The workers of a parallel external source are started once, so each request (one call of
``DaliRequests.render``) is one DALI epoch whose rows are written to a schedule file in a private
folder (``/dev/shm`` where it exists) that the workers read; ``SampleInfo.epoch_idx`` names the
file and ``idx_in_epoch`` the row. The schedule is padded with filler rows (a tiny image) to whole
pipeline batches. Its header holds the row count, which the main process sets to 0 to end an
abandoned request early, and how many rows are written so far: a request's rows may arrive while
it renders (the loader streams a stored epoch's schedule), each written a few pipeline batches
before DALI can ask for it; a worker that gets ahead of them waits. Both sides use
``pwrite``/``pread``, not a shared mapping, so that a worker that sees the count sees the rows it
counts on any CPU (a mapping's stores may become visible out of order on weakly ordered CPUs).

A schedule row is an int32 record whose first column is the file index (-1: the filler); what
the other columns mean is the source's business (``dali_views``). This module imports neither
torch nor DALI at the top: spawned workers import it through the sources.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable

import numpy as np

from dhkd_pipe import native_stderr
from dhkd_pipe.errors import DhkdError

HEADER = 4  # int32s before the rows: row count (0: abandoned), rows written, columns, unused
ROW_WAIT_S = 600.0  # a worker waits this long for a row the main process has not written


def schedule_path(folder: str, name: str, epoch: int) -> str:
    return os.path.join(folder, f"{name}-schedule-{epoch}.bin")


def _read_ints(fd: int, count: int, offset: int) -> np.ndarray:
    return np.frombuffer(os.pread(fd, 4 * count, 4 * offset), dtype=np.int32)


class ScheduleReader:
    """The worker's side: the current request's rows, read from its schedule file."""

    def __init__(self, folder: str, name: str):
        self.folder, self.name = folder, name
        self._epoch, self._fd, self._cols = -1, None, 0

    def _open(self, epoch: int):
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(schedule_path(self.folder, self.name, epoch), os.O_RDONLY)
        self._epoch, self._cols = epoch, int(_read_ints(self._fd, HEADER, 0)[2])

    def row(self, info):
        """The schedule row of DALI sample ``info``, once written; StopIteration at the end of the
        request (or when it was abandoned)."""
        if info.epoch_idx != self._epoch:
            self._open(info.epoch_idx)
        index, deadline = info.idx_in_epoch, None
        while True:
            total, written = (int(v) for v in _read_ints(self._fd, 2, 0))
            if index >= total:
                raise StopIteration
            if index < written:
                return _read_ints(self._fd, self._cols, HEADER + index * self._cols)
            deadline = deadline or time.monotonic() + ROW_WAIT_S
            if time.monotonic() > deadline:
                raise RuntimeError(f"schedule row {index} was not written within {ROW_WAIT_S:.0f} s")
            time.sleep(0.0005)


class Schedule:
    """The main process's side of one request's schedule file: ``rows`` (blocks of int32 rows,
    ``total`` in all) written as they are needed, then filler rows to ``padded``."""

    def __init__(self, path: str, blocks: Iterable[np.ndarray], total: int, padded: int, filler_row: np.ndarray):
        self.blocks, self.total, self.padded, self.filler = iter(blocks), total, padded, filler_row
        self.cols, self.written = len(filler_row), 0
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, 4 * (HEADER + padded * self.cols))  # sparse: no cost per row until written
        self._put(np.array([padded, 0, self.cols, 0], np.int32), 0)

    def _put(self, values: np.ndarray, offset: int):
        data = np.ascontiguousarray(values, dtype=np.int32).tobytes()
        if os.pwrite(self.fd, data, 4 * offset) != len(data):
            raise OSError(f"short write to the DALI schedule ({len(data)} bytes)")

    def _append(self, rows: np.ndarray):
        rows = np.asarray(rows, dtype=np.int32).reshape(-1, self.cols)
        if self.written + len(rows) > self.padded:
            raise ValueError(f"the schedule got more than its {self.total} rows")
        self._put(rows, HEADER + self.written * self.cols)
        self.written += len(rows)
        self._put(np.array([self.written], np.int32), 1)  # after the rows it counts

    def ensure(self, rows: int):
        """Writes rows until at least ``rows`` (at most all, fillers included) are written."""
        while self.written < min(rows, self.padded):
            if self.written < self.total:
                block = next(self.blocks, None)
                if block is None:
                    raise ValueError(f"the schedule ended after {self.written} of its {self.total} rows")
                self._append(block)
            else:
                self._append(np.tile(self.filler, (self.padded - self.written, 1)))

    def rows(self, first: int, stop: int) -> np.ndarray:
        """Written rows ``first:stop`` (fewer where not written yet)."""
        stop = min(stop, self.written)
        if stop <= first:
            return np.empty((0, self.cols), np.int32)
        return _read_ints(self.fd, (stop - first) * self.cols, HEADER + first * self.cols).reshape(-1, self.cols)

    def abandon(self):
        self._put(np.array([0], np.int32), 0)  # workers stop at their next sample

    def close(self):
        os.close(self.fd)


class DaliRequests:
    """A DALI pipeline built by ``graph(source)`` (its one output: a rendered tensor per sample)
    serving requests one at a time; ``render`` yields torch tensors on ``device``.

    ``samples_rendered`` counts the real (non-filler) samples that came out of the pipeline: one
    per decoded image, since each sample's graph decodes its encoded file once.
    """

    def __init__(
        self,
        folder: str,
        name: str,
        source,
        graph: Callable,
        filler_row,
        device,
        *,
        num_workers: int,
        num_threads: int,
        prefetch: int,
        start_method: str,
    ):
        self.folder, self.name, self.source, self.graph = folder, name, source, graph
        self.filler_row = np.asarray(filler_row, dtype=np.int32)
        self.device = device
        self.device_id = device.index if device.type == "cuda" else None
        self.num_workers, self.num_threads, self.prefetch, self.start_method = (
            num_workers,
            num_threads,
            prefetch,
            start_method,
        )
        self.batch_size = None  # pipeline batch: fixed by the first request
        self.samples_rendered = 0
        self._pipe = None
        self._epoch = 0  # DALI's epoch index: one per request
        self._open = None  # the Schedule of a request that has not reached its end
        self._copied = None  # CUDA event: the last output copy is done and DALI may reuse its buffer

    def start(self, batch_size: int):
        """Builds the pipeline (starting its workers) for ``batch_size`` samples a run, if not built."""
        if self._pipe is None:
            self._build(self.batch_size or batch_size)

    def _build(self, batch_size: int):
        from nvidia.dali import Pipeline

        self.batch_size = batch_size
        pipe = Pipeline(
            batch_size=batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
            # 0 workers: the source runs in the main process (no parallel external source)
            **(
                dict(py_num_workers=self.num_workers, py_start_method=self.start_method) if self.num_workers > 0 else {}
            ),
        )
        with pipe:
            pipe.set_outputs(self.graph(self.source, parallel=self.num_workers > 0, prefetch=self.prefetch))
        pipe.build()  # starts the workers
        self._pipe = pipe

    def _run(self):
        if self._copied is not None:
            self._copied.synchronize()  # DALI reuses the buffer the last copy read from
            self._copied = None
        (out,) = self._pipe.run()
        return out

    def _to_torch(self, out):
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = out.as_tensor()
        x = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            feed_ndarray(dense, x, cuda_stream=stream)  # ordered after the caller's work on x's memory
            self._copied = torch.cuda.Event()
            self._copied.record(stream)
        else:
            feed_ndarray(dense, x)
        return x

    def _finish(self):
        """Ends the current DALI epoch: runs the pipeline to its StopIteration, then resets it."""
        if self._open is None:
            return
        self._open.abandon()  # workers stop at the next sample of an unfinished request
        try:
            while True:
                self._run()
        except StopIteration:
            pass
        self._pipe.reset()
        self._epoch += 1
        self._open.close()
        self._open = None
        stale = schedule_path(self.folder, self.name, self._epoch - 2)  # workers may still read the last one
        if os.path.exists(stale):
            os.remove(stale)

    def close(self):
        if self._open is not None:
            self._open.close()
        self._pipe, self._open = None, None

    def _failed(self, schedule, on_error: Callable, error, first: int):
        """The pipeline is unusable after a failed run: dropped (rebuilt at the next request), and
        ``on_error`` given the files of this batch and of those the workers may have prepared."""
        files = schedule.rows(first, first + (self.prefetch + 3) * self.batch_size)[:, 0]
        self._pipe, self._open, self._epoch = None, None, 0
        schedule.abandon()  # a worker of the dropped pipeline waiting for a row stops
        schedule.close()
        on_error(error, files)

    def render(self, rows, batch_size: int, pipeline_batch_size: int, on_error: Callable, total: int | None = None):
        """Rendered samples of schedule ``rows`` in order, ``batch_size`` at a time (the last batch
        may be short). ``rows``: an int32 array, or an iterable of such blocks, ``total`` rows in
        all, each block taken only when DALI is about to need its rows. ``on_error(error, files)``
        is called with the file indices whose rendering may have failed; the pipeline is rebuilt
        at the next request."""
        import torch

        if total is None:
            rows = np.asarray(rows, dtype=np.int32)
            rows, n = [rows], len(rows)
        else:
            n = total
        if n == 0:
            return
        self.start(pipeline_batch_size)
        self._finish()
        epoch, b = self._epoch, self.batch_size
        batches = -(-n // b)
        schedule = Schedule(schedule_path(self.folder, self.name, epoch), rows, n, batches * b, self.filler_row)
        self._open = schedule
        # DALI asks for rows up to a few batches past the one a run returns (its queues, the
        # workers' prefetch): those are written before the run; a worker ahead of them waits
        ahead = self.prefetch + 3

        pending, have = [], 0
        own = None if native_stderr.active() else native_stderr.NativeStderr().__enter__()
        capture = native_stderr.active()
        damage = capture.decoder_damage if capture is not None else 0
        try:
            for k in range(batches):
                if self._epoch != epoch or self._open is None:
                    raise RuntimeError("this DALI iterator was ended by a later request; iterate one request at a time")
                schedule.ensure((k + ahead) * b)
                try:
                    out = self._run()
                except StopIteration:
                    raise RuntimeError(f"DALI ended request {epoch} after {k} of {batches} batches") from None
                except Exception as e:
                    self._failed(schedule, on_error, e, k * b)
                    raise
                # a decoder that only warned of damage (corrupt_images): the batch, or one decoded
                # ahead of it, holds an image filled in with grey; stop before anyone sees its pixels
                if capture is not None and capture.sync() and capture.decoder_damage > damage:
                    self._failed(schedule, on_error, capture.last_damage, k * b)
                    raise RuntimeError("a decoder reported damaged data that no file repeats")
                x = self._to_torch(out)[: min(b, n - k * b)]
                self.samples_rendered += len(x)
                pending.append(x)
                have += len(x)
                while have >= batch_size:
                    whole = torch.cat(pending) if len(pending) > 1 else pending[0]
                    yield whole[:batch_size]
                    pending = [whole[batch_size:]] if len(whole) > batch_size else []
                    have -= batch_size
            if have:
                yield torch.cat(pending) if len(pending) > 1 else pending[0]
            self._finish()
        except DhkdError:
            if own is not None:
                own.drop = True  # the error's one line says what the decoder's lines would
            raise
        finally:
            if self._epoch == epoch and self._open is not None:
                self._open.abandon()  # abandoned: let the workers stop; the next request drains
            if own is not None:
                own.__exit__(None, None, None)
