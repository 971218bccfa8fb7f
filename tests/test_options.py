"""Each option is declared once, as a config field (or a method's own field), and the CLI's help,
usage errors and model names never import torch."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from dhkd_pipe import cli, config
from dhkd_pipe.options import flag_of, option_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [
    obj
    for obj in vars(config).values()
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and option_fields(obj)
]


def _sources():
    for folder in ("pipeline", "stages", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path) as f:
                        yield os.path.relpath(path, ROOT), f.read()


def test_no_option_is_written_by_hand():
    # click options are generated from the config fields; the one exception is the recipe, --config
    hand_written = []
    for path, text in _sources():
        for node in ast.walk(ast.parse(text, path)):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) in ("option", "Option", "argument", "Argument")
                and getattr(node.func.value, "id", None) == "click"
            ):
                names = [
                    e.value
                    for arg in node.args
                    for e in (arg.elts if isinstance(arg, (ast.List, ast.Tuple)) else [arg])
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                ]
                if names and names != ["--config", "config_file"]:  # the generator (options.py) names none
                    hand_written.append((path, node.lineno, names))
    assert hand_written == []


def test_no_config_flag_is_written_into_a_command_line_by_hand():
    # a config field's flag (--views) as an item of a list or tuple is a command line built by hand (the
    # store's recorded one is generated from CacheConfig); messages may still name a flag in prose
    flags = {flag_of(f) for cls in CONFIGS for f in option_fields(cls)}
    flags |= {
        meta["flag"]
        for cls in CONFIGS
        for f in option_fields(cls)
        for meta in f.metadata["option"]["per_command"].values()
        if "flag" in meta
    }
    found = []
    for path, text in _sources():
        for node in ast.walk(ast.parse(text, path)):
            if isinstance(node, (ast.List, ast.Tuple)):
                found += [
                    (path, e.lineno, e.value)
                    for e in node.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in flags
                ]
    assert found == []


def test_each_command_offers_each_option_once_and_only_declared_ones():
    def walk(group):
        for command in group.commands.values():
            yield from walk(command) if hasattr(command, "commands") else [command]

    for command in walk(cli.main):
        names = [p.name for p in command.params]
        assert len(names) == len(set(names)), command.name
        if isinstance(command, cli.ConfigCommand):
            declared = {f.name for cls in CONFIGS for f in option_fields(cls)} | {"config_file"}
            assert set(names) <= declared, command.name


def test_method_options_come_from_the_methods():
    from dhkd_pipe.methods.registry import METHODS, OPTIONS

    taken = {f.name for cls in METHODS.values() for f in dataclasses.fields(cls)} - {"backend"}
    assert set(OPTIONS) == taken
    train = {f.name: f for f in dataclasses.fields(config.TrainConfig)}
    assert all(train[name].default is None for name in OPTIONS)  # None: the chosen method's default
    # TrainConfig's own source names no method option: adding one touches the methods module only
    text = open(os.path.join(ROOT, "pipeline", "config", "training.py")).read()
    assert not [name for name in OPTIONS if re.search(rf"^\s+{name}\s*:", text, re.M)]


def test_data_sets_in_help_come_from_data():
    from dhkd_pipe.data.datasets import DATA_SETS

    text = " ".join(config.TrainConfig.__dataclass_fields__["data"].metadata["option"]["help"].split())
    assert " | ".join(DATA_SETS) in text


# --- a torch-free start --------------------------------------------------------------------------------

PROBE = """
import sys
from dhkd_pipe.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "zarr", "torchvision", "accelerate") if m in sys.modules)
print("HEAVY", ",".join(heavy), "EXIT", code, file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args, code",
    [
        (["--help"], 0),
        (["distill", "--help"], 0),
        (["cache-teacher", "--help"], 0),
        (["train-teacher", "--help"], 0),
        (["eval", "--help"], 0),
        (["bench", "store", "--help"], 0),
        (["models"], 0),  # the names from models/catalog.py, no model module imported
        (["distill", "--method", "nope"], 2),  # a bad choice
        (["eval", "--data", "digits"], 2),  # a missing required option
    ],
)
def test_help_and_usage_errors_import_no_torch(args, code):
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("HEAVY")][-1]
    assert line == f"HEAVY  EXIT {code}", result.stderr


def test_the_catalog_lists_the_installed_torchvision_architectures():
    import torchvision

    from dhkd_pipe.models.catalog import TORCHVISION_ARCHS

    assert list(TORCHVISION_ARCHS) == sorted(torchvision.models.list_models(module=torchvision.models))


def test_every_catalog_entry_names_an_existing_builder():
    import importlib

    from dhkd_pipe.models.catalog import CATALOG

    for name, arch in CATALOG.items():
        assert callable(getattr(importlib.import_module(f"dhkd_pipe.models.{arch.module}"), arch.builder)), name


def test_bench_stores_latency_without_the_local_server_is_one_line(tmp_path):
    from conftest import cli_here

    result = cli_here("bench", "store", "--s3-latency-ms", "20", "--json", tmp_path / "b.json", check=False)
    assert (
        result.exit_code == 2
        and result.stderr == "error: --s3-latency-ms is added to the local S3 server's requests: give --s3-local too\n"
    )
    assert not (tmp_path / "b.json").exists()
    result = cli_here("bench", "store", "--s3-local", "--s3-latency-ms", "-1", check=False)
    assert result.exit_code == 2 and "bad --s3-latency-ms -1" in result.stderr
