"""The steps of ``bench accuracy`` and their reuse: each step (the teacher, the store, each student
run) has a record ``out/records/STEP.json`` of what it was made from (``Steps``); a step whose record
matches and which finished is reused, one that matches but was stopped resumes, anything else runs
afresh. The stages that run a step are passed in by ``accuracy``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import MISSING, fields

from dhkd_pipe.config import CacheConfig, TrainConfig
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.files import write_json
from dhkd_pipe.methods.registry import from_config, get_method, option_defaults
from dhkd_pipe.store.reader import LogitCache
from dhkd_pipe.training.run_folder import CHECKPOINT
from dhkd_pipe.training.students import StudentPlan


class Steps:
    """The records of finished and started steps under ``out/records``."""

    def __init__(self, out: str):
        self.dir = os.path.join(out, "records")
        os.makedirs(self.dir, exist_ok=True)

    def _path(self, step: str) -> str:
        return os.path.join(self.dir, f"{step}.json")

    def read(self, step: str) -> dict | None:
        try:
            with open(self._path(step)) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def write(self, step: str, record: dict):
        write_json(self._path(step), record)

    def state(self, step: str, key: dict, cls) -> tuple[str, dict | None]:
        """``("done", record)``, ``("resume", record)`` or ``("fresh", None)``; ``cls``: the
        dataclass of ``key["config"]``."""
        record = self.read(step)
        if record is None or not same_key(record.get("key"), plain(key), cls):
            return "fresh", None
        return ("done" if record.get("done") else "resume"), record


def _field_defaults(cls) -> dict:
    return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cls)}


def same_key(recorded, key: dict, cls) -> bool:
    """Equal, except that an option of ``key["config"]`` (a ``cls``) the record does not know, one
    added to the tool since, may hold its default: new options default to the old behaviour. A
    student's ``key["store"]`` is the store's key (a ``CacheConfig``)."""
    if not isinstance(recorded, dict) or recorded.keys() != key.keys():
        return False
    defaults = _field_defaults(cls)
    for name, value in key.items():
        if name == "config" and isinstance(recorded[name], dict):
            value = {
                k: v for k, v in value.items() if k in recorded[name] or k not in defaults or plain(defaults[k]) != v
            }
            same = recorded[name] == value
        elif name == "store":
            same = same_key(recorded[name], value, CacheConfig)
        else:
            same = recorded[name] == value
        if not same:
            return False
    return True


def plain(obj):
    """As JSON gives it back (tuples become lists), so records compare equal to fresh keys."""
    return json.loads(json.dumps(obj, default=str))


def run_training(steps: Steps, step: str, key: dict, cfg: TrainConfig, stage, log) -> dict:
    """Trains (or resumes, or reuses) one run; returns its record with the summary."""
    state, record = steps.state(step, key, TrainConfig)
    if state == "done" and same_method(cfg):
        log(f"reused {step}: {cfg.out}")
        return {**record, "reused": True}
    resume = state == "resume" and os.path.isfile(os.path.join(cfg.out, CHECKPOINT))
    wall = record.get("wall_s", 0.0) if resume else 0.0
    steps.write(step, {"key": plain(key), "done": False, "wall_s": wall})
    log(f"{'resuming' if resume else 'training'} {step}: {cfg.out}")
    t0 = time.perf_counter()
    summary = stage(cfg, mode="resume" if resume else "overwrite", log=lambda msg: log(f"  {msg}"))
    record = {
        "key": plain(key),
        "done": True,
        "wall_s": wall + time.perf_counter() - t0,
        "summary": {k: v for k, v in summary.items() if k != "config"},
    }
    steps.write(step, record)
    return {**record, "reused": False}


def same_method(cfg: TrainConfig) -> bool:
    """The finished run's summary is there and its method's resolved options (``method_params``:
    the config's, else the method's defaults) are today's: a changed default trains again."""
    try:
        with open(os.path.join(cfg.out, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    recorded, now = summary.get("method_params"), plain(from_config(cfg).params())
    if not isinstance(recorded, dict):
        return False
    defaults = plain(option_defaults(get_method(cfg.method)))
    # An option the method gained since the run was made may hold its default (the old behaviour).
    now = {k: v for k, v in now.items() if k in recorded or k not in defaults or defaults[k] != v}
    return recorded == now


def run_store(steps: Steps, key: dict, cfg: CacheConfig, stage, log) -> dict:
    """Writes (or resumes, or reuses) the store with ``stage`` (``cache_teacher``); returns its record."""
    state, record = steps.state("store", key, CacheConfig)
    if state == "done":
        try:
            LogitCache.open(cfg.out).check_complete()
            log(f"reused store: {cfg.out}")
            return {**record, "reused": True}
        except DhkdError:  # removed or damaged since: write it again
            state = "fresh"
    wall = record.get("wall_s", 0.0) if state == "resume" else 0.0
    cfg.overwrite = state != "resume"  # a matching store that stopped resumes chunk by chunk
    steps.write("store", {"key": plain(key), "done": False, "wall_s": wall})
    log(f"{'resuming' if state == 'resume' else 'writing'} store: {cfg.out}")
    t0 = time.perf_counter()
    result = stage(cfg, log=lambda msg: log(f"  {msg}"))
    record = {"key": plain(key), "done": True, "wall_s": wall + time.perf_counter() - t0, "summary": result}
    steps.write("store", record)
    return {**record, "reused": False}


def run_students(steps: Steps, students: list[tuple[str, dict, TrainConfig]], stage, log) -> list[dict]:
    """Trains the students not finished yet in one pass over the store (``stage``: ``distill_students``, each
    resumes or starts afresh as its record says); returns every student's record. A student's
    ``wall_s`` is its share of the pass's wall time (the pass's time split evenly)."""
    records: list[dict | None] = []
    plans, todo = [], []
    for i, (step, key, cfg) in enumerate(students):
        state, record = steps.state(step, key, TrainConfig)
        if state == "done" and same_method(cfg):
            log(f"reused {step}: {cfg.out}")
            records.append({**record, "reused": True})
            continue
        records.append(None)
        resume = state == "resume" and os.path.isfile(os.path.join(cfg.out, CHECKPOINT))
        wall = record.get("wall_s", 0.0) if resume else 0.0
        steps.write(step, {"key": plain(key), "done": False, "wall_s": wall})
        plans.append(StudentPlan(cfg, "resume" if resume else "overwrite"))
        todo.append((i, step, key, wall))
    if not plans:
        return records
    log(f"training {len(plans)} students in one pass over the store: " + ", ".join(step for _, step, _, _ in todo))
    t0 = time.perf_counter()
    results = stage(plans, log=lambda msg: log(f"  {msg}"))
    share = (time.perf_counter() - t0) / len(plans)
    failed = []
    for (i, step, key, wall), result in zip(todo, results, strict=True):
        if isinstance(result, DhkdError):
            failed.append(f"{step}: {result}")
            continue
        record = {
            "key": plain(key),
            "done": True,
            "wall_s": wall + share,
            "pass_students": len(plans),
            "summary": {k: v for k, v in result.items() if k != "config"},
        }
        steps.write(step, record)
        records[i] = {**record, "reused": False}
    if failed:
        raise DhkdError(
            f"{len(failed)} of {len(plans)} students stopped (the others are recorded): " + "; ".join(failed)
        )
    return records
