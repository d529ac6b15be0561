#!/usr/bin/env python3
"""Which written forms ONNX Runtime runs, per provider: DequantizeLinear for each storage type and
scale granularity (1-D and 2-D weights), and the Cast tiers. Prints a table and writes JSON.

    python tools/ort_support.py [--device cpu,cuda] [-o results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from tqs_onnx.rewrite import rewrite_model
from tqs_onnx.graph import LoadedModel
from tqs_onnx.runtime import make_session, resolve_device
from tqs_onnx.errors import TqsError

TIERS = ["int8", "int8/channel", "int8/block32", "int4", "int4/channel", "int4/block32", "int2", "int2/channel",
         "int2/block32", "int1", "int1/channel", "int1/block32", "int1/block32/fp16", "int6", "int6/channel", "int6/block32",
         "int6/channel/fp16", "int8/channel/fp16",
         "int4/block32/fp16", "fp16", "bf16", "zero"]


def probe_model(shape: tuple[int, ...]) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    node = helper.make_node("MatMul" if len(shape) == 2 else "Add", ["x", "W"], ["y"])
    xs = [1, shape[0]] if len(shape) == 2 else [1, shape[0]]
    ys = [1, shape[1]] if len(shape) == 2 else [1, shape[0]]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, xs)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ys)],
                          [onnx.numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def check(tier: str, shape: tuple[int, ...], device) -> str:
    m = probe_model(shape)
    plan = {"kind": "tqs-plan", "weights": {"W": tier}, "weight_info": {}, "factor": False}
    out, _ = rewrite_model(LoadedModel(Path("probe.onnx"), m, m.ByteSize(), ""), plan)
    try:
        s = make_session(out, device)
        y = s.run(None, {"x": np.ones((1, shape[0]), np.float32)})[0]
        return "ok" if np.all(np.isfinite(y)) else "non-finite"
    except TqsError as exc:
        return "load: " + str(exc)[:80]
    except Exception as exc:  # a kernel refusing at run time
        return "run: " + str(exc).split("Status Message:")[-1].strip()[:80]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("-o", "--output", type=Path)
    a = ap.parse_args()
    res = {}
    for dev_name in a.device.split(","):
        try:
            device = resolve_device(dev_name)
        except TqsError as exc:  # no GPU here: keep the other devices' rows
            print(f"{dev_name}: skipped ({exc})", flush=True)
            continue
        for shape in ((256, 64), (256,)):
            for tier in TIERS:
                r = check(tier, shape, device)
                res[f"{dev_name} {tier} {len(shape)}-D"] = r
                print(f"{dev_name:5s} {tier:20s} {len(shape)}-D  {r}", flush=True)
    if a.output:
        a.output.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
