"""Weight perturbations made where the session runs: small ONNX Runtime graphs on the same device.

A probe never builds a tensor on the host: the quantization residual, every tier's values and the
seeded Gaussian are computed by tiny ORT graphs from the device-resident nominal weights, and the
trajectory divergence is reduced on the device too. The same graphs run on the CPU provider, so the
CPU tests exercise the CUDA path's code.

The Gaussian comes from a counter-based generator (a quadratic hash of the element index mod
2^31-1, then Box-Muller), because RandomNormalLike on CUDA is not reproducible even with a seed.
Each (seed, block, probe, tensor) gets its own counter offset, so a resumed or distributed sweep
draws the same numbers as an uninterrupted one. Each draw's norm over the whole block equals the
quantization residual's, as the paper asks: one graph gives each tensor's N(0, 1) values z and sum(z^2),
and once the block's sigma is known a second computes W + sigma * z.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tqs_onnx.passes.divergence import sqdiff_nodes
from tqs_onnx.runtime import ORT_NUMPY_TYPES
from tqs_onnx.tiers import Tier

# Changed whenever the Gaussian draws may change (the checkpoints of sweeps that draw them and the scores
# record it; a change to the quant probe's values needs its own entry in the sweep's fingerprint).
PROBES_VERSION = "gauss-exact-norm"
P = 2147483647  # 2^31 - 1: products of two residues stay below 2^62 in int64
_ROUNDS = [(1103515245 % P, 12345), (48271, 2654435761 % P), (69621, 40014), (16807, 40692)]
_OPSET = 17
# ORT's type strings ('tensor(float16)') -> ONNX element types, for the divergence graph's inputs.
_ELEM_TYPES = {f"tensor({name.lower()})": value for name, value in TensorProto.DataType.items()}
_ELEM_TYPES.update({"tensor(float)": TensorProto.FLOAT, "tensor(double)": TensorProto.DOUBLE})


# ------------------------------------------------------------------------------- reference (numpy)

def counter_uniform(counter: np.ndarray) -> np.ndarray:
    """Uniform (0, 1) from int64 counters; the same integer hash the device graph computes."""
    x = counter % P
    for a, c in _ROUNDS:
        x = (x * x % P + x * a % P + c) % P
    return ((x.astype(np.float32) + np.float32(0.5)) / np.float32(P)).astype(np.float32)


def counter_normal(n: int, offset: int) -> np.ndarray:
    """Standard normal draws for counters offset + [0, 2n): numpy reference of the device graph."""
    i = np.arange(n, dtype=np.int64) * 2 + offset
    u1, u2 = counter_uniform(i), counter_uniform(i + 1)
    return (np.sqrt(np.float32(-2) * np.log(u1)) * np.cos(np.float32(2 * np.pi) * u2)).astype(np.float32)


def probe_offset(seed: int, block: int, probe: int, tensor: int) -> int:
    """Counter offset of one tensor of one Gaussian probe."""
    return int(np.random.Generator(np.random.PCG64([seed, block, probe, tensor])).integers(0, P))


# --------------------------------------------------------------------------------- graph builders

def _model(nodes, inputs, outputs, inits=()) -> bytes:
    g = helper.make_graph(nodes, "probe", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", _OPSET)])
    m.ir_version = 8
    return m.SerializeToString()


def _f(name: str, shape=None):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _const(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _rtn_nodes(src: str, scale: str, qmax_name: str, out: str, tag: str) -> list:
    """out = Clip(Round(src / scale), -qmax, qmax) * scale."""
    n = helper.make_node
    return [
        n("Div", [src, scale], [f"{tag}r"]),
        n("Round", [f"{tag}r"], [f"{tag}rr"]),
        n("Neg", [qmax_name], [f"{tag}nq"]),
        n("Clip", [f"{tag}rr", f"{tag}nq", qmax_name], [f"{tag}q"]),
        n("Mul", [f"{tag}q", scale], [out]),
    ]


def _scale_nodes(tier: Tier) -> tuple[list, list, str]:
    """scale = amax / qmax (1 where amax == 0), rounded to fp16 with its floor for fp16 scales."""
    n = helper.make_node
    nodes = [n("Greater", ["amax", "zero"], ["pos"]), n("Div", ["amax", "qmax"], ["s0"]),
             n("Where", ["pos", "s0", "one"], ["s"])]
    if tier.scale_fmt != "fp16":
        return nodes, [], "s"
    nodes += [n("Cast", ["s"], ["s16"], to=TensorProto.FLOAT16), n("Cast", ["s16"], ["s32"], to=TensorProto.FLOAT),
              n("Max", ["s32", "smin"], ["sf"])]
    return nodes, [_const("smin", float(np.float16(tier.scale_floor)))], "sf"


def quant_graph(tier: Tier, shape: tuple[int, ...], axes: tuple[int | None, int | None],
                qmax: int | None = None, scale_input: bool = False) -> bytes:
    """W -> the values the written graph computes with at an integer tier (bit-identical to DQ but
    for the sign of a zero: a negative weight rounded to 0 is -0.0 here, +0.0 there).

    `qmax` overrides the tier's grid, for the paper's b-bit probe at widths no tier stores (e.g. 6).
    `scale_input`: the graph takes the scales as input S (float32, one per group in the grouped
    layout of `quant.group_scales`) instead of computing them from the absolute max; `/mse` tiers,
    whose clipping search runs once per weight on the host.
    """
    if tier.is_sign:
        return _sign_graph(tier, shape, axes)
    n = helper.make_node
    rank = len(shape)
    inits = [_const("zero", 0.0), _const("one", 1.0), _const("qmax", float(qmax or tier.qmax))]
    nodes = [n("Abs", ["W"], ["A"])]
    gran = tier.granularity
    if gran == "channel" and axes[0] is None or gran == "block" and axes[1] is None or rank == 0:
        gran = "tensor"
    if gran == "tensor":
        nodes.append(n("ReduceMax", ["A"], ["amax"], keepdims=1))
        src = "W"
    elif gran == "channel":
        others = [i for i in range(rank) if i != axes[0]]
        nodes.append(n("ReduceMax", ["A"], ["amax"], axes=others, keepdims=1) if others
                     else n("Identity", ["A"], ["amax"]))
        src = "W"
    else:
        b, bs = axes[1], tier.block_size
        nb = -(-shape[b] // bs)
        pads = [0] * (2 * rank)
        pads[rank + b] = nb * bs - shape[b]
        blocked = list(shape[:b]) + [nb, bs] + list(shape[b + 1:])
        inits += [_const("pads", pads, np.int64), _const("bshape", blocked, np.int64),
                  _const("pshape", list(shape[:b]) + [nb * bs] + list(shape[b + 1:]), np.int64),
                  _const("st", [0], np.int64), _const("en", [shape[b]], np.int64), _const("ax", [b], np.int64)]
        nodes = [n("Pad", ["W", "pads"], ["Wp"]), n("Reshape", ["Wp", "bshape"], ["Wb"]),
                 n("Abs", ["Wb"], ["A"]), n("ReduceMax", ["A"], ["amax"], axes=[b + 1], keepdims=1)]
        src = "Wb"
    ins = [_f("W", list(shape))]
    if scale_input:
        nodes = [x for x in nodes if x.op_type not in ("Abs", "ReduceMax") and x.output[0] != "amax"]
        ins.append(_f("S"))
        scale = "S"
    else:
        scale_nodes, scale_inits, scale = _scale_nodes(tier)
        nodes += scale_nodes
        inits += scale_inits
    out = "Yq"
    nodes += _rtn_nodes(src, scale, "qmax", out, "t")
    if gran == "block":
        nodes += [n("Reshape", [out, "pshape"], ["Yp"]), n("Slice", ["Yp", "st", "en", "ax"], ["Y"])]
    else:
        nodes.append(n("Identity", [out], ["Y"]))
    return _model(nodes, ins, [_f("Y", list(shape))], inits)


def _sign_graph(tier: Tier, shape: tuple[int, ...], axes: tuple[int | None, int | None]) -> bytes:
    """int1: W -> sign(W) * mean|W| per group (0 counts as +), the mean taken in float64 as the writer does."""
    n = helper.make_node
    rank = len(shape)
    gran = tier.granularity
    if gran == "channel" and axes[0] is None or gran == "block" and axes[1] is None or rank == 0:
        gran = "tensor"
    inits = [_const("zero", 0.0)]
    if gran == "block":
        b, bs = axes[1], tier.block_size
        nb = -(-shape[b] // bs)
        pads = [0] * (2 * rank)
        pads[rank + b] = nb * bs - shape[b]
        counts = np.full(nb, bs, np.float64)
        counts[-1] = shape[b] - (nb - 1) * bs
        inits += [_const("pads", pads, np.int64),
                  _const("bshape", list(shape[:b]) + [nb, bs] + list(shape[b + 1:]), np.int64),
                  _const("pshape", list(shape[:b]) + [nb * bs] + list(shape[b + 1:]), np.int64),
                  _const("st", [0], np.int64), _const("en", [shape[b]], np.int64), _const("ax", [b], np.int64),
                  _const("raxes", [b + 1], np.int64),
                  _const("counts", counts.reshape([nb if i == b else 1 for i in range(rank + 1)]), np.float64)]
        nodes = [n("Pad", ["W", "pads"], ["Wp"]), n("Reshape", ["Wp", "bshape"], ["Wb"]),
                 n("Cast", ["Wb"], ["W64"], to=TensorProto.DOUBLE), n("Abs", ["W64"], ["A"]),
                 n("ReduceSum", ["A", "raxes"], ["sums"], keepdims=1), n("Div", ["sums", "counts"], ["mean"])]
        src = "Wb"
    else:
        others = [] if gran == "tensor" else [i for i in range(rank) if i != axes[0]]
        nodes = [n("Cast", ["W"], ["W64"], to=TensorProto.DOUBLE), n("Abs", ["W64"], ["A"])]
        if gran == "tensor" or others:
            nodes.append(n("ReduceMean", ["A"], ["mean"], keepdims=1, **({"axes": others} if others else {})))
        else:
            nodes.append(n("Identity", ["A"], ["mean"]))
        src = "W"
    nodes.append(n("Cast", ["mean"], ["s"], to=TensorProto.FLOAT))
    scale = "s"
    if tier.scale_fmt == "fp16":
        nodes += [n("Cast", ["s"], ["s16"], to=TensorProto.FLOAT16), n("Cast", ["s16"], ["sr"], to=TensorProto.FLOAT)]
        scale = "sr"
    nodes += [n("GreaterOrEqual", [src, "zero"], ["pos"]), n("Neg", [scale], ["neg"]),
              n("Where", ["pos", scale, "neg"], ["Yq"])]
    if gran == "block":
        nodes += [n("Reshape", ["Yq", "pshape"], ["Yp"]), n("Slice", ["Yp", "st", "en", "ax"], ["Y"])]
    else:
        nodes.append(n("Identity", ["Yq"], ["Y"]))
    return _model(nodes, [_f("W", list(shape))], [_f("Y", list(shape))], inits)


def cast_graph(fmt: str) -> bytes:
    to = TensorProto.FLOAT16 if fmt == "fp16" else TensorProto.BFLOAT16
    nodes = [helper.make_node("Cast", ["W"], ["L"], to=to), helper.make_node("Cast", ["L"], ["Y"], to=TensorProto.FLOAT)]
    return _model(nodes, [_f("W")], [_f("Y")])


def zero_graph() -> bytes:
    """W -> zeros of W's shape (the zero tier: a dropped weight)."""
    nodes = [helper.make_node("Shape", ["W"], ["S"]),
             helper.make_node("ConstantOfShape", ["S"], ["Y"],
                              value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]))]
    return _model(nodes, [_f("W")], [_f("Y")])


def copy_graph() -> bytes:
    """W -> a copy of W, written into whatever output buffer the caller binds."""
    return _model([helper.make_node("Identity", ["W"], ["Y"])], [_f("W")], [_f("Y")])


def normal_graph() -> bytes:
    """(W, offset) -> (Z, S): Z of W's shape, N(0, 1) from the counter hash of each element's index, and
    S = sum(Z^2) (float64), which sets the block's sigma before `axpy_graph` adds the draw."""
    n = helper.make_node
    inits = [_const("zero_i", 0, np.int64), _const("one_i", 1, np.int64), _const("two_i", 2, np.int64),
             _const("p", P, np.int64), _const("half", 0.5), _const("pf", float(P)), _const("m2", -2.0),
             _const("tau", 2 * np.pi)]
    nodes = [n("Size", ["W"], ["size"]), n("Range", ["zero_i", "size", "one_i"], ["i"]),
             n("Mul", ["i", "two_i"], ["i2"]), n("Add", ["i2", "offset"], ["c1"]), n("Add", ["c1", "one_i"], ["c2"])]
    for tag in ("c1", "c2"):
        nodes.append(n("Mod", [tag, "p"], [f"{tag}x0"]))
        for r, (a, c) in enumerate(_ROUNDS):
            inits += [_const(f"a{r}", a, np.int64), _const(f"k{r}", c, np.int64)] if tag == "c1" else []
            x = f"{tag}x{r}"
            nodes += [n("Mul", [x, x], [f"{x}sq"]), n("Mod", [f"{x}sq", "p"], [f"{x}sqm"]),
                      n("Mul", [x, f"a{r}"], [f"{x}ax"]), n("Mod", [f"{x}ax", "p"], [f"{x}axm"]),
                      n("Add", [f"{x}sqm", f"{x}axm"], [f"{x}s1"]), n("Add", [f"{x}s1", f"k{r}"], [f"{x}s2"]),
                      n("Mod", [f"{x}s2", "p"], [f"{tag}x{r + 1}"])]
        last = f"{tag}x{len(_ROUNDS)}"
        nodes += [n("Cast", [last], [f"{tag}f"], to=TensorProto.FLOAT), n("Add", [f"{tag}f", "half"], [f"{tag}h"]),
                  n("Div", [f"{tag}h", "pf"], [f"{tag}u"])]
    nodes += [n("Log", ["c1u"], ["lg"]), n("Mul", ["lg", "m2"], ["lg2"]), n("Sqrt", ["lg2"], ["rad"]),
              n("Mul", ["c2u", "tau"], ["ang"]), n("Cos", ["ang"], ["cs"]), n("Mul", ["rad", "cs"], ["z"]),
              n("Shape", ["W"], ["shp"]), n("Reshape", ["z", "shp"], ["Z"]),
              # summed in float64: a float32 sum of 4M squares on the CPU provider was 1.6e-4 short. keepdims:
              # CUDA refuses to drop an empty axis; S is then [0] or [1] (the caller sums it).
              n("Cast", ["z"], ["z64"], to=TensorProto.DOUBLE), n("ReduceSumSquare", ["z64"], ["S"], keepdims=1)]
    ins = [_f("W"), helper.make_tensor_value_info("offset", TensorProto.INT64, [])]
    return _model(nodes, ins, [_f("Z"), helper.make_tensor_value_info("S", TensorProto.DOUBLE, None)], inits)


def axpy_graph() -> bytes:
    """(W, Z, sigma) -> W + sigma * Z."""
    n = helper.make_node
    nodes = [n("Mul", ["Z", "sigma"], ["dz"]), n("Add", ["W", "dz"], ["Y"])]
    return _model(nodes, [_f("W"), _f("Z"), _f("sigma", [])], [_f("Y")])


def sqdiff_graph() -> bytes:
    """(a, b) -> sum((a - b)^2), the squared divergence of one output at one step."""
    nodes = sqdiff_nodes("a", "b", "Y", TensorProto.FLOAT, "")
    any_f = [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in ("a", "b")]
    return _model(nodes, any_f, [_f("Y", [])])


def sqdiff_many_graph(pairs: list[int] | int) -> bytes:
    """(a0..a{n-1}, b0..b{n-1}) -> [sum((a_i - b_i)^2)]: every pair of one step in one run.

    `pairs` gives each pair's ONNX element type (an int n: n float pairs); float16 and small integer
    outputs are subtracted in float32, double and wide integers in double (`sqdiff_nodes`). Stacking same-shaped pairs
    into one reduction was tried and not kept: on ORT's CPU provider it took 1.16x the time at 2.5 KB a
    pair and 3.7x at 256 KB (the extra copy), and it could not be measured on a GPU.
    """
    h = helper.make_node
    types = [TensorProto.FLOAT] * pairs if isinstance(pairs, int) else list(pairs)
    nodes, sums = [], []
    for i in range(len(types)):
        nodes += [*sqdiff_nodes(f"a{i}", f"b{i}", f"s{i}", types[i], f"p{i}/", keepdims=1),
                  h("Reshape", [f"s{i}", "one"], [f"r{i}"])]
        sums.append(f"r{i}")
    nodes.append(h("Concat", sums, ["Y"], axis=0))
    ins = [helper.make_tensor_value_info(f"{x}{i}", t, None) for x in "ab" for i, t in enumerate(types)]
    return _model(nodes, ins, [_f("Y", [len(types)])], [numpy_helper.from_array(np.array([1], np.int64), "one")])


# ------------------------------------------------------------------------------------- the device

class DeviceProbes:
    """Runs the probe graphs on the sweep's device; inputs and outputs stay device OrtValues."""

    def __init__(self, device, threads: int = 0, shared_stream: bool = False):
        from tqs_onnx.runtime import make_session

        self.device = device
        self._make = lambda blob: make_session(blob, device, threads, shared_stream=shared_stream)
        self._sessions: dict[Any, Any] = {}
        self._scales: dict[Any, tuple[Any, Any]] = {}  # `/mse` scales: key -> (the weight, its scales)
        self._pending: list = []
        self._no_wait = None

    def _session(self, key, build):
        if key not in self._sessions:
            self._sessions[key] = self._make(build())
        return self._sessions[key]

    def _bind(self, session, feeds: dict[str, Any]) -> Any:
        """An IOBinding of `feeds`, every output on the device."""
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        for out in session.get_outputs():
            binding.bind_output(out.name, self.device.kind)
        return binding

    def _run(self, session, feeds: dict[str, Any], wait: bool = True) -> Any:
        binding = self._bind(session, feeds)
        if wait:
            session.run_with_iobinding(binding)
        else:
            if self._no_wait is None:
                from tqs_onnx.runtime import _ort

                self._no_wait = _ort().RunOptions()
                self._no_wait.add_run_config_entry("disable_synchronize_execution_providers", "1")
            session.run_with_iobinding(binding, self._no_wait)
            self._pending.append(binding)
        return binding.get_outputs()[0]

    def synchronize(self) -> None:
        """Wait for the runs queued with wait=False."""
        while self._pending:
            self._pending.pop().synchronize_outputs()

    def tier(self, w, tier: Tier, axes: tuple[int | None, int | None]):
        """The weight as the written graph computes with it at `tier` (device in, device out). An `/mse`
        tier's scales are cached per weight value (the sweep asks again for its bound weights)."""
        if tier.is_identity:
            return w
        shape = tuple(w.shape())
        if tier.is_int and tier.mse:
            s = self._session(("qs", tier, shape, axes), lambda: quant_graph(tier, shape, axes, scale_input=True))
            return self._run(s, {"W": w, "S": self._clipped_scales(w, tier, axes)})
        if tier.is_int:
            s = self._session(("q", tier, shape, axes), lambda: quant_graph(tier, shape, axes))
        elif tier.is_zero:
            s = self._session("zero", zero_graph)
        else:
            s = self._session(("cast", tier.fmt), lambda: cast_graph(tier.fmt))
        return self._run(s, {"W": w})

    def _clipped_scales(self, w, tier: Tier, axes: tuple[int | None, int | None]):
        """An `/mse` tier's scales: the clipping search runs on a host copy of the weight, once per
        nominal weight and tier (joint checks ask again), and only the scales go to the device."""
        key = (w.data_ptr(), tuple(w.shape()), tier, axes)
        cached = self._scales.get(key)
        if cached is None or cached[0] is not w:  # the entry holds w, so no other live value has its address
            from tqs_onnx.quant import group_scales

            cached = (w, self.device.to_device(group_scales(w.numpy(), tier, *axes).astype(np.float32)))
            self._scales[key] = cached
        return cached[1]

    def copy_into(self, src, dst) -> None:
        """Copy the float32 value `src` into the buffer `dst` (same shape), both on the device."""
        s = self._session("copy", copy_graph)
        binding = s.io_binding()
        binding.bind_ortvalue_input("W", src)
        binding.bind_ortvalue_output("Y", dst)
        s.run_with_iobinding(binding)

    def quant_probe(self, w, bits: int):
        """Q_b(w): the paper's symmetric per-tensor b-bit rounding."""
        shape = tuple(w.shape())
        s = self._session(("probe", bits, shape), lambda: quant_graph(Tier("int8"), shape, (None, None),
                                                                       2 ** (bits - 1) - 1))
        return self._run(s, {"W": w})

    def normal(self, w, offset: int) -> tuple[Any, float]:
        """(z, sum(z^2)): standard normal values of w's shape from counter `offset` (`counter_normal`), on
        the device, and their sum of squares on the host."""
        s = self._session("normal", normal_graph)
        binding = self._bind(s, {"W": w, "offset": self.device.to_device(np.array(offset, np.int64))})
        s.run_with_iobinding(binding)
        z, sumsq = binding.get_outputs()
        return z, float(sumsq.numpy().sum())

    def axpy(self, w, z, sigma: float):
        """w + sigma * z."""
        s = self._session("axpy", axpy_graph)
        return self._run(s, {"W": w, "Z": z, "sigma": self.device.to_device(np.array(sigma, np.float32))})

    def gauss(self, w, offset: int, sigma: float):
        """w + sigma * z, z the standard normal values of counter `offset`."""
        return self.axpy(w, self.normal(w, offset)[0], sigma)

    def gauss_probe(self, w: dict[str, Any], offsets: list[int], norm: float) -> dict[str, Any]:
        """One Gaussian draw over a block's tensors `w` (tensor j from counter offsets[j]), scaled so that the
        perturbation of the whole block has Frobenius norm `norm`: sigma = norm / sqrt(sum_j ||z_j||^2).
        Norm 0, or no element to draw, leaves the weights as they are."""
        if norm == 0:
            return dict(w)
        noise = {n: self.normal(v, off) for (n, v), off in zip(w.items(), offsets, strict=True)}
        sumsq = sum(s for _, s in noise.values())
        sigma = norm / math.sqrt(sumsq) if sumsq > 0 else 0.0
        # Each z is dropped once its draw is made: the z and draws held together never exceed the block by
        # more than one tensor.
        return {n: self.axpy(w[n], noise.pop(n)[0], sigma) for n in list(noise)}

    def sqdiff(self, a, b) -> float:
        """sum((a - b)^2); on the CPU provider device memory is host memory, so numpy reads it in place."""
        if self.device.kind == "cpu" and _numpy_types(a, b):
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN: the caller checks
                d = a.numpy().astype(np.float64) - b.numpy()
                return float(np.einsum("i,i->", d.ravel(), d.ravel()))
        if a.data_type() != "tensor(float)":  # bfloat16 (numpy cannot hold it), float16, integers
            return float(self.sqdiff_many([(a, b)])[0])
        s = self._session("sqdiff", sqdiff_graph)
        return float(self._run(s, {"a": a, "b": b}).numpy())

    def sqdiff_many(self, pairs: list[tuple[Any, Any]], wait: bool = True) -> Any:
        """[sum((a - b)^2) for (a, b) in pairs]: on a GPU one run and one copy to the host for all of
        them (a run per pair would wait for the device once per pair).

        wait=False (GPU, shared stream): queue the run and return the device value; read it with
        `.numpy()` after `synchronize()`."""
        if self.device.kind == "cpu" and _numpy_types(*(v for pair in pairs for v in pair)):
            return np.array([self.sqdiff(a, b) for a, b in pairs])
        types = tuple(_ELEM_TYPES.get(a.data_type(), TensorProto.FLOAT) for a, _ in pairs)
        s = self._session(("sqdiff", types), lambda: sqdiff_many_graph(list(types)))
        feeds = {f"a{i}": a for i, (a, _) in enumerate(pairs)} | {f"b{i}": b for i, (_, b) in enumerate(pairs)}
        if not wait:
            return self._run(s, feeds, wait=False)
        return self._run(s, feeds).numpy().astype(np.float64)


def _numpy_types(*values) -> bool:
    return all(v.data_type() in ORT_NUMPY_TYPES for v in values)
