"""Check the sweep's probe graphs on a device against the host reference.

For a few weight shapes, on --device (cpu, cuda): the Gaussian probe's perturbation norm against the
norm asked for (the paper's rule: each draw's norm equals the quant residual's), its direction against
the host counter generator (`counter_normal`, the seeded reference), the draw made twice (it must be
reproducible on the device), and the b-bit quant probe against numpy rounding. Prints one row per case
and exits 1 when any check fails. CPU tests run it; on a GPU it is the first thing to run:
    python tools/check_device_probes.py --device cuda
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from tqs_onnx.probes import DeviceProbes, counter_normal, probe_offset
from tqs_onnx.runtime import resolve_device

SHAPES = [(64, 64), (3, 5, 7), (4096, 1024), (1,)]
NORM_RTOL = 1e-5
COSINE_MIN = 1 - 1e-6


def _quant_reference(w: np.ndarray, bits: int) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).max() / qmax
    return (np.clip(np.round(w / scale), -qmax, qmax) * scale).astype(np.float32) if scale > 0 else w


def check(device_name: str, seed: int = 0) -> list[dict]:
    device = resolve_device(device_name)
    ops = DeviceProbes(device)
    rng = np.random.default_rng(seed)
    rows = []
    for block, shape in enumerate(SHAPES):
        w = {"a": rng.standard_normal(shape).astype(np.float32),
             "b": rng.standard_normal((8, 3)).astype(np.float32)}
        offsets = [probe_offset(seed, block, 0, j) for j in range(len(w))]
        norm = 0.25 * math.sqrt(sum(float(np.square(v.astype(np.float64)).sum()) for v in w.values()))
        dev = {n: device.to_device(v) for n, v in w.items()}
        draws = [ops.gauss_probe(dev, offsets, norm) for _ in range(2)]
        delta = {n: draws[0][n].numpy().astype(np.float64) - w[n] for n in w}
        got = math.sqrt(sum(float(np.square(d).sum()) for d in delta.values()))
        ref = np.concatenate([counter_normal(w[n].size, off) for n, off in zip(w, offsets)]).astype(np.float64)
        flat = np.concatenate([delta[n].ravel() for n in w])
        cosine = float(flat @ ref / (np.linalg.norm(flat) * np.linalg.norm(ref)))
        same = all(np.array_equal(draws[0][n].numpy(), draws[1][n].numpy()) for n in w)
        q = ops.quant_probe(dev["a"], 4).numpy()
        quant_err = float(np.abs(q - _quant_reference(w["a"], 4)).max())
        step = float(np.abs(w["a"]).max() / 7)
        rows.append({"shape": shape, "norm_rel_err": abs(got - norm) / norm, "cosine": cosine,
                     "reproducible": same, "quant_max_err_steps": quant_err / step if step else 0.0})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    args = ap.parse_args(argv)
    rows = check(args.device)
    ok = True
    print(f"device {args.device}: norm rel err <= {NORM_RTOL:g}, cosine >= {COSINE_MIN}, reproducible, "
          "int4 quant within 1e-3 step")
    for r in rows:
        good = (r["norm_rel_err"] <= NORM_RTOL and r["cosine"] >= COSINE_MIN and r["reproducible"]
                and r["quant_max_err_steps"] <= 1e-3)
        ok &= good
        print(f"  {str(r['shape']):<14} norm rel err {r['norm_rel_err']:.2e}  cosine {r['cosine']:.9f}  "
              f"reproducible {r['reproducible']}  quant err {r['quant_max_err_steps']:.1e} steps  "
              f"{'ok' if good else 'FAILED'}")
    print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
