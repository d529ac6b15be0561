"""Write weights at their tiers: integers + scales behind DequantizeLinear, or fp16/bf16 behind Cast.

The rewritten tensor keeps its name as the output of the new DequantizeLinear/Cast node, so every
consumer (including subgraphs reading it from the outer scope) is unchanged.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from tqs_onnx.passes.base import PassResult
from tqs_onnx.quant import quantize, stored_parts, to_storage
from tqs_onnx.tiers import Tier, rewrite_nodes, stored_names


class WriteTiers:
    """Rewrite each named initializer at its tier (fp32 entries are left as they are).

    `read` gives an initializer's values (stubs of a skeleton are read from their originals).
    """

    name = "write-tiers"

    def __init__(self, tiers: dict[str, Tier], axes: dict[str, tuple[int | None, int | None]],
                 read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array):
        self.tiers = {n: t for n, t in tiers.items() if not t.is_identity}
        self.axes = axes
        self.read = read

    def run(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        new_nodes, new_inits, keep = [], [], []
        done: dict[str, str] = {}
        for init in graph.initializer:
            tier = self.tiers.get(init.name)
            if tier is None:
                keep.append(init)
                continue
            if tier.is_zero:  # nothing stored, nothing read: the nodes make zeros of its shape
                new_nodes += rewrite_nodes(init.name, tier, 0, self.axes[init.name], init.data_type,
                                           tuple(init.dims))
            elif tier.is_int:
                q, scale = quantize(self.read(init), tier, *self.axes[init.name])
                sn = stored_names(init.name)[1]
                new_inits += [numpy_helper.from_array(a, n) for n, a in stored_parts(init.name, q, tier)]
                new_inits.append(numpy_helper.from_array(scale, sn))
                new_nodes += rewrite_nodes(init.name, tier, scale.ndim, self.axes[init.name], init.data_type,
                                           tuple(init.dims))
            else:
                low = f"{init.name}__{tier.fmt}"
                new_inits.append(numpy_helper.from_array(to_storage(self.read(init), tier), low))
                new_nodes += rewrite_nodes(init.name, tier, 0, self.axes[init.name], init.data_type)
            done[init.name] = str(tier)
        missing = set(self.tiers) - set(done)
        if missing:
            raise KeyError(f"weights not found as initializers: {sorted(missing)[:5]}")
        del graph.initializer[:]
        graph.initializer.extend(keep)
        new_inits.reverse()
        while new_inits:  # each standalone tensor is freed once copied: the new data is never held twice
            graph.initializer.add().CopyFrom(new_inits.pop())
        # Old IRs list initializers as inputs too; a rewritten weight is no longer an input.
        kept_inputs = [i for i in graph.input if i.name not in done]
        del graph.input[:]
        graph.input.extend(kept_inputs)
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(new_nodes + nodes)
        return PassResult(model, bool(done), {"rewritten": done})
