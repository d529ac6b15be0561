"""Check, on one device, the paths the eighteenth session changed, on tiny models built here:

1. a float64 trajectory's divergence, measured by the model's own run (the default) and by the device's
   divergence graph (TQS_DIVERGENCE=graph): both difference in double, so their damages agree;
2. a bidirectional LSTM, stored per direction (passes/split_directions.py): sweep, allocate with the
   joint check, apply, eval; planned = on-disk bytes, outputs finite;
3. a float16 weight written in the `/load` form (decoded in float32, cast to float16): the decoded
   weight, as the written graph computes it on the device, equals the sweep's value to the bit.

    python tools/check_cuda_paths.py --device cuda [--out DIR]

Prints one line per check and exits 1 if any fails (CPU: `--device cpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model(nodes, inits, inputs, outputs, opset=17) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def _tqs(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tqs_onnx.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def float64_divergence(folder: Path, device: str) -> tuple[bool, str]:
    r = np.random.default_rng(0)
    w1, w2 = ((r.standard_normal(s) * 0.3 / np.sqrt(s[0])).astype(np.float32) for s in ((16, 32), (32, 16)))
    h = helper.make_node
    nodes = [h("Cast", ["W1"], ["W1d"], to=TensorProto.DOUBLE), h("Cast", ["W2"], ["W2d"], to=TensorProto.DOUBLE),
             h("Sub", ["x", "off"], ["xc"]), h("MatMul", ["xc", "W1d"], ["a"]), h("Tanh", ["a"], ["b"]),
             h("MatMul", ["b", "W2d"], ["c"]), h("Mul", ["c", "small"], ["cs"]), h("Mul", ["xc", "k"], ["xs"]),
             h("Add", ["xs", "cs"], ["y"]), h("Add", ["y", "off"], ["x_next"])]
    inits = [numpy_helper.from_array(a, n) for n, a in (("W1", w1), ("W2", w2), ("k", np.float64(0.9)),
                                                         ("off", np.float64(1e4)), ("small", np.float64(1e-5)))]
    vi = [helper.make_tensor_value_info(v, TensorProto.DOUBLE, [1, 16]) for v in ("x", "x_next")]
    onnx.save(_model(nodes, inits, vi[:1], vi[1:]), folder / "f64.onnx")
    (folder / "f64.json").write_text(json.dumps({"horizon": 8, "feedback": {"x_next": "x"}, "initial": {"x": "x0"}}))
    np.savez(folder / "f64.npz", x0=r.standard_normal((3, 1, 16)) + 1e4)
    damage = {}
    for mode in ("model", "graph"):
        out = folder / f"f64.{mode}.json"
        p = _tqs("sweep", folder / "f64.onnx", "--rollout", folder / "f64.json", "--contexts", folder / "f64.npz",
                 "--tiers", "bf16,int8,int2", "--probes", "2", "--min-size", "16", "--device", device, "-o", out,
                 "--quiet", env={"TQS_DIVERGENCE": mode})
        if p.returncode:
            return False, f"sweep ({mode}) failed: {p.stderr.strip()[-300:]}"
        damage[mode] = [b["damage"] for b in json.loads(out.read_text())["blocks"]]
    worst = max(abs(a[t] - b[t]) / max(abs(b[t]), 1e-300) for a, b in zip(damage["model"], damage["graph"]) for t in a)
    live = all(0 < d["bf16"] for d in damage["model"])
    bf16 = ", ".join(f"{d['bf16']:.3g}" for d in damage["model"])
    return live and worst < 1e-4, f"bf16 damage [{bf16}] (nonzero: {live}), model vs graph divergence: largest " \
                                  f"relative difference {worst:.2e}"


def bidirectional_lstm(folder: Path, device: str) -> tuple[bool, str]:
    r = np.random.default_rng(1)
    hs, n = 16, 8
    w = r.standard_normal((2, 4 * hs, n)).astype(np.float32) * 0.4
    rr = r.standard_normal((2, 4 * hs, hs)).astype(np.float32) * 0.2
    w[1] *= 0.1
    rr[1] *= 0.1
    wo = r.standard_normal((2 * hs, n)).astype(np.float32) * 0.2
    h = helper.make_node
    nodes = [h("LSTM", ["x", "W", "R", "", "", "h0", "c0"], ["", "hn", "cn"], hidden_size=hs, direction="bidirectional"),
             h("Transpose", ["hn"], ["ht"], perm=[1, 0, 2]), h("Reshape", ["ht", "shape"], ["hf"]),
             h("MatMul", ["hf", "Wo"], ["o"]), h("Tanh", ["o"], ["o2"]), h("Reshape", ["o2", "xshape"], ["x_next"])]
    inits = [numpy_helper.from_array(a, k) for k, a in (("W", w), ("R", rr), ("Wo", wo),
                                                        ("shape", np.array([1, 2 * hs], np.int64)),
                                                        ("xshape", np.array([1, 1, n], np.int64)))]
    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("x", f, [1, 1, n]), helper.make_tensor_value_info("h0", f, [2, 1, hs]),
           helper.make_tensor_value_info("c0", f, [2, 1, hs])]
    outs = [helper.make_tensor_value_info("x_next", f, [1, 1, n]), helper.make_tensor_value_info("hn", f, [2, 1, hs]),
            helper.make_tensor_value_info("cn", f, [2, 1, hs])]
    onnx.save(_model(nodes, inits, ins, outs), folder / "bilstm.onnx")
    spec = {"horizon": 6, "feedback": {"x_next": "x", "hn": "h0", "cn": "c0"}, "trajectory": ["x_next"]}
    (folder / "bilstm.json").write_text(json.dumps(spec))
    for name, seed in (("sweep", 2), ("eval", 3)):
        g = np.random.default_rng(seed)
        np.savez(folder / f"bilstm.{name}.npz", x=g.standard_normal((4, 1, 1, n)).astype(np.float32),
                 h0=np.zeros((4, 2, 1, hs), np.float32), c0=np.zeros((4, 2, 1, hs), np.float32))
    common = ["--rollout", folder / "bilstm.json", "--device", device]
    steps = [("sweep", folder / "bilstm.onnx", *common, "--contexts", folder / "bilstm.sweep.npz", "--min-size", "64",
              "-o", folder / "bilstm.scores.json", "--quiet"),
             ("allocate", folder / "bilstm.scores.json", "--compression", "4", "--verify-model", folder / "bilstm.onnx",
              *common, "--contexts", folder / "bilstm.sweep.npz", "-o", folder / "bilstm.plan.json", "--quiet"),
             ("apply", folder / "bilstm.onnx", folder / "bilstm.plan.json", "-o", folder / "bilstm.q.onnx",
              "--device", device, "--quiet"),
             ("eval", folder / "bilstm.onnx", folder / "bilstm.q.onnx", *common, "--contexts",
              folder / "bilstm.eval.npz", "-o", folder / "bilstm.eval.json", "--quiet")]
    for args in steps:
        p = _tqs(*args)
        if p.returncode:
            return False, f"{args[0]} failed: {p.stderr.strip()[-300:]}"
    scores = json.loads((folder / "bilstm.scores.json").read_text())
    split = sorted(n for n in scores["weights"] if "__" in n)
    plan = json.loads((folder / "bilstm.plan.json").read_text())
    ev = json.loads((folder / "bilstm.eval.json").read_text())
    on_disk = (folder / "bilstm.q.onnx").stat().st_size
    finite = all(o.get("finite", True) for o in ev.get("outputs", {}).values())
    ok = split == ["R__forward", "R__reverse", "W__forward", "W__reverse"] and on_disk == plan["planned_bytes"] and finite
    mae = {k: round(v["mae_vs_fp32"], 5) for k, v in ev.get("outputs", {}).items() if "mae_vs_fp32" in v}
    return ok, f"weights {split}; planned {plan['planned_bytes']:,} B, on disk {on_disk:,} B; finite {finite}; MAE vs FP32 {mae}"


def float16_load(folder: Path, device: str) -> tuple[bool, str]:
    from tqs_onnx.graph import load_model
    from tqs_onnx.quant import apply_tier
    from tqs_onnx.rewrite import rewrite_model, save_model
    from tqs_onnx.runtime import make_session, resolve_device
    from tqs_onnx.tiers import for_weight, parse_tier

    w = (np.random.default_rng(4).standard_normal((16, 32)) * 0.3).astype(np.float16)
    h = helper.make_node
    nodes = [h("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16), h("MatMul", ["x16", "W"], ["a"]),
             h("Cast", ["a"], ["y"], to=TensorProto.FLOAT)]
    m = _model(nodes, [numpy_helper.from_array(w, "W")], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])])
    onnx.save(m, folder / "half.onnx")
    results = []
    for tier in ("int8/channel/load", "int4/load", "int6/channel/load"):
        plan = {"kind": "tqs-plan", "schema_version": 1, "model": {}, "weights": {"W": tier},
                "weight_info": {"W": {"shape": [16, 32], "channel_axis": 1, "block_axis": 0}}}
        out, _ = rewrite_model(load_model(folder / "half.onnx"), plan)
        out.graph.output.append(helper.make_tensor_value_info("W", TensorProto.FLOAT16, [16, 32]))
        save_model(out, folder / "half.q.onnx")
        session = make_session(onnx.load(folder / "half.q.onnx"), resolve_device(device))
        decoded = session.run(["W"], {"x": np.zeros((1, 16), np.float32)})[0]
        expected = apply_tier(w.astype(np.float32), for_weight(parse_tier(tier), "float16"), 1, 0).astype(np.float16)
        results.append((tier, bool(np.array_equal(decoded, expected))))
    return all(ok for _, ok in results), ", ".join(f"{t}: {'equal' if ok else 'DIFFERENT'}" for t, ok in results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="folder for the models and files (default: a temporary one)")
    a = p.parse_args(argv)
    folder = Path(a.out or tempfile.mkdtemp(prefix="tqs-cuda-paths-"))
    folder.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, check in (("float64 divergence", float64_divergence), ("bidirectional LSTM", bidirectional_lstm),
                        ("float16 /load decode", float16_load)):
        ok, text = check(folder, a.device)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({a.device}): {text}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
