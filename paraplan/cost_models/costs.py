"""Per-candidate cost coefficients: what one layer, one stage and one optimizer step cost under (dp, tp, pp, b).

Both the MILP (``paraplan.planner.milp``) and the evaluator (:func:`estimate_stages`) use these numbers, so a plan's
reported prediction is exactly the objective the solver minimized. Every quantity that depends on the number of
parameters of a stage is affine in it (``const + slope * n_params``), which keeps the MILP linear.

Step time (Narayanan et al. SC'21 sec. 2.2.1; Alpa/Mist's form for unequal stages):
    ``T_step = (m - 1) max_s t_s + sum_s t_s + max_s (dp_comm_s + optimizer_s + offload_s)``
where ``t_s`` is stage s's forward + backward (+ recompute, TP collectives, pipeline p2p) time per micro-batch and
``m`` the micro-batches per step. Assumption: data-parallel gradient communication is not overlapped with the
backward pass (conservative; DeepSpeed and Megatron overlap part of it).
"""

from __future__ import annotations

from dataclasses import dataclass

from paraplan.cost_models import transformer as tf
from paraplan.cost_models.comm import collective_time_s, dp_spans_nodes, pp_spans_nodes
from paraplan.errors import ProfileError
from paraplan.types import DTYPE_BYTES, ClusterSpec, LayerKind, ModelProfile, ModelSpec, TrainSpec
from paraplan.units import GiB

# Fraction of the dense peak that a transformer layer's GEMMs reach on a GPU, used when no profile is given.
# Assumption: Megatron-LM reaches 44-52% of peak end to end on A100 including communication and bubbles
# (Narayanan et al. SC'21 Table 1), so the layer compute alone runs near 60%.
MATMUL_EFFICIENCY = {"cuda": 0.6, "cpu": 0.6}
# Achieved fraction of device memory bandwidth for the (memory-bound) optimizer step and embedding.
MEMORY_BW_EFFICIENCY = 0.8
# Memory that is neither model states nor activations: CUDA context, cuBLAS/NCCL workspaces and allocator
# fragmentation on GPUs; Python, libtorch and the data on a CPU process. Assumption, stated not measured.
OVERHEAD_BYTES = {"cuda": 2.0 * GiB, "cpu": 0.6 * GiB}


@dataclass(frozen=True)
class Mode:
    """How model states are kept: ZeRO stage (Rajbhandari et al. 2020) and optimizer offload to host memory."""

    zero_stage: int
    offload_optimizer: bool

    @property
    def label(self) -> str:
        return f"zero{self.zero_stage}" + ("+offload" if self.offload_optimizer else "")


@dataclass(frozen=True)
class LayerCost:
    """One layer for one micro-batch on one device (already divided by tp)."""

    fwd_s: float
    bwd_s: float
    tp_fwd_s: float
    tp_bwd_s: float
    params: float
    act_bytes: float
    ckpt_bytes: float
    fwd_flops: float


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
    host_bytes: float

    @property
    def memory_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes + self.other_bytes


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
        dp, tp, pp: parallel degrees; ``micro_batch_size`` b; m = global_batch / (dp b) micro-batches per step.
        profile: measured per-layer times (compute_source "profile"), else FLOPs / (peak x efficiency).

    Raises:
        ProfileError: the profile lacks this micro-batch size, or was taken for another sequence length or model.
    """

    def __init__(
        self, spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, dp: int, tp: int, pp: int,
        micro_batch_size: int, profile: ModelProfile | None = None,
    ) -> None:
        self.spec, self.cluster, self.train = spec, cluster, train
        self.dp, self.tp, self.pp, self.b = dp, tp, pp, micro_batch_size
        self.m = train.global_batch // (dp * micro_batch_size)
        self.dtype_bytes = DTYPE_BYTES[train.dtype]
        self.state_bytes = state_bytes_per_param(train.dtype)
        self.profile = profile
        self.compute_source = "profile" if profile is not None else "analytic"
        self.block = self._layer("block")
        self.embed = self._layer("embed")
        self.head = self._layer("head")
        s, h = train.seq_len, spec.hidden or 0
        boundary = micro_batch_size * s * h * self.dtype_bytes
        spans = pp_spans_nodes(cluster, tp, dp)
        # Forward activation out and gradient back, per boundary a stage touches (Narayanan SC'21 sec. 2.2).
        self.p2p_s = 2 * collective_time_s(cluster, "p2p", boundary, 2, spans) if pp > 1 else 0.0
        self.dp_spans = dp_spans_nodes(cluster, tp, dp)
        self.capacity_bytes = cluster.device.memory_bytes
        self.host_capacity_bytes = cluster.host_memory_bytes / cluster.devices_per_node
        self.overhead_bytes = OVERHEAD_BYTES[cluster.device.kind]

    # ---- layers -------------------------------------------------------------------------------------------------
    def _layer(self, kind: LayerKind) -> LayerCost:
        spec, t, b, s = self.spec, self.tp, self.b, self.train.seq_len
        db = self.dtype_bytes
        if kind == "block":
            params = tf.block_params(spec) / t
            flops = tf.block_fwd_flops(spec, b, s) / t
            act = tf.block_activation_bytes(spec, b, s, t, db)
            ckpt = tf.block_input_bytes(spec, b, s, db)
            n_ar = 2  # Megatron TP: two all-reduces forward and two backward per block (Shoeybi et al. sec. 3)
        elif kind == "head":
            params = tf.head_params(spec) / t  # vocabulary-parallel LM head (Megatron-LM)
            flops = tf.head_fwd_flops(spec, b, s) / t
            act = ckpt = tf.head_activation_bytes(spec, b, s, t, db)
            n_ar = 0
        else:
            params = tf.embed_params(spec) / t  # vocabulary-parallel embedding: one all-reduce forward
            flops = 0.0
            act = ckpt = tf.embed_activation_bytes(spec, b, s)
            n_ar = 1
        fwd_s, bwd_s = self._times(kind, flops)
        ar = collective_time_s(self.cluster, "all_reduce", b * s * (spec.hidden or 0) * db, t, False)
        tp_bwd = n_ar * ar if kind == "block" else 0.0
        return LayerCost(fwd_s, bwd_s, n_ar * ar, tp_bwd, params, act, ckpt, flops)

    def _times(self, kind: LayerKind, flops: float) -> tuple[float, float]:
        if self.profile is not None:
            try:
                lp = self.profile.layer(kind, self.b)
            except KeyError:
                raise ProfileError(
                    f"profile has no micro-batch size {self.b}; profile with --micro-batches including {self.b} "
                    f"(it has {self.profile.micro_batch_sizes()})"
                ) from None
            scale = 1.0 if kind == "embed" else 1.0 / self.tp  # Assumption: TP splits block/head time evenly.
            return lp.fwd_time_s * scale, lp.bwd_time_s * scale
        dev = self.cluster.device
        peak = dev.peak_flops_per_s[self.train.dtype] * MATMUL_EFFICIENCY[dev.kind]
        if kind == "embed":  # memory-bound gather of b s rows of h
            moved = 2 * self.b * self.train.seq_len * (self.spec.hidden or 0) * self.dtype_bytes
            t = moved / (dev.memory_bandwidth_bytes_per_s * MEMORY_BW_EFFICIENCY)
            return t, 2 * t
        return flops / peak, 2 * flops / peak  # backward = 2 x forward FLOPs (Narayanan SC'21 sec. 5.1)

    # ---- stages -------------------------------------------------------------------------------------------------
    def inflight(self, stage: int) -> int:
        """Micro-batches whose activations stage ``stage`` holds at its peak under 1F1B: ``min(p - s, m)``.

        Source: Narayanan et al. SC'21 sec. 2.2.1; Megatron-LM schedules.py warm-up count.
        """
        return min(self.pp - stage, self.m)

    def fixed_layers(self, stage: int) -> list[LayerCost]:
        out = []
        if stage == 0:
            out.append(self.embed)
        if stage == self.pp - 1:
            out.append(self.head)
        return out

    def stage_params(self, stage: int, n_blocks: float) -> float:
        return n_blocks * self.block.params + sum(lc.params for lc in self.fixed_layers(stage))

    def state_memory(self, mode: Mode, n_params: float) -> tuple[float, float, float, float]:
        """(params, grads, optimizer) bytes on the device and optimizer bytes on the host, per device.

        Formula: ZeRO-1 divides optimizer states by dp, ZeRO-2 also gradients, ZeRO-3 also parameters.
            Offload moves the (sharded) optimizer states to host memory (ZeRO-Offload, Ren et al. 2021, sec. 4).
        Source: Rajbhandari et al. 2020, sec. 5 and Figure 1.
        """
        p_b, g_b, o_b = self.state_bytes
        d = self.dp
        params = n_params * p_b / (d if mode.zero_stage >= 3 else 1)
        grads = n_params * g_b / (d if mode.zero_stage >= 2 else 1)
        optim = n_params * o_b / (d if mode.zero_stage >= 1 else 1)
        if mode.offload_optimizer:
            return params, grads, 0.0, optim
        return params, grads, optim, 0.0

    def zero3_working_bytes(self, mode: Mode) -> float:
        """ZeRO-3 gathers the current and the prefetched layer in full: ``2 x largest layer`` parameter bytes."""
        if mode.zero_stage < 3:
            return 0.0
        largest = max(self.block.params, self.embed.params, self.head.params)
        return 2 * largest * self.state_bytes[0]

    def dp_comm_s(self, mode: Mode, n_params: float) -> float:
        """Data-parallel / ZeRO communication per step for a stage holding ``n_params`` per device.

        Formula: ZeRO-0: one all-reduce of the gradients; ZeRO-1: reduce-scatter + all-gather (same volume);
            ZeRO-2: a reduce-scatter per micro-batch + one all-gather; ZeRO-3: per micro-batch two parameter
            all-gathers (forward, backward) and one gradient reduce-scatter.
        Source: Rajbhandari et al. 2020 sec. 7 (2 Psi for DP/ZeRO-1/2, 3 Psi for ZeRO-3 per forward/backward);
            ../shared/FORMULAS.md on gradient accumulation re-gathering under ZeRO-3.
        """
        p_b, g_b, _ = self.state_bytes
        c, d, spans, m = self.cluster, self.dp, self.dp_spans, self.m
        grads, params = n_params * g_b, n_params * p_b
        if mode.zero_stage == 0:
            return collective_time_s(c, "all_reduce", grads, d, spans)
        rs = collective_time_s(c, "reduce_scatter", grads, d, spans)
        ag = collective_time_s(c, "all_gather", params, d, spans)
        if mode.zero_stage == 1:
            return rs + ag
        if mode.zero_stage == 2:
            return m * rs + ag
        return m * (2 * ag + rs)

    def optimizer_s(self, mode: Mode, n_params: float) -> float:
        """Optimizer step: memory-bound AdamW on the device, or CPU Adam plus PCIe transfers when offloaded.

        Formula: device: ``n_opt (param + grad + 2 x optimizer bytes) / (memory bandwidth x efficiency)`` (reads
            and writes of every state); offload: gradients down and parameters up over PCIe,
            ``n_opt (grad + param bytes) / pcie``, plus ``n_opt / (cpu_adam_rate / devices_per_node)``.
        Source: ZeRO-Offload (Ren et al. 2021, sec. 4.1: CPU Adam, 2 Psi fp16 gradients down and parameters up).
        """
        p_b, g_b, o_b = self.state_bytes
        n_opt = n_params / (self.dp if mode.zero_stage >= 1 else 1)
        c = self.cluster
        if mode.offload_optimizer:
            pcie = n_opt * (g_b + p_b) / c.pcie_bandwidth_bytes_per_s
            return pcie + n_opt / (c.cpu_adam_params_per_s / c.devices_per_node)
        moved = n_opt * (p_b + g_b + 2 * o_b)
        return moved / (c.device.memory_bandwidth_bytes_per_s * MEMORY_BW_EFFICIENCY)

    def stage_cost(self, stage: int, n_blocks: int, recompute_blocks: int, mode: Mode) -> StageCost:
        """Time and memory of stage ``stage`` holding ``n_blocks`` blocks, ``recompute_blocks`` of them recomputed."""
        blk, fixed = self.block, self.fixed_layers(stage)
        t = n_blocks * (blk.fwd_s + blk.bwd_s + blk.tp_fwd_s + blk.tp_bwd_s)
        t += recompute_blocks * (blk.fwd_s + blk.tp_fwd_s)
        t += sum(lc.fwd_s + lc.bwd_s + lc.tp_fwd_s + lc.tp_bwd_s for lc in fixed) + self.p2p_s
        n_params = self.stage_params(stage, n_blocks)
        params, grads, optim, host = self.state_memory(mode, n_params)
        per_mb = (n_blocks - recompute_blocks) * blk.act_bytes + recompute_blocks * blk.ckpt_bytes
        per_mb += sum(lc.act_bytes for lc in fixed)
        act = self.inflight(stage) * per_mb + (blk.act_bytes if recompute_blocks > 0 else 0.0)
        other = self.overhead_bytes + self.zero3_working_bytes(mode)
        dp_s = self.dp_comm_s(mode, n_params)
        opt_s = self.optimizer_s(mode, n_params)
        off_s = opt_s if mode.offload_optimizer else 0.0
        dev_opt_s = 0.0 if mode.offload_optimizer else opt_s
        return StageCost(t, dp_s + opt_s, dp_s, dev_opt_s, off_s, params, grads, optim, act, other, host)

    def model_flops_per_step(self) -> float:
        """Model FLOPs of one step (Korthikanti et al. 2022 eq. 7 form; see transformer.model_flops_per_step)."""
        return tf.model_flops_per_step(self.spec, self.train.global_batch, self.train.seq_len)


def step_time_s(costs: CandidateCosts, stages: list[StageCost]) -> tuple[float, float, float]:
    """(step time, pipeline compute incl. bubble, bubble) from per-stage costs.

    Formula: ``(m - 1) max_s t_s + sum_s t_s + max_s extra_s``; bubble = that pipeline part minus ``m mean_s t_s``.
    Source: Narayanan et al. SC'21 sec. 2.2.1; exact for 1F1B when every stage has the same fwd/bwd ratio.
    """
    times = [st.time_per_micro_batch_s for st in stages]
    pipe = (costs.m - 1) * max(times) + sum(times)
    bubble = pipe - costs.m * sum(times) / len(times)
    return pipe + max(st.step_extra_s for st in stages), pipe, bubble
