"""Build the forecaster zoo: ``python models/zoo/build_all.py [--only NAME] [--out DIR]``.

Each builder is seeded and trains on CPU in a few minutes, then writes NAME.onnx,
NAME.rollout.json, NAME_sweep.npz and NAME_eval.npz and prints its report.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make the repository root importable so the relative imports resolve.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "models.zoo"

from . import common  # noqa: E402

BUILDERS = ("l96_cnn", "macro_mlp", "lstm_forecaster", "patch_transformer")


def build_one(name: str, out_dir: Path) -> dict[str, Any]:
    """Import the builder module for name and run it."""
    module = importlib.import_module(f".{name}", __package__)
    return module.build(out_dir)


def format_report(report: dict[str, Any]) -> str:
    """Human-readable block for one model."""
    lines = [f"== {report['name']}  params={report['params']:,}  train_loss={report['train_loss']:.4g}"
             f"  build={report['seconds']:.0f}s  finite={report['finite']}"]
    lines.append("   one-step RMSE (held out): " + ", ".join(
        f"{k}={v:.4g}" for k, v in report["one_step_rmse_heldout"].items()))
    leads = next(iter(report["rollout_rmse"].values())).keys()
    lines.append("   closed-loop RMSE by lead  " + "".join(f"{lead:>9d}" for lead in leads))
    for who, row in report["rollout_rmse"].items():
        lines.append(f"     {who:<24}" + "".join(f"{row[lead]:9.4f}" for lead in leads))
    lines.append(f"   ops: {' '.join(report['ops'])}")
    lines.append(f"   export max|ort - torch| = {report['export_max_abs_diff']:.2e}")
    lines.append("   sizes: " + ", ".join(f"{k}={v / 1024:.0f}KiB" for k, v in report["sizes"].items()))
    lines.extend(f"   note: {n}" for n in report.get("notes", []))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the requested models, print their reports, optionally dump them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=BUILDERS, action="append", help="build just this model (repeatable)")
    parser.add_argument("--out", type=Path, default=common.ZOO_DIR, help="output folder (default: models/zoo)")
    parser.add_argument("--json", type=Path, help="also write the reports to this JSON file")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name in args.only or BUILDERS:
        report = build_one(name, args.out)
        print(format_report(report), flush=True)
        reports.append(report)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
