"""Turn chosen initializers into graph inputs so one session can run any perturbation of them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tqs_onnx.passes.base import PassResult


class ExposeWeights:
    """Move the named initializers to graph inputs; their values go to `report['values']`."""

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
        for name in self.names:
            if name in values and name not in existing:
                v: np.ndarray = values[name]
                out.graph.input.append(onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
        return PassResult(out, bool(values), {"values": values})
