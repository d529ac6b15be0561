"""`tqs-onnx demo`: the whole pipeline on the bundled Lorenz-96 forecaster, in well under a minute.

inspect -> sweep (sweep contexts) -> allocate (measured + joint check; paper's Algorithm 2; uniform
baseline of the same budget) -> apply -> eval on held-out contexts never used by the sweep.
"""

from __future__ import annotations

import json
import re
import time
from importlib import resources
from pathlib import Path

from tqs_onnx import SCHEMA_VERSION
from tqs_onnx.allocate import Allocation, allocate, plan_document
from tqs_onnx.evaluate import evaluate, verify_written
from tqs_onnx.graph import load_model
from tqs_onnx.joint_check import joint_check, verification_record
from tqs_onnx.refine import is_baseline, rank_key, uniform_assignments
from tqs_onnx.rewrite import rewrite_model, save_model
from tqs_onnx.rounding import remove_stale_codes
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import resolve_device
from tqs_onnx.sweep import SweepConfig, run_sweep, write_plan_codes
from tqs_onnx.summary import format_inspect, inspect_model
from tqs_onnx.tables import format_plan, format_ranking
from tqs_onnx.tiers import DEFAULT_SWEEP_TIERS, parse_tier, parse_tiers
from tqs_onnx.util import atomic_write_json

DEMO = "lorenz96_mlp"


def demo_files() -> dict[str, Path]:
    root = Path(str(resources.files("tqs_onnx.models")))
    return {"model": root / f"{DEMO}.onnx", "spec": root / f"{DEMO}.rollout.json",
            "sweep": root / "lorenz96_sweep.npz", "eval": root / "lorenz96_eval.npz"}


def _say(quiet: bool, text: str = "") -> None:
    if not quiet:
        print(text, flush=True)


def run_demo(out: Path, compression: float = 4.0, device_name: str = "cpu", quiet: bool = False) -> list[dict]:
    """Run the pipeline; return one row per written model (the before/after table)."""
    t0 = time.perf_counter()
    f = demo_files()
    device = resolve_device(device_name)
    spec = RolloutSpec.load(f["spec"])
    loaded = load_model(f["model"])
    sweep_ctx, eval_ctx = Contexts.load(f["sweep"], spec), Contexts.load(f["eval"], spec)
    _say(quiet, f"== 1. inspect\n{format_inspect(inspect_model(loaded), max_rows=12)}\n")

    config = SweepConfig(tiers=[str(t) for t in parse_tiers(DEFAULT_SWEEP_TIERS)])
    scores = run_sweep(loaded, spec, sweep_ctx, device, config, quiet=quiet)
    problem, alloc = allocate(scores, compression)  # an unreachable target fails here, before anything is written
    atomic_write_json(out / "scores.json", scores)
    _say(quiet, f"== 2. sweep ({sweep_ctx.count} sweep contexts, T={spec.horizon}) -> {out / 'scores.json'}\n"
         f"{format_ranking(scores)}\n")

    refined, setup = joint_check(loaded, spec, sweep_ctx, device, scores, problem, alloc)
    plans = {"tqs-measured": plan_document(scores, problem, refined.allocation)}
    plans["tqs-measured"]["verification"] = verification_record(refined)
    paper_problem, paper = allocate(scores, compression, "fp32,bf16,int8,int4,int2", objective="paper")
    plans["tqs-paper"] = plan_document(scores, paper_problem, paper)
    uniform = _best_uniform(problem, refined.uniform)
    if uniform is not None:
        name, assign = uniform
        plans[f"uniform-{name.replace('/', '-')}"] = plan_document(scores, problem, Allocation(assign, "uniform", name))
    codes = {}
    for name, plan in plans.items():  # /gptq integers beside each plan, as `allocate` writes them
        codes[name] = write_plan_codes(setup, plan, out / f"plan-{name}.json")
        atomic_write_json(out / f"plan-{name}.json", plan)
        remove_stale_codes(out / f"plan-{name}.json", plan)
    _say(quiet, f"== 3. allocate at {compression:g}x (measured objective, joint check, "
         f"{refined.rollouts} joint rollouts)\n{format_plan(plans['tqs-measured'])}\n")

    rows = [_row("fp32", loaded.file_bytes, loaded.file_bytes, None)]
    for name, plan in plans.items():
        path = out / f"{DEMO}.{name}.onnx"
        model, _ = rewrite_model(loaded, plan, codes=codes[name])
        save_model(model, path, keep=loaded.files,  # verified before it takes the final name
                   check=lambda tmp: verify_written(tmp, device, spec, eval_ctx.subset(slice(0, 1)), label=path,
                                                    reference=loaded.path))
        report = evaluate(loaded.path, path, spec, eval_ctx, device)
        rows.append(_row(name, loaded.file_bytes, report["compression"]["candidate_bytes"], report, plan))
    _remove_earlier_runs(out, plans)
    _say(quiet, f"== 4. apply + 5. eval on {eval_ctx.count} held-out contexts (never used by the sweep)\n"
         f"{format_table(rows)}\n\nwrote {out}/ in {time.perf_counter() - t0:.1f} s")
    return rows


MANIFEST = "demo-files.json"  # what the demo wrote in its folder, so that the next run can tidy up


def _remove_earlier_runs(out: Path, plans: dict[str, dict]) -> None:
    """Remove the plans and models an earlier demo wrote in `out` (its manifest names them) under names
    this run did not write (another target picks another uniform baseline); then record this run's.
    Files the demo did not write are never touched."""
    names = {f"plan-{n}.json" for n in plans} | {f"{DEMO}.{n}.onnx" for n in plans}
    try:
        earlier = json.loads((out / MANIFEST).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        earlier = []
    for name in earlier if isinstance(earlier, list) else []:
        path = out / Path(str(name)).name  # inside `out`, whatever the manifest says
        ours = re.fullmatch(r"plan-[\w.-]+\.json|" + re.escape(DEMO) + r"\.[\w.-]+\.onnx", path.name)
        if ours and path.name not in names and path.is_file():
            if path.suffix == ".json":
                remove_stale_codes(path, {})
            path.unlink()
    atomic_write_json(out / MANIFEST, {"schema_version": SCHEMA_VERSION, "kind": "tqs-demo-files", "files": sorted(names)})


def _best_uniform(problem, uniform_scores: dict[str, float]):
    """The best uniform round-to-nearest plan that fits (the baseline the joint check protects)."""
    fits = uniform_assignments(problem)
    fits = {n: a for n, a in fits.items() if is_baseline(parse_tier(n))} or fits
    if not fits:
        return None
    name = min(fits, key=lambda n: rank_key(uniform_scores.get(n, float("inf"))))
    return name, fits[name]


def _row(name: str, ref_bytes: int, cand_bytes: int, report: dict | None, plan: dict | None = None) -> dict:
    out = {"model": name, "bytes": cand_bytes, "on_disk": ref_bytes / cand_bytes,
           "planned": plan["planned_compression"] if plan else 1.0}
    if report:
        e = next(iter(report["outputs"].values()))
        out.update(mae_fp32=e["mae_vs_fp32"], mae_truth=e.get("mae_vs_truth"), fp32_truth=e.get("mae_fp32_vs_truth"),
                   degradation=e.get("degradation_pct"))
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':24s} {'bytes':>9} {'on disk':>8} {'planned':>8} {'MAE vs FP32':>12} {'MAE vs truth':>13} {'degr.':>8}"]
    for r in rows:
        mae = f"{r['mae_fp32']:.4f}" if "mae_fp32" in r else "-"
        tr = f"{r['mae_truth']:.4f}" if r.get("mae_truth") is not None else "-"
        dg = f"{r['degradation']:+.1f}%" if r.get("degradation") is not None else "-"
        lines.append(f"{r['model']:24s} {r['bytes']:>9,} {r['on_disk']:>7.2f}x {r['planned']:>7.2f}x {mae:>12} {tr:>13} {dg:>8}")
    return "\n".join(lines)
