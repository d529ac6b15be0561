"""Bring hidden weights into the main graph as initializers, using onnx-ir's own passes.

Vendor exports keep weights in Constant nodes and in If/Loop/Scan bodies. After this pass every such
tensor is a main-graph initializer (subgraphs read it from the outer scope), so discovery, probing
and rewriting need only one place to look.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, LiftSubgraphInitializersToMainGraphPass

from tqs_onnx.graph import FLOAT_TYPES
from tqs_onnx.passes.base import PassResult, graph_bindings, restore_value_info

_IR_FLOATS = {ir.DataType(t) for t in FLOAT_TYPES}


def hidden_weight_origins(model: onnx.ModelProto, size_floor: int) -> dict[str, str]:
    """Names of float tensors held in Constant nodes or subgraph initializers, by origin (names as in
    `model`; `LiftWeights` reports them under the names they are lifted with)."""
    from tqs_onnx.graph import iter_graphs

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
                    if (a.name == "value" and a.t.data_type in FLOAT_TYPES and math.prod(a.t.dims) >= size_floor) \
                            or (a.name == "value_floats" and len(a.floats) >= size_floor):
                        origins[node.output[0]] = "subgraph-constant" if sub else "constant"
    return origins


def _ir_origins(irm: ir.Model, size_floor: int) -> dict[str, str]:
    """`hidden_weight_origins` on the onnx-ir model, after `_unique_subgraph_names` (the lifted names)."""
    origins: dict[str, str] = {}
    for g in irm.graphs():
        sub = g is not irm.graph
        if sub:
            for name, value in g.initializers.items():
                if value.const_value is not None and value.const_value.dtype in _IR_FLOATS:
                    origins[name] = "subgraph"
        for node in g:
            if _is_constant(node) and "value" in node.attributes:
                t = node.attributes["value"]
                if t.type == ir.AttributeType.TENSOR and t.as_tensor().dtype in _IR_FLOATS \
                        and t.as_tensor().size >= size_floor:
                    origins[str(node.outputs[0].name)] = "subgraph-constant" if sub else "constant"
    return origins


def _is_constant(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def _floats_as_tensors(irm: ir.Model, size_floor: int) -> None:
    """Constant(value_floats=[...]) of >= size_floor values becomes Constant(value=<float tensor>), the same
    values, so the lifting below sees it (onnx-ir lifts only `value`)."""
    for g in irm.graphs():
        for node in g:
            if _is_constant(node) and set(node.attributes) == {"value_floats"}:
                floats = node.attributes["value_floats"].as_floats()
                if len(floats) >= size_floor:
                    node.attributes.pop("value_floats")
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.asarray(floats, np.float32)))


def _unique_subgraph_names(irm: ir.Model) -> int:
    """Rename every subgraph initializer and subgraph Constant output whose name is bound anywhere else in
    the model (any graph's input, initializer or node output) to a name bound nowhere. Lifting moves it
    to the main graph; onnx-ir's pass avoids only main-graph names, so a name also bound in another
    subgraph could be captured there (a Loop body input of the new name) or clash (a sibling's value).
    Renaming a value renames its every use (onnx-ir values are objects). Returns how many were renamed."""
    graphs = list(irm.graphs())
    bound = graph_bindings(irm)
    taken = set(bound)
    renamed = 0
    for g in graphs:
        if g is irm.graph:
            continue
        values = [v for v in g.initializers.values() if not v.is_graph_input() and not v.is_graph_output()]
        values += [n.outputs[0] for n in g if _is_constant(n) and not n.outputs[0].is_graph_output()]
        for value in values:
            name = str(value.name)
            if bound[name] <= 1:
                continue
            k = 1
            while f"{name}__{k}" in taken:
                k += 1
            new = f"{name}__{k}"
            taken.add(new)
            bound[name] -= 1
            if value.is_initializer():
                g.initializers.pop(name)
                value.name = new
                g.register_initializer(value)
            else:
                value.name = new
            renamed += 1
    return renamed


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
        if not hidden_weight_origins(model, self.size_floor):
            return PassResult(model, False, {"lifted": 0})
        source = model
        if not self.inplace:
            source = onnx.ModelProto()
            source.CopyFrom(model)
        irm = ir.serde.deserialize_model(source)
        _floats_as_tensors(irm, self.size_floor)
        renamed = _unique_subgraph_names(irm)
        origins = _ir_origins(irm, self.size_floor)
        LiftConstantsToInitializersPass(size_limit=self.size_floor)(irm)
        # Lift twice: a Constant inside a subgraph first becomes that subgraph's initializer.
        LiftSubgraphInitializersToMainGraphPass()(irm)
        out = ir.serde.serialize_model(irm)
        out.ir_version = model.ir_version
        restore_value_info(model, out)
        return PassResult(out, True, {"lifted": len(origins), "origins": origins, "renamed": renamed})
