"""``dhkd-pipe report``: runs overlaid per epoch (validation accuracy, training loss, the method's
named loss terms) and a table."""

from __future__ import annotations

import json
import math
import os

from dhkd_pipe.errors import DhkdError, io_error

MAX_RUN_FILE = 64 << 20  # a run's metrics.jsonl is a line per epoch: a 64 MiB one is not a run's


def read_run(run_dir: str) -> tuple[list[dict], dict]:
    """(per-epoch metrics, summary) of a run folder, each checked as it is read: a file that is
    not what the tool writes (not UTF-8, not JSON objects, a field missing or of another type, a
    NaN, too large to be a run's) is one DhkdError line naming the file and what is wrong."""
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise DhkdError(f"{run_dir} is not a run folder: no metrics.jsonl")
    history = []
    for number, line in enumerate(_read_text(metrics_path).split("\n"), 1):
        if line.strip():
            entry = _parse(line, f"corrupt metrics in {run_dir}: metrics.jsonl line {number}")
            history.append(_checked_epoch(entry, f"corrupt metrics in {run_dir}: metrics.jsonl line {number}"))
    summary = {}
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary_path):
        where = f"corrupt summary in {run_dir}: summary.json"
        summary = _parse(_read_text(summary_path), where)
        if not isinstance(summary, dict):
            raise DhkdError(f"{where} is {_kind(summary)}, not a JSON object")
        for key in ("model", "method"):
            if summary.get(key) is not None and not isinstance(summary[key], str):
                raise DhkdError(f"{where}: {key} is {_kind(summary[key])}, not text")
        for key in ("images_per_sec", "train_time"):
            _check_number(summary.get(key), f"{where}: {key}")
    return history, summary


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RUN_FILE + 1)
    except OSError as e:
        raise io_error(path, e, "read") from None
    if len(data) > MAX_RUN_FILE:
        raise DhkdError(f"{path} is larger than {MAX_RUN_FILE >> 20} MiB: not a file this tool wrote")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DhkdError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _parse(text: str, where: str):
    def refuse(token):  # the tool writes null for a value that is not finite, never NaN or Infinity
        raise ValueError(f"{token} is not JSON")

    try:
        return json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise DhkdError(f"{where}: nested too deep") from None
    except ValueError as e:  # json.JSONDecodeError is one
        raise DhkdError(f"{where}: {' '.join(str(e).split())[:120]}") from None


def _checked_epoch(entry, where: str) -> dict:
    """One metrics line: a JSON object with an integer ``epoch``, and numbers or null for the
    training loss, its terms and the validation accuracy (the fields report draws)."""
    if not isinstance(entry, dict):
        raise DhkdError(f"{where} is {_kind(entry)}, not a JSON object")
    epoch = entry.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise DhkdError(f"{where}: epoch is {_kind(epoch)}, not an epoch number")
    if "train_loss" not in entry:
        raise DhkdError(f"{where}: no train_loss")
    for key, value in entry.items():
        if key == "val_top1" or key.startswith("train_"):
            _check_number(value, f"{where}: {key}")
    return entry


def _check_number(value, where: str):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DhkdError(f"{where} is {_kind(value)}, not a number")
    if not math.isfinite(value):
        raise DhkdError(f"{where} is {value}, not a finite number")


def _kind(value) -> str:
    if value is None:
        return "missing or null"
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'list'}"
    text = json.dumps(value) if isinstance(value, (str, int, float)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def loss_terms(history: list[dict]) -> list[str]:
    """The named loss terms a run logged (``train_ce``, ``train_kd``, ...; not the total
    ``train_loss``), in the order first seen. Runs written before terms were logged have none."""
    names = {}
    for h in history:
        names.update({k[len("train_") :]: None for k in h if k.startswith("train_") and k != "train_loss"})
    return list(names)


def run_label(run_dir: str, summary: dict) -> str:
    name = os.path.basename(os.path.normpath(run_dir))
    if summary.get("model"):
        return f"{name} ({summary['model']}, {summary.get('method', '?')})"
    return name


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


IMAGE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "tif", "tiff", "eps", "ps")  # matplotlib's, as files


def check_report_target(out: str, run_dirs: list[str]) -> str:
    """Refuses, before any run is read, an ``--out`` that is a folder, one of the runs' own files,
    a name whose format matplotlib cannot write, or an existing file (or link) that report did not
    write; returns the format."""
    from dhkd_pipe.files import check_replaceable
    from dhkd_pipe.training.run_folder import run_files

    if os.path.isdir(out):
        raise DhkdError(f"--out {out} is a folder; name the image file to write (report.png)")
    for run_dir in run_dirs:
        own = run_files(run_dir)
        if os.path.realpath(out) in own:
            raise DhkdError(
                f"--out {out} is the run's own {own[os.path.realpath(out)]} (in {run_dir}); name another file"
            )
    fmt = os.path.splitext(out)[1].lstrip(".").lower()
    if fmt not in IMAGE_FORMATS:
        raise DhkdError(
            f"--out {out}: report writes images ({', '.join(IMAGE_FORMATS)}); name a file ending in one of them"
        )
    check_replaceable(out, REPORT_MARK, "report")
    return fmt


# Embedded in every picture report writes (its metadata): the one file report may later replace.
REPORT_MARK = "written by dhkd-pipe report"


def _mark_options(fmt: str) -> dict:
    """savefig's options that embed ``REPORT_MARK`` in a file of format ``fmt``."""
    if fmt == "png":
        return {"metadata": {"Software": REPORT_MARK}}
    if fmt in ("pdf", "svg", "eps", "ps"):
        return {"metadata": {"Creator": REPORT_MARK}}
    if fmt in ("jpg", "jpeg"):
        return {"pil_kwargs": {"comment": REPORT_MARK}}
    if fmt in ("tif", "tiff"):
        return {"pil_kwargs": {"description": REPORT_MARK}}
    return {"pil_kwargs": {"xmp": REPORT_MARK.encode()}}  # webp


def save_figure(fig, out: str, fmt: str):
    """Writes the figure whole to ``out`` (a temporary file renamed into place: a failure or a
    signal leaves the previous file as it was)."""
    from dhkd_pipe.files import write_atomic

    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise io_error(out, e) from None
    write_atomic(out, lambda f: fig.savefig(f, dpi=110, format=fmt, **_mark_options(fmt)))


def write_report(run_dirs: list[str], out: str) -> str:
    """Writes the picture to ``out`` and returns the markdown table of final figures."""
    fmt = check_report_target(out, run_dirs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(d, *read_run(d)) for d in run_dirs]
    fig, (ax_acc, ax_loss, ax_terms) = plt.subplots(1, 3, figsize=(16, 4))
    rows = []
    styles = {}  # term -> line style, the same for every run
    for run_dir, history, summary in runs:
        label = run_label(run_dir, summary)
        # --val-every N skips some epochs; null: a data set without a validation split
        validated = [h for h in history if h.get("val_top1") is not None]
        (line,) = ax_acc.plot(
            [h["epoch"] for h in validated], [h["val_top1"] for h in validated], marker=".", label=label
        )
        ax_loss.plot(
            [h["epoch"] for h in history],
            [h["train_loss"] for h in history],
            marker=".",
            label=label,
            color=line.get_color(),
        )
        for term in loss_terms(history):
            style = styles.setdefault(term, ("-", "--", ":", "-.")[len(styles) % 4])
            points = [(h["epoch"], h[f"train_{term}"]) for h in history if h.get(f"train_{term}") is not None]
            ax_terms.plot(*zip(*points, strict=True), linestyle=style, marker=".", color=line.get_color())
        rows.append(
            {
                "run": label,
                "epochs": len(history),
                "val_top1": validated[-1]["val_top1"] if validated else None,
                "best_top1": max((h["val_top1"] for h in validated), default=None),
                "images_per_sec": summary.get("images_per_sec"),
                "train_time": summary.get("train_time"),
            }
        )
    ax_acc.set(xlabel="epoch", ylabel="validation top-1 (%)", title="Validation accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss (total)", yscale="log")
    ax_terms.set(xlabel="epoch", ylabel="weighted term", title="Loss terms (colour: run)", yscale="log")
    for term, style in styles.items():  # legend of line styles only
        ax_terms.plot([], [], linestyle=style, color="black", label=term)
    for ax in (ax_acc, ax_loss, ax_terms):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, out, fmt)
    finally:
        plt.close(fig)
    return markdown_table(
        rows,
        [
            ("run", "run", "s"),
            ("epochs", "epochs", "d"),
            ("val_top1", "val top-1 %", ".2f"),
            ("best_top1", "best top-1 %", ".2f"),
            ("images_per_sec", "img/s", ".0f"),
            ("train_time", "train s", ".1f"),
        ],
    )


def write_method_report(
    groups: list[tuple[str, list[str]]], out: str, title: str = "", reference: tuple[str, float] | None = None
):
    """One picture for runs grouped by method (``groups``: (label, run folders), e.g. one per seed).

    Left: each run's final validation top-1 as a dot, the group's mean as a bar and its min-max as
    a line; ``reference`` (label, top-1), e.g. the teacher, as a dashed line. Right: validation
    top-1 per validated epoch, the mean over the group's runs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_final, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for x, (label, run_dirs) in enumerate(groups):
        histories = [[h for h in read_run(d)[0] if "val_top1" in h] for d in run_dirs]
        finals = [h[-1]["val_top1"] for h in histories if h]
        if not finals:
            continue
        color = f"C{x % 10}"
        mean = sum(finals) / len(finals)
        ax_final.bar(x, mean, width=0.6, color=color, alpha=0.35)
        ax_final.plot([x, x], [min(finals), max(finals)], color=color, linewidth=2)
        ax_final.scatter([x] * len(finals), finals, color=color, s=14, zorder=3)
        ax_final.annotate(
            f"{mean:.2f}", (x, max(finals)), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8
        )
        epochs = sorted({h["epoch"] for run in histories for h in run})
        means = [
            sum(h["val_top1"] for run in histories for h in run if h["epoch"] == e)
            / sum(1 for run in histories for h in run if h["epoch"] == e)
            for e in epochs
        ]
        ax_curve.plot(epochs, means, marker=".", color=color, label=f"{label} (n={len(finals)})")
    ax_final.set_xticks(range(len(groups)), [label for label, _ in groups], rotation=25, ha="right", fontsize=8)
    ax_final.set(ylabel="final validation top-1 (%)", title="Top-1 per method: runs, mean, min-max")
    finals_all = [h["val_top1"] for _, dirs in groups for d in dirs for h in read_run(d)[0][-1:] if "val_top1" in h]
    if finals_all:
        low = min(finals_all + ([reference[1]] if reference else []))
        high = max(finals_all + ([reference[1]] if reference else []))
        ax_final.set_ylim(low - 0.6 * max(high - low, 1), high + 0.3 * max(high - low, 1))
    if reference:
        for ax in (ax_final, ax_curve):
            ax.axhline(
                reference[1], color="grey", linestyle="--", linewidth=1, label=f"{reference[0]} {reference[1]:.2f}"
            )
    ax_curve.set(xlabel="epoch", ylabel="validation top-1 (%)", title="Validation top-1 (mean over runs)")
    for ax in (ax_final, ax_curve):
        ax.grid(alpha=0.3)
    ax_curve.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        save_figure(fig, out, check_report_target(out, [d for _, dirs in groups for d in dirs]))
    finally:
        plt.close(fig)
