"""macro_mlp: window-in/window-out MLP forecaster of 8 quarterly US macro series (statsmodels macrodata).

The data ship inside the statsmodels wheel (1959Q1-2009Q3, 203 quarters), so nothing is downloaded.
Growth series are annualised quarterly log-differences (400 * dlog); the T-bill rate and unemployment
enter as levels. The ONNX model maps the window (1, L, V) to the next window (1, L, V) (shifted by one
quarter, prediction appended) and also outputs the one-step prediction (1, V).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import common

NAME = "macro_mlp"
SEED = 2
WINDOW = 4  # one year; longer windows overfit the 166 training quarters (worse held-out error)
GROWTH = ("realgdp", "realcons", "realinv", "realdpi", "cpi", "m1")
LEVELS = ("tbilrate", "unemp")
VARIABLES = GROWTH + LEVELS
TRAIN_END = 170  # quarters [0, 170) train (1959Q2-2001Q3); the last 32 quarters are held out
N_TRAIN_TARGETS = TRAIN_END - WINDOW
RIDGE = 0.1  # L2 penalty on all weights: the data are tiny, so this is a shrunk VAR plus a small MLP
SWEEP_ENDS = np.arange(8, 37, 4)  # index of the first forecast quarter of each context
EVAL_ENDS = np.arange(60, 103, 6)  # later, disjoint windows; 102 is the last end with 100 quarters of truth


def load_series() -> np.ndarray:
    """(202, V) float64: 400*dlog of the growth series and levels of the rates, from 1959Q2."""
    import statsmodels.api as sm

    frame = sm.datasets.macrodata.load_pandas().data
    growth = 400.0 * np.diff(np.log(frame[list(GROWTH)].to_numpy()), axis=0)
    return np.concatenate([growth, frame[list(LEVELS)].to_numpy()[1:]], axis=1)


class MacroMLP(nn.Module):
    """Linear autoregression on the standardised window plus a small MLP correction."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: int = 32) -> None:
        super().__init__()
        n_in = WINDOW * len(VARIABLES)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.linear = nn.Linear(n_in, len(VARIABLES))
        self.mlp = nn.Sequential(
            nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(0.2), nn.Linear(hidden, len(VARIABLES)))

    def predict(self, window: torch.Tensor) -> torch.Tensor:
        """(B, L, V) raw window -> (B, V) raw next quarter."""
        flat = ((window - self.mean) / self.std).flatten(1)
        return (self.linear(flat) + self.mlp(flat)) * self.std + self.mean

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.predict(window)
        return y, torch.cat([window[:, 1:], y.unsqueeze(1)], dim=1)


def windows_and_targets(series: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """All windows (N, L, V) and the quarter after each (N, V)."""
    win = np.lib.stride_tricks.sliding_window_view(series[:-1], WINDOW, axis=0)  # (N, V, L)
    return (torch.from_numpy(np.moveaxis(win, -1, 1).astype(np.float32)),
            torch.from_numpy(series[WINDOW:].astype(np.float32)))


def contexts(series: np.ndarray, ends: np.ndarray) -> dict[str, np.ndarray]:
    """window0 (S, 1, L, V) ending just before each end, truth (S, T, 1, V) for quarters end..end+T-1."""
    window = np.stack([series[e - WINDOW:e] for e in ends])[:, None]
    truth = np.stack([series[e:e + common.HORIZON] for e in ends])[:, :, None]
    return {"window0": window, "truth": truth}


def spec() -> dict[str, Any]:
    """Rollout spec: the shifted window is fed back; the one-step prediction is the trajectory."""
    return {
        "feedback": {"window_next": "window"}, "trajectory": ["y"], "initial": {"window": "window0"},
        "truth": {"y": "truth"}, "channel_axis": {"y": -1},
    }


def one_step_rmse(model: MacroMLP, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Standardised one-step RMSE of the model and of persistence (last quarter of the window)."""
    with torch.no_grad():
        pred = model.predict(x)
    err = ((pred - y) / model.std).numpy()
    pers = ((x[:, -1] - y) / model.std).numpy()
    return float(np.sqrt(np.mean(err**2))), float(np.sqrt(np.mean(pers**2)))


def penalised_loss(model: MacroMLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Standardised MSE plus RIDGE * sum of squared weights (biases free)."""
    mse = torch.mean(((model.predict(x) - y) / model.std) ** 2)
    return mse + RIDGE * sum((p**2).sum() for n, p in model.named_parameters() if n.endswith("weight"))


def build(out_dir: Path = common.ZOO_DIR) -> dict[str, Any]:
    """Train on the first TRAIN_END quarters, export and evaluate; write the four artefacts; return the report."""
    start = time.perf_counter()
    common.seed_everything(SEED)
    series = load_series()
    x, y = windows_and_targets(series)
    model = MacroMLP(series[:TRAIN_END].mean(0), series[:TRAIN_END].std(0))
    loss = common.train(model, lambda idx: penalised_loss(model, x[idx], y[idx]),
                        N_TRAIN_TARGETS, epochs=300, batch=32, lr=3e-3, seed=SEED)
    sweep, ev = contexts(series, SWEEP_ENDS), contexts(series, EVAL_ENDS)
    example = (torch.from_numpy(sweep["window0"][0].astype(np.float32)),)
    onnx_model, paths = common.write_artifacts(
        NAME, model, example, (["window"], ["y", "window_next"]), spec(), {"sweep": sweep, "eval": ev},
        {"seed": str(SEED), "train_loss": f"{loss:.6g}", "variables": ",".join(VARIABLES)}, out_dir)
    truth = ev["truth"]
    std = model.std.numpy().astype(np.float64)
    table, finite = common.evaluate_rollout(paths[0], paths[1], ev, {
        "persistence": np.broadcast_to(ev["window0"][:, :, -1][:, None], truth.shape),
        "climatology": np.broadcast_to(model.mean.numpy().astype(np.float64), truth.shape)}, scale=std)
    one_step = one_step_rmse(model, x[N_TRAIN_TARGETS:], y[N_TRAIN_TARGETS:])
    return common.build_report(NAME, model, loss, one_step, (table, finite), onnx_model, paths, example, start,
                               notes=("RMSE in train-standardised units; rollout contexts lie inside the training "
                                      "span (202 quarters cannot hold 100 quarters of truth after a held-out window)",))
