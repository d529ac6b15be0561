#!/usr/bin/env python3
"""Sweep scaling over Ray workers (issue #8), measured in one run on one model.

Runs the same sweep (`tqs-onnx sweep`, fresh process each) with each N in --workers (1: in process, no
Ray; default 1,2), and prints wall time, speed-up over one worker, parallel
efficiency (speed-up / N) and whether the scores are byte-identical to the one-worker scores (on CPU, workers run
with fewer ORT threads each, so float sums may differ in the last digits: the largest relative
difference of any number in the scores is printed too).
With --device cuda each Ray worker holds one GPU.

    python tools/bench_workers.py MODEL --rollout SPEC --contexts CTX [--workers 1,2] [--device cuda]
        [--sweep-args "--probes 8 --tiers ''"] [--keep DIR] [--json out.json]

With --keep, each count may run in its own invocation (e.g. to stay under a time limit per command).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep(model: str, rollout: str, contexts: str, device: str, workers: int, extra: list[str],
          out: Path) -> float:
    """Seconds of one `tqs-onnx sweep` run in a fresh process."""
    cmd = [sys.executable, "-m", "tqs_onnx.cli", "sweep", model, "--rollout", rollout, "--contexts", contexts,
           "-o", str(out), "--device", device, "--workers", str(workers), "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sweep with --workers {workers} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds


def max_rel_diff(a, b) -> float:
    """Largest relative difference between matching numbers of two JSON documents (inf: other shape)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max((max_rel_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return float("inf")
        return max((max_rel_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b))
    return 0.0 if a == b else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--rollout", required=True)
    ap.add_argument("--contexts", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts to run (1 is the baseline)")
    ap.add_argument("--sweep-args", default="", help="further `tqs-onnx sweep` options, one string")
    ap.add_argument("--keep", type=Path, help="folder for each run's scores and time (wN.json, wN.seconds); runs "
                    "found there from earlier invocations join the table, so each count can run on its own")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    extra = shlex.split(a.sweep_args)
    counts = [int(n) for n in a.workers.split(",") if n.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        keep = a.keep or Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        for n in counts:
            print(f"sweep with --workers {n} ...", file=sys.stderr, flush=True)
            s = sweep(a.model, a.rollout, a.contexts, a.device, n, extra, keep / f"w{n}.json")
            (keep / f"w{n}.seconds").write_text(f"{s}\n")
            print(f"  {s:.1f} s", file=sys.stderr, flush=True)
        runs = {int(p.stem[1:]): (float(p.read_text()), (keep / f"w{p.stem[1:]}.json").read_bytes())
                for p in keep.glob("w*.seconds") if (keep / f"w{p.stem[1:]}.json").exists()}
    if 1 not in runs:
        raise SystemExit("no one-worker run to compare with: run --workers 1 (with the same --keep) first")
    base, base_bytes = runs[1]
    doc = json.loads(base_bytes)
    rows = [{"workers": n, "seconds": sec, "speedup": base / sec, "efficiency": base / sec / n,
             "identical": data == base_bytes, "max_rel_diff": max_rel_diff(doc, json.loads(data))}
            for n, (sec, data) in sorted(runs.items())]
    print(f"{a.model}: {len(doc.get('blocks', []))} blocks, {doc.get('forward_passes', '?')} forward passes, "
          f"device {a.device}")
    print(f"{'workers':>7s} {'seconds':>9s} {'speed-up':>9s} {'efficiency':>11s} {'scores identical':>17s} {'max rel diff':>13s}")
    for r in rows:
        print(f"{r['workers']:7d} {r['seconds']:9.1f} {r['speedup']:8.2f}x {r['efficiency']:11.2f} "
              f"{str(r['identical']):>17s} {r['max_rel_diff']:13.1e}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "device": a.device, "sweep_args": a.sweep_args,
                                            "blocks": len(doc.get("blocks", [])),
                                            "forward_passes": doc.get("forward_passes"), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
