"""The run folder: what --out may be, what the tool owns in it (recorded, never guessed), the
files written whole, and the one holder rule of both locks."""

import json
import os

import pytest

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.files import holds_mark
from dhkd_pipe.training.run_folder import (
    CHECKPOINT,
    LOCK,
    MANIFEST,
    TRACKING_DIR,
    RunMode,
    check_out,
    owned_entries,
    remove_run_files,
    run_files,
)


def test_a_leftover_first_checkpoint_tmp_is_a_killed_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / f"{CHECKPOINT}.tmp").write_bytes(b"partial")
    (out / LOCK).write_text("")  # the dead run's lock: no holder recorded
    for locked in (False, True):  # before the lock, and again under it (where the lock is not counted)
        assert check_out(str(out), locked=locked).replace


def _plain_torch_folder(out):
    """A plain PyTorch training folder of the user's: what a run writes, by name and format, and no manifest."""
    import torch

    out.mkdir()
    torch.save({"model": {}, "epoch": 3}, out / CHECKPOINT)
    torch.save({}, out / "model.pt")
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (out / "summary.json").write_text('{"config": {"lr": 0.1}}\n')


@pytest.mark.parametrize("mode", list(RunMode))
def test_a_folder_without_the_manifest_is_the_users_whatever_it_holds(tmp_path, mode):
    out = tmp_path / "run"
    _plain_torch_folder(out)
    assert owned_entries(str(out)) is None and run_files(str(out)) == {
        os.path.realpath(out / n): n for n in (MANIFEST, LOCK)
    }
    with pytest.raises(DhkdError, match="holds no run of dhkd-pipe"):
        check_out(str(out), mode)


def test_a_run_refuses_to_write_over_an_unclaimed_file_of_its_names(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"tool": "dhkd-pipe", "entries": ["metrics.jsonl"]}))
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "model.safetensors").write_bytes(b"the user's")
    for mode in RunMode:
        with pytest.raises(DhkdError, match="holds model.safetensors, which dhkd-pipe did not write"):
            check_out(str(out), mode)


def test_overwrite_clears_only_the_trackers_files_of_the_trackers_folder(tmp_path):
    out = tmp_path / "run"
    (out / TRACKING_DIR / "1700000000.1").mkdir(parents=True)
    (out / MANIFEST).write_text(json.dumps({"tool": "dhkd-pipe", "entries": [TRACKING_DIR, "metrics.jsonl"]}))
    (out / "metrics.jsonl").write_text("{}\n")
    (out / TRACKING_DIR / "events.out.tfevents.1.h").write_bytes(b"run")
    (out / TRACKING_DIR / "1700000000.1" / "events.out.tfevents.2.h").write_bytes(b"hparams")
    remove_run_files(str(out))
    assert sorted(os.listdir(out)) == [MANIFEST]  # the trackers' folder held nothing else: gone
    (out / TRACKING_DIR).mkdir()
    (out / TRACKING_DIR / "notes.md").write_text("mine")
    (out / TRACKING_DIR / "events.out.tfevents.3.h").write_bytes(b"run")
    remove_run_files(str(out))
    assert os.listdir(out / TRACKING_DIR) == ["notes.md"]


def test_both_locks_judge_and_name_their_holder_by_one_rule(tmp_path):
    """The run lock and the store lock read a holder the same way and refuse a live one with the same line."""
    from dhkd_pipe.processes import HOST, held_line, new_holder, parse_holder
    from dhkd_pipe.store.lock import _held_error as store_held
    from dhkd_pipe.training.run_lock import _held_error as run_held

    holder = new_holder("dhkd-pipe distill", token="t")
    assert parse_holder(json.dumps(holder).encode()) == holder
    for garbled in (b"", b"\xff\xfe", b"[1]", b'{"pid": "1", "host": "h"}', b'{"pid": 1}', None):
        assert parse_holder(garbled) is None
    here, there = {**holder, "pid": 42}, {**holder, "host": "elsewhere.example"}
    assert held_line("busy", here, "x").endswith("stop it (kill 42)") and HOST in held_line("busy", here, "x")
    assert held_line("busy", there, "remove it").endswith("wait for it to finish; remove it")
    assert "kill 42" in str(run_held(str(tmp_path / LOCK), here)) and "kill 42" in str(store_held("s.zarr", here))
    assert "--break-lock" in str(store_held("s.zarr", there)) and "remove" in str(run_held(str(tmp_path / LOCK), there))


@pytest.mark.parametrize("size", [100, (1 << 20) + 5])
def test_holds_mark_finds_a_mark_at_either_end_of_a_large_file(tmp_path, size):
    path = tmp_path / "f.bin"
    for where in ("head", "tail"):
        body = bytearray(size)
        at = 3 if where == "head" else size - 20
        body[at : at + 8] = b"MARK-xyz"
        path.write_bytes(bytes(body))
        assert holds_mark(str(path), b"MARK-xyz", whole=1 << 10, ends=1 << 9)
    path.write_bytes(b"\0" * size)
    assert not holds_mark(str(path), b"MARK-xyz", whole=1 << 10, ends=1 << 9)
    assert not holds_mark(str(tmp_path / "missing"), b"MARK-xyz")


def test_quickstart_overwrite_removes_its_own_parts_only(tmp_path):
    from dhkd_pipe.stages.quickstart import _remove_quickstart
    from dhkd_pipe.stages.report import REPORT_MARK

    out = tmp_path / "qs"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / MANIFEST).write_text(json.dumps({"tool": "dhkd-pipe", "entries": ["model.pt", TRACKING_DIR]}))
    (out / "teacher" / "model.pt").write_bytes(b"weights")
    (out / "logits.zarr").mkdir()
    (out / "logits.zarr" / "zarr.json").write_text(json.dumps({"attributes": {"format_version": 3}}))
    (out / "report.png").write_bytes(b"\x89PNG " + REPORT_MARK.encode())
    (out / "teacher" / "notes.md").write_text("mine")  # a file of the user's inside the teacher's run
    with pytest.raises(DhkdError, match="teacher was not written by dhkd-pipe quickstart"):
        _remove_quickstart(str(out))
    assert (out / "teacher" / "notes.md").exists() and (out / "report.png").exists()
    (out / "teacher" / "notes.md").unlink()
    _remove_quickstart(str(out))
    assert os.listdir(out) == []
