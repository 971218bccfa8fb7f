"""The logit store: codecs, write units and done flags, resume, sharding, concurrency, errors."""

import errno
import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from dhkd_pipe.errors import DhkdError
from dhkd_pipe.store.chunk_objects import ObjectEncoder
from dhkd_pipe.store.codecs import (
    BF16_RELATIVE_ERROR,
    CODECS,
    FP16_RELATIVE_ERROR,
    codec_named,
    codec_tolerance,
    decode_logits,
    encode_logits,
)
from dhkd_pipe.store.layout import estimate_bytes
from dhkd_pipe.store.reader import LogitCache
from dhkd_pipe.store.writer import create_or_resume, write_unit

E, N, K, C = 2, 300, 10, 64  # 5 chunks per epoch, the last one short


def fake_logits(epochs=E, n=N, k=K, seed=0):
    """Realistic-ish logits: normal * 5, a few large outliers, one all-zero row."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((epochs, n, k)) * 5).astype(np.float32)
    x[:, ::37, 0] = 60.0
    x[:, 5, 3] = -80.0
    x[:, 7] = 0.0
    return x


def fake_order(e, n=N):
    return np.random.default_rng(100 + e).permutation(n)


def fake_views(e, n=N):
    return np.random.default_rng(200 + e).integers(-4, 40, size=(n, 5)).astype(np.int32)


def command(**kw):
    return {"teacher": "resnet8", "views": E, "seed": 0, **kw}


def attrs(**kw):
    return {
        "teacher": {"arch": "resnet8", "weights_digest": "0123456789abcdef", "val_top1": None},
        "dataset": {"kind": "digits", "num_samples": N, "num_classes": K, "digest": "abc"},
        "policy": {"policy": "pad_crop_flip", "seed": 0, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3]},
        "seed": 0,
        "tool_version": "0.test",
        "command": command(**kw),
    }


def create(path, codec="fp16", n=N, k=K, **kw):
    recorded = kw.pop("attrs", attrs())
    if "dataset" in recorded:  # the data set's counts are the arrays'
        recorded = {**recorded, "dataset": {**recorded["dataset"], "num_samples": n, "num_classes": k}}
    return create_or_resume(
        str(path),
        epochs=E,
        num_samples=n,
        num_classes=k,
        chunk_rows=C,
        labels=np.arange(n) % k,
        codec=codec,
        attrs=recorded,
        **kw,
    )


def write(cache, x, units=None):
    for e, chunks in cache.write_units() if units is None else units:
        a, b = cache.rows(chunks[0])[0], cache.rows(chunks[-1])[1]
        write_unit(
            cache, e, chunks[0], x[e, a:b], fake_order(e, cache.num_samples)[a:b], fake_views(e, cache.num_samples)[a:b]
        )


def read_all(path):
    c = LogitCache.open(str(path))
    return (
        np.stack([np.concatenate([c.read_chunk(e, k)[0] for k in range(c.num_chunks)]) for e in range(c.epochs)]),
        np.stack([c.read_order(e) for e in range(c.epochs)]),
        np.stack([c.read_views(e) for e in range(c.epochs)]),
    )


def files(path):
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_within_codec_tolerance(tmp_path, codec):
    x = fake_logits()
    c = create(tmp_path / "s.zarr", codec)
    write(c, x)
    c = LogitCache.open(str(tmp_path / "s.zarr"))
    assert (c.epochs, c.num_samples, c.num_classes, c.chunk_rows, c.num_chunks, c.codec) == (E, N, K, C, 5, codec)
    assert c.labels.dtype == np.int64 and np.array_equal(c.labels, np.arange(N) % K)
    c.check_complete()
    for e in range(E):
        got = torch.cat([c.read_rows(e, k) for k in range(c.num_chunks)])
        assert got.dtype == torch.float32 and got.shape == (N, K)
        tol = codec_tolerance(codec, torch.from_numpy(x[e]))
        assert float((got - torch.from_numpy(x[e])).abs().max()) <= tol
        assert np.array_equal(c.read_order(e), fake_order(e)) and c.read_order(e).dtype == np.int64
        assert np.array_equal(c.read_views(e), fake_views(e)) and c.read_views(e).dtype == np.int32
    values, scale = c.read_chunk_tensors(1, 4)
    expect = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8}[codec]
    assert values.dtype == expect and values.shape == (N - 4 * C, K)
    assert (scale is None) == (codec != "int8")
    if scale is not None:
        assert scale.dtype == torch.float32 and scale.shape == (N - 4 * C,)
        _, scale0 = c.read_chunk(0, 0)
        assert scale0[7] == 1.0  # the all-zero row
    rows = np.array([3, 0, 7])
    assert torch.equal(c.read_rows(0, 1, rows), c.read_rows(0, 1)[rows])


def test_codec_tolerance_values():
    x = torch.tensor([[1.0, -8.0], [0.0, 2.0]])
    assert codec_tolerance("fp32", x) == 0
    assert codec_tolerance("fp16", x) == pytest.approx(8 * 2**-11, rel=1e-3)
    assert codec_tolerance("bf16", x) == pytest.approx(8 * 2**-8)
    assert codec_tolerance("int8", x) == pytest.approx(8 / 254, rel=1e-4)
    with pytest.raises(DhkdError):
        codec_tolerance("fp8", x)


def test_fp16_encoding_rounds_like_numpy_bit_for_bit():
    """The fp16 codec converts with torch (fast); its bits must be numpy's round-to-nearest-even,
    the rounding older stores were written with: a stride over every finite fp16 magnitude,
    subnormals included, and the exact ties between neighbouring fp16 values."""
    from dhkd_pipe.store.codecs import FP16_MAX, encode_logits

    bits = np.arange(0x33000000, 0x477FE000, 977, dtype=np.uint32)  # 2^-25 .. 65504
    x = bits.view(np.float32)
    h = np.arange(1, 0x7BFF, dtype=np.uint16)  # ties: the midpoints between fp16 neighbours, exact in float32
    ties = (h.view(np.float16).astype(np.float32) + (h + 1).view(np.float16).astype(np.float32)) / 2
    x = np.concatenate([x, -x, ties, -ties, [0.0, -0.0, FP16_MAX]]).astype(np.float32)
    x = np.resize(x, (len(x) // 1000 + 1) * 1000).reshape(-1, 1000)
    values, scale = encode_logits(x, "fp16")
    assert scale is None and values.dtype == np.float16
    assert np.array_equal(values.view(np.uint16), x.astype(np.float16).view(np.uint16))


def test_fp16_refuses_exactly_the_rows_out_of_its_range():
    """The fp16 codec checks its halves, not the float32 rows, unless a half reaches 65504: what it
    refuses, and the message, must still be exactly what the published check says (a value not
    finite, or |x| > 65504), at the edge of the range and on either side of it."""
    from dhkd_pipe.store.codecs import FP16_MAX, encode_logits

    below = np.nextafter(np.float32(FP16_MAX), np.float32(0))
    above = np.nextafter(np.float32(FP16_MAX), np.float32(np.inf))  # rounds to 65504 in fp16: refused all the same
    values = (below, FP16_MAX, above, 65519.996, 65520.0, 1e30, np.inf, np.nan)
    for value, sign, others in [(v, s, o) for v in values for s in (1, -1) for o in ("mixed", "negative", "positive")]:
        x = fake_logits(1, 10, 50)[0]
        x = {"mixed": x, "negative": -np.abs(x) - 1, "positive": np.abs(x) + 1}[others]  # the rest of the rows' signs
        x[2, 17] = sign * np.float32(value)
        refused = not np.isfinite(x).all() or np.abs(x).max() > FP16_MAX  # the rule, from its statement
        if refused:
            kind = (
                "exceed the fp16 range"
                if np.isfinite(x).all()
                else ("NaN" if np.isnan(x).any() else "infinite") + " in row 2 of the unit"
            )
            with pytest.raises(DhkdError, match=kind):
                encode_logits(x, "fp16")
        else:
            values, _ = encode_logits(x, "fp16")
            assert np.array_equal(values.view(np.uint16), x.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_rows_encoded_ahead_are_written_as_is_and_must_match_the_codec(tmp_path, codec):
    from dhkd_pipe.store.codecs import EncodedRows, encode_logits
    from dhkd_pipe.store.writer import write_unit

    x = fake_logits()
    ahead, plain = create(tmp_path / "a.zarr", codec=codec), create(tmp_path / "b.zarr", codec=codec)
    a, b = ahead.rows(0)
    order, views = np.arange(a, b), np.zeros((b - a, 5), np.int32)
    write_unit(ahead, 0, 0, EncodedRows(*encode_logits(x[0, a:b], codec)), order, views)
    write_unit(plain, 0, 0, x[0, a:b], order, views)
    assert np.array_equal(ahead.read_chunk(0, 0)[0], plain.read_chunk(0, 0)[0])
    if codec == "int8":
        assert np.array_equal(ahead.read_chunk(0, 0)[1], plain.read_chunk(0, 0)[1])
    wrong = (
        EncodedRows(x[0, a:b]) if codec == "fp16" else EncodedRows(encode_logits(x[0, a:b], codec)[0])
    )  # float32; int8 without its scale
    with pytest.raises(ValueError, match=f"for a {codec} store"):
        write_unit(ahead, 0, 1, wrong, order, views)


def test_done_is_set_only_after_the_data(tmp_path):
    x = fake_logits()
    c = create(tmp_path / "s.zarr")
    assert c.write_units() == [(e, [k]) for e in range(E) for k in range(5)]
    assert not c.done_mask().any() and c.done_mask().shape == (E, 5)
    # data written without the flags (a process killed between the two): still incomplete
    a, b = c.rows(2)
    c.array("logits")[1, a:b] = x[1, a:b].astype(np.float16)
    write(c, x, [u for u in c.write_units() if u != (1, [2])])
    with pytest.raises(DhkdError, match=r"incomplete: 1 of 10 chunks not written \(epochs 1\); re-run cache-teacher"):
        c.check_complete()
    write(c, x, [(1, [2])])
    c.check_complete()
    assert c.done_mask().all()


def test_resumed_store_is_byte_identical(tmp_path):
    x = fake_logits()
    write(create(tmp_path / "straight.zarr"), x)
    first = create(tmp_path / "resumed.zarr")
    units = first.write_units()
    write(first, x, units[:3])
    again = create(tmp_path / "resumed.zarr")  # same command: reopened, not recreated
    done = again.done_mask()
    assert done.sum() == 3
    write(again, x, [(e, ch) for e, ch in units if not done[e, ch].all()])
    a, b = files(tmp_path / "straight.zarr"), files(tmp_path / "resumed.zarr")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)


def test_sharded_store_round_trips(tmp_path):
    n, k = 1000, 16
    x = fake_logits(n=n, k=k)
    c = create(tmp_path / "s.zarr", "int8", n=n, k=k, attrs=attrs(), shard_threshold=8, shard_bytes=3 * C * k)
    assert c.num_chunks == 16 and c.shard_chunks == 3
    units = c.write_units()
    assert units[0] == (0, [0, 1, 2]) and units[5] == (0, [15]) and units[6] == (1, [0, 1, 2]) and len(units) == 12
    with pytest.raises(ValueError):
        write_unit(c, 0, 1, x[0, :C], fake_order(0, n)[:C], fake_views(0, n)[:C])
    write(c, x)
    c.check_complete()
    s = LogitCache.open(str(tmp_path / "s.zarr")).summary()
    assert s["chunks"] == [1, C, k] and s["shards"] == [1, 3 * C, k]
    # one object per shard, and done chunked per unit
    assert sorted(os.listdir(tmp_path / "s.zarr" / "logits" / "c" / "0")) == [str(i) for i in range(6)]
    assert len(os.listdir(tmp_path / "s.zarr" / "done" / "c" / "0")) == 6
    c = LogitCache.open(str(tmp_path / "s.zarr"))
    got = torch.cat([c.read_rows(1, j) for j in range(c.num_chunks)])
    assert float((got - torch.from_numpy(x[1])).abs().max()) <= codec_tolerance("int8", torch.from_numpy(x[1]))
    assert np.array_equal(c.read_order(1), fake_order(1, n))


def _writer_process(path, parity):
    c = LogitCache.open(path, mode="r+")
    x = fake_logits(n=1000, k=16)
    write(c, x, [u for i, u in enumerate(c.write_units()) if i % 2 == parity])


@pytest.mark.slow  # two spawned writer processes
def test_two_processes_write_what_one_process_writes(tmp_path):
    n, k = 1000, 16
    geometry = dict(n=n, k=k, attrs=attrs(), shard_threshold=8, shard_bytes=3 * C * k)
    write(create(tmp_path / "one.zarr", **geometry), fake_logits(n=n, k=k))
    create(tmp_path / "two.zarr", **geometry)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(str(tmp_path / "two.zarr"), p)) for p in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    LogitCache.open(str(tmp_path / "two.zarr")).check_complete()
    for a, b in zip(read_all(tmp_path / "one.zarr"), read_all(tmp_path / "two.zarr"), strict=True):
        assert np.array_equal(a, b)


def test_check_matches_names_the_field(tmp_path):
    c = create(tmp_path / "s.zarr")
    c.check_matches({"kind": "digits", "num_samples": N, "num_classes": K, "digest": "abc"})
    with pytest.raises(
        DhkdError, match="store does not match the data: num_classes is 10 in the store, 100 in the data"
    ):
        c.check_matches({"kind": "digits", "num_samples": N, "num_classes": 100, "digest": "xyz"})
    with pytest.raises(DhkdError, match="digest"):
        c.check_matches({"kind": "digits", "num_samples": N, "num_classes": K, "digest": "xyz"})


def test_a_resume_refuses_a_checkpoint_that_records_no_store(tmp_path):
    c = create(tmp_path / "s.zarr")
    c.check_same_store(c.identity)
    for recorded in (None, "s.zarr", ["s.zarr"]):
        with pytest.raises(DhkdError, match=r"^--resume: the checkpoint records no store, though this run reads"):
            c.check_same_store(recorded)


def test_missing_or_foreign_store(tmp_path):
    with pytest.raises(DhkdError, match="no logit store"):
        LogitCache.open(str(tmp_path / "nope.zarr"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hi")
    with pytest.raises(DhkdError, match="not a logit store"):
        LogitCache.open(str(tmp_path / "plain"))
    with pytest.raises(DhkdError, match="not a logit store"):
        create(tmp_path / "plain")
    c = create(tmp_path / "s.zarr")
    c.update_attrs(format_version=99)
    with pytest.raises(DhkdError, match="format version 99"):
        LogitCache.open(str(tmp_path / "s.zarr"))
    (tmp_path / "s.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(DhkdError, match="not a logit store"):
        LogitCache.open(str(tmp_path / "s.zarr"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DhkdError):
        create(tmp_path / "afile" / "s.zarr")  # unwritable: a file is in the way


def test_corrupt_chunk_names_the_chunk(tmp_path):
    c = create(tmp_path / "s.zarr")
    write(c, fake_logits())
    chunk_file = tmp_path / "s.zarr" / "logits" / "c" / "1" / "3" / "0"
    assert chunk_file.exists()
    chunk_file.write_bytes(b"\x02\x01garbage" * 5)
    c = LogitCache.open(str(tmp_path / "s.zarr"))
    c.read_chunk(1, 2)
    with pytest.raises(DhkdError, match=r"s\.zarr.*logits epoch 1 chunk 3"):
        c.read_chunk(1, 3)
    with pytest.raises(DhkdError, match="chunk 3"):
        c.read_rows(1, 3)


def test_summary(tmp_path):
    c = create(tmp_path / "s.zarr", "int8")
    write(c, fake_logits(), c.write_units()[:4])
    s = c.summary()
    json.dumps(s)
    assert s["shape"] == [E, N, K] and s["codec"] == "int8" and s["dtype"] == "int8"
    assert s["chunks"] == [1, C, K] and s["shards"] is None
    assert s["complete"] == "4/10" and s["format_version"] == 1 and s["tool_version"] == "0.test"
    assert s["teacher"]["arch"] == "resnet8" and s["dataset"]["kind"] == "digits" and s["seed"] == 0
    assert s["policy"]["policy"] == "pad_crop_flip"
    assert s["bytes_on_disk"] > 0 and 0 < s["bytes_per_logit"] < 4
    c.update_attrs(teacher={**c.attrs["teacher"], "val_top1": 91.5})
    assert LogitCache.open(str(tmp_path / "s.zarr")).attrs["teacher"]["val_top1"] == 91.5
    assert estimate_bytes(E, N, K, "fp16") > E * N * K * 2


def test_create_over_an_existing_store(tmp_path):
    path = tmp_path / "s.zarr"
    c = create(path)
    write(c, fake_logits(), c.write_units()[:2])
    with pytest.raises(DhkdError, match=r"a different store exists at .*s\.zarr \(views differs\); pass --overwrite"):
        create(path, attrs=attrs(views=3))
    with pytest.raises(DhkdError, match=r"\(codec differs\)"):
        create(path, codec="int8", attrs=attrs(codec="int8"))
    resumed = create(path)
    assert resumed.done_mask().sum() == 2
    fresh = create(path, attrs=attrs(views=3), overwrite=True)
    assert fresh.done_mask().sum() == 0 and fresh.attrs["command"]["views"] == 3


@pytest.mark.parametrize("codec", CODECS)
def test_elementwise_error_bounds(tmp_path, codec):
    """The documented per-element bounds: fp16 2^-11 and bf16 2^-8 relative, int8 max|row|/254."""
    x = fake_logits(epochs=1)
    c = create_or_resume(
        str(tmp_path / "s.zarr"),
        epochs=1,
        num_samples=N,
        num_classes=K,
        chunk_rows=C,
        labels=np.zeros(N),
        codec=codec,
        attrs=attrs(),
    )
    write(c, x)
    got = torch.cat([c.read_rows(0, k) for k in range(c.num_chunks)]).double().numpy()
    err, ref = np.abs(got - x[0]), np.abs(x[0]).astype(np.float64)
    if codec == "fp32":
        assert np.array_equal(got, x[0])
    elif codec in ("fp16", "bf16"):
        rel = FP16_RELATIVE_ERROR if codec == "fp16" else BF16_RELATIVE_ERROR
        normal = ref > 2.0**-14
        assert np.all(err[normal] <= rel * ref[normal]) and err[normal].max() > rel * ref[normal].max() / 64
    else:
        row_bound = ref.max(axis=1, keepdims=True) / 254 * (1 + 1e-6)
        assert np.all(err <= row_bound) and np.all(err[7] == 0)


@pytest.mark.parametrize("codec", CODECS)
def test_decode_logits_on_a_device(tmp_path, codec):
    x = fake_logits()
    c = create(tmp_path / "s.zarr", codec)
    write(c, x)
    values, scale = c.read_chunk(1, 2)
    stored = {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32, "int8": np.int8}[codec]
    assert isinstance(values, np.ndarray) and values.dtype == stored and values.shape == (C, K)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        got = decode_logits(values, scale, device)
        assert got.dtype == torch.float32 and got.device.type == device
        assert torch.equal(got.cpu(), c.read_rows(1, 2))
        t_values, t_scale = c.read_chunk_tensors(1, 2)  # the CPU tensors the loader moves itself
        assert torch.equal(decode_logits(t_values, t_scale, device).cpu(), got.cpu())
    assert float((c.read_rows(1, 2) - torch.from_numpy(x[1, 2 * C : 3 * C])).abs().max()) <= codec_tolerance(
        codec, x[1]
    )
    if codec == "int8":
        with pytest.raises(ValueError):
            decode_logits(values, None)


@pytest.mark.parametrize("codec", CODECS)
def test_non_finite_logits_are_refused(tmp_path, codec):
    c = create(tmp_path / "s.zarr", codec)
    x = fake_logits()
    x[0, 3, 2] = np.nan
    with pytest.raises(DhkdError, match="not finite"):
        write_unit(c, 0, 0, x[0, :C], fake_order(0)[:C], fake_views(0)[:C])
    assert not c.done_mask().any()


def test_fp16_range_is_checked(tmp_path):
    c = create(tmp_path / "s.zarr", "fp16")
    x = fake_logits()
    x[0, 3, 2] = 1e5
    with pytest.raises(DhkdError, match="fp16 range.*bf16"):
        write_unit(c, 0, 0, x[0, :C], fake_order(0)[:C], fake_views(0)[:C])


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("codec", CODECS)
def test_unit_objects_are_the_bytes_zarr_writes(tmp_path, codec, sharded):
    """``write_unit`` encodes a unit's objects itself (``chunk_objects.ObjectEncoder``); Zarr, given
    the same values for a store of the same geometry, writes the same files byte for byte: the
    short last chunk, and sharded the last shard, whose second chunk lies outside the array."""
    geometry = dict(shard_threshold=4, shard_bytes=2 * C * K * codec_named(codec).bytes_per_logit) if sharded else {}
    ours, theirs = create(tmp_path / "ours.zarr", codec, **geometry), create(tmp_path / "zarr.zarr", codec, **geometry)
    assert ours.shard_chunks == (2 if sharded else 1) and all(ours.encoders().values())
    x = fake_logits()
    write(ours, x)
    for e, chunks in theirs.write_units():
        a, b = theirs.unit_rows(chunks[0])
        values, scale = encode_logits(x[e, a:b], codec)
        for name, v in (
            ("logits", values),
            ("logit_scale", scale),
            ("order", fake_order(e)[a:b]),
            ("views", fake_views(e)[a:b]),
        ):
            if v is not None:
                theirs.array(name)[e, a:b] = v
        theirs.array("done")[e, chunks[0] : chunks[-1] + 1] = True
    ours_files, zarr_files = files(tmp_path / "ours.zarr"), files(tmp_path / "zarr.zarr")
    assert sorted(ours_files) == sorted(zarr_files) and "logits/c/1/2/0" in ours_files
    assert [k for k in ours_files if ours_files[k] != zarr_files[k]] == []


def test_row_maxima_are_max_abs_bit_for_bit():
    """The writer's max|row| (from each row's max and min) is numpy's max(|x|), zeros of either
    sign included; a NaN or infinite row is refused as before."""
    from dhkd_pipe.store.codecs import check_encodable

    x = fake_logits(1, 300, 50)[0]
    x[1], x[2], x[3, ::2] = -0.0, 0.0, -0.0
    amax = check_encodable(x, "fp32")
    assert amax.tobytes() == np.abs(x).max(axis=1).tobytes()
    for bad, kind in ((np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")):
        y = x.copy()
        y[4, 7] = bad
        with pytest.raises(DhkdError, match=f"not finite \\({kind} in row 4"):
            check_encodable(y, "fp32")


@pytest.mark.parametrize("index_location", ["start", "end"])
def test_shard_objects_match_zarr_with_the_index_at_either_end(tmp_path, index_location):
    """A sharded float32 array (not a logit store's geometry): the encoder's shards are the files
    Zarr writes, the index before or after the chunks, the last shard cut by the array's end."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    array = zarr.create_array(
        str(tmp_path / "a.zarr"),
        shape=(2, 30, 5),
        chunks=(1, 8, 5),
        dtype="float32",
        fill_value=0,
        shards={"shape": (1, 24, 5), "index_location": index_location},
        config={"write_empty_chunks": True},
        compressors=[BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()],
    )
    x = np.random.default_rng(0).standard_normal((2, 30, 5)).astype(np.float32)
    array[:] = x
    encoder = ObjectEncoder.of(array.metadata)
    for e in range(2):
        for shard in range(2):
            stored = (tmp_path / "a.zarr" / "c" / str(e) / str(shard) / "0").read_bytes()
            assert encoder.encode(x[e : e + 1, shard * 24 : (shard + 1) * 24]) == stored


def test_an_unknown_codec_chain_is_written_through_zarr(tmp_path):
    """An array whose codecs the encoder does not know (here: gzip) keeps Zarr's own writes."""
    import zarr
    from zarr.codecs import BytesCodec, GzipCodec

    array = zarr.create_array(
        str(tmp_path / "a.zarr"),
        shape=(4, 8),
        chunks=(2, 8),
        dtype="int32",
        serializer=BytesCodec(),
        compressors=[GzipCodec()],
    )
    assert ObjectEncoder.of(array.metadata) is None
    two_axes = zarr.create_array(str(tmp_path / "b.zarr"), shape=(4, 8), chunks=(2, 4), shards=(4, 8), dtype="int32")
    assert ObjectEncoder.of(two_axes.metadata) is None  # inner chunks in Morton order, not C order
    c = create(tmp_path / "s.zarr", "int8")
    c.encoders()["views"] = None  # as for such a codec: this array's objects go through Zarr
    write(c, fake_logits())
    logits, order, views = read_all(tmp_path / "s.zarr")
    assert (views == np.stack([fake_views(e) for e in range(E)])).all() and (
        order == np.stack([fake_order(e) for e in range(E)])
    ).all()
    assert LogitCache.open(str(tmp_path / "s.zarr")).done_mask().all()


@pytest.mark.parametrize("where", ["disk", "memory://"])
def test_done_flag_is_the_last_object_written(tmp_path, monkeypatch, where):
    """On disk a unit's objects are written from the writer's thread (its data objects in place,
    its flags renamed into place), elsewhere through Zarr's store (all data objects at once);
    either way its done flags come after all its data."""
    import uuid

    from zarr.storage import FsspecStore

    from dhkd_pipe.store import writer as store_writer

    keys, atomic_only_done = [], []  # on disk the flags, and only they, go through a *.partial file
    if where == "disk":
        c = create(tmp_path / "s.zarr", "int8")
        real_put = store_writer.write_local_object
        monkeypatch.setattr(
            store_writer,
            "write_local_object",
            lambda store, key, data, atomic=True: (
                keys.append(key),
                atomic == key.startswith("done/") or atomic_only_done.append(key),
                real_put(store, key, data, atomic=atomic),
            ),
        )
    else:
        c = create(f"memory://done-{uuid.uuid4().hex[:8]}/s.zarr", "int8")
        real_set = FsspecStore.set

        async def recording_set(self, key, value):
            keys.append(key.rsplit("s.zarr/", 1)[-1])
            return await real_set(self, key, value)

        monkeypatch.setattr(FsspecStore, "set", recording_set)
    write(c, fake_logits(), [(1, [3])])
    assert keys[-1] == "done/c/1/3" and sorted(k.split("/")[0] for k in keys[:-1]) == [
        "logit_scale",
        "logits",
        "order",
        "views",
    ]
    assert atomic_only_done == []


def test_a_store_opened_read_only_is_not_written(tmp_path):
    write(create(tmp_path / "s.zarr"), fake_logits(), [(0, [0])])
    before = files(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="read-only"):
        write(LogitCache.open(str(tmp_path / "s.zarr")), fake_logits(), [(0, [1])])
    assert files(tmp_path / "s.zarr") == before


def test_a_full_disk_is_a_one_line_error(tmp_path, monkeypatch):
    import zarr.storage

    from dhkd_pipe.store import writer as store_writer

    c = create(tmp_path / "s.zarr")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "logits/c/0/0/0")

    monkeypatch.setattr(store_writer, "write_local_object", full)
    with pytest.raises(DhkdError, match=r"cannot write to store .*s\.zarr: No space left on device \(ENOSPC\)$"):
        write(c, fake_logits(), [(0, [0])])
    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    with pytest.raises(DhkdError, match="ENOSPC"):
        create(tmp_path / "t.zarr")
    monkeypatch.undo()
    assert not LogitCache.open(str(tmp_path / "s.zarr")).done_mask().any()


@pytest.mark.parametrize("sharded", [False, True])
def test_a_flipped_bit_is_caught(tmp_path, sharded):
    """Blosc has no checksum; the store's CRC32C catches a single flipped bit in any chunk."""
    n, k = 1000, 16
    geometry = dict(shard_threshold=8, shard_bytes=2 * C * k * 2) if sharded else {}
    c = create(tmp_path / "s.zarr", "fp16", n=n, k=k, **geometry)
    write(c, fake_logits(n=n, k=k))
    obj = tmp_path / "s.zarr" / "logits" / "c" / "1" / "1" / "0"  # chunk 1 unsharded, chunks 2-3 sharded
    data = bytearray(obj.read_bytes())
    data[len(data) // 3] ^= 0x04
    obj.write_bytes(bytes(data))
    c = LogitCache.open(str(tmp_path / "s.zarr"))
    chunk = 2 if sharded else 1
    with pytest.raises(
        DhkdError,
        match=rf"s\.zarr: logits epoch 1 chunk {chunk} is damaged \(checksum mismatch\); re-run cache-teacher",
    ):
        c.read_chunk(1, chunk)
    c.read_chunk(1, 0)


def test_a_missing_object_is_not_read_as_zeros(tmp_path):
    c = create(tmp_path / "s.zarr", "int8")
    write(c, fake_logits())
    os.remove(tmp_path / "s.zarr" / "logit_scale" / "c" / "0" / "4")
    os.remove(tmp_path / "s.zarr" / "order" / "c" / "1" / "2")
    c = LogitCache.open(str(tmp_path / "s.zarr"))
    c.check_complete(objects=False)  # the flags still say done
    with pytest.raises(
        DhkdError,
        match=r"is damaged: logit_scale epoch 0 chunk 4 \(logit_scale/c/0/4\): missing and 1 more; "
        r"re-run cache-teacher",
    ):
        c.check_complete()  # the listing finds both
    with pytest.raises(DhkdError, match=r"logit_scale epoch 0 chunk 4 not on disk \(logit_scale/c/0/4\)"):
        c.read_chunk(0, 4)
    with pytest.raises(DhkdError, match="order epoch 1 chunk 2 not on disk"):
        c.read_order(1)
    c.read_order(0)
    c.read_views(1)


def test_a_half_created_store_is_recreated_by_the_same_command(tmp_path):
    import zarr

    path = tmp_path / "s.zarr"
    create(path)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs.update({"format_version": None})
    del group.attrs["format_version"]  # as if killed before the last step of create()
    with pytest.raises(DhkdError, match="still being created"):
        LogitCache.open(str(path))
    with pytest.raises(DhkdError, match="still being created"):
        create(path, attrs=attrs(views=3))  # not ours: left alone
    c = create(path)
    assert c.attrs["format_version"] == 1 and not c.done_mask().any()


# ---- StoreWriter: the store's life while written, parallel writes ---------------------------------


def open_writer(path, threads, **kw):
    from dhkd_pipe.store.writer import StoreWriter

    return StoreWriter(
        str(path),
        epochs=E,
        num_samples=kw.pop("n", N),
        num_classes=kw.pop("k", K),
        chunk_rows=C,
        labels=np.arange(kw.get("n_labels", N)) % K,
        codec=kw.pop("codec", "int8"),
        attrs=attrs(),
        threads=threads,
        **kw,
    )


def put_all(writer, x, handed=None):
    for e, chunks in writer.todo():
        a, b = writer.store.unit_rows(chunks[0])
        writer.put(e, chunks[0], x[e, a:b], fake_order(e)[a:b], fake_views(e)[a:b])
        if handed is not None:
            handed.append((e, chunks[0]))


@pytest.mark.parametrize("sharded", [False, True])
def test_the_parallel_writer_writes_what_one_thread_writes(tmp_path, sharded):
    from dhkd_pipe.store.lock import LOCK_KEY

    geometry = dict(shard_threshold=4, shard_bytes=2 * C * K) if sharded else {}
    x = fake_logits()
    for name, threads in (("one.zarr", 1), ("four.zarr", 4)):
        with open_writer(tmp_path / name, threads, **geometry) as w:
            assert w.threads == threads and (w.store.shard_chunks > 1) == sharded
            put_all(w, x)
    a, b = files(tmp_path / "one.zarr"), files(tmp_path / "four.zarr")
    assert LOCK_KEY not in a and a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    LogitCache.open(str(tmp_path / "four.zarr")).check_complete()


def test_a_unit_torn_by_a_killed_writer_is_rewritten_on_resume(tmp_path):
    """On disk a unit's data objects are written in place: a writer killed mid-unit leaves them
    torn in a unit not marked done. That is no damage (nothing reads them), and the resume
    rewrites them: the store equals one written straight."""
    from dhkd_pipe.store.audit import damage

    x = fake_logits()
    with open_writer(tmp_path / "straight.zarr", 2) as w:
        put_all(w, x)
    with pytest.raises(KeyboardInterrupt):
        with open_writer(tmp_path / "resumed.zarr", 2) as w:
            for e, chunks in w.todo()[:3]:
                a, b = w.store.unit_rows(chunks[0])
                w.put(e, chunks[0], x[e, a:b], fake_order(e)[a:b], fake_views(e)[a:b])
            w.wait()
            torn = w.todo()[0]
            raise KeyboardInterrupt
    c = LogitCache.open(str(tmp_path / "resumed.zarr"))
    keys = c.unit_keys(torn[0], torn[1][0])
    for name, cut in (("logits", 100), ("views", 7)):  # cut short, as a kill mid-write leaves them
        whole = (tmp_path / "straight.zarr" / keys[name]).read_bytes()
        (tmp_path / "resumed.zarr" / keys[name]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "resumed.zarr" / keys[name]).write_bytes(whole[:cut])
    assert c.done_mask().sum() == 3 and damage(c) == []
    with open_writer(tmp_path / "resumed.zarr", 2) as w:
        assert (torn[0], torn[1]) in w.todo()
        put_all(w, x)
    a, b = files(tmp_path / "straight.zarr"), files(tmp_path / "resumed.zarr")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_writer_threads_follow_the_cores_on_disk(tmp_path, monkeypatch):
    """On disk a unit is CPU work (its encoding): one writer thread per core, at most 4; on object
    storage it waits on round trips: 8."""
    from dhkd_pipe.store.writer import write_threads

    for cores, threads in ((1, 1), (2, 2), (3, 3), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert write_threads(str(tmp_path / "s.zarr")) == threads and write_threads("s3://bucket/s.zarr") == 8


@pytest.mark.parametrize("codec", ["fp16", "bf16", "fp32", "int8"])
def test_reused_buffers_write_what_fresh_arrays_write(tmp_path, codec):
    """Writer threads encode each unit into a buffer they reuse (``scratch``): the files equal a
    store written unit by unit with fresh arrays, the short last chunk included."""
    x = fake_logits()
    write(create(tmp_path / "fresh.zarr", codec), x)
    with open_writer(tmp_path / "reused.zarr", 2, codec=codec) as w:
        put_all(w, x)
    a, b = files(tmp_path / "fresh.zarr"), files(tmp_path / "reused.zarr")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_the_writer_holds_a_bounded_number_of_units(tmp_path, monkeypatch):
    """put waits while threads + QUEUED_UNITS units are unwritten: memory stays bounded."""
    import threading
    import time

    from dhkd_pipe.store import writer as store_writer

    release, started = threading.Event(), []
    real = store_writer.write_unit

    def slow(cache, *unit, **kw):
        started.append(unit[:2])
        release.wait(30)
        real(cache, *unit, **kw)

    monkeypatch.setattr(store_writer, "write_unit", slow)
    x = fake_logits()
    with open_writer(tmp_path / "s.zarr", 2) as w:
        units, handed = [(e, chunks[0]) for e, chunks in w.todo()], []
        feeder = threading.Thread(target=put_all, args=(w, x, handed))
        feeder.start()
        deadline = time.time() + 30  # a loaded machine: wait for the writers and the feeder to get there
        while (len(started) < 2 or len(handed) < 2 + store_writer.QUEUED_UNITS) and time.time() < deadline:
            time.sleep(0.01)
        feeder.join(0.3)
        assert feeder.is_alive() and len(handed) == 2 + store_writer.QUEUED_UNITS and len(started) == 2
        release.set()
        feeder.join(30)
    assert sorted(started) == sorted(units) and LogitCache.open(str(tmp_path / "s.zarr")).done_mask().all()


def test_a_failed_write_surfaces_and_a_store_without_units_is_removed(tmp_path, monkeypatch):
    from dhkd_pipe.store import writer as store_writer

    def full(cache, *unit, **kw):
        raise DhkdError(f"cannot write to store {cache.path}: No space left on device (ENOSPC)")

    monkeypatch.setattr(store_writer, "write_unit", full)
    with pytest.raises(DhkdError, match="ENOSPC"):
        with open_writer(tmp_path / "s.zarr", 4) as w:
            put_all(w, fake_logits())
    assert not (tmp_path / "s.zarr").exists()  # nothing was written: no store, no lock, no folder


# ---- the schema: what the writer writes passes it, and each difference is named -----------------------


def _documents(path) -> tuple[dict, dict]:
    from dhkd_pipe.store.bounds import ARRAYS

    read = lambda key: json.loads((path / key).read_text()) if (path / key).exists() else None  # noqa: E731
    return read("zarr.json"), {name: read(f"{name}/zarr.json") for name in ARRAYS + ("logit_scale",)}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("sharded", [False, True])
def test_the_schema_takes_what_the_writer_writes(tmp_path, codec, sharded):
    from dhkd_pipe.store.codecs import codec_named
    from dhkd_pipe.store.schema import metadata_problems

    shard_bytes = 3 * C * K * codec_named(codec).bytes_per_logit  # three chunks a shard
    shards = dict(shard_threshold=8, shard_bytes=shard_bytes) if sharded else {}
    c = create(tmp_path / "s.zarr", codec, **shards)
    assert (c.shard_chunks > 1) == sharded
    assert metadata_problems(*_documents(tmp_path / "s.zarr")) == []


@pytest.mark.parametrize(
    "edit, named",
    [
        (
            lambda root, arrays: root["attributes"].__setitem__("seed", "0"),
            "attribute seed is 0, where a logit store has a whole number",
        ),
        (lambda root, arrays: root["attributes"]["teacher"].pop("arch"), "attribute teacher has no 'arch'"),
        (
            lambda root, arrays: root["attributes"]["policy"].__setitem__("extra", 1),
            "attribute policy has 'extra', which no logit store has",
        ),
        (
            lambda root, arrays: root["attributes"]["policy"].__setitem__("mean", [1, 2]),
            "attribute policy.mean is [1, 2], where a logit store has a list of 3 values",
        ),
        (
            lambda root, arrays: arrays["order"].__setitem__("data_type", "int64"),
            "order has data type int64, where this store's is int32",
        ),
        (
            lambda root, arrays: arrays["done"].__setitem__("fill_value", 0),
            "done has fill value 0, where a logit store's is false",
        ),
        (
            lambda root, arrays: arrays["labels"]["codecs"].insert(
                1, {"name": "transpose", "configuration": {"order": [0]}}
            ),
            "labels has codecs bytes, transpose, blosc, crc32c",
        ),
    ],
)
def test_the_schema_names_each_difference(tmp_path, edit, named):
    from dhkd_pipe.store.schema import metadata_problems

    create(tmp_path / "s.zarr")
    root, arrays = _documents(tmp_path / "s.zarr")
    edit(root, arrays)
    problems = metadata_problems(root, arrays)
    assert len(problems) == 1 and problems[0].startswith(named), problems


def test_a_store_whose_metadata_differs_opens_for_inspection_only(tmp_path):
    create(tmp_path / "s.zarr")
    meta = json.loads((tmp_path / "s.zarr" / "views" / "zarr.json").read_text())
    meta["fill_value"] = 3
    (tmp_path / "s.zarr" / "views" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DhkdError, match=r"views has fill value 3, .*a resume cannot repair metadata"):
        LogitCache.open(tmp_path / "s.zarr")
    assert LogitCache.open(tmp_path / "s.zarr", schema=False).metadata_problems == [
        "views has fill value 3, where a logit store's is 0"
    ]
