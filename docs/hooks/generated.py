"""MkDocs hook: the pages and tables generated from the code and from data, so none is written twice.

- ``benchmarks/results.md``: one table per result file under ``benchmarks/results/<machine>/*.json``
  (the files the ``dhkd-pipe bench`` commands write), headed by the machine, date, commit and
  command recorded in it; a note where there is none yet.
- ``changelog.md``: the repository's ``CHANGELOG.md``.
- ``<!-- generated: methods -->`` in a page: every ``--method`` with its options, published defaults
  and source, from ``dhkd_pipe.methods.registry.METHODS`` (the classes ``--help`` is made from).
- ``<!-- generated: public-api -->``: a mkdocstrings block over ``dhkd_pipe.__all__``.
- the command line reference (mkdocs-click) shows no placeholder for an option without a default.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
import re

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
LISTS = ("rows", "results", "methods", "runs")  # where a result file keeps its table, in this order


def on_files(files, config):
    files.append(File.generated(config, "benchmarks/results.md", content=results_markdown(RESULTS)))
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        files.append(File.generated(config, "changelog.md", content=f.read()))
    return files


def on_page_markdown(markdown, page, config, files):
    if "<!-- generated: methods -->" in markdown:
        markdown = markdown.replace("<!-- generated: methods -->", methods_markdown())
    if "<!-- generated: public-api -->" in markdown:
        markdown = markdown.replace("<!-- generated: public-api -->", public_api_markdown())
    return markdown


def on_page_content(html, page, config, files):
    # click 8.3 marks an option without a default with a sentinel, which mkdocs-click prints as is;
    # this project's help texts say each default themselves, so the cell stays empty
    return html.replace("<code>Sentinel.UNSET</code>", "")


def _prose(text: str) -> str:
    """Code prose as Markdown: ``*`` and ``<`` outside code spans are literal (``alpha*TCKD``, ``<g, h>``)."""
    parts = re.split(r"(``.*?``|`[^`]*`)", text, flags=re.S)
    return "".join(p if i % 2 else p.replace("*", "\\*").replace("<", "&lt;") for i, p in enumerate(parts))


def _cell(value) -> str:
    if isinstance(value, float):
        value = f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    elif isinstance(value, (list, dict)):
        value = json.dumps(value)
    return "" if value is None else _prose(str(value)).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> str:
    """A markdown table of ``rows``' scalar fields, columns in the order they first appear."""
    columns = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def result_markdown(path: str, payload: dict) -> str:
    """One result file: where, when, from which code and command; then its table."""
    m = payload.get("machine") or {}
    memory = f", {m['memory_gib']} GiB" if m.get("memory_gib") else ""
    gpu = f"; GPU {m['gpu']} x{m.get('gpu_count') or 1}" if m.get("gpu") else ""
    facts = [
        ("machine", f"{m.get('cpu') or m.get('device', '?')}, {m.get('cores', '?')} cores{memory}{gpu}"),
        ("date (UTC)", payload.get("date") or "not recorded"),
        ("commit", payload.get("commit") or "not recorded"),
        ("command", f"`{payload['command']}`" if payload.get("command") else "not recorded"),
        ("version", f"dhkd-pipe {payload.get('version', '?')}, torch {m.get('torch', '?')}"),
    ]
    out = [f"### {os.path.basename(path)}", "", "| | |", "| --- | --- |"]
    out += [f"| {k} | {_cell(v)} |" for k, v in facts]
    rows = next((payload[k] for k in LISTS if isinstance(payload.get(k), list) and payload[k]), None)
    if rows and all(isinstance(r, dict) for r in rows):
        out += ["", table(rows)]
    return "\n".join(out)


def results_markdown(root: str) -> str:
    """The benchmark results page: each machine's folder under ``root``, each JSON file in it."""
    out = [
        "# Benchmark results",
        "",
        "Generated from the result files in `benchmarks/results/<machine>/` (see [Benchmarks](index.md)).",
        "",
    ]
    paths = sorted(glob.glob(os.path.join(root, "*", "*.json")))
    if not paths:
        out.append(
            "No result files yet: run `dhkd-pipe bench all --out 'benchmarks/results/{machine}'` and commit them."
        )
    for machine in dict.fromkeys(os.path.basename(os.path.dirname(p)) for p in paths):
        out += [f"## {machine}", ""]
        for p in (p for p in paths if os.path.basename(os.path.dirname(p)) == machine):
            with open(p) as f:
                out += [result_markdown(p, json.load(f)), ""]
    return "\n".join(out) + "\n"


def methods_markdown() -> str:
    """Every method: a summary table, then each one's loss and source (its docstring) and options."""
    from dhkd_pipe.methods.registry import METHODS, option_defaults

    def defaults(cls) -> str:
        return ", ".join(f"{k} {_cell(v)}" for k, v in option_defaults(cls).items() if v is not None)

    out = ["| method | what it is | defaults |", "| --- | --- | --- |"]
    out += [f"| `{name}` | {_cell(cls.summary)} | {defaults(cls)} |" for name, cls in METHODS.items()]
    for name, cls in METHODS.items():
        out += ["", f"### `{name}`", "", _prose(inspect.cleandoc(cls.__doc__ or "")), ""]
        out += ["| option | default | what it sets |", "| --- | --- | --- |"]
        for option, default in option_defaults(cls).items():
            flag = "--" + option.replace("_", "-")
            out.append(f"| `{flag}` | {_cell(default) or 'unset'} | {_cell(cls.knobs.get(option, ''))} |")
    return "\n".join(out)


def public_api_markdown() -> str:
    """mkdocstrings over the names ``import dhkd_pipe`` offers (its ``__all__``)."""
    import dhkd_pipe

    names = [n for n in dhkd_pipe.__all__ if not n.startswith("_")]
    return "::: dhkd_pipe\n    options:\n      members:\n" + "".join(f"        - {n}\n" for n in names)
