"""Corrupt images: found, and named, before their pixels teach anything.

A file that is missing, not an image, or truncated makes a decoder fail. A JPEG whose entropy-coded
data is damaged does not: libjpeg(-turbo), under DALI's CPU decoder as under torchvision's, only
warns ("Corrupt JPEG data: premature end of data segment"), fills the blocks it could not decode
with grey and reports success. The warning, written to fd 2 from a decoder thread, is the only sign.

So the check costs nothing while images are sound: the renderer asks the command's stderr capture
(``native_stderr``) whether a decoder warned of damage since its last batch, and only then decodes
the batch's candidate files one at a time (``decode_problem``) to name the damaged one.
``decode_problem`` is also the full check that ``--skip-corrupt`` runs over a folder first.
"""

from __future__ import annotations

import os
import tempfile
import warnings

from dhkd_pipe.native_stderr import is_decoder_damage

DALI_IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000")


def check_image(path: str) -> str | None:
    """Why ``path`` cannot be decoded at all (missing, not an image, corrupt, truncated, a format
    DALI does not read), or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt = im.format
            im.load()  # a full decode: truncated or corrupt data raises here
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if fmt not in DALI_IMAGE_FORMATS:
        return f"unsupported image format {fmt}"
    return None


def decode_problem(path: str) -> str | None:
    """Why ``path`` cannot be rendered as it was meant to be: ``check_image``'s reasons, or the
    JPEG decoder's report of damaged data that it filled in. None for a sound image.

    The JPEG is decoded by libjpeg-turbo (torchvision's) with fd 2 pointed at a private file for
    the call, so that its warnings are read back; run it where no other thread decodes at the
    same time (a stopped pipeline), or another image's warning could be read as this one's."""
    reason = check_image(path)
    if reason is not None:
        return reason
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return None  # not a JPEG: Pillow's full decode above raises for damage
    return _jpeg_damage(path)


def _jpeg_damage(path: str) -> str | None:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with open(path, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    with tempfile.TemporaryFile() as captured, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notices about its decoders
        saved = os.dup(2)
        try:
            os.dup2(captured.fileno(), 2)
            try:
                decode_jpeg(data, mode=ImageReadMode.RGB)
            except RuntimeError as e:
                return " ".join(str(e).split())[:200]
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        lines = captured.read(1 << 16).splitlines()
    damage = [line.strip().decode(errors="replace") for line in lines if is_decoder_damage(line)]
    return f"the JPEG decoder reports {damage[0]!r} (it decodes damaged data as grey)" if damage else None


def find_corrupt(paths: list[str]) -> tuple[str, str] | None:
    """The first of ``paths`` with a ``decode_problem`` and its reason, or None."""
    for path in dict.fromkeys(paths):
        reason = decode_problem(path)
        if reason is not None:
            return path, reason
    return None


def scan_corrupt(paths: list[str], workers: int | None = None) -> list[tuple[str, str]]:
    """(path, reason) of every corrupt file of ``paths``, in order: each decoded fully, in
    ``workers`` processes (default: one per usable core) when there are many; each process's fd 2
    is its own, so a decoder's warning is always read back against its own file."""
    if len(paths) < 64 or workers == 0:
        found = [(p, decode_problem(p)) for p in paths]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        count = workers or len(os.sched_getaffinity(0))
        with ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn")) as pool:
            found = list(zip(paths, pool.map(decode_problem, paths, chunksize=32), strict=True))
    return [(p, reason) for p, reason in found if reason is not None]
