"""What a model costs to deploy in ONNX Runtime: load time, memory, latency, and what the optimizer
did with the written weights.

A written weight is cheap at run time only when ORT's graph optimizer fuses its decode into the
consumer (DequantizeLinear -> MatMul becomes MatMulNBits on CPU). Otherwise it costs one of two ways:

- *dequantized per call*: a DequantizeLinear (or Cast) left in the optimized graph on constant
  inputs rebuilds the float tensor on every call (time, and a float-sized temporary);
- *expanded at load*: the optimizer constant-folds the decode (every Cast, e.g. bf16 -> fp32), so the
  session holds the float tensor: small on disk, full size in memory.

`deployment_report` measures in a fresh subprocess by default (``python -m tqs_onnx.runtime_report``)
so that resident memory is the model's alone, not what the calling process already holds.

    python -m tqs_onnx.runtime_report MODEL [--device cpu] [--rollout SPEC --contexts DATA.npz]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from tqs_onnx.errors import TqsError
from tqs_onnx.graph import FLOAT_TYPES, infer_value_shapes, named_data_files, subgraph_refs
from tqs_onnx.rollout import Contexts, Rollout, RolloutSpec
from tqs_onnx.runtime import ORT_NUMPY_TYPES, Device, resolve_device, synthetic_feeds
from tqs_onnx.util import first_line

# Contrib ops that compute directly on stored integers: a weight feeding one is not decoded per call.
FUSED_QUANT_OPS = ("MatMulNBits", "GatherBlockQuantized", "QLinearMatMul", "QLinearConv", "QGemm", "QAttention",
                   "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "ConvInteger")
# Ops that rebuild a weight from stored tensors; a Mul or Sub of initializers only is a `/load` decode ORT
# could not fold (a float16 one on the CPU provider, which has no float16 Mul kernel).
DECODE_OPS = ("DequantizeLinear", "Cast", "Mul", "Sub")
ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
MIB = 1024 * 1024



# ------------------------------------------------------------------------------------ process memory

def proc_memory() -> dict[str, int]:
    """Resident (VmRSS), peak resident (VmHWM) and anonymous resident (RssAnon: heap, not code pages)
    bytes of this process; {} where /proc is missing."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    out = {}
    for key in ("VmRSS", "VmHWM", "RssAnon"):
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
        if m:
            out[key] = int(m.group(1)) * 1024
    return out


def trim_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc malloc_trim); False where there is no glibc.

    Folding at load frees its temporaries, but glibc keeps the pages: a /load model's RSS right after
    load was 107 MB against FP32's 75 MB for one 4096x4096 weight, and 72 MB for both once trimmed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is that of the calls alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def gpu_memory_used() -> tuple[int | None, str]:
    """Device memory in use: this process's own (nvidia-smi per process), else the whole GPU's."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "no nvidia-smi"
    try:
        apps = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout
        for line in apps.splitlines():
            pid, _, used = line.partition(",")
            if pid.strip() == str(os.getpid()) and used.strip().isdigit():
                return int(used) * MIB, "nvidia-smi, this process"
        # In a container nvidia-smi lists host pids: fall back to the device-wide figure.
        total = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return (int(total) * MIB if total.isdigit() else None), "nvidia-smi, whole GPU"
    except (OSError, subprocess.SubprocessError):
        return None, "nvidia-smi failed"


# ------------------------------------------------------------------------------------------ sessions

def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort


def open_session(path: str | Path, device: Device, threads: int = 0, accuracy_level: int | None = None,
                 optimized_to: Path | None = None):
    """A session as `runtime.make_session` opens it (ORT_ENABLE_ALL), optionally saving the optimized graph."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if accuracy_level is not None:
        so.add_session_config_entry(ACCURACY_KEY, str(accuracy_level))
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
        # Tensors go to a side file so a model over 2 GB can be written and read back without its data.
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    optimized_to.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        return ort.InferenceSession(str(path), so, providers=device.providers)
    except Exception as exc:
        raise TqsError(f"{path}: ONNX Runtime cannot load the model: {first_line(exc)}") from None


def optimized_graph(path: str | Path, device: Device, threads: int = 0,
                    accuracy_level: int | None = None) -> onnx.ModelProto:
    """The graph ORT runs after its optimizer (initializer data left out: only names, types and shapes)."""
    with tempfile.TemporaryDirectory(prefix="tqs-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        open_session(path, device, threads, accuracy_level, optimized_to=out)
        return onnx.load(str(out), load_external_data=False)


# ------------------------------------------------------------------------------------ graph analysis

def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _all_nodes(sub)


def _all_initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                out.update(_all_initializers(sub))
    return out


def _dtype_bits(data_type: int) -> int:
    packed = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
    for name in ("INT2", "UINT2"):
        if hasattr(onnx.TensorProto, name):
            packed[getattr(onnx.TensorProto, name)] = 2
    if data_type in packed:
        return packed[data_type]
    try:
        return 8 * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return 0  # strings and the like: not weights


def tensor_bytes(dims: list[int] | tuple[int, ...], data_type: int) -> int:
    """Bytes of a tensor as stored (sub-byte types packed)."""
    return math.ceil(math.prod(dims) * _dtype_bits(data_type) / 8)


def _decoded_type(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    """Element type a decode node produces: Cast's `to`, Mul's and Sub's input type, else DequantizeLinear's
    scale type."""
    if node.op_type == "Cast":
        return next(a.i for a in node.attribute if a.name == "to")
    if node.op_type in ("Mul", "Sub"):
        return inits[node.input[0]].data_type
    scale = inits.get(node.input[1]) if len(node.input) > 1 else None
    return scale.data_type if scale is not None else onnx.TensorProto.FLOAT


def _constant_decodes(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, dict[str, onnx.TensorProto]]]:
    """DequantizeLinear/Cast nodes all of whose inputs are initializers: weights rebuilt from storage."""
    inits = _all_initializers(graph)
    return [(n, inits) for n in _all_nodes(graph)
            if n.op_type in DECODE_OPS and n.input and all(i == "" or i in inits for i in n.input)]


def _constant_values(graph: onnx.GraphProto) -> dict[str, tuple[onnx.NodeProto, list[str], int | None]]:
    """Every value of `graph` (subgraphs included) computed from initializers alone: its producer, the
    initializers it is computed from, and the float type it decodes to where it is computed through a
    DequantizeLinear or a Cast to a float type (a weight; None for shapes, indices and the like)."""
    inits = _all_initializers(graph)
    producer = {o: n for n in _all_nodes(graph) for o in n.output if o}
    memo: dict[str, tuple[list[str], int | None] | None] = {name: ([name], None) for name in inits}

    def walk(name: str) -> None:
        stack = [name]
        while stack:  # iterative: decode chains of large graphs nest deeply
            v = stack[-1]
            if v in memo:
                stack.pop()
                continue
            node = producer.get(v)
            if node is None or node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike",
                                                "RandomUniformLike", "Multinomial") or _has_subgraph(node):
                memo[v] = None
                stack.pop()
                continue
            todo = [i for i in node.input if i and i not in memo]
            if todo:
                if any(t in stack for t in todo):  # a cycle: not a constant
                    memo[v] = None
                    stack.pop()
                    continue
                stack.extend(todo)
                continue
            parts = [memo[i] for i in node.input if i]
            memo[v] = None if any(q is None for q in parts) else \
                (sorted({x for q in parts for x in q[0]}), _decoded_to(node, [q[1] for q in parts]))
            stack.pop()

    for o in producer:
        walk(o)
    return {o: (producer[o], *memo[o]) for o in producer if memo[o] is not None}


def _decoded_to(node: onnx.NodeProto, inputs: list[int | None]) -> int | None:
    """The float type a constant node's output decodes to, from its inputs' (see _constant_values)."""
    if node.op_type == "DequantizeLinear":
        return onnx.TensorProto.FLOAT
    if node.op_type == "Cast":
        to = next(a.i for a in node.attribute if a.name == "to")
        return to if to in FLOAT_TYPES else None
    return next((t for t in inputs if t is not None), None)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _folded_decodes(written: onnx.ModelProto, optimized: onnx.GraphProto
                    ) -> list[tuple[str, str, int, list[onnx.TensorProto]]]:
    """Decoded weights the optimizer folded at load: (weight, decode op, float bytes, stored tensors).

    A decode is a value computed from initializers only, through a DequantizeLinear or a Cast to a
    float type, that a computing node reads (a weight entering the model). ORT folded it when no node
    of its optimized graph reads the stored tensors (that is a decode per call) and no fused kernel
    reads ORT's repacked copy of them (MatMulNBits reads `NAME_T`). Its bytes are those of the folded
    initializer when ORT kept the decode's name, else of the value's inferred shape (ORT folded it
    further: a Conv kernel reordered, a Transpose applied). Values decoded from the same stored
    tensors (a Split weight) are one entry; a writer's weight is named as written (`W` for `W__q`)."""
    graph = written.graph
    inits = _all_initializers(graph)
    constant = _constant_values(graph)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in _all_nodes(graph):
        for i in set(n.input) | subgraph_refs(n):
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    opt_inits = _all_initializers(optimized)
    opt_nodes = list(_all_nodes(optimized))
    opt_read = {i for n in opt_nodes for i in n.input if i}
    fused_read = [i for n in opt_nodes if n.op_type in FUSED_QUANT_OPS for i in n.input if i]
    shapes = None
    found: dict[tuple[str, ...], list[Any]] = {}
    for value, (node, leaves, decoded) in constant.items():
        live = value in outputs or any(not all(o in constant for o in r.output if o) or _has_subgraph(r)
                                       for r in readers.get(value, []))
        if not live or decoded is None or any(leaf in opt_read for leaf in leaves):
            continue
        if not any(inits[leaf].data_type in FLOAT_TYPES for leaf in leaves):
            continue  # integers only: the model's own constant arithmetic (a position index cast to float);
            # a stored weight has a float scale or is itself float16/bfloat16
        if any(leaf in f for leaf in leaves for f in fused_read):
            continue  # repacked for a fused kernel
        if value in opt_inits:
            folded = opt_inits[value]
            nbytes = tensor_bytes(list(folded.dims), folded.data_type)
        else:
            if shapes is None:
                shapes = infer_value_shapes(written)
            dims = shapes.get(value)
            if dims is None or not all(isinstance(d, int) for d in dims):
                continue
            nbytes = tensor_bytes(dims, decoded)
        key = tuple(leaves)
        if key in found:
            found[key][2] += nbytes
            continue
        owners = {leaf.rsplit("__", 1)[0] for leaf in leaves if "__" in leaf}
        found[key] = [owners.pop() if len(owners) == 1 else value, node.op_type, nbytes, [inits[x] for x in leaves]]
    return [tuple(v) for v in found.values()]


# Ops that only move or index a constant: a decoded weight passed through them is still rebuilt per call.
_MOVES = ("Gather", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def _materialized(name: str, dims: list[int], users: dict[str, list[onnx.NodeProto]],
                  inits: dict[str, onnx.TensorProto]) -> tuple[int, list[str]]:
    """Largest element count a decoded weight reaches while it is only moved or indexed by constants
    (a factored table re-expanded by Gather with its constant index), and the ops on the way."""
    shape: list[int] | None = dims
    numel = largest = math.prod(dims)
    chain: list[str] = []
    while len(users.get(name, [])) == 1:
        node = users[name][0]
        if node.op_type not in _MOVES or any(i and i != name and i not in inits for i in node.input):
            break
        if node.op_type == "Gather":
            if not shape:
                break  # the gathered axis is unknown after a reshape (or there is none)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(shape)
            shape = shape[:axis] + list(inits[node.input[1]].dims) + shape[axis + 1:]
            numel = math.prod(shape)
        elif node.op_type != "Identity":
            shape = None  # same elements, other dims
        largest, name = max(largest, numel), node.output[0]
        chain.append(node.op_type)
    return largest, chain


def graph_figures(written: onnx.ModelProto, optimized: onnx.ModelProto) -> dict[str, Any]:
    """Op histogram after the optimizer, fused vs unfused DequantizeLinear, decodes per call, folded decodes."""
    nodes = list(_all_nodes(optimized.graph))
    ops = Counter(n.op_type for n in nodes)
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)
    per_call = []
    for node, inits in _constant_decodes(optimized.graph):
        stored = [inits[i] for i in node.input if i]
        # The weight's shape: a DequantizeLinear's or Cast's data, the larger operand of a Mul or Sub.
        dims = list(max(stored, key=lambda t: math.prod(t.dims)).dims if node.op_type in ("Mul", "Sub")
                    else stored[0].dims)
        if math.prod(dims) <= 1:
            continue  # a scalar (ORT's Cast of a float16 zero point for a float32 kernel): no weight
        dtype = _decoded_type(node, inits)
        numel, chain = _materialized(node.output[0], dims, users, inits)
        per_call.append({"weight": node.output[0], "op": node.op_type,
                         "bytes": tensor_bytes(dims, dtype),
                         "stored_bytes": sum(tensor_bytes(list(t.dims), t.data_type) for t in stored),
                         "consumers": sorted({u.op_type for u in users.get(node.output[0], [])}),
                         "materialized_bytes": tensor_bytes([numel], dtype), "through": chain})
    opt_inits = _all_initializers(optimized.graph)
    expanded = [{"weight": name, "op": op, "bytes": nbytes,
                 "stored_bytes": sum(tensor_bytes(list(t.dims), t.data_type) for t in stored)}
                for name, op, nbytes, stored in _folded_decodes(written, optimized.graph)]
    written_dq = sum(n.op_type == "DequantizeLinear" for n in _all_nodes(written.graph))
    return {
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "nodes": len(nodes),
        "fused": {op: ops[op] for op in FUSED_QUANT_OPS if ops.get(op)},
        "matmulnbits": ops.get("MatMulNBits", 0),
        "dq_written": written_dq,
        "dq_left": ops.get("DequantizeLinear", 0),
        "per_call": sorted(per_call, key=lambda e: -e["bytes"]),
        "per_call_bytes": sum(e["bytes"] for e in per_call),
        "per_call_materialized_bytes": sum(e["materialized_bytes"] for e in per_call),
        "expanded_at_load": sorted(expanded, key=lambda e: -e["bytes"]),
        "expanded_bytes": sum(e["bytes"] for e in expanded),
        "initializer_bytes": sum(tensor_bytes(list(t.dims), t.data_type) for t in opt_inits.values()),
    }


# -------------------------------------------------------------------------------------------- timing

def step_feeds(session, spec: RolloutSpec | None, contexts: Contexts | None) -> dict[str, np.ndarray]:
    """The inputs of the first rollout step of context 0 (synthetic ones without a spec)."""
    if spec is None or contexts is None:
        return synthetic_feeds(session)
    types = {i.name: ORT_NUMPY_TYPES.get(i.type, np.float32) for i in session.get_inputs()}
    shapes = {i.name: i.shape for i in session.get_inputs()}
    feeds = {inp: contexts.arrays[key][0] for inp, key in [*spec.initial.items(), *spec.fixed.items()]}
    feeds.update({inp: contexts.arrays[key][0, 0] for inp, key in spec.per_step.items()})
    for inp, value in spec.constants.items():
        arr = np.asarray(value)
        feeds[inp] = arr.reshape([d if isinstance(d, int) else 1 for d in shapes[inp]]) if arr.size == 1 and shapes[inp] else arr
    return {k: np.ascontiguousarray(v, dtype=types.get(k, np.float32)) for k, v in feeds.items()}


MIN_TIMED_S = 0.3  # a timing loop runs at least this long (within its budget): 10 calls of 8 us were noise


def _repeat(run: Callable[[], None], count: int, budget_s: float, minimum: int,
            min_s: float = MIN_TIMED_S) -> list[float]:
    """Seconds of each run: at least `count` runs and `min_s` seconds, fewer runs (but at least
    `minimum`) once `budget_s` is spent."""
    times: list[float] = []
    start = time.perf_counter()
    while (len(times) < count or time.perf_counter() - start < min(min_s, budget_s)) \
            and (len(times) < minimum or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def time_calls(session, feeds: dict[str, np.ndarray], device: Device, count: int, budget_s: float) -> list[float]:
    """One forward pass, inputs and outputs bound on the session's device (no host copies timed)."""
    binding = session.io_binding()
    values = {k: device.to_device(v) for k, v in feeds.items()}  # kept alive while bound
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, device.kind)
    session.run_with_iobinding(binding)  # warm-up: first-call allocations are not latency
    return _repeat(lambda: session.run_with_iobinding(binding), count, budget_s, minimum=3)


def time_rollouts(session, spec: RolloutSpec, contexts: Contexts, device: Device, count: int,
                  budget_s: float) -> list[float]:
    """A whole rollout of context 0, states fed back on the device as the sweep and eval do."""
    rollout = Rollout(session, spec, contexts.subset([0]), device)
    rollout.trajectory(0)  # warm-up, as for the calls
    return _repeat(lambda: rollout.trajectory(0), count, budget_s, minimum=1)


def _ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 4)


# ------------------------------------------------------------------------------------------- measure

def measure(path: str | Path, device: Device, spec: RolloutSpec | None = None, contexts: Contexts | None = None,
            calls: int = 20, rollouts: int = 3, budget_s: float = 10.0, threads: int = 0,
            accuracy_level: int | None = None) -> dict[str, Any]:
    """Every figure, in this process. Memory is meaningful only in a fresh process (see deployment_report)."""
    ort = _ort()
    path = Path(path)
    before = proc_memory()
    gpu_before = gpu_memory_used() if device.kind == "cuda" else (None, "")
    t0 = time.perf_counter()
    session = open_session(path, device, threads, accuracy_level)
    session_s = time.perf_counter() - t0
    loaded = proc_memory()
    trimmed = proc_memory() if trim_heap() else {}
    gpu_loaded = gpu_memory_used() if device.kind == "cuda" else (None, "")
    peak_reset = reset_peak_rss()
    call_times = time_calls(session, step_feeds(session, spec, contexts), device, calls, budget_s)
    roll_times = time_rollouts(session, spec, contexts, device, rollouts, budget_s) if spec and contexts and rollouts > 0 else []
    after = proc_memory()
    gpu_after = gpu_memory_used() if device.kind == "cuda" else (None, "")
    del session
    written = onnx.load(str(path), load_external_data=False)
    doc: dict[str, Any] = {
        "model": str(path), "device": device.kind, "ort_version": ort.__version__,
        "file_bytes": _file_bytes(path, written),
        "threads": threads or None, "cpu_count": os.cpu_count(),
        "accuracy_level": accuracy_level, "session_s": round(session_s, 4),
        "rss_base_bytes": before.get("VmRSS"), "rss_load_bytes": loaded.get("VmRSS"),
        # The same once the heap's free pages went back to the OS: what the loaded model really holds.
        "rss_load_trimmed_bytes": trimmed.get("VmRSS"),
        # RssAnon leaves out the runtime library's code pages that the model's kernels touch.
        "anon_load_delta_bytes": _delta(loaded.get("RssAnon"), before.get("RssAnon")),
        "rss_peak_call_bytes": after.get("VmHWM") if peak_reset else None,
        "rss_after_calls_bytes": after.get("VmRSS"), "peak_reset": peak_reset,
        "call_ms": _ms(call_times), "call_ms_min": round(1000 * min(call_times), 4), "calls": len(call_times),
        # the spread of the calls: on a busy machine two runs of one model differ by more than the forms do
        "call_ms_p10": round(1000 * float(np.percentile(call_times, 10)), 4),
        "call_ms_p90": round(1000 * float(np.percentile(call_times, 90)), 4),
    }
    doc["load_delta_bytes"] = _delta(doc["rss_load_bytes"], doc["rss_base_bytes"])
    doc["peak_call_delta_bytes"] = _delta(doc["rss_peak_call_bytes"], doc["rss_load_bytes"])
    if roll_times:
        doc.update(rollout_ms=_ms(roll_times), rollouts=len(roll_times), horizon=spec.horizon,
                   step_ms=round(_ms(roll_times) / spec.horizon, 4),
                   step_ms_min=round(1000 * min(roll_times) / spec.horizon, 4))
    if device.kind == "cuda":
        doc.update(gpu_base_bytes=gpu_before[0], gpu_load_bytes=gpu_loaded[0], gpu_after_calls_bytes=gpu_after[0],
                   gpu_memory_source=gpu_loaded[1])
    doc.update(graph_figures(written, optimized_graph(path, device, threads, accuracy_level)))
    return doc


def _delta(a: int | None, b: int | None) -> int | None:
    return a - b if a is not None and b is not None else None


def _file_bytes(path: Path, model: onnx.ModelProto) -> int:
    """The model file plus the external data files its tensors name (`model` read without its data)."""
    files = {path.resolve(), *named_data_files(model, path.parent)}
    return sum(f.stat().st_size for f in files if f.is_file())


# ---------------------------------------------------------------------------- the report, isolated

def deployment_report(path: str | Path, device: Device | str = "cpu", spec: RolloutSpec | None = None,
                      contexts: Contexts | None = None, *, isolated: bool = True, calls: int = 20,
                      rollouts: int = 3, budget_s: float = 10.0, threads: int = 0,
                      accuracy_level: int | None = None, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Session creation time, resident memory after load and peak during calls, latency per call and
    per rollout step (with a spec and contexts: context 0), the optimized op histogram, fused and
    unfused DequantizeLinear counts, and the weights still decoded per call or expanded at load.

    `isolated` (the default) measures in a fresh Python process so memory figures are the model's alone.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    if not Path(path).is_file():
        raise TqsError(f"{path}: no such file")
    if not isolated:
        return measure(path, device, spec, contexts, calls, rollouts, budget_s, threads, accuracy_level)
    with tempfile.TemporaryDirectory(prefix="tqs-deploy-") as tmp:
        argv = [sys.executable, "-m", "tqs_onnx.runtime_report", str(path), "--device", device.kind,
                "--calls", str(calls), "--rollouts", str(rollouts), "--budget", str(budget_s),
                "--threads", str(threads)]
        if accuracy_level is not None:
            argv += ["--accuracy-level", str(accuracy_level)]
        if spec is not None and contexts is not None:
            argv += _spec_files(Path(tmp), spec, contexts)
        return _run_isolated(argv, path, timeout_s)


def _spec_files(tmp: Path, spec: RolloutSpec, contexts: Contexts) -> list[str]:
    """The spec and context 0 as files for the child process."""
    (tmp / "spec.json").write_text(json.dumps(spec.to_dict()))
    first = contexts.subset([0])
    np.savez(tmp / "contexts.npz", **first.arrays)
    return ["--rollout", str(tmp / "spec.json"), "--contexts", str(tmp / "contexts.npz")]


def _run_isolated(argv: list[str], path: str | Path, timeout_s: float) -> dict[str, Any]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TqsError(f"{path}: deployment measurement took over {timeout_s:g} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise TqsError(f"{path}: deployment measurement failed: {tail[:300]}")
    return json.loads(done.stdout)


# ------------------------------------------------------------------------------ reference vs candidate

RATIO_KEYS = ("session_s", "rss_load_bytes", "rss_load_trimmed_bytes", "load_delta_bytes", "anon_load_delta_bytes",
              "rss_peak_call_bytes",
              "call_ms", "step_ms", "gpu_load_bytes")


def ratios(ref: dict[str, Any], cand: dict[str, Any]) -> dict[str, float]:
    """candidate / reference for each figure both have (below 1: the candidate is cheaper)."""
    out = {}
    for key in RATIO_KEYS:
        a, b = ref.get(key), cand.get(key)
        if a and b is not None:
            out[key] = round(b / a, 4)
    return out


def runtime_comparison(reference: str | Path, candidate: str | Path, device: Device | str = "cpu",
                       spec: RolloutSpec | None = None, contexts: Contexts | None = None, rounds: int = 2,
                       **kw: Any) -> dict[str, Any]:
    """Deployment reports of both models, each in a fresh process, and the candidate/reference ratios.

    Latency is measured `rounds` times, the two models in turn (reference, candidate, reference, ...):
    one model against itself in one round came out anywhere from 0.09x to 2.5x on a busy 2-core
    machine, the model timed first being slower more often. Each model's latency is its fastest
    round's median; `latency_within_noise` says where the two models' rounds overlap, so a ratio
    there tells nothing. Memory and the graph figures are the first round's."""
    runs: dict[str, list[dict[str, Any]]] = {"reference": [], "candidate": []}
    for _ in range(max(1, rounds)):
        runs["reference"].append(deployment_report(reference, device, spec, contexts, **kw))
        runs["candidate"].append(deployment_report(candidate, device, spec, contexts, **kw))
    docs = {k: _fastest_round(v) for k, v in runs.items()}
    lat = "step_ms" if "step_ms" in docs["reference"] and "step_ms" in docs["candidate"] else "call_ms"
    spans = {k: (min(r[lat] for r in v), max(r[lat] for r in v)) for k, v in runs.items()}
    overlap = spans["reference"][0] <= spans["candidate"][1] and spans["candidate"][0] <= spans["reference"][1]
    return {**docs, "ratios": ratios(docs["reference"], docs["candidate"]), "rounds": len(runs["reference"]),
            "latency_within_noise": bool(overlap and len(runs["reference"]) > 1)}


CALL_FIGURES = ("call_ms", "call_ms_min", "call_ms_p10", "call_ms_p90", "calls")
ROLLOUT_FIGURES = ("step_ms", "step_ms_min", "rollout_ms", "rollouts")


def _fastest_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The first round's report, with the call figures of the round whose median call was fastest and
    the rollout figures of the round whose median step was; every round's medians listed beside."""
    doc = dict(rounds[0])
    for figures in (CALL_FIGURES, ROLLOUT_FIGURES):
        if all(figures[0] in r for r in rounds):
            best = min(rounds, key=lambda r: r[figures[0]])
            doc.update({k: best[k] for k in figures if k in best})
            doc[f"{figures[0]}_rounds"] = [r[figures[0]] for r in rounds]
    return doc


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f} MiB"


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < MIB else f"{n / MIB:,.2f} MiB"


def format_report(doc: dict[str, Any], label: str = "") -> str:
    """One line of figures and one of what the optimizer did."""
    step = f", {doc['step_ms']:.3f} ms per rollout step" if "step_ms" in doc else ""
    gpu = f", GPU {_mb(doc.get('gpu_load_bytes'))} after load" if doc.get("gpu_load_bytes") else ""
    lines = [f"{label}session {doc['session_s']:.3f} s, RSS {_mb(doc['rss_load_bytes'])} after load "
             f"(+{_mb(doc['load_delta_bytes'])}), peak {_mb(doc['rss_peak_call_bytes'])} in calls{gpu}; "
             f"{doc['call_ms']:.3f} ms per call{_spread(doc)}{step} ({doc['device']})",
             f"{' ' * len(label)}{graph_summary(doc)}"]
    return "\n".join(lines)


def _spread(doc: dict[str, Any]) -> str:
    """The calls' 10th to 90th percentile, where recorded (documents of earlier versions lack it)."""
    if "call_ms_p10" not in doc:
        return ""
    return f" (p10-p90 {doc['call_ms_p10']:.3f}-{doc['call_ms_p90']:.3f})"


def graph_summary(doc: dict[str, Any]) -> str:
    fused = ", ".join(f"{n} {op}" for op, n in doc["fused"].items()) or "no fused quantized op"
    text = f"{fused}; DequantizeLinear {doc['dq_left']} left of {doc['dq_written']} written"
    if doc["per_call"]:
        text += f"; {len(doc['per_call'])} weights decoded per call ({_kb(doc['per_call_bytes'])} per call"
        if doc["per_call_materialized_bytes"] > doc["per_call_bytes"]:
            text += f", {_kb(doc['per_call_materialized_bytes'])} once re-expanded by constant indices"
        text += ")"
    if doc["expanded_at_load"]:
        text += f"; {len(doc['expanded_at_load'])} expanded at load ({_kb(doc['expanded_bytes'])})"
    return text


def summary_line(comp: dict[str, Any]) -> str:
    """One line for the gate: latency and memory ratios, then what the optimizer did with the candidate."""
    ref, cand, r = comp["reference"], comp["candidate"], comp["ratios"]
    lat = "step_ms" if "step_ms" in r else "call_ms"
    what = "per rollout step" if lat == "step_ms" else "per call"
    noise = " (within the run-to-run spread: no difference shown)" if comp.get("latency_within_noise") else ""
    return (f"{what} {r[lat]:.2f}x the reference ({cand[lat]:.3f} vs {ref[lat]:.3f} ms{noise}), "
            f"RSS after load {_mb(cand['rss_load_bytes'])} vs {_mb(ref['rss_load_bytes'])} "
            f"(load +{_mb(cand['load_delta_bytes'])} vs +{_mb(ref['load_delta_bytes'])}); {graph_summary(cand)}")


def format_comparison(comp: dict[str, Any], top: int = 5) -> str:
    """Reference and candidate figures, the ratios, and the largest weights decoded per call."""
    r = comp["ratios"]
    cand = comp["candidate"]
    rounds = comp.get("rounds", 1)
    threads = cand.get("threads") or f"ORT's default ({cand.get('cpu_count')} cores)"
    lines = [f"runtime (each model in a fresh process, {rounds} round(s) in turn, latency the fastest round's "
             f"median of {cand['calls']} calls" + (f" and {cand['rollouts']} rollouts" if "rollouts" in cand else "")
             + f" after a warm-up; threads: {threads}):",
             format_report(comp["reference"], "  reference  "), format_report(cand, "  candidate  "),
             "  candidate/reference: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items())
             + ("; latency within the run-to-run spread (no difference shown)" if comp.get("latency_within_noise")
                else "")]
    for e in cand["per_call"][:top]:
        grown = f", {_kb(e['materialized_bytes'])} after {', '.join(e['through'])}" if e["through"] else ""
        lines.append(f"  decoded per call: {e['weight']} ({e['op']} -> {', '.join(e['consumers']) or '-'}): "
                     f"{_kb(e['bytes'])} from {_kb(e['stored_bytes'])} stored{grown}")
    if len(cand["per_call"]) > top:
        lines.append(f"  ... and {len(cand['per_call']) - top} more decoded per call")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ child

def main(argv: list[str] | None = None) -> int:
    """The measuring child: print one report as JSON."""
    ap = argparse.ArgumentParser(prog="python -m tqs_onnx.runtime_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--rollout", metavar="SPEC")
    ap.add_argument("--contexts", metavar="DATA.npz")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rollouts", type=int, default=3)
    ap.add_argument("--budget", type=float, default=10.0, help="seconds per timing loop before it stops early")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--accuracy-level", type=int, help=f"{ACCURACY_KEY} (ORT's default when not given)")
    a = ap.parse_args(argv)
    try:
        spec = RolloutSpec.load(a.rollout) if a.rollout else None
        contexts = Contexts.load(a.contexts, spec) if spec and a.contexts else None
        doc = measure(a.model, resolve_device(a.device), spec, contexts, a.calls, a.rollouts, a.budget, a.threads,
                      a.accuracy_level)
    except TqsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
