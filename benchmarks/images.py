"""``bench cache`` on an image folder: stage 1 against the same teacher's bare forward pass on
pre-rendered tensors and against decoding alone, with the images decoded per stored row counted
by the renderer (``DaliViews.decoded_images``).

The folder is generated: ImageNet-sized JPEGs (500 x 375, quality 90) of smooth random colour
fields with grain, so decoding costs what a photograph's does, not what noise's does.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch


def write_jpeg_folder(
    root: str, num_train: int, classes: int = 4, num_val: int = 0, size=(500, 375), seed: int = 0
) -> str:
    """``root/train/cK/*.JPEG`` (and ``val``); returns the ``imagefolder:DIR`` spec."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    for split, n in (("train", num_train), ("val", num_val)):
        for i in range(n):
            coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
            pixels = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
            folder = os.path.join(root, split, f"c{i % classes}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.JPEG"), quality=90)
    return f"imagefolder:{root}"


MIN_SECONDS = 2.0  # decoding alone is timed over whole passes of the folder until this long


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def decoding_alone(data, plan, views: np.ndarray, device, batch_size: int, workers: int | None) -> list[dict]:
    """Views/s of the DALI renderer without a teacher: each image decoded once for its V views
    (stage 1), and once per view (stage 2's replay, ``decode`` region and full); and whether the
    region decode rendered the first batch's views exactly as the whole-image decode did."""
    from dhkd_pipe.data.dali_renderer import DECODES, DaliViews

    n, count = views.shape[:2]
    idx = np.arange(n)
    rows = []
    renderer = DaliViews(data, plan, device, num_workers=workers)
    try:
        images = max(1, batch_size // count)
        list(renderer.image_batches(idx[:images], views[:images], images))  # workers started, pipeline built
        before, t0, done = renderer.decoded_images, time.perf_counter(), 0
        while not done or time.perf_counter() - t0 < MIN_SECONDS:  # passes enough to time
            done += sum(x.shape[0] * x.shape[1] for x in renderer.image_batches(idx, views, images))
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "path": f"decoding alone: each image once, {count} views rendered from it",
                "views_per_sec": _rate(done, seconds),
                "decoded_per_row": (renderer.decoded_images - before) / done,
            }
        )
    finally:
        renderer.close()
    first = {}
    for decode in DECODES:
        renderer = DaliViews(data, plan, device, num_workers=workers, decode=decode)
        try:
            flat_idx, flat_views = np.repeat(idx, count), views.reshape(-1, 5)
            first[decode] = torch.cat(
                list(renderer.train_batches(flat_idx[:batch_size], flat_views[:batch_size], batch_size))
            ).cpu()
            before, t0, done = renderer.decoded_images, time.perf_counter(), 0
            while not done or time.perf_counter() - t0 < MIN_SECONDS:
                done += sum(len(x) for x in renderer.train_batches(flat_idx, flat_views, batch_size))
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "path": f"decoding alone: once per view, {decode} decode (stage 2's replay)",
                    "views_per_sec": _rate(done, seconds),
                    "decoded_per_row": (renderer.decoded_images - before) / done,
                }
            )
        finally:
            renderer.close()
    diff = float((first["region"] - first["full"]).abs().max())
    return rows, {"region_equals_full": bool(torch.equal(first["region"], first["full"])), "region_max_abs_diff": diff}


def bare_forward(model, batch: torch.Tensor, rows: int, acc, memory_format) -> float:
    """Views/s of the teacher alone on a pre-rendered batch, as stage 1 runs it (inference mode,
    the accelerator's autocast, the memory format), logits copied to the CPU."""
    batch = batch.to(acc.device).contiguous(memory_format=memory_format)
    steps = max(3, -(-rows // len(batch)))
    from dhkd_pipe.benchmarks.measure import clock

    with torch.inference_mode(), acc.autocast():
        model(batch).float().cpu()
        t0 = clock(acc.device)
        for _ in range(steps):
            model(batch).float().cpu()
    return _rate(steps * len(batch), clock(acc.device) - t0)


def bench_image_folder(
    work: str,
    model: str = "resnet18",
    images: int = 48,
    views: int = 4,
    resolution: int = 224,
    batch_size: int = 32,
    classes: int = 4,
    workers: int | None = None,
) -> dict:
    """The image-folder rows of ``bench cache`` (one process, the accelerator's device)."""
    from dhkd_pipe.benchmarks.measure import memory_formats
    from dhkd_pipe.config import CacheConfig
    from dhkd_pipe.data.dali_renderer import DaliViews, worker_count
    from dhkd_pipe.data.datasets import load_data
    from dhkd_pipe.models import create_model
    from dhkd_pipe.stages.cache_teacher import cache_teacher
    from dhkd_pipe.training.accelerator import make_accelerator

    workers = worker_count(workers)  # one count for the decoding rows and stage 1's config alike
    spec = write_jpeg_folder(os.path.join(work, "jpegs"), images, classes)
    torch.manual_seed(0)
    weights = os.path.join(work, f"{model}-teacher.pt")
    teacher = create_model(model, classes).eval().requires_grad_(False)
    torch.save({"model": teacher.state_dict()}, weights)

    acc = make_accelerator("no")
    data = load_data(spec)
    plan = data.default_plan(seed=0, resolution=resolution)
    idx = np.arange(data.num_train)
    view_table = np.stack([plan.views(e, idx, data.train_sizes(idx)) for e in range(views)], axis=1)
    decode_rows, agreement = decoding_alone(data, plan, view_table, acc.device, batch_size, workers)

    cfg = dict(
        data=spec,
        model=model,
        weights=weights,
        views=views,
        resolution=resolution,
        batch_size=batch_size,
        workers=workers,
    )
    (fmt_name, fmt), (other_name, other_fmt) = memory_formats()
    renderer = DaliViews(data, plan, acc.device, num_workers=workers)
    try:
        first = max(1, -(-batch_size // views))
        batch = torch.cat(list(renderer.image_batches(idx[:first], view_table[:first], first))).flatten(0, 1)[
            :batch_size
        ]
    finally:
        renderer.close()
    before = bare_forward(teacher.to(acc.device, memory_format=fmt), batch, images * views, acc, fmt)
    other = bare_forward(teacher.to(memory_format=other_fmt), batch, images * views, acc, other_fmt)
    teacher.to(memory_format=fmt)

    stage1 = {}
    for name, once in (("view by view (before)", False), ("decode once (after)", True)):
        out = os.path.join(work, f"stage1-{'once' if once else 'per-view'}.zarr")
        result = cache_teacher(CacheConfig(**cfg, out=out).validate(), log=lambda *_: None, decode_once=once)
        stage1[name] = result
    # on a shared machine the rate drifts: the bare pass is timed before and after stage 1, averaged
    bare = (before + bare_forward(teacher, batch, images * views, acc, fmt)) / 2
    rows = [
        {
            "path": f"{model} bare forward, pre-rendered tensors ({fmt_name}, stage 1's default)",
            "views_per_sec": bare,
            "decoded_per_row": None,
            "ratio": 1.0,
        },
        {
            "path": f"{model} bare forward, pre-rendered tensors ({other_name})",
            "views_per_sec": other,
            "decoded_per_row": None,
            "ratio": other / bare,
        },
    ]
    rows += [{**r, "ratio": r["views_per_sec"] / bare} for r in decode_rows]
    for name, result in stage1.items():
        rows.append(
            {
                "path": f"stage 1, {name}: decode + teacher + encode + write",
                "views_per_sec": result["images_per_sec"],
                "decoded_per_row": result["decoded_per_row"],
                "ratio": result["images_per_sec"] / bare,
            }
        )
    return {
        "model": model,
        "images": images,
        "views": views,
        "resolution": resolution,
        "batch_size": batch_size,
        "image_size": [375, 500],
        "device": str(acc.device),
        "rows": rows,
        "stage1_over_bare_forward": stage1["decode once (after)"]["images_per_sec"] / bare,
        "decoded_per_row": stage1["decode once (after)"]["decoded_per_row"],
        "goal_decoded_per_row": 1 / views,
        **agreement,
    }
