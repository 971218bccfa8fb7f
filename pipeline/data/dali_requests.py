"""One DALI pipeline that renders requests read from schedule files by its Python workers.

The workers of a parallel external source are started once, so each request (one call of
``DaliRequests.render``) is one DALI epoch whose rows are written to a schedule file in a private
folder (``/dev/shm`` where it exists) that the workers map read-only; ``SampleInfo.epoch_idx``
names the file and ``idx_in_epoch`` the row. The schedule is padded with filler rows (a tiny
image) to whole pipeline batches, and its first row holds the row count, which the main process
sets to 0 to end an abandoned request early.

A schedule row is an int32 record whose first column is the file index (-1: the filler); what
the other columns mean is the source's business (``dali_views``). This module imports neither
torch nor DALI at the top: spawned workers import it through the sources.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from dhkd_pipe import native_stderr
from dhkd_pipe.errors import DhkdError


def schedule_path(folder: str, name: str, epoch: int) -> str:
    return os.path.join(folder, f"{name}-schedule-{epoch}.npy")


class ScheduleReader:
    """The worker's side: the current request's rows, mapped from its schedule file."""

    def __init__(self, folder: str, name: str):
        self.folder, self.name = folder, name
        self._epoch, self._rows = -1, None

    def row(self, info):
        """The schedule row of DALI sample ``info``; StopIteration at the end of the request."""
        if info.epoch_idx != self._epoch:
            self._rows = np.load(schedule_path(self.folder, self.name, info.epoch_idx), mmap_mode="r")
            self._epoch = info.epoch_idx
        if info.idx_in_epoch >= self._rows[0, 0]:  # the end of the request, or the request was abandoned
            raise StopIteration
        return self._rows[1 + info.idx_in_epoch]


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
        self._open = None  # the schedule of a request that has not reached its end
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
        self._open[0, 0] = 0  # workers stop at the next sample of an unfinished request
        try:
            while True:
                self._run()
        except StopIteration:
            pass
        self._pipe.reset()
        self._epoch += 1
        self._open = None
        stale = schedule_path(self.folder, self.name, self._epoch - 2)  # workers may still map the last one
        if os.path.exists(stale):
            os.remove(stale)

    def close(self):
        self._pipe, self._open = None, None

    def render(self, rows: np.ndarray, batch_size: int, pipeline_batch_size: int, on_error: Callable):
        """Rendered samples of schedule ``rows`` in order, ``batch_size`` at a time (the last batch
        may be short). ``on_error(error, first_row, stop_row)`` is called with the rows whose
        rendering may have failed; the pipeline is rebuilt at the next request."""
        import torch

        n = len(rows)
        if n == 0:
            return
        self.start(pipeline_batch_size)
        self._finish()
        epoch, b = self._epoch, self.batch_size
        batches = -(-n // b)
        schedule = np.lib.format.open_memmap(
            schedule_path(self.folder, self.name, epoch),
            mode="w+",
            dtype=np.int32,
            shape=(1 + batches * b, rows.shape[1]),
        )
        schedule[0] = 0
        schedule[0, 0] = batches * b
        schedule[1 : n + 1] = rows
        schedule[n + 1 :] = self.filler_row
        schedule.flush()
        self._open = schedule

        pending, have = [], 0
        own = None if native_stderr.active() else native_stderr.NativeStderr().__enter__()
        capture = native_stderr.active()
        damage = capture.decoder_damage if capture is not None else 0
        try:
            for k in range(batches):
                if self._epoch != epoch or self._open is None:
                    raise RuntimeError("this DALI iterator was ended by a later request; iterate one request at a time")
                try:
                    out = self._run()
                except StopIteration:
                    raise RuntimeError(f"DALI ended request {epoch} after {k} of {batches} batches") from None
                except Exception as e:
                    self._pipe, self._open, self._epoch = None, None, 0  # unusable after a failed run
                    on_error(e, k * b, (k + self.prefetch + 2) * b)  # this batch or one the workers prepared
                    raise
                # a decoder that only warned of damage (corrupt_images): the batch, or one decoded
                # ahead of it, holds an image filled in with grey; stop before anyone sees its pixels
                if capture is not None and capture.sync() and capture.decoder_damage > damage:
                    self._pipe, self._open, self._epoch = None, None, 0
                    on_error(capture.last_damage, k * b, (k + self.prefetch + 2) * b)
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
                self._open[0, 0] = 0  # abandoned: let the workers stop; the next request drains
            if own is not None:
                own.__exit__(None, None, None)
