"""The writer: outputs equal the FP32 graph run with independently dequantized weights; every
weight class (Constant nodes, subgraph weights, Conv/Gemm/Gather) is reachable; INT4/INT2 stay finite;
planned size equals the file on disk."""

import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tiny import init, model, recurrent_contexts, recurrent_mlp, recurrent_spec, save_case, vec
from tqs_onnx.cli import main
from tqs_onnx.graph import load_model
from tqs_onnx.rewrite import rewrite_model, save_model


def run(m_or_path, feeds):
    src = m_or_path if isinstance(m_or_path, str) else m_or_path.SerializeToString()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def reference_dequant(w, bits, axis=None):
    """Independent symmetric RTN: scale = max|w| / (2^(b-1)-1) per tensor or per slice along axis."""
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        amax = np.abs(w).max()
    else:
        amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis), keepdims=True)
    scale = (np.where(amax > 0, amax / qmax, 1.0)).astype(np.float32)
    return (np.clip(np.rint(w / scale), -qmax, qmax) * scale).astype(np.float32)


def substitute(m, values):
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return out


def mixed_model():
    r = np.random.default_rng(0)
    W = r.standard_normal((16, 24)).astype(np.float32)
    G = r.standard_normal((24, 16)).astype(np.float32)
    K = r.standard_normal((4, 1, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]),
             helper.make_node("Gemm", ["a", "G"], ["b"]),
             helper.make_node("Reshape", ["b", "shp"], ["img"]),
             helper.make_node("Conv", ["img", "K"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["y"])]
    inits = [init("W", W), init("G", G), init("K", K), init("shp", np.array([1, 1, 4, 4], np.int64))]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    return model(nodes, inits, [vec("x", 16)], [out]), {"W": W, "G": G, "K": K}


def plan_for(weights: dict[str, str], info: dict[str, dict]) -> dict:
    return {"kind": "tqs-plan", "schema_version": 1, "model": {}, "weights": weights, "weight_info": info}


@pytest.mark.parametrize("tiers,bits", [({"W": "int8", "G": "int8/channel", "K": "int4/channel"}, None),
                                        ({"W": "int2/channel", "G": "int4", "K": "int8"}, None)])
def test_written_graph_equals_fp32_graph_with_dequantized_weights(tmp_path, tiers, bits):
    m, ws = mixed_model()
    onnx.save(m, tmp_path / "m.onnx")
    axes = {"W": 1, "G": 1, "K": 0}
    plan = plan_for(tiers, {})
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan)
    save_model(out, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    expected = {}
    for name, t in tiers.items():
        b = int(t[3])
        expected[name] = reference_dequant(ws[name], b, axes[name] if "channel" in t else None)
    x = {"x": np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)}
    got = run(str(tmp_path / "q.onnx"), x)[0]
    want = run(substitute(m, expected), x)[0]
    np.testing.assert_allclose(got, want, rtol=3e-5, atol=1e-5)
    assert np.all(np.isfinite(got))


def clipped_reference(w: np.ndarray, qmax: int, axis: int) -> np.ndarray:
    """Per column of `axis`, the ratio of a 0.025-step grid in [0.3, 1] with the least squared error."""
    out = np.empty_like(w)
    for c in range(w.shape[axis]):
        col = np.take(w, c, axis=axis)
        best = None
        for r in np.linspace(1.0, 0.3, 29, dtype=np.float32):
            s = np.float32(np.abs(col).max() * r) / np.float32(qmax)
            deq = np.clip(np.rint(col / s), -qmax, qmax) * s
            err = float(np.square(deq - col).sum())
            if best is None or err < best[0]:
                best = (err, deq)
        idx = [slice(None)] * w.ndim
        idx[axis] = c
        out[tuple(idx)] = best[1]
    return out


def test_mse_tier_clips_scales_and_stores_what_the_plain_tier_stores(tmp_path):
    m, ws = mixed_model()
    ws = dict(ws, W=np.where(np.arange(ws["W"].size).reshape(ws["W"].shape) % 17 == 0, 6.0, ws["W"]).astype(np.float32))
    m = substitute(m, {"W": ws["W"]})
    onnx.save(m, tmp_path / "m.onnx")
    sizes = {}
    for t in ("int4/channel", "int4/channel/mse"):
        out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"W": t}, {}))
        save_model(out, tmp_path / "q.onnx")
        sizes[t] = (tmp_path / "q.onnx").stat().st_size
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    x = {"x": np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32)}
    want = run(substitute(m, {"W": clipped_reference(ws["W"], 7, 1)}), x)[0]
    np.testing.assert_allclose(run(str(tmp_path / "q.onnx"), x)[0], want, rtol=3e-5, atol=1e-5)
    # the outliers make clipping pay: less squared weight error than round-to-nearest
    plain = reference_dequant(ws["W"], 4, 1)
    assert np.square(clipped_reference(ws["W"], 7, 1) - ws["W"]).sum() < np.square(plain - ws["W"]).sum()
    assert abs(sizes["int4/channel"] - sizes["int4/channel/mse"]) <= 8  # the tier name in node names


def test_bf16_and_blocked_int4_write_and_match(tmp_path):
    m, ws = mixed_model()
    onnx.save(m, tmp_path / "m.onnx")
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"W": "bf16", "G": "int4/block8"}, {}))
    assert any(n.op_type == "Cast" for n in out.graph.node)
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"][0]
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 8}
    save_model(out, tmp_path / "q.onnx")
    G = ws["G"]
    blocks = G.reshape(3, 8, 16)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 7
    g_deq = (np.clip(np.rint(blocks / scale), -7, 7) * scale).reshape(24, 16).astype(np.float32)
    w_bf = ws["W"].astype(ml_dtypes.bfloat16).astype(np.float32)
    x = {"x": np.ones((1, 16), np.float32)}
    np.testing.assert_allclose(run(str(tmp_path / "q.onnx"), x)[0],
                               run(substitute(m, {"W": w_bf, "G": g_deq}), x)[0], rtol=1e-5, atol=1e-5)


def test_weights_in_constant_nodes_and_if_subgraphs_are_found_and_quantized(tmp_path):
    r = np.random.default_rng(2)
    Wc = r.standard_normal((16, 16)).astype(np.float32)
    Ws = r.standard_normal((16, 16)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["a", "Ws"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 16])], [init("Ws", Ws)])
    else_g = helper.make_graph([helper.make_node("Identity", ["a"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 16])])
    nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(Wc)),
             helper.make_node("MatMul", ["x", "Wc"], ["a"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    m = model(nodes, [init("cond", np.array(True))], [vec("x", 16)], [vec("y", 16)])
    onnx.save(m, tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx"), "--json", "--min-size", "16", "-o", str(tmp_path / "i.json")]) == 0
    doc = json.loads((tmp_path / "i.json").read_text())
    found = {w["name"]: w["origin"] for w in doc["weights"] if w["quantizable"]}
    assert found == {"Wc": "constant", "Ws": "subgraph"}
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"Wc": "int8", "Ws": "int4"}, {}))
    save_model(out, tmp_path / "q.onnx")
    x = {"x": r.standard_normal((1, 16)).astype(np.float32)}
    want = x["x"] @ reference_dequant(Wc, 8) @ reference_dequant(Ws, 4)
    np.testing.assert_allclose(run(str(tmp_path / "q.onnx"), x)[0], want, rtol=1e-4, atol=1e-4)


def test_cli_pipeline_on_demo_planned_equals_on_disk(tmp_path, capsys):
    from tqs_onnx.demo import demo_files

    f = demo_files()
    scores, plan, out = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "q.onnx"
    assert main(["sweep", str(f["model"]), "--rollout", str(f["spec"]), "--contexts", str(f["sweep"]),
                 "-o", str(scores), "--probes", "2", "--horizon", "20", "--quiet"]) == 0
    for target in (3, 6, 10):
        assert main(["allocate", str(scores), "--compression", str(target), "-o", str(plan), "--quiet"]) == 0
        assert main(["apply", str(f["model"]), str(plan), "-o", str(out), "--quiet",
                     "--rollout", str(f["spec"]), "--contexts", str(f["eval"])]) == 0
        doc = json.loads(plan.read_text())
        assert load_model(out).file_bytes == doc["planned_bytes"]  # byte-exact, not approximately
        assert doc["planned_compression"] >= target
        assert any(n.startswith("not verified") for n in doc["notes"])  # no --verify-model: said so
    assert main(["allocate", str(scores), "--compression", "6", "-o", str(plan), "--quiet", "--verify-model",
                 str(f["model"]), "--rollout", str(f["spec"]), "--contexts", str(f["sweep"])]) == 0
    assert not any(n.startswith("not verified") for n in json.loads(plan.read_text())["notes"])
    assert main(["eval", str(f["model"]), str(out), "--rollout", str(f["spec"]), "--contexts", str(f["eval"]),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs"]["x_next"]["finite"] and len(report["outputs"]["x_next"]["mae_vs_fp32_per_channel"]) == 40


def test_external_data_written_and_checked(tmp_path):
    paths = save_case(tmp_path, recurrent_mlp(n=64, h=128), recurrent_spec(), recurrent_contexts(n=64))
    plan = plan_for({"W1": "int4/channel", "W2": "int8"}, {})
    out, _ = rewrite_model(load_model(paths["model"]), plan)
    written = save_model(out, tmp_path / "ext" / "q.onnx", external=True)
    assert {p.name for p in written} == {"q.onnx", "q.onnx.data"}
    onnx.checker.check_model(str(tmp_path / "ext" / "q.onnx"))
    assert not list((tmp_path / "ext").glob(".*"))  # no temp files left behind


@pytest.mark.parametrize("tier", ["int4/block32", "int8/channel", "int4/channel", "int8", "int6/channel", "int6/block32",
                                  "int1/channel", "int8/channel/fp16", "int4/block32/fp16", "int6/channel/fp16"])
def test_matmul_forms_are_fused_by_onnxruntime(tmp_path, tier):
    """The written DQ -> MatMul is fused (MatMulNBits): no weight is dequantized per call. The int1
    and int6 unpacking and the Cast of fp16 scales are folded at load first."""
    W = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    m = model([helper.make_node("MatMul", ["x", "W"], ["y"])], [init("W", W)], [vec("x", 128)], [vec("y", 64)])
    onnx.save(m, tmp_path / "m.onnx")
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"W": tier}, {}))
    save_model(out, tmp_path / "q.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node}
    assert "MatMulNBits" in ops and "DequantizeLinear" not in ops, ops


@pytest.mark.parametrize("n", [16, 15])
def test_apply_refuses_a_model_that_ort_optimizes_into_other_values(tmp_path, n):
    """onnxruntime 1.31 fuses INT2 DQ->MatMul into MatMulNBits that miscomputes when N % 4 != 0: the
    written model must match its own unoptimized graph, or apply fails with one clear line."""
    from tqs_onnx.errors import TqsError
    from tqs_onnx.evaluate import optimized_vs_written, verify_written
    from tqs_onnx.runtime import Device, make_session

    W = np.random.default_rng(0).standard_normal((64, n)).astype(np.float32)
    m = model([helper.make_node("MatMul", ["x", "W"], ["y"])], [init("W", W)], [vec("x", 64)], [vec("y", n)])
    onnx.save(m, tmp_path / "m.onnx")
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"W": "int2/channel"}, {}))
    save_model(out, tmp_path / "q.onnx")
    from tqs_onnx.evaluate import _first_step

    optimized = _first_step(make_session(str(tmp_path / "q.onnx"), Device("cpu")), Device("cpu"), None, None)
    err = optimized_vs_written(tmp_path / "q.onnx", Device("cpu"), optimized, None, None)
    if err <= 0.05:
        assert verify_written(tmp_path / "q.onnx", Device("cpu"))["optimized_rel_err"] == pytest.approx(err)
    else:
        with pytest.raises(TqsError, match="optimized graph computes other values"):
            verify_written(tmp_path / "q.onnx", Device("cpu"))


def test_uniform_plan_fits_a_target_equal_to_its_own_size(tmp_path):
    """The joint check must be able to start from uniform at the uniform model's exact on-disk size."""
    from tqs_onnx.allocate import Allocation, allocate, plan_document
    from tqs_onnx.demo import demo_files
    from tqs_onnx.refine import uniform_assignments
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import Device
    from tqs_onnx.sweep import SweepConfig, run_sweep

    f = demo_files()
    spec = RolloutSpec.load(f["spec"])
    spec.horizon = 3
    loaded = load_model(f["model"])
    scores = run_sweep(loaded, spec, Contexts.load(f["sweep"], spec).subset([0]), Device("cpu"),
                       SweepConfig(probe="quant", tiers=["int8/channel", "int4/channel", "int2/channel"]), quiet=True)
    for k in (1, 2, 3):
        p, _ = allocate(scores, 2.0)
        uniform = plan_document(scores, p, Allocation([k] * len(p.blocks), "uniform", "u"))
        out, _ = rewrite_model(loaded, uniform)
        save_model(out, tmp_path / "u.onnx")
        size = load_model(tmp_path / "u.onnx").file_bytes
        assert size == uniform["planned_bytes"]
        matched, _ = allocate(scores, loaded.file_bytes / size)
        assert [k] * len(p.blocks) in uniform_assignments(matched).values()
        assert matched.total_bytes([k] * len(p.blocks)) <= matched.limit


def test_preparing_the_graph_leaves_the_callers_model_untouched(tmp_path):
    """Lifting and factoring work on our own copy (onnx-ir shares tensors with the proto it reads)."""
    from tqs_onnx.models.pangu_replica import build_pangu
    from tqs_onnx.prepare import prepare_graph

    build_pangu(tmp_path, grid="small")
    loaded = load_model(next(tmp_path.glob("*.onnx")))
    before = loaded.model.SerializeToString()
    prepared = prepare_graph(loaded.model, factor=True)
    assert prepared.reports["factor-tables"]["tensors_rewritten"] > 0 and prepared.reports["lift-weights"]["lifted"] > 0
    assert loaded.model.SerializeToString() == before


def test_zero_tier_drops_a_weight_and_planned_bytes_equal_the_file(tmp_path):
    """`zero` (for dead blocks) stores nothing: ConstantOfShape makes the zeros; the planner counts its
    nodes to the byte, beside an int tier in the same plan."""
    from tqs_onnx.allocate import Allocation, allocate, plan_document
    from tqs_onnx.demo import demo_files
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import Device
    from tqs_onnx.sweep import SweepConfig, run_sweep

    f = demo_files()
    spec = RolloutSpec.load(f["spec"])
    spec.horizon = 2
    loaded = load_model(f["model"])
    scores = run_sweep(loaded, spec, Contexts.load(f["sweep"], spec).subset([0]), Device("cpu"),
                       SweepConfig(probe="quant", tiers=["int8/channel", "zero"]), quiet=True)
    assert all(b["damage"]["zero"] > 0 for b in scores["blocks"])  # every demo block is live
    p, _ = allocate(scores, 2.0)
    ks = [str(t) for t in p.tiers]
    assign = [ks.index("zero")] + [ks.index("int8/channel")] * (len(p.blocks) - 1)
    plan = plan_document(scores, p, Allocation(assign, "uniform", "mixed"))
    out, _ = rewrite_model(loaded, plan)
    save_model(out, tmp_path / "q.onnx")
    assert load_model(tmp_path / "q.onnx").file_bytes == plan["planned_bytes"]
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    dropped = p.blocks[0].weights
    written = onnx.load(tmp_path / "q.onnx")
    assert not {i.name for i in written.graph.initializer} & set(dropped)
    assert sum(n.op_type == "ConstantOfShape" for n in written.graph.node) == len(dropped)
    x = np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    assert np.all(np.isfinite(sess.run(None, {sess.get_inputs()[0].name: x})[0]))


@pytest.mark.parametrize("tiers,least", [(["int1", "int1/channel", "int1/block32/fp16"], 8),
                                         (["int6", "int6/channel", "int6/block32/fp16"], 3.5)])
def test_packed_tiers_planned_bytes_equal_the_file(tmp_path, tiers, least):
    """int1 stores 8 signs per byte, int6 an int4 and a uint2 tensor, plus their scales; the planner
    counts their nodes to the byte, and ONNX Runtime runs them (optimized, as shipped) computing the
    values `apply_tier` gives."""
    from tqs_onnx.allocate import Allocation, allocate, plan_document
    from tqs_onnx.demo import demo_files
    from tqs_onnx.quant import apply_tier
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import Device
    from tqs_onnx.sweep import SweepConfig, run_sweep
    from tqs_onnx.tiers import parse_tier

    f = demo_files()
    spec = RolloutSpec.load(f["spec"])
    spec.horizon = 2
    loaded = load_model(f["model"])
    scores = run_sweep(loaded, spec, Contexts.load(f["sweep"], spec).subset([0]), Device("cpu"),
                       SweepConfig(probe="quant", tiers=tiers), quiet=True)
    assert all(b["damage"][t] > 0 for b in scores["blocks"] for t in tiers)
    p, _ = allocate(scores, 2.0)
    ks = [str(t) for t in p.tiers]
    assign = [ks.index(tiers[i % 3]) for i in range(len(p.blocks))]
    plan = plan_document(scores, p, Allocation(assign, "uniform", "mixed"))
    out, _ = rewrite_model(loaded, plan)
    save_model(out, tmp_path / "q.onnx")
    assert load_model(tmp_path / "q.onnx").file_bytes == plan["planned_bytes"]
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    assert loaded.file_bytes / plan["planned_bytes"] > least  # 1 or 6 bits of 32, less scales, headers, biases

    reference = onnx.load(f["model"])
    info = scores["weights"]
    for t in reference.graph.initializer:
        if t.name in plan["weights"] and plan["weights"][t.name] != "fp32":
            w = numpy_helper.to_array(t)
            axes = (info[t.name]["channel_axis"], info[t.name]["block_axis"])
            t.CopyFrom(numpy_helper.from_array(apply_tier(w, parse_tier(plan["weights"][t.name]), *axes), t.name))
    x = {i.name: np.random.default_rng(3).standard_normal([d.dim_value or 1 for d in i.type.tensor_type.shape.dim])
         .astype(np.float32) for i in reference.graph.input}
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as ONNX defines it
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), exact, providers=["CPUExecutionProvider"]).run(None, x)
    want = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    shipped = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, x)
    for g, w, s in zip(got, want, shipped):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * (1 + float(np.abs(w).max())))
        # Optimized, ORT may fuse the DequantizeLinear into MatMulNBits with int8 activations.
        assert np.all(np.isfinite(s)) and np.abs(s - w).max() < 1e-2 * (1 + float(np.abs(w).max()))


@pytest.mark.parametrize("tier", ["int8/channel", "int4/block16", "int6/channel", "int1/channel", "int8/channel/fp16"])
def test_gemm_transb_weights_are_stored_transposed_and_fused(tmp_path, tier):
    """A weight read only by Gemm(transB=1) is written transposed with transB=0: same values, same
    file size as planned, and ONNX Runtime fuses it into MatMulNBits instead of dequantizing per call."""
    from tqs_onnx.allocate import Allocation, allocate, plan_document
    from tqs_onnx.quant import apply_tier
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import Device
    from tqs_onnx.sweep import SweepConfig, run_sweep
    from tqs_onnx.tiers import parse_tier
    from tiny import recurrent_contexts, recurrent_spec, rng_weights, save_case

    n = 32
    w1, w2 = rng_weights(3, (64, n), (n, 64))  # stored (out, in): Gemm transB=1, as torch exports Linear
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Gemm", ["t", "W2", "b2"], ["d"], transB=1),
             helper.make_node("Add", ["x", "d"], ["x_next"])]
    inits = [init("W1", w1), init("W2", w2), init("b1", np.zeros(64, np.float32)), init("b2", np.zeros(n, np.float32))]
    m = model(nodes, inits, [vec("x", n)], [vec("x_next", n)])
    paths = save_case(tmp_path, m, recurrent_spec(horizon=2), recurrent_contexts(n=n, s=1))
    spec = RolloutSpec.load(paths["spec"])
    loaded = load_model(paths["model"])
    scores = run_sweep(loaded, spec, Contexts.load(paths["contexts"], spec), Device("cpu"),
                       SweepConfig(probe="quant", tiers=[tier], min_size=16, blocks="tensor"), quiet=True)
    p, _ = allocate(scores, 2.0)
    k = [str(t) for t in p.tiers].index(tier)
    plan = plan_document(scores, p, Allocation([k] * len(p.blocks), "uniform", tier))
    out, _ = rewrite_model(loaded, plan)
    save_model(out, tmp_path / "q.onnx")
    assert load_model(tmp_path / "q.onnx").file_bytes == plan["planned_bytes"]
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    written = onnx.load(tmp_path / "q.onnx")
    assert [a.i for nd in written.graph.node if nd.op_type == "Gemm" for a in nd.attribute if a.name == "transB"] == [0, 0]

    info = scores["weights"]
    ref = substitute(m, {w: apply_tier(v, parse_tier(tier), info[w]["channel_axis"], info[w]["block_axis"])
                         for w, v in (("W1", w1), ("W2", w2))})
    x = {"x": np.random.default_rng(4).standard_normal((1, n)).astype(np.float32)}
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), exact, providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, run(ref, x)[0], rtol=1e-5, atol=1e-5)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [nd.op_type for nd in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("MatMulNBits") == 2 and "DequantizeLinear" not in ops, ops


def test_planned_bytes_count_the_opset_conversion(tmp_path):
    """int4 needs opset 21; converting an opset-17 graph turns ReduceMean's axes attribute into an input
    (a new Constant). The sweep measures what that adds, so planned bytes still equal the file."""
    from tqs_onnx.allocate import Allocation, allocate, plan_document
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import Device
    from tqs_onnx.sweep import SweepConfig, run_sweep
    from tiny import recurrent_contexts, recurrent_spec, rng_weights, save_case

    n = 32
    (w,) = rng_weights(5, (n, n))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Sub", ["h", "m"], ["c"]),
             helper.make_node("Tanh", ["c"], ["t"]),
             helper.make_node("Add", ["x", "t"], ["x_next"])]
    m = model(nodes, [init("W", w)], [vec("x", n)], [vec("x_next", n)], opset=17)
    paths = save_case(tmp_path, m, recurrent_spec(horizon=2), recurrent_contexts(n=n, s=1))
    spec = RolloutSpec.load(paths["spec"])
    loaded = load_model(paths["model"])
    tiers = ["int8/channel", "int4/channel", "int2/channel"]
    scores = run_sweep(loaded, spec, Contexts.load(paths["contexts"], spec), Device("cpu"),
                       SweepConfig(probe="quant", tiers=tiers, min_size=16, blocks="tensor"), quiet=True)
    assert scores["model"]["opset_graph_delta"]["21"] > 0
    p, _ = allocate(scores, 2.0)
    for tier in tiers:
        plan = plan_document(scores, p, Allocation([[str(t) for t in p.tiers].index(tier)], "uniform", tier))
        out, _ = rewrite_model(loaded, plan)
        save_model(out, tmp_path / "q.onnx")
        assert load_model(tmp_path / "q.onnx").file_bytes == plan["planned_bytes"], tier
        # At a target equal to that file's size the uniform plan still fits (the joint check starts there).
        from tqs_onnx.refine import uniform_assignments

        q, _ = allocate(scores, loaded.file_bytes / plan["planned_bytes"])
        assert tier in uniform_assignments(q)


@pytest.mark.parametrize("tier", ["int8", "int8/channel", "int1/channel", "int6/channel", "int4/block16"])
def test_float16_weights_get_an_opset_that_takes_float16_scales(tmp_path, tier):
    """An integer tier of a float16 weight has float16 scales, which DequantizeLinear takes from opset
    19 on: a plan on a float16 model must not be written at opset 13 (tests/test_float16.py sweeps one)."""
    from tqs_onnx.graph import weight_table

    W = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float16)
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 32])], [init("W", W)]),
        opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    onnx.save(m, tmp_path / "m.onnx")
    (w,) = weight_table(m, min_size=16)
    assert w.quantizable
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"),
                           plan_for({"W": tier}, {"W": {"shape": [64, 32], "channel_axis": 1, "block_axis": 0}}))
    save_model(out, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    y = run(str(tmp_path / "q.onnx"), {"x": np.ones((1, 64), np.float16)})[0]
    assert y.dtype == np.float16 and np.all(np.isfinite(y))


@pytest.mark.parametrize("tier", ["int8", "int8/channel", "int4/block32", "int4/block16/fp16", "int6/channel",
                                  "int2/channel", "int1/block32", "int4/channel/mse"])
def test_decode_at_load_form_is_folded_by_onnxruntime_and_equals_the_dq_form(tmp_path, tier):
    """A `/load` tier stores what its DequantizeLinear form stores but decodes it with Cast/Sub/Mul
    (Expand/Reshape/Slice for blocked scales, here with a short last block): ORT folds that at load,
    so the optimized graph is a plain float MatMul; the values equal the DQ form's to the bit and the
    file is the size the planner counted."""
    from tqs_onnx.allocate import Allocation, allocate, plan_document
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import Device
    from tqs_onnx.sweep import SweepConfig, run_sweep
    from tiny import recurrent_contexts, recurrent_mlp, recurrent_spec, save_case

    paths = save_case(tmp_path, recurrent_mlp(n=24, h=40), recurrent_spec(horizon=2), recurrent_contexts(n=24, s=1))
    spec = RolloutSpec.load(paths["spec"])
    loaded = load_model(paths["model"])
    scores = run_sweep(loaded, spec, Contexts.load(paths["contexts"], spec), Device("cpu"),
                       SweepConfig(probe="quant", tiers=[tier], min_size=16, blocks="tensor"), quiet=True)
    x = {"x": np.random.default_rng(5).standard_normal((1, 24)).astype(np.float32)}
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outputs = {}
    for at_load in (False, True):
        p, _ = allocate(scores, 2.0, decode="load" if at_load else "dq")
        k = [str(t) for t in p.tiers].index(tier)
        plan = plan_document(scores, p, Allocation([k] * len(p.blocks), "uniform", tier))
        assert set(plan["weights"].values()) == {f"{tier}/load" if at_load else tier}
        out, _ = rewrite_model(loaded, plan)
        path = tmp_path / f"q{int(at_load)}.onnx"
        save_model(out, path)
        assert load_model(path).file_bytes == plan["planned_bytes"]
        onnx.checker.check_model(str(path), full_check=True)
        outputs[at_load] = ort.InferenceSession(str(path), exact, providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(outputs[True], outputs[False])
    ops, shipped = {}, None
    for name in ("m", "q1"):  # the FP32 model and the /load model, as ORT runs them
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
        shipped = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), so, providers=["CPUExecutionProvider"]).run(None, x)[0]
        ops[name] = [nd.op_type for nd in onnx.load(tmp_path / f"{name}.opt.onnx").graph.node]
    assert ops["q1"] == ops["m"], ops  # every decode folded at load: the FP32 model's own kernels
    np.testing.assert_allclose(shipped, outputs[False], rtol=1e-6, atol=1e-6)


def test_auto_decode_keeps_dequantizelinear_only_where_onnxruntime_fuses_it():
    """auto: 2-D weights read only by MatMul/Gemm keep DequantizeLinear (MatMulNBits); any other weight
    (a Conv kernel, an Add or Gather table, a 3-D MatMul operand) is written in the /load form."""
    from tqs_onnx.tiers import parse_tier, written_form

    t = parse_tier("int4/channel")
    assert written_form(t, ["MatMul"], (64, 32)) == t
    assert written_form(t, ["Gemm", "MatMul"], (64, 32)) == t
    for ops, shape in ((["Conv"], (8, 4, 3, 3)), (["Add"], (8, 64)), (["Gather"], (100, 8)),
                       (["MatMul"], (4, 64, 32)), (["MatMul", "Add"], (64, 32))):
        assert str(written_form(t, ops, shape)) == "int4/channel/load", ops
    assert written_form(t, ["Conv"], (8, 4, 3, 3), "dq") == t
    assert str(written_form(t, ["MatMul"], (64, 32), "load")) == "int4/channel/load"
    assert written_form(parse_tier("bf16"), ["Conv"], (8, 4, 3, 3)) == parse_tier("bf16")


def test_fused_dq_needs_the_stored_weight_as_b_of_a_main_graph_matmul():
    """ORT fuses DequantizeLinear into MatMulNBits only when it feeds MatMul/Gemm B directly in the main
    graph: a weight reached through a Transpose, read inside an If branch, or read as A is not fused,
    and `auto` writes it in the /load form."""
    from tqs_onnx.graph import weight_table
    from tqs_onnx.tiers import parse_tier, written_form

    r = np.random.default_rng(7)
    ws = {k: r.standard_normal((16, 16)).astype(np.float32) for k in ("Wd", "Wt", "Wa", "Wi")}
    then_g = helper.make_graph([helper.make_node("MatMul", ["h3", "Wi"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 16])])
    else_g = helper.make_graph([helper.make_node("Identity", ["h3"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 16])])
    nodes = [helper.make_node("MatMul", ["x", "Wd"], ["h1"]),
             helper.make_node("Transpose", ["Wt"], ["WtT"], perm=[1, 0]),
             helper.make_node("MatMul", ["h1", "WtT"], ["h2"]),
             helper.make_node("MatMul", ["Wa", "h2T"], ["h3T"]),
             helper.make_node("Transpose", ["h2"], ["h2T"], perm=[1, 0]),
             helper.make_node("Transpose", ["h3T"], ["h3"], perm=[1, 0]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    nodes = [nodes[i] for i in (0, 1, 2, 4, 3, 5, 6)]
    m = model(nodes, [init(k, v) for k, v in ws.items()] + [init("cond", np.array(True))], [vec("x", 16)],
              [vec("y", 16)])
    table = {w.name: w for w in weight_table(m, min_size=16)}
    assert {n: table[n].fused_dq for n in ws} == {"Wd": True, "Wt": False, "Wa": False, "Wi": False}
    t = parse_tier("int8/channel")
    written = {n: str(written_form(t, table[n].consumer_ops, table[n].shape, "auto", table[n].fused_dq)) for n in ws}
    assert written == {"Wd": "int8/channel", "Wt": "int8/channel/load", "Wa": "int8/channel/load",
                       "Wi": "int8/channel/load"}


def test_apply_reports_the_form_of_each_written_weight(tmp_path):
    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps(plan_for({"W1": "int8", "W2": "int4/channel/load"}, {})))
    report = tmp_path / "r.json"
    assert main(["apply", str(paths["model"]), str(plan), "-o", str(tmp_path / "q.onnx"), "--quiet",
                 "--report", str(report)]) == 0
    forms = json.loads(report.read_text())["forms"]
    # A hand-written plan has no weight_info: the forms come from the graph's own weight table, and
    # ORT's optimized graph agrees (W1's DequantizeLinear fused, W2 folded at load).
    assert forms == {"DequantizeLinear fused by ORT": 1, "DequantizeLinear per call": 0, "decoded at load": 1,
                     "fp16/bf16 Cast": 0, "zeros": 0}
    ops = _ort_optimized_ops(tmp_path / "q.onnx", tmp_path)
    assert ops.count("MatMulNBits") == 1 and "DequantizeLinear" not in ops, ops


def test_auto_keeps_a_lookup_table_behind_constant_indices_compact_after_load(tmp_path):
    """A table read by a Gather through constant indices (a factored table) decoded at load would be
    folded by ORT through the Gather into the expanded tensor, the FP32 model's memory; `auto` writes it
    with DequantizeLinear, which ORT keeps, so the session holds the compact table. An embedding read
    through a graph input's indices cannot be folded and is decoded at load as before."""
    from tqs_onnx.graph import weight_table
    from tqs_onnx.runtime import Device
    from tqs_onnx.runtime_report import optimized_graph, tensor_bytes
    from tqs_onnx.tiers import parse_tier, written_form

    r = np.random.default_rng(5)
    table, emb = r.standard_normal((64, 8)).astype(np.float32), r.standard_normal((64, 8)).astype(np.float32)
    index = r.integers(0, 64, (40, 40)).astype(np.int64)
    nodes = [helper.make_node("Gather", ["T", "idx"], ["bias"]),
             helper.make_node("Gather", ["E", "tok"], ["e"]),
             helper.make_node("Add", ["x", "bias"], ["xb"]),
             helper.make_node("Add", ["xb", "e"], ["y"])]
    m = model(nodes, [init("T", table), init("E", emb), init("idx", index)],
              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [40, 40, 8]),
               helper.make_tensor_value_info("tok", TensorProto.INT64, [40, 40])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [40, 40, 8])])
    ws = {w.name: w for w in weight_table(m, min_size=16)}
    assert (ws["T"].const_lookup, ws["E"].const_lookup) == (True, False)
    t = parse_tier("int8/channel")
    forms = {n: str(written_form(t, w.consumer_ops, w.shape, "auto", w.fused_dq, w.const_lookup)) for n, w in ws.items()}
    assert forms == {"T": "int8/channel", "E": "int8/channel/load"}
    for decode, want in (("load-compact", forms), ("load", {"T": "int8/channel/load", "E": "int8/channel/load"}),
                         ("dq", {"T": "int8/channel", "E": "int8/channel"})):
        assert {n: str(written_form(t, w.consumer_ops, w.shape, decode, w.fused_dq, w.const_lookup))
                for n, w in ws.items()} == want, decode
    onnx.save(m, tmp_path / "m.onnx")
    initializer_bytes = {}
    for label, t_form in (("dq", "int8/channel"), ("load", "int8/channel/load")):
        out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"T": t_form, "E": forms["E"]}, {}))
        save_model(out, tmp_path / f"{label}.onnx")
        opt = optimized_graph(tmp_path / f"{label}.onnx", Device("cpu"))
        initializer_bytes[label] = {i.name: tensor_bytes(list(i.dims), i.data_type) for i in opt.graph.initializer}
    expanded = index.size * 8 * 4
    assert max(initializer_bytes["load"].values()) >= expanded  # folded through the Gather at load
    assert sum(initializer_bytes["dq"].values()) < expanded / 2  # the compact table (and its index) stay


def function_model(calls: int = 2):
    """x -> Hidden(x) ... (called `calls` times, each holding W1 in a Constant of the function body) ->
    Linear(h, W2): weights a torch export with modules as functions hides from a plain graph walk."""
    r = np.random.default_rng(4)
    W1 = (r.standard_normal((32, 32)) / 6).astype(np.float32)
    W2 = (r.standard_normal((32, 32)) / 6).astype(np.float32)
    hidden = helper.make_function("pkg", "Hidden", ["x"], ["y"], [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W1)),
        helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["y"])],
        [helper.make_opsetid("", 17)])
    linear = helper.make_function("pkg", "Linear", ["x", "W"], ["y"], [helper.make_node("MatMul", ["x", "W"], ["y"])],
                                  [helper.make_opsetid("", 17)])
    nodes, last = [], "x"
    for i in range(calls):
        nodes.append(helper.make_node("Hidden", [last], [f"h{i}"], domain="pkg", name=f"/hidden{i}"))
        last = f"h{i}"
    nodes.append(helper.make_node("Linear", [last, "W2"], ["y"], domain="pkg", name="/out"))
    g = helper.make_graph(nodes, "g", [vec("x", 32)], [vec("y", 32)], [init("W2", W2)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("pkg", 1)],
                          functions=[hidden, linear])
    m.ir_version = 9
    onnx.checker.check_model(m, full_check=True)
    return m, W1, W2


def test_weights_inside_local_functions_are_found_and_stored_once(tmp_path):
    m, W1, W2 = function_model(calls=2)
    onnx.save(m, tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx"), "--json", "-o", str(tmp_path / "i.json")]) == 0
    doc = json.loads((tmp_path / "i.json").read_text())
    weights = {w["name"]: w for w in doc["weights"]}
    # Two calls inline two copies of W1; the duplicate pass keeps one, read by both MatMuls.
    assert len(weights) == 2 and doc["parameters"] == W1.size + W2.size
    assert all(w["quantizable"] for w in weights.values())
    # W2 is read by one MatMul (ORT fuses it); W1 by both calls' MatMuls (ORT fuses neither copy).
    assert [n for n, w in weights.items() if w["fused_dq"]] == ["W2"]
    assert doc["lossless"]["inline-functions"]["call_sites"] == 3
    assert doc["lossless"]["dedup"]["tensors_removed"] == 1
    w1 = next(n for n in weights if n != "W2")
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({w1: "int8", "W2": "int4"}, {}))
    save_model(out, tmp_path / "q.onnx")
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert not q.functions and sum(n.op_type == "DequantizeLinear" for n in q.graph.node) == 2
    x = {"x": np.random.default_rng(5).standard_normal((1, 32)).astype(np.float32)}
    d1 = reference_dequant(W1, 8)
    want = np.tanh(np.tanh(x["x"] @ d1) @ d1) @ reference_dequant(W2, 4)
    np.testing.assert_allclose(run(str(tmp_path / "q.onnx"), x)[0], want, rtol=1e-4, atol=1e-4)


def test_identical_tensors_are_written_once_and_planned_size_is_on_disk(tmp_path):
    """W and its copy W_copy (two MatMuls) become one weight: one block, one stored tensor."""
    r = np.random.default_rng(6)
    W = (r.standard_normal((32, 32)) / 6).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["b"]),
             helper.make_node("MatMul", ["b", "W_copy"], ["c"]), helper.make_node("Add", ["x", "c"], ["x_next"])]
    m = model(nodes, [init("W", W), init("W_copy", W.copy())], [vec("x", 32)], [vec("x_next", 32)])
    spec = {"horizon": 6, "feedback": {"x_next": "x"}, "trajectory": ["x_next"], "initial": {"x": "x0"}}
    paths = save_case(tmp_path, m, spec, {"x0": r.standard_normal((2, 1, 32)).astype(np.float32)})
    scores, plan, q = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "q.onnx"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "-o", str(scores), "--probes", "1", "--tiers", "int8", "--quiet"]) == 0
    assert [b["weights"] for b in json.loads(scores.read_text())["blocks"]] == [["W"]]
    assert main(["allocate", str(scores), "--compression", "6", "-o", str(plan), "--quiet"]) == 0
    assert main(["apply", str(paths["model"]), str(plan), "-o", str(q), "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["on_disk_compression"] == pytest.approx(report["planned_compression"], rel=0.002)
    assert report["on_disk_compression"] > 6  # one INT8 copy of the two FP32 ones
    written = onnx.load(str(q))
    assert [t.name for t in written.graph.initializer if t.data_type == TensorProto.INT8] == ["W__q"]
    x = {"x": r.standard_normal((1, 32)).astype(np.float32)}
    d = reference_dequant(W, 8)
    np.testing.assert_allclose(run(str(q), x)[0], x["x"] + np.tanh(x["x"] @ d) @ d, rtol=1e-4, atol=1e-4)


def test_sparse_initializer_is_kept_as_stored_through_an_opset_upgrade(tmp_path):
    """A sparse initializer is not quantized and survives the passes that do not know it (onnx-ir
    lifting a Constant, the version converter that INT4 needs)."""
    r = np.random.default_rng(7)
    S = np.zeros((16, 16), np.float32)
    S[r.integers(0, 16, 12), r.integers(0, 16, 12)] = r.standard_normal(12).astype(np.float32)
    Wc = (r.standard_normal((16, 16)) / 4).astype(np.float32)
    idx = np.flatnonzero(S).astype(np.int64)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(S.ravel()[idx], "S"),
                                       numpy_helper.from_array(idx, "S_idx"), [16, 16])
    nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(Wc)),
             helper.make_node("MatMul", ["x", "Wc"], ["a"]), helper.make_node("MatMul", ["a", "S"], ["y"])]
    g = helper.make_graph(nodes, "g", [vec("x", 16)], [vec("y", 16)], sparse_initializer=[sparse])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    onnx.save(m, tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx"), "--json", "--min-size", "16", "-o", str(tmp_path / "i.json")]) == 0
    doc = json.loads((tmp_path / "i.json").read_text())
    assert [w["name"] for w in doc["weights"]] == ["Wc"]
    assert doc["sparse_initializers"] == [{"name": "S", "shape": [16, 16], "stored_values": idx.size}]
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"Wc": "int4"}, {}))
    save_model(out, tmp_path / "q.onnx")
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert [sp.SerializeToString() for sp in q.graph.sparse_initializer] == [sparse.SerializeToString()]
    assert [i.name for i in q.graph.input] == ["x"] and q.opset_import[0].version >= 21
    x = {"x": r.standard_normal((1, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(str(tmp_path / "q.onnx"), x)[0], x["x"] @ reference_dequant(Wc, 4) @ S,
                               rtol=1e-4, atol=1e-5)


def test_a_function_standing_for_an_ort_kernel_is_not_inlined():
    """com.microsoft.Gelu given a (wrong) fallback body: ORT runs its own kernel, and so must we."""
    from tqs_onnx.prepare import prepare_graph

    m, _, _ = function_model(calls=1)
    m.functions.append(helper.make_function("com.microsoft", "Gelu", ["X"], ["Y"], [helper.make_node("Identity", ["X"], ["Y"])],
                                            [helper.make_opsetid("", 17)]))
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    m.graph.node[-1].output[0] = "pre"
    m.graph.node.append(helper.make_node("Gelu", ["pre"], ["y"], domain="com.microsoft"))
    prepared = prepare_graph(m)
    assert [f.name for f in prepared.model.functions] == ["Gelu"]
    assert prepared.reports["inline-functions"]["kept"] == ["com.microsoft.Gelu"]
    x = {"x": np.random.default_rng(8).standard_normal((1, 32)).astype(np.float32)}
    np.testing.assert_array_equal(run(prepared.model, x)[0], run(m, x)[0])


def test_sparse_tensors_stay_as_the_model_stores_them(tmp_path, monkeypatch):
    """A sparse initializer that is also a graph input stays overridable; a Constant(sparse_value) comes
    back as a sparse initializer; sparse values stored as external data are read from the model's folder
    (onnx's loader skips them, and ORT would look in its working folder)."""
    r = np.random.default_rng(9)
    S = np.zeros((16, 16), np.float32)
    S[r.integers(0, 16, 12), r.integers(0, 16, 12)] = r.standard_normal(12).astype(np.float32)
    idx = np.flatnonzero(S).astype(np.int64)

    def sparse(name):
        return helper.make_sparse_tensor(numpy_helper.from_array(S.ravel()[idx], name),
                                         numpy_helper.from_array(idx, f"{name}_idx"), [16, 16])
    W = (r.standard_normal((16, 16)) / 4).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["C"], sparse_value=sparse("C")),
             helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("MatMul", ["a", "S"], ["b"]),
             helper.make_node("MatMul", ["b", "C"], ["y"])]
    s_in = sparse("S")
    s_in.values.data_location = TensorProto.EXTERNAL
    s_in.values.external_data.add(key="location", value="s.bin")
    (tmp_path / "s.bin").write_bytes(s_in.values.raw_data)
    s_in.values.ClearField("raw_data")
    g = helper.make_graph(nodes, "g", [vec("x", 16), helper.make_tensor_value_info("S", TensorProto.FLOAT, [16, 16])],
                          [vec("y", 16)], [init("W", W)], sparse_initializer=[s_in])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, tmp_path / "m.onnx")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "s.bin").write_bytes(np.full(idx.size, np.nan, np.float32).tobytes())  # a decoy
    monkeypatch.chdir(elsewhere)
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"W": "int4"}, {}))
    save_model(out, tmp_path / "q.onnx")
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert [i.name for i in q.graph.input] == ["x", "S"] and not any(n.op_type == "Constant" for n in q.graph.node)
    assert sorted(sp.values.name for sp in q.graph.sparse_initializer) == ["C", "S"]
    assert all(sp.values.data_location != TensorProto.EXTERNAL and sp.values.raw_data for sp in q.graph.sparse_initializer)
    x = {"x": r.standard_normal((1, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(str(tmp_path / "q.onnx"), x)[0], x["x"] @ reference_dequant(W, 4) @ S @ S,
                               rtol=1e-4, atol=1e-5)
    other = r.standard_normal((16, 16)).astype(np.float32)  # S is still an input
    np.testing.assert_allclose(run(str(tmp_path / "q.onnx"), {**x, "S": other})[0],
                               x["x"] @ reference_dequant(W, 4) @ other @ S, rtol=1e-4, atol=1e-5)


def test_a_small_function_constant_inlined_at_every_call_is_stored_once():
    from tqs_onnx.prepare import prepare_graph

    r = np.random.default_rng(10)
    K = r.standard_normal((4, 4)).astype(np.float32)  # 16 elements: below the 1024 of the pass's default
    f = helper.make_function("pkg", "F", ["x"], ["y"], [helper.make_node("Constant", [], ["K"], value=numpy_helper.from_array(K)),
                                                       helper.make_node("MatMul", ["x", "K"], ["y"])],
                             [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("F", [f"h{i}"], [f"h{i + 1}"], domain="pkg") for i in range(10)]
    g = helper.make_graph(nodes, "g", [vec("h0", 4)], [vec("h10", 4)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("pkg", 1)], functions=[f])
    m.ir_version = 9
    for factor in (True, False):
        prepared = prepare_graph(m, factor)
        assert len(prepared.model.graph.initializer) == 1 and prepared.reports["dedup"]["tensors_removed"] == 9
    x = {"h0": r.standard_normal((1, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run(prepared.model, x)[0], run(m, x)[0])


def test_a_sparse_constant_inside_a_function_is_kept_as_stored():
    """Inlining brings a function's Constant(sparse_value) into the main graph: it is kept as stored
    (as a sparse initializer) like one the model had there."""
    from tqs_onnx.prepare import prepare_graph

    r = np.random.default_rng(11)
    S = np.zeros((8, 8), np.float32)
    S[[0, 3, 5], [1, 2, 7]] = [1.5, -2.0, 0.25]
    idx = np.flatnonzero(S).astype(np.int64)
    sp = helper.make_sparse_tensor(numpy_helper.from_array(S.ravel()[idx], "S"), numpy_helper.from_array(idx, "S_i"), [8, 8])
    W = r.standard_normal((8, 8)).astype(np.float32)
    f = helper.make_function("pkg", "F", ["x"], ["y"], [
        helper.make_node("Constant", [], ["S"], sparse_value=sp), helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W)),
        helper.make_node("MatMul", ["x", "S"], ["a"]), helper.make_node("MatMul", ["a", "W"], ["y"])], [helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("F", ["x"], ["h"], domain="pkg"), helper.make_node("F", ["h"], ["y"], domain="pkg")],
                          "g", [vec("x", 8)], [vec("y", 8)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("pkg", 1)], functions=[f])
    m.ir_version = 9
    prepared = prepare_graph(m)
    assert len(prepared.model.graph.sparse_initializer) == 2 and not any(n.op_type == "Constant" for n in prepared.model.graph.node)
    x = {"x": r.standard_normal((1, 8)).astype(np.float32)}
    # Against numpy: ORT 1.31 itself crashes at times on the original (a sparse Constant in a function).
    np.testing.assert_allclose(run(prepared.model, x)[0], x["x"] @ S @ W @ S @ W, rtol=1e-5, atol=1e-5)


def test_no_factor_stores_duplicates_once_only_where_functions_were_inlined():
    """--no-factor leaves a model's own duplicates alone, unless inlining ran (its copies are merged,
    and with them the model's own), as README's Lossless structure passes says."""
    from tqs_onnx.prepare import prepare_graph

    m, _, W2 = function_model(calls=2)
    m.graph.initializer.append(init("W2_copy", W2.copy()))
    m.graph.node[-1].output[0] = "pre"
    m.graph.node.append(helper.make_node("MatMul", ["pre", "W2_copy"], ["y"]))
    plain = onnx.ModelProto()
    plain.CopyFrom(m)
    plain.graph.ClearField("node")
    plain.graph.node.extend([helper.make_node("MatMul", ["x", "W2"], ["pre"]), helper.make_node("MatMul", ["pre", "W2_copy"], ["y"])])
    plain.ClearField("functions")
    assert "dedup" not in prepare_graph(plain, factor=False).reports
    assert prepare_graph(plain, factor=True).reports["dedup"]["tensors_removed"] == 1
    merged = prepare_graph(m, factor=False).reports["dedup"]["merged"]
    assert {d["removed"] for d in merged} >= {"W2_copy"} and len(merged) == 2  # W2's copy and W1's second call


def test_a_weight_read_by_two_matmuls_is_not_called_fused_and_loads_as_float():
    """ORT fuses none of the DequantizeLinear copies of a shared weight: `auto` writes it decoded at load."""
    from tqs_onnx.graph import weight_table
    from tqs_onnx.prepare import prepare_graph
    from tqs_onnx.tiers import parse_tier, written_form

    r = np.random.default_rng(12)
    W = (r.standard_normal((32, 32)) / 6).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["b"]),
             helper.make_node("MatMul", ["b", "W_copy"], ["y"])]
    m = model(nodes, [init("W", W), init("W_copy", W.copy())], [vec("x", 32)], [vec("y", 32)])
    shared = {w.name: w for w in weight_table(prepare_graph(m).model, 16)}
    apart = {w.name: w for w in weight_table(prepare_graph(m, factor=False).model, 16)}
    assert list(shared) == ["W"] and not shared["W"].fused_dq
    assert apart["W"].fused_dq and apart["W_copy"].fused_dq
    w = shared["W"]
    assert written_form(parse_tier("int4/channel"), w.consumer_ops, w.shape, "auto", w.fused_dq, w.const_lookup).at_load


def test_a_matmul_onnxruntime_turns_into_gemm_with_a_residual_is_not_called_fused(tmp_path):
    """ORT (CPU) fuses a 2-D MatMul with the residual Add after it into a Gemm, then leaves that weight's
    DequantizeLinear unfused: `auto` writes it decoded at load, and ORT's optimized graph holds no
    DequantizeLinear. A MatMul followed by a bias vector Add (and a 3-D one) stays fused."""
    from tqs_onnx.graph import weight_table
    from tqs_onnx.tiers import parse_tier, written_form

    r = np.random.default_rng(3)
    ws = {"W1": r.standard_normal((32, 64)) / 6, "W2": r.standard_normal((64, 32)) / 8}
    ws = {k: v.astype(np.float32) for k, v in ws.items()}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Add", ["a", "b1"], ["ab"]),
             helper.make_node("Tanh", ["ab"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["d"]),
             helper.make_node("Add", ["x", "d"], ["y"])]
    m = model(nodes, [init(k, v) for k, v in ws.items()] + [init("b1", np.full(64, 0.1, np.float32))],
              [vec("x", 32, batch=4)], [vec("y", 32, batch=4)])
    table = {w.name: w for w in weight_table(m, min_size=16)}
    assert {k: table[k].fused_dq for k in ws} == {"W1": True, "W2": False}
    t = parse_tier("int4/channel")
    tiers = {k: str(written_form(t, table[k].consumer_ops, table[k].shape, "auto", table[k].fused_dq)) for k in ws}
    assert tiers == {"W1": "int4/channel", "W2": "int4/channel/load"}
    onnx.save(m, tmp_path / "m.onnx")
    ops = {}
    for label, plan in (("auto", tiers), ("dq", {k: "int4/channel" for k in ws})):
        out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for(plan, {}))
        save_model(out, tmp_path / f"{label}.onnx")
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{label}.opt.onnx")
        ort.InferenceSession(str(tmp_path / f"{label}.onnx"), so, providers=["CPUExecutionProvider"])
        ops[label] = [n.op_type for n in onnx.load(tmp_path / f"{label}.opt.onnx").graph.node]
    assert ops["auto"].count("MatMulNBits") == 1 and "DequantizeLinear" not in ops["auto"], ops
    assert "DequantizeLinear" in ops["dq"] and "Gemm" in ops["dq"], ops  # what `auto` avoids (ORT 1.31)
    m3 = model(nodes, [init(k, v) for k, v in ws.items()] + [init("b1", np.full(64, 0.1, np.float32))],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 32])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 32])])
    assert all(w.fused_dq for w in weight_table(m3, min_size=16) if w.name in ws)


def test_a_linear_relu_layer_onnxruntime_turns_into_fused_gemm_is_decoded_at_load(tmp_path):
    """MatMul (A 2-D) + bias + Relu: ORT makes a Gemm, fuses the Relu into a FusedGemm and leaves the
    weight's DequantizeLinear running on every call (it was reported fused: 72 KiB decoded a call,
    5.6x FP32's call time); `auto` writes it decoded at load. With Tanh it stays fused."""
    from tqs_onnx.graph import weight_table
    from tqs_onnx.tiers import parse_tier, written_form

    r = np.random.default_rng(4)
    ws = {"W1": (r.standard_normal((32, 64)) / 6).astype(np.float32), "W2": (r.standard_normal((64, 32)) / 8).astype(np.float32)}
    for act, want in (("Relu", {"W1": False, "W2": True}), ("Tanh", {"W1": True, "W2": True})):
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Add", ["a", "b1"], ["ab"]),
                 helper.make_node(act, ["ab"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["d"]),
                 helper.make_node("Tanh", ["d"], ["y"])]
        m = model(nodes, [init(k, v) for k, v in ws.items()] + [init("b1", np.full(64, 0.1, np.float32))],
                  [vec("x", 32, batch=1)], [vec("y", 32, batch=1)])
        table = {w.name: w for w in weight_table(m, min_size=16)}
        assert {k: table[k].fused_dq for k in ws} == want, act
        t = parse_tier("int8")
        plan = {k: str(written_form(t, table[k].consumer_ops, table[k].shape, "auto", table[k].fused_dq)) for k in ws}
        onnx.save(m, tmp_path / "m.onnx")
        out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for(plan, {}))
        save_model(out, tmp_path / f"{act}.onnx")
        ops = _ort_optimized_ops(tmp_path / f"{act}.onnx", tmp_path)
        assert "DequantizeLinear" not in ops and ops.count("MatMulNBits") == sum(want.values()), (act, ops)


def _ort_optimized_ops(path, tmp_path):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]


@pytest.mark.parametrize("attrs,c,fused", [({}, None, True), ({"alpha": 0.5}, None, False),
                                           ({"transA": 1}, None, False), ({"beta": 0.5}, (32,), False),
                                           ({"beta": 0.5}, None, True), ({}, (32,), True), ({"transB": 1}, (32,), True)])
def test_gemm_attributes_decide_whether_onnxruntime_fuses_the_weight(tmp_path, attrs, c, fused):
    """ORT fuses DequantizeLinear -> Gemm only with alpha 1, transA 0 and, with C, beta 1: the weight
    table says so, and `auto` writes the others decoded at load, so no DequantizeLinear is left."""
    from tqs_onnx.graph import weight_table
    from tqs_onnx.tiers import parse_tier, written_form

    r = np.random.default_rng(5)
    W = (r.standard_normal((32, 64) if attrs.get("transB") else (64, 32)) / 8).astype(np.float32)
    a_shape = [64, 4] if attrs.get("transA") else [4, 64]
    inits = [init("W", W)] + ([init("C", np.full(c, 0.1, np.float32))] if c else [])
    nodes = [helper.make_node("Gemm", ["x", "W"] + (["C"] if c else []), ["y"], **attrs)]
    m = model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, a_shape)], [vec("y", 32, batch=4)])
    w = next(w for w in weight_table(m, min_size=16) if w.name == "W")
    assert w.fused_dq == fused
    tier = written_form(parse_tier("int4/channel"), w.consumer_ops, w.shape, "auto", w.fused_dq)
    onnx.save(m, tmp_path / "m.onnx")
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"W": str(tier)}, {}))
    save_model(out, tmp_path / "q.onnx")
    ops = _ort_optimized_ops(tmp_path / "q.onnx", tmp_path)
    assert "DequantizeLinear" not in ops and ("MatMulNBits" in ops) == fused, ops


def test_a_transb_weight_with_a_value_info_entry_is_still_turned_and_fused(tmp_path):
    """The writer stores a Gemm(transB=1) weight transposed even when the graph declares its shape in
    value_info (the entry turns with it, same bytes), so ORT fuses it as predicted."""
    from tqs_onnx.graph import weight_table

    W = (np.random.default_rng(6).standard_normal((32, 64)) / 8).astype(np.float32)
    m = model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], [init("W", W)], [vec("x", 64, batch=4)],
              [vec("y", 32, batch=4)])
    m.graph.value_info.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [32, 64]))
    assert weight_table(m, min_size=16)[0].fused_dq
    onnx.save(m, tmp_path / "m.onnx")
    out, report = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"W": "int4/channel"}, {}))
    assert [d.dim_value for d in out.graph.value_info[0].type.tensor_type.shape.dim] == [64, 32]
    files = save_model(out, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    ops = _ort_optimized_ops(tmp_path / "q.onnx", tmp_path)
    assert "MatMulNBits" in ops and "DequantizeLinear" not in ops, ops
    x = {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)}
    expected = run(substitute(m, {"W": reference_dequant(W, 4, axis=0)}), x)[0]
    np.testing.assert_allclose(run(str(files[0]), x)[0], expected, rtol=1e-5, atol=1e-5)


def test_blocks_matmulnbits_cannot_take_are_written_decoded_at_load(tmp_path):
    from tqs_onnx.tiers import parse_tier, written_form

    for block, fused in ((8, False), (16, True), (32, True), (48, False), (128, True)):
        t = parse_tier(f"int4/block{block}")
        assert (written_form(t, ["MatMul"], (256, 32)) == t) == fused, block
    W = (np.random.default_rng(8).standard_normal((96, 32)) / 8).astype(np.float32)
    m = model([helper.make_node("MatMul", ["x", "W"], ["y"])], [init("W", W)], [vec("x", 96)], [vec("y", 32)])
    onnx.save(m, tmp_path / "m.onnx")
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"W": "int4/block48"}, {}))
    save_model(out, tmp_path / "q.onnx")
    assert "DequantizeLinear" in _ort_optimized_ops(tmp_path / "q.onnx", tmp_path)  # what auto avoids
    auto = str(written_form(parse_tier("int4/block48"), ["MatMul"], (96, 32)))
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"W": auto}, {}))
    save_model(out, tmp_path / "a.onnx")
    assert auto == "int4/block48/load" and "DequantizeLinear" not in _ort_optimized_ops(tmp_path / "a.onnx", tmp_path)


def test_a_gather_of_a_few_rows_through_constant_indices_is_no_lookup_table():
    """A table read through constant indices into an output larger than itself (a factored lookup)
    keeps DequantizeLinear; a Gather of one row does not (decoded at load, ORT folds it to the row)."""
    from tqs_onnx.graph import weight_table

    E = np.random.default_rng(9).standard_normal((64, 32)).astype(np.float32)
    F = E[::-1].copy()
    nodes = [helper.make_node("Gather", ["E", "row"], ["e"]), helper.make_node("Gather", ["F", "many"], ["f"]),
             helper.make_node("Add", ["e", "x"], ["y0"]), helper.make_node("ReduceSum", ["f"], ["s"], keepdims=0),
             helper.make_node("Add", ["y0", "s"], ["y"])]
    m = model(nodes, [init("E", E), init("F", F), init("row", np.array(3, np.int64)),
                      init("many", np.arange(128, dtype=np.int64) % 64)], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32])])
    table = {w.name: w for w in weight_table(m, min_size=16)}
    assert not table["E"].const_lookup and table["F"].const_lookup


@pytest.mark.parametrize("op,attrs", [("Identity", {}), ("Cast", {"to": TensorProto.FLOAT})])
def test_a_weight_read_through_identity_or_a_float_cast_is_fused(tmp_path, op, attrs):
    """ORT removes an Identity or a Cast to float before fusing: such a weight is read as stored, keeps
    DequantizeLinear in `auto`, and ORT fuses it into MatMulNBits."""
    from tqs_onnx.graph import weight_table
    from tqs_onnx.tiers import parse_tier, written_form

    W = (np.random.default_rng(10).standard_normal((64, 32)) / 8).astype(np.float32)
    m = model([helper.make_node(op, ["W"], ["Wi"], **attrs), helper.make_node("MatMul", ["x", "Wi"], ["y"])],
              [init("W", W)], [vec("x", 64)], [vec("y", 32)])
    w = weight_table(m, min_size=16)[0]
    assert w.fused_dq and (w.channel_axis, w.block_axis) == (1, 0)
    tier = written_form(parse_tier("int4/channel"), w.consumer_ops, w.shape, "auto", w.fused_dq)
    onnx.save(m, tmp_path / "m.onnx")
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"W": str(tier)}, {}))
    save_model(out, tmp_path / "q.onnx")
    assert _ort_optimized_ops(tmp_path / "q.onnx", tmp_path) == ["MatMulNBits"]


def test_a_transb_weight_behind_identity_is_not_called_fused(tmp_path):
    """The writer turns only a weight a Gemm(transB=1) reads itself; behind an Identity ORT would leave
    its DequantizeLinear unfused, so `auto` writes it decoded at load."""
    from tqs_onnx.graph import weight_table

    W = (np.random.default_rng(11).standard_normal((32, 64)) / 8).astype(np.float32)
    m = model([helper.make_node("Identity", ["W"], ["Wi"]), helper.make_node("Gemm", ["x", "Wi"], ["y"], transB=1)],
              [init("W", W)], [vec("x", 64)], [vec("y", 32)])
    assert not weight_table(m, min_size=16)[0].fused_dq


@pytest.mark.parametrize("n", [16, 15])
def test_auto_writes_int2_decoded_at_load_where_the_fused_kernel_miscomputes(tmp_path, n):
    """ORT 1.31's 2-bit MatMulNBits miscomputes N % 4 != 0: `auto` writes such an int2 weight decoded
    at load (FP32 kernels), so `apply` accepts it; N % 4 == 0 stays fused."""
    from tqs_onnx.evaluate import verify_written
    from tqs_onnx.graph import weight_table
    from tqs_onnx.runtime import Device
    from tqs_onnx.tiers import parse_tier, written_form

    W = np.random.default_rng(0).standard_normal((64, n)).astype(np.float32)
    m = model([helper.make_node("MatMul", ["x", "W"], ["y"])], [init("W", W)], [vec("x", 64)], [vec("y", n)])
    w = weight_table(m, min_size=16)[0]
    tier = written_form(parse_tier("int2/channel"), w.consumer_ops, w.shape, "auto", w.fused_dq, False, w.channel_axis)
    assert tier.at_load == (n % 4 != 0)
    onnx.save(m, tmp_path / "m.onnx")
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for({"W": str(tier)}, {}))
    save_model(out, tmp_path / "q.onnx")
    err = verify_written(tmp_path / "q.onnx", Device("cpu"))["optimized_rel_err"]
    assert err < (1e-5 if tier.at_load else 0.05)  # fused: MatMulNBits' int8 activations (accuracy level 4)


@pytest.mark.parametrize("between", [None, "Identity", "Dropout"])
def test_two_matmuls_summed_by_one_add_only_the_later_is_made_a_gemm(tmp_path, between):
    """x W + h V (an RNN cell's form): ORT fuses only the later MatMul with the Add into a Gemm (also
    across an Identity or Dropout it removes); the earlier one stays fused into MatMulNBits."""
    from tqs_onnx.graph import weight_table
    from tqs_onnx.tiers import parse_tier, written_form

    r = np.random.default_rng(13)
    ws = {"W": (r.standard_normal((32, 16)) / 6).astype(np.float32), "V": (r.standard_normal((16, 16)) / 4).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("MatMul", ["h", "V"], ["b0"])]
    nodes += [helper.make_node(between, ["b0"], ["b"])] if between else []
    nodes += [helper.make_node("Add", ["a", "b" if between else "b0"], ["y"])]
    m = model(nodes, [init(k, v) for k, v in ws.items()], [vec("x", 32, batch=4), vec("h", 16, batch=4)],
              [vec("y", 16, batch=4)])
    table = {w.name: w for w in weight_table(m, min_size=16)}
    assert {k: table[k].fused_dq for k in ws} == {"W": True, "V": False}
    plan = {k: str(written_form(parse_tier("int4/channel"), table[k].consumer_ops, table[k].shape, "auto",
                                table[k].fused_dq)) for k in ws}
    onnx.save(m, tmp_path / "m.onnx")
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan_for(plan, {}))
    save_model(out, tmp_path / "q.onnx")
    ops = _ort_optimized_ops(tmp_path / "q.onnx", tmp_path)
    assert ops.count("MatMulNBits") == 1 and "DequantizeLinear" not in ops, ops
