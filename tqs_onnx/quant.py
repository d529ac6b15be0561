"""Round-to-nearest symmetric quantization shared by the probes and the writer.

int1 is sign quantization: +-scale with scale the group's mean absolute value, computed in float64
and rounded once to the scale's type (the device probe does the same, so both agree).

The sweep's measured damage and the written graph must see the same values, so both call
`quantize` / `dequantize` here; DequantizeLinear computes q * scale in the scale's float type,
which `dequantize` reproduces bit for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from tqs_onnx.errors import TqsError
from tqs_onnx.tiers import Tier, high_name, stored_names

_STORAGE = {"int8": np.int8, "int6": np.int8, "int4": ml_dtypes.int4, "int2": ml_dtypes.int2}
_FLOAT_STORAGE = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}


# Clipping ratios an `/mse` tier tries per scale group (1 first: ties keep plain round-to-nearest).
CLIP_RATIOS = np.linspace(1.0, 0.3, 29, dtype=np.float32)


def _grouped(a: np.ndarray, tier: Tier, channel_axis: int | None,
             block_axis: int | None) -> tuple[np.ndarray, tuple[int, ...], str]:
    """`a` arranged so that reducing over the returned axes (keepdims) gives one value per scale group:
    blocked tensors are zero-padded to whole blocks and split (..., nblocks, block, ...)."""
    gran = tier.granularity_for(channel_axis, block_axis) if a.ndim else "tensor"
    if gran == "tensor":
        return a, tuple(range(a.ndim)), gran
    if gran == "channel":
        return a, tuple(i for i in range(a.ndim) if i != channel_axis), gran
    bs = tier.block_size
    d = a.shape[block_axis]
    nblocks = -(-d // bs)
    if nblocks * bs != d:
        widths = [(0, 0)] * a.ndim
        widths[block_axis] = (0, nblocks * bs - d)
        a = np.pad(a, widths)
    return a.reshape(a.shape[:block_axis] + (nblocks, bs) + a.shape[block_axis + 1:]), (block_axis + 1,), gran


def _group_view(w: np.ndarray, tier: Tier, channel_axis: int | None, block_axis: int | None) -> np.ndarray:
    """Absolute max per scale group (int1: mean absolute value, float64), kept dims in the grouped
    layout of `_grouped`."""
    mean = tier.is_sign
    a, axes, gran = _grouped(np.abs(w.astype(np.float64 if mean else np.float32, copy=False)),
                             tier, channel_axis, block_axis)
    if not a.size:
        return np.zeros([1] * a.ndim, a.dtype)
    if not mean:
        return a.max(axis=axes, keepdims=True)
    if gran != "block":
        return a.mean(axis=axes, keepdims=True)
    # the last block averages its real elements only
    d, bs = w.shape[block_axis], tier.block_size
    counts = np.full(a.shape[block_axis], bs, np.float64)
    counts[-1] = d - (a.shape[block_axis] - 1) * bs
    counts = counts.reshape([-1 if i == block_axis else 1 for i in range(a.ndim)])
    return a.sum(axis=axes, keepdims=True) / counts


def _scales_from_amax(amax: np.ndarray, tier: Tier, dtype: np.dtype) -> np.ndarray:
    """amax / qmax (1 for an all-zero group), rounded to the stored scale type (fp16 with its floor)."""
    if tier.is_sign:  # a zero group keeps scale 0: its signs then dequantize to 0
        scale = amax.astype(np.float32)
        if tier.scale_fmt == "fp16":
            scale = scale.astype(np.float16)
    else:
        scale = np.where(amax > 0, amax / np.float32(tier.qmax), np.float32(1.0)).astype(np.float32)
    if tier.scale_fmt == "fp16" and not tier.is_sign:
        scale = np.maximum(scale.astype(np.float16), np.float16(tier.scale_floor))
    return scale.astype(dtype)


def _clipped_scales(w: np.ndarray, amax: np.ndarray, tier: Tier, channel_axis: int | None,
                    block_axis: int | None, dtype: np.dtype) -> np.ndarray:
    """Per group, the scale of the CLIP_RATIOS ratio with the least squared rounding error."""
    wg, axes, _ = _grouped(w.astype(np.float32, copy=False), tier, channel_axis, block_axis)
    best_scale = _scales_from_amax(amax, tier, dtype)
    best_err = None
    for r in CLIP_RATIOS:
        scale = best_scale if best_err is None else _scales_from_amax(amax * r, tier, dtype)
        s = scale.astype(np.float32)
        err = np.square(np.clip(np.rint(wg / s), -tier.qmax, tier.qmax) * s - wg).sum(axis=axes, keepdims=True)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    return best_scale


def group_scales(w: np.ndarray, tier: Tier, channel_axis: int | None, block_axis: int | None) -> np.ndarray:
    """One scale per group, kept dims in the grouped layout of `_grouped` (what the device probe
    broadcasts against the weight; `scales_for` gives DequantizeLinear's layout)."""
    amax = _group_view(w, tier, channel_axis, block_axis)
    dtype = _scale_dtype(w, tier)
    if tier.mse and w.size:
        return _clipped_scales(w, amax, tier, channel_axis, block_axis, dtype)
    return _scales_from_amax(amax, tier, dtype)


def scales_for(w: np.ndarray, tier: Tier, channel_axis: int | None, block_axis: int | None) -> np.ndarray:
    """Scales with the shape DequantizeLinear expects (scalar, 1-D per axis, or blocked)."""
    scale = group_scales(w, tier, channel_axis, block_axis)
    gran = tier.granularity_for(channel_axis, block_axis) if w.ndim else "tensor"
    if gran == "tensor" or scale.size == 1:  # one scale is per-tensor, whatever the tier says
        return scale.reshape(())
    if gran == "channel":
        return scale.reshape(-1)
    return scale.squeeze(axis=block_axis + 1)


def _scale_dtype(w: np.ndarray, tier: Tier) -> np.dtype:
    if w.dtype == np.float16 or tier.scale_fmt == "fp16":
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def _broadcast_scale(scale: np.ndarray, w_shape: tuple[int, ...], tier: Tier,
                     channel_axis: int | None, block_axis: int | None) -> np.ndarray:
    if scale.ndim == 0:
        return scale
    if tier.granularity_for(channel_axis, block_axis) == "channel":
        shape = [1] * len(w_shape)
        shape[channel_axis] = -1
        return scale.reshape(shape)
    rep = np.repeat(scale, tier.block_size, axis=block_axis)
    return np.take(rep, np.arange(w_shape[block_axis]), axis=block_axis)


def broadcast_scales(w: np.ndarray, tier: Tier, channel_axis: int | None,
                     block_axis: int | None) -> np.ndarray:
    """Each element's scale, w's shape (float32): what `quantize` divides by."""
    scale = scales_for(w, tier, channel_axis, block_axis)
    s = _broadcast_scale(scale, w.shape, tier, channel_axis, block_axis).astype(np.float32)
    return np.broadcast_to(s, w.shape)


def quantize(w: np.ndarray, tier: Tier, channel_axis: int | None = None,
             block_axis: int | None = None, codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer tier: (q in the storage dtype, scale). Symmetric grid [-qmax, qmax], zero point 0.

    int1: q is the signs as int8 +-1 (0 counts as +); `stored` packs them for the file.
    `codes`: the integers of a `/gptq` tier (`rounding.Rounding`), stored with the same scales.
    """
    scale = scales_for(w, tier, channel_axis, block_axis)
    if codes is not None:
        if codes.dtype.kind not in "iu":
            raise TqsError(f"tier {tier}: codes must be integers, not {codes.dtype}")
        if codes.shape != w.shape or codes.size and int(np.abs(codes.astype(np.int64)).max()) > tier.qmax:
            raise TqsError(f"tier {tier}: codes of shape {list(codes.shape)} (at most {tier.qmax} in magnitude "
                           f"expected) for a weight of shape {list(w.shape)}")
        return np.asarray(codes, np.int8).astype(_STORAGE[tier.fmt]), scale
    if tier.is_sign:
        return np.where(w >= 0, 1, -1).astype(np.int8), scale
    s = _broadcast_scale(scale, w.shape, tier, channel_axis, block_axis).astype(np.float32)
    q = np.clip(np.rint(w.astype(np.float32) / s), -tier.qmax, tier.qmax).astype(np.int8)
    return q.astype(_STORAGE[tier.fmt]), scale


def stored(q: np.ndarray, tier: Tier) -> np.ndarray:
    """The integer tensor as the file holds it: int1 signs packed 8 per uint8 byte (element 8j+k at
    bit k of byte j), shape (bytes, 1); other formats as they are (int6: see `stored_parts`)."""
    if tier.is_sign:
        return np.packbits(q.ravel() > 0, bitorder="little").reshape(-1, 1)
    return q


def stored_parts(name: str, q: np.ndarray, tier: Tier) -> list[tuple[str, np.ndarray]]:
    """(initializer name, array) of every integer tensor the file holds for weight `name`: one, or for
    int6 the low 4 bits (uint4) and the high 2 bits (uint2) of u = q + 32."""
    if tier.is_packed6:
        u = (q.astype(np.int16) + 32).astype(np.uint8)
        return [(stored_names(name)[0], (u & 15).astype(ml_dtypes.uint4)),
                (high_name(name), (u >> 4).astype(ml_dtypes.uint2))]
    return [(stored_names(name)[0], stored(q, tier))]


def dequantize(q: np.ndarray, scale: np.ndarray, tier: Tier, channel_axis: int | None = None,
               block_axis: int | None = None, dtype: np.dtype | None = None) -> np.ndarray:
    """What the written graph computes: q * scale in `dtype` (default the scale's type). The writer
    casts fp16 scales of a float32 weight to float32 before DequantizeLinear, so pass float32 there."""
    s = _broadcast_scale(scale, q.shape, tier, channel_axis, block_axis)
    s = s.astype(dtype or s.dtype)
    return (q.astype(np.int8).astype(s.dtype) * s).astype(s.dtype)


def to_storage(w: np.ndarray, tier: Tier) -> np.ndarray:
    """Float tier: the stored low-precision array (fp16 / bf16)."""
    with np.errstate(over="ignore"):  # beyond the format: inf, as the sweep measured (rewrite notes it)
        return w.astype(_FLOAT_STORAGE[tier.fmt])


def apply_tier(w: np.ndarray, tier: Tier, channel_axis: int | None = None,
               block_axis: int | None = None, codes: np.ndarray | None = None) -> np.ndarray:
    """The values the written graph computes with for `w` at `tier`, in w's dtype (`codes`: see quantize)."""
    if tier.is_identity:
        return w
    if tier.is_zero:
        return np.zeros_like(w)
    if not tier.is_int:
        return to_storage(w, tier).astype(w.dtype)
    q, scale = quantize(w, tier, channel_axis, block_axis, codes)
    return dequantize(q, scale, tier, channel_axis, block_axis, w.dtype).astype(w.dtype)
