"""Make float16 exports of float32 models, as vendors ship them, to benchmark tqs-onnx on float16 models.

Each MODEL.onnx is converted with onnxconverter-common's float16 converter (weights and compute in
float16, float32 inputs and outputs kept: `keep_io_types`) and written to OUT/ with its companion files
(MODEL.rollout.json, MODEL_sweep.npz / MODEL_eval.npz, or the demo's lorenz96_*.npz) copied beside it,
so that `tools/bench_accuracy.py OUT/*.onnx` finds them:
    pip install onnxconverter-common
    python tools/to_float16.py models/lorenz96_mlp.onnx models/zoo/*.onnx --out /tmp/f16zoo
    python tools/bench_accuracy.py /tmp/f16zoo/*.onnx --fresh --out /tmp/acc-f16
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path


def convert(model: Path, out: Path) -> tuple[int, int]:
    """Write OUT/<model name> in float16 and copy its companions; (bytes before, bytes after)."""
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError:
        raise SystemExit("to_float16.py needs onnxconverter-common (pip install onnxconverter-common)") from None
    with warnings.catch_warnings():  # it warns for every value it rounds to float16's range
        warnings.simplefilter("ignore")
        half = float16.convert_float_to_float16(onnx.load(model), keep_io_types=True)
    out.mkdir(parents=True, exist_ok=True)
    target = out / model.name
    onnx.save(half, target)
    stem = model.name[: -len(".onnx")]
    for companion in [model.with_name(f"{stem}.rollout.json"), *model.parent.glob(f"{stem}_*.npz"),
                      *model.parent.glob(f"{stem.split('_')[0]}_*.npz")]:
        if companion.is_file():
            shutil.copy2(companion, out / companion.name)
    return model.stat().st_size, target.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="float32 .onnx files")
    ap.add_argument("--out", type=Path, required=True, help="folder for the float16 models and their companions")
    args = ap.parse_args(argv)
    for m in args.models:
        if not m.is_file():
            print(f"to_float16.py: {m}: no such file", file=sys.stderr)
            return 2
        before, after = convert(m, args.out)
        print(f"{m} -> {args.out / m.name}: {before:,} -> {after:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
