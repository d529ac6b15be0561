"""Gaussian probes: every draw's norm over the whole block equals the quant residual's (the paper's
sigma), in the direction of the counter-based normals; checkpoints of other probes are refused."""

import numpy as np
import pytest

from tiny import recurrent_contexts, recurrent_mlp, recurrent_spec, save_case
from tqs_onnx import sweep
from tqs_onnx.errors import TqsError
from tqs_onnx.graph import load_model
from tqs_onnx.probes import PROBES_VERSION, DeviceProbes, counter_normal, probe_offset
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import Device
from tqs_onnx.sweep import Checkpoint, SweepConfig, checked_checkpoint, run_sweep

CPU = Device("cpu")
SEED = 5


def _case(tmp):
    paths = save_case(tmp, recurrent_mlp(), recurrent_spec(horizon=4), recurrent_contexts(s=2))
    spec = RolloutSpec.load(paths["spec"])
    return load_model(paths["model"]), spec, Contexts.load(paths["contexts"], spec)


def _residual_norm(weights: list[np.ndarray], bits: int = 8) -> float:
    """||Q_b(W) - W||_F over the block, symmetric per-tensor rounding in numpy."""
    qmax = 2 ** (bits - 1) - 1
    total = 0.0
    for w in weights:
        s = np.abs(w).max() / qmax
        q = np.clip(np.round(w / s), -qmax, qmax) * s
        total += float(np.sum((q.astype(np.float64) - w) ** 2))
    return float(np.sqrt(total))


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """A block of two tensors (W1, W2) swept with two Gaussian probes: its nominal weights and the
    weights each probe's rollout was given."""
    model, spec, ctx = _case(tmp_path_factory.mktemp("gauss"))
    config = SweepConfig(probe="gauss", probes=2, seed=SEED, min_size=16, blocks="fixed:2", skip_unreached=False)
    setup = sweep.prepare(model, spec, ctx, CPU, config)
    block = setup.blocks[0]
    assert len(block.weights) == 2
    given = []
    rollout = sweep.divergence

    def recording(setup_, replaced, stop=None):
        given.append({n: v.numpy().copy() for n, v in replaced.items()})
        return rollout(setup_, replaced, stop)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep, "divergence", recording)
        sweep.score_block(setup, block, config, [])
    nominal = {n: setup.bound[n].numpy().copy() for n in block.weights}
    return block, nominal, given


def test_every_draw_has_the_quant_residuals_norm_over_the_whole_block(applied):
    block, nominal, given = applied
    norm = _residual_norm(list(nominal.values()))
    assert len(given) == 2 and norm > 0
    for probe in given:
        assert set(probe) == set(block.weights)
        delta = np.concatenate([(probe[n].astype(np.float64) - nominal[n]).ravel() for n in block.weights])
        assert np.linalg.norm(delta) == pytest.approx(norm, rel=1e-5)


def test_the_draw_points_along_the_reference_normals_of_its_offsets(applied):
    block, nominal, given = applied
    for p, probe in enumerate(given):
        delta = np.concatenate([(probe[n].astype(np.float64) - nominal[n]).ravel() for n in block.weights])
        z = np.concatenate([counter_normal(nominal[n].size, probe_offset(SEED, block.id, p, j)).astype(np.float64)
                            for j, n in enumerate(block.weights)])
        np.testing.assert_allclose(delta / np.linalg.norm(delta), z / np.linalg.norm(z), rtol=0, atol=1e-5)


def test_norm_zero_or_nothing_to_draw_leaves_the_weights_unchanged():
    ops = DeviceProbes(CPU)
    w = {"a": np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32),
         "b": np.linspace(-1, 1, 9, dtype=np.float32)}
    got = ops.gauss_probe({n: CPU.to_device(v) for n, v in w.items()}, [11, 12], 0.0)
    for n, v in w.items():
        assert np.array_equal(got[n].numpy(), v)
    empty = np.zeros((0, 3), np.float32)  # sum of squares 0: sigma 0, not a division by zero
    assert ops.gauss_probe({"e": CPU.to_device(empty)}, [13], 0.5)["e"].numpy().shape == (0, 3)


def test_a_checkpoint_of_other_probes_is_refused_and_the_scores_name_the_probes(tmp_path, monkeypatch):
    model, spec, ctx = _case(tmp_path)
    config = SweepConfig(probes=2, min_size=16, blocks="fixed:2")
    ckpt = tmp_path / "ck.jsonl"

    def fingerprint() -> str:  # PROBES_VERSION is read when it is called
        return sweep._fingerprint(model, spec, ctx, config, CPU.kind)

    monkeypatch.setattr(sweep, "PROBES_VERSION", "gauss-expected-norm")
    Checkpoint(ckpt, fingerprint()).start(resume=False)
    checked_checkpoint(ckpt, fingerprint(), resume=True)  # the same probes: resumable
    monkeypatch.undo()
    with pytest.raises(TqsError, match="belongs to another run"):
        run_sweep(model, spec, ctx, CPU, config, ckpt, resume=True, quiet=True)
    ckpt.unlink()
    assert run_sweep(model, spec, ctx, CPU, config, quiet=True)["probes"] == PROBES_VERSION


def test_the_fingerprint_names_the_probes_where_gaussian_draws_run_and_always_analysis_and_scores(
        tmp_path, monkeypatch):
    from dataclasses import replace

    model, spec, ctx = _case(tmp_path)
    both = SweepConfig(probes=2, min_size=16, blocks="fixed:2")
    quant = replace(both, probe="quant")
    before = {c.probe: sweep._fingerprint(model, spec, ctx, c, CPU.kind) for c in (both, quant)}
    monkeypatch.setattr(sweep, "PROBES_VERSION", "another")
    assert sweep._fingerprint(model, spec, ctx, both, CPU.kind) != before["both"]
    assert sweep._fingerprint(model, spec, ctx, quant, CPU.kind) == before["quant"]  # its rows did not change
    monkeypatch.setattr(sweep, "ANALYSIS_VERSION", "another")
    assert sweep._fingerprint(model, spec, ctx, quant, CPU.kind) != before["quant"]
    changed = sweep._fingerprint(model, spec, ctx, quant, CPU.kind)
    monkeypatch.setattr(sweep, "SCORES_VERSION", "another")  # Eq. 2 / A_max computed otherwise
    assert sweep._fingerprint(model, spec, ctx, quant, CPU.kind) != changed
