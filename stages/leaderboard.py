"""``dhkd-pipe report SWEEP`` and ``dhkd-pipe report STUDY``: one leaderboard of the runs of a sweep
(a ``distill --cache`` pass with several runs: ``OUT/sweep.json``) or of a study (``dhkd-pipe tune``:
``DIR/study.json`` and its Optuna storage).

Runs are grouped by the options they were given apart from the seed; a group of several seeds shows
the mean and the standard deviation (n - 1) of its runs' final top-1 (its last validated epoch's).
Groups are sorted by that top-1, best first, those with a finished run before the others (a run
pruned after two epochs is no rival of one that trained to the end). Each row says what the runs
differ in, the epochs each ran and why it stopped: ``finished``, ``pruned`` (a study's pruner),
``not finite`` (its loss or teacher), ``failed``, ``stopped`` (``--max-steps``, a signal or a
kill), ``running`` or ``queued`` (a study's trials not ended yet).

Written beside ``--out`` (``report.png``): the accuracy per epoch of every run overlaid (``report.png``),
top-1 against each swept option (``report-OPTION.png``), the table (``report.md``) and everything
as JSON (``report.json``); the table is printed.
"""

from __future__ import annotations

import json
import os
import statistics

from dhkd_pipe.errors import DhkdError, io_error
from dhkd_pipe.stages.report import REPORT_MARK, check_report_target, markdown_table, read_run, save_figure
from dhkd_pipe.stages.tune import STUDY_FILE
from dhkd_pipe.training.sweep import SWEEP_FILE


def is_leaderboard_folder(path: str) -> bool:
    """Whether ``path`` is a sweep's or a study's folder (``report`` shows its leaderboard)."""
    return os.path.isfile(os.path.join(path, SWEEP_FILE)) or os.path.isfile(os.path.join(path, STUDY_FILE))


def sweep_entries(folder: str) -> tuple[list[str], list[dict]]:
    """(the swept options, one entry per run) of a sweep folder, from its ``sweep.json`` and each
    run's metrics; a run the index calls ``running`` whose folder holds a summary finished (the
    pass was killed before it updated the index), one without stopped."""
    index = _read_json(os.path.join(folder, SWEEP_FILE))
    if not isinstance(index, dict) or not isinstance(index.get("runs"), list):
        raise DhkdError(f"{folder}/{SWEEP_FILE} is not a sweep's index: no list of runs")
    entries = []
    for run in index["runs"]:
        if not isinstance(run, dict) or not isinstance(run.get("folder"), str):
            raise DhkdError(f"{folder}/{SWEEP_FILE}: a run without its folder: {str(run)[:80]}")
        path = os.path.join(folder, run["folder"])
        history, summary = read_run(path) if os.path.isfile(os.path.join(path, "metrics.jsonl")) else ([], {})
        status = run.get("status", "running")
        if status == "running":
            status = "finished" if summary else "stopped"
        entries.append(_entry(run["folder"], run.get("options") or {}, status, history, run.get("reason")))
    return list(index.get("swept") or []), entries


def _entry(name: str, options: dict, status: str, history: list[dict], reason: str | None = None) -> dict:
    validated = [h for h in history if h.get("val_top1") is not None]
    return {
        "run": name,
        "options": options,
        "status": status,
        "reason": reason,
        "epochs": len(history),
        "top1": validated[-1]["val_top1"] if validated else None,
        "best_top1": max((h["val_top1"] for h in validated), default=None),
        "curve": [(h["epoch"], h["val_top1"]) for h in validated],
    }


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DhkdError(f"{path} is not JSON: {e}") from None
    except OSError as e:
        raise io_error(path, e, "read") from None


def groups(entries: list[dict], swept: list[str]) -> list[dict]:
    """The runs grouped by their options apart from the seed where the seed was swept (else each
    run is a group: a study's trials of equal options are rows apart), each group's top-1 the mean (and
        standard deviation, n - 1) over its runs that have one; the groups with a finished run first,
    each part best first, groups without a top-1 last."""
    by_key: dict[str, list[dict]] = {}
    for e in entries:
        key = json.dumps({k: v for k, v in e["options"].items() if k != "seed"}, sort_keys=True, default=str)
        by_key.setdefault(key if "seed" in swept else e["run"], []).append(e)  # no seeds: a run is its own group
    out = []
    for runs in by_key.values():
        scores = [r["top1"] for r in runs if r["top1"] is not None]
        statuses = {}
        for r in runs:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        out.append(
            {
                "options": {k: v for k, v in runs[0]["options"].items() if k != "seed"},
                "runs": [r["run"] for r in runs],
                "seeds": [r["options"]["seed"] for r in runs if "seed" in r["options"]],
                "top1": statistics.fmean(scores) if scores else None,
                "top1_std": statistics.stdev(scores) if len(scores) > 1 else None,
                "epochs": sorted({r["epochs"] for r in runs}),
                "stopped": statuses,
            }
        )
    # a run stopped early (pruned at epoch 2) is no rival of one that finished: finished groups first
    out.sort(key=lambda g: ("finished" not in g["stopped"], g["top1"] is None, -(g["top1"] or 0.0)))
    return out


def _text(value) -> str:
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def table(ranked: list[dict], swept: list[str], names: bool = False) -> str:
    """The leaderboard as markdown: rank, the run (``names``: a study's trial), each swept option,
    the seeds (where swept), top-1 (mean ± std), epochs, how the runs stopped."""
    shown = [o for o in swept if o != "seed"]
    rows = []
    for rank, g in enumerate(ranked, start=1):
        top1 = "-" if g["top1"] is None else f"{g['top1']:.2f}"
        if g["top1_std"] is not None:
            top1 += f" ± {g['top1_std']:.2f}"
        rows.append(
            {
                "rank": str(rank),
                "run": ",".join(g["runs"]),
                **{o: _text(g["options"].get(o, "-")) for o in shown},
                "seeds": ",".join(map(str, g["seeds"])) or "-",
                "top1": top1,
                "epochs": ",".join(map(str, g["epochs"])),
                "stopped": ", ".join(f"{k} {v}" if len(g["runs"]) > 1 else k for k, v in g["stopped"].items()),
            }
        )
    columns = [("rank", "#", "s"), *([("run", "run", "s")] if names else []), *[(o, o, "s") for o in shown]]
    columns += [("seeds", "seeds", "s")] if "seed" in swept else []
    columns += [("top1", "top-1 (%)", "s"), ("epochs", "epochs", "s")]
    return markdown_table(rows, [*columns, ("stopped", "stopped", "s")])


def write_leaderboard(folder: str, out: str) -> str:
    """Writes the leaderboard of the sweep or study in ``folder`` beside ``out`` (module docstring);
    returns the markdown table."""
    fmt = check_report_target(out, [])
    stem = os.path.splitext(out)[0]
    from dhkd_pipe.files import check_replaceable, write_atomic, write_json

    if os.path.isfile(os.path.join(folder, STUDY_FILE)):
        from dhkd_pipe.stages.tune import study_entries

        swept, entries, about = study_entries(folder)
    else:
        (swept, entries), about = sweep_entries(folder), {"kind": "sweep", "folder": folder}
    if not entries:
        raise DhkdError(f"{folder} holds no runs yet")
    for path in (stem + ".md", stem + ".json"):
        check_replaceable(path, REPORT_MARK, "report")
    pictures = {o: f"{stem}-{o}.{fmt}" for o in swept}
    for path in pictures.values():
        check_replaceable(path, REPORT_MARK, "report")
    ranked = groups(entries, swept)
    text = table(ranked, swept, names=about["kind"] == "study")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as e:
        raise io_error(out, e) from None
    write_atomic(stem + ".md", lambda f: f.write(f"<!-- {REPORT_MARK} -->\n{text}\n"), mode="w")
    write_json(stem + ".json", {"written_by": REPORT_MARK, **about, "swept": swept, "groups": ranked, "runs": entries})
    _plot_curves(entries, out, fmt)
    for option, path in pictures.items():
        _plot_option(entries, option, path, fmt, swept)
    return text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MAX_SERIES = 10  # colours a picture of top-1 against an option tells apart
MARKERS = {"finished": "o", "pruned": "x", "not finite": "s", "failed": "s", "stopped": "^", "running": "."}


def _plot_curves(entries: list[dict], out: str, fmt: str):
    """Validation top-1 per epoch, every run overlaid; a run that did not finish ends in its status's marker."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 5))
    for e in entries:
        if not e["curve"]:
            continue
        epochs, top1 = zip(*e["curve"], strict=True)
        label = f"{e['run']} ({e['status']})" if len(entries) <= 12 else None
        (line,) = ax.plot(epochs, top1, marker=".", alpha=0.8, label=label)
        if e["status"] != "finished":
            ax.plot(epochs[-1], top1[-1], MARKERS.get(e["status"], "."), color=line.get_color())
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title=f"Validation accuracy of {len(entries)} runs")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        save_figure(fig, out, fmt)
    finally:
        plt.close(fig)


def _plot_option(entries: list[dict], option: str, path: str, fmt: str, swept: list[str]):
    """Final top-1 of each run against the option's value: numbers on their axis (a log axis where
    they span two decades), other values as categories; a colour for each value of the other swept
    options (seeds apart, up to ``MAX_SERIES`` of them), the marker saying how the run stopped."""
    plt = _pyplot()
    others = [o for o in swept if o not in (option, "seed")]

    def series(e: dict) -> str:
        return ", ".join(f"{o}={_text(e['options'].get(o))}" for o in others)

    shown = [e for e in entries if e["top1"] is not None]
    numeric = all(isinstance(e["options"].get(option), (int, float)) for e in shown) and not any(
        isinstance(e["options"].get(option), bool) for e in shown
    )
    categories = list(dict.fromkeys(_text(e["options"].get(option)) for e in shown))
    names = list(dict.fromkeys(series(e) for e in shown))
    # a sweep's grid: a colour for each value of the other options; a study's trials (one point each) are one colour
    coloured = 1 < len(names) <= MAX_SERIES and all(sum(series(e) == n for e in shown) > 1 for n in names)

    def x(e: dict):
        return e["options"].get(option) if numeric else categories.index(_text(e["options"].get(option)))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names if coloured else [None]:
        runs = sorted((e for e in shown if name is None or series(e) == name), key=x)
        line = ax.plot([x(e) for e in runs], [e["top1"] for e in runs], alpha=0.5 if coloured else 0, label=name)
        colour = line[0].get_color()
        for status in dict.fromkeys(e["status"] for e in runs):
            chosen = [e for e in runs if e["status"] == status]
            ax.scatter(
                [x(e) for e in chosen], [e["top1"] for e in chosen], marker=MARKERS.get(status, "o"), color=colour
            )
    for status in dict.fromkeys(e["status"] for e in shown):  # the markers' legend, in black
        ax.scatter([], [], marker=MARKERS.get(status, "o"), color="black", label=status)
    values = [e["options"].get(option) for e in shown]
    if numeric and values and min(values) > 0 and max(values) / min(values) >= 100:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 4 else 0)
    ax.set(xlabel=option, ylabel="final validation top-1 (%)", title=f"top-1 against {option}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, path, fmt)
    finally:
        plt.close(fig)
