"""Stage 2's batches for any training loop: a stage-1 store opened with its data set and replayed
as ``(images, labels, teacher_logits)``, exactly as ``dhkd-pipe distill --cache`` trains on them.

``open_store(location)`` checks the store (complete, and its data set's fingerprint matches) and
returns a ``StoreReplay``; ``replay.loader(batch_size, rank=..., world_size=...)`` is the
``ViewLoader`` the training engine itself iterates (``training.run.prepare`` builds its loader here), so
a user's loop and the CLI see the same pixels, labels and logits, batch for batch.
``ReplayDataset`` is the same epoch as a ``torch.utils.data.IterableDataset`` for frameworks that
want a ``DataLoader`` (Lightning, Accelerate's ``prepare``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from dhkd_pipe.data.datasets import Dataset
from dhkd_pipe.data.loader import Batch, StoreEpochs, ViewLoader, check_batch_size, check_slot
from dhkd_pipe.data.views import ViewPlan
from dhkd_pipe.option_ranges import RANGES, check_integer

if TYPE_CHECKING:
    from dhkd_pipe.store.reader import LogitCache


def default_device() -> torch.device:
    """The current CUDA device where there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _device(device) -> torch.device:
    """``device`` as a torch.device (default: ``default_device()``), or a ``BadArgument`` naming it."""
    if device is None:
        return default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        from dhkd_pipe.errors import BadArgument

        raise BadArgument(f"bad device {device!r}: name one torch knows, such as 'cpu' or 'cuda:0'") from None


def process_slot(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else torch.distributed's when a process group is up, else (0, 1)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    return check_slot(rank, world_size)


@dataclass
class StoreReplay:
    """An opened, checked stage-1 store with its data set and view plan (what the store recorded)."""

    cache: LogitCache
    data: Dataset
    data_spec: str  # the data set it replays (the store's, or the ``data`` given to ``open_store``)
    plan: ViewPlan  # the recorded augmentation policy, resolution and normalisation

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def num_samples(self) -> int:
        """Training images per epoch."""
        return self.cache.num_samples

    @property
    def view_epochs(self) -> int:
        """Stored view-epochs E: training epoch k replays view-epoch k mod E."""
        return self.cache.epochs

    @property
    def resolution(self) -> int:
        return self.plan.resolution

    def loader(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        workers: int | None = 2,
        with_logits: bool = True,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> ViewLoader:
        """Process ``rank`` of ``world_size``'s batches (default: torch.distributed's slot, else 0 of 1).

        ``loader.epoch(e)`` yields ``Batch``es of training epoch ``e`` (``images, labels,
        teacher_logits = batch``), ``len(loader)`` steps each, on ``device`` (default: the current
        CUDA device, else the CPU). In-memory data sets render by gathers on the device, image
        folders through DALI (``workers`` threads; GPU decoding on a CUDA device). Each process
        takes whole chunks of positions (rank r of W: chunks r, r+W, ...) and every process runs
        the same number of steps. ``with_logits=False`` streams no logits (``batch.teacher`` None).
        """
        check_batch_size(batch_size)  # before any renderer starts
        if workers is not None:
            check_integer("workers", workers, int(RANGES["workers"].low), int(RANGES["workers"].high))
        rank, world_size = process_slot(rank, world_size)
        device = _device(device)
        epochs = StoreEpochs(self.cache, device, with_logits=with_logits)
        renderer = self.data.renderer(device, self.plan, workers=workers)
        labels = self.data.train_labels.to(device)
        return ViewLoader(epochs, renderer, labels, batch_size, rank, world_size, memory_format=memory_format)

    def dataset(self, batch_size: int, epoch: int = 0, **loader_options) -> "ReplayDataset":
        """The same batches as a ``torch.utils.data.IterableDataset`` (see ``ReplayDataset``)."""
        return ReplayDataset(self.loader(batch_size, **loader_options), epoch)


def open_store(location: str, data: str | None = None) -> StoreReplay:
    """Opens the stage-1 store at ``location`` (a path, or a URL: ``s3://``, ``gs://``, ``file://``)
    for replay; ``data`` names its data set where it has moved (default: the spec the store records).

    Raises ``DhkdError`` for a store that is incomplete or damaged, or whose data set's
    fingerprint differs from the one recorded.
    """
    from dhkd_pipe.data.datasets import load_store_data
    from dhkd_pipe.store.reader import LogitCache

    cache = LogitCache.open(location)
    cache.check_complete()
    dataset, spec = load_store_data(cache, data)
    return StoreReplay(cache, dataset, spec, ViewPlan.from_dict(cache.recorded("policy")))


class ReplayDataset(torch.utils.data.IterableDataset):
    """One process's batches of one epoch as an ``IterableDataset`` of ready batches: tuples
    ``(images, labels, teacher_logits)`` already on the loader's device. Wrap it as
    ``DataLoader(ds, batch_size=None)`` (no re-batching; keep ``num_workers=0``: rendering runs on
    the device, or in DALI's own threads). ``set_epoch(e)`` picks the epoch the next iteration replays."""

    def __init__(self, loader: ViewLoader, epoch: int = 0):
        super().__init__()
        self.loader, self.epoch = loader, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        for batch in self.loader.epoch(self.epoch):
            yield tuple(batch)


__all__ = ["open_store", "StoreReplay", "ReplayDataset", "Batch", "ViewLoader", "default_device", "process_slot"]
