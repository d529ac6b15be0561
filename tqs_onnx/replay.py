"""Sweep rollouts replayed on fixed buffers: on a GPU, each step is one CUDA graph launch.

The step loop of `Rollout.divergences` binds new values every step (the fed-back state, the nominal
step to compare with, forcing data) and reads a divergence back, so on a small model the GPU waits
for Python and for kernel launches: the transformer forecaster's plain forward pass takes 0.41-0.51 ms
on an H100 through ONNX Runtime, and 0.14 ms when ORT replays it as a captured CUDA graph
(`tools/results/gpu_h100_s8/`). A replay needs every bound address to stay fixed, so here:

- the graph gathers the nominal trajectory and forcing data from stacks bound once, by a step counter
  that is state of the graph, and writes each step's divergence into an accumulator
  (`passes.replay.IndexedSteps`);
- fed-back states, the counter and the accumulators alternate between two buffer sets, one binding
  (and one captured graph) per parity, so a step never writes what it reads;
- probed weights are copied into fixed weight buffers on the device before a probe and restored
  after it;
- the host writes a context's initial state and counter once per rollout and reads the accumulators
  once per probe.

The same engine runs on the CPU provider (fewer bindings per step, no capture), so the CPU tests
cover it. Scores equal those of the step loop to the bit. Where a model does not fit (a state that
changes shape, an opset below 11, a node ORT keeps off the GPU) the sweep falls back to the step loop.
`TQS_REPLAY=auto` (the default) replays models whose forward pass takes under 20 ms (the step loop's
overhead matters only there; a replay holds a second session), `on` every model, `off` none;
`TQS_CUDA_GRAPH=off` replays on fixed buffers without CUDA graphs.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import onnx

from tqs_onnx.errors import TqsError
from tqs_onnx.passes.replay import IndexedSteps
from tqs_onnx.probes import DeviceProbes
from tqs_onnx.rollout import Rollout
from tqs_onnx.runtime import ORT_NUMPY_TYPES, Device, make_session, setting
from tqs_onnx.util import first_line


# A step loop's overhead per step is tens of microseconds; for a model whose forward pass takes longer
# than this, replaying saves under a few percent and is not worth a second session's memory.
REPLAY_MAX_PASS_S = 0.02


def replay_mode(device: Device) -> str:
    """'off', 'buffers' (fixed buffers, no capture) or 'cuda-graph' (TQS_REPLAY, TQS_CUDA_GRAPH)."""
    if setting("TQS_REPLAY") == "off":
        return "off"
    if device.kind == "cuda" and setting("TQS_CUDA_GRAPH") == "on" and _graphs_safe():
        return "cuda-graph"
    return "buffers"


def _graphs_safe() -> bool:
    """ORT before 1.31 may recycle a host staging buffer that an earlier captured graph still replays
    from (ORT PR #32121; 1.31.1 has the fix): two graphs per session are used only from 1.31 on."""
    from tqs_onnx.runtime import _ort

    try:
        major, minor = (int(x) for x in _ort().__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (1, 31)


def replay_skipped(seconds_per_pass: float) -> str:
    """Why TQS_REPLAY=auto (the default) leaves a model on the step loop, or '' to replay it."""
    if setting("TQS_REPLAY") != "auto" or seconds_per_pass < REPLAY_MAX_PASS_S:
        return ""
    return (f"a forward pass takes {seconds_per_pass * 1e3:.0f} ms: replaying would save little and hold a "
            f"second session (TQS_REPLAY=on replays anyway)")


class Replay:
    """Quant/Gaussian/tier probes of a sweep as replays of two fixed bindings (module doc)."""

    def __init__(self, model: onnx.ModelProto, rollout: Rollout, bound: dict[str, Any],
                 nominal: list[list[dict[str, Any]]], horizon: int, ops: DeviceProbes, threads: int = 0):
        """`model`: the sweep's graph (weights exposed, divergence outputs added) that `rollout` runs;
        `bound`: its nominal weights; `nominal`: per context, per step, the trajectory outputs."""
        spec, device = rollout.spec, rollout.device
        self.rollout, self.ops, self.bound, self.horizon = rollout, ops, bound, horizon
        self.contexts = len(nominal)
        self.mode = replay_mode(device)
        missing = [k for k in spec.trajectory if k not in rollout.divergence]
        if missing:
            raise TqsError(f"no divergence outputs for {missing}")
        rows = self.contexts * horizon
        refs = [rollout.divergence[k][0] for k in spec.trajectory]
        self.sq = [rollout.divergence[k][1] for k in spec.trajectory]
        # Every output of the step loop's graph stays an output (the ones nobody reads stay unbound):
        # dropping one would let ORT fuse the nodes behind it differently, and the sums would differ.
        keep = [o.name for o in model.graph.output]
        result = IndexedSteps([*refs, *spec.per_step], self.sq, keep, rows).run(model)
        self.session = self._session(result.model, device, threads)
        make = device.to_device
        alloc = lambda a: make(np.zeros_like(a))  # noqa: E731
        # Fixed buffers: weights (nominal unless a probe is copied in), stacks, fixed inputs, constants.
        self.slots = {n: make(np.zeros(v.shape(), ORT_NUMPY_TYPES[v.data_type()])) for n, v in bound.items()}
        for n, v in bound.items():
            ops.copy_into(v, self.slots[n])
        # The nominal stacks are filled by this session's own nominal rollout (`_own_nominal`).
        row = {k: self._row(nominal, k) for k in spec.trajectory}
        stacks = {result.report["stacks"][r]: make(np.zeros((rows, *row[k].shape), row[k].dtype))
                  for k, r in zip(spec.trajectory, refs)}
        for inp, key in spec.per_step.items():
            a = rollout.contexts.arrays[key][:, :horizon]
            stacks[result.report["stacks"][inp]] = make(a.reshape(rows, *a.shape[2:]).astype(rollout.input_dtype(inp)))
        first = rollout.initial_feeds(0)
        self.fixed = {i: alloc(first[i]) for i in spec.fixed}
        constants = {i: make(first[i]) for i in spec.constants}
        # Two buffer sets: parity p reads set p and writes set 1 - p.
        self.state = {i: [alloc(first[i]), alloc(first[i])] for i in spec.feedback.values()}
        self.step = [make(np.zeros((), np.int64)), make(np.zeros((), np.int64))]
        self.acc = {d: [make(np.zeros(rows, np.float32)), make(np.zeros(rows, np.float32))] for d in self.sq}
        accumulators = result.report["accumulators"]
        step_in, step_out = result.report["step"]
        # Trajectory outputs that are not fed back get a buffer each (read once, for the replay's own
        # nominal trajectory). Under CUDA graphs every other output gets one too, the ones nobody reads
        # included (one set: both parities may overwrite it); elsewhere they stay unbound.
        scratch = {k: alloc(row[k]) for k in spec.trajectory if k not in spec.feedback}
        bound_out = {*spec.feedback, *scratch, *(a for _, a in accumulators.values()), step_out}
        if self.mode == "cuda-graph":
            scratch.update(self._scratch(rollout, [o.name for o in self.session.get_outputs()
                                                   if o.name not in bound_out]))
        self.bindings, self.run_options = [], []
        for p in (0, 1):
            b = self.session.io_binding()
            for name, value in [*self.slots.items(), *stacks.items(), *self.fixed.items(), *constants.items()]:
                b.bind_ortvalue_input(name, value)
            for out, inp in spec.feedback.items():
                b.bind_ortvalue_input(inp, self.state[inp][p])
                b.bind_ortvalue_output(out, self.state[inp][1 - p])
            for d, (acc_in, acc_out) in accumulators.items():
                b.bind_ortvalue_input(acc_in, self.acc[d][p])
                b.bind_ortvalue_output(acc_out, self.acc[d][1 - p])
            b.bind_ortvalue_input(step_in, self.step[p])
            b.bind_ortvalue_output(step_out, self.step[1 - p])
            for out, value in scratch.items():
                b.bind_ortvalue_output(out, value)
            self.bindings.append(b)
            self.run_options.append(self._graph_options(p))
        self._kept = (stacks, constants, scratch)  # bound: kept alive with the bindings
        self._own_nominal({k: (stacks[result.report["stacks"][r]], scratch.get(k))
                           for k, r in zip(spec.trajectory, refs)})

    def _own_nominal(self, targets: dict[str, tuple[Any, Any]]) -> None:
        """Roll out the nominal weights in this session and stack its own trajectory: the step loop's
        session may run other kernels (cuDNN picks convolution algorithms per session), and a probe's
        divergence must be measured against what this session computes, so that an unperturbed probe
        gives exactly zero. `targets`: trajectory output -> (its stack, its buffer if not fed back)."""
        values: dict[str, list[np.ndarray]] = {k: [] for k in targets}
        for _, _, written in self._rollouts():
            for k, (_, buf) in targets.items():
                src = buf if buf is not None else self.state[self.rollout.spec.feedback[k]][written]
                values[k].append(src.numpy().copy())  # on the CPU provider numpy() may share the buffer
        for k, (stack, _) in targets.items():
            stack.update_inplace(np.stack(values[k]))
        if np.any(self.divergence({})):
            raise TqsError("the replayed nominal rollout does not reproduce itself")

    def _scratch(self, rollout: Rollout, outputs: list[str]) -> dict[str, Any]:
        """Buffers for outputs nobody reads, shaped as the step loop's session gives them at step 1."""
        if not outputs:
            return {}
        from tqs_onnx.runtime import _ort

        b = rollout.session.io_binding()
        feeds = {**rollout.initial_feeds(0), **rollout.step_feeds(0, 0)}
        for name, value in [*self.bound.items(), *((k, rollout.device.to_device(v)) for k, v in feeds.items())]:
            b.bind_ortvalue_input(name, value)
        for o in outputs:
            b.bind_output(o, rollout.device.kind)
        rollout.session.run_with_iobinding(b)
        make = _ort().OrtValue.ortvalue_from_shape_and_type
        scratch = {}
        for o, v in zip(outputs, b.get_outputs()):
            dtype = ORT_NUMPY_TYPES.get(v.data_type())
            if dtype is None:
                raise TqsError(f"output '{o}' has an element type the replay cannot hold")
            scratch[o] = make(list(v.shape()), dtype, rollout.device.kind, 0)
        return scratch

    def _row(self, nominal: list[list[dict[str, Any]]], output: str) -> np.ndarray:
        """Zeros shaped and typed as one step of an output, which must keep its shape through the
        rollout (its stack holds every context's steps in a row); read from the values' metadata only."""
        values = [nominal[s][t][output] for s in range(self.contexts) for t in range(self.horizon)]
        dtype = ORT_NUMPY_TYPES.get(values[0].data_type())
        if dtype is None:
            raise TqsError(f"trajectory output '{output}' cannot be stacked: numpy has no {values[0].data_type()}")
        if len({tuple(v.shape()) for v in values}) > 1:
            raise TqsError(f"trajectory output '{output}' changes shape during the rollout")
        return np.zeros(values[0].shape(), dtype)

    def _session(self, model: onnx.ModelProto, device: Device, threads: int):
        if self.mode == "cuda-graph":
            try:
                return make_session(model, device, threads, cuda_graph=True)
            except TqsError:  # a node ORT cannot place on the GPU: replay without capture
                self.mode = "buffers"
        return make_session(model, device, threads)

    def _graph_options(self, parity: int):
        if self.mode != "cuda-graph":
            return None
        from tqs_onnx.runtime import _ort

        options = _ort().RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(parity + 1))  # ORT reserves id 0
        return options

    def divergence(self, replaced: dict[str, Any]) -> np.ndarray:
        """Squared trajectory divergence per (context, step) with `replaced` swapped in (device values
        of the exposed weights); the same figures as `sweep.divergence` without a stopping rule."""
        copied = []
        try:
            for n, v in replaced.items():
                slot = self.slots.get(n)
                if slot is None or v.shape() != slot.shape() or v.data_type() != slot.data_type():
                    raise TqsError(f"replay: '{n}' is not a probed weight of this shape and type")
                copied.append(n)  # before the copy: a failed copy may have written part of the buffer
                self.ops.copy_into(v, slot)
            written = 0
            for _, _, written in self._rollouts():
                pass
            acc = [self.acc[d][written].numpy().copy() for d in self.sq]
        finally:
            for n in copied:
                self.ops.copy_into(self.bound[n], self.slots[n])
        out = np.zeros(self.contexts * self.horizon)
        for a in acc:  # summed in float64 in the step loop's order, so the figures are the same
            out += a.astype(np.float64)
        return out.reshape(self.contexts, self.horizon)

    def _rollouts(self) -> Iterator[tuple[int, int, int]]:
        """Run every context's steps with the weight buffers as they are; after each step yield
        (context, step, the buffer set it wrote)."""
        g = 0  # global step: its parity picks the binding, so contexts continue the alternation
        for s in range(self.contexts):
            feeds = self.rollout.initial_feeds(s)
            for inp, bufs in self.state.items():
                bufs[g % 2].update_inplace(feeds[inp])
            for inp, buf in self.fixed.items():
                buf.update_inplace(feeds[inp])
            self.step[g % 2].update_inplace(np.array(s * self.horizon, np.int64))
            for t in range(self.horizon):
                self._run(g % 2, s, t)
                g += 1
                yield s, t, g % 2

    def _run(self, parity: int, s: int, t: int) -> None:
        try:
            self.session.run_with_iobinding(self.bindings[parity], self.run_options[parity])
        except Exception as exc:
            raise TqsError(f"replay fails at step {t + 1} (of 1..horizon) of context {s}: {first_line(exc)}") from None
        self.rollout.forward_passes += 1
