"""The view plan: counter-based, torchvision's semantics, independent of how samples are visited."""

import math

import numpy as np
import pytest

from dhkd_pipe.data.views import ViewPlan, center_boxes, uniform, validation_views
from dhkd_pipe.errors import DhkdError


def test_uniform_is_a_pure_function_of_its_key():
    idx = np.arange(1000)
    a = uniform(3, 2, idx, 1)
    assert np.array_equal(a, uniform(3, 2, idx, 1))
    assert np.array_equal(a[::-1], uniform(3, 2, idx[::-1], 1))
    for other in (uniform(4, 2, idx, 1), uniform(3, 1, idx, 1), uniform(3, 2, idx, 2)):
        assert np.mean(a == other) < 0.01
    assert 0 <= a.min() and a.max() < 1
    assert abs(a.mean() - 0.5) < 0.03  # 1000 draws: the mean of U(0,1) within ~3.3 sigma


@pytest.mark.parametrize("policy", ["pad_crop_flip", "random_resized_crop_flip"])
def test_views_do_not_depend_on_batching_or_order(policy):
    plan = ViewPlan(seed=7, policy=policy, resolution=32 if policy == "pad_crop_flip" else 224)
    n = 500
    sizes = (
        np.stack([np.full(n, 32), np.full(n, 32)], 1)
        if policy == "pad_crop_flip"
        else np.stack([300 + np.arange(n) % 97, 400 + np.arange(n) % 53], 1)
    )
    whole = plan.views(1, np.arange(n), sizes)
    perm = np.random.default_rng(0).permutation(n)
    shuffled = plan.views(1, perm, sizes[perm])
    assert np.array_equal(whole[perm], shuffled)
    # any batch size, any split across processes: the pieces are the whole
    for batch in (1, 7, 64):
        pieces = [plan.views(1, np.arange(s, min(s + batch, n)), sizes[s : s + batch]) for s in range(0, n, batch)]
        assert np.array_equal(np.concatenate(pieces), whole)
    assert not np.array_equal(plan.views(2, np.arange(n), sizes), whole)


def test_pad_crop_matches_randomcrop_range_and_flips_half():
    plan = ViewPlan(seed=0, policy="pad_crop_flip", resolution=32, padding=4)
    v = plan.views(0, np.arange(20000), np.full((20000, 2), 32))
    assert set(np.unique(v[:, 0])) == set(range(-4, 5)) == set(np.unique(v[:, 1]))
    assert (v[:, 2] == 32).all() and (v[:, 3] == 32).all()
    assert abs(v[:, 4].mean() - 0.5) < 0.02


def test_random_resized_crop_respects_scale_ratio_and_bounds():
    plan = ViewPlan(seed=1, policy="random_resized_crop_flip", resolution=224)
    sizes = np.tile([[375, 500]], (5000, 1))
    v = plan.views(0, np.arange(5000), sizes).astype(np.int64)
    y, x, h, w = v[:, 0], v[:, 1], v[:, 2], v[:, 3]
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= 375).all() and (x + w <= 500).all()
    area = h * w / (375 * 500)
    assert area.min() >= 0.08 * 0.95 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() >= 3 / 4 * 0.97 and ratio.max() <= 4 / 3 * 1.03  # rounding to whole pixels
    assert np.log(ratio).std() > 0.1 and area.std() > 0.1  # really random, not a fixed box


def test_random_resized_crop_falls_back_to_torchvision_centre_crop():
    # a 10x3000 strip: no random box of ratio <= 4/3 fits, torchvision takes the centred 10x13 box
    assert center_boxes(np.array([[10, 3000]])).tolist() == [[0, 1493, 10, 13]]
    plan = ViewPlan(seed=0, policy="random_resized_crop_flip", resolution=224)
    assert plan.views(0, [0], [[10, 3000]])[0, :4].tolist() == [0, 1493, 10, 13]


def test_order_is_a_seeded_permutation():
    plan = ViewPlan(seed=5)
    a = plan.order(0, 1000)
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, ViewPlan(seed=5).order(0, 1000))
    assert not np.array_equal(a, plan.order(1, 1000))


def test_validation_views_centre_crop():
    v = validation_views(np.array([[256, 320]]), 224, "random_resized_crop_flip")[0]
    assert v.tolist() == [16, 48, 224, 224, 0]
    assert validation_views(np.array([[32, 32]]), 32, "pad_crop_flip")[0].tolist() == [0, 0, 32, 32, 0]


def test_plan_round_trips_and_rejects_bad_policies():
    plan = ViewPlan(seed=3, policy="random_resized_crop_flip", resolution=160)
    assert ViewPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(DhkdError, match="unknown augmentation policy"):
        ViewPlan(policy="mixup")
    assert math.isclose(plan.ratio[1], 4 / 3)
