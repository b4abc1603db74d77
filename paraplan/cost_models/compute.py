"""Analytic compute time of one layer for one micro-batch on one device (used when no profile is given).

Each layer's work is split into GEMMs (on the device's efficiency curve), the attention core (flash or unfused) and
memory-bound element-wise kernels; see :mod:`paraplan.cost_models.efficiency` for the curves and their sources.
"""

from __future__ import annotations

from dataclasses import dataclass

from paraplan.cost_models import efficiency as eff
from paraplan.cost_models import transformer as tf
from paraplan.types import DTYPE_BYTES, DeviceSpec, ModelSpec

# Logit bytes moved by the cross-entropy per vocabulary entry and token: forward 4 passes over fp32 values (cast,
# max, exp-sum, log-softmax), backward 2 (softmax gradient, cast back). Assumption, counted from torch's and
# Megatron's vocab-parallel cross-entropy kernels.
CROSS_ENTROPY_BYTES = (16, 8)


@dataclass(frozen=True)
class KernelTimes:
    """Seconds per micro-batch: forward, backward, the attention core's forward (what selective recomputation
    repeats) and the forward GEMMs (equal to the weight-gradient GEMMs of the backward)."""

    fwd_s: float
    bwd_s: float
    attn_fwd_s: float
    gemm_fwd_s: float
    op_recompute_s: float = 0.0  # what torchtitan's op-level policy recomputes: k, o, up GEMMs + element-wise

    def scaled(self, factor: float) -> KernelTimes:
        return KernelTimes(self.fwd_s * factor, self.bwd_s * factor, self.attn_fwd_s * factor,
                           self.gemm_fwd_s * factor, self.op_recompute_s * factor)


def embed_times(spec: ModelSpec, dev: DeviceSpec, dtype: str, b: int, s: int) -> KernelTimes:
    """Memory-bound gather of ``b s`` rows of ``h`` (read and write); the backward scatter-adds them (2x)."""
    t = eff.memory_time_s(dev, 2 * b * s * (spec.hidden or 0) * DTYPE_BYTES[dtype])
    return KernelTimes(t, 2 * t, 0.0, 0.0)


def head_times(spec: ModelSpec, dev: DeviceSpec, dtype: str, b: int, s: int, t: int, sp: bool) -> KernelTimes:
    """Final norm, LM head GEMM ``(b s, h, v_pad/t)``, vocab-parallel cross-entropy over fp32 logits.

    Formula: forward ``t_gemm + t_norm + t_ce_fwd``, backward ``2 t_gemm + 2 t_norm + t_ce_bwd``
        (:data:`CROSS_ENTROPY_BYTES` per logit); the norm runs on ``1/t`` of the tokens under SP.
    """
    db, tokens, h = DTYPE_BYTES[dtype], b * s, spec.hidden or 0
    v_shard = tf.padded_vocab(spec, t) // t
    gemm = eff.gemm_time_s(dev, dtype, tokens, h, v_shard, db)
    norm = eff.memory_time_s(dev, 2 * h * db * tokens / (t if sp else 1))
    ce_fwd, ce_bwd = (eff.memory_time_s(dev, c * tokens * v_shard) for c in CROSS_ENTROPY_BYTES)
    return KernelTimes(gemm + norm + ce_fwd, 2 * gemm + 2 * norm + ce_bwd, 0.0, gemm)


def attention_times(spec: ModelSpec, dev: DeviceSpec, dtype: str, b: int, s: int, t: int,
                    kernel: str) -> tuple[float, float]:
    """(forward, backward) seconds of the attention core on one tp rank.

    Formula: flash kernels run ``2 b s^2 h / t`` actual (causal, masked half skipped) forward FLOPs and 2.5x that
        backward at the device's attention fraction; unfused runs the full ``4 b s^2 h / t`` as batched GEMMs (two
        forward, four backward, each ``max(compute, 2 bytes x scores)``) plus the softmax/dropout traffic of
        ``transformer.attention_score_bytes`` less the bytes charged to the batched GEMMs (approximate).
    Source: Dao 2023 (FlashAttention-2) sec. 4 FLOP conventions; Megatron-LM 2021 attention for the unfused path.
    """
    attn_flops = tf.attention_fwd_flops(spec, b, s) / t
    if kernel != "unfused":
        fwd = eff.flash_attention_time_s(dev, dtype, attn_flops / 2, kernel)
        return fwd, 2.5 * fwd
    scores = b * ((spec.n_heads or 1) / t) * s * s
    matmul = (attn_flops / 2) / (dev.peak_flops_per_s[dtype] * eff.device_efficiency(dev).matmul_ceiling)
    bmm = max(matmul, eff.memory_time_s(dev, 2 * scores))  # each bmm writes or reads the scores once
    fwd_b, bwd_b = tf.attention_score_bytes(spec, b, s, t)
    return 2 * bmm + eff.memory_time_s(dev, fwd_b - 4 * scores), 4 * bmm + eff.memory_time_s(dev, bwd_b - 4 * scores)


def block_times(spec: ModelSpec, dev: DeviceSpec, dtype: str, b: int, s: int, t: int, sp: bool, kernel: str,
                cp: int = 1, eager: bool = False) -> KernelTimes:
    """One transformer block: GEMMs on the efficiency curve, the attention core, memory-bound element-wise ops.

    Formula: forward ``sum_gemm t_gemm + t_attn_fwd + t_elem``; backward ``2 sum_gemm t_gemm + t_attn_bwd +
        2 t_elem`` (dgrad and wgrad GEMMs of the forward's sizes; the element-wise backward moves about twice the
        forward's bytes). Element-wise bytes: the replicated part of ``transformer.block_elementwise_elements`` on
        ``b s / t`` tokens under SP (all ``b s`` otherwise), the sharded part on ``1/t`` of its elements. With
        context parallelism ``s`` is the rank's ``s_cp = S / cp`` tokens and the attention core, whose queries are
        local and keys the whole sequence, costs ``cp`` times the core of ``s_cp`` tokens (``4 b s_cp S a d``
        FLOPs: the load-balanced causal split gives every rank the same share).
        ``attn_fwd_s`` is what selective recomputation repeats (Korthikanti et al. 2022 sec. 4.3);
        ``op_recompute_s`` what torchtitan's op-level policy repeats (the GEMMs of
        ``transformer.OP_POLICY_RECOMPUTED_GEMMS`` and the element-wise forward). ``eager``: the element-wise ops
        run as PyTorch's eager kernel sequence (``transformer.block_eager_extra_bytes`` more bytes), not fused.
    Source: :mod:`paraplan.cost_models.efficiency`; Narayanan et al. SC'21 sec. 5.1 (backward = 2x forward);
        Llama 3 paper (Grattafiori et al. 2024) sec. 3.3.2 for the load-balanced context-parallel split.
    """
    db, tokens = DTYPE_BYTES[dtype], b * s
    each = [eff.gemm_time_s(dev, dtype, m, k, n, db) for m, k, n in tf.block_gemms(spec, tokens, t)]
    gemm = sum(each)
    rep, shd = tf.block_elementwise_elements(spec)
    elem_bytes = db * tokens * (rep / (t if sp else 1) + shd / t)
    if eager:
        e_rep, e_shd = tf.block_eager_extra_bytes(spec)
        elem_bytes += tokens * (e_rep / (t if sp else 1) + e_shd / t)
    elem = eff.memory_time_s(dev, elem_bytes)
    attn_fwd, attn_bwd = attention_times(spec, dev, dtype, b, s, t, kernel)
    attn_fwd, attn_bwd = attn_fwd * cp, attn_bwd * cp
    op = sum(x for i, x in enumerate(each) if i in tf.OP_POLICY_RECOMPUTED_GEMMS) + elem
    return KernelTimes(gemm + attn_fwd + elem, 2 * gemm + attn_bwd + 2 * elem, attn_fwd, gemm, op)


def moe_model_block_times(work, dev: DeviceSpec, dtype: str, kernel: str, cp: int = 1) -> KernelTimes:
    """One dense or MoE block of a Mixture-of-Experts model from its :class:`paraplan.cost_models.moe.BlockWork`.

    Formula: as :func:`block_times`: forward ``sum_gemm count t_gemm + t_attn_fwd + t_elem``, backward ``2 sum_gemm
        + t_attn_bwd + 2 t_elem``; the flash attention core runs half of ``work.attn_flops`` (causal), ``cp``
        times the local core with context parallelism. Each local expert's GEMMs are priced at their own shape
        (a grouped GEMM of ``E/ep`` experts of ``m_e`` tokens each runs near the sum of its members).
    Source: :mod:`paraplan.cost_models.efficiency`; Narayanan et al. SC'21 sec. 5.1 (backward = 2x forward).
    """
    db = DTYPE_BYTES[dtype]
    gemm = sum(count * eff.gemm_time_s(dev, dtype, m, k, n, db) for m, k, n, count in work.gemms)
    elem = eff.memory_time_s(dev, work.elementwise_bytes)
    if kernel == "unfused":
        raise ValueError("the unfused attention kernel is not modelled for MoE models; use flash2 or flash1")
    attn_fwd = eff.flash_attention_time_s(dev, dtype, work.attn_flops / 2, kernel) * cp
    return KernelTimes(gemm + attn_fwd + elem, 2 * gemm + 2.5 * attn_fwd + 2 * elem, attn_fwd, gemm, 0.0)
