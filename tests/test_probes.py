"""Probe graphs: tier values bit-identical to what the writer stores; a seeded, reproducible Gaussian."""

import numpy as np
import onnx
import pytest
from scipy import stats

from tqs_onnx.probes import DeviceProbes, counter_normal, probe_offset
from tqs_onnx.quant import apply_tier
from tqs_onnx.runtime import Device
from tqs_onnx.tiers import parse_tier

CPU = Device("cpu")


@pytest.mark.parametrize("tier", ["int8", "int8/channel", "int4/channel", "int4/block32", "int2/block8",
                                  "int2", "int4/block16/fp16", "int8/channel/fp16", "bf16", "fp16", "zero",
                                  "int1", "int1/channel", "int1/block32", "int1/block16/fp16",
                                  "int6", "int6/channel", "int6/block32", "int6/channel/fp16",
                                  "int4/channel/mse", "int2/block8/mse", "int8/mse", "int6/channel/mse",
                                  "int4/block16/fp16/mse"])
@pytest.mark.parametrize("shape,axes", [((70, 33), (1, 0)), ((8, 3, 3, 5), (0, 1)), ((300,), (0, 0))])
def test_device_tier_values_are_bit_identical_to_the_writer(tier, shape, axes):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    w.flat[3] = 0.0
    got = DeviceProbes(CPU).tier(CPU.to_device(w), parse_tier(tier), axes).numpy()
    assert np.array_equal(got, apply_tier(w, parse_tier(tier), *axes))


def test_clipped_scales_are_not_reused_for_another_weight_at_a_freed_address():
    ops, tier, rng = DeviceProbes(CPU), parse_tier("int4/channel/mse"), np.random.default_rng(2)
    for _ in range(20):  # temporaries: a freed weight's address is often the next one's
        w = rng.standard_normal((64, 16)).astype(np.float32)
        assert np.array_equal(ops.tier(CPU.to_device(w), tier, (1, 0)).numpy(), apply_tier(w, tier, 1, 0))


def test_quant_probe_rounds_to_b_bits_per_tensor():
    w = np.linspace(-1, 1, 101, dtype=np.float32)
    q = DeviceProbes(CPU).quant_probe(CPU.to_device(w), 6).numpy()
    assert len(np.unique(q)) <= 2 * 31 + 1 and np.abs(q - w).max() <= 1 / 31 / 2 + 1e-7


def test_gaussian_matches_reference_is_reproducible_and_normal():
    ops = DeviceProbes(CPU)
    w = np.zeros((400, 250), np.float32)
    off = probe_offset(0, 3, 1, 0)
    a = ops.gauss(CPU.to_device(w), off, 2.0).numpy()
    b = ops.gauss(CPU.to_device(w), off, 2.0).numpy()
    assert np.array_equal(a, b)
    np.testing.assert_allclose(a.ravel(), 2.0 * counter_normal(w.size, off), rtol=1e-5, atol=1e-5)
    z = a.ravel() / 2.0
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01
    other = ops.gauss(CPU.to_device(w), probe_offset(0, 3, 2, 0), 2.0).numpy().ravel() / 2.0
    assert abs(np.corrcoef(z, other)[0, 1]) < 0.01


def test_batched_divergence_graph_equals_one_sum_per_pair():
    """The GPU path reduces every (output, context) pair of a step in one run; it must give each sum."""
    import onnxruntime as ort

    from tqs_onnx.probes import sqdiff_many_graph

    rng = np.random.default_rng(2)
    pairs = [(rng.standard_normal(s).astype(np.float32), rng.standard_normal(s).astype(np.float32))
             for s in [(3, 4), (7,), (2, 2, 5)]]
    sess = ort.InferenceSession(sqdiff_many_graph(len(pairs)), providers=["CPUExecutionProvider"])
    feeds = {f"a{i}": a for i, (a, _) in enumerate(pairs)} | {f"b{i}": b for i, (_, b) in enumerate(pairs)}
    got = sess.run(None, feeds)[0]
    want = [np.sum((a.astype(np.float64) - b) ** 2) for a, b in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.array_equal(DeviceProbes(CPU).sqdiff_many([(CPU.to_device(a), CPU.to_device(b)) for a, b in pairs]),
                          [DeviceProbes(CPU).sqdiff(CPU.to_device(a), CPU.to_device(b)) for a, b in pairs])


def test_divergence_graph_takes_each_outputs_own_type():
    """Integer and float16 trajectory outputs are cast to float32 inside the graph, so a GPU sweep of a
    model with such outputs does not fail on the graph's declared input types."""
    import onnxruntime as ort
    from onnx import TensorProto

    from tqs_onnx.probes import sqdiff_many_graph

    rng = np.random.default_rng(3)
    pairs = [(rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)),
             (rng.standard_normal((5, 2)).astype(np.float16), rng.standard_normal((5, 2)).astype(np.float16)),
             (rng.integers(0, 9, (4,)), rng.integers(0, 9, (4,)))]
    types = {np.float16: TensorProto.FLOAT16, np.int64: TensorProto.INT64, np.float32: TensorProto.FLOAT}
    sess = ort.InferenceSession(sqdiff_many_graph([types[a.dtype.type] for a, _ in pairs]),
                                providers=["CPUExecutionProvider"])
    feeds = {f"a{i}": a for i, (a, _) in enumerate(pairs)} | {f"b{i}": b for i, (_, b) in enumerate(pairs)}
    want = [np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2) for a, b in pairs]
    np.testing.assert_allclose(sess.run(None, feeds)[0], want, rtol=1e-5)


def test_divergence_outputs_added_to_a_model_measure_each_output_against_its_reference():
    """AddDivergenceOutputs: float32, float16 and int64 outputs each get sum((y - ref)^2) in float32;
    a run that does not feed the references still works (they default to zero)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from tqs_onnx.passes.divergence import AddDivergenceOutputs

    h = helper.make_node
    g = helper.make_graph(
        [h("Mul", ["x", "x"], ["y32"]), h("Cast", ["x"], ["y16"], to=TensorProto.FLOAT16),
         h("Cast", ["x"], ["yi"], to=TensorProto.INT64)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y32", TensorProto.FLOAT, [3, 4]),
         helper.make_tensor_value_info("y16", TensorProto.FLOAT16, [3, 4]),
         helper.make_tensor_value_info("yi", TensorProto.INT64, [3, 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = AddDivergenceOutputs(["y32", "y16", "yi"]).run(model)
    onnx.checker.check_model(result.model)
    pairs = result.report["pairs"]
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_inputs()} == {"x"}  # the references are optional
    x = np.random.default_rng(0).normal(0, 3, (3, 4)).astype(np.float32)
    plain = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    refs = {"y32": x * x + 0.5, "y16": (x + 1).astype(np.float16), "yi": np.zeros((3, 4), np.int64)}
    got = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {"x": x, **{pairs[k][0]: v for k, v in refs.items()}})))
    for k, ref in refs.items():
        y = plain[k].astype(np.float64)
        assert float(plain[pairs[k][1]]) == pytest.approx(np.sum(y ** 2), rel=1e-5)  # unfed: ref = 0
        assert float(got[pairs[k][1]]) == pytest.approx(np.sum((y - ref.astype(np.float64)) ** 2), rel=1e-5)
        assert np.array_equal(got[k], plain[k])
