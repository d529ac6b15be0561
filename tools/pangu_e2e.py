#!/usr/bin/env python3
"""Pangu-class end to end on one replica: lossless factoring, a short sweep, plans at several targets,
apply, verify. Prints and writes (JSON) what it measured: on-disk vs planned compression, finiteness,
apply wall time and peak RSS, bit-identity of the factored model.

Peak RSS per plan (`peak_rss_mb`, `peak_rss_scope` "apply") is the process's peak while that plan is
written (VmHWM reset just before it, Linux >= 4.0): it includes what the process already holds (the
loaded model, ORT sessions), not only apply's own. Where the peak cannot be reset it is the process's
peak so far (ru_maxrss, scope "process so far"), and is printed as that.

    python tools/pangu_e2e.py DIR [--device cuda] [--targets 2,3.57,4,8] [-o results.json]
DIR holds exactly one pangu_replica_*.onnx (+ .data), its .rollout.json and .contexts.npz
(models/pangu_replica.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from tqs_onnx.allocate import Allocation, allocate, plan_document
from tqs_onnx.errors import TqsError
from tqs_onnx.evaluate import verify_written
from tqs_onnx.graph import load_model
from tqs_onnx.prepare import prepare_graph
from tqs_onnx.rewrite import rewrite_model, save_model
from tqs_onnx.rollout import Contexts, Rollout, RolloutSpec
from tqs_onnx.runtime import make_session, resolve_device
from tqs_onnx.runtime_report import proc_memory, reset_peak_rss
from tqs_onnx.sweep import SweepConfig, run_sweep
from one_line_errors import run  # tools/: a user's error is one line, exit 2


def process_peak_rss_mb() -> float:
    """The process's peak RSS (ru_maxrss, KiB on Linux): since it started, or since the last reset of
    VmHWM."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def find_replica(folder: Path) -> Path:
    """The one pangu_replica_*.onnx in folder (several would make the choice arbitrary)."""
    found = sorted(folder.glob("pangu_replica_*.onnx"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise TqsError(f"{folder}: needs exactly one pangu_replica_*.onnx (models/pangu_replica.py -o DIR), "
                       f"found {len(found)}: {names}")
    return found[0]


def one_step(path: Path, spec, ctx, device) -> dict[str, np.ndarray]:
    r = Rollout(make_session(str(path), device), spec, ctx.subset([0]), device)
    return r.trajectory_host(0, horizon=1)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--targets", default="2,3.57,4,8")
    ap.add_argument("--work", type=Path, default=None, help="where written models go (default DIR/e2e)")
    ap.add_argument("--scores", type=Path, help="reuse this scores JSON if it exists (else write it there)")
    ap.add_argument("--contexts-used", type=int, default=0, help="use only the first N contexts")
    ap.add_argument("--skip-factor-check", action="store_true")
    ap.add_argument("--plans", default="measured,paper,uniform", help="which plan families to write")
    ap.add_argument("-o", "--output", type=Path)
    a = ap.parse_args()
    model = find_replica(a.dir)
    stem = model.name[: -len(".onnx")]
    spec = RolloutSpec.load(a.dir / f"{stem}.rollout.json")
    ctx = Contexts.load(a.dir / f"{stem}.contexts.npz", spec)
    spec.horizon = 1
    if a.contexts_used:
        ctx = ctx.subset(slice(0, a.contexts_used))
    device = resolve_device(a.device)
    work = a.work or a.dir / "e2e"
    loaded = load_model(model)
    res: dict = {"model": str(model), "file_bytes": loaded.file_bytes, "device": device.kind, "points": []}
    ref = one_step(model, spec, ctx, device)

    if not a.skip_factor_check:
        res["factored"] = factor_check(loaded, model, spec, ctx, device, work, ref)
    scores = load_or_sweep(a.scores, loaded, spec, ctx, device, res)
    plans = make_plans(scores, a.targets, a.plans.split(","))
    for name, plan in plans:
        res["points"].append(apply_point(name, plan, loaded, spec, ctx, device, work))
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(json.dumps(res, indent=1))


def factor_check(loaded, model, spec, ctx, device, work, ref) -> dict:
    """Lossless factoring alone: on-disk compression and bit-identical outputs."""
    t0 = time.perf_counter()
    factored = prepare_graph(loaded.model, factor=True).model
    save_model(factored, work / "factored.onnx", external=loaded.file_bytes > 1_000_000_000)
    fac = load_model(work / "factored.onnx")
    got = one_step(work / "factored.onnx", spec, ctx, device)
    out = {"on_disk": loaded.file_bytes / fac.file_bytes, "seconds": time.perf_counter() - t0,
           "bit_identical": all(np.array_equal(ref[k], got[k]) for k in ref)}
    print(f"factoring alone: {out['on_disk']:.2f}x on disk, bit-identical {out['bit_identical']}, "
          f"{out['seconds']:.1f} s", flush=True)
    return out


def load_or_sweep(path, loaded, spec, ctx, device, res) -> dict:
    from tqs_onnx.allocate import load_scores
    from tqs_onnx.errors import TqsError

    if path and path.exists():
        try:
            return load_scores(path)  # refuses scores of other graph passes: their sizes are stale
        except TqsError as exc:
            print(f"not reusing {path}: {exc}", flush=True)
    t0 = time.perf_counter()
    config = SweepConfig(probe="quant", horizon=1, tiers=["bf16", "int8", "int4/channel", "int2/channel"])
    scores = run_sweep(loaded, spec, ctx, device, config, quiet=True)
    res["sweep"] = {"blocks": len(scores["blocks"]), "forward_passes": scores["forward_passes"],
                    "seconds": time.perf_counter() - t0}
    print(f"sweep (quant + 4 tiers, T=1, {ctx.count} contexts): {res['sweep']}", flush=True)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(scores))
    return scores


def make_plans(scores, targets: str, families: list[str]) -> list:
    plans = []
    for target in [float(x) for x in targets.split(",")]:
        for objective, tiers in (("measured", None), ("paper", "fp32,bf16,int8")):
            if objective not in families:
                continue
            try:
                problem, alloc = allocate(scores, target, tiers, objective=objective)
                plans.append((f"{objective}-{target:g}x", plan_document(scores, problem, alloc)))
            except TqsError as exc:
                print(f"{objective} {target:g}x: {exc}", flush=True)
    if "uniform" in families:
        problem, _ = allocate(scores, 2.0, "fp32,int8,int4/channel,int2/channel")
        for k, name in ((1, "all-int8"), (2, "all-int4-channel"), (3, "all-int2-channel")):
            plans.append((name, plan_document(scores, problem, Allocation([k] * len(problem.blocks), "uniform", name))))
    return plans


def apply_point(name, plan, loaded, spec, ctx, device, work) -> dict:
    """Write one plan, verify it, measure on-disk vs planned compression, time and peak RSS."""
    peak_reset = reset_peak_rss()
    t0 = time.perf_counter()
    out, _ = rewrite_model(loaded, plan)
    path = work / f"{name}.onnx"
    save_model(out, path, external=loaded.file_bytes > 1_000_000_000)
    del out
    apply_s = time.perf_counter() - t0
    hwm = proc_memory().get("VmHWM") if peak_reset else None
    peak_mb, scope = (hwm / 2**20, "apply") if hwm is not None else (process_peak_rss_mb(), "process so far")
    try:
        verify_written(path, device, spec, ctx.subset([0]))
        finite = True
    except TqsError as exc:
        finite = str(exc)
    on_disk = loaded.file_bytes / load_model(path).file_bytes
    point = {"plan": name, "planned": plan["planned_compression"], "on_disk": on_disk,
             "rel_gap": on_disk / plan["planned_compression"] - 1, "finite": finite,
             "tiers": sorted(set(plan["weights"].values())), "apply_s": apply_s,
             "peak_rss_mb": peak_mb, "peak_rss_scope": scope}
    peak = "peak RSS during apply" if scope == "apply" else "process peak RSS so far"
    print(f"{name:24s} planned {point['planned']:.3f}x on disk {on_disk:.3f}x (gap {point['rel_gap']:+.2%}) "
          f"finite {finite} apply {apply_s:.1f} s {peak} {peak_mb:.0f} MB", flush=True)
    for f in (path, Path(f"{path}.data")):
        f.unlink(missing_ok=True)
    return point


if __name__ == "__main__":
    sys.exit(run(main))
