"""A bidirectional RNN's W and R stored one tensor per direction (passes/split_directions.py): exact, and
each direction quantized with its own scales."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.tiny import model
from tqs_onnx.graph import load_model, weight_table
from tqs_onnx.prepare import prepare_graph
from tqs_onnx.rewrite import rewrite_model, save_model

H, IN = 16, 16  # each direction of every W and R holds at least 256 values: split
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def bidirectional(op: str, direction: str = "bidirectional", reverse_scale: float = 0.1, hidden: int = H,
                  inputs: int = IN) -> onnx.ModelProto:
    """y = op(x) over one step, both directions; the reverse weights `reverse_scale` times the forward's."""
    H, IN = hidden, inputs
    d = 2 if direction == "bidirectional" else 1
    r = np.random.default_rng(0)
    g = GATES[op]
    w = r.standard_normal((d, g * H, IN)).astype(np.float32)
    rr = r.standard_normal((d, g * H, H)).astype(np.float32) * 0.3
    if d == 2:
        w[1] *= reverse_scale
        rr[1] *= reverse_scale
    node = helper.make_node(op, ["x", "W", "R", "", "", "h0"], ["", "hn"], hidden_size=H, direction=direction)
    vi = helper.make_tensor_value_info
    return model([node], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rr, "R")],
                 [vi("x", TensorProto.FLOAT, [1, 1, IN]), vi("h0", TensorProto.FLOAT, [d, 1, H])],
                 [vi("hn", TensorProto.FLOAT, [d, 1, H])])


def run(m: onnx.ModelProto, d: int = 2) -> np.ndarray:
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 1, IN)).astype(np.float32),
             "h0": np.random.default_rng(2).standard_normal((d, 1, H)).astype(np.float32)}
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_each_direction_is_its_own_weight_and_the_outputs_are_bit_identical(op):
    m = bidirectional(op)
    prepared = prepare_graph(m)
    assert prepared.reports["split-directions"]["tensors"] == ["W", "R"]
    np.testing.assert_array_equal(run(prepared.model), run(m))
    weights = {w.name: w for w in weight_table(prepared.model, 16)}
    for name in ("W__forward", "W__reverse", "R__forward", "R__reverse"):
        w = weights[name]  # read through the Concat: the recurrent op's axes, per direction
        assert w.shape[0] == 1 and w.consumer_ops == [op] and w.channel_axis == 1 and w.quantizable


def test_a_forward_rnn_and_small_directions_are_left_alone():
    assert "split-directions" not in prepare_graph(bidirectional("LSTM", "forward")).reports
    # 64 values a direction: not quantized at the default size floor, the split would only add bytes
    assert "split-directions" not in prepare_graph(bidirectional("LSTM", hidden=4, inputs=4)).reports


def test_the_reverse_direction_keeps_its_own_scales_when_written(tmp_path):
    """Forward weights 10x the reverse ones: with scales shared by the two directions most of the reverse
    direction's int4 integers were zero (a new user's trial)."""
    m = bidirectional("LSTM", reverse_scale=0.1)
    onnx.save(m, tmp_path / "m.onnx")
    names = ["W__forward", "W__reverse", "R__forward", "R__reverse"]
    plan = {"kind": "tqs-plan", "schema_version": 1, "model": {}, "weights": dict.fromkeys(names, "int4/channel/load")}
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan)
    save_model(out, tmp_path / "q.onnx")
    written = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(written)
    written.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("W", "R")])
    sess = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": np.zeros((1, 1, IN), np.float32), "h0": np.zeros((2, 1, H), np.float32)}
    _, w_q, r_q = sess.run(None, feeds)
    original = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for name, q in (("W", w_q), ("R", r_q)):
        w = original[name]
        for d in range(2):  # each direction's error is that of int4 on its own range
            rel = np.linalg.norm(q[d] - w[d]) / np.linalg.norm(w[d])
            assert rel < 0.15, (name, d, rel)
    assert np.isfinite(run(onnx.load(tmp_path / "q.onnx"))).all()
