#!/usr/bin/env python3
"""Runtime cost of a factored Pangu bias table against the expanded tensor it replaces (issue #10).

One layer-1 Earth-specific bias of the real export: a table (3312, 124, 6) read through a fixed
(144, 144) position index, added to attention logits (124, 6, 144, 144). Four forms, same session
options, same provider, measured in one run:

  expanded        the exporter's form: the (1, 124, 6, 144, 144) initializer feeding Add
  factored fp32   table + index -> Gather -> Transpose -> Add (lossless; ORT may fold it at load)
  int8 DQ>Gather  int8 table -> DequantizeLinear -> Gather -> ... (what the writer emits today)
  int8 Gather>DQ  int8 table -> Gather -> DequantizeLinear -> ... (dequantize after the gather)

Prints ms per call, the ratio to the expanded form, session-load time, and whether the outputs of the
int8 forms are identical to each other (they must be: same arithmetic, other order of gather and scale).

    python tools/bench_gather_dq.py [--device cpu|cuda] [--calls 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from one_line_errors import run  # tools/: a user's error is one line, exit 2
from tqs_onnx.runtime import resolve_device

TYPES, HEADS, PAIRS, TOKENS = 124, 6, 3312, 144
PERM = [2, 3, 0, 1]  # (144, 144, types, heads) -> (types, heads, 144, 144)


def build(form: str, table: np.ndarray, index: np.ndarray, scale: float) -> bytes:
    """The one-layer graph `x + bias` with the bias stored in `form`."""
    q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
    inits, nodes = [], []
    if form == "expanded":
        expanded = table[index].transpose(PERM)[None]
        inits.append(numpy_helper.from_array(expanded, "bias"))
        nodes.append(helper.make_node("Add", ["x", "bias"], ["y"]))
    else:
        inits.append(numpy_helper.from_array(index, "idx"))
        if form == "factored fp32":
            inits.append(numpy_helper.from_array(table, "table"))
            nodes.append(helper.make_node("Gather", ["table", "idx"], ["g"], axis=0))
        else:
            inits += [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.array(scale, np.float32), "s")]
            if form == "int8 DQ>Gather":
                nodes += [helper.make_node("DequantizeLinear", ["q", "s"], ["t"]),
                          helper.make_node("Gather", ["t", "idx"], ["g"], axis=0)]
            else:
                nodes += [helper.make_node("Gather", ["q", "idx"], ["gq"], axis=0),
                          helper.make_node("DequantizeLinear", ["gq", "s"], ["g"])]
        nodes += [helper.make_node("Transpose", ["g"], ["e"], perm=PERM),
                  helper.make_node("Unsqueeze", ["e", "zero"], ["e1"]),
                  helper.make_node("Add", ["x", "e1"], ["y"])]
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero"))
    shape = [1, TYPES, HEADS, TOKENS, TOKENS]
    graph = helper.make_graph(nodes, "bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def measure(blob: bytes, x: np.ndarray, providers: list[str], calls: int) -> tuple[float, float, np.ndarray]:
    """(session seconds, median ms per call with input and output bound on the device, output)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    t0 = time.perf_counter()
    sess = ort.InferenceSession(blob, opts, providers=providers)
    load = time.perf_counter() - t0
    device = "cuda" if providers[0].startswith("CUDA") else "cpu"
    xv = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", xv)
    binding.bind_output("y", device)
    for _ in range(3):
        sess.run_with_iobinding(binding)
    times = []
    for _ in range(calls):
        binding.synchronize_inputs()
        t = time.perf_counter()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        times.append(time.perf_counter() - t)
    return load, float(np.median(times)) * 1e3, binding.copy_outputs_to_cpu()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    import onnxruntime as ort

    if a.device == "cuda":
        resolve_device("cuda")  # a one-line error where the CUDA provider does not run
        ort.preload_dlls()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    rng = np.random.default_rng(0)
    table = (0.02 * rng.standard_normal((PAIRS, TYPES, HEADS))).astype(np.float32)
    index = rng.integers(0, PAIRS, (TOKENS, TOKENS)).astype(np.int64)
    scale = float(np.abs(table).max() / 127)
    x = rng.standard_normal((1, TYPES, HEADS, TOKENS, TOKENS)).astype(np.float32)
    rows, outputs = {}, {}
    for form in ("expanded", "factored fp32", "int8 DQ>Gather", "int8 Gather>DQ"):
        blob = build(form, table, index, scale)
        load, ms, y = measure(blob, x, providers, a.calls)
        rows[form] = {"model_bytes": len(blob), "session_s": load, "ms_per_call": ms}
        outputs[form] = y
    base = rows["expanded"]["ms_per_call"]
    print(f"onnxruntime {ort.__version__}, {a.device}, bias table ({PAIRS},{TYPES},{HEADS}) "
          f"index ({TOKENS},{TOKENS}), median of {a.calls} calls")
    print(f"{'form':16s} {'model MB':>9s} {'session s':>10s} {'ms/call':>9s} {'vs expanded':>12s}")
    for form, r in rows.items():
        r["vs_expanded"] = r["ms_per_call"] / base
        print(f"{form:16s} {r['model_bytes'] / 1e6:9.1f} {r['session_s']:10.3f} {r['ms_per_call']:9.2f} "
              f"{r['vs_expanded']:11.2f}x")
    same_fp32 = bool(np.array_equal(outputs["expanded"], outputs["factored fp32"]))
    same_int8 = bool(np.array_equal(outputs["int8 DQ>Gather"], outputs["int8 Gather>DQ"]))
    print(f"factored fp32 output identical to expanded: {same_fp32}")
    print(f"int8 forms identical to each other: {same_int8}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"ort": ort.__version__, "device": a.device, "calls": a.calls, "forms": rows,
                       "factored_identical": same_fp32, "int8_forms_identical": same_int8}, fh, indent=1)


if __name__ == "__main__":
    sys.exit(run(main))
