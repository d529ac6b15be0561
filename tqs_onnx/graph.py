"""Graph analysis: safe loading, the weight table, networkx views, and blocks of weights.

A *weight* is a float initializer (after Constant nodes and subgraph initializers are lifted into
the main graph) with at least `min_size` elements. Weights are grouped into *blocks*, the units the
sweep perturbs and the allocator assigns tiers to. Grouping follows the ops that consume a weight,
looking through data-movement ops (Slice, Concat, Reshape, ...), never the names.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
from onnx import external_data_helper
from onnx import numpy_helper

from tqs_onnx.errors import TqsError
from tqs_onnx.tiers import FUSED_CONSUMERS
from tqs_onnx.util import CONTROL_CHARS

FLOAT_TYPES = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16,
               onnx.TensorProto.BFLOAT16: 16, onnx.TensorProto.DOUBLE: 64}
# Ops that only move or reshape data: a weight reaching a compute op through them belongs to that op.
DATA_MOVEMENT = {"Slice", "Concat", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Identity",
                 "Cast", "Flatten", "Expand", "Gather", "Tile", "Pad", "DequantizeLinear"}
DEFAULT_MIN_SIZE = 256
# Changed whenever the weight table may give a weight other axes, blocks or quantizability (a sweep's
# checkpoint records it: its rows' tier damage was measured with those axes).
ANALYSIS_VERSION = "embedding-rows,einsum-axes,vectors,unique-body-labels,cast-axes,float16,concat-axes,exact-uses,gather-rows"
NONFINITE_REASON = "holds NaN/inf values"


# ---------------------------------------------------------------------------------------- loading

def iter_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def value_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name of the graph and its subgraphs (a new name must clash with none)."""
    names: set[str] = set()
    for g in iter_graphs(graph):
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        names.update(o for n in g.node for o in list(n.output) + list(n.input))
    return names


def iter_tensors(model: onnx.ModelProto):
    """Every tensor a model stores: initializers (sparse ones as values and indices) and Constant
    values of all graphs (training_info's too), and the Constant values inside local functions' bodies."""
    for g in iter_graphs(model.graph):
        yield from _graph_tensors(g)
    for info in model.training_info:
        for top in (info.initialization, info.algorithm):
            for g in iter_graphs(top):
                yield from _graph_tensors(g)
    for f in model.functions:
        yield from _node_tensors(f.node)
        for a in f.attribute_proto:  # attributes' default values
            yield from _attribute_tensors(a)
        for g in function_subgraphs(f):
            yield from _graph_tensors(g)


def function_subgraphs(f: onnx.FunctionProto):
    """Every graph nested in a local function's body (If/Loop/Scan bodies, and theirs)."""
    for node in f.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                yield from iter_graphs(sub)


def _graph_tensors(g: onnx.GraphProto):
    yield from g.initializer
    for sparse in g.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(g.node)


def _node_tensors(nodes):
    for node in nodes:
        for attr in node.attribute:
            yield from _attribute_tensors(attr)


def _attribute_tensors(attr: onnx.AttributeProto):
    if attr.type == onnx.AttributeProto.TENSOR:
        yield attr.t
    elif attr.type == onnx.AttributeProto.TENSORS:
        yield from attr.tensors
    elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
        yield attr.sparse_tensor.values
        yield attr.sparse_tensor.indices
    elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
        for sp in attr.sparse_tensors:
            yield sp.values
            yield sp.indices


def _label(t: onnx.TensorProto) -> str:
    """How an error names a tensor (a Constant's value, in a function body say, may have no name)."""
    return f"tensor '{t.name}'" if t.name else f"an unnamed tensor (a Constant's value, dims {list(t.dims)})"


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files an ONNX file names, resolved; [] where it cannot be read (load_model
    then says why). For refusing outputs that would replace them, before any work is done."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    return named_data_files(model, Path(path).parent)


def named_data_files(model: onnx.ModelProto, folder: Path) -> list[Path]:
    """The external-data files the tensors of `model` (read without its data) name, resolved from `folder`."""
    files = set()
    for t in iter_tensors(model):
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if t.data_location == onnx.TensorProto.EXTERNAL and loc and "\x00" not in loc:
            files.add((folder / loc).resolve())
    return sorted(files)


def _check_external_data(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Reject external-data references that leave the model's folder; return the files used."""
    base = path.parent.resolve()
    files: set[Path] = set()
    for t in iter_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if "\x00" in loc:
            raise TqsError(f"{path}: {_label(t)} has an unusable external data location {loc!r}")
        if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ".." in Path(loc).parts:
            raise TqsError(f"{path}: {_label(t)} has external data outside the model folder ('{loc}')")
        target = (base / loc).resolve()
        if base not in target.parents:
            raise TqsError(f"{path}: {_label(t)} external data '{loc}' resolves outside the model folder")
        if not target.is_file():
            what = "is not a regular file" if target.exists() else "is missing"
            raise TqsError(f"{path}: external data file '{loc}' for {_label(t)} {what}")
        try:
            offset = int(info.get("offset") or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            offset, length = -1, None
        if offset < 0 or (length is not None and length < 0):
            raise TqsError(f"{path}: {_label(t)} external data offset and length must be non-negative "
                           f"integers (offset {info.get('offset')!r}, length {info.get('length')!r})")
        size = target.stat().st_size
        if offset + (length or 0) > size:
            raise TqsError(f"{path}: external data file '{loc}' is truncated ({_label(t)})")
        # Before anything reads it: the bytes must be what the dims promise (with no length the data runs
        # to the end of the file: a 1 KiB weight pointed at a 3 GiB file took 6.4 GB before a check)
        need, have = _data_bytes(t, path), length if length is not None else size - offset
        if have != need:
            raise TqsError(f"{path}: {_label(t)} has {have:,} bytes of external data in '{loc}' but its dims "
                           f"{list(t.dims)} need {need:,} bytes")
        files.add(target)
    return sorted(files)


_PACKED_BITS = {getattr(onnx.TensorProto, n): b for n, b in
                (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)) if hasattr(onnx.TensorProto, n)}
# Types whose typed field (float_data, int64_data, ...) holds exactly one entry per element.
_ONE_PER_ELEMENT = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                    onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.STRING}


def _data_bytes(t: onnx.TensorProto, path: Path) -> int:
    """The bytes of raw data `t`'s dims and type promise."""
    if any(d < 0 for d in t.dims):
        raise TqsError(f"{path}: {_label(t)} has negative dims {list(t.dims)}")
    n = math.prod(t.dims)
    bits = _PACKED_BITS.get(t.data_type)
    try:
        return math.ceil(n * bits / 8) if bits else n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        raise TqsError(f"{path}: {_label(t)} has unknown data type {t.data_type}") from None


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Every tensor holds exactly the data its dims promise (before anything converts it to numpy)."""
    for t in iter_tensors(model):
        if any(d < 0 for d in t.dims):
            raise TqsError(f"{path}: {_label(t)} has negative dims {list(t.dims)}")
        if t.HasField("segment") or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        n = math.prod(t.dims)
        if t.raw_data:
            need = _data_bytes(t, path)
            if len(t.raw_data) != need:
                raise TqsError(f"{path}: {_label(t)} holds {len(t.raw_data):,} bytes but its dims "
                               f"{list(t.dims)} need {need:,} bytes (truncated or corrupt)")
            continue
        try:
            field = onnx.helper.tensor_dtype_to_field(t.data_type)
        except Exception:
            continue
        held = len(getattr(t, field))
        if (t.data_type in _ONE_PER_ELEMENT and held != n) or (n and not held):
            raise TqsError(f"{path}: {_label(t)} holds {held:,} values but its dims {list(t.dims)} "
                           f"need {n:,} (truncated or corrupt)")


def _check_unique_initializers(model: onnx.ModelProto, path: Path) -> None:
    """Two main-graph initializers of one name: which one a consumer reads is undefined."""
    seen: set[str] = set()
    for init in model.graph.initializer:
        if init.name in seen:
            raise TqsError(f"{path}: two initializers are named '{init.name}' (the model is invalid ONNX)")
        seen.add(init.name)


def _check_names(model: onnx.ModelProto, path: Path) -> None:
    """No name with a control character (an escape sequence, a newline), which every report prints: a
    weight named '...\n::error::...' wrote a command line into a CI log. And one writer per value in
    each graph (two nodes writing 'y' made the duplicate pass fail with a traceback)."""
    for g in iter_graphs(model.graph):
        names = [g.name, *(v.name for v in (*g.input, *g.output, *g.value_info)), *(t.name for t in g.initializer)]
        written: set[str] = set()
        for n in g.node:
            names += [n.name, *n.input, *n.output]
            for o in n.output:
                if o and o in written:
                    raise TqsError(f"{path}: two nodes write the value '{_shown(o)}' in graph '{_shown(g.name)}' "
                                   "(the model is invalid ONNX)")
                written.add(o)
        for name in names:
            if CONTROL_CHARS.search(name):
                raise TqsError(f"{path}: the name {_shown(name)} holds control characters (escapes, line breaks); "
                               "rename it")


def _check_defined(graph: onnx.GraphProto, path: Path, outer: frozenset[str] = frozenset()) -> None:
    """Every value a node reads is defined: by its graph (an input, an initializer, a node's output) or
    an enclosing one (a node reading 'nowhere' went on with onnx-ir's warning and failed later)."""
    known = outer | {i.name for i in graph.input} | {t.name for t in graph.initializer} \
        | {t.values.name for t in graph.sparse_initializer} | {o for n in graph.node for o in n.output if o}
    for n in graph.node:
        for i in n.input:
            if i and i not in known:
                raise TqsError(f"{path}: node '{_shown(n.name or n.op_type)}' reads '{_shown(i)}', which nothing in "
                               f"graph '{_shown(graph.name)}' defines (the model is invalid ONNX)")
        for _, sub in node_subgraphs(n):
            _check_defined(sub, path, frozenset(known))


def _shown(name: str) -> str:
    """A name as printed in an error: control characters escaped."""
    return repr(name) if CONTROL_CHARS.search(name) else name


def _check_acyclic(model: onnx.ModelProto, path: Path) -> None:
    """Exports must be DAGs: a cycle would hang or crash every later stage."""
    for g in iter_graphs(model.graph):
        dg, names = data_graph(g)
        if not nx.is_directed_acyclic_graph(dg):
            cycle = [names[u] for u, _ in nx.find_cycle(dg)]
            raise TqsError(f"{path}: graph '{g.name}' has a cycle through nodes {' -> '.join(cycle[:6])}"
                           f"{' ...' if len(cycle) > 6 else ''}")


def tensor_chunks(t: onnx.TensorProto, step: int = 1 << 22):
    """A tensor's values, flat, in chunks of `step` (raw data is viewed, not copied: a Pangu table is
    170 MB)."""
    if t.raw_data:
        a = np.frombuffer(t.raw_data, onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    else:
        a = numpy_helper.to_array(t).reshape(-1)
    for i in range(0, a.size, step):
        yield a[i:i + step]


def tensor_is_finite(t: onnx.TensorProto) -> bool:
    """No NaN or inf in a float tensor (checked in chunks, without copying raw data)."""
    return t.data_type not in FLOAT_TYPES or all(np.isfinite(c).all() for c in tensor_chunks(t))


@dataclass
class LoadedModel:
    """A model read from disk with its external data, plus where it came from."""

    path: Path
    model: onnx.ModelProto
    file_bytes: int  # the .onnx file plus its external-data files
    sha256: str  # model_digest: the file and its external data
    data_files: list[Path] = field(default_factory=list)  # its external-data files (resolved)
    file_sha256: str = ""  # the .onnx file's own digest (what identified a model before IDENTITY)

    @property
    def files(self) -> list[Path]:
        """The model file and its data files: what no output may replace."""
        return [self.path.resolve(), *self.data_files]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


IDENTITY = "file+data"  # what a document's model sha256 covers (recorded beside it since this scheme)


def model_digest(path: Path, data_files: list[Path], own: str | None = None) -> str:
    """A model's identity: the sha256 of its file, or, where it keeps weights in external-data files,
    of the file's digest followed by each data file's name (relative to the model's folder) and digest,
    so that changed weights make another model. `own`: the file's digest, if already computed."""
    own = own or file_digest(path)
    if not data_files:
        return own
    h = hashlib.sha256(own.encode())
    folder = path.parent.resolve()  # as _check_external_data resolves the data files
    for f in sorted(data_files):
        h.update(f"\0{f.relative_to(folder).as_posix()}\0{file_digest(f)}".encode())
    return h.hexdigest()


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read an ONNX file as untrusted input; any problem becomes a one-line TqsError."""
    path = Path(path)
    if path.is_dir():
        raise TqsError(f"{path}: is a folder, not an ONNX file")
    if not path.is_file():
        raise TqsError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise TqsError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        if "MaxDepth" in str(exc) or "recursion" in str(exc).lower():
            raise TqsError(f"{path}: nested more deeply than protobuf reads (subgraphs inside subgraphs, about "
                           "100 levels); flatten the model's If/Loop nesting") from None
        raise TqsError(f"{path}: not a readable ONNX model, truncated or not ONNX ({type(exc).__name__})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise TqsError(f"{path}: not an ONNX model (no graph)")
    data_files = _check_external_data(model, path)
    if data_files:
        try:
            # Every tensor iter_tensors checked, sparse ones too (onnx's own loader skips those, and
            # ORT would read them relative to its working folder); loaded, a tensor is an inline one.
            for t in iter_tensors(model):
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    external_data_helper.load_external_data_for_tensor(t, str(path.parent))
                    t.ClearField("data_location")
                    t.ClearField("external_data")
        except Exception as exc:
            raise TqsError(f"{path}: cannot read external data ({exc})") from None
    _check_tensor_sizes(model, path)
    _check_unique_initializers(model, path)
    _check_names(model, path)
    _check_defined(model.graph, path)
    _check_acyclic(model, path)
    total = path.stat().st_size + sum(f.stat().st_size for f in data_files)
    own = file_digest(path)
    return LoadedModel(path, model, total, model_digest(path, data_files, own), data_files, own)


def same_model(recorded: dict[str, Any], loaded: LoadedModel) -> bool:
    """Was the document's `model` entry (scores, plan, frontier) made for `loaded`? A document written
    before the identity covered external data (no `identity` field) names the .onnx file's own digest."""
    sha = recorded.get("sha256")
    if sha == loaded.sha256:
        return True
    return bool(loaded.data_files) and "identity" not in recorded and sha == loaded.file_sha256


def main_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def deprecated_ops(model: onnx.ModelProto) -> list[str]:
    """ONNX ops of the model (any graph) whose schema at the model's opset onnx marks deprecated, as
    'Op-version' (GroupNormalization-18): onnx.checker refuses them, so no model written from this one
    passes it, and onnx's version converter may break them (GroupNormalization 18 -> 21 wrote a graph ORT
    does not load)."""
    opset = main_opset(model)
    found = set()
    for g in iter_graphs(model.graph):
        for node in g.node:
            if node.domain not in ("", "ai.onnx") or not opset:
                continue
            try:
                schema = onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                continue  # an unknown op: ORT's load says so
            if schema.deprecated:
                found.add(f"{node.op_type}-{schema.since_version}")
    return sorted(found)


def check_not_deprecated(model: onnx.ModelProto, where: str) -> None:
    """Refuse, before any work, a model no written copy of which can pass onnx.checker."""
    found = deprecated_ops(model)
    if found:
        raise TqsError(f"{where}: the model uses {', '.join(found)}, which onnx deprecates: onnx.checker refuses "
                       "it, so no model written from this one would pass, and onnx's opset converter does not "
                       "convert it faithfully; re-export it at an opset where the op is current (e.g. "
                       "GroupNormalization-21 at opset 21)")


# ---------------------------------------------------------------------------------------- weights

@dataclass
class Weight:
    """One float tensor of the main graph that may be quantized."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bits: int  # storage bits per element in the original file
    origin: str  # 'initializer', 'constant', 'subgraph'
    consumers: list[str] = field(default_factory=list)  # effective consumer node names
    consumer_ops: list[str] = field(default_factory=list)
    # Read only as the B input of one main-graph MatMul/Gemm node, as stored, in a form ORT fuses
    # (_OrtFusion): its DequantizeLinear becomes MatMulNBits (tiers.written_form).
    fused_dq: bool = False
    # Read by a main-graph Gather through constant indices (a factored lookup table): decoded at load,
    # ORT's constant folding would run the Gather too and store the expanded table, at FP32 size.
    const_lookup: bool = False
    quantizable: bool = True
    reason: str = ""
    channel_axis: int | None = None
    block_axis: int | None = None
    scope: str = ""
    order: int = 0  # position of the first effective consumer in topological order

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.bits // 8


def _node_names(graph: onnx.GraphProto) -> list[str]:
    """Stable unique names for the main graph's nodes (exports often leave names empty)."""
    seen: Counter[str] = Counter()
    names = []
    for i, node in enumerate(graph.node):
        base = node.name or f"{node.op_type}_{i}"
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def subgraph_refs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    refs: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in iter_graphs(g):
                for n in sub.node:
                    refs.update(i for i in n.input if i)
    return refs


def data_graph(graph: onnx.GraphProto) -> tuple[nx.DiGraph, list[str]]:
    """networkx view: node i -> node j when j reads an output of i (subgraph reads included)."""
    names = _node_names(graph)
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for o in node.output:
            if o:
                producer[o] = i
    g = nx.DiGraph()
    for i, node in enumerate(graph.node):
        g.add_node(i, op=node.op_type, name=names[i])
        for inp in set(node.input) | subgraph_refs(node):
            if inp in producer and producer[inp] != i:
                g.add_edge(producer[inp], i)
    return g, names


@dataclass
class Use:
    """A compute op that uses a weight, possibly inside an If/Loop/Scan body."""

    node: onnx.NodeProto
    slot: int
    name: str  # e.g. 'If_3/then_branch/Conv_5' for a node inside a subgraph
    order: int  # topological position of the main-graph node it belongs to
    direct: bool  # reads the stored tensor itself, not a reshaped or sliced view
    main: bool = True  # a node of the main graph, not of an If/Loop/Scan body
    # Through Transposes (and ops that pass the tensor unchanged) only: the stored axis of each axis of
    # the tensor this node reads; None through any other reshaping op (or when direct).
    perm: tuple[int, ...] | None = None
    scope: str = ""  # the prefix of `name` naming the graph the node is in ('' for the main graph)


def node_subgraphs(node: onnx.NodeProto):
    """(label, body) of each graph a node holds: If's branches, Loop's and Scan's bodies."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for k, g in enumerate(attr.graphs):
                yield f"{attr.name}{k}", g


def _uses_in(graph: onnx.GraphProto, value: str, prefix: str, order: int | None,
             names: list[str] | None = None, topo: dict | None = None,
             main: bool = True) -> list[tuple[onnx.GraphProto, Use]]:
    """Every node of `graph` (and of its subgraphs, recursively) that reads `value`. Nodes are labelled
    as `_node_names` names them (unique in their graph: two body nodes of one name are two scopes)."""
    out = []
    names = names or _node_names(graph)
    for j, node in enumerate(graph.node):
        label = names[j]
        where = order if order is not None else (topo or {}).get(j, 0)
        for slot, inp in enumerate(node.input):
            if inp == value:
                out.append((graph, Use(node, slot, f"{prefix}{label}", where, True, main, scope=prefix)))
        for attr_name, sub in node_subgraphs(node):
            out += _uses_in(sub, value, f"{prefix}{label}/{attr_name}/", where, main=False)
    return out


def _effective_consumers(name: str, graph: onnx.GraphProto, names: list[str], topo: dict,
                         ndim: int = 0, constants: dict[str, set[str]] | None = None) -> list[Use]:
    """Follow data-movement ops, into subgraph bodies too, from a weight (of `ndim` axes) to the ops that
    compute with it. A Gather whose indices are not constant in its graph (`constants`: scope ->
    names, `scope_constants`) reads other rows on every call, an embedding: it is where the weight is
    used."""
    found, seen, held = [], set(), []
    stored = {i.name for i in graph.initializer}
    stack = [(g, u) for g, u in _uses_in(graph, name, "", None, names, topo)]
    for _, u in stack:
        u.perm = tuple(range(ndim))
    while stack:
        g, use = stack.pop()
        key = (id(use.node), use.slot)
        if key in seen:
            continue
        seen.add(key)
        held.append(use.node)  # protobuf wraps subgraph nodes anew: a dropped wrapper's id would be reused
        # A main-graph Concat of initializers only is one weight stored in pieces (a bidirectional RNN's W
        # per direction, passes/split_directions.py): every piece is followed, with its axes, which a
        # Concat keeps. A Concat with computed inputs is followed from its first input only, without axes
        # (following the others would join the Pangu replica's const_h to its patch embedding's block).
        pieces = use.node.op_type == "Concat" and g is graph and all(i in stored for i in use.node.input)
        if use.node.op_type in DATA_MOVEMENT and (use.slot == 0 or pieces) and use.node.output \
                and not _data_lookup(use, constants) and not _exact_use(use):
            is_main = g is graph
            perm = use.perm if pieces else _view_perm(use.node, use.perm, g)
            for o in use.node.output:
                if o:
                    for g2, u2 in _uses_in(g, o, use.scope, use.order if not is_main else None,
                                           names if is_main else None, topo if is_main else None, use.main):
                        u2.direct = use.direct and _same_tensor(use.node)
                        u2.perm = perm
                        stack.append((g2, u2))
        else:
            found.append(use)
    return found


def _exact_use(use: Use) -> str:
    """Why a use needs the stored values exactly ('' where it does not): a Cast to an integer or bool
    type reads indices or counts stored as floats (a graph's edge index: at int8, 153 of 200 edges
    pointed at other nodes), and a (De)QuantizeLinear's scale or zero point belongs to the integers a
    vendor already quantized (an INT4 weight's blocked scales were re-quantized to int8)."""
    node = use.node
    if node.op_type == "Cast" and cast_to(node) in _INTEGER_TYPES:
        return f"cast to {onnx.TensorProto.DataType.Name(cast_to(node)).lower()} (indices or counts): kept exact"
    if (node.op_type in ("DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear") or node.op_type.startswith("QLinear")
            or node.op_type in _QUANTIZED_CONTRIB and node.domain == "com.microsoft" and use.slot >= 2) and use.slot >= 1:
        return f"scale, zero point or bias of a {node.op_type} (already quantized): kept as stored"
    return ""


_INTEGER_TYPES = {getattr(onnx.TensorProto, t) for t in ("INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64",
                                                         "UINT64", "BOOL", "INT4", "UINT4", "INT2", "UINT2")
                  if hasattr(onnx.TensorProto, t)}
# ORT's contrib ops holding weights a vendor quantized (their scales, zero points from input 2 on)
_QUANTIZED_CONTRIB = {"MatMulNBits", "GatherBlockQuantized", "MatMulBnb4", "MatMulFpQ4"}


def _data_lookup(use: Use, constants: dict[str, set[str]] | None) -> bool:
    """A Gather whose indices are computed (an embedding): each call reads other rows of the table."""
    node = use.node
    return constants is not None and node.op_type == "Gather" and len(node.input) > 1 \
        and node.input[1] not in constants.get(use.scope, ())


# Ops whose output is not a function of their inputs: never constant.
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def scope_constants(graph: onnx.GraphProto) -> dict[str, set[str]]:
    """For each graph (keyed by the scope prefix `_uses_in` gives its nodes: '' for the main graph,
    'If_3/then_branch/' for a body), the Gather indices that hold constants there: initializers that
    are no graph input, Constant outputs, and outputs of ops computed from constants alone (a Cast or
    Unsqueeze of constant indices); outer constants too unless the graph rebinds the name. Only names
    some Gather reads as indices are kept (a set per scope of every constant would grow as scopes x
    constants)."""
    out: dict[str, set[str]] = {}
    wanted = {n.input[1] for g in iter_graphs(graph) for n in g.node if n.op_type == "Gather" and len(n.input) > 1}

    def visit(g: onnx.GraphProto, prefix: str, outer: set[str]) -> None:
        inputs = {i.name for i in g.input}
        known = (outer - inputs) | ({i.name for i in g.initializer} - inputs)
        for node in g.node:  # in topological order, as ONNX requires
            if node.domain in ("", "ai.onnx") and node.op_type not in _RANDOM_OPS \
                    and not any(node_subgraphs(node)) and all(i in known for i in node.input if i):
                known.update(o for o in node.output if o)
            else:
                known.difference_update(node.output)  # a computed value rebinding an outer constant's name
        out[prefix] = known & wanted
        for label, node in zip(_node_names(g), g.node):
            for attr_name, sub in node_subgraphs(node):
                visit(sub, f"{prefix}{label}/{attr_name}/", known)

    visit(graph, "", set())
    return out


def _view_perm(node: onnx.NodeProto, perm: tuple[int, ...] | None,
               graph: onnx.GraphProto | None = None) -> tuple[int, ...] | None:
    """The stored axis of each axis of `node`'s output, given those of its input (`perm`): through a
    Transpose the axes move, through an op that passes the tensor unchanged they stay, and through a
    Gather of constant 1-D indices (rows picked, in any order) too: a gathered row is a table row (an
    embedding read by constant node ids got a scale per feature, and small nodes' rows rounded to
    zero). Through any other data-movement op (Reshape, Slice, Concat, ...) they are not followed
    (None; but see `_effective_consumers` for a Concat of initializers)."""
    if perm is None:
        return None
    if node.op_type == "Gather" and graph is not None and len(node.input) > 1:
        return perm if _constant_rank(graph, node.input[1]) == 1 else None
    if node.op_type == "Transpose":
        order = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        order = order or list(range(len(perm)))[::-1]
        if sorted(order) != list(range(len(perm))):
            return None
        return tuple(perm[i] for i in order)
    return perm if _same_tensor(node) or _float_cast(node) else None


def _constant_rank(graph: onnx.GraphProto, name: str) -> int | None:
    """The rank of `name` where `graph` holds it as an initializer or a Constant node's tensor."""
    for t in graph.initializer:
        if t.name == name:
            return len(t.dims)
    for n in graph.node:
        if n.op_type == "Constant" and n.output and n.output[0] == name:
            value = next((a for a in n.attribute if a.name == "value"), None)
            return len(value.t.dims) if value is not None else (1 if any(a.name == "value_ints" for a in n.attribute) else None)
    return None


def cast_to(node: onnx.NodeProto) -> int:
    """A Cast's target element type (0 for another op)."""
    return next((a.i for a in node.attribute if a.name == "to"), 0) if node.op_type == "Cast" else 0


def _float_cast(node: onnx.NodeProto) -> bool:
    """A Cast to a float type (float16 compute reading a stored weight): its axes are the stored ones."""
    return cast_to(node) in FLOAT_TYPES


def _same_tensor(node: onnx.NodeProto) -> bool:
    """An op whose output is its float input unchanged (Identity, a Cast to float): ORT removes it, and
    a weight read through it is read as stored (ORT fuses its DequantizeLinear as if read directly)."""
    return node.op_type == "Identity" or cast_to(node) == onnx.TensorProto.FLOAT


def _axes_for(op: str, slot: int, node: onnx.NodeProto, ndim: int) -> tuple[int | None, int | None]:
    """(channel axis, block axis) for a weight read by `op` at input `slot`."""
    if ndim <= 1:
        # One scale for a vector: per-element or blocked scales on a bias buy nothing, and ORT's CUDA
        # DequantizeLinear refuses per-axis scales on 1-D tensors (tools/ort_support.py).
        return None, None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op == "MatMul" and slot == 1:
        return ndim - 1, ndim - 2  # (K, N): scale per output column, blocks along K
    if op == "MatMul" and slot == 0:
        return ndim - 2, ndim - 1  # the weight on the left, (M, K): scale per output row
    if op == "Gemm" and slot == 1:
        return (0, 1) if attrs.get("transB", 0) else (1, 0)
    if op == "Gemm" and slot == 0:
        return (1, 0) if attrs.get("transA", 0) else (0, 1)
    if op == "Conv" and slot == 1:
        return 0, 1
    if op == "ConvTranspose" and slot == 1:
        # (C, M/group, k...): per output channel for group 1; grouped (depthwise), axis 1 has M/group
        # entries (1 when depthwise), so the scales go per input channel, which is per output channel there.
        return (0, 1) if attrs.get("group", 1) > 1 else (1, 0)
    if op in ("LSTM", "GRU", "RNN") and slot in (1, 2):
        return 1, 2
    if op == "Gather" and slot == 0:  # an embedding: a scale per gathered row
        axis = attrs.get("axis", 0) % ndim
        return axis, ndim - 1 if axis != ndim - 1 else ndim - 2
    if op == "Einsum":
        eq = attrs.get("equation", b"")
        axes = _einsum_axes(eq.decode(errors="replace") if isinstance(eq, bytes) else str(eq), slot, ndim)
        if axes:
            return axes
    return ndim - 1, 0


def _einsum_axes(equation: str, slot: int, ndim: int) -> tuple[int, int] | None:
    """An Einsum operand's output-channel axis (its last letter kept in the output that no other operand
    has) and block axis (its last letter summed over); None where the equation does not say (an
    ellipsis, a repeated letter, no such letter)."""
    equation = equation.replace(" ", "")
    lhs, _, out = equation.partition("->")
    terms = lhs.split(",")
    if slot >= len(terms) or "." in terms[slot] or len(terms[slot]) != ndim or len(set(terms[slot])) != ndim:
        return None
    term = terms[slot]
    others = set("".join(t for k, t in enumerate(terms) if k != slot))
    if "->" not in equation:  # implicit output: the letters written once, in alphabetical order
        counts = Counter(lhs.replace(",", ""))
        out = "".join(sorted(c for c, k in counts.items() if k == 1 and c != "."))
    channel = [k for k, c in enumerate(term) if c in out and c not in others]
    summed = [k for k, c in enumerate(term) if c not in out]
    if not channel:
        return None
    block = summed[-1] if summed else next((k for k in reversed(range(ndim)) if k != channel[-1]), None)
    return channel[-1], block


def scope_of(node_name: str, weight_name: str, depth: int = 0) -> str:
    """Exporter name scope: '/b1/layers.0/MatMul' -> '/b1/layers.0'; 'b1.fc.weight' -> 'b1.fc'."""
    if "/" in node_name.strip("/"):
        parts = node_name.strip("/").split("/")[:-1]
    elif "." in weight_name and not weight_name.startswith("onnx::"):
        parts = weight_name.split(".")[:-1]
    else:
        return ""
    return "/".join(parts[:depth] if depth else parts)


def weight_table(model: onnx.ModelProto, min_size: int = DEFAULT_MIN_SIZE,
                 origins: dict[str, str] | None = None, check_finite: bool = True) -> list[Weight]:
    """Every float initializer of the main graph, its consumers, axes and whether it is quantizable.

    Without `check_finite` the values are never read (the model may hold stubs: passes/detach.py),
    and a weight holding NaN/inf may be marked quantizable.
    """
    graph = model.graph
    dg, names = data_graph(graph)
    topo = {n: k for k, n in enumerate(nx.topological_sort(dg))}
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    constants = {i.name for i in graph.initializer} - inputs
    lookups = _expanding_lookups(graph, constants)
    bound = scope_constants(graph)
    fusion = _OrtFusion(model)  # shapes inferred only if a weight asks
    weights = []
    for init in graph.initializer:
        if init.data_type not in FLOAT_TYPES:
            continue
        shape = tuple(int(d) for d in init.dims)
        w = Weight(init.name, shape, onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name,
                   FLOAT_TYPES[init.data_type], (origins or {}).get(init.name, "initializer"))
        eff = _effective_consumers(init.name, graph, names, topo, len(shape), bound)
        w.consumers = [u.name for u in eff]
        w.consumer_ops = [u.node.op_type for u in eff]
        # One consumer only: ORT (1.31) fuses none of the DequantizeLinear copies it makes for a weight
        # that several MatMuls read (a tied weight, or one stored once by passes/dedup.py).
        # A float16 weight must be read as stored: its DequantizeLinear returns float16, and a Cast to
        # float after it (float32 compute of a float16 export) stays, unfused, run on every call.
        w.fused_dq = len(eff) == 1 and len(shape) == 2 and all(
            u.direct and u.main and u.slot == 1 and u.node.op_type in FUSED_CONSUMERS for u in eff) and (
            init.data_type != onnx.TensorProto.FLOAT16 or all(u.node.input[u.slot] == init.name for u in eff))
        w.const_lookup = init.name in lookups
        if w.fused_dq and fusion.leaves_dq(eff[0].node, init.name):
            w.fused_dq = False
        if eff:
            first = min(eff, key=lambda u: u.order)
            w.order = first.order
            # Reached through reshaping ops, the consumer's axes do not describe the stored layout; through
            # Transposes they do, moved by the permutation.
            if first.direct or first.perm is not None:
                axes = _axes_for(first.node.op_type, first.slot, first.node, len(shape))
                perm = first.perm or tuple(range(len(shape)))
                w.channel_axis, w.block_axis = (None if a is None else perm[a] for a in axes)
            else:
                w.channel_axis, w.block_axis = _axes_for("", 0, first.node, len(shape))
            w.scope = scope_of(first.node.name, init.name)
        vector = _is_vector(shape, *((first.node.op_type, first.slot) if eff else ("", 0)))
        w.quantizable, w.reason = _quantizable(w, min_size, inputs, outputs, model, init if check_finite else None,
                                               vector, next((r for r in map(_exact_use, eff) if r), ""))
        weights.append(w)
    weights.sort(key=lambda w: (w.order, w.name))
    return weights


def _expanding_lookups(graph: onnx.GraphProto, constants: set[str]) -> set[str]:
    """Tables a main-graph Gather reads through constant indices into an output larger than the table
    (a factored lookup): decoded at load, ORT would fold them into that output. A Gather of a few rows
    folds into something smaller and is no lookup here."""
    dims = {i.name: list(i.dims) for i in graph.initializer}
    found = set()
    for n in graph.node:
        if n.op_type != "Gather" or len(n.input) < 2 or n.input[1] not in constants or n.input[0] not in dims:
            continue
        table = dims[n.input[0]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if table and math.prod(dims[n.input[1]]) > table[axis % len(table)]:
            found.add(n.input[0])
    return found


def infer_value_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                       ) -> dict[str, list[int | str | None]]:
    """Dims (value, symbol or None) of every value onnx's shape inference can name, inferred on a copy
    of `model` without its weights' data (`input_shapes`: graph inputs fixed to these shapes first);
    {} where inference fails."""
    from tqs_onnx.passes.detach import detach  # passes build on this module

    try:
        skeleton = detach(model).skeleton
        for inp in skeleton.graph.input:
            shape = (input_shapes or {}).get(inp.name)
            if shape is not None and inp.type.HasField("tensor_type"):
                inp.type.tensor_type.ClearField("shape")
                for d in shape:
                    inp.type.tensor_type.shape.dim.add().dim_value = int(d)
        # data_prop: shapes computed from Shape/Slice/Concat chains, as ORT's own inference knows them.
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:  # noqa: BLE001 - an exotic graph onnx cannot infer: no shapes, as in ORT
        return {}
    g = inferred.graph
    shapes = {t.name: list(t.dims) for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in tt.shape.dim]
    return shapes


def _same_dim(a: int | str | None, b: int | str | None) -> bool:
    return a is not None and a == b


class _OrtFusion:
    """Whether ONNX Runtime (CPU) leaves DequantizeLinear on a MatMul/Gemm's B unfused (measured with
    1.31; tools/check_fusion_prediction.py). The graph's readers are indexed once per weight table.

    ORT fuses DequantizeLinear -> Gemm into MatMulNBits only for alpha = 1, transA = 0 (transB = 1 the
    writer turns into 0, for a weight the Gemm reads itself) and, where C is given, beta = 1 and C an (N)
    vector. Its MatMulAddFusion first turns a MatMul whose one consumer is an Add (after an Identity,
    Dropout or Cast to float, which it removes) into such a Gemm when A is 2-D and the Add's other
    operand fits Gemm's C ((N), (1, N), (M, 1) or (M, N)): a residual Add of a 2-D MLP is the usual
    case. Of two such MatMuls summed by one Add (x W + h V), the later one in the graph becomes the Gemm.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.readers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in graph.node:
            for k, name in enumerate(node.input):
                self.readers[name].append((node, k))
        self.read_in_bodies = set().union(*(subgraph_refs(n) for n in graph.node))
        self.outputs = {o.name for o in graph.output}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.position = {id(n): k for k, n in enumerate(graph.node)}
        self._model = model

    @functools.cached_property
    def _inferred(self) -> dict[str, list[int | str | None]]:
        return infer_value_shapes(self._model)  # on first use: most models never ask

    def shapes(self, name: str) -> list[int | str | None] | None:
        """Dims (value, symbol or None) of `name`, or None where its rank is unknown."""
        return self._inferred.get(name)

    def leaves_dq(self, node: onnx.NodeProto, weight: str) -> bool:
        if node.input[1] != weight and node.input[1] in self.outputs:
            return True  # the Identity/Cast it is read through is a graph output: ORT keeps it
        b = self.shapes(node.input[1])
        n = b[-1] if b else None
        if node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("transA", 0):
                return True
            if attrs.get("transB", 0) and node.input[1] != weight:
                return True  # read through an Identity or Cast: the writer cannot store it transposed
            if attrs.get("transB", 0) and b:
                n = b[0]
            if len(node.input) < 3 or not node.input[2]:
                return self._gemm_activation(node.output[0])
            c = self.shapes(node.input[2])
            return attrs.get("beta", 1.0) != 1.0 or not (c is not None and len(c) == 1 and _same_dim(c[0], n)) \
                or self._gemm_activation(node.output[0])
        a = self.shapes(node.input[0])
        add = self._gemm_partner(node, n)
        if add is None:
            # A MatMul read by a Relu or Clip (any rank), or made a Gemm with a vector C (A 2-D) first
            vector = self._vector_add(node, n) if a is not None and len(a) == 2 else None
            return self._gemm_activation(vector.output[0] if vector is not None else self._through(node.output[0]))
        other = self._source(add[0].input[1 - add[1]])
        twin = self.producer.get(other)
        if twin is not None and twin is not node and twin.op_type == "MatMul" and \
                self._gemm_partner(twin, (self.shapes(twin.input[1]) or [None])[-1]) is not None:
            return self.position[id(node)] > self.position[id(twin)]
        return True

    def _sole_add(self, node: onnx.NodeProto) -> tuple[onnx.NodeProto, int, list[int | str | None] | None] | None:
        """The Add that alone reads `node`'s product (past the ops ORT removes), the slot it reads it at
        and the dims of its other operand: what MatMulAddFusion may fuse with it into a Gemm; or None."""
        value = self._through(node.output[0])
        readers = self.readers.get(value, [])
        if len(readers) != 1 or readers[0][0].op_type != "Add" or value in self.outputs or value in self.read_in_bodies:
            return None
        add, slot = readers[0]
        return add, slot, self.shapes(add.input[1 - slot])

    def _gemm_partner(self, node: onnx.NodeProto, n: int | str | None) -> tuple[onnx.NodeProto, int] | None:
        """The Add (and the slot it reads the product at) that MatMulAddFusion would fuse `node` with
        into a Gemm whose C is a matrix, or None."""
        sole = self._sole_add(node)
        if sole is None:
            return None
        add, slot, c = sole
        a = self.shapes(node.input[0])
        if a is None or c is None or len(a) != 2 or len(c) != 2:
            return None  # no Gemm, or a Gemm with an (N) vector C (`_vector_add`)
        fits = (c[0] == 1 and _same_dim(c[1], n)) or (_same_dim(c[0], a[0]) and (c[1] == 1 or _same_dim(c[1], n)))
        return (add, slot) if fits else None

    def _vector_add(self, node: onnx.NodeProto, n: int | str | None) -> onnx.NodeProto | None:
        """The Add of an (N) vector that MatMulAddFusion would fuse `node` (A 2-D) with into a Gemm
        whose C is that vector, or None."""
        sole = self._sole_add(node)
        c = sole[2] if sole is not None else None
        return sole[0] if c is not None and len(c) == 1 and _same_dim(c[0], n) else None

    def _gemm_activation(self, value: str) -> bool:
        """Whether a Gemm's (or a MatMul's) output `value` goes to a Relu ORT fuses it with (FusedGemm),
        or a Clip, before fusing its DequantizeLinear: then never fused (onnxruntime 1.31, CPU;
        only where the activation is the product's one reader and has one reader itself, no graph
        output; tools/check_fusion_prediction.py). Tanh, Sigmoid, LeakyRelu and the rest leave it fused."""
        readers = self.readers.get(value, [])
        if len(readers) != 1 or value in self.outputs or value in self.read_in_bodies:
            return False
        act = readers[0][0]
        if act.op_type not in ("Relu", "Clip") or not act.output or act.output[0] in self.outputs \
                or act.output[0] in self.read_in_bodies:
            return False
        return len(self.readers.get(act.output[0], [])) == 1

    def _through(self, value: str) -> str:
        """`value` followed forwards, along single readers, through the ops ORT removes (Identity,
        Dropout, Cast to float)."""
        while True:
            readers = self.readers.get(value, [])
            if len(readers) != 1 or value in self.outputs or value in self.read_in_bodies:
                return value
            node = readers[0][0]
            if not _removed_by_ort(node) or any(o and self.readers.get(o) for o in node.output[1:]):
                return value
            value = node.output[0]

    def _source(self, value: str) -> str:
        """`value` followed backwards to what the ops ORT removes were given."""
        node = self.producer.get(value)
        while node is not None and _removed_by_ort(node):
            value = node.input[0]
            node = self.producer.get(value)
        return value


def _removed_by_ort(node: onnx.NodeProto) -> bool:
    return _same_tensor(node) or node.op_type == "Dropout"


# Inputs that hold an op's weight matrix or kernel (any operand of an Einsum): a tensor read there is a
# matrix even with one non-unit axis (a univariate LSTM's W (1, 4H, 1), a (K, 1) MatMul weight).
_WEIGHT_SLOTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "ConvTranspose": (1,), "Gather": (0,),
                 "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}


def _is_vector(shape: tuple[int, ...], op: str, slot: int) -> bool:
    """A bias or scale, kept at full precision: 1-D, an RNN's bias or peepholes (directions, n), or a
    tensor of one non-unit axis ((1, N), (N, 1)) read anywhere but as an op's weight matrix."""
    if len(shape) <= 1 or op in ("LSTM", "GRU", "RNN") and slot in (3, 7):
        return True
    if sum(d != 1 for d in shape) > 1:
        return False
    return not (op == "Einsum" or slot in _WEIGHT_SLOTS.get(op, ()))


def _quantizable(w: Weight, min_size: int, inputs: set[str], outputs: set[str],
                 model: onnx.ModelProto, init: onnx.TensorProto | None, vector: bool,
                 exact: str = "") -> tuple[bool, str]:
    if w.size == 0:
        return False, "empty tensor"
    if exact:  # _exact_use
        return False, exact
    if w.size < min_size:
        return False, f"below size floor ({w.size} < {min_size})"
    if vector:  # _is_vector
        # A bias or scale saves little (it is small), and a (1, N) bias would get one scale per element.
        return False, "vector (bias or scale): kept at full precision"
    if w.dtype == "bfloat16":
        return False, "already stored as bfloat16"
    if w.dtype not in ("float32", "float16"):  # the sweep probes float16 ones as float32 (ExposeWeights)
        return False, f"{w.dtype} weight: only float32 and float16 weights are probed and quantized"
    if w.name in outputs:
        return False, "graph output"
    if w.name in inputs and model.ir_version >= 4:
        return False, "also a graph input (overridable)"
    if not w.consumers:
        return False, "unused"
    if init is not None and not tensor_is_finite(init):
        return False, NONFINITE_REASON
    return True, ""


def weight_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


# ---------------------------------------------------------------------------------------- blocks

@dataclass
class Block:
    """A set of weights scored and assigned a tier together."""

    id: int
    name: str
    weights: list[str]
    size: int


_BLOCK_MODES = re.compile(r"^(auto|tensor|layer|scope(:\d+)?|fixed:\d+)$")
# `auto`: layer blocks, or tensor blocks when there is a single layer block: a knapsack over one block
# can only choose uniform (one LSTM op is one layer: W and R, its bias a vector).
AUTO_MIN_BLOCKS = 2


def make_blocks(weights: list[Weight], mode: str = "auto") -> list[Block]:
    """Group quantizable weights into blocks: auto | tensor | layer | scope[:depth] | fixed:K."""
    if not _BLOCK_MODES.match(mode):
        raise TqsError(f"unknown block mode '{mode}' (auto, tensor, layer, scope[:DEPTH], fixed:K)")
    qw = [w for w in weights if w.quantizable]
    depth = int(mode.split(":")[1]) if mode.startswith("scope:") else 0
    if mode == "tensor":
        groups = [[w] for w in qw]
    elif mode in ("layer", "auto"):
        groups = _layer_groups(qw)
        if mode == "auto" and len(groups) < AUTO_MIN_BLOCKS and len(qw) > len(groups):
            groups = [[w] for w in qw]
    elif mode.startswith("scope"):
        groups = _keyed_groups(qw, lambda w: _scope_key(w, depth))
    else:
        k = int(mode.split(":")[1])
        if k < 1:
            raise TqsError("fixed:K needs K >= 1")
        groups = [qw[i:i + k] for i in range(0, len(qw), k)]
    groups.sort(key=lambda g: min(w.order for w in g))
    # A scope block is named by its scope ('enc/layer0' at depth 2, not its first weight's name).
    names = [_scope_key(g[0], depth) if mode.startswith("scope") else _block_name(g) for g in groups]
    counts = Counter(names)
    # Blocks sharing a scope (LSTM W/R/B scored tensor by tensor) are told apart by their first weight.
    names = [n if counts[n] == 1 else f"{n}:{min(g, key=lambda w: w.order).name}" for n, g in zip(names, groups)]
    return [Block(i, n, [w.name for w in g], sum(w.size for w in g)) for i, (n, g) in enumerate(zip(names, groups))]


def _scope_key(w: Weight, depth: int) -> str:
    if not w.scope:
        return w.name
    return "/".join(w.scope.split("/")[:depth]) if depth else w.scope


def _layer_groups(qw: list[Weight]) -> list[list[Weight]]:
    """Weights sharing an effective consumer form one layer (a MatMul and its bias Add, LSTM W/R/B)."""
    g = nx.Graph()
    by_consumer: dict[str, list[str]] = defaultdict(list)
    for w in qw:
        g.add_node(w.name)
        for c in w.consumers:
            by_consumer[c].append(w.name)
    for members in by_consumer.values():
        nx.add_path(g, members)
    index = {w.name: w for w in qw}
    # A component is a set: order its weights as the graph does, or the order (and with it each
    # tensor's Gaussian draw) would change with Python's string hashing from one process to the next.
    groups = [sorted((index[n] for n in comp), key=lambda w: (w.order, w.name)) for comp in nx.connected_components(g)]
    return _merge_biases(groups)


def _merge_biases(groups: list[list[Weight]]) -> list[list[Weight]]:
    """A 1-D tensor (bias, norm scale) joins the group whose first consumer comes just before it."""
    big = [grp for grp in groups if any(len(w.shape) > 1 for w in grp)]
    small = [grp for grp in groups if all(len(w.shape) <= 1 for w in grp)]
    if not big:
        return groups
    for grp in small:
        order = min(w.order for w in grp)
        host = max((b for b in big if min(w.order for w in b) <= order), key=lambda b: min(w.order for w in b),
                   default=None)
        if host is None or order - min(w.order for w in host) > 2:
            big.append(grp)
        else:
            host.extend(grp)
    return big


def _keyed_groups(qw: list[Weight], key) -> list[list[Weight]]:
    out: dict[str, list[Weight]] = defaultdict(list)
    for w in qw:
        out[key(w)].append(w)
    return list(out.values())


def _block_name(group: list[Weight]) -> str:
    scopes = {w.scope for w in group if w.scope}
    if len(scopes) == 1:
        return scopes.pop()
    first = min(group, key=lambda w: w.order)
    return first.name if len(group) == 1 else f"{first.name}+{len(group) - 1}"


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    hist: Counter[str] = Counter()
    for g in iter_graphs(model.graph):
        hist.update(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in g.node)
    return dict(sorted(hist.items(), key=lambda kv: -kv[1]))


def prequantized(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Integer initializers a main-graph DequantizeLinear decodes: weights a vendor already quantized
    (name -> shape). The sweep probes float weights only, so these are kept as they are."""
    ints = {i.name: tuple(int(d) for d in i.dims) for i in model.graph.initializer if i.data_type not in FLOAT_TYPES}
    return {n.input[0]: ints[n.input[0]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input and n.input[0] in ints}
