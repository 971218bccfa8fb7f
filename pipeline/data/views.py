"""Augmentation views: which crop and flip each sample gets in each augmentation epoch.

A view is five int32 numbers, ``(y, x, h, w, flip)``: the crop box in the source image's pixel
coordinates (``y``/``x`` may be negative for padded crops: the pixels outside the image are
zero) and the horizontal flip bit. Views are drawn from a counter-based generator keyed by
``(seed, epoch, sample index, draw)``, so a sample's view never depends on batch size, process
count, worker count or the order samples are visited in.

Why a hash and not ``numpy.random.Philox``: building a Philox generator per sample is too slow for
1.28M samples x 32 views; the SplitMix64 finaliser below is a counter-based generator
that numpy evaluates for a whole chunk of samples at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from dhkd_pipe.errors import DhkdError

POLICIES = ("pad_crop_flip", "random_resized_crop_flip")
INTERPOLATIONS = ("bilinear", "bicubic")  # box -> R x R resampling, antialiased when shrinking
DEFAULT_CROP_PCT = 0.875  # validation: centre crop 224 of the shorter side resized to 256

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective avalanche of 64-bit words (arrays wrap modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniform(seed: int, epoch: int, index: np.ndarray, draw: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per index, a pure function of (seed, epoch, index, draw)."""
    index = np.asarray(index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed], dtype=np.uint64) * _GOLDEN + np.uint64(0x632BE59BD9B4E019))
        key = _mix(key ^ (np.uint64(epoch) * _GOLDEN + np.uint64(1)))
        key = _mix(key ^ (np.uint64(draw) * _GOLDEN + np.uint64(2)))
        bits = _mix(key ^ (index * _GOLDEN + np.uint64(3)))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class ViewPlan:
    """How views are drawn: the policy, its parameters and the seed.

    ``pad_crop_flip`` (CIFAR-style): pad by ``padding`` then a random ``resolution``-sized crop,
    and a horizontal flip with probability 1/2. ``random_resized_crop_flip`` (ImageNet-style):
    torchvision's RandomResizedCrop box (area fraction in ``scale``, log-uniform aspect ratio in
    ``ratio``, 10 tries then a centre crop) against each image's real size, resized to
    ``resolution``, and a flip.

    How a box becomes the network's input travels with the plan (and so with the store):
    ``interpolation`` (one of ``INTERPOLATIONS``, antialiased), the normalisation ``mean``/``std``
    (None: the data set's), and ``crop_pct``, the validation view's centre crop as a fraction of
    the shorter side (torchvision's ``crop_size / resize_size``, timm's ``crop_pct``).
    """

    seed: int = 0
    policy: str = "pad_crop_flip"
    resolution: int = 32
    padding: int = 4
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise DhkdError(f"unknown augmentation policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.resolution < 1 or self.padding < 0:
            raise DhkdError(f"bad view plan: resolution {self.resolution}, padding {self.padding}")
        if self.interpolation not in INTERPOLATIONS:
            raise DhkdError(f"unknown interpolation {self.interpolation!r}; known: {', '.join(INTERPOLATIONS)}")
        if not 0 < self.crop_pct <= 2:  # above 1 (timm has 1.15): the box reaches past the image, zero-padded
            raise DhkdError(f"bad view plan: crop_pct {self.crop_pct} must be in (0, 2]")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 3:
                    raise DhkdError(f"bad view plan: {name} needs 3 channels, got {list(value)}")
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.std is not None and min(self.std) <= 0:
            raise DhkdError(f"bad view plan: std {list(self.std)} must be positive")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        for name in ("mean", "std"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViewPlan":
        """Also reads plans recorded before the preprocessing fields existed (their defaults)."""
        d = dict(d)
        d["scale"], d["ratio"] = tuple(d["scale"]), tuple(d["ratio"])
        return cls(**d)

    def normalization(self, data) -> tuple[tuple, tuple]:
        """(mean, std) to render with: the plan's, else the data set's."""
        return (self.mean or tuple(data.mean)), (self.std or tuple(data.std))

    def order(self, epoch: int, num_samples: int) -> np.ndarray:
        """The training order of an epoch: a permutation keyed by (seed, epoch) alone."""
        rng = np.random.Generator(np.random.Philox(key=[self.seed, epoch]))
        return rng.permutation(num_samples).astype(np.int64)

    def views(self, epoch: int, indices: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Views of samples ``indices`` in augmentation epoch ``epoch``.

        ``sizes`` is (n, 2) int: each source image's (height, width). Returns (n, 5) int32.
        """
        indices = np.asarray(indices, dtype=np.int64)
        sizes = np.asarray(sizes, dtype=np.int64).reshape(len(indices), 2)
        out = np.empty((len(indices), 5), dtype=np.int32)
        if self.policy == "pad_crop_flip":
            out[:, 0:4] = self._pad_crop(epoch, indices, sizes)
        else:
            out[:, 0:4] = self._random_resized_crop(epoch, indices, sizes)
        out[:, 4] = uniform(self.seed, epoch, indices, draw=0) < 0.5
        return out

    def _pad_crop(self, epoch, indices, sizes):
        p = self.padding
        h, w = sizes[:, 0], sizes[:, 1]
        crop_h, crop_w = np.minimum(self.resolution, h + 2 * p), np.minimum(self.resolution, w + 2 * p)
        # torchvision RandomCrop(padding=p): offset uniform in [0, H + 2p - crop] of the padded image.
        y = np.floor(uniform(self.seed, epoch, indices, 1) * (h + 2 * p - crop_h + 1)).astype(np.int64) - p
        x = np.floor(uniform(self.seed, epoch, indices, 2) * (w + 2 * p - crop_w + 1)).astype(np.int64) - p
        return np.stack([y, x, crop_h, crop_w], axis=1)

    def _random_resized_crop(self, epoch, indices, sizes, tries: int = 10):
        height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        box = np.zeros((len(indices), 4), dtype=np.int64)
        found = np.zeros(len(indices), dtype=bool)
        for t in range(tries):
            draw = 1 + 4 * t
            target = area * (self.scale[0] + uniform(self.seed, epoch, indices, draw) * (self.scale[1] - self.scale[0]))
            aspect = np.exp(log_lo + uniform(self.seed, epoch, indices, draw + 1) * (log_hi - log_lo))
            w = np.round(np.sqrt(target * aspect)).astype(np.int64)
            h = np.round(np.sqrt(target / aspect)).astype(np.int64)
            ok = ~found & (w > 0) & (h > 0) & (w <= sizes[:, 1]) & (h <= sizes[:, 0])
            y = np.floor(uniform(self.seed, epoch, indices, draw + 2) * (sizes[:, 0] - h + 1)).astype(np.int64)
            x = np.floor(uniform(self.seed, epoch, indices, draw + 3) * (sizes[:, 1] - w + 1)).astype(np.int64)
            box[ok] = np.stack([y, x, h, w], axis=1)[ok]
            found |= ok
        if not found.all():
            box[~found] = center_boxes(sizes[~found], self.ratio)
        return box


def with_preprocessing(plan: ViewPlan, preprocessing: dict | None, resolution: int | None = None) -> ViewPlan:
    """The plan rendering with ``preprocessing`` (a weights' transform: resolution, crop_pct,
    interpolation, mean, std); an explicit ``resolution`` still wins."""
    if preprocessing:
        if preprocessing["interpolation"] not in INTERPOLATIONS:
            raise DhkdError(
                f"{preprocessing.get('source', 'the weights')} preprocesses with {preprocessing['interpolation']} "
                f"interpolation; dhkd-pipe renders {' or '.join(INTERPOLATIONS)} only: pass a "
                "checkpoint file to use the data set's"
            )
        plan = replace(
            plan,
            resolution=int(preprocessing["resolution"]),
            crop_pct=float(preprocessing["crop_pct"]),
            interpolation=preprocessing["interpolation"],
            mean=tuple(preprocessing["mean"]),
            std=tuple(preprocessing["std"]),
        )
    return replace(plan, resolution=resolution) if resolution else plan


def describe_preprocessing(plan: ViewPlan, source: str) -> dict:
    """What a store records of how its views become pixels (the plan holds the same values)."""
    return {
        "source": source,
        "resolution": plan.resolution,
        "resize": round(plan.resolution / plan.crop_pct) if plan.policy != "pad_crop_flip" else None,
        "crop_pct": plan.crop_pct if plan.policy != "pad_crop_flip" else None,
        "interpolation": plan.interpolation,
        "antialias": True,
        "mean": None if plan.mean is None else list(plan.mean),
        "std": None if plan.std is None else list(plan.std),
    }


def center_boxes(sizes: np.ndarray, ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Centred boxes (y, x, h, w): the largest box within ``ratio`` (RandomResizedCrop's fallback)."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    in_ratio = width / height
    w = np.where(in_ratio < ratio[0], width, np.where(in_ratio > ratio[1], np.round(height * ratio[1]), width))
    h = np.where(in_ratio < ratio[0], np.round(width / ratio[0]), height)
    y = np.floor((height - h) / 2)
    x = np.floor((width - w) / 2)
    return np.stack([y, x, h, w], axis=1).astype(np.int64)


def validation_views(sizes: np.ndarray, resolution: int, policy: str, crop_pct: float = DEFAULT_CROP_PCT) -> np.ndarray:
    """Un-augmented views: the whole image for small data; for image folders the centred square of
    ``crop_pct`` of the shorter side, which is what resizing the shorter side to
    ``resolution / crop_pct`` and centre-cropping ``resolution`` covers (0.875: resize 256 / crop
    224). Returns (n, 5) int32, flip 0."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    out = np.zeros((len(sizes), 5), dtype=np.int32)
    if policy == "pad_crop_flip":
        out[:, 2:4] = sizes
    else:
        side = np.minimum(sizes[:, 0], sizes[:, 1])
        crop = np.maximum(1, np.round(side * crop_pct)).astype(np.int64)
        out[:, 0] = (sizes[:, 0] - crop) // 2
        out[:, 1] = (sizes[:, 1] - crop) // 2
        out[:, 2] = crop
        out[:, 3] = crop
    return out


_GROUPS_KEY = 0x67726F757073  # the Philox key word of the group membership ("groups"): never an epoch


@dataclass(frozen=True)
class UnitGroups:
    """Training orders in which each write unit of ``group_rows`` positions holds the same samples
    in every augmentation epoch, so that stage 1 can decode an image once for all its views.

    The samples are split once into groups (a permutation keyed by the seed alone, cut into
    ``group_rows``-sized groups; the remainder, if any, is the last group). Epoch ``e``'s order
    (keyed by (seed, e)) places the whole groups in a random order of unit positions, each
    shuffled within, and the remainder group shuffled in the last (short) unit. A sample's
    companions within a unit are the same every epoch; which ones meet in a batch, and when in
    the epoch, is drawn anew. With one group (N <= group_rows) the order is a plain permutation.
    """

    seed: int
    num_samples: int
    group_rows: int

    @property
    def num_groups(self) -> int:
        return -(-self.num_samples // self.group_rows)

    def members(self) -> np.ndarray:
        """(N,) int64: the samples of group ``g`` are ``members()[g * group_rows:(g + 1) * group_rows]``."""
        rng = np.random.Generator(np.random.Philox(key=[self.seed, _GROUPS_KEY]))
        return rng.permutation(self.num_samples).astype(np.int64)

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, unit): the epoch's training order (N,) and the unit position of each group (G,)."""
        members, g = self.members(), self.group_rows
        whole = self.num_samples // g
        rng = np.random.Generator(np.random.Philox(key=[self.seed, epoch]))
        unit = np.arange(self.num_groups, dtype=np.int64)
        unit[:whole] = rng.permutation(whole)  # group k sits at unit position unit[k]
        at = np.argsort(unit[:whole])  # the group at each unit position
        body = rng.permuted(members[: whole * g].reshape(whole, g)[at], axis=1).reshape(-1)
        tail = rng.permutation(members[whole * g :])
        return np.concatenate([body, tail]).astype(np.int64), unit


def cut_batches(pieces, batch_size: int, join=np.concatenate):
    """Pairs ``(a, b)`` of ``batch_size`` rows each (the last may be short), cut from a stream of
    such pairs of any length: a schedule's (indices, views), or stored (logits, scales), arriving
    chunk by chunk. ``b`` may be None throughout; ``join`` concatenates (``torch.cat`` for tensors)."""
    firsts, seconds, have = [], [], 0
    for a, b in pieces:
        firsts.append(a)
        seconds.append(b)
        have += len(a)
        while have >= batch_size:
            a = join(firsts) if len(firsts) > 1 else firsts[0]
            b = None if seconds[0] is None else (join(seconds) if len(seconds) > 1 else seconds[0])
            yield a[:batch_size], None if b is None else b[:batch_size]
            firsts, seconds, have = [a[batch_size:]], [None if b is None else b[batch_size:]], have - batch_size
    if have:
        yield join(firsts), None if seconds[0] is None else join(seconds)
