#!/usr/bin/env python3
"""Which change the sweep makes to a model's graph costs time on the device, per forward pass.

Plain rollouts (no probes) of five sessions of the same model, in alternating rounds: the original
file; the prepared graph (hidden weights lifted, tables factored); the prepared graph with the
divergence outputs of `passes/divergence.py`; the prepared graph with its quantizable weights exposed
as inputs (bound once per rollout, as the sweep binds them); and both, which is the sweep's own session.
Medians and minima over rounds, in ms per forward pass.

    python tools/bench_graph_overhead.py MODEL.onnx SPEC.json CONTEXTS.npz [--device cuda] [--rounds 15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench_args import add_rollout_args  # tools/
from tqs_onnx.graph import load_model, make_blocks, weight_table
from tqs_onnx.passes.divergence import AddDivergenceOutputs
from tqs_onnx.passes.expose_weights import ExposeWeights
from tqs_onnx.prepare import prepare_graph
from tqs_onnx.rollout import Contexts, Rollout, RolloutSpec
from tqs_onnx.runtime import make_session, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rollout_args(ap, rounds=15)
    a = ap.parse_args()
    dev = resolve_device(a.device)
    spec = RolloutSpec.load(a.spec)
    ctx = Contexts.load(a.contexts, spec)
    loaded = load_model(a.model)
    prep = prepare_graph(loaded.model, True).model
    names = [n for b in make_blocks(weight_table(prep, 256), "auto") for n in b.weights]
    exposed = ExposeWeights(names).run(prep)
    bound = {k: dev.to_device(v) for k, v in exposed.report["values"].items()}
    print(f"{a.model.name} on {dev.kind}: {len(bound)} weights exposed, {ctx.count} contexts x {spec.horizon} steps")
    variants = {
        "original": (loaded.model, None),
        "prepared": (prep, None),
        "divergence outputs": (AddDivergenceOutputs(spec.trajectory).run(prep).model, None),
        "weights as inputs": (exposed.model, bound),
        "both (the sweep's)": (AddDivergenceOutputs(spec.trajectory).run(exposed.model).model, bound),
    }
    rollouts = {k: (Rollout(make_session(m, dev), spec, ctx, dev), w) for k, (m, w) in variants.items()}
    for r, w in rollouts.values():  # warm-up
        for s in range(ctx.count):
            r.trajectory(s, w)
    times: dict[str, list[float]] = {k: [] for k in rollouts}
    for _ in range(a.rounds):
        for k, (r, w) in rollouts.items():
            t0, n0 = time.perf_counter(), r.forward_passes
            for s in range(ctx.count):
                r.trajectory(s, w)
            times[k].append((time.perf_counter() - t0) / (r.forward_passes - n0) * 1e3)
    base = float(np.median(times["original"]))
    for k, v in times.items():
        print(f"  {k:20s} median {np.median(v):.4f} ms ({np.median(v) / base:.2f}x)  min {min(v):.4f} ms")


if __name__ == "__main__":
    main()
