"""``dhkd-pipe bench cache``: stage 1 (``cache_teacher``) against the teacher's bare forward pass, on
a synthetic CIFAR-100-shaped folder and on a generated JPEG folder; then bytes per logit and errors
of each codec on a trained digits teacher's real logits. One run in one process."""

from __future__ import annotations

import os
import tempfile

import torch

from dhkd_pipe.benchmarks.measure import clock, machine, memory_formats, print_table, write_results
from dhkd_pipe.benchmarks.synthetic import random_teacher, write_synthetic_cifar
from dhkd_pipe.config import CacheConfig, TrainConfig
from dhkd_pipe.models import create_model


def _bare_forward(
    arch: str,
    num_classes: int,
    batch_size: int,
    steps: int,
    precision: str = "no",
    fmt: torch.memory_format = torch.contiguous_format,
) -> float:
    """The teacher's forward pass alone on a pre-made batch, as stage 1 runs it (inference mode,
    memory format ``fmt``): the ceiling for stage 1."""
    from dhkd_pipe.training.accelerator import make_accelerator

    acc = make_accelerator(precision)
    torch.manual_seed(0)
    model = create_model(arch, num_classes).eval().to(acc.device, memory_format=fmt)
    x = torch.randn(batch_size, 3, 32, 32, device=acc.device).contiguous(memory_format=fmt)
    with torch.inference_mode(), acc.autocast():
        for _ in range(2):
            model(x)
        t0 = clock(acc.device)
        for _ in range(steps):
            model(x).float().cpu()
        elapsed = clock(acc.device) - t0
    return batch_size * steps / elapsed


def bench_cache(
    json_path: str,
    model: str = "resnet32x4",
    batch_size: int = 64,
    steps: int = 20,
    teacher_weights: str | None = None,
    image_model: str | None = "resnet18",
    images: int = 48,
    views: int = 4,
    resolution: int = 224,
    image_batch: int = 32,
    codecs: bool = True,
):
    """Stage 1 against the teacher's bare forward pass on in-memory data and (``image_model``
    not None, DALI installed) on a generated JPEG folder at 224 px; then the codecs' errors."""
    from dhkd_pipe.benchmarks.images import bench_image_folder
    from dhkd_pipe.data.imagefolder import dali_installed
    from dhkd_pipe.stages.cache_teacher import cache_teacher
    from dhkd_pipe.stages.train_teacher import train_teacher
    from dhkd_pipe.store.codecs import CODECS
    from dhkd_pipe.store.reader import LogitCache

    work = tempfile.mkdtemp(prefix="dhkd-bench-")
    data = write_synthetic_cifar(os.path.join(work, "cifar"), num_train=steps * batch_size)
    weights = random_teacher(model, 100, os.path.join(work, "teacher.pt"))
    (name, fmt), (other_name, other_fmt) = memory_formats()
    bare = _bare_forward(model, 100, batch_size, steps, fmt=fmt)
    other = _bare_forward(model, 100, batch_size, steps, fmt=other_fmt)
    result = cache_teacher(
        CacheConfig(
            data=data,
            model=model,
            weights=weights,
            views=1,
            out=os.path.join(work, "speed.zarr"),
            batch_size=batch_size,
        ).validate(),
        log=lambda *_: None,
    )
    stage1 = result["images_per_sec"]
    speed_rows = [
        {
            "path": f"{model} bare forward, pre-made tensors ({name}, stage 1's default)",
            "images_per_sec": bare,
            "ratio": 1.0,
        },
        {
            "path": f"{model} bare forward, pre-made tensors ({other_name})",
            "images_per_sec": other,
            "ratio": other / bare,
        },
        {"path": "stage 1: render + teacher + encode + write", "images_per_sec": stage1, "ratio": stage1 / bare},
    ]
    print_table(
        f"bench cache: {model}, batch {batch_size}, {steps * batch_size} images, {machine()['device']}",
        speed_rows,
        [("path", "path", "s"), ("images_per_sec", "img/s", ".1f"), ("ratio", "x bare", ".2f")],
    )
    folder = None
    if image_model and dali_installed():
        folder = bench_image_folder(
            work, image_model, images=images, views=views, resolution=resolution, batch_size=image_batch
        )
        print_table(
            f"bench cache, image folder: {image_model}, {images} JPEGs 500x375 x {views} views at {resolution} px, "
            f"batch {image_batch}, "
            f"DALI on {folder['device']} (goal: decoded per row = 1/{views}, stage 1 >= 0.9 x bare)",
            folder["rows"],
            [
                ("path", "path", "s"),
                ("views_per_sec", "views/s", ".1f"),
                ("decoded_per_row", "decoded / row", ".3f"),
                ("ratio", "x bare", ".2f"),
            ],
        )
    payload = {
        "bench": "cache",
        "machine": machine(),
        "model": model,
        "batch_size": batch_size,
        "speed": speed_rows,
        "stage1_over_bare_forward": stage1 / bare,
        "image_folder": folder,
    }
    if not codecs:
        write_results(json_path, payload)
        return payload

    if teacher_weights is None:
        teacher_out = os.path.join(work, "digits-teacher")
        train_teacher(
            TrainConfig(
                data="digits", model="resnet8", epochs=8, lr=0.05, lr_milestones=[6], out=teacher_out
            ).validate(),
            log=lambda *_: None,
        )
        teacher_weights, teacher_arch = os.path.join(teacher_out, "model.pt"), "resnet8"
    else:
        teacher_arch = "resnet8"
    codec_rows, reference = [], None
    for codec in sorted(CODECS, key=lambda c: c != "fp32"):  # fp32 first: the others' reference
        out = os.path.join(work, f"digits-{codec}.zarr")
        cache_teacher(
            CacheConfig(
                data="digits", model=teacher_arch, weights=teacher_weights, views=2, codec=codec, out=out
            ).validate(),
            log=lambda *_: None,
        )
        store = LogitCache.open(out)
        logits = torch.cat([store.read_rows(e, c) for e in range(store.epochs) for c in range(store.num_chunks)])
        reference = logits if reference is None else reference
        err = (logits - reference).abs()
        summary = store.summary()
        codec_rows.append(
            {
                "codec": codec,
                "bytes_per_logit": summary["bytes_per_logit"],
                "bytes_on_disk": summary["bytes_on_disk"],
                "max_abs_err": float(err.max()),
                "max_rel_err": float((err / reference.abs().amax(1, keepdim=True)).max()),
                "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean()),
            }
        )
    print_table(
        f"codecs: digits {teacher_arch} teacher logits, 2 views x 1437 x 10 (errors against fp32)",
        codec_rows,
        [
            ("codec", "codec", "s"),
            ("bytes_per_logit", "bytes/logit on disk", ".3f"),
            ("max_abs_err", "max abs err", ".2e"),
            ("max_rel_err", "max err / row max", ".2e"),
            ("top1_agreement", "top-1 agree", ".4f"),
        ],
    )
    payload["codecs"] = codec_rows
    write_results(json_path, payload)
    return payload
