"""Keep sparse tensors out of passes that do not know them, and hand them back unchanged.

onnx-ir drops `sparse_initializer` (its consumers are left reading an undefined value) and fails on
Constant nodes holding a `sparse_value`; onnx's version converter refuses both. ONNX Runtime densifies
them at load; we keep them as stored (already compact, and not quantized): while such passes run, each
one is a graph input of the same name, type and shape, which every pass leaves alone. A main-graph
Constant(sparse_value) comes back as a sparse initializer of the same name (the same value).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from tqs_onnx.errors import TqsError
from tqs_onnx.graph import iter_graphs


@dataclass
class HiddenSparse:
    tensors: list[onnx.SparseTensorProto]
    stand_ins: set[str] = field(default_factory=set)  # graph inputs added for them (not the model's own)

    def restore(self, model: onnx.ModelProto) -> None:
        """Turn the stand-in graph inputs of `model` back into its sparse initializers."""
        if not self.tensors:
            return
        inputs = [v for v in model.graph.input if v.name not in self.stand_ins]
        model.graph.ClearField("input")
        model.graph.input.extend(inputs)
        model.graph.sparse_initializer.extend(self.tensors)


def hide_sparse_initializers(model: onnx.ModelProto) -> HiddenSparse:
    """Replace `model`'s main-graph sparse tensors (in place) by graph inputs; see `restore`."""
    for g in iter_graphs(model.graph):
        if g is not model.graph and (len(g.sparse_initializer) or any(_sparse_constant(n) for n in g.node)):
            raise TqsError(f"graph '{g.name}' holds sparse tensors inside a subgraph, which tqs-onnx does not "
                           "support (densify them, or move them to the main graph)")
    tensors = list(model.graph.sparse_initializer)
    model.graph.ClearField("sparse_initializer")
    nodes = list(model.graph.node)
    constants = [n for n in nodes if _sparse_constant(n)]
    if constants:
        model.graph.ClearField("node")
        model.graph.node.extend(n for n in nodes if not _sparse_constant(n))
    for node in constants:
        sp = onnx.SparseTensorProto()
        sp.CopyFrom(node.attribute[0].sparse_tensor)
        sp.values.name = node.output[0]
        tensors.append(sp)
    inputs = {v.name for v in model.graph.input}
    hidden = HiddenSparse(tensors)
    for sp in tensors:
        if sp.values.name not in inputs:
            model.graph.input.append(onnx.helper.make_tensor_value_info(sp.values.name, sp.values.data_type,
                                                                        list(sp.dims)))
            hidden.stand_ins.add(sp.values.name)
    return hidden


def _sparse_constant(node: onnx.NodeProto) -> bool:
    return (node.op_type == "Constant" and node.domain in ("", "ai.onnx")
            and any(a.name == "sparse_value" for a in node.attribute))
