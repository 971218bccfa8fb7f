"""``dhkd-pipe bench scale``: how the store's costs grow with its size.

Stores of growing size are written through stage 1's writer (``StoreWriter``: teacher-like random
logits, no teacher) on a local disk and on the local S3 server (moto, up to ``--s3-max-rows``), and
per size a fresh process times what a user waits for: opening the store, ``inspect --quick`` and
``inspect``, a resume (``StoreWriter`` entered on the finished store: its scan of what is done and
its checksum audit), the audit alone, and stage 2's first batch, with the reader's resident memory
(each the median of ``READER_RUNS`` fresh processes, the memory their largest).
On the S3 server each step's requests are counted by kind (GET, PUT, HEAD, LIST, ...).

Stage 2 needs the data set whose fingerprint the store records. No real data set has a million
samples of 1,000 classes here, so the store records a synthetic in-memory one (``scale_store``:
one 32x32 image seen N times through a broadcast view, no memory per sample; label i mod K), and
the first batch is replayed as ``open_store`` replays it (open, completeness check, fingerprint
check, recorded view plan), with that data set given where ``open_store`` loads the recorded one.

The goals are stated at the ImageNet geometry (``IMAGENET_ROWS``: 1,281,167 images x 8 views of
1,000 fp16 logits): open, ``inspect --quick`` and the first batch under ``FLAT_GOAL_S`` each and
flat in rows; the reader under ``READER_GOAL_MB`` resident; the resume and the audit linear in
write units. Each is judged from the slope of its log-log line between the two largest local sizes,
and projected to the ImageNet row count along it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

from dhkd_pipe.benchmarks.scale_store import STEPS, reader_in_child, write_store

SIZES = (10_000, 100_000, 1_000_000)
S3_MAX_ROWS = 100_000  # the local S3 server holds its objects in memory
IMAGENET_ROWS = 1_281_167 * 8
FLAT_GOAL_S = 2.0
READER_GOAL_MB = 1024
FLAT_SLOPE = 0.25  # a log-log slope below this between the two largest sizes counts as flat
LINEAR_SLOPE = 1.2  # and below this as linear (no worse than one more row, one more unit of cost)
GOALS = (  # (step, what it must be, the largest projected value allowed or None)
    ("open", "flat", FLAT_GOAL_S),
    ("inspect_quick", "flat", FLAT_GOAL_S),
    ("first_batch", "flat", FLAT_GOAL_S),
    ("reader_rss_mb", "bounded", READER_GOAL_MB),
    ("resume", "linear", None),
    ("audit", "linear", None),
)


def parse_sizes(text: str) -> tuple[int, ...]:
    """``--sizes``: comma-separated row counts (``10000,1e5,1_000_000``)."""
    from dhkd_pipe.errors import DhkdError

    sizes = []
    for part in str(text).split(","):
        try:
            value = float(part.strip().replace("_", ""))
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value == int(value) and value >= 1):
            raise DhkdError(f"bad --sizes {text!r}: comma-separated whole numbers of rows, such as 10000,100000")
        sizes.append(int(value))
    return tuple(sizes)


# ---- the benchmark --------------------------------------------------------------------------------


def _measure_at(location: str, name: str, rows: int, args: dict, log) -> dict:
    s3 = name == "s3-local"
    log(f"bench scale: {rows:,} rows on {name}: writing")
    row = {"location": name, "rows": rows}
    try:
        row.update(write_store(location, rows, **args["layout"]))
        log(f"bench scale: {rows:,} rows on {name}: reading")
        row.update(reader_in_child(location, args["batch_size"], s3, args["reader_runs"]))
    finally:
        _remove(location)
    return row


def _remove(location: str):
    from dhkd_pipe.store.objects import StoreObjects, is_local, local_path, open_store

    if is_local(location):
        shutil.rmtree(local_path(location), ignore_errors=True)
    else:
        StoreObjects(open_store(location, read_only=False), location).delete_all()


def slope(rows: list[dict], key: str) -> float | None:
    """The log-log slope of ``key`` against rows between the two largest sizes that have it."""
    have = sorted((r["rows"], r[key]) for r in rows if r.get(key))
    if len(have) < 2 or have[-1][0] == have[-2][0]:
        return None
    (r1, v1), (r2, v2) = have[-2], have[-1]
    return math.log(v2 / v1) / math.log(r2 / r1)


def judge_goals(rows: list[dict]) -> list[dict]:
    """Each of ``GOALS`` from the local rows: the slope between the two largest sizes, the value
    projected to ``IMAGENET_ROWS`` along it (never below the largest measured), and whether it is met."""
    local = [r for r in rows if r["location"] == "local"]
    verdicts = []
    for step, shape, limit in GOALS:
        s = slope(local, step)
        largest = max((r for r in local if r.get(step) is not None), key=lambda r: r["rows"], default=None)
        if s is None or largest is None:
            verdicts.append({"step": step, "goal": shape, "met": None})
            continue
        projected = largest[step] * (IMAGENET_ROWS / largest["rows"]) ** max(s, 0.0)
        shape_met = {"flat": s < FLAT_SLOPE, "linear": s < LINEAR_SLOPE, "bounded": True}[shape]
        verdicts.append(
            {
                "step": step,
                "goal": shape + (f", under {limit:g}" if limit is not None else ""),
                "largest_rows": largest["rows"],
                "at_largest": largest[step],
                "slope": s,
                "at_imagenet": projected,
                "met": bool(shape_met and (limit is None or projected < limit)),
            }
        )
    return verdicts


def _requests_text(counts: dict | None) -> str | None:
    if counts is None:
        return None
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"


def plot(path: str, rows: list[dict], before: list[dict]):
    """Seconds of each step against rows, log-log, a line per step and location (``before``: dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for runs, style, tag in ((rows, "-", ""), (before, "--", " (before)")):
        for where in sorted({r["location"] for r in runs}):
            for i, (step, header) in enumerate(STEPS.items()):
                points = sorted((r["rows"], r[step]) for r in runs if r["location"] == where and r.get(step))
                if points:
                    xs, ys = zip(*points, strict=True)
                    marker = "o" if where == "local" else "s"
                    ax.plot(xs, ys, style, marker=marker, color=f"C{i}", label=f"{header[:-2]}, {where}{tag}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(FLAT_GOAL_S, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("rows (views x samples), 1000 classes")
    ax.set_ylabel("seconds")
    ax.set_title("bench scale: store costs against store size")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the lines, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLUMNS = [
    ("location", "location", "s"),
    ("rows", "rows", ",d"),
    ("write_units", "units", ",d"),
    ("objects", "objects", ",d"),
    ("stored_mb", "MB", ",.0f"),
    ("create_s", "create s", ".3f"),
    ("write_rows_per_sec", "write rows/s", ",.0f"),
    *((step, header, ".3f") for step, header in STEPS.items()),
    ("reader_rss_mb", "reader RSS MB", ",.0f"),
]


def bench_scale(
    json_path: str = "bench_scale.json",
    sizes: tuple = SIZES,
    views: int = 8,
    classes: int = 1000,
    chunk_rows: int = 1024,
    codec: str = "fp16",
    batch_size: int = 256,
    local: bool = True,
    s3_local: bool = False,
    s3_max_rows: int = S3_MAX_ROWS,
    sharded: bool = False,
    before: str | None = None,
    reader_runs: int = 3,
    log=None,
) -> dict:
    """Writes and measures a store per size (``sizes``: rows, ``views`` view-epochs each) on a
    local disk and (``s3_local``) on the local S3 server up to ``s3_max_rows``; prints the table,
    writes the JSON and a log-log plot beside it (``.png``). ``before``: the JSON of an earlier run
    (say, before a fix), whose rows are printed and plotted beside these and kept in the JSON."""
    from dhkd_pipe.benchmarks.local_s3 import local_s3_server
    from dhkd_pipe.benchmarks.measure import machine, print_table, results_path, write_results
    from dhkd_pipe.console import log_line
    from dhkd_pipe.errors import DhkdError, io_error, one_line

    log = log or log_line
    sizes = sorted({int(s) for s in sizes})
    if not sizes or sizes[0] < views or min(views, classes, chunk_rows, batch_size) < 1:
        raise DhkdError("--sizes must be at least --views rows, and --views, --classes, --chunk-rows at least 1")
    if not local and not s3_local:
        raise DhkdError("nothing to measure: drop --no-local, or give --s3-local")
    if not 1 <= reader_runs <= 100:
        raise DhkdError(f"--reader-runs must be 1 to 100, got {reader_runs}")
    earlier = []
    if before:
        before = results_path(before)  # {machine}: this machine's results folder
        try:
            with open(before) as f:
                found = json.load(f)
        except OSError as e:
            raise io_error(before, e, "read") from None
        except ValueError as e:
            raise DhkdError(f"--before {before} is not a bench scale JSON ({one_line(e)})") from None
        if not isinstance(found, dict) or found.get("bench") != "scale" or not isinstance(found.get("results"), list):
            raise DhkdError(f'--before {before} is not a bench scale JSON (its "bench" is not "scale")')
        earlier = [dict(r, run="before") for r in found["results"] if isinstance(r, dict)]
    args = {
        "layout": dict(views=views, classes=classes, chunk_rows=chunk_rows, codec=codec, sharded=sharded),
        "batch_size": batch_size,
        "reader_runs": reader_runs,
    }
    rows = []
    if local:
        work = tempfile.mkdtemp(prefix="dhkd-bench-scale-")
        try:
            for n in sizes:
                rows.append(_measure_at(os.path.join(work, f"scale-{n}.zarr"), "local", n, args, log))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if s3_local and [n for n in sizes if n <= s3_max_rows]:
        with local_s3_server() as (bucket, _):
            for n in sizes:
                if n <= s3_max_rows:
                    rows.append(_measure_at(f"{bucket}/scale-{n}.zarr", "s3-local", n, args, log))
    for r in rows:
        r["run"] = "now"
        for step in STEPS:
            r[f"{step}_requests_text"] = _requests_text(r.get(f"{step}_requests"))
    goals = judge_goals(rows)
    title = (
        f"bench scale: {views} views x rows/{views} samples x {classes} classes ({codec}), chunks of {chunk_rows} "
        f"rows{', sharded' if sharded else ''}, {machine()['device']}, load {os.getloadavg()[0]:.2f}"
    )
    shown = [dict(r, location=f"{r['location']} (before)") for r in earlier] + rows
    print_table(title, sorted(shown, key=lambda r: (r["location"].split()[0], r["rows"], r["run"])), COLUMNS)
    if any(r["location"] == "s3-local" for r in rows):
        print_table(
            "requests to the local S3 server per step",
            [r for r in rows if r["location"] == "s3-local"],
            [("rows", "rows", ",d"), ("objects", "objects", ",d")]
            + [(f"{step}_requests_text", header[:-2], "s") for step, header in STEPS.items()],
        )
    print_table(
        f"goals at the ImageNet geometry ({IMAGENET_ROWS:,} rows), projected along the slope between the two "
        "largest local sizes",
        goals,
        [
            ("step", "step", "s"),
            ("goal", "goal", "s"),
            ("largest_rows", "largest rows", ",d"),
            ("at_largest", "there", ".3f"),
            ("slope", "log-log slope", ".2f"),
            ("at_imagenet", "at ImageNet", ".3f"),
            ("met", "met", ""),
        ],
    )
    payload = {
        "bench": "scale",
        "sizes": sizes,
        "views": views,
        "classes": classes,
        "codec": codec,
        "chunk_rows": chunk_rows,
        "batch_size": batch_size,
        "sharded": sharded,
        "reader_runs": reader_runs,
        "s3_max_rows": s3_max_rows,
        "imagenet_rows": IMAGENET_ROWS,
        "results": rows,
        "goals": goals,
        "before": earlier,
    }
    path = results_path(json_path)
    image = os.path.splitext(path)[0] + ".png"
    payload["plot"] = image
    written = write_results(path, payload, log=log)
    os.makedirs(os.path.dirname(image) or ".", exist_ok=True)
    plot(image, rows, earlier)
    log(f"wrote {image}")
    return {**payload, "json": written}
