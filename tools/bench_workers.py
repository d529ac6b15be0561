#!/usr/bin/env python3
"""Sweep scaling over Ray workers (issue #8), measured in one run on one model.

Runs the same sweep (`tqs-onnx sweep`, fresh process each) with `--workers 1` (this process, no Ray)
and then with each N in --workers, and prints wall time, speed-up over one worker, parallel
efficiency (speed-up / N) and whether the scores are byte-identical to the one-worker scores (on CPU, workers run
with fewer ORT threads each, so float sums may differ in the last digits: the largest relative
difference of any number in the scores is printed too).
With --device cuda each Ray worker holds one GPU.

    python tools/bench_workers.py MODEL --rollout SPEC --contexts CTX [--workers 2] [--device cuda]
        [--sweep-args "--probes 8 --tiers ''"] [--json out.json]
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
    ap.add_argument("--workers", default="2", help="comma-separated worker counts to compare with 1")
    ap.add_argument("--sweep-args", default="", help="further `tqs-onnx sweep` options, one string")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    extra = shlex.split(a.sweep_args)
    counts = [int(n) for n in a.workers.split(",") if n.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_out = Path(tmp) / "w1.json"
        base = sweep(a.model, a.rollout, a.contexts, a.device, 1, extra, base_out)
        base_bytes = base_out.read_bytes()
        doc = json.loads(base_bytes)
        rows.append({"workers": 1, "seconds": base, "speedup": 1.0, "efficiency": 1.0, "identical": True,
                     "max_rel_diff": 0.0})
        for n in counts:
            out = Path(tmp) / f"w{n}.json"
            s = sweep(a.model, a.rollout, a.contexts, a.device, n, extra, out)
            rows.append({"workers": n, "seconds": s, "speedup": base / s, "efficiency": base / s / n,
                         "identical": out.read_bytes() == base_bytes,
                         "max_rel_diff": max_rel_diff(doc, json.loads(out.read_bytes()))})
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
