"""Models stored in float16 (a vendor's half-precision export): their weights are swept, planned and
written like float32 ones, with float16 scales, and the written file holds what the joint check measured
(a new user's trial found them left out: 0% quantizable)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tiny import joint_divergence, model, recurrent_contexts, recurrent_spec, rng_weights, save_case
from tqs_onnx.cli import main
from tqs_onnx.evaluate import rollouts
from tqs_onnx.passes.expose_weights import ExposeWeights
from tqs_onnx.quant import dequantize
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import make_session, resolve_device
from tqs_onnx.tiers import parse_tier, stored_names

F16 = TensorProto.FLOAT16


def half_mlp(n: int = 16, h: int = 32) -> onnx.ModelProto:
    """x_next = 0.9 x + tanh(x W1) W2, computed in float16 with float16 weights; float32 I/O."""
    w1, w2 = rng_weights(0, (n, h), (h, n))
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=F16),
             helper.make_node("MatMul", ["x16", "W1"], ["a"], name="/l1/MatMul"),
             helper.make_node("Tanh", ["a"], ["b"]),
             helper.make_node("MatMul", ["b", "W2"], ["c"], name="/l2/MatMul"),
             helper.make_node("Mul", ["x16", "k"], ["xs"]), helper.make_node("Add", ["xs", "c"], ["y"]),
             helper.make_node("Cast", ["y"], ["x_next"], to=TensorProto.FLOAT)]
    inits = [numpy_helper.from_array(w1.astype(np.float16), "W1"), numpy_helper.from_array(w2.astype(np.float16), "W2"),
             numpy_helper.from_array(np.array(0.9, np.float16), "k")]
    vi = helper.make_tensor_value_info
    return model(nodes, inits, [vi("x", TensorProto.FLOAT, [1, n])], [vi("x_next", TensorProto.FLOAT, [1, n])])


def test_an_exposed_float16_weight_is_a_float32_input_read_through_a_cast():
    m = half_mlp()
    exposed = ExposeWeights(["W1", "W2"]).run(m)
    values = exposed.report["values"]
    assert {v.dtype for v in values.values()} == {np.dtype(np.float32)}
    types = {i.name: i.type.tensor_type.elem_type for i in exposed.model.graph.input}
    assert types["W1"] == types["W2"] == TensorProto.FLOAT
    onnx.checker.check_model(exposed.model, full_check=True)
    dev = resolve_device("cpu")
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    want = make_session(m, dev).run(None, {"x": x})[0]
    got = make_session(exposed.model, dev).run(None, {"x": x, **values})[0]
    # float16 values upcast and cast back: the same model (to float32 rounding: ORT's CPU provider runs
    # float16 MatMuls in float32 and drops Casts it can, differently for a weight input and an initializer)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture
def half_case(tmp_path):
    paths = save_case(tmp_path, half_mlp(), recurrent_spec(12), recurrent_contexts(16, s=3))
    scores = tmp_path / "scores.json"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "--tiers", "int8/channel,int4/channel,int4/channel/gptq", "-o", str(scores), "--quiet"]) == 0
    return paths, scores


def test_float16_weights_are_swept_and_their_damage_recorded(half_case):
    _, scores = half_case
    doc = json.loads(scores.read_text())
    assert {w["dtype"] for w in doc["weights"].values()} == {"float16"}
    assert sorted(doc["gptq_weights"]) == ["W1", "W2"]  # float16 activations gathered for /gptq
    for b in doc["blocks"]:
        assert 0 < b["damage"]["int8/channel"] < b["damage"]["int4/channel"]


@pytest.mark.parametrize("tiers", ["int4/channel/gptq", "int8/channel,int4/channel"])
def test_a_written_float16_model_is_its_planned_size_and_holds_what_the_joint_check_measured(half_case, tmp_path,
                                                                                             tiers):
    paths, scores = half_case
    plan_path, out = tmp_path / "plan.json", tmp_path / "q.onnx"
    assert main(["allocate", str(scores), "--compression", "1.8", "--tiers", f"fp32,{tiers}", "-o", str(plan_path),
                 "--quiet", "--verify-model", str(paths["model"]), "--rollout", str(paths["spec"]),
                 "--contexts", str(paths["contexts"])]) == 0
    plan = json.loads(plan_path.read_text())
    assert any(parse_tier(t).is_int for t in plan["weights"].values())
    assert main(["apply", str(paths["model"]), str(plan_path), "-o", str(out), "--quiet"]) == 0
    assert out.stat().st_size == plan["planned_bytes"]
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    # independent of ORT's kernels: the original graph with each weight replaced by the file's integers
    # times its float16 scales, rolled out on the sweep contexts
    substituted = onnx.load(paths["model"])
    for init in substituted.graph.initializer:
        tier = parse_tier(plan["weights"].get(init.name, "fp32"))
        if tier.is_int:
            qname, sname = stored_names(init.name)
            assert written[sname].dtype == np.float16
            w = dequantize(written[qname], written[sname].reshape(-1), tier.base, 1, None, np.float16)
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float16), init.name))
    onnx.save(substituted, tmp_path / "substituted.onnx")
    joint = joint_divergence(paths, tmp_path / "substituted.onnx")
    assert joint > 0
    assert joint == pytest.approx(plan["verification"]["joint_divergence"], rel=1e-4)
    spec = RolloutSpec.load(paths["spec"])
    c = rollouts(out, spec, Contexts.load(paths["contexts"], spec), resolve_device("cpu"))
    assert np.all(np.isfinite(c["x_next"]))


def test_float32_contexts_beyond_float16_for_a_float16_input_are_refused(tmp_path, capsys):
    vi = helper.make_tensor_value_info
    w = rng_weights(0, (16, 16))[0].astype(np.float16)
    m = model([helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["x_next"])],
              [numpy_helper.from_array(w, "W")], [vi("x", F16, [1, 16])], [vi("x_next", F16, [1, 16])])
    ctx = recurrent_contexts(16, s=2)
    ctx["x0"] = ctx["x0"].astype(np.float32)
    ctx["x0"][1, 0, 3] = 1e5  # float32: fits; float16: inf
    paths = save_case(tmp_path, m, recurrent_spec(4), ctx)
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "-o", str(tmp_path / "s.json"), "--quiet", "--min-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "beyond float16" in err and "'x0'" in err and "'x'" in err


def _write(tmp_path, m, weights, info):
    from tqs_onnx.graph import load_model
    from tqs_onnx.rewrite import rewrite_model, save_model

    onnx.save(m, tmp_path / "m.onnx")
    plan = {"kind": "tqs-plan", "schema_version": 1, "model": {}, "weights": weights, "weight_info": info}
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan)
    save_model(out, tmp_path / "q.onnx")
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "q.onnx").graph.initializer}


def test_a_float16_weights_tiny_channel_keeps_its_values(tmp_path):
    """float16 scales of a float16 weight go down to float16's subnormals: a channel whose largest value
    is 4e-5 keeps its values (at float16's smallest normal, 6.1e-5, below 8e-6 they were zeros, and the
    grid coarse below 7.9e-3; a user's trial). A subnormal scale has few bits: the largest value clips a
    little."""
    m = half_mlp()
    w1 = next(i for i in m.graph.initializer if i.name == "W1")
    w = numpy_helper.to_array(w1).copy()
    w[:, 0] *= 4e-5 / np.abs(w[:, 0]).max()
    w1.CopyFrom(numpy_helper.from_array(w, "W1"))
    written = _write(tmp_path, m, {"W1": "int8/channel"}, {"W1": {"shape": [16, 32], "channel_axis": 1, "block_axis": 0}})
    q, s = (written[n] for n in stored_names("W1"))
    assert s.dtype == np.float16 and s[0] < 6e-5
    decoded = q[:, 0].astype(np.float32) * np.float32(s[0])
    assert np.count_nonzero(decoded) == 16 and np.abs(decoded - w[:, 0]).max() < 0.1 * 4e-5


def test_the_fp16_tier_of_a_float16_weight_is_the_weight_as_stored(tmp_path):
    m = half_mlp()
    written = _write(tmp_path, m, {"W1": "fp16"}, {})
    np.testing.assert_array_equal(written["W1"], numpy_helper.to_array(next(i for i in m.graph.initializer
                                                                            if i.name == "W1")))
    assert (tmp_path / "q.onnx").stat().st_size <= (tmp_path / "m.onnx").stat().st_size


def test_a_float16_weight_cast_to_float_before_its_matmul_is_not_counted_fused():
    """Its DequantizeLinear returns float16 and the Cast after it stays: ORT decodes it on every call."""
    from tqs_onnx.graph import weight_table

    vi = helper.make_tensor_value_info
    w = numpy_helper.from_array(rng_weights(0, (32, 16))[0].astype(np.float16), "W")
    direct = model([helper.make_node("MatMul", ["x", "W"], ["y"])], [w], [vi("x", F16, [4, 32])], [vi("y", F16, [4, 16])])
    cast = model([helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "Wf"], ["y"])],
                 [w], [vi("x", TensorProto.FLOAT, [4, 32])], [vi("y", TensorProto.FLOAT, [4, 16])])
    assert [x.fused_dq for x in weight_table(direct, min_size=1)] == [True]
    assert [x.fused_dq for x in weight_table(cast, min_size=1)] == [False]


def test_an_unperturbed_float16_rollout_diverges_by_nothing_and_a_float32_one_is_replayed(tmp_path):
    """ORT's CPU provider drops the Cast pair a float16 output makes with a divergence computed in the
    model (an unperturbed rollout measured 4e-5): float16 trajectories are compared from the outputs.
    A float16-weight model with float32 outputs keeps the replay engine."""
    from tqs_onnx.graph import load_model
    from tqs_onnx.sweep import SweepConfig, divergence, prepare

    vi = helper.make_tensor_value_info
    w = rng_weights(0, (16, 16))[0].astype(np.float16)
    io16 = model([helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["b"]),
                  helper.make_node("Add", ["x", "b"], ["x_next"])],
                 [numpy_helper.from_array(0.3 * w, "W")], [vi("x", F16, [1, 16])], [vi("x_next", F16, [1, 16])])
    dev = resolve_device("cpu")
    for m, replayed in ((io16, False), (half_mlp(), True)):
        paths = save_case(tmp_path, m, recurrent_spec(6), recurrent_contexts(16, s=2))
        spec = RolloutSpec.load(paths["spec"])
        setup = prepare(load_model(paths["model"]), spec, Contexts.load(paths["contexts"], spec), dev,
                        SweepConfig(tiers=[], min_size=16))
        assert not np.any(divergence(setup, {}))
        w0 = setup.blocks[0].weights[0]
        assert not np.any(divergence(setup, {w0: setup.bound[w0]}))
        assert (setup.replay is not None) is replayed, setup.replay_note


def test_a_float16_block_kept_as_it_is_is_called_float16_in_the_plan(half_case, tmp_path):
    from tqs_onnx.tables import format_plan

    _, scores = half_case
    assert main(["allocate", str(scores), "--compression", "1", "--tiers", "fp32,int8/channel", "-o",
                 str(tmp_path / "p.json"), "--quiet"]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    kept = [b for b in plan["blocks"] if b["tier"] == "fp32"]
    assert kept and all(b["stored_as"] == "float16" for b in kept)
    assert "float16 as stored" in format_plan(plan)


def test_float16_weights_held_in_int32_data_are_planned_at_their_written_size(tmp_path):
    """onnxconverter-common writes float16 tensors it read from float_data into int32_data (a varint of
    about 3 bytes a value): they are stored raw (2 bytes) from the prepared graph on, so the plan's size
    is the file's (a review found the plan 34% larger than the file)."""
    m = half_mlp()
    for init in m.graph.initializer:
        bits = numpy_helper.to_array(init).view(np.uint16)
        init.ClearField("raw_data")
        init.int32_data.extend(int(b) for b in bits.ravel())
    assert all(len(i.int32_data) for i in m.graph.initializer)
    paths = save_case(tmp_path, m, recurrent_spec(12), recurrent_contexts(16, s=3))
    scores, plan_path, out = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "q.onnx"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "--tiers", "int8/channel,int4/channel", "-o", str(scores), "--quiet", "--probes", "1"]) == 0
    for tiers in ("fp32,int4/channel", "fp32"):
        assert main(["allocate", str(scores), "--compression", "1", "--tiers", tiers, "-o", str(plan_path),
                     "--quiet"]) == 0
        assert main(["apply", str(paths["model"]), str(plan_path), "-o", str(out), "--quiet"]) == 0
        assert out.stat().st_size == json.loads(plan_path.read_text())["planned_bytes"]


def test_an_autocast_weight_is_measured_as_the_file_rounds_it(tmp_path):
    """Float32 weights read only through a Cast to float16: the file's Cast rounds the constant, but with
    the weight a session input ORT's CPU provider drops that Cast (a review measured the sweep's nominal
    rollout 2e-4 off the model's and the fp16 tier's damage 2.6e-7 instead of 0)."""
    from tqs_onnx.graph import load_model
    from tqs_onnx.sweep import SweepConfig, prepare

    m = half_mlp()
    nodes = [helper.make_node("Cast", [w], [f"{w}16"], to=F16) for w in ("W1", "W2")]
    for node in m.graph.node:
        for k, i in enumerate(node.input):
            if i in ("W1", "W2"):
                node.input[k] = f"{i}16"
    for init in m.graph.initializer:
        if init.name in ("W1", "W2"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32) * 1.001, init.name))
    kept = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes + kept)
    onnx.checker.check_model(m)
    paths = save_case(tmp_path, m, recurrent_spec(12), recurrent_contexts(16, s=3))
    spec = RolloutSpec.load(paths["spec"])
    ctx = Contexts.load(paths["contexts"], spec)
    dev = resolve_device("cpu")
    setup = prepare(load_model(paths["model"]), spec, ctx, dev, SweepConfig(tiers=["fp16"]))
    assert set(setup.stored) == {"W1", "W2"}
    own = rollouts(paths["model"], spec, ctx, dev)["x_next"]
    nominal = np.stack([[step["x_next"].numpy() for step in traj] for traj in setup.nominal])
    np.testing.assert_allclose(nominal, own, rtol=0, atol=1e-6)
    scores = tmp_path / "s.json"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "--tiers", "fp16,int8/channel", "-o", str(scores), "--quiet", "--probes", "1"]) == 0
    for b in json.loads(scores.read_text())["blocks"]:
        assert b["damage"]["fp16"] == 0 and b["damage"]["int8/channel"] > 0


def test_the_papers_exact_budget_counts_a_float16_parameter_at_16_bits(half_case, tmp_path):
    _, scores = half_case
    params = sum(np.prod(w["shape"]) for w in json.loads(scores.read_text())["weights"].values())
    assert main(["allocate", str(scores), "--compression", "2", "--objective", "paper", "--paper-variant", "exact",
                 "--tiers", "fp32,int8/channel,int4/channel", "-o", str(tmp_path / "p.json"), "--quiet"]) == 0
    note = json.loads((tmp_path / "p.json").read_text())["notes"][0]
    assert f"(2x of {16 * params:,})" in note


def test_a_float16_weight_that_decodes_past_float16_gets_a_note(tmp_path):
    """-65504 (a causal mask) at int8: its float16 scale 65504/127 rounds up to 516, and 127 x 516 is
    inf in float16 (a review); the sweep measures the same values, so it is noted, not refused."""
    from tqs_onnx.rewrite import _check_range

    t = numpy_helper.from_array(np.full((16, 16), -65504.0, np.float16), "M")
    assert "float16's limit" in _check_range("m", "M", parse_tier("int8"), t)
    assert "beyond float16" in _check_range("m", "M", parse_tier("bf16"), t)
    assert _check_range("m", "M", parse_tier("int8"), numpy_helper.from_array(np.ones((4, 4), np.float16), "M")) is None


@pytest.mark.parametrize("tier", ["int8/channel/load", "int4/load", "int6/channel/load", "int1/load"])
def test_a_float16_weights_load_form_is_folded_by_ort_on_the_cpu_to_the_sweeps_values(tmp_path, tier):
    """The `/load` decode of a float16 weight computes in float32 and casts back: ORT's CPU provider has
    no float16 Mul to fold, so a float16 Cast/Mul chain ran on every call (4.4x the reference per call in
    a trial). The decoded values must still be the sweep's (float16 scales, one rounding to float16)."""
    import onnxruntime as ort

    from tqs_onnx.quant import apply_tier
    from tqs_onnx.runtime_report import graph_figures, optimized_graph
    from tqs_onnx.tiers import for_weight

    m = half_mlp()
    _write(tmp_path, m, {"W1": tier}, {"W1": {"shape": [16, 32], "channel_axis": 1, "block_axis": 0}})
    written = onnx.load(tmp_path / "q.onnx")
    opt = optimized_graph(tmp_path / "q.onnx", resolve_device("cpu"))
    per_call = graph_figures(written, opt)["per_call"]  # folded at load: no Mul of two initializers left
    assert per_call == [], per_call
    # the decoded weight, as the written graph computes it (no optimizer), equals the sweep's value
    written.graph.output.append(helper.make_tensor_value_info("W1", F16, [16, 32]))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(written.SerializeToString(), so, providers=["CPUExecutionProvider"])
    decoded = s.run(["W1"], {"x": np.zeros((1, 16), np.float32)})[0]
    w = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "W1")).astype(np.float32)
    expected = apply_tier(w, for_weight(parse_tier(tier), "float16"), 1, 0).astype(np.float16)
    assert decoded.dtype == np.float16 and np.array_equal(decoded, expected)
