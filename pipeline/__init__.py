"""dhkd-pipe: Dual-Head Knowledge Distillation from a cached teacher.

The Python API, for training loops of your own (the CLI is built on the same pieces):

- ``open_store(location)`` -> ``StoreReplay``: a stage-1 store with its data set;
  ``replay.loader(batch_size, rank=, world_size=)`` -> ``ViewLoader`` whose ``epoch(e)`` yields
  ``Batch``es that unpack as ``images, labels, teacher_logits``, exactly the batches
  ``dhkd-pipe distill --cache`` trains on; ``replay.dataset(...)`` -> ``ReplayDataset``, the same as
  a ``torch.utils.data.IterableDataset``.
- ``DHKDLoss``, ``BinaryKLLoss``, ``KDLoss``, ``DKDLoss``, ``DISTLoss``, ``CELoss``
  (``create_loss(name, **options)``): the methods as ``torch.nn.Module``s, with the CLI's defaults
  and backends.
- ``create_model(name, num_classes, dual_head=...)``, ``list_models()``, ``load_checkpoint``;
  ``DualHead(model)`` adds head 2 to any classifier, ``single_head(model)`` drops it for export.
- ``evaluate(model, replay_loader.renderer, batch_size)``: top-1/top-5 on the validation split.

``import dhkd_pipe`` stays light: each name imports its module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module (under dhkd_pipe) that defines it, imported on first access
_API = {
    "open_store": "data.replay",
    "StoreReplay": "data.replay",
    "ReplayDataset": "data.replay",
    "ViewLoader": "data.loader",
    "Batch": "data.loader",
    "MethodLoss": "methods.loss_modules",
    "CELoss": "methods.loss_modules",
    "KDLoss": "methods.loss_modules",
    "DKDLoss": "methods.loss_modules",
    "BinaryKLLoss": "methods.loss_modules",
    "DHKDLoss": "methods.loss_modules",
    "DISTLoss": "methods.loss_modules",
    "create_loss": "methods.loss_modules",
    "create_model": "models",
    "list_models": "models",
    "load_checkpoint": "models",
    "DualHead": "models",
    "single_head": "models",
    "evaluate": "data.inference",
    "DhkdError": "errors",
}

__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # for type checkers and IDEs (``X as X``: a re-export); at run time the names load lazily
    from dhkd_pipe.data.inference import evaluate as evaluate
    from dhkd_pipe.data.loader import Batch as Batch
    from dhkd_pipe.data.loader import ViewLoader as ViewLoader
    from dhkd_pipe.data.replay import ReplayDataset as ReplayDataset
    from dhkd_pipe.data.replay import StoreReplay as StoreReplay
    from dhkd_pipe.data.replay import open_store as open_store
    from dhkd_pipe.errors import DhkdError as DhkdError
    from dhkd_pipe.methods.loss_modules import BinaryKLLoss as BinaryKLLoss
    from dhkd_pipe.methods.loss_modules import CELoss as CELoss
    from dhkd_pipe.methods.loss_modules import DHKDLoss as DHKDLoss
    from dhkd_pipe.methods.loss_modules import DISTLoss as DISTLoss
    from dhkd_pipe.methods.loss_modules import DKDLoss as DKDLoss
    from dhkd_pipe.methods.loss_modules import KDLoss as KDLoss
    from dhkd_pipe.methods.loss_modules import MethodLoss as MethodLoss
    from dhkd_pipe.methods.loss_modules import create_loss as create_loss
    from dhkd_pipe.models import DualHead as DualHead
    from dhkd_pipe.models import create_model as create_model
    from dhkd_pipe.models import list_models as list_models
    from dhkd_pipe.models import load_checkpoint as load_checkpoint
    from dhkd_pipe.models import single_head as single_head


def __getattr__(name: str):
    if name == "__version__":  # on first use: importlib.metadata slows the CLI's start-up
        from dhkd_pipe.version import tool_version

        return tool_version()
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | {"__version__"})
