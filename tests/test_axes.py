"""Per-channel scales go on the axis that is the weight's output channel, however the graph reads it
(found by a review: through a Transpose, on a MatMul's left, in a grouped ConvTranspose)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tqs_onnx.graph import weight_table


def _axes(nodes, inputs, outputs, w: np.ndarray, opset: int = 17) -> tuple:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    (weight,) = [x for x in weight_table(m, min_size=1) if x.name == "W"]
    return weight.channel_axis, weight.block_axis


def test_a_weight_read_through_a_transpose_gets_its_output_channel_axis():
    w = np.zeros((32, 16), np.float32)  # stored (N, K), transposed to (K, N) for MatMul's B
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["y"])]
    assert _axes(nodes, [("x", [4, 16])], [("y", [4, 32])], w) == (0, 1)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"]), helper.make_node("Identity", ["Wt"], ["Wi"]),
             helper.make_node("MatMul", ["x", "Wi"], ["y"])]  # default perm reverses, Identity passes it on
    assert _axes(nodes, [("x", [4, 16])], [("y", [4, 32])], w) == (0, 1)


@pytest.mark.parametrize("op, attrs, shape, want", [
    ("MatMul", {}, (32, 16), (0, 1)),            # W (M, K) on the left: per output row
    ("Gemm", {}, (32, 16), (0, 1)),
    ("Gemm", {"transA": 1}, (16, 32), (1, 0)),   # stored (K, M)
])
def test_a_weight_on_the_left_gets_per_row_scales(op, attrs, shape, want):
    nodes = [helper.make_node(op, ["W", "x"], ["y"], **attrs)]
    assert _axes(nodes, [("x", [16, 4])], [("y", [32, 4])], np.zeros(shape, np.float32)) == want


@pytest.mark.parametrize("group, want", [(1, (1, 0)), (16, (0, 1))])
def test_conv_transpose_kernels_get_scales_per_output_channel_where_they_can(group, want):
    w = np.zeros((16, 16 // group if group > 1 else 8, 3, 3), np.float32)  # (C, M/group, k, k)
    out_c = 16 if group > 1 else 8
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=group)]
    assert _axes(nodes, [("x", [1, 16, 5, 5])], [("y", [1, out_c, 7, 7])], w) == want


def test_the_proposed_spec_pairs_names_first_over_all_outputs():
    from tqs_onnx.rollout import propose_spec

    io = ([1, 64], "float32")
    spec = propose_spec({"h": io, "c": io}, {"y": io, "h_out": io, "c_out": io})
    assert spec["feedback"] == {"h_out": "h", "c_out": "c"}
    spec = propose_spec({"h": io, "x": io}, {"y": io, "h_out": io})
    assert spec["feedback"] == {"y": "x", "h_out": "h"}
    assert propose_spec({"s": ([], "?")}, {"s_out": ([], "?")}) is None  # sequences are not fed back
    # a diagnostic output is not proposed as the next forcing input for its shape alone, where names pair
    spec = propose_spec({"h": io, "rain": io}, {"discharge": io, "h_next": io})
    assert spec["feedback"] == {"h_next": "h"} and spec["per_step"] == {"rain": "rain"}
    assert propose_spec({"rain": io}, {"discharge": io})["feedback"] == {"discharge": "rain"}  # no names pair
    # a decoder's key/value cache grows along a named axis: present* is fed back to past*, not followed
    kv = lambda n: ([1, 4, n, 8], "tensor(float)")  # noqa: E731
    x = ([1, 1, 32], "tensor(float)")
    spec = propose_spec({"x": x, "past_key": kv("past"), "past_value": kv("past")},
                        {"x_next": x, "present_key": kv("total"), "present_value": kv("total")})
    assert spec["feedback"] == {"x_next": "x", "present_key": "past_key", "present_value": "past_value"}
    assert spec["trajectory"] == ["x_next"]
    hf = propose_spec({"e": x, "past_key_values.0.key": kv("past"), "past_key_values.0.value": kv("past")},
                      {"h": x, "present.0.key": kv("total"), "present.0.value": kv("total")})
    assert hf["feedback"] == {"h": "e", "present.0.key": "past_key_values.0.key",
                              "present.0.value": "past_key_values.0.value"}


@pytest.mark.parametrize("inputs, outputs, trajectory", [
    (["x", "h", "c"], ["y", "h_next", "c_next"], ["y"]),           # the forecast, not the LSTM's states
    (["x", "h"], ["x_next", "h_next"], ["x_next"]),
    (["input", "h", "c"], ["speech_probs", "hn", "cn"], ["speech_probs"]),  # only states fed back
    (["input", "input_surface"], ["output", "output_surface"], ["output", "output_surface"]),
    (["state"], ["state_out"], ["state_out"]),                      # nothing else to follow
    (["x", "state1", "state2"], ["emb", "state1_out", "state2_out"], ["emb"]),  # a number on a state word
    (["x", "cache0", "h0"], ["y", "new_cache0", "h1"], ["y"]),
    (["x", "buf", "mems"], ["enc", "buf_out", "new_mems"], ["enc"]),
])
def test_the_proposed_trajectory_is_the_forecast_not_the_recurrent_state(inputs, outputs, trajectory):
    from tqs_onnx.rollout import propose_spec

    io = ([1, 64], "float32")
    ins = {i: io for i in inputs}
    outs = {o: (io if o != "speech_probs" else ([1], "float32")) for o in outputs}
    if "input" in ins and "speech_probs" in outs:
        ins["input"] = ([1, 512], "float32")
    spec = propose_spec(ins, outs)
    assert spec["trajectory"] == trajectory and set(spec["channel_axis"]) == set(trajectory)


def test_consumers_behind_a_transpose_chain_in_a_loop_body_are_found_every_time():
    """Seen-sets keyed by the ids of protobuf's short-lived node wrappers dropped them at random."""
    vi = lambda n, s, t=TensorProto.FLOAT: helper.make_tensor_value_info(n, t, s)  # noqa: E731
    body = helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["T1"], perm=[1, 0]), helper.make_node("Transpose", ["T1"], ["T2"], perm=[1, 0]),
         helper.make_node("Identity", ["T2"], ["T2i"]), helper.make_node("Transpose", ["T2i"], ["T3"]),
         helper.make_node("MatMul", ["s", "T3"], ["h"]), helper.make_node("Tanh", ["h"], ["s2"]),
         helper.make_node("Identity", ["c"], ["c2"])], "body",
        [vi("i", [], TensorProto.INT64), vi("c", [], TensorProto.BOOL), vi("s", [1, 32])],
        [vi("c2", [], TensorProto.BOOL), vi("s2", [1, 64])])
    g = helper.make_graph([helper.make_node("Loop", ["M", "C", "x"], ["x_next"], body=body)], "g",
                          [vi("x", [1, 32]), vi("M", [], TensorProto.INT64), vi("C", [], TensorProto.BOOL)],
                          [vi("x_next", [1, 64])],
                          [numpy_helper.from_array(np.zeros((64, 32), np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for _ in range(8):
        (w,) = [x for x in weight_table(onnx.load_from_string(m.SerializeToString()), min_size=1) if x.name == "W"]
        assert w.consumers and w.consumers[0].endswith("MatMul_4") and w.channel_axis == 0


def test_an_embedding_gets_a_scale_per_row_and_is_used_at_its_gather():
    """Indices from the graph's input: the Gather is where the table is used, one scale per row; the op
    reading the gathered rows (a MatMul here) neither sets the axes nor joins the table to its weight."""
    table = np.zeros((50, 16), np.float32)
    w2 = numpy_helper.from_array(np.zeros((16, 8), np.float32), "W2")
    nodes = [helper.make_node("Gather", ["W", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                          [numpy_helper.from_array(table, "W"), w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    from tqs_onnx.graph import make_blocks

    weights = {w.name: w for w in weight_table(m, min_size=1)}
    assert (weights["W"].channel_axis, weights["W"].block_axis) == (0, 1)
    assert weights["W"].consumer_ops == ["Gather"]
    assert sorted(len(b.weights) for b in make_blocks(list(weights.values()), "layer")) == [1, 1]
    nodes[0] = helper.make_node("Gather", ["W", "ids"], ["e"], axis=1)  # columns gathered: a scale per column
    assert _axes(nodes[:1], [("ids", [4])], [("e", [50, 4])], table)[0] == 1


def test_a_gather_through_constant_indices_is_still_followed():
    """A factored lookup (constant indices) belongs to the op reading the expanded tensor."""
    idx = numpy_helper.from_array(np.array([0, 1, 1, 0], np.int64), "idx")
    g = helper.make_graph([helper.make_node("Gather", ["W", "idx"], ["e"]), helper.make_node("Add", ["e", "x"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 300])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 300])],
                          [numpy_helper.from_array(np.zeros((2, 300), np.float32), "W"), idx])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    (w,) = [x for x in weight_table(m, min_size=1) if x.name == "W"]
    assert w.consumer_ops == ["Add"]


@pytest.mark.parametrize("equation, slot, shape, want", [
    ("bk,kn->bn", 1, (16, 32), (1, 0)),          # a MatMul as Einsum
    ("bk,nk->bn", 1, (32, 16), (0, 1)),          # stored (N, K)
    ("bhd,hdo->bho", 1, (4, 8, 32), (2, 1)),     # h is batch-like (in the input too): o is the channel
    ("bk,kn", 1, (16, 32), (1, 0)),              # implicit output 'bn'
    ("...k,kn->...n", 1, (16, 32), (1, 0)),      # the ellipsis is the other operand's
    ("...k,...kn->...n", 1, (16, 32), (1, 0)),   # an ellipsis in the weight: the default (last) axis
    ("bk,kk->bk", 1, (16, 16), (1, 0)),          # a repeated letter: the default
])
def test_einsum_weights_get_the_axis_the_equation_keeps(equation, slot, shape, want):
    x_shape = [2, shape[0]] if equation.startswith("bk") or equation.startswith("...k") else [2, 4, 8]
    if equation == "bk,nk->bn":
        x_shape = [2, 16]
    ins = ["x", "W"] if slot == 1 else ["W", "x"]
    nodes = [helper.make_node("Einsum", ins, ["y"], equation=equation)]
    assert _axes(nodes, [("x", x_shape)], [("y", None)], np.zeros(shape, np.float32), opset=17) == want


@pytest.mark.parametrize("op, shape, quantizable", [
    ("Add", (1, 512), False), ("Add", (512, 1), False), ("Add", (1, 1, 512), False), ("Add", (2, 512), True),
    ("MatMul", (512, 1), True),    # a matrix with one output column: one scale
    ("MatMul", (1, 512), True),    # one input row: still a matrix (per-tensor and blocked tiers apply)
    ("Gemm", (512, 1), False),     # Gemm's C: a bias
])
def test_row_and_column_vectors_are_vectors(op, shape, quantizable):
    x_shape = list(shape) if op == "Add" else [3, shape[0]] if op == "MatMul" else [512, 4]
    ins = ["x", "W"] if op != "Gemm" else ["x", "B", "W"]
    inits = [] if op != "Gemm" else [numpy_helper.from_array(np.ones((4, 1), np.float32), "B")]
    g = helper.make_graph([helper.make_node(op, ins, ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.ones(shape, np.float32), "W"), *inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    (w,) = [x for x in weight_table(m, min_size=1) if x.name == "W"]
    assert w.quantizable is quantizable
    assert quantizable or w.reason.startswith("vector")


@pytest.mark.parametrize("direction, dirs", [("forward", 1), ("bidirectional", 2)])
def test_rnn_biases_are_vectors(direction, dirs):
    hidden, inp = 8, 4
    nodes = [helper.make_node("LSTM", ["x", "Wx", "R", "W"], ["y"], hidden_size=hidden, direction=direction)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1, inp])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.zeros((dirs, 8 * hidden), np.float32), "W"),
                           numpy_helper.from_array(np.zeros((dirs, 4 * hidden, inp), np.float32), "Wx"),
                           numpy_helper.from_array(np.zeros((dirs, 4 * hidden, hidden), np.float32), "R")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    weights = {w.name: w for w in weight_table(m, min_size=1)}
    assert not weights["W"].quantizable and weights["W"].reason.startswith("vector")
    assert weights["Wx"].quantizable and weights["R"].quantizable


def test_a_univariate_rnn_input_weight_is_a_matrix():
    """W (1, 4H, 1) of an LSTM with one input feature has one non-unit axis but is a weight matrix."""
    hidden = 64
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.zeros((1, 4 * hidden, 1), np.float32), "W"),
                           numpy_helper.from_array(np.zeros((1, 4 * hidden, hidden), np.float32), "R")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert all(w.quantizable for w in weight_table(m, min_size=1))


def test_scopes_decide_whether_gather_indices_are_constant():
    """Two sibling If branches bind `idx`, one to a Constant, one to a computed value: only the first
    Gather is a constant lookup. Indices computed from constants alone (an Unsqueeze) are constant."""
    from tqs_onnx.graph import scope_constants

    vi = helper.make_tensor_value_info
    then_b = helper.make_graph([helper.make_node("Constant", [], ["idx"], value=numpy_helper.from_array(
        np.array([0, 1], np.int64))), helper.make_node("Gather", ["E", "idx"], ["g1"]),
        helper.make_node("MatMul", ["g1", "M"], ["o1"])], "then", [], [vi("o1", TensorProto.FLOAT, [2, 32])])
    else_b = helper.make_graph([helper.make_node("Cast", ["ids"], ["idx"], to=TensorProto.INT64),
                                helper.make_node("Gather", ["E", "idx"], ["o2"])], "else", [],
                               [vi("o2", TensorProto.FLOAT, [2, 32])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then_b, else_branch=else_b)], "g",
                          [vi("c", TensorProto.BOOL, []), vi("ids", TensorProto.INT32, [2])],
                          [vi("y", TensorProto.FLOAT, [2, 32])],
                          [numpy_helper.from_array(np.zeros((16, 32), np.float32), "E"),
                           numpy_helper.from_array(np.zeros((32, 32), np.float32), "M")])
    scopes = scope_constants(g)
    assert "idx" in scopes["If_0/then_branch/"] and "idx" not in scopes["If_0/else_branch/"]
    (w,) = [x for x in weight_table(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), min_size=1)
            if x.name == "E"]
    assert sorted(w.consumer_ops) == ["Gather", "MatMul"]  # the then-branch lookup followed, the else one not
    idx = numpy_helper.from_array(np.array(1, np.int64), "i0")
    nodes = [helper.make_node("Unsqueeze", ["i0", "ax"], ["idx"]), helper.make_node("Gather", ["W", "idx"], ["e"]),
             helper.make_node("Add", ["e", "x"], ["y"])]
    g = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [1, 300])], [vi("y", TensorProto.FLOAT, [1, 300])],
                          [numpy_helper.from_array(np.zeros((4, 300), np.float32), "W"), idx,
                           numpy_helper.from_array(np.array([0], np.int64), "ax")])
    (w,) = [x for x in weight_table(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), min_size=1)
            if x.name == "W"]
    assert w.consumer_ops == ["Add"]  # followed: a constant lookup, not an embedding


@pytest.mark.parametrize("constant_first", [True, False])
def test_two_body_nodes_of_one_name_are_two_scopes(constant_first):
    """Two Ifs named 'sel' in one Loop body, one gathering by a Constant, one by computed indices:
    each Gather is judged in its own branch (the scopes were keyed by name and one overwrote the other)."""
    vi = helper.make_tensor_value_info

    def sel(tag: str, constant: bool) -> onnx.NodeProto:
        idx = (helper.make_node("Constant", [], ["idx"], value=numpy_helper.from_array(np.array([0, 1], np.int64)))
               if constant else helper.make_node("Cast", ["ids"], ["idx"], to=TensorProto.INT64))
        then_b = helper.make_graph([idx, helper.make_node("Gather", ["T", "idx"], [f"g{tag}"]),
                                    helper.make_node("MatMul", [f"g{tag}", "M"], [f"o{tag}"])], f"then{tag}", [],
                                   [vi(f"o{tag}", TensorProto.FLOAT, [2, 32])])
        else_b = helper.make_graph([helper.make_node("Constant", [], [f"e{tag}"], value=numpy_helper.from_array(
            np.zeros((2, 32), np.float32)))], f"else{tag}", [], [vi(f"e{tag}", TensorProto.FLOAT, [2, 32])])
        return helper.make_node("If", ["c"], [f"y{tag}"], name="sel", then_branch=then_b, else_branch=else_b)

    pair = [sel("a", True), sel("b", False)]
    body = helper.make_graph(
        [helper.make_node("Transpose", ["E"], ["T"], perm=[1, 0]), *(pair if constant_first else pair[::-1]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, [])],
        [vi("cond_out", TensorProto.BOOL, []), vi("ya", TensorProto.FLOAT, [2, 32]), vi("yb", TensorProto.FLOAT, [2, 32])])
    g = helper.make_graph([helper.make_node("Loop", ["n", ""], ["sa", "sb"], body=body)], "g",
                          [vi("n", TensorProto.INT64, []), vi("c", TensorProto.BOOL, []), vi("ids", TensorProto.INT32, [2])],
                          [vi("sa", TensorProto.FLOAT, ["N", 2, 32]), vi("sb", TensorProto.FLOAT, ["N", 2, 32])],
                          [numpy_helper.from_array(np.zeros((32, 16), np.float32), "E"),
                           numpy_helper.from_array(np.zeros((32, 32), np.float32), "M")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    (e,) = [w for w in weight_table(m, min_size=1) if w.name == "E"]
    assert sorted(e.consumer_ops) == ["Gather", "MatMul"]
    assert len(set(e.consumers)) == 2  # two nodes, two names (sel, sel#2)


def test_a_state_held_fixed_beside_its_next_value_gets_a_hint():
    from tqs_onnx.rollout import RolloutSpec

    io = ([1, 64], "float32")
    ins, outs = {"x": io, "h": io, "input_2": io}, {"x_next": io, "h_next": io, "activation_2": io}
    spec = RolloutSpec.from_dict({"horizon": 5, "feedback": {"x_next": "x"}, "trajectory": ["x_next"],
                                  "initial": {"x": "x0"}, "fixed": {"h": "h0"}, "per_step": {"input_2": "a"}})
    (hint,) = spec.hints(ins, outs)  # not activation_2 -> input_2: a shared number is not a name
    assert "'h_next'" in hint and "'h'" in hint and "held fixed" in hint
    fed = RolloutSpec.from_dict({"horizon": 5, "feedback": {"x_next": "x", "h_next": "h"}, "trajectory": ["x_next"],
                                 "initial": {"x": "x0", "h": "h0"}, "per_step": {"input_2": "a"}})
    assert fed.hints(ins, outs) == []


def test_the_proposed_trajectory_is_a_float_output():
    from tqs_onnx.rollout import propose_spec

    io = ([1, 64], "float32")
    spec = propose_spec({"x": ([1, 8], "float32"), "h": io}, {"label": ([1], "int64"), "hn": io})
    assert spec["trajectory"] == ["hn"]  # not the class label
    spec = propose_spec({"x": io, "h": io, "step": ([1], "int64")},
                        {"y": io, "h_out": io, "step_out": ([1], "int64")})
    assert spec["feedback"]["step_out"] == "step" and spec["trajectory"] == ["y"]  # not the step counter
    d = ([1, 64], "tensor(double)")  # a float64 model (ORT's type names): the same proposal
    spec = propose_spec({"x": d, "h": d, "step": ([1], "tensor(int64)")},
                        {"x_next": d, "h_next": d, "step_next": ([1], "tensor(int64)")})
    assert spec["trajectory"] == ["x_next"]


@pytest.mark.parametrize("op, shape, want", [("Conv", (8, 4, 3, 3), (0, 1)), ("ConvTranspose", (4, 8, 3, 3), (1, 0))])
def test_a_kernel_cast_to_float16_before_use_keeps_its_output_channel_axis(op, shape, want):
    """Float16 compute of float32 weights (an autocast export): Cast changes the values' type, not their
    axes (found by a new user's trial: the scales went along the kernel's width)."""
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["W"], ["W16"], to=TensorProto.FLOAT16),
             helper.make_node(op, ["x16", "W16"], ["y16"]), helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    assert _axes(nodes, [("x", [1, 4 if op == "Conv" else 4, 6, 6])], [("y", None)], np.zeros(shape, np.float32)) == want


def test_the_proposed_channel_axis_of_a_grid_is_axis_1():
    from tqs_onnx.rollout import propose_spec

    grid, seq = ([1, 4, 16, 16], "float32"), ([1, 8, 3], "float32")
    spec = propose_spec({"state": grid, "h": seq}, {"next_state": grid, "h_next": seq})
    assert spec["channel_axis"]["next_state"] == 1 and spec["channel_axis"].get("h_next", -1) == -1
    assert propose_spec({"x": seq}, {"x_next": seq})["channel_axis"] == {"x_next": -1}


def test_floats_cast_to_integers_and_dequantize_scales_are_kept_exact():
    """An edge index stored as floats and cast to int64 before a Gather (at int8, 153 of 200 edges
    pointed at other nodes), and the blocked scales of an INT4 weight a vendor already quantized
    (they were re-quantized to int8 and ranked the most sensitive block), are not quantizable."""
    rng = np.random.default_rng(0)
    edges = rng.integers(0, 50, (2, 200)).astype(np.float32)
    q = rng.integers(-8, 8, (256, 64)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, (8, 64)).astype(np.float32)
    dense = rng.standard_normal((64, 64)).astype(np.float32)
    h = helper.make_node
    nodes = [h("Cast", ["E"], ["Ei"], to=TensorProto.INT64), h("Gather", ["x", "Ei"], ["xe"], axis=0),
             h("ReduceSum", ["xe"], ["s"], keepdims=0),
             h("DequantizeLinear", ["Q", "S"], ["Wq"], axis=0, block_size=32), h("MatMul", ["y", "Wq"], ["a"]),
             h("MatMul", ["a", "D"], ["b"])]
    inits = [numpy_helper.from_array(edges, "E"), numpy_helper.from_array(q, "Q"),
             numpy_helper.from_array(scales, "S"), numpy_helper.from_array(dense, "D")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [50, 4]),
                                       helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
                          [helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 64])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    table = {w.name: w for w in weight_table(m)}
    assert not table["E"].quantizable and table["E"].reason.startswith("cast to int64")
    assert not table["S"].quantizable and table["S"].reason.startswith("scale, zero point or bias of a DequantizeLinear")
    assert table["D"].quantizable


def test_a_table_read_through_a_gather_of_constant_rows_keeps_its_row_axis():
    """An embedding gathered by constant 1-D node ids, then a MatMul's left operand: one scale per
    node (row), as the same table read directly gets (it got one per feature, and small nodes' rows
    rounded to zero at int4). 2-D indices reshape the rows: no axis is carried."""
    t = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    vi = helper.make_tensor_value_info
    for ids, want in ((np.arange(50)[::-1], (0, 1)), (np.arange(50).reshape(5, 10), (1, 0))):
        nodes = [helper.make_node("Gather", ["T", "ids"], ["rows"], axis=0), helper.make_node("MatMul", ["rows", "x"], ["y"])]
        g = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [16, 4])], [vi("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(t, "T"), numpy_helper.from_array(ids.astype(np.int64), "ids")])
        (w,) = [x for x in weight_table(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])) if x.name == "T"]
        assert (w.channel_axis, w.block_axis) == want  # 2-D indices: the default last axis, not the rows


def test_a_cast_to_float8_is_no_index_and_contrib_quantized_scales_are_kept():
    """Only integer and bool casts mark indices (a float8 cast was kept exact as 'indices or counts');
    the 2-D scales of ORT's MatMulNBits, a vendor's 4-bit weight, are kept as stored."""
    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Cast", ["W"], ["W8"], to=TensorProto.FLOAT8E4M3FN),
             helper.make_node("Cast", ["W8"], ["Wf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "Wf"], ["a"]),
             helper.make_node("MatMulNBits", ["a", "B", "S"], ["y"], domain="com.microsoft", K=16, N=64, bits=4,
                              block_size=16)]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros((64, 1, 8), np.uint8), "B"),
             numpy_helper.from_array(np.ones((64, 4), np.float32), "S")]
    g = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [1, 16])], [vi("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    table = {x.name: x for x in weight_table(m, min_size=16)}
    assert table["W"].quantizable
    assert not table["S"].quantizable and "MatMulNBits (already quantized)" in table["S"].reason
