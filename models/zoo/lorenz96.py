"""Lorenz-96 simulator (K=40, F=8) sampled every dt=0.05, shared by the Lorenz-96 forecasters."""

from __future__ import annotations

import numpy as np

K = 40
FORCING = 8.0
DT = 0.05
SUBSTEPS = 5  # RK4 at 0.01 internally, so the sampled "truth" is far more accurate than any model
SPINUP_STEPS = 400  # 20 time units: well past the transient onto the attractor


def tendency(x: np.ndarray) -> np.ndarray:
    """dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F along the last axis (periodic)."""
    return (np.roll(x, -1, -1) - np.roll(x, 2, -1)) * np.roll(x, 1, -1) - x + FORCING


def rk4_step(x: np.ndarray, h: float) -> np.ndarray:
    """One classical Runge-Kutta step of size h."""
    k1 = tendency(x)
    k2 = tendency(x + 0.5 * h * k1)
    k3 = tendency(x + 0.5 * h * k2)
    k4 = tendency(x + h * k3)
    return x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


def advance(x: np.ndarray) -> np.ndarray:
    """Advance states (..., K) by one sampling interval DT."""
    for _ in range(SUBSTEPS):
        x = rk4_step(x, DT / SUBSTEPS)
    return x


def simulate(n_traj: int, n_steps: int, seed: int) -> np.ndarray:
    """Trajectories (n_traj, n_steps, K) float64 on the attractor, from seeded random starts."""
    rng = np.random.default_rng(seed)
    x = FORCING + rng.normal(0.0, 1.0, size=(n_traj, K))
    for _ in range(SPINUP_STEPS):
        x = advance(x)
    out = np.empty((n_traj, n_steps, K))
    for t in range(n_steps):
        out[:, t] = x
        x = advance(x)
    return out
