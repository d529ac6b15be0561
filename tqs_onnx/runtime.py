"""ONNX Runtime sessions: provider choice, quiet logs, device-resident values."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tqs_onnx.errors import TqsError
from tqs_onnx.util import first_line, silenced_output

DEVICES = ("cpu", "cuda", "auto")
# ONNX Runtime's input type strings -> numpy dtypes
ORT_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                   "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
                   "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(int16)": np.int16,
                   "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64}


def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # ORT's warnings are not for our users
    return ort


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True only when the CUDA provider really runs here (onnxruntime-gpu also installs without a GPU)."""
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    try:
        with silenced_output():  # without a GPU both print "Failed to load libcublasLt..." and worse
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            so = ort.SessionOptions()
            so.log_severity_level = 4
            s = ort.InferenceSession(m.SerializeToString(), so, providers=["CUDAExecutionProvider"])
        return "CUDAExecutionProvider" in s.get_providers()
    except Exception:
        return False


@functools.lru_cache(maxsize=1)
def cuda_stream() -> int:
    """One blocking CUDA stream for every sweep session of this process (0 when cudart is not found).

    Sessions that share it run in submission order, so a sweep step need not wait for the device
    before the next is queued (`Rollout.async_steps`); a blocking stream also orders the runtime's
    host copies (on the legacy default stream) after the work queued before them.
    """
    import ctypes

    if not cuda_usable():
        return 0
    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0
    stream = ctypes.c_void_p()
    if lib.cudaStreamCreate(ctypes.byref(stream)) != 0:
        return 0
    return int(stream.value or 0)


@dataclass(frozen=True)
class Device:
    """Where sessions run: ORT provider list plus the OrtValue device name."""

    kind: str  # 'cpu' or 'cuda'

    @property
    def providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.kind == "cuda" else ["CPUExecutionProvider"]

    def to_device(self, array: np.ndarray) -> Any:
        # np.asarray keeps a 0-d array 0-d (np.ascontiguousarray would make it shape (1,)).
        return _ort().OrtValue.ortvalue_from_numpy(np.asarray(array, order="C"), self.kind, 0)


def resolve_device(name: str) -> Device:
    if name not in DEVICES:
        raise TqsError(f"unknown device '{name}' (cpu, cuda, auto)")
    if name == "cuda" and not cuda_usable():
        raise TqsError("--device cuda: the CUDA provider is not usable here (no GPU or no onnxruntime-gpu)")
    if name == "auto":
        return Device("cuda" if cuda_usable() else "cpu")
    return Device(name)


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """A TQS_* setting that takes one of a few lowercase words; unset or empty means the first."""
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise TqsError(f"{name}={value}: expected " + " or ".join(f"'{c}'" for c in choices))
    return value


# Every TQS_* setting that takes one of a few words (the first is the default); README "Engine settings".
ENGINE_SETTINGS: dict[str, tuple[str, ...]] = {
    "TQS_REPLAY": ("auto", "on", "off"),
    "TQS_CUDA_GRAPH": ("on", "off"),
    "TQS_REUSE_OUTPUTS": ("on", "off"),
    "TQS_DIVERGENCE": ("model", "graph"),
    "TQS_GPU_STREAM": ("own", "shared"),
    "TQS_GPU_QUEUE": ("0", "1"),
    "TQS_DETERMINISTIC": ("1", "0"),
}


def setting(name: str) -> str:
    """The value of one of ENGINE_SETTINGS (an unknown value is an error)."""
    return env_choice(name, ENGINE_SETTINGS[name])


def check_settings() -> None:
    """Every engine setting, checked when a command starts, whichever device it runs on."""
    for name in ENGINE_SETTINGS:
        setting(name)
    cuda_options()


def cuda_options() -> dict[str, str]:
    """CUDA provider options. TQS_CUDNN_ALGO_SEARCH (EXHAUSTIVE, ORT's default; HEURISTIC; DEFAULT)
    picks how cuDNN chooses convolution algorithms: EXHAUSTIVE times them in each session, so two
    processes may choose differently and their sums differ in the last digits. TQS_TF32 (0, the default,
    or 1) sets ORT's `use_tf32`: whether float32 MatMul and Conv may round their inputs to TensorFloat-32."""
    options = {}
    search = os.environ.get("TQS_CUDNN_ALGO_SEARCH", "").strip().upper()
    if search and search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        raise TqsError(f"TQS_CUDNN_ALGO_SEARCH={search}: expected EXHAUSTIVE, HEURISTIC or DEFAULT")
    if search:
        options["cudnn_conv_algo_search"] = search
    # ORT's CUDA provider rounds float32 MatMul/Conv inputs to TensorFloat-32 unless told otherwise. That
    # noise swamped the small perturbations the sweep measures: on the small Pangu replica the bf16 tier's
    # damage differed from the CPU's by up to 99.7% and plans at 2x-4x moved 1-4 of 49 blocks; with full
    # float32 the scores agree with the CPU's to 1.3e-3 and the plans are identical, at 1.38x the forward
    # time on the full replica (tools/results/gpu_h100_s5/). TQS_TF32=1 trades that fidelity for speed.
    tf32 = os.environ.get("TQS_TF32", "0").strip() or "0"
    if tf32 not in ("0", "1"):
        raise TqsError(f"TQS_TF32={tf32}: expected 0 (full float32 MatMul/Conv, the default) or 1 (TensorFloat-32)")
    options["use_tf32"] = tf32
    return options


def make_session(model: onnx.ModelProto | bytes | str, device: Device, threads: int = 0, optimize: bool = True,
                 shared_stream: bool = False, cuda_graph: bool = False, config: dict[str, str] | None = None,
                 label: str | None = None):
    """One ORT session; all optimisations on (basic only when `optimize` is False), logging off;
    `config`: session config entries (e.g. session.qdq_matmulnbits_accuracy_level).

    `model` may be a proto, bytes or a path; `label` names it in errors (default: the path).
    `shared_stream`: on CUDA, run on `cuda_stream()`.
    `cuda_graph`: on CUDA, ORT captures each run (per `gpu_graph_id`) as a CUDA graph and replays it;
    every bound input and output must then keep its address from one run to the next.
    """
    ort = _ort()
    so = ort.SessionOptions()
    # Deterministic kernels (TQS_DETERMINISTIC=0 turns them off): on CUDA without them two processes
    # running the same sweep disagreed by up to 1.2e-6 relative; with them they agree to the bit, at no
    # measured cost (tools/results/gpu_h100/determinism.txt).
    so.use_deterministic_compute = setting("TQS_DETERMINISTIC") == "1"
    so.log_severity_level = 4  # failures come back as exceptions, reported in one line
    # Without `optimize`: basic rewrites only (constant folding, no fusion of DequantizeLinear into
    # ORT's own kernels), which stays in memory where a fully unoptimized big model does not.
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    if threads:
        so.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() > 1_800_000_000:
            raise TqsError("model too large to hand to ORT in memory; save it with external data first")
        model = model.SerializeToString()
    providers: list = device.providers
    if device.kind == "cuda":
        options = cuda_options()
        if shared_stream and cuda_stream():
            options["user_compute_stream"] = str(cuda_stream())
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(model, so, providers=providers)
    except Exception as exc:
        name = label or (str(model) if isinstance(model, (str, os.PathLike)) else "the model")
        lowered = _lowered_ir(model, str(exc)) if isinstance(model, (str, os.PathLike)) else None
        if lowered is not None:
            try:
                return ort.InferenceSession(lowered, so, providers=providers)
            except Exception as again:
                exc = again
        raise TqsError(f"{name}: ONNX Runtime cannot load it: {first_line(exc)}") from None


_IR_REFUSED = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")


def _lowered_ir(path: str | os.PathLike, error: str) -> bytes | None:
    """The file's model with its IR version lowered to the newest ORT loads, where ORT refused only that
    version and onnx knows it (onnx >= 1.23 writes IR 14 by default, onnxruntime 1.31 loads 13; sweep
    and apply lower it as they prepare the graph, so eval, gate and pareto do too); None otherwise."""
    refused = _IR_REFUSED.search(error)
    if not refused or int(refused.group(1)) > onnx.IR_VERSION:
        return None
    from tqs_onnx.graph import load_model

    model = load_model(Path(path)).model  # external data read with its checks (inside the model's folder)
    model.ir_version = int(refused.group(2))
    if model.ByteSize() > 1_800_000_000:
        return None
    return model.SerializeToString()


def io_signature(session) -> tuple[dict[str, tuple], dict[str, tuple]]:
    inputs = {i.name: (tuple(i.shape), i.type) for i in session.get_inputs()}
    outputs = {o.name: (tuple(o.shape), o.type) for o in session.get_outputs()}
    return inputs, outputs


def synthetic_feeds(session, dynamic: int = 1) -> dict[str, np.ndarray]:
    """Seeded inputs of the session's shapes (dynamic dims as `dynamic`): floats normal, integers ones."""
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else dynamic for d in i.shape]
        dtype = ORT_NUMPY_TYPES.get(i.type, np.float32)
        feeds[i.name] = (np.random.default_rng(0).standard_normal(shape).astype(dtype)
                         if np.dtype(dtype).kind == "f" else np.ones(shape, dtype))
    return feeds
