"""Random tensors drawn from a seed, and the closeness check, that the loss, method and kernel
tests share."""

import torch


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(rows: int, classes: int, seed: int = 0, scale: float = 3.0, dtype=torch.float64, device="cpu"):
    """(rows, classes) logits, N(0, scale^2), drawn in float32 on the CPU from ``seed`` (the same
    numbers whatever ``dtype`` and ``device`` they are returned in)."""
    return (torch.randn(rows, classes, generator=generator(seed)) * scale).to(dtype=dtype, device=device)


def random_labels(rows: int, classes: int, seed: int = 0, dtype=torch.int64, device="cpu"):
    """(rows,) labels in ``0..classes-1`` drawn from ``seed``."""
    return torch.randint(0, classes, (rows,), generator=generator(seed)).to(dtype=dtype, device=device)


def assert_close(got, want, rtol: float = 1e-10, atol: float = 1e-10, what: str = ""):
    """``got`` is finite (a kernel left no element unwritten) and within the tolerances of ``want``,
    both compared in float64 on the CPU."""
    got = torch.as_tensor(got).double().cpu()
    want = torch.as_tensor(want).double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite (an element left unwritten?)"
    assert torch.allclose(got, want, rtol=rtol, atol=atol), f"{what}: max err {(got - want).abs().max():.3g}"
