"""Committed zoo forecasters: load in onnxruntime, check spec coverage and shapes, roll out closed loop.

Self-contained on purpose (numpy + onnx + onnxruntime only): it must not depend on the core package or torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"
N_ROLLOUT_CONTEXTS = 2
N_CONTEXTS = 8
# Each model must contain all ops of one of its alternative sets.
EXPECTED_OPS: dict[str, tuple[set[str], ...]] = {
    "l96_cnn": ({"Conv"},),
    "macro_mlp": ({"Gemm", "Concat"}, {"MatMul", "Concat"}),
    "lstm_forecaster": ({"LSTM"}, {"GRU"}),
    "patch_transformer": ({"MatMul", "Softmax"},),
}
MAX_ONNX_BYTES = 2 * 1024 * 1024
ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}


def load_spec(name: str) -> dict[str, Any]:
    """The model's rollout spec."""
    return json.loads((ZOO / f"{name}.rollout.json").read_text())


def load_contexts(name: str, split: str) -> dict[str, np.ndarray]:
    """All arrays of NAME_<split>.npz."""
    with np.load(ZOO / f"{name}_{split}.npz") as data:
        return {k: data[k] for k in data.files}


def session(name: str) -> ort.InferenceSession:
    """CPU session for the committed model."""
    return ort.InferenceSession(str(ZOO / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def static_shapes(values: list[Any]) -> dict[str, tuple[int, ...]]:
    """name -> static shape of onnxruntime NodeArgs (fails on symbolic dims)."""
    shapes = {v.name: tuple(v.shape) for v in values}
    assert all(isinstance(d, int) and d > 0 for s in shapes.values() for d in s), shapes
    return shapes


def rollout(sess: ort.InferenceSession, spec: dict[str, Any], data: dict[str, np.ndarray], n_ctx: int,
            ) -> dict[str, np.ndarray]:
    """Closed-loop rollout of the first n_ctx contexts: trajectory outputs as (n_ctx, horizon, *shape)."""
    out_names = [o.name for o in sess.get_outputs()]
    dtypes = {i.name: ONNX_DTYPES[i.type] for i in sess.get_inputs()}
    traj: dict[str, list[list[np.ndarray]]] = {o: [[] for _ in range(n_ctx)] for o in spec["trajectory"]}
    for s in range(n_ctx):
        feeds = {i: data[k][s] for i, k in {**spec["initial"], **spec["fixed"]}.items()}
        feeds.update({i: np.asarray(v, dtype=dtypes[i]) for i, v in spec["constants"].items()})
        for t in range(spec["horizon"]):
            feeds.update({i: data[k][s, t] for i, k in spec["per_step"].items()})
            result = dict(zip(out_names, sess.run(None, feeds)))
            for o in spec["trajectory"]:
                traj[o][s].append(result[o])
            feeds.update({i: result[o] for o, i in spec["feedback"].items()})
    return {o: np.asarray(v) for o, v in traj.items()}


@pytest.fixture(params=sorted(EXPECTED_OPS))
def name(request: pytest.FixtureRequest) -> str:
    """Each zoo model; a missing artefact is a failure, not a skip (they are committed)."""
    for suffix in (".onnx", ".rollout.json", "_sweep.npz", "_eval.npz"):
        assert (ZOO / f"{request.param}{suffix}").is_file(), f"missing {request.param}{suffix}"
    return request.param


def test_model_file_is_small_selfcontained_ir9_opset17(name: str) -> None:
    path = ZOO / f"{name}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    assert path.stat().st_size < MAX_ONNX_BYTES
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert model.ir_version == 9
    assert {o.domain: o.version for o in model.opset_import}.get("", None) == 17


def test_graph_contains_expected_ops(name: str) -> None:
    ops = {n.op_type for n in onnx.load(str(ZOO / f"{name}.onnx")).graph.node}
    assert any(alt <= ops for alt in EXPECTED_OPS[name]), (name, sorted(ops))


def test_spec_covers_every_input_exactly_once(name: str) -> None:
    spec, sess = load_spec(name), session(name)
    inputs = [i.name for i in sess.get_inputs()]
    outputs = {o.name for o in sess.get_outputs()}
    sources = [*spec["feedback"].values(), *spec["per_step"], *spec["fixed"], *spec["constants"]]
    assert sorted(sources) == sorted(inputs)
    assert set(spec["initial"]) == set(spec["feedback"].values())
    assert set(spec["feedback"]) | set(spec["trajectory"]) | set(spec["truth"]) <= outputs
    assert set(spec["channel_axis"]) <= set(spec["trajectory"])
    assert spec["name"] == name and spec["horizon"] >= 100


def test_feedback_pairs_have_equal_static_shapes(name: str) -> None:
    spec, sess = load_spec(name), session(name)
    ins, outs = static_shapes(sess.get_inputs()), static_shapes(sess.get_outputs())
    assert all(outs[o] == ins[i] for o, i in spec["feedback"].items())


@pytest.mark.parametrize("split", ["sweep", "eval"])
def test_context_arrays_match_spec_shapes(name: str, split: str) -> None:
    spec, sess, data = load_spec(name), session(name), load_contexts(name, split)
    ins, outs = static_shapes(sess.get_inputs()), static_shapes(sess.get_outputs())
    for i, key in {**spec["initial"], **spec["fixed"]}.items():
        assert data[key].shape == (N_CONTEXTS, *ins[i]) and data[key].dtype == np.float32
    for i, key in spec["per_step"].items():
        assert data[key].shape[0] == N_CONTEXTS and data[key].shape[1] >= spec["horizon"]
        assert data[key].shape[2:] == ins[i]
    for o, key in spec["truth"].items():
        assert data[key].shape[0] == N_CONTEXTS and data[key].shape[1] >= spec["horizon"]
        assert data[key].shape[2:] == outs[o] and np.isfinite(data[key]).all()


def test_sweep_and_eval_contexts_differ(name: str) -> None:
    spec = load_spec(name)
    sweep, ev = load_contexts(name, "sweep"), load_contexts(name, "eval")
    for key in spec["initial"].values():
        flat_s, flat_e = sweep[key].reshape(N_CONTEXTS, -1), ev[key].reshape(N_CONTEXTS, -1)
        assert not (flat_s[:, None] == flat_e[None]).all(axis=-1).any(), key


def test_closed_loop_rollout_is_finite_and_shaped(name: str) -> None:
    spec, sess, data = load_spec(name), session(name), load_contexts(name, "eval")
    outs = static_shapes(sess.get_outputs())
    traj = rollout(sess, spec, data, N_ROLLOUT_CONTEXTS)
    for o, pred in traj.items():
        assert pred.shape == (N_ROLLOUT_CONTEXTS, spec["horizon"], *outs[o])
        assert np.isfinite(pred).all()
        assert -len(outs[o]) <= spec["channel_axis"][o] < len(outs[o])

