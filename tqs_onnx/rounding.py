"""Trajectory-aware rounding for `/gptq` tiers: GPTQ's error-compensating rounding on the inputs the
model itself sees along its nominal rollouts.

A `/gptq` tier stores what its plain tier stores (same integer grid, same scales, computed from the
weight's absolute max as round-to-nearest does); only the integers differ. For a weight W read as the
B input of MatMul/Gemm nodes, H = sum over the sweep contexts' nominal rollouts of X^T X, X the rows
those nodes multiply it by. The integers are chosen input row after input row (largest diag(H) first),
each row rounded to nearest and its error spread over the rows not yet rounded through H's inverse
Cholesky factor (Frantar et al., "GPTQ", 2022), which lowers ||X (W - W_q)||^2 against plain rounding.
No gradients and no data beyond the sweep's own contexts: X comes from rolling out the FP32 model.

A weight with no such statistics (read by any other op, or never reached) rounds to nearest. The codes
are fixed once per sweep setup and travel with a plan in a sidecar file (`save_codes`), so the sweep's
measured damage, the joint check and the written model see the same values.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from tqs_onnx.errors import TqsError
from tqs_onnx.quant import broadcast_scales
from tqs_onnx.tiers import Tier
from tqs_onnx.util import umask

DAMP = 0.01  # H += DAMP * mean(diag H) * I: keeps the inverse stable where inputs are nearly collinear
CODES_SUFFIX = ".codes.npz"


@dataclass
class InputMoments:
    """H = X^T X (float64) of the rows one weight is multiplied by, and the weight's input axis."""

    h: np.ndarray
    input_axis: int
    rows: int = 0  # how many input rows were summed


def _readers(model: onnx.ModelProto, names: set[str]) -> dict[str, list[tuple[str, bool, int]]]:
    """weight -> [(activation name, transposed, input axis)] of the main-graph MatMul/Gemm nodes that
    read it as B; a weight read by anything else (or as A) gets no entry."""
    found: dict[str, list[tuple[str, bool, int]]] = {}
    other: set[str] = set()
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name not in names:
                continue
            if node.op_type not in ("MatMul", "Gemm") or i != 1:
                other.add(name)
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            trans_a = node.op_type == "Gemm" and bool(attrs.get("transA", 0))
            axis = 1 if node.op_type == "Gemm" and attrs.get("transB", 0) else 0
            found.setdefault(name, []).append((node.input[0], trans_a, axis))
    return {n: r for n, r in found.items() if n not in other and len({a for _, _, a in r}) == 1}


def input_moments(model: onnx.ModelProto, weights: dict[str, int], rollout_factory) -> dict[str, InputMoments]:
    """H per weight (name -> element type) from the FP32 model's nominal rollouts.

    `rollout_factory(model, extra_outputs)` opens a session on `model` and yields, per context and
    step, {activation name: host array}; the activations are streamed, never stacked."""
    readers = _readers(model, set(weights))
    if not readers:
        return {}
    acts = sorted({a for r in readers.values() for a, _, _ in r})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    elem = {a: weights[w] for w, r in readers.items() for a, _, _ in r}
    probe.graph.output.extend(helper.make_tensor_value_info(a, elem[a], None) for a in acts if a not in present)
    sums: dict[str, InputMoments] = {}
    for step in rollout_factory(probe, acts):
        for w, rs in readers.items():
            for act, trans_a, axis in rs:
                x = np.asarray(step[act], dtype=np.float64)
                x = x.T if trans_a else x.reshape(-1, x.shape[-1])
                m = sums.get(w)
                if m is None:
                    m = sums[w] = InputMoments(np.zeros((x.shape[1], x.shape[1])), axis)
                if x.shape[1] != m.h.shape[0]:
                    raise TqsError(f"weight '{w}': its MatMul inputs have {x.shape[1]} columns, expected "
                                   f"{m.h.shape[0]}")
                m.h += x.T @ x
                m.rows += x.shape[0]
    return sums


def gptq_codes(w: np.ndarray, moments: InputMoments, tier: Tier, channel_axis: int | None,
               block_axis: int | None) -> np.ndarray:
    """Integers (int8, w's layout) on `tier`'s grid with its round-to-nearest scales, rounded GPTQ's way."""
    if w.ndim != 2 or tier.is_sign or not tier.is_int:
        raise TqsError(f"/gptq rounds 2-D weights on int8/int6/int4/int2 grids only (got {tier}, shape {w.shape})")
    s = broadcast_scales(w, tier, channel_axis, block_axis).astype(np.float64)
    if moments.input_axis == 1:
        w, s = w.T, s.T
    work = w.astype(np.float64).copy()
    h = moments.h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0  # inputs that are always zero: their rows round to nearest
    work[dead] = w[dead]
    order = np.argsort(-np.diag(h), kind="stable")
    work, s, h = work[order], s[order], h[np.ix_(order, order)]
    h += DAMP * np.mean(np.diag(h)) * np.eye(len(h))
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    except np.linalg.LinAlgError:
        raise TqsError("/gptq: the input moments are not positive definite even after damping") from None
    q = np.zeros(work.shape, np.int8)
    for k in range(len(work)):
        row = np.clip(np.rint(work[k] / s[k]), -tier.qmax, tier.qmax)
        q[k] = row
        err = (work[k] - row * s[k]) / u[k, k]
        work[k + 1:] -= np.outer(u[k, k + 1:], err)
    out = np.empty_like(q)
    out[order] = q
    return out.T if moments.input_axis == 1 else out


@dataclass
class Rounding:
    """The `/gptq` codes of one prepared model, computed on demand and kept: (weight, tier) -> int8."""

    moments: dict[str, InputMoments]
    codes: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def codes_for(self, name: str, w: np.ndarray, tier: Tier, channel_axis: int | None,
                  block_axis: int | None) -> np.ndarray | None:
        """The weight's codes at a /gptq tier, or None where it rounds to nearest (no statistics)."""
        key = (name, str(tier.base))
        if key not in self.codes and name in self.moments:
            self.codes[key] = gptq_codes(w, self.moments[name], tier, channel_axis, block_axis)
        return self.codes.get(key)


def codes_path(plan_path: str | os.PathLike) -> Path:
    p = Path(plan_path)
    return p.with_name(p.name.removesuffix(".json") + CODES_SUFFIX)


def save_codes(codes: dict[tuple[str, str], np.ndarray], plan_path: str | os.PathLike) -> dict[str, Any]:
    """Write the plan's /gptq codes beside it (atomically); the plan's `rounding` entry names the file."""
    path = codes_path(plan_path)
    keys = sorted(codes)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **{f"c{i}": codes[k] for i, k in enumerate(keys)})
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "keys": [list(k) for k in keys]}


def load_codes(plan: dict[str, Any], plan_path: str | os.PathLike) -> dict[tuple[str, str], np.ndarray]:
    """The codes a plan's `rounding` entry names (read only for a plan with /gptq tiers)."""
    entry = plan.get("rounding")
    if not isinstance(entry, dict) or not {"file", "sha256", "keys"} <= set(entry):
        raise TqsError(f"{plan_path}: plan puts weights at /gptq tiers but names no codes file (allocate "
                       "writes one with --verify-model)")
    path = Path(plan_path).parent / Path(entry["file"]).name  # beside the plan, never elsewhere
    if not path.is_file():
        raise TqsError(f"{plan_path}: its /gptq codes file {path} is missing (allocate writes it beside the plan)")
    if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
        raise TqsError(f"{path}: not the codes file this plan was written with (sha256 differs)")
    with np.load(path, allow_pickle=False) as data:
        return {(k[0], k[1]): data[f"c{i}"] for i, k in enumerate(entry["keys"])}
