"""Let the model's own run measure a step's trajectory divergence: ||y - y_ref||^2 per output.

For each named output y the pass adds an input `y::tqs_ref` (zeros as its default, so runs that do not
feed it still work) and an output `y::tqs_sqdiff` = sum((y - y_ref)^2), float32 (double outputs are
subtracted in double). A sweep feeds the nominal trajectory's step as the reference and reads one
scalar per output: one ORT run per step instead of the model's and a divergence graph's (2-11% faster
on a 2-core CPU, equal within noise on an H100: `tools/bench_sweep.py --compare-divergence`).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from tqs_onnx.errors import TqsError
from tqs_onnx.passes.base import PassResult

REF_SUFFIX = "::tqs_ref"
SQDIFF_SUFFIX = "::tqs_sqdiff"


class AddDivergenceOutputs:
    """Outputs `y::tqs_sqdiff` = sum((y - `y::tqs_ref`)^2) for each named output `y`.

    `report['pairs']` maps each output to (its reference input, its divergence output)."""

    name = "add-divergence-outputs"

    def __init__(self, outputs: list[str]):
        self.outputs = list(dict.fromkeys(outputs))

    def run(self, model: onnx.ModelProto) -> PassResult:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        declared = {o.name: o for o in g.output}
        taken = {v for n in g.node for v in (*n.input, *n.output)} | {i.name for i in g.input} \
            | {i.name for i in g.initializer}
        pairs = {}
        for y in self.outputs:
            if y not in declared:
                raise TqsError(f"model has no output '{y}' to measure a divergence on")
            t = declared[y].type.tensor_type
            elem = t.elem_type
            ref, sq = y + REF_SUFFIX, y + SQDIFF_SUFFIX
            if ref in taken or sq in taken:
                raise TqsError(f"model already has a value named '{ref}' or '{sq}'")
            # Any shape of the output's rank; the default is zeros of shape (1, ..., 1), which broadcasts.
            rank = len(t.shape.dim) if t.HasField("shape") else None
            g.input.append(helper.make_tensor_value_info(
                ref, elem, None if rank is None else [f"{ref}_{i}" for i in range(rank)]))
            g.initializer.append(helper.make_tensor(ref, elem, [1] * (rank or 0), [0]))
            g.node.extend(self._nodes(y, ref, sq, elem))
            g.output.append(helper.make_tensor_value_info(sq, TensorProto.FLOAT, []))
            pairs[y] = (ref, sq)
        return PassResult(out, bool(pairs), {"pairs": pairs})

    @staticmethod
    def _nodes(y: str, ref: str, sq: str, elem: int) -> list[onnx.NodeProto]:
        return sqdiff_nodes(y, ref, sq, elem, sq + "/")


# Types whose difference float32 cannot hold to their own precision: compared in double, the sum cast
# to float32 (a float64 state near 1e4 lost its divergences below 1e-3 in float32: blocks scored dead).
WIDE_TYPES = (TensorProto.DOUBLE, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT32, TensorProto.UINT64)


def sqdiff_nodes(a: str, b: str, out: str, elem: int, prefix: str, keepdims: int = 0) -> list[onnx.NodeProto]:
    """Nodes computing `out` = float32 sum((a - b)^2) of two tensors of ONNX type `elem`: float16,
    bfloat16 and small integers subtracted in float32 (exact), double and wide integers in double."""
    h = helper.make_node
    work = TensorProto.DOUBLE if elem in WIDE_TYPES else TensorProto.FLOAT
    nodes = []
    if elem != work:
        nodes += [h("Cast", [a], [prefix + "a"], to=work), h("Cast", [b], [prefix + "b"], to=work)]
        a, b = prefix + "a", prefix + "b"
    total = out if work == TensorProto.FLOAT else prefix + "s"
    nodes += [h("Sub", [a, b], [prefix + "d"]), h("ReduceSumSquare", [prefix + "d"], [total], keepdims=keepdims)]
    if total != out:
        nodes.append(h("Cast", [total], [out], to=TensorProto.FLOAT))
    return nodes
