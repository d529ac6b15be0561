"""Weight perturbations for one block: quantization residual, norm-matched Gaussian, tier values.

All probes are seeded from (seed, block id, probe index) alone, so a resumed or distributed sweep
draws exactly the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from tqs_onnx.quant import apply_tier
from tqs_onnx.tiers import Tier


def quant_residuals(weights: dict[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    """d_theta = Q_b(theta) - theta, symmetric per-tensor b-bit rounding (the paper's probe)."""
    out = {}
    for name, w in weights.items():
        w32 = w.astype(np.float32)
        amax = float(np.max(np.abs(w32))) if w32.size else 0.0
        qmax = 2 ** (bits - 1) - 1
        scale = amax / qmax if amax > 0 else 1.0
        out[name] = (np.clip(np.rint(w32 / scale), -qmax, qmax) * scale - w32).astype(np.float32)
    return out


def frob_norm(deltas: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in deltas.values())))


def gauss_deltas(weights: dict[str, np.ndarray], norm: float, seed: int, block_id: int,
                 probe: int) -> dict[str, np.ndarray]:
    """Isotropic Gaussian over the block with ||d_theta||_F = norm, seeded per (block, probe)."""
    rng = np.random.Generator(np.random.PCG64([seed, block_id, probe]))
    raw = {name: rng.standard_normal(w.shape, dtype=np.float32) for name, w in weights.items()}
    n = frob_norm(raw)
    k = np.float32(norm / n) if n > 0 else np.float32(0)
    return {name: r * k for name, r in raw.items()}


def perturbed(weights: dict[str, np.ndarray], deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: (w.astype(np.float32) + deltas[name]).astype(w.dtype) for name, w in weights.items()}


def tier_values(weights: dict[str, np.ndarray], tier: Tier,
                axes: dict[str, tuple[int | None, int | None]]) -> dict[str, np.ndarray]:
    """The block's weights as the written graph will compute with them at `tier`."""
    return {name: apply_tier(w, tier, *axes[name]) for name, w in weights.items()}
