"""`tqs-onnx gate`: pass/fail checks of a compressed model against its reference, for CI pipelines.

Checks, in order (a failed structural check skips the checks that need it):
- ``checker``: the candidate reads as ONNX and passes ``onnx.checker``;
- ``ort_load``: ONNX Runtime opens it;
- ``io_signature``: its inputs and outputs match the reference's (names, element types, rank and fixed
  dimensions; symbolic ones may differ), and so do its trajectories' shapes once rolled out;
- ``finite``: a rollout on every context stays finite;
- ``max_size`` / ``min_compression``: optional size limits;
- per trajectory output, ``degradation[OUT]`` when the contexts carry ground truth: the relative
  degradation 100 * (MAE_q - MAE_fp32) / MAE_fp32 against the truth must be <= --max-degradation
  (in percent), and ``mae[OUT]`` when --max-mae is given: MAE against the FP32 rollout <= it.

Problems with the inputs (a missing file, an unreadable reference, a spec the reference does not
fit, no threshold that applies to an output) are TqsErrors: exit code 2, not a failed gate.
"""

from __future__ import annotations

import math
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from tqs_onnx import SCHEMA_VERSION, __version__
from tqs_onnx.errors import TqsError
from tqs_onnx.evaluate import compare, require_finite_reference, rollouts, truth_arrays
from tqs_onnx.graph import LoadedModel, load_model
from tqs_onnx.rollout import Contexts, RolloutSpec, shapes_compatible
from tqs_onnx.runtime import Device, io_signature, make_session
from tqs_onnx.util import first_line

PASS, FAIL, SKIP = "pass", "fail", "skip"
INFO = "info"  # reported beside the checks, never fails the gate


@dataclass
class GateConfig:
    """Thresholds; None means the check is not run."""

    max_degradation_pct: float | None = None  # percent, vs ground truth
    # absolute, vs the FP32 rollout: one number for every output, or output -> number ('' for the rest)
    max_mae: float | dict[str, float] | None = None
    max_size: int | None = None  # bytes on disk (model + external data)
    min_compression: float | None = None  # reference bytes / candidate bytes

    def mae_limit(self, output: str) -> float | None:
        """The --max-mae bound of `output` (None: none applies)."""
        if isinstance(self.max_mae, dict):
            return self.max_mae.get(output, self.max_mae.get(""))
        return self.max_mae


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    message: str
    value: float | None = None
    threshold: float | None = None
    seconds: float = 0.0


def parse_mae(text: str) -> tuple[str, float]:
    """--max-mae X (every output) or OUTPUT=X (that output: outputs of other scales get their own)."""
    name, sep, number = str(text).rpartition("=")
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (sep and not name):
        raise TqsError(f"--max-mae takes X or OUTPUT=X with X a finite number >= 0, not '{text}'")
    return name, value


def mae_thresholds(given: list[tuple[str, float]] | None) -> dict[str, float] | None:
    """Repeated --max-mae options as output -> bound ('' for every output not named); one output given
    two bounds is refused (the last one won silently)."""
    if not given:
        return None
    names = [n for n, _ in given]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise TqsError(f"--max-mae {twice + '=' if twice else ''}X given twice; give each output one bound")
    return dict(given)


def parse_percent(text: str | float) -> float:
    """A threshold in percent: '1%' and '1' both mean one percent (so '0.01' is a hundredth of one)."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1] if raw.endswith("%") else raw)
    except ValueError:
        raise TqsError(f"not a percentage: '{text}' (write 1% or 1 for one percent)") from None
    if not math.isfinite(value) or value < 0:
        raise TqsError(f"a percentage threshold must be finite and >= 0, not '{text}'")
    return value


# ------------------------------------------------------------------------------------ the checks

def _timed(name: str, body: Callable[[], tuple[str, str, float | None, float | None]]) -> Check:
    t0 = time.perf_counter()
    status, message, value, threshold = body()
    return Check(name, status, message, value, threshold, round(time.perf_counter() - t0, 4))


def check_structure(path: Path) -> tuple[Check, LoadedModel | None]:
    """The candidate loads as ONNX and passes onnx.checker (with its external data, by path)."""
    loaded: list[LoadedModel] = []

    def body():
        try:
            loaded.append(load_model(path))
            onnx.checker.check_model(str(path))
        except TqsError as exc:
            return FAIL, str(exc), None, None
        except Exception as exc:  # onnx.checker raises several types
            return FAIL, f"onnx.checker: {first_line(exc, 200)}", None, None
        return PASS, "onnx.checker accepts the model", None, None

    check = _timed("checker", body)
    return check, (loaded[0] if loaded and check.status == PASS else None)


def check_session(path: Path, device: Device) -> tuple[Check, Any]:
    sessions: list[Any] = []

    def body():
        try:
            sessions.append(make_session(str(path), device))
        except TqsError as exc:
            return FAIL, str(exc), None, None
        return PASS, f"ONNX Runtime loads it ({device.kind})", None, None

    check = _timed("ort_load", body)
    return check, (sessions[0] if sessions else None)


def check_signature(ref_session, cand_session) -> Check:
    """Same input and output names, element types, ranks and fixed dimensions (symbolic ones may differ)."""
    def body():
        ref_in, ref_out = io_signature(ref_session)
        cand_in, cand_out = io_signature(cand_session)
        diffs = [f"{kind} '{n}': {why}" for kind, ref, cand in (("input", ref_in, cand_in), ("output", ref_out, cand_out))
                 for n, why in _signature_diffs(ref, cand)]
        if diffs:
            return FAIL, "; ".join(diffs[:4]) + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""), None, None
        return PASS, f"inputs ({len(cand_in)}) and outputs ({len(cand_out)}) match the reference", None, None

    return _timed("io_signature", body)


def _signature_diffs(ref: dict[str, tuple], cand: dict[str, tuple]) -> list[tuple[str, str]]:
    out = [(n, "missing") for n in ref if n not in cand] + [(n, "not in the reference") for n in cand if n not in ref]
    out += [(n, f"type {cand[n][1]}, reference {ref[n][1]}") for n in ref if n in cand and ref[n][1] != cand[n][1]]
    out += [(n, f"shape {list(cand[n][0])}, reference {list(ref[n][0])}") for n in ref
            if n in cand and not shapes_compatible(ref[n][0], cand[n][0])]
    return out


def check_rollout(cand_session, spec: RolloutSpec, contexts: Contexts, device: Device,
                  label: str | Path = "candidate", reference_bad: set[str] = frozenset()) -> tuple[Check, dict | None]:
    """Roll the candidate out on every context; every value of every float output must be finite (the
    trajectory's, and the outputs no spec follows: a shipped diagnostic that is NaN on every call
    passed as 'all finite' when only the trajectory was looked at)."""
    trajs: list[dict[str, np.ndarray]] = []
    watch = float_outputs(cand_session)

    def body():
        try:
            trajs.append(rollouts(cand_session, spec, contexts, device, label=label, watch=watch))
        except TqsError as exc:
            return FAIL, f"rollout fails: {exc}", None, None
        except Exception as exc:  # ORT run errors: shape or type problems inside the graph
            return FAIL, f"rollout fails: {first_line(exc, 200)}", None, None
        bad = {k: w for k, w in watch.items() if w[0]}
        if bad:
            where = ", ".join(f"'{k}' {n:,} from step {t}" for k, (n, t) in sorted(bad.items(), key=lambda kv: kv[1][1]))
            shared = sorted(set(bad) & set(reference_bad))
            if shared:  # the reference's own outputs are checked for the trajectory only (it must be finite)
                where += f"; the reference's own {', '.join(repr(k) for k in shared)} is non-finite too"
            return FAIL, f"{sum(n for n, _ in bad.values()):,} non-finite values in the rollout ({where})", \
                float(sum(n for n, _ in bad.values())), 0.0
        return PASS, f"{contexts.count} contexts x {spec.horizon} steps, every output finite", 0.0, 0.0

    check = _timed("finite", body)
    return check, (trajs[0] if check.status == PASS else None)


FLOAT_OUTPUT_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)")


def float_outputs(session) -> dict[str, list[int]]:
    """A `watch` (evaluate.rollouts) of every float output of `session`: [non-finite values, first step]."""
    return {o.name: [0, 0] for o in session.get_outputs() if o.type in FLOAT_OUTPUT_TYPES}


def _digits(value: float, limit: float, places: int = 3, kind: str = "f") -> str:
    """`value` formatted `.{places}{kind}`, with more digits where it would print as the limit it
    differs from (a failing 4.0317x was printed '4.032x < 4.0318x')."""
    text = f"{value:.{places}{kind}}"
    while value != limit and places < 12 and (text == f"{limit:.{places}{kind}}" or float(text) == limit):
        places += 1
        text = f"{value:.{places}{kind}}"
    return text


def size_checks(ref: LoadedModel, cand: LoadedModel, config: GateConfig) -> list[Check]:
    out = []
    if config.max_size is not None:
        ok = cand.file_bytes <= config.max_size
        out.append(Check("max_size", PASS if ok else FAIL,
                         f"{cand.file_bytes:,} bytes {'<=' if ok else '>'} {config.max_size:,}",
                         float(cand.file_bytes), float(config.max_size)))
    if config.min_compression is not None:
        ratio = ref.file_bytes / cand.file_bytes
        ok = ratio >= config.min_compression
        out.append(Check("min_compression", PASS if ok else FAIL,
                         f"{_digits(ratio, config.min_compression)}x {'>=' if ok else '<'} {config.min_compression:g}x",
                         ratio, config.min_compression))
    return out


def error_checks(errors: dict[str, dict[str, Any]], config: GateConfig) -> list[Check]:
    """Per output: relative degradation vs truth (if known and asked for), MAE vs FP32 (if asked for)."""
    out = []
    for name, e in errors.items():
        if config.max_degradation_pct is not None and "degradation_pct" in e:
            d, limit = e["degradation_pct"], config.max_degradation_pct
            ok = d <= limit
            out.append(Check(f"degradation[{name}]", PASS if ok else FAIL,
                             f"{'+' if d >= 0 else ''}{_digits(d, limit)}% {'<=' if ok else '>'} {limit:g}% (MAE vs truth {e['mae_vs_truth']:.4g}, "
                             f"FP32 {e['mae_fp32_vs_truth']:.4g})", d, limit))
        limit = config.mae_limit(name)
        if limit is not None:
            m = e["mae_vs_fp32"]
            ok = m <= limit
            out.append(Check(f"mae[{name}]", PASS if ok else FAIL,
                             f"MAE vs FP32 {_digits(m, limit, 4, 'g')} {'<=' if ok else '>'} {limit:g}", m, limit))
    return out


def required_thresholds(spec: RolloutSpec, contexts: Contexts, config: GateConfig) -> None:
    """Every trajectory output must get an error check; otherwise the gate would pass vacuously."""
    unknown = [k for k in (config.max_mae if isinstance(config.max_mae, dict) else {}) if k and k not in spec.trajectory]
    if unknown:
        raise TqsError(f"--max-mae {unknown[0]}=...: no trajectory output '{unknown[0]}' (the spec follows "
                       f"{', '.join(spec.trajectory)})")
    for out in spec.trajectory:
        has_truth = spec.truth.get(out) in contexts.arrays
        if config.max_degradation_pct is not None and not has_truth:
            raise TqsError(f"--max-degradation needs ground truth, and the contexts carry none for output '{out}'"
                           + (f" (no array '{spec.truth[out]}')" if out in spec.truth else "")
                           + "; drop it or add truth to the contexts")
        if config.mae_limit(out) is None and not (has_truth and config.max_degradation_pct is not None):
            why = ("--max-degradation is not set" if has_truth
                   else f"the contexts carry no truth array '{spec.truth[out]}' for it" if out in spec.truth
                   else "the contexts carry no ground truth for it")
            raise TqsError(f"no error threshold applies to output '{out}': {why}; pass --max-mae "
                           f"(absolute MAE vs the FP32 model)" + ("" if has_truth else " or add truth to the contexts"))


def deployment_check(ref_path: Path, cand_path: Path, checks: list[Check], spec: RolloutSpec,
                     contexts: Contexts, device: Device) -> tuple[Check, dict | None]:
    """Information, never a failure: the candidate's latency and memory beside the reference's, each
    measured in a fresh process (tqs_onnx.runtime_report), so one gate run says whether it is better to ship."""
    if not any(c.name == "ort_load" and c.status == PASS for c in checks):
        return Check("deployment", SKIP, "not run: ONNX Runtime does not load the candidate"), None
    if not any(c.name == "io_signature" and c.status == PASS for c in checks):
        return Check("deployment", SKIP, "not run: the candidate's inputs or outputs differ from the reference's"), None
    result: list[dict] = []

    def body():
        from tqs_onnx.runtime_report import runtime_comparison, summary_line

        try:
            result.append(runtime_comparison(ref_path, cand_path, device, spec, contexts, calls=10, rollouts=3,
                                             budget_s=5.0))
        except (TqsError, OSError, ValueError) as exc:
            return INFO, f"not measured: {exc}", None, None
        r = result[0]["ratios"]
        return INFO, summary_line(result[0]), r.get("step_ms", r.get("call_ms")), None

    return _timed("deployment", body), (result[0] if result else None)


# ---------------------------------------------------------------------------------------- the gate

def run_gate(reference: str | Path, candidate: str | Path, spec: RolloutSpec, contexts: Contexts,
             device: Device, config: GateConfig, deployment: bool = True) -> dict[str, Any]:
    """All checks; the document `--json` prints and `--junit` turns into XML.

    `deployment` adds the non-failing ``deployment`` line: latency and memory beside the reference's.
    """
    t0 = time.perf_counter()
    cand_path = Path(candidate)
    if cand_path.is_dir():
        raise TqsError(f"{cand_path}: is a folder; give the candidate model's file")
    if not cand_path.is_file():
        raise TqsError(f"{cand_path}: no such file")
    required_thresholds(spec, contexts, config)
    ref = load_model(reference)
    ref_session = make_session(str(ref.path), device)
    ref_watch = float_outputs(ref_session)
    reference_traj = rollouts(ref_session, spec, contexts, device, label=ref.path,  # a spec it does not fit: exit 2
                              watch=ref_watch)
    reference_bad = {k for k, (n, _) in ref_watch.items() if n}
    require_finite_reference(reference_traj, ref.path)  # else the candidate would be blamed for the contexts
    truth = truth_arrays(spec, contexts, reference_traj)
    checks, cand = _candidate_checks(cand_path, ref, ref_session, reference_traj, truth, spec, contexts, device,
                                     config, reference_bad)
    runtime = None
    if deployment:
        info, runtime = deployment_check(ref.path, cand_path, checks, spec, contexts, device)
        checks.append(info)
    doc = gate_document(ref, cand_path, cand, spec, contexts, device, config, checks, time.perf_counter() - t0)
    if runtime is not None:
        doc["deployment"] = runtime
    return doc


def _candidate_checks(path: Path, ref: LoadedModel, ref_session, reference_traj: dict[str, np.ndarray],
                      truth: dict[str, np.ndarray], spec: RolloutSpec, contexts: Contexts, device: Device,
                      config: GateConfig, reference_bad: set[str] = frozenset()
                      ) -> tuple[list[Check], LoadedModel | None]:
    """Structural checks first; each later one runs only when what it needs passed. `reference_bad`:
    the reference's outputs no spec follows that are non-finite too (named in a `finite` failure)."""
    pending = ["ort_load", "io_signature", "finite"]
    checks: list[Check] = []
    structure, cand = check_structure(path)
    checks.append(structure)
    session = None
    if cand is not None:
        load, session = check_session(path, device)
        checks.append(load)
        pending.remove("ort_load")
        checks += size_checks(ref, cand, config)
    if session is not None:
        signature = check_signature(ref_session, session)
        checks.append(signature)
        pending.remove("io_signature")
        if signature.status == PASS:
            finite, traj = check_rollout(session, spec, contexts, device, label=path, reference_bad=reference_bad)
            checks.append(finite)
            pending.remove("finite")
            if traj is not None:
                try:
                    checks += error_checks(compare(reference_traj, traj, spec, truth), config)
                except TqsError as exc:  # trajectories of other shapes: the signature did not match after all
                    checks[checks.index(signature)] = Check("io_signature", FAIL, str(exc), None, signature.seconds)
    pending += [n for n in requested_checks(spec, truth, config) if n not in {c.name for c in checks}]
    checks += [Check(n, SKIP, "not run: an earlier structural check failed") for n in pending]
    return checks, cand


def requested_checks(spec: RolloutSpec, truth: dict[str, np.ndarray], config: GateConfig) -> list[str]:
    """The names of the threshold checks `config` asks for: a run stopped early lists them as skipped,
    so that a CI report always holds the same test cases."""
    names = [n for n, v in (("max_size", config.max_size), ("min_compression", config.min_compression)) if v is not None]
    for out in spec.trajectory:
        if config.max_degradation_pct is not None and out in truth:
            names.append(f"degradation[{out}]")
        if config.mae_limit(out) is not None:
            names.append(f"mae[{out}]")
    return names


def gate_document(ref: LoadedModel, cand_path: Path, cand: LoadedModel | None, spec: RolloutSpec,
                  contexts: Contexts, device: Device, config: GateConfig, checks: list[Check],
                  seconds: float) -> dict[str, Any]:
    failed = [c.name for c in checks if c.status == FAIL]
    return {
        "schema_version": SCHEMA_VERSION, "kind": "tqs-gate", "tool_version": __version__,
        "passed": not failed, "failed": failed,
        "reference": str(ref.path), "candidate": str(cand_path),
        "reference_bytes": ref.file_bytes, "candidate_bytes": cand.file_bytes if cand else cand_path.stat().st_size,
        "candidate_checked": cand is not None,  # else candidate_bytes is the .onnx file's alone
        "contexts": contexts.count, "horizon": spec.horizon, "device": device.kind,
        "thresholds": asdict(config),
        "checks": [asdict(c) for c in checks], "seconds": round(seconds, 3),
    }


# ------------------------------------------------------------------------------------------ output

def format_gate(doc: dict[str, Any]) -> str:
    """One screen: verdict, sizes, one line per check."""
    verdict = "PASS" if doc["passed"] else "FAIL"
    ratio = doc["reference_bytes"] / doc["candidate_bytes"] if doc["candidate_bytes"] else math.inf
    size = (f"{doc['candidate_bytes']:,} bytes vs {doc['reference_bytes']:,} ({ratio:.2f}x compression)"
            if doc.get("candidate_checked", True) else
            f"{doc['candidate_bytes']:,} bytes in the .onnx file (it failed the checker: data files not counted)")
    lines = [f"tqs-onnx gate: {verdict}  {doc['candidate']}  vs  {doc['reference']}",
             f"  {size}; {doc['contexts']} contexts x {doc['horizon']} steps on {doc['device']}"]
    width = max(len(c["name"]) for c in doc["checks"])
    for c in doc["checks"]:
        lines.append(f"  {c['status'].upper():4s}  {c['name']:{width}s}  {c['message']}")
    n_fail = len(doc["failed"])
    lines.append(f"{len(doc['checks'])} checks: {n_fail} failed" + (f" ({', '.join(doc['failed'])})" if n_fail else "")
                 + f"; {doc['seconds']:.2f} s")
    return "\n".join(lines)


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")  # what XML 1.0 cannot hold


def _xml_text(text: Any) -> str:
    return _NOT_XML.sub("\ufffd", str(text))


def junit_error(message: str, candidate: str) -> bytes:
    """JUnit XML for a gate stopped by bad input (exit 2): one testcase with an error element, so CI shows
    the error where it would otherwise find no results at all."""
    root, suite = _junit_suite(candidate, {"tests": "1", "failures": "0", "errors": "1", "skipped": "0",
                                           "time": "0.000"})
    case = ET.SubElement(suite, "testcase", {"classname": _classname(candidate), "name": "input", "time": "0.000"})
    ET.SubElement(case, "error", {"message": _xml_text(message), "type": "tqs-bad-input"}).text = _xml_text(message)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _junit_suite(candidate: str, counts: dict[str, str]) -> tuple[ET.Element, ET.Element]:
    root = ET.Element("testsuites", {"name": "tqs-onnx gate", **counts})
    return root, ET.SubElement(root, "testsuite", {"name": _xml_text(f"tqs-onnx gate: {candidate}"), **counts})


def _classname(candidate: str) -> str:
    """The testcases' class: the candidate as the command named it, so CI tools (which key results on
    class and name) keep apart the gates of a/model.onnx and b/model.onnx run in one job."""
    return _xml_text(f"tqs_onnx.gate[{candidate}]")


def junit_xml(doc: dict[str, Any]) -> bytes:
    """JUnit XML: one testsuite, one testcase per check (failure / skipped elements as CI tools expect)."""
    checks = doc["checks"]
    counts = {"tests": str(len(checks)), "failures": str(sum(c["status"] == FAIL for c in checks)),
              "errors": "0", "skipped": str(sum(c["status"] == SKIP for c in checks)),
              "time": f"{doc['seconds']:.3f}"}
    root, suite = _junit_suite(doc["candidate"], counts)
    props = ET.SubElement(suite, "properties")
    for key in ("reference", "candidate", "reference_bytes", "candidate_bytes", "contexts", "horizon", "device"):
        ET.SubElement(props, "property", {"name": key, "value": _xml_text(doc[key])})
    for c in checks:
        case = ET.SubElement(suite, "testcase", {"classname": _classname(doc["candidate"]), "name": _xml_text(c["name"]),
                                                 "time": f"{c['seconds']:.4f}"})
        message = _xml_text(c["message"])
        if c["status"] == FAIL:
            ET.SubElement(case, "failure", {"message": message, "type": "tqs-gate"}).text = message
        elif c["status"] == SKIP:
            ET.SubElement(case, "skipped", {"message": message})
        elif c["status"] == INFO:
            ET.SubElement(case, "system-out").text = message
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
