"""timm's speed switches: --channels-last and --compile change speed, not what is learned."""

import pytest
import torch

from dhkd_pipe.config import CacheConfig, TrainConfig
from dhkd_pipe.stages.cache_teacher import cache_teacher
from dhkd_pipe.training.engine import train
from dhkd_pipe.training.run import prepare
from dhkd_pipe.training.run_folder import CHECKPOINT

QUIET = dict(log=lambda *a: None)


def cfg(out, **kw):
    base = dict(data="digits", model="resnet8", method="ce", epochs=1, batch_size=64, max_steps=1, out=str(out))
    return TrainConfig(**{**base, **kw}).validate()


def trained_weights(out, **kw):
    run = prepare(cfg(out, **kw), mode="overwrite")
    train(run, **QUIET)
    return run, torch.load(out / CHECKPOINT, weights_only=True)["model"]


def initial_weights(out):
    run = prepare(cfg(out))  # prepare seeds: every run starts here
    return {k: v.clone() for k, v in run.accelerator.unwrap_model(run.model).state_dict().items()}


def assert_same_training(a: dict, b: dict, start: dict):
    """The two runs took the same SGD step: the weight updates agree to float32 rounding. (oneDNN's
    NHWC kernels and compiled kernels sum in another order, and BatchNorm's cancelling weight
    gradients amplify that to ~6e-3 of the update; in float64 they agree to 1e-16.) A step on
    other pixels or labels differs by the size of the update itself."""
    keys = [k for k in start if start[k].is_floating_point() and "running" not in k]
    da = torch.cat([(a[k] - start[k]).flatten() for k in keys])
    db = torch.cat([(b[k] - start[k]).flatten() for k in keys])
    assert da.norm() > 0
    assert (da - db).norm() / da.norm() < 2e-2, float((da - db).norm() / da.norm())


def test_channels_last_trains_like_the_default(tmp_path):
    start = initial_weights(tmp_path / "start")
    _, plain = trained_weights(tmp_path / "plain")
    run, nhwc = trained_weights(tmp_path / "nhwc", channels_last=True)
    conv = run.accelerator.unwrap_model(run.model).conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    batch = next(run.loader.epoch(0))
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert plain.keys() == nhwc.keys()
    assert_same_training(plain, nhwc, start)


def test_stage_2_channels_last_default_follows_the_device(tmp_path):
    """Not given, --channels-last is on for a CUDA device (bench distill: 1.53x on an H200) and off
    on the CPU (0.61x-1.42x here); given, it is what was given. This machine's runs are NCHW."""
    from dhkd_pipe.data.inference import memory_format

    default = cfg(tmp_path / "d")
    assert default.channels_last is None
    assert memory_format(default, torch.device("cuda", 0)) == memory_format(default, "cuda") == torch.channels_last
    assert memory_format(default, "cpu") == memory_format(default) == torch.contiguous_format
    for given, fmt in ((True, torch.channels_last), (False, torch.contiguous_format)):
        assert (
            memory_format(cfg(tmp_path / "g", channels_last=given), "cuda")
            == fmt
            == memory_format(cfg(tmp_path / "g", channels_last=given), "cpu")
        )
    if not torch.cuda.is_available():
        run = prepare(default, mode="overwrite")
        assert run.accelerator.unwrap_model(run.model).conv1.weight.is_contiguous()


def test_stage_1_with_channels_last_writes_the_same_logits(tmp_path):
    torch.manual_seed(0)
    from dhkd_pipe.models import create_model

    weights = tmp_path / "teacher.pt"
    torch.save({"model": create_model("resnet8", 10).state_dict()}, weights)
    stores = {}
    for flag in (False, True):
        out = tmp_path / f"store-{flag}.zarr"
        cache_teacher(
            CacheConfig(
                data="digits",
                model="resnet8",
                weights=str(weights),
                views=1,
                out=str(out),
                codec="fp32",
                chunk_rows=512,
                channels_last=flag,
            ).validate(),
            **QUIET,
        )
        from dhkd_pipe.store.reader import LogitCache

        c = LogitCache.open(str(out))
        stores[flag] = torch.cat([c.read_rows(0, k) for k in range(c.num_chunks)])
    torch.testing.assert_close(stores[True], stores[False], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_student_trains_like_eager_and_saves_plain_weights(tmp_path):
    # torch.compile on the CPU builds C++ kernels (gcc): minutes on a loaded machine
    start = initial_weights(tmp_path / "start")
    _, eager = trained_weights(tmp_path / "eager")
    run, compiled = trained_weights(tmp_path / "compiled", compile=True)
    assert type(run.model).__name__ == "OptimizedModule"
    assert compiled.keys() == eager.keys()  # no "_orig_mod." prefix in the checkpoint
    assert_same_training(eager, compiled, start)
