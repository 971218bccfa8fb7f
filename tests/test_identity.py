"""The behaviour record: the code writes the same digits store, byte for byte, and a two-epoch
cached DHKD run ends with the same parameters and metrics as the code before its restructuring
(``tests/data/identity_digits.json``, written by ``tests/identity_case.py`` at 0167df8)."""

import json

import pytest
from identity_case import RECORD, make


@pytest.mark.slow  # stage 1 and a two-epoch run through the CLI
def test_store_and_cached_run_are_as_recorded(tmp_path):
    with open(RECORD) as f:
        recorded = json.load(f)
    now = make(str(tmp_path))
    assert now["store"] == recorded["store"]
    assert now["params"] == recorded["params"]
    assert now["metrics"] == recorded["metrics"]
