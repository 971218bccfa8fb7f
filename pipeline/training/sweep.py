"""A sweep: runs that differ in their training options, trained from one loader pass over a store.

Which options may differ is declared once, by the option itself (``option(..., sweep=True)``:
the student, the method and its weights, the optimizer's settings, the seed); the options that
shape the loader (``students.SHARED``) are one for the whole pass. The runs come from the command
line (``--method kd,dhkd --temperature 1,2,4 --seeds 0,1``: the product of the values) and from a
sweep file (YAML: a grid ``{option: [values]}``, whose product is taken with the command line's,
or a list of runs ``[{option: value}]``, each taken with every run of the command line's product).

Each run gets its folder ``OUT/NAME``, NAME saying what differs between the runs: ``resnet8-s1``
where only the student and seed do (as ``--student A,B --seeds 0,1`` always named them), else
``option=value`` parts joined by commas: the student, the method, the other options in their
declaration order, the seed last (``method=kd,temperature=2,seed=0``). ``OUT/sweep.json`` lists
the runs, what each was given and how each ended, for ``dhkd-pipe report`` (``stages.leaderboard``).

Before any run folder is created the pass estimates the memory its runs need and refuses a sweep
over the device's limit (``check_memory``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass

from dhkd_pipe.config import TrainConfig
from dhkd_pipe.config.values import coerce, short_repr
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.models.registry import model_kind
from dhkd_pipe.options import flag_of, listed_on_command_line, option_fields, sweepable
from dhkd_pipe.training.students import SHARED

SWEEP_FILE = "sweep.json"  # OUT's index of the runs of a sweep (stages.leaderboard reads it)
LEGACY_NAMES = ("model", "seed")  # a sweep of these alone keeps the names --student A,B --seeds gave
FIRST = ("model", "method")  # a run's name starts with what it is, then the other options in declaration order


def sweep_fields() -> dict[str, dataclasses.Field]:
    """The TrainConfig options runs of one pass may differ in, in declaration order."""
    return {f.name: f for f in option_fields(TrainConfig) if sweepable(f)}


@dataclass
class SweptRun:
    """One run of a sweep: its folder's name, the swept options' values it was given, its config."""

    name: str
    options: dict
    cfg: TrainConfig


def split_command_line(options: dict) -> tuple[dict, dict[str, list]]:
    """(the options with one value each, the grid: option -> its several values) from a sweeping
    command's options, whose sweepable ones are text (``click_params(..., sweeps=True)``)."""
    single, grid = dict(options), {}
    for name, f in sweep_fields().items():
        text = options.get(name)
        if not listed_on_command_line(f) or not isinstance(text, str) or "," not in text:
            continue
        flag = flag_of(f, "distill")
        values = [v.strip() for v in text.split(",")]
        if not all(values):
            raise DhkdError(f"{flag} takes comma-separated values, e.g. a,b; got {text!r}")
        grid[name] = [coerce(name, v, f.type) for v in values]
        twice = [v for i, v in enumerate(grid[name]) if v in grid[name][:i]]
        if twice:
            raise DhkdError(f"{flag} names {twice[0]} twice: {text}")
        single[name] = None  # the runs set it; the base config keeps its default
    return single, grid


def read_sweep_file(path: str) -> tuple[dict[str, list], list[dict]]:
    """A sweep file as (grid, runs): ``{option: [values]}`` is a grid (and runs ``[{}]``),
    ``[{option: value}, ...]`` a list of runs (and no grid). Every option must be one that
    sweeps, every value of its type; a refusal is one line naming the file and the option."""
    from dhkd_pipe import bounded_yaml

    if not os.path.isfile(path):
        raise DhkdError(f"sweep file not found: {path}")
    loaded = bounded_yaml.load(bounded_yaml.read_text(path, "sweep file"), path, "sweep file")
    if isinstance(loaded, dict) and loaded:
        grid = {}
        for key, values in loaded.items():
            name = _option(path, key)
            if name in grid:
                raise DhkdError(f"sweep file {path} sweeps {name} twice; keep one")
            values = values if isinstance(values, list) else [values]
            if not values:
                raise DhkdError(f"sweep file {path}: {name} has no values; give a list, e.g. {name}: [a, b]")
            grid[name] = [_value(path, name, v) for v in values]
            if any(v in grid[name][:i] for i, v in enumerate(grid[name])):
                raise DhkdError(f"sweep file {path}: {name} lists a value twice: {short_repr(values)}")
        return grid, [{}]
    if isinstance(loaded, list) and loaded and all(isinstance(run, dict) for run in loaded):
        runs = []
        for i, run in enumerate(loaded):
            options = {}
            for key, value in run.items():
                name = _option(path, key)
                if name in options:
                    raise DhkdError(f"sweep file {path}: run {i + 1} sets {name} twice; keep one")
                options[name] = _value(path, name, value)
            runs.append(options)
        return {}, runs
    raise DhkdError(
        f"sweep file {path} must be a grid (option: [values, ...]) or a list of runs (- option: value); "
        f"got {short_repr(loaded)}"
    )


def _option(path: str, key) -> str:
    name = str(key).replace("-", "_")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if name in sweep_fields():
        return name
    if name in SHARED:
        raise DhkdError(
            f"sweep file {path}: {name} shapes the loader that every run of a pass shares, so it cannot be swept; "
            "give it once on the command line or in the recipe"
        )
    if name in fields:
        raise DhkdError(
            f"sweep file {path}: {name} cannot be swept; the options that sweep: {', '.join(sweep_fields())}"
        )
    raise DhkdError(f"sweep file {path}: unknown option {key!r}; the options that sweep: {', '.join(sweep_fields())}")


def _value(path: str, name: str, value):
    try:
        return coerce(name, value, sweep_fields()[name].type)
    except DhkdError as e:
        raise DhkdError(f"sweep file {path}: {e}") from None


def merge(cli_grid: dict[str, list], file_grid: dict[str, list], runs: list[dict], source: str) -> dict[str, list]:
    """The command line's grid with the sweep file's: an option swept in both is refused."""
    both = sorted(set(cli_grid) & (set(file_grid) | {k for run in runs for k in run}))
    if both:
        raise DhkdError(f"{both[0]} is swept both on the command line and in {source}; sweep it in one place")
    return {**cli_grid, **file_grid}


def sweep_runs(cfg: TrainConfig, grid: dict[str, list], runs: list[dict] | None = None) -> list[SweptRun]:
    """Every run of the sweep: the product of ``grid``'s values, each with every one of ``runs``
    (default ``[{}]``), over the base ``cfg``; each named by what differs (module docstring), in
    ``cfg.out``/NAME, validated. Refuses a sweep without a store and two runs of one name."""
    if not cfg.cache:
        raise DhkdError(
            "several runs (a sweep, --student A,B or --seeds) train from one pass over a stage-1 store: "
            "give --cache STORE"
        )
    order = sorted(sweep_fields(), key=lambda n: FIRST.index(n) if n in FIRST else len(FIRST))
    names = sorted(grid, key=order.index)
    combos = [dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))]
    chosen = [{**combo, **run} for combo in combos for run in (runs or [{}])]
    differ = [n for n in order if len({_text(o.get(n, getattr(cfg, n))) for o in chosen}) > 1]
    if "seed" in grid and "seed" not in differ:  # --seeds 3 names its one seed, as it always did
        differ.append("seed")
    differ = [n for n in differ if n != "seed"] + (["seed"] if "seed" in differ else [])
    out, seen = [], {}
    for options in chosen:
        values = {n: options.get(n, getattr(cfg, n)) for n in differ}
        name = folder_name(values, legacy=set(differ) <= set(LEGACY_NAMES), model=options.get("model", cfg.model))
        if name in seen:
            raise DhkdError(f"the sweep has the run {name} twice; give each run different options")
        seen[name] = True
        try:
            run_cfg = dataclasses.replace(cfg, **options, out=os.path.join(cfg.out, name)).validate()
        except DhkdError as e:
            raise DhkdError(f"run {name} of the sweep: {e}") from None
        out.append(SweptRun(name, values, run_cfg))
    for model in dict.fromkeys(r.cfg.model for r in out):
        model_kind(model)  # an unknown student is refused before any run's folder is created
    return out


def folder_name(values: dict, legacy: bool, model: str) -> str:
    """A run's folder name from the values it differs in (module docstring)."""
    if legacy:
        return model + (f"-s{values['seed']}" if "seed" in values else "")
    if not values:
        return "run"
    return ",".join(f"{'student' if n == 'model' else n}={_text(v)}" for n, v in values.items())


def _text(value) -> str:
    """A value as a folder name shows it: ``2`` for 2.0, ``0.0005`` for 5e-4, lists joined by ``-``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, ".12g")
    if isinstance(value, (list, tuple)):
        return "-".join(_text(v) for v in value)
    return str(value).replace("/", "_").replace(os.sep, "_")


@dataclass
class MemoryEstimate:
    """What a pass's runs need at once, in bytes: every run's parameters, gradients and optimizer
    state are held through the pass; one run's activations at a time (the runs step in turn, each
    backward frees its own); one batch of inputs."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    batch: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.batch

    def text(self) -> str:
        parts = ", ".join(
            f"{name} {gib(getattr(self, name))}"
            for name in ("parameters", "gradients", "optimizer", "activations", "batch")
        )
        return f"{gib(self.total)} ({parts})"


def gib(size: int | float) -> str:
    """A byte count as GiB, or MiB below one GiB (a small pass's figures are not all 0.00)."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def estimate_memory(cfgs: list[TrainConfig], resolution: int, num_classes: int) -> MemoryEstimate:
    """The memory the runs ``cfgs`` of one pass need (``MemoryEstimate``), computed from the models:
    each distinct student is built on PyTorch's meta device (shapes, no storage) and run forward on
    one batch of the pass's size; the activations are the tensors autograd keeps for the backward
    pass, counted once each, in float32 (mixed precision keeps fewer bytes: an upper bound)."""
    import torch

    from dhkd_pipe.methods.registry import from_config
    from dhkd_pipe.models import create_model

    params = grads = state = activations = 0
    channels, measured = 3, {}
    for cfg in cfgs:
        method = from_config(cfg)
        key = (cfg.model, method.dual_head, cfg.aux_head, cfg.grad_align_features)
        if key not in measured:
            with torch.device("meta"):
                model = create_model(
                    cfg.model,
                    num_classes,
                    dual_head=method.dual_head,
                    aux_head=cfg.aux_head,
                    align_features=cfg.grad_align_features,
                )
            conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
            channels = conv.in_channels if conv is not None else channels
            images = torch.empty(cfg.batch_size, channels, resolution, resolution, device="meta")
            kept = _kept_for_backward(model, images)
            trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            measured[key] = (
                sum(p.numel() * p.element_size() for p in model.parameters()),
                trainable,
                kept,
            )
        size, trainable, kept_bytes = measured[key]
        params += size
        grads += trainable
        state += trainable if cfg.momentum else 0  # SGD's momentum buffer
        activations = max(activations, kept_bytes)
    first = cfgs[0]
    batch = first.batch_size * (channels * resolution * resolution * 4 + num_classes * 4 + 8)
    return MemoryEstimate(params, grads, state, activations, batch)


def _kept_for_backward(model, images) -> int:
    """Bytes of the tensors autograd keeps from a training forward of ``images`` (each once)."""
    import torch

    kept: dict[int, int] = {}

    def pack(t):
        kept[id(t)] = t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images)
    return sum(kept.values())


def memory_available() -> tuple[int, str]:
    """(bytes free for training, where): the CUDA device's free memory where there is one, else
    the RAM the operating system reports available."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, f"GPU {torch.cuda.get_device_name()} has {gib(free)} free"
    import psutil

    free = psutil.virtual_memory().available
    return free, f"this machine has {gib(free)} of RAM available"


def check_memory(cfgs: list[TrainConfig], resolution: int, num_classes: int, limit_gib: float | None) -> MemoryEstimate:
    """Refuses, in one line with the figure and the limit, a pass whose runs would not fit:
    ``limit_gib`` overrides the device's free memory (0: no check)."""
    estimate = estimate_memory(cfgs, resolution, num_classes)
    if limit_gib == 0:
        return estimate
    if limit_gib is not None:
        limit, where = int(limit_gib * 2**30), f"--memory-limit is {gib(limit_gib * 2**30)}"
    else:
        limit, where = memory_available()
    if estimate.total > limit:
        raise DhkdError(
            f"the {len(cfgs)} runs of this pass need about {estimate.text()}, but {where}: train fewer runs "
            "per pass (fewer swept values, or tune's --per-pass) or lower --batch-size (or set --memory-limit GIB; "
            "0 skips this check)"
        )
    return estimate


def run_status(result) -> dict:
    """How a run of a pass ended, as ``sweep.json`` records it: ``finished``, ``pruned`` (a study's
    pruner stopped it), ``not finite`` (its loss or its teacher's logits), ``failed`` (another error
    that stopped it alone), ``stopped`` (``--max-steps``) or ``running`` (not ended yet, or killed)."""
    if result is None:
        return {"status": "running"}
    if isinstance(result, DhkdError):
        return {"status": "not finite" if "not finite" in str(result) else "failed", "reason": str(result)}
    if "pruned_at" in result:
        return {"status": "pruned", "epochs_run": result["pruned_at"]["epoch"] + 1}
    if "stopped_at" in result:
        return {"status": "stopped", "at": result["stopped_at"]}
    return {"status": "finished", "val_top1": result.get("val_top1")}


def write_sweep_index(out: str, runs: list[SweptRun], results: dict) -> None:
    """Writes ``OUT/sweep.json``: the options the runs differ in, and each run's folder, values and
    status (``run_status`` of ``results[name]``; ``running`` where it has none yet)."""
    from dhkd_pipe.files import write_json

    os.makedirs(out, exist_ok=True)
    index = {
        "kind": "sweep",
        "swept": list(runs[0].options),
        "runs": [{"folder": r.name, "options": r.options, **run_status(results.get(r.name))} for r in runs],
    }
    write_json(os.path.join(out, SWEEP_FILE), index)
