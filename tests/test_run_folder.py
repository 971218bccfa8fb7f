"""The run folder's --out check: a run killed while writing its first checkpoint is a killed run."""

from dhkd_pipe.training.run_folder import CHECKPOINT, LOCK, check_out


def test_a_leftover_first_checkpoint_tmp_is_a_killed_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / f"{CHECKPOINT}.tmp").write_bytes(b"partial")
    (out / LOCK).write_text("")  # the dead run's lock: no holder recorded
    for locked in (False, True):  # before the lock, and again under it (where the lock is not counted)
        assert check_out(str(out), locked=locked).replace
