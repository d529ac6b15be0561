#!/usr/bin/env python3
"""Accuracy benchmark: TQS-PTQ against uniform RTN at matched on-disk size, on held-out contexts.

For each model, ONE sweep on the sweep contexts (both probes, damage of every tier), then:

1. uniform RTN baselines: all blocks at one tier (int8, int8/channel, int6/channel, int4, int4/channel,
   int2, int2/channel, int1, int1/channel), written with the library's writer (int6 as an int4 high
   part plus a uint2 low part);
2. at each uniform per-channel model's on-disk size (and at 16x / 32x where reachable): TQS-PTQ
   default (measured objective, MCKP, joint check + local search) and the paper's Algorithm 2
   (MCKP and greedy, on gamma_quant and on gamma_gauss);
3. every written model evaluated on the EVAL contexts (never seen by the sweep).

Writes tools/results/accuracy.md and accuracy.json (merged with earlier runs unless --fresh).

    python tools/bench_accuracy.py models/lorenz96_mlp.onnx models/zoo/*.onnx [--quick]
    python tools/bench_accuracy.py M.onnx --spec M.rollout.json --sweep S.npz --eval E.npz

Win convention (the paper's): at a matched point a TQS method wins a variable (one channel of a
trajectory output) when its MAE vs truth (vs FP32 where there is no truth) is below that of EVERY
uniform baseline that fits the same byte budget (on-disk bytes <= the point's budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.stats import spearmanr

from tqs_onnx.allocate import Allocation, Problem, allocate, build_problem, plan_document, sweep_gamma_min
from tqs_onnx.tiers import DEFAULT_SWEEP_TIERS
from tqs_onnx.errors import TqsError
from tqs_onnx.evaluate import evaluate, verify_written
from tqs_onnx.graph import LoadedModel, load_model
from tqs_onnx.refine import refine
from tqs_onnx.rewrite import rewrite_model, save_model
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import Device, resolve_device
from tqs_onnx.sweep import SweepConfig, SweepSetup, joint_divergence, plan_codes, run_sweep, setup_for_scores
from tqs_onnx.tiers import parse_tiers

SWEEP_TIERS = DEFAULT_SWEEP_TIERS.split(",")  # the tiers `tqs-onnx sweep` measures by default
UNIFORM_TIERS = ["int8", "int8/channel", "int6/channel", "int4", "int4/channel", "int2", "int2/channel", "int1", "int1/channel"]
MATCHED_TIERS = ["int8/channel", "int6/channel", "int4/channel", "int2/channel", "int1/channel"]
SWEEP_TIERS_EXTRA = ["int1", "int1/channel"]  # opt-in tiers, so that the 1-bit sizes are reachable
FIXED_TARGETS = [16.0, 32.0]
PAPER_TIERS = "fp32,bf16,int8,int4,int2"
PAPER_METHODS = [(probe, solver) for probe in ("quant", "gauss") for solver in ("mckp", "greedy")]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
QUICK_HORIZON = 50


# ------------------------------------------------------------------------------------------ inputs

@dataclass
class ModelFiles:
    model: Path
    spec: Path
    sweep: Path
    eval: Path

    @property
    def name(self) -> str:
        return self.model.name[: -len(".onnx")] if self.model.name.endswith(".onnx") else self.model.stem


def stem_candidates(stem: str) -> list[str]:
    """'lorenz96_mlp' -> ['lorenz96_mlp', 'lorenz96']: contexts may drop the model-kind suffix."""
    parts = stem.split("_")
    return ["_".join(parts[:i]) for i in range(len(parts), 0, -1)]


def companion(model: Path, suffix: str) -> Path:
    """The file beside `model` named <stem><suffix>, trying shorter stems after the full one."""
    stem = model.name[: -len(".onnx")]
    for cand in stem_candidates(stem):
        path = model.with_name(f"{cand}{suffix}")
        if path.exists():
            return path
    raise TqsError(f"{model}: no {stem}{suffix} (or a shorter-stem variant) beside it; pass --spec/--sweep/--eval")


def resolve_files(model: Path, spec: Path | None, sweep: Path | None, eval_: Path | None) -> ModelFiles:
    """Explicit overrides first, then the companions next to the model."""
    if not model.is_file():
        raise TqsError(f"{model}: no such file")
    return ModelFiles(model, spec or model.with_name(f"{model.name[: -len('.onnx')]}.rollout.json"),
                      sweep or companion(model, "_sweep.npz"), eval_ or companion(model, "_eval.npz"))


def load_spec(path: Path, horizon: int | None, cap: int | None = None) -> RolloutSpec:
    """The rollout spec, its horizon replaced when overridden or capped (sweep, joint check and eval alike)."""
    spec = RolloutSpec.load(path)
    horizon = horizon or (min(spec.horizon, cap) if cap else None)
    return dataclasses.replace(spec, horizon=horizon) if horizon else spec


# ------------------------------------------------------------------------------------------ sweep

def sweep_model(loaded: LoadedModel, spec: RolloutSpec, ctx: Contexts, device: Device,
                probes: int, blocks: str) -> tuple[dict[str, Any], float]:
    """The one sweep of this model: both probes and the measured damage of every sweep tier."""
    config = SweepConfig(probe="both", probes=probes, tiers=[*SWEEP_TIERS, *SWEEP_TIERS_EXTRA], blocks=blocks)
    t0 = time.perf_counter()
    scores = run_sweep(loaded, spec, ctx, device, config, quiet=True)
    return scores, time.perf_counter() - t0


def gamma_spearman(scores: dict[str, Any]) -> dict[str, Any]:
    """Spearman rho of gamma_gauss vs gamma_quant over blocks (None where undefined: < 2 blocks, constant ranks)."""
    q = [b["quant"]["gamma_task"] for b in scores["blocks"] if b.get("quant") and b.get("gauss")]
    g = [b["gauss"]["gamma_task"] for b in scores["blocks"] if b.get("quant") and b.get("gauss")]
    if len(q) < 2:
        return {"blocks": len(q), "rho": None, "p": None}
    res = spearmanr(g, q)
    rho, p = float(res.statistic), float(res.pvalue)
    return {"blocks": len(q), "rho": None if math.isnan(rho) else rho, "p": None if math.isnan(p) else p}


def block_table(scores: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-block gammas, as recorded by the sweep."""
    return [{"id": b["id"], "name": b["name"], "size": b["size"], "dead": b["dead"],
             "gamma_quant": b["quant"]["gamma_task"] if b.get("quant") else None,
             "gamma_gauss": b["gauss"]["gamma_task"] if b.get("gauss") else None} for b in scores["blocks"]]


# ------------------------------------------------------------------------------------------ plans

def uniform_plan(scores: dict[str, Any], tier: str) -> dict[str, Any]:
    """Every block at `tier` (the demo's way: a Problem over the sweep tiers and a fixed assignment)."""
    problem = build_problem(scores, parse_tiers(",".join(["fp32", *SWEEP_TIERS, *SWEEP_TIERS_EXTRA])), 1.0)
    k = next(i for i, t in enumerate(problem.tiers) if str(t) == tier)
    return plan_document(scores, problem, Allocation([k] * len(problem.blocks), "uniform", tier))


def measured_plan(scores: dict[str, Any], target: float, setup: SweepSetup, max_rollouts: int) -> dict[str, Any]:
    """TQS-PTQ default: measured damage, MCKP, then joint check against uniform + local search. A plan
    with /gptq tiers carries their integers under 'codes' (what `allocate` writes beside the plan)."""
    problem, alloc = allocate(scores, target)
    refined = refine(problem, alloc, joint_factory(setup)(problem), max_rollouts, gamma_min=sweep_gamma_min(scores))
    plan = plan_document(scores, problem, refined.allocation)
    plan["codes"] = plan_codes(setup, plan["weights"])
    plan["bench"] = {"start": refined.start, "joint": refined.joint, "joint_rollouts": refined.rollouts,
                     "accepted_moves": refined.accepted_moves, "uniform_joint": refined.uniform,
                     "allocator_joint": refined.allocator, "challengers_joint": refined.challengers}
    return plan


def paper_plan(scores: dict[str, Any], target: float, probe: str, solver: str, fp32_share: float) -> dict[str, Any]:
    """The paper's Algorithm 2 on gamma_<probe> with per-tensor tiers."""
    problem, alloc = allocate(scores, target, PAPER_TIERS, objective="paper", solver=solver,
                              fp32_share=fp32_share, probe=probe)
    return plan_document(scores, problem, alloc)


def joint_factory(setup: SweepSetup) -> Callable[[Problem], Callable]:
    """Joint-rollout functions on the sweep contexts, one per problem's tier list."""
    return lambda problem: joint_divergence(setup, [b.weights for b in problem.blocks], problem.tiers)


# ------------------------------------------------------------------------------------------ points

@dataclass
class Bench:
    """What every point of one model needs."""

    loaded: LoadedModel
    spec: RolloutSpec
    eval_ctx: Contexts
    device: Device
    out_dir: Path


def tier_mix(plan: dict[str, Any]) -> str:
    """'int4/channel x2, bf16 x1': the tiers a plan uses, most frequent first."""
    counts: dict[str, int] = {}
    for b in plan["blocks"]:
        counts[b["tier"]] = counts.get(b["tier"], 0) + 1
    return ", ".join(f"{t} x{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def output_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """Per trajectory output: MAE vs FP32 / truth, degradation, and the per-variable metric used for wins."""
    out = {}
    for name, e in report["outputs"].items():
        has_truth = "mae_vs_truth" in e
        out[name] = {"mae_fp32": e["mae_vs_fp32"], "mae_truth": e.get("mae_vs_truth"),
                     "fp32_truth": e.get("mae_fp32_vs_truth"), "degradation_pct": e.get("degradation_pct"),
                     "finite": e["finite"], "metric": "truth" if has_truth else "fp32",
                     "per_variable": e["mae_vs_truth_per_channel"] if has_truth else e["mae_vs_fp32_per_channel"]}
    return out


def write_and_eval(bench: Bench, plan: dict[str, Any], tag: str) -> dict[str, Any]:
    """Apply the plan, save, verify, evaluate on the eval contexts; return the measurements."""
    path = bench.out_dir / f"{bench.loaded.path.name[:-5]}.{tag}.onnx"
    model, _ = rewrite_model(bench.loaded, plan, codes=plan.get("codes"))
    save_model(model, path)
    diverged = not verified(path, bench)
    report = evaluate(bench.loaded.path, path, bench.spec, bench.eval_ctx, bench.device)
    diverged = diverged or not all(m["finite"] for m in report["outputs"].values())
    return {"bytes": report["compression"]["candidate_bytes"], "on_disk": report["compression"]["on_disk"],
            "param_level": report["compression"]["param_level"], "diverged": diverged,
            "outputs": output_metrics(report)}


def verified(path: Path, bench: Bench) -> bool:
    """The library's checks (checker, ORT load, one rollout); False only when the rollout is non-finite.

    A diverging quantized model is a result, not a failure: it is still evaluated (its MAE is nan,
    ranked as infinitely bad), so a diverging baseline stays in the comparison.
    """
    try:
        verify_written(path, bench.device, bench.spec, bench.eval_ctx.subset(slice(0, 1)))
    except TqsError as exc:
        if "non-finite" not in str(exc):
            raise
        return False
    return True


def file_tag(label: str, method: str) -> str:
    """'=int4/channel', 'paper quant/mckp' -> 'at-int4-channel.paper-quant-mckp' (a safe file name part)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", f"{label.replace('=', 'at-')}.{method}").strip("-")


def run_point(bench: Bench, method: str, label: str, target: float | None, budget_bytes: int | None,
              make_plan: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Allocate + apply + eval one point, timed; a TqsError (e.g. unreachable) is recorded, not raised."""
    point: dict[str, Any] = {"method": method, "label": label, "target": target, "budget_bytes": budget_bytes}
    t0 = time.perf_counter()
    try:
        plan = make_plan()
        point.update(planned=plan["planned_compression"], planned_bytes=plan["planned_bytes"],
                     tiers=tier_mix(plan), notes=plan["notes"])
        if "bench" in plan:
            point["refine"] = plan["bench"]
        point.update(write_and_eval(bench, plan, file_tag(label, method)))
    except TqsError as exc:
        point["error"] = str(exc)
    except Exception as exc:  # a library bug must not hide the other points; it is reported
        point["error"] = f"BUG {type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    point["seconds"] = time.perf_counter() - t0
    return point


def uniform_points(bench: Bench, scores: dict[str, Any]) -> list[dict[str, Any]]:
    """Every single-tier RTN model (written, int6 included), then ONNX Runtime's own weight quantizers."""
    points = [run_point(bench, f"uniform {t}", "uniform", None, None, lambda t=t: uniform_plan(scores, t))
              for t in UNIFORM_TIERS]
    return [*points, *ort_points(bench)]


def _ort_dynamic_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def _ort_matmul_4bits(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst))


ORT_QUANTIZERS = {"ort dynamic-int8": _ort_dynamic_int8, "ort matmulnbits-4bit": _ort_matmul_4bits}


def ort_points(bench: Bench) -> list[dict[str, Any]]:
    """ONNX Runtime's weight quantizers as baselines: dynamic INT8 (MatMulInteger/ConvInteger) and
    4-bit blocked MatMul (MatMulNBits, block 32). Where one does not apply, the error is recorded."""
    points = []
    for method, quantize in ORT_QUANTIZERS.items():
        point: dict[str, Any] = {"method": method, "label": "uniform", "target": None, "budget_bytes": None}
        t0 = time.perf_counter()
        path = bench.out_dir / f"{bench.loaded.path.name[:-5]}.{file_tag('ort', method)}.onnx"
        try:
            quantize(bench.loaded.path, path)
            diverged = not verified(path, bench)
            report = evaluate(bench.loaded.path, path, bench.spec, bench.eval_ctx, bench.device)
            point.update(bytes=report["compression"]["candidate_bytes"], on_disk=report["compression"]["on_disk"],
                         planned=report["compression"]["on_disk"], planned_bytes=report["compression"]["candidate_bytes"],
                         param_level=report["compression"]["param_level"], tiers=method,
                         diverged=diverged or not all(m["finite"] for m in report["outputs"].values()),
                         outputs=output_metrics(report))
        except Exception as exc:  # ORT's quantizers refuse some graphs: a result to report, not a crash
            point["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        point["seconds"] = time.perf_counter() - t0
        points.append(point)
    return points


@dataclass
class Matched:
    """One matched point: its label, the reported target, the on-disk byte budget and the solver's."""

    label: str
    target: float
    budget: int  # TQS must be no larger on disk; baselines that fit it are compared
    solver_budget: int  # what the allocator is given (the uniform's planned bytes with --budget planned)


def matched_targets(file_bytes: int, uniforms: list[dict[str, Any]], budget_from: str) -> list[Matched]:
    """Each per-channel uniform's on-disk size, then 16x and 32x."""
    out = []
    for p in uniforms:
        tier = p["method"].split(" ", 1)[1]
        if tier in MATCHED_TIERS and "bytes" in p:
            solver = p["planned_bytes"] if budget_from == "planned" else p["bytes"]
            out.append(Matched(f"={tier}", file_bytes / p["bytes"], p["bytes"], solver))
    out += [Matched(f"{x:g}x", x, int(file_bytes / x), int(file_bytes / x)) for x in FIXED_TARGETS]
    return out


def solver_target(file_bytes: int, budget_bytes: int) -> float:
    """A target whose budget int(file_bytes / target) is exactly `budget_bytes` despite float rounding."""
    return file_bytes / (budget_bytes + 0.5)


def tqs_points(bench: Bench, scores: dict[str, Any], m: Matched, setup: SweepSetup,
               max_rollouts: int, fp32_share: float) -> list[dict[str, Any]]:
    """TQS default and the four paper variants at one matched size."""
    t = solver_target(scores["model"]["file_bytes"], m.solver_budget)
    points = [run_point(bench, "tqs measured", m.label, m.target, m.budget,
                        lambda: measured_plan(scores, t, setup, max_rollouts))]
    for probe, solver in PAPER_METHODS:
        points.append(run_point(bench, f"paper {probe}/{solver}", m.label, m.target, m.budget,
                                lambda p=probe, s=solver: paper_plan(scores, t, p, s, fp32_share)))
    return points


# ------------------------------------------------------------------------------------------ verdicts

def variable_names(point: dict[str, Any]) -> list[tuple[str, int]]:
    return [(o, c) for o, m in point["outputs"].items() for c in range(len(m["per_variable"]))]


def variable_value(point: dict[str, Any], var: tuple[str, int]) -> float:
    v = point["outputs"][var[0]]["per_variable"][var[1]]
    return v if v is not None and math.isfinite(v) else math.inf


def fitting_baselines(uniforms: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Uniform models no larger on disk than the point's budget."""
    return [u for u in uniforms if "outputs" in u and u["bytes"] <= budget]


def win_count(point: dict[str, Any], baselines: list[dict[str, Any]]) -> dict[str, Any]:
    """Variables where `point` beats every baseline (strictly lower MAE)."""
    names = variable_names(point)
    won = [v for v in names if all(variable_value(point, v) < variable_value(b, v) for b in baselines)]
    return {"won": len(won), "total": len(names), "baselines": [b["method"] for b in baselines]}


def mean_metric(point: dict[str, Any]) -> float:
    """Mean over outputs of the MAE used for wins (vs truth, else vs FP32)."""
    vals = [m["mae_truth"] if m["metric"] == "truth" else m["mae_fp32"] for m in point["outputs"].values()]
    vals = [v if v is not None and math.isfinite(v) else math.inf for v in vals]
    return float(np.mean(vals))


def wins_by_point(points: list[dict[str, Any]], uniforms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paper-convention win counts of every TQS method at every matched point."""
    rows = []
    for p in points:
        if "outputs" not in p:
            continue
        base = fitting_baselines(uniforms, p["budget_bytes"])
        row = {"label": p["label"], "method": p["method"], "size_ok": p["bytes"] <= p["budget_bytes"]}
        row.update(win_count(p, base) if base else {"won": None, "total": len(variable_names(p)), "baselines": []})
        rows.append(row)
    return rows


def compare_status(tqs: float, uniform: float) -> str:
    """'beat', 'tied' or 'lost' on the mean MAE (a diverged model counts as infinitely bad)."""
    return "beat" if tqs < uniform else ("tied" if tqs == uniform else "lost")


def default_vs_uniform(points: list[dict[str, Any]], uniforms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At each per-channel matched size: did TQS measured beat that uniform per-channel model?"""
    by_tier = {u["method"].split(" ", 1)[1]: u for u in uniforms if "outputs" in u}
    rows = []
    for p in points:
        if p["method"] != "tqs measured" or not p["label"].startswith("="):
            continue
        tier = p["label"][1:]
        u = by_tier[tier]
        row = {"label": p["label"], "uniform": f"uniform {tier}", "uniform_mae": mean_metric(u)}
        if "outputs" in p:
            wc = win_count(p, [u])
            row.update(tqs_mae=mean_metric(p), status=compare_status(mean_metric(p), mean_metric(u)),
                       variables_won=wc["won"], variables=wc["total"],
                       no_larger=p["bytes"] <= u["bytes"], tqs_bytes=p["bytes"], uniform_bytes=u["bytes"])
        else:
            row.update(tqs_mae=None, status="no model", error=p.get("error"))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ model

def bench_model(files: ModelFiles, args: argparse.Namespace, device: Device, out_dir: Path) -> dict[str, Any]:
    """The whole benchmark for one model."""
    t0 = time.perf_counter()
    spec = load_spec(files.spec, args.horizon, QUICK_HORIZON if args.quick else None)
    loaded = load_model(files.model)
    sweep_ctx, eval_ctx = Contexts.load(files.sweep, spec), Contexts.load(files.eval, spec)
    log(f"[{files.name}] sweep: {sweep_ctx.count} contexts, T={spec.horizon}, probes={args.probes}, "
        f"blocks={args.blocks}")
    scores, sweep_s = sweep_model(loaded, spec, sweep_ctx, device, args.probes, args.blocks)
    log(f"[{files.name}] sweep done: {len(scores['blocks'])} blocks, {scores['forward_passes']:,} forward passes, "
        f"{sweep_s:.1f} s")
    setup = setup_for_scores(loaded, spec, sweep_ctx, device, scores)
    bench = Bench(loaded, spec, eval_ctx, device, out_dir)
    uniforms = uniform_points(bench, scores)
    log_points(files.name, uniforms)
    points = []
    for matched in matched_targets(loaded.file_bytes, uniforms, args.budget):
        new = tqs_points(bench, scores, matched, setup, args.max_rollouts, args.fp32_share)
        log_points(files.name, new)
        points += new
    return {
        "model": str(files.model), "spec": str(files.spec), "sweep_contexts": str(files.sweep),
        "eval_contexts": str(files.eval), "file_bytes": loaded.file_bytes, "horizon": spec.horizon,
        "n_sweep": sweep_ctx.count, "n_eval": eval_ctx.count, "probes": args.probes, "blocks": args.blocks,
        "max_rollouts": args.max_rollouts, "budget_from": args.budget, "sweep_tiers": [*SWEEP_TIERS, *SWEEP_TIERS_EXTRA],
        "planner_mismatch": planner_mismatch([*uniforms, *points]),
        "n_blocks": len(scores["blocks"]), "sweep_seconds": sweep_s, "sweep_forward_passes": scores["forward_passes"],
        "joint_forward_passes": setup.rollout.forward_passes, "gammas": block_table(scores),
        "spearman_gauss_quant": gamma_spearman(scores), "uniform": uniforms, "points": points,
        "wins": wins_by_point(points, uniforms), "default_vs_uniform": default_vs_uniform(points, uniforms),
        "seconds": time.perf_counter() - t0, "fp32_truth": fp32_truth(uniforms),
    }


def planner_mismatch(points: list[dict[str, Any]]) -> list[str]:
    """Points whose planned bytes differ from the bytes written (the planner claims they agree)."""
    return [f"{p['label']} {p['method']}: planned {p['planned_bytes']:,} B, on disk {p['bytes']:,} B"
            for p in points if "bytes" in p and p["planned_bytes"] != p["bytes"]]


def fp32_truth(uniforms: list[dict[str, Any]]) -> dict[str, float | None]:
    """FP32's own MAE vs truth per output (from any evaluated point; it is the same for all)."""
    for u in uniforms:
        if "outputs" in u:
            return {o: m["fp32_truth"] for o, m in u["outputs"].items()}
    return {}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def log_points(name: str, points: list[dict[str, Any]]) -> None:
    for p in points:
        what = f"{p['on_disk']:.2f}x metric={mean_metric(p):.4g}" if "outputs" in p else p.get("error", "?")
        log(f"[{name}] {p['label']:>14} {p['method']:22s} {what} ({p['seconds']:.1f} s)")


# ------------------------------------------------------------------------------------------ report

def fmt(v: float | None, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    return format(v, spec) if math.isfinite(v) else str(v)


def joined(p: dict[str, Any], key: str, spec: str = ".4f") -> str:
    """One value per trajectory output, joined by ' / ' when a model has several."""
    return " / ".join(fmt(m[key], spec) for m in p["outputs"].values())


def point_row(p: dict[str, Any]) -> str:
    target = "-" if p["target"] is None else f"{p['target']:.2f}x"
    if "outputs" not in p:
        return (f"| {p['label']} | {p['method']} | {target} | - | - | - | - | - | {p['seconds']:.1f} | "
                f"{p.get('error', '')[:140]} |")
    extra = ("DIVERGED (non-finite rollout); " if p["diverged"] else "") + p["tiers"]
    if "refine" in p:
        extra += f"; start {p['refine']['start']}, {p['refine']['joint_rollouts']} joint rollouts"
    return (f"| {p['label']} | {p['method']} | {target} | {p['planned']:.2f}x | {p['on_disk']:.2f}x | "
            f"{joined(p, 'mae_fp32')} | {joined(p, 'mae_truth')} | {joined(p, 'degradation_pct', '+.1f')} | "
            f"{p['seconds']:.1f} | {extra} |")


def unreachable_row(label: str, points: list[dict[str, Any]]) -> str:
    """One row for a target no method can reach (the achievable range is the same for all)."""
    reach = re.search(r"achievable .*", points[0]["error"])
    return (f"| {label} | all {len(points)} methods | {points[0]['target']:.2f}x | - | - | - | - | - | - | "
            f"not reachable ({reach.group(0) if reach else points[0]['error']}) |")


def points_table(res: dict[str, Any]) -> list[str]:
    lines = ["| point | method | target | planned | on disk | MAE vs FP32 | MAE vs truth | degr. % | s | tiers / notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [point_row(p) for p in res["uniform"]]
    for label in dict.fromkeys(p["label"] for p in res["points"]):
        group = [p for p in res["points"] if p["label"] == label]
        if all("not reachable" in p.get("error", "") for p in group):
            lines.append(unreachable_row(label, group))
        else:
            lines += [point_row(p) for p in group]
    return lines


def wins_table(res: dict[str, Any]) -> list[str]:
    lines = ["| point | method | variables won | vs baselines (all uniform models that fit) | no larger than budget |",
             "|---|---|---|---|---|"]
    for w in res["wins"]:
        won = "n/a (no uniform model fits)" if w["won"] is None else f"{w['won']}/{w['total']}"
        lines.append(f"| {w['label']} | {w['method']} | {won} | {', '.join(w['baselines']) or '-'} | "
                     f"{'yes' if w['size_ok'] else 'NO'} |")
    return lines


def verdict_lines(res: dict[str, Any]) -> list[str]:
    lines = []
    for v in res["default_vs_uniform"]:
        if v["status"] == "no model":
            lines.append(f"- {v['label']}: TQS measured has no model ({v.get('error')})")
            continue
        word = {"beat": "BEAT", "tied": "TIED WITH", "lost": "LOST TO"}[v["status"]]
        lines.append(f"- {v['label']}: TQS measured {word} {v['uniform']}: mean MAE {fmt(v['tqs_mae'])} vs "
                     f"{fmt(v['uniform_mae'])} ('-' = diverged); lower on {v['variables_won']}/{v['variables']} "
                     f"variables; {v['tqs_bytes']:,} vs {v['uniform_bytes']:,} bytes")
    return lines


def win_totals(res: dict[str, Any]) -> list[str]:
    """Per TQS method, summed over matched points with a baseline."""
    tot: dict[str, list[int]] = {}
    for w in res["wins"]:
        if w["won"] is not None:
            acc = tot.setdefault(w["method"], [0, 0, 0])
            acc[0] += w["won"]
            acc[1] += w["total"]
            acc[2] += 1
    return [f"- {m}: {a[0]}/{a[1]} variables over {a[2]} matched points" for m, a in tot.items()]


def model_markdown(name: str, res: dict[str, Any]) -> str:
    sp = res["spearman_gauss_quant"]
    metric = next((m["metric"] for p in res["uniform"] if "outputs" in p for m in p["outputs"].values()), "?")
    head = [f"## {name}", "",
            f"`{res['model']}`: {res['file_bytes']:,} bytes, {res['n_blocks']} blocks ({res['blocks']}), "
            f"T={res['horizon']}, {res['n_sweep']} sweep / {res['n_eval']} eval contexts, "
            f"{res['probes']} Gaussian probes. Sweep tiers: {', '.join(res.get('sweep_tiers', []))}.",
            f"Sweep: {res['sweep_seconds']:.1f} s, {res['sweep_forward_passes']:,} forward passes "
            f"(joint checks: {res['joint_forward_passes']:,} more). Whole model: {res['seconds']:.0f} s.",
            f"FP32 MAE vs truth: {', '.join(f'{k}={fmt(v)}' for k, v in res['fp32_truth'].items()) or '-'}. "
            f"Win metric: MAE vs {metric}.",
            f"Spearman rho(gamma_gauss, gamma_quant) over {sp['blocks']} blocks: {fmt(sp['rho'], '.3f')} "
            f"(p={fmt(sp['p'], '.3g')}).",
            f"Solver budget at matched points: the uniform model's {res['budget_from']} bytes; "
            f"joint check: up to {res['max_rollouts']} rollouts.", ""]
    if res["planner_mismatch"]:
        head += ["Planned bytes != bytes on disk (library planner):", "",
                 *[f"- {m}" for m in res["planner_mismatch"]], ""]
    return "\n".join([*head, *points_table(res), "", "Win counts (paper convention):", "", *wins_table(res), "",
                      "Totals:", *win_totals(res), "", "TQS default vs uniform per-channel at its size:",
                      *verdict_lines(res), ""])


def mean_fp32(point: dict[str, Any]) -> float:
    """Mean over outputs of the MAE against the FP32 model's own rollout (what the sweep measures)."""
    vals = [m["mae_fp32"] for m in point["outputs"].values()]
    return float(np.mean([v if v is not None and math.isfinite(v) else math.inf for v in vals]))


def best_fitting(res: dict[str, Any], score) -> list[tuple[str, str, float, str, float]]:
    """(size, status, default's score, best uniform RTN model that fits, its score) at each per-channel
    matched size; `score` maps an evaluated point to its mean MAE. Every uniform RTN model counts,
    per-tensor ones too: where the joint check writes uniform per-tensor INT8 at the INT6/ch size, the
    default ties with that model, it does not beat the per-channel ones."""
    rows = []
    for p in res["points"]:
        if p["method"] != "tqs measured" or not p["label"].startswith("=") or "outputs" not in p:
            continue
        fits = [u for u in fitting_baselines(res["uniform"], p["budget_bytes"]) if u["method"].startswith("uniform ")]
        if fits:
            best = min(fits, key=score)
            rows.append((p["label"][1:], compare_status(score(p), score(best)), score(p),
                         best["method"].removeprefix("uniform "), score(best)))
    return rows


def summary_markdown(doc: dict[str, Any]) -> list[str]:
    """The default against the best uniform RTN model that fits each size, by two metrics."""
    lines = ["## Summary: the default against the best uniform RTN model that fits", "",
             "At each per-channel matched size, `tqs measured` against the uniform RTN model (per-tensor or "
             "per-channel) with the lowest mean MAE among those no larger on disk; by the win metric (vs truth "
             "where the data has it) "
             "and by MAE against the FP32 model's own rollout (what the sweep and the joint check measure).", "",
             "| model | size | vs win metric: default / best uniform | vs FP32: default / best uniform |",
             "|---|---|---|---|"]
    totals = {"win": [0, 0, 0], "fp32": [0, 0, 0]}
    index = {"beat": 0, "tied": 1, "lost": 2}
    for name, res in doc["models"].items():
        for (size, st, a, ua, ub), (_, st2, b, va, vb) in zip(best_fitting(res, mean_metric),
                                                                best_fitting(res, mean_fp32)):
            totals["win"][index[st]] += 1
            totals["fp32"][index[st2]] += 1
            lines.append(f"| {name} | {size} | {st} {fmt(a)} / {fmt(ub)} ({ua}) | {st2} {fmt(b)} / {fmt(vb)} ({va}) |")
    lines += ["", *(f"- {k}: {t[0]} beat, {t[1]} tied, {t[2]} lost" for k, t in
                    (("win metric", totals["win"]), ("vs FP32", totals["fp32"]))), ""]
    return lines


def markdown(doc: dict[str, Any]) -> str:
    intro = ["# Accuracy: TQS-PTQ vs uniform RTN at matched on-disk size", "",
             "Generated by `tools/bench_accuracy.py`. Points `=TIER` are matched to that uniform model's "
             "on-disk bytes (TQS must be no larger); `16x`/`32x` are fixed targets. MAE is over all eval "
             "contexts and steps; degradation is MAE vs truth relative to FP32's. A TQS method wins a "
             "variable (one output channel) when its MAE is below every uniform model that fits the same "
             "budget. Seconds = allocate + apply + eval.", ""]
    return "\n".join(intro + summary_markdown(doc) + [model_markdown(n, r) for n, r in doc["models"].items()])


def strict_json(value: Any) -> Any:
    """Non-finite floats (a diverged rollout's MAE) become null, so the file is standard JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def save_results(out: Path, results: dict[str, dict[str, Any]], fresh: bool) -> dict[str, Any]:
    """Merge into an earlier accuracy.json (same model names replaced) and write .json and .md."""
    path = out / "accuracy.json"
    doc = {"kind": "tqs-bench-accuracy", "models": {}}
    if path.exists() and not fresh:
        doc = json.loads(path.read_text())
    doc["models"].update({k: strict_json(v) for k, v in results.items()})
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    (out / "accuracy.md").write_text(markdown(doc))
    return doc


# ------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="model .onnx files")
    ap.add_argument("--spec", type=Path, help="rollout spec (single model only)")
    ap.add_argument("--sweep", type=Path, help="sweep contexts .npz (single model only)")
    ap.add_argument("--eval", type=Path, help="eval contexts .npz (single model only)")
    ap.add_argument("--probes", type=int, help="Gaussian draws per block (default 8; 2 with --quick)")
    ap.add_argument("--horizon", type=int, help="override the spec's horizon (sweep and eval)")
    ap.add_argument("--blocks", default="auto", help="block grouping: auto|tensor|layer|scope[:DEPTH]|fixed:K")
    ap.add_argument("--max-rollouts", type=int, help="joint-check rollouts per TQS point (default 30; 10 with --quick)")
    ap.add_argument("--fp32-share", type=float, default=0.0, help="Algorithm 2's FP32 share (default 0)")
    ap.add_argument("--budget", choices=["disk", "planned"], default="disk",
                    help="solver budget at a matched point: the uniform model's on-disk bytes (default) or its "
                         "planned bytes (works around a planner that over-counts a byte or two)")
    ap.add_argument("--quick", action="store_true",
                    help=f"2 probes, 10 joint rollouts, horizon capped at {QUICK_HORIZON} (unless given)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default tools/results)")
    ap.add_argument("--keep-models", type=Path, help="write the quantized models here (default: a temp folder)")
    ap.add_argument("--fresh", action="store_true", help="do not merge with an earlier accuracy.json")
    ap.add_argument("--extra-tiers", default="",
                    help="tiers the sweep measures and TQS-PTQ may choose besides the defaults, e.g. "
                         "int6/channel/mse,int4/channel/mse (the uniform baselines stay round-to-nearest)")
    args = ap.parse_args(argv)
    if len(args.models) > 1 and (args.spec or args.sweep or args.eval):
        ap.error("--spec/--sweep/--eval apply to a single model")
    args.probes = args.probes or (2 if args.quick else 8)
    args.max_rollouts = args.max_rollouts or (10 if args.quick else 30)
    return args


def run_all(args: argparse.Namespace, models_dir: Path) -> dict[str, dict[str, Any]]:
    """Benchmark each model; a model whose inputs are broken is skipped with its one-line error."""
    device = resolve_device(args.device)
    results = {}
    for model in args.models:
        try:
            files = resolve_files(model, args.spec, args.sweep, args.eval)
            key = files.name if args.blocks == "auto" else f"{files.name} (blocks {args.blocks})"
            results[key] = bench_model(files, args, device, models_dir / files.name)
        except TqsError as exc:
            log(f"[{model}] skipped: {exc}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.extra_tiers:
        SWEEP_TIERS_EXTRA.extend(str(t) for t in parse_tiers(args.extra_tiers))
    with tempfile.TemporaryDirectory(prefix="tqs-bench-acc-") as tmp:
        results = run_all(args, args.keep_models or Path(tmp))
    if not results:
        return 2
    doc = save_results(args.out, results, args.fresh)
    print("\n".join(model_markdown(n, doc["models"][n]) for n in results))
    log(f"wrote {args.out / 'accuracy.md'} and {args.out / 'accuracy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
