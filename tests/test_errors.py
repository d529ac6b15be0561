"""Bad input gets one clear line naming the problem, exit code 2, and nothing written."""

import json
import os

import numpy as np
import onnx
import pytest

from tiny import recurrent_contexts, recurrent_mlp, recurrent_spec, save_case
from tqs_onnx.cli import main


@pytest.fixture
def case(tmp_path):
    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    scores = tmp_path / "s.json"
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "-o", str(scores), "--probes", "1", "--min-size", "16", "--quiet", "--tiers", "int8,int4"]) == 0
    return {**paths, "scores": scores, "dir": tmp_path}


def one_line_error(capsys, argv, *needles):
    before = set(os.listdir(argv_dir(argv)))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    assert set(os.listdir(argv_dir(argv))) == before  # nothing written
    return err


def argv_dir(argv):
    return next(os.path.dirname(a) for a in argv if os.path.isabs(a))


def sweep_argv(case, **over):
    p = {**case, **over}
    return ["sweep", str(p["model"]), "--rollout", str(p["spec"]), "--contexts", str(p["contexts"]),
            "-o", str(case["dir"] / "out.json"), "--quiet", "--min-size", "16"]


def test_missing_model_file(case, capsys):
    one_line_error(capsys, ["inspect", str(case["dir"] / "nope.onnx")], "nope.onnx", "no such file")


def test_non_onnx_bytes(case, capsys):
    bad = case["dir"] / "bad.onnx"
    bad.write_bytes(b"\x00\xffnot a model" * 10)
    one_line_error(capsys, ["inspect", str(bad)], "bad.onnx", "ONNX")


def test_spec_naming_a_missing_output(case, capsys):
    spec = case["dir"] / "bad.rollout.json"
    spec.write_text(json.dumps({**recurrent_spec(), "feedback": {"nope": "x"}}))
    one_line_error(capsys, sweep_argv(case, spec=spec), "output 'nope'")


def test_contexts_of_the_wrong_shape(case, capsys):
    ctx = case["dir"] / "bad.npz"
    np.savez(ctx, x0=np.zeros((3, 1, 5), np.float32))
    one_line_error(capsys, sweep_argv(case, contexts=ctx), "x0", "shape")


def test_infeasible_compression(case, capsys):
    one_line_error(capsys, ["allocate", str(case["scores"]), "--compression", "1000", "-o",
                            str(case["dir"] / "p.json")], "not reachable", "achievable")


def test_early_horizon_without_early_stop_is_refused(case, capsys):
    one_line_error(capsys, [*sweep_argv(case), "--early-horizon"], "--early-stop")


def test_a_negative_rollout_cap_is_refused(case, capsys):
    one_line_error(capsys, ["allocate", str(case["scores"]), "--compression", "2", "--max-rollouts", "-1", "-o",
                            str(case["dir"] / "p.json")], "--max-rollouts")


def test_an_unmeasured_tier_is_named_before_an_unreachable_target(case, capsys):
    """fp16 was not swept: that is the reason, not the budget fp16 cannot reach (a new user's trial)."""
    one_line_error(capsys, ["allocate", str(case["scores"]), "--compression", "2", "--tiers", "fp32,fp16", "-o",
                            str(case["dir"] / "p.json")], "lack the measured damage of tier fp16")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs a folder no one can create files in")
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(case, capsys):
    assert main(["allocate", str(case["scores"]), "--compression", "2", "-o", "/proc/plan.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write in '/proc'" in err and len(err.splitlines()) == 1 and "plan:" not in err


def test_plan_for_another_model(case, capsys):
    assert main(["allocate", str(case["scores"]), "--compression", "2", "-o", str(case["dir"] / "p.json"),
                 "--quiet"]) == 0
    other = case["dir"] / "other"
    other.mkdir()
    save_case(other, recurrent_mlp(n=8, h=8, seed=5), recurrent_spec(), recurrent_contexts(n=8))
    one_line_error(capsys, ["apply", str(other / "m.onnx"), str(case["dir"] / "p.json"), "-o",
                            str(other / "q.onnx")], "another model")


def test_external_data_escaping_the_model_folder(case, capsys, tmp_path):
    m = onnx.load(case["model"])
    for t in m.graph.initializer:
        if t.name == "W1":
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value="../../etc/passwd")
    evil = case["dir"] / "evil.onnx"
    onnx.save(m, evil)
    one_line_error(capsys, ["inspect", str(evil)], "outside the model folder")


def test_unreadable_scores_and_plan(case, capsys):
    junk = case["dir"] / "junk.json"
    junk.write_text("{not json")
    one_line_error(capsys, ["allocate", str(junk), "--compression", "2", "-o", str(case["dir"] / "p.json")],
                   "junk.json")
    one_line_error(capsys, ["apply", str(case["model"]), str(junk), "-o", str(case["dir"] / "q.onnx")], "junk.json")


def test_cuda_provider_settings_from_the_environment(monkeypatch):
    from tqs_onnx.errors import TqsError
    from tqs_onnx.runtime import cuda_options

    monkeypatch.delenv("TQS_TF32", raising=False)
    monkeypatch.delenv("TQS_CUDNN_ALGO_SEARCH", raising=False)
    assert cuda_options() == {"use_tf32": "0"}  # full float32: TF32 noise swamps the probes
    monkeypatch.setenv("TQS_TF32", "0")
    monkeypatch.setenv("TQS_CUDNN_ALGO_SEARCH", "heuristic")
    assert cuda_options() == {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    monkeypatch.setenv("TQS_TF32", "yes")
    with pytest.raises(TqsError, match="TQS_TF32"):
        cuda_options()


def _edit(doc, how):
    b0 = doc["blocks"][0]
    if how == "block removed":
        doc["blocks"] = doc["blocks"][1:]
    elif how == "block twice":
        doc["blocks"].append(dict(b0))
    elif how == "NaN gamma":
        b0["quant"]["gamma_task"] = float("nan")
    elif how == "damage a list":
        b0["damage"] = [1.0]
    elif how == "damage a string":
        b0["damage"] = {"int8": "small"}
    elif how == "no name":
        del b0["name"]
    elif how == "shape of strings":
        next(iter(doc["weights"].values()))["shape"] = ["4", "4"]
    elif how == "axis outside the shape":
        next(iter(doc["weights"].values()))["channel_axis"] = 7
    elif how == "opset delta a string":
        doc["model"]["opset_graph_delta"] = {"21": "many"}
    return doc


@pytest.mark.parametrize("how", ["block removed", "block twice", "NaN gamma", "damage a list", "damage a string",
                                 "no name", "shape of strings", "axis outside the shape", "opset delta a string"])
def test_a_hand_edited_scores_file_is_one_line(case, capsys, how):
    """The allocator checks every field it reads: a scores file with a block removed would otherwise plan a
    size the written file cannot have; other edits would end in tracebacks."""
    edited = case["dir"] / "edited.json"
    edited.write_text(json.dumps(_edit(json.loads(case["scores"].read_text()), how)))
    for objective in ("measured", "paper"):
        one_line_error(capsys, ["allocate", str(edited), "--compression", "2", "--objective", objective,
                                "-o", str(case["dir"] / "p.json")], "malformed scores file")


def test_a_hand_written_plan_may_not_rewrite_an_overridable_input(case, capsys):
    """An initializer that is also a graph input is part of the model's interface: rewriting it would drop it."""
    m = recurrent_mlp()
    m.graph.input.append(onnx.helper.make_tensor_value_info("W1", onnx.TensorProto.FLOAT,
                                                            list(next(i for i in m.graph.initializer if i.name == "W1").dims)))
    path = case["dir"] / "ov.onnx"
    onnx.save(m, path)
    plan = case["dir"] / "ov.json"
    plan.write_text(json.dumps({"kind": "tqs-plan", "model": {}, "weights": {"W1": "int8"}}))
    one_line_error(capsys, ["apply", str(path), str(plan), "-o", str(case["dir"] / "o.onnx")],
                   "W1", "cannot be rewritten", "overridable")


def test_a_model_with_two_initializers_of_one_name_is_refused(case, capsys):
    m = recurrent_mlp()
    m.graph.initializer.append(next(i for i in m.graph.initializer if i.name == "W1"))
    path = case["dir"] / "dup.onnx"
    onnx.save(m, path)
    one_line_error(capsys, ["inspect", str(path)], "dup.onnx", "two initializers are named 'W1'")


def test_a_report_input_of_the_right_kind_but_no_content_is_one_line(case, capsys):
    frontier = case["dir"] / "f.json"
    frontier.write_text(json.dumps({"kind": "tqs-frontier"}))
    one_line_error(capsys, ["report", str(case["scores"]), "--frontier", str(frontier), "-o",
                            str(case["dir"] / "rep")], "f.json", "lacks points")


def test_codes_that_are_not_integers_are_refused():
    from tqs_onnx.errors import TqsError
    from tqs_onnx.quant import quantize
    from tqs_onnx.tiers import parse_tier

    w = np.ones((2, 2), np.float32)
    with pytest.raises(TqsError, match="must be integers"):
        quantize(w, parse_tier("int4/channel"), 0, None, np.full((2, 2), np.nan))
    with pytest.raises(TqsError, match="at most 7"):
        quantize(w, parse_tier("int4/channel"), 0, None, np.full((2, 2), 65536, np.int64))


def test_an_input_of_unknown_rank_is_fed_the_contexts_arrays(tmp_path):
    """ORT reports an input of unknown rank as () like a scalar: the rollout still feeds it the contexts'
    arrays (a real scalar fed another shape fails in ORT's first run, as a one-line error)."""
    m = recurrent_mlp()
    for v in (*m.graph.input, *m.graph.output):
        v.type.tensor_type.ClearField("shape")
    paths = save_case(tmp_path, m, recurrent_spec(), recurrent_contexts())
    assert main(["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
                 "-o", str(tmp_path / "s.json"), "--probes", "1", "--min-size", "16", "--quiet", "--tiers", "int8"]) == 0


def test_a_horizon_whose_trajectories_cannot_be_held_is_refused_before_rolling_out(case, capsys):
    spec = case["dir"] / "long.rollout.json"
    spec.write_text(json.dumps({**recurrent_spec(), "horizon": 10 ** 12}))
    one_line_error(capsys, sweep_argv(case, spec=spec), "more than this machine's memory allows", "a shorter horizon")
    # given on the command line, the horizon is the one checked
    one_line_error(capsys, [*sweep_argv(case), "--horizon", str(10 ** 12)], "over 1000000000000 steps",
                   "more than this machine's memory allows")


def test_a_truth_array_holding_nan_is_refused_not_averaged(case, capsys):
    data = dict(np.load(case["contexts"]))
    spec = json.loads(case["spec"].read_text())
    out = next(iter(spec["feedback"]))
    steps = spec["horizon"]
    x0 = data[spec["initial"][spec["feedback"][out]]] if spec.get("initial") else next(iter(data.values()))
    truth = np.zeros((x0.shape[0], steps, *x0.shape[1:]), np.float32)
    truth[0, 0] = np.nan
    ctx = case["dir"] / "truth.npz"
    np.savez(ctx, **data, truth=truth)
    spec_path = case["dir"] / "truth.rollout.json"
    spec_path.write_text(json.dumps({**spec, "truth": {out: "truth"}}))
    one_line_error(capsys, ["eval", str(case["model"]), str(case["model"]), "--rollout", str(spec_path),
                            "--contexts", str(ctx)], "truth array 'truth' holds NaN")


def test_targets_below_the_original_size_are_refused_and_one_point_is_allowed(case, capsys):
    from tqs_onnx.errors import TqsError
    from tqs_onnx.pareto import FrontierConfig, parse_targets

    one_line_error(capsys, ["allocate", str(case["scores"]), "--compression", "0.5", "-o",
                            str(case["dir"] / "p.json")], ">= 1")
    with pytest.raises(TqsError, match="1 <= LOW"):
        parse_targets("0.5:4")
    assert FrontierConfig(targets=(4.0, 4.0), points=1).points == 1  # one target, one point
    with pytest.raises(TqsError, match="--points"):
        FrontierConfig(targets=(2.0, 4.0), points=1)


def test_a_model_the_tiers_cannot_shrink_is_said_so_in_one_line():
    from tqs_onnx.errors import TqsError
    from tqs_onnx.pareto import target_grid

    with pytest.raises(TqsError, match="cannot make this model smaller"):
        target_grid((1.0, 1.0), 1, (0.9, 0.99999))
    assert target_grid((2.0, 4.0), 3, (1.0, 8.0))[0] == [2.0, 2.82843, 4.0]


def test_an_existing_output_folder_is_probed_inside(tmp_path, monkeypatch):
    """A report folder may be writable where its parent is not: the write check goes inside it."""
    import tempfile

    from tqs_onnx.util import check_output_target

    out = tmp_path / "artifacts"
    out.mkdir()
    seen = []
    real = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: (seen.append(kw["dir"]), real(**kw))[1])
    check_output_target(out)
    check_output_target(out / "new" / "plan.json")
    assert seen == [out, out] and sorted(p.name for p in out.iterdir()) == []


def test_an_already_quantized_model_is_named_so(tmp_path, capsys):
    """A vendor's int8 model: its weights behind DequantizeLinear are listed by inspect and named in the
    sweep's refusal (it said only 'no quantizable weights', listing the scales; a new user's trial)."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(0)
    q = numpy_helper.from_array(r.integers(-127, 128, (16, 32)).astype(np.int8), "Wq")
    s = numpy_helper.from_array(np.full(32, 0.01, np.float32), "Ws")
    m = helper.make_model(helper.make_graph(
        [helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], axis=1),
         helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["b"]),
         helper.make_node("ReduceMean", ["b"], ["c"], axes=[1], keepdims=1),
         helper.make_node("Add", ["x", "c"], ["x_next"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [1, 16])], [q, s]),
        opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    paths = save_case(tmp_path, m, recurrent_spec(), recurrent_contexts(16))
    assert main(["inspect", str(paths["model"])]) == 0
    assert "already quantized: 1 integer or float8 tensor(s) behind DequantizeLinear, 512 parameters" in capsys.readouterr().out
    err = one_line_error(capsys, ["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts",
                                  str(paths["contexts"]), "-o", str(tmp_path / "s.json")], "already quantized")
    assert "512 parameters" in err


def test_integer_contexts_beyond_the_inputs_type_are_refused(tmp_path, capsys):
    """int64 data fed to an int32 input was cast without a word, wrapping 2**31 to a negative index."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32) * 0.2
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Cast", ["k"], ["kf"], to=1),
             helper.make_node("Mul", ["a", "kf"], ["b"]), helper.make_node("Tanh", ["b"], ["x_next"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
                                       helper.make_tensor_value_info("k", TensorProto.INT32, [1])],
                          [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [1, 16])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ctx = {**recurrent_contexts(), "k": np.ones((3, 1), np.int64)}
    spec = {**recurrent_spec(), "fixed": {"k": "k"}}
    paths = save_case(tmp_path, m, spec, ctx)
    argv = ["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts", str(paths["contexts"]),
            "-o", str(tmp_path / "s.json"), "--probes", "1", "--min-size", "16", "--quiet", "--tiers", "int8"]
    assert main(argv) == 0  # int64 values that fit int32 are fed as int32
    os.remove(tmp_path / "s.json")
    ctx["k"][2, 0] = 2 ** 31
    np.savez(paths["contexts"], **ctx)
    one_line_error(capsys, argv, "'k'", "2147483648", "int32")


def test_a_reader_that_leaves_the_pipe_gets_no_error_line(monkeypatch, capsys):
    """`tqs-onnx inspect M | head -3` printed 'error: Broken pipe' and exited 2, the bad-input code."""
    import sys

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["inspect", "models/lorenz96_mlp.onnx"]) == 141
    assert "error" not in capsys.readouterr().err


def test_a_joint_check_on_other_contexts_than_the_sweeps_says_so(case, tmp_path):
    """Without /gptq tiers other contexts are allowed (with them: refused), but the plan says the plans
    were compared on them."""
    other = tmp_path / "other.npz"
    np.savez(other, **recurrent_contexts(seed=9))
    base = ["allocate", str(case["scores"]), "--compression", "3", "--quiet", "--verify-model", str(case["model"]),
            "--rollout", str(case["spec"])]
    for ctx, said in ((case["contexts"], False), (other, True)):
        out = tmp_path / f"p{int(said)}.json"
        assert main([*base, "--contexts", str(ctx), "-o", str(out)]) == 0
        notes = json.loads(out.read_text())["notes"]
        assert any("other contexts or another spec than the sweep's" in n for n in notes) == said


def test_a_model_with_an_op_onnx_deprecates_is_refused_before_the_sweep(tmp_path, capsys):
    """GroupNormalization-18 (deprecated): sweep and allocate ran, then apply could write no model onnx.checker
    accepts, and the opset converter broke the op (a user's UNet). Refused up front; inspect warns."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["c", "s", "b"], ["g"], num_groups=2),
             helper.make_node("Tanh", ["g"], ["x_next"])]
    inits = [numpy_helper.from_array(r.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.2, "K"),
             numpy_helper.from_array(np.ones(2, np.float32), "s"), numpy_helper.from_array(np.zeros(2, np.float32), "b")]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("x", "x_next")]
    m = helper.make_model(helper.make_graph(nodes, "gn", vi[:1], vi[1:], inits),
                          opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    ctx = {"x0": r.standard_normal((2, 1, 4, 8, 8)).astype(np.float32)}
    paths = save_case(tmp_path, m, recurrent_spec(2), ctx)
    assert main(["inspect", str(paths["model"])]) == 0
    assert "warning: GroupNormalization-18 deprecated by onnx" in capsys.readouterr().out
    one_line_error(capsys, ["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts",
                            str(paths["contexts"]), "-o", str(tmp_path / "s.json"), "--min-size", "16", "--quiet"],
                   "GroupNormalization-18", "re-export")


def test_a_scalar_per_context_for_an_input_of_known_rank_is_refused_before_rolling_out(case, capsys):
    """A (S,) array for an input [1, 16] passed the shape check (a scalar fitted any shape) and ORT
    failed at step 1; a short per-step array's error says what it has."""
    bad = case["dir"] / "scalar.npz"
    np.savez(bad, x0=np.zeros(3, np.float32))
    one_line_error(capsys, sweep_argv(case, contexts=bad), "'x0' has per-context shape []", "needs [1, 16]")


def test_initializers_listed_as_inputs_are_named_as_the_reason_nothing_is_quantizable(tmp_path, capsys):
    m = recurrent_mlp()
    for name in ("W1", "W2"):
        w = next(i for i in m.graph.initializer if i.name == name)
        m.graph.input.append(onnx.helper.make_tensor_value_info(name, w.data_type, list(w.dims)))
    paths = save_case(tmp_path, m, recurrent_spec(), recurrent_contexts())
    one_line_error(capsys, ["sweep", str(paths["model"]), "--rollout", str(paths["spec"]), "--contexts",
                            str(paths["contexts"]), "-o", str(tmp_path / "s.json"), "--min-size", "16"],
                   "2 initializer(s) ('W1') are also listed as graph inputs", "remove_initializer_from_input")


def test_long_messages_are_cut_at_a_word_and_say_so():
    from tqs_onnx.util import first_line

    assert first_line(ValueError("The output OrtValue provided for output 'x'"), 30) == "The output OrtValue provided…"
    assert first_line(ValueError("short"), 30) == "short"


def test_the_contexts_memory_check_counts_the_horizon_used_and_the_compared_states(tmp_path, monkeypatch):
    """The early check (before loading) used the spec's horizon, not sweep --horizon, and counted states
    the rollout never keeps (a decoder's cache, not compared)."""
    from tqs_onnx import rollout
    from tqs_onnx.errors import TqsError
    from tqs_onnx.rollout import Contexts, RolloutSpec

    np.savez(tmp_path / "c.npz", x0=np.zeros((4, 1, 1024), np.float32), k0=np.zeros((4, 1, 4096), np.float32))
    monkeypatch.setattr(rollout, "_memory_bytes", lambda: 1_000_000)  # 600 KB allowed
    spec = RolloutSpec.from_dict({"horizon": 1000, "feedback": {"x_next": "x", "k_next": "k"}, "trajectory": ["x_next"],
                                  "initial": {"x": "x0", "k": "k0"}})
    with pytest.raises(TqsError, match="more than this machine's memory allows"):
        Contexts.load(tmp_path / "c.npz", spec)  # 16 KB x 1000 steps
    assert Contexts.load(tmp_path / "c.npz", spec, horizon=3).count == 4  # the cache's 64 KB a step not counted


def test_negative_axes_in_a_scores_file_plan_the_bytes_the_writer_writes(case):
    """A hand-edited -1 for the channel axis was accepted but sized as if no axis matched (the plan
    9 bytes over the file); axes are now counted as the writer writes them."""
    from tqs_onnx.allocate import allocate, load_scores, plan_document

    doc = json.loads(case["scores"].read_text())
    edited = json.loads(case["scores"].read_text())
    for w in edited["weights"].values():
        rank = len(w["shape"])
        for axis in ("channel_axis", "block_axis"):
            if w.get(axis) is not None:
                w[axis] -= rank
    path = case["dir"] / "neg.json"
    path.write_text(json.dumps(edited))
    plans = []
    for scores in (doc, load_scores(path)):
        p, alloc = allocate(scores, 2.0, "fp32,int8/channel,int4/block16", objective="paper")
        plans.append(plan_document(scores, p, alloc)["planned_bytes"])
    assert plans[0] == plans[1]
