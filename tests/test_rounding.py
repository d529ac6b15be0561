"""`/gptq` tiers: GPTQ rounding on the nominal rollouts' inputs, from the sweep to the written file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.tiny import joint_divergence, recurrent_contexts, recurrent_mlp, recurrent_spec, save_case
from tqs_onnx.cli import main
from tqs_onnx.errors import TqsError
from tqs_onnx.quant import broadcast_scales, dequantize, quantize
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.rounding import ROUNDING_VERSION, InputMoments, codes_path, gptq_codes
from tqs_onnx.runtime import resolve_device
from tqs_onnx.tiers import parse_tier, stored_names


def _correlated_inputs(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Inputs whose columns are strongly correlated, as activations are (rounding errors can cancel)."""
    r = np.random.default_rng(seed)
    return r.standard_normal((rows, 4)) @ r.standard_normal((4, k)) + 0.05 * r.standard_normal((rows, k))


@pytest.mark.parametrize("tier", ["int4/channel/gptq", "int2/channel/gptq", "int8/gptq", "int4/block8/gptq"])
def test_gptq_lowers_the_output_error_against_round_to_nearest_with_the_same_scales(tier):
    t = parse_tier(tier)
    r = np.random.default_rng(1)
    w = (r.standard_normal((32, 12)) * 0.2).astype(np.float32)
    x = _correlated_inputs(400, 32)
    axes = (1, 0 if t.granularity == "block" else None)
    codes = gptq_codes(w, InputMoments(x.T @ x, 0), t, *axes)
    q_rtn, scale = quantize(w, t, *axes)
    q, scale_g = quantize(w, t, *axes, codes)
    assert np.array_equal(scale, scale_g)  # the same stored scales: only the integers differ
    assert np.abs(codes).max() <= t.qmax
    err = lambda v: float(np.sum((x @ (w - v)) ** 2))  # noqa: E731
    gptq = err(dequantize(q, scale, t, *axes, np.float32))
    rtn = err(dequantize(q_rtn, scale, t, *axes, np.float32))
    assert gptq < 0.8 * rtn


def test_a_transposed_weight_is_rounded_along_its_input_axis():
    """Gemm(transB=1) reads W as (N, K): its codes are those of the (K, N) problem, transposed."""
    t = parse_tier("int4/channel/gptq")
    w = (np.random.default_rng(2).standard_normal((24, 10)) * 0.3).astype(np.float32)
    x = _correlated_inputs(200, 24, seed=3)
    h = x.T @ x
    assert np.array_equal(gptq_codes(w.T.copy(), InputMoments(h, 1), t, 0, None),
                          gptq_codes(w, InputMoments(h, 0), t, 1, None).T)


def test_gptq_tier_names_and_where_they_apply():
    assert str(parse_tier("int4/channel/gptq/load")) == "int4/channel/gptq/load"
    assert parse_tier("int4/channel/gptq/load").base == parse_tier("int4/channel/gptq")
    assert parse_tier("int4/channel/gptq").storage_bytes((8, 8), 1) == parse_tier("int4/channel").storage_bytes((8, 8), 1)
    for bad in ("int1/gptq", "bf16/gptq"):
        with pytest.raises(TqsError):
            parse_tier(bad)


@pytest.fixture
def gptq_case(tmp_path):
    # 16 contexts x 12 steps = 192 rows; the held-out check chooses each weight's damping (W1's, on the
    # states x, needs more than GPTQ's usual 1% to beat rounding to nearest on a left-out context)
    paths = save_case(tmp_path, recurrent_mlp(n=16, h=32), recurrent_spec(12), recurrent_contexts(16, s=16))
    scores = tmp_path / "scores.json"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "--tiers", "int4/channel,int4/channel/gptq,int2/channel,int2/channel/gptq", "-o", str(scores),
                 "--quiet"]) == 0
    return paths, scores


def _allocate(paths, scores, out, tiers="fp32,int4/channel/gptq", verify=True) -> int:
    args = ["allocate", str(scores), "--compression", "1", "--tiers", tiers, "-o", str(out), "--quiet"]
    if verify:
        args += ["--verify-model", str(paths["model"]), "--rollout", str(paths["spec"]),
                 "--contexts", str(paths["contexts"])]
    return main(args)


def test_the_written_gptq_model_holds_the_values_the_joint_check_measured(gptq_case, tmp_path):
    paths, scores = gptq_case
    doc = json.loads(scores.read_text())
    for b in doc["blocks"]:  # measured: the rounding helps on every block of this model
        assert b["damage"]["int4/channel/gptq"] < b["damage"]["int4/channel"]
    # W1 (the states x) needed more damping than GPTQ's usual 1% to do better on a held-out context
    assert doc["gptq_damping"]["W1"]["int4/channel/gptq"] > doc["gptq_damping"]["W2"]["int4/channel/gptq"]
    plan_path = tmp_path / "plan.json"
    assert _allocate(paths, scores, plan_path, tiers="int4/channel/gptq") == 0  # the only tier
    plan = json.loads(plan_path.read_text())
    assert {str(parse_tier(t).base) for t in plan["weights"].values()} == {"int4/channel/gptq"}
    assert codes_path(plan_path).is_file()
    out = tmp_path / "q.onnx"
    assert main(["apply", str(paths["model"]), str(plan_path), "-o", str(out), "--quiet"]) == 0
    assert out.stat().st_size == plan["planned_bytes"]
    # independent: the FP32 graph run with the file's integers times its scales (not ORT's fused
    # kernels, whose int8 activations are a known, separate gap), rolled out on the sweep contexts
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    substituted = onnx.load(paths["model"])
    t = parse_tier("int4/channel")
    for init in substituted.graph.initializer:
        if init.name in ("W1", "W2"):
            qname, sname = stored_names(init.name)
            q, scale = written[qname], written[sname].reshape(-1)
            rtn, _ = quantize(numpy_helper.to_array(init), t, 1)
            assert not np.array_equal(q.astype(np.int8), rtn.astype(np.int8))  # not plain rounding
            init.CopyFrom(numpy_helper.from_array(dequantize(q, scale, t, 1, None, np.float32), init.name))
    onnx.save(substituted, tmp_path / "substituted.onnx")
    joint = joint_divergence(paths, tmp_path / "substituted.onnx")
    assert joint == pytest.approx(plan["verification"]["joint_divergence"], rel=1e-4)
    v = plan["verification"]  # the paper's plans are checked too, and named with their joint divergence
    assert isinstance(v["challengers"], dict) and isinstance(v["rollouts"], int) and isinstance(v["accepted_moves"], int)


def test_gptq_plans_need_the_sweep_contexts_and_their_codes_file(gptq_case, tmp_path, capsys):
    paths, scores = gptq_case
    assert _allocate(paths, scores, tmp_path / "p.json", tiers="int4/channel/gptq", verify=False) == 2
    assert "--verify-model" in capsys.readouterr().err
    plan_path = tmp_path / "plan.json"
    assert _allocate(paths, scores, plan_path, tiers="int4/channel/gptq") == 0
    out = tmp_path / "q.onnx"
    codes = codes_path(plan_path)
    codes.write_bytes(codes.read_bytes() + b"x")
    assert main(["apply", str(paths["model"]), str(plan_path), "-o", str(out), "--quiet"]) == 2
    assert "sha256" in capsys.readouterr().err
    codes.unlink()
    assert main(["apply", str(paths["model"]), str(plan_path), "-o", str(out), "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("kernel,pads,strides,dilations", [((3,), (1, 1), (1,), (1,)), ((5,), (0, 2), (2,), (1,)),
                                                          ((3, 2), (1, 0, 1, 1), (1, 2), (2, 1))])
def test_conv_windows_are_the_rows_the_kernel_multiplies(kernel, pads, strides, dilations):
    """The Conv's own output (onnx's reference) equals its input windows times the flattened kernel."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    from tqs_onnx.rounding import Reader

    r = np.random.default_rng(4)
    x = r.standard_normal((2, 3, *[9] * len(kernel))).astype(np.float32)
    w = r.standard_normal((4, 3, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=list(pads), strides=list(strides),
                            dilations=list(dilations))
    y = ReferenceEvaluator(node).run(None, {"x": x, "w": w})[0]
    rows = Reader(("x",), 1, conv=(kernel, pads, strides, dilations)).rows([x])
    got = (rows @ w.reshape(4, -1).T.astype(np.float64)).reshape(2, *y.shape[2:], 4)
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), y, rtol=1e-4, atol=1e-4)


def test_gptq_rounds_a_conv_kernel_along_its_flattened_inputs():
    t = parse_tier("int4/channel/gptq")
    r = np.random.default_rng(5)
    w = (r.standard_normal((6, 4, 3)) * 0.3).astype(np.float32)
    x = _correlated_inputs(300, 12, seed=6)
    codes = gptq_codes(w, InputMoments(x.T @ x, 1), t, 0, None)
    assert codes.shape == w.shape
    flat = gptq_codes(w.reshape(6, 12), InputMoments(x.T @ x, 1), t, 0, None)
    assert np.array_equal(codes.reshape(6, 12), flat)
    q_rtn, scale = quantize(w, t, 0)
    err = lambda q: float(np.sum((x @ (w - dequantize(q, scale, t, 0, None, np.float32)).reshape(6, 12).T) ** 2))  # noqa: E731
    assert err(codes) < 0.8 * err(q_rtn)


@pytest.mark.parametrize("op,gates,attrs", [("LSTM", 4, {}), ("GRU", 3, {"linear_before_reset": 1}), ("RNN", 1, {})])
def test_a_recurrent_weight_multiplies_the_previous_hidden_states(op, gates, attrs):
    """R's rows are initial_h, then Y[0..T-2]: the h_{t-1} of every step (onnx's reference op)."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    from tests.tiny import model as tiny_model
    from tqs_onnx.rounding import _readers

    r = np.random.default_rng(7)
    seq, batch, inp, hid = 5, 2, 3, 4
    x = r.standard_normal((seq, batch, inp)).astype(np.float32)
    h0 = r.standard_normal((1, batch, hid)).astype(np.float32)
    w, rr = (r.standard_normal((1, gates * hid, n)).astype(np.float32) for n in (inp, hid))
    node = helper.make_node(op, ["x", "W", "R", "", "", "h0"], ["Y"], hidden_size=hid, **attrs)
    y = ReferenceEvaluator(node).run(None, {"x": x, "W": w, "R": rr, "h0": h0})[0]
    m = tiny_model([node], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rr, "R")],
                   [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(v.shape)) for n, v in
                    (("x", x), ("h0", h0))],
                   [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [seq, 1, batch, hid])])
    readers = _readers(m, {"W", "R"})
    (rw,), (rr_,) = readers["W"], readers["R"]
    assert rw.input_axis == rr_.input_axis == 2
    np.testing.assert_array_equal(rw.rows([x]), x.reshape(-1, inp))
    rows = rr_.rows([y, h0])
    np.testing.assert_array_equal(rows[:batch], h0.reshape(batch, hid))
    np.testing.assert_array_equal(rows[batch:], y[:-1].reshape(-1, hid))
    codes = gptq_codes(rr, InputMoments(rows.T @ rows, 2), parse_tier("int4/channel/gptq"), 1, 2)
    assert codes.shape == rr.shape
    # a GRU without linear_before_reset multiplies part of R by r * h_{t-1}: R gets no statistics
    if op == "GRU":
        attributes = m.graph.node[0].attribute
        del attributes[[a.name for a in attributes].index("linear_before_reset")]
        assert set(_readers(m, {"W", "R"})) == {"W"}


def test_statistics_gathered_in_several_rollouts_equal_those_of_one(monkeypatch):
    """A small activation budget splits the statistics over more rollouts; H stays the same (2 contexts x
    20 steps: more rows than the weights' inputs, else they would have no statistics)."""
    import tqs_onnx.sweep as sweep
    from tqs_onnx.graph import weight_table
    from tqs_onnx.rounding import input_moments

    m = recurrent_mlp(n=16, h=32, damp=0.1)
    spec = RolloutSpec.from_dict(recurrent_spec(20))
    ctx = Contexts.from_arrays(recurrent_contexts(16, s=2), spec)
    weights = [w for w in weight_table(m, 1) if w.name.startswith("W")]
    dev = resolve_device("cpu")
    one = sweep.rollout_moments(m, weights, spec, ctx, dev, 20)
    assert one.forward_passes == 2 * 20
    calls = []

    def small_budget(model, elem, factory, shapes):
        return input_moments(model, elem, lambda p, a: (calls.append(a), factory(p, a))[1], shapes, chunk_bytes=64)

    monkeypatch.setattr(sweep, "input_moments", small_budget)
    many = sweep.rollout_moments(m, weights, spec, ctx, dev, 20)
    assert len(calls) == 3 and many.forward_passes == 3 * 2 * 20
    one, many = one.moments, many.moments
    assert set(one) == set(many) == {"W1", "W2", "Wm"}
    for name in one:
        np.testing.assert_array_equal(one[name].h, many[name].h)
        assert one[name].rows == many[name].rows == 2 * 20


def test_codes_do_not_depend_on_the_scale_of_the_inputs_with_dead_inputs():
    t = parse_tier("int4/channel/gptq")
    w = (np.random.default_rng(8).standard_normal((32, 6)) * 0.3).astype(np.float32)
    x = _correlated_inputs(300, 32, seed=9)
    x[:, :8] = 0  # inputs that are always zero
    codes = [gptq_codes(w, InputMoments((x * c).T @ (x * c), 0), t, 1, None) for c in (1.0, 1e-3)]
    assert np.array_equal(*codes)


def test_a_weight_also_read_inside_a_subgraph_gets_no_statistics():
    from onnx import helper

    from tests.tiny import model as tiny_model
    from tqs_onnx.rounding import _readers

    w = np.ones((4, 4), np.float32)
    branch = helper.make_graph([helper.make_node("Identity", ["W"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [4, 4])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]),
             helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch)]
    m = tiny_model(nodes, [numpy_helper.from_array(w, "W")],
                   [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
                    helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4]),
                    helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [4, 4])])
    assert _readers(m, {"W"}) == {}


def test_a_new_plan_at_an_old_plans_path_never_breaks_the_old_pair(gptq_case, tmp_path):
    """The codes file is named by its sha256: codes written for a new plan (an allocate killed before its
    plan was in place) leave the old plan applicable; once the new plan is written, the old file goes."""
    from tqs_onnx.rounding import save_codes

    paths, scores = gptq_case
    plan_path = tmp_path / "plan.json"
    assert _allocate(paths, scores, plan_path, tiers="int4/channel/gptq") == 0
    old_codes = codes_path(plan_path)
    save_codes({("W1", "int2/channel"): np.zeros((2, 2), np.int8)}, plan_path, ["W1"])  # then killed
    assert len(list(tmp_path.glob("plan.*.codes.npz"))) == 2
    assert main(["apply", str(paths["model"]), str(plan_path), "-o", str(tmp_path / "a.onnx"), "--quiet"]) == 0
    assert _allocate(paths, scores, plan_path, tiers="int2/channel/gptq") == 0
    assert list(tmp_path.glob("plan.*.codes.npz")) == [codes_path(plan_path)] and not old_codes.exists()
    assert main(["apply", str(paths["model"]), str(plan_path), "-o", str(tmp_path / "b.onnx"), "--quiet"]) == 0


def test_a_gptq_plan_goes_to_a_new_folder_and_an_edited_one_is_refused(gptq_case, tmp_path, capsys):
    paths, scores = gptq_case
    plan_path = tmp_path / "new" / "plan.json"
    assert _allocate(paths, scores, plan_path, tiers="int4/channel/gptq") == 0
    assert codes_path(plan_path).is_file()
    plan = json.loads(plan_path.read_text())
    plan["weights"] = {n: t.replace("int4", "int2") for n, t in plan["weights"].items()}  # codes are int4's
    plan_path.write_text(json.dumps(plan))
    assert main(["apply", str(paths["model"]), str(plan_path), "-o", str(tmp_path / "q.onnx"), "--quiet"]) == 2
    assert "edited" in capsys.readouterr().err
    plan["rounding"]["keys"] = [["W1"]]
    plan_path.write_text(json.dumps(plan))
    assert main(["apply", str(paths["model"]), str(plan_path), "-o", str(tmp_path / "q.onnx"), "--quiet"]) == 2
    assert "no valid codes file" in capsys.readouterr().err


def test_gptq_tiers_the_sweep_did_not_measure_are_refused(tmp_path, capsys):
    paths = save_case(tmp_path, recurrent_mlp(n=16, h=32), recurrent_spec(4), recurrent_contexts(16, s=2))
    scores = tmp_path / "scores.json"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "--tiers", "int4/channel", "-o", str(scores), "--quiet"]) == 0
    assert main(["allocate", str(scores), "--compression", "1", "--objective", "paper", "--tiers",
                 "fp32,int4/channel/gptq", "-o", str(tmp_path / "p.json"), "--quiet", "--verify-model",
                 str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"])]) == 2
    assert "measured no /gptq tier" in capsys.readouterr().err


def test_gptq_damage_measured_by_another_rounding_version_is_not_used(gptq_case, tmp_path, capsys):
    """The plan's /gptq integers are rounded now; damage the sweep measured with other integers is stale."""
    paths, scores = gptq_case
    doc = json.loads(scores.read_text())
    assert doc["rounding"] == ROUNDING_VERSION
    doc["rounding"] = "gptq4"
    old = tmp_path / "old_scores.json"
    old.write_text(json.dumps(doc))
    assert _allocate(paths, old, tmp_path / "p.json") == 2  # asked for by name: refused
    assert "re-run the sweep" in capsys.readouterr().err
    args = ["allocate", str(old), "--compression", "2", "-o", str(tmp_path / "p.json"), "--quiet",
            "--verify-model", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"])]
    assert main(args) == 0  # the default tiers: /gptq left out, and the plan says why
    assert "warning: the scores' /gptq damage was measured with integers another version rounds (gptq4" \
        in capsys.readouterr().err  # on stderr too, even with --quiet (a CI job reusing old scores)
    plan = json.loads((tmp_path / "p.json").read_text())
    assert not any("gptq" in t for t in plan["weights"].values())
    assert any("another version rounds (gptq4" in n for n in plan["notes"])
    assert main([*args[:1], str(scores), *args[2:]]) == 0  # this version's scores keep them
    assert not any("another version" in n for n in json.loads((tmp_path / "p.json").read_text())["notes"])
    assert "warning" not in capsys.readouterr().err


def test_gptq_codes_come_only_from_the_sweep_contexts(gptq_case, tmp_path, capsys):
    """Other contexts would give other integers than those whose damage the sweep measured."""
    paths, scores = gptq_case
    (tmp_path / "other").mkdir()
    other = save_case(tmp_path / "other", recurrent_mlp(n=16, h=32), recurrent_spec(8), recurrent_contexts(16, s=3, seed=5))
    assert main(["allocate", str(scores), "--compression", "1", "-o", str(tmp_path / "p.json"), "--quiet",
                 "--verify-model", str(paths["model"]), "--rollout", str(paths["spec"]),
                 "--contexts", str(other["contexts"])]) == 2
    assert "sweep's --rollout and --contexts" in capsys.readouterr().err


def test_the_demo_writes_plans_that_apply_reproduces(tmp_path):
    """The demo's /gptq plans keep their codes beside them: `apply` of a saved plan gives its model."""
    from tqs_onnx.demo import DEMO, demo_files, run_demo

    out = tmp_path / "demo"
    run_demo(out, quiet=True)
    plan = json.loads((out / "plan-tqs-measured.json").read_text())
    assert any(parse_tier(t).gptq for t in plan["weights"].values()) and codes_path(out / "plan-tqs-measured.json").is_file()
    assert main(["apply", str(demo_files()["model"]), str(out / "plan-tqs-measured.json"), "-o",
                 str(tmp_path / "again.onnx"), "--quiet"]) == 0
    assert (tmp_path / "again.onnx").read_bytes() == (out / f"{DEMO}.tqs-measured.onnx").read_bytes()


def test_pareto_writes_gptq_plans_with_their_codes(gptq_case, tmp_path):
    paths, scores = gptq_case
    out = tmp_path / "frontier"
    assert main(["pareto", str(paths["model"]), str(scores), "--rollout", str(paths["spec"]), "--contexts",
                 str(paths["contexts"]), "--targets", "3:6", "--points", "2", "-o", str(out), "--quiet",
                 "--max-rollouts", "4"]) == 0
    doc = json.loads((out / "frontier.json").read_text())
    gptq_rows = [r for r in doc["points"] + doc["uniform"] if any("gptq" in t for t in r["tiers"])]
    assert gptq_rows
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(paths["model"]).graph.initializer}
    blocks = [b["weights"] for b in json.loads(scores.read_text())["blocks"]]
    checked = 0
    for r in gptq_rows:  # the written integers are not round-to-nearest where a weight is at a /gptq tier
        written = {i.name: numpy_helper.to_array(i) for i in onnx.load(out / r["model"]).graph.initializer}
        for names, text in zip(blocks, r["tiers"]):
            t = parse_tier(text)
            for name in names:
                if t.gptq and t.granularity == "channel":
                    rtn, _ = quantize(original[name], t, 1)
                    assert not np.array_equal(written[stored_names(name)[0]].astype(np.int8), rtn.astype(np.int8))
                    checked += 1
    assert checked


def test_lazy_batches_give_the_codes_of_row_by_row_updates():
    """GPTQ's batched updates are the row-by-row algorithm regrouped: the same codes over several batches."""
    from tqs_onnx import rounding
    rng = np.random.default_rng(5)
    k, n = 2 * rounding.LAZY_BATCH + 37, 24
    x = rng.normal(size=(4 * k, k)) @ rng.normal(size=(k, k)) * 0.1
    w = rng.normal(size=(k, n)).astype(np.float32)
    moments = InputMoments(x.T @ x, 0)
    tier = parse_tier("int4/channel/gptq")
    s = broadcast_scales(w, tier, 1, None).astype(np.float64)
    order, u = moments.factor()
    work, sc, q = w.astype(np.float64)[order], s[order], np.zeros((k, n), np.int8)
    for r in range(k):  # the algorithm as published, one row at a time
        q[r] = np.clip(np.rint(work[r] / sc[r]), -tier.qmax, tier.qmax)
        work[r + 1:] -= np.outer(u[r, r + 1:], (work[r] - q[r] * sc[r]) / u[r, r])
    expected = np.empty_like(q)
    expected[order] = q
    assert np.array_equal(gptq_codes(w, moments, tier, 1, None), expected)


def test_matrix_statistics_summed_in_the_session_equal_the_hosts(monkeypatch):
    """MatMul readers' X^T X comes out of the session (K x K, float32, and the rows' count) instead of
    the activations: the same H as summing the host's rows in float64, to float32 rounding."""
    import tqs_onnx.rounding as rounding
    import tqs_onnx.sweep as sweep
    from tqs_onnx.graph import weight_table

    m = recurrent_mlp(n=16, h=32, damp=0.1)  # 2 contexts x 20 steps: more rows than inputs
    spec = RolloutSpec.from_dict(recurrent_spec(20))
    ctx = Contexts.from_arrays(recurrent_contexts(16, s=2), spec)
    weights = [w for w in weight_table(m, 1) if w.name.startswith("W")]
    dev = resolve_device("cpu")
    readers = rounding._readers(m, {w.name for w in weights})
    elem = {w.name: onnx.TensorProto.FLOAT for w in weights}
    assert len(rounding._gram_nodes(m, readers, elem, {})[0]) == sum(map(len, readers.values())) > 0
    # one row a step (a context at a time) against K = 16 and 32: the activations are smaller than H
    shapes = rounding.infer_value_shapes(m, {"x": (1, 16)})
    assert rounding._gram_nodes(m, readers, elem, shapes)[0] == {}
    monkeypatch.setattr(rounding, "infer_value_shapes", lambda model, shapes: {})  # rows unknown: in session
    seen = []
    real = rounding.input_moments
    monkeypatch.setattr(sweep, "input_moments", lambda model, elem, f, shapes: real(
        model, elem, lambda p, a: (seen.append(list(a)), f(p, a))[1], shapes))
    in_session = sweep.rollout_moments(m, weights, spec, ctx, dev, 20).moments
    assert all(a.startswith("__tqs_gram_") for a in seen[0])  # no activation leaves the session
    monkeypatch.setattr(rounding, "_gram_nodes", lambda *a: ({}, {}, []))
    on_host = sweep.rollout_moments(m, weights, spec, ctx, dev, 20).moments
    assert set(in_session) == set(on_host) == {"W1", "W2", "Wm"}
    for name in on_host:
        np.testing.assert_allclose(in_session[name].h, on_host[name].h, rtol=1e-5, atol=1e-6 * np.abs(on_host[name].h).max())
        assert in_session[name].rows == on_host[name].rows == 2 * 20


def test_a_gemm_with_trans_a_sums_the_columns_of_its_activation():
    """Gemm(transA=1) multiplies W by A^T: its rows are A's columns; the in-session H is A A^T."""
    from onnx import TensorProto
    from onnx import helper as oh
    import tqs_onnx.rounding as rounding

    a = np.random.default_rng(3).normal(size=(5, 7)).astype(np.float32)  # (K, M)
    w = np.ones((5, 4), np.float32)
    g = oh.make_graph([oh.make_node("Gemm", ["a", "w"], ["y"], transA=1)], "g",
                      [oh.make_tensor_value_info("a", TensorProto.FLOAT, [5, 7])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                      [numpy_helper.from_array(w, "w")])
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 10
    import onnxruntime as ort

    def factory(probe, outputs):
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        yield 0, dict(zip(outputs, sess.run(outputs, {"a": a})))

    m = rounding.input_moments(model, {"w": TensorProto.FLOAT}, factory)["w"]
    np.testing.assert_allclose(m.h, a.astype(np.float64) @ a.T.astype(np.float64), rtol=1e-5)
    assert m.rows == 7 and m.input_axis == 0


def test_a_plan_verified_on_another_device_than_the_sweep_says_its_codes_are_this_devices(gptq_case, tmp_path):
    """/gptq integers follow the statistics of the device that rolls the contexts out (its kernels round
    differently): a joint check on another device than the sweep's says so in the plan's notes."""
    paths, scores = gptq_case

    def allocate(out):
        return main(["allocate", str(scores), "--compression", "3", "--tiers", "fp32,int4/channel/gptq", "-o", str(out),
                     "--quiet", "--verify-model", str(paths["model"]), "--rollout", str(paths["spec"]),
                     "--contexts", str(paths["contexts"])])

    assert allocate(tmp_path / "same.json") == 0
    assert not any("the sweep ran on" in n for n in json.loads((tmp_path / "same.json").read_text())["notes"])
    doc = json.loads(scores.read_text())
    doc["device"] = "cuda"  # as if swept on a GPU
    scores.write_text(json.dumps(doc))
    assert allocate(tmp_path / "other.json") == 0
    plan = json.loads((tmp_path / "other.json").read_text())
    assert any(p.startswith("int4/channel/gptq") for p in plan["weights"].values())
    assert any("the sweep ran on cuda, this joint check on cpu" in n for n in plan["notes"])


def _moments_both_ways(model, feeds, elem, monkeypatch):
    """input_moments with the sums in the session (rows unknown) and on the host, on one ORT run."""
    import onnxruntime as ort
    import tqs_onnx.rounding as rounding

    def factory(probe, outputs):
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        yield 0, dict(zip(outputs, sess.run(outputs, feeds)))

    with monkeypatch.context() as mp:
        mp.setattr(rounding, "infer_value_shapes", lambda m, shapes: {})
        in_session = rounding.input_moments(model, elem, factory)
    with monkeypatch.context() as mp:
        mp.setattr(rounding, "_gram_nodes", lambda *a: ({}, {}, []))
        on_host = rounding.input_moments(model, elem, factory)
    return in_session, on_host


def test_in_session_sums_keep_each_weights_axis_cast_float16_and_avoid_taken_names(monkeypatch):
    """One activation read by MatMul (K, N) and Gemm(transB=1) (N, K): each weight keeps its input axis;
    a float16 weight's activation is summed in float32 (float16 overflows); names already in the graph
    (even '__tqs_gram_0') are not reused."""
    from onnx import TensorProto
    from onnx import helper as oh

    rng = np.random.default_rng(4)
    x = (rng.normal(size=(64, 6)) * 8).astype(np.float32)
    g = oh.make_graph(
        [oh.make_node("MatMul", ["x", "a"], ["__tqs_gram_0"]), oh.make_node("Gemm", ["x", "b"], ["y2"], transB=1),
         oh.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16), oh.make_node("MatMul", ["xh", "c"], ["y3"])],
        "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [64, 6])],
        [oh.make_tensor_value_info(n, t, None) for n, t in
         (("__tqs_gram_0", TensorProto.FLOAT), ("y2", TensorProto.FLOAT), ("y3", TensorProto.FLOAT16))],
        [numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "a"),
         numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "b"),
         numpy_helper.from_array(rng.normal(size=(6, 3)).astype(np.float16), "c")])
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 10
    elem = {"a": TensorProto.FLOAT, "b": TensorProto.FLOAT, "c": TensorProto.FLOAT16}
    in_session, on_host = _moments_both_ways(model, {"x": x}, elem, monkeypatch)
    assert (in_session["a"].input_axis, in_session["b"].input_axis) == (0, 1) == (on_host["a"].input_axis, on_host["b"].input_axis)
    for name in "abc":
        assert np.isfinite(in_session[name].h).all() and in_session[name].rows == on_host[name].rows == 64
        np.testing.assert_allclose(in_session[name].h, on_host[name].h, rtol=2e-3 if name == "c" else 1e-5)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    t = parse_tier("int4/channel/gptq")
    assert np.array_equal(gptq_codes(w, in_session["b"], t, 0, None), gptq_codes(w, on_host["b"], t, 0, None))


def test_a_weight_with_fewer_statistics_rows_than_inputs_rounds_to_nearest(tmp_path, capsys):
    """3 contexts x 8 steps = 24 rows for W2's 32 inputs: X^T X is singular, GPTQ would fit the sweep
    contexts; W2 rounds to nearest at the /gptq tiers, W1 (16 inputs) keeps its statistics, and the
    sweep says so."""
    paths = save_case(tmp_path, recurrent_mlp(n=16, h=32), recurrent_spec(8), recurrent_contexts(16, s=3))
    scores = tmp_path / "scores.json"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "--tiers", "int4/channel,int4/channel/gptq", "-o", str(scores), "--probes", "1"]) == 0
    doc = json.loads(scores.read_text())
    assert doc["gptq_too_few_rows"] == {"W2": [24, 32]} and doc["gptq_weights"] == ["W1"]
    assert "round to nearest at the /gptq tiers" in capsys.readouterr().err
    damage = {b["weights"][0]: b["damage"] for b in doc["blocks"] if len(b["weights"]) == 1}
    if "W2" in damage:  # its /gptq tier is round-to-nearest: the same values, the same damage
        assert damage["W2"]["int4/channel/gptq"] == damage["W2"]["int4/channel"]


def test_force_does_not_apply_another_models_gptq_integers(gptq_case, tmp_path, capsys):
    """A /gptq plan's integers were rounded for its model's weights: applied with --force to another
    model (the same graph, other weights) they would write that model's rounding."""
    import onnx

    paths, scores = gptq_case
    plan = tmp_path / "plan.json"
    assert _allocate(paths, scores, plan, tiers="int4/channel/gptq") == 0
    other = tmp_path / "other.onnx"
    onnx.save(recurrent_mlp(n=16, h=32, seed=5), other)
    assert main(["apply", str(other), str(plan), "-o", str(tmp_path / "q.onnx"), "--force", "--quiet"]) == 2
    assert "holds /gptq tiers" in capsys.readouterr().err and not (tmp_path / "q.onnx").exists()


def test_a_weight_cast_to_float16_before_its_matmul_gets_statistics_of_float16_activations():
    from onnx import helper

    from tests.tiny import model as tiny_model
    from tqs_onnx.rounding import _readers

    f16 = onnx.TensorProto.FLOAT16
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=f16), helper.make_node("Cast", ["W"], ["W16"], to=f16),
             helper.make_node("Identity", ["W16"], ["Wi"]), helper.make_node("MatMul", ["x16", "Wi"], ["y"])]
    vi = helper.make_tensor_value_info
    m = tiny_model(nodes, [numpy_helper.from_array(np.ones((4, 4), np.float32), "W")],
                   [vi("x", onnx.TensorProto.FLOAT, [1, 4])], [vi("y", f16, [1, 4])])
    (reader,) = _readers(m, {"W"})["W"]
    assert reader.activations == ("x16",) and reader.elem == f16
    m.graph.output.append(vi("W16", f16, [4, 4]))  # the cast weight also leaves the graph: not only multiplied
    assert _readers(m, {"W"}) == {}


def test_gptq_codes_that_lose_to_nearest_on_held_out_contexts_are_not_kept(gptq_case, capsys, monkeypatch):
    """GPTQ fitted on all contexts but one must beat rounding to nearest on that one, summed over the
    contexts, at one of the dampings tried: rows from other subspaces than the fit's (what a few
    correlated rollouts give) make it lose at all of them, iid rows not."""
    from tqs_onnx.rounding import DAMP, held_out_damping

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 32)) / 4).astype(np.float32)
    t = parse_tier("int4/channel")

    def moments(contexts):
        per = {c: x.T @ x for c, x in enumerate(contexts)}
        return InputMoments(sum(per.values()), 0, rows=sum(len(x) for x in contexts), per_context=per)

    mix = rng.standard_normal((16, 16))
    iid = moments([rng.standard_normal((20, 16)) @ mix for _ in range(4)])
    assert held_out_damping(w, iid, t, 1, None) is not None
    basis = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    apart = moments([rng.standard_normal((20, 4)) @ basis[4 * c:4 * c + 4] for c in range(4)])
    assert held_out_damping(w, apart, t, 1, None) is None
    assert held_out_damping(w, InputMoments(apart.h, 0, rows=80), t, 1, None) == DAMP  # one context: no check
    # the damping chosen: the lowest held-out error, at the least damping among equals
    iid_more = moments([rng.standard_normal((200, 16)) @ mix for _ in range(4)])
    assert held_out_damping(w, iid_more, t, 1, None) == DAMP  # many iid rows: GPTQ's usual damping
    # in a sweep where a weight's GPTQ integers lose to nearest's at every damping, the sweep says so
    from tqs_onnx import rounding

    paths, _ = gptq_case
    real = rounding.held_out_damping
    monkeypatch.setattr(rounding, "held_out_damping", lambda w, m, *a: None if w.shape == (16, 32) else real(w, m, *a))
    again = paths["model"].with_name("again.json")
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "--tiers", "int4/channel,int4/channel/gptq", "-o", str(again)]) == 0
    err = capsys.readouterr().err
    assert "1 weight(s) keep round-to-nearest integers at /gptq tiers ('W1' at int4/channel/gptq)" in err
    doc = json.loads(again.read_text())
    assert doc["gptq_damping"]["W1"] == {"int4/channel/gptq": None} and doc["gptq_damping"]["W2"]["int4/channel/gptq"]
    damage = {b["name"]: b["damage"] for b in doc["blocks"]}
    assert damage["l1"]["int4/channel/gptq"] == damage["l1"]["int4/channel"]  # nearest's integers: the plain tier


def test_non_finite_statistics_leave_the_weight_to_round_to_nearest():
    """A NaN or inf in X^T X (an activation, or float32 sums overflowing) rounded most rows to code 0
    without an error; such a weight now rounds to nearest, and a direct factor() refuses."""
    from tqs_onnx.rounding import Rounding

    x = np.random.default_rng(0).standard_normal((40, 8))
    good = InputMoments(x.T @ x, 0, rows=40, per_context={0: x[:20].T @ x[:20], 1: x[20:].T @ x[20:]})
    h = x.T @ x
    h[2, 2] = np.inf
    bad = InputMoments(h, 0, rows=40, per_context={0: h / 2, 1: h / 2})
    nan_context = InputMoments(x.T @ x, 0, rows=40, per_context={0: np.full((8, 8), np.nan), 1: x.T @ x})
    r = Rounding.from_moments({"W": good, "V": bad, "U": nan_context})
    assert set(r.moments) == {"W"} and r.non_finite == ["U", "V"]
    with pytest.raises(TqsError, match="not finite"):
        gptq_codes(np.ones((8, 4), np.float32), bad, parse_tier("int4/channel/gptq"), 1, None)


def test_a_quiet_contexts_fold_is_summed_not_subtracted_from_a_loud_total():
    """Leave-one-out folds: H of the other contexts summed. Subtracted from the total, a context 1e6
    quieter than another came out exactly zero."""
    rng = np.random.default_rng(1)
    quiet, loud = rng.standard_normal((30, 4)), 1e6 * rng.standard_normal((30, 4))
    per = {0: loud.T @ loud, 1: quiet.T @ quiet}
    folds = InputMoments(per[0] + per[1], 0, rows=60, per_context=per).folds()
    fitted_without_loud, held = folds[0]
    assert np.array_equal(held, per[0]) and np.array_equal(fitted_without_loud.h, per[1])
