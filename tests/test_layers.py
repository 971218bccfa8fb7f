"""The package's layers import only downward, and no module imports one that imports it back.

Each module of ``dhkd_pipe`` belongs to one layer (its subpackage, or ``base`` for the small
modules at the top of ``pipeline/``); ``ALLOWED`` says which layers each may import. Imports are
read from the source (module level and inside functions alike); those under ``if TYPE_CHECKING:``
are annotations only and never run, so they are not counted."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (setup.cfg's package_dir)
FOLDERS = {
    "pipeline": "dhkd_pipe",
    "stages": "dhkd_pipe.stages",
    "kernels": "dhkd_pipe.kernels",
    "benchmarks": "dhkd_pipe.benchmarks",
}
# the CLI, its machinery and the lazy public API sit above everything
FRONT = {"dhkd_pipe", "dhkd_pipe.cli", "dhkd_pipe.cli_bench", "dhkd_pipe.command_line"}
SUBPACKAGES = ("models", "kernels", "store", "data", "methods", "training", "stages", "benchmarks")
BASE_BELOW = {"base"}
ALLOWED = {
    "base": {"base"},
    "models": {"base", "models"},
    "kernels": {"base", "kernels"},
    "store": {"base", "store"},
    "methods": {"base", "models", "kernels", "methods"},
    "data": {"base", "models", "kernels", "store", "data"},
    "config": {"base", "models", "kernels", "store", "data", "methods", "config"},
    "training": {"base", "models", "kernels", "store", "data", "methods", "config", "training"},
    "stages": {"base", "models", "kernels", "store", "data", "methods", "config", "training", "stages"},
    "benchmarks": {
        "base",
        "models",
        "kernels",
        "store",
        "data",
        "methods",
        "config",
        "training",
        "stages",
        "benchmarks",
    },
    "front": set(),  # anything
}
# ``python kernels/bench.py``, the documented path of the kernels' benchmark, is a script that runs
# dhkd_pipe.benchmarks.kernels; nothing imports it.
SCRIPTS = {"dhkd_pipe.kernels.bench"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def layer(name: str) -> str:
    if name in FRONT:
        return "front"
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in SUBPACKAGES:
        return parts[1]
    return "config" if name == "dhkd_pipe.config" or name.startswith("dhkd_pipe.config.") else "base"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The dhkd_pipe modules ``path`` imports when it runs (a name imported from a package counts as
    the submodule where one of that name exists, else as the package)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node.test)
        for part in node.body
        for n in ast.walk(part)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dhkd_pipe")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("dhkd_pipe"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return out - {name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, name, set(found)) for name, path in found.items() if name not in SCRIPTS}


def test_every_module_imports_only_the_layers_below_it(graph):
    wrong = []
    for name, targets in graph.items():
        allowed = ALLOWED[layer(name)]
        if layer(name) == "front":
            continue
        wrong += [
            f"{name} ({layer(name)}) imports {t} ({layer(t)})" for t in sorted(targets) if layer(t) not in allowed
        ]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_one_that_imports_it_back(graph):
    """Tarjan's strongly connected components over the import graph: any component of two or more
    modules is a cycle, however long, lazy imports included."""
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_rules_see_the_imports_they_judge(graph):
    """The graph is not empty by accident: known edges of each kind are found."""
    assert "dhkd_pipe.store.codecs" in graph["dhkd_pipe.store.reader"]  # module level
    assert "dhkd_pipe.store.audit" in graph["dhkd_pipe.store.reader"]  # inside a function
    assert all(layer(n) != "front" for n in graph if n not in FRONT)
    assert {layer(n) for n in graph} >= set(SUBPACKAGES) | {"base", "config", "front"}
