"""`tqs-onnx report`: one self-contained HTML page (index.html + PNGs beside it) from the JSON stages.

Plots (each drawn only when its inputs are given):
- gamma per block in graph order (quant and Gaussian probes), dead blocks marked;
- the ranking by role: blocks grouped by the op type that consumes their weights;
- the Pareto frontier (MAE vs FP32 against on-disk compression, log x) with the uniform baselines;
- per-step error growth, from an eval report or from the frontier points;
- the tier map: blocks in graph order colored by tier, for a plan and for every kept frontier point.

matplotlib is imported lazily with the Agg backend; the page uses relative image paths and no
external scripts or styles, so the folder can be archived as a CI artifact and opened anywhere.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Callable

from tqs_onnx.errors import TqsError
from tqs_onnx.tiers import parse_tier
from tqs_onnx.util import atomic_write, read_json

FIG_DPI = 110
MAX_LABELLED_BLOCKS = 40  # above this, block names are not written on the axes


# ---------------------------------------------------------------------------------------- loading

def load_document(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """A JSON file written by another stage; `kind` is checked ('tqs-frontier', 'tqs-plan', 'tqs-eval')."""
    path = Path(path)
    doc = read_json(path, kind)
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise TqsError(f"{path}: not a {kind} document (kind '{doc.get('kind') if isinstance(doc, dict) else '?'}')")
    missing = [k for k in REQUIRED.get(kind, ()) if k not in doc]
    if missing:
        raise TqsError(f"{path}: {kind} document lacks {', '.join(missing)} (not written by tqs-onnx?)")
    return doc


REQUIRED = {"tqs-frontier": ("points", "uniform", "model"), "tqs-plan": ("blocks", "weights", "model"),
            "tqs-eval": ("outputs", "compression")}


def check_same_model(scores: dict[str, Any], doc: dict[str, Any] | None, where: str) -> None:
    """A plan or frontier made for another model would draw the wrong blocks."""
    model = (doc or {}).get("model") or {}
    sha = model.get("sha256")
    if not sha or sha == scores["model"]["sha256"]:
        return
    # Digests of two schemes (graph.same_model): a document from before the identity covered external
    # data names the .onnx file alone, so an external-data model's two digests differ. Then the plan's
    # weights must at least be the scores' own.
    same_scheme = ("identity" in model) == ("identity" in scores["model"])
    foreign = set((doc or {}).get("weights") or {}) - set(scores.get("weights") or {})
    if same_scheme or foreign:
        raise TqsError(f"{where}: made for another model than the scores (sha256 differs)")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise TqsError("the report needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------ block facts

def block_roles(scores: dict[str, Any]) -> list[str]:
    """Per block, the op types that consume its weights ('MatMul', 'Conv+Add', ...)."""
    winfo = scores["weights"]
    roles = []
    for b in scores["blocks"]:
        ops = sorted({op for n in b["weights"] for op in winfo.get(n, {}).get("consumer_ops", [])})
        roles.append("+".join(ops) or "other")
    return roles


def block_gammas(scores: dict[str, Any], probe: str) -> list[float]:
    """gamma_task of one probe per block in graph order (NaN where that probe was not run)."""
    return [b[probe]["gamma_task"] if b.get(probe) else math.nan for b in scores["blocks"]]


def tier_order(tiers: set[str]) -> list[str]:
    """Tiers from the most to the least precise (bits, then finer scales first)."""
    rank = {"channel": 0, "block": 1, "tensor": 2}

    def key(t: str):
        tier = parse_tier(t)
        return (-tier.bits, rank.get(tier.granularity, 3), tier.block_size, t)

    return sorted(tiers, key=key)


# -------------------------------------------------------------------------------------- the plots

def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=FIG_DPI, format="png"))
    import matplotlib.pyplot as plt

    plt.close(fig)


def _block_axis(ax, scores: dict[str, Any]) -> None:
    names = [b["name"] for b in scores["blocks"]]
    ax.set_xlabel("block (graph order)")
    if len(names) <= MAX_LABELLED_BLOCKS:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n[:24] for n in names], rotation=60, ha="right", fontsize=7)


def plot_gamma(scores: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    x = list(range(len(scores["blocks"])))
    for probe, style in (("quant", "o-"), ("gauss", "s--")):
        g = block_gammas(scores, probe)
        if any(math.isfinite(v) for v in g):
            ax.plot(x, [v if math.isfinite(v) else math.nan for v in g], style, ms=4, label=f"gamma_{probe}")
    dead = [i for i, b in enumerate(scores["blocks"]) if b.get("dead")]
    if dead:
        ax.scatter(dead, [0] * len(dead), marker="x", color="red", zorder=3, label="dead")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_ylabel("gamma (Eq. 1, per step)")
    ax.set_title(f"Sensitivity per block, T={scores.get('horizon')}")
    _block_axis(ax, scores)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_roles(scores: dict[str, Any], path: Path) -> None:
    """Left: blocks ranked by gamma, colored by role. Right: gamma of every block grouped by role."""
    plt = _pyplot()
    roles = block_roles(scores)
    gammas = [q if math.isfinite(q) else g for q, g in zip(block_gammas(scores, "quant"), block_gammas(scores, "gauss"))]
    names = [b["name"] for b in scores["blocks"]]
    kinds = sorted(set(roles))
    colors = {r: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(kinds)}
    order = sorted(range(len(names)), key=lambda i: -_finite_or(gammas[i], -1e9))[:MAX_LABELLED_BLOCKS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, max(3.0, 0.22 * len(order) + 1.2)),
                                      gridspec_kw={"width_ratios": [3, 2]})
    left.barh(range(len(order)), [_finite_or(gammas[i], 0.0) for i in order], color=[colors[roles[i]] for i in order])
    left.set_yticks(range(len(order)))
    left.set_yticklabels([names[i][:28] for i in order], fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("gamma")
    left.set_title("Ranking (most sensitive first)")
    for j, role in enumerate(kinds):
        ys = [gammas[i] for i in range(len(names)) if roles[i] == role and math.isfinite(gammas[i])]
        right.scatter(ys, [j] * len(ys), color=colors[role], alpha=0.8)
        if ys:
            right.plot([sum(ys) / len(ys)] * 2, [j - 0.3, j + 0.3], color="black", lw=1.5)
    right.set_yticks(range(len(kinds)))
    right.set_yticklabels([f"{k} ({roles.count(k)})" for k in kinds], fontsize=8)
    right.set_xlabel("gamma (bar: mean)")
    right.set_title("By consumer op")
    _save(fig, path)


def _finite_or(v: float, default: float) -> float:
    return v if math.isfinite(v) else default


def plot_frontier(frontier: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    points = [p for p in frontier["points"] if p.get("kept")]
    for obj in sorted({p["objective"] for p in points}):
        pts = sorted((p for p in points if p["objective"] == obj), key=lambda p: p["on_disk_compression"])
        ax.plot([p["on_disk_compression"] for p in pts], [p["mae_vs_fp32"] for p in pts], "o-", ms=5,
                label=f"TQS ({obj})")
    front = sorted((p for p in frontier["points"] + frontier["uniform"] if p.get("pareto")),
                   key=lambda p: p["on_disk_compression"])
    ax.plot([p["on_disk_compression"] for p in front], [p["mae_vs_fp32"] for p in front], color="grey",
            lw=4, alpha=0.35, zorder=0, label="Pareto front (all points)")
    for u in frontier["uniform"]:
        ax.scatter(u["on_disk_compression"], u["mae_vs_fp32"], marker="s", s=45, color="tab:red", zorder=3)
        ax.annotate(u["tier"], (u["on_disk_compression"], u["mae_vs_fp32"]), fontsize=7,
                    xytext=(4, -10), textcoords="offset points")
    if frontier["uniform"]:
        ax.scatter([], [], marker="s", color="tab:red", label="uniform (one tier)")
    rows = frontier["points"] + frontier["uniform"]
    _log_axis(ax, "x", [p["on_disk_compression"] for p in rows], suffix="x")
    if all(p["mae_vs_fp32"] > 0 for p in rows):
        _log_axis(ax, "y", [p["mae_vs_fp32"] for p in rows])
    ax.set_xlabel("on-disk compression (log scale)")
    ax.set_ylabel(f"rollout MAE vs FP32 ({frontier.get('eval_contexts')} contexts x {frontier.get('horizon')} steps)")
    ax.set_title("Compression frontier")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _log_axis(ax, which: str, values: list[float], suffix: str = "") -> None:
    """A log axis with plain tick labels (2x, 0.5) instead of 2 x 10^0; minor ticks labelled only within
    one decade, where there may be no major tick to label."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    fmt = FuncFormatter(lambda v, _pos: f"{v:g}{suffix}")
    axis.set_major_formatter(fmt)
    spread = max(values) / min(values) if values and min(values) > 0 else math.inf
    axis.set_minor_formatter(fmt if spread < 10 else NullFormatter())


def step_curves(frontier: dict[str, Any] | None, eval_doc: dict[str, Any] | None,
                most: int = 6) -> list[tuple[str, list[float], bool]]:
    """(label, MAE per step, is_baseline) curves: the eval report's outputs and spread frontier points
    with the frontier's uniform baselines, whichever are given."""
    curves = []
    if eval_doc is not None:
        curves += [(f"{k} ({eval_doc['compression']['on_disk']:.2f}x)", e["mae_vs_fp32_per_step"], False)
                   for k, e in eval_doc["outputs"].items()]
    if frontier is None:
        return curves
    kept = sorted((p for p in frontier["points"] if p.get("kept")), key=lambda p: p["on_disk_compression"])
    step = max(1, math.ceil(len(kept) / most))
    for p in kept[::step] + [u for u in frontier["uniform"]]:
        per_step = [sum(v) / len(v) for v in zip(*(o["mae_vs_fp32_per_step"] for o in p["outputs"].values()))]
        label = f"{p['tier']} (uniform)" if p["kind"] == "uniform" else f"TQS {p['on_disk_compression']:.2f}x"
        curves.append((label, per_step, p["kind"] == "uniform"))
    return curves


def plot_steps(curves: list[tuple[str, list[float], bool]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    n_main = max(1, sum(not baseline for _, _, baseline in curves))
    main_i = base_i = 0
    for label, per_step, baseline in curves:
        # TQS curves in a sequential map (by compression), baselines in distinct dashed colors.
        if baseline:
            color, base_i = plt.get_cmap("tab10")(base_i % 10), base_i + 1
        else:
            color, main_i = plt.get_cmap("viridis")(0.9 * main_i / max(1, n_main - 1)), main_i + 1
        ax.plot(range(1, len(per_step) + 1), per_step, ls="--" if baseline else "-", lw=1.0 if baseline else 1.8,
                color=color, label=label)
    values = [v for _, c, _ in curves for v in c]
    if values and all(v > 0 for v in values):
        _log_axis(ax, "y", values)
    ax.set_xlabel("rollout step")
    ax.set_ylabel("MAE vs FP32")
    ax.set_title("Error growth over the rollout")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def tier_rows(plan: dict[str, Any] | None, frontier: dict[str, Any] | None) -> list[tuple[str, list[str]]]:
    """(label, tier per block in graph order) rows: the plan first, then kept frontier points by size."""
    rows = []
    if plan is not None:
        by_id = {b["id"]: b["tier"] for b in plan["blocks"]}
        rows.append((f"plan {plan['planned_compression']:.2f}x", [by_id[i] for i in sorted(by_id)]))
    if frontier is not None:
        kept = sorted((p for p in frontier["points"] if p.get("kept")), key=lambda p: p["on_disk_compression"])
        seen = set()
        for p in kept:
            if tuple(p["tiers"]) not in seen:
                seen.add(tuple(p["tiers"]))
                rows.append((f"{p['on_disk_compression']:.2f}x {p['objective']}", p["tiers"]))
    return rows


def plot_tier_map(scores: dict[str, Any], rows: list[tuple[str, list[str]]], path: Path) -> None:
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    tiers = tier_order({t for _, r in rows for t in r})
    cmap = ListedColormap([plt.get_cmap("viridis_r")(i / max(1, len(tiers) - 1)) for i in range(len(tiers))])
    grid = [[tiers.index(t) for t in r] for _, r in rows]
    fig, ax = plt.subplots(figsize=(10, max(2.2, 0.3 * len(rows) + 1.6)))
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(tiers) - 0.5, interpolation="nearest")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _ in rows], fontsize=7)
    _block_axis(ax, scores)
    ax.set_title("Tier per block (graph order)")
    ax.legend(handles=[Patch(color=cmap(i), label=t) for i, t in enumerate(tiers)], fontsize=7,
              bbox_to_anchor=(1.01, 1), loc="upper left")
    _save(fig, path)


# ------------------------------------------------------------------------------------------- page

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#222;padding:0 16px}h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;
border-bottom:1px solid #ddd;padding-bottom:4px}.meta{color:#555;font-size:13px}img{max-width:100%;
border:1px solid #eee}table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ddd;
padding:3px 7px;text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}.note{color:#7a5a00;
font-size:12px}figcaption{font-size:12px;color:#555;margin:4px 0 12px}"""


def _table(headers: list[str], rows: list[list[Any]], left: int = 1) -> str:
    """An HTML table; the first `left` columns are left-aligned."""
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(_fmt(v))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def blocks_table(scores: dict[str, Any], plan: dict[str, Any] | None) -> str:
    roles = block_roles(scores)
    tiers = {b["id"]: b["tier"] for b in plan["blocks"]} if plan else {}
    rows = [[b["id"], b["name"], roles[i], b["size"], (b.get("quant") or {}).get("gamma_task"),
             (b.get("gauss") or {}).get("gamma_task"), bool(b.get("dead")), tiers.get(b["id"])]
            for i, b in enumerate(scores["blocks"])]
    return _table(["id", "block", "role", "params", "gamma_quant", "gamma_gauss", "dead", "plan tier"], rows, left=3)


def frontier_table(frontier: dict[str, Any]) -> str:
    rows = [[r["kind"], r["objective"] if r["kind"] == "tqs" else r["tier"], r["target"], r["planned_compression"],
             r["on_disk_compression"], r["on_disk_bytes"], r["mae_vs_fp32"], r.get("mae_vs_truth"),
             r.get("degradation_pct"), r["seconds"], bool(r.get("pareto")), r.get("model")]
            for r in frontier["points"] + frontier["uniform"] if r.get("kept")]
    table = _table(["kind", "objective / tier", "target", "planned", "on disk", "bytes", "MAE vs FP32",
                    "MAE vs truth", "degr. %", "s", "pareto", "model"], rows, left=2)
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in frontier.get("notes", []))
    return table + notes


def eval_table(doc: dict[str, Any]) -> str:
    rows = [[k, e["mae_vs_fp32"], e["rmse_vs_fp32"], e.get("mae_vs_truth"), e.get("mae_fp32_vs_truth"),
             e.get("degradation_pct")] for k, e in doc["outputs"].items()]
    return _table(["output", "MAE vs FP32", "RMSE vs FP32", "MAE vs truth", "FP32 vs truth", "degr. %"], rows)


def header(scores: dict[str, Any]) -> str:
    m = scores["model"]
    return (f"<h1>tqs-onnx report: {html.escape(Path(m['path']).name)}</h1>"
            f'<p class="meta">{m["file_bytes"]:,} bytes, {m.get("parameters", 0):,} parameters in '
            f"{len(scores['blocks'])} blocks; sweep of {scores.get('contexts')} contexts x {scores.get('horizon')} steps "
            f"on {html.escape(str(scores.get('device')))}, {scores.get('forward_passes', 0):,} forward passes; "
            f"sha256 {html.escape(m['sha256'][:16])}...</p>")


def sections(scores: dict[str, Any], frontier: dict[str, Any] | None, plan: dict[str, Any] | None,
             eval_doc: dict[str, Any] | None) -> list[tuple[str, str, Callable[[Path], None] | None, str]]:
    """(title, png name, plot function or None, extra HTML) for every section the inputs allow."""
    out = [("Sensitivity per block", "gamma.png", lambda p: plot_gamma(scores, p), ""),
           ("Ranking by role", "roles.png", lambda p: plot_roles(scores, p), blocks_table(scores, plan))]
    if frontier is not None:
        out.append(("Pareto frontier", "frontier.png", lambda p: plot_frontier(frontier, p), frontier_table(frontier)))
    if eval_doc is not None or frontier is not None:
        curves = step_curves(frontier, eval_doc)
        out.append(("Error growth per step", "steps.png", lambda p: plot_steps(curves, p),
                    eval_table(eval_doc) if eval_doc else ""))
    rows = tier_rows(plan, frontier)
    if rows:
        out.append(("Tier map", "tiers.png", lambda p: plot_tier_map(scores, rows, p), ""))
    return out


CAPTIONS = {
    "gamma.png": "gamma_task (Eq. 1 at T_max) of the quantization and Gaussian probes; higher means perturbations of "
                 "this block grow faster along the rollout.",
    "roles.png": "Blocks ranked by gamma, colored by the op type that consumes their weights; right: gamma per role.",
    "frontier.png": "Rollout MAE against the FP32 model vs on-disk compression for the kept TQS point of every target, "
                    "and every single-tier (uniform) allocation. The grey band joins the points no other point "
                    "beats in both size and error.",
    "steps.png": "MAE against the FP32 model at each rollout step (dashed, when a frontier is given: its uniform "
                 "baselines).",
    "tiers.png": "The tier of every block, blocks in graph order; one row per plan or kept frontier point.",
}


REPORT_FILES = ("index.html", *CAPTIONS)  # what write_report may write into its folder


def write_report(out_dir: str | os.PathLike, scores: dict[str, Any], frontier: dict[str, Any] | None = None,
                 plan: dict[str, Any] | None = None, eval_doc: dict[str, Any] | None = None) -> Path:
    """Draw every plot the inputs allow into out_dir and write out_dir/index.html; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = [header(scores)]
    for title, png, plot, extra in sections(scores, frontier, plan, eval_doc):
        plot(out / png)
        body.append(f"<h2>{html.escape(title)}</h2>{_figure(png, CAPTIONS[png])}{extra}")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>tqs-onnx report</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    index = out / "index.html"
    atomic_write(index, lambda p: p.write_text(page))
    return index
