#!/usr/bin/env python3
"""Sweep efficiency, measured in one run on one model.

Prints: the plain forward pass (the floor: the original model, its own session, weights as
initializers), the sweep's cost per forward pass and per probe, and a naive sweep that builds a
session per probe. efficiency = (forward passes done x floor time) / sweep time. With TQS_GPU_QUEUE=1
on a GPU the sweep queues each rollout's steps without waiting for the device (one wait per
rollout); the same sweep is then run again on the same sessions waiting at every step, and the
scores of the two are compared.

    python tools/bench_sweep.py models/lorenz96_mlp.onnx [--device cpu|cuda] [--blocks layer]

With --protocols it also measures, on the same session, the cost of what each allocator needs:
the paper's protocol (1 quant + --probes Gaussian probes per block), the measured objective's sweep
(1 quant probe + one rollout per candidate tier per block) and its refinement (joint check against
every uniform plan that fits + bounded local search, at --target), as forward passes and seconds.
"""

from __future__ import annotations

import argparse
import sys
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from tqs_onnx.graph import load_model
from tqs_onnx.quant import apply_tier
from tqs_onnx.rollout import Contexts, Rollout, RolloutSpec, reuse_outputs
from tqs_onnx.replay import replay_mode
from tqs_onnx.runtime import _ort as ort_module, make_session, resolve_device
from tqs_onnx.allocate import allocate, sweep_gamma_min
from tqs_onnx.tiers import DEFAULT_SWEEP_TIERS
from tqs_onnx.refine import refine
from tqs_onnx.prepare import prepare_graph
from tqs_onnx.sweep import (SweepConfig, divergence_mode, gpu_stream_mode, joint_divergence, prepare, rollout_moments,
                            score_block, scores_document)
from tqs_onnx.tiers import Tier, parse_tier
from tqs_onnx.util import first_line
from one_line_errors import run  # tools/: a user's error is one line, exit 2

MEASURED_TIERS = DEFAULT_SWEEP_TIERS.split(",")  # the tiers `tqs-onnx sweep` measures by default


def companion(model: Path, suffix: str) -> Path:
    stem = model.name[: -len(".onnx")]
    for cand in (model.with_name(f"{stem}{suffix}"), model.with_name(f"{stem.split('_')[0]}{suffix}")):
        if cand.exists():
            return cand
    raise SystemExit(f"{model}: cannot find {suffix} beside it; pass --spec/--contexts")


def floor_rollout(path: Path, spec, contexts, device) -> Rollout:
    """The original model (weights as initializers) in its own session, warmed up."""
    rollout = Rollout(make_session(str(path), device), spec, contexts, device)
    for s in range(contexts.count):
        rollout.trajectory(s)
    return rollout


def floor_time(path: Path | Rollout, spec, contexts, device, repeats: int) -> tuple[float, int]:
    """Seconds per forward pass of the original model rolled out on every context."""
    rollout = path if isinstance(path, Rollout) else floor_rollout(path, spec, contexts, device)
    t0, n0 = time.perf_counter(), rollout.forward_passes
    for _ in range(repeats):
        for s in range(contexts.count):
            rollout.trajectory(s)
    return (time.perf_counter() - t0) / (rollout.forward_passes - n0), rollout.forward_passes - n0


def replayed_floor_time(path: Path, spec, contexts, device, repeats: int) -> tuple[float, str]:
    """Seconds per forward pass of the original model run the way the replay engine runs the sweep's
    graph: fixed buffers, fed-back states alternating between two bindings, and on CUDA a captured
    CUDA graph per binding (so the floor gets the same launch savings as the sweep). The inputs stay
    those of context 0's first step: only the time counts."""
    cuda = device.kind == "cuda" and replay_mode(device) == "cuda-graph"
    session = make_session(str(path), device, cuda_graph=cuda)
    plain = Rollout(make_session(str(path), device), spec, contexts, device)
    feeds = {**plain.initial_feeds(0), **plain.step_feeds(0, 0)}
    first = {o.name: v for o, v in zip(plain.session.get_outputs(), plain.session.run(None, feeds))}
    states = {inp: [device.to_device(feeds[inp]), device.to_device(feeds[inp])] for inp in spec.feedback.values()}
    others = {o: device.to_device(np.zeros_like(v)) for o, v in first.items() if o not in spec.feedback}
    fixed = {i: device.to_device(v) for i, v in feeds.items() if i not in states}
    bindings, options = [], []
    for p in (0, 1):
        b = session.io_binding()
        for i, v in fixed.items():
            b.bind_ortvalue_input(i, v)
        for o, inp in spec.feedback.items():
            b.bind_ortvalue_input(inp, states[inp][p])
            b.bind_ortvalue_output(o, states[inp][1 - p])
        for o, v in others.items():
            b.bind_ortvalue_output(o, v)
        bindings.append(b)
        ro = None
        if cuda:
            ro = ort_module().RunOptions()
            ro.add_run_config_entry("gpu_graph_id", str(p + 1))  # ORT reserves id 0
        options.append(ro)
    n = max(1, repeats * contexts.count * spec.horizon)
    for g in range(4):  # ORT captures a graph after a few plain runs of its id
        session.run_with_iobinding(bindings[g % 2], options[g % 2])
    t0 = time.perf_counter()
    for g in range(n):
        if g % spec.horizon == 0:  # a new rollout from the initial state, as the sweep's (no drift to denormals)
            for inp in states:
                states[inp][g % 2].update_inplace(feeds[inp])
        session.run_with_iobinding(bindings[g % 2], options[g % 2])
    return (time.perf_counter() - t0) / n, "cuda-graph" if cuda else "buffers"


def naive_probe_time(loaded, setup, spec, contexts, device, probes: int) -> float:
    """Seconds per probe when each probe writes a perturbed model and opens a new session."""
    t0 = time.perf_counter()
    blocks = setup.blocks[:probes]
    for block in blocks:
        w = {n: setup.bound[n].numpy() for n in block.weights}
        values = {n: apply_tier(v, Tier("int8"), None, None) for n, v in w.items()}  # host-made quant probe
        m = onnx.ModelProto()
        m.CopyFrom(loaded.model)
        for t in m.graph.initializer:
            if t.name in values:
                t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
        rollout = Rollout(make_session(m, device), spec, contexts, device)
        for s in range(contexts.count):
            rollout.trajectory(s)
    return (time.perf_counter() - t0) / len(blocks)


def sweep_blocks(setup, config, floor: Callable[[], float] | None = None) -> tuple[float, int, list, float]:
    """Seconds, forward passes and scores of every block's probes (no tiers), and the floor's seconds
    for the same passes with the floor timed right after each block (`floor`: seconds per forward pass;
    its own time is not counted in the sweep's)."""
    seconds, passes, scores, floor_s = 0.0, 0, [], 0.0
    for block in setup.blocks:
        n0, t0 = setup.rollout.forward_passes, time.perf_counter()
        scores.append(score_block(setup, block, config, []))
        seconds += time.perf_counter() - t0
        n = setup.rollout.forward_passes - n0
        passes += n
        if floor is not None:
            floor_s += n * floor()
    return seconds, passes, scores, floor_s


def probes_run(scores: list, setup) -> int:
    """Probes the sweep actually rolled out: each block's forward passes over one rollout's (every
    context, the full horizon: bench_sweep's config stops no rollout early). An unreached block skips
    its other draws (SweepConfig.skip_unreached), so this is not blocks x (1 + probes)."""
    per_probe = len(setup.nominal) * setup.horizon
    counts = [s.forward_passes // per_probe for s in scores]
    uneven = [s.name for s in scores if s.forward_passes % per_probe]
    if uneven:  # a rollout cut short: the count would be a guess
        raise RuntimeError(f"blocks {uneven[:3]} ran a partial rollout; probes cannot be counted")
    return sum(counts)


def max_gamma_diff(scores: list, other: list) -> float:
    """Largest relative difference between two sweeps' gammas, block by block."""
    return max(abs(a.gamma - b.gamma) / max(abs(a.gamma), 1e-30) for a, b in zip(scores, other))


def rerun_with(env: str, value: str, loaded, spec, contexts, device, config, scores) -> dict:
    """The same sweep in fresh sessions with one environment setting changed, and how far its gammas
    are from `scores`'."""
    before = os.environ.get(env)
    os.environ[env] = value
    try:
        setup = prepare(loaded, spec, contexts, device, config)
        seconds, passes, other, _ = sweep_blocks(setup, config)
    finally:
        if before is None:
            os.environ.pop(env)
        else:
            os.environ[env] = before
    diff = max_gamma_diff(scores, other)
    return {"setting": f"{env}={value}", "sweep_s": seconds, "forward_passes": passes, "max_rel_gamma_diff": diff}


def timed(setup, fn) -> tuple[float, int, object]:
    """(seconds, forward passes, result) of fn() on the sweep's session."""
    n0, t0 = setup.rollout.forward_passes, time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, setup.rollout.forward_passes - n0, out


def protocols(setup, spec, device, probes: int, target: float, max_rollouts: int) -> dict:
    """Forward passes and seconds: the paper's sweep, the measured sweep, the refinement."""
    paper = SweepConfig(probe="both", probes=probes, tiers=[])
    measured = SweepConfig(probe="quant", tiers=list(MEASURED_TIERS))
    tiers = [parse_tier(t) for t in MEASURED_TIERS]
    p_s, p_n, _ = timed(setup, lambda: [score_block(setup, b, paper, []) for b in setup.blocks])
    # the /gptq tiers' statistics: FP32 rollouts in a session of their own (the sweep's prepare does this)
    model = prepare_graph(setup.loaded.model).model
    t0 = time.perf_counter()
    setup.rounding = rollout_moments(model, [w for w in setup.weights if w.name in setup.bound], spec,
                                     setup.rollout.contexts, device, setup.horizon)
    g_s, g_n = time.perf_counter() - t0, setup.rounding.forward_passes
    m_s, m_n, scores = timed(setup, lambda: [score_block(setup, b, measured, tiers) for b in setup.blocks])
    doc = scores_document(setup, spec, measured, scores, device)
    problem, alloc = allocate(doc, target)
    joint = joint_divergence(setup, [b.weights for b in problem.blocks], problem.tiers)
    r_s, r_n, refined = timed(setup, lambda: refine(problem, alloc, joint, max_rollouts,
                                                     gamma_min=sweep_gamma_min(doc)))
    return {"target": target, "paper": {"forward_passes": p_n, "seconds": p_s},
            "gptq_statistics": {"forward_passes": g_n, "seconds": g_s},
            "measured_sweep": {"forward_passes": m_n, "seconds": m_s},
            "refinement": {"forward_passes": r_n, "seconds": r_s, "rollouts": refined.rollouts},
            "measured_total_over_paper": {"forward_passes": (g_n + m_n + r_n) / p_n,
                                          "seconds": (g_s + m_s + r_s) / p_s}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--spec", type=Path)
    ap.add_argument("--contexts", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", default="auto")
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--streams", action="store_true",
                    help="CUDA: also run the sweep with the other stream mode (TQS_GPU_STREAM own/shared) in this run")
    ap.add_argument("--compare-divergence", action="store_true",
                    help="also run the sweep with the other TQS_DIVERGENCE mode (model / graph) in this run")
    ap.add_argument("--compare-reuse", action="store_true",
                    help="also run the sweep with the other TQS_REUSE_OUTPUTS setting (on / off) in this run")
    ap.add_argument("--compare-replay", action="store_true",
                    help="also run the sweep with the other TQS_REPLAY setting (on / off) in this run")
    ap.add_argument("--protocols", action="store_true", help="also compare the paper's and the measured protocol")
    ap.add_argument("--target", type=float, default=8.0, help="compression of the refinement (--protocols)")
    ap.add_argument("--max-rollouts", type=int, default=30, help="joint rollouts of the refinement (--protocols)")
    a = ap.parse_args()
    spec = RolloutSpec.load(a.spec or companion(a.model, ".rollout.json"))
    contexts = Contexts.load(a.contexts or companion(a.model, "_sweep.npz"), spec)
    device = resolve_device(a.device)
    loaded = load_model(a.model)

    floor_r = floor_rollout(a.model, spec, contexts, device)
    floor_before, _ = floor_time(floor_r, spec, contexts, device, a.repeats)
    config = SweepConfig(probe="both", probes=a.probes, blocks=a.blocks)
    t_setup = time.perf_counter()
    setup = prepare(loaded, spec, contexts, device, config)
    t_setup = time.perf_counter() - t_setup
    queued = setup.rollout.async_steps
    # The floor also timed after every block (one rollout of each context): a device whose speed drifts
    # during the sweep (clocks, a neighbour) then drifts for both.
    # Each time it first rolls out one context untimed, so that switching sessions is not charged to it.
    def floor_now() -> float:
        floor_r.trajectory(0)
        return floor_time(floor_r, spec, contexts, device, 1)[0]

    sweep_s, passes, scores, floor_inter_s = sweep_blocks(setup, config, floor_now)
    waited = None
    if queued:  # the same sweep on the same session, waiting for the device at every step
        setup.rollout.async_steps = False
        w_s, w_passes, w_scores, _ = sweep_blocks(setup, config)
        setup.rollout.async_steps = True
        diff = max_gamma_diff(scores, w_scores)
        waited = {"sweep_s": w_s, "forward_passes": w_passes, "max_rel_gamma_diff": diff}
    others = []  # the same sweep in fresh sessions with one setting changed
    if a.streams and device.kind == "cuda":
        others.append(rerun_with("TQS_GPU_STREAM", "shared" if gpu_stream_mode() == "own" else "own",
                                 loaded, spec, contexts, device, config, scores))
    if a.compare_divergence:
        others.append(rerun_with("TQS_DIVERGENCE", "graph" if divergence_mode() == "model" else "model",
                                 loaded, spec, contexts, device, config, scores))
    if a.compare_replay:
        others.append(rerun_with("TQS_REPLAY", "off" if setup.replay is not None else "on",
                                 loaded, spec, contexts, device, config, scores))
    if a.compare_reuse:  # a step-loop setting: under the replay both runs would replay
        if setup.replay is not None:
            print("  --compare-reuse: the sweep replayed; TQS_REUSE_OUTPUTS applies to the step loop only "
                  "(run with TQS_REPLAY=off to compare it)")
        else:
            others.append(rerun_with("TQS_REUSE_OUTPUTS", "off" if reuse_outputs() else "on",
                                     loaded, spec, contexts, device, config, scores))
    # The floor again, now that the device is warm (a GPU still at idle clocks made the first floor
    # measurement up to 2x slow); the faster of the two counts, so efficiency is never flattered.
    floor_after, _ = floor_time(floor_r, spec, contexts, device, a.repeats)
    floor = min(floor_before, floor_after)
    try:  # the floor as the replay engine runs a graph (fixed buffers; CUDA graphs on a GPU)
        floor_replayed, floor_replayed_mode = replayed_floor_time(a.model, spec, contexts, device, a.repeats)
    except Exception as exc:  # a model the replay does not fit
        floor_replayed, floor_replayed_mode = None, f"not measured: {first_line(exc, 200)}"
    probes = probes_run(scores, setup)
    unreached = sum(s.unreached for s in scores)
    naive = naive_probe_time(loaded, setup, spec, contexts, device, min(3, len(setup.blocks)))
    per_probe = sweep_s / probes
    res = {
        "model": str(a.model), "device": device.kind, "blocks": len(setup.blocks), "probes": probes,
        "unreached_blocks": unreached,
        "contexts": contexts.count, "horizon": spec.horizon,
        "floor_ms_per_forward": floor * 1e3,
        "floor_ms_before_sweep": floor_before * 1e3, "floor_ms_after_sweep": floor_after * 1e3,
        "sweep_ms_per_forward": sweep_s / passes * 1e3,
        "sweep_s": sweep_s, "setup_s": t_setup, "forward_passes": passes,
        "efficiency": passes * floor / sweep_s,
        "floor_ms_interleaved": floor_inter_s / passes * 1e3, "efficiency_interleaved": floor_inter_s / sweep_s,
        "sweep_ms_per_probe": per_probe * 1e3, "naive_ms_per_probe": naive * 1e3,
        "naive_over_sweep": naive / per_probe, "steps_queued": queued,
        "replay": setup.replay.mode if setup.replay else f"off: {setup.replay_note}",
        "floor_replayed_ms_per_forward": None if floor_replayed is None else floor_replayed * 1e3,
        "floor_replayed_mode": floor_replayed_mode,
        "efficiency_replayed_floor": None if floor_replayed is None else passes * floor_replayed / sweep_s,
    }
    if waited:
        waited["efficiency"] = waited["forward_passes"] * floor / waited["sweep_s"]
        res["waiting_every_step"] = waited
    res["stream_mode"] = gpu_stream_mode() if device.kind == "cuda" else None
    res["divergence_mode"] = divergence_mode()
    res["reuse_outputs"] = reuse_outputs()
    for other in others:
        other["efficiency"] = other["forward_passes"] * floor / other["sweep_s"]
    res["other_settings"] = others
    print(f"{a.model.name} on {device.kind}: {res['blocks']} blocks, {probes} probes x {contexts.count} contexts "
          f"x {setup.horizon} steps = {passes:,} forward passes"
          + (f" ({unreached} blocks unreached: their other draws skipped)" if unreached else ""))
    print(f"  floor (plain forward)       {res['floor_ms_per_forward']:.4f} ms   (the faster of "
          f"{floor_before * 1e3:.4f} before and {floor_after * 1e3:.4f} after the sweep)")
    print(f"  sweep per forward           {res['sweep_ms_per_forward']:.4f} ms   (setup {t_setup:.2f} s, once; "
          f"engine: {'replay, ' + res['replay'] if setup.replay else 'step loop (' + res['replay'] + ')'})")
    print(f"  efficiency                  {res['efficiency']:.3f}   (forward passes x floor / sweep time)")
    print(f"  efficiency, floor interleaved {res['efficiency_interleaved']:.3f} (floor timed after every block: "
          f"{res['floor_ms_interleaved']:.4f} ms per pass, weighted by the block's passes)")
    if floor_replayed is not None:
        print(f"  efficiency, floor replayed  {res['efficiency_replayed_floor']:.3f}   (the original model run on "
              f"fixed buffers, {floor_replayed_mode}: {floor_replayed * 1e3:.4f} ms per pass)")
    else:
        print(f"  floor replayed: {floor_replayed_mode}")
    if waited:
        print(f"  efficiency waiting for the device at every step: {waited['efficiency']:.3f} "
              f"({waited['sweep_s']:.2f} s against {sweep_s:.2f} s queued; gamma differs by at most "
              f"{waited['max_rel_gamma_diff']:.1e} relative)")
    for other in others:
        print(f"  efficiency with {other['setting']}: {other['efficiency']:.3f} ({other['sweep_s']:.2f} s "
              f"against {sweep_s:.2f} s; gamma differs by at most {other['max_rel_gamma_diff']:.1e} relative)")
    print(f"  per probe: sweep {res['sweep_ms_per_probe']:.2f} ms, naive session-per-probe "
          f"{res['naive_ms_per_probe']:.2f} ms ({res['naive_over_sweep']:.1f}x)")
    if a.protocols:
        res["protocols"] = pr = protocols(setup, spec, device, a.probes, a.target, a.max_rollouts)
        print("  protocols (same session), forward passes and seconds:")
        print(f"    paper: 1 quant + {a.probes} Gaussian probes per block   {pr['paper']['forward_passes']:>10,} "
              f"{pr['paper']['seconds']:9.2f} s")
        print(f"    /gptq statistics: FP32 rollouts of the sweep contexts "
              f"{pr['gptq_statistics']['forward_passes']:>10,} {pr['gptq_statistics']['seconds']:9.2f} s")
        print(f"    measured sweep: 1 quant + {len(MEASURED_TIERS)} tiers per block  "
              f"{pr['measured_sweep']['forward_passes']:>10,} {pr['measured_sweep']['seconds']:9.2f} s")
        print(f"    refinement at {a.target:g}x ({pr['refinement']['rollouts']} joint rollouts)    "
              f"{pr['refinement']['forward_passes']:>10,} {pr['refinement']['seconds']:9.2f} s")
        ratio = pr["measured_total_over_paper"]
        print(f"    statistics + measured sweep + refinement / paper: {ratio['forward_passes']:.2f}x passes, "
              f"{ratio['seconds']:.2f}x time")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(run(main))
