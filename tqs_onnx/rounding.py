"""Trajectory-aware rounding for `/gptq` tiers: GPTQ's error-compensating rounding on the inputs the
model itself sees along its nominal rollouts.

A `/gptq` tier stores what its plain tier stores (same integer grid, same scales, computed from the
weight's absolute max as round-to-nearest does); only the integers differ. For a weight W read as the
B input of MatMul/Gemm nodes, as the kernel of Conv nodes (one group) or as W or R of a forward
LSTM/GRU/RNN, H = sum over the sweep contexts' nominal rollouts of X^T X, X the rows those nodes
multiply it by (a Conv's: its input's windows; a recurrent R: the previous hidden states). The
integers are chosen
input row after input row (largest diag(H) first), each row rounded to nearest and its error spread
over the rows not yet rounded through H's inverse Cholesky factor (Frantar et al., "GPTQ", 2022),
which lowers ||X (W - W_q)||^2 against plain rounding.
No gradients and no data beyond the sweep's own contexts: X comes from rolling out the FP32 model.

A weight with no such statistics (read by any other op, or never reached) rounds to nearest; so does
one whose GPTQ integers, fitted on all sweep contexts but one, lose to rounding to nearest on that one
at every damping tried (summed over the contexts: `held_out_damping`, which also chooses the damping;
rows of a few rollouts are far from independent). The codes
are fixed once per sweep setup and travel with a plan in a sidecar file (`save_codes`), so the sweep's
measured damage, the joint check and the written model see the same values.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tqs_onnx.errors import TqsError
from tqs_onnx.graph import FLOAT_TYPES, cast_to, infer_value_shapes, main_opset, subgraph_refs
from tqs_onnx.quant import apply_tier, broadcast_scales, quantize
from tqs_onnx.tiers import Tier
from tqs_onnx.util import atomic_write, fresh_name

ROUNDING_VERSION = "gptq9"  # changed whenever the codes may change (a sweep checkpoint records it)
DAMP = 0.01  # H += DAMP * mean(live diag H) * I: keeps the inverse stable where inputs are nearly collinear
# Dampings the held-out check chooses among (`held_out_damping`): more damping leans GPTQ towards rounding
# to nearest (a diagonal H is nearest's), which few rows per input call for.
DAMPINGS = (0.01, 0.1, 1.0, 10.0)
CODES_SUFFIX = ".codes.npz"
CHUNK_BYTES = 1 << 30  # activations one statistics rollout returns per step, at most (estimated)
LAZY_BATCH = 128  # input rows rounded between two matrix-product updates of the rows after them


_THREADS = None


def _blas_threads(n: int):
    """A context that limits the BLAS library numpy calls to n threads (threadpoolctl)."""
    global _THREADS
    if _THREADS is None:
        from threadpoolctl import ThreadpoolController
        _THREADS = ThreadpoolController()
    return _THREADS.limit(limits=n, user_api="blas")


@dataclass
class InputMoments:
    """H = X^T X (float64) of the rows one weight is multiplied by, and the weight's input axis: 0 for a
    (K, N) matrix, else the first of the axes its inputs run along (the axes before it are outputs)."""

    h: np.ndarray
    input_axis: int
    rows: int = 0  # how many input rows were summed
    # H of each sweep context alone: the held-out check of `Rounding.codes_for` fits on all contexts but
    # one and measures on that one, for each.
    per_context: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    _factors: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)
    _folds: list[tuple["InputMoments", np.ndarray]] | None = field(default=None, repr=False, compare=False)

    def folds(self) -> list[tuple["InputMoments", np.ndarray]]:
        """(moments of every context but one, H of that one) for each context; none with fewer than two
        contexts that brought rows. Kept, with their factors, until `forget_folds`."""
        if self._folds is None:
            # each fold summed from the other contexts, not subtracted from the total: a quiet context
            # beside loud ones (1e5 apart) subtracted to exactly zero
            items = sorted(self.per_context.items())
            self._folds = [] if len(items) < 2 else \
                [(InputMoments(sum(h for d, h in items if d != c), self.input_axis), held) for c, held in items]
        return self._folds

    def forget_folds(self) -> None:
        """Drop the folds and their factors (every tier of the weight is rounded)."""
        self._folds = None

    def factor(self, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
        """(input order, largest diag(H) first; upper Cholesky factor of the reordered H^-1 damped by
        `damp` times the mean of diag(H) over the live inputs), computed once for every tier."""
        if damp not in self._factors:
            if not np.isfinite(self.h).all():
                raise TqsError("/gptq: the input moments are not finite (Rounding.from_moments leaves such weights "
                               "to round to nearest)")
            h = self.h.copy()
            dead = np.diag(h) == 0
            live_mean = float(np.mean(np.diag(h)[~dead])) if (~dead).any() else 1.0
            h[dead, dead] = live_mean  # inputs that are always zero: their rows round to nearest, carry nothing
            order = np.argsort(-np.diag(h), kind="stable")
            h = h[np.ix_(order, order)] + damp * live_mean * np.eye(len(h))
            try:
                with _blas_threads(1):
                    self._factors[damp] = order, np.linalg.cholesky(np.linalg.inv(h)).T
            except np.linalg.LinAlgError:
                raise TqsError("/gptq: the input moments are not positive definite even after damping") from None
        return self._factors[damp]


@dataclass(frozen=True)
class Reader:
    """One node that multiplies a weight by activations: how to turn them into the weight's input rows."""

    activations: tuple[str, ...]
    input_axis: int  # 0: a (K, N) matrix; else the axes before it are outputs, from it inputs (Conv 1, RNNs 2)
    trans_a: bool = False  # Gemm(transA=1): the activation is (K, M)
    conv: tuple | None = None  # Conv: (kernel shape, pads, strides, dilations)
    recurrent: bool = False  # LSTM/GRU/RNN R: the previous hidden states, initial_h then Y[:-1]
    gram: int = 0  # K: the activations are X^T X (K x K) and X's shape, computed in the session
    elem: int = 0  # the activations' element type where the weight is cast before use (0: the weight's)

    def rows(self, values: list[np.ndarray | None]) -> np.ndarray:
        """The activations as rows of the weight's flattened inputs, float64."""
        x = np.asarray(values[0], dtype=np.float64)
        if self.conv is not None:
            return _patches(x, *self.conv)
        if self.recurrent:  # values: Y (seq, 1, batch, H), initial_h (1, batch, H) or None
            h = x.shape[-1]
            first = np.zeros((x.shape[2], h)) if values[1] is None else np.asarray(values[1], np.float64).reshape(-1, h)
            return np.concatenate([first, x[:-1].reshape(-1, h)])
        return x.T if self.trans_a else x.reshape(-1, x.shape[-1])


def _patches(x: np.ndarray, kernel: tuple, pads: tuple, strides: tuple, dilations: tuple) -> np.ndarray:
    """im2col: every (C, *kernel) window a Conv multiplies its weight by, one row each."""
    r = len(kernel)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + r]) for i in range(r)])
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    win = np.lib.stride_tricks.sliding_window_view(x, extent, axis=tuple(range(2, 2 + r)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dilations)]
    # (N, C, *out, *kernel) -> (N, *out, C, *kernel) -> rows
    win = np.moveaxis(win, 1, 1 + r)
    return win.reshape(-1, int(np.prod(win.shape[1 + r:])))


def _readers(model: onnx.ModelProto, names: set[str]) -> dict[str, list[Reader]]:
    """weight -> the main-graph nodes that multiply it by activations: MatMul/Gemm reading it as B, Conv
    (one group, explicit pads) as its kernel, a forward time-major LSTM/RNN as W or R, a GRU as W (and
    as R with linear_before_reset), directly or through an Identity or a Cast to a float type (float16
    compute of a float32 weight). A weight read by anything else (as A, by another op, inside a
    subgraph), or along different input axes, gets no entry: it rounds to nearest."""
    dims = {i.name: tuple(i.dims) for i in model.graph.initializer}
    found: dict[str, list[Reader]] = {}
    other: set[str] = set()
    alias = {n: (n, 0) for n in names}  # value -> (weight, element type it is cast to; 0: its own)
    for node in model.graph.node:  # in topological order, as ONNX requires
        other |= {alias[v][0] for v in subgraph_refs(node) if v in alias}
        if node.op_type in ("Identity", "Cast") and node.input and node.input[0] in alias and node.output \
                and (node.op_type == "Identity" or cast_to(node) in FLOAT_TYPES):  # float16 compute of a weight
            w, elem = alias[node.input[0]]
            alias[node.output[0]] = (w, cast_to(node) or elem)
            continue
        for i, name in enumerate(node.input):
            if name not in alias:
                continue
            w, elem = alias[name]
            reader = _reader(node, i, dims.get(w, ()))
            if reader is None:
                other.add(w)
            else:
                found.setdefault(w, []).append(replace(reader, elem=elem) if elem else reader)
    other |= {alias[o.name][0] for o in model.graph.output if o.name in alias}
    return {n: r for n, r in found.items() if n not in other and len({x.input_axis for x in r}) == 1}


def _reader(node: onnx.NodeProto, index: int, shape: tuple) -> Reader | None:
    """How `node` multiplies its input `index` (a weight of `shape`) by activations; None: it does not."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" and index == 1 and len(shape) == 2:
        return Reader((node.input[0],), 0)
    if node.op_type == "Gemm" and index == 1:
        return Reader((node.input[0],), 1 if attrs.get("transB", 0) else 0, bool(attrs.get("transA", 0)))
    if node.op_type == "Conv" and index == 1 and len(shape) >= 3 and attrs.get("group", 1) == 1 \
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        kernel = shape[2:]
        r = len(kernel)
        return Reader((node.input[0],), 1, conv=(kernel, tuple(attrs.get("pads", [0] * 2 * r)),
                                                 tuple(attrs.get("strides", [1] * r)),
                                                 tuple(attrs.get("dilations", [1] * r))))
    # one forward recurrent op, time-major: W multiplies x_t, R the previous hidden state (from Y and
    # initial_h); a GRU's R only with linear_before_reset (else its third gate multiplies r * h_{t-1})
    if node.op_type in ("LSTM", "GRU", "RNN") and index in (1, 2) and len(shape) == 3 and shape[0] == 1 \
            and attrs.get("direction", b"forward") in (b"forward", "forward") and not attrs.get("layout", 0):
        if index == 1:
            return Reader((node.input[0],), 2)
        initial = node.input[5] if len(node.input) > 5 and node.input[5] else ""
        if node.output and node.output[0] and (node.op_type != "GRU" or attrs.get("linear_before_reset", 0)):
            return Reader((node.output[0], initial), 2, recurrent=True)
    return None


def input_moments(model: onnx.ModelProto, weights: dict[str, int], rollout_factory,
                  input_shapes: dict[str, tuple[int, ...]] | None = None,
                  chunk_bytes: int = CHUNK_BYTES) -> dict[str, InputMoments]:
    """H per weight (name -> element type) from the FP32 model's nominal rollouts.

    `rollout_factory(model, extra_outputs)` opens a session on `model` and yields, per context and
    step, (context index, {activation name: host array}); the activations are streamed, never stacked.
    Where they would hold more than `chunk_bytes` per step (shape inference's estimate from
    `input_shapes`, the graph inputs' shapes in the contexts), the rollouts are repeated, each returning
    a share of them. Each context's H is kept too (`InputMoments.per_context`)."""
    readers = _readers(model, set(weights))
    shapes = infer_value_shapes(model, input_shapes or {}) if readers else {}
    grams, nodes, consts = _gram_nodes(model, readers, weights, shapes)  # X^T X summed in the session
    readers = {w: [grams.get(id(r), r) for r in rs] for w, rs in readers.items()}
    sums: dict[str, InputMoments] = {}
    chunks = _chunks(readers, chunk_bytes, shapes,
                     {a: n for r in grams.values() for a, n in zip(r.activations, (4 * r.gram ** 2, 16))})
    probe = onnx.ModelProto()
    if chunks:
        probe.CopyFrom(model)  # once: each rollout only changes its extra nodes and outputs
        probe.graph.initializer.extend(consts)
    present = {o.name for o in model.graph.output}
    for chunk in chunks:
        elem = {}  # output -> element type: the activations, or a gram (float32) and its shape (int64)
        for w, r in chunk:
            types = (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64) if r.gram else \
                (r.elem or weights[w],) * len(r.activations)
            elem.update((a, t) for a, t in zip(r.activations, types) if a)
        del probe.graph.output[len(model.graph.output):]
        del probe.graph.node[len(model.graph.node):]
        probe.graph.node.extend(n for g in dict.fromkeys(r.activations[0] for _, r in chunk if r.gram)
                                for n in nodes[g])
        probe.graph.output.extend(helper.make_tensor_value_info(a, t, None) for a, t in elem.items() if a not in present)
        for context, step in rollout_factory(probe, sorted(elem)):
            for w, r in chunk:
                if r.gram:  # (K, K) and the activation's shape, rows along axis 0 (or 1 for Gemm's transA)
                    h, rows = np.asarray(step[r.activations[0]], np.float64), int(step[r.activations[1]][int(r.trans_a)])
                else:
                    x = r.rows([step[a] if a else None for a in r.activations])
                    h, rows = x.T @ x, x.shape[0]
                m = sums.get(w)
                if m is None:
                    m = sums[w] = InputMoments(np.zeros(h.shape), r.input_axis)
                if h.shape != m.h.shape:
                    raise TqsError(f"weight '{w}': its consumers multiply it by rows of {h.shape[0]} inputs, "
                                   f"expected {m.h.shape[0]}")
                m.h += h
                m.rows += rows
                if rows:
                    m.per_context[context] = m.per_context[context] + h if context in m.per_context else h.copy()
    return sums


def _gram_nodes(model: onnx.ModelProto, readers: dict[str, list[Reader]], weights: dict[str, int],
                shapes: dict[str, list]) -> tuple[dict[int, Reader], dict[str, list], list[onnx.TensorProto]]:
    """In-session sums for the MatMul/Gemm readers of weights whose input count K is known and whose
    activation brings at least K rows a step (or an unknown number): the session returns X^T X
    (K x K, float32, the activation cast to float first where it is not) and the activation's shape
    instead of the activation, so a large activation never leaves the device and its sum runs there.
    Where a step has fewer rows than K the activation itself is smaller: it is returned as before.
    Conv windows and recurrent rows are formed on the host.

    Returns id(reader) -> its gram reader (the reader's own input axis), gram output -> the nodes
    computing it, and the shape constants those nodes read."""
    if main_opset(model) < 5:
        return {}, {}, []  # Reshape takes its shape as an input from opset 5
    dims = {i.name: tuple(i.dims) for i in model.graph.initializer}
    taken = {v for n in model.graph.node for v in (*n.input, *n.output)}
    taken |= {v.name for v in (*model.graph.input, *model.graph.output, *model.graph.value_info, *model.graph.initializer)}

    def fresh(base: str) -> str:
        return fresh_name(base, taken)

    out: dict[int, Reader] = {}
    nodes: dict[str, list] = {}
    done: dict[tuple[str, bool, int], tuple[str, str]] = {}
    consts: dict[int, str] = {}
    for w, rs in readers.items():
        shape = dims.get(w, ())
        for r in rs:
            if r.conv is not None or r.recurrent or len(shape) != 2:
                continue
            a, k = r.activations[0], shape[r.input_axis]
            adims = shapes.get(a)
            if adims and all(isinstance(d, int) for d in adims):
                rows = adims[1] if r.trans_a else math.prod(adims[:-1])
                if rows < k:
                    continue  # the activation is smaller than its gram
            key = (a, r.trans_a, k)
            if key not in done:
                g = fresh(f"__tqs_gram_{len(done)}")
                size, x = fresh(f"{g}_shape"), a
                made = []
                if (r.elem or weights[w]) != onnx.TensorProto.FLOAT:  # sum in float32 whatever the activation's type
                    x = fresh(f"{g}_float")
                    made.append(helper.make_node("Cast", [a], [x], to=onnx.TensorProto.FLOAT))
                if r.trans_a:  # the activation is (K, M)
                    t = fresh(f"{g}_t")
                    made += [helper.make_node("Transpose", [x], [t]), helper.make_node("MatMul", [x, t], [g]),
                             helper.make_node("Shape", [x], [size])]
                else:
                    if k not in consts:
                        consts[k] = fresh(f"__tqs_gram_shape_{k}")
                    rows_name, t = fresh(f"{g}_rows"), fresh(f"{g}_t")
                    made += [helper.make_node("Reshape", [x, consts[k]], [rows_name]),
                             helper.make_node("Transpose", [rows_name], [t], perm=[1, 0]),
                             helper.make_node("MatMul", [t, rows_name], [g]),
                             helper.make_node("Shape", [rows_name], [size])]
                done[key] = (g, size)
                nodes[g] = made
            out[id(r)] = replace(r, activations=done[key], gram=k)
    inits = [numpy_helper.from_array(np.array([-1, k], np.int64), name) for k, name in consts.items()]
    return out, nodes, inits


def _chunks(readers: dict[str, list[Reader]], chunk_bytes: int, shapes: dict[str, list],
            known: dict[str, int] | None = None) -> list[list[tuple[str, Reader]]]:
    """Readers packed so that the activations one rollout returns stay below `chunk_bytes` a step, sized
    by `shapes` (shape inference with the graph inputs at the contexts' shapes; an activation of unknown
    size counts as 1/16 of the budget; `known`: sizes given, such as the gram outputs); an activation
    shared by readers of one rollout counts once."""
    given = known or {}

    def size(a: str) -> int:
        if a in given:
            return given[a]
        dims = shapes.get(a)
        known = dims and all(isinstance(d, int) for d in dims)
        return 4 * math.prod(dims) if known else chunk_bytes // 16

    chunks: list[list[tuple[str, Reader]]] = []
    used, seen = chunk_bytes, set()
    for w, rs in readers.items():
        for r in rs:
            need = sum(size(a) for a in r.activations if a and a not in seen)
            if used + need > chunk_bytes and (not chunks or chunks[-1]):
                chunks.append([])
                used, seen = 0, set()
                need = sum(size(a) for a in r.activations if a)
            chunks[-1].append((w, r))
            used += need
            seen.update(a for a in r.activations if a)
    return chunks


def gptq_codes(w: np.ndarray, moments: InputMoments, tier: Tier, channel_axis: int | None,
               block_axis: int | None, damp: float = DAMP) -> np.ndarray:
    """Integers (int8, w's layout) on `tier`'s grid with its round-to-nearest scales, rounded GPTQ's way
    with H damped by `damp` (see InputMoments.factor)."""
    if w.ndim < 2 or tier.is_sign or not tier.is_int or (w.ndim > 2 and not moments.input_axis):
        raise TqsError(f"/gptq rounds matrices, Conv kernels and recurrent weights on int8/int6/int4/int2 grids only "
                       f"(got {tier}, shape {list(w.shape)})")
    shape = w.shape
    # (N, K), a Conv kernel (O, C * k...) or a recurrent (1 * gates, K): inputs along axis 1, turned to rows
    s = _as_rows(broadcast_scales(w, tier, channel_axis, block_axis).astype(np.float64), moments)
    w = _as_rows(w, moments)
    with _blas_threads(1):  # on one thread: beside ORT's spinning threads a 128x128 inverse took 50 ms, not 1
        q = _gptq_rows(w.astype(np.float64), s, *moments.factor(damp), tier.qmax)
    return (q.T if moments.input_axis else q).reshape(shape)


def held_out_damping(w: np.ndarray, moments: InputMoments, tier: Tier, channel_axis: int | None,
                     block_axis: int | None) -> float | None:
    """The damping (of `DAMPINGS`) whose GPTQ rounding, fitted on every sweep context but one, gives the
    lowest ||X (W - W_q)||^2 on that one, summed over the contexts (leave one context out); None where
    rounding to nearest does at least as well, DAMP where fewer than two contexts brought rows.

    Rows of one rollout are far from independent, and contexts differ: with GPTQ's usual 1% damping a
    GRU's R fitted on 60 rows for 48 inputs cut the error to 0.35x nearest's on those rows and raised it
    to 1.24x on 32 other contexts (held-out MAE 19% worse); damped as chosen here (1.0), 0.82x. On a
    vendor LSTM (dtln_2, 1.5 rows per input) 1% gave 0.81x nearest's error on the evaluation contexts,
    the chosen damping 0.58x. Fitted on fewer rows than the whole, GPTQ overfits more: the choice leans
    to more damping than the whole would need (checked on half the contexts first, the check lost
    dtln_1's GPTQ integers, 0.65x on the evaluation contexts, outright)."""
    folds = moments.folds()
    if not folds:
        return DAMP

    def error(codes: np.ndarray | None, h: np.ndarray) -> float:
        e = _as_rows(w.astype(np.float64) - apply_tier(w, tier, channel_axis, block_axis, codes), moments)
        with _blas_threads(1):
            return float(np.sum((h @ e) * e))

    nearest = sum(error(None, held) for _, held in folds)
    errors = {damp: sum(error(gptq_codes(w, fit, tier, channel_axis, block_axis, damp), held)
                        for fit, held in folds) for damp in DAMPINGS}
    best = min(DAMPINGS, key=lambda d: (errors[d], d))
    return best if errors[best] < nearest else None


def _as_rows(a: np.ndarray, moments: InputMoments) -> np.ndarray:
    """A weight-shaped array as (inputs, outputs), the rows H's inputs index (see gptq_codes)."""
    outputs = math.prod(a.shape[:moments.input_axis]) if moments.input_axis else a.shape[0]
    a = a.reshape(outputs, -1)
    return a.T if moments.input_axis else a


def _gptq_rows(w: np.ndarray, s: np.ndarray, order: np.ndarray, u: np.ndarray, qmax: int) -> np.ndarray:
    """GPTQ on a (inputs, outputs) matrix w with scales s of its shape: int8 codes, w's layout."""
    work, s = w[order], s[order]
    q = np.zeros(work.shape, np.int8)
    # GPTQ's lazy batches: rows are rounded one by one within a batch; the rows after it receive the
    # batch's errors in one matrix product (the same sums as row-by-row updates, grouped)
    for b0 in range(0, len(work), LAZY_BATCH):
        b1 = min(b0 + LAZY_BATCH, len(work))
        batch, errors = work[b0:b1], np.empty((b1 - b0, work.shape[1]))
        for i, k in enumerate(range(b0, b1)):
            row = np.clip(np.rint(batch[i] / s[k]), -qmax, qmax)
            q[k] = row
            errors[i] = (batch[i] - row * s[k]) / u[k, k]
            batch[i + 1:] -= np.outer(u[k, k + 1:b1], errors[i])
        work[b1:] -= u[b0:b1, b1:].T @ errors
    out = np.empty_like(q)
    out[order] = q
    return out


@dataclass
class Rounding:
    """The `/gptq` codes of one prepared model, computed on demand and kept: (weight, tier) -> int8."""

    moments: dict[str, InputMoments]
    codes: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    forward_passes: int = 0  # of the FP32 rollouts that gathered the moments
    # Weights left to round to nearest: fewer statistics rows than inputs (name -> (rows, inputs)).
    too_few_rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    # The damping chosen per (weight, tier) by the held-out check (None: nearest's integers)
    damping: dict[tuple[str, str], float | None] = field(default_factory=dict)
    # Weights left to round to nearest: their statistics are not finite (an activation overflowed)
    non_finite: list[str] = field(default_factory=list)

    @classmethod
    def from_moments(cls, moments: dict[str, InputMoments], forward_passes: int = 0) -> "Rounding":
        """Keeps the statistics of weights with at least as many rows as inputs. With fewer, X^T X is
        singular: GPTQ then pushes the rounding error into directions the sweep contexts never excite,
        which other inputs do (a GRU's R with 48 rows for 128 inputs: 26x less damage than round-to-
        nearest on the sweep contexts, 4x more on others); such a weight rounds to nearest."""
        few = {n: (m.rows, int(m.h.shape[0])) for n, m in moments.items() if m.rows < m.h.shape[0]}
        # a NaN or inf in X^T X (an activation, or float32 sums overflowing in the session) rounded most
        # rows to code 0 without an error: such a weight rounds to nearest
        bad = sorted(n for n, m in moments.items() if n not in few and not (
            np.isfinite(m.h).all() and all(np.isfinite(h).all() for h in m.per_context.values())))
        return cls({n: m for n, m in moments.items() if n not in few and n not in bad},
                   forward_passes=forward_passes, too_few_rows=few, non_finite=bad)

    @property
    def nearest(self) -> dict[str, list[str]]:
        """Weights whose GPTQ codes lost to round-to-nearest on held-out contexts at every damping, and at
        which tiers, in the order they were rounded."""
        out: dict[str, list[str]] = {}
        for (name, tier), damp in self.damping.items():
            if damp is None:
                out.setdefault(name, []).append(tier)
        return out

    def codes_for(self, name: str, w: np.ndarray, tier: Tier, channel_axis: int | None,
                  block_axis: int | None) -> np.ndarray | None:
        """The weight's codes at a /gptq tier, or None where it rounds to nearest (no statistics)."""
        key = (name, str(tier.base))
        if key not in self.codes and name in self.moments:
            m = self.moments[name]
            damp = self.damping[key] = held_out_damping(w, m, tier, channel_axis, block_axis)
            if damp is None:
                self.codes[key] = quantize(w, tier, channel_axis, block_axis)[0].astype(np.int8)
            else:
                self.codes[key] = gptq_codes(w, m, tier, channel_axis, block_axis, damp)
        return self.codes.get(key)


def _codes_name(plan_path: str | os.PathLike, digest: str) -> Path:
    p = Path(plan_path)
    return p.with_name(f"{p.name.removesuffix('.json')}.{digest[:12]}{CODES_SUFFIX}")


def codes_path(plan_path: str | os.PathLike) -> Path:
    """The codes file the plan at `plan_path` names (beside it)."""
    p = Path(plan_path)
    try:
        return p.with_name(Path(str(json.loads(p.read_text())["rounding"]["file"])).name)
    except (OSError, ValueError, KeyError, TypeError):
        raise TqsError(f"{p}: not a plan that names a codes file") from None


def save_codes(codes: dict[tuple[str, str], np.ndarray], plan_path: str | os.PathLike,
               with_statistics: list[str]) -> dict[str, Any]:
    """Write the plan's /gptq codes beside it (atomically); the plan's `rounding` entry names the file
    and the weights that have statistics (any of them at a /gptq tier must have its codes).

    The file is named by the plan and its own sha256 (`plan.<sha256[:12]>.codes.npz`), so writing a new
    plan at a plan's path never replaces the codes the old plan reads: killed before the new plan is in
    place, the old pair still applies. `remove_stale_codes` drops the old file once the plan is written."""
    keys = sorted(codes)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{f"c{i}": codes[k] for i, k in enumerate(keys)})
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = _codes_name(plan_path, digest)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(path, write)
    return {"file": path.name, "sha256": digest,
            "keys": [list(k) for k in keys], "weights_with_statistics": sorted(with_statistics)}


def remove_stale_codes(plan_path: str | os.PathLike, plan: dict[str, Any]) -> None:
    """After `plan` is written at `plan_path`: remove the codes files earlier plans at that path named
    (`plan.<12 hex digits>.codes.npz`, or `plan.codes.npz` of versions before), except the plan's own."""
    p = Path(plan_path)
    stem = p.name.removesuffix(".json")
    keep = ((plan.get("rounding") or {}).get("file") if isinstance(plan.get("rounding"), dict) else None)
    pattern = re.compile(re.escape(stem) + r"(\.[0-9a-f]{12})?" + re.escape(CODES_SUFFIX))
    for old in p.parent.glob(f"{glob.escape(stem)}*{CODES_SUFFIX}"):
        if old.name != keep and pattern.fullmatch(old.name):
            old.unlink(missing_ok=True)


def load_codes(plan: dict[str, Any], plan_path: str | os.PathLike) -> dict[tuple[str, str], np.ndarray]:
    """The codes a plan's `rounding` entry names (read only for a plan with /gptq tiers)."""
    entry = plan.get("rounding")
    keys = entry.get("keys") if isinstance(entry, dict) else None
    if not isinstance(entry, dict) or not {"file", "sha256", "keys"} <= set(entry) or not isinstance(keys, list) \
            or not all(isinstance(k, list) and len(k) == 2 and all(isinstance(x, str) for x in k) for k in keys):
        raise TqsError(f"{plan_path}: plan puts weights at /gptq tiers but names no valid codes file (allocate "
                       "writes one with --verify-model)")
    path = Path(plan_path).parent / Path(str(entry["file"])).name  # beside the plan, never elsewhere
    if not path.is_file():
        raise TqsError(f"{plan_path}: its /gptq codes file {path} is missing (allocate writes it beside the plan)")
    if path.resolve().parent != path.parent.resolve():  # a symlink out of the plan's folder
        raise TqsError(f"{plan_path}: its /gptq codes file {path} resolves outside the plan's folder")
    if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
        raise TqsError(f"{path}: not the codes file this plan was written with (sha256 differs)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {(k[0], k[1]): data[f"c{i}"] for i, k in enumerate(keys)}
    except (OSError, KeyError, ValueError) as exc:
        raise TqsError(f"{path}: not a readable codes file ({exc})") from None


def check_codes(plan: dict[str, Any], tiers: dict[str, Tier], codes: dict[tuple[str, str], np.ndarray],
                where: str) -> None:
    """Every /gptq weight that has statistics must have its codes (else it would be written rounded to
    nearest under a /gptq name): a plan edited to another /gptq tier than its codes were made for."""
    with_stats = set((plan.get("rounding") or {}).get("weights_with_statistics") or [])
    missing = [n for n, t in tiers.items() if t.gptq and n in with_stats and (n, str(t.base)) not in codes]
    if missing:
        raise TqsError(f"{where}: no /gptq codes for {', '.join(missing[:3])} at its planned tier (was the plan "
                       f"edited?); allocate the plan again with --verify-model")
