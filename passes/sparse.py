"""Keep sparse initializers out of passes that do not know them, and hand them back unchanged.

onnx-ir drops `sparse_initializer` (its consumers are left reading an undefined value) and onnx's
version converter refuses it ("Input ... is undefined"). ONNX Runtime densifies them at load; we keep
them as stored (already compact, and not quantized): while such passes run, each one is a graph input
of the same name, type and shape, which every pass leaves alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from tqs_onnx.errors import TqsError
from tqs_onnx.graph import _iter_graphs


@dataclass
class HiddenSparse:
    tensors: list[onnx.SparseTensorProto]

    def restore(self, model: onnx.ModelProto) -> None:
        """Turn the stand-in graph inputs of `model` back into its sparse initializers."""
        if not self.tensors:
            return
        names = {sp.values.name for sp in self.tensors}
        inputs = [v for v in model.graph.input if v.name not in names]
        model.graph.ClearField("input")
        model.graph.input.extend(inputs)
        model.graph.sparse_initializer.extend(self.tensors)


def hide_sparse_initializers(model: onnx.ModelProto) -> HiddenSparse:
    """Replace `model`'s main-graph sparse initializers (in place) by graph inputs; see `restore`."""
    for g in _iter_graphs(model.graph):
        if g is not model.graph and len(g.sparse_initializer):
            raise TqsError(f"graph '{g.name}' holds sparse initializers inside a subgraph, which tqs-onnx "
                           "does not support (densify them, or move them to the main graph)")
    tensors = list(model.graph.sparse_initializer)
    model.graph.ClearField("sparse_initializer")
    for sp in tensors:
        model.graph.input.append(onnx.helper.make_tensor_value_info(sp.values.name, sp.values.data_type, list(sp.dims)))
    return HiddenSparse(tensors)
