"""A bidirectional recurrent op's weights stored one tensor per direction, concatenated back in the graph.

An LSTM, GRU or RNN with direction="bidirectional" reads W (2, gates*H, in) and R (2, gates*H, H):
both directions in one tensor. Per-channel scales run along gates*H, so the two directions shared
them, though their weights can differ in scale (a new user's trial, forward weights 10x the reverse
ones: 84-90% of the reverse direction's int4 integers were zero). This pass stores each direction as
its own initializer (`NAME__forward`, `NAME__reverse`, each (1, ...)) and adds a Concat along axis 0
that outputs NAME, so every reader sees the same tensor: exact by construction, and ONNX Runtime
folds the Concat at load. Each direction is then a weight of its own, with its own scales, in the
block of the op that reads it (graph analysis follows a Concat's axes).

Left alone: graph inputs and outputs, tensors whose directions hold fewer than `size_floor` elements
each (the sweep's default size floor: smaller weights are not quantized, and the split would only add
a node and a tensor's header, 160 bytes a tensor on a vendor speech enhancer's small GRUs), and
weights inside subgraphs (If/Loop/Scan bodies).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tqs_onnx.graph import value_names
from tqs_onnx.passes.base import PassResult, prepend_nodes
from tqs_onnx.util import fresh_name

__all__ = ["SplitDirections"]

RECURRENT = ("LSTM", "GRU", "RNN")
SLOTS = (1, 2)  # W and R


class SplitDirections:
    """Store each bidirectional W and R as two per-direction initializers joined by a Concat."""

    name = "split-directions"

    def __init__(self, size_floor: int = 256,
                 read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array) -> None:
        self.size_floor = size_floor
        self.read = read  # values of a tensor, also of a detached stub (passes/detach.py)

    def run(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        inits = {i.name: i for i in graph.initializer}
        keep = {i.name for i in graph.input} | {o.name for o in graph.output}
        wanted = []
        for node in graph.node:
            direction = next((a.s for a in node.attribute if a.name == "direction"), b"forward")
            if node.op_type not in RECURRENT or direction != b"bidirectional":
                continue
            for slot in SLOTS:
                name = node.input[slot] if len(node.input) > slot else ""
                init = inits.get(name)
                if init is None or name in keep or name in wanted or len(init.dims) != 3 or init.dims[0] != 2 \
                        or math.prod(init.dims[1:]) < self.size_floor:
                    continue
                wanted.append(name)
        if not wanted:
            return PassResult(model, False, {"split": 0})
        taken = value_names(graph)
        node_names = {n.name for n in graph.node if n.name}  # ORT refuses two nodes of one name
        concats, added = [], []
        for name in wanted:
            init = inits[name]
            values = self.read(init)
            parts = [fresh_name(f"{name}__{d}", taken) for d in ("forward", "reverse")]
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values[:1]), parts[0]))
            added.append(numpy_helper.from_array(np.ascontiguousarray(values[1:]), parts[1]))
            concats.append(helper.make_node("Concat", parts, [name], axis=0,
                                            name=fresh_name(f"{name}/Concat", node_names)))
        graph.initializer.extend(added)
        prepend_nodes(graph, concats)
        return PassResult(model, True, {"split": len(wanted), "tensors": wanted})
