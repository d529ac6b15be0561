"""`tqs-onnx report`: one self-contained HTML page (index.html + PNGs beside it) from the JSON stages.

Plots (each drawn only when its inputs are given):
- gamma per block in graph order (quant and Gaussian probes), dead and diverged blocks marked;
- the ranking by role: blocks grouped by the op type that consumes their weights;
- the Pareto frontier (MAE vs FP32 against on-disk compression, log x) with the uniform baselines;
- per-step error growth, from an eval report or from the frontier points;
- the tier map: blocks in graph order colored by tier, for a plan and for every kept frontier point.

A value that was NaN or infinite (strict JSON, as eval and pareto write it, has null for both) is shown as
"inf" or "non-finite" and leaves a gap in a curve; "-" means not computed. matplotlib is imported lazily
with the Agg backend; the page uses relative image paths and no external scripts or styles, so the folder
can be archived as a CI artifact and opened anywhere. The folder is updated all or nothing.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from tqs_onnx.errors import TqsError
from tqs_onnx.tiers import parse_tier
from tqs_onnx.util import TEMP_ROOM, check_output_target, read_json, remove_stale_temporaries, temp_prefix

FIG_DPI = 110
MAX_LABELLED_BLOCKS = 40  # above this, block names are not written on the axes
LABEL_WIDTH = 28  # characters of a block name on an axis (its tail: scopes share their heads)
NONFINITE = "non-finite"  # a NaN or infinite value (null in strict JSON); "-" is a value not computed


# ---------------------------------------------------------------------------------------- loading

def load_document(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """A JSON file written by another stage; `kind` is checked ('tqs-frontier', 'tqs-plan', 'tqs-eval').
    Its body is checked against the scores by `check_document`."""
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


def check_document(scores: dict[str, Any], doc: dict[str, Any] | None, where: str) -> None:
    """A one-line TqsError unless `doc` (a plan, frontier or eval report; None passes) was made for the
    scores' model, a plan or frontier from the scores' blocks, and every field the report reads is
    well-formed (a hand-edited file is one line, not a traceback)."""
    if doc is None:
        return
    if doc["kind"] == "tqs-eval":
        _check_eval_model(scores, doc, where)
        _check_eval_body(doc, where)
        return
    _check_model(scores, _model_entry(doc, "model", where), where, _evidence(scores, doc))
    (_check_plan_body if doc["kind"] == "tqs-plan" else _check_frontier_body)(doc, where)
    check_same_blocks(scores, doc, where)


def _model_entry(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    model = doc.get(key)
    if not isinstance(model, dict) or not isinstance(model.get("sha256"), str):
        raise _malformed(doc, where, f"'{key}' needs the model's sha256")
    return model


def _check_model(scores: dict[str, Any], model: dict[str, Any], where: str, evidence: dict[str, bool | None],
                 made: str = "made for") -> None:
    """`model` (path, sha256, identity, file_bytes: graph.same_model's record) must be the scores'.
    `evidence`: what else the document says of its model, per fact: the same as the scores', or None
    where it records nothing comparable."""
    ours = scores["model"]
    if model["sha256"] == ours.get("sha256"):
        return
    if ("identity" in model) == ("identity" in ours):
        raise TqsError(f"{where}: {made} another model than the scores (sha256 differs)")
    # Digests of two schemes (graph.same_model): a document from before the identity covered external
    # data names the .onnx file alone, so an external-data model's two digests differ. Then all else that
    # both record must agree, and something must.
    evidence = {"file size": _same(model.get("file_bytes"), ours.get("file_bytes")), **evidence}
    differ = [what for what, same in evidence.items() if same is False]
    if differ:
        raise TqsError(f"{where}: {made} another model than the scores (sha256 of another digest scheme, "
                       f"and the {' and the '.join(differ)} differ)")
    if all(same is None for same in evidence.values()):
        raise TqsError(f"{where}: cannot tell whether it was made for the scores' model: one of the two predates "
                       "the sha256 over external data and it records nothing else to compare; re-run that stage")


def _same(a: Any, b: Any) -> bool | None:
    return None if a is None or b is None else a == b


def _evidence(scores: dict[str, Any], doc: dict[str, Any]) -> dict[str, bool | None]:
    """What a plan (its weights) or frontier (its blocks) says of its model besides the digest."""
    if doc["kind"] == "tqs-plan":
        weights = doc.get("weights")
        ok = isinstance(weights, dict) and bool(weights)
        return {"weights": not set(weights) - set(scores["weights"]) if ok else None}
    blocks = doc.get("blocks")
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        return {"blocks": None}
    theirs = [(b.get("name"), b.get("size")) for b in blocks]
    return {"blocks": theirs == [(b["name"], b["size"]) for b in scores["blocks"]]}


def _check_eval_model(scores: dict[str, Any], doc: dict[str, Any], where: str) -> None:
    """An eval report records its reference model (`reference_model`); one written before that, only
    the reference's path, whose file name must then be the scores' model's."""
    if "reference_model" in doc:
        _check_model(scores, _model_entry(doc, "reference_model", where), where, {}, made="an evaluation against")
        return
    if not isinstance(doc.get("reference"), str):
        raise _malformed(doc, where, "it names no reference model")
    theirs, ours = Path(doc["reference"]).name, Path(str(scores["model"].get("path", ""))).name
    if theirs != ours:
        raise TqsError(f"{where}: an evaluation against {theirs}, not the scores' model {ours} "
                       "(it records no digest of its reference)")


def check_same_blocks(scores: dict[str, Any], doc: dict[str, Any], where: str) -> None:
    """A plan's or frontier's tiers are per block: made from scores of another block partition
    (`--blocks`), they would be drawn on the wrong blocks."""
    ours = [(b["id"], b["name"]) for b in scores["blocks"]]
    if doc["kind"] == "tqs-plan":
        _same_blocks(ours, [(b["id"], b["name"]) for b in doc["blocks"]], where)
        missing = [n for b in scores["blocks"] for n in b["weights"] if n not in doc["weights"]]
        if missing:
            raise TqsError(f"{where}: the plan gives no tier to weights {missing[:3]} of the scores' blocks")
        return
    if "blocks" in doc:  # frontiers written before it listed its blocks: their tiers' count is checked
        _same_blocks(ours, [(b["id"], b["name"]) for b in doc["blocks"]], where)
        sizes = [b["size"] for b in doc["blocks"]]
        if sizes != [b["size"] for b in scores["blocks"]]:
            raise TqsError(f"{where}: its blocks are not the scores' blocks (same names, other sizes)")
    for r in doc["points"] + doc["uniform"]:
        if len(r["tiers"]) != len(ours):
            raise TqsError(f"{where}: a point has tiers for {len(r['tiers'])} blocks, the scores have {len(ours)} "
                           "blocks: made from scores of another --blocks partition")


def _same_blocks(ours: list[tuple[int, str]], theirs: list[tuple[int, str]], where: str) -> None:
    if sorted(theirs) == sorted(ours):
        return

    def names(blocks: list[tuple[int, str]]) -> str:
        return ", ".join(n for _, n in sorted(blocks)[:4]) + (", ..." if len(blocks) > 4 else "")

    raise TqsError(f"{where}: its blocks are not the scores' blocks ({len(theirs)}: {names(theirs)}; the scores "
                   f"have {len(ours)}: {names(ours)}): made from scores of another --blocks partition; "
                   "report it with the scores it was made from")


# ------------------------------------------------------------------------------- document bodies

def _malformed(doc: dict[str, Any], where: str, what: str) -> TqsError:
    return TqsError(f"{where}: malformed {doc.get('kind')} document ({what})")


def _is_number(x: Any, null: bool = False) -> bool:
    """A number (inf and NaN allowed: in-memory documents keep them), or with `null` also None (how
    strict JSON writes them)."""
    return (null and x is None) or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _is_positive(x: Any) -> bool:
    return _is_number(x) and x > 0


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _check_tier(doc: dict[str, Any], where: str, text: Any, owner: str) -> None:
    if not isinstance(text, str):
        raise _malformed(doc, where, f"{owner}: a tier is a string, not {text!r}")
    try:
        parse_tier(text)
    except TqsError as exc:
        raise _malformed(doc, where, f"{owner}: {exc}") from None


def _check_errors(doc: dict[str, Any], where: str, entry: Any, owner: str, required: tuple[str, ...]) -> None:
    """One output's errors (eval's `compare`): numbers or null, a per-step list, optional truth figures."""
    if not isinstance(entry, dict):
        raise _malformed(doc, where, f"{owner}: errors are a mapping")
    for key in required:
        if key not in entry:
            raise _malformed(doc, where, f"{owner} lacks {key}")
    for key in ("mae_vs_fp32", "rmse_vs_fp32", "mae_vs_truth", "mae_fp32_vs_truth", "degradation_pct"):
        if key in entry and not _is_number(entry[key], null=True):
            raise _malformed(doc, where, f"{owner}: {key} is a number or null")
    steps = entry.get("mae_vs_fp32_per_step")
    if not isinstance(steps, list) or not steps or not all(_is_number(v, null=True) for v in steps):
        raise _malformed(doc, where, f"{owner}: mae_vs_fp32_per_step is a list of numbers (null where non-finite)")
    if not isinstance(entry.get("finite", True), bool):
        raise _malformed(doc, where, f"{owner}: finite is true or false")


def _check_notes(doc: dict[str, Any], where: str) -> None:
    if not _is_str_list(doc.get("notes", [])):
        raise _malformed(doc, where, "'notes' is a list of strings")


def _check_eval_body(doc: dict[str, Any], where: str) -> None:
    outputs = doc["outputs"]
    if not isinstance(outputs, dict) or not outputs:
        raise _malformed(doc, where, "'outputs' maps each trajectory output to its errors")
    for name, entry in outputs.items():
        _check_errors(doc, where, entry, f"output '{name}'", ("mae_vs_fp32", "rmse_vs_fp32"))
    if not isinstance(doc["compression"], dict) or not _is_positive(doc["compression"].get("on_disk")):
        raise _malformed(doc, where, "'compression' needs a positive on_disk ratio")
    _check_notes(doc, where)


def _check_plan_body(doc: dict[str, Any], where: str) -> None:
    blocks, weights = doc["blocks"], doc["weights"]
    if not isinstance(blocks, list) or not all(isinstance(b, dict) and isinstance(b.get("id"), int)
                                               and isinstance(b.get("name"), str) for b in blocks):
        raise _malformed(doc, where, "'blocks' is a list of blocks with an integer id and a name")
    if not isinstance(weights, dict):
        raise _malformed(doc, where, "'weights' maps weight names to tiers")
    for name, tier in weights.items():
        _check_tier(doc, where, tier, f"weight '{name}'")
    if not _is_positive(doc.get("planned_compression")):
        raise _malformed(doc, where, "'planned_compression' is a positive number")


def _check_frontier_body(doc: dict[str, Any], where: str) -> None:
    blocks = doc.get("blocks", [])
    if not isinstance(blocks, list) or not all(isinstance(b, dict) and isinstance(b.get("id"), int) and
                                               isinstance(b.get("name"), str) and isinstance(b.get("size"), int)
                                               for b in blocks):
        raise _malformed(doc, where, "'blocks' is a list of blocks with an integer id and size and a name")
    for key in ("points", "uniform"):
        if not isinstance(doc[key], list):
            raise _malformed(doc, where, f"'{key}' is a list of rows")
        for i, row in enumerate(doc[key]):
            _check_row(doc, where, row, f"{key}[{i}]")
    _check_notes(doc, where)


def _check_row(doc: dict[str, Any], where: str, row: Any, owner: str) -> None:
    """One frontier point or uniform baseline (pareto.run_point, run_uniform)."""
    if not isinstance(row, dict) or row.get("kind") not in ("tqs", "uniform"):
        raise _malformed(doc, where, f"{owner}: a row of kind tqs or uniform")
    label = "objective" if row["kind"] == "tqs" else "tier"
    if not isinstance(row.get(label), str):
        raise _malformed(doc, where, f"{owner}: a {row['kind']} row names its {label}")
    bad = [k for k in ("planned_compression", "on_disk_compression") if not _is_positive(row.get(k))]
    bad += [k for k in ("seconds",) if not (_is_number(row.get(k)) and row[k] >= 0)]
    bad += [k for k in ("target", "mae_vs_fp32") if not _is_number(row.get(k), null=True)]
    bad += [k for k in ("on_disk_bytes",) if not isinstance(row.get(k), int)]
    bad += [k for k in ("kept", "pareto") if not isinstance(row.get(k, False), bool)]
    bad += [k for k in ("model",) if not isinstance(row.get(k), (str, type(None)))]
    if bad:
        raise _malformed(doc, where, f"{owner}: {', '.join(bad)} missing or of the wrong type")
    if not isinstance(row.get("tiers"), list):
        raise _malformed(doc, where, f"{owner}: 'tiers' is a list of tiers, one per block")
    for tier in row["tiers"]:
        _check_tier(doc, where, tier, owner)
    if not isinstance(row.get("outputs"), dict) or not row["outputs"]:
        raise _malformed(doc, where, f"{owner}: 'outputs' maps each trajectory output to its errors")
    for name, entry in row["outputs"].items():
        _check_errors(doc, where, entry, f"{owner} output '{name}'", ())


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


def ranking_gammas(scores: dict[str, Any]) -> list[float]:
    """The gamma each block is ranked by, as the sweep ranks them (tables.format_ranking): its quant
    probe's, else its Gaussian probe's."""
    return [(b.get("quant") or b.get("gauss"))["gamma_task"] for b in scores["blocks"]]


def diverged(gamma: float | None) -> bool:
    """A probe whose rollout became non-finite (sweep: gamma inf). -inf is the opposite: no effect at all."""
    return gamma is None or math.isnan(gamma) or gamma == math.inf


def rank_key(gamma: float) -> tuple[int, float]:
    """Most sensitive first: diverged blocks, then by falling gamma (-inf last)."""
    return (0, 0.0) if diverged(gamma) else (1, -gamma)


def block_nonfinite(block: dict[str, Any]) -> bool:
    """Did a probe of the block diverge (the sweep's `nonfinite` flag; worked out for older scores)?"""
    if isinstance(block.get("nonfinite"), bool):
        return block["nonfinite"]
    return any(block.get(p) and diverged(block[p]["gamma_task"]) for p in ("quant", "gauss"))


def short_label(name: str, width: int = LABEL_WIDTH) -> str:
    """`name` cut from the left to `width` characters: scoped names share their heads, so the tail
    tells blocks apart ('…layers.0/self_attn/q_proj'); the cut moves to a '/' just after it."""
    if len(name) <= width:
        return name
    tail = name[-(width - 1):]
    cut = tail.find("/")
    return "…" + (tail[cut + 1:] if 0 <= cut < 4 and cut + 1 < len(tail) else tail)


def block_labels(scores: dict[str, Any], width: int = LABEL_WIDTH) -> list[str]:
    """Axis labels of the blocks in graph order, all different (a block id is added where two shortened
    names collide)."""
    labels = [short_label(b["name"], width) for b in scores["blocks"]]
    counts = Counter(labels)
    return [f"{label} #{b['id']}" if counts[label] > 1 else label for label, b in zip(labels, scores["blocks"])]


def plan_block_tiers(scores: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """The tier of every block in graph order, from the plan's weights (what `apply` writes, without the
    written form: `_stored_tier`); a block whose weights have different tiers gets them all ('fp32 / int8')."""
    return [" / ".join(tier_order({_stored_tier(plan["weights"][n]) for n in b["weights"]})) for b in scores["blocks"]]


def tier_order(tiers: set[str]) -> list[str]:
    """Tiers from the most to the least precise (bits, then finer scales first); a mixed block's tiers
    ('int8 / int4') after its most precise one's."""
    rank = {"channel": 0, "block": 1, "tensor": 2}

    def key(t: str):
        tier = parse_tier(t)
        return (-tier.bits, rank.get(tier.granularity, 3), tier.block_size, t)

    return sorted(tiers, key=lambda t: [key(part) for part in t.split(" / ")])


def _plain(text: Any) -> str:
    """Text from the user's model or files drawn as it is: every '$' escaped, or matplotlib reads what
    lies between two as mathtext (a superscript, or a parse error)."""
    return str(text).replace("$", r"\$")


def _float(v: Any) -> float:
    """A JSON number, null (a NaN or inf in strict JSON) as NaN."""
    return math.nan if v is None else float(v)


# -------------------------------------------------------------------------------------- the plots

def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        fig.savefig(path, dpi=FIG_DPI, format="png")
    finally:
        plt.close(fig)


def _block_axis(ax, scores: dict[str, Any]) -> None:
    ax.set_xlabel("block (graph order)")
    n = len(scores["blocks"])
    ax.set_xlim(-0.5, n - 0.5)
    if n <= MAX_LABELLED_BLOCKS:
        ax.set_xticks(range(n))
        ax.set_xticklabels([_plain(label) for label in block_labels(scores)], rotation=60, ha="right", fontsize=7)


def plot_gamma(scores: dict[str, Any], path: Path) -> None:
    """gamma per block in graph order, each probe a line; infinite values marked at the edges."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    x = list(range(len(scores["blocks"])))
    probes = {"quant": ("o-", "tab:blue"), "gauss": ("s--", "tab:orange")}
    gammas = {probe: block_gammas(scores, probe) for probe in probes}
    for probe, (style, color) in probes.items():
        if any(math.isfinite(v) for v in gammas[probe]):
            ax.plot(x, [v if math.isfinite(v) else math.nan for v in gammas[probe]], style, ms=4, color=color,
                    label=f"gamma_{probe}")
    ax.axhline(0, color="grey", lw=0.6)
    _mark_infinite(ax, {probe: (color, gammas[probe]) for probe, (_, color) in probes.items()})
    dead = [i for i, b in enumerate(scores["blocks"]) if b.get("dead")]
    if dead:
        ax.scatter(dead, [0] * len(dead), marker="x", color="red", zorder=3, label="dead")
    ax.set_ylabel("gamma (Eq. 1, per step)")
    ax.set_title(f"Sensitivity per block, T={scores.get('horizon')}")
    _block_axis(ax, scores)
    ax.legend(fontsize=8)
    _save(fig, path)


def _mark_infinite(ax, gammas: dict[str, tuple[Any, list[float]]]) -> None:
    """A diverged probe (gamma inf) as a triangle in a band at the top, -inf (no effect) at the bottom;
    the probes side by side."""
    if not any(abs(v) == math.inf for _, values in gammas.values() for v in values):
        return
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    for k, (probe, (color, values)) in enumerate(gammas.items()):
        shift = 0.16 * k - 0.08
        for where, marker, y, what in ((math.inf, "^", 0.96, f"{NONFINITE} (diverged)"),
                                       (-math.inf, "v", 0.04, "-inf (no effect)")):
            at = [i + shift for i, v in enumerate(values) if v == where]
            if at:
                ax.scatter(at, [y] * len(at), marker=marker, s=60, color=color, edgecolor="red", zorder=3,
                           transform=ax.get_xaxis_transform(), label=f"gamma_{probe} {what}")


def plot_roles(scores: dict[str, Any], path: Path) -> None:
    """Left: blocks ranked by gamma, colored by role. Right: gamma of every block grouped by role."""
    plt = _pyplot()
    roles = block_roles(scores)
    gammas = ranking_gammas(scores)
    colors = {r: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(sorted(set(roles)))}
    order = sorted(range(len(gammas)), key=lambda i: rank_key(gammas[i]))[:MAX_LABELLED_BLOCKS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, max(3.0, 0.22 * len(order) + 1.2)),
                                      gridspec_kw={"width_ratios": [3, 2]})
    _ranking_bars(left, [gammas[i] for i in order], [block_labels(scores)[i] for i in order],
                  [colors[roles[i]] for i in order])
    _roles_panel(right, gammas, roles, colors)
    _save(fig, path)


def _ranking_bars(ax, gammas: list[float], labels: list[str], colors: list[Any]) -> None:
    """One bar per block, most sensitive first; a diverged block's bar is hatched to beyond the longest
    finite one and labelled, a -inf one (no effect) has none."""
    reach = max([abs(g) for g in gammas if math.isfinite(g)] + [0.0]) * 1.15 or 1.0
    bars = ax.barh(range(len(gammas)), [g if math.isfinite(g) else reach if diverged(g) else 0.0 for g in gammas],
                   color=colors)
    for j, (bar, g) in enumerate(zip(bars, gammas)):
        if not math.isfinite(g):
            bar.set_hatch("//")
            bar.set_edgecolor("red")
            ax.text(bar.get_width(), j, f" {NONFINITE if diverged(g) else '-inf (no effect)'}", va="center",
                    fontsize=7, color="red")
    if any(diverged(g) for g in gammas):
        ax.set_xlim(right=reach * 1.45)  # room for the label
    ax.set_yticks(range(len(gammas)))
    ax.set_yticklabels([_plain(label) for label in labels], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("gamma")
    ax.set_title("Ranking (most sensitive first)")


def _roles_panel(ax, gammas: list[float], roles: list[str], colors: dict[str, Any]) -> None:
    """Each role's finite gammas and their mean; its diverged blocks counted at the right edge."""
    kinds = sorted(colors)
    for j, role in enumerate(kinds):
        ys = [g for g, r in zip(gammas, roles) if r == role and math.isfinite(g)]
        ax.scatter(ys, [j] * len(ys), color=colors[role], alpha=0.8)
        if ys:
            ax.plot([sum(ys) / len(ys)] * 2, [j - 0.3, j + 0.3], color="black", lw=1.5)
        lost = sum(1 for g, r in zip(gammas, roles) if r == role and diverged(g))
        if lost:
            ax.text(0.99, j, f"{lost} {NONFINITE} ▶", transform=ax.get_yaxis_transform(), ha="right",
                    va="center", fontsize=7, color="red")
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels([_plain(f"{k} ({roles.count(k)})") for k in kinds], fontsize=8)
    ax.set_xlabel("gamma (bar: mean)")
    ax.set_title("By consumer op")


def plot_frontier(frontier: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    points = [p for p in frontier["points"] if p.get("kept")]
    for obj in sorted({p["objective"] for p in points}):
        pts = sorted((p for p in points if p["objective"] == obj), key=lambda p: p["on_disk_compression"])
        ax.plot([p["on_disk_compression"] for p in pts], [_float(p["mae_vs_fp32"]) for p in pts], "o-", ms=5,
                label=_plain(f"TQS ({obj})"))
    front = sorted((p for p in frontier["points"] + frontier["uniform"] if p.get("pareto")),
                   key=lambda p: p["on_disk_compression"])
    ax.plot([p["on_disk_compression"] for p in front], [_float(p["mae_vs_fp32"]) for p in front], color="grey",
            lw=4, alpha=0.35, zorder=0, label="Pareto front (all points)")
    # Labels of neighbouring uniform points (by compression) alternate below and above their point: next
    # to each other on the log axis (int8 and int8/channel) they were printed over one another.
    # Points at one place (int8/channel and its /gptq twin: the same bytes, MAEs a few percent apart)
    # share one label, their tiers one per line.
    placed: list[tuple[float, float, list[str]]] = []
    for u in sorted(frontier["uniform"], key=lambda u: u["on_disk_compression"]):
        x, y = u["on_disk_compression"], _float(u["mae_vs_fp32"])
        ax.scatter(x, y, marker="s", s=45, color="tab:red", zorder=3)
        if not math.isfinite(y):
            continue
        near = next((p for p in placed if abs(math.log(x / p[0])) < 0.03 and y > 0 and p[1] > 0
                     and abs(math.log(y / p[1])) < 0.15), None)
        if near:
            near[2].append(u["tier"])
        else:
            placed.append((x, y, [u["tier"]]))
    for i, (x, y, tiers) in enumerate(placed):
        ax.annotate(_plain("\n".join(tiers)), (x, y), fontsize=7, xytext=(4, -10 if i % 2 == 0 else 6),
                    textcoords="offset points", va="top" if i % 2 == 0 else "bottom")
    if frontier["uniform"]:
        ax.scatter([], [], marker="s", color="tab:red", label="uniform (one tier)")
    rows = frontier["points"] + frontier["uniform"]
    _log_axis(ax, "x", [p["on_disk_compression"] for p in rows], suffix="x")
    maes = [_float(p["mae_vs_fp32"]) for p in rows]
    if _all_positive(maes):
        _log_axis(ax, "y", maes)
    ax.set_xlabel("on-disk compression (log scale)")
    ax.set_ylabel(f"rollout MAE vs FP32 ({frontier.get('eval_contexts')} contexts x {frontier.get('horizon')} steps)")
    ax.set_title("Compression frontier")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _all_positive(values: list[float]) -> bool:
    """Whether a log axis can show the finite values (the non-finite ones are gaps)."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and all(v > 0 for v in finite)


def _log_axis(ax, which: str, values: list[float], suffix: str = "") -> None:
    """A log axis with plain tick labels (2x, 0.5) instead of 2 x 10^0; minor ticks labelled only within
    one decade, where there may be no major tick to label. Non-finite values are ignored."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    fmt = FuncFormatter(lambda v, _pos: f"{v:g}{suffix}")
    axis.set_major_formatter(fmt)
    values = [v for v in values if math.isfinite(v)]
    spread = max(values) / min(values) if values and min(values) > 0 else math.inf
    # Within two decades the 2 and 5 minor ticks are labelled too: points at 2.3x had no label below 10x.
    some = FuncFormatter(lambda v, _pos: f"{v:g}{suffix}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else "")
    axis.set_minor_formatter(fmt if spread < 10 else some if spread < 100 else NullFormatter())


def step_curves(frontier: dict[str, Any] | None, eval_doc: dict[str, Any] | None,
                most: int = 6) -> list[tuple[str, list[float], bool]]:
    """(label, MAE per step, is_baseline) curves: the eval report's outputs and spread frontier points
    with the frontier's uniform baselines, whichever are given. Non-finite steps (null in JSON) are NaN,
    and the label says from which step."""
    curves = []
    if eval_doc is not None:
        for k, e in eval_doc["outputs"].items():
            curves.append(_curve(f"{k} ({eval_doc['compression']['on_disk']:.2f}x)", e["mae_vs_fp32_per_step"], False))
    if frontier is None:
        return curves
    kept = sorted((p for p in frontier["points"] if p.get("kept")), key=lambda p: p["on_disk_compression"])
    step = max(1, math.ceil(len(kept) / most))
    for p in kept[::step] + [u for u in frontier["uniform"]]:
        per_output = [[_float(v) for v in o["mae_vs_fp32_per_step"]] for o in p["outputs"].values()]
        label = f"{p['tier']} (uniform)" if p["kind"] == "uniform" else f"TQS {p['on_disk_compression']:.2f}x"
        curves.append(_curve(label, [sum(v) / len(v) for v in zip(*per_output)], p["kind"] == "uniform"))
    return curves


def first_nonfinite(per_step: list[Any]) -> int | None:
    """The first rollout step (from 1) whose error is NaN, inf or null, if any."""
    return next((t for t, v in enumerate(per_step, 1) if not math.isfinite(_float(v))), None)


def _curve(label: str, per_step: list[Any], baseline: bool) -> tuple[str, list[float], bool]:
    values = [_float(v) for v in per_step]
    first = first_nonfinite(values)
    if first is not None:
        label += f", {NONFINITE} from step {first}"
    return label, values, baseline


def plot_steps(curves: list[tuple[str, list[float], bool]], path: Path) -> None:
    """MAE per step; a curve that becomes non-finite stops there, at a dotted line of its color."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    n_main = max(1, sum(not baseline for _, _, baseline in curves))
    main_i = base_i = 0
    for label, per_step, baseline in curves:
        # TQS curves in a sequential map (by compression), baselines in distinct dashed colors.
        # Past ten baselines the colors repeat: the dash pattern changes instead (two of eleven were the
        # same blue dashes); each TQS curve gets its own marker, so one drawn over another still shows.
        if baseline:
            color, ls, marker = plt.get_cmap("tab10")(base_i % 10), ("--", "-.", ":")[base_i // 10 % 3], None
            base_i += 1
        else:
            color = plt.get_cmap("viridis")(0.9 * main_i / max(1, n_main - 1))
            ls, marker = "-", "os^Dv<>ph*"[main_i % 10]
            main_i += 1
        finite = [v if math.isfinite(v) else math.nan for v in per_step]
        single = sum(math.isfinite(v) for v in finite) == 1
        ax.plot(range(1, len(per_step) + 1), finite, ls=ls, lw=1.0 if baseline else 1.8, color=color,
                marker="o" if single else marker, markevery=None if single else max(1, len(per_step) // 8),
                ms=4, label=_plain(label))
        first = first_nonfinite(per_step)
        if first is not None:
            ax.axvline(first, color=color, ls=":", lw=1.5)
    values = [v for _, c, _ in curves for v in c]
    if _all_positive(values):
        _log_axis(ax, "y", values)
    if values and not any(math.isfinite(v) for v in values):
        ax.set_yticks([])
        ax.text(0.5, 0.5, f"every error is {NONFINITE}: the rollout diverged", transform=ax.transAxes,
                ha="center", va="center", color="red")
    ax.set_xlim(0.5, max([len(c) for _, c, _ in curves] + [1]) + 0.5)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole (it drew 2.5, 7.5)
    ax.set_xlabel("rollout step")
    ax.set_ylabel("MAE vs FP32")
    ax.set_title("Error growth over the rollout")
    ax.grid(True, alpha=0.3)
    # beside the axes, not over the curves (the lower-left ones were hidden)
    ax.legend(fontsize=7, ncol=1 if len(curves) <= 12 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)
    _save(fig, path)


def _stored_tier(tier: str) -> str:
    """A tier without its written form: `int8/channel/load` stores what `int8/channel` does (plans name
    the form each weight is written in, frontiers the tier), so the map gives them one colour."""
    try:
        return str(parse_tier(tier).base)
    except TqsError:
        return tier


def tier_rows(scores: dict[str, Any], plan: dict[str, Any] | None,
              frontier: dict[str, Any] | None) -> list[tuple[str, list[str]]]:
    """(label, tier per block in graph order) rows: the plan first, then kept frontier points by size;
    tiers without their written form (`_stored_tier`)."""
    rows = []
    if plan is not None:
        rows.append((f"plan {plan['planned_compression']:.2f}x", plan_block_tiers(scores, plan)))
    if frontier is not None:
        kept = sorted((p for p in frontier["points"] if p.get("kept")), key=lambda p: p["on_disk_compression"])
        seen = set()
        for p in kept:
            if tuple(p["tiers"]) not in seen:
                seen.add(tuple(p["tiers"]))
                rows.append((f"{p['on_disk_compression']:.2f}x {p['objective']}", [_stored_tier(t) for t in p["tiers"]]))
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
    ax.set_yticklabels([_plain(label) for label, _ in rows], fontsize=7)
    _block_axis(ax, scores)
    ax.set_title("Tier per block (graph order)")
    ax.legend(handles=[Patch(color=cmap(i), label=_plain(t)) for i, t in enumerate(tiers)], fontsize=7,
              bbox_to_anchor=(1.01, 1), loc="upper left")
    _save(fig, path)


# ------------------------------------------------------------------------------------------- page

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#222;padding:0 16px}h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;
border-bottom:1px solid #ddd;padding-bottom:4px}.meta{color:#555;font-size:13px}img{max-width:100%;
border:1px solid #eee}table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ddd;
padding:3px 7px;text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}.note{color:#7a5a00;
font-size:12px}td.bad{color:#b00020;font-weight:600}figcaption{font-size:12px;color:#555;margin:4px 0 12px}"""


def _table(headers: list[str], rows: list[list[Any]], left: int = 1) -> str:
    """An HTML table; the first `left` columns are left-aligned, non-finite values stand out."""
    def cell(tag: str, i: int, v: Any) -> str:
        classes = " ".join(c for c, on in (("l", i < left), ("bad", tag == "td" and _is_bad(v))) if on)
        attr = f' class="{classes}"' if classes else ""
        return f"<{tag}{attr}>{html.escape(_fmt(v))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _is_bad(v: Any) -> bool:
    return v == NONFINITE or (isinstance(v, float) and not math.isfinite(v))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else NONFINITE if math.isnan(v) else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _value(entry: dict[str, Any], key: str) -> Any:
    """A figure of an eval output: None (shown '-') where not computed, NONFINITE where strict JSON has null."""
    if key not in entry:
        return None
    return NONFINITE if entry[key] is None else entry[key]


def _finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def degradation(entry: dict[str, Any], unknown: Any) -> Any:
    """degradation_pct of an eval output or frontier row: a number, inf, NONFINITE, or None where not
    computed. Strict JSON writes inf and NaN alike as null: an infinite one is told by its MAEs (the
    FP32 model matches the truth exactly, the candidate does not: evaluate.degradation_percent); `unknown`
    is what a null with no MAEs to tell by means."""
    if "degradation_pct" not in entry:
        return None
    if entry["degradation_pct"] is not None:
        return entry["degradation_pct"]
    mae, mae_ref = entry.get("mae_vs_truth"), entry.get("mae_fp32_vs_truth")
    if _finite(mae) and _finite(mae_ref):
        return math.inf if mae_ref == 0 and mae > 0 else NONFINITE
    return unknown


def _row_degradation(row: dict[str, Any]) -> Any:
    """A frontier row's is the mean of its outputs' (pareto.error_summary): inf where one output's is."""
    per_output = [degradation(o, NONFINITE) for o in row["outputs"].values() if "degradation_pct" in o]
    if row.get("degradation_pct") is None and per_output:
        if any(v == NONFINITE for v in per_output):
            return NONFINITE
        if any(v == math.inf for v in per_output):
            return math.inf
    return degradation(row, None)


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _notes(notes: list[str]) -> str:
    return "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)


def blocks_table(scores: dict[str, Any], plan: dict[str, Any] | None) -> str:
    roles = block_roles(scores)
    tiers = plan_block_tiers(scores, plan) if plan else [None] * len(scores["blocks"])
    rows = [[b["id"], b["name"], roles[i], b["size"], (b.get("quant") or {}).get("gamma_task"),
             (b.get("gauss") or {}).get("gamma_task"), bool(b.get("dead")),
             NONFINITE if block_nonfinite(b) else "", tiers[i]]
            for i, b in enumerate(scores["blocks"])]
    return _table(["id", "block", "role", "params", "gamma_quant", "gamma_gauss", "dead", "diverged", "plan tier"],
                  rows, left=3)


def frontier_table(frontier: dict[str, Any]) -> str:
    rows = [[r["kind"], r["objective"] if r["kind"] == "tqs" else r["tier"], r["target"], r["planned_compression"],
             r["on_disk_compression"], r["on_disk_bytes"], NONFINITE if r["mae_vs_fp32"] is None else r["mae_vs_fp32"],
             r.get("mae_vs_truth"), _row_degradation(r), r["seconds"], bool(r.get("pareto")), r.get("model")]
            for r in frontier["points"] + frontier["uniform"] if r.get("kept")]
    table = _table(["kind", "objective / tier", "target", "planned", "on disk", "bytes", "MAE vs FP32",
                    "MAE vs truth", "degr. %", "s", "pareto", "model"], rows, left=2)
    return table + _notes(frontier.get("notes", []))


def eval_table(doc: dict[str, Any]) -> str:
    """Each output's errors, whether its rollout stayed finite, and a note where it did not."""
    finite = {True: "yes", False: "no"}
    rows = [[k, finite.get(e.get("finite"), "-"), _value(e, "mae_vs_fp32"), _value(e, "rmse_vs_fp32"),
             _value(e, "mae_vs_truth"), _value(e, "mae_fp32_vs_truth"), degradation(e, NONFINITE)]
            for k, e in doc["outputs"].items()]
    table = _table(["output", "finite", "MAE vs FP32", "RMSE vs FP32", "MAE vs truth", "FP32 vs truth", "degr. %"],
                   rows)
    lost = []
    for k, e in doc["outputs"].items():
        first = first_nonfinite(e["mae_vs_fp32_per_step"])
        if first is not None or e.get("finite") is False:
            lost.append(k if first is None else f"{k} (from step {first})")
    diverged_note = [f"the candidate diverged: non-finite values in {', '.join(lost)}"] if lost else []
    meta = ""
    if isinstance(doc.get("candidate"), str) and isinstance(doc.get("reference"), str):
        meta = (f'<p class="meta">{html.escape(Path(doc["candidate"]).name)} against '
                f"{html.escape(Path(doc['reference']).name)}</p>")
    return meta + table + _notes(diverged_note + doc.get("notes", []))


def header(scores: dict[str, Any]) -> str:
    m = scores["model"]
    return (f"<h1>tqs-onnx report: {html.escape(Path(m['path']).name)}</h1>"
            f'<p class="meta">{m["file_bytes"]:,} bytes, {m.get("parameters", 0):,} parameters in '
            f"{len(scores['blocks'])} blocks; sweep of {scores.get('contexts')} contexts x {scores.get('horizon')} steps "
            f"on {html.escape(str(scores.get('device')))}, {scores.get('forward_passes', 0):,} forward passes; "
            f"sha256 {html.escape(str(m.get('sha256'))[:16])}...</p>")


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
    rows = tier_rows(scores, plan, frontier)
    if rows:
        out.append(("Tier map", "tiers.png", lambda p: plot_tier_map(scores, rows, p), ""))
    return out


CAPTIONS = {
    "gamma.png": "gamma_task (Eq. 1 at T_max) of the quantization and Gaussian probes; higher means perturbations of "
                 "this block grow faster along the rollout. A triangle at the top: the probe's rollout became "
                 "non-finite (gamma inf).",
    "roles.png": "Blocks ranked by gamma, colored by the op type that consumes their weights (a diverged block first, "
                 "hatched); right: gamma per role.",
    "frontier.png": "Rollout MAE against the FP32 model vs on-disk compression for the kept TQS point of every target, "
                    "and every single-tier (uniform) allocation. The grey band joins the points no other point "
                    "beats in both size and error.",
    "steps.png": "MAE against the FP32 model at each rollout step (dashed, when a frontier is given: its uniform "
                 "baselines); a dotted line marks the step where a curve becomes non-finite.",
    "tiers.png": "The tier of every block, blocks in graph order; one row per plan or kept frontier point.",
}


REPORT_FILES = ("index.html", *CAPTIONS)  # what write_report may write into its folder
GENERATOR = '<meta name="generator" content="tqs-onnx report">'  # marks a page as ours: it may be replaced


OLD_TITLE = "<title>tqs-onnx report</title>"  # how pages of earlier versions, without GENERATOR, begin


def check_report_folder(out: Path) -> None:
    """Refuse a folder whose index.html or plot names hold files a tqs-onnx report did not write (a
    report replaces its page and removes the plots an earlier report drew that it does not)."""
    out = Path(os.path.realpath(out))
    page = out / "index.html"
    if page.is_file():
        with open(page, "rb") as f:
            head = f.read(4096)
        ours = GENERATOR.encode() in head or OLD_TITLE.encode() in head
        if not ours:
            raise TqsError(f"{out}: holds an index.html that tqs-onnx report did not write; choose another folder")
    elif out.is_dir():
        found = [n for n in REPORT_FILES if (out / n).exists()]
        if found:
            raise TqsError(f"{out}: holds {found[0]} but no report page of tqs-onnx; choose another folder")


def write_report(out_dir: str | os.PathLike, scores: dict[str, Any], frontier: dict[str, Any] | None = None,
                 plan: dict[str, Any] | None = None, eval_doc: dict[str, Any] | None = None) -> Path:
    """Draw every plot the inputs allow and write index.html into out_dir; returns the page's path.

    All or nothing: everything is drawn into a temporary folder inside out_dir first (the folder may be
    writable where its parent is not: a CI artifact folder), so a run that fails leaves the earlier
    report as it was; then the earlier page is removed, the plots moved in and the new page last (an
    earlier report's plots that this one does not draw are removed)."""
    out = Path(os.path.realpath(out_dir))
    check_output_target(out, TEMP_ROOM)
    check_report_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # staging folders beside it, where earlier versions made them
    inside = out / out.name  # names the staging folder ".<out>.<host>-<pid>.<8>" inside out
    remove_stale_temporaries(inside)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(inside), dir=out))
    try:
        _move_in(staging, out, _render(staging, scores, frontier, plan, eval_doc))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Path(out_dir) / "index.html"


def _render(folder: Path, scores: dict[str, Any], frontier: dict[str, Any] | None, plan: dict[str, Any] | None,
            eval_doc: dict[str, Any] | None) -> list[str]:
    """Every plot and the page into `folder`, each file synced; their names, index.html last."""
    body, names = [header(scores)], []
    for title, png, plot, extra in sections(scores, frontier, plan, eval_doc):
        _synced(folder / png, plot)
        names.append(png)
        body.append(f"<h2>{html.escape(title)}</h2>{_figure(png, CAPTIONS[png])}{extra}")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>tqs-onnx report</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    _synced(folder / "index.html", lambda p: p.write_text(page, encoding="utf-8"))  # as it declares
    return [*names, "index.html"]


def _synced(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _move_in(staging: Path, out: Path, names: list[str]) -> None:
    """The staged files into `out`, the page last; no page stands over images it did not draw."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").unlink(missing_ok=True)
    for name in REPORT_FILES:
        if name not in names:
            (out / name).unlink(missing_ok=True)
    for name in names:
        os.replace(staging / name, out / name)
