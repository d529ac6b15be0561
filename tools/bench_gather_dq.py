#!/usr/bin/env python3
"""DQ before vs after Gather for a factored Pangu bias table (3312, 124, 6) int8, index (144,144)."""
import time, numpy as np, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto as TP
r = np.random.default_rng(0)
table = r.integers(-127, 128, (3312, 124, 6)).astype(np.int8)
index = r.integers(0, 3312, (144, 144)).astype(np.int32)
scale = np.array(0.01, np.float32)
inits = [numpy_helper.from_array(table, "q"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(index, "idx")]
perm = [2, 3, 0, 1]  # (144,144,124,6) -> (124,6,144,144)
def model(before: bool):
    if before:
        nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["t"]), helper.make_node("Gather", ["t", "idx"], ["g"], axis=0)]
    else:
        nodes = [helper.make_node("Gather", ["q", "idx"], ["gq"], axis=0), helper.make_node("DequantizeLinear", ["gq", "s"], ["g"])]
    nodes += [helper.make_node("Transpose", ["g"], ["e"], perm=perm), helper.make_node("Add", ["x", "e"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, [124, 6, 144, 144])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, [124, 6, 144, 144])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]); m.ir_version = 10
    return m.SerializeToString()
x = {"x": r.standard_normal((124, 6, 144, 144)).astype(np.float32)}
res = {}
for name, before in (("DQ before Gather", True), ("Gather then DQ", False)):
    s = ort.InferenceSession(model(before), providers=["CPUExecutionProvider"])
    for _ in range(3): s.run(None, x)
    t = time.perf_counter(); n = 10
    for _ in range(n): s.run(None, x)
    res[name] = (time.perf_counter() - t) / n * 1e3
    print(f"{name:18s} {res[name]:8.1f} ms per call")
ya = ort.InferenceSession(model(True), providers=["CPUExecutionProvider"]).run(None, x)[0]
yb = ort.InferenceSession(model(False), providers=["CPUExecutionProvider"]).run(None, x)[0]
print("identical outputs:", np.array_equal(ya, yb))
