"""patch_transformer: TimesFM-style decoder-only patch transformer forecasting Lorenz-96.

The context (1, N*P, K) of the last N*P states is cut into N patch tokens of P consecutive states,
embedded linearly with a learned positional embedding, passed through 2 pre-LayerNorm transformer layers
(causal multi-head self-attention + gated GELU MLP) and the last token's head predicts the next patch
(1, P, K). The model also returns the context shifted by one patch with the prediction appended, so
closed-loop feedback is the plain pair context_next -> context.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import common, lorenz96

NAME = "patch_transformer"
SEED = 4
PATCH, N_PATCHES = 2, 8  # a 16-step context (L96 is Markovian); small patches keep truth arrays small
UNROLL = 3  # closed-loop patches in the training loss: one-patch training drifts off the attractor
D_MODEL, HEADS, LAYERS = 64, 4, 2
TRAIN_TRAJ, TRAIN_STEPS = 16, 1500
EPOCHS = 10
SWEEP_SEED, EVAL_SEED = 101, 202
K = lorenz96.K
CONTEXT = PATCH * N_PATCHES


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention written with explicit MatMul/Softmax so the ONNX graph shows them."""

    def __init__(self, d: int, heads: int, n_tokens: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.n = heads, d // heads, n_tokens
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        mask = torch.full((n_tokens, n_tokens), -1e4).triu(1)  # finite: -inf can give NaN after quantisation
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).reshape(-1, self.n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(self.head_dim) + self.mask
        out = torch.softmax(scores, dim=-1) @ qkv[2]  # (B, heads, n, head_dim)
        return self.proj(out.transpose(1, 2).reshape(-1, self.n, self.heads * self.head_dim))


class GatedMLP(nn.Module):
    """GEGLU feed-forward: the product of two projections learns the quadratic L96 coupling much faster."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.value, self.gate, self.out = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.value(x) * nn.functional.gelu(self.gate(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer layer."""

    def __init__(self, d: int, heads: int, n_tokens: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, n_tokens)
        self.mlp = GatedMLP(d, 3 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PatchTransformer(nn.Module):
    """Each token predicts the following patch as increments over its own last state."""

    def __init__(self, mean: float, std: float, step_std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("step_std", torch.tensor(step_std, dtype=torch.float32))
        self.embed = nn.Linear(PATCH * K, D_MODEL)
        self.pos = nn.Parameter(0.02 * torch.randn(N_PATCHES, D_MODEL))
        self.blocks = nn.Sequential(*[Block(D_MODEL, HEADS, N_PATCHES) for _ in range(LAYERS)])
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, PATCH * K)

    def next_patches(self, context: torch.Tensor) -> torch.Tensor:
        """(B, N*P, K) -> the patch after every token, (B, N, P, K)."""
        patches = context.reshape(-1, N_PATCHES, PATCH, K)
        tokens = ((patches - self.mean) / self.std).reshape(-1, N_PATCHES, PATCH * K)
        h = self.ln_f(self.blocks(self.embed(tokens) + self.pos))
        delta = self.head(h).reshape(-1, N_PATCHES, PATCH, K) * self.step_std
        return patches[:, :, -1:] + delta

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch = self.next_patches(context)[:, -1]
        return patch, torch.cat([context[:, PATCH:], patch], dim=1)


def training_windows(traj: np.ndarray, n_future: int = UNROLL, stride: int = 2) -> torch.Tensor:
    """Windows (N, CONTEXT + n_future*PATCH, K): a context and the patches after it.

    The stride thins near-duplicate windows to keep CPU training short.
    """
    length = CONTEXT + n_future * PATCH
    win = np.lib.stride_tricks.sliding_window_view(traj, length, axis=1)[:, ::stride]
    return torch.from_numpy(np.moveaxis(win, -1, 2).reshape(-1, length, K).astype(np.float32))


def unrolled_loss(model: PatchTransformer, windows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Every token's next-patch error, then UNROLL-1 closed-loop patches; in units of the one-step change."""
    w = windows[idx]
    pred = model.next_patches(w[:, :CONTEXT])
    loss = torch.mean(((pred - w[:, PATCH:CONTEXT + PATCH].reshape(pred.shape)) / model.step_std) ** 2)
    patch, context = pred[:, -1], w[:, :CONTEXT]
    for r in range(1, UNROLL):
        context = torch.cat([context[:, PATCH:], patch], dim=1)
        patch = model.next_patches(context)[:, -1]
        target = w[:, CONTEXT + r * PATCH:CONTEXT + (r + 1) * PATCH]
        loss = loss + torch.mean(((patch - target) / model.step_std) ** 2)
    return loss / UNROLL


def contexts(seed: int) -> dict[str, np.ndarray]:
    """context0 (S, 1, N*P, K) and truth (S, T, 1, P, K): the patches that follow, step by step."""
    traj = lorenz96.simulate(common.N_CONTEXTS, CONTEXT + PATCH * common.HORIZON, seed)
    future = traj[:, CONTEXT:].reshape(common.N_CONTEXTS, common.HORIZON, 1, PATCH, K)
    return {"context0": traj[:, None, :CONTEXT], "truth": future}


def spec() -> dict[str, Any]:
    """Rollout spec: the shifted context is fed back; the predicted patches form the trajectory."""
    return {
        "feedback": {"context_next": "context"}, "trajectory": ["patch"], "initial": {"context": "context0"},
        "truth": {"patch": "truth"}, "channel_axis": {"patch": -1},
    }


def one_step_rmse(model: PatchTransformer, traj: np.ndarray) -> tuple[float, float]:
    """Next-patch RMSE of the last token, model vs persistence of the last context state, on (n, T, K)."""
    w = training_windows(traj, n_future=1, stride=PATCH)
    with torch.no_grad():
        pred, _ = model(w[:, :CONTEXT])
    target = w[:, CONTEXT:]
    pers = w[:, CONTEXT - 1:CONTEXT]
    return float(torch.sqrt(torch.mean((pred - target) ** 2))), float(torch.sqrt(torch.mean((pers - target) ** 2)))


def build(out_dir: Path = common.ZOO_DIR) -> dict[str, Any]:
    """Train, export and evaluate; write the four artefacts; return the report."""
    start = time.perf_counter()
    common.seed_everything(SEED)
    traj = lorenz96.simulate(TRAIN_TRAJ, TRAIN_STEPS, seed=0)
    model = PatchTransformer(float(traj.mean()), float(traj.std()), float(np.std(traj[:, 1:] - traj[:, :-1])))
    windows = training_windows(traj)
    loss = common.train(model, lambda idx: unrolled_loss(model, windows, idx), len(windows),
                        epochs=EPOCHS, batch=64, lr=1e-2, seed=SEED, weight_decay=0.01)
    sweep, ev = contexts(SWEEP_SEED), contexts(EVAL_SEED)
    example = (torch.from_numpy(sweep["context0"][0].astype(np.float32)),)
    onnx_model, paths = common.write_artifacts(
        NAME, model, example, (["context"], ["patch", "context_next"]), spec(),
        {"sweep": sweep, "eval": ev}, {"seed": str(SEED), "train_loss": f"{loss:.6g}"}, out_dir)
    truth = ev["truth"]
    table, finite = common.evaluate_rollout(paths[0], paths[1], ev, {
        "persistence": np.broadcast_to(ev["context0"][:, :, -1][:, None, :, None], truth.shape),
        "climatology": np.full_like(truth, float(model.mean))})
    one_step = one_step_rmse(model, lorenz96.simulate(8, 200, seed=303))
    return common.build_report(NAME, model, loss, one_step, (table, finite), onnx_model, paths, example, start,
                               notes=(f"one rollout step = one patch of {PATCH} states (dt={PATCH * lorenz96.DT:g})",))

