"""Apply a plan: lift hidden weights, raise the opset if a tier needs it, write tiers, save atomically."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import tempfile
from pathlib import Path
from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np
import onnx

from tqs_onnx import SCHEMA_VERSION
from tqs_onnx.encoding import ModelEncoding
from tqs_onnx.errors import TqsError
from tqs_onnx.util import TEMP_ROOM, check_output_target, read_json, remove_stale_temporaries, temp_prefix, umask
from tqs_onnx.graph import LoadedModel, check_not_deprecated, tensor_chunks, weight_table
from tqs_onnx.passes.base import run_passes
from tqs_onnx.passes.opset import UpgradeOpset
from tqs_onnx.prepare import prepare_graph
from tqs_onnx.rounding import check_codes, load_codes
from tqs_onnx.passes.qdq import WriteTiers
from tqs_onnx.tiers import Tier, needed_opset, parse_tier

EXTERNAL_THRESHOLD = 1_500_000_000  # bytes; protobuf cannot hold more than 2 GB


def load_plan(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    plan = read_json(path, "plan")
    if not isinstance(plan, dict) or plan.get("kind") != "tqs-plan" or not isinstance(plan.get("weights"), dict):
        raise TqsError(f"{path}: not a tqs-onnx plan")
    if "schema_version" in plan and plan["schema_version"] != SCHEMA_VERSION:  # a hand-written plan may omit it
        raise TqsError(f"{path}: plan schema {plan['schema_version']!r} is not {SCHEMA_VERSION} (written by another "
                       "version of tqs-onnx?)")
    if not isinstance(plan.get("model"), dict):
        raise TqsError(f"{path}: plan has no 'model' entry (which model it was made for)")
    if not all(isinstance(t, str) for t in plan["weights"].values()):
        raise TqsError(f"{path}: plan 'weights' must map weight names to tier names")
    info = plan.get("weight_info", {})
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise TqsError(f"{path}: plan 'weight_info' must map weight names to shape/axis entries")
    return plan


def rewrite_model(loaded: LoadedModel, plan: dict[str, Any], where: str = "plan",
                  after: Callable[[str], None] | None = None,
                  codes: dict[tuple[str, str], np.ndarray] | None = None) -> tuple[onnx.ModelProto, dict]:
    """The model with every planned weight at its tier (in memory); `loaded` is only read.

    The passes run on a skeleton whose large weights hold no data (passes/detach.py): the tier writer
    reads each weight from `loaded`, and only the weights kept as they are get their data copied, at
    the end. `after(phase)` is called as each phase ends: 'prepare', 'check-plan', each pass by name,
    'attach' (tools/bench_apply_memory.py measures the phases with it). `codes`: the integers of
    /gptq weights (`rounding.Rounding.codes`); None reads the file the plan names, beside `where`.
    """
    phase_done = after or (lambda phase: None)
    check_not_deprecated(loaded.model, str(loaded.path))
    factor = plan.get("factor", True)
    prepared = prepare_graph(loaded.model, factor, keep_detached=True)
    stubs = prepared.stubs
    from tqs_onnx.evaluate import check_prepared

    prepared.reports["prepare-check"] = check_prepared(loaded, prepared.model, factor, stubs.attach)
    phase_done("prepare")
    tiers, axes, forms = planned_tiers(prepared.model, plan, loaded.path, where, stubs.source)
    phase_done("check-plan")
    half = {i.name for i in prepared.model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    need = max([needed_opset(t, n in half) for n, t in tiers.items() if not t.is_identity], default=0)
    if codes is None:
        codes = load_codes(plan, where) if any(t.gptq for t in tiers.values()) else {}
        check_codes(plan, tiers, codes, where)
    converted, reports = run_passes(prepared.model, [UpgradeOpset(need)], phase_done)
    if reports[UpgradeOpset.name]["modified"]:
        from tqs_onnx.evaluate import check_conversion

        reports[UpgradeOpset.name]["check"] = check_conversion(prepared.model, converted, loaded.file_bytes,
                                                               loaded.path, stubs.attach)
    model, written = run_passes(converted, [WriteTiers(tiers, axes, stubs.array, codes)], phase_done)
    reports.update(written)
    check_written_names(model, [n for n, t in tiers.items() if not t.is_identity], where)
    stubs.attach(model)
    phase_done("attach")
    return model, {**prepared.reports, **reports, "weight-forms": forms}


INTERFACE_REASONS = ("also a graph input (overridable)", "graph output")  # graph.quantizable's wording


def planned_tiers(model: onnx.ModelProto, plan: dict[str, Any], path: Path, where: str = "plan",
                  source: Callable[[onnx.TensorProto], onnx.TensorProto] = lambda t: t,
                  ) -> tuple[dict[str, Tier], dict[str, tuple[int | None, int | None]], dict[str, dict]]:
    """Each planned weight's tier and (channel, block) axes, checked against the prepared `model`
    (`source(t)` is the tensor holding initializer t's values), and whether ORT fuses or looks it up
    (`fused_dq`, `const_lookup`: what a hand-written plan's report needs)."""
    table = {w.name: w for w in weight_table(model, min_size=1, check_finite=False)}
    inits = {i.name: i for i in model.graph.initializer}
    tiers, axes, forms = {}, {}, {}
    for name, tier_text in plan["weights"].items():
        w = table.get(name)
        info = plan.get("weight_info", {}).get(name, {})
        if w is None or (info and list(w.shape) != list(info.get("shape", w.shape))):
            hint = ("; a plan made before tqs-onnx stored identical tensors once may name a copy: re-run the sweep"
                    if w is None else "")
            raise TqsError(f"{where}: plan is for another model (weight '{name}' "
                           f"{'missing' if w is None else 'has another shape'} in {path}){hint}")
        try:
            tiers[name] = parse_tier(tier_text)
        except TqsError as exc:
            raise TqsError(f"{where}: weight '{name}': {exc}") from None
        if not tiers[name].is_identity and w.reason in INTERFACE_REASONS:  # rewriting it changes the model's I/O
            raise TqsError(f"{where}: weight '{name}' cannot be rewritten: {w.reason}")
        axes[name] = (info.get("channel_axis", w.channel_axis), info.get("block_axis", w.block_axis))
        if any(a is not None and (not isinstance(a, int) or isinstance(a, bool) or not -len(w.shape) <= a < len(w.shape))
               for a in axes[name]):
            raise TqsError(f"{where}: weight '{name}' of shape {list(w.shape)} has invalid axes {list(axes[name])}")
        axes[name] = tuple(None if a is None else a % len(w.shape) for a in axes[name])  # -1: the last
        tier = tiers[name]
        if tier.is_identity:
            forms[name] = {"fused_dq": w.fused_dq, "const_lookup": w.const_lookup}
            continue
        if w.size == 0:
            raise TqsError(f"{where}: weight '{name}' has no elements (shape {list(w.shape)}); keep it at fp32")
        if tier.is_int and w.dtype == "float64":
            raise TqsError(f"{where}: weight '{name}' is float64, which the integer tiers do not write (their "
                           "scales are float32); keep it at fp32, fp16 or bf16")
        overflow = _check_range(where, name, tier, source(inits[name]))
        forms[name] = {"fused_dq": w.fused_dq, "const_lookup": w.const_lookup,
                       **({"overflow": overflow} if overflow else {})}
    return tiers, axes, forms


FP16_MAX = 65504.0


def _check_range(where: str, name: str, tier: Tier, tensor: onnx.TensorProto) -> str | None:
    """One pass over a weight's values for what its tier cannot store. Refused: NaN/inf at an integer
    tier, and an fp16 scale beyond float16 (the weight would decode to NaN). Noted (returned): values the
    tier turns into inf, finite values beyond float16 at `fp16` or beyond bfloat16 at `bf16`, or an
    integer tier's decoded values past float32's limit (qmax x scale); not refused, since the sweep
    measured the same values (a -3.4e38 mask before a Softmax is as harmless as -inf), and a written
    model whose outputs this makes non-finite fails verification, which then names the weight."""
    if not (tier.fmt in ("fp16", "bf16") or tier.is_int):
        return None
    import ml_dtypes

    largest, overflow, nonfinite = 0.0, False, False
    narrow = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}.get(tier.fmt)
    half = tensor.data_type == onnx.TensorProto.FLOAT16  # decodes in float16, with float16 scales
    for chunk in tensor_chunks(tensor):
        finite = np.isfinite(chunk)
        nonfinite |= not finite.all()
        largest = max(largest, float(np.max(np.abs(chunk[finite]), initial=0.0)))
        if narrow is not None:
            with np.errstate(over="ignore"):
                stored = chunk.astype(narrow)
                if half:  # decoded back to the weight's float16
                    stored = stored.astype(np.float16)
                overflow |= bool(np.any(finite & ~np.isfinite(stored)))  # an inf stays an inf
    if narrow is not None:
        what = "float16" if tier.fmt == "fp16" or half else "bfloat16"
        return (f"weight '{name}' holds values up to {largest:.4g}, which {tier} stores as inf (beyond "
                f"{what})") if overflow else None
    if nonfinite:
        raise TqsError(f"{where}: weight '{name}' holds NaN/inf values and cannot be stored at "
                       f"{tier}; keep it at fp32 (or a float tier)")
    if tier.scale_fmt == "fp16" and largest / tier.qmax > FP16_MAX:
        raise TqsError(f"{where}: weight '{name}' holds values up to {largest:.4g}: its {tier} scale would exceed "
                       f"float16's {FP16_MAX:g}; use fp32 scales (drop /fp16) or keep it at fp32")
    with np.errstate(over="ignore"):
        decoded = np.float32(tier.qmax) * (np.float32(largest) / np.float32(tier.qmax))
        if half:  # its scale rounded to float16, the product too (65504 / 127 rounds up to 516)
            decoded = np.float16(tier.qmax) * np.float16(np.float32(largest) / np.float32(tier.qmax))
    if not np.isfinite(decoded):
        limit = "float16's" if half else "float32's"
        return f"weight '{name}' holds values up to {largest:.4g}, which {tier} decodes as inf ({limit} limit)"
    return None


def check_written_names(model: onnx.ModelProto, weights: Iterable[str], where: str) -> None:
    """The writer names a weight's parts NAME__<suffix> and its nodes NAME/<Op>: refuse, in one line, a
    model where one of those names was already taken (onnx.checker would refuse the written graph)."""
    from tqs_onnx.graph import iter_graphs

    values: Counter[str] = Counter()
    for g in iter_graphs(model.graph):  # every scope: onnx.checker wants each name defined once
        # A graph input of a name the writer gives an initializer would make it that input's default.
        values.update(t.name for t in g.initializer)
        values.update(i.name for i in g.input)
        values.update(o for n in g.node for o in n.output if o)
    nodes = Counter(n.name for n in model.graph.node if n.name)
    twice = sorted({v for v, c in values.items() if c > 1} | {v for v, c in nodes.items() if c > 1})
    for name in twice:
        owner = next((w for w in weights if name.startswith((f"{w}__", f"{w}/"))), None)
        if owner is not None:
            raise TqsError(f"{where}: the model already has a value or node named '{name}', a name the writer "
                           f"gives a part of weight '{owner}'; rename it in the model first")


def save_model(model: onnx.ModelProto, out: str | os.PathLike, external: bool | None = None,
               check: Callable[[Path], None] | None = None, keep: Iterable[Path] = ()) -> list[Path]:
    """Write atomically: into a temp folder beside `out`, then rename data file and model into place.

    `check(path)` runs on the complete temporary copy; if it raises, nothing reaches `out`. A file in
    `keep` (an input model and its data files) is never replaced: asking to is an error.
    """
    out = Path(out)
    encoding = None if external else ModelEncoding(model)  # sized without encoding the whole model
    if external is None:
        external = encoding.size > EXTERNAL_THRESHOLD
    kept = {Path(k).resolve() for k in keep}
    for target in [out] + ([out.with_name(f"{out.name}.data")] if external else []):
        if target.resolve() in kept:
            raise TqsError(f"{target}: refusing to overwrite a file of the input model")
    check_output_target(out, TEMP_ROOM)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmpdir = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        data_name = f"{out.name}.data"
        tmp_model = tmpdir / out.name
        if external:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            encoding.write(tmp_model)
        files = sorted(tmpdir.iterdir(), key=lambda p: p.name == out.name)  # data first, model last
        for f in files:
            os.chmod(f, 0o666 & ~umask())  # onnx writes the data file 0600: both get the usual mode
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if check is not None:
            check(tmp_model)
        try:
            written = _replace_pair(files, out, tmpdir)
        except KeyboardInterrupt as exc:  # held during the renames, delivered once they were done
            if not files[-1].exists():
                exc.written = [out.parent / f.name for f in files]  # type: ignore[attr-defined]
            raise
        stale = out.with_name(f"{out.name}.data")
        if not external and stale.is_file() and stale.resolve() not in kept:
            stale.unlink()  # an earlier --external-data output's data: the new single file needs none
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _replace_pair(files: list[Path], out: Path, tmpdir: Path) -> list[Path]:
    """Move `files` (a data file first, the model last) over `out` and its data file so that `out` and
    `out.data` are never a mismatched pair: where a data file is replaced, the earlier model first moves
    into `tmpdir` (removed with it), so a run killed between the renames leaves no model (and the rerun
    writes one) rather than the earlier model reading the new weights, which loads and runs silently
    wrong. Ctrl-C and SIGTERM wait until the renames are done."""
    aside = tmpdir / "earlier-model"
    with _signals_deferred():
        try:
            if len(files) > 1 and out.is_file():
                os.replace(out, aside)
            for f in files:
                os.replace(f, out.parent / f.name)
        except BaseException:
            # What moved is read from the disk (a file's temporary is gone once renamed), not from
            # bookkeeping an interrupt could cut between a rename and its record.
            if files[-1].exists():  # the new model is not in place: no new file stays without it
                moved = [out.parent / f.name for f in files[:-1] if not f.exists()]
                for f in moved:
                    f.unlink(missing_ok=True)
                if aside.exists() and not moved:  # the earlier pair is untouched: put its model back
                    os.replace(aside, out)
            raise
    return [out.parent / f.name for f in files]


class _signals_deferred:
    """SIGINT and SIGTERM held for a few renames: their Python handlers are swapped for one that notes
    the signal, and the first noted one is handled when the renames are done. (A thread's signal mask
    did not hold them: the process's other threads, numpy's and ORT's, took the signal, and Python
    raised KeyboardInterrupt mid-rename.) Only the main thread can swap handlers; elsewhere nothing
    is held."""

    SIGNALS = [getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n)]

    def __enter__(self):
        self.pending: list[int] = []
        self.old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.old[sig] = signal.signal(sig, lambda s, _frame: self.pending.append(s))
        return self

    def __exit__(self, exc_type, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        if self.pending and exc_type is None:
            sig, handler = self.pending[0], self.old[self.pending[0]]
            if callable(handler):
                handler(sig, None)  # KeyboardInterrupt, or the CLI's SIGTERM handler
            elif handler == signal.SIG_DFL:
                signal.raise_signal(sig)
        return False
