"""Make a rollout step runnable on fixed buffers: the step index becomes state of the graph.

A sweep step binds inputs that change every step (the nominal trajectory's value to measure against,
forcing data) and reads a divergence per step. A graph replayed on fixed buffers (ONNX Runtime's CUDA
graphs) needs every bound address to stay the same from one run to the next. This pass moves what
changes into the graph: each named input `x` becomes a row of a stacked input `x::stack` (rows, ...)
picked by a step counter `tqs::step` (an int64 scalar the graph also advances: `tqs::step_next`), and
each named scalar output `d` is written into row `tqs::step` of an accumulator (`d::acc` in,
`d::acc_next` out) instead of being read after every step. Fed back by the caller like any state, the
counter and the accumulators need no host copy between steps; the host reads the accumulators once.

Only the outputs named to keep stay graph outputs besides the new ones (a caller that leaves the
others unbound may keep them all, so that ORT optimizes the graph as before).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from tqs_onnx.errors import TqsError
from tqs_onnx.graph import main_opset
from tqs_onnx.passes.base import PassResult

STEP, STEP_NEXT = "tqs::step", "tqs::step_next"
STACK_SUFFIX, ACC_SUFFIX, ACC_NEXT_SUFFIX = "::stack", "::acc", "::acc_next"
MIN_OPSET = 11  # ScatterElements


class IndexedSteps:
    """Stacked inputs gathered by a step counter, scalar outputs accumulated per step (module doc)."""

    name = "indexed-steps"

    def __init__(self, stacked: list[str], accumulated: list[str], keep_outputs: list[str], rows: int):
        self.stacked = list(dict.fromkeys(stacked))
        self.accumulated = list(dict.fromkeys(accumulated))
        self.keep_outputs = list(dict.fromkeys(keep_outputs))
        self.rows = rows

    def run(self, model: onnx.ModelProto) -> PassResult:
        opset = main_opset(model)
        if opset < MIN_OPSET:
            raise TqsError(f"indexed steps need opset >= {MIN_OPSET} (the model has {opset})")
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        taken = {v for n in g.node for v in (*n.input, *n.output)} | {i.name for i in g.input} \
            | {i.name for i in g.initializer} | {o.name for o in g.output}
        new = [STEP, STEP_NEXT, "tqs::one", "tqs::shape1", "tqs::row", *(x + STACK_SUFFIX for x in self.stacked),
               *(d + s for d in self.accumulated for s in (ACC_SUFFIX, ACC_NEXT_SUFFIX, "::row"))]
        clash = sorted(set(new) & taken)
        if clash:
            raise TqsError(f"model already has values named {clash}")
        outputs = {o.name: o for o in g.output}
        missing = [n for n in [*self.accumulated, *self.keep_outputs] if n not in outputs]
        if missing:
            raise TqsError(f"model has no outputs {missing}")
        h = helper.make_node
        head = [h("Add", [STEP, "tqs::one"], [STEP_NEXT])]  # before every node (they read the gathers)
        tail = []
        inits = [helper.make_tensor("tqs::one", TensorProto.INT64, [], [1]),
                 helper.make_tensor("tqs::shape1", TensorProto.INT64, [1], [1])]
        inputs = {i.name: i for i in g.input}
        stacks = {}
        for x in self.stacked:
            if x not in inputs:
                raise TqsError(f"model has no input '{x}' to stack")
            t = inputs[x].type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            stacks[x] = x + STACK_SUFFIX
            g.input.remove(inputs[x])
            g.input.append(helper.make_tensor_value_info(
                stacks[x], t.elem_type, [self.rows, *dims] if t.HasField("shape") else None))
            head.append(h("Gather", [stacks[x], STEP], [x], axis=0))
        # An input with a default value (the divergence pass gives its references one) is now computed.
        kept = [i for i in g.initializer if i.name not in stacks]
        del g.initializer[:]
        g.initializer.extend([*kept, *inits])
        accumulators = {}
        if self.accumulated:
            head.append(h("Reshape", [STEP, "tqs::shape1"], ["tqs::row"]))
        for d in self.accumulated:
            acc, acc_next = d + ACC_SUFFIX, d + ACC_NEXT_SUFFIX
            elem = outputs[d].type.tensor_type.elem_type
            g.input.append(helper.make_tensor_value_info(acc, elem, [self.rows]))
            tail += [h("Reshape", [d, "tqs::shape1"], [d + "::row"]),
                      h("ScatterElements", [acc, "tqs::row", d + "::row"], [acc_next], axis=0)]
            accumulators[d] = (acc, acc_next)
        g.input.append(helper.make_tensor_value_info(STEP, TensorProto.INT64, []))
        body = list(g.node)
        del g.node[:]
        g.node.extend([*head, *body, *tail])
        keep = [outputs[n] for n in self.keep_outputs]
        del g.output[:]
        g.output.extend(keep)
        for d, (_, acc_next) in accumulators.items():
            g.output.append(helper.make_tensor_value_info(acc_next, outputs[d].type.tensor_type.elem_type,
                                                          [self.rows]))
        g.output.append(helper.make_tensor_value_info(STEP_NEXT, TensorProto.INT64, []))
        return PassResult(out, True, {"stacks": stacks, "accumulators": accumulators, "step": (STEP, STEP_NEXT)})
