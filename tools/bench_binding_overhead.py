#!/usr/bin/env python3
"""Python cost of one rollout step's IOBinding calls: ORT's Python wrappers against its raw pybind objects.

A sweep step binds the fed-back inputs, rebinds the outputs (a pre-bound output fails when the next
shape differs), runs, and reads the outputs back as the next step's inputs (`tqs_onnx.rollout`). On a
small or launch-bound model that Python work is a visible share of the step. This script times the
same step loop three ways on a tiny graph (`y_i = x_i + w`, `d_i = sum(y_i^2)` for each of N fed-back
tensors), rounds alternating:

- wrapped: `session.io_binding()` and the `OrtValue` wrappers, as `tqs_onnx.rollout` does;
- raw: the same calls on the pybind objects behind them (`binding._iobinding`, `session._sess`,
  `OrtValue._ortvalue`; private attributes of onnxruntime, so a candidate only, not used by the tool);
- run only: `run_with_iobinding` with nothing rebound and outputs pre-allocated (the floor of a step).

    python tools/bench_binding_overhead.py [--device cpu|cuda] [--feedback 2] [--size 4096] [--steps 20000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from onnx import TensorProto, helper


def tiny_model(feedback: int, size: int) -> bytes:
    h = helper.make_node
    nodes, ins, outs = [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, [size])], []
    for i in range(feedback):
        nodes += [h("Add", [f"x{i}", "w"], [f"y{i}"]), h("ReduceSumSquare", [f"y{i}"], [f"d{i}"], keepdims=0)]
        ins.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [size]))
        outs += [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [size]),
                 helper.make_tensor_value_info(f"d{i}", TensorProto.FLOAT, [])]
    m = helper.make_model(helper.make_graph(nodes, "steps", ins, outs), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def wrapped(ort, sess, values: dict, device: str, feedback: int, steps: int) -> float:
    binding = sess.io_binding()
    binding.bind_ortvalue_input("w", values["w"])
    xs = [values[f"x{i}"] for i in range(feedback)]
    names = [o.name for o in sess.get_outputs()]
    t0 = time.perf_counter()
    for _ in range(steps):
        for i, x in enumerate(xs):
            binding.bind_ortvalue_input(f"x{i}", x)
        binding.clear_binding_outputs()
        for o in names:
            binding.bind_output(o, "cpu" if o.startswith("d") else device)
        sess.run_with_iobinding(binding)
        out = dict(zip(names, binding.get_outputs()))
        xs = [out[f"y{i}"] for i in range(feedback)]
        float(out["d0"].numpy())
    return (time.perf_counter() - t0) / steps


def raw(ort, sess, values: dict, device: str, feedback: int, steps: int) -> float:
    c = ort.capi._pybind_state
    kind = c.OrtDevice.cuda() if device == "cuda" else c.OrtDevice.cpu()
    dev = c.OrtDevice(kind, c.OrtDevice.default_memory(), 0)
    host = c.OrtDevice(c.OrtDevice.cpu(), c.OrtDevice.default_memory(), 0)
    binding = sess.io_binding()._iobinding
    binding.bind_ortvalue_input("w", values["w"]._ortvalue)
    xs = [values[f"x{i}"]._ortvalue for i in range(feedback)]
    names = [o.name for o in sess.get_outputs()]
    run_options = ort.RunOptions()
    t0 = time.perf_counter()
    for _ in range(steps):
        for i, x in enumerate(xs):
            binding.bind_ortvalue_input(f"x{i}", x)
        binding.clear_binding_outputs()
        for o in names:
            binding.bind_output(o, host if o.startswith("d") else dev)
        sess._sess.run_with_iobinding(binding, run_options)
        out = dict(zip(names, binding.get_outputs()))
        xs = [out[f"y{i}"] for i in range(feedback)]
        float(out["d0"].numpy())
    return (time.perf_counter() - t0) / steps


def run_only(ort, sess, values: dict, device: str, feedback: int, steps: int) -> float:
    binding = sess.io_binding()
    for name, v in values.items():
        binding.bind_ortvalue_input(name, v)
    for o in sess.get_outputs():
        binding.bind_output(o.name, device)
    t0 = time.perf_counter()
    for _ in range(steps):
        sess.run_with_iobinding(binding)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--feedback", type=int, default=2, help="fed-back tensors (each adds a divergence output)")
    ap.add_argument("--size", type=int, default=4096, help="elements per fed-back tensor")
    ap.add_argument("--steps", type=int, default=20000, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if a.device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(tiny_model(a.feedback, a.size), providers=providers)
    if a.device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise SystemExit("the CUDA provider is not usable here")
    values = {n: ort.OrtValue.ortvalue_from_numpy(np.ones(a.size, np.float32), a.device, 0)
              for n in ["w", *[f"x{i}" for i in range(a.feedback)]]}
    ways = {"wrapped": wrapped, "raw": raw, "run only": run_only}
    times = {k: [] for k in ways}
    for f in ways.values():  # warm-up
        f(ort, sess, values, a.device, a.feedback, 200)
    for _ in range(a.rounds):
        for k, f in ways.items():
            times[k].append(f(ort, sess, values, a.device, a.feedback, a.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"onnxruntime {ort.__version__}, {a.device}, {a.feedback} fed-back tensors of {a.size} floats, "
          f"{a.steps} steps x {a.rounds} rounds (median)")
    for k, v in med.items():
        print(f"  {k:9s} {v * 1e6:8.1f} us/step   ({v / med['run only']:.2f}x run only)")
    print(f"  above the run (Python, output allocation): wrapped {(med['wrapped'] - med['run only']) * 1e6:.1f} us, "
          f"raw {(med['raw'] - med['run only']) * 1e6:.1f} us per step")


if __name__ == "__main__":
    main()
