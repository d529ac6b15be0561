"""Build the bundled demo model: a residual-MLP forecaster of the Lorenz-96 system.

What it writes (next to this file unless ``--out-dir`` is given):

* ``lorenz96_mlp.onnx`` -- one forecast step ``x_next = x + f(x)`` on the raw
  state (N=40, F=8, one step = 0.05 time units), input ``"x"`` float32 [1, 40],
  output ``"x_next"`` float32 [1, 40].  ``f`` normalises the state (Sub/Div),
  runs Linear(40->128) -> tanh -> Linear(128->128) -> tanh -> Linear(128->40)
  and rescales the increment (Mul).  Linear layers are MatMul + Add with
  weights stored pre-transposed (in, out) and torch-style names, as in
  vendors' torch exports.  Opset 17, IR version 9.
* ``lorenz96_mlp.rollout.json`` -- the rollout spec (horizon 20).
* ``lorenz96_sweep.npz`` -- 8 contexts for sensitivity sweeps.
* ``lorenz96_eval.npz`` -- 8 other contexts, from a later segment of the same
  held-out attractor trajectory, for evaluation only.

Each npz holds ``x0`` float32 (S, 1, 40) and ``truth`` float32 (S, 100, 1, 40),
the true Lorenz-96 states after steps 1..100.

Everything is seeded (numpy only, hand-written backprop + Adam) and runs on CPU
in well under a minute.  Rerun with::

    python models/build_demo.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

if __name__ == "__main__":
    # One BLAS thread, set before numpy loads: the matrices are small, and multi-threaded
    # OpenBLAS slowed training ~20x when another process was busy on the same 2 cores.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

# --- Problem and training constants -------------------------------------------------

N_VARS = 40  # Lorenz-96 variables
FORCING = 8.0  # F
DT = 0.01  # RK4 step
SUBSTEPS = 5  # RK4 substeps per model step (0.05 time units)
SPINUP_STEPS = 400  # model steps (20 time units) to reach the attractor
HIDDEN = 128

N_TRAIN_TRAJ, N_VAL_TRAJ, TRAJ_LEN = 256, 32, 200  # trajectories x model steps
BATCH = 256
TRAIN_STEPS = 14000
LR_MAX, LR_MIN = 5e-3, 1e-5

N_CONTEXTS = 8  # per contexts file
TRUTH_STEPS = 100  # T in the contexts files
CONTEXT_SPACING = 200  # model steps between context start points (about 16 Lyapunov times)
SEGMENT_GAP = 1000  # model steps between the sweep segment and the eval segment
HORIZON = 20  # rollout spec horizon (the brief said 50; the committed spec and README use 20)
STABILITY_STEPS = 200  # closed-loop steps that must stay finite and bounded

SEED = 20240917
OPSET = 17
IR_VERSION = 9  # onnxruntime 1.31 loads at most IR 13; onnx 1.23 writes 14 by default

ONNX_NAME = "lorenz96_mlp.onnx"
SPEC_NAME = "lorenz96_mlp.rollout.json"
SWEEP_NAME = "lorenz96_sweep.npz"
EVAL_NAME = "lorenz96_eval.npz"


# --- Lorenz-96 simulation -----------------------------------------------------------


def l96_tendency(x: np.ndarray, forcing: float = FORCING) -> np.ndarray:
    """dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F, cyclic, along the last axis."""
    return (np.roll(x, -1, axis=-1) - np.roll(x, 2, axis=-1)) * np.roll(x, 1, axis=-1) - x + forcing


def rk4_step(x: np.ndarray, dt: float = DT) -> np.ndarray:
    """One classical Runge-Kutta-4 step of Lorenz-96 (any leading batch shape)."""
    k1 = l96_tendency(x)
    k2 = l96_tendency(x + 0.5 * dt * k1)
    k3 = l96_tendency(x + 0.5 * dt * k2)
    k4 = l96_tendency(x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def model_step(x: np.ndarray) -> np.ndarray:
    """Advance the true system by one model step (SUBSTEPS RK4 steps, 0.05 time units)."""
    for _ in range(SUBSTEPS):
        x = rk4_step(x)
    return x


def simulate(x0: np.ndarray, n_steps: int) -> np.ndarray:
    """States after model steps 1..n_steps from x0 (B, N): returns (B, n_steps, N) float64."""
    out = np.empty((x0.shape[0], n_steps, x0.shape[-1]))
    x = x0.astype(np.float64)
    for t in range(n_steps):
        x = model_step(x)
        out[:, t] = x
    return out


def attractor_states(rng: np.random.Generator, n: int) -> np.ndarray:
    """n independent states on the attractor: random perturbations of x=F, spun up. (n, N) float64."""
    x0 = FORCING + rng.standard_normal((n, N_VARS))
    return simulate(x0, SPINUP_STEPS)[:, -1]


def make_trajectories(rng: np.random.Generator, n_traj: int, length: int) -> np.ndarray:
    """n_traj attractor trajectories of length+1 states each (initial state included). (n_traj, length+1, N)."""
    x0 = attractor_states(rng, n_traj)
    return np.concatenate([x0[:, None], simulate(x0, length)], axis=1)


def one_step_pairs(traj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten trajectories (B, L+1, N) into float32 one-step pairs (x_t, x_{t+1}), each (B*L, N)."""
    x = traj[:, :-1].reshape(-1, traj.shape[-1])
    y = traj[:, 1:].reshape(-1, traj.shape[-1])
    return x.astype(np.float32), y.astype(np.float32)


# --- The forecaster -----------------------------------------------------------------


@dataclass
class Forecaster:
    """Residual MLP x_next = x + scale * net((x - mean) / std); weights are (in, out)."""

    mean: np.ndarray  # (N,)
    std: np.ndarray  # (N,)
    scale: np.ndarray  # (N,) std of the one-step increment
    params: dict[str, np.ndarray]  # torch-style names: net.{0,2,4}.{weight,bias}

    def forward(self, x: np.ndarray) -> np.ndarray:
        """float32 forward in the same op order as the ONNX graph; x is (..., N)."""
        p = self.params
        z = (x - self.mean) / self.std
        h = np.tanh(z @ p["net.0.weight"] + p["net.0.bias"])
        h = np.tanh(h @ p["net.2.weight"] + p["net.2.bias"])
        out = h @ p["net.4.weight"] + p["net.4.bias"]
        return x + out * self.scale


LAYERS = ("net.0", "net.2", "net.4")


def init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """torch.nn.Linear default init (uniform +-1/sqrt(fan_in)), weights stored (in, out)."""
    sizes = ((N_VARS, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, N_VARS))
    params: dict[str, np.ndarray] = {}
    for name, (fan_in, fan_out) in zip(LAYERS, sizes):
        bound = 1.0 / np.sqrt(fan_in)
        params[f"{name}.weight"] = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        params[f"{name}.bias"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return params


def loss_and_grads(
    params: dict[str, np.ndarray], z: np.ndarray, target: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """MSE between net(z) and target (normalised increments) and its gradients, by hand."""
    w0, b0 = params["net.0.weight"], params["net.0.bias"]
    w1, b1 = params["net.2.weight"], params["net.2.bias"]
    w2, b2 = params["net.4.weight"], params["net.4.bias"]
    h1 = np.tanh(z @ w0 + b0)
    h2 = np.tanh(h1 @ w1 + b1)
    err = h2 @ w2 + b2 - target
    loss = float(np.mean(err * err))
    g_out = (2.0 / err.size) * err
    g_a2 = (g_out @ w2.T) * (1.0 - h2 * h2)
    g_a1 = (g_a2 @ w1.T) * (1.0 - h1 * h1)
    grads = {
        "net.4.weight": h2.T @ g_out,
        "net.4.bias": g_out.sum(axis=0),
        "net.2.weight": h1.T @ g_a2,
        "net.2.bias": g_a2.sum(axis=0),
        "net.0.weight": z.T @ g_a1,
        "net.0.bias": g_a1.sum(axis=0),
    }
    return loss, grads


class Adam:
    """Adam optimiser over a dict of float32 arrays, updated in place."""

    def __init__(self, params: dict[str, np.ndarray], b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.params, self.b1, self.b2, self.eps, self.t = params, b1, b2, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        """Apply one bias-corrected Adam update with learning rate lr."""
        self.t += 1
        c1, c2 = 1.0 - self.b1**self.t, 1.0 - self.b2**self.t
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1.0 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1.0 - self.b2) * g * g
            self.params[k] -= (lr / c1) * self.m[k] / (np.sqrt(self.v[k] / c2) + self.eps)


def cosine_lr(step: int, total: int) -> float:
    """Cosine decay from LR_MAX to LR_MIN over total steps."""
    return LR_MIN + 0.5 * (LR_MAX - LR_MIN) * (1.0 + np.cos(np.pi * step / total))


def shifted_batches(rng: np.random.Generator, n: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (sample indices, cyclic shifts) batches; the shifts use Lorenz-96's translation symmetry."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield order[start : start + batch], rng.integers(0, N_VARS, batch)


def roll_rows(a: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Cyclically shift each row a[i] by shifts[i] along the last axis."""
    cols = (np.arange(a.shape[-1])[None, :] - shifts[:, None]) % a.shape[-1]
    return np.take_along_axis(a, cols, axis=-1)


def train(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    log: Callable[[str], None] = print,
) -> Forecaster:
    """Fit the residual MLP on one-step pairs (x, y) with Adam; returns the float32 model."""
    mean = np.full(N_VARS, x.mean(), np.float32)  # Lorenz-96 is homogeneous: one value per quantity
    std = np.full(N_VARS, x.std(), np.float32)
    scale = np.full(N_VARS, (y - x).std(), np.float32)
    z_all = (x - mean) / std
    t_all = (y - x) / scale
    params = init_params(rng)
    opt = Adam(params)
    batches = shifted_batches(rng, len(x), BATCH)
    running = 0.0
    for step in range(TRAIN_STEPS):
        idx, shifts = next(batches)
        loss, grads = loss_and_grads(params, roll_rows(z_all[idx], shifts), roll_rows(t_all[idx], shifts))
        opt.step(grads, cosine_lr(step, TRAIN_STEPS))
        running = loss if step == 0 else 0.99 * running + 0.01 * loss
        if (step + 1) % 2000 == 0:
            log(f"  step {step + 1:6d}  loss(normalised, EMA) {running:.2e}")
    return Forecaster(mean, std, scale, params)


# --- Metrics ------------------------------------------------------------------------


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference over all elements (computed in float64)."""
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def rollout(model: Forecaster, x0: np.ndarray, n_steps: int) -> np.ndarray:
    """Closed-loop forecast from x0 (S, N): states after steps 1..n_steps, (S, n_steps, N) float32."""
    out = np.empty((x0.shape[0], n_steps, x0.shape[-1]), np.float32)
    x = x0.astype(np.float32)
    for t in range(n_steps):
        x = model.forward(x)
        out[:, t] = x
    return out


def rollout_rmse_by_step(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RMSE over contexts and variables at each step: (S, T, N) x2 -> (T,)."""
    return np.sqrt(np.mean((pred.astype(np.float64) - truth) ** 2, axis=(0, 2)))


# --- Contexts -----------------------------------------------------------------------


def make_contexts(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Sweep and eval contexts from two separate segments of one held-out attractor trajectory.

    Context k of a segment starts CONTEXT_SPACING model steps after context k-1, so the
    truth windows never overlap; the eval segment starts SEGMENT_GAP steps after the
    sweep segment's last truth step.  Returns two dicts {"x0": (S,1,N), "truth": (S,T,1,N)}.
    """
    segment = N_CONTEXTS * CONTEXT_SPACING
    length = 2 * segment + SEGMENT_GAP
    traj = make_trajectories(rng, 1, length)[0]  # (length+1, N)

    def segment_at(offset: int) -> dict[str, np.ndarray]:
        starts = offset + CONTEXT_SPACING * np.arange(N_CONTEXTS)
        windows = starts[:, None] + np.arange(1, TRUTH_STEPS + 1)[None, :]
        return {
            "x0": traj[starts][:, None, :].astype(np.float32),
            "truth": traj[windows][:, :, None, :].astype(np.float32),
        }

    return segment_at(0), segment_at(segment + SEGMENT_GAP)


def rollout_spec() -> dict:
    """The rollout spec for the demo model (the project's JSON format)."""
    return {
        "name": "lorenz96-mlp",
        "horizon": HORIZON,
        "feedback": {"x_next": "x"},
        "trajectory": ["x_next"],
        "initial": {"x": "x0"},
        "per_step": {},
        "fixed": {},
        "constants": {},
        "truth": {"x_next": "truth"},
        "channel_axis": {"x_next": -1},
    }


# --- ONNX export --------------------------------------------------------------------


def build_onnx(model: Forecaster) -> onnx.ModelProto:
    """Export the forecaster as an ONNX graph in the style of a torch export (MatMul + Add)."""
    inits = [
        numpy_helper.from_array(model.mean.astype(np.float32), "x_mean"),
        numpy_helper.from_array(model.std.astype(np.float32), "x_std"),
        numpy_helper.from_array(model.scale.astype(np.float32), "delta_scale"),
    ] + [numpy_helper.from_array(v.astype(np.float32), k) for k, v in model.params.items()]

    nodes: list[onnx.NodeProto] = []

    def node(op: str, scope: str, inputs: list[str]) -> str:
        out = f"{scope}/{op}_output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=f"{scope}/{op}"))
        return out

    h = node("Sub", "", ["x", "x_mean"])
    h = node("Div", "", [h, "x_std"])
    for i, layer in enumerate(LAYERS):
        scope = "/" + layer.replace(".", "/")
        h = node("MatMul", scope, [h, f"{layer}.weight"])
        h = node("Add", scope, [h, f"{layer}.bias"])
        if i < len(LAYERS) - 1:
            h = node("Tanh", f"/net/{int(layer.split('.')[1]) + 1}", [h])
    h = node("Mul", "", [h, "delta_scale"])
    nodes.append(helper.make_node("Add", ["x", h], ["x_next"], name="/Add_1"))

    graph = helper.make_graph(
        nodes,
        "lorenz96_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N_VARS])],
        [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [1, N_VARS])],
        initializer=inits,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="tqs-onnx models/build_demo.py",
        doc_string=(
            f"Lorenz-96 (N={N_VARS}, F={FORCING:g}) one-step forecaster, dt={DT * SUBSTEPS:g}: "
            "x_next = x + delta_scale * MLP((x - x_mean) / x_std)."
        ),
    )
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_with_onnxruntime(proto: onnx.ModelProto, model: Forecaster, states: np.ndarray, atol: float = 1e-5) -> float:
    """Run the model in onnxruntime (CPU) on each state (S, N); assert it matches numpy to atol."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ours = model.forward(states.astype(np.float32))
    theirs = np.concatenate([sess.run(["x_next"], {"x": s[None].astype(np.float32)})[0] for s in states])
    err = float(np.max(np.abs(ours - theirs)))
    if not err <= atol:
        raise AssertionError(f"onnxruntime differs from the numpy forward by {err:.2e} > {atol:.0e}")
    return err


# --- Atomic output ------------------------------------------------------------------


def write_atomic(path: Path, write: Callable[[object], None]) -> None:
    """Call write(file object) on a temp file in path's folder, then os.replace it onto path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are shipped as package data
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_outputs(out_dir: Path, proto: onnx.ModelProto, sweep: dict, evaluation: dict) -> list[Path]:
    """Write the ONNX file, rollout spec and both contexts files atomically; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        ONNX_NAME: lambda f: f.write(proto.SerializeToString()),
        SPEC_NAME: lambda f: f.write((json.dumps(rollout_spec(), indent=2) + "\n").encode()),
        SWEEP_NAME: lambda f: np.savez_compressed(f, **sweep),
        EVAL_NAME: lambda f: np.savez_compressed(f, **evaluation),
    }
    paths = []
    for name, write in files.items():
        write_atomic(out_dir / name, write)
        paths.append(out_dir / name)
    return paths


# --- Driver -------------------------------------------------------------------------


def report_rollout(model: Forecaster, contexts: dict[str, np.ndarray], label: str) -> None:
    """Print closed-loop RMSE vs truth at a few horizons, against persistence and climatology."""
    x0, truth = contexts["x0"][:, 0], contexts["truth"][:, :, 0].astype(np.float64)
    pred = rollout(model, x0, TRUTH_STEPS)
    ours = rollout_rmse_by_step(pred, truth)
    persist = rollout_rmse_by_step(np.repeat(x0[:, None], TRUTH_STEPS, axis=1), truth)
    clim = float(np.sqrt(2.0)) * float(model.std[0])  # RMSE of two independent attractor states
    print(f"{label} closed-loop RMSE vs truth (8 contexts; climatology ~{clim:.2f}):")
    for t in (1, 5, 10, 20, 50, 100):
        print(f"  step {t:3d}: model {ours[t - 1]:.4f}   persistence {persist[t - 1]:.4f}")
    print(f"  mean over steps 1..{HORIZON}: {ours[:HORIZON].mean():.4f}; 1..{TRUTH_STEPS}: {ours.mean():.4f}")


def check_stability(model: Forecaster, x0: np.ndarray, bound: float) -> float:
    """Roll out STABILITY_STEPS steps from x0 (S, N); assert finite and |x| <= bound; return max |x|."""
    pred = rollout(model, x0, STABILITY_STEPS)
    peak = float(np.max(np.abs(pred)))
    if not (np.all(np.isfinite(pred)) and peak <= bound):
        raise AssertionError(f"{STABILITY_STEPS}-step rollout left the attractor (max |x| = {peak:.3g})")
    return peak


def main(argv: list[str] | None = None) -> None:
    """Simulate, train, export and write the demo model files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    rng_train, rng_val, rng_ctx, rng_fit = (
        np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(4)
    )

    train_traj = make_trajectories(rng_train, N_TRAIN_TRAJ, TRAJ_LEN)
    val_traj = make_trajectories(rng_val, N_VAL_TRAJ, TRAJ_LEN)
    sweep, evaluation = make_contexts(rng_ctx)
    x_tr, y_tr = one_step_pairs(train_traj)
    x_va, y_va = one_step_pairs(val_traj)
    print(f"simulated {len(x_tr)} train / {len(x_va)} val pairs in {time.perf_counter() - t_start:.1f} s")

    t_fit = time.perf_counter()
    model = train(rng_fit, x_tr, y_tr)
    print(f"trained {TRAIN_STEPS} Adam steps in {time.perf_counter() - t_fit:.1f} s")

    print(f"one-step RMSE   train {rmse(model.forward(x_tr), y_tr):.4f}   val {rmse(model.forward(x_va), y_va):.4f}")
    print(f"persistence     train {rmse(x_tr, y_tr):.4f}   val {rmse(x_va, y_va):.4f}")
    report_rollout(model, evaluation, "eval")
    report_rollout(model, sweep, "sweep")
    x0_all = np.concatenate([sweep["x0"][:, 0], evaluation["x0"][:, 0], x_va[:: TRAJ_LEN]])
    bound = 2.0 * float(np.max(np.abs(x_tr)))
    peak = check_stability(model, x0_all, bound)
    print(f"{STABILITY_STEPS}-step rollouts from {len(x0_all)} states: finite, max |x| {peak:.2f} (train max {bound / 2:.2f})")

    proto = build_onnx(model)
    err = check_with_onnxruntime(proto, model, np.concatenate([x0_all, x_va[:64]]))
    print(f"onnx checker ok; onnxruntime vs numpy max |diff| {err:.1e}")

    for path in save_outputs(args.out_dir, proto, sweep, evaluation):
        print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
