"""Write weights at their tiers: integers + scales behind DequantizeLinear, or fp16/bf16 behind Cast.

The rewritten tensor keeps its name as the output of the new DequantizeLinear/Cast node, so every
consumer (including subgraphs reading it from the outer scope) is unchanged, with one exception: an
integer weight read only as B by Gemm nodes with transB=1 is stored transposed and those Gemms get
transB=0. The values are the same, and ONNX Runtime fuses DequantizeLinear -> Gemm(transB=0) into
MatMulNBits, which it does not do with transB=1 (it would dequantize the weight on every call).
The file keeps its size to the byte: same tensors transposed, same nodes, transB still written.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from tqs_onnx.graph import subgraph_refs
from tqs_onnx.passes.base import PassResult
from tqs_onnx.quant import quantize, stored_parts, to_storage
from tqs_onnx.tiers import Tier, for_weight, load_scale_dims, rewrite_nodes, stored_names


class WriteTiers:
    """Rewrite each named initializer at its tier (fp32 entries are left as they are).

    `read` gives an initializer's values (stubs of a skeleton are read from their originals).
    `codes`: the integers of weights at `/gptq` tiers, (name, tier without /load) -> int8 array
    (`tqs_onnx.rounding`); a /gptq weight without an entry had no statistics and rounds to nearest.
    """

    name = "write-tiers"

    def __init__(self, tiers: dict[str, Tier], axes: dict[str, tuple[int | None, int | None]],
                 read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array,
                 codes: dict[tuple[str, str], np.ndarray] | None = None):
        self.tiers = {n: t for n, t in tiers.items() if not t.is_identity}
        self.axes = axes
        self.read = read
        self.codes = codes or {}

    def run(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        flip = self._transposable(graph)
        new_nodes, new_inits, keep = [], [], []
        done: dict[str, str] = {}
        as_stored = set()  # float16 weights planned at fp16: kept as they are
        for init in graph.initializer:
            planned = self.tiers.get(init.name)
            # As the planner priced it and the sweep measured it: a float16 weight's own tiers (for_weight).
            tier = None if planned is None else for_weight(planned, _dtype(init))
            if tier is None or tier.is_identity:
                keep.append(init)
                if tier is not None:
                    as_stored.add(init.name)
                continue
            if tier.is_zero:  # nothing stored, nothing read: the nodes make zeros of its shape
                new_nodes += rewrite_nodes(init.name, tier, 0, self.axes[init.name], init.data_type,
                                           tuple(init.dims))
            elif tier.is_int:
                axes, shape = self.axes[init.name], tuple(init.dims)
                # A float16 weight is quantized as the sweep measured it: its float32 values (exact).
                q, scale = quantize(self.read(init).astype(np.float32), tier, *axes,
                                    self.codes.get((init.name, str(planned.base))))
                if init.name in flip:  # Gemm(transB=1) -> transB=0 on the transposed weight
                    q = np.ascontiguousarray(q.T)
                    scale = np.ascontiguousarray(scale.T) if scale.ndim == 2 else scale
                    axes = tuple(None if a is None else 1 - a for a in axes)
                    shape = shape[::-1]
                sn = stored_names(init.name)[1]
                dims = load_scale_dims(tier, shape, axes) if tier.at_load else None
                if dims is not None:  # shaped to broadcast against the weight in Mul
                    scale = scale.reshape(dims)
                new_inits += [numpy_helper.from_array(a, n) for n, a in stored_parts(init.name, q, tier)]
                new_inits.append(numpy_helper.from_array(scale, sn))
                new_nodes += rewrite_nodes(init.name, tier, scale.ndim, axes, init.data_type, shape)
            else:
                low = f"{init.name}__{tier.fmt}"
                new_inits.append(numpy_helper.from_array(to_storage(self.read(init), tier), low))
                new_nodes += rewrite_nodes(init.name, tier, 0, self.axes[init.name], init.data_type)
            done[init.name] = str(planned)
        missing = set(self.tiers) - set(done) - as_stored
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
        for node in nodes:
            if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in flip:
                next(a for a in node.attribute if a.name == "transB").i = 0
        for vi in graph.value_info:  # a flipped weight's declared shape turns with it (same bytes)
            if vi.name in flip and len(vi.type.tensor_type.shape.dim) == 2:
                dims = [onnx.TensorShapeProto.Dimension() for _ in range(2)]
                for d, src in zip(dims, reversed(vi.type.tensor_type.shape.dim)):
                    d.CopyFrom(src)
                del vi.type.tensor_type.shape.dim[:]
                vi.type.tensor_type.shape.dim.extend(dims)
        del graph.node[:]
        graph.node.extend(new_nodes + nodes)
        return PassResult(model, bool(done), {"rewritten": done, "transposed": sorted(flip)})

    def _transposable(self, graph: onnx.GraphProto) -> set[str]:
        """Integer-tier 2-D weights of the main graph read only as B of Gemm nodes with transB=1 (and
        not graph outputs, whose shape would change; a value_info entry is turned with the weight)."""
        readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for i, name in enumerate(node.input):
                readers.setdefault(name, []).append((node, i))
            for name in subgraph_refs(node):  # read inside a branch or loop body: left alone
                readers.setdefault(name, []).append((node, -1))
        typed = {o.name for o in graph.output}
        dims = {i.name: len(i.dims) for i in graph.initializer}

        def gemm_b(node: onnx.NodeProto, i: int) -> bool:
            return node.op_type == "Gemm" and i == 1 and any(a.name == "transB" and a.i == 1 for a in node.attribute)

        # Only DequantizeLinear forms: ORT folds a /load decode at load anyway (and the planner sizes
        # its scales for the weight as stored).
        return {n for n, t in self.tiers.items() if t.is_int and not t.at_load and dims.get(n) == 2 and n not in typed
                and readers.get(n) and all(gemm_b(node, i) for node, i in readers[n])}


def _dtype(init: onnx.TensorProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
