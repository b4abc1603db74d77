"""Predict one fixed strategy: step time, model and hardware FLOP/s per device (MFU, HFU), peak memory per device.

The same :class:`~paraplan.cost_models.costs.CandidateCosts` the planner optimizes evaluates the strategy, so
``paraplan estimate`` and ``paraplan plan`` agree on every number.

FLOP counts (stated in every estimate as ``flop_count``):
    model FLOPs (MFU): ``3 x forward`` of every block and the LM head, attention counted as the full ``4 b s^2 h``
        forward (Korthikanti et al. 2022 eq. 7 form; for a GPT block with ``f = 4h`` exactly
        ``72 B s L h^2 (1 + s/(6h) + v/(12 h L))``), unpadded vocabulary;
    hardware FLOPs (HFU): model FLOPs plus the recomputed forwards (full: every block; selective: the attention
        core); for GPT with full recomputation this is Narayanan et al. SC'21 eq. 3.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from paraplan.cost_models import transformer as tf
from paraplan.cost_models.costs import CandidateCosts, CostOptions, Mode, StageCost, predict
from paraplan.cost_models.links import calibrate_cluster
from paraplan.errors import StrategyError, TrainSpecError
from paraplan.types import (
    TIERS, ClusterSpec, MemoryBreakdown, ModelProfile, ModelSpec, TrainSpec, virtual_stage_ranks,
)

Recompute = Literal["none", "selective", "op", "full"]

FLOP_COUNT = ("model FLOPs = 3 x forward (attention 4 b s^2 h per layer forward, LM head 2 b s h v), Korthikanti et "
              "al. 2022 eq. 7 form (GPT: 72 B s L h^2 (1 + s/(6h) + v/(12hL))); hardware FLOPs add the recomputed "
              "forwards (full: Narayanan et al. SC'21 eq. 3)")


@dataclass(frozen=True, kw_only=True)
class StrategySpec(CostOptions):
    """A fixed strategy to evaluate (the ``paraplan estimate`` options): parallel degrees, ZeRO, recomputation and
    the :class:`CostOptions` it inherits (cp, vpp, schedule, sp...). ``selective_policy`` follows ``recompute``
    (selective: the attention core; op: torchtitan's op-level policy) and is not set directly.

    ``stage_blocks``: blocks per pipeline rank (pp counts, each rank's blocks split over its vpp chunks as evenly
    as possible), or per virtual stage in model order (pp x vpp counts: Llama 3 405B's 126 blocks on pp 16 with
    one block fewer in the first and last chunk); None: as even as possible."""

    dp: int
    tp: int
    pp: int
    micro_batch_size: int
    recompute: Recompute = "none"
    zero_stage: int = 0
    offload_optimizer: str | bool = "none"
    offload_param: str = "none"
    offload_ratio: float = 1.0
    offload_activations: bool = False
    stage_blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "selective_policy", "op" if self.recompute == "op" else "attention")

    def mode(self) -> Mode:
        return Mode(self.zero_stage, self.offload_optimizer, self.offload_param, self.offload_ratio)

    def cost_options(self) -> CostOptions:
        return CostOptions(**{f.name: getattr(self, f.name) for f in fields(CostOptions)})


@dataclass(frozen=True)
class StrategyEstimate:
    """What ``paraplan estimate`` reports (per optimizer step, per device)."""

    step_time_s: float
    pipeline_s: float
    bubble_s: float
    dp_comm_s: float
    optimizer_s: float
    tokens_per_s: float
    model_flops_per_step: float
    hardware_flops_per_step: float
    model_tflops_per_device: float
    hardware_tflops_per_device: float
    mfu: float
    hfu: float
    peak_memory_bytes: float
    memory_capacity_bytes: float
    memory_breakdown_bytes: MemoryBreakdown
    most_loaded_stage: int
    stage_blocks: list[int]
    grad_accum: int
    host_bytes: float = 0.0
    nvme_bytes: float = 0.0
    binding: str = ""
    flop_count: str = FLOP_COUNT
    host_capacity_bytes: float = float("inf")
    nvme_capacity_bytes: float = float("inf")

    @property
    def fits(self) -> bool:
        """Device memory, and the host memory and NVMe share of a device, hold what the strategy puts there."""
        return (self.peak_memory_bytes <= self.memory_capacity_bytes and self.host_bytes <= self.host_capacity_bytes
                and self.nvme_bytes <= self.nvme_capacity_bytes)


def stage_blocks(n_layers: int, pp: int) -> list[int]:
    """Blocks per stage: as even as possible, earlier stages take the remainder (they hold the embedding)."""
    return [n_layers // pp + (1 if s < n_layers % pp else 0) for s in range(pp)]


def rank_blocks(st: StrategySpec, n_layers: int) -> list[int]:
    """Blocks per pipeline rank of ``st``: its ``stage_blocks`` per rank, or per virtual stage summed over each
    rank's chunks (``types.virtual_stage_ranks`` placement), or as even as possible."""
    if st.stage_blocks is None:
        return stage_blocks(n_layers, st.pp)
    sb = list(st.stage_blocks)
    if len(sb) == st.pp:
        return sb
    out = [0] * st.pp
    for k, rank in enumerate(virtual_stage_ranks(st.pp, st.vpp, st.schedule)):
        out[rank] += sb[k]
    return out


def dense_blocks_per_rank(st: StrategySpec, spec: ModelSpec, blocks: list[int]) -> list[int]:
    """Dense blocks of an MoE model with dense first layers on each pipeline rank (zeros otherwise).

    The dense blocks are the chain's first ``first_dense_layers``; they fill the virtual stages in model order
    (``types.virtual_stage_ranks``), each rank's blocks split over its vpp chunks as ``stage_blocks`` gives them per
    virtual stage, else as evenly as possible (the first chunks taking the remainder).
    """
    n_dense = spec.moe.first_dense_layers if spec.moe is not None else 0
    out = [0] * st.pp
    if not n_dense:
        return out
    ranks = virtual_stage_ranks(st.pp, st.vpp, st.schedule)
    if st.stage_blocks is not None and len(st.stage_blocks) == st.pp * st.vpp and st.vpp > 1:
        chunks = list(st.stage_blocks)
    else:
        seen = [0] * st.pp
        chunks = []
        for rank in ranks:
            n, c = blocks[rank], seen[rank]
            chunks.append(n // st.vpp + (1 if c < n % st.vpp else 0))
            seen[rank] += 1
    before = 0
    for k, rank in enumerate(ranks):
        out[rank] += max(0, min(chunks[k], n_dense - before))
        before += chunks[k]
    return out


def validate_strategy(
    spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, st: StrategySpec, profile: ModelProfile | None = None,
) -> None:
    """Check that ``st`` can run ``spec`` on ``cluster`` and that ``profile`` (if any) was taken for this problem.

    Raises:
        StrategyError: degrees that do not fit the cluster or the model, a bad ZeRO stage or recomputation, or a
            factory model (family ``custom``) without a profile.
        TrainSpecError: a global batch not divisible by dp x micro-batch.
        ProfileError: a profile of another model, sequence length, dtype or device kind
            (:meth:`ModelProfile.check_matches`).
        TrainSpecError: a sequence length the model cannot run (:meth:`ModelSpec.check_seq_len`).
    """
    if profile is None and spec.family == "custom":
        raise StrategyError(f"{spec.name} is a factory model: run `paraplan profile` and pass --profile")
    if profile is not None:
        profile.check_matches(spec, train, cluster=cluster)
    spec.check_seq_len(train.seq_len)
    world = cluster.world_size
    L = spec.n_layers or 0
    if st.dp * st.tp * st.pp * st.cp != world:
        raise StrategyError(f"dp x tp x pp x cp = {st.dp} x {st.tp} x {st.pp} x {st.cp} = "
                            f"{st.dp * st.tp * st.pp * st.cp} must equal the {world} devices of {cluster.name}")
    if st.cp > 1 and train.seq_len % (2 * st.cp):
        raise StrategyError(f"cp={st.cp} must split seq-len {train.seq_len} into 2 x cp equal chunks (the "
                            "load-balanced causal split); choose a cp with 2 x cp dividing the sequence length")
    if st.tp > cluster.devices_per_node or (spec.n_heads or 1) % st.tp:
        raise StrategyError(f"tp={st.tp} must divide the attention heads ({spec.n_heads}) and fit in a node "
                            f"({cluster.devices_per_node} devices)")
    if st.pp > L:
        raise StrategyError(f"pp={st.pp} exceeds the model's {L} blocks")
    # Interleaving no longer needs the blocks divisible by pp x vpp (Llama 3 405B: 126 blocks, pp 16): a rank's
    # virtual stages may hold different block counts. Assumption of the cost model: each of a rank's v chunks
    # takes 1/v of its time (pipeline_time_s), exact when its blocks split evenly over its chunks.
    if st.vpp > 1 and st.pp == 1:
        raise StrategyError(f"--vpp {st.vpp} needs pp > 1 (virtual stages interleave over pipeline ranks)")
    if (st.schedule not in ("1f1b", "gpipe") or st.vpp > 1) and st.pp == 1:
        raise StrategyError(f"schedule {st.schedule} needs pp > 1")
    if st.schedule == "zbv" and st.vpp != 2:
        raise StrategyError(f"schedule zbv runs 2 chunks per rank: give --vpp 2 (got {st.vpp})")
    if st.pp * st.vpp > L + 2:
        raise StrategyError(f"pp x vpp = {st.pp * st.vpp} chunks exceed the model's {L} blocks plus the embedding's "
                            "and the head's chunks")
    if st.stage_blocks is not None:
        sb = list(st.stage_blocks)
        chunks = st.pp * st.vpp
        per_chunk = len(sb) == chunks and st.vpp > 1
        if len(sb) != st.pp and not per_chunk or sum(sb) != L or any(n < 0 for n in sb) or any(
                n < 1 for n in sb[1:-1]):
            raise StrategyError(
                f"--stage-blocks {','.join(map(str, sb))}: give pp={st.pp} counts (one per rank)"
                + (f" or pp x vpp = {chunks} (one per virtual stage, in model order)" if st.vpp > 1 else "")
                + f" that add up to the model's {L} blocks (the first and last may hold 0 besides the embedding / "
                "head; the others at least 1)")
    if not 0 <= st.zero_stage <= 3:
        raise StrategyError(f"--zero {st.zero_stage}: use 0, 1, 2 or 3")
    mode = st.mode()
    if mode.offload_optimizer not in TIERS or mode.offload_param not in TIERS:
        raise StrategyError(f"offload tiers must be one of {', '.join(TIERS)} (got optimizer "
                            f"{mode.offload_optimizer}, params {mode.offload_param})")
    if mode.offload_param != "none" and st.zero_stage != 3:
        raise StrategyError("offload_param needs ZeRO-3 (only partitioned parameters are offloaded): add zero=3")
    if mode.offload_optimizer != "none" and st.zero_stage == 0:
        raise StrategyError("optimizer offload needs ZeRO >= 1 (DeepSpeed offloads partitioned states): add zero=1")
    if not 0 < st.offload_ratio <= 1 or st.offload_ratio < 1 and mode.offload_optimizer == "none":
        raise StrategyError(f"offload_ratio {st.offload_ratio}: give a share in (0, 1] of offloaded optimizer states")
    if st.offload_activations and st.recompute != "none":
        raise StrategyError("offload_act=true pages every block's activations; drop recompute (paged blocks are not "
                            "recomputed)")
    if st.recompute not in ("none", "selective", "op", "full"):
        raise StrategyError(f"--recompute {st.recompute}: use none, selective, op or full")
    if spec.moe is None and (st.ep, st.etp) != (1, 1):
        raise StrategyError(f"--ep/--etp: {spec.name} has no experts; expert parallelism needs a Mixture-of-Experts "
                            "model (drop ep and etp)")
    if spec.moe is not None and mode.offloads:
        raise StrategyError(f"{spec.name}: offloading a Mixture-of-Experts model's states is not modelled; drop the "
                            "offload options")
    if spec.moe is not None and st.offload_activations:
        raise StrategyError(f"{spec.name}: paging a Mixture-of-Experts model's activations is not modelled; drop "
                            "offload_act")
    if st.recompute == "op" and not tf.op_policy_supported(spec):
        raise StrategyError(f"--recompute op: torchtitan's op-level policy is priced for Llama blocks without "
                            f"biased projections; {spec.name} is not one. Use selective or full")
    if train.global_batch % (st.dp * st.micro_batch_size):
        raise TrainSpecError(f"global batch {train.global_batch} is not divisible by dp x micro-batch = "
                             f"{st.dp} x {st.micro_batch_size}; change --global-batch or --micro-batch")


def estimate_strategy(
    spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, strategy: StrategySpec,
    profile: ModelProfile | None = None,
) -> StrategyEstimate:
    """Predict a fixed strategy with the planner's cost model.

    Args:
        spec, cluster, train: model, cluster and training setup (global batch in sequences, sequence length).
        strategy: degrees, micro-batch, interleaving, sequence parallelism, recomputation, ZeRO stage, kernels.
        profile: measured per-layer times, used instead of the analytic compute model when given.

    Raises:
        StrategyError, TrainSpecError: a strategy that cannot run (see :func:`validate_strategy`).
        ProfileError: the profile is of another model, sequence length or dtype, or lacks the micro-batch size.
    """
    st = strategy
    validate_strategy(spec, cluster, train, st, profile)
    cluster = calibrate_cluster(cluster, profile)
    costs = CandidateCosts(spec, cluster, train, st.dp, st.tp, st.pp, st.micro_batch_size, profile,
                           st.cost_options())
    blocks = rank_blocks(st, spec.n_layers or 0)
    short = [s for s, n in enumerate(blocks) if n < costs.min_blocks(s)]
    if short:
        raise StrategyError(
            f"--stage-blocks: rank {short[0]} holds {blocks[short[0]]} blocks but its {st.vpp} chunks need at least "
            f"{costs.min_blocks(short[0])} (one per chunk besides the embedding's and the head's)")
    mode = st.mode()
    dense = dense_blocks_per_rank(st, spec, blocks)
    stages: list[StageCost] = [
        costs.stage_cost(s, n, n if st.recompute == "full" else 0, mode,
                         n if st.recompute in ("selective", "op") else 0, n if st.offload_activations else 0,
                         dense[s])
        for s, n in enumerate(blocks)
    ]
    pred = predict(costs, stages)
    worst_i = max(range(st.pp), key=lambda s: stages[s].memory_bytes)
    world = cluster.world_size
    peak = cluster.device.peak_flops_per_s[train.dtype]
    # Context parallelism does not change the FLOPs of a step (the load-balanced split spreads them evenly).
    step, model = pred.step_time_s, pred.model_flops_per_step
    if spec.moe is not None:  # recomputation repeats the blocks' forward: a third of their model FLOPs
        head = 3.0 * 2.0 * train.global_batch * train.seq_len * (spec.hidden or 0) * (spec.vocab or 0)
        hardware = model + ((model - head) / 3 if st.recompute == "full" else 0.0)
    else:
        hardware = tf.hardware_flops_per_step(spec, train.global_batch, train.seq_len, st.recompute)
    return StrategyEstimate(
        step_time_s=step, pipeline_s=pred.compute_s, bubble_s=pred.bubble_s, dp_comm_s=pred.dp_comm_s,
        optimizer_s=pred.optimizer_s + pred.offload_s, tokens_per_s=pred.tokens_per_s, model_flops_per_step=model,
        hardware_flops_per_step=hardware, model_tflops_per_device=model / step / world / 1e12,
        hardware_tflops_per_device=hardware / step / world / 1e12, mfu=pred.mfu,
        hfu=hardware / (step * world * peak), peak_memory_bytes=pred.peak_memory_bytes,
        memory_capacity_bytes=pred.memory_capacity_bytes, memory_breakdown_bytes=pred.memory_breakdown_bytes,
        most_loaded_stage=worst_i, stage_blocks=blocks, grad_accum=costs.m, host_bytes=pred.host_bytes,
        nvme_bytes=pred.nvme_bytes, binding=pred.binding, host_capacity_bytes=costs.host_capacity_bytes,
        nvme_capacity_bytes=costs.nvme_capacity_bytes,
    )
