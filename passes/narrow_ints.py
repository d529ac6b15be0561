"""Integer constants stored in the narrowest type that holds their values, cast back in the graph.

Exporters keep indices as int64: a streaming model's cache update written with tensor slicing
becomes a ScatterND whose index tensor takes 8 bytes per entry for values below 64 (in GTCRN, a
vendor speech enhancer, such indices are half the file). This pass stores each main-graph integer
initializer of at least `size_floor` elements as uint8/int8/uint16/int16/int32, whichever holds all
its values, under a new name, and adds a `Cast` back to its type that outputs the original name, so
every reader sees the same tensor. Exact by construction; ONNX Runtime folds the Cast at load.

Left alone: graph inputs (a caller may feed them) and outputs, indices read by Gather ops (the
weight table and the runtime report read those as initializers: factored lookup tables), and
tensors whose narrowing would save fewer bytes than the Cast node costs.
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

__all__ = ["NarrowIntegerConstants"]

WIDE = {onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4}
NARROW = [(np.uint8, onnx.TensorProto.UINT8), (np.int8, onnx.TensorProto.INT8),
          (np.uint16, onnx.TensorProto.UINT16), (np.int16, onnx.TensorProto.INT16),
          (np.int32, onnx.TensorProto.INT32)]
MIN_SAVING = 64  # bytes: a Cast node and the new name cost a few dozen
GATHERS = ("Gather", "GatherElements", "GatherND")


def narrowest(values: np.ndarray) -> tuple[type, int] | None:
    """The smallest (numpy type, ONNX type) holding every value, or None for an empty tensor."""
    if values.size == 0:
        return None
    lo, hi = int(values.min()), int(values.max())
    for np_type, onnx_type in NARROW:
        info = np.iinfo(np_type)
        if info.min <= lo and hi <= info.max:
            return np_type, onnx_type
    return None


class NarrowIntegerConstants:
    """Store wide integer initializers narrow, with a Cast back to their type under their name."""

    name = "narrow-integer-constants"

    def __init__(self, size_floor: int = 16,
                 read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array) -> None:
        self.size_floor = size_floor
        self.read = read  # values of a tensor, also of a detached stub (passes/detach.py)

    def run(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        keep = ({i.name for i in graph.input} | {o.name for o in graph.output}
                | {n.input[1] for n in graph.node if n.op_type in GATHERS and len(n.input) > 1})
        taken = value_names(graph)
        node_names = {n.name for n in graph.node if n.name}  # ORT refuses two nodes of one name
        casts, narrowed, saved = [], [], 0
        for init in graph.initializer:
            width = WIDE.get(init.data_type)
            count = math.prod(init.dims)
            if width is None or count < self.size_floor or init.name in keep:
                continue
            values = self.read(init)
            found = narrowest(values)
            if found is None or count * (width - np.dtype(found[0]).itemsize) < MIN_SAVING:
                continue
            np_type, onnx_type = found
            stored = fresh_name(f"{init.name}__{np.dtype(np_type).name}", taken)
            original_type, name = init.data_type, init.name
            init.CopyFrom(numpy_helper.from_array(values.astype(np_type), stored))
            node_name = fresh_name(f"{stored}/Cast", node_names)
            casts.append(helper.make_node("Cast", [stored], [name], to=original_type, name=node_name))
            narrowed.append({"tensor": name, "from": onnx.TensorProto.DataType.Name(original_type),
                             "to": onnx.TensorProto.DataType.Name(onnx_type), "elements": count})
            saved += count * (width - np.dtype(np_type).itemsize)
        if not casts:
            return PassResult(model, False, {"narrowed": 0, "bytes_saved": 0})
        prepend_nodes(graph, casts)
        return PassResult(model, True, {"narrowed": len(casts), "bytes_saved": saved, "tensors": narrowed})
