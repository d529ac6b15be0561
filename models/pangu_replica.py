"""Pangu-Weather replica with random (seeded) weights, written with onnx.helper (no torch).

The graph follows shared/docs/pangu.md (what the real export holds): raw physical inputs `input` [5,13,lat,lon] and
`input_surface` [4,lat,lon], normalisation inside the graph, const_h and land/soil/topography masks as
Constant nodes, Conv1d (kernel 1) patch embedding on flattened patches, 3D Earth-specific transformer
blocks (window (2,6,12), shifted windows with a -100 mask, post-norm, GELU written with Erf), 2x2
down/up-sampling, a skip concat, Conv1d patch recovery, crop and de-normalisation. Weights are stored
the way the real export stores them: Linear weights pre-transposed as `onnx::MatMul_*` initializers,
Earth-specific bias tables constant-folded (expanded by the fixed position index) into
`onnx::Add_*` initializers, LayerNorm/bias/conv tensors as `b1.*`.

`full` matches the real export's grid and width (~277M parameters, external data); `small` keeps every
layer type on a 25x96 grid at width 32 for CI. Usage:

    python models/pangu_replica.py --grid small -o /tmp/pangu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9
PATCH = (2, 4, 4)  # level, lat, lon
WINDOW = (2, 6, 12)
MASK_VALUE = -100.0
LN_EPS = 1e-5
ALIGN = 4096  # page-aligned external tensors let ONNX Runtime map them instead of copying
INLINE_BYTES = 1024  # same threshold as onnx.save_model(save_as_external_data=True)
STEM = "pangu_replica"

LEVELS_HPA = (1000, 925, 850, 700, 600, 500, 400, 300, 250, 200, 150, 100, 50)
UPPER_VARS = ("z", "q", "t", "u", "v")
SURFACE_VARS = ("msl", "u10", "v10", "t2m")
# Rough ERA5-like climatology per level (1000 -> 50 hPa); used for the in-graph normalisation tables
# and the synthetic contexts. Geopotential from the standard-atmosphere height (m) times g.
_STD_HEIGHT_M = np.array([111, 762, 1457, 3012, 4206, 5574, 7185, 9164, 10363, 11784, 13608, 16180, 20576.0])
_UPPER_MEAN = np.stack([
    9.80665 * _STD_HEIGHT_M,
    [9e-3, 7.5e-3, 5.8e-3, 3.2e-3, 2e-3, 1.1e-3, 5e-4, 1.6e-4, 7e-5, 2.5e-5, 6e-6, 2.7e-6, 2.6e-6],
    [281, 277, 274, 267, 261, 253, 243, 229, 222, 217, 215, 209, 212.0],
    [-0.3, 0.6, 1.3, 3.2, 4.6, 6.2, 8.0, 10.3, 11.3, 11.3, 9.5, 6.1, 2.5],
    np.zeros(13),
]).astype(np.float32)
_UPPER_STD = np.stack([
    9.80665 * (100 + 0.02 * _STD_HEIGHT_M),
    [6e-3, 5e-3, 4e-3, 2.5e-3, 1.6e-3, 9e-4, 4.5e-4, 1.5e-4, 6e-5, 2e-5, 4e-6, 8e-7, 3e-7],
    [15, 14, 13, 12, 12, 12, 12, 10, 8, 7, 8, 11, 9.0],
    [6, 8, 8, 9, 10, 11, 13, 16, 17, 17, 15, 12, 10.0],
    [5, 6, 6, 7, 7, 8, 9, 11, 12, 12, 10, 7, 5.0],
]).astype(np.float32)
_SURFACE_MEAN = np.array([101100.0, -0.05, 0.2, 278.5], np.float32)
_SURFACE_STD = np.array([1100.0, 5.5, 4.7, 21.0], np.float32)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class PanguGrid:
    """Grid and width of one replica; `full` is the real export's, `small` is for CI."""

    name: str
    lat: int
    lon: int
    levels: int = 13
    dim: int = 192
    depths: tuple[int, ...] = (2, 6, 6, 2)
    heads: tuple[int, ...] = (6, 12, 12, 6)
    horizon: int = 4
    external_data: bool = True

    def __post_init__(self) -> None:
        if self.lon % (PATCH[2] * 2 * WINDOW[2]):
            raise ValueError(f"lon={self.lon} must be a multiple of {PATCH[2] * 2 * WINDOW[2]}")
        if self.levels != len(LEVELS_HPA):
            raise ValueError(f"levels={self.levels}: the climatology tables have {len(LEVELS_HPA)}")
        if len(self.depths) != 4 or len(self.heads) != 4:
            raise ValueError("depths and heads need one entry per stage (4)")

    @property
    def lat_pad(self) -> int:
        return _ceil_to(self.lat, PATCH[1])

    @property
    def levels_pad(self) -> int:
        return _ceil_to(self.levels, PATCH[0])

    @property
    def tokens_outer(self) -> tuple[int, int, int]:
        """Token grid of layers 1/4: 1 surface level + the patched upper levels, lat, lon."""
        return 1 + self.levels_pad // PATCH[0], self.lat_pad // PATCH[1], self.lon // PATCH[2]

    @property
    def tokens_inner(self) -> tuple[int, int, int]:
        """Token grid of layers 2/3, after the 2x2 merge (lat padded to even first)."""
        z, h, w = self.tokens_outer
        return z, -(-h // 2), w // 2


GRIDS = {
    "full": PanguGrid("full", lat=721, lon=1440),
    "small": PanguGrid("small", lat=25, lon=96, dim=32, depths=(2, 2, 2, 2), heads=(1, 2, 2, 1),
                       horizon=2, external_data=False),
}


@dataclass(frozen=True)
class WindowGeometry:
    """How one token grid is padded and cut into (2,6,12) windows."""

    grid: tuple[int, int, int]

    @property
    def padded(self) -> tuple[int, int, int]:
        return tuple(_ceil_to(n, w) for n, w in zip(self.grid, WINDOW))  # type: ignore[return-value]

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(p // w for p, w in zip(self.padded, WINDOW))  # type: ignore[return-value]

    @property
    def window_types(self) -> int:
        """Windows that differ in level or latitude: each has its own bias (longitude is shared)."""
        return self.counts[0] * self.counts[1]

    @property
    def lon_windows(self) -> int:
        return self.counts[2]


WINDOW_TOKENS = math.prod(WINDOW)
POSITIONS = WINDOW[0] ** 2 * WINDOW[1] ** 2 * (2 * WINDOW[2] - 1)  # 3312


def earth_position_index(window: Sequence[int] = WINDOW) -> np.ndarray:
    """Fixed (P, P) index into the (positions, types, heads) bias table, as in the published pseudocode.

    Level and latitude enter as absolute pairs (i + w*j), longitude as the relative offset.
    """
    wz, wh, ww = window
    z, h, w = (a.ravel() for a in np.meshgrid(np.arange(wz), np.arange(wh), np.arange(ww), indexing="ij"))
    z_pair = z[:, None] + wz * z[None, :]
    h_pair = h[:, None] + wh * h[None, :]
    dw = w[:, None] - w[None, :] + ww - 1
    return (z_pair * (2 * ww - 1) * wh * wh + h_pair * (2 * ww - 1) + dw).astype(np.int64)


def shift_region_ids(geom: WindowGeometry) -> np.ndarray:
    """(types, P) region label of each token of each window type after the half-window roll.

    Tokens of different regions must not attend to each other. Only level and latitude get regions:
    longitude is periodic, so the rolled columns are true neighbours.
    """
    (zp, hp, _), (nz, nh, _) = geom.padded, geom.counts
    rz, rh = (_regions_1d(n, w) for n, w in zip((zp, hp), WINDOW))
    ids = (rz[:, None] * 3 + rh[None, :]).reshape(nz, WINDOW[0], nh, WINDOW[1])
    ids = ids.transpose(0, 2, 1, 3).reshape(nz * nh, WINDOW[0] * WINDOW[1])
    return np.repeat(ids, WINDOW[2], axis=1).astype(np.int64)


def _regions_1d(n: int, window: int) -> np.ndarray:
    shift = window // 2
    ids = np.zeros(n, np.int64)
    ids[n - window:n - shift] = 1
    ids[n - shift:] = 2
    return ids


# ---------------------------------------------------------------------------------------------
# Random "trained-looking" weights
# ---------------------------------------------------------------------------------------------


def earth_bias_table(rng: np.random.Generator, types: int, heads: int) -> np.ndarray:
    """A (3312, types, heads) table: per-head decay with window distance plus noise, as trained ones look."""
    p = np.arange(POSITIONS)
    wz, wh, ww = WINDOW
    z_pair, rest = divmod(p, (2 * ww - 1) * wh * wh)
    h_pair, dw = divmod(rest, 2 * ww - 1)
    dist = (np.abs(z_pair % wz - z_pair // wz) + np.abs(h_pair % wh - h_pair // wh) / 2
            + np.abs(dw - (ww - 1)) / 4).astype(np.float32)
    slope = rng.uniform(0.2, 1.0, (types, heads)).astype(np.float32)
    noise = rng.standard_normal((POSITIONS, types, heads), dtype=np.float32) * np.float32(0.5)
    return noise - dist[:, None, None] * slope


def expand_earth_bias(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The constant-folded lookup the export stores: (1, types, heads, P, P) = table[index]."""
    by_type = np.ascontiguousarray(table.transpose(1, 2, 0))
    types, heads, _ = by_type.shape
    return np.take(by_type, index.ravel(), axis=2).reshape(1, types, heads, *index.shape)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


# ---------------------------------------------------------------------------------------------
# Where tensors go: inline, or streamed to one external data file
# ---------------------------------------------------------------------------------------------


class InlineWeights:
    """Keeps every initializer inside the model proto (small grid)."""

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(array, name)


class ExternalWeights:
    """Streams each initializer's bytes to one data file as it is made, so no copy of all weights exists.

    Same references as onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True)
    writes (location/offset/length, tensors under 1 KiB kept inline), with page-aligned offsets.
    """

    def __init__(self, data_file: BinaryIO, location: str) -> None:
        self._file = data_file
        self._location = location

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        if array.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        self._file.write(b"\0" * (-self._file.tell() % ALIGN))
        offset = self._file.tell()
        self._file.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).data)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=array.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self._location), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        return tensor


# ---------------------------------------------------------------------------------------------
# Graph building
# ---------------------------------------------------------------------------------------------


class GraphBuilder:
    """Collects nodes and initializers with torch.onnx-style names (`/b1/layer1/blocks.0/MatMul`)."""

    def __init__(self, weights: InlineWeights | ExternalWeights, rng: np.random.Generator) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.rng = rng
        self._weights = weights
        self._scope = ["b1"]
        self._names: dict[str, int] = {}
        self._folded = 1000  # torch numbers constant-folded weights onnx::<Op>_<n>

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attrs: object) -> str:
        """Add one node; return its (single) output name."""
        name = self._unique("/" + "/".join(self._scope) + "/" + op_type)
        out = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def const(self, value: np.ndarray | float | int) -> str:
        """A Constant node: shape tensors and scalars, and the weight-holding fields and tables."""
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        return self.op("Constant", value=numpy_helper.from_array(array))

    def named(self, leaf: str, array: np.ndarray) -> str:
        """A module parameter kept under its module path (`b1.layer1.blocks.0.norm1.weight`)."""
        return self._initializer(".".join(self._scope + [leaf]), array)

    def folded(self, consumer: str, array: np.ndarray) -> str:
        """A weight the exporter constant-folded (transposed Linear, expanded bias): `onnx::MatMul_1234`."""
        self._folded += 1
        return self._initializer(f"onnx::{consumer}_{self._folded}", array)

    def _initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self._weights.tensor(name, array))
        return name

    def _unique(self, name: str) -> str:
        count = self._names.get(name, 0)
        self._names[name] = count + 1
        return name if count == 0 else f"{name}_{count}"


def reshape(g: GraphBuilder, x: str, shape: Sequence[int]) -> str:
    return g.op("Reshape", x, g.const(np.array(shape, np.int64)))


def transpose(g: GraphBuilder, x: str, perm: Sequence[int]) -> str:
    return g.op("Transpose", x, perm=list(perm))


def slice_axes(g: GraphBuilder, x: str, axes: Sequence[int], starts: Sequence[int],
               ends: Sequence[int]) -> str:
    return g.op("Slice", x, *(g.const(np.array(v, np.int64)) for v in (starts, ends, axes)))


def pad_end(g: GraphBuilder, x: str, after: Sequence[int]) -> str:
    """Zero-pad each axis at its end (pads never precede the data in this replica: inferred)."""
    if not any(after):
        return x
    return g.op("Pad", x, g.const(np.array([0] * len(after) + list(after), np.int64)), mode="constant")


def crop(g: GraphBuilder, x: str, shape: Sequence[int], padded: Sequence[int]) -> str:
    axes = [a for a, (n, p) in enumerate(zip(shape, padded)) if n != p]
    if not axes:
        return x
    return slice_axes(g, x, axes, [0] * len(axes), [shape[a] for a in axes])


def roll(g: GraphBuilder, x: str, shape: Sequence[int], shifts: dict[int, int]) -> str:
    """torch.roll as the exporter writes it: two Slices and a Concat per rolled axis."""
    for axis, shift in shifts.items():
        cut = -shift % shape[axis]
        tail = slice_axes(g, x, [axis], [cut], [shape[axis]])
        head = slice_axes(g, x, [axis], [0], [cut])
        x = g.op("Concat", tail, head, axis=axis)
    return x


def linear(g: GraphBuilder, x: str, d_in: int, d_out: int, name: str, bias: bool = True,
           gain: float = 1.0) -> str:
    """x @ W (+ b) with W stored pre-transposed (in, out) as `onnx::MatMul_*`."""
    with g.scope(name):
        y = g.op("MatMul", x, g.folded("MatMul", _normal(g.rng, (d_in, d_out), gain / math.sqrt(d_in))))
        if bias:
            y = g.op("Add", g.named("bias", _normal(g.rng, (d_out,), 0.02)), y)
    return y


def layer_norm(g: GraphBuilder, x: str, dim: int, name: str) -> str:
    """LayerNorm over the last axis, decomposed as torch.onnx writes it below opset 17 (ReduceMean...)."""
    with g.scope(name):
        mean = g.op("ReduceMean", x, axes=[-1], keepdims=1)
        centred = g.op("Sub", x, mean)
        var = g.op("ReduceMean", g.op("Pow", centred, g.const(np.float32(2.0))), axes=[-1], keepdims=1)
        std = g.op("Sqrt", g.op("Add", var, g.const(np.float32(LN_EPS))))
        y = g.op("Div", centred, std)
        y = g.op("Mul", y, g.named("weight", 1 + _normal(g.rng, (dim,), 0.1)))
        return g.op("Add", y, g.named("bias", _normal(g.rng, (dim,), 0.05)))


def gelu(g: GraphBuilder, x: str) -> str:
    erf = g.op("Erf", g.op("Div", x, g.const(np.float32(math.sqrt(2.0)))))
    return g.op("Mul", g.op("Mul", x, g.op("Add", erf, g.const(np.float32(1.0)))), g.const(np.float32(0.5)))


def mlp(g: GraphBuilder, x: str, dim: int) -> str:
    with g.scope("linear"):
        hidden = gelu(g, linear(g, x, dim, 4 * dim, "linear1"))
        return linear(g, hidden, 4 * dim, dim, "linear2")


def conv1d(g: GraphBuilder, x: str, c_in: int, c_out: int, name: str, gain: float = 1.0) -> str:
    """Kernel-1 Conv1d over flattened patches: the real export's form of the patch (un)embedding."""
    with g.scope(name):
        w = g.named("weight", _normal(g.rng, (c_out, c_in, 1), gain / math.sqrt(c_in)))
        b = g.named("bias", _normal(g.rng, (c_out,), 0.02))
        return g.op("Conv", x, w, b, kernel_shape=[1], strides=[1], pads=[0, 0], dilations=[1], group=1)


def patchify(g: GraphBuilder, x: str, channels: int, spatial: Sequence[int], patch: Sequence[int]) -> str:
    """(1, C, *spatial) -> (1, C*prod(patch), prod(spatial/patch)), patch offsets channel-minor like Conv."""
    counts = [s // p for s, p in zip(spatial, patch)]
    n = len(spatial)
    x = reshape(g, x, [1, channels] + [v for pair in zip(counts, patch) for v in pair])
    x = transpose(g, x, [0, 1] + [3 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)])
    return reshape(g, x, [1, channels * math.prod(patch), math.prod(counts)])


def unpatchify(g: GraphBuilder, x: str, channels: int, counts: Sequence[int], patch: Sequence[int]) -> str:
    """(1, C*prod(patch), prod(counts)) -> (C, *counts*patch): inverse of `patchify`, batch dropped."""
    n = len(counts)
    x = reshape(g, x, [channels, *patch, *counts])
    x = transpose(g, x, [0] + [v for i in range(n) for v in (1 + n + i, 1 + i)])
    return reshape(g, x, [channels] + [c * p for c, p in zip(counts, patch)])


# ---------------------------------------------------------------------------------------------
# Pangu modules
# ---------------------------------------------------------------------------------------------


def earth_attention(g: GraphBuilder, x: str, dim: int, heads: int, geom: WindowGeometry,
                    shifted: bool) -> str:
    """Window attention on (lon windows, types, P, C) with the expanded Earth-specific bias."""
    nw, types, p, hd = geom.lon_windows, geom.window_types, WINDOW_TOKENS, dim // heads
    with g.scope("attention"):
        qkv = reshape(g, linear(g, x, dim, 3 * dim, "linear1"), (nw, types, p, 3, heads, hd))
        qkv = transpose(g, qkv, (3, 0, 1, 4, 2, 5))
        q, k, v = (g.op("Gather", qkv, g.const(np.int64(i)), axis=0) for i in range(3))
        q = g.op("Mul", q, g.const(np.float32(hd ** -0.5)))
        logits = g.op("MatMul", q, transpose(g, k, (0, 1, 2, 4, 3)))
        table = earth_bias_table(g.rng, types, heads)
        logits = g.op("Add", logits, g.folded("Add", expand_earth_bias(table, earth_position_index())))
        if shifted:
            logits = g.op("Add", logits, shift_mask(g, geom))
        y = g.op("MatMul", g.op("Softmax", logits, axis=-1), v)
        y = reshape(g, transpose(g, y, (0, 1, 3, 2, 4)), (nw, types, p, dim))
        return linear(g, y, dim, dim, "linear2")


def shift_mask(g: GraphBuilder, geom: WindowGeometry) -> str:
    """(1, types, 1, P, P) additive mask, 0 within a region and -100 across, built from region labels."""
    ids = shift_region_ids(geom)
    types, p = ids.shape
    query = g.const(ids.reshape(1, types, 1, p, 1))
    key = reshape(g, query, (1, types, 1, 1, p))
    same = g.op("Equal", query, key)
    return g.op("Where", same, g.const(np.float32(0.0)), g.const(np.float32(MASK_VALUE)))


def window_partition(g: GraphBuilder, x: str, geom: WindowGeometry, dim: int) -> str:
    (nz, nh, nw), (wz, wh, ww) = geom.counts, WINDOW
    x = reshape(g, x, (1, nz, wz, nh, wh, nw, ww, dim))
    x = transpose(g, x, (0, 5, 1, 3, 2, 4, 6, 7))
    return reshape(g, x, (nw, nz * nh, WINDOW_TOKENS, dim))


def window_reverse(g: GraphBuilder, x: str, geom: WindowGeometry, dim: int) -> str:
    (nz, nh, nw), (wz, wh, ww) = geom.counts, WINDOW
    x = reshape(g, x, (1, nw, nz, nh, wz, wh, ww, dim))
    x = transpose(g, x, (0, 2, 4, 3, 5, 1, 6, 7))
    return reshape(g, x, (1, *geom.padded, dim))


def earth_block(g: GraphBuilder, x: str, dim: int, heads: int, geom: WindowGeometry, shifted: bool,
                index: int) -> str:
    """3D Earth-specific block, post-norm: x + LN(attn(x)), then x + LN(MLP(x))."""
    half = {1 + a: w // 2 for a, w in enumerate(WINDOW)}
    padded = (1, *geom.padded, dim)
    with g.scope(f"blocks.{index}"):
        h = reshape(g, x, (1, *geom.grid, dim))
        h = pad_end(g, h, [0] + [p - n for p, n in zip(geom.padded, geom.grid)] + [0])
        if shifted:
            h = roll(g, h, padded, {a: -s for a, s in half.items()})
        h = window_partition(g, h, geom, dim)
        h = window_reverse(g, earth_attention(g, h, dim, heads, geom, shifted), geom, dim)
        if shifted:
            h = roll(g, h, padded, half)
        h = crop(g, h, (1, *geom.grid, dim), padded)
        h = reshape(g, h, (1, math.prod(geom.grid), dim))
        x = g.op("Add", x, layer_norm(g, h, dim, "norm1"))
        return g.op("Add", x, layer_norm(g, mlp(g, x, dim), dim, "norm2"))


def earth_layer(g: GraphBuilder, x: str, name: str, dim: int, depth: int, heads: int,
                grid: tuple[int, int, int]) -> str:
    geom = WindowGeometry(grid)
    with g.scope(name):
        for i in range(depth):
            x = earth_block(g, x, dim, heads, geom, shifted=i % 2 == 1, index=i)
    return x


def down_sample(g: GraphBuilder, x: str, dim: int, grid: tuple[int, int, int]) -> str:
    """Pad lat to even, merge 2x2 (lat, lon), LayerNorm(4C), Linear 4C -> 2C without bias."""
    z, h, w = grid
    with g.scope("downsample"):
        x = pad_end(g, reshape(g, x, (1, z, h, w, dim)), (0, 0, h % 2, 0, 0))
        x = reshape(g, x, (1, z, -(-h // 2), 2, w // 2, 2, dim))
        x = transpose(g, x, (0, 1, 2, 4, 3, 5, 6))
        x = reshape(g, x, (1, z * -(-h // 2) * (w // 2), 4 * dim))
        return linear(g, layer_norm(g, x, 4 * dim, "norm"), 4 * dim, 2 * dim, "linear", bias=False)


def up_sample(g: GraphBuilder, x: str, dim: int, grid: tuple[int, int, int]) -> str:
    """Linear 2C -> 4C without bias, split 2x2, crop lat, LayerNorm(C), Linear C -> C without bias."""
    z, h, w = grid
    h_in, w_in = -(-h // 2), w // 2
    with g.scope("upsample"):
        x = linear(g, x, 2 * dim, 4 * dim, "linear1", bias=False)
        x = reshape(g, x, (1, z, h_in, w_in, 2, 2, dim))
        x = transpose(g, x, (0, 1, 2, 4, 3, 5, 6))
        x = reshape(g, x, (1, z, 2 * h_in, w, dim))
        x = crop(g, x, (1, z, h, w, dim), (1, z, 2 * h_in, w, dim))
        x = layer_norm(g, reshape(g, x, (1, z * h * w, dim)), dim, "norm")
        return linear(g, x, dim, dim, "linear2", bias=False)


@dataclass(frozen=True)
class FieldConstants:
    """The Constant-node fields: normalisation tables, const_h and the surface masks."""

    upper_mean: np.ndarray  # (5, 13, 1, 1)
    upper_std: np.ndarray
    surface_mean: np.ndarray  # (4, 1, 1)
    surface_std: np.ndarray
    const_h: np.ndarray  # (1, 1, 1, 13, lat, lon)
    masks: np.ndarray  # (1, 3, lat_pad, lon): land, soil type, topography


def field_constants(grid: PanguGrid, rng: np.random.Generator) -> FieldConstants:
    """Plausible stand-ins for the real export's constants (their values were never published)."""
    height = (_STD_HEIGHT_M - _STD_HEIGHT_M.mean()) / _STD_HEIGHT_M.std()
    const_h = height[:, None, None] + 0.1 * smooth_fields(rng, grid.levels, grid.lat, grid.lon)
    land_field, soil_field, topo_field = smooth_fields(rng, 3, grid.lat_pad, grid.lon)
    land = (land_field > 0.3).astype(np.float32)
    soil = np.clip(np.round(3 * soil_field + 3), 0, 7) / 7 * land
    topo = np.maximum(topo_field, 0) * land
    topo = (topo - topo.mean()) / (topo.std() + 1e-6)
    return FieldConstants(
        upper_mean=_UPPER_MEAN[:, :, None, None],
        upper_std=_UPPER_STD[:, :, None, None],
        surface_mean=_SURFACE_MEAN[:, None, None],
        surface_std=_SURFACE_STD[:, None, None],
        const_h=const_h.astype(np.float32).reshape(1, 1, 1, grid.levels, grid.lat, grid.lon),
        masks=np.stack([land, soil, topo])[None].astype(np.float32),
    )


def patch_embedding(g: GraphBuilder, grid: PanguGrid, consts: FieldConstants) -> str:
    """Normalise, add const_h / masks, pad, 2x4x4 and 4x4 patches -> Conv1d -> (1, tokens, C)."""
    z, h, w = grid.tokens_outer
    upper_channels = len(UPPER_VARS) + 1
    with g.scope("_input_layer"):
        up = g.op("Div", g.op("Sub", "input", g.const(consts.upper_mean)), g.const(consts.upper_std))
        up = reshape(g, up, (1, 1, len(UPPER_VARS), grid.levels, grid.lat, grid.lon))
        up = g.op("Concat", up, g.const(consts.const_h), axis=2)
        up = reshape(g, up, (1, upper_channels, grid.levels, grid.lat, grid.lon))
        up = pad_end(g, up, (0, 0, grid.levels_pad - grid.levels, grid.lat_pad - grid.lat, 0))
        up = patchify(g, up, upper_channels, (grid.levels_pad, grid.lat_pad, grid.lon), PATCH)
        up = conv1d(g, up, upper_channels * math.prod(PATCH), grid.dim, "conv")
        up = reshape(g, up, (1, grid.dim, z - 1, h, w))

        sf = g.op("Div", g.op("Sub", "input_surface", g.const(consts.surface_mean)),
                  g.const(consts.surface_std))
        sf = pad_end(g, reshape(g, sf, (1, len(SURFACE_VARS), grid.lat, grid.lon)),
                     (0, 0, grid.lat_pad - grid.lat, 0))
        sf = g.op("Concat", sf, g.const(consts.masks), axis=1)
        surface_channels = len(SURFACE_VARS) + consts.masks.shape[1]
        sf = patchify(g, sf, surface_channels, (grid.lat_pad, grid.lon), PATCH[1:])
        sf = conv1d(g, sf, surface_channels * math.prod(PATCH[1:]), grid.dim, "conv_surface")
        sf = reshape(g, sf, (1, grid.dim, 1, h, w))

        x = transpose(g, g.op("Concat", sf, up, axis=2), (0, 2, 3, 4, 1))
        return reshape(g, x, (1, z * h * w, grid.dim))


def patch_recovery(g: GraphBuilder, x: str, grid: PanguGrid, consts: FieldConstants) -> None:
    """Conv1d 2C -> 5*2*4*4 and 2C -> 4*4*4, unpatch, crop, de-normalise into `output(_surface)`."""
    z, h, w = grid.tokens_outer
    dim = 2 * grid.dim
    with g.scope("_output_layer"):
        x = reshape(g, transpose(g, x, (0, 2, 1)), (1, dim, z, h * w))
        up = reshape(g, slice_axes(g, x, [2], [1], [z]), (1, dim, (z - 1) * h * w))
        up = conv1d(g, up, dim, len(UPPER_VARS) * math.prod(PATCH), "conv", gain=0.25)
        up = unpatchify(g, up, len(UPPER_VARS), (z - 1, h, w), PATCH)
        up = crop(g, up, (len(UPPER_VARS), grid.levels, grid.lat, grid.lon),
                  (len(UPPER_VARS), grid.levels_pad, grid.lat_pad, grid.lon))
        g.op("Add", g.op("Mul", up, g.const(consts.upper_std)), g.const(consts.upper_mean), output="output")

        sf = reshape(g, slice_axes(g, x, [2], [0], [1]), (1, dim, h * w))
        sf = conv1d(g, sf, dim, len(SURFACE_VARS) * math.prod(PATCH[1:]), "conv_surface", gain=0.25)
        sf = unpatchify(g, sf, len(SURFACE_VARS), (h, w), PATCH[1:])
        sf = crop(g, sf, (len(SURFACE_VARS), grid.lat, grid.lon), (len(SURFACE_VARS), grid.lat_pad, grid.lon))
        g.op("Add", g.op("Mul", sf, g.const(consts.surface_std)), g.const(consts.surface_mean),
             output="output_surface")


def make_model(grid: PanguGrid, seed: int, weights: InlineWeights | ExternalWeights) -> onnx.ModelProto:
    """The whole replica as a ModelProto (IR 9, opset 17); large initializers go through `weights`."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder(weights, rng)
    consts = field_constants(grid, rng)
    outer, inner = grid.tokens_outer, grid.tokens_inner
    (d1, d2, d3, d4), (h1, h2, h3, h4) = grid.depths, grid.heads
    x = patch_embedding(g, grid, consts)
    skip = x = earth_layer(g, x, "layer1", grid.dim, d1, h1, outer)
    x = down_sample(g, x, grid.dim, outer)
    x = earth_layer(g, x, "layer2", 2 * grid.dim, d2, h2, inner)
    x = earth_layer(g, x, "layer3", 2 * grid.dim, d3, h3, inner)
    x = up_sample(g, x, grid.dim, outer)
    x = earth_layer(g, x, "layer4", grid.dim, d4, h4, outer)
    patch_recovery(g, g.op("Concat", skip, x, axis=-1), grid, consts)

    upper, surface = io_shapes(grid)
    graph = helper.make_graph(
        g.nodes, f"pangu_replica_{grid.name}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, upper),
         helper.make_tensor_value_info("input_surface", TensorProto.FLOAT, surface)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, upper),
         helper.make_tensor_value_info("output_surface", TensorProto.FLOAT, surface)],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tqs-onnx pangu_replica", producer_version="1")
    model.ir_version = IR_VERSION
    return model


def io_shapes(grid: PanguGrid) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (`input`, `input_surface`); the outputs have the same."""
    return (len(UPPER_VARS), grid.levels, grid.lat, grid.lon), (len(SURFACE_VARS), grid.lat, grid.lon)


# ---------------------------------------------------------------------------------------------
# Parameter accounting
# ---------------------------------------------------------------------------------------------


def parameter_counts(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    """Values per class: earth_bias, linear, patch_conv, norm_bias (initializers) and constant
    (float non-scalar Constant nodes). External data is not read: counts come from the shapes."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    consumer = {i: n.op_type for n in model.graph.node for i in n.input}
    counts = dict.fromkeys(("earth_bias", "linear", "patch_conv", "norm_bias", "constant"), 0)
    for t in model.graph.initializer:
        counts[_parameter_class(consumer.get(t.name, ""), len(t.dims))] += math.prod(t.dims)
    for n in model.graph.node:
        if n.op_type == "Constant":
            value = n.attribute[0].t
            if value.data_type == TensorProto.FLOAT and value.dims:  # scalars (eps, 0.5) hold no weights
                counts["constant"] += math.prod(value.dims)
    return counts


def _parameter_class(consumer: str, rank: int) -> str:
    if consumer == "Conv":
        return "patch_conv"
    if consumer == "MatMul":
        return "linear"
    if consumer == "Add" and rank == 5:
        return "earth_bias"
    return "norm_bias"


def format_counts(counts: dict[str, int]) -> str:
    """One line per class with its share of the initializer total (constants listed apart)."""
    total = sum(v for k, v in counts.items() if k != "constant")
    lines = [f"  {k:<11} {v:>13,d}  {100 * v / total:5.2f}%" for k, v in counts.items() if k != "constant"]
    lines.append(f"  {'total':<11} {total:>13,d}")
    lines.append(f"  {'constant':<11} {counts['constant']:>13,d}  (Constant nodes, not in total)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Contexts (initial states) and the rollout spec
# ---------------------------------------------------------------------------------------------


def smooth_fields(rng: np.random.Generator, n: int, lat: int, lon: int, modes: int = 8) -> np.ndarray:
    """n smooth unit-scale random fields on a (lat, lon) grid, periodic in longitude: sums of waves."""
    phi = np.linspace(-np.pi / 2, np.pi / 2, lat, dtype=np.float32)
    lam = np.linspace(0, 2 * np.pi, lon, endpoint=False, dtype=np.float32)
    k_lat = rng.integers(1, 6, (n, 1, modes)).astype(np.float32)
    k_lon = rng.integers(0, 8, (n, modes, 1)).astype(np.float32)
    lat_phase = rng.uniform(0, 2 * np.pi, (n, 1, modes)).astype(np.float32)
    lon_phase = rng.uniform(0, 2 * np.pi, (n, modes, 1)).astype(np.float32)
    lat_waves = np.cos(k_lat * phi[None, :, None] + lat_phase)
    lon_waves = np.cos(k_lon * lam[None, None, :] + lon_phase)
    amp = rng.standard_normal((n, 1, modes)).astype(np.float32) / np.float32(math.sqrt(modes / 2))
    return (lat_waves * amp) @ lon_waves


def make_contexts(grid: str | PanguGrid, n_contexts: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n_contexts plausible initial states in physical units: climatology, a pole-to-equator gradient
    and smooth anomalies. Keys `input` (S, 5, 13, lat, lon) and `input_surface` (S, 4, lat, lon).
    On the full grid each state is ~290 MB: generate them on demand rather than storing them."""
    grid = resolve_grid(grid)
    rng = np.random.default_rng([seed, 1])
    cos2 = (np.cos(np.linspace(-np.pi / 2, np.pi / 2, grid.lat)) ** 2 - 0.6).astype(np.float32)[:, None]
    upper_shape, surface_shape = io_shapes(grid)
    upper = np.empty((n_contexts, *upper_shape), np.float32)
    surface = np.empty((n_contexts, *surface_shape), np.float32)
    upper_gradient = np.array([1.5, 1.0, 2.0, 0.5, 0.0], np.float32)[:, None, None, None]
    surface_gradient = np.array([-0.5, 0.0, 0.0, 2.0], np.float32)[:, None, None]
    for s in range(n_contexts):
        anomaly = smooth_fields(rng, math.prod(upper_shape[:2]), grid.lat, grid.lon).reshape(upper_shape)
        upper[s] = (_UPPER_MEAN[:, :, None, None] + _UPPER_STD[:, :, None, None]
                    * (upper_gradient * cos2 + 0.7 * anomaly))
        surface[s] = (_SURFACE_MEAN[:, None, None] + _SURFACE_STD[:, None, None]
                      * (surface_gradient * cos2 + 0.7 * smooth_fields(rng, 4, grid.lat, grid.lon)))
    np.maximum(upper[:, 1], 1e-7, out=upper[:, 1])  # specific humidity stays positive
    return {"input": upper, "input_surface": surface}


def write_contexts(path: str | Path, grid: str | PanguGrid, n_contexts: int, seed: int = 0) -> Path:
    """Write `make_contexts` to an .npz (atomically); ~290 MB per context on the full grid."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **make_contexts(grid, n_contexts, seed))
    return path


def rollout_spec(name: str, horizon: int) -> dict:
    """The project's rollout spec: state feedback, both outputs as trajectory, channels on axis 0."""
    return {
        "name": name,
        "horizon": horizon,
        "feedback": {"output": "input", "output_surface": "input_surface"},
        "trajectory": ["output", "output_surface"],
        "initial": {"input": "input", "input_surface": "input_surface"},
        "per_step": {},
        "fixed": {},
        "constants": {},
        "truth": {},
        "channel_axis": {"output": 0, "output_surface": 0},
    }


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; move it into place only if the body succeeds."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the final file should look like any other
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class PanguBuild:
    """What build_pangu wrote and measured."""

    model: Path
    data: Path | None
    spec: Path
    contexts: Path | None
    counts: dict[str, int]
    seconds: float


def resolve_grid(grid: str | PanguGrid) -> PanguGrid:
    if isinstance(grid, PanguGrid):
        return grid
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose from {sorted(GRIDS)}")
    return GRIDS[grid]


def build_pangu(out_dir: str | Path, grid: str | PanguGrid = "full", seed: int = 0, *,
                name: str | None = None, n_contexts: int = 2) -> PanguBuild:
    """Build, save and check a Pangu replica in out_dir: `<name>.onnx` (+ `.onnx.data` when the grid
    uses external data), `<name>.rollout.json` and `<name>.contexts.npz` (skipped if n_contexts=0)."""
    grid = resolve_grid(grid)
    name = name or f"{STEM}_{grid.name}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_path = out / f"{name}.onnx"
    data_path = model_path.with_name(model_path.name + ".data") if grid.external_data else None
    model = _write_weights(grid, seed, data_path)
    with atomic_path(model_path) as tmp:
        onnx.save_model(model, tmp, format="protobuf")
        onnx.checker.check_model(str(tmp))
    counts = parameter_counts(model)
    del model
    spec_path = out / f"{name}.rollout.json"
    with atomic_path(spec_path) as tmp:
        tmp.write_text(json.dumps(rollout_spec(name, grid.horizon), indent=2) + "\n")
    contexts_path = None
    if n_contexts:
        contexts_path = write_contexts(out / f"{name}.contexts.npz", grid, n_contexts, seed)
    return PanguBuild(model_path, data_path, spec_path, contexts_path, counts, time.perf_counter() - start)


def _write_weights(grid: PanguGrid, seed: int, data_path: Path | None) -> onnx.ModelProto:
    """Make the model; with data_path, stream initializers there (atomically) as they are made."""
    if data_path is None:
        return make_model(grid, seed, InlineWeights())
    with atomic_path(data_path) as tmp, open(tmp, "wb") as f:
        return make_model(grid, seed, ExternalWeights(f, data_path.name))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _check_session(path: Path) -> float:
    import onnxruntime as ort

    start = time.perf_counter()
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a Pangu-Weather replica with random weights.")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="small")
    parser.add_argument("-o", "--out-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="file stem (default pangu_replica_<grid>)")
    parser.add_argument("--contexts", type=int, default=2, help="initial states to write (0: none)")
    parser.add_argument("--ort", action="store_true", help="also time an onnxruntime CPU session")
    args = parser.parse_args(argv)
    build = build_pangu(args.out_dir, args.grid, args.seed, name=args.name, n_contexts=args.contexts)
    print(f"built {build.model} in {build.seconds:.1f} s")
    for path in (build.model, build.data, build.spec, build.contexts):
        if path is not None:
            print(f"  {path.name:<40} {path.stat().st_size / 2**20:10.1f} MiB")
    print("parameters by class:\n" + format_counts(build.counts))
    if args.ort:
        print(f"onnxruntime CPU session created in {_check_session(build.model):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
