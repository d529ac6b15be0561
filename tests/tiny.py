"""Tiny models built with onnx.helper for the tests, and a helper to save them with a rollout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def model(nodes, inits, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def vec(name: str, n: int, batch: int = 1):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, n])


def save_case(tmp: Path, m: onnx.ModelProto, spec: dict, contexts: dict[str, np.ndarray], name: str = "m") -> dict[str, Path]:
    paths = {"model": tmp / f"{name}.onnx", "spec": tmp / f"{name}.rollout.json", "contexts": tmp / f"{name}.npz"}
    onnx.save(m, paths["model"])
    paths["spec"].write_text(json.dumps(spec))
    np.savez(paths["contexts"], **contexts)
    return paths


def rng_weights(seed: int, *shapes, scale: float = 0.3) -> list[np.ndarray]:
    r = np.random.default_rng(seed)
    return [(r.standard_normal(s) * scale / np.sqrt(s[0])).astype(np.float32) for s in shapes]


def recurrent_mlp(n: int = 16, h: int = 32, dead_branch: bool = False, damp: float | None = None, seed: int = 0):
    """x_next = 0.9 x + tanh(x W1) W2 [+ 0 * (x Wd)] [+ damp * (x Wm)]: a small dynamical system."""
    w1, w2, wd, wm = rng_weights(seed, (n, h), (h, n), (n, n), (n, n))
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="/l1/MatMul"),
             helper.make_node("Tanh", ["a"], ["b"], name="/l1/Tanh"),
             helper.make_node("MatMul", ["b", "W2"], ["c"], name="/l2/MatMul"),
             helper.make_node("Mul", ["x", "k"], ["xs"], name="/skip/Mul"),
             helper.make_node("Add", ["xs", "c"], ["y0"], name="/out/Add")]
    inits = [init("W1", w1), init("W2", w2), init("k", np.float32(0.9))]
    last = "y0"
    if dead_branch:
        nodes += [helper.make_node("MatMul", ["x", "Wd"], ["d"], name="/dead/MatMul"),
                  helper.make_node("Mul", ["d", "zero"], ["dz"], name="/dead/Mul"),
                  helper.make_node("Add", [last, "dz"], ["y1"], name="/dead/Add")]
        inits += [init("Wd", wd), init("zero", np.float32(0.0))]
        last = "y1"
    if damp is not None:
        nodes += [helper.make_node("MatMul", ["x", "Wm"], ["m"], name="/damped/MatMul"),
                  helper.make_node("Mul", ["m", "damp"], ["mz"], name="/damped/Mul"),
                  helper.make_node("Add", [last, "mz"], ["y2"], name="/damped/Add")]
        inits += [init("Wm", wm), init("damp", np.float32(damp))]
        last = "y2"
    nodes.append(helper.make_node("Identity", [last], ["x_next"], name="/out/Identity"))
    return model(nodes, inits, [vec("x", n)], [vec("x_next", n)])


def growing_state_model() -> onnx.ModelProto:
    """y = concat(tanh(x), c W): a fed-back state one element longer at every step; z = sum(y) keeps
    its shape."""
    h = helper.make_node
    return model([h("Tanh", ["x"], ["t"]), h("MatMul", ["c", "W"], ["u"]), h("Reshape", ["u", "one"], ["w1"]),
                  h("Concat", ["t", "w1"], ["y"], axis=0), h("ReduceSum", ["y"], ["z"], keepdims=1)],
                 [init("W", np.random.default_rng(3).standard_normal((32, 1)).astype(np.float32)),
                  init("c", np.full((1, 32), 0.1, np.float32)), init("one", np.array([1], np.int64))],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m"]),
                  helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])


def recurrent_spec(horizon: int = 8) -> dict:
    return {"horizon": horizon, "feedback": {"x_next": "x"}, "trajectory": ["x_next"], "initial": {"x": "x0"}}


def recurrent_contexts(n: int = 16, s: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x0": np.random.default_rng(seed).standard_normal((s, 1, n)).astype(np.float32)}


def joint_divergence(paths: dict[str, Path], other: Path, output: str = "x_next") -> float:
    """The joint check's figure for model `other` against the case's model, rolled out on its contexts
    (CPU): the squared divergence summed over steps and elements, averaged over contexts."""
    from tqs_onnx.evaluate import rollouts
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import resolve_device

    spec = RolloutSpec.load(paths["spec"])
    ctx = Contexts.load(paths["contexts"], spec)
    dev = resolve_device("cpu")
    a, b = rollouts(paths["model"], spec, ctx, dev), rollouts(other, spec, ctx, dev)
    d = (a[output] - b[output]).astype(np.float64)
    return float(np.mean(np.sum(d ** 2, axis=tuple(range(1, d.ndim)))))
