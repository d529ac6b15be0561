"""l96_cnn: periodic 1-D convolutional residual net stepping Lorenz-96 forward by dt=0.05."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import common, lorenz96

NAME = "l96_cnn"
SEED = 1
UNROLL = 3  # multi-step loss: one-step-only training drifts off the attractor in long rollouts
TRAIN_TRAJ, TRAIN_STEPS = 16, 1500
SWEEP_SEED, EVAL_SEED = 101, 202  # different initial states from training (seed 0) and from each other


def circular_pad(z: torch.Tensor, p: int) -> torch.Tensor:
    """Periodic padding along the last axis; exports as Slice + Concat."""
    return torch.cat([z[..., -p:], z, z[..., :p]], dim=-1)


class L96CNN(nn.Module):
    """x_next = x + scale * f(x); f has a bilinear first layer because the L96 tendency is quadratic."""

    def __init__(self, mean: float, std: float, step_std: float, width: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("step_std", torch.tensor(step_std, dtype=torch.float32))
        self.width = width
        self.conv_in = nn.Conv1d(1, 3 * width, 5)
        self.conv_mix = nn.Conv1d(2 * width, width, 1)
        self.conv_block = nn.Conv1d(width, width, 3)
        self.conv_out = nn.Conv1d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = ((x - self.mean) / self.std).unsqueeze(1)
        a, b, c = torch.split(self.conv_in(circular_pad(z, 2)), self.width, dim=1)  # static Split, unlike chunk
        h = torch.relu(self.conv_mix(torch.cat([a * b, c], dim=1)))
        h = h + torch.relu(self.conv_block(circular_pad(h, 1)))
        return x + self.conv_out(h).squeeze(1) * self.step_std


def training_windows(traj: np.ndarray) -> torch.Tensor:
    """All (UNROLL+1)-step windows (N, UNROLL+1, K) from trajectories (n, T, K)."""
    win = np.lib.stride_tricks.sliding_window_view(traj, UNROLL + 1, axis=1)  # (n, T-U, K, U+1)
    return torch.from_numpy(np.moveaxis(win, -1, 2).reshape(-1, UNROLL + 1, lorenz96.K).astype(np.float32))


def unrolled_loss(model: L96CNN, windows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean squared error over UNROLL closed-loop steps, in units of the one-step change."""
    w = windows[idx]
    x, loss = w[:, 0], 0.0
    for r in range(1, UNROLL + 1):
        x = model(x)
        loss = loss + torch.mean(((x - w[:, r]) / model.step_std) ** 2)
    return loss / UNROLL


def contexts(seed: int) -> dict[str, np.ndarray]:
    """x0 (S, 1, K) and truth (S, T, 1, K) for states after steps 1..T."""
    traj = lorenz96.simulate(common.N_CONTEXTS, common.HORIZON + 1, seed)
    return {"x0": traj[:, 0, None], "truth": traj[:, 1:, None]}


def spec() -> dict[str, Any]:
    """Rollout spec: the state is fed straight back."""
    return {
        "feedback": {"x_next": "x"}, "trajectory": ["x_next"], "initial": {"x": "x0"},
        "truth": {"x_next": "truth"}, "channel_axis": {"x_next": -1},
    }


def one_step_rmse(model: L96CNN, traj: np.ndarray) -> tuple[float, float]:
    """Held-out one-step RMSE of the model and of persistence on trajectories (n, T, K)."""
    x = torch.from_numpy(traj[:, :-1].reshape(-1, lorenz96.K).astype(np.float32))
    y = traj[:, 1:].reshape(-1, lorenz96.K)
    with torch.no_grad():
        pred = model(x).numpy()
    return float(np.sqrt(np.mean((pred - y) ** 2))), float(np.sqrt(np.mean((x.numpy() - y) ** 2)))


def build(out_dir: Path = common.ZOO_DIR) -> dict[str, Any]:
    """Train, export and evaluate; write the four artefacts; return the report."""
    start = time.perf_counter()
    common.seed_everything(SEED)
    traj = lorenz96.simulate(TRAIN_TRAJ, TRAIN_STEPS, seed=0)
    step_std = float(np.std(traj[:, 1:] - traj[:, :-1]))
    model = L96CNN(float(traj.mean()), float(traj.std()), step_std)
    windows = training_windows(traj)
    loss = common.train(model, lambda idx: unrolled_loss(model, windows, idx), len(windows),
                        epochs=8, batch=256, lr=3e-3, seed=SEED)
    sweep, ev = contexts(SWEEP_SEED), contexts(EVAL_SEED)
    example = (torch.from_numpy(sweep["x0"][0].astype(np.float32)),)
    onnx_model, paths = common.write_artifacts(
        NAME, model, example, (["x"], ["x_next"]), spec(), {"sweep": sweep, "eval": ev},
        {"seed": str(SEED), "train_loss": f"{loss:.6g}"}, out_dir)
    truth = ev["truth"]
    table, finite = common.evaluate_rollout(paths[0], paths[1], ev, {
        "persistence": np.broadcast_to(ev["x0"][:, None], truth.shape),
        "climatology": np.full_like(truth, float(model.mean))})
    held_out = lorenz96.simulate(8, 200, seed=303)
    return common.build_report(NAME, model, loss, one_step_rmse(model, held_out), (table, finite), onnx_model,
                               paths, example, start)
