"""The logit store's codecs: how teacher logits are stored, one object per codec.

A codec encodes float32 (rows, K) logits into what the store holds (values, and for int8 a
float32 scale per row), bounds its round-trip error, and says its stored dtype and bytes per logit.
Adding a codec is one class here and one entry in ``_ALL``. Imports no torch or numpy at module
level, so the CLI's names and help cost nothing at start-up.
"""

from __future__ import annotations

from dhkd_pipe.errors import DhkdError

# Round-trip error bounds of the codecs (round to nearest):
FP16_RELATIVE_ERROR = 2.0**-11  # |x| in fp16's normal range (6.1e-5 .. 65504); below, 2^-25 absolute
FP16_ABSOLUTE_FLOOR = 2.0**-25
FP16_MAX = 65504.0
FP16_MAX_BITS = 0x7BFF  # its bits: above them (sign cleared) lie infinity and NaN
BF16_RELATIVE_ERROR = 2.0**-8  # 8-bit significand, fp32's exponent range
INT8_LEVELS = 127  # per-row scale max|row| / 127: absolute error <= scale / 2 = max|row| / 254


class Codec:
    """What every codec says about itself; subclasses fill in the encoding."""

    name: str
    stored_dtype: str  # numpy dtype name of the stored values
    dtype_name: str  # what the values mean, as ``inspect`` names it
    bytes_per_logit: int
    has_scale = False  # a float32 scale per row is stored beside the values
    fills_out = False  # encode writes its values into ``out`` when given one (otherwise ignores it)

    def encode(self, x, amax, out=None):
        """(stored values, float32 per-row scale or None) of float32 (rows, K) ``x`` whose rows'
        max|x| is ``amax`` (already checked finite). ``out``: an array of the stored dtype and
        ``x``'s shape to write the values into (a buffer the caller reuses), or None; only a
        codec with ``fills_out`` uses it (fp32's values are ``x`` itself, int8's come from
        temporaries of their own)."""
        raise NotImplementedError

    def tolerance(self, amax: float) -> float:
        """The largest absolute error of the round trip for logits with max|x| = ``amax``."""
        raise NotImplementedError

    def check_range(self, amax):
        """Refuses rows the codec cannot hold (beyond finiteness, checked for every codec)."""

    def encode_checked(self, x, where: str, out=None):
        """:meth:`encode` of float32 rows after :func:`check_encodable` has accepted them (it
        raises for rows the store must not hold)."""
        return self.encode(x, check_encodable(x, self.name, where), out)

    def __repr__(self):
        return f"<codec {self.name}>"


class Fp32(Codec):
    name, stored_dtype, dtype_name, bytes_per_logit = "fp32", "float32", "float32", 4

    def encode(self, x, amax, out=None):
        return x, None

    def tolerance(self, amax):
        return 0.0


class Fp16(Codec):
    name, stored_dtype, dtype_name, bytes_per_logit = "fp16", "float16", "float16", 2
    fills_out = True

    def encode(self, x, amax, out=None):
        import torch

        # torch's vectorised conversion: the same round-to-nearest-even bits as numpy's astype,
        # several times faster
        if out is None:
            return torch.from_numpy(x).to(torch.float16).numpy(), None
        torch.from_numpy(out).copy_(torch.from_numpy(x))
        return out, None

    def encode_checked(self, x, where: str, out=None):
        """Converts first, then checks the halves' bits: rounding is monotonic and 65504 is an
        fp16, so every row :func:`check_encodable` refuses (NaN, infinite, |x| > 65504) holds a
        half of magnitude 65504 or more, and only then are the float32 rows checked (refused or
        not exactly as before, with its message). The largest magnitude comes from two maxima
        of the halves' bits, no temporary: as uint16 a negative half's magnitude orders it (its
        sign bit set), as int16 a non-negative one's. One pass over the halves costs less than the
        two passes over the float32 rows a check before the conversion would make."""
        import numpy as np

        values, _ = self.encode(x, None, out)
        if (
            values.size
            and max(int(values.view(np.uint16).max()) & 0x7FFF, int(values.view(np.int16).max())) >= FP16_MAX_BITS
        ):
            check_encodable(x, self.name, where)
        return values, None

    def tolerance(self, amax):  # half an ulp of an 11-bit significand, plus the subnormal floor
        return amax * FP16_RELATIVE_ERROR + FP16_ABSOLUTE_FLOOR

    def check_range(self, amax):
        import numpy as np

        if not np.all(amax <= FP16_MAX):
            raise DhkdError(f"teacher logits exceed the fp16 range (|x| <= {FP16_MAX:g}); use --codec bf16 or fp32")


class Bf16(Codec):
    """Stored as uint16 bit patterns: Zarr and numpy have no bfloat16."""

    name, stored_dtype, dtype_name, bytes_per_logit = "bf16", "uint16", "bfloat16", 2
    fills_out = True

    def encode(self, x, amax, out=None):
        import numpy as np
        import torch

        if out is None:
            return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
        torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).copy_(torch.from_numpy(x))
        return out, None

    def tolerance(self, amax):
        return amax * BF16_RELATIVE_ERROR


class Int8(Codec):
    """One float32 scale per row, max|row| / 127 (1 for an all-zero row); q = rint(x / scale)."""

    name, stored_dtype, dtype_name, bytes_per_logit = "int8", "int8", "int8", 1
    has_scale = True

    def encode(self, x, amax, out=None):
        import numpy as np

        scale = (amax / np.float32(INT8_LEVELS)).astype(np.float32)
        scale[scale == 0] = 1.0
        q = np.clip(
            np.rint(x.astype(np.float64) / scale.astype(np.float64)[:, None]), -INT8_LEVELS, INT8_LEVELS
        ).astype(np.int8)
        return q, scale

    def tolerance(self, amax):  # max|row| / 254 for the worst row, plus float32 rounding of scale and of q * scale
        return amax / (2 * INT8_LEVELS) + amax * 2.0**-22


_ALL = (Fp16(), Bf16(), Fp32(), Int8())
_BY_NAME = {c.name: c for c in _ALL}
CODECS = tuple(_BY_NAME)  # the names, in the order the CLI offers them


def codec_named(name: str) -> Codec:
    """The codec called ``name``; an unknown name is a one-line error."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise DhkdError(f"unknown codec {name!r}: choose one of {', '.join(CODECS)}") from None


def codec_tolerance(codec: str, logits) -> float:
    """The largest absolute error the codec's round trip allows for these logits.

    fp32: 0. fp16: max|x| * 2^-11 (half an ulp, 11-bit significand) plus the subnormal floor
    2^-25. bf16: max|x| * 2^-8. int8 (per-row scale max|row|/127): max over rows of
    max|row| / 254, plus float32 rounding of the dequantising multiply.
    """
    import torch

    c = codec_named(codec)
    x = torch.as_tensor(logits).detach().float()
    if x.numel() == 0:
        return 0.0
    return c.tolerance(float(x.abs().max()))


def check_encodable(logits, codec: str, where: str = ""):
    """Refuses teacher logits the store must not hold: non-finite ones (they would poison every
    student trained from the store), and values beyond the codec's range. Returns max|row|.
    ``where``: how the message names the rows ("of the unit", "of the first batch")."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float32)
    # max|x| per row as |max(max x, -min x)|: the same floats (negation is exact, NaN propagates,
    # the outer abs makes -0 +0), without a temporary |x| as large as the rows
    amax = np.abs(np.maximum(x.max(axis=1), -x.min(axis=1))) if x.size else np.zeros(len(x), np.float32)
    if not np.all(np.isfinite(amax)):
        bad = int(np.flatnonzero(~np.isfinite(amax))[0])
        kind = "NaN" if np.isnan(x[bad]).any() else "infinite"
        raise DhkdError(
            f"teacher logits are not finite ({kind} in row {bad} {where}".rstrip()
            + "); check the teacher and its weights"
        )
    codec_named(codec).check_range(amax)
    return amax


def encode_logits(logits, codec: str, where: str = "of the unit", out=None):
    """(stored values, float32 per-row scale or None) of float32 (rows, K) logits; refuses what
    :func:`check_encodable` refuses (``where`` names the rows in its message). ``out``: see
    :meth:`Codec.encode`."""
    import numpy as np

    x = np.ascontiguousarray(logits, dtype=np.float32)
    return codec_named(codec).encode_checked(x, where, out)


class EncodedRows:
    """Rows already encoded by :func:`encode_logits` (stored values, and the int8 scale or None),
    handed to the store's writer as they are: a holder of many rows (stage 1's decode-once groups)
    keeps them at the codec's width instead of float32's."""

    __slots__ = ("values", "scale")

    def __init__(self, values, scale=None):
        self.values, self.scale = values, scale


def stored_tensor(values):
    """A CPU tensor sharing the stored bytes; uint16 (bfloat16 bit patterns) becomes bfloat16."""
    import numpy as np
    import torch

    values = np.ascontiguousarray(values)
    if values.dtype == np.uint16:
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def decode_logits(values, scale=None, device="cpu"):
    """float32 (rows, K) logits on ``device`` from what ``LogitCache.read_chunk`` returns.

    The stored bytes move to the device first and are widened there: float16 / float32 as is,
    uint16 as bfloat16 bit patterns, int8 by ``teacher_logits.dequantize`` (float32 ``q * scale[:, None]``,
    ``scale`` float32 (rows,)), the formula the kernels' teacher-row loader computes too.
    """
    import numpy as np
    import torch

    from dhkd_pipe.teacher_logits import dequantize

    t = stored_tensor(values) if isinstance(values, np.ndarray) else values
    if t.dtype in (torch.int16, torch.uint16):
        t = t.view(torch.bfloat16)
    t = t.to(device)
    if t.dtype == torch.int8:
        if scale is None:
            raise ValueError("int8 logits need their per-row scale")
        scale = (
            torch.from_numpy(np.ascontiguousarray(scale)) if isinstance(scale, np.ndarray) else torch.as_tensor(scale)
        )
    return dequantize(t, scale)
