"""Allocation: tiers per block under a storage budget.

Two objectives:
- ``paper``: the TQS paper's Algorithm 2 (dead-block rule, FP32 share, MCKP on gamma' 2^-b or greedy).
- ``measured`` (default): knapsack on the measured trajectory damage D[l, k] of each block at each
  tier; then (refine.py) a joint-rollout check against uniform quantization and a bounded local search.
Budgets count true storage (packed integers, scales, node headers) against the original file, so
planned compression is what lands on disk; but for the paper objective's `exact` variant, which
budgets parameter bits as the paper does (its files are larger than 1/C by scales and fixed parts).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pulp

from tqs_onnx import SCHEMA_VERSION, __version__
from tqs_onnx.errors import TqsError
from tqs_onnx.prepare import PASSES_VERSION
from tqs_onnx.rounding import ROUNDING_VERSION
from tqs_onnx.tiers import Tier, for_weight, needed_opset, overhead_bytes, parse_tier, parse_tiers, written_form
from tqs_onnx.util import read_json


@dataclass
class BlockInfo:
    """What the allocator knows of a block: its weights' shapes and its scores."""

    id: int
    name: str
    weights: list[str]
    size: int
    gamma: float
    dead: bool
    damage: dict[str, float]

    def measured(self, tier: Tier) -> float | None:
        """The sweep's damage of `tier`, or of the same values written with DequantizeLinear (a `/load`
        tier's); None where neither was measured."""
        return self.damage.get(str(tier), self.damage.get(str(tier.base)))

    def damage_at(self, tier: Tier) -> float:
        """Measured mean squared trajectory divergence at `tier`: 0 at fp32, inf where not measured."""
        if tier.is_identity:
            return 0.0
        d = self.measured(tier)
        return math.inf if d is None else d


@dataclass
class Problem:
    """A budgeted tier assignment: costs[l][k] bytes, blocks, tiers, fixed bytes and the target."""

    blocks: list[BlockInfo]
    tiers: list[Tier]
    costs: list[list[int]]  # bytes of block l at tier k
    fixed_bytes: int  # bytes of everything no tier touches
    file_bytes: int
    target: float

    graph_bytes: int = 0  # the prepared graph's size, to correct its length prefix (0: no correction)
    quantizable_bytes: int = 0  # what the blocks' weights take in the prepared graph
    # Bytes the graph gains when apply converts it to an opset a tier needs (keyed by that opset).
    opset_deltas: dict[int, int] = field(default_factory=dict)
    half: list[bool] = field(default_factory=list)  # per block: holds float16 weights (fp16 scales: opset 19)
    decode: str = "auto"  # how integer tiers are written per weight (tiers.written_form)
    stored_bits: list[int] = field(default_factory=list)  # per block: its weights' bits as stored

    def opset_delta(self, assign: list[int]) -> int:
        """What converting the graph to the opset the assigned tiers need adds to the file."""
        need = max((needed_opset(self.tiers[k], bool(self.half) and self.half[l]) for l, k in enumerate(assign)
                    if not self.tiers[k].is_identity), default=0)
        return self.opset_deltas.get(need, 0)

    @property
    def limit(self) -> int:
        """The most bytes the written file may take. A target given as some plan's own compression
        (file_bytes / planned_bytes, a float) admits that plan: the quotient's rounding error (a few
        ulps) must not floor it a byte below."""
        return math.floor(self.file_bytes / self.target * (1 + 1e-13))

    @property
    def budget(self) -> int:
        """Bytes the blocks may take. A smaller graph may need a shorter length prefix; count the one
        it will have at the limit, so a plan of exactly the limit (e.g. a uniform one) still fits."""
        # The conversion the costliest tier set would need is kept out of the budget (a few bytes, often 0).
        delta = max([0, *self.opset_deltas.values()])
        room = self.limit - self.fixed_bytes
        if not self.graph_bytes:
            return room - delta
        # The most blocks-plus-conversion bytes X whose file fits: X plus the length prefix of a graph
        # holding X within room plus today's prefix. X + prefix(X) grows with X and a prefix takes 1
        # to 10 bytes: start at the most X can be and step down (estimating the prefix at one X and
        # spending the byte it saves could push the graph back over a 2^(7k) boundary, a file one byte
        # over).
        rest = self.graph_bytes - self.quantizable_bytes
        x = room + _varint_len(self.graph_bytes) - 1
        while x + _varint_len(max(rest + x, 1)) > room + _varint_len(self.graph_bytes):
            x -= 1
        return x - delta

    def total_bytes(self, assign: list[int]) -> int:
        """The file the plan writes: fixed part, blocks, and the graph length prefix as it will be."""
        blocks = self.bytes_of(assign) + self.opset_delta(assign)
        if not self.graph_bytes:
            return self.fixed_bytes + blocks
        planned_graph = self.graph_bytes + blocks - self.quantizable_bytes
        return self.fixed_bytes + blocks + _varint_len(planned_graph) - _varint_len(self.graph_bytes)

    def fits(self, assign: list[int]) -> bool:
        """The plan's file is within the limit (exact; `budget` is the solvers' conservative form)."""
        return self.total_bytes(assign) <= self.limit

    def bytes_of(self, assign: list[int]) -> int:
        return sum(self.costs[l][k] for l, k in enumerate(assign))

    def achievable(self) -> tuple[float, float]:
        """Lowest and highest compression the tiers reach."""
        lo = self.fixed_bytes + sum(min(c) for c in self.costs) + max([0, *self.opset_deltas.values()])
        hi = self.fixed_bytes + sum(max(c) for c in self.costs)
        return self.file_bytes / hi, self.file_bytes / lo


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


@dataclass
class Allocation:
    assign: list[int]  # tier index per block
    objective: str
    solver: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------- loading

def load_scores(path: str | os.PathLike, sizes: bool = True) -> dict[str, Any]:
    """A scores file, checked. With `sizes` (allocating from it) its graph passes must be this
    version's: the sizes it records are those of the graph the passes prepared."""
    path = Path(path)
    doc = read_json(path, "scores")
    if not isinstance(doc, dict) or doc.get("kind") != "tqs-scores":
        raise TqsError(f"{path}: not a tqs-onnx scores file")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise TqsError(f"{path}: scores schema {doc.get('schema_version')!r} is not {SCHEMA_VERSION} (written by another version of tqs-onnx?)")
    _check_scores(doc, path)
    if sizes and doc.get("passes") != PASSES_VERSION:
        raise TqsError(f"{path}: scores of a tqs-onnx whose graph passes differ ({doc.get('passes') or 'not recorded'}; "
                       f"now {PASSES_VERSION}): their sizes are not those of the graph written now; re-run the sweep")
    return doc


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    """A number, inf allowed (a diverged probe), NaN not."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _check_scores(doc: dict[str, Any], path: Path) -> None:
    """Every field the allocator reads exists with the right type, and the blocks cover the quantizable
    weights once each (the file may be hand-edited: a wrong field is one line, not a traceback)."""
    def bad(what: str) -> TqsError:
        return TqsError(f"{path}: malformed scores file ({what})")

    model, weights, blocks = doc.get("model"), doc.get("weights"), doc.get("blocks")
    if not isinstance(model, dict) or not all(_is_int(model.get(k)) for k in ("file_bytes", "fixed_bytes",
                                                                               "quantizable_bytes")):
        raise bad("'model' needs integer file_bytes, fixed_bytes and quantizable_bytes")
    if model["file_bytes"] <= 0 or model["fixed_bytes"] < 0 or model["quantizable_bytes"] < 0 \
            or not _is_int(model.get("graph_bytes", 0)):
        raise bad("'model' needs a positive file_bytes, fixed and quantizable bytes >= 0 and an integer graph_bytes")
    deltas = model.get("opset_graph_delta") or {}
    if not isinstance(deltas, dict) or not all(str(k).isdecimal() and _is_int(v) for k, v in deltas.items()):
        raise bad("'model.opset_graph_delta' maps opsets to byte counts")
    if not isinstance(doc.get("config"), dict):
        raise bad("'config' missing")
    if not isinstance(weights, dict) or not weights:
        raise bad("'weights' missing or empty")
    for name, w in weights.items():
        if not isinstance(w, dict) or not isinstance(w.get("shape"), list) or not all(
                _is_int(d) and d >= 0 for d in w["shape"]) or not _is_int(w.get("bits")) or w["bits"] <= 0:
            raise bad(f"weight '{name}' needs a shape of integers and integer bits")
        rank = len(w["shape"])
        for axis in ("channel_axis", "block_axis"):
            a = w.get(axis)
            if a is not None and not (_is_int(a) and -rank <= a < rank):
                raise bad(f"weight '{name}': {axis} {a!r} is no axis of its shape")
            if a is not None and a < 0:  # counted as written (the writer's axis attribute is the positive one)
                w[axis] = a + rank
        if not isinstance(w.get("consumer_ops") or [], list):
            raise bad(f"weight '{name}': consumer_ops is a list")
    if not isinstance(blocks, list) or not blocks:
        raise bad("'blocks' missing or empty")
    seen_ids, owner = set(), {}
    for b in blocks:
        if not isinstance(b, dict) or not _is_int(b.get("id")) or not isinstance(b.get("name"), str) \
                or not isinstance(b.get("weights"), list) or not b["weights"] or not _is_int(b.get("size")):
            raise bad("every block needs an integer id and size, a name and a list of weights")
        if b["size"] <= 0:
            raise bad(f"block {b['id']}: size must be a positive number of parameters, not {b['size']}")
        if b["id"] in seen_ids:
            raise bad(f"block id {b['id']} appears twice")
        seen_ids.add(b["id"])
        missing = [n for n in b["weights"] if not isinstance(n, str) or n not in weights]
        if missing:
            raise bad(f"block {b['id']} names weights {missing[:3]} that 'weights' does not describe")
        for n in b["weights"]:
            if n in owner:
                raise bad(f"weight '{n}' is in blocks {owner[n]} and {b['id']}")
            owner[n] = b["id"]
        probes = [b.get(k) for k in ("quant", "gauss") if b.get(k) is not None]
        if not probes or not all(isinstance(p, dict) and _is_number(p.get("gamma_task")) for p in probes):
            raise bad(f"block {b['id']} needs a quant or gauss score with a gamma_task number (not NaN)")
        damage = b.get("damage", {})
        if not isinstance(damage, dict) or not all(isinstance(k, str) and _is_number(v) and v >= 0
                                                   for k, v in damage.items()):
            raise bad(f"block {b['id']}: damage maps tiers to measured divergences >= 0")
    unplaced = [n for n in weights if n not in owner]  # the table lists the quantizable weights
    if unplaced:
        raise bad(f"weights {unplaced[:3]} are in no block (a block removed?)")


def block_gamma(block: dict[str, Any], probe: str) -> float:
    chosen = block.get(probe) or block.get("quant") or block.get("gauss")
    if chosen is None:
        raise TqsError(f"block {block['id']}: no {probe} score in the scores file")
    return float(chosen["gamma_task"])


def build_problem(scores: dict[str, Any], tiers: list[Tier], target: float, probe: str = "quant",
                  decode: str = "auto") -> Problem:
    """Costs per block and tier from the scores file's weight table, each weight in the form `decode`
    writes it in (tiers.written_form)."""
    if not target or target < 1 or not math.isfinite(target):
        raise TqsError(f"compression target must be a number >= 1 (1: the original file's size), not {target}")
    winfo = scores["weights"]
    blocks, costs = [], []
    for b in scores["blocks"]:
        blocks.append(BlockInfo(b["id"], b["name"], b["weights"], b["size"], block_gamma(b, probe),
                                bool(b.get("dead")), b.get("damage", {})))
        costs.append([sum(_weight_cost(n, winfo[n], weight_tier(winfo[n], t, decode)) for n in b["weights"])
                      for t in tiers])
    m = scores["model"]
    half = [any(winfo[n].get("dtype") == "float16" for n in b.weights) for b in blocks]
    deltas = {int(k): int(v) for k, v in (m.get("opset_graph_delta") or {}).items()}
    stored_bits = [sum(math.prod(winfo[n]["shape"]) * winfo[n]["bits"] for n in b.weights) for b in blocks]
    return Problem(blocks, tiers, costs, m["fixed_bytes"], m["file_bytes"], target, m.get("graph_bytes", 0),
                   m["quantizable_bytes"], opset_deltas_for(deltas, tiers, half), half, decode, stored_bits)


def opset_deltas_for(deltas: dict[int, int], tiers: list[Tier], half: list[bool]) -> dict[int, int]:
    """Of the graph's opset conversions (opset -> bytes it adds), those some tier may need on blocks
    with these float16 flags."""
    needed = {needed_opset(t, h) for t in tiers for h in set(half)}
    return {k: v for k, v in deltas.items() if k in needed}


def weight_tier(w: dict[str, Any], tier: Tier, decode: str) -> Tier:
    """The tier a weight is written at when its block is at `tier` (its form: tiers.written_form)."""
    return written_form(tier, w.get("consumer_ops") or [], tuple(w["shape"]), decode, w.get("fused_dq"),
                        bool(w.get("const_lookup")), w.get("channel_axis"))


def _weight_cost(name: str, w: dict[str, Any], tier: Tier) -> int:
    shape = tuple(w["shape"])
    axes = (w["channel_axis"], w["block_axis"])
    tier = for_weight(tier, w.get("dtype", "float32"))  # a float16 weight's scales are float16
    return tier.storage_bytes(shape, *axes, w["bits"]) + overhead_bytes(name, tier, shape, axes, w["bits"])


def check_feasible(p: Problem) -> None:
    lo, hi = p.achievable()
    if p.budget < sum(min(c) for c in p.costs):
        low, high = math.ceil(lo * 100) / 100, math.floor(hi * 100) / 100  # shown inside the true range
        span = f"{low:.2f}x to {high:.2f}x" if low < high else f"only {hi:.4g}x"
        raise TqsError(f"compression {p.target:g}x is not reachable with tiers "
                       f"{','.join(map(str, p.tiers))}: achievable {span}")


# ----------------------------------------------------------------------------------------- solvers

MCKP_MAX_STATES = 50_000  # Pareto states per group before the exact solver hands over to pulp/CBC


def solve_mckp(values: list[list[float]], costs: list[list[int]], budget: int,
               allowed: list[list[bool]] | None = None) -> list[int]:
    """Multiple-choice knapsack: one option per group, minimise value, total cost <= budget.

    Exact: dynamic programming over the Pareto frontier of (cost, value) states, group by group (the
    values are compared as they are: measured damages span 1e-6 to 1e14 and the paper's gamma 2^-b
    spans 2^-32 to 2^-1, beyond an LP solver's tolerances, which picked plans up to 2% worse). Of
    equal values the cheaper plan wins, so storage that buys nothing is never spent. Should the
    frontier grow past MCKP_MAX_STATES states (hundreds of blocks of distinct sizes) it hands over to
    pulp/CBC, within its tolerances (there ties may go to a dearer plan).
    """
    n = len(costs)
    ok = allowed or [[True] * len(c) for c in costs]
    if any(not math.isfinite(values[l][k]) for l in range(n) for k in range(len(costs[l])) if ok[l][k]):
        raise TqsError("knapsack values must be finite where a tier is allowed")
    options = [[k for k in range(len(costs[l])) if ok[l][k]] for l in range(n)]
    if any(not o for o in options):
        raise TqsError("knapsack found no feasible assignment (a block has no allowed tier)")
    floor = [min(costs[l][k] for k in options[l]) for l in range(n)]
    rest = np.concatenate([np.cumsum(floor[::-1])[::-1][1:], [0]]) if n else np.zeros(0)
    cost, value = np.zeros(1, np.int64), np.zeros(1, np.float64)
    parents: list[tuple[np.ndarray, np.ndarray]] = []
    for l in range(n):
        ks = np.array(options[l])
        c = (cost[:, None] + np.array([costs[l][k] for k in options[l]], np.int64)[None, :]).ravel()
        v = (value[:, None] + np.array([values[l][k] for k in options[l]], np.float64)[None, :]).ravel()
        parent = np.repeat(np.arange(cost.size), ks.size)
        choice = np.tile(ks, cost.size)
        fits = c <= budget - rest[l]  # the groups after this one still need their cheapest option
        c, v, parent, choice = c[fits], v[fits], parent[fits], choice[fits]
        if c.size == 0:
            raise TqsError("knapsack found no feasible assignment (the budget is below the cheapest plan)")
        order = np.lexsort((v, c))  # by cost, then value
        c, v, parent, choice = c[order], v[order], parent[order], choice[order]
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(v)[:-1]])
        keep = v < best_before  # Pareto: each kept state is strictly better than every cheaper one
        c, v, parent, choice = c[keep], v[keep], parent[keep], choice[keep]
        if c.size > MCKP_MAX_STATES:
            return _solve_mckp_lp(values, costs, budget, allowed)
        cost, value = c, v
        parents.append((parent.astype(np.int32), choice.astype(np.int16)))  # what the answer is read back from
    at = int(np.argmin(value))  # the last state: the lowest value, and the cheapest that reaches it
    assign = [0] * n
    for l in range(n - 1, -1, -1):
        parent, choice = parents[l]
        assign[l] = int(choice[at])
        at = int(parent[at])
    return assign


def _solve_mckp_lp(values: list[list[float]], costs: list[list[int]], budget: int,
                   allowed: list[list[bool]] | None = None) -> list[int]:
    """The knapsack as a 0/1 program for pulp/CBC (large instances; ties towards cheaper options)."""
    prob = pulp.LpProblem("mckp", pulp.LpMinimize)
    x = {(l, k): pulp.LpVariable(f"x_{l}_{k}", cat="Binary")
         for l in range(len(costs)) for k in range(len(costs[l]))
         if allowed is None or allowed[l][k]}
    top = max((abs(v) for row in values for v in row if math.isfinite(v)), default=1.0) or 1.0
    total = sum(max(c) for c in costs) or 1
    prob += pulp.lpSum((values[l][k] / top + 1e-7 * costs[l][k] / total) * var for (l, k), var in x.items())
    for l in range(len(costs)):
        prob += pulp.lpSum(var for (m, _), var in x.items() if m == l) == 1
    prob += pulp.lpSum(costs[l][k] * var for (l, k), var in x.items()) <= budget
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False, threads=1))
    if pulp.LpStatus[status] != "Optimal":
        raise TqsError(f"knapsack found no feasible assignment (status {pulp.LpStatus[status]})")
    assign = [next(k for (m, k), var in x.items() if m == l and var.value() > 0.5) for l in range(len(costs))]
    if sum(costs[l][k] for l, k in enumerate(assign)) > budget:
        raise TqsError("knapsack solution exceeds the budget (solver tolerance); lower the target slightly")
    return assign


def _cheapest(costs: list[int]) -> int:
    return min(range(len(costs)), key=lambda k: costs[k])


GAMMA_MIN = -50.0  # Algorithm 2's dead-block threshold on gamma (the --gamma-min default)


PAPER_VARIANTS = ("spec", "exact")


def allocate_paper(p: Problem, solver: str, fp32_share: float, gamma_min: float,
                   variant: str = "spec") -> Allocation:
    """Algorithm 2 of the paper, step by step.

    `variant` 'spec' (the default; the method spec's and issue #13's form): budgets in the true bytes
    of the written file (scales, nodes and what no tier touches included, so plans compare with
    uniform models at matched on-disk sizes), and the knapsack on gamma' = gamma - min gamma.
    'exact': the paper's appendix A.1.2 to the letter: B = C^-1 sum 32 n_l and B* = p_FP32 sum 32 n_l
    in parameter bits (16 for a float16 block's parameters: its stored width), a tier costs b_k n_l, and the knapsack minimises sum gamma_l 2^-b_k (no shift);
    the written file is then larger than 1/C of the original by its scales and fixed parts (the plan
    reports both)."""
    if variant not in PAPER_VARIANTS:
        raise TqsError(f"--paper-variant must be one of {', '.join(PAPER_VARIANTS)}, not '{variant}'")
    exact = variant == "exact"
    n = len(p.blocks)
    # parameter bits as stored: 32 a float32 parameter, 16 a float16 one (no tier stores it wider)
    stored = [p.stored_bits[l] if p.stored_bits else 32 * b.size for l, b in enumerate(p.blocks)]
    costs = [[min(t.bits * b.size, s) for t in p.tiers] for b, s in zip(p.blocks, stored)] if exact else p.costs
    assign: list[int | None] = [None] * n
    bottom = [_cheapest(c) for c in costs]
    for l, b in enumerate(p.blocks):  # step 2: dead blocks (gamma <= gamma_min) to the bottom tier
        if b.gamma <= gamma_min:
            assign[l] = bottom[l]
    fp32 = next((k for k, t in enumerate(p.tiers) if t.is_identity), None)
    live = sorted((l for l in range(n) if assign[l] is None), key=lambda l: -_finite(p.blocks[l].gamma))
    full = sum(s // (1 if exact else 8) for s in stored)  # bits, or bytes
    share_note = None
    if fp32 is not None and fp32_share > 0:  # steps 3-4: top-ranked blocks to FP32 up to B*
        b_star = fp32_share * full
        used = 0
        for l in live:
            if used + costs[l][fp32] > b_star:
                break
            assign[l], used = fp32, used + costs[l][fp32]
        if not used and live:
            unit = "parameter bits" if exact else "bytes"
            share_note = (f"the FP32 share ({fp32_share:g} of {full:,} {unit}) holds no block: the top-ranked "
                          f"one, '{p.blocks[live[0]].name}', takes {costs[live[0]][fp32]:,} at fp32")
    rest = [l for l in range(n) if assign[l] is None]
    total = math.floor(full / p.target) if exact else p.budget  # step 1: B
    budget = total - sum(costs[l][k] for l, k in enumerate(assign) if k is not None)  # step 6: B'
    if exact and total < sum(min(c) for c in costs):
        raise TqsError(f"compression {p.target:g}x is not reachable in parameter bits with tiers "
                       f"{','.join(map(str, p.tiers))}")
    if budget < sum(min(costs[l]) for l in rest):
        raise TqsError(f"compression {p.target:g}x: the FP32 share {fp32_share} leaves too little budget; lower it")
    if rest:
        gammas = [_finite(p.blocks[l].gamma) for l in rest]
        g0 = 0.0 if exact else min(gammas)
        if solver == "mckp":  # step 7: min sum gamma' 2^-b (gamma itself in the exact variant)
            values = [[(g - g0) * 2.0 ** -t.bits for t in p.tiers] for g in gammas]
            picks = solve_mckp(values, [costs[l] for l in rest], budget)
        else:
            picks = _greedy_promotion([costs[l] for l in rest], gammas, budget)
        for l, k in zip(rest, picks):
            assign[l] = k
    alloc = Allocation([int(k) for k in assign], "paper", solver)
    if share_note:
        alloc.notes.append(share_note)
    if exact:
        alloc.notes.append(f"the paper's Algorithm 2 exactly: budget {total:,} parameter bits ({p.target:g}x of "
                           f"{full:,}); the file is sized in true bytes, scales and fixed parts included")
    return alloc


def _finite(g: float) -> float:
    return 1e6 if math.isinf(g) and g > 0 else (-1e6 if math.isinf(g) else g)


def _greedy_promotion(costs: list[list[int]], gammas: list[float], budget: int) -> list[int]:
    """The paper's greedy: from the bottom tier, the most sensitive block takes the highest tier that fits."""
    assign = [_cheapest(c) for c in costs]
    left = budget - sum(c[k] for c, k in zip(costs, assign))
    for l in sorted(range(len(costs)), key=lambda i: -gammas[i]):
        options = sorted(range(len(costs[l])), key=lambda k: -costs[l][k])
        for k in options:
            extra = costs[l][k] - costs[l][assign[l]]
            if extra <= left:
                left -= extra
                assign[l] = k
                break
    return assign


def check_measured(p: Problem) -> None:
    """Every tier but fp32 has measured damage on every block (checked before the budget: an unmeasured
    tier is the first thing to say)."""
    for b in p.blocks:
        missing = [t for t in p.tiers if not t.is_identity and b.measured(t) is None]
        if missing:
            raise TqsError(f"scores lack the measured damage of tier {missing[0]} (block '{b.name}'); "
                           f"rerun sweep with --tiers including it, or use --objective paper")


def allocate_measured(p: Problem, solver: str) -> Allocation:
    """Minimise the sum of measured damage D[l, k] under the budget. A dead block is held to the bottom
    tier where that tier's measured damage is the least of its row (what the exact knapsack picks
    anyway; it decides for the CBC fallback), never where it is measured harmful."""
    check_measured(p)
    values, allowed = [], []
    for l, b in enumerate(p.blocks):
        row = [b.damage_at(t) for t in p.tiers]
        bottom = _cheapest(p.costs[l])
        # A dead block (its probe changed nothing) goes to the bottom tier unless its measured damage
        # there is above another tier's: a probe too small to cross a threshold says nothing of int2.
        dead = b.dead and math.isfinite(row[bottom]) and row[bottom] <= min(row)
        allowed.append([(k == bottom) if dead else math.isfinite(v) for k, v in enumerate(row)])
        if not any(allowed[-1]):  # every tier diverges: keep the most precise one rather than none
            allowed[-1][max(range(len(p.tiers)), key=lambda k: p.costs[l][k])] = True
        values.append([v if math.isfinite(v) else 0.0 for v in row])
    _check_allowed_fit(p, allowed)
    if solver == "mckp":
        assign = solve_mckp(values, p.costs, p.budget, allowed)
    else:
        assign = _greedy_ratio(values, p.costs, p.budget, allowed)
    return Allocation(assign, "measured", solver)


def _check_allowed_fit(p: Problem, allowed: list[list[bool]]) -> None:
    """The cheapest plan of allowed tiers fits the budget, or the target is refused here: a block held
    at a costly tier (every cheaper one diverged) can put the cheapest plan over a budget that
    check_feasible, which sees every tier, let through (the greedy solver then wrote a plan twice the
    budget, the knapsack blamed the budget alone)."""
    cheapest = [min((k for k, ok in enumerate(row) if ok), key=lambda k: p.costs[l][k]) for l, row in enumerate(allowed)]
    if p.bytes_of(cheapest) <= p.budget:
        return
    held = [b.name for l, b in enumerate(p.blocks) if p.costs[l][cheapest[l]] > min(p.costs[l])]
    raise TqsError(f"compression {p.target:g}x is not reachable: {len(held)} block(s) ({', '.join(held[:3])}"
                   f"{', ...' if len(held) > 3 else ''}) diverged at every cheaper tier and stay at a costlier one; "
                   f"at most {math.floor(p.file_bytes / p.total_bytes(cheapest) * 100) / 100:.2f}x")


def _greedy_ratio(values: list[list[float]], costs: list[list[int]], budget: int,
                  allowed: list[list[bool]]) -> list[int]:
    """Greedy on damage saved per extra byte, starting from each block's cheapest allowed tier (of
    those, the least damaging: a /gptq tier stores what its plain tier stores); a move that costs
    nothing and saves damage comes first."""
    assign = [min((k for k in range(len(c)) if allowed[l][k]), key=lambda k: (c[k], values[l][k]))
              for l, c in enumerate(costs)]
    left = budget - sum(c[k] for c, k in zip(costs, assign))
    if left < 0:
        raise TqsError("greedy: the budget is below the cheapest plan")
    while True:
        best, best_ratio = None, 0.0
        for l, c in enumerate(costs):
            for k in range(len(c)):
                extra = c[k] - c[assign[l]]
                gain = values[l][assign[l]] - values[l][k]
                ratio = gain / extra if extra > 0 else math.inf
                if allowed[l][k] and 0 <= extra <= left and gain > 0 and ratio > best_ratio:
                    best, best_ratio = (l, k, extra), ratio
        if best is None:
            return assign
        l, k, extra = best
        assign[l], left = k, left - extra


# ------------------------------------------------------------------------------------------- plan

def plan_document(scores: dict[str, Any], p: Problem, alloc: Allocation) -> dict[str, Any]:
    planned = p.total_bytes(alloc.assign)
    weights, blocks = {}, []
    for l, (b, k) in enumerate(zip(p.blocks, alloc.assign)):
        tier = p.tiers[k]
        blocks.append({"id": b.id, "name": b.name, "tier": str(tier), "bytes": p.costs[l][k],
                       "gamma": b.gamma, "dead": b.dead,
                       "damage": b.measured(tier) or 0.0,
                       # the identity tier keeps a float16 block float16: tables say so, not "fp32"
                       **({"stored_as": "float16"} if tier.is_identity and p.half and p.half[l] else {})})
        for n in b.weights:
            weights[n] = str(weight_tier(scores["weights"][n], tier, p.decode))
    winfo = scores["weights"]
    orig_bits = sum(math.prod(w["shape"]) * w["bits"] for w in winfo.values())
    new_bits = sum(math.prod(winfo[n]["shape"]) * parse_tier(t).bits if not parse_tier(t).is_identity
                   else math.prod(winfo[n]["shape"]) * winfo[n]["bits"] for n, t in weights.items())
    return {
        "schema_version": SCHEMA_VERSION, "kind": "tqs-plan", "tool_version": __version__,
        "model": {k: scores["model"][k] for k in ("path", "sha256", "identity", "file_bytes") if k in scores["model"]},
        "factor": scores["config"].get("factor", True), "passes": scores.get("passes"),
        "objective": alloc.objective, "solver": alloc.solver, "notes": alloc.notes,
        "tiers": [str(t) for t in p.tiers], "compression_target": p.target,
        "budget_bytes": p.limit, "planned_bytes": planned,
        "planned_compression": p.file_bytes / planned,
        "param_compression": orig_bits / new_bits if new_bits else math.inf,
        "blocks": blocks, "weights": weights,
        "weight_info": {n: winfo[n] for n in weights},
    }


def sweep_gamma_min(scores: dict[str, Any], gamma_min: float | None = None) -> float:
    """The dead-block threshold: the one given, else the sweep's own (its dead flags used it)."""
    if gamma_min is not None:
        return gamma_min
    swept = scores.get("config", {}).get("gamma_min")
    return float(swept) if _is_number(swept) else GAMMA_MIN


def allocate(scores: dict[str, Any], target: float, tiers_text: str | None = None,
             objective: str = "measured", solver: str = "mckp", fp32_share: float = 0.0,
             probe: str | None = None, gamma_min: float | None = None, decode: str = "auto",
             gptq: bool = True, paper_variant: str = "spec") -> tuple[Problem, Allocation]:
    """Build the problem from a scores document and solve it with the chosen objective.

    `probe`: which gamma ranks blocks (the paper objective): None, quant where the sweep ran it, else
    gauss (a note says so); named, the scores must hold it.
    `decode`: how integer tiers are written per weight (auto, dq or load: tiers.written_form).
    `gptq`: use the swept /gptq tiers by default (their integers come from a sweep setup on the sweep
    contexts: `sweep.plan_codes`); without, they are left out and a note says so."""
    if objective not in ("measured", "paper"):
        raise TqsError(f"--objective must be measured or paper, not '{objective}'")
    if solver not in ("mckp", "greedy"):
        raise TqsError(f"--solver must be mckp or greedy, not '{solver}'")
    if not 0 <= fp32_share < 1:
        raise TqsError("--fp32-share must be in [0, 1)")
    tiers = parse_tiers(tiers_text) if tiers_text else default_tiers(scores, objective)
    stale = stale_rounding(scores) is not None  # /gptq damage of other integers
    if stale and tiers_text and any(t.gptq for t in tiers):
        raise TqsError(f"/gptq tiers: the sweep measured their damage with integers rounded by another version "
                       f"({scores.get('rounding') or 'not recorded'}; now {ROUNDING_VERSION}): re-run the sweep")
    dropped = [] if (gptq and not stale) or tiers_text else [t for t in tiers if t.gptq]
    tiers = [t for t in tiers if t not in dropped]
    probe, probe_note = _ranking_probe(scores, probe, objective)
    p = build_problem(scores, tiers, target, probe, decode)
    if objective == "measured":
        check_measured(p)
    if not (objective == "paper" and paper_variant == "exact"):  # that one budgets bits (allocate_paper)
        check_feasible(p)
    if objective == "paper":
        alloc = allocate_paper(p, solver, fp32_share, sweep_gamma_min(scores, gamma_min), paper_variant)
    else:
        alloc = allocate_measured(p, solver)
    if probe_note:
        alloc.notes.append(probe_note)
    if dropped and stale:  # with or without --verify-model: the sweep is what to re-run
        alloc.notes.append(f"/gptq tiers left out ({', '.join(map(str, dropped))}): the sweep measured their "
                           f"damage with integers another version rounds ({scores.get('rounding') or 'not recorded'}; "
                           f"now {ROUNDING_VERSION}); re-run the sweep to use them")
    elif dropped:
        alloc.notes.append(f"/gptq tiers left out ({', '.join(map(str, dropped))}): their integers come from "
                           "rollouts on the sweep contexts (pass --verify-model, --rollout and --contexts)")
    return p, alloc


def _ranking_probe(scores: dict[str, Any], probe: str | None, objective: str) -> tuple[str, str | None]:
    """The probe whose gamma ranks blocks, and a note where the paper objective falls back to the other
    one. A probe named but not swept is refused, whatever the objective (the measured objective's joint
    check ranks its paper challengers by it): it fell back silently, a plan of the other probe."""
    chosen = probe or "quant"
    if all(b.get(chosen) is not None for b in scores["blocks"]) or (objective != "paper" and probe is None):
        return chosen, None
    other = "gauss" if chosen == "quant" else "quant"
    if probe is not None:
        raise TqsError(f"--probe {probe}: the scores hold no {probe} gamma (the sweep ran --probe {other}); rank "
                       f"by --probe {other}, or sweep with --probe {probe} or both")
    return other, f"blocks ranked by the {other} gamma: the sweep ran no {chosen} probe"


def stale_rounding(scores: dict[str, Any]) -> str | None:
    """A warning where the sweep measured /gptq tiers with integers another version of the rounding gave
    (their tiers are then left out: plans from such scores can be far worse than from a fresh sweep),
    printed even with --quiet; None otherwise."""
    if not any(parse_tier(t).gptq for t in scores["config"].get("tiers") or ()) \
            or scores.get("rounding") == ROUNDING_VERSION:
        return None
    return (f"the scores' /gptq damage was measured with integers another version rounds "
            f"({scores.get('rounding') or 'not recorded'}; now {ROUNDING_VERSION}): their /gptq tiers are left "
            "out; re-run the sweep to use them")


def default_tiers(scores: dict[str, Any], objective: str) -> list[Tier]:
    measured = scores["config"].get("tiers") or []
    if objective == "measured" and not measured:
        raise TqsError("the sweep measured no tier's damage (--tiers ''): the measured objective needs it; "
                       "use --objective paper, or re-run the sweep with its default tiers")
    if objective == "measured":
        return parse_tiers(",".join(["fp32", *measured]))
    return parse_tiers("fp32,bf16,int8,int4,int2")
