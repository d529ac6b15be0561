"""Verify a written model and measure it: rollout errors against FP32 (and truth), compression."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from tqs_onnx import SCHEMA_VERSION, __version__
from tqs_onnx.errors import TqsError
from tqs_onnx.graph import IDENTITY, LoadedModel, iter_tensors, load_model, main_opset
from tqs_onnx.rollout import Contexts, Rollout, RolloutSpec
from tqs_onnx.runtime import Device, io_signature, make_session, synthetic_feeds
from tqs_onnx.util import first_line

_PACKED_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT2: 2, onnx.TensorProto.UINT2: 2}


def stored_bits(model: onnx.ModelProto) -> int:
    """Bits held by every stored tensor (values, scales, indices) in all graphs and Constant nodes."""
    total = 0
    for t in iter_tensors(model):
        if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        bits = _PACKED_BITS.get(t.data_type) or 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += math.prod(t.dims) * bits
    return total


def verify_written(path: Path, device: Device, spec: RolloutSpec | None = None,
                   contexts: Contexts | None = None, label: str | Path | None = None,
                   reference: str | Path | None = None) -> dict[str, Any]:
    """onnx.checker, ORT load, finite outputs (one rollout step per context if a spec is given).

    `label` names the model in messages when `path` is a temporary copy. `reference`, the original
    model: where the written model's outputs are not finite, it is run the same way, and non-finite
    values where the original's are too (a model that outputs -inf by design) are accepted.
    """
    label = label or path
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise TqsError(f"{label}: written model fails onnx.checker: {first_line(exc, 200)}") from None
    session = make_session(str(path), device, label=str(label))
    try:
        outs = _verification_outputs(session, device, spec, contexts, str(label))
    except TqsError:
        raise
    except Exception as exc:
        hint = "" if spec is not None and contexts is not None else \
            " on synthetic inputs (dynamic input shapes?); pass --rollout and --contexts to verify it on real data"
        raise TqsError(f"{label}: written model does not run{hint}: {first_line(exc)}") from None
    finite = all(np.all(np.isfinite(v)) for o in outs for v in o.values())
    as_original = False
    if not finite and reference is not None:
        as_original = _nonfinite_as_original(outs, reference, device, spec, contexts)
    if not finite and not as_original:
        raise TqsError(f"{label}: written model gives non-finite outputs")
    first = outs[0]  # the first step of the first context (or the synthetic run), as _first_step gives it
    del session  # free its device memory before the unoptimized session below allocates its own
    plain = _plain_step(path, device, spec, contexts)
    err = _step_error(first, plain)
    if err > FIDELITY_TOL:  # NaN (not checked) compares False
        raise TqsError(f"{label}: ONNX Runtime's optimized graph computes other values than the written graph "
                       f"(relative error {err:.2g} on one step){_fidelity_cause(path, device, spec, contexts, plain)}")
    return {"checker": True, "ort_load": True, "finite": finite,
            **({"nonfinite_as_original": True} if as_original else {}), "optimized_rel_err": err}


def _verification_outputs(session, device: Device, spec: RolloutSpec | None, contexts: Contexts | None,
                          label: str) -> list[dict[str, np.ndarray]]:
    """The float outputs verify_written checks: every rollout step of every context, or one run on
    synthetic inputs without a spec."""
    if spec is not None and contexts is not None:
        spec.check_against(*io_signature(session), label)
        rollout = Rollout(session, spec, contexts, device, label)
        return [step for s in range(contexts.count) for step in rollout.trajectory_host(s)]
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failure is reported by the caller, in one line
    names = [o.name for o in session.get_outputs()]
    return [{n: v for n, v in zip(names, session.run(None, synthetic_feeds(session), quiet))
             if np.asarray(v).dtype.kind == "f"}]


def _nonfinite_as_original(outs: list[dict[str, np.ndarray]], reference: str | Path, device: Device,
                           spec: RolloutSpec | None, contexts: Contexts | None) -> bool:
    """Is every non-finite value of `outs` non-finite in the original model's outputs too?"""
    try:
        ref = _verification_outputs(make_session(str(reference), device), device, spec, contexts, str(reference))
    except Exception:
        return False
    if len(ref) != len(outs):
        return False
    for got, want in zip(outs, ref):
        for name, value in got.items():
            original = want.get(name)
            if original is None or np.shape(original) != np.shape(value):
                return False
            odd = ~np.isfinite(value)  # the same kind where the original's: NaN for NaN, inf of its sign
            same = (value[odd] == original[odd]) | (np.isnan(value[odd]) & np.isnan(original[odd]))
            if not np.all(same):
                return False
    return True


CONVERSION_CHECK_BYTES = 256 * 2**20  # models up to this size are run before and after an opset conversion
CONVERSION_TOL = 1e-4  # relative to the output's largest magnitude (a converted AveragePool moved by 1 ulp)
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def check_conversion(before: onnx.ModelProto, after: onnx.ModelProto, model_bytes: int, label: str | Path,
                     attach: Callable[[onnx.ModelProto], Any] = lambda m: None) -> dict[str, Any]:
    """Does the opset-converted model compute what the model computed? onnx's version converter has
    adapters that change meaning (Upsample(linear) of opset 9 became a Resize with half-pixel
    coordinates; Hardmax of opset 11 kept its axis, whose meaning changed in 13), and the sweep scored
    the unconverted graph. Both run once on the CPU on seeded synthetic inputs; a difference above
    `CONVERSION_TOL` is an error. `attach(m)` gives a skeleton's stubs their data (a copy is attached).
    Returns what the apply report records: checked or not, and why not."""
    frm, to = main_opset(before), main_opset(after)

    def differs(name: str, detail: str) -> str:
        return (f"{label}: onnx's version converter changed what the model computes when raising its "
                f"opset from {frm} to {to}, which the chosen tiers need (output '{name}': {detail}); "
                f"keep its weights at tiers that need no newer opset, or convert the model with a "
                f"tool you have checked and sweep it again")

    def fails(why: str) -> str:
        return (f"{label}: the model converted from opset {frm} to {to} (needed by the chosen tiers) "
                f"does not run in ONNX Runtime: {why}")

    return {"from": frm, "to": to, **compare_models(before, after, model_bytes, label, differs, fails, attach)}


def check_prepared(loaded: LoadedModel, prepared: onnx.ModelProto, factor: bool,
                   attach: Callable[[onnx.ModelProto], Any] = lambda m: None) -> dict[str, Any]:
    """Does the graph `prepare_graph(loaded.model, factor)` gave (functions inlined, weights lifted,
    tables factored, duplicates shared: all meant to be exact) compute what the file does? Run as
    `check_conversion` runs; a difference is this tool's bug, and the sweep and apply stop rather than
    score or write another model (onnx's inliner dropped function attribute defaults: LeakyRelu's alpha
    0.3 became 0.01, silently). Checked once per process for one file and prepared graph (pareto rewrites
    the same graph at every point)."""
    label = loaded.path

    def differs(name: str, detail: str) -> str:
        return (f"{label}: preparing the graph (inlining functions, lifting constants, factoring tables, "
                f"sharing duplicates) changed what the model computes (output '{name}': {detail}); this is a "
                f"tqs-onnx bug, please report it with the model; --no-factor leaves the tables and duplicates "
                f"as they are")

    def fails(why: str) -> str:
        return f"{label}: the prepared graph does not run in ONNX Runtime (a tqs-onnx bug, please report it): {why}"

    # the file, and the prepared graph's nodes (cheap beside its tensors, which follow from the file and
    # those nodes' passes)
    nodes = hashlib.sha256(b"".join(n.SerializeToString(deterministic=True) for n in prepared.graph.node))
    key = (loaded.sha256, factor, nodes.hexdigest())
    if key not in _PREPARED_CHECKED:
        _PREPARED_CHECKED[key] = compare_models(loaded.model, prepared, loaded.file_bytes, label, differs, fails,
                                                attach)
    return _PREPARED_CHECKED[key]


_PREPARED_CHECKED: dict[tuple[str, bool, str], dict[str, Any]] = {}


def compare_models(before: onnx.ModelProto, after: onnx.ModelProto, model_bytes: int, label: str | Path,
                   differs: Callable[[str, str], str], fails: Callable[[str], str],
                   attach: Callable[[onnx.ModelProto], Any] = lambda m: None) -> dict[str, Any]:
    """Run `before` and `after` once each on the CPU on the same seeded synthetic inputs; raise
    TqsError(differs(output, detail)) where an output moves by more than `CONVERSION_TOL` of its
    largest magnitude, TqsError(fails(why)) where `after` does not run. Skipped (and said why) for
    models over `CONVERSION_CHECK_BYTES`, models drawing random numbers, and `before` models ONNX
    Runtime does not run."""
    from tqs_onnx.graph import iter_graphs
    from tqs_onnx.passes.opset import lower_ir_for_ort
    from tqs_onnx.runtime import resolve_device

    record: dict[str, Any] = {"checked": False}
    if model_bytes > CONVERSION_CHECK_BYTES:
        return {**record, "why_not": f"model over {CONVERSION_CHECK_BYTES >> 20} MiB"}
    bodies = [*iter_graphs(before.graph), *before.functions]
    if any(n.op_type in _RANDOM_OPS for g in bodies for n in g.node):
        return {**record, "why_not": "the model draws random numbers"}
    cpu = resolve_device("cpu")

    def session_of(proto: onnx.ModelProto):
        full = onnx.ModelProto()
        full.CopyFrom(proto)
        attach(full)
        lower_ir_for_ort(full)
        return make_session(full, cpu, label=str(label))

    try:
        original = session_of(before)
    except Exception as exc:
        return {**record, "why_not": f"ONNX Runtime does not load it ({first_line(exc, 120)})"}
    # Dynamic dimensions as 7 first: at 1 an image is one pixel, on which opset 9's Upsample and the
    # Resize it became agree; 1 where the model takes nothing else (then the record says so).
    ref = feeds = None
    for size in CONVERSION_DYNAMIC_SIZES:
        feeds = synthetic_feeds(original, size)
        try:
            ref = _named_outputs(original, feeds)
            break
        except Exception as exc:
            why = first_line(exc, 120)
    dynamic = any(not (isinstance(d, int) and d > 0) for i in original.get_inputs() for d in i.shape)
    # Outputs that differ from one run to the next (Dropout in training mode, random ops in a body):
    # nothing to compare against.
    repeats = ref is not None and _same_outputs(_named_outputs(original, feeds), ref)
    del original  # one session at a time
    if ref is None:
        return {**record, "why_not": f"it does not run on synthetic inputs ({why})"}
    if not repeats:
        return {**record, "why_not": "its outputs differ between two runs on the same inputs"}
    if dynamic:
        record["dynamic_size"] = size
    try:
        got_all = _named_outputs(session_of(after), feeds)
    except Exception as exc:
        raise TqsError(fails(first_line(exc, 200))) from None
    worst = 0.0
    for name, want in ref.items():
        got = got_all.get(name, [])
        if len(got) != len(want):
            err, detail = math.inf, f"{len(got)} tensors instead of {len(want)}"
        else:
            err, detail = max((_converted_error(a, b) for a, b in zip(got, want)), default=(0.0, ""),
                              key=lambda e: e[0])
        if err > CONVERSION_TOL:
            raise TqsError(differs(name, detail))
        worst = max(worst, err)
    return {**record, "checked": True, "max_rel_err": worst}


CONVERSION_DYNAMIC_SIZES = (7, 1)


def _same_outputs(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> bool:
    """Two runs' outputs equal to the bit (NaN where NaN)."""
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(x.shape == y.shape and x.dtype == y.dtype and
                                       np.array_equal(x, y, equal_nan=x.dtype.kind in "fc") for x, y in zip(a[k], b[k]))
        for k in a)


def _named_outputs(session, feeds: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Each output as a list of arrays: a tensor is one, a sequence its elements, an absent optional none."""
    def arrays(v) -> list[np.ndarray]:
        if v is None:
            return []
        if isinstance(v, (list, tuple)):
            return [a for x in v for a in arrays(x)]
        return [np.asarray(v)]

    names = [o.name for o in session.get_outputs()]
    return {n: arrays(v) for n, v in zip(names, session.run(None, feeds))}


def _converted_error(got: np.ndarray, ref: np.ndarray) -> tuple[float, str]:
    """(relative error, what differs) of one output tensor of the converted model against the original's."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return math.inf, f"{got.dtype}{list(got.shape)} instead of {ref.dtype}{list(ref.shape)}"
    if ref.dtype.kind != "f":
        return (0.0, "") if np.array_equal(got, ref) else (math.inf, "other values")
    nan = np.isnan(ref)
    finite = np.isfinite(ref) & np.isfinite(got)
    if not np.array_equal(nan, np.isnan(got)) or not np.array_equal(ref[~finite & ~nan], got[~finite & ~nan]):
        return math.inf, "non-finite values at other places"
    scale = float(np.max(np.abs(ref[finite]), initial=0.0)) or 1.0
    diff = float(np.max(np.abs(ref[finite].astype(np.float64) - got[finite]), initial=0.0))
    return diff / scale, f"largest difference {diff:.3g} against values up to {scale:.3g}"


def _fidelity_cause(path: Path, device: Device, spec: RolloutSpec | None, contexts: Contexts | None,
                    plain: dict | None) -> str:
    """Why the optimized graph differs: MatMulNBits' int8 activations (the error goes with float
    activations), or a kernel that computes other values."""
    float_acts = _first_step(make_session(str(path), device, config={ACCURACY_LEVEL: "0"}), device, spec, contexts)
    err0 = _step_error(float_acts, plain)
    if err0 <= FIDELITY_TOL:
        return (f": ORT's fused MatMulNBits rounds activations to int8 at its default accuracy level 4 "
                f"({err0:.2g} with float activations), at any integer tier of the weight; write the MatMul "
                f"weights decoded at load (allocate --decode load or load-compact) or keep them at float tiers, "
                f"or deploy with {ACCURACY_LEVEL}=0")
    return ": an ORT kernel computes other values (onnxruntime 1.31 miscomputes INT2 weights fused into " \
           "MatMulNBits when N % 4 != 0): choose other tiers for those weights"


ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"


# ORT's fused MatMulNBits quantizes activations to int8 by default (accuracy level 4): a few 1e-3 relative.
FIDELITY_TOL = 0.05
ZERO_OUTPUT_TOL = 1e-3  # absolute, where the written graph's output is exactly zero (fused kernels: ~1e-4)


def _first_step(session, device: Device, spec: RolloutSpec | None, contexts: Contexts | None) -> dict:
    """Outputs of one step on the first context (or synthetic inputs without a spec)."""
    if spec is not None and contexts is not None:
        return Rollout(session, spec, contexts.subset([0]), device).trajectory_host(0, horizon=1)[0]
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, synthetic_feeds(session))))


def optimized_vs_written(path: Path, device: Device, optimized: dict, spec: RolloutSpec | None,
                         contexts: Contexts | None) -> float:
    """Largest relative difference, over outputs, between the optimized session's first step
    (`optimized`) and the plain graph's.

    ORT's optimizer fuses DequantizeLinear into kernels of its own; this catches a fusion that
    changes what the written graph means, which the sweep (it runs exact weights) cannot see.
    """
    return _step_error(optimized, _plain_step(path, device, spec, contexts))


def _plain_step(path: Path, device: Device, spec: RolloutSpec | None, contexts: Contexts | None) -> dict | None:
    """The first step of the written graph without ORT's fusions; None where it does not fit (a
    Pangu-size model on one GPU)."""
    try:
        return _first_step(make_session(str(path), device, optimize=False), device, spec, contexts)
    except TqsError:
        return None


def _step_error(optimized: dict, plain: dict | None) -> float:
    """Largest relative difference over float outputs; NaN when there is no plain step to compare."""
    if plain is None:
        return math.nan
    errs = []
    for k in plain:
        if np.asarray(plain[k]).dtype.kind != "f":
            continue
        a, b = np.asarray(optimized[k], np.float64), np.asarray(plain[k], np.float64)
        finite = np.isfinite(a) & np.isfinite(b)
        if a.shape != b.shape or not np.array_equal(a[~finite], b[~finite], equal_nan=True):
            errs.append(math.inf)  # non-finite at other places, or other non-finite values
            continue
        scale = float(np.linalg.norm(b[finite]))
        if scale == 0:  # an output of exact zeros (an all-zero weight) has no scale to be relative to
            errs.append(0.0 if float(np.max(np.abs(a[finite]), initial=0.0)) <= ZERO_OUTPUT_TOL else math.inf)
            continue
        errs.append(float(np.linalg.norm(a[finite] - b[finite]) / scale))
    return max(errs, default=0.0)


def rollouts(path_or_session, spec: RolloutSpec, contexts: Contexts, device: Device,
             horizon: int | None = None, label: str | Path | None = None,
             watch: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    """Trajectory outputs stacked as (S, T, *shape) per output. `label` names the model in messages
    (needed when a session is passed). `watch`: see Rollout.trajectory_host."""
    session = make_session(str(path_or_session), device) if isinstance(path_or_session, (str, Path)) else path_or_session
    where = str(label or path_or_session)
    spec.check_against(*io_signature(session), where)
    rollout = Rollout(session, spec, contexts, device, where)
    rollout.check_memory(horizon or spec.horizon)
    try:
        trajs = [rollout.trajectory_host(s, horizon=horizon, watch=watch) for s in range(contexts.count)]
    except TqsError:
        raise
    except Exception as exc:
        raise TqsError(f"{where}: rollout fails in ONNX Runtime: {first_line(exc)}") from None
    return {k: np.stack([np.stack([step[k] for step in traj]) for traj in trajs]) for k in spec.trajectory}


def require_finite_reference(traj: dict[str, np.ndarray], where: str | Path) -> None:
    """The reference's own rollout must be finite, or no candidate can be judged against it."""
    bad = [k for k, v in traj.items() if np.asarray(v).dtype.kind == "f" and not np.all(np.isfinite(v))]
    if bad:
        raise TqsError(f"{where}: the reference model's own rollout is non-finite ({', '.join(bad)}) on these "
                       f"contexts; check the contexts and the spec's constants")


def truth_arrays(spec: RolloutSpec, contexts: Contexts, traj: dict[str, np.ndarray],
                 where: str | Path = "contexts") -> dict[str, np.ndarray]:
    """The contexts' truth per trajectory output, cut to the rollout's steps; each must hold every
    context, at least as many steps and the output's own shape (a broadcastable one would give
    silently wrong errors)."""
    out = {}
    for k, key in spec.truth.items():
        if k not in traj or key not in contexts.arrays:
            continue
        a, want = contexts.arrays[key], traj[k].shape
        if a.ndim != len(want) or a.shape[0] != want[0] or a.shape[1] < want[1] or a.shape[2:] != want[2:]:
            raise TqsError(f"{where}: truth array '{key}' has shape {list(a.shape)}; output '{k}' rolled out "
                           f"gives {list(want)} (contexts, steps, *shape): the truth needs the same, with at least "
                           f"{want[1]} steps")
        out[k] = a[:, : want[1]]
        if np.issubdtype(out[k].dtype, np.floating) and not np.isfinite(out[k]).all():
            raise TqsError(f"{where}: truth array '{key}' holds NaN or inf in the steps rolled out: errors "
                           "against it would be NaN")
    return out


def missing_truth(spec: RolloutSpec, contexts: Contexts) -> list[str]:
    """One note per trajectory output whose truth array the spec names but the contexts lack."""
    return [f"no truth array '{key}' in the contexts: errors of '{out}' against truth not computed"
            for out, key in spec.truth.items() if out in spec.trajectory and key not in contexts.arrays]


def _per_channel(err: np.ndarray, axis: int) -> np.ndarray:
    """Mean over everything but the channel axis; err has leading (S, T) axes."""
    if err.ndim == 2:  # a scalar output: one channel
        return np.array([err.mean()])
    axis = axis % (err.ndim - 2) + 2
    return np.moveaxis(err, axis, -1).reshape(-1, err.shape[axis]).mean(axis=0)


def degradation_percent(mae: float, mae_ref: float) -> float:
    """Percent by which the candidate's error against the truth exceeds the reference's; where the
    reference matches the truth exactly (truth made from its own rollout) any error is infinitely worse."""
    if mae_ref:
        return float(100 * (mae - mae_ref) / mae_ref)
    return 0.0 if mae == 0 else math.inf


def compare(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], spec: RolloutSpec,
            truth: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in spec.trajectory:
        axis = spec.channel_axis.get(k, -1)
        a, b = ref[k].astype(np.float64), cand[k].astype(np.float64)
        if a.shape != b.shape:  # broadcasting would give errors of other elements
            raise TqsError(f"output '{k}': the candidate's trajectory has shape {list(b.shape)}, the "
                           f"reference's {list(a.shape)} (contexts, steps, *shape)")
        d = b - a
        entry: dict[str, Any] = {
            "finite": bool(np.all(np.isfinite(b))),
            "mae_vs_fp32": float(np.mean(np.abs(d))), "rmse_vs_fp32": float(np.sqrt(np.mean(d ** 2))),
            "mae_vs_fp32_per_channel": _per_channel(np.abs(d), axis).tolist(),
            "rmse_vs_fp32_per_channel": np.sqrt(_per_channel(d ** 2, axis)).tolist(),
            "mae_vs_fp32_per_step": np.abs(d).reshape(d.shape[0], d.shape[1], -1).mean(axis=(0, 2)).tolist(),
        }
        if k in truth:
            tr = truth[k].astype(np.float64)  # truth_arrays cut it to the rollout's steps
            mae_ref, mae_q = np.mean(np.abs(a - tr)), np.mean(np.abs(b - tr))
            entry.update({"mae_fp32_vs_truth": float(mae_ref), "mae_vs_truth": float(mae_q),
                          "mae_vs_truth_per_channel": _per_channel(np.abs(b - tr), axis).tolist(),
                          "mae_fp32_vs_truth_per_channel": _per_channel(np.abs(a - tr), axis).tolist(),
                          "degradation_pct": degradation_percent(mae_q, mae_ref)})
        out[k] = entry
    return out


def evaluate(ref_path: str | Path, cand_path: str | Path, spec: RolloutSpec, contexts: Contexts,
             device: Device) -> dict[str, Any]:
    """Rollout errors of the candidate against the reference (and truth), plus both compressions."""
    ref, cand = load_model(ref_path), load_model(cand_path)
    t0 = time.perf_counter()
    a = rollouts(ref.path, spec, contexts, device)
    require_finite_reference(a, ref.path)
    truth = truth_arrays(spec, contexts, a)
    b = rollouts(cand.path, spec, contexts, device)
    return {
        "schema_version": SCHEMA_VERSION, "kind": "tqs-eval", "tool_version": __version__,
        "reference": str(ref.path), "candidate": str(cand.path),
        "reference_model": {"path": str(ref.path), "sha256": ref.sha256, "identity": IDENTITY,
                            "file_bytes": ref.file_bytes},
        "contexts": contexts.count, "horizon": spec.horizon, "notes": missing_truth(spec, contexts),
        "outputs": compare(a, b, spec, truth),
        "compression": compression(ref, cand),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def compression(ref: LoadedModel, cand: LoadedModel) -> dict[str, float]:
    return {"on_disk": ref.file_bytes / cand.file_bytes, "param_level": stored_bits(ref.model) / stored_bits(cand.model),
            "reference_bytes": ref.file_bytes, "candidate_bytes": cand.file_bytes}
