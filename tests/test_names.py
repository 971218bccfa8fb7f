"""Each list of allowed names is written once, by the module that owns it; the rest import it.

The check reads the source: a tuple, list or set literal of the same names anywhere else in
``pipeline/``, ``stages/`` or ``kernels/`` is a second declaration that can drift.
"""

from __future__ import annotations

import ast
import functools
import os

import pytest

from dhkd_pipe import cli, config
from dhkd_pipe.data import datasets as data
from dhkd_pipe.data import views
from dhkd_pipe.methods import losses
from dhkd_pipe.methods import names as loss_names
from dhkd_pipe.methods import registry as methods
from dhkd_pipe.models import aux_heads, dual_head
from dhkd_pipe.store import codecs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name list -> the module that declares it, and that module's file
OWNERS = {
    "BACKENDS": (loss_names, "pipeline/methods/names.py"),
    "KD_LOSS_NAMES": (loss_names, "pipeline/methods/names.py"),  # losses.KD_LOSSES: a dict built from it
    "CODECS": (codecs, "pipeline/store/codecs.py"),
    "AUX_HEADS": (aux_heads, "pipeline/models/aux_heads.py"),
    "DATA_SETS": (data, "pipeline/data/datasets.py"),
    "PRECISIONS": (config, "pipeline/config/common.py"),
    "POLICIES": (views, "pipeline/data/views.py"),
}


@functools.lru_cache(maxsize=1)
def _string_collections() -> tuple:
    """(file, line, names) of every literal tuple/list/set of two or more strings in the code."""
    return tuple(_walk_string_collections())


def _walk_string_collections():
    for folder in ("pipeline", "stages", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if (
                        isinstance(node, (ast.Tuple, ast.List, ast.Set))
                        and len(node.elts) >= 2
                        and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)
                    ):
                        yield os.path.relpath(path, ROOT), node.lineno, {e.value for e in node.elts}


@pytest.mark.parametrize("list_name", sorted(OWNERS))
def test_each_name_list_is_declared_once_by_its_owner(list_name):
    module, owner = OWNERS[list_name]
    declared = getattr(module, list_name)
    found = [(path, line) for path, line, values in _string_collections() if values == set(declared)]
    # a dict's keys are no tuple literal; the codec names are read off the codec objects
    expected = [] if isinstance(declared, dict) or list_name == "CODECS" else [owner]
    assert [path for path, _ in found] == expected, f"{list_name} written in {found}, expected only in {owner}"


def test_the_cli_offers_the_owners_names():
    params = {
        p.name: p
        for command in (cli.main.commands["distill"], cli.main.commands["cache-teacher"])
        for p in command.params
    }
    assert tuple(params["aux_head"].type.choices) == dual_head.AUX_HEADS
    assert tuple(params["codec"].type.choices) == codecs.CODECS
    assert tuple(params["precision"].type.choices) == config.PRECISIONS
    assert tuple(params["kernels"].type.choices) == losses.BACKENDS
    assert tuple(params["kd_loss"].type.choices) == tuple(losses.KD_LOSSES)
    assert list(params["method"].type.choices) == list(methods.METHODS)
