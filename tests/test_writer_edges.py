"""The tier writer on hand-written plans and odd weights (found by a review): int2 under --decode dq,
float tiers on old opsets, negative axes, float64 and empty weights, float16 overflow, names the
writer would reuse, and outputs of exact zeros."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tqs_onnx.cli import main
from tqs_onnx.tiers import parse_tier, written_form


def _matmul(tmp_path, w: np.ndarray, opset: int = 17, extra_nodes=(), name="m") -> str:
    k, n = w.shape
    dtype = TensorProto.DOUBLE if w.dtype == np.float64 else TensorProto.FLOAT
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"]), *extra_nodes], "g",
                          [helper.make_tensor_value_info("x", dtype, [2, k])],
                          [helper.make_tensor_value_info("y", dtype, [2, n])], [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(m, path)
    return str(path)


def _apply(tmp_path, model: str, weights: dict, info: dict | None = None, out: str = "o.onnx") -> tuple[int, str]:
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"kind": "tqs-plan", "model": {}, "weights": weights, "weight_info": info or {}}))
    target = tmp_path / out
    return main(["apply", model, str(plan), "-o", str(target), "--quiet"]), str(target)


def test_int2_with_n_not_a_multiple_of_4_is_decoded_at_load_with_decode_dq_too():
    tier = parse_tier("int2/channel")
    assert written_form(tier, ["MatMul"], (32, 22), "dq").at_load
    assert not written_form(tier, ["MatMul"], (32, 24), "dq").at_load
    assert not written_form(tier, ["Conv"], (8, 4, 3, 3), "dq").at_load  # not fused: DequantizeLinear is right


@pytest.mark.parametrize("tier", ["fp16", "zero"])
def test_float_tiers_do_not_raise_an_old_opset(tmp_path, tier):
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    rc, out = _apply(tmp_path, _matmul(tmp_path, w, opset=11), {"W": tier})
    assert rc == 0 and onnx.load(out).opset_import[0].version == 11


def test_negative_axes_in_a_plan_mean_what_numpy_means(tmp_path):
    w = np.random.default_rng(1).standard_normal((32, 24)).astype(np.float32)
    model = _matmul(tmp_path, w)
    rc, out = _apply(tmp_path, model, {"W": "int4/channel"}, {"W": {"shape": [32, 24], "channel_axis": -1}})
    scale = next(numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer if i.name.endswith("__scale"))
    assert rc == 0 and scale.shape == (24,)
    rc, _ = _apply(tmp_path, model, {"W": "int4/block8"}, {"W": {"shape": [32, 24], "block_axis": -2}}, "b.onnx")
    assert rc == 0


@pytest.mark.parametrize("case, tier, needle", [
    ("float64", "int8", "float64"),
    ("empty", "int4/block8", "no elements"),
    ("clash", "int8", "already has a value or node named 'W__scale'"),
    ("input", "int8", "already has a value or node named 'W__scale'"),
    ("fp16scale", "int2/fp16", "scale would exceed float16"),
])
def test_weights_the_writer_cannot_store_are_refused_in_one_line(tmp_path, capsys, case, tier, needle):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 8)).astype(np.float64 if case == "float64" else np.float32)
    extra = ()
    big = {"fp16scale": 1e5}
    if case in big:
        w[0, 0] = big[case]
    if case == "empty":
        w = np.zeros((0, 8), np.float32)
    if case == "clash":
        extra = (helper.make_node("Identity", ["x"], ["W__scale"]),)
    model = _matmul(tmp_path, w, extra_nodes=extra)
    if case == "input":  # a graph input of the writer's name: its initializer would become the input's default
        m = onnx.load(model)
        m.graph.input.append(helper.make_tensor_value_info("W__scale", TensorProto.FLOAT, []))
        m.graph.node.append(helper.make_node("Identity", ["W__scale"], ["z"]))
        m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, []))
        onnx.save(m, model)
    rc, out = _apply(tmp_path, model, {"W": tier})
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("tier", ["int8", "int4/channel"])
def test_an_all_zero_weight_fused_by_ort_is_written(tmp_path, tier):
    """The written graph's output is exactly zero; ORT's fused kernel returns ~1e-4 there."""
    rc, _ = _apply(tmp_path, _matmul(tmp_path, np.zeros((32, 16), np.float32)), {"W": tier})
    assert rc == 0


def test_fp16_stores_infinities_and_refuses_only_finite_values_it_would_overflow(tmp_path):
    w = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)
    w[0, 0], w[1, 1] = -np.inf, 65510.0  # 65510 rounds to 65504, not to inf
    rc, out = _apply(tmp_path, _matmul(tmp_path, w), {"W": "fp16"})
    stored = next(numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer if i.name == "W__fp16")
    assert rc == 0 and stored[0, 0] == -np.inf and stored[1, 1] == 65504


@pytest.mark.parametrize("tier", ["int8", "int4/channel", "bf16", "fp16"])
def test_a_mask_at_float32s_limit_is_written_with_a_note(tmp_path, capsys, tier):
    """Exports store -inf masks as -3.4e38; a tier may decode them to -inf, as harmless before a Softmax,
    and the sweep measured the same values: a note, not a refusal."""
    w = np.random.default_rng(4).standard_normal((16, 8)).astype(np.float32)
    mask = np.where(np.tri(2, 8, dtype=bool), 0, np.finfo(np.float32).min).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Add", ["a", "M"], ["s"]),
                           helper.make_node("Softmax", ["s"], ["y"], axis=-1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.tile(mask, (1, 1)), "M")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    rc, _ = _apply(tmp_path, str(path), {"M": tier})
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err
    if tier != "int4/channel":  # int4's grid decodes the limit itself; int8's and the floats' do not
        assert "note:" in err and "'M'" in err


def test_every_command_prints_its_help():
    import subprocess
    import sys

    for cmd in ("inspect", "sweep", "allocate", "apply", "eval", "demo", "pareto", "gate", "report"):
        done = subprocess.run([sys.executable, "-m", "tqs_onnx.cli", cmd, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "usage:" in done.stdout, (cmd, done.stderr[-300:])


def test_a_weight_whose_overflow_makes_outputs_non_finite_is_refused_by_name(tmp_path, capsys):
    w = np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)
    w[0, 0] = 1e6  # fp16 stores inf, and y = x W is then inf
    rc, _ = _apply(tmp_path, _matmul(tmp_path, w), {"W": "fp16"})
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite outputs: weight 'W'" in err and "Traceback" not in err and "Warning" not in err


def test_the_conversion_to_opset_9_that_the_zero_tier_needs_is_sized():
    """Only the integer tiers' opsets (13 and up) were measured: an opset-7 graph written with `zero`
    grew by an Upsample's scales input the plan never counted."""
    from tqs_onnx.passes.opset import UpgradeOpset
    from tqs_onnx.sweep import opset_deltas

    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]),
             helper.make_node("Upsample", ["a"], ["y"], scales=[1.0, 2.0], mode="nearest")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                          [numpy_helper.from_array(np.ones((4, 4), np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 7)])
    m.ir_version = 4
    deltas = opset_deltas(m)
    assert deltas[9] == UpgradeOpset(9).run(m).model.graph.ByteSize() - m.graph.ByteSize() > 0
