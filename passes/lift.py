"""Bring hidden weights into the main graph as initializers, using onnx-ir's own passes.

Vendor exports keep weights in Constant nodes and in If/Loop/Scan bodies. After this pass every such
tensor is a main-graph initializer (subgraphs read it from the outer scope), so discovery, probing
and rewriting need only one place to look.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, LiftSubgraphInitializersToMainGraphPass

from tqs_onnx.passes.base import PassResult, restore_value_info


def hidden_weight_origins(model: onnx.ModelProto, size_floor: int) -> dict[str, str]:
    """Names of float tensors held in Constant nodes or subgraph initializers, by origin."""
    from tqs_onnx.graph import FLOAT_TYPES, iter_graphs

    origins: dict[str, str] = {}
    for g in iter_graphs(model.graph):
        sub = g is not model.graph
        if sub:
            for init in g.initializer:
                if init.data_type in FLOAT_TYPES:
                    origins[init.name] = "subgraph"
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value" and a.t.data_type in FLOAT_TYPES:
                        n = 1
                        for d in a.t.dims:
                            n *= d
                        if n >= size_floor:
                            origins[node.output[0]] = "subgraph-constant" if sub else "constant"
    return origins


class LiftWeights:
    """Lift Constant-node tensors (>= size_floor elements) and subgraph initializers to the main graph.

    onnx-ir wraps the proto's tensors and renames them in place, so the input is copied first unless
    `inplace` (for a model the caller owns, such as a skeleton from passes/detach.py).
    """

    name = "lift-weights"

    def __init__(self, size_floor: int = 16, inplace: bool = False):
        self.size_floor = size_floor
        self.inplace = inplace

    def run(self, model: onnx.ModelProto) -> PassResult:
        origins = hidden_weight_origins(model, self.size_floor)
        if not origins:
            return PassResult(model, False, {"lifted": 0})
        source = model
        if not self.inplace:
            source = onnx.ModelProto()
            source.CopyFrom(model)
        irm = ir.serde.deserialize_model(source)
        LiftConstantsToInitializersPass(size_limit=self.size_floor)(irm)
        # Lift twice: a Constant inside a subgraph first becomes that subgraph's initializer.
        LiftSubgraphInitializersToMainGraphPass()(irm)
        out = ir.serde.serialize_model(irm)
        out.ir_version = model.ir_version
        restore_value_info(model, out)
        return PassResult(out, True, {"lifted": len(origins), "origins": origins})
