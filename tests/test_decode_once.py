"""Stage 1 decodes each image once for all its views: the unit-grouped training order."""

import numpy as np
import pytest
import torch
from conftest import write_digit_jpegs

from dhkd_pipe.data.views import UnitGroups


def test_unit_groups_keep_each_units_samples_across_epochs():
    n, g = 103, 16
    groups = UnitGroups(seed=7, num_samples=n, group_rows=g)
    members = groups.members()
    assert sorted(members.tolist()) == list(range(n)) and groups.num_groups == 7
    orders = []
    for e in range(4):
        order, unit = groups.epoch(e)
        assert sorted(order.tolist()) == list(range(n))  # a permutation
        assert sorted(unit.tolist()) == list(range(7)) and unit[-1] == 6  # the short group stays last
        for k in range(groups.num_groups):
            u = unit[k]
            assert set(order[u * g : (u + 1) * g].tolist()) == set(members[k * g : (k + 1) * g].tolist())
        again, unit_again = groups.epoch(e)
        assert np.array_equal(order, again) and np.array_equal(unit, unit_again)  # a pure function of (seed, epoch)
        orders.append(order)
    # the epochs differ: in where the groups sit and in the order within each unit
    assert not np.array_equal(orders[0], orders[1])
    assert len({tuple(o[:g]) for o in orders}) == 4
    assert not np.array_equal(UnitGroups(8, n, g).members(), members)


def test_one_group_is_a_plain_permutation():
    order, unit = UnitGroups(seed=0, num_samples=10, group_rows=64).epoch(3)
    assert sorted(order.tolist()) == list(range(10)) and unit.tolist() == [0]


def test_group_jobs_split_the_groups_and_skip_what_is_done():
    from dhkd_pipe.data.decode_once import group_jobs
    from dhkd_pipe.data.views import ViewPlan

    n, unit_rows, shard, epochs = 50, 8, 2, 3  # units of 2 chunks of 4 rows: 7 groups, the last of 2 samples
    plan = ViewPlan(seed=1, policy="random_resized_crop_flip", resolution=16)
    groups = UnitGroups(plan.seed, n, unit_rows)
    sizes = lambda idx: np.tile([[20, 30]], (len(idx), 1))  # noqa: E731
    done = np.zeros((epochs, 13), dtype=bool)
    jobs = [group_jobs(groups, plan, sizes, epochs, shard, done, rank, 2) for rank in (0, 1)]
    assert [j.group for j in jobs[0]] == [0, 2, 4, 6] and [j.group for j in jobs[1]] == [1, 3, 5]
    written = {}
    for job in jobs[0] + jobs[1]:
        for j, e in enumerate(job.epochs):
            order, unit = groups.epoch(e)
            first = job.first_chunks[j]
            assert first == unit[job.group] * shard
            assert np.array_equal(job.rows[j], order[first * 4 : first * 4 + len(job.samples)])
            assert np.array_equal(job.samples[job.places[j]], job.rows[j])
            assert np.array_equal(job.views[job.places[j], j], plan.views(e, job.rows[j], sizes(job.rows[j])))
            written[(e, first)] = written.get((e, first), 0) + 1
    assert sorted(written) == [(e, c) for e in range(epochs) for c in range(0, 13, 2)] and set(written.values()) == {1}
    # resume: a unit done in one epoch leaves only the other epochs of its group
    order, unit = groups.epoch(1)
    done[1, unit[3] * shard : unit[3] * shard + shard] = True
    (job,) = [j for j in group_jobs(groups, plan, sizes, epochs, shard, done, 1, 2) if j.group == 3]
    assert job.epochs == [0, 2] and job.views.shape == (8, 2, 5)
    done[:] = True
    assert group_jobs(groups, plan, sizes, epochs, shard, done) == []


# ---- stage 1 on a JPEG folder -------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    pytest.importorskip("nvidia.dali")
    from dhkd_pipe.models import create_model

    root = write_digit_jpegs(tmp_path_factory.mktemp("jpegs"), train=9, val=1)
    torch.manual_seed(0)
    weights = root / "teacher.pt"
    torch.save({"model": create_model("resnet8", 3).state_dict()}, weights)
    return root, weights


def _config(jpegs, out, **kw):
    from dhkd_pipe.config import CacheConfig

    root, weights = jpegs
    options = dict(
        data=f"imagefolder:{root}",
        model="resnet8",
        weights=str(weights),
        views=3,
        resolution=32,
        batch_size=8,
        chunk_rows=4,
        codec="fp32",
        workers=1,
        out=str(out),
    )
    return CacheConfig(**{**options, **kw}).validate()


def _arrays(path):
    import zarr

    group = zarr.open_group(str(path), mode="r")
    names = ("logits", "order", "views", "labels", "done") + (("logit_scale",) if "logit_scale" in group else ())
    return {name: np.asarray(group[name][...]) for name in names}


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_decode_once_writes_the_store_the_view_by_view_pass_writes(jpegs, tmp_path, codec):
    """27 images x 3 views in units of 4 rows (7 groups): each image decoded once, and the store
    equal, array by array, to the one written view by view from the same command (int8: the
    decode-once pass encodes batch by batch what the other encodes unit by unit, scales included)."""
    from dhkd_pipe.stages.cache_teacher import cache_teacher

    once = cache_teacher(_config(jpegs, tmp_path / "once.zarr", codec=codec), log=lambda *a: None)
    per_view = cache_teacher(
        _config(jpegs, tmp_path / "per-view.zarr", codec=codec), log=lambda *a: None, decode_once=False
    )
    assert once["images"] == per_view["images"] == 27 * 3
    assert once["decoded_images"] == 27 and once["decoded_per_row"] == pytest.approx(1 / 3)
    assert per_view["decoded_images"] == 27 * 3
    a, b = _arrays(tmp_path / "once.zarr"), _arrays(tmp_path / "per-view.zarr")
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert a["done"].all()
    # the order is unit-grouped: a unit holds the same samples in every epoch, in another order
    order = a["order"]
    for u in range(0, 27, 4):
        assert set(order[0, u : u + 4]) in [set(order[1, v : v + 4]) for v in range(0, 27, 4)]
    assert not np.array_equal(order[0], order[1])


@pytest.mark.slow
def test_decode_once_resumes_exactly(jpegs, tmp_path, monkeypatch):
    """Stopped once its fifth unit is written (the writer's threads may finish a few more), then
    re-run: only the units not written are rendered again, and the store is a straight run's."""
    from dhkd_pipe.stages.cache_teacher import cache_teacher
    from dhkd_pipe.store import writer as store_writer
    from dhkd_pipe.store.reader import LogitCache

    cache_teacher(_config(jpegs, tmp_path / "straight.zarr"), log=lambda *a: None)
    real, calls = store_writer.write_unit, []

    def write_then_stop(cache, *a, **k):
        real(cache, *a, **k)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(store_writer, "write_unit", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(_config(jpegs, tmp_path / "resumed.zarr"), log=lambda *a: None)
    monkeypatch.undo()
    done = LogitCache.open(str(tmp_path / "resumed.zarr")).done_mask()
    assert 5 <= done.sum() < done.size
    again = cache_teacher(_config(jpegs, tmp_path / "resumed.zarr"), log=lambda *a: None)
    rows_done = sum(min(4, 27 - 4 * c) for e, c in zip(*np.nonzero(done), strict=True))
    assert again["images"] == 27 * 3 - rows_done  # only the units not written
    a, b = _arrays(tmp_path / "straight.zarr"), _arrays(tmp_path / "resumed.zarr")
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.slow
def test_two_processes_split_the_groups_and_write_the_same_store(jpegs, tmp_path):
    from conftest import accelerate_launch as accelerate

    from dhkd_pipe.stages.cache_teacher import cache_teacher

    cache_teacher(_config(jpegs, tmp_path / "one.zarr"), log=lambda *a: None)
    root, weights = jpegs
    # DALI without worker processes in the ranks (--workers 0): the split between ranks is the subject
    accelerate(
        "cache-teacher",
        "--model",
        "resnet8",
        "--weights",
        weights,
        "--data",
        f"imagefolder:{root}",
        "--views",
        3,
        "--resolution",
        32,
        "--batch-size",
        8,
        "--chunk-rows",
        4,
        "--codec",
        "fp32",
        "--workers",
        0,
        "--out",
        tmp_path / "two.zarr",
    )
    a, b = _arrays(tmp_path / "one.zarr"), _arrays(tmp_path / "two.zarr")
    for name in a:
        assert np.array_equal(a[name], b[name]), name
