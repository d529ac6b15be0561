"""The narrowing pass (passes/narrow_ints.py): wide integer constants stored narrow with a Cast back,
outputs bit-identical, the bytes saved counted, and what must stay as it is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from tiny import init, model, vec
from tqs_onnx.passes.narrow_ints import NarrowIntegerConstants, narrowest


def scatter_model() -> onnx.ModelProto:
    """A cache update as exporters write it: ScatterND with an int64 index tensor, plus a Gather."""
    idx = np.stack(np.meshgrid(np.arange(4), np.arange(8), indexing="ij"), -1).astype(np.int64)  # (4, 8, 2)
    nodes = [helper.make_node("ScatterND", ["cache", "idx", "upd"], ["new_cache"]),
             helper.make_node("Gather", ["new_cache", "rows"], ["picked"]),
             helper.make_node("Reshape", ["picked", "shape"], ["y"])]
    inits = [init("idx", idx), init("rows", np.arange(20, dtype=np.int64) % 4),
             init("shape", np.array([1, 160], np.int64)),
             init("big", np.array([70000] * 20, np.int64))]  # needs 32 bits: int32
    nodes.append(helper.make_node("Cast", ["big"], ["bigf"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("ReduceSum", ["bigf"], ["s"], keepdims=0))
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 160]),
           helper.make_tensor_value_info("s", TensorProto.FLOAT, [])]
    ins = [helper.make_tensor_value_info("cache", TensorProto.FLOAT, [4, 8]),
           helper.make_tensor_value_info("upd", TensorProto.FLOAT, [4, 8])]
    return model(nodes, inits, ins, out)


def run(m: onnx.ModelProto, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_wide_integer_constants_are_stored_narrow_and_outputs_stay_bit_identical():
    m = scatter_model()
    feeds = {"cache": np.zeros((4, 8), np.float32), "upd": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
    before = run(m, feeds)
    size_before = m.ByteSize()
    result = NarrowIntegerConstants(size_floor=16).run(m)
    assert result.modified
    onnx.checker.check_model(result.model)
    stored = {t.name: t.data_type for t in result.model.graph.initializer}
    assert stored["idx__uint8"] == TensorProto.UINT8 and stored["big__int32"] == TensorProto.INT32
    assert stored["rows"] == TensorProto.INT64 and stored["shape"] == TensorProto.INT64  # Gather index; tiny
    assert result.report["bytes_saved"] == 64 * 7 + 20 * 4
    assert size_before - result.model.ByteSize() > result.report["bytes_saved"] - 200  # the Casts cost little
    after = run(result.model, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_inputs_outputs_and_small_savings_are_left_alone():
    m = model([helper.make_node("Add", ["x", "k"], ["y"])], [init("k", np.arange(8, dtype=np.int64))],
              [helper.make_tensor_value_info("x", TensorProto.INT64, [8])],
              [helper.make_tensor_value_info("y", TensorProto.INT64, [8])])
    assert not NarrowIntegerConstants(size_floor=16).run(m).modified  # 8 elements: below the floor
    m.graph.input.append(helper.make_tensor_value_info("k", TensorProto.INT64, [8]))
    assert not NarrowIntegerConstants(size_floor=1).run(m).modified  # a graph input may be fed
    assert narrowest(np.array([-1, 200])) == (np.int16, TensorProto.INT16)
    assert narrowest(np.array([0, 255])) == (np.uint8, TensorProto.UINT8)
    assert narrowest(np.array([], np.int64)) is None


def test_prepare_graph_narrows_and_apply_keeps_planned_equal_to_on_disk(tmp_path):
    """The pass runs with the other lossless passes: a quantized model written from it is the planned size."""
    import json

    from tqs_onnx.graph import load_model
    from tqs_onnx.prepare import prepare_graph

    W = np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32)
    idx = np.arange(64, dtype=np.int64).reshape(64, 1) % 32
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Reshape", ["h", "s"], ["h1"]),
             helper.make_node("ScatterND", ["h1", "idx", "u"], ["y1"]), helper.make_node("Reshape", ["y1", "s2"], ["y"])]
    m = model(nodes, [init("W", W), init("idx", idx[:32]), init("u", np.ones(32, np.float32)),
                      init("s", np.array([32], np.int64)), init("s2", np.array([1, 32], np.int64))],
              [vec("x", 32)], [vec("y", 32)])
    assert prepare_graph(m).reports["narrow-ints"]["narrowed"] == 1
    assert "narrow-ints" not in prepare_graph(m, factor=False).reports
    onnx.save(m, tmp_path / "m.onnx")
    spec = {"horizon": 3, "feedback": {"y": "x"}, "trajectory": ["y"]}
    (tmp_path / "m.rollout.json").write_text(json.dumps(spec))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(2).standard_normal((2, 1, 32)).astype(np.float32))
    from tqs_onnx.cli import main

    assert main(["sweep", str(tmp_path / "m.onnx"), "--rollout", str(tmp_path / "m.rollout.json"), "--contexts",
                 str(tmp_path / "c.npz"), "-o", str(tmp_path / "s.json"), "--quiet", "--probes", "1",
                 "--min-size", "16"]) == 0
    assert main(["allocate", str(tmp_path / "s.json"), "--tiers", "int8/channel", "--compression", "1",
                 "-o", str(tmp_path / "p.json"), "--quiet"]) == 0
    assert main(["apply", str(tmp_path / "m.onnx"), str(tmp_path / "p.json"), "-o", str(tmp_path / "q.onnx"),
                 "--quiet", "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["on_disk_compression"] == report["planned_compression"]
    assert load_model(tmp_path / "q.onnx").model.graph.initializer  # written, loads


def test_a_new_name_never_clashes_with_an_existing_value():
    m = scatter_model()
    # values already named like the pass's first and second choices
    m.graph.node.append(helper.make_node("Identity", ["s"], ["idx__uint8"]))
    m.graph.node.append(helper.make_node("Identity", ["s"], ["idx__uint8_1"]))
    result = NarrowIntegerConstants(size_floor=16).run(m)
    onnx.checker.check_model(result.model)
    assert "idx__uint8_2" in {t.name for t in result.model.graph.initializer}
