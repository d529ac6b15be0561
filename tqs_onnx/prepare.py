"""The graph every stage works on: local functions inlined, hidden weights lifted, expanded lookup
tables factored, identical tensors stored once and integer constants stored narrow (all exact).

Sweep, inspect and apply all start from `prepare_graph`, so the weights the sweep scores and sizes
are the very tensors `apply` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from tqs_onnx.passes.dedup import DeduplicateTensors
from tqs_onnx.graph import iter_tensors
from tqs_onnx.passes.detach import Stubs, detach, raw_half
from tqs_onnx.passes.factor_tables import FactorExpandedTables
from tqs_onnx.passes.inline import InlineLocalFunctions
from tqs_onnx.passes.lift import LiftWeights
from tqs_onnx.passes.narrow_ints import NarrowIntegerConstants
from tqs_onnx.passes.opset import lower_ir_for_ort
from tqs_onnx.passes.sparse import hide_sparse_initializers
from tqs_onnx.passes.split_directions import SplitDirections


LIFT_FLOOR = 16  # smallest Constant-node tensor lifted to an initializer, and smallest tensor deduplicated
# Names the passes below; changed whenever they may prepare a model differently, so a sweep checkpoint
# of an earlier version is not resumed on another graph (it is part of the checkpoint's fingerprint).
PASSES_VERSION = "ir4,inline-defaults-sites,sparse,lift-unique,split-dirs,factor,dedup16-scoped-vi,narrow16,raw-half"


@dataclass
class PreparedGraph:
    model: onnx.ModelProto
    origins: dict[str, str]  # weight name -> 'constant' / 'subgraph' / ... for lifted weights
    reports: dict[str, Any] = field(default_factory=dict)
    # Set when prepared with keep_detached: the large main-graph initializers of `model` hold no data yet.
    stubs: Stubs | None = None


def _raise_to_ir4(model: onnx.ModelProto) -> None:
    """IR < 4 lists every initializer as a graph input too, and ONNX Runtime then treats an initializer as
    a constant that cannot be fed, so the sweep's own fed initializers (a reference trajectory with a
    default) would fail. From IR 4 an initializer listed as an input is one a caller may override:
    those listings are dropped (the weights stay constants, as IR 3 meant) and the IR raised to 4."""
    names = {i.name for i in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.ir_version = 4


def prepare_graph(model: onnx.ModelProto, factor: bool = True, keep_detached: bool = False) -> PreparedGraph:
    """Inline local functions, lift hidden weights, factor expanded tables and store identical tensors
    once and store integer constants narrow (the last three are the lossless passes `factor` turns off)
    into a new model; the caller's is
    only read.

    The passes restructure a skeleton (passes/detach.py) whose large tensors hold no data; the data
    of those kept as they are is copied once, at the end, so the result costs its own size and not
    the input's size once per pass. With `keep_detached` the large main-graph initializers stay
    stubs and `stubs` reads and attaches their data (apply attaches only the weights it keeps).
    """
    detached = detach(model)
    # Training-only graphs name the FP32 weights this rewrite replaces: an inference model drops them.
    detached.skeleton.ClearField("training_info")
    if detached.skeleton.ir_version < 4:
        _raise_to_ir4(detached.skeleton)  # first: the passes below leave overridable initializers alone
    inlined = InlineLocalFunctions().run(detached.skeleton)  # keeps sparse initializers; may bring sparse Constants
    sparse = hide_sparse_initializers(inlined.model)
    lifted = LiftWeights(size_floor=LIFT_FLOOR, inplace=True).run(inlined.model)
    reports = {"lift-weights": {"lifted": lifted.report.get("lifted", 0)}}
    if inlined.modified:
        reports["inline-functions"] = inlined.report
    out = lifted.model
    # Not a size pass (with --no-factor too): each direction of a bidirectional RNN gets its own scales.
    split = SplitDirections(read=detached.array).run(out)
    if split.modified:
        reports["split-directions"] = split.report
    if factor:
        result = FactorExpandedTables(inplace=True, read=detached.array).run(out)
        reports["factor-tables"] = {k: v for k, v in result.report.items()}
        out = result.model
    if factor or inlined.modified:
        # After factoring, so that tables factored alike share their table and index too; down to the
        # size lifting starts at, so that a function's Constants inlined once per call are stored once.
        # With --no-factor too where functions were inlined (their copies are the inliner's; the pass
        # then also merges the model's own duplicates).
        shared = DeduplicateTensors(size_floor=LIFT_FLOOR, read=detached.array).run(out)
        reports["dedup"] = shared.report
        out = shared.model
    if factor:
        narrowed = NarrowIntegerConstants(size_floor=LIFT_FLOOR, read=detached.array).run(out)
        if narrowed.modified:
            reports["narrow-ints"] = narrowed.report
    sparse.restore(out)
    # A file written by onnx >= 1.23 with its default IR 14 runs in ONNX Runtime once the IR is lowered
    # (the written model is checked by onnx.checker).
    lower_ir_for_ort(out)
    for t in iter_tensors(out):  # attached below: _copy_data does the same for them
        raw_half(t)
    origins = lifted.report.get("origins", {})
    if keep_detached:
        return PreparedGraph(out, origins, reports, detached.by_name(out))
    detached.attach(out)
    return PreparedGraph(out, origins, reports)
