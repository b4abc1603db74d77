"""Outer search: enumerate (dp, tp, pp, micro-batch) candidates, solve the stage MILP of each, keep the best.

Candidates are sorted by a cheap lower bound on the step time (perfect balance, no recomputation, no DP
communication: ``(m + (p - 1)/v)/p * sum of stage compute times``) and skipped when that bound cannot beat the K-th best plan
found so far (FORMULAS.md, "Outer loop").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from paraplan.cost_models.costs import CandidateCosts, CostOptions, Mode, StageCost, predict
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

BackendChoice = str  # "any" | "deepspeed" | "torch" | "unconstrained"


@dataclass(frozen=True)
class SearchProgress:
    """Where a running search stands: candidates taken up so far and the incumbent (best plan found)."""

    total: int  # candidates the backends allow, in lower-bound order
    solved: int  # MILPs solved so far
    pruned: int  # skipped because their lower bound cannot beat the K-th best plan
    rejected: int  # excluded before the search by a backend or mode rule
    cannot_fit: int  # dropped before the search: their memory lower bound exceeds the device
    best_step_time_s: float | None
    best: Candidate | None


@dataclass(frozen=True)
class Candidate:
    """One outer-loop point: parallel degrees, micro-batch and the candidate-wide knobs the MILP does not choose."""

    dp: int
    tp: int
    pp: int
    micro_batch_size: int
    sequence_parallel: bool = False
    selective_recompute: bool = False

    def options(self) -> CostOptions:
        return CostOptions(sequence_parallel=self.sequence_parallel, selective_recompute=self.selective_recompute)

    def label(self) -> str:
        knobs = (" sp" if self.sequence_parallel else "") + (" selective" if self.selective_recompute else "")
        return f"dp={self.dp} tp={self.tp} pp={self.pp} mb={self.micro_batch_size}{knobs}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_candidates(
    spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, override: StrategyOverride,
    micro_batches: list[int] | None = None,
) -> list[Candidate]:
    """All (dp, tp, pp, b) with ``dp tp pp = world``, tp within a node dividing the attention and KV heads,
    ``pp <= L`` and ``global_batch`` divisible by ``dp b``; restricted by ``override``.

    ``micro_batches`` None tries every b dividing ``global_batch / dp`` (memory bounds it later: a candidate whose
    leanest configuration cannot fit is never solved); a profile passes the sizes it measured.

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
            sizes = micro_batches if micro_batches is not None else (
                _divisors(train.global_batch // dp) if train.global_batch % dp == 0 else [])
            for b in sizes:
                if o.micro_batch_size and b != o.micro_batch_size:
                    continue
                if train.global_batch % (dp * b) == 0:
                    divisible_batch = True
                    out.append(Candidate(dp, tp, pp, b))
    if not out and not divisible_batch:
        raise TrainSpecError(
            f"global batch {train.global_batch} is not divisible by dp x micro-batch for any strategy on "
            f"{cluster.name} (micro-batches {list(micro_batches) if micro_batches else 'any'}); choose a global batch "
            "that is a multiple of "
            "the data-parallel degree times the micro-batch size"
        )
    return out


def mode_rules(cluster: ClusterSpec, cand: Candidate, override: StrategyOverride, backend: str
               ) -> list[tuple[Mode, str | None]]:
    """Every ZeRO stage x offload mode the override leaves, each with the rule that excludes it (None: allowed).

    DeepSpeed's pipeline engine supports ZeRO 0-1 only; optimizer offload needs ZeRO >= 1 (DeepSpeed) and a GPU
    (on a CPU cluster device memory is host memory). The torch backend has no optimizer-only offload.
    """
    out: list[tuple[Mode, str | None]] = []
    for zero in range(4):
        for offload in (False, True):
            if override.zero_stage is not None and zero != override.zero_stage:
                continue
            if override.offload_optimizer is not None and offload != override.offload_optimizer:
                continue
            why = None
            if offload and zero == 0:
                why = "optimizer offload needs ZeRO >= 1 (DeepSpeed offloads the partitioned optimizer states)"
            elif offload and cluster.device.kind == "cpu":
                why = "optimizer offload on a CPU cluster (device memory is already host memory)"
            elif offload and backend in ("torch", "any"):
                why = (f"optimizer offload with --backend {backend} (the torch backend has no optimizer-only "
                       "offload; use --backend deepspeed)")
            elif cand.dp == 1 and zero > 0 and override.zero_stage is None:
                why = "ZeRO with dp=1 (nothing to shard over)"
            elif backend in ("deepspeed", "any") and cand.pp > 1 and zero > 1:
                why = (f"ZeRO-2/3 with pp > 1 under --backend {backend} (DeepSpeed's pipeline engine runs ZeRO 0-1 "
                       "only; --backend torch allows it)")
            out.append((Mode(zero, offload), why))
    return out


def backend_rejection(spec: ModelSpec, cand: Candidate, global_batch: int, backend: str,
                      seq_len: int | None = None) -> str | None:
    """The rule that keeps the chosen backend(s) from launching this candidate, or None when they can.

    Both backends (``backends/checks.py``, which the planner may not import; keep the two in step): tensor
    parallelism only for Llama-family blocks (GPT-2's fused qkv is not split) with tp dividing the heads, key/value
    heads and MLP width, and no tied embeddings across pipeline stages. DeepSpeed: AutoTP does not combine with its
    pipeline engine and has no Megatron sequence parallelism. torch: ``Schedule1F1B`` needs at least as many
    micro-batches as stages; sequence parallelism shards the sequence, so tp must divide ``seq_len`` (when given).
    Selective recomputation runs on both (torch's selective activation checkpointing).
    """
    if backend == "unconstrained":
        return None
    m = global_batch // (cand.dp * cand.micro_batch_size)
    tp_dims = {"n_heads": spec.n_heads, "n_kv_heads": spec.n_kv_heads, "ffn_hidden": spec.ffn_hidden}
    if cand.tp > 1 and spec.family != "llama":
        return (f"tp > 1 for a {spec.family} model (the backends split only Llama-style blocks; "
                "--backend unconstrained prices it anyway)")
    if cand.tp > 1 and any(d is None or d % cand.tp for d in tp_dims.values()):
        bad = ", ".join(f"{k}={v}" for k, v in tp_dims.items() if v is None or v % cand.tp)
        return f"tp={cand.tp} does not divide {bad}"
    if cand.pp > 1 and spec.tied_embeddings:
        return "pp > 1 with tied embeddings (neither backend synchronizes the tied weights across stages)"
    if backend in ("deepspeed", "any") and cand.tp > 1 and cand.pp > 1:
        return (f"tp > 1 with pp > 1 under --backend {backend} (DeepSpeed's AutoTP does not combine with its "
                "pipeline engine; --backend torch allows it)")
    if backend in ("deepspeed", "any") and cand.sequence_parallel:
        return (f"sequence parallelism under --backend {backend} (DeepSpeed's AutoTP has no Megatron sequence "
                "parallelism; Ulysses is another method; --backend torch runs it)")
    if cand.sequence_parallel and seq_len is not None and seq_len % cand.tp:
        return "sequence parallelism with a tp that does not divide the sequence length"
    if backend in ("torch", "any") and cand.pp > 1 and m < cand.pp:
        return (f"fewer micro-batches per step than stages under --backend {backend} (torch's 1F1B needs at least "
                "as many micro-batches as stages: raise --global-batch or lower the micro-batch)")
    return None


def _with_knobs(base: list[Candidate], spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec,
                profile: ModelProfile | None, override: StrategyOverride):
    """Each base candidate with every setting of the candidate-wide knobs, its costs, and the rule (or None)
    that excludes the setting.

    - Sequence parallelism (Korthikanti et al. 2022 sec. 4.2.2) on and off wherever tp > 1.
    - Selective recomputation of the attention core (sec. 4.3) on and off where it saves memory by the cost model:
      with a fused attention kernel (FlashAttention, SDPA) nothing of the attention core is saved, so recomputing
      it only costs time and is never tried.
    """
    forced_sel = {"selective": True, "none": False, "full": False}.get(override.recompute or "")
    for cand in base:
        sps = [False, True] if cand.tp > 1 else [False]
        if override.sequence_parallel is not None:
            sps = [override.sequence_parallel]
        plain = CandidateCosts(spec, cluster, train, cand.dp, cand.tp, cand.pp, cand.micro_batch_size, profile,
                               CostOptions())
        for sp in sps:
            why = "sequence parallelism with tp=1 (it shards activations over the tp group)" if sp and cand.tp == 1 \
                else None
            first = dataclasses.replace(cand, sequence_parallel=sp)
            costs = plain if not sp else CandidateCosts(spec, cluster, train, cand.dp, cand.tp, cand.pp,
                                                        cand.micro_batch_size, profile, first.options())
            if forced_sel is not True:
                yield first, costs, why
            if forced_sel is False:
                continue
            sel = dataclasses.replace(first, selective_recompute=True)
            sel_costs = CandidateCosts(spec, cluster, train, cand.dp, cand.tp, cand.pp, cand.micro_batch_size,
                                       profile, sel.options())
            if forced_sel is None and sel_costs.block.act_bytes >= costs.block.act_bytes:
                continue  # saves nothing: only slower
            yield sel, sel_costs, why


def memory_lower_bound(costs: CandidateCosts, modes: list[Mode], recompute: str | None = None) -> float:
    """Least peak memory per device any stage assignment of this candidate can have (bytes).

    Formula: ``min over modes of max(max_s M_s(0, 0), min_s min_r M_s(k, r))`` with ``M_s(n, r)`` the MILP's stage
    memory (``CandidateCosts.stage_memory_bytes``), ``k = ceil(L / p)`` (some stage holds at least that many blocks) and
    ``r`` in {0, 1, k} (memory is affine in r plus the recompute flag's working space, so its minimum over r is at
    one of these; ``recompute`` none/full fixes r to 0/k). Every stage holds at least its fixed layers.
    Only stages 0, p-2 and p-1 are evaluated: the interior stages 1..p-2 hold no fixed layer and differ only in
    their in-flight micro-batches, which do not grow with the stage index (:meth:`CandidateCosts.inflight`), so
    stage p-2 has the least memory among them for any (n, r). Used to skip candidates that cannot fit before any
    MILP is solved.
    """
    L, p = costs.spec.n_layers or 0, costs.pp
    k = -(-L // p)
    rs = {"none": [0], "full": [k]}.get(recompute or "", sorted({0, min(1, k), k}))
    stages = sorted({0, max(p - 2, 0), p - 1})
    best = float("inf")
    for mode in modes:
        fixed = max(costs.stage_memory_bytes(s, 0, 0, mode) for s in (0, p - 1))
        busiest = min(costs.stage_memory_bytes(s, k, r, mode) for s in stages for r in rs)
        best = min(best, max(fixed, busiest))
    return best


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


def search_plans(
    spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, profile: ModelProfile | None = None,
    override: StrategyOverride | None = None, top_k: int = 3, backend: BackendChoice = "any",
    time_limit_s: float = 10.0, profile_path: str | None = None, memory_fraction: float = 0.95,
    progress: Callable[[SearchProgress], None] | None = None,
) -> list[Plan]:
    """Find the ``top_k`` fastest predicted plans.

    Args:
        top_k: plans to return, >= 1.
        time_limit_s: HiGHS time limit per candidate MILP, seconds (> 0).
        progress: called after each candidate the search takes up (solved or pruned) with the counts so far and
            the incumbent.
        memory_fraction: share of device memory a plan may fill; the rest is headroom for allocator fragmentation
            and what the model does not see (default 0.95).

    Raises:
        NoFeasiblePlanError: nothing fits; the message gives the least memory per device any candidate needs.
        StrategyError, TrainSpecError: impossible overrides or batch sizes; StrategyError also for a factory
            model without a profile.
        ProfileError: a profile of another model, sequence length, dtype or device kind
            (:meth:`ModelProfile.check_matches`).
        TrainSpecError: a sequence length the model cannot run (:meth:`ModelSpec.check_seq_len`).
    """
    override = override or StrategyOverride()
    if top_k < 1:
        raise StrategyError(f"top_k must be >= 1 (plans to return), got {top_k}")
    if not time_limit_s > 0:
        raise StrategyError(f"the MILP time limit (--time-limit) must be > 0 seconds, got {time_limit_s:g}")
    if not 0 < memory_fraction <= 1:
        raise StrategyError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    if profile is None and spec.family == "custom":
        raise StrategyError(f"{spec.name} is a factory model: run `paraplan profile` and pass --profile")
    if profile is not None:
        profile.check_matches(spec, train, profile_path, cluster)
    spec.check_seq_len(train.seq_len)
    cluster = calibrate_cluster(cluster, profile)
    micro = profile.micro_batch_sizes() if profile is not None else None
    start = time.perf_counter()
    base = enumerate_candidates(spec, cluster, train, override, micro)
    milp_recompute = {"selective": "none"}.get(override.recompute or "", override.recompute)
    scored = []
    rejected: dict[str, int] = {}  # rule -> candidates it excluded, for the message and the plan's record
    might_fit: dict[str, int] = {}  # rule -> excluded candidates whose memory lower bound fits
    n_cands = cannot_fit = 0
    least_mem: tuple[float, Candidate] | None = None
    for cand, costs, why_knob in _with_knobs(base, spec, cluster, train, profile, override):
        n_cands += 1
        costs.usable_capacity_bytes = memory_fraction * costs.capacity_bytes
        rules = mode_rules(cluster, cand, override, backend)
        modes = [m for m, why in rules if why is None]
        why_not = why_knob or backend_rejection(spec, cand, train.global_batch, backend, train.seq_len)
        if not modes or why_not is not None:
            for why in {why_not} if why_not else {w for _, w in rules if w}:
                rejected[why] = rejected.get(why, 0) + 1
            if why_not is not None and modes and memory_lower_bound(costs, modes) <= costs.usable_capacity_bytes:
                might_fit[why_not] = might_fit.get(why_not, 0) + 1
            continue
        need = memory_lower_bound(costs, modes, milp_recompute)
        if need > costs.usable_capacity_bytes:  # cannot fit whatever the MILP chooses: never solved
            cannot_fit += 1
            if least_mem is None or need < least_mem[0]:
                least_mem = (need, cand)
            continue
        scored.append((_lower_bound(costs), cand, costs, modes, need))
    scored.sort(key=lambda x: x[0])
    found: list[tuple[float, Candidate, CandidateCosts, MilpResult]] = []
    solved, pruned, status, gap = 0, 0, "optimal", 0.0
    unproven: list[float] = []  # lower bounds of candidates whose MILP stopped at the time limit
    for lb, cand, costs, modes, need in scored:
        if len(found) >= top_k and lb >= found[-1][0]:
            pruned += 1
        else:
            res = solve_stage_milp(costs, modes, milp_recompute, time_limit_s)
            solved += 1
            if res is not None and res.status != "optimal":
                # Not proven: its optimum may lie anywhere above this bound (the step-time bound when unknown).
                bound = res.bound_s
                unproven.append(bound if bound == bound else lb)
            if res is None:
                if least_mem is None or need < least_mem[0]:
                    least_mem = (need, cand)
            elif res.status != "timeout":  # a timed-out MILP has no solution to keep
                found.append((res.objective_s, cand, costs, res))
                found.sort(key=lambda x: x[0])
                found = found[:top_k]
        if progress is not None:
            best = found[0] if found else None
            progress(SearchProgress(
                total=len(scored), solved=solved, pruned=pruned, rejected=n_cands - len(scored) - cannot_fit,
                cannot_fit=cannot_fit,
                best_step_time_s=best[0] if best else None, best=best[1] if best else None))
    if not found:
        _raise_infeasible(cluster, least_mem, memory_fraction, override, rejected, n_cands, might_fit)
    elapsed = time.perf_counter() - start
    plans = []
    # Optimal only if no candidate stopped by the time limit could still beat the best plan.
    best_s = found[0][0]
    open_bound = min(unproven, default=float("inf"))
    if open_bound < best_s * (1 - 1e-9):
        status, gap = "feasible", (best_s - open_bound) / best_s
    for _, cand, costs, res in found:
        if res.status == "feasible":
            status, gap = "feasible", max(gap, res.gap if res.gap == res.gap else 0.0)
        stages, stage_costs = _stage_plans(costs, res)
        strategy = Strategy(dp=cand.dp, tp=cand.tp, pp=cand.pp, micro_batch_size=cand.micro_batch_size,
                            grad_accum=costs.m, zero_stage=res.mode.zero_stage,
                            offload_optimizer=res.mode.offload_optimizer, sequence_parallel=cand.sequence_parallel,
                            selective_recompute=cand.selective_recompute, stages=stages)
        info = SolverInfo(status=status, gap=gap, solver="HiGHS via PuLP", candidates=n_cands,  # type: ignore
                          milps_solved=solved, search_time_s=elapsed, excluded=rejected)
        plans.append(Plan(model=spec, cluster=cluster, train=train, strategy=strategy,
                          predicted=predict(costs, stage_costs), solver=info, profile_path=profile_path))
    return plans


def _raise_infeasible(cluster: ClusterSpec, least: tuple[float, Candidate] | None, fraction: float,
                      override: StrategyOverride, rejected: dict[str, int], n_candidates: int,
                      might_fit: dict[str, int]) -> None:
    cap = f"{format_bytes(fraction * cluster.device.memory_bytes)} ({fraction:.0%} of {format_bytes(cluster.device.memory_bytes)})"
    if least is None:
        rules = "".join(f"\n  - {why} [{n} of {n_candidates} candidates]"
                        for why, n in sorted(rejected.items(), key=lambda kv: -kv[1]))
        forced = override.to_cli()
        what = f"--strategy {forced}" if forced else "the search space"
        raise NoFeasiblePlanError(
            f"no strategy could be evaluated on {cluster.name}: every candidate of {what} is excluded by a rule. "
            f"Change the forced parts these rules name, or --backend. Rules that excluded them:{rules or ' none'}")
    need, c = least
    tips = ["more devices or a larger device type", "a smaller micro-batch or sequence length"]
    if override.zero_stage != 3 and (override.dp or 2) > 1:
        tips.append("ZeRO-3 (--strategy zero=3)")
    if override.recompute == "none":
        tips.append("recomputation (drop recompute=none from --strategy)")
    if cluster.device.kind == "cuda" and override.offload_optimizer is not True:
        tips.append("optimizer offload on GPUs (--backend deepspeed)")
    if might_fit:  # candidates a rule excluded that could fit by their memory bound: say which rules
        tips.append("lifting a rule that excluded candidates which may fit: " + "; ".join(
            f"{why} [{n}]" for why, n in sorted(might_fit.items(), key=lambda kv: -kv[1])))
    if need > fraction * cluster.device.memory_bytes:
        closest = f"the leanest candidate ({c.label()}) needs at least {format_bytes(need)} per device"
    else:  # its bound fits, but the MILP found no stage assignment that does
        closest = (f"the closest candidate ({c.label()}, at least {format_bytes(need)} by a lower bound) has no "
                   "stage assignment that fits")
    raise NoFeasiblePlanError(
        f"no plan fits {cap} per device on {cluster.name}; {closest}. Try " + ", ".join(tips[:-1])
        + f" or {tips[-1]}"
    )

