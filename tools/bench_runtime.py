#!/usr/bin/env python3
"""Is the written model a deployable artifact, small AND fast? FP32 against written models, in one run.

For each MODEL: one sweep (quant probe, the default sweep tiers) -> plans at --targets (measured
objective + joint check, as `tqs-onnx demo`) and uniform plans (--uniform) -> apply -> eval on the
eval contexts. Or, with --candidates, the given written models of a single MODEL. Then every model is
measured in a fresh subprocess per device (tqs_onnx.runtime_report): session creation, RSS after load
and peak during calls (/proc VmRSS/VmHWM), latency per call (median of --calls) and per rollout (median
of --rollouts, context 0 of the eval contexts), device memory on CUDA, and the optimized graph (fused
MatMulNBits, DequantizeLinear left, weights decoded per call or expanded at load).

Prints a table with ratios against the FP32 model measured in the same run, and writes
tools/results/runtime.json and runtime.md (runs of other machines/devices are kept unless --fresh).

    python tools/bench_runtime.py models/zoo/patch_transformer.onnx /tmp/pg/pangu_replica_small.onnx \\
        models/lorenz96_mlp.onnx --targets 4,8 [--device cpu,cuda] [--rounds 3]
    python tools/bench_runtime.py M.onnx --candidates a.onnx b.onnx

Companion files beside MODEL: NAME.rollout.json; eval contexts NAME_eval.npz or NAME.contexts.npz;
sweep contexts NAME_sweep.npz (shorter stems tried too: lorenz96_mlp -> lorenz96_eval.npz).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqs_onnx.errors import TqsError
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import resolve_device
from tqs_onnx.runtime_report import MIB, deployment_report, ratios
from tqs_onnx.util import atomic_write, atomic_write_json
from one_line_errors import run  # tools/: a user's error is one line, exit 2

RESULTS = Path(__file__).resolve().parent / "results"
AGGREGATED = ("session_s", "call_ms", "call_ms_min", "rollout_ms", "step_ms", "rss_base_bytes", "rss_load_bytes",
              "load_delta_bytes", "anon_load_delta_bytes", "rss_peak_call_bytes", "peak_call_delta_bytes", "gpu_load_bytes",
              "gpu_after_calls_bytes", "gpu_base_bytes")


# ---------------------------------------------------------------------------------------- inputs

@dataclass
class ModelFiles:
    model: Path
    spec: Path
    eval: Path
    sweep: Path

    @property
    def name(self) -> str:
        return self.model.name[: -len(".onnx")]


def _companion(model: Path, suffixes: tuple[str, ...]) -> Path | None:
    """The first <stem><suffix> beside the model, trying shorter '_'-stems after the full one."""
    parts = model.name[: -len(".onnx")].split("_")
    for i in range(len(parts), 0, -1):
        for suffix in suffixes:
            path = model.with_name("_".join(parts[:i]) + suffix)
            if path.is_file():
                return path
    return None


def resolve_files(model: Path) -> ModelFiles:
    if not model.is_file():
        raise TqsError(f"{model}: no such file")
    spec = model.with_name(model.name[: -len(".onnx")] + ".rollout.json")
    eval_ = _companion(model, ("_eval.npz", ".contexts.npz"))
    if not spec.is_file() or eval_ is None:
        raise TqsError(f"{model}: needs NAME.rollout.json and NAME_eval.npz (or NAME.contexts.npz) beside it")
    return ModelFiles(model, spec, eval_, _companion(model, ("_sweep.npz",)) or eval_)


# ------------------------------------------------------------------------------------ candidates

@dataclass
class Candidate:
    label: str
    path: Path
    tiers: str = ""
    planned: float | None = None
    mae: dict[str, float] = field(default_factory=dict)


def tier_mix(plan: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for b in plan["blocks"]:
        counts[b["tier"]] = counts.get(b["tier"], 0) + 1
    return ", ".join(f"{t} x{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def sweep_scores(files: ModelFiles, spec: RolloutSpec, cache: Path, reuse: bool) -> dict[str, Any]:
    """The one sweep (quant probe, the default sweep tiers), cached beside the candidates."""
    from tqs_onnx.tiers import DEFAULT_SWEEP_TIERS
    from tqs_onnx.graph import load_model
    from tqs_onnx.sweep import SweepConfig, run_sweep
    from tqs_onnx.tiers import parse_tiers

    from tqs_onnx.allocate import load_scores
    from tqs_onnx.errors import TqsError

    if reuse and cache.is_file():
        try:
            scores = load_scores(cache)  # refuses scores of other graph passes: their sizes are stale
            print(f"  reusing the sweep in {cache}", flush=True)
            return scores
        except TqsError as exc:
            print(f"  not reusing {cache}: {exc}", flush=True)
    ctx = Contexts.load(files.sweep, spec)
    t0 = time.perf_counter()
    config = SweepConfig(probe="quant", horizon=spec.horizon, tiers=[str(t) for t in parse_tiers(DEFAULT_SWEEP_TIERS)])
    scores = run_sweep(load_model(files.model), spec, ctx, resolve_device("cpu"), config, quiet=True)
    print(f"  sweep: {len(scores['blocks'])} blocks, {scores['forward_passes']:,} forward passes, "
          f"T={spec.horizon}, {ctx.count} contexts, {time.perf_counter() - t0:.1f} s", flush=True)
    atomic_write_json(cache, scores)
    return scores


def sweep_plans(files: ModelFiles, a: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """One sweep, then the measured objective at each target and the uniform plans."""
    from tqs_onnx.allocate import Allocation, allocate, build_problem, plan_document, sweep_gamma_min
    from tqs_onnx.graph import load_model
    from tqs_onnx.refine import refine
    from tqs_onnx.sweep import joint_divergence, setup_for_scores
    from tqs_onnx.tiers import parse_tiers

    device = resolve_device("cpu")
    spec = RolloutSpec.load(files.spec)
    spec = dataclasses.replace(spec, horizon=min(spec.horizon, a.sweep_horizon))
    scores = sweep_scores(files, spec, work / "scores.json", a.reuse)
    targets, uniform, max_rollouts = a.targets, a.uniform, a.max_rollouts
    setup = setup_for_scores(load_model(files.model), spec, Contexts.load(files.sweep, spec), device, scores)
    plans: dict[str, dict[str, Any]] = {}
    for target in targets:
        try:
            problem, alloc = allocate(scores, target, gptq=False)  # /gptq: other integers, same forms and bytes
        except TqsError as exc:
            print(f"  tqs {target:g}x: {exc}", flush=True)
            continue
        joint = joint_divergence(setup, [b.weights for b in problem.blocks], problem.tiers)
        plans[f"tqs-{target:g}x"] = plan_document(scores, problem, refine(problem, alloc, joint, max_rollouts,
                                                                            gamma_min=sweep_gamma_min(scores)).allocation)
    for tier in uniform:
        problem = build_problem(scores, parse_tiers(f"fp32,{tier}"), 1.0)
        plans[f"uniform-{tier.replace('/', '-')}"] = plan_document(
            scores, problem, Allocation([1] * len(problem.blocks), "uniform", tier))
    for decode in a.also_decode:  # the same tier choices, written in another form
        for name, plan in [(n, p) for n, p in plans.items() if "--" not in n]:
            tiers = parse_tiers(",".join(plan["tiers"]))
            problem = build_problem(scores, tiers, 1.0, decode=decode)
            index = {str(t): k for k, t in enumerate(tiers)}
            assign = [index[b["tier"]] for b in plan["blocks"]]
            plans[f"{name}--{decode}"] = plan_document(scores, problem,
                                                       Allocation(assign, plan["objective"], plan["solver"]))
    return plans


def write_candidates(files: ModelFiles, plans: dict[str, dict[str, Any]], work: Path) -> list[Candidate]:
    from tqs_onnx.evaluate import verify_written
    from tqs_onnx.graph import load_model
    from tqs_onnx.rewrite import rewrite_model, save_model

    loaded = load_model(files.model)
    spec = RolloutSpec.load(files.spec)
    ctx = Contexts.load(files.eval, spec)
    out = []
    for label, plan in plans.items():
        path = work / f"{files.name}.{label}.onnx"
        model, _ = rewrite_model(loaded, plan)
        save_model(model, path)
        try:
            verify_written(path, resolve_device("cpu"), spec, ctx.subset([0]))
        except TqsError as exc:  # a written model the library rejects is no deployable artifact: report, skip
            print(f"  {label}: not measured: {exc}", flush=True)
            continue
        out.append(Candidate(label, path, tier_mix(plan), plan["planned_compression"]))
    return out


def add_accuracy(files: ModelFiles, cands: list[Candidate]) -> None:
    """MAE vs the FP32 rollout on the eval contexts, as the default (deployed) session computes it."""
    from tqs_onnx.evaluate import evaluate

    spec = RolloutSpec.load(files.spec)
    ctx = Contexts.load(files.eval, spec)
    for c in cands:
        report = evaluate(files.model, c.path, spec, ctx, resolve_device("cpu"))
        c.mae = {k: e["mae_vs_fp32"] for k, e in report["outputs"].items()}


def candidates_for(files: ModelFiles, a: argparse.Namespace) -> list[Candidate]:
    """--candidates, or those an earlier run wrote (--measure-only), or new ones from one sweep."""
    work = a.work / files.name
    manifest = work / "manifest.json"
    if a.candidates:
        cands = [Candidate(Path(p).name[: -len(".onnx")], Path(p)) for p in a.candidates]
    elif a.measure_only:
        if not manifest.is_file():
            raise TqsError(f"--measure-only: no {manifest} (run once without it to write the candidates)")
        cands = [Candidate(**{**c, "path": work / c["path"]}) for c in json.loads(manifest.read_text())]
        print(f"  measuring the {len(cands)} candidates listed in {manifest}", flush=True)
        return cands
    else:
        cands = write_candidates(files, sweep_plans(files, a, work), work)
    if not a.no_accuracy:
        add_accuracy(files, cands)
    if not a.candidates:
        atomic_write_json(manifest, [{**dataclasses.asdict(c), "path": c.path.name} for c in cands])
    return cands


# -------------------------------------------------------------------------------------- measuring

def measure_all(files: ModelFiles, cands: list[Candidate], device: str, a: argparse.Namespace) -> list[dict]:
    """Every model in a fresh process, round-robin over --rounds; figures are medians over rounds."""
    spec = RolloutSpec.load(files.spec)
    ctx = Contexts.load(files.eval, spec)
    paths = [files.model, *[c.path for c in cands]]
    runs: list[list[dict]] = [[] for _ in paths]
    for _ in range(a.rounds):
        for i, path in enumerate(paths):
            runs[i].append(deployment_report(path, device, spec, ctx, calls=a.calls, rollouts=a.rollouts,
                                             budget_s=a.budget, threads=a.threads, accuracy_level=a.accuracy_level))
    return [_median_over_rounds(r) for r in runs]


def _median_over_rounds(reports: list[dict]) -> dict:
    out = dict(reports[-1])
    for key in AGGREGATED:
        values = [r[key] for r in reports if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    out["rounds"] = len(reports)
    return out


def result_rows(files: ModelFiles, cands: list[Candidate], reports: list[dict]) -> list[dict]:
    ref = reports[0]
    rows = [{"label": "fp32", "tiers": "fp32", "planned": 1.0, "mae": {}, "report": ref, "ratios": ratios(ref, ref)}]
    for c, rep in zip(cands, reports[1:]):
        rows.append({"label": c.label, "tiers": c.tiers, "planned": c.planned, "mae": c.mae, "report": rep,
                     "ratios": ratios(ref, rep)})
    for r in rows:
        r["on_disk"] = ref["file_bytes"] / r["report"]["file_bytes"]
    return rows


# ------------------------------------------------------------------------------------------ output

def _fig(value: float | None, ratio: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return f"{value:{fmt}}" + (f" ({ratio:.2f}x)" if ratio is not None else "")


def _mb(n: int | None) -> float | None:
    return None if n is None else n / MIB


def table(rows: list[dict], markdown: bool = False) -> str:
    """One row per model: figures with their ratio to FP32 from the same run."""
    head = ["model", "disk", "MAE vs FP32", "session s", "RSS load MB", "trimmed MB", "heap +MB", "peak call MB",
            "call ms",
            "step ms", "NBits", "DQ left", "per call KB", "expanded KB"]
    gpu = any(r["report"].get("gpu_load_bytes") for r in rows)
    if gpu:
        head.insert(8, "GPU MB")
    body = []
    for r in rows:
        rep, q = r["report"], r["ratios"]
        mae = "/".join(f"{v:.3g}" for v in r["mae"].values()) or "-"
        cells = [r["label"], f"{r['on_disk']:.2f}x", mae, _fig(rep["session_s"], q.get("session_s"), ".3f"),
                 _fig(_mb(rep["rss_load_bytes"]), q.get("rss_load_bytes"), ".1f"),
                 _fig(_mb(rep.get("rss_load_trimmed_bytes")), q.get("rss_load_trimmed_bytes"), ".1f"),
                 _fig(_mb(rep["anon_load_delta_bytes"]), q.get("anon_load_delta_bytes"), ".2f"),
                 _fig(_mb(rep["rss_peak_call_bytes"]), q.get("rss_peak_call_bytes"), ".1f"),
                 _fig(rep["call_ms"], q.get("call_ms"), ".3f"), _fig(rep.get("step_ms"), q.get("step_ms"), ".3f"),
                 str(rep["matmulnbits"]), f"{rep['dq_left']}/{rep['dq_written']}",
                 _per_call(rep), f"{rep['expanded_bytes'] / 1024:,.1f}"]
        if gpu:
            cells.insert(8, _fig(_mb(rep.get("gpu_load_bytes")), q.get("gpu_load_bytes"), ".0f"))
        body.append(cells)
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                     for cells in [head, *body])


def _per_call(rep: dict) -> str:
    """Float KB decoded per call, and (when larger) once re-expanded by constant indices."""
    text = f"{rep['per_call_bytes'] / 1024:,.1f}"
    grown = rep.get("per_call_materialized_bytes", 0)
    return text + (f" ({grown / 1024:,.0f})" if grown > rep["per_call_bytes"] else "")


def verdicts(rows: list[dict]) -> list[str]:
    """Per written model: latency per rollout step <= FP32's? RSS after load below FP32's?"""
    out = []
    for r in rows[1:]:
        q = r["ratios"]
        lat = q.get("step_ms", q.get("call_ms"))
        mem, delta = q.get("rss_load_bytes"), q.get("anon_load_delta_bytes")
        trim = f", {q['rss_load_trimmed_bytes']:.3f}x trimmed" if q.get("rss_load_trimmed_bytes") else ""
        out.append(f"{r['label']}: latency {lat:.2f}x FP32 -> {'<= 1.0x' if lat <= 1.0 else 'SLOWER'}; "
                   f"RSS after load {mem:.3f}x{trim} (heap added by the load {delta:.2f}x) -> "
                   f"{'below FP32' if mem < 1.0 else 'NOT below FP32'}; "
                   f"{r['report']['matmulnbits']} MatMulNBits, {r['report']['dq_left']} DQ left, "
                   f"{len(r['report']['per_call'])} weights decoded per call, "
                   f"{len(r['report']['expanded_at_load'])} expanded at load"
                   + (f" [{r['tiers']}]" if r["tiers"] else ""))  # a --candidates file names no tiers
    return out


def per_call_lines(rows: list[dict], top: int = 6) -> list[str]:
    out = []
    for r in rows[1:]:
        for e in r["report"]["per_call"][:top]:
            grown = (f", {e['materialized_bytes'] / 1024:,.1f} KB after {' -> '.join(e['through'])}"
                     if e.get("through") else "")
            out.append(f"{r['label']}: `{e['weight']}` {e['op']} -> {', '.join(e['consumers'])}: "
                       f"{e['bytes'] / 1024:,.1f} KB per call from {e['stored_bytes'] / 1024:,.1f} KB stored{grown}")
        extra = len(r["report"]["per_call"]) - top
        if extra > 0:
            out.append(f"{r['label']}: ... {extra} more")
    return out


def describe(rep: dict) -> str:
    return (f"ORT {rep['ort_version']}, {rep['device']}, {rep['cpu_count']} CPUs, threads "
            f"{rep['threads'] or 'ORT default'}, MatMulNBits accuracy level "
            f"{rep['accuracy_level'] if rep['accuracy_level'] is not None else 'ORT default (4: int8 activations)'}")


def markdown(doc: dict) -> str:
    lines = ["# Runtime: written models against FP32 in ONNX Runtime", "",
             "Generated by `tools/bench_runtime.py`. Each model is measured in a fresh process "
             "(`tqs_onnx.runtime_report`): session creation; RSS after load and peak RSS during the calls "
             "(VmRSS/VmHWM, peak reset before the first call; `heap +MB` = RssAnon added by creating the session, "
             "i.e. without the runtime's code pages); latency per call (median, inputs bound on the "
             "device) and per rollout step (median rollout of eval context 0 / horizon); the graph after ORT's "
             "optimizer. Ratios are against the FP32 model of the same run. `DQ left` = DequantizeLinear nodes "
             "left after optimization / written; `per call KB` = float bytes rebuilt from stored weights on "
             "every call (in brackets: once re-expanded by constant indices, e.g. a factored table's Gather); `expanded KB` = decodes constant-folded at load (held as float in memory).", ""]
    for one in doc["runs"]:
        lines += [f"## {one['model']} on {one['device']} ({one['machine']})", "",
                  f"{describe(one['rows'][0]['report'])}; {one['rounds']} round(s), calls {one['calls']}, "
                  f"rollouts {one['rollouts']}, horizon {one['rows'][0]['report'].get('horizon', '-')}; "
                  f"{one['date']}.", "", table(one["rows"], markdown=True), ""]
        lines += [f"- {v}" for v in verdicts(one["rows"])] + [""]
        decoded = per_call_lines(one["rows"])
        if decoded:
            lines += ["Weights decoded per call:", ""] + [f"- {d}" for d in decoded] + [""]
    return "\n".join(lines)


def save(doc_runs: list[dict], out: Path, fresh: bool) -> Path:
    """Merge with earlier runs (same machine, model and device replaced), write JSON and markdown."""
    path = out / "runtime.json"
    runs = [] if fresh or not path.is_file() else json.loads(path.read_text()).get("runs", [])
    def key(r: dict) -> tuple:
        return r["machine"], r["model"], r["device"], r["rows"][0]["report"]["accuracy_level"]

    keys = {key(r) for r in doc_runs}
    doc = {"kind": "tqs-bench-runtime", "runs": [r for r in runs if key(r) not in keys] + doc_runs}
    atomic_write_json(path, doc)
    atomic_write(out / "runtime.md", lambda p: p.write_text(markdown(doc)))
    return out / "runtime.md"


# -------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, metavar="MODEL")
    ap.add_argument("--candidates", nargs="+", metavar="Q.onnx", help="written models of the one MODEL (no sweep)")
    ap.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",") if x], default=[4.0, 8.0],
                    help="compression targets of the measured objective (default 4,8; unreachable ones skipped)")
    ap.add_argument("--uniform", type=lambda s: [x for x in s.split(",") if x], default=["int8/channel", "int4/channel"],
                    help="uniform tiers written too, as references of each form (default int8/channel,int4/channel)")
    ap.add_argument("--device", default="cpu", help="comma list: cpu, cuda (cuda skipped when no GPU works)")
    ap.add_argument("--calls", type=int, default=50, help="timed calls per model (median reported)")
    ap.add_argument("--rollouts", type=int, default=5, help="timed rollouts per model (median reported; 0: none, "
                                                             "for models whose rollout takes minutes)")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per timing loop before it stops early")
    ap.add_argument("--rounds", type=int, default=1, help="round-robin repeats over the models (medians)")
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--accuracy-level", type=int, help="session.qdq_matmulnbits_accuracy_level (default: ORT's)")
    ap.add_argument("--also-decode", type=lambda s: [x for x in s.split(",") if x], default=[],
                    help="comma list of other writer forms (dq, load, load-compact) to write every plan in too (NAME--dq); "
                         "the plans themselves use the default, auto")
    ap.add_argument("--sweep-horizon", type=int, default=20, help="cap on the sweep's horizon (default 20)")
    ap.add_argument("--max-rollouts", type=int, default=30, help="joint rollouts of the refinement (default 30)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tqs-bench-runtime"), help="where written models go")
    ap.add_argument("--reuse", action="store_true", help="reuse the sweep an earlier run left in --work")
    ap.add_argument("--no-accuracy", action="store_true",
                    help="skip the MAE-vs-FP32 rollouts on the CPU (big models: they cost minutes)")
    ap.add_argument("--build-only", action="store_true", help="write and evaluate the candidates, measure nothing")
    ap.add_argument("--measure-only", action="store_true",
                    help="measure the candidates an earlier run wrote to --work (manifest.json), build nothing")
    ap.add_argument("--machine", default=f"{platform.node() or 'host'}", help="label of this machine in the results")
    ap.add_argument("-o", "--output", type=Path, default=RESULTS, help="folder for runtime.json and runtime.md")
    ap.add_argument("--fresh", action="store_true", help="drop earlier runs from runtime.json")
    a = ap.parse_args(argv)
    if a.candidates and len(a.models) != 1:
        ap.error("--candidates needs exactly one MODEL")
    return a


def devices(names: str) -> list[str]:
    out = []
    for name in names.split(","):
        try:
            out.append(resolve_device(name).kind)
        except TqsError as exc:
            print(f"skipping device {name}: {exc}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    runs = []
    for model in a.models:
        files = resolve_files(model)
        print(f"== {files.name}: {files.model} (spec {files.spec.name}, eval {files.eval.name}, "
              f"sweep {files.sweep.name})", flush=True)
        cands = candidates_for(files, a)
        if a.build_only:
            print("\n".join(f"  {c.label}: {c.path} [{c.tiers}] MAE vs FP32 {c.mae}" for c in cands), flush=True)
            continue
        for device in devices(a.device):
            rows = result_rows(files, cands, measure_all(files, cands, device, a))
            print(f"-- {device}: {describe(rows[0]['report'])}\n{table(rows)}", flush=True)
            print("\n".join(verdicts(rows)), flush=True)
            runs.append({"model": files.name, "path": str(files.model), "device": device, "machine": a.machine,
                         "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": a.rounds, "calls": a.calls,
                         "rollouts": a.rollouts, "rows": [{**r, "report": r["report"]} for r in rows]})
    if runs:
        print(f"wrote {save(runs, a.output, a.fresh)}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
