#!/usr/bin/env python3
"""The sweep's rollouts with output buffers reused across steps (TQS_REUSE_OUTPUTS=on, the default)
against outputs allocated per run (off), interleaved on one sweep session.

Each round times one quant-probe rollout of every block (all contexts, the spec's horizon) in each
setting, in alternating order (on/off, then off/on), so drift of the machine falls on both; the
divergences of the two settings must be equal to the bit. Prints microseconds per forward pass
(median over rounds) and the ratio off / on.

    python tools/bench_reuse_outputs.py MODEL.onnx SPEC.json CONTEXTS.npz [--device cuda] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from bench_args import add_rollout_args  # tools/
from tqs_onnx.graph import load_model
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import resolve_device
from tqs_onnx.sweep import SweepConfig, divergence, prepare


def one_pass(setup, probes: dict) -> tuple[float, list[np.ndarray]]:
    """Microseconds per forward pass of one quant-probe rollout per block, and the divergences."""
    n0, t0 = setup.rollout.forward_passes, time.perf_counter()
    divs = [divergence(setup, probes[b.id]) for b in setup.blocks]
    return (time.perf_counter() - t0) / (setup.rollout.forward_passes - n0) * 1e6, divs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rollout_args(ap, rounds=6)
    a = ap.parse_args()
    # TQS_REUSE_OUTPUTS concerns the step loop; the replay engine (TQS_REPLAY=auto, the default) binds
    # fixed buffers whichever it is, so the setting is compared on the step loop.
    os.environ["TQS_REPLAY"] = "off"
    print("engine: step loop (TQS_REPLAY=off; the setting does not apply to the replay)")
    spec = RolloutSpec.load(a.spec)
    device = resolve_device(a.device)
    setup = prepare(load_model(a.model), spec, Contexts.load(a.contexts, spec), device, SweepConfig())
    probes = {b.id: {n: setup.ops.quant_probe(setup.bound[n], 8) for n in b.weights} for b in setup.blocks}
    before = os.environ.get("TQS_REUSE_OUTPUTS")
    times: dict[str, list[float]] = {"on": [], "off": []}
    divs: dict[str, list[np.ndarray]] = {}
    try:
        one_pass(setup, probes)  # warm-up
        for r in range(a.rounds):
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                os.environ["TQS_REUSE_OUTPUTS"] = mode
                us, divs[mode] = one_pass(setup, probes)
                times[mode].append(us)
    finally:
        if before is None:
            os.environ.pop("TQS_REUSE_OUTPUTS", None)
        else:
            os.environ["TQS_REUSE_OUTPUTS"] = before
    same = all(np.array_equal(x, y) for x, y in zip(divs["on"], divs["off"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.model.name} on {device.kind}: {len(setup.blocks)} blocks x {spec.horizon} steps x "
          f"{len(setup.nominal)} contexts per round, {a.rounds} rounds (order alternating)")
    for k, v in times.items():
        print(f"  TQS_REUSE_OUTPUTS={k:3s} {med[k]:8.1f} us per forward pass (median; rounds: "
              f"{', '.join(f'{x:.1f}' for x in v)})")
    print(f"  off / on: {med['off'] / med['on']:.3f}; divergences equal to the bit: {same}")


if __name__ == "__main__":
    main()
