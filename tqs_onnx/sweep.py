"""The sweep engine: one ORT session, probes in, gamma out, a checkpoint line per block.

The probed weights are exposed as graph inputs of a single session and bound as device OrtValues;
a probe rebinds only its block's tensors. Nominal trajectories are computed once per context.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from tqs_onnx import SCHEMA_VERSION, __version__
from tqs_onnx.errors import TqsError
from tqs_onnx.evaluate import check_prepared
from tqs_onnx.graph import (ANALYSIS_VERSION, IDENTITY, Block, LoadedModel, Weight, cast_to, check_not_deprecated,
                            main_opset, make_blocks, prequantized, same_model, subgraph_refs, tensor_is_finite,
                            weight_table)
from tqs_onnx.passes.detach import HALF_TYPES, detach_initializers
from tqs_onnx.passes.divergence import AddDivergenceOutputs
from tqs_onnx.passes.expose_weights import ExposeWeights
from tqs_onnx.passes.opset import UpgradeOpset
from tqs_onnx.prepare import PASSES_VERSION, prepare_graph
from tqs_onnx.probes import PROBES_VERSION, DeviceProbes, probe_offset
from tqs_onnx.replay import Replay, replay_mode, replay_skipped
from tqs_onnx.quant import apply_tier
from tqs_onnx.rollout import Contexts, Rollout, RolloutSpec
from tqs_onnx.rounding import ROUNDING_VERSION, Rounding, input_moments, save_codes
from tqs_onnx.runtime import Device, cuda_stream, io_signature, make_session, setting
from tqs_onnx.tiers import (BLOCKED_MIN_OPSET, FLOAT_MIN_OPSET, FP16_SCALE_MIN_OPSET, INT_MIN_OPSET, Tier, for_weight,
                          parse_tier)
from tqs_onnx.util import first_line, progress, slow_note

EPS = 1e-12


@dataclass
class SweepConfig:
    probe: str = "both"  # quant | gauss | both
    bits: int = 8  # quant probe bit-width
    probes: int = 8  # Gaussian draws per block
    horizon: int | None = None  # defaults to the spec's horizon
    seed: int = 0
    blocks: str = "auto"
    min_size: int = 256
    gamma_min: float = -50.0
    tiers: list[str] = field(default_factory=list)  # tiers whose measured damage D[l,k] is recorded
    factor: bool = True  # factor expanded lookup tables (exact) before scoring
    early_stop: float = 0.0  # tolerance on gamma over a sliding window of Gaussian draws; 0 = off
    early_window: int = 3
    early_horizon: bool = False  # also cut rollouts short once gamma_task(T) converges (can reorder blocks)
    skip_unreached: bool = True  # two nonzero probes that leave every output bit-identical: skip the rest

    def __post_init__(self) -> None:
        if self.probe not in ("quant", "gauss", "both"):
            raise TqsError(f"--probe must be quant, gauss or both, not '{self.probe}'")
        if not 2 <= self.bits <= 16:
            raise TqsError("--bits must be between 2 and 16")
        if self.probes < 1:
            raise TqsError("--probes must be >= 1")
        if self.horizon is not None and self.horizon < 1:
            raise TqsError("--horizon must be >= 1")


@dataclass
class ProbeScore:
    """Eq. 1 / Eq. 2 at every horizon from one set of rollouts, plus A_max."""

    gamma_task: float  # Eq. 1 at T_max
    gamma_task_t: list[float]  # Eq. 1 at T = 1..T_max
    gamma_eq2_t: list[float]  # Eq. 2 at T = 1..T_max
    a_max: float
    divergence: float  # mean_s ||dY_s||^2 at T_max (Eq. 1's numerator)
    nonfinite: bool


# Changed whenever a probe's recorded figures may be computed otherwise from the same rollouts (a
# checkpoint's rows must not mix two definitions).
SCORES_VERSION = "eq2-amax-per-rollout"


def document_versions(config: SweepConfig) -> dict[str, str]:
    """What a scores document records of the code that made it: the tool, the prepared graph's passes
    (allocate and apply check them), the Gaussian draws (where the sweep drew any), the `/gptq` rounding
    (where swept: allocate uses those tiers only with the same), the weight table's rules and how the
    figures are computed (recorded; distributed sweeps compare their workers')."""
    versions = {"tool_version": __version__, "passes": PASSES_VERSION}
    if config.probe != "quant":
        versions["probes"] = PROBES_VERSION
    if any(parse_tier(t).gptq for t in config.tiers or ()):
        versions["rounding"] = ROUNDING_VERSION  # the /gptq integers the measured damage was rolled out with
    return {**versions, "analysis": ANALYSIS_VERSION, "scores": SCORES_VERSION}


def score_divergence(div: np.ndarray, norm: float) -> ProbeScore:
    """div: squared divergence per step, shape (..., T) over probes/contexts; norm = ||d_theta||_F.

    Eq. 1 takes the mean over rollouts (contexts, and draws) inside the log. Eq. 2 and A_max are the
    paper's single-context quantities: Eq. 2 is computed per rollout and averaged over the rollouts that
    diverged at all by T (-inf where none did), A_max is the largest over rollouts and horizons."""
    rows = np.cumsum(div.reshape(-1, div.shape[-1]), axis=-1)
    cum = rows.mean(axis=0)
    t = np.arange(1, cum.size + 1)
    nonfinite = not np.all(np.isfinite(cum))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        eq1 = np.log(cum / (norm ** 2 + EPS)) / t
        diverged = rows > 0
        count = diverged.sum(axis=0)
        per_row = np.where(diverged, np.log(np.sqrt(rows) / (norm + EPS)) / t, 0.0)
        eq2 = np.where(count > 0, per_row.sum(axis=0) / np.maximum(count, 1), -np.inf)
        ratio = np.sqrt(rows) / (norm + EPS)
        amax = float(np.max(np.where(np.isfinite(rows), ratio, np.inf))) if rows.size else 0.0
    if nonfinite:
        eq1 = np.where(np.isfinite(cum), eq1, np.inf)
        eq2 = np.where(np.isfinite(cum), eq2, np.inf)
    return ProbeScore(float(eq1[-1]), eq1.tolist(), eq2.tolist(), amax, float(cum[-1]), nonfinite)


@dataclass
class BlockScore:
    id: int
    name: str
    weights: list[str]
    size: int
    norm: float  # ||d_theta||_F of the quant residual (Gaussian probes share it)
    quant: ProbeScore | None = None
    gauss: ProbeScore | None = None
    damage: dict[str, float] = field(default_factory=dict)  # tier -> mean_s ||dY_s||^2 at T_max
    dead: bool = False
    nonfinite: bool = False
    forward_passes: int = 0
    unreached: bool = False  # its other draws skipped; its coarsest tier changed nothing either (score_block)
    probe_bits: int | None = None  # the quant probe's bits where the sweep's left the weights as they are

    @property
    def gamma(self) -> float:
        return (self.quant or self.gauss).gamma_task


@dataclass
class SweepSetup:
    """Everything a sweep needs, built once: lifted model, weights, blocks, the one session."""

    loaded: LoadedModel
    weights: list[Weight]
    blocks: list[Block]
    rollout: Rollout
    bound: dict[str, Any]  # nominal weight values (device)
    nominal: list[list[dict[str, Any]]]  # per context, per step: trajectory outputs on the device
    horizon: int
    prepared_bytes: int  # serialized size of the lifted + factored model, before quantization
    graph_bytes: int  # ... of its graph alone (the planner corrects the graph field's length prefix)
    ops: DeviceProbes  # probe graphs on the same device
    opset_deltas: dict[int, int] = field(default_factory=dict)  # opset -> bytes the conversion adds to the graph
    replay: Replay | None = None  # probes replayed on fixed buffers (None: the step loop)
    replay_note: str = ""  # why there is no replay, or why it stopped
    rounding: Rounding | None = None  # /gptq tiers' input statistics and codes (None: no such tier swept)
    # Float32 weights read only through a Cast to float16 (an autocast export): bound rounded to float16
    # (the file's Cast folds that rounding into the constant; with the weight an input ORT's CPU provider
    # drops the Cast), their stored float32 values kept here for the tiers and probes made from them.
    stored: dict[str, Any] = field(default_factory=dict)
    spec_hints: list[str] = field(default_factory=list)  # RolloutSpec.hints: a spec that may not be meant

    @functools.cached_property
    def axes(self) -> dict[str, tuple[int | None, int | None]]:
        """(channel axis, block axis) of every weight, as the tiers quantize it."""
        return {w.name: (w.channel_axis, w.block_axis) for w in self.weights}

    @functools.cached_property
    def dtypes(self) -> dict[str, str]:
        """Every weight's stored type (float16 ones are bound as float32, cast back in the graph)."""
        return {w.name: w.dtype for w in self.weights}

    def source(self, name: str) -> Any:
        """The weight as stored (device value), from which its tiers and probes are made."""
        return self.stored.get(name, self.bound[name])


def prepare(loaded: LoadedModel, spec: RolloutSpec, contexts: Contexts, device: Device,
            config: SweepConfig, threads: int = 0) -> SweepSetup:
    """Lift hidden weights, expose the quantizable ones as inputs, open the session, roll out Y0.

    `threads`: ORT intra-op threads of the model and probe sessions (0: ORT's default); distributed workers
    split the cores."""
    horizon = config.horizon or spec.horizon
    for key in spec.per_step.values():
        if contexts.arrays[key].shape[1] < horizon:
            raise TqsError(f"{loaded.path}: horizon {horizon} is longer than per-step array '{key}' "
                           f"({contexts.arrays[key].shape[1]} steps)")
    check_not_deprecated(loaded.model, str(loaded.path))  # before minutes of work on a model apply must refuse
    prepared = prepare_graph(loaded.model, config.factor)
    check_prepared(loaded, prepared.model, config.factor)  # no score of another model
    weights = weight_table(prepared.model, config.min_size, prepared.origins)
    blocks = make_blocks(weights, config.blocks)
    if not blocks:
        done = prequantized(prepared.model)
        if done:
            raise TqsError(f"{loaded.path}: no quantizable weights: the model is already quantized ({len(done)} "
                           f"integer tensor(s) behind DequantizeLinear, {sum(math.prod(s) for s in done.values()):,} "
                           "parameters, kept as they are), and no float weight of at least "
                           f"{config.min_size} elements is left; `tqs-onnx inspect` lists them")
        listed = [w.name for w in weights if w.reason.startswith("also a graph input")]
        if listed:
            raise TqsError(f"{loaded.path}: no quantizable weights: {len(listed)} initializer(s) ('{listed[0]}') are also "
                           "listed as graph inputs, which makes them values a caller may override, not weights "
                           "(an export with keep_initializers_as_inputs=True); remove them from the graph inputs "
                           "(onnxruntime's tools/python/remove_initializer_from_input.py) and sweep that file")
        raise TqsError(f"{loaded.path}: no quantizable weights (float32 or float16, >= {config.min_size} elements; "
                       f"`tqs-onnx inspect` gives each weight's reason)")
    names = [n for b in blocks for n in b.weights]
    exposed = ExposeWeights(names).run(prepared.model)
    # TQS_GPU_QUEUE=1 (CUDA): every sweep session on one stream, perturbed rollouts queued without
    # waiting at each step. Measured slower on the transformer forecaster (H200: 0.69 against 0.85
    # efficiency), so it is off by default.
    # TQS_GPU_STREAM=shared (CUDA): every sweep session on one stream, waiting at each step as usual.
    queue = setting("TQS_GPU_QUEUE") == "1" and device.kind == "cuda" and bool(cuda_stream())
    shared = queue or device.kind == "cuda" and gpu_stream_mode() == "shared" and bool(cuda_stream())
    model, pairs = exposed.model, {}
    # Each step's run also measures its divergence (see `divergence`); a spec naming outputs the model
    # lacks is left to `check_against`, which says so.
    # Not on float16/bfloat16 trajectories: ORT's CPU provider computes such an op in float32 and drops
    # the Cast pair it makes with the divergence's Cast back to float32, so the divergence would read
    # the unrounded value (an unperturbed rollout measured 4e-5, not 0); the graph engine reads the outputs.
    half = {o.name for o in model.graph.output if o.type.tensor_type.elem_type in HALF_TYPES}
    if divergence_mode() == "model" and set(spec.trajectory) <= {o.name for o in model.graph.output} - half:
        measured = AddDivergenceOutputs(spec.trajectory).run(model)
        model, pairs = measured.model, measured.report["pairs"]
    session = make_session(model, device, threads, shared_stream=shared, label=str(loaded.path))
    inputs, outputs = io_signature(session)
    weight_inputs = set(names)
    extra = {sq for _, sq in pairs.values()}
    model_io = ({k: v for k, v in inputs.items() if k not in weight_inputs},
                {k: v for k, v in outputs.items() if k not in extra})
    spec.check_against(*model_io, str(loaded.path))
    rollout = Rollout(session, spec, contexts, device, str(loaded.path), divergence=pairs)
    rollout.check_memory(horizon)  # the nominal trajectories are kept
    # The device copies are all the sweep keeps: no host copy of the weights stays alive.
    bound = {n: device.to_device(v) for n, v in exposed.report["values"].items()}
    del exposed
    ops = DeviceProbes(device, threads, shared_stream=shared)
    stored = {n: bound[n] for n in sorted(half_reads(prepared.model, set(bound)))}
    bound.update((n, ops.tier(v, FLOAT16, (None, None))) for n, v in stored.items())
    nominal, per_pass = [], math.inf
    for s in range(max(contexts.count, 2)):  # one context: timed again, warm (the first pass pays set-up)
        t0, n0 = time.perf_counter(), rollout.forward_passes
        trajectory = rollout.trajectory(s % contexts.count, bound, horizon)
        per_pass = min(per_pass, (time.perf_counter() - t0) / max(1, rollout.forward_passes - n0))
        if s < contexts.count:
            nominal.append(trajectory)
    rollout.async_steps = queue
    for traj in nominal:
        if not all(math.isfinite(ops.sqdiff(v, v)) for step in traj for v in step.values()):
            bad = [i.name for i in prepared.model.graph.initializer if not tensor_is_finite(i)]
            keys = [*spec.initial.values(), *spec.fixed.values(), *spec.per_step.values()]
            odd = [k for k in dict.fromkeys(keys) if contexts.arrays[k].dtype.kind == "f"
                   and not np.isfinite(contexts.arrays[k]).all()]
            hint = (f"weights holding NaN/inf: {', '.join(bad[:5])}" if bad else
                    f"contexts arrays holding NaN/inf: {', '.join(odd)}" if odd else "check the contexts")
            raise TqsError(f"{loaded.path}: the unperturbed rollout is already non-finite; {hint}")
    replay = None
    # replay_mode also checks the settings: a bad value is the user's error.
    note = "TQS_REPLAY=off" if replay_mode(device) == "off" else replay_skipped(per_pass) \
        or ("queued steps" if queue else "") \
        or ("float16 or bfloat16 trajectory: its divergence is read from the outputs" if half & set(spec.trajectory)
            else "")
    if not note:
        try:
            replay = Replay(model, rollout, bound, nominal, horizon, ops, threads)
        except Exception as exc:  # e.g. no memory for the second session: the step loop does the work
            note = f"replay not built: {first_line(exc)}"
    del model
    rounding = None
    if any(parse_tier(t).gptq for t in config.tiers):
        rounding = rollout_moments(prepared.model, [w for w in weights if w.name in bound], spec, contexts,
                                   device, horizon, threads)
    setup = SweepSetup(loaded, weights, blocks, rollout, bound, nominal, horizon, prepared.model.ByteSize(),
                       prepared.model.graph.ByteSize(), ops, opset_deltas(prepared.model), replay, note, rounding)
    setup.spec_hints = spec.hints(*model_io)
    setup.stored = stored
    if rounding is not None:
        # Every /gptq code now, not when a block first needs it: which weights keep nearest's integers
        # (the held-out check) is then known to the sweep's note, however its blocks are resumed or shared
        # among workers.
        gptq_tiers = list(dict.fromkeys(str(parse_tier(t).base) for t in config.tiers if parse_tier(t).gptq))
        for name, moments in rounding.moments.items():  # weight by weight: each one's folds are freed after it
            for tier in gptq_tiers:
                plan_codes(setup, {name: tier})
            moments.forget_folds()
    if setup.replay is not None:
        check_replay(setup)
    return setup


def rollout_moments(model: onnx.ModelProto, weights: list[Weight], spec: RolloutSpec, contexts: Contexts,
                    device: Device, horizon: int, threads: int = 0):
    """The /gptq tiers' rounding: input moments of `weights` (rounding.input_moments) from the FP32 model's
    nominal rollouts on the sweep contexts, in a session of their own that also returns the activations."""
    elem = {w.name: onnx.helper.np_dtype_to_tensor_dtype(np.dtype(w.dtype)) for w in weights}
    passes = 0

    def steps(probe: onnx.ModelProto, acts: list[str]):
        nonlocal passes
        raw = spec.to_dict()
        raw["trajectory"] = list(dict.fromkeys([*spec.trajectory, *acts]))
        rollout = Rollout(make_session(probe, device, threads), RolloutSpec.from_dict(raw), contexts, device,
                          "input moments")
        for s in range(contexts.count):
            for out in rollout.steps(s, None, horizon):
                passes += 1
                yield s, {a: out[a].numpy() for a in acts}

    shapes = {inp: contexts.arrays[key][0].shape for inp, key in [*spec.initial.items(), *spec.fixed.items()]}
    shapes.update({inp: contexts.arrays[key][0, 0].shape for inp, key in spec.per_step.items()})
    return Rounding.from_moments(input_moments(model, elem, steps, shapes), forward_passes=passes)


def tier_values(setup: SweepSetup, names: list[str], tier: Tier) -> dict[str, Any]:
    """The weights `names` at `tier` as the written graph computes with them (device values). A /gptq
    tier's integers come from the setup's rounding, on the host; a weight without statistics rounds
    to nearest."""
    axes = setup.axes
    if tier.gptq and setup.rounding is None:
        raise TqsError(f"tier {tier}: this sweep setup gathered no /gptq statistics (its sweep measured no "
                       "/gptq tier)")
    out = {}
    for n in names:
        t = for_weight(tier, setup.dtypes[n])  # a float16 weight: float16 scales, as written
        if tier.gptq and n in setup.rounding.moments:
            host = setup.source(n).numpy()
            codes = setup.rounding.codes_for(n, host, t, *axes[n])
            out[n] = setup.ops.device.to_device(apply_tier(host, t, *axes[n], codes))
        else:
            out[n] = setup.ops.tier(setup.source(n), t, axes[n])
    return out


def plan_codes(setup: SweepSetup, weights: dict[str, str]) -> dict[tuple[str, str], np.ndarray]:
    """The /gptq codes a plan's weights (name -> tier text) are written with: what its joint check used."""
    if setup.rounding is None:
        return {}
    axes = setup.axes
    codes = {}
    for name, text in weights.items():
        tier = parse_tier(text)
        if tier.gptq and name in setup.rounding.moments:
            codes[(name, str(tier.base))] = setup.rounding.codes_for(
                name, setup.source(name).numpy(), for_weight(tier, setup.dtypes[name]), *axes[name])
    return codes


def write_plan_codes(setup: SweepSetup, plan: dict[str, Any], plan_path: str | os.PathLike,
                     ) -> dict[tuple[str, str], np.ndarray]:
    """The plan's /gptq codes (`plan_codes`); where it puts weights at /gptq tiers they are also written
    beside `plan_path` (rounding.save_codes) and named in plan['rounding'], for `apply` to read."""
    codes = plan_codes(setup, plan["weights"])
    if any(parse_tier(t).gptq for t in plan["weights"].values()):
        if setup.rounding is None:
            raise TqsError("the sweep measured no /gptq tier, so it gathered no statistics for them: sweep "
                           "with /gptq tiers (they are default tiers) or plan without them")
        plan["rounding"] = save_codes(codes, plan_path, sorted(setup.rounding.moments))
    return codes


def check_replay(setup: SweepSetup, rtol: float = 1e-3) -> None:
    """One 8-bit quant probe of the first block through the replay and through the step loop; a replay
    that disagrees by more than float noise (the two sessions may run different kernels) is dropped,
    and the sweep runs on the step loop. A safeguard for CUDA graphs; on the CPU they agree to the bit."""
    replay = setup.replay
    probe = as_stored(setup, {n: setup.ops.quant_probe(setup.source(n), 8) for n in setup.blocks[0].weights})
    setup.replay = None
    loop = divergence(setup, probe)
    try:
        replayed = replay.divergence(probe)
    except Exception as exc:  # ORT's own errors too: the step loop takes over
        setup.replay_note = f"replay check failed: {first_line(exc)}"
        return
    replayed[~np.isfinite(replayed)] = np.inf
    if np.allclose(replayed, loop, rtol=rtol, atol=1e-6 * float(np.max(loop[np.isfinite(loop)], initial=0.0))):
        setup.replay = replay
    else:
        worst = float(np.max(np.abs(replayed - loop)[np.isfinite(loop)], initial=np.inf))
        setup.replay_note = f"the replay disagrees with the step loop on a probe (by up to {worst:.3g})"


def opset_deltas(model: onnx.ModelProto) -> dict[int, int]:
    """Bytes the graph gains when `apply` converts it to each opset a tier may need (ReduceMean's axes
    becoming an input, and the like), so that the planner's size stays the written size."""
    current = main_opset(model)
    skeleton, _ = detach_initializers(model)  # the converter sees no weight data; the stubs stay as they are
    base = skeleton.graph.ByteSize()
    deltas = {}
    for opset in sorted({*INT_MIN_OPSET.values(), *FLOAT_MIN_OPSET.values(), BLOCKED_MIN_OPSET, FP16_SCALE_MIN_OPSET}):
        if opset > current:
            try:
                deltas[opset] = UpgradeOpset(opset).run(skeleton).model.graph.ByteSize() - base
            except TqsError:  # no conversion: apply says so in one line if a plan ever needs it
                continue
    return deltas


def divergence_mode() -> str:
    """TQS_DIVERGENCE: 'model' (the default: the model's own run computes each step's squared divergence
    from the nominal trajectory) or 'graph' (a separate ORT graph per step over every context's outputs,
    the engine before the sixth session; kept for comparison, `tools/bench_sweep.py --compare-divergence`)."""
    return setting("TQS_DIVERGENCE")


def gpu_stream_mode() -> str:
    """TQS_GPU_STREAM: 'own' (each ORT session its own CUDA stream, ORT's default) or 'shared'."""
    return setting("TQS_GPU_STREAM")


StopFn = Callable[[np.ndarray], bool]


FLOAT16 = Tier("fp16")


def as_stored(setup: SweepSetup, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with each float16 weight's, and each weight read only in float16, rounded to float16
    (what the written model computes with; bound as float32)."""
    return {n: setup.ops.tier(v, FLOAT16, (None, None)) if setup.dtypes[n] == "float16" or n in setup.stored
            else v for n, v in values.items()}


def half_reads(model: onnx.ModelProto, names: set[str]) -> set[str]:
    """Of the float32 weights `names`, those every reader of which is a main-graph Cast to float16."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    other: set[str] = {o.name for o in model.graph.output}
    for node in model.graph.node:
        other |= subgraph_refs(node)
        for v in node.input:
            if v in names:
                readers.setdefault(v, []).append(node)
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return {n for n, rs in readers.items() if n in floats and n not in other and all(
        cast_to(r) == onnx.TensorProto.FLOAT16 for r in rs)}


def divergence(setup: SweepSetup, replaced: dict[str, Any], stop: StopFn | None = None) -> np.ndarray:
    """Squared trajectory divergence per (context, step) with `replaced` (device values) swapped in.

    Contexts advance in lockstep so `stop` (given the divergences so far) can end every rollout at
    the step where the score has converged; the result then has fewer than `horizon` columns.
    A float16 weight's value is rounded to float16 first: what its written model can hold (ORT's CPU
    provider may drop the graph's own Cast back to float16, computing in float32).
    """
    replaced = as_stored(setup, replaced)
    if setup.replay is not None and stop is None:
        try:
            out = setup.replay.divergence(replaced)
            out[~np.isfinite(out)] = np.inf
            return out
        except TqsError as exc:  # e.g. a state that changes shape: the step loop from here on
            setup.replay, setup.replay_note = None, str(exc)
    bound = {**setup.bound, **replaced}
    # With steps queued without waiting (GPU) and no stopping rule, the divergences stay on the device
    # until the rollout ends: one wait per rollout instead of one per step.
    lazy = setup.rollout.async_steps and stop is None
    if setup.rollout.divergence and not lazy:
        return _measured_divergence(setup, bound, stop)
    gens = [setup.rollout.steps(s, bound, setup.horizon) for s in range(len(setup.nominal))]
    out = np.zeros((len(gens), setup.horizon))
    queued = []
    for t in range(setup.horizon):
        pairs, owner = [], []
        for s, gen in enumerate(gens):
            step = next(gen)
            pairs += [(step[k], setup.nominal[s][t][k]) for k in step]
            owner += [s] * len(step)
        if lazy:
            queued.append((t, owner, setup.ops.sqdiff_many(pairs, wait=False)))
            continue
        setup.rollout.synchronize()
        np.add.at(out[:, t], owner, setup.ops.sqdiff_many(pairs))
        if stop is not None and stop(out[:, : t + 1]):
            out = out[:, : t + 1]
            break
    for gen in gens:
        gen.close()
    setup.rollout.synchronize()
    setup.ops.synchronize()
    for t, owner, value in queued:  # device values (GPU) or arrays (the CPU provider computes at once)
        np.add.at(out[:, t], owner, np.asarray(value if isinstance(value, np.ndarray) else value.numpy(), np.float64))
    out[~np.isfinite(out)] = np.inf
    return out


def _measured_divergence(setup: SweepSetup, bound: dict[str, Any], stop: StopFn | None) -> np.ndarray:
    """`divergence` when the model's own run computes each step's squared divergence (one scalar per
    trajectory output comes to the host, nothing else)."""
    gens = [setup.rollout.divergences(s, setup.nominal[s], bound, setup.horizon) for s in range(len(setup.nominal))]
    out = np.zeros((len(gens), setup.horizon))
    for t in range(setup.horizon):
        for s, gen in enumerate(gens):
            out[s, t] = next(gen)
        if stop is not None and stop(out[:, : t + 1]):
            out = out[:, : t + 1]
            break
    for gen in gens:
        gen.close()
    out[~np.isfinite(out)] = np.inf
    return out


def converged(values: np.ndarray, tol: float, window: int) -> bool:
    """The paper's sliding-window rule: the last `window` + 1 values agree within tol (relative, >= 1)."""
    if len(values) <= window:
        return False
    last = values[-window - 1:]
    return bool(np.all(np.isfinite(last)) and last.max() - last.min() <= tol * max(1.0, abs(last[-1])))


def horizon_stop(norm: float, tol: float, window: int) -> StopFn | None:
    """Stop a rollout once gamma_task (Eq. 1 at T = 1..t) has converged; or at once if non-finite."""
    if tol <= 0:
        return None

    def stop(div: np.ndarray) -> bool:
        if not np.all(np.isfinite(div)):
            return True
        cum = np.cumsum(div, axis=1).mean(axis=0)
        with np.errstate(divide="ignore"):
            gamma = np.log(cum / (norm ** 2 + EPS)) / np.arange(1, cum.size + 1)
        return converged(gamma, tol, window)

    return stop


def gauss_score(setup: SweepSetup, w: dict[str, Any], block: Block, config: SweepConfig, norm: float,
                stop: StopFn | None, quant_zero: bool | None = None) -> tuple[ProbeScore, bool]:
    """Seeded Gaussian draws, each scaled to the quant residual's norm over the whole block
    (`DeviceProbes.gauss_probe`); with early stopping, draws end once the running gamma has converged.
    Rollouts cut short at different steps are scored on their common length.

    Also returns whether the block is unreached: the quant probe (`quant_zero`: it ran and changed no
    output; None: it did not run) and the draws so far, two probes at least, all of nonzero norm,
    changed no output at any step of any context. The remaining draws would give the same zeros, so
    they are skipped (`config.skip_unreached`)."""
    divs, running = [], []

    def scored() -> ProbeScore:
        t = min(d.shape[1] for d in divs)
        return score_divergence(np.stack([d[:, :t] for d in divs]), norm)

    # The probes so far that changed nothing: the quant probe when it ran, then the draws.
    may_skip = config.skip_unreached and norm > 0 and quant_zero is not False
    zero_before = 1 if quant_zero else 0
    for p in range(config.probes):
        offsets = [probe_offset(config.seed, block.id, p, j) for j in range(len(w))]
        divs.append(divergence(setup, setup.ops.gauss_probe(w, offsets, norm), stop))
        if may_skip and zero_before + len(divs) >= 2 and not any(np.any(d) for d in divs):
            return scored(), True
        if config.early_stop > 0:
            running.append(scored().gamma_task)
            if converged(np.array(running), config.early_stop, config.early_window):
                break
    return scored(), False


def _mean_damage(d: np.ndarray) -> float:
    """A tier's measured damage: the mean over contexts, inf where any diverged."""
    return float(d.mean()) if np.all(np.isfinite(d)) else math.inf


def score_block(setup: SweepSetup, block: Block, config: SweepConfig, tiers: list[Tier]) -> BlockScore:
    """All probes of one block: quant residual, Gaussian draws of the same norm, tier damage.

    Every perturbed tensor is made on the device from the bound nominal weights.
    """
    passes0 = setup.rollout.forward_passes
    ops = setup.ops
    w = {n: setup.source(n) for n in block.weights}
    # Weights already on the probe's grid (a fake-quant export, or a power-of-two scale) leave no residual:
    # its norm 0 scored the block -inf and dead, and the paper's allocator sent a sensitive block to its
    # bottom tier (a user's trial: int2 damage 2,400, ranked last). Probed on the next coarser grid instead.
    bits, norm = config.bits + 1, 0.0
    while norm == 0 and bits > 2:
        bits -= 1
        quantized = {n: ops.quant_probe(v, bits) for n, v in w.items()}
        norm = math.sqrt(sum(ops.sqdiff(quantized[n], v) for n, v in w.items()))
    score = BlockScore(block.id, block.name, block.weights, block.size, norm,
                       probe_bits=bits if bits != config.bits else None)
    stop = horizon_stop(norm, config.early_stop, config.early_window) if config.early_horizon else None
    quant_zero = None  # the quant probe left every output bit-identical (None: not run)
    if config.probe in ("quant", "both"):
        qdiv = divergence(setup, quantized, stop)
        score.quant = score_divergence(qdiv, norm)
        quant_zero = not np.any(qdiv)
    if config.probe in ("gauss", "both"):
        score.gauss, score.unreached = gauss_score(setup, w, block, config, norm, stop, quant_zero)
    def damage(tier: Tier) -> np.ndarray:  # per context: squared divergence summed over the steps
        return divergence(setup, tier_values(setup, list(w), tier)).sum(axis=-1)

    measured = [t for t in tiers if not t.is_identity]
    if score.unreached and measured:
        # Two small probes changed nothing; the coarsest integer grid (int2 before int4, per tensor first)
        # is rolled out once before every tier is taken as harmless: a threshold (Relu(x w - 6)) that
        # probes of the int8 residual's norm never cross, int2 may. `zero` and int1 move the weights
        # otherwise (to 0, to +-scale) and may cross none, so they are rolled out besides, not instead.
        coarsest = {}
        for t in sorted(measured, key=lambda t: (t.bits, t.granularity != "tensor")):
            coarsest.setdefault(t.fmt if t.bits < 2 else "grid", t)
        for tier in sorted(coarsest.values(), key=lambda t: t.bits < 2):
            d = damage(tier)
            score.damage[str(tier)] = _mean_damage(d)
            if np.any(d):
                score.unreached = False
                break
        if score.unreached:
            score.damage = {}  # every tier harmless here: recorded as 0 below
    for tier in measured:
        if str(tier) not in score.damage:  # unreached: outputs do not depend on these weights here
            score.damage[str(tier)] = 0.0 if score.unreached else _mean_damage(damage(tier))
    score.nonfinite = any(p is not None and p.nonfinite for p in (score.quant, score.gauss))
    score.dead = not score.nonfinite and score.gamma <= config.gamma_min
    score.forward_passes = setup.rollout.forward_passes - passes0
    return score


# ------------------------------------------------------------------------------------ checkpoints

class Checkpoint:
    """Append-only JSON lines, fsync'd per row (a block's scores; a frontier point in `pareto`), each
    keyed by its "id"; the first line fingerprints the run.

    While a run uses it (from `check` or its creation to `release`) it holds an exclusive advisory lock
    on the file: a second run on the same output, even with --resume, stops at once instead of working
    until the first run removes the file under it."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint
        self._found: bool | None = None  # whether the file existed when `check` looked
        self._lock_file: Any = None

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): unlocked, as before
            return
        if self._lock_file is not None:
            return
        f = open(self.path, "rb")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise TqsError(f"{self.path}: another run is using this checkpoint now; wait for it to finish or "
                           "stop it, then run again with --resume") from None
        self._lock_file = f

    def release(self) -> None:
        """Let go of the lock (the run is over, done or not)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def load(self) -> dict[Any, dict]:
        if not self.path.exists():
            return {}
        lines = self.path.read_text(errors="replace").splitlines()
        try:
            head = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            head = None
        if not isinstance(head, dict) or "fingerprint" not in head:
            raise TqsError(f"{self.path}: checkpoint is empty or damaged (no run fingerprint on its first line); "
                           "delete it to start again")
        if head["fingerprint"] != self.fingerprint:
            differ = differing_parts(head.get("parts"), getattr(self.fingerprint, "parts", {}))
            raise TqsError(f"{self.path}: checkpoint belongs to another run ("
                           f"{differ or 'the inputs, options, device or the tool version differ'}); "
                           "delete it to start again")
        done = {}
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the block in flight when the run was killed, or a damaged line: done again
            if not isinstance(row, dict) or not isinstance(row.get("id"), (int, str)):
                continue  # not a row of ours: its block is done again, the rows after it still count
            if row.pop("_sha", None) != _row_digest(row):
                continue  # changed since it was written (a flipped digit, an edit): done again
            done[row["id"]] = row
        return done

    def check(self, resume: bool) -> None:
        """Refuse, before any work, what `start` would: an existing checkpoint without `resume`, or
        another run's with it."""
        self._found = self.path.exists()  # what start creates exclusively if it was not there
        try:
            if self._found:
                self._lock()
            if self._found and not resume:
                raise TqsError(f"{self.path}: a checkpoint exists; pass --resume to continue it or delete it")
            if resume:
                self.load()
        except BaseException:
            self.release()
            raise

    def start(self, resume: bool) -> dict[Any, dict]:
        if self._found is None:  # not looked at yet (a caller may look before its set-up: `check`)
            self.check(resume)
        if not self._found:  # absent when looked at: create it, and stop if another run just did
            self._create()
            return {}
        done = self.load() if resume else {}
        self._truncate_partial_tail()  # the row a killed run left half-written
        return done

    def _create(self) -> None:
        """The file with its fingerprint line, created exclusively: of two runs that both found no
        checkpoint (started at once on one output), the second stops here."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            raise TqsError(f"{self.path}: another run has just started this checkpoint") from None
        os.close(fd)
        self._lock()
        self.append_row({"fingerprint": str(self.fingerprint), "schema_version": SCHEMA_VERSION,
                         "parts": getattr(self.fingerprint, "parts", {})})

    def _truncate_partial_tail(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, score: BlockScore) -> None:
        self.append_row(asdict(score))

    def append_row(self, row: dict) -> None:
        try:  # never creates the file: one that vanished (another run finished with it) is an error
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise TqsError(f"{self.path}: the checkpoint vanished while this run wrote it (did another run on "
                           "the same output finish?)") from None
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps({**row, "_sha": _row_digest(row)}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _row_digest(row: dict) -> str:
    """A checkpoint row's digest (its JSON, keys sorted): a row whose figures changed after it was
    written (a flipped digit resumed silently into the scores) no longer matches and is redone."""
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16]


def checked_checkpoint(path: Path | None, fingerprint: str, resume: bool) -> Checkpoint | None:
    """The sweep's checkpoint at `path` (None: none), checked as `Checkpoint.check` does; a --resume that
    finds none says so."""
    if path is None:
        return None
    ckpt = Checkpoint(path, fingerprint)
    ckpt.check(resume)
    note_missing_checkpoint(ckpt, resume, "scoring every block")
    return ckpt


def note_missing_checkpoint(ckpt: Checkpoint, resume: bool, fresh: str) -> None:
    """On stderr, --quiet or not: a --resume that finds no checkpoint (a mistyped path or folder)
    would otherwise redo all the work without a word."""
    if resume and not ckpt.path.exists():
        print(f"note: --resume found no checkpoint at {ckpt.path}: {fresh}", file=sys.stderr)


def note_resumed(taken: int, total: int, quiet: bool) -> None:
    """How many blocks a resumed sweep (local or Ray) took from its checkpoint, if any."""
    if taken and not quiet:
        print(f"sweep: {taken} of {total} blocks taken from the checkpoint", file=sys.stderr)


class Fingerprint(str):
    """A run's fingerprint (the digest a checkpoint's first line records) and the parts it is made of,
    which that line records too, so a refused checkpoint can say what differs."""

    parts: dict[str, Any]

    def __new__(cls, parts: dict[str, Any]) -> "Fingerprint":
        text = json.dumps(parts, sort_keys=True)
        self = super().__new__(cls, hashlib.sha256(text.encode()).hexdigest())
        self.parts = json.loads(text)  # as the checkpoint reads it back (tuples as lists)
        return self

    def __getnewargs__(self) -> tuple[dict[str, Any]]:  # a copy or a pickle is rebuilt from the parts
        return (self.parts,)


def _fingerprint(loaded: LoadedModel, spec: RolloutSpec, contexts: Contexts, config: SweepConfig,
                 device_kind: str) -> Fingerprint:
    # The code's versions the scores document records but the tool's own (whose other releases may
    # resume): passes, Gaussian draws where drawn, weight rules, how a row's figures are computed; and
    # the rounding, /gptq swept or not.
    versions = [v for k, v in document_versions(config).items() if k not in ("tool_version", "rounding")]
    return Fingerprint({
        "model": loaded.sha256,  # the model file and its external data
        "device": device_kind,  # another provider runs other kernels: its scores differ in the digits
        # The horizon rolled out, however given (--horizon, or the spec's): the same run either way.
        "options": {**asdict(config), "horizon": config.horizon or spec.horizon},
        "engine": divergence_mode(),  # the two engines round differently on the CPU (float32 / float64)
        "versions": [*versions, ROUNDING_VERSION],
        "spec and contexts": contexts_digest(spec, contexts, with_horizon=False),  # the horizon: in options
    })


def differing_parts(recorded: Any, ours: dict[str, Any]) -> str:
    """What differs between a checkpoint's recorded fingerprint parts and this run's, in words ('' when
    the checkpoint recorded none)."""
    if not isinstance(recorded, dict):
        return ""
    out = []
    for key, value in ours.items():
        theirs = recorded.get(key)
        if theirs == value:
            continue
        if isinstance(value, dict) and isinstance(theirs, dict):
            keys = sorted(k for k in {*value, *theirs} if value.get(k) != theirs.get(k))
            out.append(f"{key}: " + ", ".join(f"{k} {theirs.get(k)!r} there, {value.get(k)!r} now" for k in keys[:4]))
        else:
            out.append(key)
    return "; ".join(out)


def contexts_digest(spec: RolloutSpec, contexts: Contexts, horizon: int | None = None, *,
                    with_horizon: bool = True) -> str:
    """sha256 of the rollout spec and the contexts' arrays: which rollouts a sweep measured (computed
    once per spec and contexts object: a sweep's checkpoint and its scores both ask). The horizon is
    the one rolled out (`horizon`, else the spec's: a sweep's --horizon 200 and a spec of 200 steps
    roll out the same; none without `with_horizon`), and the spec's `name` label is left out."""
    rolled = {**spec.to_dict(), "horizon": (horizon or spec.horizon) if with_horizon else None}
    rolled.pop("name", None)
    text = json.dumps(rolled, sort_keys=True)
    memo = contexts.__dict__.setdefault("_digests", {})
    if text not in memo:
        h = hashlib.sha256()
        h.update(text.encode())
        for k in sorted(contexts.arrays):
            h.update(k.encode())
            h.update(np.ascontiguousarray(contexts.arrays[k]).tobytes())
        memo[text] = h.hexdigest()
    return memo[text]


_ROW_TYPES = {"id": int, "name": str, "weights": list, "size": int, "norm": (int, float), "damage": dict,
              "dead": bool, "nonfinite": bool, "forward_passes": int, "unreached": bool}


def _from_row(row: dict) -> BlockScore | None:
    """The row's block score, or None where the row is not one (edited or damaged by hand)."""
    if any(k in row and not isinstance(row[k], t) for k, t in _ROW_TYPES.items()):
        return None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)  # noqa: E731
    probes = [row.get(k) for k in ("quant", "gauss") if row.get(k) is not None]
    if not all(isinstance(p, dict) and number(p.get("gamma_task")) for p in probes) \
            or not all(number(v) for v in row.get("damage", {}).values()):
        return None
    try:
        row = dict(row)
        for key in ("quant", "gauss"):
            if row.get(key) is not None:
                row[key] = ProbeScore(**row[key])
        return BlockScore(**row)
    except (TypeError, ValueError):
        return None


def resumed_scores(rows: dict[int, dict], weights: dict[int, list[str]]) -> dict[int, BlockScore]:
    """Checkpoint rows still valid for blocks id -> tensors: a row whose tensors are listed otherwise
    (an older grouping, so other Gaussian draws), or that is no block score, is left out and its block
    scored again."""
    scores = {i: _from_row(r) for i, r in rows.items() if r.get("weights") == weights.get(i)}
    return {i: score for i, score in scores.items() if score is not None}


# ------------------------------------------------------------------------------------------- run

def run_sweep(loaded: LoadedModel, spec: RolloutSpec, contexts: Contexts, device: Device,
              config: SweepConfig, checkpoint: Path | None = None, resume: bool = False,
              quiet: bool = False, finish: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Score every block; return the scores document (also what `sweep -o` writes). `finish(doc)` runs
    while the checkpoint is still locked (`sweep` writes the scores and removes the checkpoint there)."""
    tiers = [parse_tier(t) for t in config.tiers]
    # Checked before the set-up, which on a large model takes minutes.
    ckpt = checked_checkpoint(checkpoint, _fingerprint(loaded, spec, contexts, config, device.kind), resume)
    try:
        with slow_note(f"sweep: preparing the graph, the session and the nominal rollouts ({contexts.count} "
                       f"contexts x {config.horizon or spec.horizon} steps)", quiet):  # minutes on a large model
            setup = prepare(loaded, spec, contexts, device, config)
        done = resumed_scores(ckpt.start(resume) if ckpt else {}, {b.id: b.weights for b in setup.blocks})
        todo = [b for b in setup.blocks if b.id not in done]  # the bar and its time left count these only
        note_resumed(len(setup.blocks) - len(todo), len(setup.blocks), quiet)
        for block in progress(todo, "sweep", quiet, unit="block"):
            done[block.id] = score_block(setup, block, config, tiers)
            if ckpt:
                ckpt.append(done[block.id])
        scores = [done[b.id] for b in setup.blocks]
        return conclude(scores_document(setup, spec, config, scores, device), scores, spec,
                        [o.name for o in setup.loaded.model.graph.output], engine_summary(setup), sweep_notes(setup),
                        finish, quiet)
    finally:
        if ckpt:
            ckpt.release()


def conclude(doc: dict[str, Any], scores: list[BlockScore], spec: RolloutSpec, outputs: list[str], engine: str,
             notes: list[str], finish: Callable[[dict[str, Any]], None] | None, quiet: bool) -> dict[str, Any]:
    """What a local and a Ray sweep do once every block is scored: print the engine and the notes (with
    `unreached_note`), then hand the document to `finish`; return it."""
    if not quiet:
        extra = unreached_note(scores, spec, outputs)
        print_sweep_notes(engine, notes + ([extra] if extra else []))
    if finish:
        finish(doc)
    return doc


def unreached_note(scores: list[BlockScore], spec: RolloutSpec, outputs: list[str]) -> str | None:
    """Blocks that changed no trajectory output, where the model has outputs the spec neither follows nor
    feeds back: the allocator puts such blocks at its cheapest tier, whatever they do to those outputs
    (a new user's trial: an output 83% off at int2, no word said)."""
    idle = [s.name for s in scores if s.unreached or s.dead]
    others = [o for o in outputs if o not in spec.trajectory and o not in spec.feedback]
    if not idle or not others:
        return None
    more = f" and {len(idle) - 1} more" if len(idle) > 1 else ""
    return (f"{len(idle)} block(s) changed no trajectory output ('{idle[0]}'{more}): the allocator may put them "
            f"at any tier; if the model's other outputs ({', '.join(others)}) matter, add them to the spec's "
            "trajectory")


def sweep_notes(setup: SweepSetup) -> list[str]:
    """What a user should know of this sweep's set-up: a spec that may not be meant, /gptq weights
    that round to nearest (printed after a sweep, local or on Ray workers)."""
    notes = list(setup.spec_hints)
    if setup.rounding is not None and setup.rounding.too_few_rows:
        notes.append(too_few_rows_note(setup.rounding.too_few_rows))
    if setup.rounding is not None and setup.rounding.non_finite:
        bad = setup.rounding.non_finite
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        notes.append(f"{len(bad)} weight(s) round to nearest at the /gptq tiers: their input statistics are not "
                     f"finite ('{bad[0]}'{more}: an activation they multiply is NaN or inf, or X^T X overflows "
                     "float32)")
    nearest = setup.rounding.nearest if setup.rounding is not None else {}
    if nearest:
        name, tiers = next(iter(sorted(nearest.items())))
        if setup.dtypes.get(name) == "float16":  # named as the user gave them, without the weight's own scales
            tiers = [str(replace(parse_tier(t), scale_fmt="fp32", half_weight=False)) for t in tiers]
        more = f"; {len(nearest) - 1} more weight(s)" if len(nearest) > 1 else ""
        notes.append(f"{len(nearest)} weight(s) keep round-to-nearest integers at /gptq tiers "
                     f"('{name}' at {', '.join(tiers)}{more}): GPTQ's rounding fitted on all sweep contexts but "
                     "one did worse than rounding to nearest on that one, summed over the contexts")
    return notes


def print_sweep_notes(engine: str, notes: list[str]) -> None:
    print(f"sweep engine: {engine}", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def too_few_rows_note(few: dict[str, tuple[int, int]]) -> str:
    name, (rows, inputs) = next(iter(sorted(few.items())))
    more = f" and {len(few) - 1} more" if len(few) > 1 else ""
    return (f"{len(few)} weight(s) round to nearest at the /gptq tiers: the sweep contexts give fewer rows than "
            f"inputs ('{name}': {rows} rows, {inputs} inputs{more}), too few to fit GPTQ's rounding without "
            f"fitting the contexts themselves; more contexts or a longer horizon give them statistics")


def engine_summary(setup: SweepSetup) -> str:
    """How the probes ran: replayed on fixed buffers (and CUDA graphs), or the step loop and why."""
    if setup.replay is not None:
        return f"replayed on fixed buffers{' as CUDA graphs' if setup.replay.mode == 'cuda-graph' else ''}"
    return f"step loop ({setup.replay_note})" if setup.replay_note else "step loop"


def scores_document(setup: SweepSetup, spec: RolloutSpec, config: SweepConfig, scores: list[BlockScore],
                    device: Device) -> dict[str, Any]:
    """The scores file. No wall-clock fields: the same inputs and seed give the same bytes, after a
    resume and with any number of workers too (forward_passes counts what these scores needed)."""
    quantizable = [w for w in setup.weights if w.quantizable]
    nominal = setup.rollout.contexts.count * setup.horizon
    return {
        "schema_version": SCHEMA_VERSION, "kind": "tqs-scores", **document_versions(config),
        "model": {**model_summary(setup.loaded, setup.weights, setup.prepared_bytes, setup.graph_bytes),
                  "opset_graph_delta": {str(k): v for k, v in setup.opset_deltas.items()}},
        "rollout": spec.to_dict(), "config": asdict(config), "contexts": setup.rollout.contexts.count,
        "contexts_sha256": contexts_digest(spec, setup.rollout.contexts, setup.horizon),
        "horizon": setup.horizon, "device": device.kind,
        "weights": {w.name: weight_entry(w) for w in quantizable},
        "blocks": [asdict(s) for s in scores],
        "forward_passes": nominal + sum(s.forward_passes for s in scores),
        "nominal_forward_passes": nominal,
        # weights whose /gptq tiers have input statistics (the others round to nearest at those tiers), and
        # the forward passes of the FP32 rollouts that gathered them (not in forward_passes)
        **({"gptq_weights": sorted(setup.rounding.moments),
            "statistics_forward_passes": setup.rounding.forward_passes} if setup.rounding is not None else {}),
        **({"gptq_too_few_rows": {n: list(v) for n, v in sorted(setup.rounding.too_few_rows.items())}}
           if setup.rounding is not None and setup.rounding.too_few_rows else {}),
        **({"gptq_non_finite": setup.rounding.non_finite}
           if setup.rounding is not None and setup.rounding.non_finite else {}),
        # the damping the held-out check chose per weight and /gptq tier (null: nearest's integers kept)
        **({"gptq_damping": {n: {t: d for (m, t), d in sorted(setup.rounding.damping.items()) if m == n}
                             for n in sorted({m for m, _ in setup.rounding.damping})}}
           if setup.rounding is not None and setup.rounding.damping else {}),
    }


def weight_entry(w: Weight) -> dict[str, Any]:
    return {"shape": list(w.shape), "dtype": w.dtype, "bits": w.bits, "channel_axis": w.channel_axis,
            "block_axis": w.block_axis, "origin": w.origin, "consumer_ops": sorted(set(w.consumer_ops)),
            "fused_dq": w.fused_dq, "const_lookup": w.const_lookup}


def model_summary(loaded: LoadedModel, weights: list[Weight], prepared_bytes: int,
                  graph_bytes: int = 0) -> dict[str, Any]:
    """Sizes: the original file, and what of the prepared graph no tier touches (`fixed_bytes`)."""
    float_bytes = sum(w.nbytes for w in weights)
    q_bytes = sum(w.nbytes for w in weights if w.quantizable)
    return {"path": str(loaded.path), "sha256": loaded.sha256, "identity": IDENTITY, "file_bytes": loaded.file_bytes,
            "float_weight_bytes": float_bytes, "quantizable_bytes": q_bytes,
            "fixed_bytes": prepared_bytes - q_bytes,
            "graph_bytes": graph_bytes,
            "parameters": sum(w.size for w in weights),
            "quantizable_parameters": sum(w.size for w in weights if w.quantizable)}


def swept_horizon(scores: dict[str, Any]) -> int | None:
    """The horizon the sweep rolled out (its --horizon or its spec's), where the scores record it."""
    h = scores.get("horizon")
    return h if isinstance(h, int) and not isinstance(h, bool) and h > 0 else None


def setup_for_scores(loaded: LoadedModel, spec: RolloutSpec, contexts: Contexts, device: Device,
                     scores: dict[str, Any]) -> SweepSetup:
    """A sweep setup whose blocks are those of an earlier sweep (same model, same grouping)."""
    if not same_model(scores["model"], loaded):
        raise TqsError(f"{loaded.path}: not the model these scores were computed on (sha256 differs)")
    swept = scores.get("contexts_sha256")
    if swept and any(parse_tier(t).gptq for t in scores["config"].get("tiers") or []) \
            and swept != contexts_digest(spec, contexts, swept_horizon(scores)):
        raise TqsError("not the sweep's rollout spec and contexts (sha256 differs): the /gptq tiers' integers "
                       "must come from the rollouts the sweep measured; pass the sweep's --rollout and --contexts")
    raw = {k: v for k, v in scores["config"].items() if k in SweepConfig.__dataclass_fields__}
    raw["horizon"] = swept_horizon(scores) or raw.get("horizon")  # the sweep's, whatever the spec now says
    return prepare(loaded, spec, contexts, device, SweepConfig(**raw))


class JointDivergence(float):
    """mean_s sum_t ||dY_s(t)||^2 over the contexts (inf when any rollout diverged), carrying what
    still ranks plans that diverge: how many contexts diverged, and the mean over the others.

    A plan that diverges on 1 of 8 contexts is safer than one that diverges on 5, though both
    means are inf; `rank_key` orders them so."""

    diverged: int
    finite_mean: float
    per_context: np.ndarray

    def __new__(cls, per_context: np.ndarray) -> "JointDivergence":
        finite = np.isfinite(per_context)
        self = super().__new__(cls, float(per_context.mean()) if finite.all() else math.inf)
        self.per_context = np.asarray(per_context, dtype=np.float64)
        self.diverged = int((~finite).sum())
        self.finite_mean = float(per_context[finite].mean()) if finite.any() else math.inf
        return self


def joint_divergence(setup: SweepSetup, blocks: list[list[str]], tiers: list[Tier]):
    """A function assign -> JointDivergence (mean_s ||dY_s||^2) with every block at its tier at once."""
    def run(assign: list[int]) -> float:
        replaced: dict[str, Any] = {}
        for names, k in zip(blocks, assign):
            if not tiers[k].is_identity:
                replaced.update(tier_values(setup, names, tiers[k]))
        return JointDivergence(divergence(setup, replaced).sum(axis=-1))

    return run
