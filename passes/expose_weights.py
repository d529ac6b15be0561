"""Turn chosen initializers into graph inputs so one session can run any perturbation of them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tqs_onnx.graph import iter_graphs, node_subgraphs, value_names
from tqs_onnx.passes.base import PassResult
from tqs_onnx.util import fresh_name


class ExposeWeights:
    """Move the named initializers to graph inputs; their values go to `report['values']`.

    Every exposed input is float32, the type the probe graphs make: a float16 weight becomes a float32
    input (its values upcast, exactly) read through a Cast back to float16, so the graph computes with
    what it stored, and a perturbed value is rounded to float16 as the written model's decode is."""

    name = "expose-weights"

    def __init__(self, names: list[str]):
        self.names = list(names)

    def run(self, model: onnx.ModelProto) -> PassResult:
        wanted = set(self.names)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        keep, values = [], {}
        for init in out.graph.initializer:
            if init.name in wanted:
                values[init.name] = numpy_helper.to_array(init)
            else:
                keep.append(init)
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep)
        existing = {i.name for i in out.graph.input}
        taken = value_names(out.graph) | {n.name for g in iter_graphs(out.graph) for n in g.node}
        casts = []
        for name in self.names:
            if name not in values or name in existing:
                continue
            v: np.ndarray = values[name]
            if v.dtype == np.float16:
                half = fresh_name(f"{name}__float16", taken)
                _rename_reads(out.graph, name, half)
                casts.append(onnx.helper.make_node("Cast", [name], [half], name=half, to=onnx.TensorProto.FLOAT16))
                values[name] = v = v.astype(np.float32)
            out.graph.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
        if casts:
            nodes = casts + list(out.graph.node)
            del out.graph.node[:]
            out.graph.node.extend(nodes)
        return PassResult(out, bool(values), {"values": values})


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of `old` in `graph` becomes a read of `new`, in bodies too unless one binds `old` itself."""
    for vi in graph.value_info:
        if vi.name == old:
            vi.name = new
    for node in graph.node:
        for i, v in enumerate(node.input):
            if v == old:
                node.input[i] = new
        for _, sub in node_subgraphs(node):
            own = {v.name for v in (*sub.input, *sub.initializer)} | {o for n in sub.node for o in n.output}
            if old not in own:
                _rename_reads(sub, old, new)
