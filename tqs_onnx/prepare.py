"""The graph every stage works on: hidden weights lifted, expanded lookup tables factored (exact).

Sweep, inspect and apply all start from `prepare_graph`, so the weights the sweep scores and sizes
are the very tensors `apply` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from tqs_onnx.passes.factor_tables import FactorExpandedTables
from tqs_onnx.passes.lift import LiftWeights


@dataclass
class PreparedGraph:
    model: onnx.ModelProto
    origins: dict[str, str]  # weight name -> 'constant' / 'subgraph' / ... for lifted weights
    reports: dict[str, Any] = field(default_factory=dict)


def prepare_graph(model: onnx.ModelProto, factor: bool = True) -> PreparedGraph:
    lifted = LiftWeights().run(model)
    reports = {"lift-weights": {"lifted": lifted.report.get("lifted", 0)}}
    out = lifted.model
    if factor:
        # In place only on our own copy: the lift pass returns the caller's model when it lifts nothing
        # (and when it does, it worked on a copy, so its output shares nothing with the caller's).
        result = FactorExpandedTables(inplace=lifted.modified).run(out)
        out = result.model
        reports["factor-tables"] = {k: v for k, v in result.report.items()}
    return PreparedGraph(out, lifted.report.get("origins", {}), reports)
