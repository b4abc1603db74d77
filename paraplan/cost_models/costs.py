"""Per-candidate cost coefficients: what one layer, one stage and one optimizer step cost under (dp, tp, pp, b).

Both the MILP (``paraplan.planner.milp``) and the evaluator (:meth:`CandidateCosts.stage_cost`) use these numbers,
so a plan's reported prediction is exactly the objective the solver minimized. Every quantity is built from terms
that are affine in the stage's block count ``n`` and fully recomputed block count ``r`` (:class:`Affine`); the
evaluator combines them with ``max`` where work overlaps, and the MILP linearizes the same ``max`` exactly.

Step time (Narayanan et al. SC'21 sec. 2.2; Alpa/Mist's form for unequal stages, extended to interleaving and
zero-bubble schedules):
    ``T_step = m max_s t_s + w (sum_s t_s - max_s t_s) + max_s extra_s``
where ``t_s`` is stage s's time per micro-batch, ``m`` the micro-batches per step and ``w`` the bubble weight of the
schedule (:meth:`CandidateCosts.bubble_weight`): ``1/v`` for 1F1B with ``v`` virtual stages per device (v = 1:
``(m - 1) max + sum``), less for the zero-bubble schedules, whose weight-gradient work fills the bubble. With equal
stages the 1F1B bubble is ``(p - 1) t / v``, i.e. ``(p - 1)/(v m)`` of the ideal time (sec. 2.2.2).

Context parallelism (``cp``) shards the sequence: every per-token quantity is taken at ``S / cp`` tokens, the
attention core at ``cp`` times that (queries local, keys global), K/V are all-gathered per layer (forward) and
their gradients reduce-scattered (backward) over the cp group, exposed (Llama 3 paper sec. 3.3.2: the all-gather
based context parallelism puts that latency on the critical path; it is small with grouped-query attention), and
data-parallel gradient reduction and ZeRO sharding run over ``dp x cp`` ranks (Megatron-Core's
data-parallel-with-context group; torchtitan's ``dp_shard_cp`` mesh).

    ``t_s = sum of its channels`` (no overlap)   or   ``max of its channels`` (overlap), the channels being
    ``compute_s``, ``zero_comm_s``, host->device, device->host and NVMe transfers of offloaded states and paged
    activations (:meth:`CandidateCosts.transfer_times`, :meth:`CandidateCosts.paging_costs`; ZeRO-Infinity,
    Rajbhandari et al. 2021 sec. 6: prefetching overlaps NVMe->CPU, CPU->GPU and GPU compute)
    ``extra_s = optimizer_s + grad_reduce_s + param_gather_s`` (no overlap), or with overlap
    ``extra_s = optimizer_s + max(0, grad_reduce_s - backward_s) + max(0, param_gather_s - forward_s)``
    (``optimizer_s`` includes the offloaded optimizer's CPU Adam, PCIe and NVMe swapping: never hidden)

- ``compute_s``: forward + backward (+ recomputation) of the stage's layers for one micro-batch, the exposed
  tensor-parallel collectives and the pipeline point-to-point transfers.
- ``zero_comm_s``: per micro-batch ZeRO traffic: ZeRO-3 all-gathers the parameters for the forward and again for
  the backward and reduce-scatters the gradients; ZeRO-2 reduce-scatters the gradients.
- ``grad_reduce_s`` / ``param_gather_s``: once per step, the gradient all-reduce (ZeRO-0) or reduce-scatter
  (ZeRO-1) and the all-gather of updated parameters (ZeRO-1/2).
Overlap assumption (``CostOptions.overlap_dp``, default on for CUDA clusters and off for CPU/gloo, as DDP/FSDP
bucketing, DeepSpeed ``overlap_comm`` and Megatron ``--overlap-grad-reduce``/``--overlap-param-gather`` do): ZeRO-2/3 traffic of a micro-batch hides behind
its compute; the step's gradient reduction hides behind the backward of the stage's last micro-batch and the
parameter all-gather behind the forward of the first. The optimizer step is never hidden.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from paraplan.cost_models import compute
from paraplan.cost_models import efficiency as eff
from paraplan.cost_models import offload
from paraplan.cost_models.backend_profiles import BackendCostProfile, block_fetch_elements, cost_profile
from paraplan.cost_models import transformer as tf
from paraplan.cost_models.compute import KernelTimes
from paraplan.cost_models.comm import (
    LINK_EFFICIENCY, collective_time_s, dp_per_node, dp_spans_nodes, pp_spans_nodes,
)
from paraplan.errors import ProfileError, StrategyError
from paraplan.types import (
    DTYPE_BYTES, ClusterSpec, LayerKind, MemoryBreakdown, ModelProfile, ModelSpec, Prediction, TrainSpec,
)
from paraplan.units import GiB

# Memory that is neither model states nor activations: CUDA context, cuBLAS/NCCL workspaces and allocator
# fragmentation on GPUs; Python, libtorch and the data on a CPU process. Assumption, stated not measured.
OVERHEAD_BYTES = {"cuda": 2.0 * GiB, "cpu": 0.6 * GiB}
# Achieved fraction of the kernel-level model in a real training framework (launch gaps, synchronization,
# unfused small kernels, data loading, logging): analytic compute times are divided by it (the slowest-GPU pace of
# a job is priced separately, efficiency.straggler_factor). CALIBRATED, not sourced: the median of measured /
# modeled throughput over the published runs in ../shared/data/published_runs.jsonl
# (`python benchmarks/fidelity.py --calibrate`: 0.906 on all rows); fitted on all sources but one, each held-out
# source gets 0.904-0.909 (leave-one-source-out), so the factor is a property of GPU training frameworks of
# 2021-2025 on A100/H100, not of one run. Not applied to measured profiles (they time the real kernels) nor to the
# nominal CPU figures.
FRAMEWORK_EFFICIENCY = 0.91


@dataclass(frozen=True)
class Mode:
    """How model states are kept: ZeRO stage (Rajbhandari et al. 2020) and the tier of the optimizer states and of
    the parameters ("none": on the device, "cpu": host memory, "nvme"; ZeRO-Infinity, Rajbhandari et al. 2021), with
    ``ratio`` the share of the optimizer states offloaded (DeepSpeed ZeRO-3 partial offload). A bool
    ``offload_optimizer`` means host memory (True) or none."""

    zero_stage: int
    offload_optimizer: str = "none"
    offload_param: str = "none"
    ratio: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.offload_optimizer, bool):
            object.__setattr__(self, "offload_optimizer", "cpu" if self.offload_optimizer else "none")

    @property
    def offloads(self) -> bool:
        return self.offload_optimizer != "none" or self.offload_param != "none"

    def label(self) -> str:
        """``ZeRO-3, optimizer nvme, params nvme`` style text."""
        out = f"ZeRO-{self.zero_stage}"
        if self.offload_optimizer != "none":
            share = f" {self.ratio:.0%} of" if self.ratio < 1 else ""
            out += f",{share} optimizer on {self.offload_optimizer}"
        if self.offload_param != "none":
            out += f", params on {self.offload_param}"
        return out


# Bytes per offloaded parameter of the optimizer tier: fp32 master weight, Adam momentum and variance, fp32
# gradient partition (DeepSpeed stage3.py fp32_partitioned_groups_flat and their grads; stage_1_and_2.py
# single_partition_of_fp32_groups with its CPU gradient accumulation); with the optimizer on NVMe the first 12 go
# there and the gradient stays in host memory.
OFFLOAD_MASTER_ADAM_BYTES = 12
DEEPSPEED_MAX_LIVE_PARAMETERS = 1e9  # runtime/zero/config.py stage3_max_live_parameters default
OFFLOAD_GRAD_BYTES = 4


@dataclass(frozen=True)
class CostOptions:
    """Strategy settings besides (dp, tp, pp, micro-batch) that change the costs.

    Attributes:
        vpp: virtual pipeline stages per device (interleaved 1F1B, Narayanan et al. SC'21 sec. 2.2.2); 1 = 1F1B.
        cp: context-parallel degree (sequence sharded over cp ranks; module docstring).
        sequence_parallel: shard norms, dropout and residual activations over tp (Korthikanti et al. 2022 sec. 4.2.2).
        selective_policy: what a selectively recomputed block repeats: "attention" (the attention core, Korthikanti
            et al. 2022 sec. 4.3) or "op" (torchtitan's op-level policy, ``transformer.block_op_policy_activation_bytes``).
            Which blocks run selectively is the stage's choice (``selective_blocks``), not an option.
        attention: "flash3" (Hopper-native fused attention: FlashAttention-3, cuDNN / TransformerEngine on H100),
            "flash2" (FlashAttention-2 class: flash-attn 2, torch SDPA), "flash1" (FlashAttention-1
            and its Triton port) or "unfused" (materialized scores, as Megatron-LM in 2021).
        overlap_dp: data-parallel / ZeRO communication overlaps compute as described in the module docstring;
            None: on for CUDA clusters, off for CPU (gloo) clusters.
        overlap_tp: tensor-parallel collectives overlap the neighbouring GEMMs (TransformerEngine userbuffers,
            torch async TP); exposed time is ``max(0, comm - GEMM time)``.
        framework_efficiency: achieved fraction of the analytic kernel times (:data:`FRAMEWORK_EFFICIENCY`).
        schedule: "1f1b" (PipeDream-Flush / Megatron; with vpp > 1 the same as "interleaved_1f1b"),
            "interleaved_1f1b", "zero_bubble" (ZB-H1 in the interleaved loop placement, torch's
            ScheduleInterleavedZeroBubble), "zbv" (ZB-V, 2 chunks per device in V placement, Qi et al. 2024 sec. 6)
            or "gpipe" (all forwards, then all backwards: the 1F1B bubble, but every stage holds all m micro-batches).
        ep, etp: expert-parallel and expert tensor-parallel degrees (Mixture-of-Experts models; 1 otherwise).
        routing_imbalance: tokens the busiest expert rank receives over the balanced mean (>= 1; 1.0 = balanced,
            as Megatron-Bridge's force-balanced benchmarks): a stated assumption, not predicted
            (``moe.routed_load``).
        capacity_factor: expert capacity (Switch Transformers): tokens beyond ``capacity_factor x`` the balanced
            load are dropped; None: dropless.
        dispatcher: how MoE tokens travel: "alltoall" (NCCL all-to-all, Megatron-Core's alltoall dispatcher and
            the torch backend; ``moe.all_to_all_time_s``) or "deepep" (node-aware forwarding, ``moe.deepep_time_s``).
        backend: the backend cost profile (``backend_profiles.PROFILES``: deepspeed, torch, megatron, any, or a
            historical version) whose state bytes, reduction dtypes, ZeRO-3 fetching, buckets, NCCL per-step
            latency, tied-embedding synchronization and pipeline messages price the strategy; None: the generic
            model (16 bytes per parameter, 16-bit reductions, one latency per collective). Dense models only:
            Mixture-of-Experts costs (moe.py) keep the generic conventions.
        elementwise: "fused" (one read and write per element-wise op: fused kernels as Megatron/TransformerEngine
            ship them, or torch.compile) or "eager" (PyTorch eager mode's kernel sequence for Llama blocks,
            ``transformer.block_eager_extra_bytes``: torchtitan without compile).
    """

    vpp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    selective_policy: str = "attention"
    attention: str = "flash2"
    overlap_dp: bool | None = None
    overlap_tp: bool = False
    framework_efficiency: float = FRAMEWORK_EFFICIENCY
    schedule: str = "1f1b"
    ep: int = 1
    etp: int = 1
    routing_imbalance: float = 1.0
    capacity_factor: float | None = None
    dispatcher: str = "alltoall"
    backend: str | None = None
    elementwise: str = "fused"


SCHEDULES = ("1f1b", "interleaved_1f1b", "zero_bubble", "zbv", "gpipe")
SELECTIVE_POLICIES = ("attention", "op")


@dataclass(frozen=True)
class Affine:
    """``const + per_block n + per_recompute r + per_selective q + per_paged a + per_dense d`` for a stage of n
    blocks, r of them fully and q selectively recomputed, a of them with their activations paged out and, in a
    Mixture-of-Experts model, d of them dense blocks (``per_block`` is then an MoE block's and ``per_dense`` the
    difference a dense block makes)."""

    const: float = 0.0
    per_block: float = 0.0
    per_recompute: float = 0.0
    per_selective: float = 0.0
    per_paged: float = 0.0
    per_dense: float = 0.0

    def __call__(self, n: float, r: float = 0.0, q: float = 0.0, a: float = 0.0, d: float = 0.0) -> float:
        return (self.const + self.per_block * n + self.per_recompute * r + self.per_selective * q
                + self.per_paged * a + self.per_dense * d)


@dataclass(frozen=True)
class LayerCost:
    """One layer for one micro-batch on one device (already divided by tp).

    ``recompute_s`` is the additional time when the block is fully recomputed (its forward and forward
    collectives); ``selective_s`` the additional time and ``sel_act_bytes`` the bytes kept when it runs with
    selective recomputation (``CostOptions.selective_policy``). ``tp_*`` hold the exposed tensor- and
    context-parallel collectives; ``wgrad_s`` the weight-gradient part of ``bwd_s`` (what zero-bubble schedules
    defer into the bubble).
    """

    fwd_s: float
    bwd_s: float
    tp_fwd_s: float
    tp_bwd_s: float
    params: float
    act_bytes: float
    ckpt_bytes: float
    recompute_s: float
    selective_s: float = 0.0
    sel_act_bytes: float = 0.0
    wgrad_s: float = 0.0
    expert_params: float = 0.0  # routed-expert parameters per device (MoE blocks; ``params`` holds the rest)
    a2a_s: float = 0.0  # of tp_fwd_s + tp_bwd_s: the dispatch/combine all-to-alls and etp collectives (MoE)

    @property
    def time_s(self) -> float:
        return self.fwd_s + self.bwd_s + self.tp_fwd_s + self.tp_bwd_s


@dataclass(frozen=True)
class ModeTerms:
    """The mode-dependent affine terms of one stage (all in n; state bytes per device)."""

    params: Affine
    grads: Affine
    optimizer: Affine
    host: Affine
    nvme: Affine
    other: Affine
    zero_comm: Affine
    grad_reduce: Affine
    param_gather: Affine
    optimizer_s: Affine
    offload_s: Affine
    h2d_s: Affine
    d2h_s: Affine
    disk_s: Affine
    expert_params: Affine = Affine()
    expert_grads: Affine = Affine()
    expert_optimizer: Affine = Affine()


@dataclass(frozen=True)
class StageCost:
    """Predicted cost of one pipeline stage."""

    time_per_micro_batch_s: float
    step_extra_s: float
    dp_comm_s: float
    optimizer_s: float
    offload_s: float
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    other_bytes: float
    host_bytes: float = 0.0
    nvme_bytes: float = 0.0
    channels_s: tuple[tuple[str, float], ...] = ()  # (what, seconds per micro-batch) of each stage-time term
    expert_params_bytes: float = 0.0  # of params_bytes, grads_bytes, optimizer_bytes: the routed experts' share
    expert_grads_bytes: float = 0.0
    expert_optimizer_bytes: float = 0.0

    def breakdown(self) -> MemoryBreakdown:
        return MemoryBreakdown(params=self.params_bytes, grads=self.grads_bytes, optimizer=self.optimizer_bytes,
                               activations=self.activation_bytes, other=self.other_bytes,
                               expert_params=self.expert_params_bytes, expert_grads=self.expert_grads_bytes,
                               expert_optimizer=self.expert_optimizer_bytes)

    @property
    def memory_bytes(self) -> float:
        return self.breakdown().total


def state_bytes_per_param(dtype: str) -> tuple[int, int, int]:
    """Bytes per parameter of (parameters, gradients, optimizer states) for AdamW.

    Formula: mixed precision (bf16/fp16): 2 + 2 + 12 (fp32 master, momentum, variance) = 16;
        fp32: 4 + 4 + 8 (momentum, variance) = 16.
    Source: Rajbhandari et al. 2020 (ZeRO), sec. 3.1, K = 12 for mixed-precision Adam.
    """
    if dtype == "fp32":
        return 4, 4, 8
    return 2, 2, 12


class CandidateCosts:
    """Cost coefficients of one (dp, tp, pp, micro-batch) candidate.

    Args:
        spec, cluster, train: the problem.
        dp, tp, pp: parallel degrees (``options.cp`` the context-parallel one); ``micro_batch_size`` b;
            m = global_batch / (dp b) micro-batches per step.
        profile: measured per-layer times (compute_source "profile"), else the analytic model of
            :mod:`paraplan.cost_models.efficiency`.
        options: interleaving, sequence parallelism, selective recomputation, attention kernel, overlap.
        layer_cache: a dict shared by the candidates of one search (same model, cluster, train and profile): layer
            costs depend only on (tp, cp, b, the options that change a layer and the world size), so candidates
            that differ in dp/pp split or schedule reuse them.

    Raises:
        ProfileError: the profile lacks this micro-batch size (callers check that it matches the model, sequence
            length and dtype: ModelProfile.check_matches).
        StrategyError: an unknown attention kernel, schedule or selective policy, a schedule that does not take
            this vpp, or a cp that does not divide the sequence length.
    """

    def __init__(
        self, spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, dp: int, tp: int, pp: int,
        micro_batch_size: int, profile: ModelProfile | None = None, options: CostOptions | None = None,
        layer_cache: dict | None = None,
    ) -> None:
        self.spec, self.cluster, self.train = spec, cluster, train
        self.dp, self.tp, self.pp, self.b = dp, tp, pp, micro_batch_size
        opts = options or CostOptions()
        if opts.overlap_dp is None:
            # gloo on CPU runs collectives on the cores that compute, so nothing hides behind the backward pass.
            opts = dataclasses.replace(opts, overlap_dp=cluster.device.kind == "cuda")
        self.options = opts
        if opts.attention not in eff.ATTENTION_KERNELS:
            raise StrategyError(f"attention kernel '{opts.attention}': use one of {', '.join(eff.ATTENTION_KERNELS)}")
        if opts.vpp < 1:
            raise StrategyError(f"virtual pipeline stages must be >= 1 (got {opts.vpp})")
        if opts.schedule == "1f1b" and opts.vpp > 1:
            opts = dataclasses.replace(opts, schedule="interleaved_1f1b")
        if opts.schedule == "interleaved_1f1b" and opts.vpp == 1:
            opts = dataclasses.replace(opts, schedule="1f1b")
        if opts.schedule not in SCHEDULES or (opts.schedule == "gpipe" and opts.vpp > 1) or (
                opts.schedule == "zbv" and opts.vpp != 2):
            raise StrategyError(f"schedule '{opts.schedule}' with vpp={opts.vpp}: use 1f1b or interleaved_1f1b "
                                "(any vpp), zero_bubble (any vpp), zbv (vpp 2) or gpipe (vpp 1)")
        if opts.selective_policy not in SELECTIVE_POLICIES:
            raise StrategyError(f"selective policy '{opts.selective_policy}': use attention or op")
        if opts.cp < 1 or train.seq_len % opts.cp:
            raise StrategyError(f"cp={opts.cp} must be >= 1 and divide the sequence length {train.seq_len}")
        if opts.elementwise not in ("fused", "eager"):
            raise StrategyError(f"element-wise kernels '{opts.elementwise}': use fused or eager")
        if not 0 < opts.framework_efficiency <= 1:
            raise StrategyError(f"framework efficiency must be in (0, 1] (got {opts.framework_efficiency})")
        self._check_experts(spec, dp, tp, pp, opts)
        if spec.moe is not None and profile is not None:
            raise ProfileError(f"{spec.name} is a Mixture-of-Experts model: its costs come from the analytic model "
                               "(profiles time one block kind); plan it without --profile")
        self.options = opts
        self.vpp = opts.vpp
        self.cp = opts.cp
        self.schedule = opts.schedule
        self.sp = opts.sequence_parallel and tp > 1
        self.s_local = train.seq_len // opts.cp  # tokens of a sequence on one context-parallel rank
        self.dp_shard = dp * opts.cp  # ranks that reduce gradients and shard ZeRO states (dp x cp)
        self.m = train.global_batch // (dp * micro_batch_size)
        self.dtype_bytes = DTYPE_BYTES[train.dtype]
        self.state_bytes = state_bytes_per_param(train.dtype)
        # The backend cost profile (dense models; an MoE model keeps the generic conventions, see CostOptions).
        self.framework: BackendCostProfile | None = cost_profile(opts.backend) if spec.moe is None else None
        self.nccl = self.framework is not None and self.framework.nccl_latency
        self.profile = profile
        self.compute_source = "profile" if profile is not None else "analytic"
        self.dp_spans = dp_spans_nodes(cluster, tp, self.dp_shard)
        self.dp_per_node = dp_per_node(cluster, tp, self.dp_shard)
        self.cp_spans = dp_spans_nodes(cluster, tp, opts.cp)  # cp ranks sit next to the tp ranks (mesh .., cp, tp)
        # Mixture-of-Experts: expert states shard and reduce over the expert-data-parallel group (moe.py).
        self.ep, self.etp = opts.ep, opts.etp
        self.edp = self.dp_shard * tp // (opts.ep * opts.etp)
        self.edp_spans = dp_spans_nodes(cluster, opts.ep * opts.etp, self.edp)
        self.edp_per_node = dp_per_node(cluster, opts.ep * opts.etp, self.edp)
        self.n_dense = spec.moe.first_dense_layers if spec.moe is not None else 0  # dense blocks, first in the chain
        # Embedding and head formulas (transformer.py) read h and v only: an MoE model uses its dense twin there.
        self.layer_spec = spec.model_copy(update={"moe": None, "mla": None}) if spec.moe is not None else spec
        key = (tp, opts.cp, micro_batch_size, self.sp, opts.selective_policy, opts.attention, opts.overlap_tp,
               opts.framework_efficiency, dp * tp * pp * opts.cp, opts.ep, opts.etp, opts.routing_imbalance,
               opts.capacity_factor, opts.dispatcher, opts.backend, opts.elementwise)
        self.layer_key = key  # what the layer costs depend on (a search shares work between equal keys)
        # Work shared with the search's other candidates: layer costs, mode terms (and the planner's bounds' terms),
        # each keyed by what it depends on.
        self.shared: dict = layer_cache if layer_cache is not None else {}
        if key not in self.shared:
            dense = self._moe_model_block(False) if self.n_dense else None
            block = self._moe_model_block(True) if spec.moe is not None else self._layer("block")
            self.shared[key] = (block, self._layer("embed"), self._layer("head"), dense)
        self.block, self.embed, self.head, self.dense_block = self.shared[key]
        s, h = self.s_local, spec.hidden or 0
        # Megatron sends 1/t of the boundary activation per tp rank (scatter/gather optimization, Narayanan et al.
        # SC'21 sec. 4.1; sequence parallelism keeps it sharded anyway); forward activation out and gradient back,
        # v times per micro-batch with interleaving.
        # DeepSpeed's pipeline engine and torch.distributed.pipelining send the whole activation from every tp rank
        # (backend_profiles: p2p_scatter_gather), unless sequence parallelism keeps it sharded.
        whole = self.framework is not None and not self.framework.p2p_scatter_gather and not self.sp
        boundary = micro_batch_size * s * h * self.dtype_bytes / (1 if whole else tp)
        if spec.family == "custom" and profile is not None:
            boundary = profile.layer("block", micro_batch_size).output_bytes
        spans = pp_spans_nodes(cluster, tp, self.dp_shard)
        self.pp_spans = spans
        self.p2p_s = 2 * self.vpp * self._ct("p2p", boundary, 2, spans) if pp > 1 else 0.0
        self.capacity_bytes = cluster.device.memory_bytes
        # What a plan may use: the planner lowers it to leave headroom for allocator fragmentation.
        self.usable_capacity_bytes = self.capacity_bytes
        # Host memory and NVMe per node are shared by its devices; each device may use an even share (assumption:
        # every device of a node runs a stage of the same load, exact when pp ranks do not share a node).
        self.host_capacity_bytes = cluster.host_memory_bytes / cluster.devices_per_node
        self.nvme_capacity_bytes = cluster.nvme_capacity_bytes / cluster.devices_per_node
        self.overhead_bytes = OVERHEAD_BYTES[cluster.device.kind]

    @staticmethod
    def _check_experts(spec: ModelSpec, dp: int, tp: int, pp: int, opts: CostOptions) -> None:
        """Refuse expert settings the frameworks would refuse (Megatron-Core parallel_state.py, moe arguments)."""
        if spec.moe is None:
            if (opts.ep, opts.etp) != (1, 1):
                raise StrategyError(f"ep={opts.ep}, etp={opts.etp}: {spec.name} has no experts; use ep=1, etp=1")
            return
        if opts.ep < 1 or opts.etp < 1 or spec.moe.n_experts % opts.ep:
            raise StrategyError(f"ep={opts.ep} must divide the {spec.moe.n_experts} experts of {spec.name}")
        if (dp * opts.cp * tp) % (opts.ep * opts.etp):
            raise StrategyError(f"ep x etp = {opts.ep * opts.etp} must divide dp x cp x tp = {dp * opts.cp * tp}: the "
                                "expert groups tile each pipeline stage's ranks (Megatron-Core parallel_state.py)")
        if spec.moe.expert_ffn_hidden % opts.etp:
            raise StrategyError(f"etp={opts.etp} must divide the expert MLP width {spec.moe.expert_ffn_hidden}")
        if tp > 1 and not opts.sequence_parallel:
            raise StrategyError("Mixture-of-Experts with tp > 1 needs sequence parallelism (Megatron-Core refuses "
                                "it otherwise): add sp=true")
        if opts.dispatcher not in ("alltoall", "deepep"):
            raise StrategyError(f"MoE dispatcher '{opts.dispatcher}': use alltoall or deepep")
        if opts.routing_imbalance < 1:
            raise StrategyError(f"routing imbalance is max/mean expert load, >= 1 (got {opts.routing_imbalance})")
        if opts.attention == "unfused":
            raise StrategyError("the unfused attention kernel is not modelled for MoE models; use flash2 or flash1")
        if opts.selective_policy == "op":
            raise StrategyError("torchtitan's op-level selective policy is not modelled for MoE blocks; use the "
                                "attention policy")

    def _moe_model_block(self, moe_layer: bool) -> LayerCost:
        """A dense or MoE block of a Mixture-of-Experts model (:func:`moe.block_work`): GEMMs and element-wise work
        on the efficiency curves, attention-side TP collectives as a dense block's, context-parallel K/V
        exchange, and per MoE block four all-to-alls per micro-batch (dispatch and combine forward, their
        gradients backward) over the ep group, plus an all-gather and reduce-scatter of the routed copies over
        the etp group each way when etp > 1.

        Source: moe.all_to_all_time_s (pairwise exchange); Megatron-Core MoEAlltoAllTokenDispatcher (the etp
            all-gather / reduce-scatter of the dispatched tokens); as :meth:`_layer` for the rest.
        Assumptions: the all-to-alls are exposed (not overlapped with compute; DeepSeek-V3's DualPipe and
            Megatron's EP overlap would hide part of them); the block's activations under selective recomputation
            are all but the attention core's, as a dense block's.
        """
        from paraplan.cost_models import moe as moe_costs

        opts, b, t = self.options, self.b, self.tp
        load = moe_costs.routed_load(opts.capacity_factor, opts.routing_imbalance)
        work = moe_costs.block_work(self.spec, moe_layer, b, self.s_local, t, self.ep, self.etp, self.dtype_bytes,
                                    self.sp, load)
        dev = self.cluster.device
        kt = compute.moe_model_block_times(work, dev, self.train.dtype, opts.attention, self.cp)
        if dev.kind == "cuda":
            pace = eff.straggler_factor(self.dp * self.tp * self.pp * self.cp)
            kt = kt.scaled(1.0 / (opts.framework_efficiency * pace))
        h = self.spec.hidden or 0
        coll = self._tp_collective_s(b * self.s_local * h * self.dtype_bytes)
        tp_fwd = tp_bwd = 2 * coll
        cp_fwd = cp_bwd = 0.0
        if self.cp > 1:
            kv = b * self.train.seq_len * work.kv_elements * self.dtype_bytes / t
            cp_fwd = collective_time_s(self.cluster, "all_gather", kv, self.cp, self.cp_spans)
            cp_bwd = collective_time_s(self.cluster, "reduce_scatter", kv, self.cp, self.cp_spans)
        if opts.dispatcher == "deepep":
            tokens = b * self.s_local / (t if self.sp and t > 1 else 1)
            a2a = 2 * moe_costs.deepep_time_s(self.cluster, tokens, self.spec, self.ep, self.dtype_bytes, self.etp,
                                              load)
        else:
            a2a = 2 * moe_costs.all_to_all_time_s(self.cluster, work.a2a_bytes, self.ep, self.etp)
        if self.etp > 1:
            a2a += (collective_time_s(self.cluster, "all_gather", work.etp_bytes, self.etp, False)
                    + collective_time_s(self.cluster, "reduce_scatter", work.etp_bytes, self.etp, False))
        if opts.overlap_tp:
            tp_fwd, tp_bwd = max(0.0, tp_fwd - kt.gemm_fwd_s), max(0.0, tp_bwd - 2 * kt.gemm_fwd_s)
        act = work.act_bytes
        if self.cp > 1:  # the attention keeps the all-gathered K and V for its backward
            act += b * (self.train.seq_len - self.s_local) * work.kv_elements * self.dtype_bytes / t
        tp_fwd, tp_bwd = tp_fwd + cp_fwd + a2a, tp_bwd + cp_bwd + a2a
        return LayerCost(kt.fwd_s, kt.bwd_s, tp_fwd, tp_bwd, work.params, act, work.ckpt_bytes, kt.fwd_s + tp_fwd,
                         kt.attn_fwd_s + cp_fwd, work.act_bytes, kt.gemm_fwd_s, expert_params=work.expert_params,
                         a2a_s=2 * a2a)

    # ---- layers -------------------------------------------------------------------------------------------------
    def _tp_collective_s(self, n_bytes: float) -> float:
        """One Megatron TP collective slot on ``n_bytes``: an all-reduce, or with SP its reduce-scatter and the
        matching all-gather (same volume: nccl-tests factors ``2(t-1)/t = (t-1)/t + (t-1)/t``; one more latency).

        Source: Korthikanti et al. 2022 sec. 4.2.2 (SP turns each all-reduce into a reduce-scatter + all-gather).
        """
        t = self.tp
        if self.sp:
            return self._ct("reduce_scatter", n_bytes, t, False) + self._ct("all_gather", n_bytes, t, False)
        return self._ct("all_reduce", n_bytes, t, False)

    def _ct(self, op: str, n_bytes: float, n: int, spans: bool, per_node: int | None = None) -> float:
        """``comm.collective_time_s`` with the backend profile's latency model (NCCL per-step latency or not)."""
        return collective_time_s(self.cluster, op, n_bytes, n, spans, per_node,  # type: ignore[arg-type]
                                 nccl_latency=self.nccl)

    def _measured_layer(self, kind: LayerKind) -> LayerCost:
        """A factory model's layer taken whole from its profile (parameters, saved activations, FLOPs; tp = 1).

        A block keeps what the profiler saw it save plus its input, which is the previous layer's output
        (``activation_bytes`` excludes the input; ``output_bytes`` has its size); under full recomputation only
        that input stays. Source: the profiler's measurement (``paraplan.profiler.layers``).
        """
        assert self.profile is not None
        lp = self.profile.layer(kind, self.b)
        kt = self._times(kind)
        if kind == "block":
            act, ckpt = lp.activation_bytes + lp.output_bytes, lp.output_bytes
        else:
            act = ckpt = lp.activation_bytes
        recompute = kt.fwd_s if kind == "block" else 0.0
        return LayerCost(kt.fwd_s, kt.bwd_s, 0.0, 0.0, lp.param_count, act, ckpt, recompute)

    def _cp_collective_s(self) -> tuple[float, float]:
        """(forward, backward) seconds of one block's context-parallel K/V exchange on one rank.

        Formula: all-gather of K and V, ``2 b S k d / t`` elements gathered (the whole sequence's keys and values of
            the rank's kv heads), forward; reduce-scatter of their gradients, the same size, backward; 0 when cp = 1.
        Source: Llama 3 paper (Grattafiori et al. 2024) sec. 3.3.2 (all-gather based CP); ../shared/FORMULAS.md.
        """
        if self.cp == 1:
            return 0.0, 0.0
        spec = self.spec
        kv = 2 * self.b * self.train.seq_len * (spec.n_kv_heads or 0) * (spec.attention_head_dim or 0)
        n_bytes = kv * self.dtype_bytes / self.tp
        return (self._ct("all_gather", n_bytes, self.cp, self.cp_spans),
                self._ct("reduce_scatter", n_bytes, self.cp, self.cp_spans))

    def _layer(self, kind: LayerKind) -> LayerCost:
        if self.spec.family == "custom":
            return self._measured_layer(kind)
        spec, t, b, s = self.layer_spec, self.tp, self.b, self.s_local
        db, h = self.dtype_bytes, spec.hidden or 0
        v_pad = tf.padded_vocab(spec, t)
        pad_params = (v_pad - (spec.vocab or 0)) * h
        n_bytes = b * s * h * db
        coll = self._tp_collective_s(n_bytes)
        sel_act = 0.0
        if kind == "block":
            params = tf.block_params(spec) / t
            act = tf.block_activation_bytes(spec, b, s, t, db, sp=self.sp)
            if self.cp > 1:  # the attention keeps the all-gathered K and V (the whole sequence) for its backward
                kd = (spec.n_kv_heads or 0) * (spec.attention_head_dim or 0)
                act += 2 * b * (self.train.seq_len - s) * kd * db / t
            if self.options.selective_policy == "op":
                sel_act = tf.block_op_policy_activation_bytes(spec, b, s, t, db, sp=self.sp)
            else:  # everything but the attention core is kept
                sel_act = act
            if self.options.attention == "unfused":  # scores of s local queries x S keys
                act += tf.attention_score_activation_bytes(spec, b, s, t) * self.cp
            ckpt = tf.block_input_bytes(spec, b, s, db, t=t, sp=self.sp)
            # Megatron TP: two collective slots forward, two backward (Shoeybi et al. sec. 3); a backend profile
            # states its own (backend_profiles.TpCollectives).
            if self.framework is None or t == 1:
                tp_fwd, tp_bwd = 2 * coll, 2 * coll
            else:
                tp_fwd, tp_bwd = (sum(k * self._ct(op, n_bytes, t, False) for op, k in ops.items())
                                  for ops in self.framework.tp_collectives[bool(self.sp)])
        else:
            # Vocabulary-parallel embedding and LM head (Megatron-LM), rows padded to padded_vocab. One slot each:
            # embedding: all-reduce of its output forward (SP: reduce-scatter forward, all-gather backward);
            # head: all-reduce of its input gradient backward (SP: all-gather forward, reduce-scatter backward).
            half = self._ct("all_gather", n_bytes, t, False)
            if kind == "head":
                params = (tf.head_params(spec) + pad_params) / t
                act = ckpt = tf.head_activation_bytes(spec, b, s, t, db) + 8.0 * b * s * (v_pad - (spec.vocab or 0)) / t
                tp_fwd, tp_bwd = (half, half) if self.sp else (0.0, coll)
            else:
                params = (tf.embed_params(spec) + pad_params) / t
                act = ckpt = tf.embed_activation_bytes(spec, b, s)
                tp_fwd, tp_bwd = (half, half) if self.sp else (coll, 0.0)
        kt = self._times(kind)
        if self.options.overlap_tp:
            tp_fwd, tp_bwd = max(0.0, tp_fwd - kt.gemm_fwd_s), max(0.0, tp_bwd - 2 * kt.gemm_fwd_s)
        if kind != "block":
            return LayerCost(kt.fwd_s, kt.bwd_s, tp_fwd, tp_bwd, params, act, ckpt, 0.0, wgrad_s=kt.gemm_fwd_s)
        cp_fwd, cp_bwd = self._cp_collective_s()
        if self.options.selective_policy == "op":
            # The all-reduces (all-gathers under SP) are not in torchtitan's save list: replayed with the recompute.
            selective = kt.op_recompute_s + (tp_fwd / 2 if self.sp else tp_fwd)
        else:  # the attention core's forward, and the K/V all-gather it consumes
            selective = kt.attn_fwd_s + cp_fwd
        tp_fwd, tp_bwd = tp_fwd + cp_fwd, tp_bwd + cp_bwd
        return LayerCost(kt.fwd_s, kt.bwd_s, tp_fwd, tp_bwd, params, act, ckpt, kt.fwd_s + tp_fwd, selective,
                         sel_act, kt.gemm_fwd_s)

    def _times(self, kind: LayerKind) -> KernelTimes:
        """Forward, backward, attention core, forward GEMM and op-policy recompute times per micro-batch: measured
        (profile) or analytic (:mod:`paraplan.cost_models.compute`) divided by the framework efficiency; on GPUs
        both are divided by :func:`efficiency.straggler_factor` of the job's devices (a synchronous step runs at
        the pace of its slowest GPU; a profile times one GPU). A profile measures forward and backward only: the
        attention-core, GEMM and op-policy parts are the measured forward times the analytic model's shares, and
        with context parallelism the measured times are divided by cp (Assumption: the attention share, which
        does not shrink with cp, is small at the profiled length). With tp > 1 a block also takes the profile's
        overhead (:meth:`framework_overhead`: a calibration's, else measured by ``paraplan profile`` for the backend,
        else 0), split between forward and backward as the analytic block's times."""
        dev, dtype, b, s, t = self.cluster.device, self.train.dtype, self.b, self.s_local, self.tp
        pace = eff.straggler_factor(self.dp * self.tp * self.pp * self.cp) if dev.kind == "cuda" else 1.0
        if self.profile is not None:
            try:
                lp = self.profile.layer(kind, self.b)
            except KeyError:
                raise ProfileError(
                    f"profile has no micro-batch size {self.b}; profile with --micro-batches including {self.b} "
                    f"(it has {self.profile.micro_batch_sizes()})"
                ) from None
            scale = 1.0 if kind == "embed" else 1.0 / self.tp  # Assumption: TP splits block/head time evenly.
            scale /= pace * self.cp
            fwd, bwd = lp.fwd_time_s * scale, lp.bwd_time_s * scale
            if kind != "block" or self.spec.family == "custom":
                return KernelTimes(fwd, bwd, 0.0, fwd)
            ref = compute.block_times(self.spec, dev, dtype, b, s, t, self.sp, self.options.attention, self.cp,
                                      self.options.elementwise == "eager")
            share = fwd / ref.fwd_s
            over = self.framework_overhead("tp") if t > 1 else 0.0  # split as the analytic block's
            if over:                                                  # forward : backward
                f_share = ref.fwd_s / (ref.fwd_s + ref.bwd_s)
                fwd, bwd = fwd + over * f_share, bwd + over * (1 - f_share)
            return KernelTimes(fwd, bwd, ref.attn_fwd_s * share, ref.gemm_fwd_s * share, ref.op_recompute_s * share)
        if kind == "embed":
            times = compute.embed_times(self.layer_spec, dev, dtype, b, s)
        elif kind == "head":
            times = compute.head_times(self.layer_spec, dev, dtype, b, s, t, self.sp)
        else:
            times = compute.block_times(self.spec, dev, dtype, b, s, t, self.sp, self.options.attention, self.cp,
                                        self.options.elementwise == "eager")
        return times.scaled(1.0 / (self.options.framework_efficiency * pace) if dev.kind == "cuda" else 1.0)

    # ---- stages -------------------------------------------------------------------------------------------------
    def inflight(self, stage: int) -> float:
        """Micro-batches (in units of the stage's full activations) that stage ``stage`` holds at its peak.

        Formula: 1F1B ``min(p - s, m)``; interleaved with v chunks: ``min(2 (p - s - 1) + (v - 1) p + 1, m v) / v``
            chunk activations of ``1/v`` of the stage each (stage 0: ``p + (p - 1)/v``); GPipe ``m`` on every stage;
            the zero-bubble schedules as the 1F1B schedule of the same placement (ZB-H1 keeps 1F1B's peak, Qi et al.
            2024 sec. 3.1; ZB1P interleaved likewise), ZB-V ``min(p, m)`` on every stage (sec. 6: the peak of
            1F1B, balanced over the V).
        Source: Narayanan et al. SC'21 sec. 2.2; Megatron-LM ``schedules.py`` warm-up counts; Korthikanti et al.
            2022 sec. 4.2.3 (interleaving's ``1 + (p - 1)/(p v)`` factor on the first stage); Huang et al. 2019
            (GPipe) for the all-forward-then-backward schedule; Qi et al. 2024 (Zero Bubble Pipeline Parallelism).
        """
        p, m, v = self.pp, self.m, self.vpp
        if self.schedule == "gpipe":
            return m
        if self.schedule == "zbv":
            return min(p, m)
        if v == 1:
            return min(p - stage, m)
        return min(2 * (p - stage - 1) + (v - 1) * p + 1, m * v) / v

    def bubble_weight(self) -> float:
        """``w`` of the step-time formula: the share of ``sum_s t_s - max_s t_s`` that is idle.

        Formula: 1F1B and GPipe ``1``; interleaved 1F1B ``1/v``; zero bubble (ZB-H1, interleaved ZB1P)
            ``(T - 2 W)/(T v)``; ZB-V ``(T - 3 W)/(2 T)``, floored at 0, with ``T`` a block's time per micro-batch
            and ``W`` its weight-gradient GEMMs (the forward GEMMs' time: dgrad and wgrad each repeat them).
        Source: Qi et al. 2024 (arXiv 2401.10241): ZB-H1's bubble is ``(p - 1)(T_F + T_B - T_W)`` against 1F1B's
            ``(p - 1)(T_F + T_B + T_W)`` (sec. 3.1; T_B the input-gradient part); ZB-V's ``(p - 1)(T_F + T_B - 2 T_W)``
            in per-chunk times (sec. 6), i.e. half of that in stage times; ../shared/FORMULAS.md.
        Assumption: every stage has the block's ratio of W to T (the fixed layers and point-to-point transfers
            do not change it much).
        """
        if self.schedule in ("1f1b", "gpipe", "interleaved_1f1b"):
            return 1.0 / self.vpp
        t, w = self.block.time_s, self.block.wgrad_s
        if t <= 0:
            return 1.0 / self.vpp
        if self.schedule == "zbv":
            return max(0.0, t - 3 * w) / (2 * t)
        return max(0.0, t - 2 * w) / (t * self.vpp)

    def min_blocks(self, stage: int) -> int:
        """Least blocks a stage may hold: one per chunk, except that a chunk holding the embedding or the head may
        hold nothing else (Llama 3 405B: "the first model chunk on the first stage has only the embedding, and the
        last model chunk on the last stage has only output projection and loss calculation", Grattafiori et al.
        2024 sec. 3.3.2)."""
        return max(0, self.vpp - len(self.fixed_layers(stage)))

    def fixed_layers(self, stage: int) -> list[LayerCost]:
        """Embedding and head of the stage: embedding on rank 0, head on rank p-1; ZB-V's V placement puts the
        last chunk, and so the head, on rank 0 too."""
        out = []
        if stage == 0:
            out.append(self.embed)
        if stage == self.pp - 1 and self.schedule != "zbv" or stage == 0 and self.schedule == "zbv":
            out.append(self.head)
        return out

    def stage_params(self, stage: int, n_blocks: float, dense_blocks: float = 0) -> float:
        """Parameters per device of a stage (an MoE model's: all but the routed experts, :meth:`stage_expert_params`)
        holding ``n_blocks`` blocks, ``dense_blocks`` of them an MoE model's dense blocks. A tied LM head on another
        stage than the embedding keeps its own copy (Megatron-LM); on the same stage (pp = 1, or rank 0 of ZB-V)
        the matrix is held once."""
        params = n_blocks * self.block.params + sum(lc.params for lc in self.fixed_layers(stage))
        if self.dense_block is not None:
            params += dense_blocks * (self.dense_block.params - self.block.params)
        if self.spec.tied_embeddings and stage == 0 and (self.pp == 1 or self.schedule == "zbv"):
            params -= tf.padded_vocab(self.layer_spec, self.tp) * (self.spec.hidden or 0) / self.tp
        return params

    def stage_expert_params(self, n_blocks: float, dense_blocks: float = 0) -> float:
        """Routed-expert parameters per device of a stage: ``(n - d) E (3 h f_e) / (ep etp)`` (0 for dense models)."""
        return (n_blocks - dense_blocks) * self.block.expert_params

    @property
    def bound_blocks(self) -> int:
        """Blocks the planner's lower bounds spread over the stages: all of them, or an MoE model's MoE blocks only
        (its dense blocks then count as free, which keeps every bound a bound whichever kind costs more)."""
        return (self.spec.n_layers or 0) - (self.n_dense if self.dense_block is not None else 0)

    def dense_blocks_per_stage(self, n_blocks: list[int]) -> list[int]:
        """Dense blocks of an MoE model in each stage of a contiguous layout (vpp 1): they are the chain's first
        ``first_dense_layers`` blocks. All zeros for dense models (whose blocks are all ``self.block``)."""
        out, before = [], 0
        for n in n_blocks:
            out.append(max(0, min(n, self.n_dense - before)))
            before += n
        return out

    def _dense_delta(self, pick) -> float:
        """``pick(dense block) - pick(MoE block)``: the per_dense coefficient of a term (0 without dense blocks)."""
        return pick(self.dense_block) - pick(self.block) if self.dense_block is not None else 0.0

    def compute_terms(self, stage: int) -> Affine:
        """Compute time per micro-batch of the stage (forward, backward, recomputation, TP/CP collectives, p2p).
        An MoE model's dense blocks take their own time; recomputing or selectively recomputing a block is priced
        at the MoE block's (assumption: at most ``first_dense_layers`` blocks differ)."""
        fixed = sum(lc.time_s for lc in self.fixed_layers(stage)) + self.p2p_s
        return Affine(fixed, self.block.time_s, self.block.recompute_s, self.block.selective_s,
                      per_dense=self._dense_delta(lambda lc: lc.time_s))

    def backward_terms(self, stage: int) -> Affine:
        """Backward time of one micro-batch (it includes the recomputed forwards): the window DP reduction hides in."""
        fixed = sum(lc.bwd_s + lc.tp_bwd_s for lc in self.fixed_layers(stage))
        return Affine(fixed, self.block.bwd_s + self.block.tp_bwd_s, self.block.recompute_s, self.block.selective_s,
                      per_dense=self._dense_delta(lambda lc: lc.bwd_s + lc.tp_bwd_s))

    def forward_terms(self, stage: int) -> Affine:
        fixed = sum(lc.fwd_s + lc.tp_fwd_s for lc in self.fixed_layers(stage))
        return Affine(fixed, self.block.fwd_s + self.block.tp_fwd_s,
                      per_dense=self._dense_delta(lambda lc: lc.fwd_s + lc.tp_fwd_s))

    def activation_terms(self, stage: int) -> Affine:
        """Activation bytes held at the peak, excluding the one-block working space of recomputation (a paged block
        holds none on the device). An MoE model's dense blocks are counted at the MoE block's activations, an upper
        bound (their MLP saves ``4 f`` per token against the routed copies' ``K (h + 4 f_e)``: DeepSeek-V3 73,728
        vs 122,880 elements), so that recomputing whichever blocks a stage recomputes first never over-credits."""
        k = self.inflight(stage)
        fixed = sum(lc.act_bytes for lc in self.fixed_layers(stage))
        blk = self.block
        return Affine(k * fixed, k * blk.act_bytes, k * (blk.ckpt_bytes - blk.act_bytes),
                      k * (blk.sel_act_bytes - blk.act_bytes), -k * blk.act_bytes)

    def expert_state_memory(self, mode: Mode, n_expert: float) -> tuple[float, float, float]:
        """(params, grads, optimizer) bytes per device of ``n_expert`` routed-expert parameters per device.

        Formula: as :meth:`state_memory` with the ZeRO shards over ``edp = dp cp tp / (ep etp)`` instead of dp cp.
        Source: moe.expert_data_parallel_size (Megatron-Core parallel_state.py: expert gradients are reduced, and
            the distributed optimizer shards them, over the expert-data-parallel group).
        """
        p_b, g_b, o_b = self._states(mode)
        e = self.edp
        return (n_expert * p_b / (e if mode.zero_stage >= 3 else 1), n_expert * g_b / (e if mode.zero_stage >= 2 else 1),
                n_expert * o_b / (e if mode.zero_stage >= 1 else 1))

    def state_memory(self, mode: Mode, n_params: float, n_expert: float = 0.0
                     ) -> tuple[float, float, float, float, float]:
        """(params, grads, optimizer) bytes on the device, then bytes in host memory and on NVMe, per device, of a
        stage holding ``n_params`` parameters per device (and ``n_expert`` routed-expert parameters, priced by
        :meth:`expert_state_memory`; MoE models are planned without offload).

        Formula: ZeRO-1 divides optimizer states by d = dp x cp, ZeRO-2 also gradients, ZeRO-3 also parameters.
            Optimizer offload (share ``ratio``) moves that share of the optimizer states and the gradient
            partitions off the device: the host keeps :data:`OFFLOAD_GRAD_BYTES` (fp32 gradient) and the host or
            NVMe :data:`OFFLOAD_MASTER_ADAM_BYTES` (fp32 master, momentum, variance) per parameter of the partition. Parameter offload (ZeRO-3) keeps the parameter partition on the host or
            NVMe (the device holds only the gathered layers, :meth:`zero3_working_bytes`). NVMe tiers need pinned
            host swap buffers (:func:`offload.swap_buffer_bytes`).
        Source: Rajbhandari et al. 2020, sec. 5 and Figure 1; ZeRO-Offload (Ren et al. 2021) sec. 4.1 (gradients
            and optimizer states on the CPU, fp16 parameters on the GPU); ZeRO-Infinity (Rajbhandari et al. 2021)
            sec. 5.1 (parameters and optimizer states on NVMe); DeepSpeed runtime/zero/stage3.py,
            stage_1_and_2.py (CPU gradient partitions; stage3.py ``grad_partitions_flat_buffer`` on the CPU under
            optimizer offload), swap_tensor/ (buffers).
        """
        p_b, g_b, o_b = self._states(mode)
        d = self.dp_shard
        params = n_params * p_b / (d if mode.zero_stage >= 3 else 1)
        grads = n_params * g_b / (d if mode.zero_stage >= 2 else 1)
        n_opt = n_params / (d if mode.zero_stage >= 1 else 1)
        optim = n_opt * o_b
        host = nvme = 0.0
        if mode.offload_optimizer != "none":
            share = mode.ratio
            optim *= 1 - share
            grads *= 1 - share
            # The fp32 gradient partition stays in host memory on either tier (DeepSpeed stage3.py allocates
            # grad_partitions_flat_buffer on the CPU under optimizer offload); master weights and moments move.
            host += share * n_opt * OFFLOAD_GRAD_BYTES
            if mode.offload_optimizer == "nvme":
                nvme += share * n_opt * OFFLOAD_MASTER_ADAM_BYTES
            else:
                host += share * n_opt * OFFLOAD_MASTER_ADAM_BYTES
        if mode.offload_param != "none":
            if mode.offload_param == "nvme":
                nvme += params
            else:
                host += params
            params = 0.0
        if mode.offload_optimizer == "nvme" or mode.offload_param == "nvme":
            host += offload.swap_buffer_bytes(mode.offload_param, mode.offload_optimizer, self.spec, self.tp, d,
                                              n_opt, p_b)
        if n_expert:
            if mode.offloads:
                raise StrategyError(f"{self.spec.name}: offloading a Mixture-of-Experts model's states is not "
                                    "modelled; plan it with offload=none")
            ep_, eg, eo = self.expert_state_memory(mode, n_expert)
            params, grads, optim = params + ep_, grads + eg, optim + eo
        return params, grads, optim, host, nvme

    def zero3_working_bytes(self, mode: Mode) -> float:
        """Gathered parameters ZeRO-3 holds at once (bytes).

        Formula: FSDP-style, the current and the prefetched layer in full, ``2 x largest layer`` parameters. With
            parameters offloaded (DeepSpeed only, see planner.search.mode_rules) DeepSpeed's limit instead:
            ``max(largest tensor, min(2 x largest layer, stage3_max_live_parameters = 1e9))`` (it gathers module by
            module and releases beyond the live limit; the largest tensor must be whole).
        Source: DeepSpeed runtime/zero/config.py (``stage3_max_live_parameters`` default 1e9) and
            partitioned_param_coordinator.py; torch FSDP2 prefetches one ``fully_shard`` unit ahead.
        """
        if mode.zero_stage < 3:
            return 0.0
        largest = max(self.block.params + self.block.expert_params, self.embed.params, self.head.params)
        live = 2 * largest
        tensor = offload.largest_tensor_elements(self.spec, self.tp) if mode.offload_param != "none" else None
        if tensor is not None:
            live = max(tensor, min(live, DEEPSPEED_MAX_LIVE_PARAMETERS))
        if self.framework is not None:  # gathered in the profile's all-gather dtype (FSDP2: param_dtype)
            return live * self.framework.gather_bytes(3, self.train.dtype)
        return live * self.state_bytes[0]

    def bucket_bytes(self, mode: Mode) -> float:
        """DeepSpeed's gradient reduction bucket when the plan offloads (modes only DeepSpeed runs) or runs ZeRO-3
        under the deepspeed (or any) cost profile: one buffer of :func:`offload.reduce_bucket_elements` in the
        gradient dtype, under a cost profile its reduction dtype (the DeepSpeed backend emits that size for both).
        Source: DeepSpeed runtime/zero/stage3.py (``torch.empty(reduce_bucket_size)`` per gradient dtype)."""
        if mode.zero_stage == 0 or not (mode.offloads or (mode.zero_stage == 3 and self._deepspeed_zero3_bucket)):
            return 0.0
        elem = (self.framework.reduce_bytes(mode.zero_stage, self.train.dtype) if self.framework is not None
                else self._states(mode)[1])
        return offload.reduce_bucket_elements(self.spec, self.tp) * elem

    @property
    def _deepspeed_zero3_bucket(self) -> bool:
        """ZeRO-3 runs with the one-layer reduce bucket the DeepSpeed backend emits (deepspeed and any profiles)."""
        return self.framework is not None and self.framework.name in ("deepspeed", "any")

    def _states(self, mode: Mode) -> tuple[float, float, float]:
        """(parameter, gradient, optimizer) bytes per parameter under ``mode``: the backend profile's for its ZeRO
        stage (``BackendCostProfile.states``), else :func:`state_bytes_per_param`."""
        if self.framework is not None:
            return self.framework.states(mode.zero_stage, self.train.dtype)
        return self.state_bytes

    def _coll(self, op: str, n_bytes: float, expert: bool = False) -> float:
        if expert:  # over the expert-data-parallel group (moe.expert_data_parallel_size)
            return collective_time_s(self.cluster, op, n_bytes, self.edp, self.edp_spans,  # type: ignore[arg-type]
                                     self.edp_per_node)
        return self._ct(op, n_bytes, self.dp_shard, self.dp_spans, self.dp_per_node)

    def comm_times(self, mode: Mode, n_params: float, n_expert: float = 0.0) -> tuple[float, float, float]:
        """(per micro-batch ZeRO traffic, per-step gradient reduction, per-step parameter gather) for a stage
        holding ``n_params`` per device (and ``n_expert`` routed-expert parameters, whose collectives run over the
        expert-data-parallel group after the dense ones: Megatron-Core's expert gradient buffers), before overlap.

        Formula: ZeRO-0: one gradient all-reduce per step; ZeRO-1: reduce-scatter + all-gather per step (same
            volume); ZeRO-2: a reduce-scatter per micro-batch + one all-gather per step; ZeRO-3: per micro-batch two
            parameter all-gathers (forward, backward) and one gradient reduce-scatter.
        Source: Rajbhandari et al. 2020 sec. 7 (2 Psi for DP/ZeRO-1/2, 3 Psi for ZeRO-3 per forward/backward);
            ../shared/FORMULAS.md on gradient accumulation re-gathering under ZeRO-3.
        """
        if self.framework is not None:
            return self._profile_comm_times(mode, n_params)
        p_b, g_b, _ = self.state_bytes
        out = (0.0, 0.0, 0.0)
        for n, expert in ((n_params, False), (n_expert, True)):
            if not n:
                continue
            grads, params = n * g_b, n * p_b
            if mode.zero_stage == 0:
                times = (0.0, self._coll("all_reduce", grads, expert), 0.0)
            else:
                rs, ag = self._coll("reduce_scatter", grads, expert), self._coll("all_gather", params, expert)
                times = {1: (0.0, rs, ag), 2: (rs, 0.0, ag)}.get(mode.zero_stage, (2 * ag + rs, 0.0, 0.0))
            out = (out[0] + times[0], out[1] + times[1], out[2] + times[2])
        return out

    def _bucketed_s(self, op: str, n_elements: float, elem_bytes: float, bucket: float) -> float:
        """``k`` collectives over the dp group moving ``n_elements`` in buckets of ``bucket`` elements,
        ``k = max(1, n / bucket)`` (fractional: a stage's share of the buckets it fills), each paying its latency."""
        if n_elements <= 0:
            return 0.0
        k = max(1.0, n_elements / bucket)
        return k * self._coll(op, n_elements * elem_bytes / k)

    def framework_overhead(self, mechanism: Literal["tp", "zero3"]) -> float:
        """Seconds per tp block per micro-batch (``"tp"``) or per ZeRO-3 fetch (``"zero3"``) of framework work the
        cost model adds: a calibration's value (``ModelProfile.tp_block_overhead_s`` / ``zero3_fetch_overhead_s``),
        else derived from what `paraplan profile` timed for the backend (``ModelProfile.backend_overheads``), else
        0; under ``any`` the larger of the torch and DeepSpeed ones (as ``backend_profiles._worst``).

        Formula (derived; ``n`` blocks per timed pass, priced on this cluster at the timed micro-batch):
            tp:    max(0, tp_extra_s / n - the block's priced tp collectives at tp = 2)
            zero3: max(0, (zero3_extra_s / n - the block's priced ZeRO-3 traffic at dp = 2) / (2 x fetch units))
        i.e. what the pass took beyond what this model already prices for it, so links re-fitted by a calibration
        leave the measured total as it was (Assumption: the overhead per block does not change with tp, dp or the
        micro-batch).
        """
        if self.profile is None:
            return 0.0
        set_value = self.profile.tp_block_overhead_s if mechanism == "tp" else self.profile.zero3_fetch_overhead_s
        if set_value is not None:
            return set_value
        name = self.framework.name if self.framework is not None else None
        if name == "any":
            return max(self._measured_overhead(mechanism, "torch"), self._measured_overhead(mechanism, "deepspeed"))
        return self._measured_overhead(mechanism, name)

    def _measured_overhead(self, mechanism: str, backend: str | None) -> float:
        assert self.profile is not None
        measured = self.profile.backend_overheads.get(backend or "")
        extra = None if measured is None else (measured.tp_extra_s if mechanism == "tp" else measured.zero3_extra_s)
        if extra is None or self.cluster.devices_per_node * self.cluster.nodes < 2:
            return 0.0
        key = (mechanism, backend)
        cache = self.__dict__.setdefault("_measured_overheads", {})
        if key not in cache:
            b = measured.micro_batch_size
            bare = self.profile.model_copy(update={"tp_block_overhead_s": 0.0, "zero3_fetch_overhead_s": 0.0})
            train = TrainSpec(global_batch=2 * b, seq_len=self.train.seq_len, dtype=self.train.dtype)
            opts = CostOptions(backend=backend)
            if mechanism == "tp":
                c = CandidateCosts(self.spec, self.cluster, train, 1, 2, 1, b, bare, opts)
                cache[key] = max(0.0, extra / measured.blocks - (c.block.tp_fwd_s + c.block.tp_bwd_s))
            else:
                c = CandidateCosts(self.spec, self.cluster, train, 2, 1, 1, b, bare, opts)
                units = len(block_fetch_elements(self.layer_spec, c.framework.zero3_fetch))  # type: ignore[union-attr]
                priced = c.comm_times(Mode(3, "none", "none", 1.0), c.block.params)[0]
                cache[key] = max(0.0, (extra / measured.blocks - priced) / (2 * units))
        return cache[key]

    def _profile_comm_times(self, mode: Mode, n_params: float) -> tuple[float, float, float]:
        """:meth:`comm_times` under a backend cost profile (``self.framework``).

        Formula: element sizes from the profile (``grad_reduce_bytes``, ``param_gather_bytes``); each reduction
            runs per gradient bucket (:meth:`_bucketed_s`, one latency per bucket); ZeRO-1 reduces with the
            profile's collective (a full all-reduce under DeepSpeed's BF16_Optimizer and torch's
            ZeroRedundancyOptimizer); ZeRO-3 gathers each block's parameters per fetch unit
            (``block_fetch_elements``: per tensor, module or block), forward and backward, every micro-batch, so a
            stage of ``x`` parameters pays ``(x / block params) x sum over the block's units of an all-gather``,
            and reduce-scatters the gradients per block ("block" fetching: FSDP2 reduce-scatters each
            ``fully_shard`` unit) or per bucket. Each fetch also takes the profile's ZeRO-3 fetch overhead
            (hooks and coordination beyond the all-gather; :meth:`framework_overhead`).
        Source: backend_profiles.PROFILES (each field's framework file); comm.collective_time_s.
        Assumption: the embedding and head are fetched in units as a block's (a few more latencies than one
            gather each; they are 2 of L + 2 layers).
        """
        fw, dtype, z = self.framework, self.train.dtype, mode.zero_stage
        assert fw is not None
        r_b, a_b = fw.reduce_bytes(z, dtype), fw.gather_bytes(z, dtype)
        bucket = fw.bucket_elements(self.dp_shard)
        if z == 0:
            return 0.0, self._bucketed_s("all_reduce", n_params, r_b, bucket), 0.0
        if z in (1, 2):
            op = "all_reduce" if z == 1 and fw.zero1_grad_collective == "all_reduce" else "reduce_scatter"
            reduce = self._bucketed_s(op, n_params, r_b, bucket)
            # ZeroRedundancyOptimizer broadcasts each rank's updated parameters: the volume of an all-gather.
            gather = self._bucketed_s("all_gather", n_params, a_b, bucket)
            return (reduce, 0.0, gather) if z == 2 else (0.0, reduce, gather)
        per_block = max(self.block.params, 1.0)
        units = block_fetch_elements(self.layer_spec, fw.zero3_fetch)
        scale = per_block / max(sum(units), 1.0)  # tp shards every unit (as block.params is per tp rank)
        block_gather = sum(self._coll("all_gather", u * scale * a_b) for u in units)
        if fw.zero3_fetch == "block":
            rs = n_params / per_block * self._coll("reduce_scatter", per_block * r_b)
        else:  # DeepSpeed ZeRO-3 reduces in the one-layer buckets the backend emits (bucket_bytes)
            if self._deepspeed_zero3_bucket:
                bucket = min(bucket, offload.reduce_bucket_elements(self.spec, self.tp))
            rs = self._bucketed_s("reduce_scatter", n_params, r_b, bucket)
        block_gather += len(units) * self.framework_overhead("zero3")
        return 2 * n_params / per_block * block_gather + rs, 0.0, 0.0

    def optimizer_times(self, mode: Mode, n_params: float, n_expert: float = 0.0) -> tuple[float, float]:
        """(device optimizer step, offload work) per step, seconds, of a stage holding ``n_params`` per device
        (and ``n_expert`` routed-expert parameters, their optimizer sharded over edp; never offloaded).

        Formula: device: ``n_dev (param + grad + 2 x optimizer bytes) / (memory bandwidth x efficiency)`` for the
            ``n_dev`` parameters whose optimizer stays (reads and writes of every state). Offloaded share
            ``n_off``: CPU Adam ``n_off / (cpu_adam_rate / devices per node)``; the updated parameters back to the
            device, ``n_off x param bytes / PCIe`` (none when the parameters live on the host: they are updated in
            place); with the optimizer on NVMe, its 12 bytes per parameter read and written once,
            ``2 x 12 n_off / (NVMe bandwidth / devices per node)``; with the parameters on NVMe, the updated
            partition written back, ``param bytes x n_off / (NVMe / devices per node)``. Not overlapped with each
            other (DeepSpeed's default ``pipeline_read/pipeline_write: false``) nor with compute (the step follows
            the backward).
        Source: ZeRO-Offload (Ren et al. 2021) sec. 4.1 (CPU Adam; fp16 parameters copied back); ZeRO-Infinity
            (Rajbhandari et al. 2021) sec. 6.3 (optimizer states swapped from NVMe per step); the node's NVMe
            and CPU are shared by its devices (assumption: evenly).
        """
        p_b, g_b, o_b = self._states(mode)
        n_opt = n_params / (self.dp_shard if mode.zero_stage >= 1 else 1)
        n_opt += n_expert / (self.edp if mode.zero_stage >= 1 else 1)
        c = self.cluster
        n_off = n_opt * mode.ratio if mode.offload_optimizer != "none" else 0.0
        device = eff.memory_time_s(c.device, (n_opt - n_off) * (p_b + g_b + 2 * o_b)) if n_opt > n_off else 0.0
        if self.framework is not None and self.framework.grad_passes_per_step:
            # The profile's passes over the gradients it holds (norm, zeroing): backend_profiles.
            n_grad = n_params / (self.dp_shard if mode.zero_stage >= 2 else 1)
            device += eff.memory_time_s(c.device, self.framework.grad_passes_per_step * n_grad * g_b)
        if not n_off:
            return device, 0.0
        per_dev = c.devices_per_node
        off = n_off / (c.cpu_adam_params_per_s / per_dev)
        if mode.offload_param == "none":
            off += self._pcie_s(n_off * p_b)
        nvme_bw = c.nvme_bandwidth_bytes_per_s / per_dev
        if mode.offload_optimizer == "nvme":
            off += 2 * OFFLOAD_MASTER_ADAM_BYTES * n_off / nvme_bw
        if mode.offload_param == "nvme":
            off += n_off * p_b / nvme_bw
        return device, off

    def tied_embedding_sync_s(self, stage: int) -> float:
        """Per step, on the first and last pipeline stage: the all-reduce that keeps tied input and output
        embeddings equal when they sit on different stages (backend profiles with ``tied_embedding_sync``).

        Formula: all-reduce over 2 ranks of ``v_pad h / tp`` gradient elements in the profile's reduction dtype,
            across nodes when pipeline neighbours are; never hidden (it runs after the backward, before the step);
            0 for untied embeddings, pp = 1, ZB-V (embedding and head both on rank 0) or without a profile.
        Source: Megatron-LM megatron/core/distributed/finalize_model_grads.py ``_allreduce_word_embedding_grads``;
            DeepSpeed runtime/pipe/engine.py ``_exec_reduce_tied_grads``.
        """
        fw = self.framework
        if (fw is None or not fw.tied_embedding_sync or not self.spec.tied_embeddings or self.pp == 1
                or self.schedule == "zbv" or stage not in (0, self.pp - 1)):
            return 0.0
        elements = tf.padded_vocab(self.layer_spec, self.tp) * (self.spec.hidden or 0) / self.tp
        return self._ct("all_reduce", elements * fw.reduce_bytes(0, self.train.dtype), 2, self.pp_spans)

    def _pcie_s(self, n_bytes: float) -> float:
        """Host<->device copy time of ``n_bytes`` over one device's PCIe link, one direction; 0 on a CPU cluster
        (the device is the host). Assumptions: each GPU has its own x16 link to the host (DGX H100: one PCIe Gen5
        switch port per GPU); pinned copies reach :data:`comm.LINK_EFFICIENCY` of the datasheet rate, as the
        collectives' links do."""
        if self.cluster.device.kind == "cpu":
            return 0.0
        return n_bytes / (self.cluster.pcie_bandwidth_bytes_per_s * LINK_EFFICIENCY)

    def transfer_times(self, mode: Mode, n_params: float) -> tuple[float, float, float]:
        """(host->device, device->host, NVMe) seconds per micro-batch of the offloaded model states of a stage
        holding ``n_params`` per device.

        Formula: parameters off the device (ZeRO-3) are fetched for the forward and again for the backward:
            ``2 x param bytes x n / d`` host->device per micro-batch, and read from NVMe as often when they live
            there (``/ (NVMe bandwidth / devices per node)``); with the optimizer offloaded, each micro-batch's
            reduced gradient partition goes device->host (``ratio x grad bytes x n / d``) to be accumulated there.
            These transfers run beside compute (the stage time is the max; module docstring).
        Source: ZeRO-Infinity (Rajbhandari et al. 2021) sec. 6 (overlap-centric design: NVMe->CPU, CPU->GPU and
            GPU compute overlapped by prefetching) and sec. 5.1; ZeRO-Offload sec. 4.1 (gradients offloaded in the
            backward, overlapped with it); FORMULAS.md on ZeRO-3 re-gathering every micro-batch.
        """
        p_b, g_b, _ = self._states(mode)
        d = self.dp_shard
        h2d = d2h = disk = 0.0
        if mode.offload_param != "none":
            fetch = 2 * n_params * p_b / d
            h2d += self._pcie_s(fetch)
            if mode.offload_param == "nvme":
                disk += fetch / (self.cluster.nvme_bandwidth_bytes_per_s / self.cluster.devices_per_node)
        if mode.offload_optimizer != "none":
            d2h += self._pcie_s(mode.ratio * n_params * g_b / (d if mode.zero_stage >= 1 else 1))
        return h2d, d2h, disk

    def paging_costs(self) -> tuple[float, float, float, float, float]:
        """Per paged block and micro-batch: (host->device s, device->host s, disk s) and the (host, NVMe) bytes it
        occupies per micro-batch in flight.

        Formula: a paged block's saved activations ``A`` (``block.act_bytes``) go out during its forward and come
            back for its backward: on GPUs ``A / PCIe`` each way into host memory; on CPU clusters (the device is
            host memory) to a file on disk, ``2 A / (NVMe bandwidth / processes per node)`` (write + read).
            Overlapped with compute on GPUs (copies on their own stream, prefetched one block ahead: the stage's
            recomputation working space holds it), synchronous on CPU clusters (the hooks run on the cores that
            compute).
        Source: POET (Patil et al. 2022) sec. 3 (paging costs a transfer each way per activation); torch
            ``autograd.graph.save_on_cpu`` / ``saved_tensors_hooks``; ../shared/PLATFORM.md (paging to disk on this
            machine: +15-30% time).
        """
        act = self.block.act_bytes
        if self.cluster.device.kind == "cpu":
            disk_bw = self.cluster.nvme_bandwidth_bytes_per_s / self.cluster.devices_per_node
            return 0.0, 0.0, 2 * act / disk_bw, 0.0, act
        return self._pcie_s(act), self._pcie_s(act), 0.0, act, 0.0

    def mode_terms(self, stage: int, mode: Mode) -> ModeTerms:
        """The mode-dependent terms of a stage, affine in its block count (each quantity is linear in the stage's
        parameters ``n * block.params + fixed``, so two evaluations fix it exactly). Memoized: they depend only on
        the stage's fixed parameters and the mode."""
        key = ("mode", self.tp, self.dp_shard, self.stage_params(stage, 0), mode, self.ep, self.etp, self.edp,
               self.options.backend, self.tied_embedding_sync_s(stage), self.pp if self.framework else 0)
        if key not in self.shared:
            self.shared[key] = self._compute_mode_terms(stage, mode)
        return self.shared[key]

    def _compute_mode_terms(self, stage: int, mode: Mode) -> ModeTerms:
        # Each term is linear in the stage's dense and expert parameters, which are affine in (n, d): evaluating it
        # at (n, d) = (0, 0), (1, 0) and (1, 1) fixes it exactly.
        # Under a backend profile the bucketed reductions are linear only beyond one bucket: the per-block
        # coefficient is then the secant over a stage's even share of the blocks (exact for linear terms).
        span = max(1, (self.spec.n_layers or 1) // self.pp) if self.framework is not None else 1
        at = [(self.stage_params(stage, n, d), self.stage_expert_params(n, d))
              for n, d in ((0, 0), (span, 0), (span, 1))]

        def affine(fn) -> Affine:
            v0, v1 = fn(*at[0]), fn(*at[1])
            return Affine(v0, (v1 - v0) / span, per_dense=fn(*at[2]) - v1 if self.dense_block is not None else 0.0)

        other = Affine(self.overhead_bytes + self.zero3_working_bytes(mode) + self.bucket_bytes(mode))
        host = affine(lambda x, e: self.state_memory(mode, x, e)[3])
        if self.cluster.device.kind == "cpu":
            # A CPU process's "device" memory is host memory: what an offload keeps on the host (gradient
            # partitions, swap buffers) counts against it.
            other, host = Affine(other.const + host.const, host.per_block), Affine()
        return ModeTerms(
            params=affine(lambda x, e: self.state_memory(mode, x, e)[0]),
            grads=affine(lambda x, e: self.state_memory(mode, x, e)[1]),
            optimizer=affine(lambda x, e: self.state_memory(mode, x, e)[2]),
            host=host,
            nvme=affine(lambda x, e: self.state_memory(mode, x, e)[4]),
            other=other,
            zero_comm=affine(lambda x, e: self.comm_times(mode, x, e)[0]),
            grad_reduce=affine(lambda x, e: self.comm_times(mode, x, e)[1]),
            param_gather=affine(lambda x, e: self.comm_times(mode, x, e)[2]),
            optimizer_s=affine(lambda x, e: self.optimizer_times(mode, x, e)[0] + self.tied_embedding_sync_s(stage)),
            offload_s=affine(lambda x, e: self.optimizer_times(mode, x, e)[1]),
            h2d_s=affine(lambda x, e: self.transfer_times(mode, x)[0]),
            d2h_s=affine(lambda x, e: self.transfer_times(mode, x)[1]),
            disk_s=affine(lambda x, e: self.transfer_times(mode, x)[2]),
            expert_params=affine(lambda x, e: self.expert_state_memory(mode, e)[0]),
            expert_grads=affine(lambda x, e: self.expert_state_memory(mode, e)[1]),
            expert_optimizer=affine(lambda x, e: self.expert_state_memory(mode, e)[2]),
        )

    def stage_cost(self, stage: int, n_blocks: int, recompute_blocks: int, mode: Mode,
                   selective_blocks: int = 0, paged_blocks: int = 0, dense_blocks: int = 0) -> StageCost:
        """Time and memory of stage ``stage`` holding ``n_blocks`` blocks, ``recompute_blocks`` of them recomputed in
        full, ``selective_blocks`` selectively and ``paged_blocks`` with their activations paged out; in an MoE
        model ``dense_blocks`` of them are its dense blocks (:meth:`dense_blocks_per_stage`).

        Stage time per micro-batch: with overlap the max of compute, ZeRO traffic, host->device, device->host and
        NVMe transfers (:meth:`transfer_times`, :meth:`paging_costs`: ZeRO-Infinity's prefetching puts each on its
        own channel), else their sum.
        """
        n, r, q, a, d = n_blocks, recompute_blocks, selective_blocks, paged_blocks, dense_blocks
        terms = self.mode_terms(stage, mode)
        h2d_a, d2h_a, disk_a, host_a, nvme_a = self.paging_costs()

        def of(term: Affine) -> float:  # a mode term at this stage's block counts
            return term(n, d=d)

        channels = (("compute", self.compute_terms(stage)(n, r, q, d=d)), ("ZeRO traffic", of(terms.zero_comm)),
                    ("host->device", of(terms.h2d_s) + a * h2d_a), ("device->host", of(terms.d2h_s) + a * d2h_a),
                    ("NVMe", of(terms.disk_s) + a * disk_a))
        grad_reduce, gather = of(terms.grad_reduce), of(terms.param_gather)
        if self.options.overlap_dp:
            t = max(x for _, x in channels)
            dp_s = max(0.0, grad_reduce - self.backward_terms(stage)(n, r, q, d=d))
            dp_s += max(0.0, gather - self.forward_terms(stage)(n, r, d=d))
        else:
            t = sum(x for _, x in channels)
            dp_s = grad_reduce + gather
        opt_s, off_s = of(terms.optimizer_s), of(terms.offload_s)
        act = self.stage_activation_bytes(stage, n, r, q, a)
        k = self.inflight(stage)
        return StageCost(
            time_per_micro_batch_s=t, step_extra_s=dp_s + opt_s + off_s, dp_comm_s=dp_s, optimizer_s=opt_s,
            offload_s=off_s, params_bytes=of(terms.params), grads_bytes=of(terms.grads),
            optimizer_bytes=of(terms.optimizer), activation_bytes=act, other_bytes=of(terms.other),  # incl. host (CPU)
            host_bytes=of(terms.host) + a * k * host_a, nvme_bytes=of(terms.nvme) + a * k * nvme_a,
            channels_s=channels, expert_params_bytes=of(terms.expert_params),
            expert_grads_bytes=of(terms.expert_grads), expert_optimizer_bytes=of(terms.expert_optimizer),
        )

    def stage_memory_bytes(self, stage: int, n_blocks: int, recompute_blocks: int, mode: Mode,
                           selective_blocks: int = 0, paged_blocks: int = 0, dense_blocks: int = 0) -> float:
        """Peak memory per device of a stage: ``stage_cost(...).memory_bytes`` without computing its times (the
        planner's memory lower bound evaluates it thousands of times).

        Formula: model states of the stage's parameters under the mode (:meth:`state_memory`) + activations
            (:meth:`stage_activation_bytes`) + overhead + ZeRO-3 gather buffers.
        """
        params, grads, optim, host, _ = self.state_memory(mode, self.stage_params(stage, n_blocks, dense_blocks),
                                                          self.stage_expert_params(n_blocks, dense_blocks))
        act = self.stage_activation_bytes(stage, n_blocks, recompute_blocks, selective_blocks, paged_blocks)
        shared = host if self.cluster.device.kind == "cpu" else 0.0  # a CPU process's host bytes are its memory
        return (params + grads + optim + act + shared + self.overhead_bytes + self.zero3_working_bytes(mode)
                + self.bucket_bytes(mode))

    def stage_activation_bytes(self, stage: int, n_blocks: int, recompute_blocks: int,
                               selective_blocks: int = 0, paged_blocks: int = 0) -> float:
        """Activations held at the stage's peak: :meth:`activation_terms`, plus one block's full activations as
        working space while any block is recomputed, fully or selectively, or paged back in (the MILP's flag; an
        upper bound for selective blocks, which rebuild only part of it)."""
        busy = recompute_blocks + selective_blocks + paged_blocks > 0
        return (self.activation_terms(stage)(n_blocks, recompute_blocks, selective_blocks, paged_blocks)
                + (self.block.act_bytes if busy else 0.0))

    def model_flops_per_step(self) -> float:
        """Model FLOPs of one step (Korthikanti et al. 2022 eq. 7 form; see transformer.model_flops_per_step).

        A factory model counts its profiled forward + backward FLOPs (torch.utils.flop_counter) per micro-batch.
        """
        if self.spec.family == "custom" and self.profile is not None:
            def flops(kind: LayerKind) -> float:
                lp = self.profile.layer(kind, self.b)  # type: ignore[union-attr]
                return lp.fwd_flops + lp.bwd_flops

            per_mb = flops("embed") + (self.spec.n_layers or 0) * flops("block") + flops("head")
            return per_mb * self.train.global_batch / self.b
        if self.spec.moe is not None:  # active parameters' FLOPs (moe.model_flops_per_token, full s x s square)
            from paraplan.cost_models import moe as moe_costs

            tokens = self.train.global_batch * self.train.seq_len
            return moe_costs.model_flops_per_token(self.spec, self.train.seq_len) * tokens
        return tf.model_flops_per_step(self.spec, self.train.global_batch, self.train.seq_len)


def pipeline_time_s(m: int, bubble_weight: float, times: list[float]) -> float:
    """Forward + backward of ``m`` micro-batches through stages taking ``times`` each per micro-batch.

    Formula: ``m max_s t_s + w (sum_s t_s - max_s t_s)`` with ``w`` from :meth:`CandidateCosts.bubble_weight`
        (``1/v`` for 1F1B): equal stages give ``(m + (p - 1)/v) t``.
    Source: Narayanan et al. SC'21 sec. 2.2.1 (GPipe and 1F1B both ``(m + p - 1) t``) and 2.2.2 (interleaved:
        bubble / v); Qi et al. 2024 for the zero-bubble weights.
    """
    slowest = max(times)
    return m * slowest + (sum(times) - slowest) * bubble_weight


def step_time_s(costs: CandidateCosts, stages: list[StageCost]) -> tuple[float, float, float]:
    """(step time, pipeline compute incl. bubble, bubble) from per-stage costs.

    Formula: :func:`pipeline_time_s` ``+ max_s extra_s``; bubble = that pipeline part minus ``m mean_s t_s``.
    Source: Narayanan et al. SC'21 sec. 2.2; exact for 1F1B when every stage has the same fwd/bwd ratio.
    """
    times = [st.time_per_micro_batch_s for st in stages]
    pipe = pipeline_time_s(costs.m, costs.bubble_weight(), times)
    bubble = pipe - costs.m * sum(times) / len(times)
    return pipe + max(st.step_extra_s for st in stages), pipe, bubble


def binding_limit(costs: CandidateCosts, stage_costs: list[StageCost]) -> str:
    """What limits a plan: a capacity it fills to within 3% (device memory, host memory, NVMe), else the channel
    that sets the slowest stage's time when it is not compute (host<->device, NVMe, ZeRO traffic), else offload
    work that dominates the per-step extra; "compute" otherwise."""
    usable = costs.usable_capacity_bytes
    out = []
    for what, used, cap in (("device memory", max(sc.memory_bytes for sc in stage_costs), usable),
                            ("host memory", max(sc.host_bytes for sc in stage_costs), costs.host_capacity_bytes),
                            ("NVMe capacity", max(sc.nvme_bytes for sc in stage_costs), costs.nvme_capacity_bytes)):
        if cap > 0 and used >= 0.97 * cap:
            out.append(f"{what} ({used / cap:.0%} of {cap / GiB:,.0f} GiB per device)")
    slowest = max(stage_costs, key=lambda sc: sc.time_per_micro_batch_s)
    if slowest.channels_s:
        what, secs = max(slowest.channels_s, key=lambda kv: kv[1])
        if what != "compute" and secs > 0:
            out.append(f"{what} bandwidth (sets the stage time)")
    extra = max(stage_costs, key=lambda sc: sc.step_extra_s)
    if extra.offload_s > 0.5 * extra.step_extra_s and extra.offload_s > 0:
        out.append(f"offloaded optimizer step ({extra.offload_s:.3g} s per step)")
    return "; ".join(out) or "compute"


def predict(costs: CandidateCosts, stage_costs: list[StageCost]) -> Prediction:
    """Assemble the Prediction of a strategy from its stage costs (the same numbers the MILP optimized).

    Peak memory and its breakdown are the most loaded stage's; the per-step extras are the slowest stage's; MFU is
    model FLOPs per step / (step time x devices x dense peak).
    """
    step, pipe, bubble = step_time_s(costs, stage_costs)
    worst = max(stage_costs, key=lambda sc: sc.memory_bytes)
    slowest_extra = max(stage_costs, key=lambda sc: sc.step_extra_s)
    flops = costs.model_flops_per_step()
    world = costs.dp * costs.tp * costs.pp * costs.cp
    peak = costs.cluster.device.peak_flops_per_s[costs.train.dtype]
    return Prediction(
        step_time_s=step, compute_s=pipe, bubble_s=bubble, dp_comm_s=slowest_extra.dp_comm_s,
        offload_s=slowest_extra.offload_s, optimizer_s=slowest_extra.optimizer_s,
        peak_memory_bytes=worst.memory_bytes, memory_capacity_bytes=costs.capacity_bytes,
        memory_breakdown_bytes=worst.breakdown(), host_bytes=max(sc.host_bytes for sc in stage_costs),
        nvme_bytes=max(sc.nvme_bytes for sc in stage_costs), binding=binding_limit(costs, stage_costs),
        tokens_per_s=costs.train.global_batch * costs.train.seq_len / step,
        model_flops_per_step=flops, mfu=flops / (step * world * peak),
        compute_source=costs.compute_source,  # type: ignore[arg-type]
    )
