"""Deployment report (issue 11): what ORT's optimizer fuses, what it still decodes per call, and the
runtime figures that `eval --runtime` and `gate` print beside the error figures."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.tiny import init, model, save_case, vec
from tqs_onnx.cli import main
from tqs_onnx.gate import GateConfig, run_gate
from tqs_onnx.graph import load_model
from tqs_onnx.rewrite import rewrite_model, save_model
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import resolve_device
from tqs_onnx.runtime_report import deployment_report, graph_figures, optimized_graph, proc_memory, reset_peak_rss

N_IN, N_OUT, TABLE = 128, 64, (256, 64)


def table_model() -> object:
    """y = x @ W + T[0:1]: a MatMul weight and a (bias) table consumed by Add."""
    r = np.random.default_rng(0)
    w = (r.standard_normal((N_IN, N_OUT)) / np.sqrt(N_IN)).astype(np.float32)
    t = (0.1 * r.standard_normal((1, *TABLE))).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Reshape", ["h", "shape"], ["h3"]),
             helper.make_node("Add", ["h3", "T"], ["y3"]),
             helper.make_node("ReduceMean", ["y3", "axes"], ["y"], keepdims=0)]
    inits = [init("W", w), init("T", t), init("shape", np.array([1, 1, N_OUT], np.int64)),
             init("axes", np.array([1], np.int64))]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N_OUT])
    return model(nodes, inits, [vec("x", N_IN)], [out], opset=18)


def written(tmp, tiers: dict[str, str]):
    """The table model and its written copy at `tiers`, with a one-step rollout (the output is not fed back)."""
    spec = {"horizon": 3, "feedback": {}, "trajectory": ["y"], "fixed": {"x": "x"}}
    paths = save_case(tmp, table_model(), spec, {"x": np.ones((2, 1, N_IN), np.float32)})
    out, _ = rewrite_model(load_model(paths["model"]),
                           {"kind": "tqs-plan", "model": {}, "factor": False, "weights": tiers})
    save_model(out, tmp / "q.onnx")
    return paths, tmp / "q.onnx"


def figures(path) -> dict:
    return graph_figures(load_model(path).model, optimized_graph(path, resolve_device("cpu")))


@pytest.mark.parametrize("tier", ["int8", "int8/channel", "int4/channel", "int4/block32"])
def test_int8_int4_matmul_weights_are_fused_into_matmulnbits(tmp_path, tier):
    _, q = written(tmp_path, {"W": tier})
    f = figures(q)
    assert f["matmulnbits"] == 1 and f["fused"] == {"MatMulNBits": 1}
    assert f["dq_written"] == 1 and f["dq_left"] == 0 and "DequantizeLinear" not in f["ops"]
    assert f["per_call"] == [] and f["expanded_at_load"] == []


def test_add_table_left_as_dequantize_linear_is_reported_per_call(tmp_path):
    _, q = written(tmp_path, {"W": "int4/channel", "T": "int8"})
    f = figures(q)
    assert f["matmulnbits"] == 1 and f["dq_left"] == 1 and f["dq_written"] == 2
    [entry] = f["per_call"]
    n = int(np.prod(TABLE))
    assert entry["weight"] == "T" and entry["op"] == "DequantizeLinear" and entry["consumers"] == ["Add"]
    assert entry["bytes"] == 4 * n and entry["stored_bytes"] == n + 4  # int8 values + one fp32 scale
    assert f["per_call_bytes"] == 4 * n


def test_cast_tier_is_reported_as_expanded_at_load(tmp_path):
    _, q = written(tmp_path, {"W": "bf16"})
    f = figures(q)
    assert f["per_call"] == [] and "Cast" not in f["ops"]
    [entry] = f["expanded_at_load"]
    assert entry == {"weight": "W", "op": "Cast", "bytes": 4 * N_IN * N_OUT, "stored_bytes": 2 * N_IN * N_OUT}


def test_proc_memory_and_peak_reset():
    mem = proc_memory()
    assert mem["VmRSS"] > 0 and mem["VmHWM"] >= mem["VmRSS"]
    if reset_peak_rss():
        assert proc_memory()["VmHWM"] <= mem["VmHWM"]


def test_deployment_report_in_a_fresh_process(tmp_path):
    paths, q = written(tmp_path, {"W": "int8", "T": "int8"})
    spec = RolloutSpec.load(paths["spec"])
    doc = deployment_report(q, "cpu", spec, Contexts.load(paths["contexts"], spec), calls=5, rollouts=2)
    assert doc["session_s"] > 0 and doc["rss_load_bytes"] > doc["rss_base_bytes"] > 0
    assert doc["rss_peak_call_bytes"] >= doc["rss_base_bytes"] and doc["calls"] >= 5  # and 0.3 s at least
    assert doc["call_ms"] > 0 and doc["horizon"] == 3 and doc["step_ms"] == pytest.approx(doc["rollout_ms"] / 3, rel=1e-3)
    assert doc["matmulnbits"] == 1 and [e["weight"] for e in doc["per_call"]] == ["T"]


def test_no_rollouts_times_calls_only(tmp_path):
    """rollouts=0 (models whose rollout takes minutes): calls are timed, no rollout is run."""
    from tqs_onnx.runtime_report import measure

    paths, q = written(tmp_path, {"W": "int8", "T": "int8"})
    spec = RolloutSpec.load(paths["spec"])
    doc = measure(q, resolve_device("cpu"), spec, Contexts.load(paths["contexts"], spec), calls=3, rollouts=0)
    assert doc["calls"] >= 3 and doc["call_ms"] > 0 and "rollout_ms" not in doc and "step_ms" not in doc


def test_eval_runtime_prints_and_returns_the_fields(tmp_path, capsys):
    paths, q = written(tmp_path, {"W": "int4/channel", "T": "int8"})
    argv = ["eval", str(paths["model"]), str(q), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
            "--runtime"]
    assert main([*argv, "-o", str(tmp_path / "eval.json")]) == 0
    text = capsys.readouterr().out
    assert "runtime (each model in a fresh process, 2 round(s) in turn" in text
    assert "decoded per call: T (DequantizeLinear -> Add)" in text
    rt = json.loads((tmp_path / "eval.json").read_text())["runtime"]
    for side in ("reference", "candidate"):
        assert {"session_s", "rss_load_bytes", "rss_peak_call_bytes", "call_ms", "step_ms", "ops", "per_call"} <= set(rt[side])
        r = rt[side]  # the calls' spread, printed beside the median (a trial: ratios 0.25x-1.29x across runs)
        assert r["call_ms_min"] <= r["call_ms_p10"] <= r["call_ms"] <= r["call_ms_p90"]
        assert f"ms per call (p10-p90 {r['call_ms_p10']:.3f}-{r['call_ms_p90']:.3f})" in text
    assert rt["candidate"]["matmulnbits"] == 1 and rt["reference"]["matmulnbits"] == 0
    assert {"call_ms", "step_ms", "rss_load_bytes"} <= set(rt["ratios"])
    assert rt["rounds"] == 2 and len(rt["candidate"]["call_ms_rounds"]) == 2
    assert rt["candidate"]["call_ms"] == min(rt["candidate"]["call_ms_rounds"])


def test_gate_reports_deployment_without_failing(tmp_path):
    paths, q = written(tmp_path, {"W": "int8", "T": "int8"})
    spec = RolloutSpec.load(paths["spec"])
    doc = run_gate(paths["model"], q, spec, Contexts.load(paths["contexts"], spec), resolve_device("cpu"),
                   GateConfig(max_mae=1e9))
    check = next(c for c in doc["checks"] if c["name"] == "deployment")
    assert doc["passed"] and check["status"] == "info" and "per rollout step" in check["message"]
    assert doc["deployment"]["candidate"]["per_call"][0]["weight"] == "T"


def test_table_re_expanded_by_a_constant_gather_counts_its_expansion(tmp_path):
    """A factored table (small table, constant index, Gather) at an int tier is re-expanded every call."""
    r = np.random.default_rng(0)
    table, index = r.standard_normal((64, 32)).astype(np.float32), r.integers(0, 64, (8, 16)).astype(np.int64)
    nodes = [helper.make_node("Gather", ["T", "idx"], ["B"], axis=0), helper.make_node("Add", ["x", "B"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [8, 16, 32]) for n in ("x", "y")]
    paths = save_case(tmp_path, model(nodes, [init("T", table), init("idx", index)], io[:1], io[1:]),
                      {"horizon": 1, "feedback": {"y": "x"}}, {"x": np.zeros((1, 8, 16, 32), np.float32)})
    out, _ = rewrite_model(load_model(paths["model"]),
                           {"kind": "tqs-plan", "model": {}, "factor": False, "weights": {"T": "int8"}})
    save_model(out, tmp_path / "q.onnx")
    [entry] = figures(tmp_path / "q.onnx")["per_call"]
    assert entry["consumers"] == ["Gather"] and entry["through"] == ["Gather"]
    assert entry["bytes"] == 4 * table.size and entry["materialized_bytes"] == 4 * index.size * 32


def _written_figures(tmp_path, nodes, inits, inputs, outputs, tiers):
    m = model(nodes, inits, inputs, outputs, opset=18)
    import onnx

    onnx.save(m, tmp_path / "m.onnx")
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), {"kind": "tqs-plan", "model": {}, "factor": False,
                                                              "weights": tiers})
    save_model(out, tmp_path / "q.onnx")
    return figures(tmp_path / "q.onnx")


def test_weights_folded_further_at_load_are_reported_under_their_own_name(tmp_path):
    """A weight decoded at load that ORT then folds further (a Conv kernel reordered for NCHWc, a
    Transpose applied, a product with a constant) is still listed as expanded at load, as itself."""
    r = np.random.default_rng(4)
    K = r.standard_normal((16, 8, 3, 3)).astype(np.float32)
    W = r.standard_normal((32, 64)).astype(np.float32)
    V = r.standard_normal((32, 32)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["img", "K"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["h"]),
             helper.make_node("Mul", ["V", "two"], ["V2"]),
             helper.make_node("MatMul", ["h", "V2"], ["y"])]
    inits = [init("K", K), init("W", W), init("V", V), init("two", np.array(2.0, np.float32))]
    inputs = [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 8, 8, 8]), vec("x", 64)]
    outputs = [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 16, 8, 8]), vec("y", 32)]
    f = _written_figures(tmp_path, nodes, inits, inputs, outputs,
                         {"K": "int8/channel/load", "W": "int8/channel/load", "V": "int4/channel/load"})
    got = {e["weight"]: e["bytes"] for e in f["expanded_at_load"]}
    assert got == {"K": 4 * K.size, "W": 4 * W.size, "V": 4 * V.size}, f["expanded_at_load"]
    assert f["per_call"] == []


def test_a_lookup_table_with_fp16_scales_is_per_call_and_not_expanded_at_load(tmp_path):
    E = np.random.default_rng(5).standard_normal((64, 32)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "idx"], ["e"]), helper.make_node("ReduceSum", ["e", "ax"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]
    inits = [init("E", E), init("idx", (np.arange(80, dtype=np.int64) % 64)), init("ax", np.array([0], np.int64))]
    f = _written_figures(tmp_path, nodes, inits, [vec("x", 32)], [vec("y", 32)], {"E": "int4/channel/fp16"})
    assert f["expanded_at_load"] == [] and [e["weight"] for e in f["per_call"]] == ["E"]


def test_a_scalar_cast_per_call_is_not_a_weight_decoded_per_call():
    """ORT's CPU provider casts a float16 model's zero-point scalars to float32 for its float kernels
    (`InsertedPrecisionFreeCast_...`); the report listed one as a weight decoded per call."""
    nodes = [helper.make_node("Cast", ["zp"], ["zpf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["x", "zpf"], ["a"]), helper.make_node("MatMul", ["a", "Wf"], ["y"])]
    inits = [helper.make_tensor("zp", TensorProto.FLOAT16, [], np.array([1.0], np.float16).view(np.uint16)),
             init("W", np.ones((N_IN, N_OUT), np.float16))]
    m = model(nodes, inits, [vec("x", N_IN)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N_OUT])])
    f = graph_figures(m, m)
    assert [e["weight"] for e in f["per_call"]] == ["Wf"]
    # a Mul of a scalar scale and a stored tensor left unfolded is a weight decoded per call
    nodes = [helper.make_node("Mul", ["s", "W"], ["Wd"]), helper.make_node("MatMul", ["x", "Wd"], ["y"])]
    m = model(nodes, [init("s", np.float32(2.0)), init("W", np.ones((N_IN, N_OUT), np.float32))], [vec("x", N_IN)],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N_OUT])])
    assert [(e["weight"], e["bytes"]) for e in graph_figures(m, m)["per_call"]] == [("Wd", 4 * N_IN * N_OUT)]


def test_a_timing_loop_runs_for_its_minimum_time_within_its_budget():
    """10 calls of 8 us were the gate's whole timing (one model against itself: 0.09x to 2.5x)."""
    from tqs_onnx.runtime_report import _repeat

    t0 = time.perf_counter()
    times = _repeat(lambda: None, 3, budget_s=5.0, minimum=1, min_s=0.05)
    assert time.perf_counter() - t0 >= 0.05 and len(times) > 3
    slow = _repeat(lambda: time.sleep(0.02), 50, budget_s=0.05, minimum=2, min_s=1.0)
    assert 2 <= len(slow) < 10  # the budget still stops it
