"""apply's memory: passes that rebuild the model run on a skeleton without the weights' data, and the
data is attached once. Each result is compared byte for byte with the same pass run on a full copy of
the model (how apply worked before); the peak tests read the kernel's peak-RSS counter around one call.
"""

import ctypes
import gc
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

from tiny import init, model, vec
from tqs_onnx.encoding import ModelEncoding
from tqs_onnx.graph import load_model, weight_table
from tqs_onnx.passes.base import restore_opset_imports, restore_value_info
from tqs_onnx.passes.detach import detach
from tqs_onnx.passes.factor_tables import FactorExpandedTables
from tqs_onnx.passes.lift import LiftWeights
from tqs_onnx.passes.opset import UpgradeOpset, ir_for_opset
from tqs_onnx.passes.qdq import WriteTiers
from tqs_onnx.prepare import prepare_graph
from tqs_onnx.rewrite import rewrite_model, save_model
from tqs_onnx.tiers import parse_tier


def weights_everywhere(n: int = 64, seed: int = 0) -> onnx.ModelProto:
    """Weights in every place a pass looks: raw and float_data initializers (one with a doc string and
    metadata), a Constant node, an If branch initializer, an expanded lookup table, and a ReduceMean
    whose `axes` attribute the opset-18 converter turns into an input."""
    r = np.random.default_rng(seed)
    w_raw, w_const, w_sub = (r.standard_normal((n, n)).astype(np.float32) for _ in range(3))
    w_float = helper.make_tensor("Wf", TensorProto.FLOAT, [n, n], r.standard_normal(n * n).astype(np.float32))
    w_doc = init("Wd", r.standard_normal((n, n)).astype(np.float32))
    w_doc.doc_string = "kept"
    entry = w_doc.metadata_props.add()
    entry.key, entry.value = "origin", "test"
    table = r.standard_normal((8, n)).astype(np.float32)
    expanded = table[r.integers(0, 8, size=2 * n)]  # 2n rows drawn from 8: factors exactly
    then_g = helper.make_graph([helper.make_node("MatMul", ["e", "Ws"], ["t"])], "then", [],
                               [vec("t", n)], [init("Ws", w_sub)])
    else_g = helper.make_graph([helper.make_node("Identity", ["e"], ["f"])], "else", [], [vec("f", n)])
    nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w_const)),
             helper.make_node("MatMul", ["x", "W"], ["a"]),
             helper.make_node("MatMul", ["a", "Wc"], ["b"]),
             helper.make_node("MatMul", ["b", "Wf"], ["c"]),
             helper.make_node("MatMul", ["c", "Wd"], ["d"]),
             helper.make_node("Add", ["d", "bias"], ["g"]),
             helper.make_node("ReduceMean", ["g"], ["e"], axes=[0], keepdims=1),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [init("W", w_raw), w_float, w_doc, init("bias", expanded), init("cond", np.array(True))]
    return model(nodes, inits, [vec("x", n)], [vec("y", n)])


def full_convert(m: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """UpgradeOpset as it was: the converter on the whole model, then the input's value_info and opsets."""
    out = version_converter.convert_version(m, opset)
    restore_value_info(m, out)
    restore_opset_imports(m, out, opset)
    out.ir_version = min(max(m.ir_version, ir_for_opset(opset)), 13)
    return out


def old_prepare(m: onnx.ModelProto, factor: bool) -> onnx.ModelProto:
    """prepare_graph as it was: lift on a full copy, then factor the lifted model in place."""
    lifted = LiftWeights().run(m)
    if not factor:
        return lifted.model
    return FactorExpandedTables(inplace=lifted.modified).run(lifted.model).model


@pytest.mark.parametrize("factor", [True, False])
def test_prepared_graph_equals_lifting_and_factoring_a_full_copy(factor):
    m = weights_everywhere()
    detached = detach(m, min_elements=256)
    assert len(detached.originals) >= 5 and detached.skeleton.ByteSize() < m.ByteSize() / 4
    got = prepare_graph(m, factor)
    assert got.reports["lift-weights"]["lifted"] == 2
    assert got.reports.get("factor-tables", {}).get("tensors_rewritten", 0) == int(factor)
    assert got.model.SerializeToString() == old_prepare(m, factor).SerializeToString()


def test_prepared_expanded_table_is_factored_from_the_detached_data():
    r = np.random.default_rng(1)
    table = r.standard_normal((6, 128)).astype(np.float32)
    expanded = table[r.integers(0, 6, size=96)]  # 96 x 128 floats, 6 distinct rows
    m = model([helper.make_node("MatMul", ["x", "T"], ["y"])], [init("T", expanded.T.copy())],
              [vec("x", 128)], [vec("y", 96)])
    got = prepare_graph(m, factor=True)
    assert got.reports["factor-tables"]["tensors_rewritten"] == 1
    assert got.model.SerializeToString() == old_prepare(m, True).SerializeToString()


def test_opset_upgrade_on_a_skeleton_equals_converting_the_full_model():
    m = weights_everywhere()
    got = UpgradeOpset(21).run(m).model
    want = full_convert(m, 21)
    assert any(n.op_type == "ReduceMean" and len(n.input) == 2 for n in got.graph.node)  # the adapter ran
    assert got.SerializeToString() == want.SerializeToString()


@pytest.mark.parametrize("tiers", [{"W": "int4/channel", "Wf": "bf16", "Wc": "int8", "Ws": "int2/channel"},
                                   {"W": "int8/channel", "Wd": "fp16"}])
def test_rewrite_on_a_skeleton_equals_rewriting_the_full_model(tmp_path, tiers):
    """Weights left at fp32 (Wd, with its doc string) get their data at the end; the converter drops
    tensor doc strings, and must do so here too."""
    m = weights_everywhere()
    onnx.save(m, tmp_path / "m.onnx")
    plan = {"kind": "tqs-plan", "model": {}, "factor": True, "weights": tiers, "weight_info": {}}
    got, _ = rewrite_model(load_model(tmp_path / "m.onnx"), plan)
    full = old_prepare(m, True)
    table = {w.name: w for w in weight_table(full, min_size=1)}
    parsed = {n: parse_tier(t) for n, t in tiers.items()}
    need = max(t.min_opset for t in parsed.values())
    want = full_convert(full, need) if need > 17 else full
    want = WriteTiers(parsed, {n: (table[n].channel_axis, table[n].block_axis) for n in tiers}).run(want).model
    assert got.SerializeToString() == want.SerializeToString()


def test_rewriting_without_factoring_leaves_the_callers_model_untouched(tmp_path):
    """With nothing to lift and no factoring, the write pass used to edit the loaded model itself."""
    W = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    m = model([helper.make_node("MatMul", ["x", "W"], ["y"])], [init("W", W)], [vec("x", 32)], [vec("y", 16)])
    onnx.save(m, tmp_path / "m.onnx")
    loaded = load_model(tmp_path / "m.onnx")
    before = loaded.model.SerializeToString()
    plan = {"kind": "tqs-plan", "model": {}, "factor": False, "weights": {"W": "int8"}, "weight_info": {}}
    first, _ = rewrite_model(loaded, plan)
    assert loaded.model.SerializeToString() == before
    second, _ = rewrite_model(loaded, plan)
    assert first.SerializeToString() == second.SerializeToString()


def test_model_written_piecewise_equals_its_whole_encoding(tmp_path):
    m = weights_everywhere()
    m.doc_string, m.producer_name = "doc", "test"
    m.graph.doc_string = "graph doc"
    entry = m.metadata_props.add()
    entry.key, entry.value = "k", "v"
    relu = helper.make_node("Relu", ["a"], ["b"])
    m.functions.add().CopyFrom(helper.make_function("local", "f", ["a"], ["b"], [relu], [helper.make_opsetid("", 17)]))
    encoding = ModelEncoding(m)
    assert encoding.exact and encoding.size == len(m.SerializeToString())
    encoding.write(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == m.SerializeToString()


def test_model_with_unknown_fields_is_written_whole(tmp_path):
    m = weights_everywhere()
    m.graph.MergeFromString(bytes([0xF8, 0x07, 0x01]))  # field 127, varint 1: unknown to onnx.proto
    encoding = ModelEncoding(m)
    assert not encoding.exact
    encoding.write(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == m.SerializeToString()


# ------------------------------------------------------------------------------------ peak memory

def _kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _peak_growth(fn) -> tuple[object, int]:
    """Run fn(); return its result and how far the peak RSS rose above the RSS before it (bytes)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap would hide new allocations
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        pytest.skip("cannot release free heap or reset the peak-RSS counter here")
    start = _kb("VmRSS")
    out = fn()
    return out, (_kb("VmHWM") - start) * 1024


def big_hidden_weights(n: int = 1024, layers: int = 12) -> onnx.ModelProto:
    """48 MiB of initializers, one 4 MiB weight in a Constant node (so lifting runs), a ReduceMean for
    the converter."""
    r = np.random.default_rng(0)
    ws = [r.standard_normal((n, n)).astype(np.float32) for _ in range(layers + 1)]
    nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(ws[-1]))]
    nodes += [helper.make_node("MatMul", [f"h{i}", f"W{i}"], [f"h{i + 1}"]) for i in range(layers)]
    nodes += [helper.make_node("MatMul", [f"h{layers}", "Wc"], ["z"]),
              helper.make_node("ReduceMean", ["z"], ["y"], axes=[0], keepdims=1)]
    return model(nodes, [init(f"W{i}", w) for i, w in enumerate(ws[:-1])], [vec("h0", n)], [vec("y", n)])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_preparing_and_upgrading_cost_about_one_copy_of_the_weights():
    """Before, the peak rose ~2.4x the model in prepare (a full copy, onnx-ir's output) and ~7x in
    the converter (the model serialized to C++ and back)."""
    m = big_hidden_weights()
    size = m.ByteSize()
    prepared, grew = _peak_growth(lambda: prepare_graph(m, factor=True))
    assert prepared.reports["lift-weights"]["lifted"] == 1
    assert grew < 1.5 * size, f"prepare: peak rose {grew / size:.2f}x the model"
    upgraded, grew = _peak_growth(lambda: UpgradeOpset(21).run(prepared.model))
    assert upgraded.modified
    assert grew < 1.5 * size, f"opset upgrade: peak rose {grew / size:.2f}x the model"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_saving_encodes_one_initializer_at_a_time(tmp_path):
    """Before, ByteSize() and SerializeToString() each encoded the whole model: the peak rose ~3x it."""
    m = big_hidden_weights()
    size = m.ByteSize()
    _, grew = _peak_growth(lambda: save_model(m, tmp_path / "q.onnx"))
    assert grew < size, f"save: peak rose {grew / size:.2f}x the model"
    assert (tmp_path / "q.onnx").read_bytes() == m.SerializeToString()
