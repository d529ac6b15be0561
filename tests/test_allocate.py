"""Allocation: the knapsack respects the budget and is optimal; Algorithm 2's rules hold."""

import itertools
import math

import numpy as np
import pytest

from tqs_onnx.allocate import BlockInfo, Problem, allocate_measured, allocate_paper, solve_mckp
from tqs_onnx.errors import TqsError
from tqs_onnx.refine import refine, uniform_assignments
from tqs_onnx.tiers import Tier, parse_tier, parse_tiers


def brute_force(values, costs, budget):
    best, best_v = None, math.inf
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[k] for c, k in zip(costs, choice)) <= budget:
            v = sum(vals[k] for vals, k in zip(values, choice))
            if v < best_v - 1e-12:
                best, best_v = choice, v
    return best, best_v


@pytest.mark.parametrize("seed", range(12))
def test_mckp_matches_brute_force_and_respects_budget(seed):
    r = np.random.default_rng(seed)
    n, k = r.integers(2, 6), r.integers(2, 5)
    costs = [sorted(r.integers(1, 50, size=k).tolist(), reverse=True) for _ in range(n)]
    values = [sorted(r.random(k).tolist()) for _ in range(n)]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = int(r.integers(lo, hi + 1))
    assign = solve_mckp(values, costs, budget)
    assert sum(c[a] for c, a in zip(costs, assign)) <= budget
    _, best_v = brute_force(values, costs, budget)
    assert sum(v[a] for v, a in zip(values, assign)) == pytest.approx(best_v, rel=1e-6, abs=1e-9)


def _problem(gammas, sizes, tiers="fp32,bf16,int8,int4,int2", target=4.0, damage=None, dead=None):
    ts = parse_tiers(tiers)
    blocks = [BlockInfo(i, f"b{i}", [f"w{i}"], n, g, bool(dead and dead[i]), (damage or {}).get(i, {}))
              for i, (g, n) in enumerate(zip(gammas, sizes))]
    costs = [[t.storage_bytes((n,)) for t in ts] for n in sizes]
    return Problem(blocks, ts, costs, 0, sum(n * 4 for n in sizes), target)


def test_paper_dead_blocks_go_to_bottom_and_fp32_share_goes_to_top():
    p = _problem([-60.0, 0.5, 0.1, 0.3], [1000] * 4, target=3.0)
    a = allocate_paper(p, "mckp", fp32_share=0.25, gamma_min=-50)
    names = [str(p.tiers[k]) for k in a.assign]
    assert names[0] == "int2" and names[1] == "fp32"
    assert p.bytes_of(a.assign) <= p.budget


@pytest.mark.parametrize("solver", ["mckp", "greedy"])
def test_paper_allocation_never_exceeds_budget(solver):
    r = np.random.default_rng(0)
    for target in (2, 3.57, 4, 8, 12):
        p = _problem(r.normal(size=8).tolist(), r.integers(100, 5000, 8).tolist(), target=target)
        a = allocate_paper(p, solver, 0.05, -50)
        assert p.bytes_of(a.assign) <= p.budget


def test_measured_knapsack_uses_damage_and_granularity_tiers():
    tiers = "fp32,int8/channel,int4,int4/channel,int2/channel"
    dmg = {0: {"int8/channel": 1.0, "int4": 50.0, "int4/channel": 5.0, "int2/channel": 100.0},
           1: {"int8/channel": 0.1, "int4": 0.2, "int4/channel": 0.15, "int2/channel": 0.3}}
    p = _problem([0, 0], [4096, 4096], tiers, target=6.0, damage=dmg)
    a = allocate_measured(p, "mckp")
    chosen = [str(p.tiers[k]) for k in a.assign]
    assert p.bytes_of(a.assign) <= p.budget
    # Brute force over the same table
    values = [[0.0 if t.is_identity else dmg[l][str(t)] for t in p.tiers] for l in range(2)]
    best, _ = brute_force(values, p.costs, p.budget)
    assert chosen == [str(p.tiers[k]) for k in best]


def test_infeasible_target_names_the_achievable_range():
    from tqs_onnx.allocate import check_feasible

    p = _problem([0.1, 0.2], [1000, 1000], "fp32,int8", target=40)
    with pytest.raises(TqsError, match=r"achievable 1\.00x to 3\.9\dx"):
        check_feasible(p)


def test_refine_catches_blocks_harmless_alone_harmful_together():
    # Two blocks whose single-block damage is tiny at int2, but jointly the model breaks.
    tiers = "fp32,int8,int2"
    dmg = {i: {"int8": 1.0, "int2": 2.0} for i in range(3)}
    p = _problem([0, 0, 0], [1000, 1000, 1000], tiers, target=5.0, damage=dmg)
    alloc = allocate_measured(p, "mckp")

    def joint(assign):  # true joint damage: blocks 0 and 1 both at int2 is catastrophic
        names = [str(p.tiers[k]) for k in assign]
        base = sum({"fp32": 0, "int8": 1, "int2": 2}[n] for n in names)
        return base + (1000.0 if names[0] == names[1] == "int2" else 0.0)

    r = refine(p, alloc, joint, max_rollouts=20)
    names = [str(p.tiers[k]) for k in r.allocation.assign]
    assert not (names[0] == names[1] == "int2")
    assert p.bytes_of(r.allocation.assign) <= p.budget
    assert r.joint <= joint(alloc.assign) and r.joint <= min(r.uniform.values(), default=math.inf)
    assert r.rollouts <= 20


def test_refine_prefers_the_plan_that_diverges_on_fewer_contexts():
    # l96_cnn at the INT2 size: the knapsack's plan and uniform int2/channel both diverge on some sweep
    # contexts (mean = inf for both); the plan that diverges less often must win the joint check.
    from tqs_onnx.sweep import JointDivergence

    tiers = "fp32,int8,int2"
    dmg = {i: {"int8": 1.0, "int2": 2.0} for i in range(3)}
    p = _problem([0, 0, 0], [1000, 1000, 1000], tiers, target=5.0, damage=dmg)
    alloc = allocate_measured(p, "mckp")
    uniform_int2 = [2, 2, 2]

    def joint(assign):
        per_context = np.array([1.0, 2.0, 3.0, 4.0])
        if assign == uniform_int2:
            per_context[0] = np.inf
        else:
            per_context[:3] = np.inf
        return JointDivergence(per_context)

    r = refine(p, alloc, joint, max_rollouts=10)
    assert r.start == "uniform int2" and r.allocation.assign == uniform_int2
    assert r.joint.diverged == 1 and r.joint.finite_mean == 3.0 and math.isinf(r.joint)
    assert any("diverges on the sweep contexts" in n for n in r.allocation.notes)


def test_a_uniform_plan_kept_because_the_knapsacks_gain_was_noise_is_not_said_to_have_won():
    """The note said 'uniform ... beat the knapsack allocation' where the knapsack's mean was lower but
    within the margin (a new user's BiLSTM: 1.60042 against 1.60195)."""
    from tqs_onnx.sweep import JointDivergence

    dmg = {i: {"int8": 1.0, "int4": 2.0} for i in range(2)}
    p = _problem([0, 0], [1000, 1000], "fp32,int8,int4", target=3.0, damage=dmg)
    from tqs_onnx.allocate import Allocation

    alloc = Allocation([1, 2], "measured", "mckp", [])  # int8 and int4: a mixed plan within the budget
    fits = uniform_assignments(p)
    name, assign = "int8", fits["int8"]
    assert alloc.assign not in fits.values() and p.fits(alloc.assign)

    def joint(a):
        if a in fits.values():
            return JointDivergence(np.array([1.0, 3.0, 0.3]) * (1 if a == assign else 10))
        return JointDivergence(np.array([0.37, 3.11, 0.32]))

    r = refine(p, alloc, joint, max_rollouts=3)
    assert r.start == f"uniform {name}"
    assert not any("beat the knapsack" in n for n in r.allocation.notes)
    assert any(f"below uniform {name}'s (1.433) by less than 1 standard error(s)" in n for n in r.allocation.notes)


def test_joint_check_needs_a_margin_over_uniform_not_noise():
    from tqs_onnx.refine import better
    from tqs_onnx.sweep import JointDivergence

    uniform = JointDivergence(np.array([1.0, 3.0, 0.3]))
    noisy = JointDivergence(np.array([0.37, 3.11, 0.32]))  # lower mean, but worse on one context of three
    steady = JointDivergence(np.array([0.9, 2.8, 0.25]))  # lower on every context
    assert noisy < uniform and not better(noisy, uniform, margin=1.0)
    assert better(steady, uniform, margin=1.0)
    assert better(noisy, uniform, margin=0.0)  # margin 0: the plain mean decides
    # A plan that diverges nowhere beats one that diverges somewhere, whatever the means.
    assert better(JointDivergence(np.array([9.0, 9.0])), JointDivergence(np.array([np.inf, 0.1])), margin=1.0)


@pytest.mark.parametrize("other", ["int4/mse", "int4/fp16"])
@pytest.mark.parametrize("clipped_contexts,wins", [([0.37, 3.11, 0.32], False), ([0.9, 2.8, 0.25], True)])
def test_a_clipped_uniform_plan_must_beat_round_to_nearest_by_the_margin(clipped_contexts, wins, other):
    # The knapsack picks uniform int4/mse (or /fp16: its measured damage is lowest); uniform RTN int4
    # with fp32 scales stays the baseline, so the other plan ships only when it beats RTN by one
    # standard error, not on noise.
    from tqs_onnx.sweep import JointDivergence

    tiers = f"fp32,int4,{other}"
    dmg = {i: {"int4": 2.0, other: 1.0} for i in range(2)}
    p = _problem([0, 0], [1000, 1000], tiers, target=5.0, damage=dmg)
    alloc = allocate_measured(p, "mckp")
    clipped, plain = [p.tiers.index(parse_tier(other))] * 2, [p.tiers.index(parse_tier("int4"))] * 2
    assert alloc.assign == clipped

    def joint(assign):
        return JointDivergence(np.array(clipped_contexts if assign == clipped else [1.0, 3.0, 0.3]))

    r = refine(p, alloc, joint, max_rollouts=6)
    assert r.allocation.assign == (clipped if wins else plain)
    assert r.start == ("allocator" if wins else "uniform int4")


def test_with_only_clipped_tiers_the_uniform_plans_are_the_baseline():
    # No plain round-to-nearest tier was swept: the best uniform plan is the incumbent again, and the
    # knapsack's plan must still beat it by the margin.
    from tqs_onnx.sweep import JointDivergence

    tiers = "fp32,int4/mse,int4/fp16"
    dmg = {0: {"int4/mse": 1.0, "int4/fp16": 2.0}, 1: {"int4/mse": 2.0, "int4/fp16": 1.0}}
    p = _problem([0, 0], [1000, 1000], tiers, target=5.0, damage=dmg)
    alloc = allocate_measured(p, "mckp")
    uniform = {str(p.tiers[k]): [k, k] for k in range(1, 3)}
    assert alloc.assign not in uniform.values()

    def joint(assign):
        if assign == alloc.assign:
            return JointDivergence(np.array([1.0, 3.0, 0.299]))  # better on one context by a hair
        return JointDivergence(np.array([1.0, 3.0, 0.3]) * (1 if assign == uniform["int4/mse"] else 2))

    r = refine(p, alloc, joint, max_rollouts=4)
    assert r.start == "uniform int4/mse" and r.allocation.assign == uniform["int4/mse"]


def test_knapsack_drops_a_dead_block_to_zero():
    tiers = "fp32,int8,int4,zero"
    dmg = {0: {"int8": 1.0, "int4": 5.0, "zero": 1e9}, 1: {"int8": 0.0, "int4": 0.0, "zero": 0.0}}
    p = _problem([0, 0], [4096, 4096], tiers, target=3.0, damage=dmg)
    a = allocate_measured(p, "mckp")
    assert [str(p.tiers[k]) for k in a.assign] == ["int8", "zero"]
    assert parse_tier("zero").storage_bytes((64, 64)) == 0 and str(parse_tier("zero")) == "zero"
    with pytest.raises(TqsError, match="takes no granularity"):
        parse_tier("zero/channel")


def test_tier_parsing_and_storage():
    t = parse_tier("int4/block32/fp16")
    assert (t.fmt, t.granularity, t.block_size, t.scale_fmt) == ("int4", "block", 32, "fp16")
    assert t.storage_bytes((64, 10), channel_axis=1, block_axis=0) == 64 * 10 // 2 + 2 * 10 * 2
    assert parse_tier("int2/channel").storage_bytes((8, 3), 1, 0) == 6 + 3 * 4
    with pytest.raises(TqsError):
        parse_tier("int3")
    m = parse_tier("int4/mse/channel/fp16")
    assert str(m) == "int4/channel/fp16/mse" and parse_tier(str(m)) == m and m.mse
    assert m.storage_bytes((64, 10), 1, 0) == parse_tier("int4/channel/fp16").storage_bytes((64, 10), 1, 0)
    assert str(parse_tier("int8/channel/mse/load")) == "int8/channel/mse/load"
    with pytest.raises(TqsError, match="mse does not apply"):
        parse_tier("int1/mse")
    with pytest.raises(TqsError, match="mse applies to"):
        Tier("int1", mse=True)


def test_the_papers_plan_is_a_challenger_in_the_joint_check():
    """Where the paper's Algorithm 2 (its own tiers, on the same gammas) does better in joint rollouts than
    the knapsack's plan and every uniform plan, refine starts from it; it costs one rollout per plan."""
    from tqs_onnx.refine import paper_plans

    tiers = "fp32,bf16,int8,int4,int2,int8/channel,int4/channel"
    dmg = {i: {t: 1.0 for t in tiers.split(",")[1:]} for i in range(3)}
    p = _problem([5.0, 0.1, 0.0], [1000, 1000, 1000], tiers, target=4.0, damage=dmg)
    alloc = allocate_measured(p, "mckp")
    papers = paper_plans(p)
    assert papers and all(p.fits(a) and all(str(p.tiers[k]) in "fp32,bf16,int8,int4,int2".split(",") for k in a)
                          for a in papers.values())
    label, chosen = next(iter(papers.items()))
    assert chosen != alloc.assign
    seen = []

    def joint(assign):
        seen.append(list(assign))
        return 0.1 if assign == chosen else 1.0 + sum(assign) * 1e-3

    r = refine(p, alloc, joint, max_rollouts=40)
    assert r.start == label and r.joint == pytest.approx(0.1) and r.allocation.assign == chosen
    assert any(f"{label} beat the knapsack allocation" in n for n in r.allocation.notes)
    assert chosen in seen and p.bytes_of(r.allocation.assign) <= p.budget
    assert r.challengers[label] == pytest.approx(0.1) and r.rollouts == len(seen)
    # without the paper's tiers there is no such challenger
    assert paper_plans(_problem([1.0, 0.5], [1000, 1000], "fp32,int8/channel,int4/channel")) == {}


def test_a_challenger_must_beat_the_knapsacks_plan_by_the_margin_too():
    """A plan a hair better than the knapsack's (paired differences within one standard error) does not
    replace it, however far both are below uniform."""
    from tqs_onnx.refine import _start
    from tqs_onnx.sweep import JointDivergence

    tiers = "fp32,int8,int4"
    p = _problem([0, 0], [1000, 1000], tiers, target=4.0, damage={i: {"int8": 1.0, "int4": 2.0} for i in range(2)})
    fits = {"int8": [1, 1], "int4": [2, 2]}
    uniform = {"int8": JointDivergence(np.ones(4)), "int4": JointDivergence(np.full(4, 2.0))}
    own = JointDivergence(np.full(4, 0.5))
    noisy = JointDivergence(np.array([0.2, 0.75, 0.3, 0.7]))  # mean 0.4875: -0.0125 +- 0.14 against own
    clear = JointDivergence(np.full(4, 0.3))
    assert _start(p, [1, 2], own, fits, uniform, 1.0, [(noisy, [2, 1], "paper Alg. 2 (mckp)")])[2] == "allocator"
    got = _start(p, [1, 2], own, fits, uniform, 1.0, [(noisy, [2, 1], "a"), (clear, [2, 2], "b")])
    assert got[2] == "b" and got[0] == [2, 2]
    # A challenger over the budget is passed over, however well it rolls out.
    assert _start(p, [1, 2], own, fits, uniform, 1.0, [(clear, [0, 2], "b")])[2] == "allocator"


@pytest.mark.parametrize("text, needle", [("int4/block99999999999999999999", "block size must be"),
                                          ("int4/block\u00b2", "unknown option"),
                                          ("int4/block32/channel", "both set its granularity"),
                                          ("int8/channel/fp16/fp32", "both set its scale type"),
                                          ("int4/gptq/gptq", "given twice")])
def test_tier_names_with_conflicting_or_out_of_range_options_are_refused(text, needle):
    from tqs_onnx.errors import TqsError
    from tqs_onnx.tiers import parse_tier

    with pytest.raises(TqsError, match=needle):
        parse_tier(text)


@pytest.mark.parametrize("solver", ["mckp", "greedy"])
def test_a_block_held_costly_by_diverged_tiers_makes_the_target_unreachable_not_over_budget(solver):
    """Every quantized tier of one block diverged (damage inf): it stays fp32. The cheapest allowed
    plan is over the budget; the greedy solver wrote it anyway (twice the budget) and the knapsack
    blamed the budget alone."""
    tiers = parse_tiers("fp32,int8,int4")
    blocks = [BlockInfo(0, "diverges", ["a"], 1000, 0.0, False, {"int8": math.inf, "int4": math.inf}),
              BlockInfo(1, "fine", ["b"], 1000, 0.0, False, {"int8": 0.1, "int4": 0.5})]
    p = Problem(blocks, tiers, [[4000, 1000, 500], [4000, 1000, 500]], fixed_bytes=100, file_bytes=8100, target=4.0)
    with pytest.raises(TqsError, match=r"not reachable: 1 block\(s\) \(diverges\) diverged .* at most 1\.76x"):
        allocate_measured(p, solver)
    p.target = 1.5  # room for the fp32 block: both solvers keep it and fit
    assign = allocate_measured(p, solver).assign
    assert assign[0] == 0 and p.fits(assign)


def test_greedy_takes_a_tier_of_the_same_cost_and_less_damage():
    """/gptq tiers store what their plain tier stores: greedy moved only by extra bytes, so it kept
    the plain tier at the bottom; the knapsack chose /gptq."""
    tiers = parse_tiers("fp32,int4/channel,int4/channel/gptq")
    blocks = [BlockInfo(i, f"b{i}", [f"w{i}"], 1000, 1.0, False, {"int4/channel": 5.0, "int4/channel/gptq": 0.5})
              for i in range(2)]
    p = Problem(blocks, tiers, [[4000, 600, 600]] * 2, fixed_bytes=0, file_bytes=8000, target=8000 / 1300)
    for solver in ("greedy", "mckp"):
        assert allocate_measured(p, solver).assign == [2, 2]


def test_refine_moves_to_a_same_cost_tier_and_never_ships_a_plan_over_budget():
    tiers = parse_tiers("fp32,int4/channel,int4/channel/gptq")
    blocks = [BlockInfo(i, f"b{i}", [f"w{i}"], 1000, 1.0, False, {"int4/channel": 5.0, "int4/channel/gptq": 0.5})
              for i in range(2)]
    p = Problem(blocks, tiers, [[4000, 600, 600]] * 2, fixed_bytes=0, file_bytes=8000, target=8000 / 1300)
    from tqs_onnx.allocate import Allocation
    joint = lambda a: float(sum(5.0 if k == 1 else 0.5 if k == 2 else 0.0 for k in a))  # noqa: E731
    r = refine(p, Allocation([1, 1], "measured", "mckp"), joint, margin=0.0)
    assert r.allocation.assign == [2, 2]
    # An allocator plan over the budget (however well it rolls out) never becomes the result.
    over = refine(p, Allocation([0, 1], "measured", "mckp"), lambda a: 0.0 if a == [0, 1] else 1.0, margin=0.0)
    assert p.fits(over.allocation.assign) and over.allocation.assign != [0, 1]


def test_the_budget_holds_where_the_graph_length_prefix_crosses_a_size_boundary():
    """Estimating the graph's length prefix at the uncorrected budget and spending the byte it saves
    pushed the graph back over 2**14 bytes: a plan of exactly the budget was a byte over the limit."""
    tiers = parse_tiers("fp32,int8")
    graph, quantizable, fixed = 20_000, 10_000, 50_000  # the graph's prefix 3 bytes, at the limit 2 or 3
    for b0 in range(6_370, 6_400):  # the graph at the limit: 16,370 to 16,399 bytes, across 2**14
        p = Problem([BlockInfo(0, "b", ["w"], 1000, 1.0, False, {"int8": 1.0})], tiers, [[quantizable, 0]],
                    fixed_bytes=fixed, file_bytes=(fixed + b0) * 4, target=4.0, graph_bytes=graph,
                    quantizable_bytes=quantizable)
        for cost in range(p.budget - 3, p.budget + 1):
            p.costs[0][1] = cost
            assert p.fits([1]), (b0, cost)
        p.costs[0][1] = p.budget + 1
        assert not p.fits([1])  # and the budget is the most that fits


def test_a_target_given_as_a_plans_own_compression_admits_that_plan():
    tiers = parse_tiers("fp32,int8")
    misses = 0
    for file_bytes in range(10_000, 12_000):
        planned = file_bytes // 3 + 7
        p = Problem([BlockInfo(0, "b", ["w"], 10, 1.0, False, {"int8": 1.0})], tiers, [[file_bytes, planned]],
                    fixed_bytes=0, file_bytes=file_bytes, target=file_bytes / planned)
        misses += p.limit != planned
    assert misses == 0


def test_an_fp32_share_that_holds_no_block_says_so():
    p = _problem([3.0, 1.0], [1000, 1000], target=4.0)
    alloc = allocate_paper(p, "greedy", 0.05, -50.0)
    assert any("holds no block" in n and "'b0'" in n for n in alloc.notes)
    assert not allocate_paper(p, "greedy", 0.0, -50.0).notes


def test_an_allocator_plan_over_budget_is_said_to_be_so_not_to_have_lost_narrowly():
    from tqs_onnx.allocate import Allocation

    tiers = parse_tiers("fp32,int4/channel,int4/channel/gptq")
    blocks = [BlockInfo(i, f"b{i}", [f"w{i}"], 1000, 1.0, False, {"int4/channel": 5.0, "int4/channel/gptq": 0.5})
              for i in range(2)]
    p = Problem(blocks, tiers, [[4000, 600, 600]] * 2, fixed_bytes=0, file_bytes=8000, target=8000 / 1300)
    r = refine(p, Allocation([0, 1], "measured", "mckp"), lambda a: 0.0 if a == [0, 1] else 1.0, margin=0.0)
    assert any("over the limit" in n for n in r.allocation.notes)
    assert not any("by less than" in n for n in r.allocation.notes)


def test_a_fingerprint_survives_a_copy_and_a_pickle():
    import copy
    import pickle

    from tqs_onnx.sweep import Fingerprint

    f = Fingerprint({"model": "abc", "options": {"horizon": 3}})
    for g in (copy.deepcopy(f), pickle.loads(pickle.dumps(f))):
        assert g == f and g.parts == f.parts
