"""Precision tiers: (format, scale granularity) pairs with their true storage cost.

Tier strings:  fp32 | fp16 | bf16 | int8 | int6 | int4 | int2 | int1 | zero, the int formats optionally followed by
a granularity and a scale type: ``int8`` (per-tensor, as the paper), ``int4/channel``,
``int4/block32``, ``int8/channel/fp16`` (fp16 scales), ``int4/channel/mse`` (clipped scales, below). ``zero`` drops the weight: the graph makes a
tensor of zeros of its shape (ConstantOfShape), which stores no data; it is meant for dead blocks,
whose measured damage is nil. ``int1`` keeps each weight's sign and one scale per group, the mean
absolute value (the L2-best scale for signs); ONNX has no 1-bit type, so the signs are packed eight to
a uint8 byte and unpacked in the graph by BitShift before DequantizeLinear. ``int6`` is the symmetric
6-bit grid [-31, 31]; ONNX has no 6-bit type either, so u = q + 32 is stored as two planes of the
weight's shape, its low 4 bits (uint4) and its high 2 bits (uint2), joined in the graph (Cast, BitShift,
BitwiseOr) into uint8 for DequantizeLinear with zero point 32. ORT folds both unpackings at load. Storage counts the packed integers and every scale, so a plan's planned
size is what the written file holds.

A ``/load`` suffix on an integer tier (``int4/channel/load``) stores the same tensors but decodes them
with Cast, Sub and Mul instead of DequantizeLinear. ORT's constant folding evaluates that once at load,
so the model runs the FP32 model's own float kernels (its speed, its memory after load) from a compact
file; DequantizeLinear is fused into MatMulNBits instead (less memory, but on small CPU MatMuls slower
than FP32). The values are the same to the bit, so the sweep's damage of the plain tier serves both.

An ``/mse`` option clips: each scale group's scale is r * amax / qmax with the ratio r from a fixed grid
(1 down to 0.3) that minimizes the group's squared rounding error, instead of r = 1 (plain
round-to-nearest). It stores exactly what the plain tier stores (the scales are just other numbers), so
the allocator can choose it per block where the sweep measured it to do less damage.

A ``/gptq`` option (``int4/channel/gptq``) keeps the plain tier's grid and scales and chooses the
integers GPTQ's way, on the inputs the weight meets along the model's own nominal rollouts
(`tqs_onnx.rounding`); it also stores exactly what the plain tier stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tqs_onnx.errors import TqsError

FLOAT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16}
INT_BITS = {"int8": 8, "int6": 6, "int4": 4, "int2": 2, "int1": 1}
ZERO = "zero"  # the weight dropped to zeros: no stored data
# Lowest opset whose DequantizeLinear accepts the storage type (and blocked scales, opset 21).
INT_MIN_OPSET = {"int8": 13, "int6": 25, "int4": 21, "int2": 25, "int1": 13}
BLOCKED_MIN_OPSET = 21
# Float tiers: a Cast from float16 exists since opset 6, from bfloat16 since 13; zeros need 9 (fp32, the
# identity, is never converted for).
FLOAT_MIN_OPSET = {"fp32": 6, "fp16": 6, "bf16": 13, "zero": 9}
FP16_SCALE_MIN_OPSET = 19  # DequantizeLinear takes float16 scales from opset 19


@dataclass(frozen=True)
class Tier:
    """One precision tier. `granularity` is 'tensor', 'channel' or 'block' (int formats only)."""

    fmt: str
    granularity: str = "tensor"
    block_size: int = 0
    scale_fmt: str = "fp32"
    at_load: bool = False  # decoded by Cast/Mul, which ORT folds at load, instead of DequantizeLinear
    mse: bool = False  # scales clipped to the squared-error-best ratio of each group's absolute max
    gptq: bool = False  # integers rounded GPTQ's way on the nominal rollouts' inputs (rounding.py)
    half_weight: bool = False  # a float16 weight's own float16 scales (for_weight): not named, see scale_floor

    def __post_init__(self) -> None:
        for option in ("mse", "gptq"):
            if getattr(self, option) and (not self.is_int or self.is_sign):
                raise TqsError(f"tier {self.fmt}: {option} applies to the int8/int6/int4/int2 grids only")

    @property
    def base(self) -> "Tier":
        """The same values written with DequantizeLinear (what the sweep measures for both forms)."""
        return replace(self, at_load=False)

    @property
    def bits(self) -> int:
        return 0 if self.is_zero else FLOAT_BITS.get(self.fmt) or INT_BITS[self.fmt]

    @property
    def is_int(self) -> bool:
        return self.fmt in INT_BITS

    @property
    def is_zero(self) -> bool:
        """The weight dropped to zeros: nothing stored, nothing read."""
        return self.fmt == ZERO

    @property
    def is_identity(self) -> bool:
        return self.fmt == "fp32"

    @property
    def is_sign(self) -> bool:
        """int1: the weight's sign times its group's mean absolute value."""
        return self.fmt == "int1"

    @property
    def is_packed6(self) -> bool:
        """int6: u = q + 32 stored as a uint4 plane (low bits) and a uint2 plane (high bits)."""
        return self.fmt == "int6"

    @property
    def scale_floor(self) -> float:
        """Smallest float16 scale: float16's smallest normal (6.1e-5) for the fp16 scales of a float32
        weight; the smallest subnormal (6e-8) for a float16 weight's scales, whose values may be that small
        (at the normal floor an int8 channel whose largest value is below 7.9e-3 got a coarser grid)."""
        return 2.0 ** -24 if self.half_weight else 6.2e-5

    @property
    def qmax(self) -> int:
        """Largest magnitude of the symmetric integer grid [-qmax, qmax] (int1: the signs, +-1)."""
        return 1 if self.is_sign else 2 ** (self.bits - 1) - 1

    @property
    def min_opset(self) -> int:
        if not self.is_int:
            return FLOAT_MIN_OPSET[self.fmt]
        base = INT_MIN_OPSET[self.fmt]
        if self.scale_fmt == "fp16":
            base = max(base, FP16_SCALE_MIN_OPSET)
        return max(base, BLOCKED_MIN_OPSET) if self.granularity == "block" else base

    def __str__(self) -> str:
        if not self.is_int:
            return self.fmt
        parts = [self.fmt]
        if self.granularity == "channel":
            parts.append("channel")
        elif self.granularity == "block":
            parts.append(f"block{self.block_size}")
        if self.scale_fmt != "fp32":
            parts.append(self.scale_fmt)
        if self.mse:
            parts.append("mse")
        if self.gptq:
            parts.append("gptq")
        if self.at_load:
            parts.append("load")
        return "/".join(parts)

    def granularity_for(self, channel_axis: int | None, block_axis: int | None) -> str:
        """The granularity actually used: per-tensor when the tensor has no axis for it (e.g. a bias)."""
        if self.granularity == "channel" and channel_axis is None or self.granularity == "block" and block_axis is None:
            return "tensor"
        return self.granularity

    def scale_count(self, shape: tuple[int, ...], channel_axis: int | None, block_axis: int | None) -> int:
        """Number of scales this tier stores for a tensor of `shape`."""
        gran = self.granularity_for(channel_axis, block_axis) if shape else "tensor"
        if gran == "tensor":
            return 1
        if gran == "channel":
            return shape[channel_axis]
        n = math.prod(shape) // shape[block_axis]
        return n * math.ceil(shape[block_axis] / self.block_size)

    def storage_bytes(self, shape: tuple[int, ...], channel_axis: int | None = None,
                      block_axis: int | None = None, orig_bits: int = 32) -> int:
        """Bytes this tier stores for one tensor: packed values plus scales (as ONNX packs them)."""
        n = math.prod(shape)
        if self.fmt == "fp32":
            return n * orig_bits // 8
        if self.is_zero:
            return 0
        if not self.is_int:
            return n * 2
        scale_bytes = 2 if self.scale_fmt == "fp16" else 4
        return packed_bytes(self, n) + self.scale_count(shape, channel_axis, block_axis) * scale_bytes


DECODES = ("auto", "dq", "load", "load-compact")
MAX_BLOCK = 1 << 20  # blocked scales: one per this many weights at most (a block of a whole large row)
# What `sweep --tiers` measures by default (the demo and the benchmarks too).
DEFAULT_SWEEP_TIERS = ("bf16,int8,int8/channel,int6/channel,int4,int4/channel,int2,int2/channel,"
                       "int8/channel/gptq,int6/channel/gptq,int4/channel/gptq,int2/channel/gptq")
FUSED_CONSUMERS = {"MatMul", "Gemm"}  # ORT fuses DequantizeLinear of their 2-D B weight into MatMulNBits


def fusable_block(size: int) -> bool:
    """MatMulNBits takes blocks of a power of two, 16 and up: ORT leaves DequantizeLinear with other
    blocks unfused (tools/check_fusion_prediction.py)."""
    return size >= 16 and size & (size - 1) == 0


def written_form(tier: Tier, consumer_ops: list[str], shape: tuple[int, ...], decode: str = "auto",
                 fused_dq: bool | None = None, const_lookup: bool = False, n_axis: int | None = None) -> Tier:
    """The form `tier` is written in for one weight. decode 'dq': DequantizeLinear; 'load': the `/load`
    form, decoded once at load; 'auto': DequantizeLinear where ORT fuses it and for lookup tables behind
    constant indices (below), else `/load`, so no other weight is dequantized on every call (Conv, LSTM
    and Add tables have no fused kernel for float activations with integer weights); 'load-compact':
    `/load` except for those lookup tables (the FP32 kernels, where MatMulNBits is slower than them,
    as on small-CPU MatMuls, with the tables kept compact).

    ORT fuses a 2-D weight read, as stored, only as B of main-graph MatMul/Gemm nodes (`fused_dq`, from
    the weight table; without it, scores of earlier versions: every consumer op a MatMul/Gemm), and
    blocked scales only for blocks `fusable_block` allows; an int2 weight whose output count (the
    size along `n_axis`, its channel axis; default the last) is not a multiple of 4 is written decoded
    at load, where ORT 1.31's fused 2-bit kernel computes wrong values. A table
    read by a Gather through constant indices (`const_lookup`: the factored lookup tables) decoded at
    load is folded by ORT through the Gather into the expanded FP32 tensor, the memory of the unfactored
    model (H100, full Pangu replica: 2.77 GB of GPU memory, as FP32); DequantizeLinear then Gather on
    every call keeps it compact, for one small Gather per table."""
    if decode not in DECODES:
        raise TqsError(f"decode must be one of {', '.join(DECODES)}, not '{decode}'")
    if not tier.is_int or tier.at_load:
        return tier
    if fused_dq is None:
        fused_dq = len(shape) == 2 and bool(consumer_ops) and set(consumer_ops) <= FUSED_CONSUMERS
    if tier.granularity == "block" and not fusable_block(tier.block_size):
        fused_dq = False
    # ORT 1.31's 2-bit MatMulNBits miscomputes N % 4 != 0 (apply would refuse it): decoded at load,
    # with --decode dq too.
    bad_int2 = tier.fmt == "int2" and bool(shape) and shape[-1 if n_axis is None else n_axis] % 4 != 0
    if decode == "dq":
        return replace(tier, at_load=True) if fused_dq and bad_int2 else tier
    if bad_int2:
        fused_dq = False
    if decode == "auto" and (fused_dq or const_lookup) or decode == "load-compact" and const_lookup:
        return tier
    return replace(tier, at_load=True)


def for_weight(tier: Tier, dtype: str) -> Tier:
    """The tier as a weight of `dtype` stores it: a float16 weight's integer tiers keep float16 scales
    (DequantizeLinear returns the scale's type; a float32 scale would make a float32 weight), floored at
    float16's smallest subnormal, and its `fp16` tier is the weight as stored. The sweep, the planner and
    the writer all quantize with this tier, so the values and sizes agree."""
    if dtype != "float16":
        return tier
    if tier.is_int:
        return replace(tier, scale_fmt="fp16", half_weight=True)
    return Tier("fp32") if tier.fmt == "fp16" else tier  # fp16: the weight as stored


def needed_opset(tier: Tier, fp16_weight: bool = False) -> int:
    """Opset the written graph needs for `tier` on a weight: an integer tier of a float16 weight has
    float16 scales, which DequantizeLinear takes from opset 19."""
    if tier.is_int and fp16_weight:
        return max(tier.min_opset, FP16_SCALE_MIN_OPSET)
    return tier.min_opset


def parse_tier(text: str) -> Tier:
    """Parse a tier string such as 'int4/block32/fp16'; raise TqsError on anything else."""
    parts = [p for p in text.strip().lower().split("/") if p]
    if not parts:
        raise TqsError("empty tier name")
    fmt = parts[0]
    if fmt in FLOAT_BITS or fmt == ZERO:
        if len(parts) > 1:
            raise TqsError(f"tier '{text}': {fmt} takes no granularity")
        return Tier(fmt)
    if fmt not in INT_BITS:
        raise TqsError(f"unknown tier '{text}' (formats: {', '.join([*FLOAT_BITS, *INT_BITS, ZERO])})")
    granularity, block, scale_fmt, at_load, mse, gptq = "tensor", 0, "fp32", False, False, False
    seen: dict[str, str] = {}
    for p in parts[1:]:
        kind = ("granularity" if p in ("tensor", "channel") or p.startswith("block") else
                "scale type" if p in ("fp16", "fp32") else p)
        if kind in seen:
            raise TqsError(f"tier '{text}': " + (f"option '{p}' given twice" if seen[kind] == p
                                                  else f"'{seen[kind]}' and '{p}' both set its {kind}"))
        seen[kind] = p
        if p == "load":
            at_load = True
        elif p in ("mse", "gptq"):
            if fmt == "int1":
                raise TqsError(f"tier '{text}': int1 keeps each weight's sign; {p} does not apply")
            mse, gptq = mse or p == "mse", gptq or p == "gptq"
        elif p in ("tensor", "channel"):
            granularity = p
        elif p.startswith("block") and p[5:].isascii() and p[5:].isdigit() and 2 <= int(p[5:]) <= MAX_BLOCK:
            granularity, block = "block", int(p[5:])
        elif p.startswith("block") and p[5:].isascii() and p[5:].isdigit():
            raise TqsError(f"tier '{text}': block size must be 2 to {MAX_BLOCK}")
        elif p in ("fp16", "fp32"):
            scale_fmt = p
        else:
            raise TqsError(f"tier '{text}': unknown option '{p}' (tensor, channel, blockN, fp16, fp32, mse, gptq, "
                           f"load)")
    return Tier(fmt, granularity, block, scale_fmt, at_load, mse, gptq)


def parse_tiers(text: str) -> list[Tier]:
    """Parse a comma-separated tier list, highest precision first by storage bits."""
    tiers = [parse_tier(t) for t in text.split(",") if t.strip()]
    if not tiers:
        raise TqsError("no tiers given")
    if len(set(tiers)) != len(tiers):
        raise TqsError(f"duplicate tiers in '{text}'")
    return sorted(tiers, key=lambda t: (-t.bits, t.granularity == "tensor"))


def packed_bytes(tier: Tier, n: int) -> int:
    """Bytes of an integer tier's stored values for n weights (int6: a uint4 and a uint2 plane)."""
    if tier.is_packed6:
        return math.ceil(n / 2) + math.ceil(n / 4)
    return math.ceil(n * tier.bits / 8)


def high_name(name: str) -> str:
    """Name of an int6 weight's high plane (its low plane takes `stored_names(name)[0]`)."""
    return f"{name}__qhi"


def stored_names(name: str) -> tuple[str, str]:
    """Names the writer gives a quantized weight's integer tensor and its scale."""
    return f"{name}__q", f"{name}__scale"


def stored_int_form(tier: Tier, shape: tuple[int, ...]) -> tuple[int, list[int]]:
    """(ONNX data type, dims) of an integer tier's stored tensor: int1 packs 8 signs per uint8 byte."""
    import onnx

    if tier.is_sign:
        return onnx.TensorProto.UINT8, [-(-math.prod(shape) // 8), 1]
    if tier.is_packed6:  # the low plane (the high plane: UINT2, same dims)
        return onnx.TensorProto.UINT4, list(shape)
    dtype = {"int8": onnx.TensorProto.INT8, "int4": onnx.TensorProto.INT4, "int2": onnx.TensorProto.INT2}[tier.fmt]
    return dtype, list(shape)


def _unpack_sign_nodes(name: str, shape: tuple[int, ...], out: str) -> list:
    """Packed signs (uint8 [m, 1], element 8j+k at bit k of byte j) -> uint8 {0, 2} of `shape`.

    DequantizeLinear with zero point 1 then gives -scale / +scale: (x - 1) * scale.
    """
    import onnx
    from onnx import helper

    n = math.prod(shape)
    u8 = onnx.TensorProto.UINT8

    def const(tag: str, dtype: int, values: list[int]) -> onnx.NodeProto:
        t = helper.make_tensor(f"{name}__{tag}", dtype, [len(values)], values)
        return helper.make_node("Constant", [], [f"{name}__{tag}"], name=f"{name}/{tag}", value=t)

    q = stored_names(name)[0]
    nodes = [const("shl", u8, list(range(7, -1, -1))), const("c7", u8, [7]), const("c1", u8, [1]),
             const("shape", onnx.TensorProto.INT64, list(shape)),
             helper.make_node("BitShift", [q, f"{name}__shl"], [f"{name}__top"], name=f"{name}/Top", direction="LEFT"),
             helper.make_node("BitShift", [f"{name}__top", f"{name}__c7"], [f"{name}__bit"], name=f"{name}/Bit",
                              direction="RIGHT"),
             helper.make_node("BitShift", [f"{name}__bit", f"{name}__c1"], [f"{name}__two"], name=f"{name}/Two",
                              direction="LEFT")]
    flat = f"{name}__two"
    if n % 8:  # the last byte's spare bits
        nodes += [const("flat", onnx.TensorProto.INT64, [-1]), const("n", onnx.TensorProto.INT64, [n]),
                  const("z", onnx.TensorProto.INT64, [0]),
                  helper.make_node("Reshape", [flat, f"{name}__flat"], [f"{name}__all"], name=f"{name}/Flat"),
                  helper.make_node("Slice", [f"{name}__all", f"{name}__z", f"{name}__n"], [f"{name}__used"],
                                   name=f"{name}/Used")]
        flat = f"{name}__used"
    nodes.append(helper.make_node("Reshape", [flat, f"{name}__shape"], [out], name=f"{name}/Unpack"))
    return nodes


def _unpack_int6_nodes(name: str, shape: tuple[int, ...], out: str) -> list:
    """int6 planes (uint4 low bits, uint2 high bits of u = q + 32) -> uint8 u: lo | (hi << 4)."""
    import onnx
    from onnx import helper

    u8 = onnx.TensorProto.UINT8
    lo, hi = stored_names(name)[0], high_name(name)
    four = helper.make_tensor(f"{name}__c4", u8, [1], [4])
    return [helper.make_node("Constant", [], [f"{name}__c4"], name=f"{name}/c4", value=four),
            helper.make_node("Cast", [lo], [f"{name}__lo8"], name=f"{name}/CastLow", to=u8),
            helper.make_node("Cast", [hi], [f"{name}__hi8"], name=f"{name}/CastHigh", to=u8),
            helper.make_node("BitShift", [f"{name}__hi8", f"{name}__c4"], [f"{name}__hi16"], name=f"{name}/Shift",
                             direction="LEFT"),
            helper.make_node("BitwiseOr", [f"{name}__lo8", f"{name}__hi16"], [out], name=f"{name}/Join")]


def rewrite_nodes(name: str, tier: Tier, scale_rank: int, axes: tuple[int | None, int | None],
                  orig_type: int = 1, shape: tuple[int, ...] = ()) -> list:
    """Nodes that recreate weight `name` from its stored form (shared by the writer and the planner).

    DequantizeLinear returns the scale's type, so fp16 scales of a float32 weight are cast to float32
    first: ORT folds that Cast at load, the weight is rebuilt in float32 (q * float(scale)), and the
    DequantizeLinear still fuses into MatMulNBits (a Cast after it would not).
    `shape` is needed by the zero, int1 and int6 tiers (their nodes hold it).
    """
    import onnx

    if tier.is_zero:
        dims = onnx.helper.make_tensor(f"{name}__shape", onnx.TensorProto.INT64, [len(shape)], list(shape))
        zero = onnx.helper.make_tensor("value", orig_type, [1], [0])
        return [onnx.helper.make_node("Constant", [], [f"{name}__shape"], name=f"{name}/Shape", value=dims),
                onnx.helper.make_node("ConstantOfShape", [f"{name}__shape"], [name], name=f"{name}/Zero",
                                      value=zero)]
    if not tier.is_int:
        return [onnx.helper.make_node("Cast", [f"{name}__{tier.fmt}"], [name], name=f"{name}/Cast", to=orig_type)]
    q, s = stored_names(name)
    nodes, zero_point, zp = [], [], 0
    if tier.is_sign or tier.is_packed6:
        unpacked = f"{name}__signs" if tier.is_sign else f"{name}__u6"
        nodes = (_unpack_sign_nodes if tier.is_sign else _unpack_int6_nodes)(name, shape, unpacked)
        zp = 1 if tier.is_sign else 32
        if not tier.at_load:
            nodes += [onnx.helper.make_node("Shape", [s], [f"{name}__sshape"], name=f"{name}/ScaleShape"),
                      onnx.helper.make_node("ConstantOfShape", [f"{name}__sshape"], [f"{name}__zp"],
                                            name=f"{name}/ZeroPoint",
                                            value=onnx.helper.make_tensor("value", onnx.TensorProto.UINT8, [1], [zp]))]
        q, zero_point = unpacked, [f"{name}__zp"]
    scale = s
    # A float16 weight's `/load` decode computes in float32 and casts the product back: ORT's CPU provider
    # has no float16 Mul to fold, so a float16 chain ran on every call (4.4x the reference per call). The
    # values are the same to the bit: q * scale is exact in float32 (an 8-bit integer times an 11-bit
    # significand) and one rounding to float16 follows, as float16's Mul rounds the exact product.
    half_at_load = tier.at_load and orig_type == onnx.TensorProto.FLOAT16
    if tier.scale_fmt == "fp16" and (orig_type != onnx.TensorProto.FLOAT16 or half_at_load):
        scale = f"{name}__scale32"
        nodes.append(onnx.helper.make_node("Cast", [s], [scale], name=f"{name}/CastScale",
                                           to=onnx.TensorProto.FLOAT if half_at_load else orig_type))
    if half_at_load:
        return nodes + _decode_at_load_nodes(name, tier, q, scale, zp, shape, axes, onnx.TensorProto.FLOAT,
                                             f"{name}__f32") + [
            onnx.helper.make_node("Cast", [f"{name}__f32"], [name], name=f"{name}/CastHalf", to=orig_type)]
    if tier.at_load:
        return nodes + _decode_at_load_nodes(name, tier, q, scale, zp, shape, axes, orig_type)
    attrs = {}
    if tier.granularity == "channel" and scale_rank == 1:
        attrs["axis"] = axes[0]
    elif tier.granularity == "block" and scale_rank > 0:
        attrs["axis"], attrs["block_size"] = axes[1], tier.block_size
    nodes.append(onnx.helper.make_node("DequantizeLinear", [q, scale, *zero_point], [name],
                                       name=f"{name}/DequantizeLinear", **attrs))
    return nodes


def load_scale_dims(tier: Tier, shape: tuple[int, ...], axes: tuple[int | None, int | None]) -> list[int] | None:
    """Dims of a `/load` tier's stored scales, shaped to broadcast against the weight (per channel:
    [C, 1, ...]; blocked: a unit axis after the block axis, for Expand); None when one scale is stored."""
    gran = tier.granularity_for(*axes) if shape else "tensor"
    if gran == "tensor" or tier.scale_count(shape, *axes) == 1:
        return None
    if gran == "channel":
        return [shape[axes[0]]] + [1] * (len(shape) - 1 - axes[0])
    b = axes[1]
    return [*shape[:b], -(-shape[b] // tier.block_size), 1, *shape[b + 1:]]


def _decode_at_load_nodes(name: str, tier: Tier, q: str, scale: str, zero_point: int, shape: tuple[int, ...],
                          axes: tuple[int | None, int | None], orig_type: int, out: str | None = None) -> list:
    """`out` (default `name`) = (float(q) - zero_point) * scale with Cast, Sub, Mul (and Expand/Reshape/
    Slice for blocked scales): the values DequantizeLinear gives, from standard ops that ORT's constant
    folding evaluates once at load. The model then runs float kernels at FP32 speed and memory; the file
    keeps the compact form."""
    import onnx
    from onnx import helper

    def const(tag: str, dtype: int, dims: list[int], values: list) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [f"{name}__{tag}"], name=f"{name}/{tag}",
                                value=helper.make_tensor(f"{name}__{tag}", dtype, dims, values))

    i64 = onnx.TensorProto.INT64
    nodes = [helper.make_node("Cast", [q], [f"{name}__qf"], name=f"{name}/CastQ", to=orig_type)]
    x = f"{name}__qf"
    if zero_point:
        nodes += [const("zpf", orig_type, [], [zero_point]),
                  helper.make_node("Sub", [x, f"{name}__zpf"], [f"{name}__qc"], name=f"{name}/ZeroPoint")]
        x = f"{name}__qc"
    dims = load_scale_dims(tier, shape, axes)
    if dims is not None and tier.granularity_for(*axes) == "block":
        b, bs = axes[1], tier.block_size
        nb = dims[b]
        nodes += [const("bexp", i64, [len(dims)], [*shape[:b], nb, bs, *shape[b + 1:]]),
                  const("bflat", i64, [len(shape)], [*shape[:b], nb * bs, *shape[b + 1:]]),
                  helper.make_node("Expand", [scale, f"{name}__bexp"], [f"{name}__sx"], name=f"{name}/ExpandScale"),
                  helper.make_node("Reshape", [f"{name}__sx", f"{name}__bflat"], [f"{name}__sf"],
                                   name=f"{name}/FlatScale")]
        scale = f"{name}__sf"
        if nb * bs != shape[b]:  # the last block is short
            nodes += [const("s0", i64, [1], [0]), const("s1", i64, [1], [shape[b]]), const("sa", i64, [1], [b]),
                      helper.make_node("Slice", [scale, f"{name}__s0", f"{name}__s1", f"{name}__sa"],
                                       [f"{name}__sc"], name=f"{name}/CropScale")]
            scale = f"{name}__sc"
    nodes.append(helper.make_node("Mul", [x, scale], [out or name], name=f"{name}/Scale"))
    return nodes


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field_bytes(body: int) -> int:
    """A length-delimited protobuf field: tag, length, body."""
    return 1 + _varint_len(body) + body


def _tensor_header(name: str, dtype: int, dims: list[int], nbytes: int) -> int:
    """Bytes of an initializer in the graph, apart from its `nbytes` of raw data."""
    import onnx

    meta = onnx.TensorProto(name=name, data_type=dtype, dims=dims).ByteSize()
    return _field_bytes(meta + _field_bytes(nbytes)) - nbytes


def overhead_bytes(name: str, tier: Tier, shape: tuple[int, ...], axes: tuple[int | None, int | None],
                   orig_bits: int = 32) -> int:
    """Protobuf bytes a rewritten weight adds beyond its data: the new node and tensor headers.

    Built from the very protos the writer emits (minus the original tensor's header), so planned
    size and on-disk size agree even for small models where headers matter.
    """
    import onnx

    if tier.is_identity:
        return 0
    n = math.prod(shape)
    gran = tier.granularity_for(*axes) if shape else "tensor"
    rank = 0 if gran == "tensor" or tier.scale_count(shape, *axes) == 1 else (1 if gran == "channel" else len(shape))
    orig_type = onnx.TensorProto.FLOAT16 if orig_bits == 16 else onnx.TensorProto.FLOAT  # bfloat16: not quantized
    added = sum(_field_bytes(node.ByteSize()) for node in rewrite_nodes(name, tier, rank, axes, orig_type, shape))
    if tier.is_zero:
        pass  # nothing stored: the nodes hold the shape
    elif tier.is_int:
        q, s = stored_names(name)
        count = tier.scale_count(shape, *axes)
        sdims = [] if rank == 0 else [count] if rank == 1 else \
            [shape[i] if i != axes[1] else -(-shape[i] // tier.block_size) for i in range(len(shape))]
        if tier.at_load and rank:
            sdims = load_scale_dims(tier, shape, axes)
        if tier.is_packed6:
            added += _tensor_header(q, onnx.TensorProto.UINT4, list(shape), math.ceil(n / 2))
            added += _tensor_header(high_name(name), onnx.TensorProto.UINT2, list(shape), math.ceil(n / 4))
        else:
            added += _tensor_header(q, *stored_int_form(tier, shape), packed_bytes(tier, n))
        stype = onnx.TensorProto.FLOAT16 if tier.scale_fmt == "fp16" else onnx.TensorProto.FLOAT
        added += _tensor_header(s, stype, sdims, count * (2 if tier.scale_fmt == "fp16" else 4))
    else:
        added += _tensor_header(f"{name}__{tier.fmt}", onnx.TensorProto.FLOAT16, list(shape), n * 2)
    return added - _tensor_header(name, onnx.TensorProto.FLOAT, list(shape), n * orig_bits // 8)
