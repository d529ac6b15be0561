#!/usr/bin/env python3
"""Cost of the `/gptq` tiers' statistics and rounding on one model, as a sweep pays it.

Times, in one run on one device: the statistics rollouts (`sweep.rollout_moments`: the FP32 model rolled
out on every context, X^T X of each MatMul/Gemm weight's inputs summed in the session), optionally the
same statistics summed on the host from copied activations (`--host`, the path before the thirteenth
session; the two must agree), and the GPTQ rounding of every weight with statistics at each `/gptq` tier.

    python tools/bench_moments.py MODEL.onnx SPEC.json CONTEXTS.npz [--device cuda] [--horizon T] [--host]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
from onnx import numpy_helper

from bench_args import add_rollout_args  # tools/
from tqs_onnx import rounding
from tqs_onnx.graph import load_model, make_blocks, weight_table
from tqs_onnx.prepare import prepare_graph
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import resolve_device
from tqs_onnx.sweep import rollout_moments
from tqs_onnx.tiers import parse_tier

GPTQ_TIERS = ("int8/channel/gptq", "int6/channel/gptq", "int4/channel/gptq", "int2/channel/gptq")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rollout_args(ap, rounds=1)
    ap.add_argument("--horizon", type=int, default=None, help="rollout steps (default: the spec's)")
    ap.add_argument("--host", action="store_true", help="also sum the statistics on the host (slow on large models)")
    ap.add_argument("--tiers", default=",".join(GPTQ_TIERS), help="/gptq tiers to round every weight at")
    a = ap.parse_args()

    device = resolve_device(a.device)
    loaded = load_model(a.model)
    spec = RolloutSpec.load(a.spec)
    contexts = Contexts.load(a.contexts, spec)
    horizon = a.horizon or spec.horizon
    prepared, t_prep = timed(lambda: prepare_graph(loaded.model, True))
    weights = weight_table(prepared.model, origins=prepared.origins)
    names = {n for b in make_blocks(weights) for n in b.weights}
    probed = [w for w in weights if w.name in names]
    print(f"model {a.model.name}: {len(probed)} weights in blocks, {contexts.count} contexts x T={horizon}, "
          f"device {device.kind}; lossless passes {t_prep:.1f} s")

    in_session = []
    gram_nodes = rounding._gram_nodes

    def counted(*args):
        out = gram_nodes(*args)
        in_session.append(len({r.activations[0] for r in out[0].values()}))
        return out

    def gather(grams=counted):
        with mock.patch.object(rounding, "_gram_nodes", grams):
            return rollout_moments(prepared.model, probed, spec, contexts, device, horizon)

    for r in range(a.rounds):
        session, t_session = timed(gather)
        print(f"statistics in the session: {session.forward_passes} forward passes, {t_session:.2f} s "
              f"(round {r + 1}), {len(session.moments)} weights with statistics, "
              f"{in_session[-1]} activations summed in the session")
    if a.host:
        host, t_host = timed(lambda: gather(lambda *args: ({}, {}, [])))
        worst = max((float(np.abs(host.moments[n].h - m.h).max() / max(np.abs(host.moments[n].h).max(), 1e-30))
                     for n, m in session.moments.items()), default=0.0)
        print(f"statistics on the host:     {host.forward_passes} forward passes, {t_host:.2f} s; "
              f"largest relative difference of H: {worst:.2e}")

    values = {i.name: numpy_helper.to_array(i) for i in prepared.model.graph.initializer
              if i.name in session.moments}
    axes = {w.name: (w.channel_axis, w.block_axis) for w in probed}
    total = 0.0
    for text in a.tiers.split(","):
        tier = parse_tier(text.strip())
        _, t = timed(lambda: [session.codes_for(n, v, tier, *axes[n]) for n, v in values.items()])
        total += t
        print(f"rounding at {tier}: {len(values)} weights in {t:.2f} s")
    print(f"rounding in all: {total:.2f} s")


if __name__ == "__main__":
    main()
