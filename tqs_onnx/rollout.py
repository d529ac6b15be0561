"""The rollout spec and stepping an ONNX Runtime session as a discrete-time dynamical system."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tqs_onnx.errors import TqsError
from tqs_onnx.runtime import ORT_NUMPY_TYPES, setting
from tqs_onnx.util import first_line



@dataclass
class RolloutSpec:
    """How to step a model: feedback pairs, inputs from data, trajectory outputs, horizon."""

    horizon: int
    feedback: dict[str, str] = field(default_factory=dict)  # output -> input (none: a trajectory only)
    trajectory: list[str] = field(default_factory=list)
    initial: dict[str, str] = field(default_factory=dict)  # feedback input -> contexts key, (S, *shape)
    per_step: dict[str, str] = field(default_factory=dict)  # input -> key, (S, T, *shape)
    fixed: dict[str, str] = field(default_factory=dict)  # input -> key, (S, *shape)
    constants: dict[str, Any] = field(default_factory=dict)  # input -> literal
    truth: dict[str, str] = field(default_factory=dict)  # output -> key, (S, T, *shape)
    channel_axis: dict[str, int] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.trajectory:
            self.trajectory = list(self.feedback)
        for inp in self.feedback.values():
            self.initial.setdefault(inp, inp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RolloutSpec":
        path = Path(path)
        regular_file(path, "rollout spec")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors save, is no error
        except OSError as exc:
            raise TqsError(f"{path}: cannot read rollout spec ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise TqsError(f"{path}: rollout spec is not UTF-8 text") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml
                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except Exception as exc:
            raise TqsError(f"{path}: rollout spec is not valid JSON/YAML ({exc})") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str = "rollout spec") -> "RolloutSpec":
        if not isinstance(raw, dict):
            raise TqsError(f"{where}: expected a mapping")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise TqsError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        if "horizon" not in raw:
            raise TqsError(f"{where}: 'horizon' is required")
        horizon = _integer(raw["horizon"])
        if horizon is None:
            raise TqsError(f"{where}: horizon must be an integer, not {raw['horizon']!r}")
        if horizon < 1:
            raise TqsError(f"{where}: horizon must be >= 1")
        for key in ("feedback", "initial", "per_step", "fixed", "constants", "truth", "channel_axis"):
            if not isinstance(raw.get(key, {}), dict):
                raise TqsError(f"{where}: '{key}' must be a mapping")
        for key in ("feedback", "initial", "per_step", "fixed", "truth"):  # names -> names
            for k, v in (raw.get(key) or {}).items():
                if not isinstance(v, str):
                    raise TqsError(f"{where}: '{key}' maps names to names; '{k}' maps to {v!r}")
        trajectory = raw.get("trajectory", [])
        if not isinstance(trajectory, list) or not all(isinstance(t, str) for t in trajectory):
            raise TqsError(f"{where}: 'trajectory' must be a list of output names, not {trajectory!r}")
        if not isinstance(raw.get("name", ""), str):
            raise TqsError(f"{where}: 'name' must be a string")
        channel_axis = {name: _integer(axis) for name, axis in (raw.get("channel_axis") or {}).items()}
        for name, axis in channel_axis.items():
            if axis is None:
                raise TqsError(f"{where}: channel_axis of '{name}' must be an integer, not {raw['channel_axis'][name]!r}")
        for name, value in (raw.get("constants") or {}).items():
            try:
                np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                raise TqsError(f"{where}: constant '{name}' must be a number or a list of numbers, not {value!r}") from None
        if not raw.get("feedback") and not trajectory:
            raise TqsError(f"{where}: the spec follows no output: give 'feedback' pairs (output -> input) or a "
                           "'trajectory' list of outputs to compare")
        raw = {**raw, "horizon": horizon, "channel_axis": channel_axis}
        return cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def hints(self, inputs: dict[str, tuple], outputs: dict[str, tuple]) -> list[str]:
        """Notes on a spec that may not be what was meant: an input given from data or held fixed whose
        name and shape match an output the spec does not feed back (`h` fixed beside an `h_next`)."""
        proposed = propose_spec(inputs, outputs) or {"feedback": {}}
        given = {**{i: "held fixed" for i in self.fixed}, **{i: "a constant" for i in self.constants},
                 **{i: "read from data at each step" for i in self.per_step}}
        return [f"output '{o}' looks like the next value of input '{i}', which the spec has {given[i]}; if it is "
                f"a state, feed it back (\"feedback\": {{\"{o}\": \"{i}\"}})"
                for o, i in proposed["feedback"].items()
                if o not in self.feedback and i in given
                and any(not t.isdigit() for t in _tokens(o) & _tokens(i))]  # a name, not 'input_2' / 'act_2'

    def compared_states(self) -> dict[str, str]:
        """Trajectory outputs that are fed back -> the contexts key of their state's first value: their
        steps are kept, each the size of that state."""
        return {o: self.initial[self.feedback[o]] for o in self.trajectory
                if o in self.feedback and self.feedback[o] in self.initial}

    def check_names(self, model: Any, where: str) -> None:
        """The inputs and outputs the spec names exist in the ONNX `model` (a ModelProto): checked before
        the contexts are read (a feedback pair to a missing input was reported as an array missing from
        the contexts file), and an input that has a default (an initializer of its name) is said so."""
        graph = model.graph
        defaults = {t.name for t in graph.initializer}
        inputs = [i.name for i in graph.input]
        outputs = [o.name for o in graph.output]
        for name in [*self.feedback.values(), *self.per_step, *self.fixed, *self.constants]:
            if name in defaults and name in inputs:
                raise TqsError(f"{where}: input '{name}' has a default value (an initializer of its name), which ONNX "
                               "Runtime feeds itself: the rollout cannot feed it; remove that initializer (or the input)")
            if name not in inputs:
                free = [i for i in inputs if i not in defaults]
                raise TqsError(f"{where}: rollout spec names input '{name}' the model does not have "
                               f"(inputs: {', '.join(free) or 'none'})")
        self._check_outputs(outputs, where)

    def _check_outputs(self, outputs: list[str] | dict[str, tuple], where: str) -> None:
        for name in [*self.feedback, *self.trajectory, *self.truth, *self.channel_axis]:
            if name not in outputs:
                raise TqsError(f"{where}: rollout spec names output '{name}' the model does not have "
                               f"(outputs: {', '.join(outputs)})")

    def check_against(self, inputs: dict[str, tuple], outputs: dict[str, tuple], where: str) -> None:
        """Every model input covered exactly once; named outputs exist; feedback shapes agree."""
        sources = [*self.feedback.values(), *self.per_step, *self.fixed, *self.constants]
        for name in set(sources) - set(inputs):
            raise TqsError(f"{where}: rollout spec names input '{name}' the model does not have "
                           f"(inputs: {', '.join(inputs)})")
        self._check_outputs(outputs, where)
        for name in set(self.initial) - set(self.feedback.values()):
            raise TqsError(f"{where}: rollout spec gives an initial state for '{name}', which is not a fed-back "
                           f"input (feedback inputs: {', '.join(self.feedback.values()) or 'none'})")
        for name, axis in self.channel_axis.items():
            rank = len(outputs[name][0])
            if rank and not -rank <= axis < rank:
                raise TqsError(f"{where}: channel_axis {axis} of output '{name}' is outside its {rank} axes")
        dup = {n for n in sources if sources.count(n) > 1}
        if dup:
            raise TqsError(f"{where}: inputs {sorted(dup)} are given more than once in the rollout spec")
        missing = set(inputs) - set(sources)
        if missing:
            raise TqsError(f"{where}: rollout spec does not say how to feed inputs {sorted(missing)}")
        for inp, value in self.constants.items():
            shape, given = inputs[inp][0], np.shape(value)
            if np.size(value) != 1 and not shapes_compatible(given, shape):
                raise TqsError(f"{where}: constant '{inp}' has shape {list(given)}, the input takes {list(shape)} "
                               "(a single number fills any shape)")
        for out, inp in self.feedback.items():
            (s_out, t_out), (s_in, t_in) = outputs[out], inputs[inp]
            if t_out != t_in or not shapes_compatible(s_out, s_in):
                raise TqsError(f"{where}: feedback '{out}' {t_out}{list(s_out)} does not fit input "
                               f"'{inp}' {t_in}{list(s_in)}")


def _integer(value: Any) -> int | None:
    """An integer given as a number or a string of one; None for anything else (2.7, true, 'abc')."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        return int(value)
    return None


def shapes_compatible(a: tuple, b: tuple) -> bool:
    """Same rank and no fixed dimension that differs. ORT reports an input or output of unknown rank
    as () like a scalar: () fits any shape here, and a real scalar fed another shape fails in ORT's
    first run, which the rollout turns into a one-line error."""
    if not a or not b:
        return True
    if len(a) != len(b):
        return False
    return all(not isinstance(x, int) or not isinstance(y, int) or x == y for x, y in zip(a, b))


@dataclass
class Contexts:
    """Starting states and per-step data: arrays with a leading context axis S."""

    arrays: dict[str, np.ndarray]
    count: int

    @classmethod
    def load(cls, path: str | os.PathLike, spec: RolloutSpec, horizon: int | None = None) -> "Contexts":
        """The arrays the spec names; `horizon`: the steps the rollout will take (the spec's by default),
        for the memory check."""
        path = Path(path)
        regular_file(path, "contexts file")
        named = {*spec.initial.values(), *spec.per_step.values(), *spec.fixed.values(), *spec.truth.values()}
        # Only the arrays the spec names are read, each after its .npy header says what it holds: a 4 MB
        # file of zeros declaring a 17 GB array it did not need took that much memory before any check.
        headers = _npz_headers(path)
        big = sum(h[2] for k, h in headers.items() if k in named and h is not None)
        # and the trajectories of the compared states they start (Rollout.check_memory sizes every
        # compared output exactly later)
        steps = horizon or spec.horizon
        states = sum(headers[k][2] for k in set(spec.compared_states().values()) if headers.get(k) is not None)
        budget = int(MEMORY_SHARE * _memory_bytes())
        if budget and big + states * steps > budget:
            worst = max((k for k in headers if k in named and headers[k] is not None), key=lambda k: headers[k][2])
            raise TqsError(f"{path}: the arrays the rollout spec names hold {big / 2**30:.1f} GiB ('{worst}' "
                           f"{list(headers[worst][0])} {headers[worst][1]}), and the states' trajectories over "
                           f"{steps} steps {states * steps / 2**30:.1f} GiB more: more than this "
                           "machine's memory allows; use fewer contexts or a shorter horizon")
        arrays: dict[str, np.ndarray] = {}
        try:
            with np.load(path, allow_pickle=False) as z:
                for k in z.files:
                    if k not in named:
                        continue  # an extra member the spec never reads (provenance notes and the like)
                    if headers.get(k) is None:
                        raise TqsError(f"{path}: member '{k}' is not a numpy array (.npy)")
                    if headers[k][1].hasobject:
                        raise TqsError(f"{path}: member '{k}' holds Python objects (pickled), which are never "
                                       "loaded; save numeric arrays")
                    arrays[k] = z[k]
        except TqsError:
            raise
        except Exception as exc:
            raise TqsError(f"{path}: not a readable .npz contexts file ({first_line(exc, 120)})") from None
        return cls.from_arrays(arrays, spec, str(path), members=list(headers))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], spec: RolloutSpec, where: str = "contexts",
                    members: list[str] | None = None) -> "Contexts":
        """`members`: every name the file holds, read or not (for the message naming a missing one)."""
        needed = [*spec.initial.values(), *spec.per_step.values(), *spec.fixed.values()]
        for key in needed:
            if key not in arrays:
                has = members if members is not None else list(arrays)
                raise TqsError(f"{where}: missing array '{key}' named by the rollout spec "
                               f"(has: {', '.join(has) or 'nothing'})")
        if not needed:
            raise TqsError(f"{where}: the rollout spec reads no array from the contexts (every input is fed back "
                           "or a constant), so there is nothing to count contexts by: read at least one input from it ('initial', "
                           "'per_step' or 'fixed')")
        counts = {arrays[k].shape[0] if arrays[k].ndim else -1 for k in needed}
        if len(counts) != 1 or -1 in counts:
            sizes = ", ".join(f"'{k}' {arrays[k].shape[0] if arrays[k].ndim else 'a scalar'}" for k in dict.fromkeys(needed))
            raise TqsError(f"{where}: arrays disagree on the number of contexts, their leading axis ({sizes})")
        count = counts.pop() if needed else 1
        if count < 1:
            raise TqsError(f"{where}: no contexts (the arrays' leading axis is 0)")
        for inp, key in spec.per_step.items():
            if arrays[key].ndim < 2 or arrays[key].shape[1] < spec.horizon:
                have = f"shape {list(arrays[key].shape)}" if arrays[key].ndim else "a scalar"
                raise TqsError(f"{where}: per-step array '{key}' needs shape (S, T>={spec.horizon}, ...), "
                               f"it has {have}")
        return cls(arrays, count)

    def subset(self, index: slice | list[int]) -> "Contexts":
        arrays = {k: v[index] if v.ndim else v for k, v in self.arrays.items()}
        n = len(range(self.count)[index]) if isinstance(index, slice) else len(index)
        return Contexts(arrays, n)


def regular_file(path: Path, what: str) -> None:
    """Refuse anything but a regular file before reading it (a FIFO hung the reader for ever, and
    /dev/zero as a spec grew by a GB a second)."""
    if not path.exists():
        raise TqsError(f"{path}: cannot read {what} (no such file)")
    if not path.is_file():
        raise TqsError(f"{path}: cannot read {what} (not a regular file: a folder, a FIFO or a device)")


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype, int] | None]:
    """Each member of an .npz: (shape, dtype, bytes) from its .npy header, None for a member that is not
    .npy; nothing is decompressed past the headers."""
    import zipfile

    out: dict[str, tuple[tuple[int, ...], np.dtype, int] | None] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if not info.filename.endswith(".npy"):
                    out[name] = None
                    continue
                with zf.open(info) as f:
                    try:
                        version = np.lib.format.read_magic(f)
                        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                            np.lib.format.read_array_header_2_0
                        shape, _, dtype = read(f)
                    except Exception:
                        out[name] = None
                        continue
                out[name] = (tuple(shape), dtype, math.prod(shape) * dtype.itemsize)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise TqsError(f"{path}: not a readable .npz contexts file ({first_line(exc, 120)})") from None
    return out


MEMORY_SHARE = 0.6  # of this machine's memory the contexts and the kept trajectories may take


def _memory_bytes() -> int:
    """This machine's physical memory (0 where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return 0


class Rollout:
    """Steps one ORT session: feedback outputs become the next step's inputs, on the session's device.

    Inputs, weights and fed-back states are bound as device OrtValues through IOBinding, so a
    feedback state never leaves the device between steps; only trajectory outputs come to the host.
    """

    def __init__(self, session, spec: RolloutSpec, contexts: Contexts, device, where: str = "model",
                 divergence: dict[str, tuple[str, str]] | None = None):
        """`divergence`: trajectory output -> (reference input, squared-divergence output) that the
        session's graph computes (`passes.divergence.AddDivergenceOutputs`), used by `divergences`."""
        self.session = session
        self.divergence = dict(divergence or {})
        self.spec = spec
        self.contexts = contexts
        self.device = device
        self.inputs = {i.name: (tuple(i.shape), i.type) for i in session.get_inputs()}
        self.outputs = {o.name: (tuple(o.shape), o.type) for o in session.get_outputs()}
        self.fetch = list(dict.fromkeys([*spec.trajectory, *spec.feedback]))
        self.forward_passes = 0
        self.where = where
        self._run_options = None
        self._pending: list = []
        self._reuse_ok = True  # output buffers reused across steps until a run refuses them
        self._check_contexts(where)

    @property
    def async_steps(self) -> bool:
        """Steps return once queued on the device, without waiting for it. Only for sessions on the
        shared CUDA stream (`runtime.cuda_stream`), where whatever runs next on it runs after them;
        reads to the host go through `synchronize()` or a session run that waits."""
        return self._run_options is not None

    @async_steps.setter
    def async_steps(self, on: bool) -> None:
        if on:
            from tqs_onnx.runtime import _ort

            self._run_options = _ort().RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        else:
            self.synchronize()
            self._run_options = None

    def synchronize(self) -> None:
        """Wait for the steps queued without waiting."""
        while self._pending:
            self._pending.pop().synchronize_outputs()

    def check_memory(self, horizon: int, share: float = MEMORY_SHARE) -> None:
        """Refuse, before rolling out, trajectories that could not be held: every context's `horizon`
        steps of the trajectory outputs (sized from the fed-back states, else the outputs' fixed shapes),
        with the contexts themselves, against this machine's memory (67 million contexts of 64 bytes,
        4 GiB, went on to roll out 17 GiB of trajectories on a 24 GiB machine)."""
        per_step = 0
        states = self.spec.compared_states()
        for out in self.spec.trajectory:
            if out in states:
                per_step += self.contexts.arrays[states[out]][0].nbytes
            elif self.outputs.get(out) and all(isinstance(d, int) for d in self.outputs[out][0]):
                per_step += 4 * math.prod(self.outputs[out][0])
        need = per_step * horizon * self.contexts.count + sum(a.nbytes for a in self.contexts.arrays.values())
        have = _memory_bytes()
        if not have:
            return
        if need > share * have:
            raise TqsError(f"{self.where}: {self.contexts.count:,} contexts x {horizon} steps of the trajectory, with "
                           f"the contexts, take {need / 2**30:.1f} GiB, more than this machine's memory allows "
                           f"({have / 2**30:.1f} GiB); shorten the horizon or use fewer contexts")

    def _check_contexts(self, where: str) -> None:
        for inp, key in [*self.spec.initial.items(), *self.spec.fixed.items()]:
            self._check_array(inp, self.contexts.arrays[key], 1, key, where)
        for inp, key in self.spec.per_step.items():
            self._check_array(inp, self.contexts.arrays[key], 2, key, where)

    def _check_array(self, inp: str, arrays: np.ndarray, lead: int, key: str, where: str) -> None:
        """The contexts array fed to `inp`, whose first `lead` axes index contexts (and steps)."""
        a = arrays[(0,) * lead]
        shape, typ = self.inputs[inp]
        if not str(typ).startswith("tensor("):
            raise TqsError(f"{where}: input '{inp}' takes {typ}; a rollout feeds tensors only")
        # a scalar fits an input ORT reports as () (a scalar, or of unknown rank), not one of known rank
        if not shapes_compatible(tuple(a.shape), shape) or (a.ndim == 0 and len(shape) > 0):
            raise TqsError(f"{where}: contexts array '{key}' has per-context shape {list(a.shape)}, "
                           f"input '{inp}' needs {list(shape)}")
        want = ORT_NUMPY_TYPES.get(typ)
        if want is not None and np.dtype(a.dtype).kind != np.dtype(want).kind:
            raise TqsError(f"{where}: contexts array '{key}' is {a.dtype}, input '{inp}' needs {typ}")
        if want is not None and np.dtype(want).kind in "iu" and arrays.size and \
                np.dtype(a.dtype).itemsize > np.dtype(want).itemsize:
            lo, hi, info = arrays.min(), arrays.max(), np.iinfo(want)
            if lo < info.min or hi > info.max:
                raise TqsError(f"{where}: contexts array '{key}' holds values from {lo} to {hi}, beyond "
                               f"{np.dtype(want).name}'s range, and input '{inp}' takes {typ}")
        if want == np.float16 and a.dtype.kind == "f" and a.dtype.itemsize > 2:
            finite = np.abs(arrays[np.isfinite(arrays)])
            if finite.size and finite.max() > np.finfo(np.float16).max:
                raise TqsError(f"{where}: contexts array '{key}' holds values up to {finite.max():.6g}, beyond "
                               f"float16's {np.finfo(np.float16).max:g}, and input '{inp}' takes float16")

    def input_dtype(self, inp: str) -> Any:
        """The numpy type an input is fed with."""
        return ORT_NUMPY_TYPES.get(self.inputs[inp][1], np.float32)

    def initial_feeds(self, s: int) -> dict[str, np.ndarray]:
        """Host arrays of context s for the feedback inputs' first step, the fixed inputs and constants."""
        feeds = {}
        for inp, key in [*self.spec.initial.items(), *self.spec.fixed.items()]:
            feeds[inp] = np.asarray(self.contexts.arrays[key][s], dtype=self.input_dtype(inp), order="C")
        for inp, value in self.spec.constants.items():
            shape = self.inputs[inp][0]
            arr = np.asarray(value, dtype=self.input_dtype(inp))
            if arr.size == 1 and shape:  # one number fills the input's shape (1 along a dynamic axis)
                arr = np.full([d if isinstance(d, int) else 1 for d in shape], arr.item(), arr.dtype)
            feeds[inp] = arr
        return feeds

    def step_feeds(self, s: int, t: int) -> dict[str, np.ndarray]:
        """Host arrays of context s for the per-step (forcing) inputs of step t (0-based)."""
        return {inp: self.contexts.arrays[key][s, t].astype(self.input_dtype(inp))
                for inp, key in self.spec.per_step.items()}

    def steps(self, s: int, weights: dict[str, Any] | None = None, horizon: int | None = None,
              extra: tuple[str, ...] = ()) -> Iterator[dict[str, np.ndarray]]:
        """Yield the trajectory outputs (device OrtValues) of steps 1..horizon for context s, and the
        `extra` outputs too.

        `weights` maps exposed weight inputs to device OrtValues; they stay bound for the rollout.
        """
        keep = [*self.spec.trajectory, *extra]
        for out in self._run_steps(s, weights, horizon, list(dict.fromkeys([*self.fetch, *extra]))):
            yield {k: out[k] for k in keep}

    def divergences(self, s: int, reference: list[dict[str, Any]], weights: dict[str, Any] | None = None,
                    horizon: int | None = None) -> Iterator[float]:
        """Yield, per step, sum_k ||y_k - reference_k||^2 over the trajectory outputs, each term computed
        inside the step's own run (needs `divergence` pairs for every trajectory output); only these
        scalars come to the host. `reference`: per step, trajectory output -> device value."""
        sq = [self.divergence[k][1] for k in self.spec.trajectory]
        fetch = list(dict.fromkeys([*self.spec.feedback, *sq]))

        def bind_reference(binding, t: int) -> None:
            for k in self.spec.trajectory:
                binding.bind_ortvalue_input(self.divergence[k][0], reference[t][k])

        for out in self._run_steps(s, weights, horizon, fetch, bind_reference, host=set(sq), reuse=reuse_outputs()):
            yield float(sum(np.float64(out[n].numpy()) for n in sq))

    def _run_steps(self, s: int, weights: dict[str, Any] | None, horizon: int | None, fetch: list[str],
                   before=None, host: set[str] = frozenset(), reuse: bool = False) -> Iterator[dict[str, Any]]:
        """Run steps 1..horizon of context s; yield each step's fetched outputs (`host`: bound to host
        memory, the rest left on the device). `before(binding, t)` binds extra inputs of step t.

        `reuse`: from step 2 on, outputs go into buffers allocated once, in step 1's shapes (two per
        device output, alternating, so a fed-back state is never written while it is read), instead
        of new ones each run: a yielded value is then valid until the next step only. That saves the
        per-run output binding and allocation (`tools/bench_reuse_outputs.py`). A step that fails with
        reused buffers (an output shape changed) is run again with outputs allocated per run, as are
        all later steps of this Rollout."""
        binding = self.session.io_binding()
        for name, value in (weights or {}).items():
            binding.bind_ortvalue_input(name, value)
        feeds = {k: self.device.to_device(v) for k, v in self.initial_feeds(s).items()}
        buffers: dict[str, list[Any]] | None = None
        reuse = reuse and self._reuse_ok and self._run_options is None
        for t in range(horizon or self.spec.horizon):
            for inp, value in self.step_feeds(s, t).items():
                feeds[inp] = self.device.to_device(value)
            for name, value in feeds.items():
                binding.bind_ortvalue_input(name, value)
            if before is not None:
                before(binding, t)
            if buffers is None:
                self._bind_new_outputs(binding, fetch, host)
            else:
                for o in fetch:
                    binding.bind_ortvalue_output(o, buffers[o][t % len(buffers[o])])
            try:
                self._run(binding, s, t)
            except TqsError:
                if buffers is None:
                    raise
                # A shape changed (or the provider refused the buffers): outputs are allocated per run
                # from here on, in this rollout and the later ones, so a model fails this way once.
                buffers, reuse, self._reuse_ok = None, False, False
                self._bind_new_outputs(binding, fetch, host)
                self._run(binding, s, t)
            if buffers is None:
                out = dict(zip(fetch, binding.get_outputs()))
                if reuse:
                    buffers = self._output_buffers(out, host)
                    reuse = buffers is not None
            else:
                out = {o: buffers[o][t % len(buffers[o])] for o in fetch}
            for o, inp in self.spec.feedback.items():
                feeds[inp] = out[o]
            yield out

    def _bind_new_outputs(self, binding, fetch: list[str], host: set[str]) -> None:
        # Rebound every run: a pre-bound output fails when the next shape differs.
        binding.clear_binding_outputs()
        for o in fetch:
            binding.bind_output(o, "cpu" if o in host else self.device.kind)

    def _run(self, binding, s: int, t: int) -> None:
        try:
            self.session.run_with_iobinding(binding, self._run_options)
        except Exception as exc:  # ORT: a shape or value the graph cannot take
            raise TqsError(f"{self.where}: ONNX Runtime fails at step {t + 1} (of 1..horizon) of context {s} "
                           f"(of 0..{self.contexts.count - 1}): "
                           f"{first_line(exc)}") from None
        self.forward_passes += 1
        if self._run_options is not None and binding not in self._pending:
            self._pending.append(binding)

    def _output_buffers(self, out: dict[str, Any], host: set[str]) -> dict[str, list[Any]] | None:
        """Buffers shaped like this step's outputs: one per host output, two per device output; None
        when an output's element type has no numpy equivalent."""
        from tqs_onnx.runtime import _ort

        make = _ort().OrtValue.ortvalue_from_shape_and_type
        buffers = {}
        for o, value in out.items():
            dtype = ORT_NUMPY_TYPES.get(value.data_type())
            if dtype is None:
                return None
            where = "cpu" if o in host else self.device.kind
            buffers[o] = [make(list(value.shape()), dtype, where, 0) for _ in range(1 if o in host else 2)]
        return buffers

    def trajectory(self, s: int, weights: dict[str, Any] | None = None,
                   horizon: int | None = None) -> list[dict[str, Any]]:
        """Trajectory outputs per step, left on the device."""
        return list(self.steps(s, weights, horizon))

    def trajectory_host(self, s: int, weights: dict[str, Any] | None = None, horizon: int | None = None,
                        watch: dict[str, list[int]] | None = None) -> list[dict[str, np.ndarray]]:
        """The trajectory outputs of context s on the host, step by step. `watch`: output -> [count of
        non-finite values, first step (1-based) with one], updated for every output it names, those the
        spec follows and the others (a diagnostic no spec follows is computed all the same and may be
        NaN)."""
        watch = watch or {}
        extra = tuple(o for o in watch if o not in self.spec.trajectory)
        steps = []
        for t, step in enumerate(self.steps(s, weights, horizon, extra), 1):
            self.synchronize()
            host = {k: v.numpy() for k, v in step.items()}
            for o in watch:
                bad = int(np.size(host[o]) - np.count_nonzero(np.isfinite(host[o])))
                if bad:  # the first step over every context (context 0's was reported for all)
                    watch[o][0] += bad
                    watch[o][1] = min(watch[o][1], t) if watch[o][1] else t
            steps.append({k: host[k] for k in self.spec.trajectory})
        return steps


def reuse_outputs() -> bool:
    """TQS_REUSE_OUTPUTS: 'on' (the default: a rollout's steps write into buffers allocated once, see
    `Rollout._run_steps`) or 'off' (outputs allocated per run, as before the seventh session; kept for
    comparison, `tools/bench_sweep.py --compare-reuse`). Scores are identical either way."""
    return setting("TQS_REUSE_OUTPUTS") == "on"


def _same_shape(a: tuple, b: tuple) -> bool:
    """Equal rank and dims; a named (dynamic) dim only matches the same name, never a fixed size."""
    return len(a) == len(b) and all(x == y for x, y in zip(a, b))


# Name tokens of recurrent states (after _tokens: hn -> h, cn -> c).
_STATE_WORDS = {"h", "c", "hx", "cx", "state", "states", "hidden", "cell", "cache", "caches", "mem", "mems",
                "memory", "carry", "buf", "buffer", "buffers", "past", "present"}


def _kv_pair(out: str, inp: str) -> bool:
    """A decoder's key/value cache: `present*` fed back to `past*` (present_key -> past_key, Hugging
    Face's present.0.key -> past_key_values.0.key)."""
    return "present" in _tokens(out) and "past" in _tokens(inp)


def _grows(a: tuple, b: tuple) -> bool:
    """Equal rank, fixed dims equal, and the others named (a cache growing along its 'past' axis)."""
    return len(a) == len(b) and all(x == y or (isinstance(x, str) and isinstance(y, str)) for x, y in zip(a, b))


def _tokens(name: str) -> set[str]:
    """Lower-case words and numbers of a name (state1 -> state, 1; h0 -> h, 0)."""
    words = set(re.findall(r"[a-z]+|[0-9]+", name.lower())) - {"in", "out", "input", "output", "inputs", "outputs",
                                                                "next", "new"}
    return words | {w.rstrip("n") for w in words if len(w) <= 3}  # hn -> h, cn -> c


def propose_spec(inputs: dict[str, tuple], outputs: dict[str, tuple]) -> dict[str, Any] | None:
    """A spec for models whose outputs match inputs in shape and dtype.

    Candidates must agree exactly (a dynamic dim never pairs with a fixed one) and be tensors; the
    pairs sharing most name tokens are made first, over all outputs (h_out -> h and c_out -> c, whatever
    the outputs' order; state_0_out -> state_0_in), then the rest in order, but for an output and an
    input named apart where other names pair.
    """
    pairs = [(len(_tokens(i) & _tokens(out)) + _kv_pair(out, i), -a, -b, out, i)
             for a, (out, (shape, typ)) in enumerate(outputs.items())
             for b, (i, (s, t)) in enumerate(inputs.items())
             if t == typ and typ not in (None, "?") and (_same_shape(tuple(s), tuple(shape)) or
                                                         _kv_pair(out, i) and _grows(tuple(s), tuple(shape)))]
    # Where names pair some output with an input, two named apart by words are not paired for their
    # shape alone (a GNN's 'discharge' diagnostic was proposed as the next 'rain' beside h_next -> h);
    # names without such a word ('output' -> 'input', y -> x) still pair by shape.
    named = any(shared for shared, *_ in pairs)

    def worded(name: str) -> bool:
        return any(len(t) >= 3 and t.isalpha() for t in _tokens(name))

    feedback: dict[str, str] = {}
    for shared, _, _, out, i in sorted(pairs, reverse=True):
        if named and not shared and worded(out) and worded(i):
            continue
        if out not in feedback and i not in feedback.values():
            feedback[out] = i
    if not feedback:
        return None
    feedback = {o: feedback[o] for o in outputs if o in feedback}  # in the outputs' order
    free = {i: v for i, v in inputs.items() if i not in feedback.values()}
    # The trajectory is the forecast, not a recurrent state: the fed-back outputs not named like one
    # (x_next -> x, but not h_next -> h), else the outputs not fed back (a VAD's probability), else all.
    # Integer outputs (a step counter, a class label) no weight moves smoothly: not proposed.
    floats = [o for o in outputs if any(k in str(outputs[o][1]) for k in ("float", "double"))]
    forecast = [o for o in feedback if o in floats and not (_tokens(o) | _tokens(feedback[o])) & _STATE_WORDS]
    others = [o for o in floats if o not in feedback]
    states = [o for o in feedback if o in floats]
    trajectory = forecast or others or [o for o in states if not _kv_pair(o, feedback[o])] or states or list(feedback)
    return {"horizon": 10, "feedback": feedback, "trajectory": trajectory,
            "initial": {i: i for i in feedback.values()}, "per_step": {i: i for i in free},
            "fixed": {}, "constants": {}, "truth": {}, "channel_axis": {o: _channel_guess(outputs[o][0]) for o in trajectory}}


def _channel_guess(shape) -> int:
    """A grid's channels are axis 1 (N, C, H, W) or (N, C, D, H, W), as ONNX's Conv lays them out; else
    the last axis (N, T, C) or (N, C). A guess, for the user to edit."""
    return 1 if len(tuple(shape)) in (4, 5) else -1

