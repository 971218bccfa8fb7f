"""A training run's set-up: ``Run`` (what a prepared run is set up with: accelerator, method,
model, optimizer, loader, data, teacher or store, the locked run folder) and ``prepare``, which
checks everything before the run folder is touched. What changes as a run trains is its
``Progress`` (``training.state``); the loop that trains it is ``training.engine``."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.data.datasets import Dataset, Renderer
from dhkd_pipe.data.inference import memory_format
from dhkd_pipe.data.loader import PlanEpochs, ViewLoader
from dhkd_pipe.data.views import ViewPlan
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.methods.base import Method
from dhkd_pipe.methods.feature_methods import CACHE_REFUSAL, is_feature_method
from dhkd_pipe.methods.registry import from_config
from dhkd_pipe.store.targets import RUN_IN_STORE, check_outside_folders
from dhkd_pipe.training.accelerator import make_accelerator
from dhkd_pipe.training.nonfinite import NonFiniteGuard
from dhkd_pipe.training.run_folder import RunFolder, RunMode, check_inputs_outside, check_out
from dhkd_pipe.training.state import Progress, restore_training_state, rng_state

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dhkd_pipe.data.replay import StoreReplay
    from dhkd_pipe.store.reader import LogitCache

__all__ = ["Run", "prepare"]


@dataclass
class Run:
    """What a prepared run is set up with; everything is checked before the run folder is touched.
    What changes as it trains is ``progress``."""

    cfg: TrainConfig
    accelerator: Accelerator
    method: Method
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: ViewLoader | None = None  # its ``epochs`` is an EpochSource: PlanEpochs or StoreEpochs
    renderer: Renderer | None = None
    data: Dataset | None = None
    data_spec: str | None = None  # the data set trained on (--data, or the store's)
    plan: ViewPlan | None = None
    teacher: torch.nn.Module | None = None  # online distillation's frozen teacher
    cache: LogitCache | None = None
    folder: RunFolder | None = None  # the locked run folder (main process)
    progress: Progress = field(default_factory=Progress)
    guard: NonFiniteGuard | None = None  # --max-nonfinite; None: every step is taken
    generators: dict | None = None  # this process's random generators as prepare left them (rng_state)

    def close(self, failed: bool = False):
        """Releases the run folder (see ``RunFolder.close``)."""
        if self.folder is not None:
            self.folder.close(failed)
            self.folder = None


def process_loader(replay, cfg: TrainConfig, acc, with_logits: bool, fmt: torch.memory_format) -> ViewLoader:
    """The store's replay loader of this process's slot in ``acc``, as ``cfg`` asks for it (one
    run, or every student of a pass sharing it)."""
    return replay.loader(
        cfg.batch_size,
        device=acc.device,
        rank=acc.process_index,
        world_size=acc.num_processes,
        workers=cfg.workers,
        with_logits=with_logits,
        memory_format=fmt,
    )


def prepare(
    cfg: TrainConfig,
    mode: RunMode | str = RunMode.NEW,
    replay: StoreReplay | None = None,
    loader: ViewLoader | None = None,
) -> Run:
    """Loads and checks data, store, models and weights, then sets up the run folder (``mode``:
    start a new run, resume the one in ``cfg.out``, or overwrite it).

    The store is opened and its loader built through the Python API (``replay.open_store``,
    ``StoreReplay.loader``); ``replay`` and ``loader`` are those of a pass that several students
    share (``dhkd_pipe.training.students``), by default the run's own."""
    from dhkd_pipe.data.datasets import load_data
    from dhkd_pipe.models import check_input_size, create_model, default_weights

    mode = RunMode(mode)
    method = from_config(cfg)
    if cfg.cache and is_feature_method(method):
        raise DhkdError(CACHE_REFUSAL.format(name=method.name))
    online = method.needs_teacher and not cfg.cache
    if online and not cfg.teacher:
        raise DhkdError(
            f"--method {method.name} needs a teacher: --cache STORE, or --teacher NAME [--teacher-weights FILE]"
        )
    if online and not cfg.teacher_weights and default_weights(cfg.teacher) is None:
        raise DhkdError(
            f"--teacher {cfg.teacher} has no published weights (a KD-zoo model): pass --teacher-weights FILE"
        )
    if (cfg.grad_align or cfg.grad_align_features) and not method.dual_head:
        flag = "--grad-align" if cfg.grad_align else "--grad-align-features"
        raise DhkdError(
            f"{flag} aligns head 1's CE with head 2's distillation gradient: only --method dhkd and "
            "dhkd_reviewkd have two heads"
        )
    check_outside_folders(cfg.out, {"--cache": cfg.cache}, RUN_IN_STORE)
    out_plan = check_out(cfg.out, mode)  # reads only; repeated under the folder's lock
    check_inputs_outside(out_plan, {"--teacher-weights": cfg.teacher_weights, "--cache": cfg.cache, "--data": cfg.data})
    acc = make_accelerator(cfg.precision, cfg.log_with, cfg.out)
    torch.manual_seed(cfg.seed)

    cache = None
    if cfg.cache:  # the store's data, views and preprocessing (and, when the method needs them, its logits)
        from dhkd_pipe.data.replay import open_store

        replay = replay or open_store(cfg.cache, cfg.data)
        cache, data, data_spec, plan = replay.cache, replay.data, replay.data_spec, replay.plan
        if cfg.resolution and cfg.resolution != plan.resolution:
            raise DhkdError(
                f"--resolution {cfg.resolution}: the store {cfg.cache} holds views rendered at {plan.resolution}, "
                f"which stage 2 replays as recorded; drop --resolution, or cache the teacher at {cfg.resolution}"
            )
    else:
        data, data_spec = load_data(cfg.data), cfg.data
        plan = data.default_plan(seed=cfg.seed, resolution=cfg.resolution)

    fmt = memory_format(cfg, acc.device)
    model = create_model(
        cfg.model,
        data.num_classes,
        dual_head=method.dual_head,
        aux_head=cfg.aux_head,
        align_features=cfg.grad_align_features,
    )
    teacher = None
    if online:  # the teacher's weights, and for image folders the preprocessing they were trained with
        from dhkd_pipe.data.teacher import load_teacher

        loaded = load_teacher(cfg.teacher, cfg.teacher_weights, data, plan, acc.device, cfg.resolution, acc, fmt)
        teacher, plan = loaded.model, loaded.plan
    check_input_size(cfg.model, plan.resolution, data.num_classes, "student" if method.needs_teacher else "model")
    if is_feature_method(method):  # the connector trains, checkpoints and reduces with the student
        from dhkd_pipe.methods.connectors import StudentWithConnector

        model = StudentWithConnector(model, method.connector(model, teacher, plan.resolution))
    model.to(memory_format=fmt)
    if loader is None and replay is not None:  # the store's replay, as the Python API hands it out
        loader = process_loader(replay, cfg, acc, method.needs_teacher, fmt)
    elif loader is None:
        loader = ViewLoader(
            PlanEpochs(plan, data),
            data.renderer(acc.device, plan, workers=cfg.workers),
            data.train_labels.to(acc.device),
            cfg.batch_size,
            acc.process_index,
            acc.num_processes,
            memory_format=fmt,
        )
    renderer = loader.renderer
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    run = Run(cfg, acc, method, model, optimizer, loader, renderer, data, data_spec, plan, teacher, cache)
    acc.wait_for_everyone()  # every process has checked --out (check_out) before the main one locks it
    if acc.is_main_process:
        run.folder = RunFolder.open(out_plan, command=_command_line())
    acc.wait_for_everyone()
    try:
        if mode is RunMode.RESUME:
            restore_training_state(run)
        run.model, run.optimizer = acc.prepare(run.model, run.optimizer)
    except BaseException:
        run.close()
        raise
    run.guard = NonFiniteGuard(acc.device, cfg.max_nonfinite, acc.num_processes, run.progress)
    run.generators = rng_state(acc.device)  # seeded, or restored from the checkpoint: what its steps start from
    if cfg.compile:
        # here, not through Accelerate's dynamo_backend: its process-wide state keeps the first
        # Accelerator's setting, so a later run in the same process (bench, quickstart) would not compile
        run.model = torch.compile(run.model)
    return run


def _command_line() -> str:
    return " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300]
