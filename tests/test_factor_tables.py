"""FactorExpandedTables and DeduplicateTensors: bit-exact outputs in onnxruntime, bytes saved, valid models."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
OPSET = 17
IR_VERSION = 9  # onnxruntime 1.31 loads IR <= 13; 9 matches opset 17


def _import_passes() -> tuple[ModuleType, ModuleType, ModuleType]:
    """Import the passes from the installed package, or map passes/ into tqs_onnx like pyproject does."""
    try:
        importlib.import_module("tqs_onnx.passes")
    except ImportError:
        sys.path.insert(0, str(REPO))
        parent = importlib.import_module("tqs_onnx")
        spec = importlib.util.spec_from_file_location(
            "tqs_onnx.passes", REPO / "passes" / "__init__.py", submodule_search_locations=[str(REPO / "passes")]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["tqs_onnx.passes"] = module
        spec.loader.exec_module(module)
        parent.passes = module  # type: ignore[attr-defined]
    return (
        importlib.import_module("tqs_onnx.passes.factor_tables"),
        importlib.import_module("tqs_onnx.passes.dedup"),
        importlib.import_module("tqs_onnx.passes.base"),
    )


try:
    factor_tables, dedup, base = _import_passes()
except ImportError as exc:  # pragma: no cover - only while the package skeleton is incomplete
    pytest.skip(f"tqs_onnx.passes not importable: {exc}", allow_module_level=True)

FactorExpandedTables = factor_tables.FactorExpandedTables
find_factorization = factor_tables.find_factorization
DeduplicateTensors = dedup.DeduplicateTensors


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def value_info(
    name: str, array_or_shape: np.ndarray | Sequence[int], elem: int = TensorProto.FLOAT
) -> onnx.ValueInfoProto:
    shape = array_or_shape.shape if isinstance(array_or_shape, np.ndarray) else array_or_shape
    return helper.make_tensor_value_info(name, elem, list(shape))


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    # Without graph optimizations onnxruntime really executes the rewritten Gather/Transpose.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def bits(array: np.ndarray) -> np.ndarray:
    """Bit pattern view: equality here is exact (-0.0 != 0.0, NaN payloads compared)."""
    array = np.ascontiguousarray(array)
    return array.view(np.dtype(f"u{array.itemsize}"))


def assert_bit_exact(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    expected, actual = run(original, feeds), run(rewritten, feeds)
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(bits(a), bits(b))


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            for sub in attr.graphs:
                yield from iter_graphs(sub)


def constant_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of every initializer and Constant-node tensor, in all graphs."""
    total = 0
    for graph in iter_graphs(model.graph):
        total += sum(t.ByteSize() for t in graph.initializer)
        for node in graph.node:
            if node.op_type == "Constant":
                total += sum(a.t.ByteSize() for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return total


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def expand(table: np.ndarray, index: np.ndarray, position_axes: Sequence[int]) -> np.ndarray:
    """``table[index]`` with the index axes placed at ``position_axes`` (what an exporter constant-folds)."""
    ndim = index.ndim + table.ndim - 1
    rest_axes = [a for a in range(ndim) if a not in position_axes]
    return np.ascontiguousarray(table[index].transpose(np.argsort(list(position_axes) + rest_axes)))


def covering_index(shape: Sequence[int], rows: int, rng: np.random.Generator) -> np.ndarray:
    """A random index over ``rows`` table rows that uses every row at least once."""
    size = int(np.prod(shape))
    assert size >= rows
    return rng.permutation(np.arange(size) % rows).reshape(shape)


def bias_model(constant: np.ndarray, name: str = "bias") -> onnx.ModelProto:
    """Y = X + C and Z = Identity(C): Z exposes the constant's exact bits."""
    return make_model(
        [helper.make_node("Add", ["X", name], ["Y"]), helper.make_node("Identity", [name], ["Z"])],
        [value_info("X", constant)],
        [value_info("Y", constant), value_info("Z", constant)],
        [numpy_helper.from_array(constant, name)],
    )


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


# ---------------------------------------------------------------------------
# FactorExpandedTables
# ---------------------------------------------------------------------------

EXPANSION_CASES = {
    # name: (table shape, index shape, position axes of the expanded tensor)
    "leading_2d": ((16, 300), (100,), (0,)),
    "trailing_2d": ((16, 300), (100,), (1,)),
    "middle_3d": ((10, 8, 16), (50,), (1,)),
    "two_split_axes": ((12, 40), (30, 20), (0, 2)),
    "swin_3d": ((169, 4), (49, 49), (1, 2)),
    "pangu_5d": ((60, 4, 3), (1, 24, 24), (0, 3, 4)),
}


@pytest.mark.parametrize("case", list(EXPANSION_CASES))
def test_expansion_rewritten_bit_exact(case: str) -> None:
    table_shape, index_shape, position_axes = EXPANSION_CASES[case]
    rng = np.random.default_rng(0)
    table = rng.standard_normal(table_shape).astype(np.float32)
    constant = expand(table, covering_index(index_shape, table_shape[0], rng), position_axes)
    model = bias_model(constant)

    result = FactorExpandedTables().run(model)

    assert result.modified
    check(result.model)
    assert_bit_exact(model, result.model, random_feeds(model, rng))
    (entry,) = result.report["tensors"]
    assert entry["name"] == "bias" and entry["shape"] == list(constant.shape)
    assert entry["table_shape"][0] == table_shape[0]
    assert entry["bytes_after"] <= 0.75 * entry["bytes_before"]
    saved = constant_bytes(model) - constant_bytes(result.model)
    assert saved >= 0.25 * constant.nbytes
    assert result.report["bytes_saved"] == entry["bytes_before"] - entry["bytes_after"]


def test_pangu_layout_table_index_and_nodes() -> None:
    rng = np.random.default_rng(1)
    table = rng.standard_normal((60, 4, 3)).astype(np.float32)
    constant = expand(table, covering_index((1, 24, 24), 60, rng), (0, 3, 4))

    result = FactorExpandedTables().run(bias_model(constant))

    (entry,) = result.report["tensors"]
    assert entry["table_shape"] == [60, 4, 3]
    assert entry["index_shape"] == [1, 24, 24]
    assert entry["position_axes"] == [0, 3, 4]
    ops = [n.op_type for n in result.model.graph.node]
    assert ops[:2] == ["Gather", "Transpose"]
    produced = {o for n in result.model.graph.node for o in n.output}
    assert "bias" in produced and "bias" not in {t.name for t in result.model.graph.initializer}


def test_factorization_reconstructs_random_expansions() -> None:
    rng = np.random.default_rng(2)
    for _ in range(25):
        rest_shape = tuple(int(d) for d in rng.integers(4, 9, size=rng.integers(1, 3)))
        index_shape = tuple(int(d) for d in rng.integers(8, 30, size=rng.integers(1, 3)))
        # At most a quarter as many rows as positions: then a 25% saving is guaranteed.
        rows = int(rng.integers(2, max(3, int(np.prod(index_shape)) // 4)))
        table = rng.standard_normal((rows, *rest_shape)).astype(np.float32)
        ndim = len(rest_shape) + len(index_shape)
        position_axes = tuple(sorted(rng.choice(ndim, size=len(index_shape), replace=False).tolist()))
        array = expand(table, rng.integers(0, rows, size=index_shape), position_axes)

        found = find_factorization(array)

        assert found is not None
        assert np.array_equal(bits(found.reconstruct()), bits(array))
        assert found.bytes_after <= 0.75 * found.bytes_before
        assert found.table.shape[0] <= rows


def test_slices_differing_in_one_element_are_not_merged() -> None:
    rng = np.random.default_rng(3)
    table = rng.standard_normal((6, 512)).astype(np.float32)
    table[0, 7] = 0.0
    table[1] = table[0]
    table[1, 7] = -0.0  # equal as floats, different bits
    table[2] = table[0]
    table[2, 100] = np.nextafter(table[0, 100], np.float32(np.inf))  # one ulp apart
    table[3] = table[0]
    table[3, 5] = np.float32(np.nan)
    table[4] = table[3]
    table[4].view(np.uint32)[5] = 0x7FC00001  # another NaN payload
    constant = expand(table, covering_index((64,), 6, rng), (0,))
    model = bias_model(constant)

    result = FactorExpandedTables().run(model)

    (entry,) = result.report["tensors"]
    assert entry["table_shape"] == [6, 512]
    check(result.model)
    assert_bit_exact(model, result.model, random_feeds(model, rng))


def test_values_coinciding_inside_slices_stay_exact() -> None:
    rng = np.random.default_rng(4)
    array = rng.integers(0, 2, size=(64, 128)).astype(np.float32)  # two values, no repeated rows or columns

    found = find_factorization(array)

    assert found is None or np.array_equal(bits(found.reconstruct()), bits(array))


def test_shared_tensor_feeds_two_consumers() -> None:
    rng = np.random.default_rng(5)
    constant = expand(rng.standard_normal((8, 256)).astype(np.float32), covering_index((64,), 8, rng), (1,))
    model = make_model(
        [helper.make_node("Add", ["X1", "bias"], ["Y1"]), helper.make_node("Mul", ["X2", "bias"], ["Y2"])],
        [value_info("X1", constant), value_info("X2", constant)],
        [value_info("Y1", constant), value_info("Y2", constant)],
        [numpy_helper.from_array(constant, "bias")],
    )

    result = FactorExpandedTables().run(model)

    assert result.report["tensors_rewritten"] == 1
    check(result.model)
    assert_bit_exact(model, result.model, random_feeds(model, rng))
    assert constant_bytes(model) - constant_bytes(result.model) >= 0.25 * constant.nbytes


def _if_model(rng: np.random.Generator) -> onnx.ModelProto:
    """If with an initializer in then_branch, a Constant node in else_branch, and an outer-scope initializer."""
    shape = (4, 40, 32)
    then_c = expand(rng.standard_normal((6, 4, 32)).astype(np.float32), covering_index((40,), 6, rng), (1,))
    else_c = expand(rng.standard_normal((5, 4, 40)).astype(np.float32), covering_index((32,), 5, rng), (2,))
    outer_c = expand(rng.standard_normal((3, 4, 40)).astype(np.float32), covering_index((32,), 3, rng), (2,))
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["X", "then_bias"], ["y_then"])],
        "then",
        [],
        [value_info("y_then", shape)],
        initializer=[numpy_helper.from_array(then_c, "then_bias")],
    )
    else_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["else_bias"], value=numpy_helper.from_array(else_c, "else_bias")),
            helper.make_node("Add", ["X", "else_bias"], ["t"]),
            helper.make_node("Add", ["t", "outer_bias"], ["y_else"]),
        ],
        "else",
        [],
        [value_info("y_else", shape)],
    )
    return make_model(
        [helper.make_node("If", ["cond"], ["Y"], then_branch=then_branch, else_branch=else_branch)],
        [value_info("cond", (), TensorProto.BOOL), value_info("X", shape)],
        [value_info("Y", shape)],
        [numpy_helper.from_array(outer_c, "outer_bias")],
    )


def test_tensors_inside_if_subgraphs() -> None:
    rng = np.random.default_rng(6)
    model = _if_model(rng)

    result = FactorExpandedTables().run(model)

    rewritten = {(e["name"], e["source"]) for e in result.report["tensors"]}
    assert rewritten == {("then_bias", "initializer"), ("else_bias", "constant"), ("outer_bias", "initializer")}
    graphs = {e["name"]: e["graph"] for e in result.report["tensors"]}
    assert graphs["then_bias"].endswith("then_branch") and graphs["else_bias"].endswith("else_branch")
    check(result.model)
    x = rng.standard_normal((4, 40, 32)).astype(np.float32)
    for cond in (True, False):
        assert_bit_exact(model, result.model, {"cond": np.array(cond), "X": x})
    assert constant_bytes(result.model) < 0.75 * constant_bytes(model)


def test_unstructured_tensor_left_alone() -> None:
    rng = np.random.default_rng(7)
    model = bias_model(rng.standard_normal((64, 128)).astype(np.float32))

    result = FactorExpandedTables().run(model)

    assert not result.modified and result.report["tensors"] == []
    assert result.model.SerializeToString() == model.SerializeToString()


def test_tensor_below_size_floor_left_alone() -> None:
    rng = np.random.default_rng(8)
    constant = expand(rng.standard_normal((4, 32)).astype(np.float32), covering_index((64,), 4, rng), (0,))
    model = bias_model(constant)  # 2048 elements < default floor 4096

    assert not FactorExpandedTables().run(model).modified
    assert FactorExpandedTables(size_floor=1024).run(model).modified


def test_input_model_is_not_mutated() -> None:
    rng = np.random.default_rng(9)
    constant = expand(rng.standard_normal((8, 256)).astype(np.float32), covering_index((64,), 8, rng), (0,))
    model = bias_model(constant)
    before = model.SerializeToString()

    FactorExpandedTables().run(model)

    assert model.SerializeToString() == before


def test_initializer_that_is_graph_output() -> None:
    rng = np.random.default_rng(10)
    constant = expand(rng.standard_normal((8, 256)).astype(np.float32), covering_index((64,), 8, rng), (1,))
    model = make_model([], [], [value_info("bias", constant)], [numpy_helper.from_array(constant, "bias")])

    result = FactorExpandedTables().run(model)

    assert result.modified
    check(result.model)
    assert_bit_exact(model, result.model, {})


def test_initializer_that_is_graph_input_is_skipped() -> None:
    rng = np.random.default_rng(11)
    constant = expand(rng.standard_normal((8, 256)).astype(np.float32), covering_index((64,), 8, rng), (1,))
    model = bias_model(constant)
    model.graph.input.append(value_info("bias", constant))

    result = FactorExpandedTables().run(model)

    assert not result.modified
    assert [s["name"] for s in result.report["skipped"]] == ["bias"]


def test_float16_table() -> None:
    rng = np.random.default_rng(12)
    table = rng.standard_normal((30, 3, 5)).astype(np.float16)
    constant = expand(table, covering_index((1, 24, 24), 30, rng), (0, 3, 4))
    model = make_model(
        [helper.make_node("Add", ["X", "bias"], ["Y"])],
        [value_info("X", constant, TensorProto.FLOAT16)],
        [value_info("Y", constant, TensorProto.FLOAT16)],
        [numpy_helper.from_array(constant, "bias")],
    )

    result = FactorExpandedTables().run(model)

    assert result.report["tensors"][0]["table_shape"] == [30, 3, 5]
    check(result.model)
    assert_bit_exact(model, result.model, random_feeds(model, rng))


# ---------------------------------------------------------------------------
# DeduplicateTensors
# ---------------------------------------------------------------------------


def test_dedup_merges_identical_initializers_only() -> None:
    rng = np.random.default_rng(20)
    a = rng.standard_normal((32, 64)).astype(np.float32)
    near = a.copy()
    near[3, 3] = np.nextafter(near[3, 3], np.float32(np.inf))
    model = make_model(
        [
            helper.make_node("Add", ["X", "a"], ["Y1"]),
            helper.make_node("Add", ["X", "a_copy"], ["Y2"]),
            helper.make_node("Add", ["X", "a_near"], ["Y3"]),
        ],
        [value_info("X", a)],
        [value_info(n, a) for n in ("Y1", "Y2", "Y3")],
        [
            numpy_helper.from_array(a, "a"),
            numpy_helper.from_array(a.copy(), "a_copy"),
            numpy_helper.from_array(near, "a_near"),
        ],
    )

    before = model.SerializeToString()

    result = DeduplicateTensors().run(model)

    assert model.SerializeToString() == before
    assert result.report["merged"] == [{"removed": "a_copy", "kept": "a", "graph": "main", "nbytes": a.nbytes}]
    assert {t.name for t in result.model.graph.initializer} == {"a", "a_near"}
    check(result.model)
    assert_bit_exact(model, result.model, random_feeds(model, rng))
    assert constant_bytes(model) - constant_bytes(result.model) >= a.nbytes
    # no value_info of onnx-ir's own (one per typed value: the passes made a small model larger)
    assert len(result.model.graph.value_info) == 0
    assert model.ByteSize() - result.model.ByteSize() >= a.nbytes


def test_dedup_rewires_subgraphs_and_constant_nodes() -> None:
    rng = np.random.default_rng(21)
    a = rng.standard_normal((32, 64)).astype(np.float32)
    b = rng.standard_normal((32, 64)).astype(np.float32)
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["X", "a_then"], ["t"]), helper.make_node("Add", ["t", "b_then"], ["y_then"])],
        "then",
        [],
        [value_info("y_then", a)],
        initializer=[numpy_helper.from_array(a, "a_then"), numpy_helper.from_array(b, "b_then")],
    )
    else_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["a_const"], value=numpy_helper.from_array(a, "a_const")),
            helper.make_node("Add", ["X", "a_const"], ["t2"]),
            helper.make_node("Add", ["t2", "b_else"], ["y_else"]),
        ],
        "else",
        [],
        [value_info("y_else", a)],
        initializer=[numpy_helper.from_array(b, "b_else")],
    )
    model = make_model(
        [
            helper.make_node("If", ["cond"], ["Y"], then_branch=then_branch, else_branch=else_branch),
            helper.make_node("Add", ["X", "a"], ["Z"]),
        ],
        [value_info("cond", (), TensorProto.BOOL), value_info("X", a)],
        [value_info("Y", a), value_info("Z", a)],
        [numpy_helper.from_array(a, "a")],
    )

    result = DeduplicateTensors().run(model)

    removed = {m["removed"]: m["kept"] for m in result.report["merged"]}
    # b_then and b_else live in sibling branches: neither can see the other, both stay.
    assert removed == {"a_then": "a", "a_const": "a"}
    check(result.model)
    x = rng.standard_normal(a.shape).astype(np.float32)
    for cond in (True, False):
        assert_bit_exact(model, result.model, {"cond": np.array(cond), "X": x})
    assert constant_bytes(model) - constant_bytes(result.model) >= 2 * a.nbytes


def test_dedup_keeps_graph_outputs_inputs_and_small_tensors() -> None:
    rng = np.random.default_rng(22)
    a = rng.standard_normal((32, 64)).astype(np.float32)
    small = rng.standard_normal((4, 8)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Add", ["X", "a_overridable"], ["Y0"]),
            helper.make_node("Add", ["X", "a"], ["Y1"]),
            helper.make_node("Add", ["S", "s1"], ["Y2"]),
            helper.make_node("Add", ["S", "s2"], ["Y3"]),
        ],
        [value_info("X", a), value_info("S", small), value_info("a_overridable", a)],
        [value_info(n, a) for n in ("Y0", "Y1", "a_out")] + [value_info(n, small) for n in ("Y2", "Y3")],
        [
            numpy_helper.from_array(a, "a_overridable"),
            numpy_helper.from_array(a, "a"),
            numpy_helper.from_array(a, "a_out"),
            numpy_helper.from_array(small, "s1"),
            numpy_helper.from_array(small, "s2"),
        ],
    )

    result = DeduplicateTensors().run(model)

    # a_overridable is a graph input (never canonical), a_out a graph output (never removed), s1/s2 below the floor.
    assert not result.modified
    assert result.model is model


def test_factor_then_dedup_merges_shared_tables() -> None:
    rng = np.random.default_rng(23)
    constant = expand(rng.standard_normal((8, 256)).astype(np.float32), covering_index((64,), 8, rng), (1,))
    model = make_model(
        [helper.make_node("Add", ["X", "b1"], ["Y1"]), helper.make_node("Add", ["X", "b2"], ["Y2"])],
        [value_info("X", constant)],
        [value_info("Y1", constant), value_info("Y2", constant)],
        [numpy_helper.from_array(constant, "b1"), numpy_helper.from_array(constant.copy(), "b2")],
    )

    rewritten, reports = base.run_passes(model, [FactorExpandedTables(), DeduplicateTensors(size_floor=64)])

    assert reports["factor_expanded_tables"]["tensors_rewritten"] == 2
    assert reports["deduplicate_tensors"]["tensors_removed"] == 2  # second table and second index
    check(rewritten)
    assert_bit_exact(model, rewritten, random_feeds(model, rng))


def test_inspect_states_the_lossless_passes_net_of_the_nodes_they_add(tmp_path) -> None:
    """inspect's per-pass savings count tensors only (a user's Swin: 234,208 bytes 'saved', the file
    shrank by 231,467); its total is the prepared graph's size, what a plan keeping every weight writes."""
    import json

    from tqs_onnx.cli import main
    from tqs_onnx.graph import load_model
    from tqs_onnx.rewrite import rewrite_model, save_model

    rng = np.random.default_rng(1)
    constant = expand(rng.standard_normal((60, 4, 3)).astype(np.float32), covering_index((1, 24, 24), 60, rng), (0, 3, 4))
    onnx.save(bias_model(constant), tmp_path / "m.onnx")
    out, _ = rewrite_model(load_model(tmp_path / "m.onnx"), {"kind": "tqs-plan", "model": {}, "weights": {}})
    save_model(out, tmp_path / "kept.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx"), "--json", "-o", str(tmp_path / "i.json")]) == 0
    doc = json.loads((tmp_path / "i.json").read_text())
    assert doc["prepared_bytes"] == (tmp_path / "kept.onnx").stat().st_size < doc["file_bytes"]
