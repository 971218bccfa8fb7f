"""``dhkd-pipe report``: runs overlaid per epoch (validation accuracy, training loss, the method's
named loss terms) and a table."""

from __future__ import annotations

import json
import os

from dhkd_pipe.errors import DhkdError, io_error


def read_run(run_dir: str) -> tuple[list[dict], dict]:
    """(per-epoch metrics, summary) of a run folder."""
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise DhkdError(f"{run_dir} is not a run folder: no metrics.jsonl")
    try:
        with open(metrics_path) as f:
            history = [json.loads(line) for line in f if line.strip()]
        summary = {}
        if os.path.isfile(os.path.join(run_dir, "summary.json")):
            with open(os.path.join(run_dir, "summary.json")) as f:
                summary = json.load(f)
    except json.JSONDecodeError as e:
        raise DhkdError(f"corrupt metrics in {run_dir}: {e}") from None
    except OSError as e:
        raise io_error(run_dir, e, "read") from None
    return history, summary


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
    or a name whose format matplotlib cannot write; returns the format."""
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
    return fmt


def save_figure(fig, out: str, fmt: str):
    """Writes the figure whole to ``out`` (a temporary file renamed into place: a failure or a
    signal leaves the previous file as it was)."""
    from dhkd_pipe.training.run_folder import write_atomic

    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise io_error(out, e) from None
    write_atomic(out, lambda f: fig.savefig(f, dpi=110, format=fmt))


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
            ax_terms.plot(*zip(*points), linestyle=style, marker=".", color=line.get_color())
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
