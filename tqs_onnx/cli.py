"""Command line: argument parsing only; each subcommand calls into the library.

Errors in the user's input are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from tqs_onnx import SCHEMA_VERSION, __version__
from tqs_onnx.errors import TqsError
from tqs_onnx.tiers import DECODES, DEFAULT_SWEEP_TIERS
from tqs_onnx.util import json_safe, printable


# ------------------------------------------------------------------------------------ option groups

def _rollout_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("rollout")
    g.add_argument("--rollout", required=required, metavar="SPEC",
                   help="rollout spec (JSON/YAML): feedback pairs, inputs from data, trajectory outputs, horizon")
    g.add_argument("--contexts", required=required, metavar="DATA.npz",
                   help="starting states and per-step data, arrays with a leading context axis")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="ONNX Runtime provider: cpu (default), cuda, or auto (cuda only when a GPU really works)")


def _output_args(p: argparse.ArgumentParser, required: bool = True, what: str = "JSON") -> None:
    p.add_argument("-o", "--output", required=required, metavar="PATH", help=f"where to write the {what} (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")


def _write_json(path: str | None, doc: dict[str, Any]) -> None:
    from tqs_onnx.util import atomic_write_json

    if path:
        atomic_write_json(path, doc)


def _check_output_files(*paths: str | None, inputs: tuple[str | None, ...] = ()) -> None:
    """Refuse an output file path that cannot be written, or that is one of the command's own input
    files (it would be replaced by the output), an input model's external-data files included, before
    any work is done."""
    from tqs_onnx.graph import external_data_files
    from tqs_onnx.util import check_output_target

    given = {Path(i).resolve(): i for i in inputs if i}
    named = [Path(p).resolve() for p in paths if p]
    if len(set(named)) < len(named):
        raise TqsError(f"{next(p for p in paths if p)}: this command's outputs must be two files, not one "
                       f"({', '.join(p for p in paths if p)})")
    for i in [i for i in inputs if i and i.endswith(".onnx") and Path(i).is_file()]:
        given.update({f: f"{i}'s data file {os.path.relpath(f, Path(i).resolve().parent)}" for f in external_data_files(i)})
    for path in paths:
        if not path:
            continue
        p = Path(path)
        if p.is_dir():
            raise TqsError(f"{p}: output path is a folder; give a file name")
        parent = next((q for q in p.parents if q.exists()), Path("."))
        if not parent.is_dir():
            raise TqsError(f"{p}: cannot write here, '{parent}' is not a folder")
        if p.resolve() in given:
            raise TqsError(f"{p}: refusing to overwrite the input '{given[p.resolve()]}' of this command")
        check_output_target(p)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit 2), like every other error of the tool."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: error: {message} (see --help)")


# -------------------------------------------------------------------------------------- commands

def cmd_inspect(a: argparse.Namespace) -> int:
    from tqs_onnx.graph import load_model
    from tqs_onnx.summary import format_inspect, inspect_model

    _check_output_files(a.output, inputs=(a.model,))
    doc = inspect_model(load_model(a.model), a.blocks, a.min_size, factor=not a.no_factor)
    _write_json(a.output, doc)
    print(json.dumps(doc, indent=1) if a.json else format_inspect(doc))
    return 0


def checkpoint_path(a: argparse.Namespace) -> Path:
    """The sweep's checkpoint: --checkpoint, or OUTPUT.ckpt.jsonl."""
    return Path(a.checkpoint or f"{a.output}.ckpt.jsonl")


def cmd_sweep(a: argparse.Namespace) -> int:
    from tqs_onnx.graph import load_model
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import resolve_device
    from tqs_onnx.sweep import SweepConfig, run_sweep
    from tqs_onnx.tiers import parse_tiers

    ckpt = checkpoint_path(a)
    _check_output_files(a.output, str(ckpt), inputs=(a.model, a.rollout, a.contexts))  # two files, too
    if a.horizon is not None and a.horizon < 1:
        raise TqsError(f"--horizon must be >= 1, not {a.horizon}")
    if a.early_horizon and not a.early_stop:
        raise TqsError("--early-horizon cuts rollouts by the early-stop rule: give --early-stop TOL too")
    if a.early_window is not None and not a.early_stop:
        raise TqsError("--early-window is the early-stop rule's window: give --early-stop TOL too")
    if a.probe == "quant":  # options of the Gaussian draws, of which --probe quant makes none
        given = [f for f, v in (("--probes", a.probes), ("--seed", a.seed)) if v is not None]
        if a.early_stop and not a.early_horizon:
            given.append("--early-stop without --early-horizon")
        if given:
            raise TqsError(f"{', '.join(given)}: set(s) the Gaussian probes, and --probe quant draws none "
                           "(use --probe gauss or both)")
    if a.ray_address is not None and not a.ray_address.strip():
        raise TqsError("--ray-address is empty (give host:port, or auto)")
    distributed = a.workers > 1 or a.ray_address is not None
    if a.workers < 1:
        raise TqsError(f"--workers must be >= 1, not {a.workers}")
    if distributed:
        from tqs_onnx.distributed import require_ray
        require_ray()
    tiers = [str(t) for t in parse_tiers(a.tiers) if not t.is_identity] if a.tiers else []
    config = SweepConfig(a.probe, a.bits, 8 if a.probes is None else a.probes, a.horizon, a.seed or 0, a.blocks,
                         a.min_size, a.gamma_min, tiers, factor=not a.no_factor, early_stop=a.early_stop,
                         early_window=3 if a.early_window is None else a.early_window,
                         early_horizon=a.early_horizon, skip_unreached=not a.no_skip_unreached)
    spec = RolloutSpec.load(a.rollout)
    loaded = load_model(a.model)
    spec.check_names(loaded.model, str(loaded.path))
    contexts = Contexts.load(a.contexts, spec, a.horizon)
    t0 = time.perf_counter()

    written = []

    def finish(doc: dict[str, Any]) -> None:  # with the checkpoint still locked: no other run takes it over
        _write_json(a.output, doc)
        ckpt.unlink(missing_ok=True)
        written.append(a.output)

    try:
        if distributed:
            from tqs_onnx.distributed import run_distributed_sweep
            doc = run_distributed_sweep(loaded, spec, contexts, a.device, config, ckpt, a.resume, a.quiet,
                                        workers=a.workers, address=a.ray_address, finish=finish)
        else:
            doc = run_sweep(loaded, spec, contexts, resolve_device(a.device), config, ckpt, a.resume, a.quiet,
                            finish=finish)
        if not a.quiet:
            from tqs_onnx.tables import format_ranking

            print(f"{format_ranking(doc)}\nwall time {time.perf_counter() - t0:.1f} s (not stored: scores stay "
                  "byte-identical)")
    except KeyboardInterrupt:
        if not written:
            raise
        # The scores are complete and written: the run did its work (a script must not redo it).
        print(f"tqs-onnx sweep: interrupted after writing {written[0]}", file=sys.stderr)
    return 0


def cmd_allocate(a: argparse.Namespace) -> int:
    from tqs_onnx.allocate import allocate, load_scores, plan_document, sweep_gamma_min
    from tqs_onnx.refine import MARGIN, MAX_ROLLOUTS
    from tqs_onnx.rounding import remove_stale_codes
    from tqs_onnx.util import slow_note
    from tqs_onnx.tiers import parse_tier

    if a.margin is not None and not (a.margin >= 0 and math.isfinite(a.margin)):
        raise TqsError(f"--margin must be a finite number >= 0, not {a.margin}")
    if (a.rollout or a.contexts) and not a.verify_model:
        raise TqsError("--rollout and --contexts are used only with --verify-model MODEL (the joint check)")
    unused = [f for f, v in (("--margin", a.margin), ("--max-rollouts", a.max_rollouts)) if v is not None]
    if unused and not a.verify_model:
        raise TqsError(f"{' and '.join(unused)}: option(s) of the joint check, which runs with --verify-model MODEL")
    if a.objective != "paper":
        unused = ["--fp32-share"] if a.fp32_share is not None else []
        if not a.verify_model:  # the joint check's paper challengers use these
            unused += [f for f, v in (("--probe", a.probe), ("--gamma-min", a.gamma_min)) if v is not None]
        if unused:
            raise TqsError(f"{' and '.join(unused)}: option(s) of --objective paper (the measured objective "
                           "ranks blocks by measured damage)")
    scores = load_scores(a.scores)
    # Also the swept model and its data files (its path as the sweep was given it, if found from here).
    _check_output_files(a.output, inputs=(a.scores, a.verify_model, a.rollout, a.contexts,
                                          scores.get("model", {}).get("path")))
    if a.paper_variant != "spec" and a.objective != "paper":
        raise TqsError("--paper-variant is an option of --objective paper")
    if a.paper_variant == "exact" and a.verify_model:
        raise TqsError("--paper-variant exact budgets parameter bits, the joint check (--verify-model) compares "
                       "plans within the file's byte budget: use one or the other")
    gamma_min = sweep_gamma_min(scores, a.gamma_min)
    _warn_stale_rounding("allocate", scores, a.tiers)
    margin = MARGIN if a.margin is None else a.margin
    problem, alloc = allocate(scores, a.compression, a.tiers, a.objective, a.solver, a.fp32_share or 0.0, a.probe,
                              gamma_min, a.decode, gptq=bool(a.verify_model), paper_variant=a.paper_variant)
    refinement = setup = None
    if a.verify_model:
        from tqs_onnx.graph import load_model
        from tqs_onnx.joint_check import joint_check
        from tqs_onnx.rollout import Contexts, RolloutSpec
        from tqs_onnx.runtime import resolve_device

        if not (a.rollout and a.contexts):
            raise TqsError("--verify-model needs --rollout and --contexts (the sweep contexts)")
        spec = RolloutSpec.load(a.rollout)
        rollouts = MAX_ROLLOUTS if a.max_rollouts is None else a.max_rollouts
        with slow_note(f"allocate: joint check: the plan, the uniform plans that fit and the paper's rolled out on "
                       f"the sweep contexts, then up to {rollouts} more in the local search", a.quiet):
            refinement, setup = joint_check(load_model(a.verify_model), spec, Contexts.load(a.contexts, spec),
                                            resolve_device(a.device), scores, problem, alloc, rollouts, margin,
                                            gamma_min)
        alloc = refinement.allocation
    plan = plan_document(scores, problem, alloc)
    if refinement is None and a.objective == "measured":
        plan["notes"] = [*plan["notes"], "not verified: the plan is the allocator's on summed single-block damage, "
                         "not rolled out against uniform of the same size (pass --verify-model MODEL, --rollout "
                         "and --contexts, the sweep's; `demo` and `pareto` do)"]
    if any(parse_tier(t).gptq for t in plan["weights"].values()):
        from tqs_onnx.sweep import write_plan_codes

        if setup is None:
            raise TqsError("the plan puts weights at /gptq tiers, whose integers come from the sweep contexts' "
                           "rollouts: pass --verify-model, --rollout and --contexts")
        write_plan_codes(setup, plan, a.output)
    if refinement is not None:
        from tqs_onnx.joint_check import verification_record

        plan["verification"] = verification_record(refinement, margin)
    _write_json(a.output, plan)
    if a.output:
        remove_stale_codes(a.output, plan)
    if not a.quiet:
        from tqs_onnx.tables import format_plan

        print(format_plan(plan))
    return 0


def _warn_stale_rounding(command: str, scores: dict[str, Any], tiers_text: str | None) -> None:
    """On stderr even with --quiet: a CI job reusing old scores otherwise ships a worse plan unawares."""
    from tqs_onnx.allocate import stale_rounding

    warning = stale_rounding(scores)
    if warning and not tiers_text:  # named /gptq tiers are refused instead
        print(f"tqs-onnx {command}: warning: {warning}", file=sys.stderr)


def cmd_apply(a: argparse.Namespace) -> int:
    from tqs_onnx.graph import load_model
    from tqs_onnx.evaluate import verify_written
    from tqs_onnx.rewrite import load_plan, rewrite_model, save_model
    from tqs_onnx.tiers import parse_tier
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import resolve_device

    from tqs_onnx.rounding import codes_path

    try:
        codes = str(codes_path(a.plan))  # the plan's /gptq codes file is an input too
    except TqsError:
        codes = None  # no such plan, or one without codes: load_plan says what is wrong
    _check_output_files(a.output, a.report, f"{a.output}.data" if a.external_data else None,
                        inputs=(a.model, a.plan, a.rollout, a.contexts, codes))
    if bool(a.rollout) != bool(a.contexts):
        raise TqsError("--rollout and --contexts go together (the written model is verified by a rollout on the "
                       "contexts); without both it is checked on one step of synthetic inputs")
    from tqs_onnx.prepare import PASSES_VERSION

    plan = load_plan(a.plan)
    if a.no_factor and plan.get("factor", True):
        raise TqsError(f"{a.plan}: the plan was sized after the lossless passes (its sweep ran without "
                       "--no-factor); writing without them would not give the planned size. Sweep with "
                       "--no-factor to plan without them")
    if "planned_compression" in plan and plan.get("passes") != PASSES_VERSION and not a.force:
        raise TqsError(f"{a.plan}: plan of a tqs-onnx whose graph passes differ ({plan.get('passes') or 'not recorded'}; "
                       f"now {PASSES_VERSION}): the written size would not be the planned one; re-run the sweep "
                       "(--force to apply anyway)")
    loaded = load_model(a.model)
    from tqs_onnx.graph import same_model

    if plan["model"].get("sha256") is not None and not same_model(plan["model"], loaded):
        if not a.force:
            raise TqsError(f"{a.plan}: plan was made for another model (sha256 differs; --force to apply anyway)")
        if any(parse_tier(t).gptq for t in plan.get("weights", {}).values()):
            raise TqsError(f"{a.plan}: plan was made for another model and holds /gptq tiers, whose integers were "
                           "rounded for that model's weights; --force cannot apply them to this one (allocate "
                           "again from a sweep of this model)")
    model, reports = rewrite_model(loaded, plan, a.plan)
    weight_forms = {**(plan.get("weight_info") or {}), **reports.pop("weight-forms", {})}  # the graph's own
    out = Path(a.output)
    spec = RolloutSpec.load(a.rollout) if a.rollout else None
    contexts = Contexts.load(a.contexts, spec) if spec and a.contexts else None
    device = resolve_device(a.device)
    checks: dict[str, Any] = {}
    overflows = [f["overflow"] for f in weight_forms.values() if isinstance(f, dict) and f.get("overflow")]
    for note in overflows:
        print(f"tqs-onnx apply: note: {note}", file=sys.stderr)
    # Checked on the temporary copy: a model that fails never replaces `out`.
    try:
        files = save_model(model, out, a.external_data or None, keep=loaded.files,
                           check=lambda tmp: checks.update(verify_written(tmp, device, spec, contexts, label=out,
                                                                             reference=loaded.path)))
    except TqsError as exc:
        if overflows and "non-finite" in str(exc):
            raise TqsError(f"{exc}: {overflows[0]}" + (f" (and {len(overflows) - 1} more)" if len(overflows) > 1
                                                        else "") + "; keep such weights at fp32") from None
        raise
    on_disk = sum(f.stat().st_size for f in files)  # the model and its data file, as written
    report = {"schema_version": SCHEMA_VERSION, "kind": "tqs-apply-report", "tool_version": __version__,
              "output": str(out), "on_disk_bytes": on_disk,
              "on_disk_compression": loaded.file_bytes / on_disk,
              "planned_compression": plan.get("planned_compression"), "checks": checks,
              **({"overflow_notes": overflows} if overflows else {}),
              "forms": written_forms(reports.get("write-tiers", {}).get("rewritten", {}), weight_forms),
              "passes": {k: {kk: vv for kk, vv in v.items() if kk != "rewritten"} for k, v in reports.items()}}
    planned_bytes = plan.get("planned_bytes")
    if isinstance(planned_bytes, int) and planned_bytes > 0 and len(files) == 1 \
            and abs(on_disk / planned_bytes - 1) > SIZE_TOLERANCE:
        report["size_note"] = (f"on disk {on_disk:,} bytes against {planned_bytes:,} planned "
                               f"({100 * (on_disk / planned_bytes - 1):+.2f}%): was the plan or its scores edited?")
        print(f"tqs-onnx apply: note: {report['size_note']}", file=sys.stderr)
    conversion = reports.get("upgrade-opset", {}).get("check")
    if conversion and not conversion["checked"]:
        report["conversion_note"] = (f"the opset was raised from {conversion['from']} to {conversion['to']} for the "
                                     f"chosen tiers and the conversion was not checked: {conversion['why_not']}; "
                                     "compare the written model with the original (eval) before shipping it")
    elif conversion and conversion.get("dynamic_size") == 1:
        report["conversion_note"] = (f"the opset was raised from {conversion['from']} to {conversion['to']} for the "
                                     "chosen tiers and checked with every dynamic dimension as 1 only (the model "
                                     "does not run at 7), where resizing ops may agree that differ at other sizes; "
                                     "compare the written model with the original (eval) before shipping it")
    if "conversion_note" in report:
        print(f"tqs-onnx apply: note: {report['conversion_note']}", file=sys.stderr)
    if not a.quiet:
        forms = ", ".join(f"{n} {what}" for what, n in report["forms"].items() if n)
        planned = report["planned_compression"]
        print(f"wrote {out}: {on_disk:,} bytes, {report['on_disk_compression']:.2f}x on disk "
              f"({'planned %.2fx' % planned if planned else 'no planned size: a hand-written plan'}); "
              "onnx.checker ok, ORT loads, outputs finite"
              + (" where the original's are" if checks.get("nonfinite_as_original") else "")
              + (f"; opset {conversion['from']} -> {conversion['to']}, checked" if conversion and conversion["checked"]
                 else "")
              + (f"\n  weights written: {forms}" if forms else ""))
    if a.report:
        _write_json(a.report, report)
    return 0


SIZE_TOLERANCE = 0.005  # planned = on disk to the byte in one file (external data adds bytes per tensor: not checked)


def written_forms(rewritten: dict[str, str], info: dict[str, dict] | None = None) -> dict[str, int]:
    """How many rewritten weights take each form: DequantizeLinear that ORT fuses into MatMulNBits (the
    plan's `fused_dq`), DequantizeLinear run on every call (the rest: lookup tables behind constant
    indices, or everything with `--decode dq`), decoded at load (/load), a float16/bfloat16 Cast, or zeros."""
    from tqs_onnx.tiers import fusable_block, parse_tier

    info = info or {}
    counts = {"DequantizeLinear fused by ORT": 0, "DequantizeLinear per call": 0, "decoded at load": 0,
              "fp16/bf16 Cast": 0, "zeros": 0}
    for name, text in rewritten.items():
        t = parse_tier(text)
        key = ("zeros" if t.is_zero else "fp16/bf16 Cast" if not t.is_int else "decoded at load" if t.at_load
               else "DequantizeLinear fused by ORT" if info.get(name, {}).get("fused_dq")
               and (t.granularity != "block" or fusable_block(t.block_size))
               else "DequantizeLinear per call")
        counts[key] += 1
    return counts


def cmd_eval(a: argparse.Namespace) -> int:
    from tqs_onnx.evaluate import evaluate
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import resolve_device

    _check_output_files(a.output, inputs=(a.reference, a.candidate, a.rollout, a.contexts))
    spec = RolloutSpec.load(a.rollout)
    doc = evaluate(a.reference, a.candidate, spec, Contexts.load(a.contexts, spec), resolve_device(a.device))
    if a.runtime:
        from tqs_onnx.runtime_report import runtime_comparison

        doc["runtime"] = runtime_comparison(a.reference, a.candidate, resolve_device(a.device), spec,
                                            Contexts.load(a.contexts, spec))
    report = json_safe(doc)  # strict JSON for other tools
    _write_json(a.output, report)
    if a.quiet:  # nothing, --json or not (-o writes the report)
        return 0
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        from tqs_onnx.tables import format_eval

        print(format_eval(doc))
        if "runtime" in doc:
            from tqs_onnx.runtime_report import format_comparison

            print(format_comparison(doc["runtime"]))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from tqs_onnx.demo import run_demo

    # Refused before the sweep, not after it (--compression: by its type).
    _check_output_dir(a.out, (), ())
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TqsError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise TqsError(f"{out}: cannot write in the output folder")
    run_demo(out, a.compression, a.device, a.quiet)
    return 0


def cmd_pareto(a: argparse.Namespace) -> int:
    from tqs_onnx.allocate import load_scores
    from tqs_onnx.graph import load_model
    from tqs_onnx.pareto import (CHECKPOINT_NAME, FRONTIER_FILES, FrontierConfig, format_frontier,
                                 carried_models, frontier_checkpoint, named_models, open_run, previous_models,
                                 remove_stale_models,
                                 run_frontier, write_frontier)
    from tqs_onnx.report import REPORT_FILES, check_report_folder, write_report
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import resolve_device
    from tqs_onnx.sweep import note_missing_checkpoint

    inputs = (a.model, a.scores, a.rollout, a.contexts, a.eval_contexts)
    _check_output_dir(a.output, FRONTIER_FILES + (CHECKPOINT_NAME,), inputs)
    _check_output_dir(a.report, REPORT_FILES, inputs)
    if a.report:
        check_report_folder(Path(a.report))  # before the frontier runs, not after
    points = 1 if a.targets[0] == a.targets[1] else a.points  # one target: one point, no duplicates to skip
    config = FrontierConfig(a.targets, points, a.objective, a.tiers, a.max_rollouts, uniform=not a.no_uniform,
                            decode=a.decode)
    scores = load_scores(a.scores)
    _warn_stale_rounding("pareto", scores, a.tiers)
    spec = RolloutSpec.load(a.rollout)
    loaded = load_model(a.model)
    sweep_ctx = Contexts.load(a.contexts, spec)
    eval_ctx = Contexts.load(a.eval_contexts, spec) if a.eval_contexts else None
    out = Path(a.output)
    device = resolve_device(a.device)
    ckpt = frontier_checkpoint(out, loaded, [a.scores, a.contexts, a.eval_contexts], spec, config, device)
    ckpt.check(a.resume)  # before the reference rollouts
    note_missing_checkpoint(ckpt, a.resume, "every target from the start")
    try:
        # The earlier run's models: those its frontier.json lists, and, resuming, those the interrupted run
        # carried in its checkpoint (it removed that frontier.json before overwriting any model).
        previous = previous_models(out, loaded) | (carried_models(ckpt.load()) if a.resume else set()) \
            | named_models(out, loaded)
        run = open_run(loaded, scores, spec, sweep_ctx, eval_ctx, device, out)
        if not a.resume:  # an earlier frontier here no longer describes the models this run will overwrite
            run.before_write = lambda: [(out / name).unlink(missing_ok=True) for name in FRONTIER_FILES]
        doc = run_frontier(run, config, quiet=a.quiet or a.json, checkpoint=ckpt, resume=a.resume,
                           carry=sorted(previous))
        json_path, csv_path = write_frontier(out, doc)
        ckpt.path.unlink(missing_ok=True)
    finally:
        ckpt.release()
    stale = remove_stale_models(out, previous, doc,  # an earlier run's models into the same folder
                                keep=inputs)
    if a.report:
        write_report(a.report, scores, frontier=doc)
    if a.json and not a.quiet:
        print(json.dumps(doc, indent=1))
    elif not a.quiet:
        print(f"{format_frontier(doc)}\nwrote {json_path}, {csv_path}" + (f", {a.report}/index.html" if a.report else "")
              + (f"\ndeleted {len(stale)} model(s) of the earlier run in {out}" if stale else ""))
    return 0


def _check_output_dir(path: str | None, names: tuple[str, ...], inputs: tuple[str | None, ...]) -> None:
    """Refuse an output folder that is an existing file, or in which a file the command writes there
    (`names`) is one of its inputs, before any work is done."""
    if not path:
        return
    if Path(path).exists() and not Path(path).is_dir():
        raise TqsError(f"{path}: output folder is an existing file")
    _check_output_files(*(str(Path(path) / name) for name in names), inputs=inputs)


def cmd_gate(a: argparse.Namespace) -> int:
    from tqs_onnx.gate import GateConfig, format_gate, junit_error, junit_xml, mae_thresholds, run_gate
    from tqs_onnx.rollout import Contexts, RolloutSpec
    from tqs_onnx.runtime import resolve_device
    from tqs_onnx.util import atomic_write

    _check_output_files(a.junit, a.output, inputs=(a.reference, a.candidate, a.rollout, a.contexts))
    for old in (a.junit, a.output):  # an earlier run's verdict must not stand for a run that stops on bad input
        if old:
            Path(old).unlink(missing_ok=True)
    try:
        spec = RolloutSpec.load(a.rollout)
        contexts = Contexts.load(a.contexts, spec)
        config = GateConfig(a.max_degradation, mae_thresholds(a.max_mae), a.max_size, a.min_compression)
        doc = run_gate(a.reference, a.candidate, spec, contexts, resolve_device(a.device), config)
    except TqsError as exc:  # exit 2, and CI finds an error where it would find no results
        if a.junit:
            message = " ".join(str(exc).split())
            atomic_write(a.junit, lambda p: p.write_bytes(junit_error(message, a.candidate)))
        raise
    if a.junit:
        atomic_write(a.junit, lambda p: p.write_bytes(junit_xml(doc)))
    report = json_safe(doc)  # strict JSON for CI tools
    _write_json(a.output, report)
    if a.json and not a.quiet:
        print(json.dumps(report, indent=1))
    elif not a.quiet:
        print(format_gate(doc))
    return 0 if doc["passed"] else 1


def cmd_report(a: argparse.Namespace) -> int:
    from tqs_onnx.allocate import load_scores
    from tqs_onnx.report import REPORT_FILES, check_document, load_document, write_report

    _check_output_dir(a.output, REPORT_FILES, (a.scores, a.frontier, a.plan, a.eval))
    scores = load_scores(a.scores, sizes=False)  # plots only
    docs = {}
    for key, path, kind in (("frontier", a.frontier, "tqs-frontier"), ("plan", a.plan, "tqs-plan"),
                            ("eval_doc", a.eval, "tqs-eval")):
        docs[key] = load_document(path, kind) if path else None
        check_document(scores, docs[key], str(path))
    index = write_report(a.output, scores, **docs)
    if not a.quiet:
        print(f"wrote {index}")
    return 0


# ---------------------------------------------------------------------------------------- parser

BLOCKS_HELP = ("grouping of weights into blocks: auto (default: layer, or tensor when the layers form a single "
               "block) | tensor (one per weight) | layer (weights read by one op, biases with them) | "
               "scope[:DEPTH] (by exporter name scope, its first DEPTH parts; scope or scope:0: the whole scope) | "
               "fixed:K (K consecutive weights per block)")
MIN_SIZE_HELP = ("smallest float tensor (elements) that is quantized (default 256); 1-D tensors (biases, norm "
                 "scales) never are")

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tqs-onnx", description=(
        "Trajectory-based quantization sensitivity (TQS) for frozen ONNX models: score each block of weights "
        "by how a perturbation grows over a rollout, allocate precision tiers under a size budget, and write "
        "a verified mixed-precision ONNX graph."))
    p.add_argument("--version", action="version", version=f"tqs-onnx {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("inspect", help="what the model holds: I/O, ops, weights, blocks, a proposed rollout spec")
    s.add_argument("model", help="ONNX file (external data must sit in its folder)")
    s.add_argument("--blocks", default="auto", help=BLOCKS_HELP)
    s.add_argument("--min-size", type=_integer(0), default=256, help=MIN_SIZE_HELP)
    s.add_argument("--no-factor", action="store_true",
                   help="do not run the lossless passes (factor expanded lookup tables, store identical tensors once, store integer constants narrow; exact, on by default) before listing weights; a model with local functions still has its identical tensors stored once (inlining copies them)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("-o", "--output", help="also write the JSON here")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("sweep", help="TQS scores per block from perturbed rollouts (one ORT session)")
    s.add_argument("model", help="ONNX file (external data must sit in its folder)")
    _rollout_args(s)
    _output_args(s, what="scores JSON")
    s.add_argument("--probe", default="both", choices=["quant", "gauss", "both"],
                   help="quant: per-tensor b-bit residual; gauss: norm-matched Gaussian draws; both (default)")
    s.add_argument("--bits", type=int, default=8, help="bit-width of the quant probe, 2 to 16 (default 8)")
    s.add_argument("--probes", type=int, default=None, help="Gaussian draws per block (default 8)")
    s.add_argument("--horizon", type=int, help="rollout steps T_max (default: the spec's horizon)")
    s.add_argument("--seed", type=_integer(0), default=None, help="seed of the Gaussian probes (default 0)")
    s.add_argument("--early-stop", type=_real(0), default=0.0, metavar="TOL",
                   help="stop drawing Gaussian probes once gamma agrees within TOL (relative) over a sliding "
                        "window (the paper's rule; default 0: off; 0.01 kept rankings at Spearman >= 0.99)")
    s.add_argument("--no-skip-unreached", action="store_true",
                   help="probe every block fully, even one whose first two probes (quant and one Gaussian draw) "
                        "left every output bit-identical; by default such a block's other Gaussian draws are "
                        "skipped and its coarsest tier is rolled out once: if that too changes nothing its damage "
                        "is 0 at every tier, else every tier is measured")
    s.add_argument("--early-window", type=_integer(1), default=None,
                   help="with --early-stop: window of the early-stop rule (default 3)")
    s.add_argument("--early-horizon", action="store_true",
                   help="with --early-stop, also cut each rollout once gamma_task(T) converges; cheaper, but on "
                        "saturating (chaotic) models it reordered blocks (tools/bench_early_stop.py)")
    s.add_argument("--blocks", default="auto", help=BLOCKS_HELP)
    s.add_argument("--min-size", type=_integer(0), default=256, help=MIN_SIZE_HELP)
    s.add_argument("--gamma-min", type=_real(), default=-50.0,
                   help="blocks with gamma <= this are flagged dead (default -50: a divergence that shrank by "
                        "e^50 per step, i.e. none)")
    s.add_argument("--tiers", default=DEFAULT_SWEEP_TIERS,
                   help="tiers whose measured damage is recorded for `allocate --objective measured` "
                        f"(default {DEFAULT_SWEEP_TIERS}; /gptq: the plain tier's grid and scales, integers "
                        "rounded GPTQ's way on the inputs the weight meets along the nominal rollouts; '' to skip; "
                        "opt-in: zero, int1, /mse clipped scales such as int4/channel/mse)")
    s.add_argument("--no-factor", action="store_true",
                   help="do not run the lossless passes (factor expanded lookup tables, store identical tensors once, store integer constants narrow; exact, on by default) before scoring; a model with local functions still has its identical tensors stored once (inlining copies them)")
    s.add_argument("--checkpoint", help="append-only checkpoint (default OUTPUT.ckpt.jsonl)")
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint after an interruption")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="score blocks on N Ray workers (one GPU each with --device cuda, else a share of the "
                        "CPUs); needs tqs-onnx[distributed] (default 1: this process, unless --ray-address)")
    s.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (e.g. head:6379, or auto for the one `ray start` runs here; "
                        "ray:// client addresses need the ray[client] package) instead of starting one here, "
                        "with --workers 1 too (one worker there); every node must read MODEL at the same path")
    _device_args(s)
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("allocate", help="precision tiers per block under a compression target")
    s.add_argument("scores", help="scores JSON written by `sweep`")
    s.add_argument("--compression", type=float, required=True, help="target compression C of the file on disk (with --objective paper --paper-variant exact: of "
                        "the parameter bits, sum 32 n / C)")
    s.add_argument("--objective", default="measured", choices=["measured", "paper"],
                   help="measured (default): knapsack on measured per-tier damage; paper: Algorithm 2 on gamma")
    s.add_argument("--tiers", help="comma list, e.g. fp32,bf16,int8,int4,int2 or int4/channel, int4/block32, "
                                   "int8/channel/fp16 (default, measured objective: fp32 + the tiers the sweep "
                                   "measured, its /gptq tiers only with --verify-model, whose rollouts give their "
                                   "integers; paper objective: fp32,bf16,int8,int4,int2)")
    s.add_argument("--fp32-share", type=float, default=None, help="paper objective: share of FP32 bits kept for top blocks (default 0)")
    s.add_argument("--solver", default="mckp", choices=["mckp", "greedy"], help="mckp (default): exact multiple-choice knapsack (dynamic programming; pulp/CBC only for very large "
                        "instances), or greedy")
    s.add_argument("--probe", default=None, choices=["quant", "gauss"],
                   help="paper objective: which gamma ranks blocks (default quant, or gauss where the sweep ran "
                        "only Gaussian probes)")
    s.add_argument("--gamma-min", type=_real(), default=None,
                   help="paper objective (and the joint check's paper challengers): dead-block threshold on "
                        "the --probe gamma (default: the sweep's)")
    s.add_argument("--paper-variant", default="spec", choices=["spec", "exact"],
                   help="paper objective: spec (default) budgets the written file's true bytes and ranks on "
                        "gamma - min gamma, as the method spec does, so plans compare with uniform models at "
                        "matched on-disk sizes; exact: the paper's appendix A.1.2 to the letter (budget "
                        "C^-1 sum 32 n in parameter bits, tier cost b n, knapsack on gamma 2^-b)")
    s.add_argument("--verify-model", metavar="MODEL",
                   help="check the allocation by joint rollouts against uniform and refine it (needs --rollout/--contexts)")
    s.add_argument("--max-rollouts", type=_integer(0), default=None,
                   help="with --verify-model: cap on the local search's joint rollouts (default 30); the plan "
                        "itself, every uniform plan that fits and the paper's plans are always rolled out once each")
    s.add_argument("--margin", type=float, default=None, metavar="SE",
                   help="with --verify-model: standard errors of the paired per-context differences by which a "
                        "plan must beat the uniform incumbent (default 1; 0: a lower mean suffices; higher: "
                        "uniform unless the gain is clear)")
    s.add_argument("--decode", default="auto", choices=DECODES,
                   help="how integer tiers are written: auto (default) DequantizeLinear for 2-D weights read, "
                        "as stored, only as B of one main-graph MatMul/Gemm node in a form ONNX Runtime fuses "
                        "into MatMulNBits (`inspect` says \"fused\"), and the /load form for every other weight (Conv, LSTM, Add tables), "
                        "which ORT decodes once at load instead of on every call (`inspect` shows which); "
                        "a table read by a Gather through constant indices (a factored table) keeps "
                        "DequantizeLinear: decoded at load, ORT would fold it through the Gather back to the "
                        "expanded FP32 tensor; dq: DequantizeLinear everywhere (least memory) but for int2 weights ORT 1.31's fused kernel would miscompute (N %% 4 != 0), decoded at load; load: /load "
                        "everywhere (the FP32 graph after load: its kernels, speed and memory); load-compact: "
                        "/load except those tables (FP32 kernels, compact tables: CPU deployment)")
    _rollout_args(s, required=False)
    _device_args(s)
    _output_args(s, what="plan JSON")
    s.set_defaults(func=cmd_allocate)

    s = sub.add_parser("apply", help="write the model with the plan's tiers (QDQ / Cast), then verify it")
    s.add_argument("model", help="the model the plan was made for")
    s.add_argument("plan", help="plan JSON written by `allocate`")
    _output_args(s, what="ONNX model")
    s.add_argument("--external-data", action="store_true", help="store tensors in OUTPUT.data (automatic above 1.5 GB)")
    s.add_argument("--no-factor", action="store_true",
                   help="do not run the lossless passes (factor expanded lookup tables, store identical tensors once, store integer constants narrow; a model with local functions still has its identical tensors stored once); only for a plan from a sweep with --no-factor, which this is then checked to be")
    s.add_argument("--force", action="store_true",
                   help="apply a plan whose model checksum or graph passes differ (its size may then not be the planned "
                        "one); not a plan of another model with /gptq tiers, whose integers are that model's")
    s.add_argument("--report", metavar="JSON", help="write the apply report here")
    _rollout_args(s, required=False)
    _device_args(s)
    s.set_defaults(func=cmd_apply)

    s = sub.add_parser("eval", help="rollout errors of a written model against the FP32 one, and compression")
    s.add_argument("reference", help="the original (FP32) model")
    s.add_argument("candidate", help="the written model")
    _rollout_args(s)
    s.add_argument("-o", "--output", help="write the JSON report here")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--quiet", action="store_true", help="print nothing but errors (--json included)")
    s.add_argument("--runtime", action="store_true",
                   help="also measure both models in ONNX Runtime, each in a fresh process: session time, memory "
                        "after load and peak, latency per call and per rollout step, fused/unfused weights")
    _device_args(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("demo", help="the whole pipeline on the bundled Lorenz-96 forecaster")
    s.add_argument("-o", "--out", "--output", dest="out", default="tqs-demo-out", metavar="DIR",
                   help="folder for scores, plans and models (default ./tqs-demo-out)")
    s.add_argument("--compression", type=_real(1), default=4.0, help="target compression (default 4)")
    s.add_argument("--quiet", action="store_true", help="print nothing but errors")
    _device_args(s)
    s.set_defaults(func=cmd_demo)
    _frontier_parsers(sub)
    return p


def _as_option(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a library parser: its TqsError becomes argparse's usage error (exit 2)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except TqsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _integer(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, not '{text}'")
        return value

    convert.__name__ = "integer"
    return convert


def _real(low: float | None = None, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number, >= low (> low with `above`) when low is given."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (low is None or (value > low if above else value >= low))
        if not ok:
            bound = "" if low is None else f" {'>' if above else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, not '{text}'")
        return value

    convert.__name__ = "number"
    return convert


def _frontier_parsers(sub) -> None:
    """pareto, gate and report (issue 7)."""
    from tqs_onnx.gate import parse_mae, parse_percent
    from tqs_onnx.pareto import OBJECTIVES, parse_targets

    s = sub.add_parser("pareto", help="allocate, apply and evaluate a range of targets from one sweep (the frontier)")
    s.add_argument("model", help="the original (FP32) model the scores were computed on")
    s.add_argument("scores", help="scores JSON written by `sweep`")
    _rollout_args(s)
    s.add_argument("--targets", type=_as_option(parse_targets), default=(2.0, 32.0), metavar="LOW:HIGH",
                   help="compression range, spaced geometrically and clamped to what the tiers reach (default "
                        "2:32); one number X: that target alone")
    s.add_argument("--points", type=int, default=16, help="number of targets (default 16; duplicates are skipped)")
    s.add_argument("--eval-contexts", metavar="EVAL.npz",
                   help="held-out contexts for the errors (default: the sweep contexts, reported as in-sample)")
    s.add_argument("--objective", default="measured", choices=OBJECTIVES,
                   help="measured (default, with the joint check and refinement), paper (Algorithm 2), or both "
                        "(keep the better model per target, delete the dominated one)")
    s.add_argument("--tiers", help="tiers for every objective (default: fp32 + the sweep's tiers for measured, "
                                   "fp32,bf16,int8,int4,int2 for paper)")
    s.add_argument("--decode", default="auto", choices=DECODES,
                   help="how integer tiers are written, as in `allocate --decode` (default auto)")
    s.add_argument("--max-rollouts", type=_integer(0), default=30,
                   help="cap on each refinement's local-search joint rollouts (default 30; the plans it compares "
                        "are rolled out once each besides)")
    s.add_argument("--no-uniform", action="store_true", help="skip the uniform (single-tier) baselines")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from DIR/frontier.ckpt.jsonl (each finished point is "
                        "appended there; same inputs and options)")
    s.add_argument("-o", "--output", default="tqs-frontier", metavar="DIR",
                   help="folder for frontier.json, frontier.csv and the kept models (default ./tqs-frontier)")
    s.add_argument("--report", metavar="DIR", help="also write the HTML report (index.html + PNGs) here")
    s.add_argument("--json", action="store_true", help="print the frontier JSON (no progress bar)")
    s.add_argument("--quiet", action="store_true", help="no progress bar, table or JSON")
    _device_args(s)
    s.set_defaults(func=cmd_pareto)

    s = sub.add_parser("gate", help="CI gate: structural checks and rollout error thresholds (exit 0 pass, 1 fail, 2 bad input)",
                       description="Exit 0 when every check passes, 1 when one fails, 2 when the input is unusable "
                                   "(missing file, unreadable reference, spec or contexts that do not fit, no threshold "
                                   "for an output). Percentages: '1%' and '1' both mean one percent.")
    s.add_argument("reference", help="the original (FP32) model")
    s.add_argument("candidate", help="the compressed model to check")
    _rollout_args(s)
    s.add_argument("--max-degradation", type=_as_option(parse_percent), metavar="PCT",
                   help="per output, largest allowed 100*(MAE_q - MAE_fp32)/MAE_fp32 against the contexts' ground "
                        "truth, in percent: '1%%' or '1' (so '0.01' is 0.01%%)")
    s.add_argument("--max-mae", type=_as_option(parse_mae), action="append", metavar="[OUTPUT=]X",
                   help="per output, largest allowed rollout MAE against the FP32 model (needed when the contexts "
                        "carry no truth); OUTPUT=X bounds that output alone (repeat for outputs of other scales), "
                        "a bare X every output not named")
    s.add_argument("--max-size", type=_integer(1), metavar="BYTES", help="largest allowed size on disk (with external data)")
    s.add_argument("--min-compression", type=_real(0, above=True), metavar="X",
                   help="smallest allowed reference/candidate size ratio")
    s.add_argument("--junit", metavar="FILE", help="write a JUnit XML report (one testcase per check)")
    s.add_argument("-o", "--output", metavar="JSON", help="write the JSON result here")
    s.add_argument("--json", action="store_true", help="print JSON instead of the summary")
    s.add_argument("--quiet", action="store_true", help="print nothing (--json included); the exit code tells")
    _device_args(s)
    s.set_defaults(func=cmd_gate)

    s = sub.add_parser("report", help="HTML page with plots: sensitivity, roles, frontier, error growth, tier map")
    s.add_argument("scores", help="scores JSON written by `sweep`")
    s.add_argument("--frontier", metavar="JSON", help="frontier.json written by `pareto`")
    s.add_argument("--plan", metavar="JSON", help="plan JSON written by `allocate` (tier map, tiers in the block table)")
    s.add_argument("--eval", metavar="JSON", help="report written by `eval -o` (per-step error growth)")
    s.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for index.html and the PNGs")
    s.add_argument("--quiet", action="store_true", help="print nothing but errors")
    s.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        _gate_usage_error(sys.argv[1:] if argv is None else argv, str(exc))
        return 2
    except KeyboardInterrupt:  # while the libraries still load
        print("tqs-onnx: interrupted", file=sys.stderr)
        return 130
    previous = _catch_sigterm()
    try:
        from tqs_onnx.runtime import check_settings

        check_settings()
        return args.func(args)
    except TqsError as exc:
        print(f"tqs-onnx {args.command}: error: {printable(' '.join(str(exc).split()))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`tqs-onnx inspect M | head`): no error, the shell's code
        _silence_stdout()
        return 141
    except OSError as exc:  # the file system said no (disk full, permissions): still one line
        print(printable(f"tqs-onnx {args.command}: error: {exc.strerror or exc}"
                        f"{f' ({exc.filename})' if exc.filename else ''}{_resume_hint(args)}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        stopped = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
        written = getattr(exc, "written", None)  # a model's renames finished before the signal was taken
        done = f" after writing {written[-1]} (complete, checked before it was renamed into place)" if written else ""
        print(f"tqs-onnx {args.command}: {stopped}{done}{_resume_hint(args)}", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _gate_usage_error(argv: list[str], message: str) -> None:
    """A gate refused for a malformed option still replaces its earlier verdict: the --junit file gets
    the error testcase and the -o report goes (a green JUnit of the last build stood beside a failed
    job). Only files that are a gate's own output are touched (the option may name an input)."""
    commands = _positionals(argv)
    if not commands or commands[0] != "gate":
        return
    paths = {}
    for flag in ("--junit", "-o", "--output"):
        for k, a in enumerate(argv):
            if a == flag and k + 1 < len(argv):
                paths[flag] = argv[k + 1]
            elif a.startswith(f"{flag}="):
                paths[flag] = a.split("=", 1)[1]
    try:
        from tqs_onnx.gate import junit_error
        from tqs_onnx.util import atomic_write

        report = paths.get("-o") or paths.get("--output")
        if report and Path(report).is_file() and b'"kind": "tqs-gate"' in Path(report).read_bytes()[:4096]:
            Path(report).unlink()
        junit = paths.get("--junit")
        if junit and (not Path(junit).exists() or (Path(junit).is_file()
                                                    and b"tqs-onnx gate" in Path(junit).read_bytes()[:4096])):
            candidate = commands[2] if len(commands) > 2 else "candidate"
            atomic_write(junit, lambda p: p.write_bytes(junit_error(" ".join(message.split()), candidate)))
    except (OSError, TqsError):
        pass  # the usage error is what the user reads; this is a courtesy to CI


def _positionals(argv: list[str]) -> list[str]:
    """The command and its positional arguments in a raw argv (option values left out: the gate's
    error JUnit named the reference after `--junit out.xml ref.onnx cand.onnx`)."""
    takes_value = set()
    for action in build_parser()._subparsers._group_actions[0].choices["gate"]._actions:
        if action.option_strings and action.nargs != 0:
            takes_value.update(action.option_strings)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = "=" not in a and a in takes_value
        else:
            out.append(a)
    return out


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's stop, `timeout`): handled as Ctrl-C is, with its own words and code."""


def _catch_sigterm():
    """Install the SIGTERM handler (main thread only); the previous handler, to restore, or None."""
    def stop(signum, frame):
        raise _Terminated

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return None
    return signal.signal(signal.SIGTERM, stop)


def _resume_hint(args: argparse.Namespace) -> str:
    """Where a stopped sweep or pareto kept its finished work, if it kept any."""
    if args.command not in ("sweep", "pareto"):
        return ""
    from tqs_onnx.util import FRONTIER_CHECKPOINT  # light: the interrupt may come while libraries load

    ckpt = checkpoint_path(args) if args.command == "sweep" else Path(args.output) / FRONTIER_CHECKPOINT
    what = "blocks" if args.command == "sweep" else "points"
    try:
        rows = ckpt.read_bytes().count(b"\n") - 1 if ckpt.is_file() else 0  # the first line is the run's
    except OSError:
        rows = 0
    if rows < 1:
        return ""
    return f"; the finished {what} are kept in {ckpt}: run the same command with --resume to go on"


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not hit the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a captured stream)
        pass


if __name__ == "__main__":
    sys.exit(main())
