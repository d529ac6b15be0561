"""`inspect`: what a model holds, which weights tqs-onnx can quantize, and the blocks it would score."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import onnx

from tqs_onnx import SCHEMA_VERSION, __version__
from tqs_onnx.graph import (DEFAULT_MIN_SIZE, LoadedModel, deprecated_ops, main_opset, make_blocks, op_histogram, prequantized,
                            weight_table)
from tqs_onnx.prepare import prepare_graph
from tqs_onnx.rollout import propose_spec
from tqs_onnx.sweep import weight_entry


def _io(values) -> dict[str, Any]:
    out = {}
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        out[v.name] = {"dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?",
                       "shape": dims}
    return out


def inspect_model(loaded: LoadedModel, blocks: str = "auto", min_size: int = DEFAULT_MIN_SIZE,
                  factor: bool = True) -> dict[str, Any]:
    model = loaded.model
    prepared = prepare_graph(model, factor)
    weights = weight_table(prepared.model, min_size, prepared.origins)
    inits = {i.name for i in model.graph.initializer} | {sp.values.name for sp in model.graph.sparse_initializer}
    inputs = _io([i for i in model.graph.input if i.name not in inits])
    outputs = _io(model.graph.output)
    total = sum(w.size for w in weights)
    qsize = sum(w.size for w in weights if w.quantizable)
    by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for w in weights:
        key = "/".join(sorted(set(w.consumer_ops))) or "(unused)"
        by_op[key][0] += w.size
        by_op[key][1] += w.size if w.quantizable else 0
    sig = ({k: (tuple(v["shape"]), f"tensor({_ort_name(v['dtype'])})") for k, v in inputs.items()},
           {k: (tuple(v["shape"]), f"tensor({_ort_name(v['dtype'])})") for k, v in outputs.items()})
    return {
        "schema_version": SCHEMA_VERSION, "kind": "tqs-inspect", "tool_version": __version__,
        "path": str(loaded.path), "file_bytes": loaded.file_bytes, "ir_version": model.ir_version,
        "opset": main_opset(model), "producer": model.producer_name,
        "inputs": inputs, "outputs": outputs, "op_histogram": op_histogram(model),
        "parameters": total, "quantizable_parameters": qsize,
        "quantizable_share": qsize / total if total else 0.0,
        "by_consumer_op": {k: {"parameters": v[0], "quantizable": v[1]} for k, v in by_op.items()},
        "weights": [{"name": w.name, **weight_entry(w), "size": w.size, "consumers": w.consumers[:4],
                     "quantizable": w.quantizable, "reason": w.reason} for w in weights],
        # integer weights a vendor already quantized (behind DequantizeLinear): kept as they are
        "prequantized": [{"name": n, "shape": list(s), "size": math.prod(s)}
                         for n, s in prequantized(prepared.model).items()],
        "blocks": [{"id": b.id, "name": b.name, "weights": b.weights, "size": b.size}
                   for b in make_blocks(weights, blocks)],
        "block_mode": blocks,
        "proposed_rollout_spec": propose_spec(*sig),
        "lossless": prepared.reports,
        # the graph after them, weights unquantized: what a plan keeping every weight writes (about)
        "prepared_bytes": prepared.model.ByteSize(),
        # ops onnx deprecates at the model's opset (GroupNormalization-18): sweep and apply refuse the model
        "deprecated_ops": deprecated_ops(model),
        "sparse_initializers": [{"name": sp.values.name, "shape": list(sp.dims), "stored_values": math.prod(sp.values.dims)}
                                for sp in prepared.model.graph.sparse_initializer],
    }


def _ort_name(dtype: str) -> str:
    return {"float32": "float", "float64": "double", "float16": "float16"}.get(dtype, dtype)


def format_inspect(doc: dict[str, Any], max_rows: int = 40) -> str:
    lines = [f"{doc['path']}: IR {doc['ir_version']}, opset {doc['opset']}, {doc['file_bytes']:,} bytes",
             "inputs:  " + ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in doc["inputs"].items()),
             "outputs: " + ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in doc["outputs"].items()),
             "ops:     " + ", ".join(f"{k} {v}" for k, v in list(doc["op_histogram"].items())[:12])
             + (f" (+{len(doc['op_histogram']) - 12} more: {', '.join(list(doc['op_histogram'])[12:])})"
                if len(doc["op_histogram"]) > 12 else ""),
             f"weights: {len(doc['weights'])} float tensors, {doc['parameters']:,} parameters, "
             f"{doc['quantizable_share']:.1%} quantizable"
             + (f"; already quantized: {len(doc['prequantized'])} integer or float8 tensor(s) behind DequantizeLinear, "
                f"{sum(p['size'] for p in doc['prequantized']):,} parameters, kept as they are"
                if doc.get("prequantized") else ""),
             *([f"warning: {', '.join(doc['deprecated_ops'])} deprecated by onnx (onnx.checker refuses it): sweep "
                "and apply refuse this model; re-export it at an opset where the op is current"]
               if doc.get("deprecated_ops") else []),
             "", f"{'weight':40s} {'shape':18s} {'origin':17s} {'consumers':18s} quantizable "
                 "(integer tiers: fused into MatMulNBits, decoded at load, or per call before a lookup)"]
    for w in doc["weights"][:max_rows]:
        form = "fused" if w.get("fused_dq") else "per call (lookup)" if w.get("const_lookup") else "at load"
        # the stored type where it is not float32 (f16: a float16 export; f64, bf16)
        short = {"float16": "f16", "bfloat16": "bf16", "float64": "f64"}.get(w.get("dtype", "float32"), "")
        shape = f"{w['shape']} {short}" if short else str(w["shape"])
        lines.append(f"{w['name'][:40]:40s} {shape[:18]:18s} {w['origin'][:17]:17s} "
                     f"{','.join(w['consumer_ops'])[:18]:18s} "
                     f"{f'yes, {form}' if w['quantizable'] else 'no: ' + w['reason']}")
    if len(doc["weights"]) > max_rows:
        lines.append(f"... {len(doc['weights']) - max_rows} more (--json for all)")
    lines += ["", f"blocks ({doc['block_mode']}): {len(doc['blocks'])}"]
    for b in doc["blocks"][:max_rows]:
        lines.append(f"  {b['id']:3d} {b['name'][:40]:40s} {b['size']:>12,} params  {len(b['weights'])} tensors")
    fac = doc.get("lossless", {}).get("factor-tables", {})
    if fac.get("tensors"):
        lines += ["", f"lossless factoring: {len(fac['tensors'])} expanded lookup tables, "
                      f"{fac.get('bytes_before', 0):,} -> {fac.get('bytes_after', 0):,} bytes (exact; apply does it by default)"]
    notes = []
    dup = doc.get("lossless", {}).get("dedup", {})
    if dup.get("tensors_removed"):
        notes += [f"identical tensors stored once: {dup['tensors_removed']} copies, {dup['bytes_saved']:,} bytes saved "
                  "(exact; apply does it by default)"]
    narrow = doc.get("lossless", {}).get("narrow-ints", {})
    if narrow.get("narrowed"):
        notes += [f"integer constants stored narrow (a Cast back in the graph): {narrow['narrowed']} tensors, "
                  f"{narrow['bytes_saved']:,} bytes saved (exact; apply does it by default)"]
    inl = doc.get("lossless", {}).get("inline-functions", {})
    if inl.get("functions"):
        notes += [f"local functions inlined (as ONNX Runtime does at load): {inl['functions']} functions, "
                  f"{inl['call_sites']} call sites"]
    for sp in doc.get("sparse_initializers", []):
        notes += [f"sparse initializer {sp['name']} {sp['shape']} ({sp['stored_values']:,} values stored): "
                  "kept as stored, not quantized"]
    passes = doc.get("lossless", {})
    if doc.get("prepared_bytes") and any(passes.get(k, {}).get(n) for k, n in (
            ("factor-tables", "tensors"), ("dedup", "tensors_removed"), ("narrow-ints", "narrowed"))):
        notes += [f"the lossless passes in all, with the nodes they add: {doc['file_bytes']:,} -> "
                  f"{doc['prepared_bytes']:,} bytes ({doc['file_bytes'] / doc['prepared_bytes']:.2f}x) before any weight "
                  "is quantized"]
    if notes:
        lines += ([] if fac.get("tensors") else [""]) + notes
    if doc["proposed_rollout_spec"]:
        fb = doc["proposed_rollout_spec"]["feedback"]
        lines += ["", "proposed rollout spec (--json for all of it): feedback " +
                  ", ".join(f"{o} -> {i}" for o, i in fb.items())]
    return "\n".join(lines)
