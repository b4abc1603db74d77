"""Outer search: enumerate (dp, tp, pp, micro-batch) candidates, solve the stage MILP of each, keep the best.

Candidates are sorted by a cheap lower bound on the step time (perfect balance, no recomputation, no DP
communication: ``(m + (p - 1)/v)/p * sum of stage compute times``) and skipped when that bound cannot beat the K-th best plan
found so far (FORMULAS.md, "Outer loop").
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from paraplan.cost_models import transformer as tf
from paraplan.cost_models.costs import CandidateCosts, CostOptions, Mode, StageCost, predict
from paraplan.cost_models.links import calibrate_cluster
from paraplan.errors import NoFeasiblePlanError, StrategyError, TrainSpecError
from paraplan.planner.milp import MilpResult, solve_stage_milp
from paraplan.types import (
    CandidateRecord,
    ClusterSpec,
    ModelProfile,
    ModelSpec,
    Plan,
    SolverInfo,
    StagePlan,
    Strategy,
    StrategyOverride,
    TrainSpec,
    place_stages,
)
from paraplan.units import format_bytes

BackendChoice = str  # "any" | "deepspeed" | "torch" | "unconstrained"


@dataclass(frozen=True)
class SearchProgress:
    """Where a running search stands: candidates taken up so far and the incumbent (best plan found)."""

    total: int  # candidates the backends allow; each ends solved, pruned or cannot_fit, one report each
    solved: int  # MILPs solved so far
    pruned: int  # skipped because a lower bound cannot beat the K-th best plan
    rejected: int  # excluded before the search by a backend or mode rule
    cannot_fit: int  # dropped unsolved: no stage split fits by the memory bounds
    best_step_time_s: float | None
    best: Candidate | None


@dataclass(frozen=True)
class Candidate:
    """One outer-loop point: parallel degrees, micro-batch and the candidate-wide knobs the MILP does not choose.

    ``selective`` is the selective-recomputation policy whose blocks the MILP may place per stage ("attention" or
    "op"), None for none; the MILP chooses how many blocks of each stage run with it.
    """

    dp: int
    tp: int
    pp: int
    micro_batch_size: int
    sequence_parallel: bool = False
    selective: str | None = None
    cp: int = 1
    vpp: int = 1
    schedule: str = "1f1b"
    ep: int = 1
    etp: int = 1

    def options(self) -> CostOptions:
        return CostOptions(vpp=self.vpp, cp=self.cp, sequence_parallel=self.sequence_parallel,
                           selective_policy=self.selective or "attention", schedule=self.schedule, ep=self.ep,
                           etp=self.etp)

    def label(self) -> str:
        knobs = (f" cp={self.cp}" if self.cp > 1 else "") + (" sp" if self.sequence_parallel else "")
        knobs += (f" ep={self.ep}" if self.ep > 1 else "") + (f" etp={self.etp}" if self.etp > 1 else "")
        knobs += f" {self.selective}-selective" if self.selective else ""
        if self.pp > 1 and (self.schedule != "1f1b" or self.vpp > 1):
            knobs += f" {self.schedule}" + (f" vpp={self.vpp}" if self.vpp > 1 else "")
        return f"dp={self.dp} tp={self.tp} pp={self.pp} mb={self.micro_batch_size}{knobs}"


# Context parallelism is searched down to this many tokens per rank: shorter chunks leave attention kernels small
# and the per-layer K/V all-gather dominant (assumption; Llama 3 ran cp 16 at 131,072 tokens, 8,192 per rank).
CP_MIN_TOKENS_PER_RANK = 1024


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def expert_degrees(spec: ModelSpec, dp: int, tp: int, cp: int, override: StrategyOverride) -> list[tuple[int, int]]:
    """(ep, etp) pairs searched for a candidate of a Mixture-of-Experts model ((1, 1) for a dense one): ep among
    the divisors of the expert count E, etp 1 or tp (Megatron-Core's default ``expert_tensor_parallel_size =
    tp``) dividing the expert MLP width, with ``ep etp`` dividing ``dp cp tp`` (the expert groups tile a
    pipeline stage: Megatron-Core parallel_state.py); restricted by ``override``."""
    moe = spec.moe
    if moe is None:
        return [(1, 1)]
    etps = sorted({1, tp}) if override.etp is None else [override.etp]
    out = []
    for etp in etps:
        if moe.expert_ffn_hidden % etp:
            continue
        for ep in _divisors(moe.n_experts):
            if (override.ep is None or ep == override.ep) and (dp * cp * tp) % (ep * etp) == 0:
                out.append((ep, etp))
    return out


def enumerate_candidates(
    spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, override: StrategyOverride,
    micro_batches: list[int] | None = None,
) -> list[Candidate]:
    """All (dp, tp, pp, cp, b) with ``dp tp pp cp = world``, tp within a node dividing the attention and KV heads,
    ``pp <= L``, cp dividing the sequence in ``2 cp`` load-balanced chunks of at least
    :data:`CP_MIN_TOKENS_PER_RANK` tokens per rank (cp = 1 always) and ``global_batch`` divisible by ``dp b``;
    for a Mixture-of-Experts model each with every (ep, etp) of :func:`expert_degrees`; restricted by
    ``override``.

    ``micro_batches`` None tries every b dividing ``global_batch / dp`` (memory bounds it later: a candidate whose
    leanest configuration cannot fit is never solved); a profile passes the sizes it measured.

    Raises:
        StrategyError: the override itself is impossible (degrees that do not multiply to the world size...).
        TrainSpecError: no candidate divides the global batch.
    """
    world = cluster.world_size
    L = spec.n_layers or 0
    o = override
    forced = [x for x in (o.dp, o.tp, o.pp, o.cp) if x is not None]
    prod = 1
    for x in forced:
        prod *= x
    if world % prod or (len(forced) == 4 and prod != world):
        raise StrategyError(
            f"--strategy dp/tp/pp/cp ({o.dp}, {o.tp}, {o.pp}, {o.cp}) must multiply to the world size {world} of "
            f"{cluster.name}"
        )
    if o.cp is not None and train.seq_len % (2 * o.cp) and o.cp > 1:
        raise StrategyError(f"cp={o.cp} must split seq-len {train.seq_len} into 2 x cp equal chunks (the "
                            "load-balanced causal split): choose a cp with 2 x cp dividing the sequence length")
    if o.tp is not None and (o.tp > cluster.devices_per_node or (spec.n_heads or 1) % o.tp
                             or (spec.n_kv_heads or 1) % o.tp):
        raise StrategyError(
            f"tp={o.tp} must divide the attention heads ({spec.n_heads}) and KV heads ({spec.n_kv_heads}) and "
            f"fit in a node ({cluster.devices_per_node} devices)"
        )
    if o.pp is not None and o.pp > L:
        raise StrategyError(f"pp={o.pp} exceeds the model's {L} blocks")
    if spec.moe is None and (o.ep or 1, o.etp or 1) != (1, 1):
        raise StrategyError(f"--strategy ep/etp: {spec.name} has no experts (expert parallelism needs a "
                            "Mixture-of-Experts model); drop ep and etp")
    if spec.moe is not None and spec.moe.first_dense_layers and (o.vpp or 1) > 1:
        raise StrategyError(f"--strategy vpp={o.vpp}: {spec.name} starts with dense layers, which the planner lays "
                            "out on contiguous stages only; use vpp=1 (`paraplan estimate` prices interleaving)")
    if spec.moe is not None and o.ep is not None and spec.moe.n_experts % o.ep:
        raise StrategyError(f"--strategy ep={o.ep} must divide the {spec.moe.n_experts} experts of {spec.name}")
    sched, vpp = o.schedule, o.vpp
    if sched == "zbv" and vpp not in (None, 2) or sched == "interleaved_1f1b" and vpp == 1:
        raise StrategyError(f"--strategy schedule={sched} with vpp={vpp}: zbv runs 2 chunks per rank (vpp=2), "
                            "interleaved_1f1b at least 2")
    if o.pp == 1 and (sched not in (None, "1f1b") or (vpp or 1) > 1):
        raise StrategyError("--strategy pp=1 has no pipeline: drop schedule/vpp or force pp > 1")
    if (vpp or 1) > 1 and o.pp is not None and o.pp * vpp > L + 2:
        raise StrategyError(f"--strategy pp={o.pp} x vpp={vpp} chunks exceed the model's {L} blocks plus the "
                            "embedding's and head's chunks")
    out: list[Candidate] = []
    divisible_batch = False
    for tp in _divisors(cluster.devices_per_node):
        if (spec.n_heads or 1) % tp or (spec.n_kv_heads or 1) % tp or (o.tp and tp != o.tp):
            continue
        for pp in _divisors(world // tp):
            if pp > L or (o.pp and pp != o.pp):
                continue
            for cp in _divisors(world // (tp * pp)):
                if o.cp is not None:
                    if cp != o.cp:
                        continue
                elif cp > 1 and (train.seq_len % (2 * cp) or train.seq_len // cp < CP_MIN_TOKENS_PER_RANK):
                    continue
                dp = world // (tp * pp * cp)
                if o.dp and dp != o.dp:
                    continue
                sizes = micro_batches if micro_batches is not None else (
                    _divisors(train.global_batch // dp) if train.global_batch % dp == 0 else [])
                for b in sizes:
                    if o.micro_batch_size and b != o.micro_batch_size:
                        continue
                    if train.global_batch % (dp * b) == 0:
                        divisible_batch = True
                        out += [Candidate(dp, tp, pp, b, cp=cp, ep=ep, etp=etp)
                                for ep, etp in expert_degrees(spec, dp, tp, cp, o)]
    if not out and not divisible_batch:
        raise TrainSpecError(
            f"global batch {train.global_batch} is not divisible by dp x micro-batch for any strategy on "
            f"{cluster.name} (micro-batches {list(micro_batches) if micro_batches else 'any'}); choose a global batch "
            "that is a multiple of "
            "the data-parallel degree times the micro-batch size"
        )
    return out


# Shares of the optimizer states offloaded that are searched besides all of them (DeepSpeed ZeRO-3's
# offload_optimizer.ratio, CPU only; Mist searches such ratios continuously, a few levels keep the MILP small).
OFFLOAD_RATIOS = (0.25, 0.5, 0.75)


def _tier_modes(zero: int) -> list[Mode]:
    """The tier combinations of one ZeRO stage that are searched: the optimizer on the device, in host memory or on
    NVMe; at ZeRO-3 also partial optimizer offload (:data:`OFFLOAD_RATIOS`) and the parameters in host memory or on
    NVMe. Not searched: parameters offloaded with the optimizer on the device (ZeRO-Infinity offloads the
    optimizer first: it is 6x the parameter bytes and needs no per micro-batch traffic), parameters on NVMe with
    the optimizer in host memory (ZeRO-Infinity's configurations put both on NVMe), partial offload with
    parameters offloaded."""
    out = [Mode(zero)]
    if zero == 0:
        return out + [Mode(0, "cpu")]  # excluded by a rule, reported
    out += [Mode(zero, "cpu"), Mode(zero, "nvme")]
    if zero == 3:
        out += [Mode(3, "cpu", ratio=r) for r in OFFLOAD_RATIOS]
        out += [Mode(3, "cpu", "cpu"), Mode(3, "nvme", "cpu"), Mode(3, "nvme", "nvme")]
    return out


def _matches(mode: Mode, override: StrategyOverride) -> bool:
    o = override
    return ((o.zero_stage is None or mode.zero_stage == o.zero_stage)
            and (o.offload_optimizer is None or mode.offload_optimizer == o.offload_optimizer)
            and (o.offload_param is None or mode.offload_param == o.offload_param)
            and (o.offload_ratio is None and mode.ratio in (1.0, *OFFLOAD_RATIOS) or mode.ratio == o.offload_ratio))


def mode_rules(cluster: ClusterSpec, cand: Candidate, override: StrategyOverride, backend: str, moe: bool = False
               ) -> list[tuple[Mode, str | None]]:
    """Every ZeRO stage x memory-tier mode (:func:`_tier_modes`) the override leaves, each with the rule that
    excludes it (None: allowed).

    DeepSpeed: its pipeline engine supports ZeRO 0-1 only; it offloads only partitioned optimizer states (ZeRO >= 1),
    swaps them to NVMe only at ZeRO-3 (``runtime/zero/stage_1_and_2.py`` keeps "nvme" optimizer states in host
    memory: no swapper), offloads parameters only at ZeRO-3, and partial offload (``ratio``) only at ZeRO-3. On a
    CPU cluster the host tier is the device's own memory, so only NVMe counts. torch (FSDP2): ``CPUOffloadPolicy``
    puts parameters, gradients and optimizer states on the host together, on CUDA only; nothing on NVMe.
    Mixture-of-Experts models (``moe``) are planned without offload (their expert states' tiers are not modelled);
    the torch backend's expert parallelism (ep > 1) runs ZeRO-0, or ZeRO-2/3 when ep = dp (each rank holds its own
    experts): its ZeRO-1 optimizer would copy one rank's experts onto the others, and at ZeRO-2/3 with ep < dp the
    expert states of the ranks sharing experts stay whole, not sharded as priced (torch_expert_parallel.py).
    The rules depend only on the device kind, whether dp x cp is 1 and pp > 1, the override, the backend and
    ``moe``, so they are computed once per such key (memoized).
    """
    single = cand.dp * cand.cp * cand.tp // (cand.ep * cand.etp) == 1 and cand.dp * cand.cp == 1
    experts = (cand.ep > 1, cand.ep == cand.dp * cand.cp) if moe else None
    key = (cluster.device.kind, single, cand.pp > 1, override.model_dump_json(), backend, experts)
    if key not in _MODE_RULES:
        _MODE_RULES[key] = _mode_rules(cluster.device.kind, single, cand.pp > 1, override, backend, experts)
    return list(_MODE_RULES[key])


_MODE_RULES: dict[tuple, list[tuple[Mode, str | None]]] = {}


def _mode_rules(kind: str, single: bool, piped: bool, override: StrategyOverride, backend: str,
                experts: tuple[bool, bool] | None = None) -> list[tuple[Mode, str | None]]:
    """``experts``: None for a dense model, else (ep > 1, ep = dp x cp)."""
    moe = experts is not None
    ep_sharded, ep_whole = experts if experts is not None else (False, False)
    out: list[tuple[Mode, str | None]] = []
    forced_ratio = [Mode(3, "cpu", ratio=override.offload_ratio)] if override.offload_ratio not in (None, 1.0) \
        and override.offload_ratio not in OFFLOAD_RATIOS else []
    for mode in [m for zero in range(4) for m in _tier_modes(zero)] + forced_ratio:
        if not _matches(mode, override):
            continue
        zero, opt, par = mode.zero_stage, mode.offload_optimizer, mode.offload_param
        torch_ok = not mode.offloads or (zero, opt, par, mode.ratio) == (3, "cpu", "cpu", 1.0)
        why = None
        if moe and mode.offloads:
            why = "offload of a Mixture-of-Experts model's states (not modelled: expert states stay on the device)"
        elif opt != "none" and zero == 0:
            why = "optimizer offload needs ZeRO >= 1 (DeepSpeed offloads the partitioned optimizer states)"
        elif "cpu" in (opt, par) and kind == "cpu":
            why = "offload to host memory on a CPU cluster (device memory is already host memory; NVMe is not)"
        elif opt == "nvme" and zero < 3 and backend != "unconstrained":
            why = ("optimizer on NVMe below ZeRO-3 (DeepSpeed's stage_1_and_2.py keeps it in host memory: only "
                   "ZeRO-3 swaps to NVMe)")
        elif backend in ("torch", "any") and not torch_ok:
            why = (f"{mode.label()} with --backend {backend} (FSDP2 offloads parameters, gradients and optimizer "
                   "states to the host together, and nothing to NVMe; use --backend deepspeed)")
        elif backend in ("torch", "any") and mode.offloads and kind == "cpu":
            why = f"offload with --backend {backend} on a CPU cluster (FSDP2's CPUOffloadPolicy needs CUDA)"
        elif backend == "torch" and ep_sharded and (zero == 1 or zero >= 2 and not ep_whole):
            why = ("ZeRO-1 with ep > 1 under --backend torch (its optimizer would copy one rank's experts onto the "
                   "others)" if zero == 1 else "ZeRO-2/3 with 1 < ep < dp under --backend torch (the expert states of "
                   "ranks sharing experts would stay whole, not sharded as priced); ep = dp allows it")
        elif single and zero > 0 and override.zero_stage is None and not mode.offloads:
            why = "ZeRO with dp=1 (nothing to shard over)"
        elif backend in ("deepspeed", "any") and piped and zero > 1:
            why = (f"ZeRO-2/3 with pp > 1 under --backend {backend} (DeepSpeed's pipeline engine runs ZeRO 0-1 "
                   "only; --backend torch allows it)")
        out.append((mode, why))
    return out


def paging_allowed(override: StrategyOverride, spec: ModelSpec | None = None) -> bool:
    """Whether stages may page activations (both backends run it: ``train_common.paged_activations``): unless
    ``--strategy offload_act=false`` forbids it, ``recompute=full/selective/op`` gives every block another
    treatment, or the model is a Mixture-of-Experts one (paging its blocks is not modelled)."""
    if spec is not None and spec.moe is not None:
        return False
    return override.offload_activations is not False and override.recompute in (None, "none")


def backend_rejection(spec: ModelSpec, cand: Candidate, global_batch: int, backend: str,
                      seq_len: int | None = None, device_kind: str = "cuda") -> str | None:
    """The rule that keeps the chosen backend(s) from launching this candidate, or None when they can.

    Both backends (``backends/checks.py``, which the planner may not import; keep the two in step): tensor
    parallelism only for Llama-family blocks (GPT-2's fused qkv is not split) with tp dividing the heads, key/value
    heads and MLP width, and no tied embeddings across pipeline stages. DeepSpeed: AutoTP does not combine with its
    pipeline engine and has no Megatron sequence parallelism; its pipeline engine runs its own 1F1B only (no
    interleaving, no zero bubble); it has no context parallelism (Ulysses is another method, not planned). torch:
    ``Schedule1F1B`` needs at least as many micro-batches as stages and the multi-chunk schedules a micro-batch
    count divisible by their rounds ``max(1, m // pp)`` (torch.distributed.pipelining); ``context_parallel`` runs
    on CUDA only (Llama blocks, ``2 cp`` chunks, times tp with sequence parallelism, dividing ``seq_len``); the
    zero-bubble schedules give wrong gradients with dp x cp > 1 and cannot run the op policy (measured by the
    backend's tests); sequence parallelism shards the sequence, so tp must divide ``seq_len`` (when given).
    Selective recomputation, either policy, runs on both (torch's selective activation checkpointing).
    """
    if backend == "unconstrained":
        return None
    m = global_batch // (cand.dp * cand.micro_batch_size)
    if spec.moe is not None:
        why = _moe_backend_rejection(cand, backend)
        if why:
            return why
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
    if backend in ("deepspeed", "any") and cand.pp > 1 and cand.schedule != "1f1b":
        return (f"pipeline schedule {cand.schedule} under --backend {backend} (DeepSpeed's pipeline engine runs its "
                "own 1F1B only; --backend torch runs interleaved and zero-bubble schedules)")
    if backend in ("deepspeed", "any") and cand.cp > 1:
        return (f"context parallelism under --backend {backend} (DeepSpeed offers Ulysses sequence parallelism, "
                "another method that paraplan does not plan; --backend torch runs cp on GPUs)")
    if backend == "torch" and cand.cp > 1 and device_kind != "cuda":
        return ("context parallelism on a CPU cluster (torch's context_parallel runs on CUDA only: CPU attention "
                "kernels have no sharding rule)")
    if backend == "torch" and cand.cp > 1 and spec.family != "llama":
        return f"context parallelism for a {spec.family} model (the torch backend shards Llama blocks only)"
    if backend == "torch" and cand.cp > 1 and seq_len is not None and \
            seq_len % (2 * cand.cp * (cand.tp if cand.sequence_parallel else 1)):
        return ("context parallelism whose 2 x cp load-balanced chunks (x tp with sequence parallelism) do not "
                "divide the sequence length")
    if backend == "torch" and cand.schedule in ("zero_bubble", "zbv") and cand.dp * cand.cp > 1:
        return ("a zero-bubble schedule with data parallelism (dp x cp > 1): torch's split backward gives wrong "
                "gradients under DDP and FSDP2 (measured against one process); use interleaved_1f1b")
    if backend == "torch" and cand.schedule in ("zero_bubble", "zbv") and cand.selective == "op":
        return ("a zero-bubble schedule with the op selective policy (torch's split backward runs the "
                "checkpointed graph twice: 'Trying to backward an extra time')")
    if cand.sequence_parallel and seq_len is not None and seq_len % cand.tp:
        return "sequence parallelism with a tp that does not divide the sequence length"
    if backend in ("torch", "any") and cand.pp > 1 and cand.schedule == "1f1b" and m < cand.pp:
        return (f"fewer micro-batches per step than stages under --backend {backend} (torch's 1F1B needs at least "
                "as many micro-batches as stages: raise --global-batch or lower the micro-batch)")
    if backend == "torch" and cand.pp > 1 and cand.schedule != "1f1b" and m % max(1, m // cand.pp):
        return ("a micro-batch count that is not a multiple of the schedule's rounds max(1, m // pp) (torch's "
                "interleaved and zero-bubble schedules need it)")
    return None


def _moe_backend_rejection(cand: Candidate, backend: str) -> str | None:
    """What keeps the backends from running a Mixture-of-Experts candidate (``torch_expert_parallel.
    check_expert_parallel`` and ``checks.check_tp``, which the planner may not import; keep them in step): neither
    splits MoE blocks by tp or experts by etp; the torch backend runs ep (experts sharded over ep consecutive ranks
    of the data-parallel group) without cp; the DeepSpeed backend runs MoE models at ep = 1 only."""
    if cand.tp > 1 or cand.etp > 1:
        return (f"tp or etp > 1 for a Mixture-of-Experts model under --backend {backend} (neither backend splits "
                "MoE blocks or experts by tensor parallelism; --backend unconstrained prices it anyway)")
    if cand.cp > 1:
        return (f"cp > 1 for a Mixture-of-Experts model under --backend {backend} (the torch backend runs expert "
                "parallelism without context parallelism)")
    if backend in ("deepspeed", "any") and cand.ep > 1:
        return (f"ep > 1 under --backend {backend} (the DeepSpeed backend runs Mixture-of-Experts models at ep=1 "
                "only; --backend torch runs expert parallelism)")
    return None


def schedule_options(pp: int, n_layers: int, override: StrategyOverride) -> list[tuple[str, int]]:
    """(schedule, vpp) pairs searched for a pipeline of ``pp`` ranks: 1F1B; interleaved 1F1B and the interleaved
    zero-bubble schedule with every vpp up to :data:`MAX_VPP` that leaves each chunk a block, the embedding and the
    head counting as one (``pp vpp <= L + 2``);
    ZB-V (vpp 2). pp = 1:
    no schedule. ``override`` may force the schedule, the vpp or both (1f1b with vpp > 1 means interleaved_1f1b).
    """
    if pp == 1:  # no pipeline: only when the override forces no schedule or vpp
        plain = override.schedule in (None, "1f1b") and override.vpp in (None, 1)
        return [("1f1b", 1)] if plain else []
    vmax = max(1, min((n_layers + 2) // pp, MAX_VPP))
    out = [("1f1b", 1)] + [("interleaved_1f1b", v) for v in range(2, vmax + 1)]
    out += [("zero_bubble", v) for v in range(1, vmax + 1)] + ([("zbv", 2)] if vmax >= 2 else [])
    sched = override.schedule
    if sched == "1f1b" and (override.vpp or 1) > 1:
        sched = "interleaved_1f1b"
    return [(sc, v) for sc, v in out if (sched is None or sc == sched) and (override.vpp is None or v == override.vpp)]


# Most model chunks per pipeline rank searched. A bound of the search space, not of the cost model: every chunk is a
# torch PipelineStage with its own send/receive per micro-batch, whose fixed costs (launches, schedule bookkeeping)
# the model does not price, so more chunks only look free. Megatron-LM's published interleaved runs use 2-6.
MAX_VPP = 8

# A schedule that the zero-bubble schedule of the same vpp dominates: the same activation memory and point-to-point
# traffic by the cost model (CandidateCosts.inflight, p2p_s), a bubble weight at least as large.
_DOMINATED_BY_ZERO_BUBBLE = ("1f1b", "interleaved_1f1b")


def _with_knobs(base: list[Candidate], spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec,
                profile: ModelProfile | None, override: StrategyOverride, backend: str):
    """Each base candidate with every setting of the candidate-wide knobs, and the rule (or None) that excludes
    the setting.

    - Sequence parallelism (Korthikanti et al. 2022 sec. 4.2.2) on and off wherever tp > 1.
    - Selective recomputation, by policy: the attention core (sec. 4.3), tried where it saves memory by the cost
      model (with a fused attention kernel nothing of the attention core is saved, so it is never tried), and
      torchtitan's op-level policy for Llama blocks (``transformer.op_policy_supported``). The MILP chooses how
      many blocks of each stage use it.
    - Pipeline schedule and vpp (:func:`schedule_options`). A 1F1B or interleaved 1F1B setting is skipped when the
      backend runs the zero-bubble schedule of the same vpp for this candidate, which dominates it
      (:data:`_DOMINATED_BY_ZERO_BUBBLE`), unless the user forced it.
    """
    forced = {"selective": ["attention"], "op": ["op"], "none": [None], "full": [None]}.get(override.recompute or "")
    saves: dict[tuple, bool] = {}  # (tp, cp, b, sp, policy) -> the policy keeps fewer bytes than no recomputation
    L = spec.n_layers or 0

    def saves_memory(cand: Candidate) -> bool:
        key = (cand.tp, cand.cp, cand.micro_batch_size, cand.sequence_parallel, cand.selective, cand.ep, cand.etp)
        if key not in saves:
            c = CandidateCosts(spec, cluster, train, cand.dp, cand.tp, 1, cand.micro_batch_size, profile,
                               CostOptions(cp=cand.cp, sequence_parallel=cand.sequence_parallel,
                                           selective_policy=cand.selective or "attention", ep=cand.ep,
                                           etp=cand.etp))
            saves[key] = c.block.sel_act_bytes < c.block.act_bytes
        return saves[key]

    policies = forced or [None, "attention", "op"]
    if not forced:  # unforced, a policy the block cannot run is not tried (forced, its rule is reported)
        policies = [pol for pol in policies if pol is None or spec.family != "custom"
                    and (pol != "op" or tf.op_policy_supported(spec) and spec.moe is None)]
    for cand in base:
        sps = [False, True] if cand.tp > 1 else [False]
        if spec.moe is not None and cand.tp > 1:  # Megatron-Core requires sp for MoE with tp > 1
            sps = [True]
        if override.sequence_parallel is not None:
            sps = [override.sequence_parallel]
        schedules = schedule_options(cand.pp, L, override)
        if spec.moe is not None and spec.moe.first_dense_layers:  # CandidateCosts: dense-first MoE runs vpp 1
            schedules = [(sc, v) for sc, v in schedules if v == 1]
        for sp in sps:
            sp_why = "sequence parallelism with tp=1 (it shards activations over the tp group)" \
                if sp and cand.tp == 1 else None
            tried = [pol for pol in policies if pol is None or forced or sp_why or spec.family == "custom"
                     or saves_memory(dataclasses.replace(cand, sequence_parallel=sp, selective=pol))]

            def rule(pol: str | None, sched: str, v: int) -> str | None:
                c = dataclasses.replace(cand, sequence_parallel=sp, selective=pol, schedule=sched, vpp=v)
                return backend_rejection(spec, c, train.global_batch, backend, train.seq_len, cluster.device.kind)

            for sched, v in schedules:
                here = tried
                if not forced and any(pol is not None and rule(pol, sched, v) is None for pol in tried):
                    # The MILP of a selective setting may leave every stage's selective count at 0: it contains
                    # the setting without selective recomputation, which is then not solved separately.
                    here = [pol for pol in tried if pol is not None]
                for pol in here:
                    why = sp_why
                    if pol is not None and why is None:
                        if spec.family == "custom":
                            why = "selective recomputation of a factory model (its blocks' operations are not known)"
                        elif pol == "op" and (not tf.op_policy_supported(spec) or spec.moe is not None):
                            why = ("torchtitan's op-level selective policy for a block with biased projections or "
                                   "a non-Llama block (its matmuls are not the ones the policy saves)")
                    if why is None and cand.pp > 1 and override.schedule is None and \
                            sched in _DOMINATED_BY_ZERO_BUBBLE and rule(pol, "zero_bubble", v) is None:
                        continue
                    yield dataclasses.replace(cand, sequence_parallel=sp, selective=pol, schedule=sched, vpp=v), why


def memory_lower_bound(costs: CandidateCosts, modes: list[Mode], recompute: str | None = None,
                       selective: bool = False, paging: bool = False) -> float:
    """Least peak memory per device any stage assignment of this candidate can have (bytes).

    Formula: ``min over modes of max(max_s M_s(0, 0), min_s min_r M_s(k, r))`` with ``M_s(n, r)`` the MILP's stage
    memory (``CandidateCosts.stage_memory_bytes``), ``k = ceil(L / p)`` (some stage holds at least that many blocks) and
    ``(r, q)`` (fully, selectively recomputed blocks) in {(0, 0), (1, 0), (k, 0)} and, when ``selective``, also
    {(0, 1), (0, k)} (memory is affine in r and q plus the recompute flag's working space, so its minimum over
    ``r + q <= k`` is at one of these; ``recompute`` none/full/selective fixes (r, q) to (0, 0)/(k, 0)/(0, k));
    with ``paging``, also every block paged (a = k: it holds the least).
    Every stage holds at least its fixed layers.
    Only stages 0, p-2 and p-1 are evaluated: the interior stages 1..p-2 hold no fixed layer and differ only in
    their in-flight micro-batches, which do not grow with the stage index (:meth:`CandidateCosts.inflight`), so
    stage p-2 has the least memory among them for any (n, r). Used to skip candidates that cannot fit before any
    MILP is solved.
    """
    L, p = costs.bound_blocks, costs.pp
    k = -(-L // p)
    vertices = {(0, 0), (min(1, k), 0), (k, 0)} | ({(0, min(1, k)), (0, k)} if selective else set())
    rq = {"none": [(0, 0)], "full": [(k, 0)], "selective": [(0, k)]}.get(recompute or "", sorted(vertices))
    rqa = [(r, q, 0) for r, q in rq] + ([(0, 0, k)] if paging and recompute in (None, "none") else [])
    stages = sorted({0, max(p - 2, 0), p - 1})
    best = float("inf")
    for mode in _modes_that_fit_off_device(costs, modes, k):
        fixed = max(costs.stage_memory_bytes(s, 0, 0, mode) for s in (0, p - 1))
        busiest = min(costs.stage_memory_bytes(s, k, r, mode, q, a) for s in stages for r, q, a in rqa)
        best = min(best, max(fixed, busiest))
    return best


def _modes_that_fit_off_device(costs: CandidateCosts, modes: list[Mode], k: int) -> list[Mode]:
    """The modes whose offloaded states can fit the host memory and NVMe of a device: some stage holds ``k =
    ceil(L/p)`` blocks, and its states' host and NVMe bytes (a lower bound: paged activations only add) must fit
    (stages 0, p-2 and p-1 stand for all, as in :func:`memory_lower_bound`)."""
    p = costs.pp
    stages = sorted({0, max(p - 2, 0), p - 1})
    out = []
    for mode in modes:
        terms = [costs.mode_terms(s, mode) for s in stages]
        if min(t.host(k) for t in terms) <= costs.host_capacity_bytes and \
                min(t.nvme(k) for t in terms) <= costs.nvme_capacity_bytes:
            out.append(mode)
    return out


def _lower_bound(costs: CandidateCosts) -> float:
    """A step time no assignment of this candidate beats (s), cheap enough for every candidate: perfectly balanced
    stages, no recomputation, no DP communication: ``m max + w (sum - max) >= (m + w (p - 1)) sum / p`` (since
    ``max >= sum / p`` and ``m >= w``), ``sum >= L t_block + sum_s fixed_s``. Candidates it does not prune get
    :func:`partition_lower_bound`."""
    p = costs.pp
    return (costs.m + costs.bubble_weight() * (p - 1)) / p * _least_time_sum(costs)


def _least_time_sum(costs: CandidateCosts) -> float:
    """``sum_s t_s`` without recomputation or ZeRO traffic: every block once, the embedding and head once each, the
    point-to-point transfers on every stage (``sum_s compute_terms(s)(n_s)`` for any split)."""
    L = costs.spec.n_layers or 0
    dense = costs.n_dense * (costs.dense_block.time_s - costs.block.time_s) if costs.dense_block is not None else 0.0
    return L * costs.block.time_s + dense + costs.embed.time_s + costs.head.time_s + costs.pp * costs.p2p_s


def _least_recompute_s(costs: CandidateCosts, over, n, b_r, b_q):
    """Least recomputation time (s per micro-batch) that removes ``over`` bytes of excess memory from a stage of
    ``n`` blocks (scalars or numpy arrays, broadcast): the LP relaxation ``min a_r r + a_q q`` s.t.
    ``b_r r + b_q q >= over + working space``, ``r + q <= n``, ``r, q >= 0``, where a fully (selectively)
    recomputed block saves ``b_r`` (``b_q``, 0 without selective recomputation) bytes for ``a_r`` (``a_q``) seconds.
    Its optimum is at a vertex: only r, only q, or ``r + q = n``. 0 where ``over <= 0``, inf where nothing fits."""
    import numpy as np

    blk = costs.block
    need = np.where(over > 0, over + blk.act_bytes, 0.0)  # recomputing needs one block's activations as working space
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(need > 0, np.inf, 0.0)
        r_only = need / b_r
        x = np.where((need > 0) & (b_r > 0) & (r_only <= n), np.minimum(x, blk.recompute_s * r_only), x)
        q_only = need / b_q
        x = np.where((need > 0) & (b_q > 0) & (q_only <= n), np.minimum(x, blk.selective_s * q_only), x)
        r = (need - b_q * n) / (b_r - b_q)
        ok = (need > 0) & (b_r != b_q) & (r >= 0) & (r <= n)
        return np.where(ok, np.minimum(x, blk.recompute_s * r + blk.selective_s * (n - r)), x)


# Grid points of the paged-block count in the bounds' relaxation (:func:`_least_stage_time_s`).
_PAGING_GRID = 8


def _least_stage_time_s(costs: CandidateCosts, compute, over, n, b_r, b_q, b_a, paging: bool):
    """Least time per micro-batch (s) of a stage of ``n`` blocks whose compute is ``compute`` and whose memory
    exceeds the capacity by ``over`` bytes, when recomputation (:func:`_least_recompute_s`) and, with ``paging``,
    paging ``a`` blocks (each removing ``b_a`` bytes, costing ``c`` seconds of transfer per micro-batch on its
    channel: :meth:`CandidateCosts.paging_costs`) remove the excess. Arrays broadcast.

    Formula: ``min over 0 <= a <= n of combine(compute + x(over - a b_a), a c)``, combine = max when transfers
        overlap compute (the stage time is the max of its channels), + when they do not. The first term falls and
        the second grows with a, so on each grid interval ``[a_i, a_i+1]`` the value is at least
        ``combine(f(a_i+1), g(a_i))``: the minimum over intervals is a lower bound (the relaxation also lets
        recomputation use all n blocks beside the paged ones and ignores host capacity).
    """
    import numpy as np

    if not paging:
        return compute + _least_recompute_s(costs, over, n, b_r, b_q)
    h2d, d2h, disk, _, _ = costs.paging_costs()
    overlap = costs.options.overlap_dp
    c = max(h2d, d2h, disk) if overlap else h2d + d2h + disk
    frac = np.linspace(0.0, 1.0, _PAGING_GRID + 1)
    # All grid intervals at once, on a leading axis (one pass of numpy's small-array overhead instead of one each).
    nd = max(np.ndim(x) for x in (compute, over, n, b_r, b_q, b_a))
    lo, hi = (frac[:-1].reshape((-1,) + (1,) * nd), frac[1:].reshape((-1,) + (1,) * nd))
    f = compute + _least_recompute_s(costs, over - hi * n * b_a, n, b_r, b_q)
    g = lo * n * c
    val = np.maximum(f, g) if overlap else f + g
    return val.min(axis=0)


def busiest_lower_bound(costs: CandidateCosts, modes: list[Mode], capacity: float, selective: bool,
                        paging: bool = False) -> float:
    """A step-time bound between :func:`_lower_bound` and :func:`partition_lower_bound` in cost and strength.

    Formula: some stage holds ``k = ceil(L / p)`` blocks and so takes at least ``T_k = min over modes and stage
        positions (0, p-2, p-1: the argument of :func:`memory_lower_bound`) of compute_s(k) + x``, with ``x`` the
        least recomputation (or paging time) that fits it in memory (:func:`_least_stage_time_s`);
        then ``step >= (m - w) T_k + w (sum + x)``, ``sum >= L t_block + fixed``.
    """
    import numpy as np

    L, p, m = costs.bound_blocks, costs.pp, costs.m
    w, k, total = costs.bubble_weight(), -(-L // p), _least_time_sum(costs)
    best = float("inf")
    for s in sorted({0, max(p - 2, 0), p - 1}):
        act = costs.activation_terms(s)
        a_k = act(k)
        b_r, b_q = -act.per_recompute, (-act.per_selective if selective else 0.0)
        compute = costs.compute_terms(s)(k)
        over = [sum(a(k) for a in (t.params, t.grads, t.optimizer, t.other)) + a_k - capacity
                for t in (costs.mode_terms(s, mode) for mode in modes)]
        if max(over) <= 0:  # fits without recomputation in every mode
            best = min(best, m * compute + w * (total - compute))
            continue
        x = _least_stage_time_s(costs, compute, np.array(over), k, b_r, b_q, -act.per_paged, paging) - compute
        x = x[np.isfinite(x)]  # modes where nothing fits bound nothing (and m = w would make 0 x inf a nan)
        if x.size:
            best = min(best, float(((m - w) * (compute + x) + w * (total + x)).min()))
    return best


def partition_lower_bound(costs: CandidateCosts, modes: list[Mode], capacity: float, selective: bool,
                          paging: bool = False) -> float:
    """A tighter step-time bound than :func:`_lower_bound`, worth its cost only for candidates about to be solved.

    Formula: for each mode, every stage s and block count n, ``t_s(n) = compute_s(n) + x_s(n)`` with ``x_s`` the
        least recomputation (or paging) time that fits the stage in memory (:func:`_least_stage_time_s`; inf
        where nothing fits), nondecreasing in n. Any assignment has ``max_s t_s >= T*``, the least T for which stages of
        time <= T can hold all L blocks (``sum_s max{n : t_s(n) <= T} >= L``, each stage at least its
        ``min_blocks``): the min-max partition bound, which counts the embedding and head, uneven splits and the
        recomputation memory forces on every stage; ``t_s`` also counts the mode's per micro-batch ZeRO traffic
        (its max with compute when they overlap). Then ``step >= (m - w) T* + w sum_s t_s + U`` with
        ``sum_s t_s >= L t_block + sum_s fixed_s`` and ``U`` at least the least per-step extra of a stage holding
        ceil(L/p) or more blocks (:func:`_least_step_extra_s`; the stage with the most blocks has that many),
        minimized over modes; ``sum_s t_s >= max_s t_s >= T*`` too, so the sum term is at least ``w T*``.
    """
    import numpy as np

    L, p, m = costs.bound_blocks, costs.pp, costs.m
    w = costs.bubble_weight()
    blk = costs.block
    n = np.arange(L + 1, dtype=float)[None, :]
    k = -(-L // p)
    inflight = np.array([costs.inflight(s) for s in range(p)], dtype=float)[:, None]
    # Activations per stage: a_s(n) = a0_s + a1_s n with no recomputation (mode-independent); stages without the
    # embedding or head differ only in their in-flight micro-batches, so one is evaluated and the rest scaled.
    act0, act1 = np.zeros((p, 1)), inflight * blk.act_bytes
    c0 = np.empty((p, 1))
    kinds: dict[int, int] = {}  # stage -> the stage whose mode terms it shares (same fixed layers)
    plain = None
    for s in range(p):
        if costs.fixed_layers(s):
            terms = costs.activation_terms(s)
            act0[s], act1[s] = terms.const, terms.per_block
            c0[s], kinds[s] = costs.compute_terms(s).const, s
        else:
            plain = s if plain is None else plain
            c0[s], kinds[s] = (costs.compute_terms(s).const if plain == s else c0[plain]), plain
    total = _least_time_sum(costs)
    b_r = inflight * (blk.act_bytes - blk.ckpt_bytes)
    b_q = inflight * (blk.act_bytes - blk.sel_act_bytes) if selective else np.zeros_like(inflight)
    floor_n = np.array([costs.min_blocks(s) for s in range(p)])

    def bound(states, zero_comm, extra: float) -> float:
        """The bound for per-stage states + other and ZeRO traffic arrays (p x L+1) and a least per-step extra."""
        compute = _least_stage_time_s(costs, c0 + blk.time_s * n, states + act0 + act1 * n - capacity, n, b_r, b_q,
                                      inflight * blk.act_bytes, paging)
        times = np.maximum(compute, zero_comm) if costs.options.overlap_dp else compute + zero_comm
        times = np.maximum.accumulate(times, axis=1)  # nondecreasing in n; guards rounding
        # T must let every stage hold its least blocks; stages of time <= T hold max{n : t_s(n) <= T} (a prefix
        # of the nondecreasing row), so the blocks they can hold in all are sum_s count(t_s <= T) - p.
        floor = float(times[np.arange(p), floor_n].max())
        values = np.unique(times[np.isfinite(times) & (times >= floor)])
        if len(values) == 0 or (times <= values[-1]).sum() - p < L:
            return float("inf")  # nothing fits
        lo, hi = 0, len(values) - 1
        while lo < hi:  # the least such T
            mid = (lo + hi) // 2
            if (times <= values[mid]).sum() - p >= L:
                hi = mid
            else:
                lo = mid + 1
        # sum_s t_s >= max_s t_s >= T* as well: with few micro-batches (m - w small) the sum term carries the bound,
        # and the compute-only sum would drop a ZeRO traffic that sets the stage time.
        t_star = float(values[lo])
        return (m - w) * t_star + w * max(total, t_star) + extra

    per_mode = []
    for mode in modes:
        # Model states + other, and the per micro-batch ZeRO traffic, of each stage (affine in n; memoized).
        cols = np.empty((8, p, 1))
        for s in range(p):
            if kinds[s] != s:
                cols[:, s] = cols[:, kinds[s]]
                continue
            t = costs.mode_terms(s, mode)
            states = (t.params, t.grads, t.optimizer, t.other)
            cols[:, s, 0] = (sum(a.const for a in states), sum(a.per_block for a in states), t.zero_comm.const,
                             t.zero_comm.per_block, t.host.const, t.host.per_block, t.nvme.const, t.nvme.per_block)
        # A stage whose offloaded states alone overflow the host memory or NVMe of its device cannot hold n blocks.
        off = (cols[4] + cols[5] * n > costs.host_capacity_bytes) | (cols[6] + cols[7] * n > costs.nvme_capacity_bytes)
        extra = min(_least_step_extra_from(costs, s, mode, selective, k) for s in {0, max(p - 2, 0), p - 1})
        per_mode.append((np.where(off, np.inf, cols[0] + cols[1] * n), cols[2] + cols[3] * n, extra))
    return min((bound(*pm) for pm in per_mode), default=float("inf"))


def _least_step_extra_from(costs: CandidateCosts, stage: int, mode: Mode, selective: bool, k: int) -> float:
    """``min over n >= k`` of :func:`_least_step_extra_s`, memoized in the search's shared cache (it depends only on
    the layer costs, the dp x cp group, the stage's fixed layers, the mode, k and the window's options)."""
    fixed = tuple(lc.params for lc in costs.fixed_layers(stage))
    key = ("extra", costs.layer_key, costs.dp_shard, fixed, mode, k, selective, costs.options.overlap_dp)
    cache = costs.shared
    if key not in cache:
        cache[key] = float(_least_step_extra_s(costs, stage, mode, selective)[k:].min())
    return cache[key]


def _least_step_extra_s(costs: CandidateCosts, stage: int, mode: Mode, selective: bool):
    """Per block count n = 0..L, the least per-step extra (optimizer, offload, exposed DP/ZeRO traffic) of a stage:
    ``stage_cost``'s formula with the largest overlap window recomputation allows (every block recomputed, fully
    or selectively, whichever lengthens the backward more)."""
    import numpy as np

    n = np.arange((costs.spec.n_layers or 0) + 1, dtype=float)
    terms = costs.mode_terms(stage, mode)
    extra = terms.optimizer_s(n) + terms.offload_s(n)
    grad, gather = terms.grad_reduce(n), terms.param_gather(n)
    if not costs.options.overlap_dp:
        return extra + grad + gather
    bwd = costs.backward_terms(stage)
    window = np.maximum(bwd(n, n, 0), bwd(n, 0, n) if selective else 0)
    return extra + np.maximum(0.0, grad - window) + np.maximum(0.0, gather - costs.forward_terms(stage)(n))


def split_chunks(n_blocks: int, vpp: int, embed: bool = False, head: bool = False) -> list[int] | None:
    """A rank's blocks over its ``vpp`` chunks, as even as possible; None for vpp 1. The remainder goes to the
    chunks without the embedding (``embed``: chunk 0 holds it) or the head (``head``: the last chunk holds it)
    first, so a short rank leaves those chunks with fewer blocks, down to none (Llama 3 405B's layout).
    Assumption of the cost model: each chunk takes ``1/v`` of the rank's time (exact when they are equal)."""
    if vpp == 1:
        return None
    order = [c for c in range(vpp) if not (embed and c == 0) and not (head and c == vpp - 1)]
    order += [c for c in range(vpp) if c not in order]
    out = [n_blocks // vpp] * vpp
    for c in order[: n_blocks % vpp]:
        out[c] += 1
    return out


def _plan_key(cand: Candidate, res: MilpResult) -> tuple:
    """What a found plan runs: two knob settings giving the same key are one plan (a selective policy whose
    blocks the MILP left at 0 is the plan without selective recomputation)."""
    policy = cand.selective if any(res.selective_blocks) else None
    return (dataclasses.replace(cand, selective=policy), tuple(res.n_blocks), tuple(res.recompute_blocks),
            tuple(res.selective_blocks), tuple(res.paged_blocks), res.mode)


def _stage_plans(costs: CandidateCosts, res: MilpResult) -> tuple[list[StagePlan], list[StageCost]]:
    stages, stage_costs = [], []
    head = 0 if costs.schedule == "zbv" else costs.pp - 1  # the rank whose last chunk holds the LM head
    dense = costs.dense_blocks_per_stage(res.n_blocks)
    for s, (n, r, q, a) in enumerate(zip(res.n_blocks, res.recompute_blocks, res.selective_blocks,
                                         res.paged_blocks)):
        sc = costs.stage_cost(s, n, r, res.mode, q, a, dense[s])
        stages.append(StagePlan(index=s, first_layer=0, last_layer=0, n_blocks=n, recompute_blocks=r,
                                selective_blocks=q, offload_blocks=a, chunk_blocks=split_chunks(n, costs.vpp, s == 0, s == head),
                                time_per_micro_batch_s=sc.time_per_micro_batch_s, memory_bytes=sc.memory_bytes))
        stage_costs.append(sc)
    return place_stages(stages, costs.vpp, costs.schedule), stage_costs


def search_plans(
    spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, profile: ModelProfile | None = None,
    override: StrategyOverride | None = None, top_k: int = 3, backend: BackendChoice = "any",
    time_limit_s: float = 10.0, profile_path: str | None = None, memory_fraction: float = 0.95,
    progress: Callable[[SearchProgress], None] | None = None, routing_imbalance: float = 1.0,
    capacity_factor: float | None = None,
) -> list[Plan]:
    """Find the ``top_k`` fastest predicted plans.

    Args:
        top_k: plans to return, >= 1.
        time_limit_s: HiGHS time limit per candidate MILP, seconds (> 0).
        progress: called after each candidate the search takes up (solved or pruned) with the counts so far and
            the incumbent.
        memory_fraction: share of device memory a plan may fill; the rest is headroom for allocator fragmentation
            and what the model does not see (default 0.95).
        routing_imbalance, capacity_factor: Mixture-of-Experts routing assumptions (CostOptions), recorded in the
            plan's strategy.

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
    milp_recompute = {"op": "selective"}.get(override.recompute or "", override.recompute)
    scored = []
    rejected: dict[str, int] = {}  # rule -> candidates it excluded, for the message and the plan's record
    might_fit: dict[str, int] = {}  # rule -> excluded candidates whose memory lower bound fits
    n_cands = cannot_fit = 0
    least_mem: tuple[float, Candidate] | None = None
    capacity = memory_fraction * cluster.device.memory_bytes

    layer_cache: dict = {}
    paging = paging_allowed(override, spec)

    def costs_of(cand: Candidate) -> CandidateCosts:
        # The backend's cost profile prices the candidate (cost_models.backend_profiles): "any" the costlier of
        # DeepSpeed's and torch's field by field, "unconstrained" Megatron-LM's (it runs every strategy priced).
        opts = dataclasses.replace(cand.options(), routing_imbalance=routing_imbalance,
                                   capacity_factor=capacity_factor, backend=backend)
        costs = CandidateCosts(spec, cluster, train, cand.dp, cand.tp, cand.pp, cand.micro_batch_size, profile,
                               opts, layer_cache)
        costs.usable_capacity_bytes = capacity
        return costs

    for cand, why_knob in _with_knobs(base, spec, cluster, train, profile, override, backend):
        n_cands += 1
        rules = mode_rules(cluster, cand, override, backend, spec.moe is not None)
        modes = [m for m, why in rules if why is None]
        why_not = why_knob or backend_rejection(spec, cand, train.global_batch, backend, train.seq_len,
                                                cluster.device.kind)
        if not modes or why_not is not None:
            for why in {why_not} if why_not else {w for _, w in rules if w}:
                rejected[why] = rejected.get(why, 0) + 1
            # Whether a lifted rule could help: judged on plain settings only (one per base candidate), as costs
            # of every excluded knob setting would dominate the search's time.
            plain = cand.schedule == "1f1b" and cand.selective is None
            if why_not is not None and modes and plain and why_knob is None and \
                    memory_lower_bound(costs_of(cand), modes) <= capacity:
                might_fit[why_not] = might_fit.get(why_not, 0) + 1
            continue
        costs = costs_of(cand)
        scored.append((_lower_bound(costs), cand, costs, modes))
    # Best-first: a heap keyed by the cheap balanced bound; a candidate popped the first time gets the busiest-stage
    # bound, the second time the partition bound, going back keyed by each; popped a third time, it is solved.
    # Candidates are thus solved in the order of their tight bounds, so the incumbent is good early, and once the
    # least key reaches the K-th best plan every remaining candidate is pruned.
    heap = [(lb, i, 0) for i, (lb, *_rest) in enumerate(scored)]
    heapq.heapify(heap)
    found: list[tuple[float, Candidate, CandidateCosts, MilpResult]] = []
    seen: set[tuple] = set()  # plans already found (knob settings that led to the same strategy)
    solved, pruned, status, gap = 0, 0, "optimal", 0.0
    unproven: list[float] = []  # lower bounds of candidates whose MILP stopped at the time limit
    found_at: dict[int, int] = {}  # id of a found MilpResult -> its scored index
    records: dict[int, CandidateRecord] = {}  # scored index -> what became of it (the plan's candidate space)

    def record(i: int, outcome: str, step_s: float, memory_bytes: float | None = None) -> None:
        # Pruned candidates keep no memory figure: their bound would cost more than the rest of the search. An
        # infinite bound (no stage split fits at all) is kept as None: JSON has no infinity.
        def finite(x: float | None) -> float | None:
            return x if x is not None and math.isfinite(x) else None

        records[i] = CandidateRecord(label=scored[i][1].label(), outcome=outcome,  # type: ignore[arg-type]
                                     step_time_s=finite(step_s), peak_memory_bytes=finite(memory_bytes))

    def report() -> None:
        if progress is not None:
            best = found[0] if found else None
            progress(SearchProgress(
                total=len(scored), solved=solved, pruned=pruned, rejected=n_cands - len(scored),
                cannot_fit=cannot_fit, best_step_time_s=best[0] if best else None, best=best[1] if best else None))

    while heap:
        key, i, tightened = heapq.heappop(heap)
        lb, cand, costs, modes = scored[i]
        selective = cand.selective is not None
        if len(found) >= top_k and key >= found[-1][0]:
            for k_j, j, _t in [(key, i, tightened)] + heap:  # this and every later key: none can beat the K-th best
                record(j, "pruned", k_j)
                pruned += 1
                report()
            heap.clear()
            break
        elif tightened == 0:
            heapq.heappush(heap, (max(lb, busiest_lower_bound(costs, modes, capacity, selective, paging)), i, 1))
            continue
        elif tightened == 1:
            tight = partition_lower_bound(costs, modes, capacity, selective, paging)
            if tight == float("inf") or (milp_recompute is not None and memory_lower_bound(
                    costs, modes, milp_recompute, selective, paging) > capacity):
                # Cannot fit whatever the MILP chooses: no stage split fits by the LP relaxation of recomputation,
                # or the leanest stage does not under the forced recomputation.
                need = memory_lower_bound(costs, modes, milp_recompute, selective, paging)
                record(i, "infeasible", key, need)
                cannot_fit += 1
                if least_mem is None or need < least_mem[0]:
                    least_mem = (need, cand)
            else:
                heapq.heappush(heap, (max(key, tight), i, 2))
                continue
        else:
            res = solve_stage_milp(costs, modes, milp_recompute, time_limit_s, selective, paging)
            solved += 1
            if res is not None and res.status != "optimal":
                # Not proven: its optimum may lie anywhere above this bound (the step-time bound when unknown).
                bound = res.bound_s
                unproven.append(bound if bound == bound else key)
            if res is None:
                need = memory_lower_bound(costs, modes, milp_recompute, selective, paging)
                record(i, "infeasible", key, need)
                if least_mem is None or need < least_mem[0]:
                    least_mem = (need, cand)
            elif res.status == "timeout":
                record(i, "timeout", key, memory_lower_bound(costs, modes, milp_recompute, selective, paging))
            else:
                record(i, "solved", res.objective_s, max(sc.memory_bytes for sc in _stage_plans(costs, res)[1]))
            if res is not None and res.status != "timeout" and _plan_key(cand, res) not in seen:  # a timed-out MILP has no solution
                seen.add(_plan_key(cand, res))
                found_at[id(res)] = i
                found.append((res.objective_s, cand, costs, res))
                found.sort(key=lambda x: x[0])
                found = found[:top_k]
        report()
    if not found:
        _raise_infeasible(cluster, least_mem, memory_fraction, override, rejected, n_cands, might_fit)
    elapsed = time.perf_counter() - start
    plans = []
    # Optimal only if no candidate stopped by the time limit could still beat the best plan.
    best_s = found[0][0]
    open_bound = min(unproven, default=float("inf"))
    if open_bound < best_s * (1 - 1e-9):
        status, gap = "feasible", (best_s - open_bound) / best_s
    for rank, (_, _c, _cc, res) in enumerate(found, 1):
        i = found_at[id(res)]
        records[i] = records[i].model_copy(update={"rank": rank})
    space = [records[i] for i in sorted(records)]
    for _, cand, costs, res in found:
        if res.status == "feasible":
            status, gap = "feasible", max(gap, res.gap if res.gap == res.gap else 0.0)
        stages, stage_costs = _stage_plans(costs, res)
        strategy = Strategy(dp=cand.dp, tp=cand.tp, pp=cand.pp, micro_batch_size=cand.micro_batch_size,
                            grad_accum=costs.m, zero_stage=res.mode.zero_stage,
                            offload_optimizer=res.mode.offload_optimizer, offload_param=res.mode.offload_param,
                            offload_ratio=res.mode.ratio,
                            activation_tier="nvme" if cluster.device.kind == "cpu" else "cpu", sequence_parallel=cand.sequence_parallel,
                            selective_recompute=any(st.selective_blocks for st in stages),
                            selective_policy=cand.selective or "attention", cp=cand.cp, vpp=cand.vpp,
                            schedule=cand.schedule, ep=cand.ep, etp=cand.etp, routing_imbalance=routing_imbalance,
                            capacity_factor=capacity_factor, stages=stages)
        info = SolverInfo(status=status, gap=gap, solver="HiGHS via PuLP", candidates=n_cands,  # type: ignore
                          milps_solved=solved, search_time_s=elapsed, excluded=rejected,
                          backend=backend)
        plans.append(Plan(model=spec, cluster=cluster, train=train, strategy=strategy,
                          predicted=predict(costs, stage_costs), solver=info, profile_path=profile_path,
                          candidates=space))
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
    if override.offload_param is None or override.offload_optimizer is None:
        tips.append("offload to host memory or NVMe (--backend deepspeed; a larger NVMe or host memory in the "
                    "cluster file)")
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

