"""Text tables the command line and the demo print: a sweep's ranking, a plan, an evaluation."""

from __future__ import annotations

from typing import Any


def format_ranking(doc: dict[str, Any]) -> str:
    """The sweep's blocks, most sensitive first."""
    rows = sorted(doc["blocks"], key=lambda b: -(b["quant"] or b["gauss"])["gamma_task"])
    lines = [f"{len(rows)} blocks, {doc['forward_passes']:,} forward passes",
             f"{'rank':>4} {'block':32s} {'params':>10} {'gamma_quant':>12} {'gamma_gauss':>12} {'A_max':>10}  flags"]
    for r, b in enumerate(rows, 1):
        gq = f"{b['quant']['gamma_task']:.4f}" if b["quant"] else "-"
        gg = f"{b['gauss']['gamma_task']:.4f}" if b["gauss"] else "-"
        am = (b["quant"] or b["gauss"])["a_max"]
        flags = ",".join(f for f, on in (("dead", b["dead"]), ("unreached", b.get("unreached")),
                                          ("non-finite", b["nonfinite"])) if on)
        lines.append(f"{r:4d} {b['name'][:32]:32s} {b['size']:>10,} {gq:>12} {gg:>12} {am:>10.3g}  {flags}")
    return "\n".join(lines)


def format_plan(plan: dict[str, Any]) -> str:
    """A plan: its size against the target, each block's tier and bytes, its notes."""
    lines = [f"plan: objective {plan['objective']}, solver {plan['solver']}, target {plan['compression_target']:g}x, "
             f"planned {plan['planned_compression']:.2f}x on disk ({plan['planned_bytes']:,} bytes), "
             f"{plan['param_compression']:.2f}x in the planned weights' bits (scales not counted)"]
    for b in plan["blocks"]:
        tier = f"{b['stored_as']} as stored" if b.get("stored_as") else b["tier"]
        lines.append(f"  {b['id']:3d} {b['name'][:36]:36s} {tier:18s} {b['bytes']:>10,} B"
                     + ("  dead" if b["dead"] else ""))
    lines += [f"  note: {n}" for n in plan.get("notes", [])]
    return "\n".join(lines)


def format_eval(doc: dict[str, Any]) -> str:
    """`eval`'s report: compression, then each output's errors against FP32 (and the truth)."""
    c = doc["compression"]
    lines = [f"{doc['candidate']} vs {doc['reference']}: {c['on_disk']:.2f}x on disk, "
             f"{c['param_level']:.2f}x parameter-level (bits of every stored tensor, scales included); "
             f"{doc['contexts']} contexts x {doc['horizon']} steps"]
    for k, e in doc["outputs"].items():
        line = f"  {k}: MAE vs FP32 {e['mae_vs_fp32']:.4g}, RMSE {e['rmse_vs_fp32']:.4g}, finite {e['finite']}"
        if "mae_vs_truth" in e:
            line += f"; MAE vs truth {e['mae_vs_truth']:.4g} (FP32 {e['mae_fp32_vs_truth']:.4g}, {signed_percent(e['degradation_pct'])})"
        lines.append(line)
        per = e["mae_vs_fp32_per_channel"]
        if len(per) > 1:
            lines.append(f"    per channel MAE vs FP32: min {min(per):.3g}, max {max(per):.3g} over {len(per)} channels")
    lines += [f"  note: {n}" for n in doc.get("notes", [])]
    return "\n".join(lines)


def signed_percent(value: float) -> str:
    """+12.34%; beyond a million percent in powers of ten (+8.6e+22%, not 24 digits)."""
    return f"{value:+.2f}%" if abs(value) < 1e6 else f"{value:+.2g}%"
