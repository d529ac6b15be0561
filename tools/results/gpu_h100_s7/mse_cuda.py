"""CUDA: /mse tier values from the device probe equal the writer's (host) values, bit for bit."""
import numpy as np
from tqs_onnx.probes import DeviceProbes
from tqs_onnx.quant import apply_tier
from tqs_onnx.runtime import Device
from tqs_onnx.tiers import parse_tier

dev = Device("cuda")
ok = True
for t in ["int4/channel/mse", "int2/block8/mse", "int8/mse", "int6/channel/mse", "int4/block16/fp16/mse",
          "int4/channel", "int6/channel", "int2/block8"]:
    for shape, axes in [((70, 33), (1, 0)), ((8, 3, 3, 5), (0, 1)), ((300,), (0, 0))]:
        w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        w.flat[3] = 0.0
        got = DeviceProbes(dev).tier(dev.to_device(w), parse_tier(t), axes).numpy()
        same = np.array_equal(got, apply_tier(w, parse_tier(t), *axes))
        ok &= same
        print(f"{t:24s} {str(shape):14s} bit-identical={same}")
print("ALL BIT-IDENTICAL" if ok else "MISMATCH")
