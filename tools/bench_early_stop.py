#!/usr/bin/env python3
"""Cheaper sweeps against the full sweep, measured in one run on one model.

Runs the full protocol (1 quant + N Gaussian probes per block over the whole horizon, every block
probed fully: --no-skip-unreached), then the default sweep (blocks whose quant probe and first draw
leave every output bit-identical skip their other draws, and their other tiers where the coarsest
changes nothing too), then that with the paper's sliding-window tolerance
on the Gaussian draws; prints forward passes and time of each and the Spearman rank agreement of
gamma_quant and gamma_gauss with the full sweep.

    python tools/bench_early_stop.py models/zoo/patch_transformer.onnx --tol 0.01 [--probes 8]
    python tools/bench_early_stop.py M.onnx --spec M.rollout.json --contexts C.npz [--tiers int8,int4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scipy.stats import spearmanr

from tqs_onnx.graph import load_model
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import resolve_device
from tqs_onnx.sweep import SweepConfig, run_sweep

from bench_sweep import companion  # tools/ is on sys.path when a tool runs as a script


def sweep(model, spec, ctx, device, **kw) -> tuple[dict, float]:
    t0 = time.perf_counter()
    doc = run_sweep(load_model(model), spec, ctx, device, SweepConfig(**kw), quiet=True)
    return doc, time.perf_counter() - t0


def gammas(doc: dict, probe: str) -> list[float]:
    return [b[probe]["gamma_task"] for b in doc["blocks"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--tol", type=float, default=0.01)
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--horizon-stop", action="store_true", help="also stop rollouts early (--early-horizon)")
    ap.add_argument("--blocks", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--spec", type=Path)
    ap.add_argument("--contexts", type=Path)
    ap.add_argument("--tiers", default="", help="tiers whose damage each sweep also measures (default none)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    spec = RolloutSpec.load(a.spec or companion(a.model, ".rollout.json"))
    ctx = Contexts.load(a.contexts or companion(a.model, "_sweep.npz"), spec)
    device = resolve_device(a.device)
    base = dict(probe="both", probes=a.probes, blocks=a.blocks, tiers=[t for t in a.tiers.split(",") if t])
    full, t_full = sweep(a.model, spec, ctx, device, **base, skip_unreached=False)
    skip, t_skip = sweep(a.model, spec, ctx, device, **base)
    early, t_early = sweep(a.model, spec, ctx, device, **base, early_stop=a.tol, early_window=a.window,
                           early_horizon=a.horizon_stop)
    res = {"model": str(a.model), "blocks": len(full["blocks"]), "horizon": spec.horizon, "tol": a.tol,
           "horizon_stop": a.horizon_stop, "tiers": base["tiers"],
           "unreached_blocks": sum(b["unreached"] for b in skip["blocks"]),
           "full_passes": full["forward_passes"], "skip_passes": skip["forward_passes"],
           "early_passes": early["forward_passes"],
           "skip_saved": 1 - skip["forward_passes"] / full["forward_passes"],
           "passes_saved": 1 - early["forward_passes"] / full["forward_passes"],
           "full_s": t_full, "skip_s": t_skip, "early_s": t_early,
           "skip_scores_equal": [{k: v for k, v in b.items() if k not in ("forward_passes", "unreached")}
                                 for b in skip["blocks"]] ==
                                [{k: v for k, v in b.items() if k not in ("forward_passes", "unreached")}
                                 for b in full["blocks"]]}
    for probe in ("quant", "gauss"):
        for name, doc in (("skip", skip), ("early", early)):
            rho = spearmanr(gammas(full, probe), gammas(doc, probe)).statistic if len(full["blocks"]) > 1 else 1.0
            res[f"spearman_{probe}" if name == "early" else f"spearman_{probe}_skip"] = float(rho)
    print(f"{a.model.name}: {res['blocks']} blocks, T={spec.horizon}, {ctx.count} contexts, 1 quant + {a.probes} gauss"
          f"{' + tiers ' + ','.join(base['tiers']) if base['tiers'] else ''}")
    print(f"  full sweep   {res['full_passes']:>9,} forward passes  {t_full:7.1f} s   (--no-skip-unreached)")
    print(f"  default      {res['skip_passes']:>9,} forward passes  {t_skip:7.1f} s   ({res['unreached_blocks']} blocks "
          f"unreached: saved {res['skip_saved']:.1%}; scores equal to the full sweep's: {res['skip_scores_equal']})")
    print(f"  early stop   {res['early_passes']:>9,} forward passes  {t_early:7.1f} s   (tol {a.tol}, window {a.window}, horizon stop {a.horizon_stop})")
    print(f"  early stop saved {res['passes_saved']:.1%} of the forward passes; Spearman vs full: "
          f"gamma_quant {res['spearman_quant']:.3f}, gamma_gauss {res['spearman_gauss']:.3f}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
