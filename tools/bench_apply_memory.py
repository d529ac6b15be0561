#!/usr/bin/env python3
"""Peak memory and wall time of `apply`'s transform and save, phase by phase, on one model.

For each plan a fresh Python process does what `tqs-onnx apply` does before verification, through
the same library calls (`load_model`, `rewrite_model`, `save_model`): load the model, rewrite it
(prepare: lift + factor tables; check the plan; each pass; attach the kept weights' data) and save it.
After each phase it reads the kernel's peak-RSS counter (VmHWM, /proc/self/status), then resets it
(/proc/self/clear_refs), so a phase's peak is its own plus what earlier phases still hold. The overall
peak is the largest of them. ONNX Runtime verification is left out: a CPU forward pass of the full
Pangu replica needs ~25 GB; `apply` runs it on the written file, after this path.

Plans are uniform (every quantizable weight of the prepared graph at one tier), built here from the
weight table so no sweep is needed. Prints, and writes to JSON and Markdown, only what it measured.

    python tools/bench_apply_memory.py /tmp/pgfull/pangu_replica_full.onnx \\
        --tiers int8/channel,int4/channel,int2/channel,bf16 --label after
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqs_onnx.runtime_report import proc_memory, reset_peak_rss

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TIERS = "int8/channel,int4/channel,int2/channel,bf16"


# ------------------------------------------------------------------------------------ measuring

@dataclass
class Phase:
    name: str
    seconds: float
    peak_rss_bytes: int  # VmHWM during the phase (everything the process held, not only the phase's own)
    rss_after_bytes: int


@dataclass
class PhaseMeter:
    """Times phases and reads the peak RSS of each; `done(name)` ends one phase and starts the next."""

    phases: list[Phase] = field(default_factory=list)
    per_phase: bool = True
    start_rss_bytes: int = 0

    def __post_init__(self) -> None:
        self.start_rss_bytes = proc_memory().get("VmRSS", 0)
        self.per_phase = reset_peak_rss()
        self._t = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        mem = proc_memory()
        self.phases.append(Phase(name, now - self._t, mem.get("VmHWM", 0), mem.get("VmRSS", 0)))
        self.per_phase = reset_peak_rss() and self.per_phase
        self._t = time.perf_counter()


def child(model_path: Path, plan_path: Path, out: Path, external: bool | None) -> dict[str, Any]:
    """One apply (no verification) in this process, measured phase by phase."""
    from tqs_onnx.graph import load_model
    from tqs_onnx.rewrite import rewrite_model, save_model

    plan = json.loads(plan_path.read_text())
    meter = PhaseMeter()
    loaded = load_model(model_path)
    meter.done("load")
    model, _ = rewrite_model(loaded, plan, str(plan_path), after=meter.done)
    files = save_model(model, out, external)  # `loaded` stays alive here too, as in cmd_apply
    meter.done("save")
    return {"start_rss_bytes": meter.start_rss_bytes, "per_phase": meter.per_phase,
            "phases": [asdict(p) for p in meter.phases], "on_disk_bytes": sum(f.stat().st_size for f in files)}


# ------------------------------------------------------------------------------------ plans

def uniform_plan(loaded, tier: str, factor: bool = True) -> dict[str, Any]:
    """Every quantizable weight of the prepared graph at `tier` (the sweep's weight set and axes)."""
    from tqs_onnx import SCHEMA_VERSION
    from tqs_onnx.graph import weight_table
    from tqs_onnx.prepare import prepare_graph
    from tqs_onnx.sweep import SweepConfig, weight_entry

    prepared = prepare_graph(loaded.model, factor)
    weights = [w for w in weight_table(prepared.model, SweepConfig().min_size, prepared.origins) if w.quantizable]
    return {"schema_version": SCHEMA_VERSION, "kind": "tqs-plan",
            "model": {"path": str(loaded.path), "sha256": loaded.sha256, "file_bytes": loaded.file_bytes},
            "factor": factor, "weights": {w.name: tier for w in weights},
            "weight_info": {w.name: weight_entry(w) for w in weights}}


def write_plans(model: Path, tiers: list[str], factor: bool, work: Path) -> tuple[int, dict[str, Path]]:
    from tqs_onnx.graph import load_model

    loaded = load_model(model)
    paths = {}
    for tier in tiers:
        paths[tier] = work / f"plan-{tier.replace('/', '-')}{'' if factor else '-nofactor'}.json"
        paths[tier].write_text(json.dumps(uniform_plan(loaded, tier, factor)))
    return loaded.file_bytes, paths


# ------------------------------------------------------------------------------------ driver

def run_child(model: Path, plan: Path, out: Path, external: bool | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(plan), "--out", str(out), str(model)]
    if external is not None:
        cmd.append("--external-data" if external else "--inline-data")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    return result


def summarize(tier: str, factor: bool, file_bytes: int, r: dict[str, Any]) -> dict[str, Any]:
    peak = max(p["peak_rss_bytes"] for p in r["phases"])
    return {"plan": f"uniform {tier}{'' if factor else ', no factoring'}", **r,
            "peak_rss_bytes": peak, "peak_over_file": peak / file_bytes,
            "apply_seconds": sum(p["seconds"] for p in r["phases"]),
            "on_disk_compression": file_bytes / r["on_disk_bytes"]}


def print_point(p: dict[str, Any]) -> None:
    phases = "  ".join(f"{q['name']} {q['peak_rss_bytes'] / 2**20:,.0f} MiB/{q['seconds']:.1f}s" for q in p["phases"])
    print(f"{p['plan']:36s} peak {p['peak_rss_bytes'] / 2**20:,.0f} MiB = {p['peak_over_file']:.2f}x file, "
          f"{p['apply_seconds']:.1f} s, {p['on_disk_compression']:.2f}x on disk | {phases}", flush=True)


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# apply: peak RSS and wall time by phase", "",
             f"Written by tools/bench_apply_memory.py. Model `{doc['model']}` ({doc['file_bytes']:,} bytes with "
             "external data). Each plan runs in a fresh process: load, rewrite, save (no ORT verification). "
             "Peak = VmHWM, reset between phases; MiB = 2^20 bytes.", "",
             "| run | plan | peak RSS | peak / file | apply s |", "|---|---|---|---|---|"]
    for label, run in doc["runs"].items():
        lines += [f"| {label} | {p['plan']} | {p['peak_rss_bytes'] / 2**20:,.0f} MiB | {p['peak_over_file']:.2f}x "
                  f"| {p['apply_seconds']:.1f} |" for p in run["points"]]
    lines.append("")
    for label, run in doc["runs"].items():
        start = max(p["start_rss_bytes"] for p in run["points"]) / 2**20
        lines += [f"## {label}", "", f"{run['machine']}; code: {run.get('code', 'not recorded')}; {run['when']}. "
                  f"RSS before loading (interpreter and imports): {start:,.0f} MiB.", ""]
        names = [q["name"] for q in run["points"][0]["phases"]]
        lines += ["| plan | " + " | ".join(names) + " | peak / file | apply s |",
                  "|---" * (len(names) + 3) + "|"]
        for p in run["points"]:
            cells = [f"{q['peak_rss_bytes'] / 2**20:,.0f} MiB, {q['seconds']:.1f} s" for q in p["phases"]]
            peak = f"{p['peak_over_file']:.2f}x ({p['peak_rss_bytes'] / 2**20:,.0f} MiB)"
            lines.append(f"| {p['plan']} | " + " | ".join(cells) + f" | {peak} | {p['apply_seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def code() -> str:
    """Where tqs_onnx was imported from, and the git revision of that checkout (+ 'dirty')."""
    import tqs_onnx

    root = Path(tqs_onnx.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "tqs_onnx", "passes"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{root} at {rev}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return f"{root} (not a git checkout)"


def machine() -> str:
    import google.protobuf
    import onnx

    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return (f"{os.cpu_count()} CPUs, {mem / 2**20:.0f} GiB RAM, Python {platform.python_version()}, "
            f"onnx {onnx.__version__}, protobuf {google.protobuf.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--tiers", default=DEFAULT_TIERS, help="one uniform plan per tier")
    ap.add_argument("--no-factor", dest="factor", action="store_false",
                    help="plans that keep expanded tables as they are (apply --no-factor)")
    ap.add_argument("--label", default="current", help="name of this run in the results file")
    ap.add_argument("--work", type=Path, help="where plans and written models go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the written models")
    ap.add_argument("-o", "--output", type=Path, default=RESULTS / "apply_memory.json",
                    help="results JSON (runs under other labels are kept); the .md goes beside it")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--external-data", dest="external", action="store_true", default=None)
    group.add_argument("--inline-data", dest="external", action="store_false")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.model, a.child, a.out, a.external)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_apply_memory.") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        file_bytes, plans = write_plans(a.model, a.tiers.split(","), a.factor, work)
        points = []
        for tier, plan in plans.items():
            out = work / f"{plan.stem.removeprefix('plan-')}.onnx"
            points.append(summarize(tier, a.factor, file_bytes, run_child(a.model, plan, out, a.external)))
            print_point(points[-1])
            if not a.keep:
                for f in (out, Path(f"{out}.data")):
                    f.unlink(missing_ok=True)
    worst = max(points, key=lambda p: p["peak_rss_bytes"])
    print(f"largest peak: {worst['peak_rss_bytes'] / 2**20:,.0f} MiB = {worst['peak_over_file']:.2f}x the model file "
          f"({file_bytes:,} bytes), {worst['plan']}")
    doc = json.loads(a.output.read_text()) if a.output.exists() else {}
    if doc.get("model") not in (None, str(a.model)):
        doc = {}  # results of another model are not mixed with these
    doc.update({"kind": "tqs-bench-apply-memory", "schema_version": 1, "model": str(a.model), "file_bytes": file_bytes})
    doc.setdefault("runs", {})[a.label] = {"machine": machine(), "code": code(),
                                          "when": time.strftime("%Y-%m-%d %H:%M"), "points": points}
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(doc, indent=1))
    a.output.with_suffix(".md").write_text(markdown(doc))


if __name__ == "__main__":
    main()
