#!/usr/bin/env python3
"""How far two sweeps' scores of one model agree (e.g. CPU against CUDA, or two kernel settings).

Prints, per score (gamma_quant, gamma_gauss and each tier's measured damage): the largest and the
median relative difference over blocks, and the Spearman rank correlation of the blocks.

    python tools/compare_scores.py REFERENCE.json OTHER.json [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from tqs_onnx.errors import TqsError
from one_line_errors import run  # tools/: a user's error is one line, exit 2


def load_scores_doc(path: str) -> dict:
    """A sweep's scores JSON; a file that is not JSON, or JSON without a list of blocks, is a user's
    error (TqsError), not a traceback."""
    try:
        doc = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TqsError(f"{path}: not a JSON file ({exc})") from None
    blocks = doc.get("blocks") if isinstance(doc, dict) else None
    if not isinstance(blocks, list) or not all(isinstance(b, dict) and "name" in b for b in blocks):
        raise TqsError(f"{path}: not a scores file of `tqs-onnx sweep` (no list of named blocks)")
    return doc


def score_columns(doc: dict) -> dict[str, np.ndarray]:
    """One column per score, a row per block (blocks in sweep order)."""
    blocks = doc["blocks"]
    cols: dict[str, list[float]] = {}
    for b in blocks:
        for probe in ("quant", "gauss"):
            if b.get(probe):
                cols.setdefault(f"gamma_{probe}", []).append(b[probe]["gamma_task"])
        for tier, dmg in (b.get("damage") or {}).items():
            cols.setdefault(f"damage {tier}", []).append(dmg)
    return {k: np.asarray(v, dtype=np.float64) for k, v in cols.items() if len(v) == len(blocks)}


def compare(ref: dict, other: dict) -> dict[str, dict[str, float]]:
    if [b["name"] for b in ref["blocks"]] != [b["name"] for b in other["blocks"]]:
        raise TqsError("the two score files hold different blocks")
    a, b = score_columns(ref), score_columns(other)
    out = {}
    for key in a.keys() & b.keys():
        x, y = a[key], b[key]
        rel = np.abs(x - y) / np.maximum(np.maximum(np.abs(x), np.abs(y)), 1e-300)
        rho = spearmanr(x, y).statistic if len(x) > 1 and np.ptp(x) > 0 and np.ptp(y) > 0 else float("nan")
        out[key] = {"max_rel": float(rel.max()), "median_rel": float(np.median(rel)), "spearman": float(rho)}
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    ref, other = (load_scores_doc(p) for p in (args.reference, args.other))
    rows = compare(ref, other)
    print(f"{args.other} against {args.reference} ({len(ref['blocks'])} blocks; "
          f"devices {ref.get('device')} / {other.get('device')})")
    print(f"{'score':<22} {'max rel diff':>13} {'median rel':>11} {'spearman':>9}")
    for key, r in rows.items():
        print(f"{key:<22} {r['max_rel']:>13.3e} {r['median_rel']:>11.3e} {r['spearman']:>9.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(run(main))
