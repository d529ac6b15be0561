#!/usr/bin/env python3
"""The arithmetic floor of a sweep: a model's multiply-adds per forward pass (MatMul, Gemm, Conv, from
onnx's shape inference without loading the weights' data), and the least time a sweep of a given
number of forward passes can take at a device's peak rate.

    python tools/flop_floor.py MODEL.onnx [--passes N] [--peak-tflops 67] [--pass-seconds S]

--peak-tflops: the device's dense float32 rate (H100 SXM 67, H100 PCIe 51, without tensor cores:
the sweep runs in full float32, see the README). --pass-seconds: a measured forward pass, to print how
far it is from the floor. Calls of model-local functions are inlined first, as ONNX Runtime does at
load (passes/inline.py), so the ops inside them are counted. Nodes left out are counted and named on a
"not counted" line: shapes inference cannot give, ops this tool does not count (recurrent ops, ops of
other domains than ONNX's, a function ORT runs as its own kernel) and nodes with subgraphs (If, Loop,
Scan).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import onnx
from onnx import helper

from tqs_onnx.errors import TqsError
from tqs_onnx.graph import infer_value_shapes
from tqs_onnx.passes.inline import InlineLocalFunctions
from one_line_errors import run  # tools/: a user's error is one line, exit 2


# ops that multiply-add too but are not counted (a recurrent op, a transposed Conv, an einsum, ORT's own)
UNCOUNTED = ("LSTM", "GRU", "RNN", "ConvTranspose", "Einsum", "MatMulInteger", "ConvInteger", "QLinearMatMul",
             "QLinearConv", "MatMulNBits", "Attention", "FusedMatMul")
ONNX_DOMAINS = ("", "ai.onnx")  # ops of any other domain may compute anything: listed, not counted


def inline_functions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The model with its local functions inlined (as ORT does at load), and how many calls were."""
    result = InlineLocalFunctions().run(model)
    return result.model, result.report.get("call_sites", 0) if result.modified else 0


def _uncounted(node: onnx.NodeProto, functions: set[tuple[str, str]]) -> str | None:
    """Why a node that may compute is left out, or None for an op of ONNX's domain without subgraphs."""
    if node.op_type in UNCOUNTED:
        return "not counted"
    if any(a.g.node or a.graphs for a in node.attribute):
        return "has subgraphs"
    if (node.domain, node.op_type) in functions:
        return "function call"
    if node.domain not in ONNX_DOMAINS:
        return f"domain {node.domain}"
    return None


def macs(model: onnx.ModelProto) -> tuple[int, dict[str, int], list[str]]:
    """Multiply-adds of the main graph's MatMul/Gemm/Conv nodes, per op type, and nodes left uncounted
    (inline the model's local functions first: a call left in the graph is listed, not counted)."""
    shapes = infer_value_shapes(model)
    known = lambda n: n in shapes and all(isinstance(d, int) and d > 0 for d in shapes[n])  # noqa: E731
    functions = {(f.domain, f.name) for f in model.functions}
    per_op: dict[str, int] = {}
    missing = []
    for node in model.graph.node:
        why = _uncounted(node, functions)
        if why is not None:
            missing.append(f"{node.name or node.output[0]} ({node.op_type}, {why})")
            continue
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        a, b, y = node.input[0], node.input[1], node.output[0]
        if not (known(a) and known(b) and known(y)):
            missing.append(node.name or y)
            continue
        out = math.prod(shapes[y])
        if node.op_type == "Conv":  # every output element: in-channels per group x kernel
            k = math.prod(shapes[b][1:])
        elif node.op_type == "Gemm":
            trans_a = any(at.name == "transA" and helper.get_attribute_value(at) for at in node.attribute)
            k = shapes[a][0] if trans_a else shapes[a][-1]
        else:
            k = shapes[a][-1]
        per_op[node.op_type] = per_op.get(node.op_type, 0) + out * k
    return sum(per_op.values()), per_op, missing


def _flop(n: float) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n:.0f} FLOP"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.2f} us"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--passes", type=int, help="forward passes of the sweep")
    ap.add_argument("--peak-tflops", type=float, default=67.0, help="dense float32 rate of the device")
    ap.add_argument("--pass-seconds", type=float, help="a measured forward pass, seconds")
    a = ap.parse_args()
    if not a.peak_tflops > 0 or (a.pass_seconds is not None and not a.pass_seconds > 0):
        raise TqsError("--peak-tflops and --pass-seconds must be positive")
    model, inlined = inline_functions(onnx.load(str(a.model), load_external_data=False))
    total, per_op, missing = macs(model)
    if not total:
        raise TqsError(f"{a.model.name}: no MatMul, Gemm or Conv with known shapes to count"
                       + (f" ({len(missing)} left out, e.g. {missing[0]}; symbolic input dims are not resolved)"
                          if missing else ""))
    flop = 2 * total
    floor = flop / (a.peak_tflops * 1e12)
    print(f"{a.model.name}: {_flop(flop)} per forward pass ("
          + ", ".join(f"{op} {_flop(2 * n)}" for op, n in sorted(per_op.items())) + ")")
    if missing:
        print(f"  not counted (shapes unknown, or an op this tool does not count): {len(missing)} nodes, "
              f"e.g. {', '.join(missing[:3])}")
    if inlined:
        print(f"  {inlined} calls of model-local functions inlined first and counted (as ONNX Runtime inlines them)")
    print(f"  floor at {a.peak_tflops:g} TFLOPS: {_ms(floor)} per forward pass")
    if a.pass_seconds:
        print(f"  measured {_ms(a.pass_seconds)} per pass: {a.pass_seconds / floor:.2f}x the floor, "
              f"{flop / a.pass_seconds / 1e12:.1f} TFLOPS achieved")
    if a.passes:
        print(f"  {a.passes:,} forward passes: at least {a.passes * floor / 60:.1f} min at the peak rate"
              + (f"; {a.passes * a.pass_seconds / 60:.1f} min at the measured pass" if a.pass_seconds else ""))


if __name__ == "__main__":
    sys.exit(run(main))
