#!/usr/bin/env python3
"""One MatMul in ONNX Runtime: the float32 weight against the DequantizeLinear form ORT fuses into
MatMulNBits, per (rows M, K, N) and tier, measured in one run.

The `/load` form runs the float32 MatMul itself after load (tests/test_apply.py checks the optimized
graphs are equal), so the float32 column is also its time. A ratio above 1 means the fused integer
kernel is slower than the float one for that shape: there `--decode load` is the faster choice.

    python tools/bench_matmul_forms.py [--device cpu] [--shapes 16x64x192,...] [--tiers int8/channel,...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tqs_onnx.graph import load_model
from tqs_onnx.rewrite import rewrite_model, save_model
from tqs_onnx.runtime import make_session, resolve_device

SHAPES = "16x64x192,16x256x64,128x512x512,1x1024x1024,16x1024x1024,512x1024x1024,4096x384x1536"
TIERS = "int8/channel,int4/block32,int4/channel,int2/channel"


def matmul_model(m: int, k: int, n: int) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) / np.float32(np.sqrt(k))
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                          [numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def median_ms(path: Path, device, m: int, k: int, budget_s: float) -> float:
    """Median of timed runs (after 5 untimed), inputs and outputs bound on the device."""
    session = make_session(str(path), device)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", device.to_device(np.random.default_rng(1).standard_normal((m, k))
                                                      .astype(np.float32)))
    times: list[float] = []
    start = time.perf_counter()
    for i in range(1000):
        binding.bind_output("y", device.kind)
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if i >= 5:
            times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 20:
            break
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default=SHAPES, help="comma list of MxKxN (M: rows of the activation)")
    ap.add_argument("--tiers", default=TIERS)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per model")
    a = ap.parse_args()
    device = resolve_device(a.device)
    tiers = [t for t in a.tiers.split(",") if t]
    print(f"MatMul on {device.kind}: ms per call (median), fused integer form / float32")
    print(f"{'M x K x N':>18} {'float32':>9} " + " ".join(f"{t:>20}" for t in tiers))
    with tempfile.TemporaryDirectory() as tmp:
        for text in a.shapes.split(","):
            m, k, n = (int(x) for x in text.split("x"))
            base = Path(tmp) / "m.onnx"
            onnx.save(matmul_model(m, k, n), base)
            fp32 = median_ms(base, device, m, k, a.budget)
            cells = []
            for tier in tiers:
                plan = {"kind": "tqs-plan", "schema_version": 1, "model": {}, "weights": {"W": tier},
                        "weight_info": {}}
                out, _ = rewrite_model(load_model(base), plan)
                path = Path(tmp) / "q.onnx"
                save_model(out, path)
                ms = median_ms(path, device, m, k, a.budget)
                cells.append(f"{ms:9.4f} ({ms / fp32:5.2f}x)")
            print(f"{text:>18} {fp32:9.4f} " + " ".join(f"{c:>20}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
