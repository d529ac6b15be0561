"""The lossless passes and the opset raise keep what a model computes where names, scopes and opsets
make that easy to get wrong: subgraph names that shadow or collide, forged stub marks, node names,
Constant(value_floats), IR 3 listings, version-converter adapters that change meaning, and outputs
that are non-finite by design."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from tqs_onnx.cli import main
from tqs_onnx.prepare import prepare_graph


def _vi(name: str, shape=(32,), dtype=TP.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _model(graph: onnx.GraphProto, opset: int = 17, ir: int = 9) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    onnx.checker.check_model(m, full_check=True)
    return m


def _run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


def _apply_empty(tmp_path, model: onnx.ModelProto, name: str = "m") -> tuple[int, str]:
    """`apply` with a plan that changes no weight: only the lossless passes run."""
    path, plan, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}.plan.json", tmp_path / f"{name}.out.onnx"
    onnx.save(model, path)
    plan.write_text(json.dumps({"kind": "tqs-plan", "model": {}, "weights": {}}))
    return main(["apply", str(path), str(plan), "-o", str(out), "--quiet"]), str(out)


def _loop(body: onnx.GraphProto, outer: list, init: list) -> onnx.GraphProto:
    nodes = [helper.make_node("Loop", ["n", "", "x"], ["acc"], body=body), *outer]
    return helper.make_graph(nodes, "g", [_vi("x"), _vi("n", [], TP.INT64)], [_vi("y")], init)


LOOP_FEEDS = {"x": np.zeros(32, np.float32), "n": np.array(3, np.int64)}


def _adding_body(a: str, b: str, carried: str, inits: tuple = ()) -> onnx.GraphProto:
    """A Loop body carrying `carried` that outputs a + b (names as the body resolves them)."""
    return helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]),
                              helper.make_node("Add", [a, b], ["acc_out"])], "body",
                             [_vi("i", [], TP.INT64), _vi("c_in", [], TP.BOOL), _vi(carried)],
                             [_vi("c_out", [], TP.BOOL), _vi("acc_out")], list(inits))


def test_a_merge_into_a_name_that_a_loop_body_binds_is_refused(tmp_path):
    """K and Q are equal; the body reads Q and has an input named K: rewiring Q to K would make the body
    read its own input."""
    c = np.full(32, 100, np.float32)
    body = _adding_body("K", "Q", carried="K")
    m = _model(_loop(body, [helper.make_node("Add", ["acc", "K"], ["y"])],
                     [numpy_helper.from_array(c, "K"), numpy_helper.from_array(c.copy(), "Q")]))
    want = _run(m, LOOP_FEEDS)
    assert _same_bits(_run(prepare_graph(m).model, LOOP_FEEDS), want)
    rc, out = _apply_empty(tmp_path, m)
    assert rc == 0 and _same_bits(_run(out, LOOP_FEEDS), want)


def test_a_merge_into_a_subgraph_still_happens_where_no_name_is_shadowed():
    c = np.full(32, 100, np.float32)
    body = _adding_body("s", "Q", carried="s")
    m = _model(_loop(body, [helper.make_node("Add", ["acc", "K"], ["y"])],
                     [numpy_helper.from_array(c, "K"), numpy_helper.from_array(c.copy(), "Q")]))
    prepared = prepare_graph(m)
    assert prepared.reports["dedup"]["tensors_removed"] == 1
    assert _same_bits(_run(prepared.model, LOOP_FEEDS), _run(m, LOOP_FEEDS))


def test_a_lifted_initializer_is_not_renamed_into_a_name_a_loop_body_binds():
    """The body's own W would be lifted as W_1 (the main graph has a W), a name the body binds as input."""
    body = _adding_body("W_1", "W", carried="W_1", inits=(numpy_helper.from_array(np.full(32, 100, np.float32), "W"),))
    m = _model(_loop(body, [helper.make_node("Add", ["acc", "W"], ["y"])],
                     [numpy_helper.from_array(np.arange(32, dtype=np.float32), "W")]))
    prepared = prepare_graph(m)
    assert len(prepared.model.graph.initializer) == 2
    assert set(prepared.origins.values()) == {"subgraph"}
    assert prepared.origins.keys() <= {i.name for i in prepared.model.graph.initializer}
    assert _same_bits(_run(prepared.model, LOOP_FEEDS), _run(m, LOOP_FEEDS))


def test_a_lifted_initializer_does_not_clash_with_a_sibling_branch_value(tmp_path):
    then_g = helper.make_graph([helper.make_node("Add", ["x", "V"], ["t_out"])], "then", [], [_vi("t_out")],
                               [numpy_helper.from_array(np.arange(32, dtype=np.float32), "V")])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["V"]), helper.make_node("Abs", ["V"], ["e_out"])],
                               "else", [], [_vi("e_out")])
    g = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
                          [_vi("x"), _vi("cond", [], TP.BOOL)], [_vi("y")])
    m = _model(g)
    for cond in (True, False):
        feeds = {"x": np.linspace(-1, 1, 32).astype(np.float32), "cond": np.array(cond)}
        assert _same_bits(_run(prepare_graph(m).model, feeds), _run(m, feeds))
    rc, _ = _apply_empty(tmp_path, m)
    assert rc == 0


def test_constant_value_floats_is_a_weight_like_constant_value():
    floats = np.random.default_rng(0).standard_normal(1024).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W"], value_floats=floats.tolist()),
             helper.make_node("Add", ["x", "W"], ["y"])]
    m = _model(helper.make_graph(nodes, "g", [_vi("x", (1024,))], [_vi("y", (1024,))]))
    prepared = prepare_graph(m)
    assert prepared.origins == {"W": "constant"}
    assert [i.name for i in prepared.model.graph.initializer] == ["W"]
    x = {"x": np.ones(1024, np.float32)}
    assert _same_bits(_run(prepared.model, x), _run(m, x))


def test_a_doc_string_that_looks_like_a_stub_mark_is_only_a_doc_string(tmp_path):
    big = np.random.default_rng(1).standard_normal(2048).astype(np.float32)
    small = np.arange(16, dtype=np.float32)
    b = numpy_helper.from_array(small, "B")
    b.doc_string = "tqs-detached:0"
    a = numpy_helper.from_array(big, "A")
    nodes = [helper.make_node("Add", ["x", "A"], ["y"]), helper.make_node("Add", ["z", "B"], ["w"])]
    m = _model(helper.make_graph(nodes, "g", [_vi("x", (2048,)), _vi("z", (16,))], [_vi("y", (2048,)), _vi("w", (16,))],
                                 [a, b]))
    feeds = {"x": np.ones(2048, np.float32), "z": np.ones(16, np.float32)}
    assert _same_bits(_run(prepare_graph(m).model, feeds), _run(m, feeds))
    b.doc_string = "tqs-detached: not a number"
    m.graph.initializer[1].CopyFrom(b)
    assert main(["inspect", str(_save(tmp_path, m))]) == 0


def _save(tmp_path, m: onnx.ModelProto):
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    return path


def test_narrowed_integer_constants_get_node_names_of_their_own():
    idx = np.arange(100, dtype=np.int64) % 7
    nodes = [helper.make_node("Identity", ["x"], ["I__uint8/Cast"], name="I__uint8/Cast"),
             helper.make_node("Add", ["I", "I__uint8/Cast"], ["y"])]
    m = _model(helper.make_graph(nodes, "g", [_vi("x", (100,), TP.INT64)], [_vi("y", (100,), TP.INT64)],
                                 [numpy_helper.from_array(idx, "I")]))
    prepared = prepare_graph(m)
    names = [n.name for n in prepared.model.graph.node]
    assert prepared.reports["narrow-ints"]["narrowed"] == 1 and len(names) == len(set(names))
    feeds = {"x": np.arange(100, dtype=np.int64)}
    assert _same_bits(_run(prepared.model, feeds), _run(m, feeds))


def test_an_ir3_model_gets_the_lossless_passes_too():
    c = np.random.default_rng(2).standard_normal(4096).astype(np.float32)
    nodes = [helper.make_node("Add", ["x", "A"], ["a"]), helper.make_node("Add", ["a", "B"], ["y"])]
    inits = [numpy_helper.from_array(c, "A"), numpy_helper.from_array(c.copy(), "B")]
    g = helper.make_graph(nodes, "g", [_vi("x", (4096,)), _vi("A", (4096,)), _vi("B", (4096,))],
                          [_vi("y", (4096,))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)])
    m.ir_version = 3
    prepared = prepare_graph(m)
    assert prepared.model.ir_version == 4 and [i.name for i in prepared.model.graph.input] == ["x"]
    assert prepared.reports["dedup"]["tensors_removed"] == 1


def _upsample_opset9() -> tuple[onnx.ModelProto, np.ndarray]:
    w = np.random.default_rng(0).integers(-7, 8, (2, 3, 8, 8)).astype(np.float32)
    w.flat[0] = 7  # int4 with scale 1: the weight itself is stored exactly
    nodes = [helper.make_node("Add", ["x", "W"], ["a"]), helper.make_node("Upsample", ["a", "sc"], ["y"], mode="linear")]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")]
    g = helper.make_graph(nodes, "g", [_vi("x", (2, 3, 8, 8))], [_vi("y", (2, 3, 16, 16))], inits)
    return _model(g, opset=9, ir=5), w


def test_an_opset_conversion_that_changes_the_outputs_is_refused(tmp_path, capsys):
    """onnx's converter turns opset-9 Upsample(linear), asymmetric, into a half-pixel Resize."""
    m, _ = _upsample_opset9()
    path, plan = _save(tmp_path, m), tmp_path / "p.json"
    plan.write_text(json.dumps({"kind": "tqs-plan", "model": {}, "weights": {"W": "int4"}}))
    out = tmp_path / "o.onnx"
    assert main(["apply", str(path), str(plan), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "version converter changed what the model computes" in err and "from 9 to 21" in err
    assert not out.exists()


def test_an_opset_conversion_that_keeps_the_outputs_is_checked_and_reported(tmp_path):
    w = np.random.default_rng(0).integers(-7, 8, (16, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    m = _model(helper.make_graph(nodes, "g", [_vi("x", (4, 16))], [_vi("y", (4, 16))],
                                 [numpy_helper.from_array(w, "W")]), opset=11, ir=6)
    path, plan, report = _save(tmp_path, m), tmp_path / "p.json", tmp_path / "r.json"
    plan.write_text(json.dumps({"kind": "tqs-plan", "model": {}, "weights": {"W": "int4"}}))
    assert main(["apply", str(path), str(plan), "-o", str(tmp_path / "o.onnx"), "--report", str(report),
                 "--quiet"]) == 0
    check = json.loads(report.read_text())["passes"]["upgrade-opset"]["check"]
    assert check["checked"] and check["from"] == 11 and check["to"] == 21 and check["max_rel_err"] <= 1e-4


@pytest.mark.parametrize("value", [-np.inf, np.nan])
def test_outputs_non_finite_by_design_do_not_block_apply(tmp_path, value):
    w = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    mask = np.zeros((4, 64), np.float32)
    mask[:, ::2] = value
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Add", ["a", "M"], ["y"])]
    m = _model(helper.make_graph(nodes, "g", [_vi("x", (4, 64))], [_vi("y", (4, 64))],
                                 [numpy_helper.from_array(w, "W"), numpy_helper.from_array(mask, "M")]), opset=21, ir=10)
    path, plan = _save(tmp_path, m), tmp_path / "p.json"
    plan.write_text(json.dumps({"kind": "tqs-plan", "model": {}, "weights": {"W": "int8/channel"}}))
    assert main(["apply", str(path), str(plan), "-o", str(tmp_path / "o.onnx"), "--quiet"]) == 0
    # non-finite values where the original's are finite are still refused
    from tqs_onnx.errors import TqsError
    from tqs_onnx.evaluate import verify_written
    from tqs_onnx.runtime import Device

    shifted = tmp_path / "shifted.onnx"
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.roll(mask, 1, axis=1), "M"))
    onnx.save(m, shifted)
    assert verify_written(shifted, Device("cpu"), reference=shifted)["nonfinite_as_original"]
    with pytest.raises(TqsError, match="non-finite"):
        verify_written(shifted, Device("cpu"), reference=path)
    other = tmp_path / "other.onnx"  # the same places, another kind: NaN for -inf, or the reverse
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.where(np.isnan(mask), -np.inf, np.where(
        np.isinf(mask), np.nan, mask)).astype(np.float32), "M"))
    onnx.save(m, other)
    with pytest.raises(TqsError, match="non-finite"):
        verify_written(other, Device("cpu"), reference=path)


def test_an_opset_conversion_is_checked_on_more_than_one_pixel(tmp_path, capsys):
    """With dynamic image sizes as 1, opset 9's Upsample and the Resize it became agree."""
    m, _ = _upsample_opset9()
    for vi in (*m.graph.input, *m.graph.output):
        for d, sym in zip(vi.type.tensor_type.shape.dim[2:], ("h", "w")):
            d.dim_param = sym
    path, plan = _save(tmp_path, m), tmp_path / "p.json"
    plan.write_text(json.dumps({"kind": "tqs-plan", "model": {}, "weights": {}}))
    w = np.random.default_rng(0).integers(-7, 8, (2, 3, 8, 8)).astype(np.float32)
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w[:, :, :1, :1].copy(), "W"))  # broadcasts
    onnx.save(m, path)
    plan.write_text(json.dumps({"kind": "tqs-plan", "model": {}, "weights": {"W": "int4"}}))
    assert main(["apply", str(path), str(plan), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "version converter changed" in capsys.readouterr().err


def test_weights_renamed_by_lift_can_be_written(tmp_path):
    """Both branches hold a Constant W: the prepared graph has W and W__1, and a plan may name either."""
    def branch(tag: str, value: float) -> onnx.GraphProto:
        w = np.full((16, 16), value, np.float32) + np.eye(16, dtype=np.float32)
        return helper.make_graph([helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w)),
                                  helper.make_node("MatMul", ["x", "W"], [f"{tag}_out"])], tag, [],
                                 [_vi(f"{tag}_out", (4, 16))])
    g = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 1.0),
                                            else_branch=branch("else", 2.0))], "g",
                          [_vi("x", (4, 16)), _vi("cond", [], TP.BOOL)], [_vi("y", (4, 16))])
    m = _model(g)
    names = {i.name for i in prepare_graph(m).model.graph.initializer}
    assert names == {"W", "W__1"}
    path, plan = _save(tmp_path, m), tmp_path / "p.json"
    plan.write_text(json.dumps({"kind": "tqs-plan", "model": {}, "weights": {"W": "int8", "W__1": "int8"}}))
    assert main(["apply", str(path), str(plan), "-o", str(tmp_path / "o.onnx"), "--quiet"]) == 0


def _typed_branch(name: str, to: int, out: str) -> onnx.GraphProto:
    """A branch casting x to `to`, with value_info declaring the cast's real type."""
    nodes = [helper.make_node("Cast", ["x"], ["t"], to=to), helper.make_node("Identity", ["t"], [out])]
    return helper.make_graph(nodes, name, [], [_vi(out, (16,), to)], value_info=[_vi("t", (16,), to)])


def test_subgraph_value_info_stays_with_its_node_when_lifting_shifts_unnamed_nodes():
    """Two unnamed Ifs after an unnamed Constant: lifting the Constant moves them up one place, and
    their branches' value_info (float32 and int64 casts) must not trade places (ORT refused that)."""
    const = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(np.arange(16, dtype=np.float32)))
    nodes = [const, helper.make_node("Add", ["x", "w"], ["y0"]),
             helper.make_node("If", ["cond"], ["a"], then_branch=_typed_branch("t1", TP.FLOAT, "a1"),
                              else_branch=_typed_branch("e1", TP.FLOAT, "a2")),
             helper.make_node("If", ["cond"], ["b"], then_branch=_typed_branch("t2", TP.INT64, "b1"),
                              else_branch=_typed_branch("e2", TP.INT64, "b2"))]
    g = helper.make_graph(nodes, "g", [_vi("x", (16,)), _vi("cond", [], TP.BOOL)],
                          [_vi("y0", (16,)), _vi("a", (16,)), _vi("b", (16,), TP.INT64)])
    m = _model(g)
    feeds = {"x": np.linspace(-3, 3, 16).astype(np.float32), "cond": np.array(True)}
    prepared = prepare_graph(m).model
    ifs = {n.output[0]: n for n in prepared.graph.node if n.op_type == "If"}
    assert [v.type.tensor_type.elem_type for v in ifs["b"].attribute[0].g.value_info] == [TP.INT64]
    assert _same_bits(_run(m, feeds), _run(prepared, feeds))


def test_an_opset_raise_keeps_the_local_functions_it_does_not_inline():
    """onnx's version converter returns a model without functions; a kept com.microsoft function was
    then called and undefined."""
    from tqs_onnx.passes.opset import UpgradeOpset
    fn = helper.make_function("com.microsoft", "MySum", ["a"], ["b"], [helper.make_node("ReduceSum", ["a"], ["b"])],
                              opset_imports=[helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("MySum", ["x"], ["y"], domain="com.microsoft")], "g",
                          [_vi("x", (4, 3))], [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                          functions=[fn])
    m.ir_version = 8
    prepared = prepare_graph(m).model
    assert [f.name for f in prepared.functions] == ["MySum"]
    raised = UpgradeOpset(21).run(prepared).model
    assert [f.name for f in raised.functions] == ["MySum"]
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(4, 3)}
    assert _same_bits(_run(m, feeds), _run(raised, feeds))


def _leaky_function_model() -> onnx.ModelProto:
    """x_next = x + 0.1 tanh(Act(x W1) W2), Act a local function LeakyRelu(alpha=@slope), slope 0.3 by
    default and not given by the call."""
    ops = [helper.make_opsetid("", 18), helper.make_opsetid("custom.fn", 1)]
    act = helper.make_function("custom.fn", "Act", ["x"], ["y"], [helper.make_node("LeakyRelu", ["x"], ["y"])], ops)
    ref = onnx.AttributeProto(name="alpha", ref_attr_name="slope", type=onnx.AttributeProto.FLOAT)
    act.node[0].attribute.append(ref)
    act.attribute_proto.append(helper.make_attribute("slope", 0.3))
    w1, w2 = (np.random.default_rng(3).standard_normal((2, 32, 32)) / 6).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m"]), helper.make_node("Act", ["m"], ["a"], domain="custom.fn"),
             helper.make_node("MatMul", ["a", "W2"], ["m2"]), helper.make_node("Tanh", ["m2"], ["t"]),
             helper.make_node("Mul", ["t", "dt"], ["d"]), helper.make_node("Add", ["x", "d"], ["x_next"])]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(np.array(0.1, np.float32), "dt")]
    g = helper.make_graph(nodes, "g", [_vi("x", (1, 32))], [_vi("x_next", (1, 32))], inits)
    m = helper.make_model(g, opset_imports=ops, functions=[act])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def test_inlined_functions_keep_their_attribute_defaults():
    """onnx's inliner dropped a function's attribute default: the body's LeakyRelu ran with its own
    alpha 0.01, not the function's 0.3, and every stage worked on another model."""
    m = _leaky_function_model()
    prepared = prepare_graph(m).model
    assert not prepared.functions
    leaky = [n for n in prepared.graph.node if n.op_type == "LeakyRelu"]
    assert [helper.get_attribute_value(a) for a in leaky[0].attribute] == [pytest.approx(0.3)]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)}
    assert _same_bits(_run(m, feeds), _run(prepared, feeds))


def _module_function_model() -> onnx.ModelProto:
    """Dynamo-style module functions: weights passed in, a block calling a linear twice, calls named by
    module path (the inliner alone names the inlined nodes 'mm__2' and loses the path)."""
    rng = np.random.default_rng(3)
    local = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    lin = helper.make_function("local", "Lin", ["x", "w"], ["y"], [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                               local[:1])
    blk = helper.make_function("local", "Blk", ["x", "w1", "w2"], ["z"], [
        helper.make_node("Lin", ["x", "w1"], ["t"], domain="local", name="fc1"), helper.make_node("Tanh", ["t"], ["u"]),
        helper.make_node("Lin", ["u", "w2"], ["z"], domain="local", name="fc2")], local)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32) / 6, f"onnx::W_{i}") for i in range(5)]
    nodes = [helper.make_node("Blk", ["x", "onnx::W_0", "onnx::W_1"], ["b"], domain="local", name="/enc/layer0"),
             helper.make_node("Blk", ["b", "onnx::W_2", "onnx::W_3"], ["c"], domain="local", name="/enc/layer1"),
             helper.make_node("Lin", ["c", "onnx::W_4"], ["y"], domain="local", name="/head")]
    g = helper.make_graph(nodes, "g", [_vi("x", (1, 32))], [_vi("y", (1, 32))], inits)
    m = helper.make_model(g, opset_imports=local, functions=[lin, blk])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def test_inlined_nodes_are_named_by_their_call_path_and_scope_blocks_follow_modules(monkeypatch):
    from tqs_onnx.graph import make_blocks, weight_table
    from tqs_onnx.passes import inline

    m = _module_function_model()
    prepared = prepare_graph(m).model
    names = [n.name for n in prepared.graph.node if n.op_type == "MatMul"]
    assert [n.rsplit("__", 1)[0] for n in names] == ["/enc/layer0/fc1/mm", "/enc/layer0/fc2/mm", "/enc/layer1/fc1/mm",
                                                     "/enc/layer1/fc2/mm", "/head/mm"]
    assert not prepared.functions
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)}
    assert _same_bits(_run(m, feeds), _run(prepared, feeds))
    weights = weight_table(prepared)
    blocks = make_blocks(weights, "scope:2")
    assert [(b.name, b.weights) for b in blocks] == [("enc/layer0", ["onnx::W_0", "onnx::W_1"]),
                                                     ("enc/layer1", ["onnx::W_2", "onnx::W_3"]), ("head", ["onnx::W_4"])]
    assert [b.name for b in make_blocks(weights, "scope")][:2] == ["enc/layer0/fc1", "enc/layer0/fc2"]
    # Past the cap on call paths nothing is renamed, and the model is still inlined as before.
    monkeypatch.setattr(inline, "MAX_NAMED_CALLS", 3)
    capped = prepare_graph(m).model
    assert [n.name.rsplit("__", 1)[0] for n in capped.graph.node if n.op_type == "MatMul"] == ["mm"] * 5
    assert _same_bits(_run(m, feeds), _run(capped, feeds))


def test_a_preparation_that_changes_the_outputs_stops_the_sweep_and_apply(tmp_path, capsys, monkeypatch):
    """Whatever goes wrong in the passes, sweep and apply compare the prepared graph with the file on
    synthetic inputs and stop rather than score or write another model."""
    from tqs_onnx.passes import inline

    monkeypatch.setattr(inline, "_with_default_attributes", lambda model, local: model)  # the inliner's old loss
    m = _leaky_function_model()
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    (tmp_path / "spec.json").write_text(json.dumps({"horizon": 4, "feedback": {"x_next": "x"}}))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((2, 1, 32)).astype(np.float32))
    assert main(["sweep", str(path), "--rollout", str(tmp_path / "spec.json"), "--contexts", str(tmp_path / "c.npz"),
                 "-o", str(tmp_path / "s.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "preparing the graph" in err and "changed what the model computes (output 'x_next'" in err
    assert not (tmp_path / "s.json").exists()
    code, out = _apply_empty(tmp_path, m, "a")
    assert code == 2 and "tqs-onnx bug" in capsys.readouterr().err


def test_a_file_at_onnx_default_ir_14_loads_wherever_a_path_is_opened(tmp_path):
    """onnx >= 1.23 saves IR 14 by default, ORT 1.31 loads 13: sweep and apply lowered it, eval, gate
    and pareto (which open the files themselves) refused the model."""
    from tqs_onnx.runtime import make_session, resolve_device

    g = helper.make_graph([helper.make_node("Add", ["x", "A"], ["y"])], "g", [_vi("x")], [_vi("y")],
                          [numpy_helper.from_array(np.arange(32, dtype=np.float32), "A")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 14
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    session = make_session(str(path), resolve_device("cpu"))
    assert np.array_equal(session.run(None, {"x": np.ones(32, np.float32)})[0], np.arange(1, 33, dtype=np.float32))


def test_a_model_whose_outputs_differ_run_to_run_is_not_called_a_preparation_bug(tmp_path):
    """Dropout in training mode (MC dropout): the file's own two runs differ, so the prepared graph's
    check says why it was skipped instead of reporting a difference."""
    from tqs_onnx.evaluate import check_prepared
    from tqs_onnx.graph import load_model

    nodes = [helper.make_node("Add", ["x", "A"], ["a"]), helper.make_node("Dropout", ["a", "r", "t"], ["y"])]
    inits = [numpy_helper.from_array(np.ones(32, np.float32), "A"), numpy_helper.from_array(np.array(0.5, np.float32), "r"),
             numpy_helper.from_array(np.array(True), "t")]
    m = _model(helper.make_graph(nodes, "g", [_vi("x")], [_vi("y")], inits))
    onnx.save(m, tmp_path / "m.onnx")
    record = check_prepared(load_model(tmp_path / "m.onnx"), prepare_graph(m).model, True)
    assert not record["checked"] and "differ between two runs" in record["why_not"]
