"""Outer search: enumerate (dp, tp, pp, micro-batch) candidates, solve the stage MILP of each, keep the best.

Candidates are sorted by a cheap lower bound on the step time (perfect balance, no recomputation, no DP
communication: ``(m + (p - 1)/v)/p * sum of stage compute times``) and skipped when that bound cannot beat the K-th best plan
found so far (FORMULAS.md, "Outer loop").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from paraplan.cost_models.costs import CandidateCosts, Mode, StageCost, predict
from paraplan.cost_models.links import calibrate_cluster
from paraplan.errors import NoFeasiblePlanError, StrategyError, TrainSpecError
from paraplan.planner.milp import MilpResult, solve_stage_milp
from paraplan.types import (
    ClusterSpec,
    ModelProfile,
    ModelSpec,
    Plan,
    SolverInfo,
    StagePlan,
    Strategy,
    StrategyOverride,
    TrainSpec,
)
from paraplan.units import format_bytes

DEFAULT_MICRO_BATCHES = (1, 2, 4, 8, 16)
BackendChoice = str  # "any" | "deepspeed" | "torch" | "unconstrained"


@dataclass(frozen=True)
class Candidate:
    dp: int
    tp: int
    pp: int
    micro_batch_size: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_candidates(
    spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, override: StrategyOverride,
    micro_batches: list[int],
) -> list[Candidate]:
    """All (dp, tp, pp, b) with ``dp tp pp = world``, tp within a node dividing the attention and KV heads,
    ``pp <= L`` and ``global_batch`` divisible by ``dp b``; restricted by ``override``.

    Raises:
        StrategyError: the override itself is impossible (degrees that do not multiply to the world size...).
        TrainSpecError: no candidate divides the global batch.
    """
    world = cluster.world_size
    L = spec.n_layers or 0
    o = override
    forced = [x for x in (o.dp, o.tp, o.pp) if x is not None]
    prod = 1
    for x in forced:
        prod *= x
    if world % prod or (len(forced) == 3 and prod != world):
        raise StrategyError(
            f"--strategy dp/tp/pp ({o.dp}, {o.tp}, {o.pp}) must multiply to the world size {world} of {cluster.name}"
        )
    if o.tp is not None and (o.tp > cluster.devices_per_node or (spec.n_heads or 1) % o.tp
                             or (spec.n_kv_heads or 1) % o.tp):
        raise StrategyError(
            f"tp={o.tp} must divide the attention heads ({spec.n_heads}) and KV heads ({spec.n_kv_heads}) and "
            f"fit in a node ({cluster.devices_per_node} devices)"
        )
    if o.pp is not None and o.pp > L:
        raise StrategyError(f"pp={o.pp} exceeds the model's {L} blocks")
    out: list[Candidate] = []
    divisible_batch = False
    for tp in _divisors(cluster.devices_per_node):
        if (spec.n_heads or 1) % tp or (spec.n_kv_heads or 1) % tp or (o.tp and tp != o.tp):
            continue
        for pp in _divisors(world // tp):
            if pp > L or (o.pp and pp != o.pp):
                continue
            dp = world // (tp * pp)
            if o.dp and dp != o.dp:
                continue
            for b in micro_batches:
                if o.micro_batch_size and b != o.micro_batch_size:
                    continue
                if train.global_batch % (dp * b) == 0:
                    divisible_batch = True
                    out.append(Candidate(dp, tp, pp, b))
    if not out and not divisible_batch:
        raise TrainSpecError(
            f"global batch {train.global_batch} is not divisible by dp x micro-batch for any strategy on "
            f"{cluster.name} (micro-batches {list(micro_batches)}); choose a global batch that is a multiple of "
            "the data-parallel degree times the micro-batch size"
        )
    return out


def allowed_modes(cluster: ClusterSpec, cand: Candidate, override: StrategyOverride, backend: str) -> list[Mode]:
    """ZeRO stage x offload combinations the backends can run for this candidate.

    DeepSpeed's pipeline engine supports ZeRO 0-1 only; optimizer offload needs ZeRO >= 1 (DeepSpeed) and a GPU
    (on a CPU cluster device memory is host memory). The torch backend has no optimizer-only offload.
    """
    modes = []
    for zero in range(4):
        for offload in (False, True):
            if override.zero_stage is not None and zero != override.zero_stage:
                continue
            if override.offload_optimizer is not None and offload != override.offload_optimizer:
                continue
            if offload and (zero == 0 or cluster.device.kind == "cpu" or backend in ("torch", "any")):
                continue
            if cand.dp == 1 and zero > 0 and override.zero_stage is None:
                continue  # ZeRO shards over dp: with dp = 1 it only adds communication-free overhead
            if backend in ("deepspeed", "any") and cand.pp > 1 and zero > 1:
                continue
            modes.append(Mode(zero, offload))
    return modes


def backend_allows(spec: ModelSpec, cand: Candidate, global_batch: int, backend: str) -> bool:
    """Whether the chosen backend(s) can launch this candidate (``unconstrained``: planning only).

    Both backends (``backends/checks.py``, which the planner may not import; keep the two in step): tensor
    parallelism only for Llama-family blocks (GPT-2's fused qkv is not split) with tp dividing the heads, key/value
    heads and MLP width, and no tied embeddings across pipeline stages. DeepSpeed: AutoTP does not combine with its
    pipeline engine. torch: ``Schedule1F1B`` needs at least as many micro-batches as stages.
    """
    if backend == "unconstrained":
        return True
    m = global_batch // (cand.dp * cand.micro_batch_size)
    tp_dims = (spec.n_heads, spec.n_kv_heads, spec.ffn_hidden)
    if cand.tp > 1 and (spec.family != "llama" or any(d is None or d % cand.tp for d in tp_dims)):
        return False
    if cand.pp > 1 and spec.tied_embeddings:
        return False
    if backend in ("deepspeed", "any") and cand.tp > 1 and cand.pp > 1:
        return False
    if backend in ("torch", "any") and cand.pp > 1 and m < cand.pp:
        return False
    return True


def _lower_bound(costs: CandidateCosts) -> float:
    L = costs.spec.n_layers or 0
    total = L * costs.block.time_s + sum(costs.compute_terms(s).const for s in range(costs.pp))
    return (costs.m + (costs.pp - 1) / costs.vpp) / costs.pp * total


def _stage_plans(costs: CandidateCosts, res: MilpResult) -> tuple[list[StagePlan], list[StageCost]]:
    stages, stage_costs = [], []
    first = 0
    for s, (n, r) in enumerate(zip(res.n_blocks, res.recompute_blocks)):
        sc = costs.stage_cost(s, n, r, res.mode)
        last = first + n - 1 + (1 if s == 0 else 0) + (1 if s == costs.pp - 1 else 0)
        stages.append(StagePlan(index=s, first_layer=first, last_layer=last, n_blocks=n, recompute_blocks=r,
                                time_per_micro_batch_s=sc.time_per_micro_batch_s, memory_bytes=sc.memory_bytes))
        stage_costs.append(sc)
        first = last + 1
    return stages, stage_costs


def _min_memory(costs: CandidateCosts, modes: list[Mode]) -> float:
    """Least peak memory of a candidate: every block recomputed, the leanest mode, blocks balanced."""
    L, p = costs.spec.n_layers or 0, costs.pp
    best = float("inf")
    for mode in modes:
        worst = 0.0
        for s in range(p):
            n = L // p + (1 if s < L % p else 0)
            worst = max(worst, costs.stage_cost(s, n, n, mode).memory_bytes)
        best = min(best, worst)
    return best


def search_plans(
    spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, profile: ModelProfile | None = None,
    override: StrategyOverride | None = None, top_k: int = 3, backend: BackendChoice = "any",
    time_limit_s: float = 10.0, profile_path: str | None = None, memory_fraction: float = 0.95,
) -> list[Plan]:
    """Find the ``top_k`` fastest predicted plans.

    Args:
        memory_fraction: share of device memory a plan may fill; the rest is headroom for allocator fragmentation
            and what the model does not see (default 0.95).

    Raises:
        NoFeasiblePlanError: nothing fits; the message gives the least memory per device any candidate needs.
        StrategyError, TrainSpecError: impossible overrides or batch sizes; StrategyError also for a factory
            model without a profile.
        ProfileError: a profile of another model, sequence length or dtype (:meth:`ModelProfile.check_matches`).
    """
    override = override or StrategyOverride()
    if profile is None and spec.family == "custom":
        raise StrategyError(f"{spec.name} is a factory model: run `paraplan profile` and pass --profile")
    if profile is not None:
        profile.check_matches(spec, train, profile_path)
    cluster = calibrate_cluster(cluster, profile)
    micro = profile.micro_batch_sizes() if profile is not None else list(DEFAULT_MICRO_BATCHES)
    if override.micro_batch_size and override.micro_batch_size not in micro and profile is None:
        micro.append(override.micro_batch_size)
    start = time.perf_counter()
    cands = enumerate_candidates(spec, cluster, train, override, micro)
    scored = []
    for cand in cands:
        costs = CandidateCosts(spec, cluster, train, cand.dp, cand.tp, cand.pp, cand.micro_batch_size, profile)
        costs.usable_capacity_bytes = memory_fraction * costs.capacity_bytes
        modes = allowed_modes(cluster, cand, override, backend)
        if modes and backend_allows(spec, cand, train.global_batch, backend):
            scored.append((_lower_bound(costs), cand, costs, modes))
    scored.sort(key=lambda x: x[0])
    found: list[tuple[float, Candidate, CandidateCosts, MilpResult]] = []
    solved, status, gap = 0, "optimal", 0.0
    least_mem: tuple[float, Candidate] | None = None
    for lb, cand, costs, modes in scored:
        if len(found) >= top_k and lb >= found[-1][0]:
            continue
        res = solve_stage_milp(costs, modes, override.recompute, time_limit_s)
        solved += 1
        if res is None:
            need = _min_memory(costs, modes)
            if least_mem is None or need < least_mem[0]:
                least_mem = (need, cand)
            continue
        found.append((res.objective_s, cand, costs, res))
        found.sort(key=lambda x: x[0])
        found = found[:top_k]
    if not found:
        _raise_infeasible(cluster, least_mem, memory_fraction)
    elapsed = time.perf_counter() - start
    plans = []
    for _, cand, costs, res in found:
        if res.status == "feasible":
            status, gap = "feasible", max(gap, res.gap)
        stages, stage_costs = _stage_plans(costs, res)
        strategy = Strategy(dp=cand.dp, tp=cand.tp, pp=cand.pp, micro_batch_size=cand.micro_batch_size,
                            grad_accum=costs.m, zero_stage=res.mode.zero_stage,
                            offload_optimizer=res.mode.offload_optimizer, stages=stages)
        info = SolverInfo(status=status, gap=gap, solver="HiGHS via PuLP", candidates=len(cands),  # type: ignore
                          milps_solved=solved, search_time_s=elapsed)
        plans.append(Plan(model=spec, cluster=cluster, train=train, strategy=strategy,
                          predicted=predict(costs, stage_costs), solver=info, profile_path=profile_path))
    return plans


def _raise_infeasible(cluster: ClusterSpec, least: tuple[float, Candidate] | None, fraction: float) -> None:
    cap = f"{format_bytes(fraction * cluster.device.memory_bytes)} ({fraction:.0%} of {format_bytes(cluster.device.memory_bytes)})"
    if least is None:
        raise NoFeasiblePlanError(f"no strategy could be evaluated on {cluster.name}; relax --strategy")
    need, c = least
    raise NoFeasiblePlanError(
        f"no plan fits {cap} per device on {cluster.name}; the leanest candidate (dp={c.dp} tp={c.tp} pp={c.pp} "
        f"micro-batch={c.micro_batch_size}, full recomputation) needs {format_bytes(need)} per device. Try more "
        "devices or a larger device type, a smaller micro-batch or sequence length, ZeRO-3 (--strategy zero=3), "
        "or optimizer offload on GPUs (--backend deepspeed)"
    )
