"""The Python API (``import dhkd_pipe``): the store's replay equals stage 2's loader, the loss
modules equal the methods the CLI trains with, the dual head comes off for export, and importing
the package stays torch-free."""

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import built_once, write_digits_store

import dhkd_pipe
from dhkd_pipe.config import CacheConfig, TrainConfig
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.methods.registry import METHODS, from_config
from dhkd_pipe.stages.cache_teacher import cache_teacher

QUIET = dict(log=lambda *a: None)


@pytest.fixture
def store(quick_store):
    """The session's digits store (2 views of 1437 images in chunks of 256, a random resnet8's logits)."""
    return str(quick_store)


@pytest.fixture(scope="session")
def int8_store(tmp_path_factory, random_teacher):
    """The same store with int8 logits and their per-row scales."""
    return str(
        built_once(
            tmp_path_factory,
            "quick-store-int8",
            lambda d: write_digits_store(random_teacher, d / "logits.zarr", codec="int8"),
        )
        / "logits.zarr"
    )


def test_import_is_light_and_every_public_name_resolves():
    code = "import sys, dhkd_pipe; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in dhkd_pipe.__all__:
        assert getattr(dhkd_pipe, name) is not None, name
    assert set(dhkd_pipe.__all__) <= set(dir(dhkd_pipe))
    with pytest.raises(AttributeError):
        dhkd_pipe.no_such_name  # noqa: B018


def _same_batches(a, b):
    n = 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.teacher, y.teacher)
        assert (x.teacher_scale is None) == (y.teacher_scale is None)
        if x.teacher_scale is not None:
            assert torch.equal(x.teacher_scale, y.teacher_scale)
        n += 1
    return n


@pytest.mark.parametrize("codec_store", ["store", "int8_store"])
def test_replay_equals_what_stage_2_trains_on(codec_store, request, tmp_path):
    from dhkd_pipe.training.run import prepare

    location = request.getfixturevalue(codec_store)
    run = prepare(
        TrainConfig(
            cache=location, model="resnet8", method="dhkd", epochs=3, batch_size=64, out=str(tmp_path / "run")
        ).validate()
    )
    try:
        loader = dhkd_pipe.open_store(location).loader(64, device="cpu")
        assert len(loader) == len(run.loader) == -(-1437 // 64)
        for epoch in range(3):  # epoch 2 replays view-epoch 0
            assert _same_batches(run.loader.epoch(epoch), loader.epoch(epoch)) == len(loader)
        assert _same_batches(run.loader.epoch(1, 5), loader.epoch(1, 5)) == len(loader) - 5  # a resumed epoch
    finally:
        run.close()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_slot_replays_its_chunks_as_recorded(store, rank):
    """Rank r of 2 gets chunks r, r+2, ... of each epoch: the recorded order's labels, the recorded
    views' pixels, the stored logits row for row (checked against the store itself)."""
    replay = dhkd_pipe.open_store(store)
    loader = replay.loader(64, device="cpu", rank=rank, world_size=2)
    cache, c = replay.cache, replay.cache.chunk_rows
    renderer = replay.data.renderer("cpu", replay.plan)
    for epoch in (0, 3):
        e = epoch % cache.epochs
        positions = np.concatenate(
            [np.arange(k * c, min((k + 1) * c, cache.num_samples)) for k in range(rank, cache.num_chunks, 2)]
        )
        positions = positions[: len(loader) * 64]
        indices, views = cache.read_order(e)[positions], cache.read_views(e)[positions]
        stored = torch.cat([cache.read_rows(e, k) for k in range(rank, cache.num_chunks, 2)])[: len(positions)]
        got = list(loader.epoch(epoch))
        images, labels, teacher = (torch.cat(parts) for parts in zip(*got, strict=True))
        assert torch.equal(labels, torch.as_tensor(cache.labels[indices]).long())
        assert torch.equal(labels, replay.data.train_labels[torch.as_tensor(indices)])
        assert torch.equal(teacher, stored.float())
        assert torch.equal(images, renderer.train(indices, views))


def test_the_first_batch_reads_only_its_own_part_of_the_schedule(store, monkeypatch):
    """The order and views stream a write unit at a time: the first batch reads its unit's (and the
    next one, read ahead), never a whole epoch's; the epoch still replays whole, as recorded."""
    replay = dhkd_pipe.open_store(store)
    cache, reads = replay.cache, []
    real = cache.read
    monkeypatch.setattr(
        cache, "read", lambda name, selection, *a: reads.append((name, selection)) or real(name, selection, *a)
    )
    assert cache.num_chunks // cache.shard_chunks > 2
    batches = replay.loader(64, device="cpu").epoch(0)
    next(batches)
    first = [selection for name, selection in reads if name == "order"]
    assert 1 <= len(first) <= 2 and all(isinstance(selection[1], slice) for selection in first)
    rest = list(batches)
    assert len(rest) == -(-cache.num_samples // 64) - 1
    assert len([name for name, _ in reads if name == "order"]) == -(-cache.num_chunks // cache.shard_chunks)


def test_iterable_dataset_form(store):
    replay = dhkd_pipe.open_store(store)
    data = replay.dataset(100, epoch=1, device="cpu")
    batches = list(torch.utils.data.DataLoader(data, batch_size=None))
    assert len(batches) == len(data) == len(replay.loader(100, device="cpu"))
    for (images, labels, teacher), want in zip(batches, replay.loader(100, device="cpu").epoch(1), strict=True):
        assert (
            torch.equal(images, want.images)
            and torch.equal(labels, want.labels)
            and torch.equal(teacher, want.teacher.float())
        )


def test_open_store_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(DhkdError):
        dhkd_pipe.open_store(str(tmp_path / "missing.zarr"))
    with pytest.raises(DhkdError):
        dhkd_pipe.open_store(str(tmp_path), data="digits")
    with pytest.raises(DhkdError, match="process slot"):
        from dhkd_pipe.data.replay import process_slot

        process_slot(2, 2)


def _inputs(method, seed=0, b=16, k=10):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, generator=g) * 3
    student = (s.clone().requires_grad_(), (s * 0.5).requires_grad_()) if method.dual_head else s.requires_grad_()
    teacher = (torch.randn(b, k, generator=g) * 3).half()
    labels = torch.randint(0, k, (b,), generator=g)
    return student, labels, teacher


def _grads(student):
    return [t.grad.clone() for t in (student if isinstance(student, tuple) else (student,))]


LOGIT_METHODS = sorted(name for name, cls in METHODS.items() if not getattr(cls, "needs_features", False))


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_loss_modules_are_the_cli_methods(name):
    cli_method = from_config(TrainConfig(data="digits", method=name))  # the CLI's defaults and backend
    module = dhkd_pipe.create_loss(name)
    assert isinstance(module, torch.nn.Module) and module.method == cli_method
    assert list(module.parameters()) == []
    for epoch in (0, 3):
        student, labels, teacher = _inputs(cli_method, epoch)
        want = cli_method.terms(student, labels, teacher, None, epoch)
        want["total"].backward()
        want_grads = _grads(student)
        student, labels, teacher = _inputs(cli_method, epoch)
        got = module.terms(student, labels, teacher, epoch=epoch)
        assert got.keys() == want.keys()
        for key in got:
            assert torch.equal(got[key], want[key]), key
        student, labels, teacher = _inputs(cli_method, epoch)
        module(student, labels, teacher, epoch=epoch).backward()
        for a, b in zip(_grads(student), want_grads, strict=True):
            assert torch.equal(a, b)


def test_named_loss_classes_and_options():
    assert dhkd_pipe.DHKDLoss().method == METHODS["dhkd"]()
    assert dhkd_pipe.KDLoss(temperature=2.0).method.temperature == 2.0
    assert dhkd_pipe.BinaryKLLoss().method.name == "binary_kl" and dhkd_pipe.DKDLoss().method.beta == 8.0
    assert dhkd_pipe.DHKDLoss().dual_head and not dhkd_pipe.KDLoss().dual_head
    with pytest.raises(TypeError):
        dhkd_pipe.KDLoss(beta=1.0)  # kd takes no beta
    with pytest.raises(DhkdError):
        dhkd_pipe.create_loss("no_such_method")
    for name in set(METHODS) - set(LOGIT_METHODS):  # the feature methods need the teacher's features
        with pytest.raises(DhkdError, match="intermediate features"):
            dhkd_pipe.create_loss(name)
    with pytest.raises(DhkdError):
        dhkd_pipe.DHKDLoss(kd_loss="nope")


def test_loss_module_int8_teacher_and_backend_dispatch():
    """The int8 path (a teacher with its scale) and the forced Triton backend (the interpreter on the
    CPU) give the method's values: the module adds no dispatch of its own."""
    from dhkd_pipe.kernels import triton_available
    from dhkd_pipe.methods.losses import dhkd_terms

    student, labels, _ = _inputs(METHODS["dhkd"])
    q = torch.randint(-127, 128, (16, 10), dtype=torch.int8)
    scale = torch.rand(16) * 0.1
    got = dhkd_pipe.DHKDLoss().terms(student, labels, q, scale)
    ce, kd = dhkd_terms(
        *student, q, labels, temperature=2.0, alpha=1.0, gamma=1.0, kd_loss="binary_kl_norm", teacher_scale=scale
    )
    assert torch.equal(got["ce"], ce) and torch.equal(got["kd"], kd)
    if triton_available():
        fused = dhkd_pipe.DHKDLoss(backend="triton").terms(student, labels, q, scale)
        want = METHODS["dhkd"](backend="triton").terms(student, labels, q, scale)
        assert torch.equal(fused["total"], want["total"])
        assert torch.allclose(fused["total"], got["total"], rtol=1e-5, atol=1e-6)


def test_dual_head_wraps_any_classifier_and_comes_off_for_export():
    torch.manual_seed(0)
    plain = dhkd_pipe.create_model("resnet8", 10)
    wrapped = dhkd_pipe.DualHead(plain)
    x = torch.randn(2, 3, 32, 32)
    head1, head2 = wrapped(x)
    exported = dhkd_pipe.single_head(wrapped)
    assert not isinstance(exported, dhkd_pipe.DualHead)
    assert torch.equal(exported.eval()(x), wrapped.eval()(x)[0])
    assert exported.state_dict().keys() == dhkd_pipe.create_model("resnet8", 10).state_dict().keys()
    assert dhkd_pipe.single_head(exported) is exported
    seq = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    assert [t.shape for t in dhkd_pipe.DualHead(seq)(torch.randn(3, 12))] == [(3, 4), (3, 4)]
    assert "resnet8" in dhkd_pipe.list_models()


@pytest.mark.slow
def test_replay_under_dali_equals_what_stage_2_trains_on(tmp_path, digit_jpegs, random_teacher3):
    """An image folder's store: the API's DALI batches (CPU decoding here) are the engine's."""
    pytest.importorskip("nvidia.dali")
    from dhkd_pipe.training.run import prepare

    store = str(tmp_path / "logits.zarr")
    cache_teacher(
        CacheConfig(
            data=f"imagefolder:{digit_jpegs}",
            model="resnet8",
            weights=str(random_teacher3),
            views=2,
            resolution=32,
            batch_size=8,
            chunk_rows=8,
            workers=1,
            out=store,
        ).validate(),
        **QUIET,
    )
    run = prepare(
        TrainConfig(
            cache=store, model="resnet8", method="dhkd", epochs=1, batch_size=8, workers=1, out=str(tmp_path / "run")
        ).validate()
    )
    try:
        loader = dhkd_pipe.open_store(store).loader(8, device="cpu", workers=1)
        for epoch in (0, 1):
            assert _same_batches(run.loader.epoch(epoch), loader.epoch(epoch)) == len(loader) == 3
        images, labels, teacher = next(iter(loader.epoch(1)))
        assert images.shape == (8, 3, 32, 32) and teacher.dtype == torch.float32
    finally:
        run.close()


# ---- the API refuses what the CLI refuses: each argument checked where its value is owned ----------------


def _batch(b=8, k=10, dual=False, labels=None, teacher=None):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(b, k, generator=g)
    student = (s, s * 0.5) if dual else s
    y = torch.randint(0, k, (b,), generator=g) if labels is None else labels
    t = torch.randn(b, k, generator=g) if teacher is None else teacher
    return student, y, t


def _call(loss, **batch):
    return lambda: loss(*_batch(**batch))


def _loader(store, batch_size=64, **kw):
    return lambda: dhkd_pipe.open_store(store).loader(batch_size, **{"device": "cpu", "workers": 0, **kw})


def _epoch(store, epoch, **kw):
    loader = dhkd_pipe.open_store(store).loader(256, device="cpu", workers=0)
    return lambda: loader.epoch(epoch, **kw)


# (id, what to call: () -> ..., or (store) -> () -> ... for the loader, exception type, message)
API_CASES = [
    # method options: the ranges option_ranges declares, finite, of their type
    (
        "temperature-nan",
        lambda: dhkd_pipe.create_loss("kd", temperature=float("nan")),
        ValueError,
        "bad temperature nan .*finite",
    ),
    ("temperature-zero", lambda: dhkd_pipe.KDLoss(temperature=0), ValueError, "bad temperature 0 .*at least 0.0001"),
    ("temperature-negative", lambda: dhkd_pipe.DHKDLoss(temperature=-2.0), ValueError, "bad temperature -2"),
    ("alpha-negative-flips-the-sign", lambda: dhkd_pipe.DHKDLoss(alpha=-1.0), ValueError, "bad alpha -1 .*at least 0"),
    (
        "temperature-tiny-kills-the-kd-term",
        lambda: dhkd_pipe.KDLoss(temperature=1e-30),
        ValueError,
        "bad temperature 1e-30",
    ),
    ("temperature-huge-gives-nan", lambda: dhkd_pipe.DKDLoss(temperature=1e30), ValueError, "at most 10000"),
    (
        "alpha-overflows-float32",
        lambda: dhkd_pipe.DISTLoss(alpha=1e39),
        ValueError,
        "bad alpha 1e\\+39 .*at most 1e\\+06",
    ),
    ("beta-infinite", lambda: dhkd_pipe.DKDLoss(beta=float("inf")), ValueError, "bad beta inf .*finite"),
    ("gamma-nan", lambda: dhkd_pipe.CELoss(gamma=float("nan")), ValueError, "bad gamma nan"),
    ("gamma-numpy-nan", lambda: dhkd_pipe.KDLoss(gamma=np.float32("nan")), ValueError, "bad gamma nan"),
    (
        "temperature-a-string",
        lambda: dhkd_pipe.DISTLoss(temperature="4"),
        TypeError,
        "temperature .*must be a number, not str",
    ),
    ("alpha-a-bool", lambda: dhkd_pipe.KDLoss(alpha=True), TypeError, "alpha .*must be a number, not bool"),
    ("alpha-a-tensor", lambda: dhkd_pipe.KDLoss(alpha=torch.tensor(0.5)), TypeError, "alpha .*not Tensor"),
    ("warmup-fractional", lambda: dhkd_pipe.DKDLoss(warmup_epochs=2.5), TypeError, "warmup_epochs .*an integer"),
    ("warmup-negative", lambda: dhkd_pipe.DKDLoss(warmup_epochs=-1), ValueError, "bad warmup_epochs -1"),
    ("kd-stop-negative", lambda: dhkd_pipe.KDLoss(kd_stop_epoch=-3), ValueError, "bad kd_stop_epoch -3"),
    ("backend-unknown", lambda: dhkd_pipe.create_loss("kd", backend="cuda"), ValueError, "bad backend 'cuda'"),
    ("kd-loss-unknown", lambda: dhkd_pipe.DHKDLoss(kd_loss="mse"), ValueError, "unknown kd_loss 'mse'"),
    ("method-unknown", lambda: dhkd_pipe.create_loss("no_such_method"), ValueError, "unknown method"),
    # batches: one head or two, integer labels, one shape, not empty
    ("dhkd-given-one-head", _call(dhkd_pipe.DHKDLoss()), TypeError, "student: .*pair \\(head 1, head 2\\)"),
    ("dhkd-given-a-2-row-tensor", lambda: dhkd_pipe.DHKDLoss()(*_batch(b=2)), TypeError, "pair \\(head 1, head 2\\)"),
    ("kd-given-two-heads", _call(dhkd_pipe.KDLoss(), dual=True), TypeError, "one tensor of logits"),
    (
        "heads-of-two-shapes",
        lambda: dhkd_pipe.DHKDLoss()(
            (torch.randn(4, 10), torch.randn(4, 9)), torch.zeros(4, dtype=torch.long), torch.randn(4, 10)
        ),
        ValueError,
        "one shape for both heads",
    ),
    ("empty-batch", _call(dhkd_pipe.KDLoss(), b=0), ValueError, "empty batch"),
    (
        "float-labels",
        _call(dhkd_pipe.KDLoss(), labels=torch.tensor([1.7] * 8)),
        TypeError,
        "labels: .*integer class indices",
    ),
    (
        "labels-of-another-shape",
        _call(dhkd_pipe.KDLoss(), labels=torch.zeros(8, 1, dtype=torch.long)),
        ValueError,
        "labels: must be \\(8,\\)",
    ),
    (
        "label-beyond-the-classes",
        _call(dhkd_pipe.CELoss(), labels=torch.full((8,), 10)),
        ValueError,
        "class 10 is outside 0..9",
    ),
    (
        "label-negative",
        _call(dhkd_pipe.DHKDLoss(), dual=True, labels=torch.full((8,), -1)),
        ValueError,
        "class -1 is outside",
    ),
    ("labels-a-list", _call(dhkd_pipe.KDLoss(), labels=[0] * 8), TypeError, "labels: .*not list"),
    (
        "teacher-of-other-classes",
        _call(dhkd_pipe.KDLoss(), teacher=torch.randn(8, 11)),
        ValueError,
        "teacher: .*\\(8, 10\\)",
    ),
    (
        "teacher-missing",
        lambda: dhkd_pipe.KDLoss()(torch.randn(4, 10), torch.zeros(4, dtype=torch.long)),
        ValueError,
        "teacher: --method kd needs",
    ),
    (
        "int8-teacher-without-scale",
        _call(dhkd_pipe.KDLoss(), teacher=torch.zeros(8, 10, dtype=torch.int8)),
        ValueError,
        "teacher_scale",
    ),
    (
        "integer-student",
        lambda: dhkd_pipe.KDLoss()(
            torch.zeros(4, 10, dtype=torch.long), torch.zeros(4, dtype=torch.long), torch.randn(4, 10)
        ),
        TypeError,
        "student: logits must be a float tensor",
    ),
    (
        "one-dimensional-student",
        lambda: dhkd_pipe.KDLoss()(torch.randn(10), torch.zeros(10, dtype=torch.long), torch.randn(10)),
        ValueError,
        "must be \\(B, K\\)",
    ),
    (
        "epoch-negative-flips-the-warm-up",
        lambda: dhkd_pipe.DKDLoss().terms(*_batch(), epoch=-5),
        ValueError,
        "bad epoch -5: must be at least 0",
    ),
    (
        "epoch-fractional",
        lambda: dhkd_pipe.DKDLoss().terms(*_batch(), epoch=2.5),
        TypeError,
        "epoch must be an integer",
    ),
    # the loader: batch size and process slot
    ("loader-batch-size-zero", lambda s: _loader(s, batch_size=0), ValueError, "bad batch_size 0: must be at least 1"),
    ("loader-batch-size-negative", lambda s: _loader(s, batch_size=-8), ValueError, "bad batch_size -8"),
    ("loader-batch-size-fractional", lambda s: _loader(s, batch_size=2.5), TypeError, "batch_size must be an integer"),
    (
        "loader-batch-size-huge",
        lambda s: _loader(s, batch_size=1 << 40),
        ValueError,
        "bad batch_size 1099511627776: must be at most",
    ),
    ("loader-rank-beyond-world", lambda s: _loader(s, rank=2, world_size=2), ValueError, "rank 2 of world_size 2"),
    ("loader-world-size-zero", lambda s: _loader(s, rank=0, world_size=0), ValueError, "world_size 0"),
    ("loader-rank-negative", lambda s: _loader(s, rank=-1, world_size=2), ValueError, "rank -1"),
    ("loader-epoch-negative", lambda s: _epoch(s, -1), ValueError, "bad epoch -1: must be at least 0"),
    ("loader-epoch-fractional", lambda s: _epoch(s, 2.5), TypeError, "epoch must be an integer, not float"),
    ("loader-epoch-a-string", lambda s: _epoch(s, "1"), TypeError, "epoch must be an integer, not str"),
    (
        "loader-skip-negative",
        lambda s: _epoch(s, 0, skip_steps=-3),
        ValueError,
        "bad skip_steps -3: must be at least 0",
    ),
    (
        "loader-skip-past-the-epoch",
        lambda s: _epoch(s, 0, skip_steps=10**6),
        ValueError,
        "bad skip_steps 1000000: must be at most",
    ),
    ("loader-workers-negative", lambda s: _loader(s, workers=-1), ValueError, "bad workers -1: must be at least 0"),
    (
        "loader-workers-huge",
        lambda s: _loader(s, workers=10**6),
        ValueError,
        "bad workers 1000000: must be at most 1024",
    ),
    ("loader-device-unknown", lambda s: _loader(s, device="gpu0"), ValueError, "bad device 'gpu0'"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_the_api_refuses_what_the_cli_refuses(case, request):
    """Each bad argument is a ValueError or TypeError naming it, raised at once (no work done first)."""
    _, make, exc, message = case
    call = make(request.getfixturevalue("store")) if case[0].startswith("loader-") else make
    began = time.perf_counter()
    with pytest.raises(exc, match=message) as info:
        call()
    assert time.perf_counter() - began < 5
    assert isinstance(info.value, DhkdError), "the CLI prints it as one line"
