"""`tqs-onnx pareto`: one sweep, the whole compression frontier.

From one scores file, targets spaced geometrically between two bounds (clamped to what the tiers
can reach) are each allocated, written, verified and evaluated; every single-tier (uniform)
allocation that fits is evaluated too, as the baseline of the frontier plot. The reference
trajectories and the joint rollouts on the sweep contexts are computed once and shared by all
points, so a point costs one allocation, one write and one candidate rollout.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tqs_onnx import SCHEMA_VERSION, __version__
from tqs_onnx.allocate import Allocation, Problem, allocate, build_problem, default_tiers, plan_document, sweep_gamma_min
from tqs_onnx.errors import TqsError
from tqs_onnx.evaluate import compare, compression, degradation_percent, rollouts, truth_arrays, verify_written
from tqs_onnx.graph import IDENTITY, LoadedModel, file_digest, load_model, same_model
from tqs_onnx.joint_check import verification_record
from tqs_onnx.refine import refine, uniform_assignments
from tqs_onnx.rewrite import rewrite_model, save_model
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import Device
from tqs_onnx.prepare import PASSES_VERSION
from tqs_onnx.sweep import (Checkpoint, Fingerprint, SweepSetup, divergence_mode, joint_divergence, plan_codes,
                            setup_for_scores, swept_horizon)
from tqs_onnx.tiers import Tier, parse_tier, parse_tiers
from tqs_onnx.util import FRONTIER_CHECKPOINT, atomic_write, atomic_write_json, json_safe, progress

OBJECTIVES = ("measured", "paper", "both")
PAPER_TIERS = "fp32,bf16,int8,int4,int2"
CSV_COLUMNS = ["kind", "target", "objective", "tier", "planned_compression", "on_disk_compression",
               "on_disk_bytes", "param_compression", "mae_vs_fp32", "rmse_vs_fp32", "mae_vs_truth",
               "mae_fp32_vs_truth", "degradation_pct", "worst_degradation_pct", "joint_divergence", "seconds", "kept",
               "pareto", "model"]


@dataclass
class FrontierConfig:
    """What `pareto` sweeps: target bounds, how many points, which objective(s) and tiers."""

    targets: tuple[float, float]
    points: int = 16
    objective: str = "measured"  # measured | paper | both (keep the better per target)
    tiers: str | None = None  # default: fp32 + the sweep's tiers (measured), PAPER_TIERS (paper)
    max_rollouts: int = 30
    uniform: bool = True
    decode: str = "auto"  # how integer tiers are written per weight (tiers.written_form)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise TqsError(f"--objective must be one of {', '.join(OBJECTIVES)}, not '{self.objective}'")
        lo, hi = self.targets
        if self.points < (1 if lo == hi else 2):
            raise TqsError("--points must be >= 2 (1 where LOW = HIGH)")
        if not (1 <= lo <= hi and math.isfinite(hi)):
            raise TqsError(f"--targets needs 1 <= LOW <= HIGH, not {lo:g}:{hi:g}")


def parse_targets(text: str) -> tuple[float, float]:
    """'2:32' -> (2.0, 32.0); a single number is a one-point range."""
    parts = str(text).split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise TqsError(f"--targets must be LOW:HIGH compression factors such as 2:32, not '{text}'") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not all(math.isfinite(v) and v >= 1 for v in values) or values[0] > values[1]:
        raise TqsError(f"--targets must be LOW:HIGH with 1 <= LOW <= HIGH (1: the original size), not '{text}'")
    return values[0], values[1]


# ------------------------------------------------------------------------------------ target grid

def reachable_range(scores: dict[str, Any], tiers: list[Tier], decode: str = "auto") -> tuple[float, float]:
    """The compression range these tiers can produce, with the top nudged so its budget rounds feasible."""
    p = build_problem(scores, tiers, 1.0, decode=decode)
    c_lo, c_hi = p.achievable()
    # Problem.budget floors file_bytes / target; half a byte of slack keeps the top target feasible.
    return c_lo, p.file_bytes / (p.file_bytes / c_hi + 0.5)


def target_grid(bounds: tuple[float, float], points: int, reachable: tuple[float, float]) -> tuple[list[float], list[str]]:
    """Geometric targets between the bounds after clamping them to the reachable range; duplicates dropped."""
    lo, hi = bounds
    notes = []
    if reachable[1] < 1:
        raise TqsError(f"the tiers reach at most {reachable[1]:.4f}x: they cannot make this model smaller than "
                       "its file (its quantizable weights are too small a share of it)")
    c_lo, c_hi = max(lo, reachable[0]), min(hi, reachable[1])
    if c_hi < c_lo:  # the whole requested range lies outside what the tiers reach
        c_lo = c_hi = min(max(lo, reachable[0]), reachable[1])
    if (c_lo, c_hi) != (lo, hi):
        notes.append(f"targets {lo:g}:{hi:g} clamped to the achievable {c_lo:.3f}:{c_hi:.3f} "
                     f"(tiers reach {reachable[0]:.2f}x to {reachable[1]:.2f}x)")
    grid = np.geomspace(c_lo, c_hi, points) if c_hi > c_lo else np.array([c_lo])
    out: list[float] = []
    for t in grid:
        t = float(f"{t:.6g}")
        if t not in out:
            out.append(min(t, c_hi))
    if len(out) < points:
        notes.append(f"{points - len(out)} duplicate target(s) skipped")
    return out, notes


# ---------------------------------------------------------------------------------- shared state

@dataclass
class FrontierRun:
    """What every point shares: model, scores, contexts, the cached reference and joint rollouts."""

    loaded: LoadedModel
    scores: dict[str, Any]
    spec: RolloutSpec
    eval_contexts: Contexts
    device: Device
    out_dir: Path
    joint: Callable[[list[Tier], list[int]], float]  # memoised joint divergence on the sweep contexts
    codes: Callable[[dict[str, str]], dict]  # a plan's /gptq integers (sweep.plan_codes on the joint's setup)
    reference: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    in_sample: bool = False  # evaluated on the sweep contexts themselves
    evaluated: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)  # tiers per block -> result
    before_write: Callable[[], None] | None = None  # called once, before the first model is written

    @property
    def stem(self) -> str:
        return self.loaded.path.name.removesuffix(".onnx")


def open_run(loaded: LoadedModel, scores: dict[str, Any], spec: RolloutSpec, sweep_contexts: Contexts,
             eval_contexts: Contexts | None, device: Device, out_dir: Path) -> FrontierRun:
    """Roll out the reference on the evaluation contexts (default: the sweep's) once; memoise joint rollouts."""
    if not same_model(scores["model"], loaded):
        raise TqsError(f"{loaded.path}: not the model these scores were computed on (sha256 differs)")
    in_sample = eval_contexts is None
    eval_contexts = sweep_contexts if in_sample else eval_contexts
    reference = rollouts(loaded.path, spec, eval_contexts, device)
    truth = truth_arrays(spec, eval_contexts, reference)
    setup = setup_for_scores(loaded, spec, sweep_contexts, device, scores)
    return FrontierRun(loaded, scores, spec, eval_contexts, device, out_dir, memo_joint(setup, scores),
                       lambda weights: plan_codes(setup, weights), reference, truth, in_sample)


def memo_joint(setup: SweepSetup, scores: dict[str, Any]) -> Callable[[list[Tier], list[int]], float]:
    """Joint divergence on the sweep contexts, keyed by the tier of every block so targets share rollouts."""
    blocks = [b["weights"] for b in scores["blocks"]]
    cache: dict[tuple[str, ...], float] = {}

    def run(tiers: list[Tier], assign: list[int]) -> float:
        key = tuple(str(tiers[k]) for k in assign)
        if key not in cache:
            cache[key] = joint_divergence(setup, blocks, tiers)(assign)
        return cache[key]

    return run


# ----------------------------------------------------------------------------------- one point

def plan_for(run: FrontierRun, target: float, objective: str, tiers_text: str | None,
             max_rollouts: int, decode: str = "auto") -> tuple[dict[str, Any], float]:
    """Allocate one target; the measured objective is refined by joint rollouts. Returns (plan, joint)."""
    tiers = tiers_text or (PAPER_TIERS if objective == "paper" else None)
    problem, alloc = allocate(run.scores, target, tiers, objective, decode=decode)
    joint = lambda assign: run.joint(problem.tiers, assign)  # noqa: E731
    record = None
    if objective == "measured":
        refined = refine(problem, alloc, joint, max_rollouts, gamma_min=sweep_gamma_min(run.scores))
        alloc, value, record = refined.allocation, refined.joint, verification_record(refined)
    else:
        value = joint(alloc.assign)
    plan = plan_document(run.scores, problem, alloc)
    if record is not None:
        plan["verification"] = record
    return plan, value


def write_and_measure(run: FrontierRun, plan: dict[str, Any], rel: str) -> dict[str, Any]:
    """Write the plan's model to DIR/rel, verify it, measure it against the cached reference trajectories."""
    key = tuple(b["tier"] for b in plan["blocks"])
    if key in run.evaluated:  # another target chose the same tiers: same file, same errors
        return {**run.evaluated[key], "reused": True}
    path = run.out_dir / rel
    model, _ = rewrite_model(run.loaded, plan, codes=run.codes(plan["weights"]))
    if run.before_write is not None:
        run.before_write()
        run.before_write = None
    save_model(model, path, keep=run.loaded.files,  # verified before it takes the final name
               check=lambda tmp: verify_written(tmp, run.device, run.spec, run.eval_contexts.subset(slice(0, 1)),
                                                label=path, reference=run.loaded.path))
    written = load_model(path)
    errors = compare(run.reference, rollouts(path, run.spec, run.eval_contexts, run.device), run.spec, run.truth)
    if not all(e["finite"] for e in errors.values()):
        remove_model(path)
        raise TqsError(f"{rel}: the rollout becomes non-finite on the evaluation contexts")
    result = {"model": rel, "reused": False, **error_summary(errors), **size_summary(compression(run.loaded, written), plan)}
    run.evaluated[key] = result
    return result


def error_summary(outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Headline errors (mean over trajectory outputs) plus the per-output numbers the report plots. The
    headline degradation is that of the mean MAEs beside it (the mean of per-output percentages did
    not follow from them: +0.94% beside MAEs 1.4% better); `worst_degradation_pct` is the largest
    output's, what `gate --max-degradation` bounds."""
    def mean(key: str) -> float | None:
        vals = [e[key] for e in outputs.values() if e.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    per_output = {k: {kk: e[kk] for kk in ("mae_vs_fp32", "rmse_vs_fp32", "mae_vs_fp32_per_step", "mae_vs_truth",
                                           "mae_fp32_vs_truth", "degradation_pct", "finite") if kk in e}
                  for k, e in outputs.items()}
    truth, truth_fp32 = mean("mae_vs_truth"), mean("mae_fp32_vs_truth")
    per_output_pct = [e["degradation_pct"] for e in outputs.values() if e.get("degradation_pct") is not None]
    return {"mae_vs_fp32": mean("mae_vs_fp32"), "rmse_vs_fp32": mean("rmse_vs_fp32"),
            "mae_vs_truth": truth, "mae_fp32_vs_truth": truth_fp32,
            "degradation_pct": None if truth is None or truth_fp32 is None else degradation_percent(truth, truth_fp32),
            "worst_degradation_pct": max(per_output_pct) if per_output_pct else None, "outputs": per_output}


def size_summary(comp: dict[str, float], plan: dict[str, Any]) -> dict[str, Any]:
    return {"planned_bytes": plan["planned_bytes"], "planned_compression": plan["planned_compression"],
            "on_disk_bytes": comp["candidate_bytes"], "on_disk_compression": comp["on_disk"],
            "param_compression": comp["param_level"]}


def run_point(run: FrontierRun, target: float, objective: str, tiers_text: str | None,
              max_rollouts: int, decode: str = "auto") -> dict[str, Any]:
    """Allocate, apply and evaluate one (target, objective); the row of frontier.json."""
    t0 = time.perf_counter()
    plan, joint = plan_for(run, target, objective, tiers_text, max_rollouts, decode)
    measured = write_and_measure(run, plan, f"{run.stem}.{target:.3f}x.{objective}.onnx")
    return {"kind": "tqs", "target": target, "objective": objective, "tier": None,
            "tiers": [b["tier"] for b in plan["blocks"]], "joint_divergence": joint,
            "notes": plan.get("notes", []), **measured, "seconds": round(time.perf_counter() - t0, 3)}


def run_uniform(run: FrontierRun, problem: Problem, tier: str, assign: list[int]) -> dict[str, Any]:
    """One single-tier baseline, written under DIR/uniform/."""
    t0 = time.perf_counter()
    plan = plan_document(run.scores, problem, Allocation(assign, "uniform", tier))
    joint = run.joint(problem.tiers, assign)
    measured = write_and_measure(run, plan, f"uniform/{run.stem}.uniform-{tier.replace('/', '-')}.onnx")
    return {"kind": "uniform", "target": None, "objective": "uniform", "tier": tier, "kept": True,
            "tiers": [tier] * len(assign), "joint_divergence": joint, "notes": [], **measured,
            "seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------------------- choosing, pruning

def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """a is no larger and no worse than b (MAE vs FP32), and strictly better in one."""
    ab, bb, am, bm = a["on_disk_bytes"], b["on_disk_bytes"], a["mae_vs_fp32"], b["mae_vs_fp32"]
    return ab <= bb and am <= bm and (ab < bb or am < bm)


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """pareto=True on rows no other row dominates (over all points and baselines)."""
    for r in rows:
        r["pareto"] = not any(dominates(o, r) for o in rows if o is not r)


def choose_per_target(points: list[dict[str, Any]]) -> None:
    """kept=True on the best candidate of each target: not dominated within the target, lowest MAE."""
    by_target: dict[float, list[dict[str, Any]]] = {}
    for p in points:
        by_target.setdefault(p["target"], []).append(p)
    for cands in by_target.values():
        alive = [c for c in cands if not any(dominates(o, c) for o in cands if o is not c)]
        best = min(alive, key=lambda c: (c["mae_vs_fp32"], c["on_disk_bytes"]))
        for c in cands:
            c["kept"] = c is best


def prune_models(out_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Delete written models that no kept point or baseline uses; the rows of those lose their path."""
    keep = {r["model"] for r in rows if r["kept"]}
    removed = []
    for r in rows:
        name = r.get("model")
        if name and name not in keep:
            remove_model(out_dir / name)
            removed.append(name)
            r["model"] = None
    return sorted(set(removed))


def previous_models(out_dir: Path, loaded: LoadedModel) -> set[str]:
    """The models an earlier frontier.json in out_dir lists (paths relative to out_dir), when it was
    made from the same model; a frontier of another model in a shared folder is left alone."""
    try:
        doc = json.loads((out_dir / "frontier.json").read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(doc, dict) or doc.get("kind") != "tqs-frontier":
        return set()
    if not isinstance(doc.get("model"), dict) or not same_model(doc["model"], loaded):
        return set()
    rows = [r for key in ("points", "uniform") for r in doc.get(key) or [] if isinstance(r, dict)]
    return {r["model"] for r in rows if isinstance(r.get("model"), str)}


def remove_stale_models(out_dir: Path, previous: set[str], doc: dict[str, Any],
                        keep: tuple[str | Path | None, ...] = ()) -> list[str]:
    """Delete the models of an earlier run into the same folder that the new frontier does not list:
    only .onnx files inside out_dir (the earlier frontier.json is read, not trusted), never one of
    `keep` (the command's inputs: a model kept by an earlier run may be this run's input)."""
    current = {r.get("model") for r in doc["points"] + doc["uniform"]}
    protected = {Path(k).resolve() for k in keep if k}
    root = out_dir.resolve()
    removed = []
    # only names this command writes (a forged frontier.json listing 'vendor_keep.onnx' had it deleted)
    ours = _own_names(Path(str(doc.get("model", {}).get("path", ""))).name.removesuffix(".onnx"))
    for name in sorted(previous - current):
        path = (out_dir / name).resolve()
        if not ours.fullmatch(name):
            continue
        if path.suffix == ".onnx" and root in path.parents and path.is_file() and path not in protected:
            remove_model(path)
            removed.append(name)
    return removed


def _own_names(stem: str) -> re.Pattern:
    """The names pareto gives the models of a model named `stem` (relative to its output folder)."""
    stem = re.escape(stem)
    return re.compile(rf"{stem}\.[0-9]+\.[0-9]{{3}}x\.[A-Za-z0-9_-]+\.onnx|uniform/{stem}\.uniform-[A-Za-z0-9_-]+\.onnx")


def named_models(out_dir: Path, loaded: LoadedModel) -> set[str]:
    """Models in out_dir named as pareto names this model's (an interrupted run whose checkpoint was
    deleted listed them nowhere: a fresh run left them beside its own, easy to ship by mistake); none
    where out_dir holds another model's frontier."""
    try:
        doc = json.loads((out_dir / "frontier.json").read_text())
    except (OSError, ValueError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("model"), dict) and not same_model(doc["model"], loaded):
        return set()
    ours = _own_names(loaded.path.name.removesuffix(".onnx"))
    names = {p.relative_to(out_dir).as_posix() for p in [*out_dir.glob("*.onnx"), *out_dir.glob("uniform/*.onnx")]}
    return {n for n in names if ours.fullmatch(n)}


def remove_model(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(f"{path}.data").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- the sweep

def objectives_of(config: FrontierConfig) -> list[str]:
    return ["measured", "paper"] if config.objective == "both" else [config.objective]


def frontier_tiers(scores: dict[str, Any], config: FrontierConfig) -> list[Tier]:
    """The union of the tiers the chosen objectives may use (for the reachable range and baselines)."""
    seen: dict[str, Tier] = {}
    for obj in objectives_of(config):
        text = config.tiers or (PAPER_TIERS if obj == "paper" else None)
        for t in (parse_tiers(text) if text else default_tiers(scores, obj)):
            seen.setdefault(str(t), t)
    return list(seen.values())


def uniform_baselines(scores: dict[str, Any], tiers: list[Tier], lowest_target: float,
                      decode: str = "auto") -> tuple[Problem, dict[str, list[int]]]:
    """Every single-tier allocation whose size fits the loosest target of the sweep; a /gptq one only where
    some weight has statistics (else it is the plain tier's model again)."""
    problem = build_problem(scores, tiers, lowest_target, decode=decode)
    fits = uniform_assignments(problem)
    if not scores.get("gptq_weights"):
        fits = {name: a for name, a in fits.items() if not parse_tier(name).gptq}
    return problem, fits


CARRIED = "earlier run's models"  # the checkpoint row that carries them


def carried_models(rows: dict[Any, dict]) -> set[str]:
    """The earlier run's model names a checkpoint carries (`run_frontier`'s `carry`)."""
    models = (rows.get(CARRIED) or {}).get("models")
    return {m for m in models if isinstance(m, str)} if isinstance(models, list) else set()


def run_frontier(run: FrontierRun, config: FrontierConfig, quiet: bool = False,
                 checkpoint: Checkpoint | None = None, resume: bool = False,
                 carry: list[str] | None = None) -> dict[str, Any]:
    """Every target x objective, plus the uniform baselines; returns the frontier document.

    With a `checkpoint`, each finished point or baseline is appended to it; `resume` takes the rows a
    killed run left there (whose models are still on disk as they were measured) instead of redoing them.
    `carry`: an earlier run's model names, kept in a fresh checkpoint so that a resumed run still knows
    which to remove (`carried_models`)."""
    t0 = time.perf_counter()
    tiers = frontier_tiers(run.scores, config)
    reachable = reachable_range(run.scores, tiers, config.decode)
    targets, notes = target_grid(config.targets, config.points, reachable)
    swept = swept_horizon(run.scores)
    if swept and swept != run.spec.horizon:
        notes.append(f"the sweep and the joint checks rolled out {swept} steps, the errors here the spec's "
                     f"{run.spec.horizon}")
    if run.in_sample:
        notes.append("errors measured on the sweep contexts (in-sample); pass --eval-contexts for held-out numbers")
    rows = checkpoint.start(resume) if checkpoint else {}
    if checkpoint and not rows and carry:
        checkpoint.append_row({"id": CARRIED, "models": carry})
    done = _resumable(run, rows)
    if done:
        notes.append(f"{len(done)} point(s) and baseline(s) taken from the checkpoint of an interrupted run")

    def job(key: str, what: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        if key in done:
            if done[key].get("skipped"):
                notes.append(done[key]["skipped"])
            return done[key].get("row")
        row = _skip_on_error(notes, what, work)
        if checkpoint:
            digest = _model_digest(run.out_dir / row["model"]) if row and row.get("model") else None
            checkpoint.append_row({"id": key, "row": row, "sha256": digest,
                                   "skipped": notes[-1] if row is None else None})
        return row

    jobs = [(t, obj) for t in targets for obj in objectives_of(config)]
    points = [row for t, obj in progress(jobs, "pareto", quiet, unit="point")
              if (row := job(f"point {t!r} {obj}", f"target {t:g}x ({obj})",
                             lambda: run_point(run, t, obj, config.tiers, config.max_rollouts, config.decode)))]
    if not points:
        raise TqsError("no frontier point could be written; see the notes: " + "; ".join(notes))
    choose_per_target(points)
    baselines = []
    if config.uniform:
        problem, fits = uniform_baselines(run.scores, tiers, targets[0], config.decode)
        baselines = [row for name, assign in progress(list(fits.items()), "uniform", quiet, unit="model")
                     if (row := job(f"uniform {name}", f"uniform {name}",
                                    lambda: run_uniform(run, problem, name, assign)))]
    mark_pareto(points + baselines)
    removed = prune_models(run.out_dir, points + baselines)
    if removed:
        notes.append(f"deleted {len(removed)} dominated candidate model(s)")
    return frontier_document(run, config, targets, reachable, points, baselines, notes, time.perf_counter() - t0)


CHECKPOINT_NAME = FRONTIER_CHECKPOINT


def frontier_checkpoint(out_dir: Path, loaded: LoadedModel, inputs: list[str | None], spec: RolloutSpec,
                        config: FrontierConfig, device: Device) -> Checkpoint:
    """The run's checkpoint in out_dir, fingerprinted by the model, the bytes of the other input files
    (scores, contexts), the spec, the options and the device."""
    names = ("scores", "sweep contexts", "eval contexts")
    return Checkpoint(out_dir / CHECKPOINT_NAME, Fingerprint({
        "model": loaded.sha256,
        **{name: file_digest(Path(path)) if path else "-" for name, path in zip(names, inputs)},
        "spec": spec.to_dict(), "options": json_safe(asdict(config)),
        "device and version": f"{device.kind} {__version__} {PASSES_VERSION} {divergence_mode()}"}))


def _model_digest(path: Path) -> str:
    """sha256 of a written model, and of its external data file where it has one (model.onnx.data)."""
    data = Path(f"{path}.data")
    return file_digest(path) + (f"+{file_digest(data)}" if data.is_file() else "")


def _resumable(run: FrontierRun, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Checkpoint rows still true on disk: a skipped job, or a row whose model has the bytes measured.
    Their models count as written (a later target choosing the same tiers reuses the file)."""
    kept = {}
    for key, entry in rows.items():
        row = entry.get("row")
        if row is None:
            if entry.get("skipped"):
                kept[key] = entry
            continue
        path = run.out_dir / str(row.get("model"))
        if path.is_file() and _model_digest(path) == entry.get("sha256") and \
                sum(f.stat().st_size for f in (path, Path(f"{path}.data")) if f.is_file()) == row.get("on_disk_bytes"):
            kept[key] = entry
            run.evaluated.setdefault(tuple(row["tiers"]), {k: v for k, v in row.items() if k not in ROW_OWN})
    return kept


ROW_OWN = ("kind", "target", "objective", "tier", "kept", "tiers", "joint_divergence", "notes", "seconds")


def _skip_on_error(notes: list[str], what: str, job: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """One point's TqsError (unreachable target, non-finite written model) skips that point, with a note."""
    try:
        return job()
    except TqsError as exc:
        notes.append(f"{what} skipped: {exc}")
        return None


def frontier_document(run: FrontierRun, config: FrontierConfig, targets: list[float], reachable: tuple[float, float],
                      points: list[dict], baselines: list[dict], notes: list[str], seconds: float) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION, "kind": "tqs-frontier", "tool_version": __version__,
        "model": {"path": str(run.loaded.path), "sha256": run.loaded.sha256, "identity": IDENTITY,
                  "file_bytes": run.loaded.file_bytes},
        "objective": config.objective, "requested_targets": list(config.targets),
        "targets": targets, "achievable": list(reachable),
        "eval_contexts": run.eval_contexts.count, "in_sample": run.in_sample, "horizon": run.spec.horizon,
        "sweep_horizon": swept_horizon(run.scores),
        "blocks": [{"id": b["id"], "name": b["name"], "size": b["size"]} for b in run.scores["blocks"]],
        "points": points, "uniform": baselines, "notes": notes, "seconds": round(seconds, 3),
    }


# ---------------------------------------------------------------------------------------- output

FRONTIER_FILES = ("frontier.json", "frontier.csv")


def write_frontier(out_dir: Path, doc: dict[str, Any]) -> tuple[Path, Path]:
    """frontier.json (everything) and frontier.csv (one row per point and baseline)."""
    json_path, csv_path = (out_dir / name for name in FRONTIER_FILES)
    atomic_write_json(json_path, json_safe(doc))
    atomic_write(csv_path, lambda p: _write_csv(p, doc["points"] + doc["uniform"]))
    return json_path, csv_path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def format_frontier(doc: dict[str, Any]) -> str:
    """The frontier as a table: points first (target order), then the uniform baselines."""
    has_truth = any(r.get("degradation_pct") is not None for r in doc["points"])
    rows = doc["points"] + doc["uniform"]
    # Several outputs: the worst one's degradation too (what gate --max-degradation bounds).
    worst = has_truth and any(len(r.get("outputs") or {}) > 1 for r in rows)
    width = max([12, *(len(r["objective"] if r["kind"] == "tqs" else r["tier"]) for r in rows)])
    head = (f"{'kind':8s} {'target':>7} {'objective':{width}s} {'planned':>8} {'on disk':>8} {'bytes':>8} "
            f"{'MAE vs FP32':>12} {'RMSE':>10}" + (f" {'MAE vs truth':>13} {'degr.':>9}" if has_truth else "")
            + (f" {'worst':>9}" if worst else "")
            + f" {'s':>6}  pareto kept")
    lines = [head]
    for r in rows:
        label = f"{r['target']:.2f}x" if r["target"] is not None else "-"
        obj = r["objective"] if r["kind"] == "tqs" else r["tier"]
        line = (f"{r['kind']:8s} {label:>7} {obj:{width}s} {r['planned_compression']:>7.2f}x "
                f"{r['on_disk_compression']:>7.2f}x {r['on_disk_bytes']:>8,} {r['mae_vs_fp32']:>12.4g} "
                f"{r['rmse_vs_fp32']:>10.4g}")
        if has_truth:
            tr, dg = r.get("mae_vs_truth"), r.get("degradation_pct")
            line += f" {tr:>13.4g} {dg:>+8.1f}%" if tr is not None else f" {'-':>13} {'-':>9}"
        if worst:
            w = r.get("worst_degradation_pct")
            line += f" {w:>+8.1f}%" if w is not None else f" {'-':>9}"
        line += f" {r['seconds']:>6.2f}  {'*' if r.get('pareto') else ' ':^6} {'yes' if r.get('kept', True) else 'no'}"
        lines.append(line)
    lines += [f"note: {n}" for n in doc.get("notes", [])]
    return "\n".join(lines)
