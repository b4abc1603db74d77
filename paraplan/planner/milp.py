"""The stage-assignment MILP of one (dp, tp, pp, micro-batch) candidate. The only module that imports pulp.

Decision variables (identical blocks grouped, as FORMULAS.md recommends; one integer per stage, not one binary
per layer):
    n_s  integer   blocks in stage s (the chain is embed, block_0..block_{L-1}, head: embed is in stage 0 and the
                   head in stage p-1 because stages are contiguous; every stage holds at least one layer)
    r_s  integer   blocks of stage s run with full activation checkpointing, ``r_s <= n_s``
    z_s  binary    stage s recomputes at all (it then needs one block's activations as working space)
    y_k  binary    state mode k (ZeRO stage 0-3 x optimizer offload), one for all stages, since DeepSpeed applies
                   one ZeRO config to the whole engine
    w_sk integer   blocks of stage s under mode k: ``w_sk <= L y_k``, ``sum_k w_sk = n_s`` (linearizes n_s y_k)
    T, U           max stage time per micro-batch; max per-step extra (DP communication + optimizer)

Objective (step time, ms): ``(m - 1) T + sum_s t_s + U``; constraints ``T >= t_s``, ``U >= e_s``,
memory_s <= device capacity, offloaded optimizer bytes <= host memory per device.
Units are scaled to milliseconds and GiB so coefficients stay within about 1e-3..1e3 (FORMULAS.md pitfall).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pulp

from paraplan.cost_models.costs import CandidateCosts, Mode
from paraplan.units import GiB

MS = 1e3


@dataclass(frozen=True)
class MilpResult:
    n_blocks: list[int]
    recompute_blocks: list[int]
    mode: Mode
    objective_s: float
    status: str  # "optimal" | "feasible"
    gap: float
    solve_time_s: float


def _solver(time_limit_s: float) -> pulp.LpSolver:
    if "HiGHS" in pulp.listSolvers(onlyAvailable=True):
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, threads=1)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s)


def solve_stage_milp(
    costs: CandidateCosts, modes: list[Mode], recompute: str | None = None, time_limit_s: float = 10.0,
) -> MilpResult | None:
    """Assign blocks to stages and choose recomputation and the state mode, minimizing predicted step time.

    Args:
        costs: coefficients of the candidate (dp, tp, pp, micro-batch).
        modes: allowed (ZeRO stage, offload) combinations.
        recompute: None to search, "none" to forbid, "full" to force recomputation of every block.
        time_limit_s: solver time limit; a run stopped by it is reported as "feasible" with its gap.

    Returns:
        The solution, or None when no assignment fits in memory.
    """
    L = costs.spec.n_layers or 0
    p = costs.pp
    blk = costs.block
    prob = pulp.LpProblem("stage_assignment", pulp.LpMinimize)

    def var(name: str, low: float, up: float | None, cat: str) -> pulp.LpVariable:
        return prob.add_variable(name, lowBound=low, upBound=up, cat=cat)

    n = [var(f"n_{s}", 0 if s in (0, p - 1) else 1, L, "Integer") for s in range(p)]
    r = [var(f"r_{s}", 0, L, "Integer") for s in range(p)]
    z = [var(f"z_{s}", 0, 1, "Binary") for s in range(p)]
    y = [var(f"y_{k}", 0, 1, "Binary") for k in range(len(modes))]
    w = [[var(f"w_{s}_{k}", 0, L, "Integer") for k in range(len(modes))]
         for s in range(p)]
    T = var("T", 0, None, "Continuous")
    U = var("U", 0, None, "Continuous")

    # Contiguity/partition: every block in exactly one stage.
    prob += pulp.lpSum(n) == L, "partition"
    prob += pulp.lpSum(y) == 1, "one_state_mode"
    block_time = blk.fwd_s + blk.bwd_s + blk.tp_fwd_s + blk.tp_bwd_s
    recompute_time = blk.fwd_s + blk.tp_fwd_s
    stage_times = []
    for s in range(p):
        prob += r[s] <= n[s], f"recompute_within_stage_{s}"
        prob += r[s] <= L * z[s], f"recompute_flag_{s}"
        if recompute == "none":
            prob += r[s] == 0, f"forced_no_recompute_{s}"
        elif recompute == "full":
            prob += r[s] == n[s], f"forced_full_recompute_{s}"
        prob += pulp.lpSum(w[s]) == n[s], f"mode_split_{s}"
        for k in range(len(modes)):
            prob += w[s][k] <= L * y[k], f"mode_link_{s}_{k}"
        fixed = costs.stage_cost(s, 0, 0, modes[0]).time_per_micro_batch_s
        t_s = MS * (block_time * n[s] + recompute_time * r[s] + fixed)
        stage_times.append(t_s)
        prob += T >= t_s, f"max_stage_time_{s}"
        # Per-step extra (DP communication + optimizer) and memory are affine in the stage's blocks per mode;
        # the coefficients come from the same stage_cost() the evaluator uses (difference at 1 and 2 blocks).
        extra, mem, host = [], [], []
        for k, mode in enumerate(modes):
            c1, c2 = costs.stage_cost(s, 1, 0, mode), costs.stage_cost(s, 2, 0, mode)
            c0_extra = c1.step_extra_s - (c2.step_extra_s - c1.step_extra_s)
            extra.append(MS * (c0_extra * y[k] + (c2.step_extra_s - c1.step_extra_s) * w[s][k]))
            state1 = c1.params_bytes + c1.grads_bytes + c1.optimizer_bytes + c1.other_bytes
            state2 = c2.params_bytes + c2.grads_bytes + c2.optimizer_bytes + c2.other_bytes
            mem.append(((2 * state1 - state2) * y[k] + (state2 - state1) * w[s][k]) / GiB)
            host.append(((2 * c1.host_bytes - c2.host_bytes) * y[k] + (c2.host_bytes - c1.host_bytes) * w[s][k]) / GiB)
        prob += U >= pulp.lpSum(extra), f"max_step_extra_{s}"
        c_act = costs.stage_cost(s, 0, 0, modes[0])
        inflight = costs.inflight(s)
        act = (c_act.activation_bytes + inflight * (blk.act_bytes * (n[s] - r[s]) + blk.ckpt_bytes * r[s])
               + blk.act_bytes * z[s]) / GiB
        prob += pulp.lpSum(mem) + act <= costs.capacity_bytes / GiB, f"device_memory_{s}"
        prob += pulp.lpSum(host) <= costs.host_capacity_bytes / GiB, f"host_memory_{s}"
    prob += (costs.m - 1) * T + pulp.lpSum(stage_times) + U

    start = time.perf_counter()
    prob.solve(_solver(time_limit_s))
    elapsed = time.perf_counter() - start
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None
    status, gap = "optimal", 0.0
    if prob.sol_status == pulp.LpSolutionIntegerFeasible or elapsed >= time_limit_s:
        status = "feasible"
        gap = _gap(prob)
    k_best = max(range(len(modes)), key=lambda k: y[k].value() or 0.0)
    return MilpResult(
        n_blocks=[round(v.value()) for v in n], recompute_blocks=[round(v.value()) for v in r],
        mode=modes[k_best], objective_s=pulp.value(prob.objective) / MS, status=status, gap=gap,
        solve_time_s=elapsed,
    )


def _gap(prob: pulp.LpProblem) -> float:
    model = getattr(prob, "solverModel", None)
    if model is not None and hasattr(model, "getInfo"):
        try:
            return float(model.getInfo().mip_gap)
        except Exception:  # noqa: BLE001 - solver introspection is best effort
            return float("nan")
    return float("nan")
