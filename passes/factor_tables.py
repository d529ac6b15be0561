"""Factor constant-folded lookup tables back into (small table, index, Gather).

Exporters constant-fold lookups such as ``bias = table[index]`` (Swin relative position
bias, Pangu-Weather's Earth-specific bias): the initializer then holds the expanded
tensor, many times larger than the trained table. This module finds such tensors, splits
their axes into "position" axes P and "rest" axes R so that many positions share a
bitwise-identical rest-slice, and rewrites the tensor as

    table (u, *R) + int32 index (*P) -> Gather(axis=0) -> [Transpose] -> original name

so every consumer is unchanged and the value is bit-identical.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tqs_onnx.passes.base import PassResult

__all__ = ["AxisSplit", "Factorization", "FactorExpandedTables", "candidate_splits", "find_factorization"]

log = logging.getLogger("tqs_onnx.passes.factor_tables")

DEFAULT_SIZE_FLOOR = 4096
DEFAULT_MIN_SAVING = 0.25
INDEX_DTYPE = np.int32
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)
# Up to this many non-unit axes every subset is a candidate position set (2**6 - 1 = 63);
# beyond it only the structured families below are tried.
_MAX_EXHAUSTIVE_AXES = 6
# Rest-columns sampled to bound the number of distinct rows from below before paying
# for a full transpose and sort.
_PROBE_COLUMNS = 8
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class AxisSplit:
    """A partition of a tensor's axes into position axes (indexed) and rest axes (kept)."""

    position_axes: tuple[int, ...]
    rest_axes: tuple[int, ...]

    @property
    def order(self) -> tuple[int, ...]:
        """Axis order of Gather's output: position axes, then rest axes."""
        return self.position_axes + self.rest_axes


@dataclass(frozen=True)
class Factorization:
    """``array == table[index].transpose(perm)``, with table (u, *rest) and index (*positions)."""

    table: np.ndarray
    index: np.ndarray
    position_axes: tuple[int, ...]
    rest_axes: tuple[int, ...]
    shape: tuple[int, ...]
    bytes_before: int

    @property
    def bytes_after(self) -> int:
        return int(self.table.nbytes + self.index.nbytes)

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    @property
    def perm(self) -> tuple[int, ...]:
        """Transpose permutation from Gather's output layout back to the original layout."""
        return tuple(int(a) for a in np.argsort(self.position_axes + self.rest_axes))

    @property
    def needs_transpose(self) -> bool:
        return self.perm != tuple(range(len(self.shape)))

    def reconstruct(self) -> np.ndarray:
        """Rebuild the original array with numpy (same computation as the ONNX rewrite)."""
        return np.take(self.table, self.index, axis=0).transpose(self.perm)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (no array data)."""
        return {
            "shape": list(self.shape),
            "table_shape": list(self.table.shape),
            "index_shape": list(self.index.shape),
            "position_axes": list(self.position_axes),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


# ---------------------------------------------------------------------------
# Pure numpy: finding a factorization
# ---------------------------------------------------------------------------


def candidate_splits(shape: tuple[int, ...]) -> list[AxisSplit]:
    """Axis splits worth trying for ``shape``; unit axes always go with the index (they are free there)."""
    unit = [a for a, d in enumerate(shape) if d == 1]
    axes = [a for a, d in enumerate(shape) if d > 1]
    groups = _all_subsets(axes) if len(axes) <= _MAX_EXHAUSTIVE_AXES else _structured_subsets(axes)
    splits = []
    for group in groups:
        positions = tuple(sorted(set(group) | set(unit)))
        rest = tuple(a for a in range(len(shape)) if a not in positions)
        splits.append(AxisSplit(positions, rest))
    return splits


def _all_subsets(axes: list[int]) -> list[tuple[int, ...]]:
    return [c for k in range(1, len(axes) + 1) for c in itertools.combinations(axes, k)]


def _structured_subsets(axes: list[int]) -> list[tuple[int, ...]]:
    """Prefixes, suffixes, single axes and adjacent pairs (for high-rank tensors)."""
    n = len(axes)
    found = {tuple(axes[:k]) for k in range(1, n + 1)}
    found |= {tuple(axes[k:]) for k in range(n)}
    found |= {(a,) for a in axes}
    found |= {(axes[i], axes[i + 1]) for i in range(n - 1)}
    return sorted(found, key=lambda g: (len(g), g))


def _sizes(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a] for a in axes)


def _bytes_after(array: np.ndarray, split: AxisSplit, distinct_rows: int) -> int:
    positions = int(np.prod(_sizes(array.shape, split.position_axes), dtype=np.int64))
    row_bytes = int(np.prod(_sizes(array.shape, split.rest_axes), dtype=np.int64)) * array.itemsize
    return distinct_rows * row_bytes + positions * np.dtype(INDEX_DTYPE).itemsize


def _as_void_rows(rows: np.ndarray) -> np.ndarray:
    """View a 2-D array as one opaque byte string per row: bitwise equality, so -0.0 != 0.0 and NaN payloads count."""
    rows = np.ascontiguousarray(rows)
    return rows.view(np.dtype((np.void, rows.shape[1] * rows.itemsize))).ravel()


def _probe_distinct_rows(array: np.ndarray, split: AxisSplit) -> int:
    """Lower bound on the distinct rest-slices: distinct hashes of a few sampled rest-columns.

    Hash collisions only merge rows, so the count stays a lower bound; hashing keeps the
    sort on 8-byte keys even when there are millions of positions.
    """
    rest_shape = _sizes(array.shape, split.rest_axes)
    rest_size = int(np.prod(rest_shape, dtype=np.int64))
    picks = np.unique(np.linspace(0, rest_size - 1, min(_PROBE_COLUMNS, rest_size)).astype(np.int64))
    bits = np.dtype(f"u{array.itemsize}")
    digest = np.zeros(int(array.size // rest_size), dtype=np.uint64)
    for j in picks:
        column = _rest_column(array, split, np.unravel_index(j, rest_shape)).view(bits).astype(np.uint64)
        digest = (digest ^ column) * _HASH_MULTIPLIER
    return _count_distinct(digest)


def _count_distinct(keys: np.ndarray) -> int:
    """Distinct values of a 1-D array (an explicit sort beats np.unique's hash path on large uint64 keys)."""
    ordered = np.sort(keys)
    return int(1 + np.count_nonzero(ordered[1:] != ordered[:-1])) if ordered.size else 0


def _rest_column(array: np.ndarray, split: AxisSplit, rest_index: tuple[int, ...]) -> np.ndarray:
    """The values at one fixed rest position, for every position (positions in C order)."""
    indexer: list[Any] = [slice(None)] * array.ndim
    for axis, i in zip(split.rest_axes, rest_index):
        indexer[axis] = int(i)
    return array[tuple(indexer)].reshape(-1)


def _factor_along(array: np.ndarray, split: AxisSplit) -> Factorization:
    """Exact unique-row factorization of ``array`` for one axis split."""
    position_shape = _sizes(array.shape, split.position_axes)
    rest_shape = _sizes(array.shape, split.rest_axes)
    rows = np.ascontiguousarray(array.transpose(split.order)).reshape(int(np.prod(position_shape, dtype=np.int64)), -1)
    _, first, inverse = np.unique(_as_void_rows(rows), return_index=True, return_inverse=True)
    # Order the table by first appearance so the result does not depend on byte-sort order.
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    table = rows[first[order]].reshape((order.size, *rest_shape))
    index = rank[inverse.reshape(-1)].astype(INDEX_DTYPE).reshape(position_shape)
    return Factorization(
        table=table,
        index=index,
        position_axes=split.position_axes,
        rest_axes=split.rest_axes,
        shape=tuple(array.shape),
        bytes_before=int(array.nbytes),
    )


def find_factorization(array: np.ndarray, min_saving: float = DEFAULT_MIN_SAVING) -> Factorization | None:
    """Best (table, index) factorization of ``array`` saving at least ``min_saving`` of its bytes, else None.

    Equality of rest-slices is bitwise. Candidate splits are ranked by a cheap lower bound
    on their size (from a few sampled columns) and evaluated exactly best-first until no
    remaining candidate can beat the best exact one.
    """
    if array.ndim == 0 or array.size == 0:
        return None
    budget = array.nbytes * (1.0 - min_saving)
    bounds = _bounded_candidates(array, budget)
    best: Factorization | None = None
    for bound, split in bounds:
        if best is not None and bound >= best.bytes_after:
            break
        found = _factor_along(array, split)
        if found.bytes_after <= budget and (best is None or found.bytes_after < best.bytes_after):
            best = found
    return best


def _bounded_candidates(array: np.ndarray, budget: float) -> list[tuple[int, AxisSplit]]:
    """Candidate splits whose optimistic size fits the budget, smallest optimistic size first."""
    bounded = []
    for split in candidate_splits(tuple(array.shape)):
        if _bytes_after(array, split, 1) > budget:
            continue
        bound = _bytes_after(array, split, _probe_distinct_rows(array, split))
        if bound <= budget:
            bounded.append((bound, split))
    bounded.sort(key=lambda item: item[0])
    return bounded


# ---------------------------------------------------------------------------
# ONNX rewrite
# ---------------------------------------------------------------------------


class NameFactory:
    """Hands out names not used anywhere in the model (values, initializers, nodes)."""

    def __init__(self, used: set[str]):
        self._used = set(used)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name


def collect_names(graph: onnx.GraphProto) -> set[str]:
    """Every value, initializer and node name in ``graph`` and its subgraphs."""
    names: set[str] = set()
    for g, _ in iter_graphs(graph, "main"):
        names.update(v.name for v in (*g.input, *g.output, *g.value_info))
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.update(node.output)
            names.update(node.input)
            names.add(node.name)
    names.discard("")
    return names


def iter_graphs(graph: onnx.GraphProto, path: str) -> Iterator[tuple[onnx.GraphProto, str]]:
    """Yield ``graph`` and every nested subgraph, each with a readable path."""
    yield graph, path
    for sub, sub_path in direct_subgraphs(graph, path):
        yield from iter_graphs(sub, sub_path)


def direct_subgraphs(graph: onnx.GraphProto, path: str) -> Iterator[tuple[onnx.GraphProto, str]]:
    """The subgraphs held by the attributes of ``graph``'s nodes (live references), with paths."""
    for i, node in enumerate(graph.node):
        label = node.name or f"{node.op_type}_{i}"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g, f"{path}/{label}.{attr.name}"
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for j, sub in enumerate(attr.graphs):
                    yield sub, f"{path}/{label}.{attr.name}[{j}]"


def _is_constant_tensor_node(node: onnx.NodeProto) -> bool:
    return (
        node.op_type == "Constant"
        and node.domain in ("", "ai.onnx")
        and len(node.attribute) == 1
        and node.attribute[0].name == "value"
        and node.attribute[0].type == onnx.AttributeProto.TENSOR
    )


@dataclass
class _Rewrite:
    """One factorized tensor and the names chosen for its pieces."""

    name: str
    factorization: Factorization
    table_name: str
    index_name: str


def _expansion_nodes(rw: _Rewrite, names: NameFactory) -> list[onnx.NodeProto]:
    """Gather (+ Transpose) nodes that rebuild ``rw.name`` from its table and index."""
    f = rw.factorization
    gathered = names.fresh(f"{rw.name}__gathered") if f.needs_transpose else rw.name
    nodes = [
        helper.make_node(
            "Gather", [rw.table_name, rw.index_name], [gathered], name=names.fresh(f"{rw.name}__gather"), axis=0
        )
    ]
    if f.needs_transpose:
        nodes.append(
            helper.make_node(
                "Transpose", [gathered], [rw.name], name=names.fresh(f"{rw.name}__transpose"), perm=list(f.perm)
            )
        )
    return nodes


def _constant_nodes(rw: _Rewrite, names: NameFactory) -> list[onnx.NodeProto]:
    """Constant nodes holding the table and index (used when the source was a Constant node)."""
    f = rw.factorization
    return [
        helper.make_node(
            "Constant",
            [],
            [rw.table_name],
            name=names.fresh(rw.table_name),
            value=numpy_helper.from_array(f.table, rw.table_name),
        ),
        helper.make_node(
            "Constant",
            [],
            [rw.index_name],
            name=names.fresh(rw.index_name),
            value=numpy_helper.from_array(f.index, rw.index_name),
        ),
    ]


@dataclass
class _Context:
    """State shared while rewriting one model."""

    names: NameFactory
    records: list[dict[str, Any]]
    skipped: list[dict[str, str]]


class FactorExpandedTables:
    """Rewrite expanded lookup tables as (table, index) initializers + Gather, bit-exactly.

    Considers float initializers (main graph and subgraphs) and Constant nodes with a
    ``value`` tensor of at least ``size_floor`` elements; rewrites those whose best
    factorization saves at least ``min_saving`` of their bytes. Initializers that are also
    graph inputs (overridable) and tensors stored as external data are skipped and reported.
    The input model is copied unless ``inplace``. ``read`` gives a tensor's values (a skeleton's
    stubs are read from the tensors they stand for: passes/detach.py).
    """

    name = "factor_expanded_tables"

    def __init__(
        self, size_floor: int = DEFAULT_SIZE_FLOOR, min_saving: float = DEFAULT_MIN_SAVING, inplace: bool = False,
        read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array,
    ):
        self.size_floor = size_floor
        self.min_saving = min_saving
        self.inplace = inplace
        self.read = read

    def run(self, model: onnx.ModelProto) -> PassResult:
        """Factor every eligible tensor of ``model``; the report lists each rewrite and the totals."""
        if not self.inplace:
            model = _copy_model(model)
        ctx = _Context(names=NameFactory(collect_names(model.graph)), records=[], skipped=[])
        self._rewrite_graph(model.graph, "main", ctx)
        return PassResult(model=model, modified=bool(ctx.records), report=_report(ctx.records, ctx.skipped))

    def _rewrite_graph(self, graph: onnx.GraphProto, path: str, ctx: _Context) -> None:
        """Rewrite one graph, then recurse into the subgraphs of its (possibly rebuilt) node list."""
        init_nodes = self._rewrite_initializers(graph, path, ctx)
        new_nodes, changed = self._rewrite_constant_nodes(graph, path, ctx)
        if init_nodes or changed:
            # Expansion nodes of initializers go first: they depend on initializers only, and
            # consumers anywhere in the graph (or in its subgraphs) must come after them.
            graph.ClearField("node")
            graph.node.extend(init_nodes + new_nodes)
        for sub, sub_path in direct_subgraphs(graph, path):
            self._rewrite_graph(sub, sub_path, ctx)

    def _rewrite_initializers(self, graph: onnx.GraphProto, path: str, ctx: _Context) -> list[onnx.NodeProto]:
        """Factor eligible initializers in place (tensor -> table, index appended); return the expansion nodes."""
        graph_inputs = {v.name for v in graph.input}
        new_indices: list[onnx.TensorProto] = []
        nodes: list[onnx.NodeProto] = []
        for tensor in graph.initializer:
            if not self._eligible(tensor):
                continue
            reason = "initializer is also a graph input" if tensor.name in graph_inputs else _blocker(tensor)
            if reason is not None:
                ctx.skipped.append({"name": tensor.name, "graph": path, "reason": reason})
                continue
            rw = self._factor(tensor, tensor.name, ctx.names)
            if rw is None:
                continue
            tensor.CopyFrom(numpy_helper.from_array(rw.factorization.table, rw.table_name))
            new_indices.append(numpy_helper.from_array(rw.factorization.index, rw.index_name))
            nodes.extend(_expansion_nodes(rw, ctx.names))
            ctx.records.append(_record(rw, path, "initializer"))
        graph.initializer.extend(new_indices)
        return nodes

    def _rewrite_constant_nodes(
        self, graph: onnx.GraphProto, path: str, ctx: _Context
    ) -> tuple[list[onnx.NodeProto], bool]:
        """Node list with eligible Constant nodes replaced by table/index Constants + Gather."""
        new_nodes: list[onnx.NodeProto] = []
        changed = False
        for node in graph.node:
            rw = self._factor_constant_node(node, path, ctx)
            if rw is None:
                new_nodes.append(node)
                continue
            new_nodes.extend(_constant_nodes(rw, ctx.names) + _expansion_nodes(rw, ctx.names))
            ctx.records.append(_record(rw, path, "constant"))
            changed = True
        return new_nodes, changed

    def _factor_constant_node(self, node: onnx.NodeProto, path: str, ctx: _Context) -> _Rewrite | None:
        if not _is_constant_tensor_node(node) or not self._eligible(node.attribute[0].t):
            return None
        reason = _blocker(node.attribute[0].t)
        if reason is not None:
            ctx.skipped.append({"name": node.output[0], "graph": path, "reason": reason})
            return None
        return self._factor(node.attribute[0].t, node.output[0], ctx.names)

    def _eligible(self, tensor: onnx.TensorProto) -> bool:
        return tensor.data_type in FLOAT_TYPES and int(np.prod(tensor.dims, dtype=np.int64)) >= self.size_floor

    def _factor(self, tensor: onnx.TensorProto, value_name: str, names: NameFactory) -> _Rewrite | None:
        f = find_factorization(self.read(tensor), self.min_saving)
        if f is None:
            return None
        log.debug("factor %s %s -> table %s index %s", value_name, f.shape, f.table.shape, f.index.shape)
        return _Rewrite(
            name=value_name,
            factorization=f,
            table_name=names.fresh(f"{value_name}__table"),
            index_name=names.fresh(f"{value_name}__index"),
        )


def _blocker(tensor: onnx.TensorProto) -> str | None:
    """Why an eligible tensor cannot be rewritten, or None."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return "external data not loaded"
    return None


def _copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _record(rw: _Rewrite, path: str, source: str) -> dict[str, Any]:
    return {"name": rw.name, "graph": path, "source": source, **rw.factorization.summary()}


def _report(records: list[dict[str, Any]], skipped: list[dict[str, str]]) -> dict[str, Any]:
    before = sum(r["bytes_before"] for r in records)
    after = sum(r["bytes_after"] for r in records)
    return {
        "tensors": records,
        "skipped": skipped,
        "tensors_rewritten": len(records),
        "bytes_before": before,
        "bytes_after": after,
        "bytes_saved": before - after,
    }
