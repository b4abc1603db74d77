"""A plan's predicted costs taken apart per stage: operation times for the timeline and memory per class and tier.

The plan file keeps each stage's total time per micro-batch and peak memory; the pieces come from the same
:class:`~paraplan.cost_models.costs.CandidateCosts` the planner optimized, rebuilt from the plan's model, cluster,
train settings and strategy (and the profile it was priced with), so they sum to the plan's numbers. Where they do
not (a plan priced by an older cost model, another profile), :attr:`PlanCosts.mismatch` says by how much.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from paraplan.cost_models.costs import CandidateCosts, CostOptions, LayerCost, Mode, StageCost
from paraplan.errors import ProfileError, StrategyError
from paraplan.report.schedule import OpTimes
from paraplan.types import ModelProfile, Plan

# Memory classes of the device stack, bottom to top (bytes per device).
MEMORY_CLASSES = ("parameters", "gradients", "optimizer states", "activations", "working space", "overhead",
                  "host-side buffers")


@dataclass(frozen=True)
class StageMemory:
    """Bytes per device of one pipeline rank: the device stack by class (:data:`MEMORY_CLASSES`) and what it
    keeps in host memory and on NVMe."""

    device: dict[str, float]
    host_bytes: float
    nvme_bytes: float

    @property
    def device_bytes(self) -> float:
        return sum(self.device.values())


@dataclass(frozen=True)
class PlanCosts:
    """Per-stage pieces of a plan's prediction.

    Attributes:
        op_times: virtual stage -> its operation pieces per micro-batch (seconds).
        tail: rank -> pieces after its last operation: exposed data-parallel communication, device optimizer
            step, offloaded (CPU) optimizer step (seconds).
        memory: per rank.
        capacity_bytes: device memory per device; host_capacity_bytes, nvme_capacity_bytes: the even share of a
            node's host memory and NVMe per device (CandidateCosts).
        pipeline_s: the cost model's pipeline time (``costs.pipeline_time_s``) for these stage times.
        mismatch: largest relative difference between the recomputed and the plan's stage times or memory (0 when
            they agree).
    """

    op_times: dict[int, OpTimes]
    tail: dict[int, tuple[tuple[str, float], ...]]
    memory: list[StageMemory]
    capacity_bytes: float
    host_capacity_bytes: float
    nvme_capacity_bytes: float
    pipeline_s: float
    mismatch: float


def _backend_names() -> list[str | None]:
    """Backend cost profiles the planner may have priced a plan with (None: the generic cost model)."""
    from paraplan.cost_models.backend_profiles import PROFILES

    return [None, *PROFILES, "unconstrained"]


def plan_candidate_costs(plan: Plan, profile: ModelProfile | None = None, backend: str | None = None
                         ) -> CandidateCosts:
    """The CandidateCosts of ``plan``'s strategy (the plan's cluster is already calibrated) under the backend cost
    profile ``backend`` (None: the generic cost model).

    Raises:
        StrategyError: an unknown backend profile.
    """
    s = plan.strategy
    opts = CostOptions(vpp=s.vpp, cp=s.cp, sequence_parallel=s.sequence_parallel, selective_policy=s.selective_policy,
                       schedule=s.schedule, ep=s.ep, etp=s.etp, routing_imbalance=s.routing_imbalance,
                       capacity_factor=s.capacity_factor)
    if backend is not None:
        opts = dataclasses.replace(opts, backend=backend)  # type: ignore[call-arg]
    return CandidateCosts(plan.model, plan.cluster, plan.train, s.dp, s.tp, s.pp, s.micro_batch_size, profile, opts)


def _stage_costs(plan: Plan, costs: CandidateCosts, mode: Mode) -> tuple[list[StageCost], float]:
    """Every stage's cost and the largest relative difference from the plan's stage times and memory."""
    s = plan.strategy
    dense = costs.dense_blocks_per_stage([st.n_blocks for st in s.stages])
    out = [costs.stage_cost(st.index, st.n_blocks, st.recompute_blocks, mode, st.selective_blocks, st.offload_blocks,
                            dense[st.index]) for st in s.stages]
    mismatch = 0.0
    for st, sc in zip(s.stages, out):
        for ours, theirs in ((sc.time_per_micro_batch_s, st.time_per_micro_batch_s),
                             (sc.memory_bytes, st.memory_bytes)):
            if theirs > 0:
                mismatch = max(mismatch, abs(ours - theirs) / theirs)
    return out, mismatch


def load_plan_profile(plan: Plan, override: Path | None = None) -> ModelProfile | None:
    """The profile a plan was priced with: ``override``, else the plan's ``profile_path``; None for analytic plans.

    Raises:
        ProfileError: the plan used a profile that cannot be read (the message says to pass ``--profile``).
    """
    from paraplan.files import read_model

    if plan.predicted.compute_source != "profile":
        return None
    path = override or (Path(plan.profile_path) if plan.profile_path else None)
    if path is None:
        raise ProfileError("the plan was priced with a measured profile but does not say which; pass --profile")
    return read_model(path, ModelProfile, "profile", ProfileError,
                      "pass the profile the plan was made with: --profile PATH")


def _sum(layers: list[LayerCost], attr: str) -> float:
    return sum(getattr(lc, attr) for lc in layers)


def plan_costs(plan: Plan, profile: ModelProfile | None = None) -> PlanCosts:
    """Take ``plan``'s prediction apart per stage (module docstring).

    Time pieces per micro-batch of a virtual stage holding ``n`` blocks of its rank's ``N``, ``r`` of the rank's
    blocks recomputed in full and ``q`` selectively: forward = its layers' ``fwd_s``; communication = their exposed
    tensor/context-parallel collectives plus half of the rank's point-to-point time ``p2p_s / vpp`` in each
    direction; recompute = ``(r recompute_s + q selective_s) n / N``; backward = ``bwd_s`` (split into the input
    gradient and the weight gradient ``wgrad_s`` for zero-bubble schedules); offload transfer = the rank's stage
    time minus its compute channel (a transfer channel that sets the stage time, or the paging and transfer time
    that does not overlap on CPU clusters), times ``n / N``. Their sum over a rank's chunks is the stage time of
    :meth:`CandidateCosts.stage_cost`.
    """
    from paraplan.cost_models.costs import pipeline_time_s

    s = plan.strategy
    mode = Mode(s.zero_stage, s.offload_optimizer, s.offload_param, s.offload_ratio)
    # The cost profile the plan was priced with (plans written before it was recorded: the one that reproduces its
    # stages).
    best = None
    for backend in dict.fromkeys([plan.solver.backend, *_backend_names()]):
        try:
            costs = plan_candidate_costs(plan, profile, backend)
        except StrategyError:
            continue
        stage_costs, mismatch = _stage_costs(plan, costs, mode)
        if best is None or mismatch < best[2]:
            best = (costs, stage_costs, mismatch)
        if mismatch < 1e-9:
            break
    if best is None:
        raise StrategyError("the plan's strategy cannot be priced by this paraplan's cost model; re-plan it")
    costs, stage_costs, mismatch = best
    dense = costs.dense_blocks_per_stage([st.n_blocks for st in s.stages])
    spans = s.virtual_stages()
    zb = s.schedule in ("zero_bubble", "zbv")
    op_times: dict[int, OpTimes] = {}
    for v in spans:
        st, sc = s.stages[v.rank], stage_costs[v.rank]
        layers: list[LayerCost] = []
        if v.index == 0:
            layers.append(costs.embed)
        if v.index == len(spans) - 1:
            layers.append(costs.head)
        n_rank = st.n_blocks
        share = v.n_blocks / n_rank if n_rank else (1.0 if len(spans) == s.pp else 0.0)
        d_here = dense[v.rank] * share
        blocks = [(costs.block, v.n_blocks - d_here)] + ([(costs.dense_block, d_here)] if costs.dense_block else [])

        def total(attr: str) -> float:
            return _sum(layers, attr) + sum(getattr(lc, attr) * k for lc, k in blocks)

        p2p_half = costs.p2p_s / s.vpp / 2
        recompute = (st.recompute_blocks * costs.block.recompute_s + st.selective_blocks * costs.block.selective_s) * share
        compute = costs.compute_terms(v.rank)(st.n_blocks, st.recompute_blocks, st.selective_blocks, d=dense[v.rank])
        transfer = max(0.0, sc.time_per_micro_batch_s - compute) * (share if n_rank else 1.0 / s.vpp)
        fwd_comm = total("tp_fwd_s") + p2p_half
        bwd_comm = total("tp_bwd_s") + p2p_half
        forward = (("forward", total("fwd_s")), ("communication", fwd_comm), ("offload transfer", transfer / 2))
        wgrad = total("wgrad_s") if zb else 0.0
        backward = (("recompute", recompute), ("backward", total("bwd_s") - wgrad), ("communication", bwd_comm),
                    ("offload transfer", transfer / 2))
        weight = (("weight gradient", wgrad),)
        op_times[v.index] = OpTimes(forward=forward, backward=backward + weight, input_grad=backward if zb else (),
                                    weight_grad=weight if zb else ())
    tail = {st.index: (("data-parallel communication", sc.dp_comm_s), ("optimizer step", sc.optimizer_s),
                       ("offloaded optimizer step", sc.offload_s)) for st, sc in zip(s.stages, stage_costs)}
    memory = [_stage_memory(costs, mode, st, sc) for st, sc in zip(s.stages, stage_costs)]
    pipe = pipeline_time_s(costs.m, costs.bubble_weight(), [sc.time_per_micro_batch_s for sc in stage_costs])
    return PlanCosts(op_times, tail, memory, costs.capacity_bytes, costs.host_capacity_bytes,
                     costs.nvme_capacity_bytes, pipe, mismatch)


def _stage_memory(costs: CandidateCosts, mode: Mode, st, sc: StageCost) -> StageMemory:
    """Split a stage's device bytes: working space = the recomputation/paging block buffer + ZeRO-3 gathered
    parameters + the offload reduction bucket; overhead = :data:`costs.OVERHEAD_BYTES`; host-side buffers = what a
    CPU cluster's offload keeps in host memory, which is its device memory (``CandidateCosts._compute_mode_terms``)."""
    busy = st.recompute_blocks + st.selective_blocks + st.offload_blocks > 0
    recompute_ws = costs.block.act_bytes if busy else 0.0
    gathered = costs.zero3_working_bytes(mode) + costs.bucket_bytes(mode)
    host_side = max(0.0, sc.other_bytes - costs.overhead_bytes - gathered)
    device = {"parameters": sc.params_bytes, "gradients": sc.grads_bytes, "optimizer states": sc.optimizer_bytes,
              "activations": sc.activation_bytes - recompute_ws, "working space": recompute_ws + gathered,
              "overhead": costs.overhead_bytes, "host-side buffers": host_side}
    return StageMemory(device=device, host_bytes=sc.host_bytes, nvme_bytes=sc.nvme_bytes)
