"""Stage 1's pass over an image folder that decodes each image once for all its views.

The store's training order is unit-grouped (``views.UnitGroups``): the samples of a write unit
are the same group in every augmentation epoch, so one job per group renders all of its samples'
views from one decode each (``DaliViews.image_batches``), runs the teacher over them and writes
the group's unit of every epoch. A job covers only the epochs whose unit is not done yet (resume),
and under several processes each takes the groups ``g`` with ``g % processes == rank``.

The rows written are the ones the view-by-view pass writes from the same order: each stored row
is the teacher's output for one view, whatever batch it was computed in. A job holds its group's
logits for all its epochs until it writes them, encoded in the store's codec as each batch
arrives: unit rows x views x classes x the codec's bytes (fp16: 2 MB for a 1,024-row unit, 8 views
and 100 classes; 1 GB for ImageNet's 16,384-row shards at 32 views, half of float32's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from dhkd_pipe.data.views import UnitGroups, ViewPlan


@dataclass
class GroupJob:
    """One group's work: its samples, and for each epoch still to write, its unit and rows."""

    group: int
    samples: np.ndarray  # (n,) dataset indices, in the order they are rendered
    epochs: list[int]  # augmentation epochs whose unit of this group is not written yet
    first_chunks: list[int]  # the first chunk of that unit, per epoch
    rows: list[np.ndarray]  # the unit's order (the sample at each row), per epoch
    places: list[np.ndarray]  # for each unit row, its sample's index in ``samples``, per epoch
    views: np.ndarray  # (n, len(epochs), 5): each sample's view in each of those epochs

    @property
    def num_views(self) -> int:
        return len(self.samples) * len(self.epochs)


def group_jobs(
    groups: UnitGroups,
    plan: ViewPlan,
    sizes: Callable[[np.ndarray], np.ndarray],
    epochs: int,
    shard_chunks: int,
    done: np.ndarray,
    rank: int = 0,
    processes: int = 1,
) -> list[GroupJob]:
    """The jobs of process ``rank`` of ``processes``: its groups with a unit not done in some epoch.

    ``done``: (epochs, num_chunks) bool, the store's done flags; ``sizes(indices)``: the images'
    (height, width), which views are drawn against."""
    per_epoch = [groups.epoch(e) for e in range(epochs)]
    members, g = groups.members(), groups.group_rows
    jobs = []
    for k in range(rank, groups.num_groups, processes):
        todo = [
            e
            for e in range(epochs)
            if not done[e, per_epoch[e][1][k] * shard_chunks : (per_epoch[e][1][k] + 1) * shard_chunks].all()
        ]
        if not todo:
            continue
        samples = members[k * g : (k + 1) * g]
        sorter = np.argsort(samples)
        rows, places = [], []
        for e in todo:
            order, unit = per_epoch[e]
            at = order[unit[k] * g : unit[k] * g + len(samples)]
            rows.append(at)
            places.append(sorter[np.searchsorted(samples, at, sorter=sorter)])
        size = sizes(samples)
        views = np.stack([plan.views(e, samples, size) for e in todo], axis=1)
        jobs.append(
            GroupJob(k, samples, todo, [int(per_epoch[e][1][k]) * shard_chunks for e in todo], rows, places, views)
        )
    return jobs


def images_per_batch(batch_views: int, count: int) -> int:
    """Images whose ``count`` views make about ``batch_views`` views (at least one image)."""
    return max(1, -(-batch_views // count))


def run_jobs(
    jobs: list[GroupJob],
    renderer,
    forward: Callable,
    put: Callable,
    batch_views: int,
    progress: Callable[[int], None] = lambda n: None,
    codec: str = "fp32",
) -> Iterator[int]:
    """Renders, runs ``forward`` (views (m, 3, R, R) -> float32 logits (m, K) on the CPU) and
    hands each finished unit to ``put(epoch, first_chunk, rows, order, views)``, ``rows`` the
    unit's logits as :class:`EncodedRows` in ``codec`` (each row encoded alone, so the same as the
    whole unit encoded at once); yields the views done after each job. About ``batch_views`` views
    go through the teacher at a time."""
    from dhkd_pipe.store.codecs import EncodedRows, encode_logits

    for job in jobs:
        count = len(job.epochs)
        images = images_per_batch(batch_views, count)
        values = scales = None
        filled = 0
        for x in renderer.image_batches(job.samples, job.views, images):
            b = len(x)
            y = forward(x.flatten(0, 1)).view(b, count, -1).transpose(0, 1).reshape(b * count, -1)  # epoch-major
            v, scale = encode_logits(y.numpy(), codec, "of the batch")
            if values is None:
                values = np.empty((count, len(job.samples), v.shape[-1]), dtype=v.dtype)
                scales = None if scale is None else np.empty((count, len(job.samples)), dtype=np.float32)
            values[:, filled : filled + b] = v.reshape(count, b, -1)
            if scales is not None:
                scales[:, filled : filled + b] = scale.reshape(count, b)
            filled += b
            progress(b * count)
        for j, e in enumerate(job.epochs):
            place = job.places[j]
            rows = EncodedRows(values[j][place], None if scales is None else scales[j][place])
            put(e, job.first_chunks[j], rows, job.rows[j], job.views[place, j])
        yield job.num_views
