"""Compare the weight table's `fused_dq` with what ONNX Runtime's optimizer does, on tiny models.

For each case (A 2-D or 3-D, fixed or symbolic; a MatMul followed by an Add, or a Gemm, with alpha,
beta or transA set or not; the Add operand / C absent, a vector, a row, a column, a matrix, a
constant or an input; an activation after it or not) the script writes
the weight behind a per-channel INT8 DequantizeLinear, lets ORT (CPU) optimize the session, and
counts it fused when no DequantizeLinear is left. It prints every case and the number of wrong
predictions. A case whose C does not broadcast against the output is refused by ORT itself
("Incompatible dimensions") and skipped; a case ORT refuses for any other reason is counted and
named. Exit status 1 if a prediction is wrong or a case failed.

    python tools/check_fusion_prediction.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tqs_onnx.graph import weight_table

K, N = 64, 32


def build(a_shape: list, c: tuple[str, list] | None, gemm: bool, attrs: dict | None = None) -> onnx.ModelProto:
    """The case's model; `attrs` are the Gemm's, but for "then": an activation applied to the product
    (and read by one Neg, as a layer's next op reads it)."""
    attrs = dict(attrs or {})
    then = attrs.pop("then", None)
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, a_shape)]
    if c is None:
        nodes = [helper.make_node("Gemm" if gemm else "MatMul", ["x", "W"], ["z"], **(attrs or {}))]
    else:
        kind, shape = c
        if kind == "constant":
            inits.append(numpy_helper.from_array(np.ones(shape, np.float32), "c"))
        else:
            inputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, shape))
        nodes = ([helper.make_node("Gemm", ["x", "W", "c"], ["z"], **(attrs or {}))] if gemm else
                 [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Add", ["c", "y"], ["z"])])
    out = "z"
    if then:
        nodes += [helper.make_node(then, ["z"], ["act"]), helper.make_node("Neg", ["act"], ["out"])]
        out = "out"
    graph = helper.make_graph(nodes, "case", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def ort_fuses(m: onnx.ModelProto, folder: Path) -> bool:
    q = onnx.ModelProto()
    q.CopyFrom(m)
    w = numpy_helper.to_array(q.graph.initializer[0])
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    q.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.round(w / scale).astype(np.int8), "Wq"))
    q.graph.initializer.append(numpy_helper.from_array(scale, "Ws"))
    q.graph.node.insert(0, helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], axis=1))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(folder / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return "DequantizeLinear" not in [n.op_type for n in onnx.load(folder / "opt.onnx").graph.node]


def cases():
    for a_shape in (["M", K], [4, K], [1, K], ["B", "S", K], [2, 3, K]):
        m0 = a_shape[0]
        shapes = [[N], [1, N], [m0, N], [m0, 1], [1], [1, 1], [5, N]] + ([a_shape[:-1] + [N]] if len(a_shape) == 3 else [])
        for gemm in (False, True) if len(a_shape) == 2 else (False,):
            for c in [None] + [(kind, s) for kind in ("constant", "input") for s in shapes]:
                if c and c[0] == "constant" and any(isinstance(d, str) for d in c[1]):
                    continue
                yield a_shape, c, gemm, {}
    for attrs in ({"alpha": 0.5}, {"transA": 1}, {"beta": 0.5}, {"alpha": 1.0, "beta": 1.0}):
        for c in (None, ("constant", [N])):
            yield ([K, 4] if attrs.get("transA") else [4, K]), c, True, attrs
    # An activation after the product: ORT fuses a Gemm with a Relu into FusedGemm, and keeps a Clip
    # apart, before its DequantizeLinear fusion, which then never happens (nineteenth session).
    for then in ("Relu", "Clip", "Tanh", "LeakyRelu", "Sigmoid"):
        for a_shape in ([1, K], [4, K], ["M", K], [1, 1, K]):
            for gemm in (False, True) if len(a_shape) == 2 else (False,):
                for c in (None, ("constant", [N]), ("constant", [1, N])):
                    yield a_shape, c, gemm, {"then": then}


def broadcasts(a_shape: list, c: tuple[str, list] | None, gemm: bool, attrs: dict) -> bool:
    """Whether C broadcasts against the op's output, (M, N) for a Gemm, A's batch dims x N for MatMul+Add
    (a named dimension may take any size)."""
    if c is None:
        return True
    out = ([a_shape[1] if attrs.get("transA") else a_shape[0], N] if gemm else [*a_shape[:-1], N])
    for x, y in zip(reversed(c[1]), reversed(out)):
        if isinstance(x, int) and isinstance(y, int) and x != y and 1 not in (x, y):
            return False
    return True


def refused_for_broadcast(case: tuple, exc: Exception) -> bool:
    """The one expected ORT failure: a C that does not broadcast, refused by shape inference."""
    return not broadcasts(*case) and "Incompatible dimensions" in str(exc)


def check(cases, fuses=ort_fuses) -> tuple[int, int, int, list[str]]:
    """Run every case: (cases compared, wrong predictions, skipped for broadcast, other failures)."""
    wrong = total = skipped = 0
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            a_shape, c, gemm, attrs = case
            op = ("Gemm" if gemm else "MatMul+Add") + (str(attrs) if attrs else "")
            m = build(a_shape, c, gemm, attrs)
            try:
                fused = fuses(m, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - ORT refuses the model: expected only for a C that does not broadcast
                if refused_for_broadcast(case, exc):
                    skipped += 1
                else:
                    reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                    failed.append(f"A {a_shape} {op} C {c}: {reason}")
                    print(f"A {a_shape!s:15} {op:30} C {c!s:28} ORT failed: {reason}")
                continue
            predicted = next(w for w in weight_table(m, 16) if w.name == "W").fused_dq
            total += 1
            wrong += predicted != fused
            print(f"A {a_shape!s:15} {op:30} C {c!s:28} predicted "
                  f"{'fused' if predicted else 'unfused':7} ORT {'fused' if fused else 'unfused':7}"
                  f"{'  <-- wrong' if predicted != fused else ''}")
    return total, wrong, skipped, failed


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    total, wrong, skipped, failed = check(cases(), ort_fuses)
    print(f"onnxruntime {ort.__version__}: {total} cases, {wrong} wrong predictions; {skipped} skipped "
          f"(C does not broadcast: ORT refuses the model); {len(failed)} failed in ORT for another reason")
    return 1 if wrong or failed else 0


if __name__ == "__main__":
    sys.exit(main())
