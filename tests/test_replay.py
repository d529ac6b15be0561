"""The replay engine (tqs_onnx.replay, passes.replay): sweep probes run on two fixed bindings must give
the step loop's scores to the bit, for every way a rollout feeds a model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tiny import growing_state_model, init, model, recurrent_contexts, recurrent_mlp, recurrent_spec, save_case
from tqs_onnx.errors import TqsError
from tqs_onnx.graph import load_model
from tqs_onnx.passes.replay import IndexedSteps
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import Device
from tqs_onnx.sweep import SweepConfig, prepare, run_sweep

CPU = Device("cpu")


def forced_model(n: int = 8) -> onnx.ModelProto:
    """x_next = tanh(x W + f) * k + c (feedback x, forcing f per step, fixed c, constant k) and
    z = x_next V, a trajectory output that is not fed back."""
    r = np.random.default_rng(4)
    h = helper.make_node
    return model([h("MatMul", ["x", "W"], ["a"]), h("Add", ["a", "f"], ["b"]), h("Tanh", ["b"], ["t"]),
                  h("Mul", ["t", "k"], ["u"]), h("Add", ["u", "c"], ["x_next"]), h("MatMul", ["x_next", "V"], ["z"])],
                 [init("W", (r.standard_normal((n, n)) * 0.5).astype(np.float32)),
                  init("V", r.standard_normal((n, 3)).astype(np.float32))],
                 [helper.make_tensor_value_info(i, TensorProto.FLOAT, [1, n]) for i in ("x", "f", "c")]
                 + [helper.make_tensor_value_info("k", TensorProto.FLOAT, [])],
                 [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [1, n]),
                  helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3])])


def forced_case(tmp_path, horizon: int = 5, contexts: int = 3, n: int = 8):
    r = np.random.default_rng(5)
    spec = {"horizon": horizon, "feedback": {"x_next": "x"}, "trajectory": ["x_next", "z"], "initial": {"x": "x0"},
            "per_step": {"f": "forcing"}, "fixed": {"c": "offset"}, "constants": {"k": 0.8}}
    data = {"x0": r.standard_normal((contexts, 1, n)).astype(np.float32),
            "forcing": r.standard_normal((contexts, horizon + 2, 1, n)).astype(np.float32),
            "offset": (r.standard_normal((contexts, 1, n)) * 0.1).astype(np.float32)}
    return save_case(tmp_path, forced_model(n), spec, data)


def _inputs(paths, **kw):
    spec = RolloutSpec.load(paths["spec"])
    config = SweepConfig(**{"probes": 2, "min_size": 16, "blocks": "tensor", **kw})
    return load_model(paths["model"]), spec, Contexts.load(paths["contexts"], spec), CPU, config


def setup_for(paths, **kw):
    inputs = _inputs(paths, **kw)
    return prepare(*inputs), inputs[-1]


def sweep_doc(paths, **kw) -> dict:
    return run_sweep(*_inputs(paths, **kw), quiet=True)


@pytest.mark.parametrize("horizon", [5, 4])
def test_replay_scores_equal_the_step_loop_for_every_kind_of_input(tmp_path, monkeypatch, horizon):
    """Feedback, per-step forcing, fixed and constant inputs, a trajectory output that is not fed back,
    several contexts and an odd horizon (the two bindings' alternation continues across contexts):
    quant, Gaussian and tier scores equal those of the step loop (TQS_REPLAY=off) to the bit."""
    paths = forced_case(tmp_path, horizon)
    setup, config = setup_for(paths)
    assert setup.replay is not None and setup.replay.mode == "buffers", setup.replay_note
    from tqs_onnx.sweep import score_block

    score_block(setup, setup.blocks[0], config, [])
    assert setup.replay is not None, setup.replay_note  # it ran: it did not fall back to the step loop
    docs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("TQS_REPLAY", mode)
        docs[mode] = sweep_doc(paths, tiers=["int8", "int4/channel", "int2", "bf16"])
    assert docs["on"]["blocks"] == docs["off"]["blocks"]
    assert docs["on"]["forward_passes"] == docs["off"]["forward_passes"] > 0
    assert all(b["quant"]["divergence"] > 0 and b["damage"]["int2"] > b["damage"]["int8"] > 0
               for b in docs["on"]["blocks"])


def test_replay_restores_the_nominal_weights_after_each_probe(tmp_path):
    """A probe copies its values into the fixed weight buffers and must put the nominal ones back: a
    probe with no weights replaced then measures zero divergence, before and after other probes."""
    setup, _ = setup_for(save_case(tmp_path, recurrent_mlp(), recurrent_spec(7), recurrent_contexts()))
    replay = setup.replay
    assert replay is not None
    assert not np.any(replay.divergence({}))
    w = next(iter(replay.slots))
    shifted = setup.ops.gauss(setup.bound[w], 12345, 0.05)
    first = replay.divergence({w: shifted})
    assert np.all(first > 0) and first.shape == (3, 7)
    assert not np.any(replay.divergence({}))
    assert np.array_equal(replay.divergence({w: shifted}), first)
    for name, slot in replay.slots.items():
        assert np.array_equal(slot.numpy(), setup.bound[name].numpy())


@pytest.mark.parametrize("trajectory", ["y", "z"])
def test_a_state_that_changes_shape_falls_back_to_the_step_loop(tmp_path, monkeypatch, trajectory):
    """The replay's buffers have the initial state's shape; a state that grows every step cannot be
    replayed. When the trajectory grows too (y) the replay is not built; when only the fed-back state
    grows (z = sum(y) keeps its shape) its first run (its own nominal rollout) fails. Either way the
    sweep says why and runs on the step loop, with the step loop's scores."""
    m = growing_state_model()
    spec = {"feedback": {"y": "x"}, "trajectory": [trajectory], "initial": {"x": "x0"}, "horizon": 5}
    paths = save_case(tmp_path, m, spec, {"x0": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)})
    setup, config = setup_for(paths)
    assert setup.replay is None
    assert ("'y' changes shape" if trajectory == "y" else "replay fails at step 1") in setup.replay_note
    monkeypatch.setenv("TQS_REPLAY", "off")
    off = sweep_doc(paths)
    monkeypatch.delenv("TQS_REPLAY")
    assert sweep_doc(paths)["blocks"] == off["blocks"]
    assert any(b["quant"]["divergence"] > 0 for b in off["blocks"])


def test_replay_off_and_bad_settings(tmp_path, monkeypatch):
    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    monkeypatch.setenv("TQS_REPLAY", "off")
    setup, _ = setup_for(paths)
    assert setup.replay is None and "TQS_REPLAY=off" in setup.replay_note
    monkeypatch.setenv("TQS_REPLAY", "maybe")
    with pytest.raises(TqsError, match="TQS_REPLAY=maybe"):
        setup_for(paths)


def test_indexed_steps_gathers_rows_and_accumulates_per_step():
    """The pass's graph: input x is row `tqs::step` of x::stack, the step advances by one, and the
    scalar output d lands in row `tqs::step` of its accumulator; the rest of the accumulator is kept."""
    h = helper.make_node
    m = model([h("Mul", ["x", "s"], ["y"]), h("ReduceSum", ["y"], ["d"], keepdims=0)],
              [init("s", np.float32(2.0))], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
               helper.make_tensor_value_info("d", TensorProto.FLOAT, [])])
    out = IndexedSteps(["x"], ["d"], ["y"], rows=4).run(m)
    onnx.checker.check_model(out.model, full_check=True)
    assert [o.name for o in out.model.graph.output] == ["y", "d::acc_next", "tqs::step_next"]
    sess = ort.InferenceSession(out.model.SerializeToString(), providers=["CPUExecutionProvider"])
    stack = np.arange(12, dtype=np.float32).reshape(4, 3)
    acc = np.full(4, -1, np.float32)
    y, acc_next, step_next = sess.run(None, {"x::stack": stack, "d::acc": acc, "tqs::step": np.array(2, np.int64)})
    assert np.array_equal(y, stack[2] * 2) and step_next == 3
    assert np.array_equal(acc_next, [-1, -1, stack[2].sum() * 2, -1])


def test_indexed_steps_refuses_old_opsets_and_name_clashes():
    h = helper.make_node
    args = ([h("Identity", ["x"], ["y"])], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    with pytest.raises(TqsError, match="opset >= 11"):
        IndexedSteps(["x"], [], ["y"], rows=2).run(model(*args, opset=10))
    clash = model([h("Identity", ["x"], ["tqs::step"]), h("Identity", ["tqs::step"], ["y"])], *args[1:])
    with pytest.raises(TqsError, match="already has values"):
        IndexedSteps(["x"], [], ["y"], rows=2).run(clash)


def test_auto_leaves_slow_models_on_the_step_loop(tmp_path, monkeypatch):
    """TQS_REPLAY=auto replays only models whose forward pass is quick (the step loop's overhead matters
    there); a slower one stays on the step loop, and says why. `on` replays it anyway."""
    import tqs_onnx.replay

    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    monkeypatch.setattr(tqs_onnx.replay, "REPLAY_MAX_PASS_S", 0.0)
    setup, _ = setup_for(paths)
    assert setup.replay is None and "replaying would save little" in setup.replay_note
    monkeypatch.setenv("TQS_REPLAY", "on")
    setup, _ = setup_for(paths)
    assert setup.replay is not None


def test_per_step_inputs_keep_their_rank(tmp_path):
    """A step's forcing is one row of its stack, of the input's own rank: a Softmax over the forcing's
    axis 0 sees the row's elements, not a leading axis of 1 (the step counter must be a 0-d tensor).
    The unperturbed replay then measures zero divergence and the probes match the step loop's."""
    n, h = 6, helper.make_node
    m = model([h("Softmax", ["f"], ["p"], axis=0), h("MatMul", ["x", "W"], ["a"]), h("Add", ["a", "p"], ["b"]),
               h("Tanh", ["b"], ["x_next"])],
              [init("W", (np.random.default_rng(1).standard_normal((n, n)) * 0.5).astype(np.float32))],
              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n]),
               helper.make_tensor_value_info("f", TensorProto.FLOAT, [n])],
              [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [n])])
    r = np.random.default_rng(2)
    spec = {"horizon": 4, "feedback": {"x_next": "x"}, "initial": {"x": "x0"}, "per_step": {"f": "forcing"}}
    paths = save_case(tmp_path, m, spec, {"x0": r.standard_normal((2, n)).astype(np.float32),
                                          "forcing": r.standard_normal((2, 4, n)).astype(np.float32)})
    setup, _ = setup_for(paths)
    assert not np.any(setup.replay.divergence({}))
    probe = setup.ops.quant_probe(setup.bound["W"], 4)
    from tqs_onnx.sweep import divergence

    replayed = divergence(setup, {"W": probe})
    assert setup.replay is not None
    setup.replay = None
    assert np.array_equal(replayed, divergence(setup, {"W": probe})) and np.all(replayed > 0)


def test_outputs_the_spec_does_not_name_stay_outputs(tmp_path, monkeypatch):
    """An extra model output (here MatMul's, before its Add) keeps ORT from fusing MatMul + Add into
    Gemm in the step loop's graph; the replay's graph must keep it too, or its sums differ in the last
    bits and a dead block (a branch multiplied by zero) looks alive."""
    n, h = 64, helper.make_node
    r = np.random.default_rng(7)
    m = model([h("MatMul", ["x", "W"], ["mm"]), h("Add", ["mm", "B"], ["a"]), h("Tanh", ["a"], ["t"]),
               h("MatMul", ["x", "Wd"], ["d"]), h("Mul", ["d", "zero"], ["dz"]), h("Add", ["t", "dz"], ["x_next"])],
              [init("W", (r.standard_normal((n, n)) * 0.2).astype(np.float32)),
               init("B", (r.standard_normal(n) * 0.1).astype(np.float32)),
               init("Wd", r.standard_normal((n, n)).astype(np.float32)), init("zero", np.float32(0))],
              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
              [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [1, n]),
               helper.make_tensor_value_info("mm", TensorProto.FLOAT, [1, n])])
    spec = {"horizon": 5, "feedback": {"x_next": "x"}, "trajectory": ["x_next"], "initial": {"x": "x0"}}
    paths = save_case(tmp_path, m, spec, {"x0": r.standard_normal((3, 1, n)).astype(np.float32)})
    setup, _ = setup_for(paths)
    assert not np.any(setup.replay.divergence({}))
    docs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("TQS_REPLAY", mode)
        docs[mode] = sweep_doc(paths)
    assert docs["on"] == docs["off"]
    assert sum(b["unreached"] for b in docs["on"]["blocks"]) == 1


def test_a_bad_probe_leaves_the_weight_buffers_nominal(tmp_path):
    """A replaced value of the wrong shape (or a name that is no probed weight) is a TqsError, and
    the buffers written before it are restored: later replays measure zero divergence unperturbed."""
    setup, _ = setup_for(save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts()))
    replay = setup.replay
    w1, w2 = list(replay.slots)[:2]
    probe = setup.ops.gauss(setup.bound[w1], 99, 0.1)
    bad = setup.ops.device.to_device(np.zeros((3, 3), np.float32))
    for replaced in ({w1: probe, w2: bad}, {w1: probe, "no such weight": probe}):
        with pytest.raises(TqsError, match="not a probed weight"):
            replay.divergence(replaced)
        assert not np.any(replay.divergence({}))


def test_scratch_buffers_for_unread_outputs_keep_the_scores(tmp_path, monkeypatch):
    """Under CUDA graphs every output is bound to a fixed buffer, also those nobody reads (here the
    trajectory output z and the divergence scalars). The same binding on the CPU provider (capture
    aside) gives the step loop's divergences to the bit."""
    import tqs_onnx.replay as replay_module
    from tqs_onnx.sweep import divergence

    made = replay_module.Replay._session

    def as_if_cuda_graph(self, model, device, threads):
        session = made(self, model, device, threads)
        self.mode = "cuda-graph"
        return session

    monkeypatch.setattr(replay_module.Replay, "_session", as_if_cuda_graph)
    monkeypatch.setattr(replay_module.Replay, "_graph_options", lambda self, parity: None)
    setup, _ = setup_for(forced_case(tmp_path))
    assert setup.replay.mode == "cuda-graph"
    assert set(setup.replay._kept[2]) == {"z", "x_next::tqs_sqdiff", "z::tqs_sqdiff"}
    probe = {n: setup.ops.quant_probe(setup.bound[n], 4) for n in setup.blocks[0].weights}
    replayed = divergence(setup, probe)
    assert setup.replay is not None
    setup.replay = None
    assert np.array_equal(replayed, divergence(setup, probe)) and np.all(replayed > 0)


def test_a_bfloat16_trajectory_output_is_swept_on_the_step_loop(tmp_path):
    """numpy has no bfloat16: the nominal trajectory's finite check reduces it on the device (it used
    to fail reading it to the host); a bfloat16 trajectory is compared from the outputs (in the model,
    ORT may drop the rounding: tests/test_float16.py), so no replay, and the step loop scores the block."""
    n, h = 16, helper.make_node
    r = np.random.default_rng(0)
    m = model([h("MatMul", ["x", "W"], ["a"]), h("Tanh", ["a"], ["x_next"]),
               h("Cast", ["x_next"], ["y16"], to=TensorProto.BFLOAT16)],
              [init("W", (r.standard_normal((n, n)) * 0.5).astype(np.float32))],
              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
              [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [1, n]),
               helper.make_tensor_value_info("y16", TensorProto.BFLOAT16, [1, n])])
    spec = {"horizon": 4, "feedback": {"x_next": "x"}, "trajectory": ["y16"], "initial": {"x": "x0"}}
    paths = save_case(tmp_path, m, spec, {"x0": r.standard_normal((2, 1, n)).astype(np.float32)})
    setup, _ = setup_for(paths)
    assert setup.replay is None and "bfloat16 trajectory" in setup.replay_note
    doc = sweep_doc(paths)
    assert doc["blocks"][0]["quant"]["divergence"] > 0


def test_a_replay_that_disagrees_with_the_step_loop_is_dropped(tmp_path, monkeypatch):
    """prepare() runs one probe through both engines; a replay whose figures differ (here: every
    divergence doubled, as a CUDA-graph fault might) is not used, and the sweep says why. A replay
    that fails at a later probe hands the work to the step loop too."""
    import tqs_onnx.replay as replay_module
    from tqs_onnx.sweep import divergence

    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    honest = replay_module.Replay.divergence
    monkeypatch.setattr(replay_module.Replay, "divergence", lambda self, replaced: honest(self, replaced) * 2)
    setup, _ = setup_for(paths)
    assert setup.replay is None and "disagrees with the step loop" in setup.replay_note
    monkeypatch.setattr(replay_module.Replay, "divergence", honest)
    setup, _ = setup_for(paths)
    assert setup.replay is not None
    probe = {n: setup.ops.quant_probe(setup.bound[n], 4) for n in setup.blocks[0].weights}

    def fails(self, replaced):
        raise TqsError("replay fails at step 3 of context 0: simulated")

    monkeypatch.setattr(replay_module.Replay, "divergence", fails)
    replayed = divergence(setup, probe)
    assert setup.replay is None and "simulated" in setup.replay_note
    assert np.array_equal(replayed, divergence(setup, probe)) and np.all(replayed > 0)


def test_capture_warm_up_runs_do_not_change_the_scores(tmp_path, monkeypatch):
    """With CUDA graphs, ORT's first run of each graph id runs the same binding several times (plain
    runs, then capture and replay). That is harmless only because a binding never writes what it reads.
    Simulated on the CPU: each binding's first run is repeated twice more; every block's probe must
    still give the step loop's divergences to the bit."""
    import tqs_onnx.replay as replay_module
    from tqs_onnx.sweep import divergence

    run, seen = replay_module.Replay._run, set()

    def first_run_three_times(self, parity, s, t):
        if (id(self), parity) not in seen:
            seen.add((id(self), parity))
            for _ in range(2):
                self.session.run_with_iobinding(self.bindings[parity], None)
        run(self, parity, s, t)

    monkeypatch.setattr(replay_module.Replay, "_run", first_run_three_times)
    setup, _ = setup_for(forced_case(tmp_path, horizon=3))
    assert setup.replay is not None and len(seen) == 2, setup.replay_note
    for block in setup.blocks:
        probe = {n: setup.ops.quant_probe(setup.bound[n], 4) for n in block.weights}
        replay, replayed = setup.replay, divergence(setup, probe)
        setup.replay = None
        assert np.array_equal(replayed, divergence(setup, probe)) and np.all(replayed > 0)
        setup.replay = replay


def test_every_engine_setting_rejects_unknown_values(monkeypatch):
    """The README's settings table promises a one-line error for any value not listed."""
    from tqs_onnx.replay import replay_mode
    from tqs_onnx.runtime import make_session

    for name, call in [("TQS_REPLAY", lambda: replay_mode(CPU)), ("TQS_CUDA_GRAPH", lambda: replay_mode(Device("cuda"))),
                       ("TQS_DETERMINISTIC", lambda: make_session(b"", CPU))]:
        monkeypatch.setenv(name, "sometimes")
        with pytest.raises(TqsError, match=f"{name}=sometimes"):
            call()
        monkeypatch.delenv(name)
