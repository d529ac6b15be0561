"""The joint check of an allocation (method spec, "Allocation"): the plan, the uniform plans that fit
and the paper's plans rolled out with every block at its tier at once on the sweep's own contexts,
then a bounded local search (`refine.refine`). Shared by `allocate --verify-model`, the demo and the
benchmarks' callers, so each records the check the same way."""

from __future__ import annotations

from typing import Any

from tqs_onnx.allocate import Allocation, Problem, sweep_gamma_min
from tqs_onnx.graph import LoadedModel
from tqs_onnx.refine import MARGIN, MAX_ROLLOUTS, Refinement, refine
from tqs_onnx.rollout import Contexts, RolloutSpec
from tqs_onnx.runtime import Device
from tqs_onnx.sweep import SweepSetup, contexts_digest, joint_divergence, setup_for_scores, swept_horizon


def joint_check(loaded: LoadedModel, spec: RolloutSpec, contexts: Contexts, device: Device,
                scores: dict[str, Any], problem: Problem, alloc: Allocation, max_rollouts: int = MAX_ROLLOUTS,
                margin: float = MARGIN, gamma_min: float | None = None) -> tuple[Refinement, SweepSetup]:
    """`alloc` checked and refined by joint rollouts on `contexts` (the sweep's); also the sweep setup,
    whose /gptq integers the written plan must carry (`sweep.write_plan_codes`). `gamma_min`: the paper
    challengers' dead threshold, by default the sweep's."""
    setup = setup_for_scores(loaded, spec, contexts, device, scores)
    joint = joint_divergence(setup, [b.weights for b in problem.blocks], problem.tiers)
    refinement = refine(problem, alloc, joint, max_rollouts, margin, sweep_gamma_min(scores, gamma_min))
    swept = scores.get("contexts_sha256")  # /gptq sweeps refuse other contexts (setup_for_scores)
    if swept and swept != contexts_digest(spec, contexts, swept_horizon(scores)):
        refinement.allocation.notes.append(
            "the joint check rolled out other contexts or another spec than the sweep's (sha256 differs): "
            "the plans were compared on those")
    swept_on = scores.get("device")
    if swept_on and swept_on != device.kind and any(problem.tiers[k].gptq for k in refinement.allocation.assign):
        refinement.allocation.notes.append(
            f"the sweep ran on {swept_on}, this joint check on {device.kind}: the /gptq integers come from "
            "this device's rollouts and may differ from those the sweep measured (the joint check and the "
            "written model use these)")
    return refinement, setup


def verification_record(refinement: Refinement, margin: float = MARGIN) -> dict[str, Any]:
    """What a plan document records of its joint check (plan['verification'])."""
    return {"joint_divergence": refinement.joint, "start": refinement.start,
            "diverged_contexts": getattr(refinement.joint, "diverged", 0),
            "allocator": refinement.allocator, "uniform": refinement.uniform,
            "challengers": refinement.challengers, "rollouts": refinement.rollouts, "margin": margin,
            "accepted_moves": refinement.accepted_moves}
