"""The sweep engine: scores that mean what the method says, checkpoints, determinism."""

import json
import math

import numpy as np
import pytest

from tiny import growing_state_model, recurrent_contexts, recurrent_mlp, recurrent_spec, save_case
from tqs_onnx.graph import load_model
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import Device
from tqs_onnx.sweep import SweepConfig, run_sweep, score_divergence

CPU = Device("cpu")


def sweep(paths, **kw):
    spec = RolloutSpec.load(paths["spec"])
    ctx = Contexts.load(paths["contexts"], spec)
    config = SweepConfig(**{"probes": 2, "min_size": 16, "blocks": "tensor", **kw})
    return run_sweep(load_model(paths["model"]), spec, ctx, CPU, config, quiet=True)


def by_weight(doc):
    return {b["weights"][0]: b for b in doc["blocks"]}


def test_planted_insensitive_branch_is_flagged_dead(tmp_path):
    paths = save_case(tmp_path, recurrent_mlp(dead_branch=True), recurrent_spec(), recurrent_contexts())
    blocks = by_weight(sweep(paths))
    assert blocks["Wd"]["dead"] and blocks["Wd"]["quant"]["gamma_task"] == -math.inf
    assert not blocks["W1"]["dead"] and not blocks["W2"]["dead"]


def test_unreached_block_skips_its_other_probes_and_scores_as_the_full_sweep(tmp_path):
    """Quant probe and one Gaussian draw leave every output bit-identical: the other draws are skipped,
    the coarsest tier is rolled out once (it too changes nothing, so the other tiers are skipped), the
    scores equal those of the full sweep, and the passes saved are counted."""
    paths = save_case(tmp_path, recurrent_mlp(dead_branch=True), recurrent_spec(horizon=4), recurrent_contexts(s=2))
    kw = dict(probe="both", probes=4, tiers=["int8", "int4/channel"])
    fast, full = sweep(paths, **kw), sweep(paths, skip_unreached=False, **kw)
    b_fast, b_full = by_weight(fast), by_weight(full)
    assert b_fast["Wd"]["unreached"] and not b_full["Wd"]["unreached"]
    assert not any(b_fast[n]["unreached"] for n in ("W1", "W2"))
    strip = lambda b: {k: v for k, v in b.items() if k not in ("forward_passes", "unreached")}
    assert all(strip(b_fast[n]) == strip(b_full[n]) for n in b_full)
    assert b_full["Wd"]["damage"] == {"int8": 0.0, "int4/channel": 0.0}
    # full: 1 quant + 4 draws + 2 tiers; skipped: 1 quant + 1 draw + the coarsest tier, of 2 contexts x 4 steps
    assert b_full["Wd"]["forward_passes"] - b_fast["Wd"]["forward_passes"] == (3 + 1) * 2 * 4
    assert full["forward_passes"] - fast["forward_passes"] == (3 + 1) * 2 * 4


def test_a_probe_that_moves_the_outputs_keeps_every_draw(tmp_path):
    paths = save_case(tmp_path, recurrent_mlp(damp=1e-6), recurrent_spec(horizon=3), recurrent_contexts(s=2))
    doc = sweep(paths, probe="gauss", probes=3)
    assert not any(b["unreached"] for b in doc["blocks"])
    assert all(b["forward_passes"] == 3 * 2 * 3 for b in doc["blocks"])


def test_block_feeding_output_outranks_damped_block(tmp_path):
    paths = save_case(tmp_path, recurrent_mlp(damp=1e-3), recurrent_spec(), recurrent_contexts())
    blocks = by_weight(sweep(paths))
    for probe in ("quant", "gauss"):
        assert blocks["W2"][probe]["gamma_task"] > blocks["Wm"][probe]["gamma_task"]


def test_eq1_eq2_and_amax_from_one_rollout():
    # Divergence growing like e^{2 lambda t}: Eq. 2 at T recovers the rate of the cumulative norm.
    t = np.arange(1, 21)
    div = np.exp(2 * 0.3 * t)[None, :]
    s = score_divergence(div, 1.0)
    cum = np.cumsum(div[0])
    assert s.gamma_task_t[4] == pytest.approx(np.log(cum[4]) / 5)
    assert s.gamma_eq2_t[-1] == pytest.approx(np.log(np.sqrt(cum[-1])) / 20)
    assert s.a_max == pytest.approx(np.sqrt(cum[-1]))
    assert len(s.gamma_task_t) == 20 and not s.nonfinite


def test_eq2_and_amax_are_per_rollout_as_the_paper_defines_them():
    """Eq. 2 and A_max are single-context quantities: Eq. 2 is averaged over the rollouts that diverged
    by T, A_max is the largest of any rollout; Eq. 1 keeps the mean inside the log."""
    div = np.array([[0.0, 3.0, 1.0], [0.0, 0.0, 4.0]])
    s = score_divergence(div, 1.0)
    assert s.gamma_eq2_t[0] == -math.inf  # no rollout diverged by T=1
    assert s.gamma_eq2_t[1] == pytest.approx(np.log(np.sqrt(3.0)) / 2)  # only the first had, by T=2
    assert s.gamma_eq2_t[2] == pytest.approx((np.log(np.sqrt(4.0)) + np.log(2.0)) / 2 / 3)
    assert s.a_max == pytest.approx(2.0)
    assert s.gamma_task == pytest.approx(np.log(4.0) / 3)


def test_nonfinite_probe_is_recorded_not_raised():
    div = np.array([[1.0, np.inf, np.inf]])
    s = score_divergence(div, 1.0)
    assert s.nonfinite and s.gamma_task == math.inf


def test_same_seed_gives_identical_scores(tmp_path):
    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    a, b = sweep(paths, seed=3), sweep(paths, seed=3)
    strip = lambda d: json.dumps([{k: v for k, v in x.items() if k != "seconds"} for x in d["blocks"]])
    assert strip(a) == strip(b)
    assert strip(a) != strip(sweep(paths, seed=4))


def test_resume_after_interruption_gives_same_scores(tmp_path):
    from tqs_onnx.sweep import Checkpoint

    paths = save_case(tmp_path, recurrent_mlp(dead_branch=True), recurrent_spec(), recurrent_contexts())
    spec = RolloutSpec.load(paths["spec"])
    ctx = Contexts.load(paths["contexts"], spec)
    config = SweepConfig(probes=2, min_size=16, blocks="tensor", tiers=["int8", "int4"])
    model = load_model(paths["model"])
    full = run_sweep(model, spec, ctx, CPU, config, quiet=True)
    ckpt = tmp_path / "ck.jsonl"
    run_sweep(model, spec, ctx, CPU, config, ckpt, quiet=True)
    lines = ckpt.read_text().splitlines()
    # Keep the header and the first block, then half a line: as if killed while writing block 2.
    ckpt.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    with pytest.raises(Exception, match="--resume"):
        run_sweep(model, spec, ctx, CPU, config, ckpt, quiet=True)
    resumed = run_sweep(model, spec, ctx, CPU, config, ckpt, resume=True, quiet=True)
    strip = lambda d: [{k: v for k, v in x.items() if k not in ("seconds", "forward_passes")} for x in d["blocks"]]
    assert strip(resumed) == strip(full)
    assert len(Checkpoint(ckpt, "x").path.read_text().splitlines()) == 1 + len(full["blocks"])


def _swept_with_checkpoint(tmp_path, blocks="tensor"):
    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    spec = RolloutSpec.load(paths["spec"])
    ctx = Contexts.load(paths["contexts"], spec)
    config = SweepConfig(probes=2, min_size=16, blocks=blocks, tiers=["int8"])
    model = load_model(paths["model"])
    ckpt = tmp_path / "ck.jsonl"
    full = run_sweep(model, spec, ctx, CPU, config, ckpt, quiet=True)
    return (model, spec, ctx, config, ckpt), full


def test_resume_rescores_rows_that_are_not_block_scores(tmp_path):
    """Rows edited or damaged by hand (not a dict, no id, an unknown field) are scored again, no traceback."""
    (model, spec, ctx, config, ckpt), full = _swept_with_checkpoint(tmp_path)
    head, *rows = ckpt.read_text().splitlines()
    extra = json.loads(rows[0])
    extra["surprise"] = 1
    no_id = json.loads(rows[1])
    del no_id["id"]
    for damaged in ([json.dumps(extra), *rows[1:]], [rows[0], json.dumps(no_id), *rows[2:]],
                    [rows[0], "[1, 2]", *rows[2:]]):
        ckpt.write_text("\n".join([head, *damaged]) + "\n")
        resumed = run_sweep(model, spec, ctx, CPU, config, ckpt, resume=True, quiet=True)
        strip = lambda d: [{k: v for k, v in x.items() if k not in ("seconds", "forward_passes")} for x in d["blocks"]]
        assert strip(resumed) == strip(full)


def test_an_empty_checkpoint_is_called_damaged_and_another_devices_refused(tmp_path):
    from tqs_onnx.errors import TqsError

    (model, spec, ctx, config, ckpt), _ = _swept_with_checkpoint(tmp_path)
    # The fingerprint names the device: a CPU run's rows are not resumed on CUDA (refused before set-up).
    with pytest.raises(TqsError, match="belongs to another run"):
        run_sweep(model, spec, ctx, Device("cuda"), config, ckpt, resume=True, quiet=True)
    for text in ("", '{"fingerp'):
        ckpt.write_text(text)
        with pytest.raises(TqsError, match="empty or damaged"):
            run_sweep(model, spec, ctx, CPU, config, ckpt, resume=True, quiet=True)


def test_a_changed_external_data_file_makes_another_model(tmp_path):
    """A model's identity (scores, plans, checkpoints) covers its external data, not only the .onnx file."""
    import onnx
    from tqs_onnx.graph import file_digest

    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    alone = load_model(paths["model"])
    assert alone.sha256 == file_digest(paths["model"])
    m = onnx.load(str(paths["model"]))
    ext = tmp_path / "ext.onnx"
    onnx.save_model(m, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
                    size_threshold=0)
    before, onnx_file = load_model(ext).sha256, file_digest(ext)
    data = (tmp_path / "ext.data").read_bytes()
    (tmp_path / "ext.data").write_bytes(data[:-4] + bytes(4))
    after = load_model(ext).sha256
    assert before != after and file_digest(ext) == onnx_file  # the .onnx file alone did not change


def test_documents_from_before_the_identity_covered_external_data_still_name_their_model(tmp_path):
    """Scores and plans written before (no `identity` field) recorded the .onnx file's own digest."""
    import onnx
    from tqs_onnx.graph import IDENTITY, same_model

    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    ext = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(str(paths["model"])), str(ext), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    loaded = load_model(ext)
    assert loaded.sha256 != loaded.file_sha256
    assert same_model({"sha256": loaded.sha256, "identity": IDENTITY}, loaded)
    assert same_model({"sha256": loaded.file_sha256}, loaded)  # an older document
    assert not same_model({"sha256": loaded.file_sha256, "identity": IDENTITY}, loaded)
    alone = load_model(paths["model"])
    assert not same_model({"sha256": loaded.file_sha256}, alone)


def test_resume_rescores_a_block_whose_weights_were_ordered_otherwise(tmp_path):
    """A checkpoint row from an older grouping (its weights in another order, so other Gaussian draws)
    is not reused: that block is scored again."""
    (model, spec, ctx, config, ckpt), full = _swept_with_checkpoint(tmp_path, blocks="fixed:2")
    lines = ckpt.read_text().splitlines()
    rows = [json.loads(x) for x in lines[1:]]
    multi = next(r for r in rows if len(r["weights"]) > 1)
    multi["weights"] = multi["weights"][::-1]
    multi["quant"]["gamma_task"] = 123.0
    ckpt.write_text("\n".join([lines[0], *(json.dumps(r) for r in rows)]) + "\n")
    resumed = run_sweep(model, spec, ctx, CPU, config, ckpt, resume=True, quiet=True)
    strip = lambda d: [{k: v for k, v in x.items() if k not in ("seconds", "forward_passes")} for x in d["blocks"]]
    assert strip(resumed) == strip(full)


def test_one_session_and_forward_pass_count(tmp_path):
    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(horizon=5), recurrent_contexts(s=2))
    doc = sweep(paths, probe="both", probes=3, tiers=["int8"])
    blocks = len(doc["blocks"])
    # nominal + per block (1 quant + 3 gauss + 1 tier) rollouts of 2 contexts x 5 steps
    assert doc["forward_passes"] == 2 * 5 * (1 + blocks * 5)


def test_early_stop_draws_fewer_gaussian_probes_and_keeps_the_ranking(tmp_path):
    from scipy.stats import spearmanr

    paths = save_case(tmp_path, recurrent_mlp(damp=1e-2), recurrent_spec(horizon=6), recurrent_contexts())
    full = sweep(paths, probe="gauss", probes=12)
    early = sweep(paths, probe="gauss", probes=12, early_stop=0.05)
    assert early["forward_passes"] < full["forward_passes"]
    g = lambda d: [b["gauss"]["gamma_task"] for b in d["blocks"]]
    assert spearmanr(g(full), g(early)).statistic == pytest.approx(1.0)
    for a, b in zip(g(full), g(early)):
        assert b == pytest.approx(a, abs=0.05)  # the rule: tol * max(1, |gamma|)


def test_converged_is_the_sliding_window_rule():
    from tqs_onnx.sweep import converged

    assert not converged(np.array([1.0, 1.0]), 0.01, 3)  # too few values
    assert converged(np.array([5.0, 1.0, 1.001, 0.999, 1.0]), 0.01, 3)
    assert not converged(np.array([1.0, 1.2, 1.0, 1.0]), 0.01, 3)
    assert not converged(np.array([1.0, np.inf, 1.0, 1.0]), 0.01, 3)


def _tensor_blocks_case(tmp_path):
    """The recurrent MLP with every tensor its own block, two measured tiers: (loaded, spec, contexts,
    config, tiers)."""
    from tqs_onnx.tiers import parse_tier

    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    spec = RolloutSpec.load(paths["spec"])
    ctx = Contexts.load(paths["contexts"], spec)
    config = SweepConfig(probe="both", probes=3, min_size=16, blocks="tensor", tiers=["int4/channel", "int1"])
    return load_model(paths["model"]), spec, ctx, config, [parse_tier(t) for t in config.tiers]


def test_steps_queued_without_waiting_give_the_same_scores(tmp_path, monkeypatch):
    """The GPU path queues a rollout's steps and divergences and waits once per rollout; forced on the
    CPU provider (where it changes nothing on the device) it must score exactly as the waiting path.
    Queued steps measure divergences with the separate graph, so the waiting path does too here."""
    from tqs_onnx.sweep import prepare, score_block

    monkeypatch.setenv("TQS_DIVERGENCE", "graph")
    loaded, spec, ctx, config, tiers = _tensor_blocks_case(tmp_path)
    setup = prepare(loaded, spec, ctx, Device("cpu"), config)
    assert not setup.rollout.async_steps  # only on CUDA by default
    waited = [score_block(setup, b, config, tiers) for b in setup.blocks]
    setup.rollout.async_steps = True
    queued = [score_block(setup, b, config, tiers) for b in setup.blocks]
    assert not setup.rollout._pending
    for a, b in zip(waited, queued):
        assert a.quant == b.quant and a.gauss == b.gauss and a.damage == b.damage
        assert a.forward_passes == b.forward_passes


def test_divergence_measured_by_the_model_run_equals_the_separate_graph(tmp_path, monkeypatch):
    """TQS_DIVERGENCE=model (default) adds the squared divergence to the model's own run; the scores
    must match the separate divergence graph (float64 on the CPU provider) to float32 rounding, with
    one forward pass per step and the trajectory outputs unchanged."""
    from tqs_onnx.sweep import prepare, score_block

    loaded, spec, ctx, config, tiers = _tensor_blocks_case(tmp_path)
    runs = {}
    for mode in ("model", "graph"):
        monkeypatch.setenv("TQS_DIVERGENCE", mode)
        setup = prepare(loaded, spec, ctx, Device("cpu"), config)
        assert bool(setup.rollout.divergence) == (mode == "model")
        runs[mode] = ([score_block(setup, b, config, tiers) for b in setup.blocks],
                      [[{k: v.numpy() for k, v in step.items()} for step in traj] for traj in setup.nominal])
    (m_scores, m_nominal), (g_scores, g_nominal) = runs["model"], runs["graph"]
    for traj_m, traj_g in zip(m_nominal, g_nominal):
        for a, b in zip(traj_m, traj_g):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(m_scores, g_scores):
        assert a.forward_passes == b.forward_passes
        assert a.quant.divergence == pytest.approx(b.quant.divergence, rel=1e-5)
        assert a.gauss.gamma_task_t == pytest.approx(b.gauss.gamma_task_t, rel=1e-5, abs=1e-6)
        assert a.damage == pytest.approx(b.damage, rel=1e-5)
        assert a.quant.divergence > 0 and a.damage["int1"] > a.damage["int4/channel"] > 0


def test_unknown_engine_settings_are_one_line_errors(monkeypatch):
    """TQS_DIVERGENCE, TQS_GPU_STREAM and TQS_REUSE_OUTPUTS take a fixed set of values; anything else is a TqsError naming
    the variable, not a traceback deep in the sweep."""
    from tqs_onnx.errors import TqsError
    from tqs_onnx.sweep import divergence_mode, gpu_stream_mode

    monkeypatch.setenv("TQS_DIVERGENCE", "Graph ")
    assert divergence_mode() == "graph"
    monkeypatch.setenv("TQS_DIVERGENCE", "host")
    with pytest.raises(TqsError, match="TQS_DIVERGENCE=host"):
        divergence_mode()
    monkeypatch.setenv("TQS_GPU_STREAM", "many")
    with pytest.raises(TqsError, match="TQS_GPU_STREAM=many"):
        gpu_stream_mode()
    from tqs_onnx.rollout import reuse_outputs

    monkeypatch.setenv("TQS_REUSE_OUTPUTS", " OFF")
    assert reuse_outputs() is False
    monkeypatch.setenv("TQS_REUSE_OUTPUTS", "sometimes")
    with pytest.raises(TqsError, match="TQS_REUSE_OUTPUTS=sometimes"):
        reuse_outputs()


def test_auto_blocks_split_a_single_layer_into_its_tensors():
    """`auto` grouping: layer blocks, but a model whose weights form one layer (one LSTM op: W and R;
    its bias B is a vector, kept) gets a block per tensor, so the knapsack has something to choose; two
    layers stay two blocks."""
    from onnx import TensorProto, helper

    from tiny import init, model
    from tqs_onnx.graph import make_blocks, weight_table

    r = np.random.default_rng(2)
    h, i = 8, 16
    lstm = model([helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=h)],
                 [init("W", r.standard_normal((1, 4 * h, i)).astype(np.float32)),
                  init("R", r.standard_normal((1, 4 * h, h)).astype(np.float32)),
                  init("B", r.standard_normal((1, 8 * h)).astype(np.float32))],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1, i])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1, 1, h])])
    ws = weight_table(lstm, min_size=32)
    assert len(make_blocks(ws, "layer")) == 1
    assert sorted(len(b.weights) for b in make_blocks(ws, "auto")) == [1, 1]
    assert not next(w for w in ws if w.name == "B").quantizable
    mlp = model([helper.make_node("MatMul", ["x", "A"], ["a"]), helper.make_node("MatMul", ["a", "C"], ["y"])],
                [init("A", r.standard_normal((i, i)).astype(np.float32)),
                 init("C", r.standard_normal((i, i)).astype(np.float32))],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, i])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, i])])
    ws = weight_table(mlp, min_size=32)
    assert [b.weights for b in make_blocks(ws, "auto")] == [b.weights for b in make_blocks(ws, "layer")]
    assert len(make_blocks(ws, "auto")) == 2


def test_block_weight_order_does_not_depend_on_string_hashing(tmp_path):
    """Each tensor of a block draws its own Gaussian (by its position in the block), so the order must
    be the same in every process: it used to follow a set's iteration order, and silero v6's LSTM
    block scored differently from one run to the next."""
    import os
    import subprocess
    import sys

    import onnx
    from onnx import TensorProto, helper

    from tiny import init, model

    r = np.random.default_rng(2)
    h, i = 8, 16
    names = ["W_ih", "R_hh", "B_all"]
    lstm = model([helper.make_node("LSTM", ["x", *names], ["y"], hidden_size=h)],
                 [init(names[0], r.standard_normal((1, 4 * h, i)).astype(np.float32)),
                  init(names[1], r.standard_normal((1, 4 * h, h)).astype(np.float32)),
                  init(names[2], r.standard_normal((1, 8 * h)).astype(np.float32))],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1, i])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1, 1, h])])
    onnx.save(lstm, tmp_path / "lstm.onnx")
    code = ("import sys, onnx; from tqs_onnx.graph import weight_table, make_blocks; "
            "print([b.weights for b in make_blocks(weight_table(onnx.load(sys.argv[1]), min_size=32), 'layer')])")
    seen = {subprocess.run([sys.executable, "-c", code, str(tmp_path / "lstm.onnx")], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
            for seed in range(6)}
    assert seen == {str([sorted(names[:2])])}  # B_all is a vector, kept at full precision


@pytest.mark.parametrize("growing", [False, True])
def test_output_buffers_reused_across_steps_give_the_same_scores(tmp_path, monkeypatch, growing):
    """TQS_REUSE_OUTPUTS=on (default) writes each step into buffers allocated at step 1; the scores
    must equal those of outputs allocated per run, also when the fed-back state grows every step
    (the buffers no longer fit: the rollout falls back to allocating per run)."""
    if growing:  # the fed-back state y is one element longer at every step
        m = growing_state_model()
        spec = {"feedback": {"y": "x"}, "trajectory": ["y"], "initial": {"x": "x0"}, "horizon": 5}
        paths = save_case(tmp_path, m, spec, {"x0": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)})
    else:
        paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(), recurrent_contexts())
    docs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("TQS_REUSE_OUTPUTS", mode)
        docs[mode] = sweep(paths, tiers=["int8", "int4/channel"])
    assert docs["on"]["blocks"] == docs["off"]["blocks"] and docs["on"]["forward_passes"] == docs["off"]["forward_passes"]
    assert any(b["quant"]["divergence"] > 0 for b in docs["on"]["blocks"])


def test_flop_floor_counts_the_multiply_adds_of_matmul_and_conv(tmp_path):
    """tools/flop_floor.py: (5x3)(3x4) is 60 multiply-adds, a 3x3 Conv 2->4 channels on 6x6 is 64 x 18."""
    import subprocess
    import sys
    from pathlib import Path
    import onnx
    from onnx import TensorProto, helper
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"]), helper.make_node("Conv", ["x", "w"], ["z"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [5, 3]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [helper.make_tensor("b", TensorProto.FLOAT, [3, 4], [0.0] * 12),
         helper.make_tensor("w", TensorProto.FLOAT, [4, 2, 3, 3], [0.0] * 72)])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    tool = Path(__file__).resolve().parents[1] / "tools" / "flop_floor.py"
    out = subprocess.run([sys.executable, str(tool), str(path), "--passes", "1000", "--peak-tflops", "1e-6"],
                         capture_output=True, text=True, check=True).stdout
    assert "2424 FLOP per forward pass (Conv 2304 FLOP, MatMul 120 FLOP)" in out
    assert "floor at 1e-06 TFLOPS: 2.4 ms per forward pass" in out and "at least 0.0 min" in out


def test_an_ir3_model_listing_its_initializers_as_inputs_sweeps_like_its_ir9_copy(tmp_path):
    """IR < 4 lists initializers as inputs and ORT then refuses to feed any initializer (the sweep feeds
    its reference trajectory): the prepared graph is raised to IR 4, the weights staying constants."""
    from onnx import helper

    new = recurrent_mlp()
    old = recurrent_mlp()
    old.ir_version, old.opset_import[0].version = 3, 8
    new.opset_import[0].version = 8
    old.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in old.graph.initializer)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    a = sweep(save_case(tmp_path / "old", old, recurrent_spec(), recurrent_contexts()))
    b = sweep(save_case(tmp_path / "new", new, recurrent_spec(), recurrent_contexts()))
    gammas = lambda d: [(x["weights"], x["quant"]["gamma_task"]) for x in d["blocks"]]
    assert gammas(a) == gammas(b)


def test_a_checkpoint_is_created_by_one_run_only(tmp_path):
    """Two runs started at once on one output: the checkpoint is created exclusively, the second stops."""
    from tqs_onnx.errors import TqsError
    from tqs_onnx.sweep import Checkpoint

    first, second = Checkpoint(tmp_path / "c.jsonl", "f"), Checkpoint(tmp_path / "c.jsonl", "f")
    first.check(False)
    second.check(False)  # both looked before either started
    first.start(False)
    with pytest.raises(TqsError, match="another run"):
        second._create()  # what second.start does after its own look found nothing
    assert first.load() == {}


def test_a_checkpoint_in_use_is_refused_to_a_second_run_even_with_resume(tmp_path):
    """A second run told to --resume while the first still wrote lost all its work when the first
    finished and removed the file (a CI trial): the first run's lock now stops it at once."""
    from tqs_onnx.errors import TqsError
    from tqs_onnx.sweep import Checkpoint

    first = Checkpoint(tmp_path / "c.jsonl", "f")
    first.check(False)
    first.start(False)
    first.append_row({"id": 0})
    for resume in (True, False):
        with pytest.raises(TqsError, match="another run is using this checkpoint now"):
            Checkpoint(tmp_path / "c.jsonl", "f").check(resume)
    first.release()  # the first run is over (killed, say): the checkpoint resumes
    again = Checkpoint(tmp_path / "c.jsonl", "f")
    again.check(True)
    assert again.start(True) == {0: {"id": 0}}
    again.release()


def test_the_checkpoint_stays_locked_until_the_scores_are_written_and_it_is_removed(tmp_path):
    """The lock was let go before `sweep` wrote the scores and removed the checkpoint: a second run with
    --resume could take it in between and then find it gone (a review)."""
    from tqs_onnx.errors import TqsError
    from tqs_onnx.sweep import Checkpoint

    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(3), recurrent_contexts(s=2))
    spec = RolloutSpec.load(paths["spec"])
    ckpt = tmp_path / "s.ckpt.jsonl"
    seen = []

    def finish(doc):
        with pytest.raises(TqsError, match="another run is using this checkpoint now"):
            Checkpoint(ckpt, "x").check(True)
        seen.append(doc["blocks"])
        ckpt.unlink()

    run_sweep(load_model(paths["model"]), spec, Contexts.load(paths["contexts"], spec), Device("cpu"),
              SweepConfig(probes=1, min_size=16, tiers=["int8"]), ckpt, quiet=True, finish=finish)
    assert seen and not ckpt.exists()


def test_checkpoint_rows_damaged_inside_or_mid_file_are_rescored_and_the_rest_kept(tmp_path):
    from tqs_onnx.sweep import Checkpoint

    (model, spec, ctx, config, ckpt), full = _swept_with_checkpoint(tmp_path)
    head, *rows = ckpt.read_text().splitlines()
    nested = json.loads(rows[0])
    nested["quant"]["gamma_task"] = None  # a row of the right shape with a value of the wrong type
    ckpt.write_text("\n".join([head, json.dumps(nested), "garbage", *rows[1:]]) + "\n")
    # The edited row no longer matches its digest: it is left out like the garbage line.
    assert set(Checkpoint(ckpt, json.loads(head)["fingerprint"]).load()) == {json.loads(r)["id"] for r in rows[1:]}
    resumed = run_sweep(model, spec, ctx, CPU, config, ckpt, resume=True, quiet=True)
    strip = lambda d: [{k: v for k, v in x.items() if k not in ("seconds", "forward_passes")} for x in d["blocks"]]
    assert strip(resumed) == strip(full)


def test_two_resuming_runs_that_found_no_checkpoint_do_not_share_one(tmp_path):
    from tqs_onnx.errors import TqsError
    from tqs_onnx.sweep import Checkpoint

    first, second = Checkpoint(tmp_path / "c.jsonl", "f"), Checkpoint(tmp_path / "c.jsonl", "f")
    first.check(True)
    second.check(True)
    first.start(True)
    with pytest.raises(TqsError, match="another run"):
        second.start(True)
    (tmp_path / "c.jsonl").unlink()  # the first run finished and removed it
    with pytest.raises(TqsError, match="vanished"):
        first.append_row({"id": 1})
    assert not (tmp_path / "c.jsonl").exists()


def test_auto_device_of_workers_needs_a_gpu_for_each():
    from tqs_onnx.distributed import worker_device

    assert worker_device("auto", {"CPU": 8.0, "GPU": 1.0}, workers=2) == "cpu"
    assert worker_device("auto", {"CPU": 8.0, "GPU": 2.0}, workers=2) == "cuda"


def test_a_block_reaching_only_an_output_outside_the_trajectory_is_named(tmp_path, capsys):
    """The dead branch's weight feeds an output the spec neither follows nor feeds back: the sweep says
    that its block changed no trajectory output and names the other output (a new user's trial: the
    plan put such a block at int2, its output 83% off, no word said)."""
    import onnx
    from onnx import helper

    m = recurrent_mlp(dead_branch=True)
    m.graph.node.append(helper.make_node("MatMul", ["x", "Wd"], ["y"], name="/side/MatMul"))
    m.graph.output.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16]))
    paths = save_case(tmp_path, m, recurrent_spec(), recurrent_contexts())
    spec = RolloutSpec.load(paths["spec"])
    doc = run_sweep(load_model(paths["model"]), spec, Contexts.load(paths["contexts"], spec), Device("cpu"),
                    SweepConfig(probes=1, min_size=16, blocks="tensor", tiers=["int8"]))
    err = capsys.readouterr().err
    assert any(b["unreached"] or b["dead"] for b in doc["blocks"])
    assert "changed no trajectory output" in err and "(y)" in err
    spec2 = RolloutSpec.from_dict({**recurrent_spec(), "trajectory": ["x_next", "y"]})
    run_sweep(load_model(paths["model"]), spec2, Contexts.load(paths["contexts"], spec2), Device("cpu"),
              SweepConfig(probes=1, min_size=16, blocks="tensor", tiers=["int8"]))
    assert "changed no trajectory output" not in capsys.readouterr().err


def test_a_float64_trajectory_is_differenced_in_float64(tmp_path, monkeypatch):
    """A float64 state near 1e4: divergences below float32's resolution there (~1e-3) read as exactly 0
    when the outputs were cast to float32 before the difference (bf16 damage 0, blocks scored dead)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from tiny import init, model, rng_weights
    from tqs_onnx.probes import sqdiff_many_graph

    n = 16
    w1, w2 = rng_weights(0, (n, 32), (32, n))
    h = helper.make_node
    nodes = [h("Cast", ["W1"], ["W1d"], to=TensorProto.DOUBLE), h("Cast", ["W2"], ["W2d"], to=TensorProto.DOUBLE),
             h("Sub", ["x", "off"], ["xc"]), h("MatMul", ["xc", "W1d"], ["a"]), h("Tanh", ["a"], ["b"]),
             h("MatMul", ["b", "W2d"], ["c"]), h("Mul", ["c", "small"], ["cs"]), h("Mul", ["xc", "k"], ["xs"]),
             h("Add", ["xs", "cs"], ["y"]), h("Add", ["y", "off"], ["x_next"])]
    inits = [init("W1", w1), init("W2", w2), init("k", np.float64(0.9)), init("off", np.float64(1e4)),
             init("small", np.float64(1e-5))]
    vi = [helper.make_tensor_value_info(v, TensorProto.DOUBLE, [1, n]) for v in ("x", "x_next")]
    ctx = {"x0": recurrent_contexts()["x0"].astype(np.float64) + 1e4}
    paths = save_case(tmp_path, model(nodes, inits, vi[:1], vi[1:]), recurrent_spec(), ctx)
    loaded, spec = load_model(paths["model"]), RolloutSpec.load(paths["spec"])
    config = SweepConfig(probes=2, tiers=["bf16", "int8", "int2"], min_size=16)
    scores = {}
    for mode in ("model", "graph"):
        monkeypatch.setenv("TQS_DIVERGENCE", mode)
        scores[mode] = run_sweep(loaded, spec, Contexts.load(paths["contexts"], spec), Device("cpu"), config)
    for a, b in zip(scores["model"]["blocks"], scores["graph"]["blocks"]):
        assert not a["dead"] and not a["unreached"]
        assert 0 < a["damage"]["bf16"] < 1e-10
        assert a["damage"] == pytest.approx(b["damage"], rel=1e-5)
    # the GPU's divergence graph (the same nodes): float64 pairs differenced in float64
    s = ort.InferenceSession(sqdiff_many_graph([TensorProto.DOUBLE]), providers=["CPUExecutionProvider"])
    a = np.full((4,), 1e4)
    assert s.run(None, {"a0": a + 1e-4, "b0": a})[0][0] == pytest.approx(4e-8, rel=1e-5)


def test_weights_on_the_probes_grid_are_probed_on_a_coarser_one(tmp_path):
    """A weight whose per-tensor int8 grid holds it exactly (a power-of-two scale, a fake-quant export)
    left a zero residual: scored -inf and dead, so the paper's allocator sent it to int2 (a user's trial).
    The probe now goes one grid coarser until the weights move."""
    from onnx import TensorProto, helper, numpy_helper

    from tiny import model

    r = np.random.default_rng(0)
    q = r.integers(-127, 128, (16, 16))
    q[0, 0] = 127
    w = (q * 2.0 ** -8).astype(np.float32)  # scale max/127 = 2^-8: on the int8 grid exactly
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["x_next"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 16]) for n in ("x", "x_next")]
    paths = save_case(tmp_path, model(nodes, [numpy_helper.from_array(w, "W")], vi[:1], vi[1:]), recurrent_spec(4),
                      recurrent_contexts())
    spec = RolloutSpec.load(paths["spec"])
    doc = run_sweep(load_model(paths["model"]), spec, Contexts.load(paths["contexts"], spec), Device("cpu"),
                    SweepConfig(probes=2, min_size=16, tiers=["int2"]), quiet=True)
    (b,) = doc["blocks"]
    assert b["probe_bits"] == 7 and b["norm"] > 0 and not b["dead"] and math.isfinite(b["quant"]["gamma_task"])


def test_spec_constants_fill_the_inputs_shape_and_a_spec_without_outputs_is_refused(tmp_path):
    """A single number fills a fixed-shape input (it raised numpy's reshape error after the spec was
    accepted); a list of another shape is refused when checked; a spec following no output is refused
    when read (ORT said 'At least one output should be requested')."""
    from onnx import TensorProto, helper

    from tiny import model
    from tqs_onnx.errors import TqsError
    from tqs_onnx.rollout import Rollout

    vi = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [1, 3]) for v in ("x", "k", "x_next")]
    import onnxruntime as ort

    m = model([helper.make_node("Add", ["x", "k"], ["x_next"])], [], vi[:2], vi[2:])
    ctx = {"x0": np.zeros((2, 1, 3), np.float32)}
    spec = RolloutSpec.from_dict({"horizon": 3, "feedback": {"x_next": "x"}, "initial": {"x": "x0"},
                                  "constants": {"k": 0.5}})
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    io = ({i.name: (tuple(i.shape), i.type) for i in s.get_inputs()}, {o.name: (tuple(o.shape), o.type) for o in s.get_outputs()})
    spec.check_against(*io, "m")
    steps = [a["x_next"] for a in Rollout(s, spec, Contexts.from_arrays(ctx, spec), Device("cpu")).trajectory_host(1)]
    assert np.array_equal(steps[-1], np.full((1, 3), 1.5, np.float32))
    wrong = RolloutSpec.from_dict({**spec.to_dict(), "constants": {"k": [0.5, 0.5]}})
    with pytest.raises(TqsError, match=r"constant 'k' has shape \[2\], the input takes \[1, 3\]"):
        wrong.check_against(*io, "m")
    with pytest.raises(TqsError, match="follows no output"):
        RolloutSpec.from_dict({"horizon": 3, "feedback": {}})


@pytest.mark.parametrize("edit", ["digit", "nan"])
def test_a_checkpoint_row_changed_after_writing_is_rescored_not_resumed(tmp_path, edit):
    """A flipped digit in a row's damage (12235.5 -> 62235.5) or a NaN gamma went into the resumed
    scores silently; rows carry a digest of their figures now."""
    (model, spec, ctx, config, ckpt), full = _swept_with_checkpoint(tmp_path)
    head, first, *rows = ckpt.read_text().splitlines()
    row = json.loads(first)
    if edit == "digit":
        tier = next(iter(row["damage"]))
        row["damage"][tier] = row["damage"][tier] * 5 + 1
    else:
        row["quant"]["gamma_task"] = float("nan")
    ckpt.write_text("\n".join([head, json.dumps(row), *rows]) + "\n")
    resumed = run_sweep(model, spec, ctx, CPU, config, ckpt, resume=True, quiet=True)
    strip = lambda d: [{k: v for k, v in x.items() if k not in ("seconds", "forward_passes")} for x in d["blocks"]]
    assert strip(resumed) == strip(full)


def test_the_horizon_rolled_out_not_where_it_was_given_names_a_run_and_the_joint_check_uses_the_sweeps(tmp_path):
    """A sweep at --horizon 3 and one whose spec says 3 are one run (the checkpoint of one resumed the
    other was refused, and so was the spec of 3 steps in the joint check); the joint check rolls out
    the sweep's horizon whatever the spec passed to it says."""
    from dataclasses import replace

    from tqs_onnx.sweep import _fingerprint, contexts_digest, setup_for_scores

    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(horizon=8), recurrent_contexts())
    spec8 = RolloutSpec.load(paths["spec"])
    spec3 = replace(spec8, horizon=3, name="relabelled")
    ctx = Contexts.load(paths["contexts"], spec8)
    model = load_model(paths["model"])
    config = SweepConfig(probes=1, min_size=16, tiers=["int8/channel/gptq"])
    assert _fingerprint(model, spec8, ctx, replace(config, horizon=3), CPU.kind) == \
        _fingerprint(model, spec3, ctx, config, CPU.kind)
    assert _fingerprint(model, spec8, ctx, config, CPU.kind) != _fingerprint(model, spec3, ctx, config, CPU.kind)
    scores = run_sweep(model, spec8, ctx, CPU, replace(config, horizon=3), quiet=True)
    assert scores["horizon"] == 3 and scores["contexts_sha256"] == contexts_digest(spec3, ctx)
    assert setup_for_scores(model, spec8, ctx, CPU, scores).horizon == 3
    assert setup_for_scores(model, spec3, ctx, CPU, scores).horizon == 3


def test_a_checkpoint_of_another_run_says_what_differs(tmp_path):
    """It said 'model, scores, spec, contexts, options, device or the tool's version differ' whatever
    differed: a user who forgot one flag could not tell which."""
    from dataclasses import replace

    from tqs_onnx.errors import TqsError
    from tqs_onnx.sweep import Checkpoint, _fingerprint

    paths = save_case(tmp_path, recurrent_mlp(), recurrent_spec(horizon=8), recurrent_contexts())
    spec = RolloutSpec.load(paths["spec"])
    ctx = Contexts.load(paths["contexts"], spec)
    model = load_model(paths["model"])
    config = SweepConfig(probes=2, min_size=16, tiers=["int8"])
    Checkpoint(tmp_path / "c.jsonl", _fingerprint(model, spec, ctx, config, CPU.kind)).start(False)
    other = _fingerprint(model, spec, ctx, replace(config, seed=3, horizon=5), CPU.kind)
    with pytest.raises(TqsError, match=r"another run \(options: horizon 8 there, 5 now, seed 0 there, 3 now\)"):
        Checkpoint(tmp_path / "c.jsonl", other).check(True)
    with pytest.raises(TqsError, match=r"another run \(device\)"):
        Checkpoint(tmp_path / "c.jsonl", _fingerprint(model, spec, ctx, config, "cuda")).check(True)
