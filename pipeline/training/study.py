"""An Optuna study's parts that ``dhkd-pipe tune`` and a study's report share: the search space
(read from YAML with one-line refusals), the samplers and pruners by name, and the study's storage
(opened with retries, its URL recorded without a password). Optuna is imported where it is used,
so the CLI's help never pays for it."""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager

from dhkd_pipe.config.tuning import TuneOptions
from dhkd_pipe.config.values import coerce, short_repr
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.training.students import SHARED
from dhkd_pipe.training.sweep import sweep_fields

TYPES = ("float", "int", "categorical")
KEYS = {"type", "low", "high", "log", "step", "choices"}
OPEN_TRIES = 4  # a storage that several processes open at once may fail while one creates its tables


def read_space(path: str) -> dict[str, dict]:
    """The search space file as ``{option: {type, low, high, log, step, choices}}``, each option one
    that sweeps and each bound or choice of its type; a refusal is one line naming the file."""
    from dhkd_pipe import bounded_yaml

    if not os.path.isfile(path):
        raise DhkdError(f"search space not found: {path}")
    loaded = bounded_yaml.load(bounded_yaml.read_text(path, "search space"), path, "search space")
    if not isinstance(loaded, dict) or not loaded:
        raise DhkdError(f"search space {path} must map each option to {{type: float|int|categorical, ...}}")
    fields, space = sweep_fields(), {}
    for key, spec in loaded.items():
        name = str(key).replace("-", "_")
        if name in space:
            raise DhkdError(f"search space {path}: {name}: given twice")
        space[name] = _read_option(path, name, spec, fields)
    return space


def _read_option(path: str, name: str, spec, fields: dict) -> dict:
    """One option's entry of the search space (``read_space``)."""

    def refuse(what: str):
        raise DhkdError(f"search space {path}: {name}: {what}")

    if name not in fields:
        if name in SHARED:
            refuse("shapes the loader that every trial of a pass shares, so it cannot be searched")
        refuse(f"is not an option that sweeps; those that do: {', '.join(fields)}")
    if not isinstance(spec, dict):
        refuse(f"give {{type: float|int|categorical, ...}}, not {short_repr(spec)}")
    unknown = sorted(set(map(str, spec)) - KEYS)
    if unknown:
        refuse(f"unknown key {unknown[0]!r}; the keys: {', '.join(sorted(KEYS))}")
    kind = spec.get("type")
    if kind not in TYPES:
        refuse(f"type must be one of {', '.join(TYPES)}; got {short_repr(kind)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or set(spec) - {"type", "choices"}:
            refuse("categorical takes choices: [a, b, ...] (and no low, high, log or step)")
        try:
            values = [coerce(name, v, fields[name].type) for v in choices]
        except DhkdError as e:
            refuse(str(e))
        if len(set(map(repr, values))) != len(values):
            refuse("lists a choice twice")
        return {"type": kind, "choices": values}
    number = "float" if kind == "float" else "int"
    if str(fields[name].type).split("|")[0].strip() not in (("float",) if kind == "float" else ("int", "float")):
        refuse(f"is not a number of type {kind}; use type: categorical")
    if "choices" in spec:
        refuse(f"{kind} takes low and high, not choices")
    try:
        low, high = (coerce(name, spec.get(k), number) for k in ("low", "high"))
        step = coerce(name, spec["step"], number) if "step" in spec else None
    except DhkdError as e:
        refuse(f"low and high (and step) must be numbers of type {kind}: {e}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        refuse(f"log is true or false, not {short_repr(log)}")
    if not low < high:
        refuse(f"low {low} must be below high {high}")
    if log and low <= 0:
        refuse(f"a log scale needs low > 0; got {low}")
    if step is not None and (step <= 0 or log):
        refuse("step must be positive, and cannot go with log")
    return {"type": kind, "low": low, "high": high, "log": log, "step": step}


def distributions(space: dict[str, dict]) -> dict:
    """The Optuna distributions of a space read by ``read_space``."""
    import optuna.distributions as d

    out = {}
    for name, spec in space.items():
        if spec["type"] == "categorical":
            out[name] = d.CategoricalDistribution(spec["choices"])
        elif spec["type"] == "float":
            out[name] = d.FloatDistribution(spec["low"], spec["high"], log=spec["log"], step=spec["step"])
        else:
            out[name] = d.IntDistribution(spec["low"], spec["high"], log=spec["log"], step=spec["step"] or 1)
    return out


def grid_points(space: dict[str, dict]) -> list[dict]:
    """Every combination of a space's values (``--sampler grid``): categorical choices and the
    integers of an int range; a float range has no grid."""
    import itertools

    values = {}
    for name, spec in space.items():
        if spec["type"] == "float":
            raise DhkdError(f"--sampler grid takes categorical and int options; give {name} as choices")
        values[name] = (
            spec["choices"]
            if spec["type"] == "categorical"
            else list(range(spec["low"], spec["high"] + 1, spec["step"] or 1))
        )
    return [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]


def sampler(opts: TuneOptions, trials: int = 0):
    """The sampler of the study's next trial, seeded by ``--study-seed`` and the number of
    ``trials`` the study holds: one seed for the whole study would make a resumed tune, or a second
    process, draw the first process's parameters again; this way a study's draws are the same
    however many processes made it (two asking at the same instant may draw alike). A grid is
    queued as trials (``grid_points``, ``queue_grid``) and taken in turn, the random sampler only
    sampling past its end: Optuna's GridSampler stops the study from inside ``tell`` when its grid
    is used up, which its ask-and-tell interface refuses."""
    import optuna

    seed = opts.study_seed * 1_000_003 + trials
    if opts.sampler in ("random", "grid"):
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def queue_grid(study, points: list[dict], trials: int):
    """Queues the grid's points a new study has not yet (several tune processes may start together:
    a point another queued is skipped)."""
    if trials > len(points):
        raise DhkdError(f"--sampler grid has {len(points)} points; --trials {trials} asks for more")
    taken = [t.params for t in study.get_trials(deepcopy=False)]
    for params in points:
        if params not in taken:
            study.enqueue_trial(params, skip_if_exists=True)


def pruner(opts: TuneOptions, epochs: int):
    import optuna

    if opts.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=opts.startup_trials, n_warmup_steps=opts.prune_after)
    if opts.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, opts.prune_after))
    if opts.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, opts.prune_after), max_resource=epochs)
    if opts.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(lower=opts.prune_below, n_warmup_steps=opts.prune_after)
    return optuna.pruners.NopPruner()


def open_storage(url: str, heartbeat: int | None = None):
    """Optuna's RDB storage at ``url``; with ``heartbeat`` (seconds), trials silent for twice as long
    are failed and re-queued, up to twice each (``RetryHeartbeatStaleTrialCallback``)."""
    import optuna

    kwargs = {}
    if heartbeat is not None:
        kwargs = {
            "heartbeat_interval": heartbeat,
            "grace_period": 2 * heartbeat,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=2, inherit_intermediate_values=True
            ),
        }
    for attempt in range(OPEN_TRIES):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:  # sqlalchemy's errors: no reachable database, or a schema being created
            if attempt + 1 == OPEN_TRIES:
                raise DhkdError(f"cannot open the study's storage {url}: {' '.join(str(e).split())[:160]}") from None
            # tune processes started together race to create the tables: the loser finds them made
            time.sleep(0.5 * (attempt + 1))


def recorded(url: str | None) -> str | None:
    """The storage URL as ``study.json`` records it: None for the default (study.db beside it), a
    database's URL without its password (``report`` then asks for it)."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def quiet_optuna():
    """Optuna's heartbeats, their retry callback and ask-and-tell with heartbeats are marked
    experimental: their warnings are no news to the user of ``tune``. Without Optuna: one line."""
    try:
        import optuna
    except ImportError:
        raise DhkdError("tune and a study's report need Optuna: pip install 'dhkd-pipe[tune]'") from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield
