"""The stage-assignment MILP of one (dp, tp, pp, micro-batch) candidate. The only module that imports pulp.

Decision variables (identical blocks grouped, as FORMULAS.md recommends; one integer per stage, not one binary
per layer):
    n_s  integer   blocks in stage s (the chain is embed, block_0..block_{L-1}, head: embed is in stage 0 and the
                   head in stage p-1 because stages are contiguous; every stage holds at least one layer)
    r_s  integer   blocks of stage s run with full activation checkpointing
    q_s  integer   blocks of stage s run with selective recomputation (the candidate's policy); fixed to 0 when the
                   candidate has no selective recomputation
    a_s  integer   blocks of stage s whose activations are paged out to host memory (disk on CPU clusters) and
                   back, POET-style; ``r_s + q_s + a_s <= n_s``, so per stage the MILP trades recomputing against
                   paging; fixed to 0 when paging is not allowed
    z_s  binary    stage s recomputes or pages at all (it then needs one block's activations as working space)
    y_k  binary    state mode k (ZeRO stage x tier of optimizer states and parameters, ZeRO-Infinity), one for all
                   stages, since DeepSpeed applies one ZeRO config to the whole engine
    w_sk integer   blocks of stage s under mode k: ``w_sk <= L y_k``, ``sum_k w_sk = n_s`` (linearizes n_s y_k)
    d_s  integer   Mixture-of-Experts models with dense first layers (DeepSeek's first_k_dense_replace): the
                   dense blocks among stage s's n_s (the rest are MoE blocks). Contiguity: the D dense blocks are
                   the chain's first, so ``sum_s d_s = D``, ``d_s <= n_s`` and, with the binary ``u_s`` (stage s
                   holds an MoE block: ``n_s - d_s <= L u_s``, ``u_s <= u_{s+1}``), ``d_{s+1} <= D (1 - u_s)``;
                   ``v_sk = d_s y_k`` linearizes the mode terms' dense part as ``w_sk`` does. Absent otherwise.
    t_s            stage time per micro-batch: ``>=`` each of compute, ZeRO traffic, host->device, device->host and
                   NVMe transfers when they overlap compute (their max: ZeRO-Infinity's prefetching), else ``>=``
                   their sum
    T, U           max stage time per micro-batch; max per-step extra (exposed DP communication + optimizer)

Objective (step time, ms): ``(m - w) T + w sum_s t_s + U`` (``m max + w (sum - max)``, w the schedule's bubble
weight, ``1/v`` for interleaving v; ``CandidateCosts.bubble_weight``); every stage holds at least
``CandidateCosts.min_blocks`` blocks (one per chunk when interleaved);
constraints ``T >= t_s``, ``U >= e_s`` (four affine pieces of the overlapped extra), memory_s <= device capacity,
host bytes (offloaded states, swap buffers, paged activations) <= host memory per device, NVMe bytes <= NVMe per
device. Every coefficient comes from CandidateCosts' affine terms,
the same ones its evaluator ``stage_cost`` combines.
Units are scaled to milliseconds and GiB so coefficients stay within about 1e-3..1e3 (FORMULAS.md pitfall).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pulp

from paraplan.cost_models.costs import Affine, CandidateCosts, Mode, ModeTerms
from paraplan.errors import StrategyError
from paraplan.units import GiB

MS = 1e3


@dataclass(frozen=True)
class MilpResult:
    n_blocks: list[int]
    recompute_blocks: list[int]
    selective_blocks: list[int]
    mode: Mode
    paged_blocks: list[int]
    objective_s: float
    status: str  # "optimal" | "feasible" (stopped by the time limit with a solution) | "timeout" (with none)
    gap: float
    solve_time_s: float

    @property
    def bound_s(self) -> float:
        """A lower bound on this candidate's optimum (s): the objective when optimal, else objective x (1 - gap);
        nan when unknown (a "timeout" result carries no solution)."""
        if self.status == "optimal":
            return self.objective_s
        return self.objective_s * (1 - self.gap) if self.gap == self.gap else float("nan")


@contextlib.contextmanager
def solver_output_to_stderr() -> Iterator[None]:
    """Send whatever a solver prints to file descriptor 1 to stderr while it runs.

    HiGHS prints its banner ("Running HiGHS ...") from C on stdout even with ``msg=False`` (highspy 1.16), and
    other solvers or versions print other things; redirecting the descriptor, not ``sys.stdout``, keeps stdout
    clean for ``--json`` whatever is installed. Python's own buffered stdout is flushed first so nothing already
    written moves.
    """
    try:
        out_fd = sys.stdout.fileno()
        err_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced by an object without a descriptor (tests)
        yield
        return
    sys.stdout.flush()
    saved = os.dup(out_fd)
    try:
        os.dup2(err_fd, out_fd)
        yield
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, out_fd)
        os.close(saved)


def _solver(time_limit_s: float) -> pulp.LpSolver:
    if "HiGHS" in pulp.listSolvers(onlyAvailable=True):
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, threads=1)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s)


def solve_stage_milp(
    costs: CandidateCosts, modes: list[Mode], recompute: str | None = None, time_limit_s: float = 10.0,
    selective: bool = False, paging: bool = False,
) -> MilpResult | None:
    """Assign blocks to stages and choose recomputation and the state mode, minimizing predicted step time.

    Args:
        costs: coefficients of the candidate (dp, tp, pp, micro-batch).
        modes: allowed (ZeRO stage, offload) combinations.
        recompute: None to search, "none" to forbid recomputation (selective too), "full" to force full
            recomputation of every block, "selective" to run every block selectively (needs ``selective``).
        selective: whether stages may run blocks with selective recomputation (``costs.options.selective_policy``).
        paging: whether stages may page blocks' activations out (``CandidateCosts.paging_costs``).
        time_limit_s: solver time limit; a run stopped by it is reported as "feasible" with its gap, or as
            "timeout" (no solution, not proven infeasible) when it found none.

    Returns:
        The solution, or None when no assignment fits in memory.
    """
    L = costs.spec.n_layers or 0
    p = costs.pp
    prob = pulp.LpProblem("stage_assignment", pulp.LpMinimize)

    def var(name: str, low: float, up: float | None, cat: str) -> pulp.LpVariable:
        return prob.add_variable(name, lowBound=low, upBound=up, cat=cat)

    v = _Vars(
        n=[var(f"n_{s}", costs.min_blocks(s), L, "Integer") for s in range(p)],
        r=[var(f"r_{s}", 0, L, "Integer") for s in range(p)],
        q=[var(f"q_{s}", 0, L if selective else 0, "Integer") for s in range(p)],
        a=[var(f"a_{s}", 0, L if paging else 0, "Integer") for s in range(p)],
        z=[var(f"z_{s}", 0, 1, "Binary") for s in range(p)],
        y=[var(f"y_{k}", 0, 1, "Binary") for k in range(len(modes))],
        w=[[var(f"w_{s}_{k}", 0, L, "Integer") for k in range(len(modes))] for s in range(p)],
        tau=[var(f"t_{s}", 0, None, "Continuous") for s in range(p)],
        T=var("T", 0, None, "Continuous"), U=var("U", 0, None, "Continuous"),
    )
    # Contiguity/partition: every block in exactly one stage.
    prob += pulp.lpSum(v.n) == L, "partition"
    prob += pulp.lpSum(v.y) == 1, "one_state_mode"
    D = costs.n_dense if costs.dense_block is not None else 0
    if D and costs.vpp > 1:
        raise StrategyError(f"{costs.spec.name} starts with dense layers: the MILP lays them out for contiguous "
                            "stages (vpp 1) only")
    if D:  # an MoE model's dense blocks: the first D of the chain (module docstring)
        v.d = [var(f"d_{s}", 0, D, "Integer") for s in range(p)]
        v.dw = [[var(f"v_{s}_{k}", 0, D, "Integer") for k in range(len(modes))] for s in range(p)]
        u = [var(f"u_{s}", 0, 1, "Binary") for s in range(p)]
        prob += pulp.lpSum(v.d) == D, "dense_blocks"
        for s in range(p):
            prob += v.d[s] <= v.n[s], f"dense_within_stage_{s}"
            prob += v.n[s] - v.d[s] <= L * u[s], f"holds_moe_{s}"
            prob += pulp.lpSum(v.dw[s]) == v.d[s], f"dense_mode_split_{s}"
            for k in range(len(modes)):
                prob += v.dw[s][k] <= D * v.y[k], f"dense_mode_link_{s}_{k}"
            if s + 1 < p:
                prob += u[s] <= u[s + 1], f"moe_suffix_{s}"
                prob += v.d[s + 1] <= D * (1 - u[s]), f"dense_prefix_{s}"
    for s in range(p):
        _add_stage(prob, costs, modes, v, s, recompute, L)
    # Step time (ms): m max_s t_s + w (sum_s t_s - max_s t_s) + max_s extra_s (costs.pipeline_time_s).
    w = costs.bubble_weight()
    prob += (costs.m - w) * v.T + pulp.lpSum(v.tau) * w + v.U

    start = time.perf_counter()
    with solver_output_to_stderr():
        prob.solve(_solver(time_limit_s))
    elapsed = time.perf_counter() - start
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        if prob.status == pulp.LpStatusInfeasible or elapsed < time_limit_s:
            return None  # proven infeasible: no assignment fits
        # Stopped by the time limit before any solution: not proven infeasible, so the search may not call its
        # best plan optimal unless this candidate's lower bound is above it.
        return MilpResult([], [], [], modes[0], [], float("nan"), "timeout", float("nan"), elapsed)
    status, gap = "optimal", 0.0
    if prob.sol_status == pulp.LpSolutionIntegerFeasible or elapsed >= time_limit_s:
        status = "feasible"
        gap = _gap(prob)
    k_best = max(range(len(modes)), key=lambda k: v.y[k].value() or 0.0)
    return MilpResult(
        n_blocks=[round(x.value()) for x in v.n], recompute_blocks=[round(x.value()) for x in v.r],
        selective_blocks=[round(x.value() or 0) for x in v.q],
        mode=modes[k_best], paged_blocks=[round(x.value() or 0) for x in v.a],
        objective_s=pulp.value(prob.objective) / MS, status=status, gap=gap, solve_time_s=elapsed,
    )


@dataclass
class _Vars:
    """The MILP's variables (see the module docstring)."""

    n: list
    r: list
    q: list
    a: list
    z: list
    y: list
    w: list
    tau: list
    T: pulp.LpVariable
    U: pulp.LpVariable
    d: list | None = None  # dense blocks per stage (MoE models with dense first layers)
    dw: list | None = None  # d_s y_k

    def affine(self, a: Affine, s: int, scale: float = 1.0):
        """A mode-independent term ``a0 + a1 n_s + a2 r_s + a3 q_s + a4 a_s (+ a5 d_s)``."""
        out = (a.const + a.per_block * self.n[s] + a.per_recompute * self.r[s] + a.per_selective * self.q[s]
               + a.per_paged * self.a[s])
        if self.d is not None:
            out += a.per_dense * self.d[s]
        return scale * out

    def by_mode(self, terms: list[ModeTerms], pick, s: int, scale: float = 1.0):
        """A mode term ``a0 + a1 n_s (+ a5 d_s)`` summed over modes as ``a0 y_k + a1 w_sk (+ a5 v_sk)`` (exact:
        ``w_sk = n_s y_k``, ``v_sk = d_s y_k``)."""
        return pulp.lpSum(scale * (pick(tk).const * self.y[k] + pick(tk).per_block * self.w[s][k]
                                   + (pick(tk).per_dense * self.dw[s][k] if self.dw is not None else 0))
                          for k, tk in enumerate(terms))


def _add_stage(prob: pulp.LpProblem, costs: CandidateCosts, modes: list[Mode], v: _Vars, s: int,
               recompute: str | None, L: int) -> None:
    """Constraint families of stage s: recomputation, mode split, stage time, step extra, memory."""
    n, r, q, a = v.n[s], v.r[s], v.q[s], v.a[s]
    prob += r + q + a <= n, f"recompute_within_stage_{s}"
    prob += r + q + a <= L * v.z[s], f"recompute_flag_{s}"
    if recompute == "none":
        prob += r + q == 0, f"forced_no_recompute_{s}"
    elif recompute == "full":
        prob += r == n, f"forced_full_recompute_{s}"
    elif recompute == "selective":
        prob += q == n, f"forced_selective_recompute_{s}"
    prob += pulp.lpSum(v.w[s]) == n, f"mode_split_{s}"
    for k in range(len(modes)):
        prob += v.w[s][k] <= L * v.y[k], f"mode_link_{s}_{k}"
    terms = [costs.mode_terms(s, mode) for mode in modes]
    overlap = costs.options.overlap_dp
    # Stage time per micro-batch: the max of its channels with overlap, else their sum (CandidateCosts.stage_cost).
    h2d_a, d2h_a, disk_a, host_a, nvme_a = costs.paging_costs()
    channels = [v.affine(costs.compute_terms(s), s, MS), v.by_mode(terms, lambda t: t.zero_comm, s, MS),
                v.by_mode(terms, lambda t: t.h2d_s, s, MS) + MS * h2d_a * a,
                v.by_mode(terms, lambda t: t.d2h_s, s, MS) + MS * d2h_a * a,
                v.by_mode(terms, lambda t: t.disk_s, s, MS) + MS * disk_a * a]
    if overlap:
        for i, ch in enumerate(channels):
            prob += v.tau[s] >= ch, f"stage_channel_{s}_{i}"
    else:
        prob += v.tau[s] >= pulp.lpSum(channels), f"stage_time_{s}"
    prob += v.T >= v.tau[s], f"max_stage_time_{s}"
    # Per-step extra: optimizer + gradient reduction + parameter gather; with overlap each exposed part is
    # max(0, comm - window), and max(0, a) + max(0, b) = max(0, a, b, a + b): four linear lower bounds on U.
    opt = v.by_mode(terms, lambda t: t.optimizer_s, s, MS) + v.by_mode(terms, lambda t: t.offload_s, s, MS)
    red = v.by_mode(terms, lambda t: t.grad_reduce, s, MS)
    gat = v.by_mode(terms, lambda t: t.param_gather, s, MS)
    if overlap:
        red = red - v.affine(costs.backward_terms(s), s, MS)
        gat = gat - v.affine(costs.forward_terms(s), s, MS)
        for i, extra in enumerate((opt, opt + red, opt + gat, opt + red + gat)):
            prob += v.U >= extra, f"max_step_extra_{s}_{i}"
    else:
        prob += v.U >= opt + red + gat, f"max_step_extra_{s}"
    states = sum(v.by_mode(terms, pick, s) for pick in (lambda t: t.params, lambda t: t.grads,
                                                         lambda t: t.optimizer, lambda t: t.other))
    act = v.affine(costs.activation_terms(s), s) + costs.block.act_bytes * v.z[s]
    prob += (states + act) / GiB <= costs.usable_capacity_bytes / GiB, f"device_memory_{s}"
    k = costs.inflight(s)
    prob += (v.by_mode(terms, lambda t: t.host, s) + host_a * k * a) / GiB <= costs.host_capacity_bytes / GiB, \
        f"host_memory_{s}"
    prob += (v.by_mode(terms, lambda t: t.nvme, s) + nvme_a * k * a) / GiB <= costs.nvme_capacity_bytes / GiB, \
        f"nvme_capacity_{s}"


def _gap(prob: pulp.LpProblem) -> float:
    model = getattr(prob, "solverModel", None)
    if model is not None and hasattr(model, "getInfo"):
        try:
            return float(model.getInfo().mip_gap)
        except Exception:  # noqa: BLE001 - solver introspection is best effort
            return float("nan")
    return float("nan")
