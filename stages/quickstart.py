"""``dhkd-pipe quickstart``: the whole job on the bundled digits, from the ``configs/digits`` recipes.

Trains a teacher, caches its views, distils ``ce``, ``kd`` and ``dhkd`` students from the store,
prints a table and writes the report picture.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from dhkd_pipe.config import CacheConfig, TrainConfig, build_config
from dhkd_pipe.console import log_line
from dhkd_pipe.errors import DhkdError, io_error
from dhkd_pipe.stages.cache_teacher import cache_teacher
from dhkd_pipe.stages.distill import distill
from dhkd_pipe.stages.report import markdown_table, write_report
from dhkd_pipe.stages.train_teacher import train_teacher

RECIPES = Path(__file__).resolve().parent.parent / "configs" / "digits"
STUDENTS = ("ce", "kd", "dhkd")


def _parts() -> tuple[str, ...]:
    return ("teacher", "logits.zarr", "report.png", *(f"student-{m}" for m in STUDENTS))


def _remove_quickstart(out: str):
    """Removes an earlier quickstart's parts; a folder holding anything else, or a part of that name
    the tool did not write (judged by what it recorded, never by the name), is refused whole."""
    parts = _parts()
    present = set(os.listdir(out))
    others = sorted(present - set(parts))
    if others:
        raise DhkdError(
            f"--overwrite: {out} is not a quickstart folder (it holds {', '.join(others[:3])}); choose another --out"
        )
    for name in sorted(present):
        if not _written_by_quickstart(os.path.join(out, name), name):
            raise DhkdError(
                f"--overwrite: {os.path.join(out, name)} was not written by dhkd-pipe quickstart; choose another --out"
            )
    for name in parts:
        path = os.path.join(out, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
        except OSError as e:
            raise io_error(path, e, "remove") from None


def _written_by_quickstart(path: str, name: str) -> bool:
    """A run folder holding only what its manifest claims, a logit store of this tool (its format
    version recorded), or a report picture carrying the report's mark; never a link."""
    from dhkd_pipe.files import holds_mark
    from dhkd_pipe.stages.report import REPORT_MARK
    from dhkd_pipe.training.run_folder import LOCK, MANIFEST, owned_entries

    if os.path.islink(path):
        return False
    if name == "report.png":
        return holds_mark(path, REPORT_MARK.encode())
    if not os.path.isdir(path):
        return False
    if name == "logits.zarr":
        try:
            with open(os.path.join(path, "zarr.json"), encoding="utf-8") as f:
                attrs = json.load(f).get("attributes")
        except (OSError, ValueError, AttributeError):
            return False
        return isinstance(attrs, dict) and "format_version" in attrs
    owned = owned_entries(path)
    return owned is not None and set(os.listdir(path)) <= owned | {MANIFEST, LOCK}


def quickstart(out: str = "runs/quickstart", overwrite: bool = False, log=log_line, show=print) -> list[dict]:
    """Progress goes to ``log`` (stderr), the final table to ``show`` (stdout)."""
    if not RECIPES.is_dir():
        raise DhkdError(f"recipes not found at {RECIPES}; run quickstart from a source checkout (pip install -e .)")
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise DhkdError(
                f"--out {out} is a file; choose another --out (--overwrite replaces only a quickstart folder)"
            )
        if not overwrite:
            raise DhkdError(f"{out} exists; pass --overwrite or choose another --out")
        _remove_quickstart(out)
    rows = []

    def stage(name, fn, cfg, **kw):
        log(f"\n== {name}")
        t0 = time.perf_counter()
        result = fn(cfg, log=log, **kw)
        wall = time.perf_counter() - t0
        rows.append(
            {
                "stage": name,
                "val_top1": result.get("val_top1", result.get("teacher_val_top1")),
                "images_per_sec": result.get("images_per_sec"),
                "wall_s": wall,
            }
        )
        return result

    teacher_dir = os.path.join(out, "teacher")
    teacher_cfg = build_config(TrainConfig, str(RECIPES / "teacher.yaml"), {"out": teacher_dir})
    stage(f"teacher {teacher_cfg.model} (ce)", train_teacher, teacher_cfg)
    store = os.path.join(out, "logits.zarr")
    cache_cfg = build_config(
        CacheConfig, str(RECIPES / "cache.yaml"), {"weights": os.path.join(teacher_dir, "model.pt"), "out": store}
    )
    stage(f"cache-teacher ({cache_cfg.views} views, {cache_cfg.codec})", cache_teacher, cache_cfg)
    runs = [teacher_dir]
    for method in STUDENTS:
        run_dir = os.path.join(out, f"student-{method}")
        cfg = build_config(TrainConfig, str(RECIPES / f"student_{method}.yaml"), {"cache": store, "out": run_dir})
        stage(f"student {cfg.model} ({method}, from the store)", distill, cfg)
        runs.append(run_dir)
    total = sum(r["wall_s"] for r in rows)
    rows.append({"stage": "total", "wall_s": total})
    picture = os.path.join(out, "report.png")
    write_report(runs, picture)
    table = markdown_table(
        rows,
        [
            ("stage", "stage", "s"),
            ("val_top1", "val top-1 %", ".2f"),
            ("images_per_sec", "img/s", ".0f"),
            ("wall_s", "wall s", ".1f"),
        ],
    )
    show(table)
    log(f"report: {picture}")
    return rows
