"""lstm_forecaster: single-layer LSTM stepping Lorenz-96 forward by dt=0.05, exported with the ONNX LSTM op.

One call = one time step: inputs x (1, K), h (1, K, H), c (1, K, H) (one LSTM state per grid site);
outputs y (1, K), h_next, c_next.
In closed loop y is fed back as the next x and (h_next, c_next) as (h, c). The initial (h, c) of each
context comes from a teacher-forced warm-up over the WARMUP states preceding x0.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import common, lorenz96

NAME = "lstm_forecaster"
SEED = 3
HIDDEN = 32
FEATURES = 16
WARMUP = 8  # teacher-forced steps that build (h, c) before closed-loop training / rollout
UNROLL = 6  # closed-loop steps in the training loss, for rollout stability
TRAIN_TRAJ, TRAIN_STEPS = 16, 1500
SWEEP_SEED, EVAL_SEED = 101, 202
K = lorenz96.K


def stencils(z: torch.Tensor) -> torch.Tensor:
    """Periodic 5-point neighbourhoods: (..., K) -> (..., K, 5); exports as Slice + Concat."""
    padded = torch.cat([z[..., -2:], z, z[..., :2]], dim=-1)
    return torch.stack([padded[..., j:j + K] for j in range(5)], dim=-1)


class LSTMForecaster(nn.Module):
    """Weight-shared LSTM run at every grid site (the sites form the LSTM batch, like a ConvLSTM).

    Each site sees its 5-point stencil plus learned pairwise products of it (the L96 tendency is
    quadratic) and keeps its own (h, c); y = x + step_std * head(h).
    """

    def __init__(self, mean: float, std: float, step_std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("step_std", torch.tensor(step_std, dtype=torch.float32))
        self.pairs = nn.Linear(5, 2 * FEATURES)
        self.lstm = nn.LSTM(5 + FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def sequence(self, xs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Teacher-forced pass over xs (T, B, K): predictions (T, B, K) and the final (h, c), (1, B*K, H)."""
        st = stencils((xs - self.mean) / self.std)
        a, b = torch.split(self.pairs(st), FEATURES, dim=-1)
        u = torch.cat([st, a * b], dim=-1)
        out, state = self.lstm(u.reshape(xs.shape[0], -1, 5 + FEATURES), state)
        delta = self.head(out).reshape(xs.shape[0], -1, K)
        return xs + delta * self.step_std, state

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, (h_next, c_next) = self.sequence(x.unsqueeze(0), (h, c))
        return y.squeeze(0), h_next, c_next


def training_windows(traj: np.ndarray, stride: int = 3) -> torch.Tensor:
    """Windows (WARMUP + UNROLL + 1, N, K), time-major as nn.LSTM expects; stride thins near-duplicates."""
    length = WARMUP + UNROLL + 1
    win = np.lib.stride_tricks.sliding_window_view(traj, length, axis=1)[:, ::stride]  # (n, N, K, l)
    return torch.from_numpy(np.moveaxis(win, -1, 0).reshape(length, -1, K).astype(np.float32))


def window_loss(model: LSTMForecaster, windows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Teacher-forced one-step error over the warm-up plus closed-loop error over UNROLL further steps."""
    w = windows[:, idx]
    pred, (h, c) = model.sequence(w[:WARMUP])
    loss = torch.mean(((pred - w[1:WARMUP + 1]) / model.step_std) ** 2)
    x = pred[-1]
    for r in range(1, UNROLL):
        x, h, c = model(x, h, c)
        loss = loss + torch.mean(((x - w[WARMUP + r]) / model.step_std) ** 2)
    return loss / UNROLL


def contexts(model: LSTMForecaster, seed: int) -> dict[str, np.ndarray]:
    """x0 (S,1,K), warmed-up h0/c0 (S,1,K,H) and truth (S,T,1,K) for the states after x0."""
    traj = lorenz96.simulate(common.N_CONTEXTS, WARMUP + common.HORIZON + 1, seed)
    with torch.no_grad():
        _, (h, c) = model.sequence(torch.from_numpy(traj[:, :WARMUP].transpose(1, 0, 2).astype(np.float32)))
    def per_context(state: torch.Tensor) -> np.ndarray:
        return state.numpy().reshape(common.N_CONTEXTS, 1, K, HIDDEN)

    return {"x0": traj[:, WARMUP, None], "h0": per_context(h), "c0": per_context(c),
            "truth": traj[:, WARMUP + 1:, None]}


def spec() -> dict[str, Any]:
    """Rollout spec: y -> x and the recurrent state h_next -> h, c_next -> c."""
    return {
        "feedback": {"y": "x", "h_next": "h", "c_next": "c"}, "trajectory": ["y"],
        "initial": {"x": "x0", "h": "h0", "c": "c0"}, "truth": {"y": "truth"}, "channel_axis": {"y": -1},
    }


def one_step_rmse(model: LSTMForecaster, traj: np.ndarray) -> tuple[float, float]:
    """Teacher-forced one-step RMSE after a WARMUP-step burn-in, model vs persistence, on (n, T, K)."""
    xs = torch.from_numpy(traj.transpose(1, 0, 2).astype(np.float32))
    with torch.no_grad():
        pred, _ = model.sequence(xs[:-1])
    err = (pred - xs[1:])[WARMUP:].numpy()
    pers = (xs[:-1] - xs[1:])[WARMUP:].numpy()
    return float(np.sqrt(np.mean(err**2))), float(np.sqrt(np.mean(pers**2)))


def build(out_dir: Path = common.ZOO_DIR) -> dict[str, Any]:
    """Train, export and evaluate; write the four artefacts; return the report."""
    start = time.perf_counter()
    common.seed_everything(SEED)
    traj = lorenz96.simulate(TRAIN_TRAJ, TRAIN_STEPS, seed=0)
    model = LSTMForecaster(float(traj.mean()), float(traj.std()), float(np.std(traj[:, 1:] - traj[:, :-1])))
    windows = training_windows(traj)
    loss = common.train(model, lambda idx: window_loss(model, windows, idx), windows.shape[1],
                        epochs=8, batch=64, lr=3e-3, seed=SEED)
    sweep, ev = contexts(model, SWEEP_SEED), contexts(model, EVAL_SEED)
    example = tuple(torch.from_numpy(sweep[k][0].astype(np.float32)) for k in ("x0", "h0", "c0"))
    onnx_model, paths = common.write_artifacts(
        NAME, model, example, (["x", "h", "c"], ["y", "h_next", "c_next"]), spec(),
        {"sweep": sweep, "eval": ev}, {"seed": str(SEED), "train_loss": f"{loss:.6g}"}, out_dir)
    truth = ev["truth"]
    table, finite = common.evaluate_rollout(paths[0], paths[1], ev, {
        "persistence": np.broadcast_to(ev["x0"][:, None], truth.shape),
        "climatology": np.full_like(truth, float(model.mean))})
    one_step = one_step_rmse(model, lorenz96.simulate(8, 200, seed=303))
    return common.build_report(NAME, model, loss, one_step, (table, finite), onnx_model, paths, example, start)
