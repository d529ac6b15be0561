"""Shared builder plumbing: seeding, training loop, ONNX export, rollout specs, ORT rollouts, metrics."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

ZOO_DIR = Path(__file__).resolve().parent
OPSET = 17
# onnxruntime 1.31 loads IR <= 13 while onnx 1.23 writes 14; nothing here needs more than IR 9.
IR_VERSION = 9
HORIZON = 100
N_CONTEXTS = 8
REPORT_LEADS = (1, 2, 5, 10, 25, 50, 100)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; deterministic single-threaded torch for reproducible CPU training.

    One thread: on the shared 2-core machine extra intra-op threads spin and run several times slower.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def minibatches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering range(n) once."""
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch):
        yield perm[start:start + batch]


def train(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    n_samples: int,
    *,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
) -> float:
    """AdamW with a one-cycle schedule over shuffled minibatches; loss_fn maps an index batch to a loss.

    Returns the mean training loss of the last epoch.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((n_samples + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    last = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in minibatches(n_samples, batch, gen):
            loss = loss_fn(idx)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / count
    model.eval()
    return last


def export_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    metadata: dict[str, str],
) -> onnx.ModelProto:
    """Export with the TorchScript exporter at opset 17, downgrade the IR version, embed metadata, check.

    The dynamo exporter needs onnxscript, which is not part of this environment.
    """
    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module, example, str(path), input_names=input_names, output_names=output_names,
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    model.producer_name = "tqs-onnx models/zoo"
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


def op_types(model: onnx.ModelProto) -> list[str]:
    """Sorted distinct op types of the main graph."""
    return sorted({n.op_type for n in model.graph.node})


def write_spec(name: str, spec: dict[str, Any], out_dir: Path) -> Path:
    """Write NAME.rollout.json with every spec key present (empty dicts where unused)."""
    full = {
        "name": name, "horizon": HORIZON, "feedback": {}, "trajectory": [], "initial": {},
        "per_step": {}, "fixed": {}, "constants": {}, "truth": {}, "channel_axis": {},
    }
    full.update(spec)
    path = out_dir / f"{name}.rollout.json"
    path.write_text(json.dumps(full, indent=2) + "\n")
    return path


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Save float arrays as float32 (the models' dtype), compressed."""
    np.savez_compressed(path, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()})
    return path


def ort_session(path: Path) -> ort.InferenceSession:
    """Single-threaded CPU session: the models are tiny and rollouts are latency bound."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def rollout_onnx(path: Path, spec: dict[str, Any], data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Closed-loop rollout of every context: returns trajectory outputs as (S, horizon, *shape)."""
    sess = ort_session(path)
    out_names = [o.name for o in sess.get_outputs()]
    n_ctx = len(next(iter(data[k] for k in spec["initial"].values())))
    traj: dict[str, list[np.ndarray]] = {name: [] for name in spec["trajectory"]}
    for s in range(n_ctx):
        feeds = {inp: data[key][s] for inp, key in {**spec["initial"], **spec["fixed"]}.items()}
        feeds.update({inp: np.asarray(v, dtype=np.float32) for inp, v in spec["constants"].items()})
        steps: dict[str, list[np.ndarray]] = {name: [] for name in spec["trajectory"]}
        for t in range(spec["horizon"]):
            feeds.update({inp: data[key][s, t] for inp, key in spec["per_step"].items()})
            result = dict(zip(out_names, sess.run(None, feeds)))
            for name in spec["trajectory"]:
                steps[name].append(result[name])
            feeds.update({inp: result[out] for out, inp in spec["feedback"].items()})
        for name in spec["trajectory"]:
            traj[name].append(np.stack(steps[name]))
    return {name: np.stack(v) for name, v in traj.items()}


def rmse_by_lead(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RMSE over contexts and elements for each lead: (S, T, ...) -> (T,)."""
    err = (pred - truth[:, : pred.shape[1]]).reshape(pred.shape[0], pred.shape[1], -1)
    return np.sqrt(np.mean(err**2, axis=(0, 2)))


def lead_table(model_rmse: np.ndarray, baselines: dict[str, np.ndarray]) -> dict[str, dict[int, float]]:
    """Pick REPORT_LEADS out of per-lead RMSE curves for the model and its baselines."""
    curves = {"model": model_rmse, **baselines}
    return {k: {lead: float(v[lead - 1]) for lead in REPORT_LEADS if lead <= len(v)} for k, v in curves.items()}


def file_sizes(paths: list[Path]) -> dict[str, int]:
    """Bytes on disk per artefact name."""
    return {p.name: p.stat().st_size for p in paths}


def check_export(path: Path, module: nn.Module, example: tuple[torch.Tensor, ...]) -> float:
    """Max abs difference between onnxruntime and torch on the export example, over all outputs."""
    sess = ort_session(path)
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), example)}
    with torch.no_grad():
        ref = module(*example)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = sess.run(None, feeds)
    return max(float(np.max(np.abs(g - r.numpy()))) for g, r in zip(got, ref))


def load_spec(path: Path) -> dict[str, Any]:
    """Read a rollout spec back (what consumers will see)."""
    return json.loads(Path(path).read_text())


def write_artifacts(
    name: str,
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    io_names: tuple[list[str], list[str]],
    spec: dict[str, Any],
    contexts: dict[str, dict[str, np.ndarray]],
    metadata: dict[str, str],
    out_dir: Path,
) -> tuple[onnx.ModelProto, list[Path]]:
    """Export NAME.onnx and write NAME.rollout.json plus one NAME_<split>.npz per contexts entry."""
    onnx_path = out_dir / f"{name}.onnx"
    model = export_onnx(module, example, onnx_path, io_names[0], io_names[1], {"name": name, **metadata})
    paths = [onnx_path, write_spec(name, spec, out_dir)]
    paths += [write_npz(out_dir / f"{name}_{split}.npz", arrays) for split, arrays in contexts.items()]
    return model, paths


def evaluate_rollout(
    onnx_path: Path,
    spec_path: Path,
    data: dict[str, np.ndarray],
    baselines: dict[str, np.ndarray],
    scale: np.ndarray | float = 1.0,
) -> tuple[dict[str, dict[int, float]], bool]:
    """Roll out the exported model from the spec and compare its first trajectory output with baselines.

    Errors are divided by scale first (per-variable standardisation where units differ).
    """
    spec = load_spec(spec_path)
    out = spec["trajectory"][0]
    data32 = {k: v.astype(np.float32) for k, v in data.items()}
    pred = rollout_onnx(onnx_path, spec, data32)[out]
    truth = data[spec["truth"][out]]
    curves = {k: rmse_by_lead(v / scale, truth / scale) for k, v in baselines.items()}
    return lead_table(rmse_by_lead(pred / scale, truth / scale), curves), bool(np.isfinite(pred).all())


def build_report(name: str, module: nn.Module, loss: float, one_step: tuple[float, float],
                 rollout: tuple[dict[str, dict[int, float]], bool], onnx_model: onnx.ModelProto,
                 paths: list[Path], example: tuple[torch.Tensor, ...], start: float,
                 notes: tuple[str, ...] = ()) -> dict[str, Any]:
    """What every builder prints: size, training and held-out errors, export check, ops, files, time."""
    table, finite = rollout
    report = {
        "name": name, "params": count_parameters(module), "train_loss": loss,
        "one_step_rmse_heldout": dict(zip(("model", "persistence"), one_step)),
        "rollout_rmse": table, "finite": finite,
        "export_max_abs_diff": check_export(paths[0], module, example),
        "ops": op_types(onnx_model), "sizes": file_sizes(paths),
        "seconds": time.perf_counter() - start,
    }
    if notes:
        report["notes"] = list(notes)
    return report
