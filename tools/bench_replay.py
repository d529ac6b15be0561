#!/usr/bin/env python3
"""The replay engine (TQS_REPLAY; CUDA graphs on a GPU) against the step loop, interleaved on one
sweep setup, with the plain forward pass timed in the same rounds.

Each round times, in an order that rotates from round to round so drift of the machine falls on all:
one quant-probe rollout of every block (all contexts, the spec's horizon) replayed, the same on the
step loop, and the original model's plain rollouts (its own session: the floor of bench_sweep.py).
The divergences of the two engines must be equal to the bit. Prints microseconds per forward pass
(median over rounds), loop / replay, and each engine's efficiency against the floor of its round.
The floor replayed (the original model on fixed buffers, CUDA graphs on a GPU) is timed once at the end.

    python tools/bench_replay.py MODEL.onnx SPEC.json CONTEXTS.npz [--device cuda] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_args import add_rollout_args  # noqa: E402
from bench_reuse_outputs import one_pass  # noqa: E402
from bench_sweep import floor_rollout, floor_time, replayed_floor_time  # noqa: E402
from tqs_onnx.graph import load_model  # noqa: E402
from tqs_onnx.rollout import Contexts, RolloutSpec  # noqa: E402
from tqs_onnx.runtime import resolve_device  # noqa: E402
from tqs_onnx.sweep import SweepConfig, prepare  # noqa: E402
from tqs_onnx.util import first_line  # noqa: E402
from one_line_errors import run  # noqa: E402  tools/: a user's error is one line, exit 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rollout_args(ap, rounds=6)
    a = ap.parse_args()
    spec = RolloutSpec.load(a.spec)
    contexts = Contexts.load(a.contexts, spec)
    device = resolve_device(a.device)
    os.environ["TQS_REPLAY"] = "on"  # this process only: measure the replay whatever the model's speed
    setup = prepare(load_model(a.model), spec, contexts, device, SweepConfig())
    replay = setup.replay
    if replay is None:
        raise SystemExit(f"{a.model}: no replay ({setup.replay_note})")
    probes = {b.id: {n: setup.ops.quant_probe(setup.bound[n], 8) for n in b.weights} for b in setup.blocks}
    floor_r = floor_rollout(a.model, spec, contexts, device)

    def run(arm: str) -> tuple[float, list[np.ndarray] | None]:
        if arm == "floor":
            return floor_time(floor_r, spec, contexts, device, 1)[0] * 1e6, None
        setup.replay = replay if arm == "replay" else None
        out = one_pass(setup, probes)
        if arm == "replay" and setup.replay is None:  # it fell back: the figures would be the step loop's
            raise SystemExit(f"the replay stopped: {setup.replay_note}")
        setup.replay = replay
        return out

    arms = ["replay", "loop", "floor"]
    times: dict[str, list[float]] = {k: [] for k in arms}
    divs: dict[str, list[np.ndarray] | None] = {}
    for arm in arms:  # warm-up (the replay captures its graphs here)
        run(arm)
    for r in range(a.rounds):
        for arm in arms[r % 3:] + arms[: r % 3]:
            us, d = run(arm)
            times[arm].append(us)
            if d is not None:
                divs[arm] = d
    same = all(np.array_equal(x, y) for x, y in zip(divs["replay"], divs["loop"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    eff = {k: statistics.median(f / t for f, t in zip(times["floor"], times[k])) for k in ("replay", "loop")}
    try:
        replayed, how = replayed_floor_time(a.model, spec, contexts, device, 3)
    except Exception as exc:  # e.g. the original model cannot be captured: keep the rounds' figures
        replayed, how = None, f"not measured: {first_line(exc, 200)}"
    print(f"{a.model.name} on {device.kind}: {len(setup.blocks)} blocks x {setup.horizon} steps x "
          f"{len(setup.nominal)} contexts per round, {a.rounds} rounds (order rotating); replay: {replay.mode}")
    for k in arms:
        print(f"  {k:7s} {med[k]:9.1f} us per forward pass (median; rounds: {', '.join(f'{x:.1f}' for x in times[k])})")
    print(f"  loop / replay: {med['loop'] / med['replay']:.3f}; divergences equal to the bit: {same}")
    print(f"  efficiency against the plain forward pass of the same round (median): replay {eff['replay']:.3f}, "
          f"loop {eff['loop']:.3f}")
    if replayed is None:
        print(f"  floor replayed: {how}")
    else:
        print(f"  floor replayed ({how}): {replayed * 1e6:.1f} us per forward pass; replay efficiency against it "
              f"{replayed * 1e6 / med['replay']:.3f}")


if __name__ == "__main__":
    sys.exit(run(main))
