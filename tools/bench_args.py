"""Arguments shared by the engine benchmarks that time one model's rollouts (bench_replay,
bench_graph_overhead, bench_reuse_outputs): the model, its rollout spec and contexts, the device, and
how many rotating rounds to time."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_rollout_args(ap: argparse.ArgumentParser, rounds: int) -> None:
    ap.add_argument("model", type=Path)
    ap.add_argument("spec", type=Path, help="rollout spec (JSON)")
    ap.add_argument("contexts", type=Path, help="contexts (.npz)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--rounds", type=int, default=rounds, help=f"rotating rounds to time (default {rounds})")
