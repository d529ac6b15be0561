"""TQS-PTQ against uniform round-to-nearest on real vendor ONNX models, at matched on-disk size.

For each vendor model (tests/vendor/vendor_assets.py pins the package releases): fetch its pinned
release file (hash checked, nothing in it run), synthesise sweep contexts and separate evaluation
contexts (other seeds), run `tqs-onnx sweep`, build uniform RTN plans (`allocate --tiers int8/channel`,
`int6/channel`, `int4/channel`, `int2/channel`), then TQS plans (`allocate`, default `measured`
objective, `--verify-model` joint check) at the uniform plans' planned size, apply every plan and score
it on the evaluation contexts with the model's task metric against FP32. Prints a markdown report and
writes it to --out (default tools/results/vendor.md).

Which runs write --out: a run in which a requested model was skipped (package index unreachable)
writes nothing and exits 1 (the report is still printed). A run never replaces an existing --out
that covers a model the run does not measure (a --models subset over the full report) unless
--force is given; that is checked before any work, exit 2.

    python tools/bench_vendor.py [--models silero_vad_v6,madmom_beats_lstm_1] [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "vendor"))

import vendor_assets as va  # noqa: E402

from tqs_onnx.tiers import DEFAULT_SWEEP_TIERS  # noqa: E402

UNIFORM_TIERS = ("int8/channel", "int6/channel", "int4/channel", "int2/channel")
SWEEP_TIERS = DEFAULT_SWEEP_TIERS  # every default tier (int6/channel included: the INT6 size has its tier)
BETWEEN = ("int8/channel", "int4/channel")  # the extra TQS point sits between these two sizes
SWEEP_SEED, EVAL_SEED = 0, 1000
# Below the uniform plan's planned compression by a hair, so that plan fits the TQS budget exactly
# (the budget is int(file_bytes / target)).
MATCH_SLACK = 1 - 1e-7


@dataclass
class Case:
    """One vendor model and the files the benchmark makes for it."""

    model: va.VendorModel
    onnx: Path
    work: Path
    sweep_ctx: Path
    eval_ctx: Path
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    method: str
    plan: dict[str, Any] | None
    on_disk_bytes: int
    on_disk: float
    metrics: dict[str, float]
    joint: float | None = None  # joint divergence on the sweep contexts (from the joint check)


# ------------------------------------------------------------------------------------ pipeline

def prepare(model: va.VendorModel, work: Path, eval_contexts: int) -> Case:
    """Fetch the model and write its sweep and evaluation contexts (different seeds)."""
    path = va.fetch_model(model)
    spec = json.loads(model.spec_path.read_text())
    folder = work / model.key
    folder.mkdir(parents=True, exist_ok=True)
    sweep = va.write_contexts(folder / "sweep.npz",
                              va.build_contexts(model, path, spec, model.sweep_contexts, SWEEP_SEED))
    evaluation = va.write_contexts(folder / "eval.npz", va.build_contexts(model, path, spec, eval_contexts, EVAL_SEED))
    return Case(model, path, folder, sweep, evaluation)


def inspect(case: Case) -> dict[str, Any]:
    return json.loads(va.tqs("inspect", case.onnx, "--json").stdout)


def sweep(case: Case) -> tuple[Path, float]:
    out = case.work / "scores.json"
    t0 = time.perf_counter()
    va.tqs("sweep", case.onnx, "--rollout", case.model.spec_path, "--contexts", case.sweep_ctx,
           "--probes", "2", "--quiet", "-o", out, "--tiers", SWEEP_TIERS, *bench_sweep_args(case.model))
    return out, time.perf_counter() - t0


def bench_sweep_args(model: va.VendorModel) -> list[str]:
    """The suite's sweep options without its tier restriction (kept short for CI): the benchmark
    needs the damage of every tier it plans with (SWEEP_TIERS)."""
    args, skip = [], False
    for a in model.sweep_args:
        if skip:
            skip = False
        elif a == "--tiers":
            skip = True
        elif not a.startswith("--tiers="):
            args.append(a)
    return args


def uniform_plan(case: Case, scores: Path, tier: str, decode: str = "auto") -> Path:
    """Every scored block at `tier` (a one-tier knapsack at target 1x has only that answer)."""
    out = case.work / f"plan-uniform-{tier.replace('/', '-')}{'' if decode == 'auto' else '-' + decode}.json"
    va.tqs("allocate", scores, "--tiers", tier, "--compression", "1", "--decode", decode, "--quiet", "-o", out)
    return out


def tqs_plan(case: Case, scores: Path, target: float, tag: str, decode: str = "auto") -> Path:
    out = case.work / f"plan-tqs-{tag}{'' if decode == 'auto' else '-' + decode}.json"
    va.tqs("allocate", scores, "--compression", f"{target:.10g}", "--verify-model", case.onnx,
           "--rollout", case.model.spec_path, "--contexts", case.sweep_ctx, "--decode", decode, "--quiet", "-o", out)
    return out


def measure_or_load(case: Case, ref: np.ndarray, method: str, plan: Callable[[str], Path]) -> Row:
    """Apply and score plan('auto'); where apply refuses the written model because ONNX Runtime's fused
    kernels compute other values than the written graph (int8 activations), the plan allocated again at
    the same size with `--decode load`, as apply's message advises, noted in the method (the knapsack
    may then pick other tiers: the /load forms take a few more bytes)."""
    auto = plan("auto")
    try:
        return measure(case, ref, method, auto)
    except AssertionError as exc:
        if "optimized graph computes other values" not in str(exc):
            raise
        reason = str(exc).splitlines()[-1].split(": error: ", 1)[-1]
        case.facts.setdefault("notes", []).append(f"{method}: apply refused the default form ({reason[:500]}); "
                                                  "measured with `--decode load`")
        return measure(case, ref, f"{method} (--decode load)", plan("load"))


def paper_plan(case: Case, scores: Path, target: float, tag: str) -> Path | None:
    """The paper's Algorithm 2 (MCKP on gamma' 2^-b, its own tier list) at the same size."""
    out = case.work / f"plan-paper-{tag}.json"
    try:
        va.tqs("allocate", scores, "--objective", "paper", "--compression", f"{target:.10g}", "--quiet", "-o", out)
    except va.CliFailed as exc:
        if out_of_reach(exc):
            return None
        raise
    return out


# tqs_onnx.allocate.check_feasible's words for a target the tiers cannot reach (a user error, exit 2).
UNREACHABLE = re.compile(r"error: compression \S+x is not reachable with tiers ")


def out_of_reach(exc: va.CliFailed) -> bool:
    """Whether `allocate` failed only because the target is out of its tiers' reach; any other failure
    (bad input, a traceback) is no such answer."""
    return exc.returncode == 2 and UNREACHABLE.search(exc.stderr) is not None


def apply(case: Case, plan: Path) -> tuple[Path, dict[str, Any]]:
    out = plan.with_suffix(".onnx")
    report = plan.with_suffix(".apply.json")
    va.tqs("apply", case.onnx, plan, "-o", out, "--rollout", case.model.spec_path,
           "--contexts", case.eval_ctx, "--quiet", "--report", report)
    return out, json.loads(report.read_text())


def trajectory(case: Case, onnx_path: Path) -> np.ndarray:
    """The spec's first trajectory output over the evaluation contexts, (S, T, *shape)."""
    from tqs_onnx.evaluate import rollouts
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import resolve_device

    spec = RolloutSpec.load(case.model.spec_path)
    out = rollouts(onnx_path, spec, Contexts.load(case.eval_ctx, spec), resolve_device("cpu"))
    return out[spec.trajectory[0]]


def score(case: Case, ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """Task metric against FP32, trajectory RMSE, and (beats) F1 against the true click times."""
    metrics = va.task_metrics(case.model, ref, cand)
    metrics["traj_rmse"] = float(np.sqrt(np.mean((ref.astype(np.float64) - cand) ** 2)))
    if case.model.kind == "beats":
        with np.load(case.eval_ctx) as z:
            times = z["beat_times"]
        acts = cand.reshape(cand.shape[0], -1)
        metrics["beat_f1_vs_clicks"] = float(np.mean([va.beat_truth_f1(a, t) for a, t in zip(acts, times)]))
    return metrics


def bench_model(model: va.VendorModel, work: Path, eval_contexts: int, log) -> tuple[Case, list[Row]]:
    """Every row of one model's table: FP32, then uniform and TQS at each uniform tier's size."""
    case = prepare(model, work, eval_contexts)
    doc = inspect(case)
    scores, seconds = sweep(case)
    sdoc = json.loads(scores.read_text())
    case.facts = {"inspect": doc, "sweep_seconds": seconds, "blocks": len(sdoc["blocks"]),
                  "forward_passes": sdoc["forward_passes"],
                  "dead_blocks": sum(1 for b in sdoc["blocks"] if b["dead"])}
    log(f"{model.key}: swept {len(sdoc['blocks'])} blocks in {seconds:.1f} s")
    ref = trajectory(case, case.onnx)
    file_bytes = case.onnx.stat().st_size
    rows = [Row("fp32", None, file_bytes, 1.0, score(case, ref, ref))]
    sizes = {}
    for tier in UNIFORM_TIERS:
        uplan = uniform_plan(case, scores, tier)
        target = sizes[tier] = json.loads(uplan.read_text())["planned_compression"] * MATCH_SLACK
        tag = tier.replace("/", "-")
        pair = [measure_or_load(case, ref, f"uniform RTN {tier}", lambda d: uniform_plan(case, scores, tier, d)),
                measure_or_load(case, ref, f"TQS-PTQ @ {tier} size", lambda d: tqs_plan(case, scores, target, tag, d))]
        # The joint check rolled the uniform plan out on the sweep contexts too: show it on its row.
        pair[0].joint = pair[1].plan.get("verification", {}).get("uniform", {}).get(tier)
        pplan = paper_plan(case, scores, target, tag)
        if pplan is not None:
            try:
                pair.append(measure(case, ref, f"paper Alg. 2 @ {tier} size", pplan))
                # the default's joint check rolled the same plan out (refine.paper_plans): show it on its row
                pair[-1].joint = pair[1].plan.get("verification", {}).get("challengers", {}).get("paper Alg. 2 (mckp)")
            except AssertionError as exc:
                reason = str(exc).splitlines()[-1].split(": error: ", 1)[-1]
                case.facts.setdefault("notes", []).append(f"paper Alg. 2 @ {tier} size: apply refused it ({reason[:500]})")
        rows += pair
        log("  " + ", ".join(f"{r.method}: {r.on_disk:.2f}x on disk" for r in pair))
    # A size no uniform tier reaches: where mixed precision has room to choose.
    middle = math.sqrt(math.prod(sizes[t] for t in BETWEEN))
    rows.append(measure_or_load(case, ref, f"TQS-PTQ @ {middle:.2f}x (between)",
                                lambda d: tqs_plan(case, scores, middle, "between", d)))
    return case, rows


def measure(case: Case, ref: np.ndarray, method: str, plan: Path) -> Row:
    """Apply one plan and score the written model on the evaluation contexts."""
    path, report = apply(case, plan)
    doc = json.loads(plan.read_text())
    joint = doc.get("verification", {}).get("joint_divergence")
    return Row(method, doc, report["on_disk_bytes"], report["on_disk_compression"],
               score(case, ref, trajectory(case, path)), joint)


# -------------------------------------------------------------------------------------- report

def composition(plan: dict[str, Any] | None) -> str:
    """Parameter share per tier, e.g. '91% int8/channel, 9% fp32'."""
    if plan is None:
        return "all fp32"
    sizes: dict[str, int] = {}
    for name, tier in plan["weights"].items():
        sizes[tier] = sizes.get(tier, 0) + math.prod(plan["weight_info"][name]["shape"])
    total = sum(sizes.values())
    return ", ".join(f"{100 * n / total:.0f}% {t}" for t, n in sorted(sizes.items(), key=lambda kv: -kv[1]))


def _metric_columns(kind: str) -> list[tuple[str, str, str]]:
    """(key, header, format) of the task-metric columns for a model kind."""
    if kind == "beats":
        return [("activation_mae", "act. MAE", ".4f"), ("beat_f1_vs_fp32", "beat F1 vs FP32", ".3f"),
                ("beat_f1_vs_clicks", "beat F1 vs clicks", ".3f"), ("mean_beat_shift_ms", "beat shift ms", ".1f")]
    if kind in ("enhance", "mask", "masked"):
        return [("snr_vs_fp32_db", "SNR vs FP32 dB", ".1f"), ("enh_mae", "MAE", ".5f")]
    return [("flip_rate", "p>0.5 flips", ".2%"), ("prob_mae", "p MAE", ".4f")]


def model_section(case: Case, rows: list[Row]) -> str:
    m, doc, f = case.model, case.facts["inspect"], case.facts
    io_in = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in doc["inputs"].items())
    io_out = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in doc["outputs"].items())
    cols = _metric_columns(m.kind)
    head = ["method", "tiers (share of params)", "bytes", "on disk", "planned", "joint div. (sweep ctx)",
            "traj. RMSE", *[c[1] for c in cols]]
    lines = [f"### {m.key}: `{m.package}=={m.version}` `{m.member}`", "",
             f"- inputs: {io_in}", f"- outputs: {io_out}",
             f"- parameters: {doc['parameters']:,} in {len(doc['weights'])} float tensors; "
             f"quantizable {doc['quantizable_parameters']:,} ({doc['quantizable_share']:.1%})",
             f"- sweep: {f['blocks']} blocks ({f['dead_blocks']} dead), {f['forward_passes']:,} forward passes, "
             f"{f['sweep_seconds']:.1f} s wall (CLI, CPU); options `{' '.join(bench_sweep_args(m)) or 'defaults'} --probes 2`",
             *_dead_note(f["dead_blocks"]), *[f"- {n}" for n in f.get("notes", [])],
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        planned = f"{r.plan['planned_compression']:.2f}x" if r.plan else "1.00x"
        joint = r.joint
        cells = [r.method, composition(r.plan), f"{r.on_disk_bytes:,}", f"{r.on_disk:.2f}x", planned,
                 f"{joint:.3g}" if joint is not None else "-", f"{r.metrics['traj_rmse']:.4f}",
                 *[format(r.metrics.get(k, float("nan")), fmt) for k, _, fmt in cols]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _dead_note(dead: int) -> list[str]:
    if not dead:
        return []
    return [f"- {dead} blocks are dead: perturbing them never changes the rollout under this spec (weights "
            "of a control-flow branch the spec's constants never take). Plans put them at the lowest tier, so "
            "the written model keeps FP32 behaviour only for what the spec exercises."]


def report(sections: list[str], eval_contexts: int) -> str:
    intro = ("## Vendor ONNX models: TQS-PTQ vs uniform RTN at matched on-disk size\n\n"
             f"Sweep on synthetic sweep contexts (seed {SWEEP_SEED}); every number in the tables is measured "
             f"on {eval_contexts} other evaluation contexts (seed {EVAL_SEED}) against the FP32 model. "
             "TQS-PTQ: `allocate` with the default `measured` objective and `--verify-model` joint check, "
             "at the uniform plan's planned size. Uniform RTN: every quantizable block at one tier "
             "(symmetric, per-channel). Paper Alg. 2: `allocate --objective paper` (MCKP on gamma' 2^-b, "
             "tiers fp32/bf16/int8/int4/int2 per-tensor) at the same size; absent where that size is out of its "
             "reach. Blocks below the size floor stay FP32 in all. The last row of each "
             "table is TQS-PTQ at a size between the INT8 and INT4 ones, which no uniform tier reaches.")
    return "\n\n".join([intro, *sections]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(va.MODELS), help=f"comma list (default all: {','.join(va.MODELS)})")
    p.add_argument("--work", help="folder for contexts, scores, plans and models (default: a temp folder)")
    p.add_argument("--eval-contexts", type=int, default=8, help="evaluation contexts per model (default 8)")
    p.add_argument("--out", default=str(ROOT / "tools" / "results" / "vendor.md"),
                   help="where to write the report (default tools/results/vendor.md); not written when a model "
                        "was skipped, and an existing report covering other models too is kept unless --force")
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it covers models this run does not measure")
    p.add_argument("--extra-tiers", default="",
                   help="tiers the sweep measures and TQS-PTQ may choose besides the defaults, e.g. "
                        "int6/channel/mse,int4/channel/mse (the uniform baselines stay round-to-nearest)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global SWEEP_TIERS
    a = parse_args(argv)
    if a.extra_tiers:
        SWEEP_TIERS = ",".join([SWEEP_TIERS, a.extra_tiers])
    unknown = [k for k in a.models.split(",") if k not in va.MODELS]
    if unknown:
        print(f"bench_vendor.py: error: unknown model(s) {', '.join(unknown)} (known: {', '.join(va.MODELS)})",
              file=sys.stderr)
        return 2
    out = Path(a.out)
    models = a.models.split(",")
    dropped = sorted(reported_models(out) - set(models))
    if dropped and not a.force:
        print(f"bench_vendor.py: error: {out} also reports {', '.join(dropped)}, which this run does not measure: "
              "give another --out, or --force to replace it", file=sys.stderr)
        return 2
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="tqs-vendor-bench-"))
    sections, skipped = [], []
    for key in models:
        try:
            case, rows = bench_model(va.MODELS[key], work, a.eval_contexts, lambda s: print(s, file=sys.stderr))
        except va.VendorUnavailable as exc:
            sections.append(f"### {key}\n\nskipped: {exc}")
            skipped.append(key)
            continue
        sections.append(model_section(case, rows))
    text = report(sections, a.eval_contexts)
    if a.extra_tiers:
        text += f"\nSweep tiers: the defaults plus `{a.extra_tiers}` (`--extra-tiers`).\n"
    print(text)
    if skipped:
        print(f"bench_vendor.py: {len(skipped)} of {len(models)} models skipped ({', '.join(skipped)}): "
              f"{out} not written", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


def reported_models(path: Path) -> set[str]:
    """The model keys an earlier report holds a section of (`### key: ...` or `### key` when skipped)."""
    if not path.is_file():
        return set()
    return set(re.findall(r"^### (\w+)(?::|$)", path.read_text(errors="replace"), re.M))


if __name__ == "__main__":
    sys.exit(main())
