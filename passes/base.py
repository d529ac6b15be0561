"""Pass infrastructure: a pass takes an onnx.ModelProto and returns a PassResult."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import onnx

log = logging.getLogger("tqs_onnx.passes")


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) model, whether it changed, and a small report."""

    model: onnx.ModelProto
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


class GraphPass(Protocol):
    name: str

    def run(self, model: onnx.ModelProto) -> PassResult: ...


def run_passes(model: onnx.ModelProto, passes: Sequence[GraphPass]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Apply passes in order; return the final model and each pass's report keyed by its name."""
    reports: dict[str, Any] = {}
    for p in passes:
        result = p.run(model)
        model = result.model
        reports[p.name] = {"modified": result.modified, **result.report}
        log.debug("pass %s: modified=%s", p.name, result.modified)
    return model, reports
