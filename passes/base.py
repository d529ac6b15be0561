"""Pass infrastructure: a pass takes an onnx.ModelProto and returns a PassResult."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import onnx

log = logging.getLogger("tqs_onnx.passes")


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) model, whether it changed, and a small report."""

    model: onnx.ModelProto
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


def prepend_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Put `nodes` (which read only initializers) before the graph's own, so they stay in topological order."""
    kept = list(nodes) + list(graph.node)
    del graph.node[:]
    graph.node.extend(kept)


class GraphPass(Protocol):
    name: str

    def run(self, model: onnx.ModelProto) -> PassResult: ...


def graph_bindings(model, subgraphs_only: bool = False) -> Counter[str]:
    """How many graphs of an onnx-ir `model` (only its subgraphs with `subgraphs_only`) bind each name:
    as an input, an initializer or a node output of theirs."""
    bound: Counter[str] = Counter()
    for g in model.graphs():
        if subgraphs_only and g is model.graph:
            continue
        names = {v.name for v in g.inputs} | set(g.initializers) | {o.name for n in g for o in n.outputs}
        bound.update(n for n in names if n)
    return bound


def run_passes(model: onnx.ModelProto, passes: Sequence[GraphPass],
               after: Callable[[str], None] | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Apply passes in order; return the final model and each pass's report keyed by its name.

    `after(name)` is called once each pass has run (benchmarks time and measure the passes with it).
    """
    reports: dict[str, Any] = {}
    for p in passes:
        result = p.run(model)
        model = result.model
        reports[p.name] = {"modified": result.modified, **result.report}
        log.debug("pass %s: modified=%s", p.name, result.modified)
        if after is not None:
            after(p.name)
    return model, reports


def _graphs_by_path(graph: onnx.GraphProto, path: str = "") -> dict[str, onnx.GraphProto]:
    """Every graph under `graph`, keyed by the path of the nodes that hold it.

    A node is known by its first output's name, which lifting Constants or converting the opset keeps,
    not by its name or position (unnamed nodes shift when a pass removes or inserts nodes before them,
    and an If would get another If's value_info).
    """
    out = {path: graph}
    unnamed: Counter[str] = Counter()
    for node in graph.node:
        if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        key = next((o for o in node.output if o), "")
        if not key:
            key = f"{node.op_type}#{unnamed[node.op_type]}"
            unnamed[node.op_type] += 1
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for k, g in enumerate(subs):
                out.update(_graphs_by_path(g, f"{path}/{key}/{attr.name}{k}"))
    return out


def restore_value_info(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Give every graph of `target` the value_info its counterpart in `source` declared.

    Converters and IR round trips add inferred shapes; keeping only what the input declared keeps a
    rewrite's size exactly what the planner counted.
    """
    src = _graphs_by_path(source.graph)
    for path, g in _graphs_by_path(target.graph).items():
        del g.value_info[:]
        if path in src:
            g.value_info.extend(src[path].value_info)


def restore_opset_imports(source: onnx.ModelProto, target: onnx.ModelProto, version: int) -> None:
    """Keep the source's opset_import entries (their exact encoding) with the default domain at `version`."""
    del target.opset_import[:]
    for imp in source.opset_import:
        entry = target.opset_import.add()
        entry.CopyFrom(imp)
        if imp.domain in ("", "ai.onnx"):
            entry.version = version
