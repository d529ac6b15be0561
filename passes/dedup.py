"""Merge identical constant tensors (same dtype, shape and bytes) into one.

Built on onnx_ir: values are objects, so rewiring every consumer (including nodes of
subgraphs that capture an outer-scope value) is ``Value.replace_all_uses_with``.

onnx_ir's own ``DeduplicateInitializersPass`` is not used directly because its
``size_limit`` is a ceiling (it dedups only tensors *up to* that many elements, the opposite
of a floor), it ignores Constant nodes, and it never lets a subgraph reuse an identical
outer-scope tensor. This pass keeps its rules otherwise: graph inputs and graph outputs are
never removed, and bytes are compared exactly after a digest match.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir

from tqs_onnx.graph import iter_graphs, iter_tensors
from tqs_onnx.passes.base import PassResult, graph_bindings, restore_value_info

__all__ = ["DeduplicateTensors"]

log = logging.getLogger("tqs_onnx.passes.dedup")

DEFAULT_SIZE_FLOOR = 1024

_Key = tuple[ir.DataType, tuple[int, ...]]


@dataclass
class _Scope:
    """Canonical values visible in one graph: its own plus those of enclosing graphs (defined earlier).

    A value is hashed only once a second tensor of its dtype and shape appears (`pending` until then)."""

    pending: dict[_Key, list[ir.Value]] = field(default_factory=dict)
    hashed: dict[tuple[_Key, bytes], ir.Value] = field(default_factory=dict)

    def child(self) -> "_Scope":
        return _Scope({k: list(v) for k, v in self.pending.items()}, dict(self.hashed))


@dataclass
class _Merge:
    removed: str
    kept: str
    graph: str
    nbytes: int


class DeduplicateTensors:
    """Replace every constant tensor identical to an earlier visible one by a reference to it.

    Considers initializers and ``Constant(value=...)`` nodes of at least ``size_floor``
    elements, in the main graph and all subgraphs. A subgraph may reuse an identical tensor
    of an enclosing graph; sibling subgraphs do not share. Tensors that are graph inputs
    (overridable) or graph outputs (their name is part of the interface) are kept, though
    they may serve as the canonical copy.
    """

    name = "deduplicate_tensors"

    def __init__(self, size_floor: int = DEFAULT_SIZE_FLOOR,
                 read: Callable[[onnx.TensorProto], np.ndarray] | None = None):
        self.size_floor = size_floor
        # `read` gives a proto tensor's values (a skeleton's stubs are read from the tensors they stand
        # for: passes/detach.py); only tensors sharing a dtype and shape with another are ever read.
        self.read = read

    def run(self, model: onnx.ModelProto) -> PassResult:
        """Deduplicate; the report lists each merged tensor, the kept name, and bytes saved."""
        if not self._has_candidates(model):
            # No two tensors share a dtype and shape: skip the onnx-ir round trip (a copy of the model).
            return PassResult(model=model, modified=False, report=_report([]))
        ir_model = ir.from_proto(model)
        self._root = ir_model.graph
        self._sub_bound = graph_bindings(ir_model, subgraphs_only=True)
        self._digests: dict[int, bytes] = {}  # by id(value), for values hashed as canonical candidates
        merges: list[_Merge] = []
        self._dedup_graph(ir_model.graph, "main", _Scope(), merges)
        if not merges:
            return PassResult(model=model, modified=False, report=_report(merges))
        out = ir.to_proto(ir_model)
        # onnx-ir writes a value_info for every typed value, initializers too (17 entries, 340 bytes on a
        # small model: the lossless passes made it larger): keep the input's own
        removed = {m.removed for m in merges}
        restore_value_info(model, out)
        for g in iter_graphs(out.graph):
            kept = [v for v in g.value_info if v.name not in removed]
            del g.value_info[:]
            g.value_info.extend(kept)
        return PassResult(model=out, modified=True, report=_report(merges))

    def _dedup_graph(self, graph: ir.Graph, path: str, scope: _Scope, merges: list[_Merge]) -> None:
        """Initializers first (visible to the whole graph), then nodes in order, recursing into subgraphs."""
        for value in tuple(graph.initializers.values()):
            if self._merge_into_scope(value, scope, path, merges):
                assert value.name is not None
                graph.initializers.pop(value.name)
        for node in tuple(graph):
            if _is_constant_tensor_node(node) and self._merge_into_scope(node.outputs[0], scope, path, merges):
                graph.remove(node, safe=True)
                continue
            for attr_name, sub, label in _subgraphs(node):
                self._dedup_graph(sub, f"{path}/{node.name or node.op_type}.{attr_name}{label}", scope.child(), merges)

    def _merge_into_scope(self, value: ir.Value, scope: _Scope, path: str, merges: list[_Merge]) -> bool:
        """Rewire ``value`` to an identical canonical value and return True, or register it as canonical."""
        tensor = _constant_of(value)
        if tensor is None or tensor.size < self.size_floor or tensor.dtype == ir.DataType.STRING:
            return False
        if value.is_graph_input():
            # Overridable at run time: neither removable nor a safe stand-in for others.
            return False
        key: _Key = (tensor.dtype, tuple(tensor.shape.numpy()))
        if key not in scope.pending:
            scope.pending[key] = [value]
            return False
        for v in scope.pending[key]:
            scope.hashed.setdefault((key, self._digest(v)), v)
        scope.pending[key] = []
        data = self._bytes(tensor)
        digest = hashlib.sha256(data).digest()
        kept = scope.hashed.get((key, digest))
        if kept is None or value.is_graph_output() or self._bytes(_constant_of(kept)) != data:
            scope.hashed.setdefault((key, digest), value)
            return False
        if self._shadowed(kept, value):
            return False
        value.replace_all_uses_with(kept)
        merges.append(_Merge(removed=str(value.name), kept=str(kept.name), graph=path, nbytes=len(data)))
        log.debug("dedup: %s -> %s (%d bytes)", value.name, kept.name, len(data))
        return True

    def _shadowed(self, kept: ir.Value, value: ir.Value) -> bool:
        """Could a reader of `value` inside a subgraph see another value under `kept`'s name? Names resolve
        by scope, so a subgraph that binds that name itself (a Loop body input, say) would read its own
        value after the merge. Conservative: any other subgraph binding of the name refuses the merge."""
        if all(use.node.graph is self._root for use in value.uses()):
            return False
        own = 0 if kept.graph is self._root else 1
        return self._sub_bound[str(kept.name)] > own

    def _has_candidates(self, model: onnx.ModelProto) -> bool:
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for t in iter_tensors(model):
            key = (t.data_type, tuple(t.dims))
            if t.data_type == onnx.TensorProto.STRING or int(np.prod(t.dims, dtype=np.int64)) < self.size_floor:
                continue
            if key in seen:
                return True
            seen.add(key)
        return False

    def _digest(self, value: ir.Value) -> bytes:
        if id(value) not in self._digests:
            self._digests[id(value)] = hashlib.sha256(self._bytes(_constant_of(value))).digest()
        return self._digests[id(value)]

    def _bytes(self, tensor: ir.TensorProtocol | None) -> bytes:
        assert tensor is not None
        proto = getattr(tensor, "raw", None)
        if self.read is not None and isinstance(proto, onnx.TensorProto):
            return np.ascontiguousarray(self.read(proto)).tobytes()
        return tensor.tobytes()


def _constant_of(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor held by an initializer or by the Constant node producing ``value``."""
    if value.is_initializer():
        return value.const_value
    producer = value.producer()
    if producer is not None and _is_constant_tensor_node(producer):
        return producer.attributes["value"].as_tensor()
    return None


def _is_constant_tensor_node(node: ir.Node) -> bool:
    return (
        node.op_type == "Constant"
        and node.domain in ("", "ai.onnx")
        and set(node.attributes) == {"value"}
        and node.attributes["value"].type == ir.AttributeType.TENSOR
    )


def _subgraphs(node: ir.Node) -> list[tuple[str, ir.Graph, str]]:
    """(attribute name, subgraph, "[i]" label for GRAPHS attributes) for each subgraph of ``node``."""
    found: list[tuple[str, ir.Graph, str]] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            found.append((attr.name, attr.as_graph(), ""))
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend((attr.name, g, f"[{i}]") for i, g in enumerate(attr.as_graphs()))
    return found


def _report(merges: list[_Merge]) -> dict[str, Any]:
    return {
        "merged": [m.__dict__ for m in merges],
        "tensors_removed": len(merges),
        "bytes_saved": int(np.sum([m.nbytes for m in merges], dtype=np.int64)),
    }
