"""Analytic costs of Mixture-of-Experts decoders: FLOPs, model-state memory split into dense and expert states,
token dispatch/combine all-to-all traffic and time, routed-token activations and MLA's compressed KV.

Used by :class:`paraplan.cost_models.costs.CandidateCosts` for models with ``moe`` set (:func:`block_work`).

Notation as :mod:`paraplan.models.moe`: h hidden, v vocabulary, a heads, k key/value heads, d head dimension,
f dense MLP inner size; E routed experts, K top-k, f_e routed expert inner size, S shared experts of f_s each;
MLA r_q, r_kv, d_n, d_r, d_v. s sequence length, T tokens. A multiply-add counts as 2 FLOPs. Parallel degrees
tp, pp, dp, cp (attention side) and ep, etp (expert side); world = tp pp dp cp.
"""

from __future__ import annotations

from dataclasses import dataclass

from paraplan.cost_models.comm import link
from paraplan.cost_models.costs import state_bytes_per_param
from paraplan.errors import ModelSpecError, StrategyError
from paraplan.models.moe import block_params
from paraplan.types import ClusterSpec, ModelSpec

# Megatron-LM's MFU convention counts only the non-masked half of the causal score matrix (training.py
# ``num_floating_point_operations``: ``average_ratio`` 0.5 for causal masks); paraplan's dense model
# (transformer.attention_fwd_flops, Narayanan et al. SC'21) counts the full square, 1.0.
MEGATRON_CAUSAL_FRACTION = 0.5


def _dims(spec: ModelSpec) -> tuple[int, int, int, int, int]:
    if spec.family != "llama" or spec.moe is None:
        raise ModelSpecError(f"{spec.name}: the MoE cost formulas need a family llama model with moe set; dense "
                             "models are priced by paraplan.cost_models.transformer")
    assert spec.hidden and spec.ffn_hidden and spec.n_heads and spec.n_kv_heads and spec.vocab and spec.n_layers
    return spec.hidden, spec.ffn_hidden, spec.n_heads, spec.n_kv_heads, spec.vocab


# ---- 1. FLOPs --------------------------------------------------------------------------------------------------

def attention_fwd_flops_per_token(spec: ModelSpec, s: int, causal_fraction: float = 1.0) -> float:
    """Forward FLOPs of one block's attention per token: projections plus score (Q K^T) and value (A V) matmuls.

    Formula:
        GQA: ``2 (2 h a d + 2 h k d)`` (q, o; k, v) ``+ 2 s a (d + d) c``.
        MLA: queries ``2 (h r_q + r_q a (d_n + d_r))`` (q down and up) or ``2 h a (d_n + d_r)`` without r_q;
            kv down projection with the rotary key ``2 h (r_kv + d_r)``; k/v up projection ``2 r_kv a (d_n + d_v)``;
            output ``2 a d_v h``; scores ``2 s a (d_n + d_r) c``; values ``2 s a d_v c``.
        ``c`` = ``causal_fraction``: 1.0 counts the full s x s square (transformer.attention_fwd_flops,
        Narayanan et al. SC'21 sec. 5.1), 0.5 the causal half (:data:`MEGATRON_CAUSAL_FRACTION`).
    Source: GQA as transformer.block_fwd_flops; MLA: DeepSeek-AI 2024, "DeepSeek-V2", sec. 2.1.2-2.1.3, eq. 9-18
        (the same terms as Megatron-LM training.py ``num_floating_point_operations``, multi_latent_attention branch,
        which also counts ``r_q + r_kv`` for the latent norms; left out here, < 0.01%).
    Assumptions: no sliding window (gpt-oss's sliding layers are priced as full attention); biases and norms free.
    """
    h, _, a, k, _ = _dims(spec)
    mla = spec.mla
    if mla is not None:
        qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        q = h * mla.q_lora_rank + mla.q_lora_rank * a * qk if mla.q_lora_rank is not None else h * a * qk
        kv = h * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank * a * (mla.qk_nope_head_dim
                                                                                      + mla.v_head_dim)
        proj = q + kv + a * mla.v_head_dim * h
        return 2.0 * proj + 2.0 * s * a * (qk + mla.v_head_dim) * causal_fraction
    d = spec.attention_head_dim
    assert d
    return 2.0 * (2 * h * a * d + 2 * h * k * d) + 2.0 * s * a * 2 * d * causal_fraction


def mlp_fwd_flops_per_token(spec: ModelSpec, moe_layer: bool, count_router: bool = True) -> float:
    """Forward FLOPs per token of a block's MLP: dense SwiGLU, or router + K routed + shared experts.

    Formula: dense ``6 h f``; MoE ``2 h E`` (router, when ``count_router``) ``+ K 6 h f_e + S 6 h f_s``.
    Source: the module definitions (paraplan.models.moe.block_params); Megatron-LM training.py
        ``num_floating_point_operations`` counts the same expert terms (``moe_ffn_hidden_size x topk``, shared
        experts, gated multiplier 3/2) but not the router (``count_router=False`` reproduces it).
    Assumptions: every token reaches its K experts (no dropping); the top-k selection, softmax and the weighted
        combine are element-wise and not counted.
    """
    h, f, _, _, _ = _dims(spec)
    if not moe_layer:
        return 6.0 * h * f
    moe = spec.moe
    assert moe is not None
    router = 2.0 * h * moe.n_experts if count_router else 0.0
    shared = 6.0 * h * moe.n_shared_experts * (moe.shared_expert_ffn_hidden or 0)
    return router + moe.top_k * 6.0 * h * moe.expert_ffn_hidden + shared


def block_fwd_flops_per_token(spec: ModelSpec, s: int, moe_layer: bool, causal_fraction: float = 1.0,
                              count_router: bool = True) -> float:
    """Forward FLOPs per token of one dense or MoE block: attention + MLP (the two functions above)."""
    return attention_fwd_flops_per_token(spec, s, causal_fraction) + mlp_fwd_flops_per_token(spec, moe_layer,
                                                                                             count_router)


def model_flops_per_token(spec: ModelSpec, s: int, causal_fraction: float = 1.0, count_router: bool = True,
                          mtp_layers: int = 0) -> float:
    """Model FLOPs per trained token (forward + backward, no recomputation) of an MoE model.

    Formula: ``3 (sum over layers i of block_fwd(is_moe_layer(i)) + 2 h v)``; backward = 2 x forward. Each of
        ``mtp_layers`` multi-token-prediction modules (DeepSeek-V3 sec. 2.2) adds a block of the last layer's kind,
        its projection of the concatenated ``2h`` to ``h`` (``4 h^2``) and another head ``2 h v``.
    Source: Korthikanti et al. 2022 eq. 7 (3 x forward, LM head ``2 h v``); Megatron-LM training.py
        ``num_floating_point_operations`` (with ``causal_fraction=0.5, count_router=False`` this is its count for a
        model without multi-token prediction; Megatron multiplies the head by the padded vocabulary, equal to v
        when v is a multiple of 128 tp). The published ``Model TFLOP/s/GPU`` of Megatron-Bridge implies 23.0
        GFLOP/token for Qwen3-30B-A3B and 148 for Qwen3-235B-A22B at s = 4096 (benchmarks/data/moe_runs.jsonl).
        Megatron counts MTP layers the same way (its ``mtp_num_layers`` terms; it adds ``3h`` for MTP norms, left
        out); Megatron-Bridge's DeepSeek-V3 rows imply 249.7 GFLOP/token without and 260.0 with one MTP layer.
    Assumptions: embedding lookups free; multi-token prediction only when ``mtp_layers`` is given.
    """
    h, _, _, _, v = _dims(spec)
    assert spec.moe is not None and spec.n_layers
    n_moe = sum(spec.moe.is_moe_layer(i) for i in range(spec.n_layers))
    fwd = (n_moe * block_fwd_flops_per_token(spec, s, True, causal_fraction, count_router)
           + (spec.n_layers - n_moe) * block_fwd_flops_per_token(spec, s, False, causal_fraction, count_router)
           + 2.0 * h * v)
    last_is_moe = spec.moe.is_moe_layer(spec.n_layers - 1)
    mtp = block_fwd_flops_per_token(spec, s, last_is_moe, causal_fraction, count_router) + 4.0 * h * h + 2.0 * h * v
    return 3.0 * (fwd + mtp_layers * mtp)


# ---- 2. Model-state memory: dense and expert states ------------------------------------------------------------

def expert_data_parallel_size(world: int, pp: int, ep: int, etp: int) -> int:
    """Size of the expert-data-parallel group, over which expert gradients are reduced and ZeRO shards them.

    Formula: ``edp = world / (pp ep etp)``. Megatron-Core folds the attention side's ``tp x cp x dp`` ranks of a
        pipeline stage into ``etp x ep x edp`` for the expert layers, so ``tp cp dp = etp ep edp``.
    Source: Megatron-LM megatron/core/parallel_state.py ``initialize_model_parallel``: the expert decoder
        ``RankGenerator(tp=expert_tensor_parallel_size, ep=expert_model_parallel_size, dp=
        expert_data_parallel_size, pp=pipeline_model_parallel_size, cp=1)`` with ``expert_data_parallel_size =
        world_size // expert_tensor_model_pipeline_parallel_size`` (that product is etp x ep x pp; a RuntimeError
        when it does not divide the world). cp is absorbed into edp. Megatron defaults etp to tp when
        ``--expert-tensor-parallel-size`` is not given; here etp is always explicit.
        Example: world 64, pp 4, ep 8, etp 1 -> edp 2.

    Raises:
        StrategyError: pp x ep x etp does not divide the world.
    """
    group = pp * ep * etp
    if world % group:
        raise StrategyError(f"pp x ep x etp = {pp} x {ep} x {etp} = {group} does not divide the world of {world} "
                            "ranks: choose ep and etp so that the expert groups tile each pipeline stage")
    return world // group


@dataclass(frozen=True)
class MoEStateBytes:
    """Model-state bytes on one device, dense (non-expert) and expert parts, each as params, grads, optimizer."""

    dense_params: float
    dense_grads: float
    dense_optimizer: float
    expert_params: float
    expert_grads: float
    expert_optimizer: float

    @property
    def dense(self) -> float:
        return self.dense_params + self.dense_grads + self.dense_optimizer

    @property
    def expert(self) -> float:
        return self.expert_params + self.expert_grads + self.expert_optimizer

    @property
    def total(self) -> float:
        return self.dense + self.expert


def moe_state_bytes(spec: ModelSpec, tp: int, pp: int, dp: int, cp: int, ep: int, etp: int, zero_stage: int,
                    n_dense_layers: int, n_moe_layers: int, has_embed: bool = False, has_head: bool = False,
                    dtype: str = "bf16") -> MoEStateBytes:
    """Parameter, gradient and optimizer bytes on one device of a pipeline stage holding the given layers.

    Args:
        spec: an MoE model (family llama, ``moe`` set).
        tp, pp, dp, cp: attention-side degrees; world = tp pp dp cp.
        ep, etp: expert-parallel and expert-tensor-parallel degrees (ep must divide E).
        zero_stage: 0-3; ZeRO-1 shards optimizer states, ZeRO-2 also gradients, ZeRO-3 also parameters.
        n_dense_layers, n_moe_layers: blocks of each kind on this stage.
        has_embed, has_head: the stage holds the embedding / the final norm and LM head.
        dtype: training dtype; bytes per parameter (params, grads, optimizer) from costs.state_bytes_per_param
            (2, 2, 12 for bf16/fp16 mixed-precision Adam; 4, 4, 8 for fp32).

    Formula:
        dense parameters per device ``P_d = n_dense (attn/t + 2h + 3hf/t) + n_moe (attn/t + 2h + router +
            shared/t) + [v h / t] + [h + v h / t]``; expert parameters ``P_e = n_moe E (3 h f_e) / (ep etp)``.
        dense states shard over ``d = dp cp`` (gradients are reduced over the data-parallel group with context
            parallelism; costs.py ``dp_shard``); expert states over ``edp = world / (pp ep etp)``
            (:func:`expert_data_parallel_size`): bytes = ``P (p_b / z3 + g_b / z2 + o_b / z1)`` with
            ``z_i = d`` (or edp) when zero_stage >= i, else 1.
    Source: Megatron-Core parallel_state.py (expert groups, see :func:`expert_data_parallel_size`; expert
        gradients are reduced, and with the distributed optimizer sharded, over the expert-data-parallel group, not
        the dense dp group); ZeRO: Rajbhandari et al. 2020 sec. 5.
    Assumptions: all attention matmul weights split by tp (Megatron-Core may replicate MLA's down projections
        across tp; exact at tp = 1); norms and the router replicated over tp; shared experts are dense (split by
        tp, reduced over dp cp) as in Megatron-Core's SharedExpertMLP; expert biases (gpt-oss) count as expert.

    Raises:
        StrategyError: ep does not divide E, or the expert groups do not tile the world.
    """
    h, f, _, _, v = _dims(spec)
    moe = spec.moe
    assert moe is not None
    if moe.n_experts % ep:
        raise StrategyError(f"ep={ep} does not divide the {moe.n_experts} experts of {spec.name}: choose ep among "
                            f"the divisors of {moe.n_experts}")
    world = tp * pp * dp * cp
    edp = expert_data_parallel_size(world, pp, ep, etp)
    dense_blk, moe_blk = block_params(spec, False), block_params(spec, True)
    dense = n_dense_layers * (dense_blk.attention / tp + dense_blk.norms + dense_blk.dense_mlp / tp)
    dense += n_moe_layers * (moe_blk.attention / tp + moe_blk.norms + moe_blk.router + moe_blk.shared_experts / tp)
    dense += (v * h / tp if has_embed else 0) + (h + v * h / tp if has_head else 0)
    expert = n_moe_layers * moe_blk.routed_experts / (ep * etp)
    p_b, g_b, o_b = state_bytes_per_param(dtype)

    def split(n: float, group: int) -> tuple[float, float, float]:
        return (n * p_b / (group if zero_stage >= 3 else 1), n * g_b / (group if zero_stage >= 2 else 1),
                n * o_b / (group if zero_stage >= 1 else 1))

    dp_, dg, do = split(dense, dp * cp)
    ep_, eg, eo = split(expert, edp)
    return MoEStateBytes(dense_params=dp_, dense_grads=dg, dense_optimizer=do, expert_params=ep_,
                         expert_grads=eg, expert_optimizer=eo)


# ---- 3. Token dispatch / combine all-to-all ----------------------------------------------------------------------

@dataclass(frozen=True)
class AllToAllVolume:
    """Bytes one rank sends in one MoE layer for one micro-batch.

    ``per_all_to_all``: one dispatch (or one combine); ``forward`` = dispatch + combine; ``backward`` = the same
    two again (the gradients of the combined and dispatched tokens travel the reverse way)."""

    per_all_to_all: float
    forward: float
    backward: float


def routed_load(capacity_factor: float | None = None, imbalance: float = 1.0, pad_to_capacity: bool = False) -> float:
    """Token copies the busiest rank handles, relative to a perfectly balanced ``T K``.

    Formula: dropless router: ``imbalance``; with a capacity (each expert takes at most ``capacity_factor T K / E``
        tokens, the rest dropped): ``min(imbalance, capacity_factor)``, or ``capacity_factor`` with buffers padded
        to capacity (Megatron-Core ``--moe-pad-expert-input-to-capacity``).
    Source: Fedus et al. 2022 (Switch Transformers) sec. 2.2, expert capacity = capacity_factor x tokens / experts
        (times K for top-k).
    Assumptions: ``imbalance`` (max expert load / mean, default 1.0 = perfectly balanced, as Megatron-Bridge's
        force-balanced benchmarks) is a stated input, not predicted: real routers run above 1, most early in
        training.
    """
    if imbalance < 1.0:
        raise ValueError(f"imbalance is max load / mean load, at least 1.0 (got {imbalance})")
    if capacity_factor is None:
        return imbalance
    return capacity_factor if pad_to_capacity else min(imbalance, capacity_factor)


def all_to_all_volume(tokens: int, spec: ModelSpec, ep: int, dtype_bytes: int, load: float = 1.0) -> AllToAllVolume:
    """Dispatch/combine bytes per rank per MoE layer per micro-batch.

    Args:
        tokens: tokens this rank routes in the micro-batch (``b s / cp``, and ``/ tp`` with sequence parallelism).
        spec: the MoE model (h, K).
        ep: expert-parallel degree; 0 bytes when 1.
        dtype_bytes: bytes per element of the dispatched hidden vectors (2 for bf16).
        load: :func:`routed_load`.

    Formula: ``T K h dtype_bytes load (ep - 1) / ep`` per all-to-all: each of the T K token copies goes to the
        rank of its expert, which is another rank with probability (ep - 1)/ep under a uniform router.
    Source: ../shared/FORMULAS.md "MoE" (``b s h k`` elements each way, forward and backward); Lepikhin et al.
        2021 (GShard) sec. 3.2 and Megatron-Core's MoEAlltoAllTokenDispatcher (dispatch and combine all-to-alls).
    """
    h = _dims(spec)[0]
    assert spec.moe is not None
    one = tokens * spec.moe.top_k * h * dtype_bytes * load * (ep - 1) / ep
    return AllToAllVolume(per_all_to_all=one, forward=2 * one, backward=2 * one)


def ep_spans_nodes(cluster: ClusterSpec, ep: int, etp: int = 1) -> bool:
    """Whether an ep group crosses nodes: expert ranks order etp fastest, then ep (Megatron-Core's expert
    RankGenerator order ``tp-ep-dp-pp``), so it does when ``etp ep > devices_per_node``."""
    return etp * ep > cluster.devices_per_node


def all_to_all_time_s(cluster: ClusterSpec, n_bytes: float, ep: int, etp: int = 1) -> float:
    """Time of one all-to-all in which each of ``ep`` ranks sends ``n_bytes`` to the others (the (ep-1)/ep share
    of its buffer already taken out, as :func:`all_to_all_volume` gives it).

    Formula: within a node ``n_bytes / bw + (ep - 1) lat``. Spanning ``N`` nodes with ``g`` ranks each,
        hierarchically: the share ``(g - 1)/(ep - 1)`` of ``n_bytes`` goes over NVLink and ``(ep - g)/(ep - 1)``
        over the rank's own NIC, one after the other, the inter-node part aggregated per destination node (NCCL's
        PXN forwards through the NVLink peer on the destination's rail; DeepEP's internode kernels likewise), so
        ``intra + inter`` with ``(g - 1)`` intra-node and ``(N - 1)`` inter-node latencies.
    Source: Thakur, Rabenseifner & Gropp 2005, "Optimization of Collective Communication Operations in MPICH",
        pairwise-exchange all-to-all ``(p - 1) alpha + n beta (p - 1)/p``; the bandwidth factor (n-1)/n of
        nccl-tests doc/PERFORMANCE.md; link bandwidth and latency from comm.link (which has no all-to-all).
    Assumptions: rail-optimized nodes (one NIC per GPU), the intra- and inter-node parts not overlapped
        (conservative); no node-limited routing (DeepSeek-V3 sends each token to at most 4 nodes, which would cut
        the inter-node bytes).
    """
    if ep <= 1 or n_bytes <= 0:
        return 0.0
    if not ep_spans_nodes(cluster, ep, etp):
        bw, lat = link(cluster, False)
        return n_bytes / bw + (ep - 1) * lat
    g = max(1, min(ep, cluster.devices_per_node // etp))
    bw_i, lat_i = link(cluster, False)
    bw_x, lat_x = link(cluster, True)
    intra = (n_bytes * (g - 1) / (ep - 1) / bw_i + (g - 1) * lat_i) if g > 1 else 0.0
    nodes = -(-ep // g)
    return intra + n_bytes * (ep - g) / (ep - 1) / bw_x + (nodes - 1) * lat_x


DISPATCHERS = ("alltoall", "deepep")


def deepep_time_s(cluster: ClusterSpec, tokens: float, spec: ModelSpec, ep: int, dtype_bytes: int, etp: int = 1,
                  load: float = 1.0) -> float:
    """Time of one dispatch (or combine) with DeepEP-style node-aware forwarding.

    Within a node it is the all-to-all of :func:`all_to_all_time_s`. Spanning ``N`` nodes of ``g`` ranks: each token
    crosses InfiniBand once per distinct remote node among its K experts' nodes, to the GPU of the same in-node index
    there, which forwards it over NVLink to the GPUs holding its experts; the InfiniBand and NVLink parts run
    concurrently.

    Formula: IB bytes ``T r h db`` with ``r = (N - 1)(1 - (1 - 1/N)^K)`` the expected remote nodes a token reaches
        under a uniform router; NVLink bytes ``T K load h db (g - 1)/g`` (every copy's last hop inside its
        destination node, unless the receiving GPU holds the expert); time ``max(IB / bw_x + (N - 1) lat_x,
        NVLink / bw_i + (g - 1) lat_i)``.
    Source: DeepSeek-V3 technical report (arXiv 2412.19437) sec. 3.2.2 (cross-node all-to-all: IB to the same
        in-node index, then NVLink, IB and NVLink fully overlapped, each token's IB traffic deduplicated per node);
        deepseek-ai/DeepEP README ("normal kernels": NVLink and RDMA forwarding).
    Assumptions: no node-limited routing (DeepSeek-V3's limit of 4 nodes per token would cap r at 4 minus the
        local node's share); ``load`` scales the NVLink part only (the busiest rank receives more copies).
    """
    h = _dims(spec)[0]
    assert spec.moe is not None
    K = spec.moe.top_k
    if ep <= 1 or tokens <= 0:
        return 0.0
    if not ep_spans_nodes(cluster, ep, etp):
        return all_to_all_time_s(cluster, tokens * K * h * dtype_bytes * load * (ep - 1) / ep, ep, etp)
    g = max(1, min(ep, cluster.devices_per_node // etp))
    nodes = -(-ep // g)
    remote = (nodes - 1) * (1 - (1 - 1 / nodes) ** K)
    bw_i, lat_i = link(cluster, False)
    bw_x, lat_x = link(cluster, True)
    ib = tokens * remote * h * dtype_bytes / bw_x + (nodes - 1) * lat_x
    nvl = tokens * K * load * h * dtype_bytes * (g - 1) / g / bw_i + (g - 1) * lat_i
    return max(ib, nvl)


# ---- 4. Activations: routed tokens, MLA's compressed KV ----------------------------------------------------------

def mla_compressed_kv_bytes(spec: ModelSpec, tokens: int, dtype_bytes: int) -> float:
    """MLA's compressed KV per layer: ``T (r_kv + d_r) dtype_bytes`` (the latent c_KV and the shared rotary key).

    Source: DeepSeek-V2 sec. 2.1.2-2.1.3 and Table 1 (KV cache ``(d_c + d_h^R) l`` elements per token).

    Raises:
        ModelSpecError: the model has no multi-head latent attention.
    """
    if spec.mla is None:
        raise ModelSpecError(f"{spec.name} has no multi-head latent attention (mla is not set)")
    return float(tokens * (spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim) * dtype_bytes)


# ---- 5. One block on one rank: what costs.CandidateCosts prices ------------------------------------------------

@dataclass(frozen=True)
class BlockWork:
    """The work and memory of one dense or MoE block of an MoE model on one rank, for one micro-batch.

    ``gemms``: forward GEMMs ``(M, K, N, count)``; ``elementwise_bytes``: bytes the forward's element-wise kernels
    move; ``attn_flops``: forward FLOPs of the attention core over the full ``s x s`` square (a causal kernel runs
    half); ``act_bytes``/``ckpt_bytes``: saved for backward without / with full recomputation; ``params``:
    dense (non-expert) parameters per device; ``expert_params``: routed-expert parameters per device;
    ``a2a_bytes``: bytes one dispatch (or combine) all-to-all sends from this rank; ``etp_bytes``: the routed copies
    all-gathered over the etp group (0 when etp = 1); ``kv_elements``: K and V elements per token that context
    parallelism exchanges.
    """

    gemms: tuple[tuple[int, int, int, int], ...]
    elementwise_bytes: float
    attn_flops: float
    act_bytes: float
    ckpt_bytes: float
    params: float
    expert_params: float
    a2a_bytes: float
    etp_bytes: float
    kv_elements: float


def _ceil(x: float) -> int:
    return max(1, -(-int(round(x * 1e6)) // 1_000_000))


def block_work(spec: ModelSpec, moe_layer: bool, b: int, s: int, t: int, ep: int, etp: int, dtype_bytes: int,
               sp: bool, load: float = 1.0) -> BlockWork:
    """GEMM shapes, element-wise traffic, saved activations, parameters and all-to-all bytes of one block.

    Args:
        spec: an MoE model (family llama, ``moe`` set), GQA or MLA attention.
        moe_layer: price the MoE block (else the dense block of ``ffn_hidden``).
        b, s: micro-batch and the rank's sequence length (``S / cp``).
        t: tensor-parallel degree of the attention (and dense / shared-expert MLPs); ep, etp: expert degrees.
        dtype_bytes: bytes per activation element (2 for bf16).
        sp: sequence parallelism (Megatron-Core requires it for MoE with t > 1: the router sees ``b s / t`` tokens).
        load: token copies the busiest rank receives relative to the balanced ``T K`` (:func:`routed_load`).

    Formula (tokens ``M = b s`` for the attention GEMMs, ``T = M / t`` routed by this rank under sp, else ``M``):
        attention GEMMs: GQA q ``(M, h, a d/t)``, k and v ``(M, h, k d/t)``, o ``(M, a d/t, h)``; MLA q_a
            ``(M, h, r_q/t)``, q_b ``(M, r_q, a (d_n + d_r)/t)`` (or q ``(M, h, a (d_n + d_r)/t)``), kv_a ``(M, h,
            (r_kv + d_r)/t)``, kv_b ``(M, r_kv, a (d_n + d_v)/t)``, o ``(M, a d_v/t, h)``.
        dense MLP ``(M, h, f/t)`` x 2 and ``(M, f/t, h)``. MoE: router ``(T, h, E)``; each of the ``E/ep`` local
            experts gets ``m_e = ep T K load / E`` copies, ``etp`` times that after the etp all-gather, and runs
            ``(etp m_e, h, f_e/etp)`` x 2 and ``(etp m_e, f_e/etp, h)``; shared experts as a dense MLP of
            ``S f_s``.
        saved activations per token (times ``dtype_bytes``): ``4 h`` around the norms (``/t`` under sp), GQA
            ``(2 a d + 2 k d)/t``, MLA ``(2 a (d_n + d_r) + 2 a d_v + 2 r_q + 2 r_kv + d_r)/t`` (q, k, v, the
            attention output; the latents and their norms); dense MLP ``4 f/t``; MoE: each routed copy ``h + 4 f_e /
            etp`` (the permuted copy feeding gate and up; gate, up, silu(gate), their product), shared ``4 S f_s/t``, the router's fp32 logits and
            probabilities ``8 E`` per routed token.
        element-wise bytes: ``10 h`` per token for norms and residuals (``/t`` under sp), rotary on q and k, the
            latents' norms, SwiGLU ``3 f`` per MLP token (``3 f_e`` per routed copy), and ``4 h`` per routed copy
            for the permutation into and out of the expert order.
    Source: the module definitions of transformers DeepseekV3Attention / MixtralAttention, MixtralExperts,
        DeepseekV3MoE; the GEMM split of Megatron-Core (column/row parallel linears; experts under
        ``--expert-tensor-parallel-size`` with the alltoall token dispatcher all-gathering the routed tokens over
        the etp group); activation method of Korthikanti et al. 2022 sec. 4.1, as transformer.block_activation_bytes.
    Assumptions: all attention projections, the latent down-projections too, split by t (exact at t = 1); flash
        attention (no ``s^2`` activations); no token dropping unless ``load`` says so.
    """
    h, f, a, k, _ = _dims(spec)
    moe = spec.moe
    assert moe is not None
    M = b * s
    T = M / t if sp and t > 1 else M
    rep_tokens = M / t if sp and t > 1 else M
    parts = block_params(spec, moe_layer)
    mla = spec.mla
    gemms: list[tuple[int, int, int, int]] = []
    if mla is not None:
        qk, dv = mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.v_head_dim
        if mla.q_lora_rank is not None:
            gemms += [(M, h, _ceil(mla.q_lora_rank / t), 1), (M, mla.q_lora_rank, _ceil(a * qk / t), 1)]
            latent_q = mla.q_lora_rank
        else:
            gemms.append((M, h, _ceil(a * qk / t), 1))
            latent_q = 0
        gemms += [(M, h, _ceil((mla.kv_lora_rank + mla.qk_rope_head_dim) / t), 1),
                  (M, mla.kv_lora_rank, _ceil(a * (mla.qk_nope_head_dim + dv) / t), 1), (M, _ceil(a * dv / t), h, 1)]
        attn_flops = 2.0 * b * s * s * a * (qk + dv) / t
        attn_act = (2 * a * qk + 2 * a * dv + 2 * latent_q + 2 * mla.kv_lora_rank + mla.qk_rope_head_dim) / t
        attn_elem = (2 * a * mla.qk_rope_head_dim + 2 * mla.qk_rope_head_dim + 4 * latent_q + 4 * mla.kv_lora_rank) / t
        kv_elements = a * qk + a * dv
    else:
        d = spec.attention_head_dim
        assert d
        gemms += [(M, h, _ceil(a * d / t), 1), (M, h, _ceil(k * d / t), 2), (M, _ceil(a * d / t), h, 1)]
        attn_flops = 4.0 * b * s * s * a * d / t
        attn_act = (2 * a * d + 2 * k * d + (a * d + k * d if spec.qk_norm else 0)) / t
        attn_elem = (4 if spec.qk_norm else 2) * (a * d + k * d) / t
        kv_elements = 2 * k * d
    act = rep_tokens * 4 * h + M * attn_act
    elem = rep_tokens * 10 * h + M * attn_elem
    a2a = etp_bytes = 0.0
    expert_params = 0.0
    if not moe_layer:
        gemms += [(M, h, _ceil(f / t), 2), (M, _ceil(f / t), h, 1)]
        act += M * 4 * f / t
        elem += M * 3 * f / t
        dense_params = parts.attention / t + parts.norms + parts.dense_mlp / t
    else:
        E, K, fe = moe.n_experts, moe.top_k, moe.expert_ffn_hidden
        copies = T * K * load * etp  # routed copies this rank's experts process (after the etp all-gather)
        m_e = _ceil(copies * ep / E)
        gemms += [(_ceil(T), h, E, 1), (m_e, h, _ceil(fe / etp), 2 * E // ep), (m_e, _ceil(fe / etp), h, E // ep)]
        if moe.n_shared_experts:
            fs = moe.n_shared_experts * (moe.shared_expert_ffn_hidden or 0)
            gemms += [(M, h, _ceil(fs / t), 2), (M, _ceil(fs / t), h, 1)]
            act += M * 4 * fs / t
            elem += M * 3 * fs / t
        act += copies * (h + 4 * fe / etp) + T * 8 * E / dtype_bytes
        elem += copies * (3 * fe / etp + 4 * h)
        dense_params = parts.attention / t + parts.norms + parts.router + parts.shared_experts / t
        expert_params = parts.routed_experts / (ep * etp)
        a2a = all_to_all_volume(_ceil(T), spec, ep, dtype_bytes, load).per_all_to_all
        etp_bytes = copies * h * dtype_bytes if etp > 1 else 0.0
    return BlockWork(
        gemms=tuple(gemms), elementwise_bytes=elem * dtype_bytes, attn_flops=attn_flops,
        act_bytes=act * dtype_bytes, ckpt_bytes=rep_tokens * h * dtype_bytes, params=dense_params,
        expert_params=expert_params, a2a_bytes=a2a, etp_bytes=etp_bytes, kv_elements=kv_elements,
    )
