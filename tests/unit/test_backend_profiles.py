"""Backend cost profiles (paraplan/cost_models/backend_profiles.py): expected values derived by hand from the
frameworks' conventions and NCCL's latency tables, not from the code's output."""

from __future__ import annotations

import pytest

from paraplan.catalog import gpu_cluster
from paraplan.cost_models import transformer as tf
from paraplan.cost_models.backend_profiles import PROFILES, block_fetch_elements, cost_profile
from paraplan.cost_models.comm import collective_time_s, nccl_latency_s
from paraplan.cost_models.costs import CandidateCosts, CostOptions, Mode
from paraplan.cost_models.estimate import StrategySpec, estimate_strategy
from paraplan.errors import StrategyError
from paraplan.models.presets import load_model_spec
from paraplan.types import ModelSpec, TrainSpec

GPT = ModelSpec(name="gpt-small", family="gpt", n_layers=4, hidden=1024, ffn_hidden=4096, n_heads=16, n_kv_heads=16,
                vocab=50304, max_seq_len=2048, tied_embeddings=True)
LLAMA = ModelSpec(name="llama-small", family="llama", n_layers=4, hidden=1024, ffn_hidden=3584, n_heads=16,
                  n_kv_heads=4, vocab=32000, max_seq_len=2048, tied_embeddings=False)
TRAIN = TrainSpec(global_batch=64, seq_len=2048, dtype="bf16")


def _costs(spec, cluster, dp=1, tp=1, pp=1, backend=None, **kw):
    return CandidateCosts(spec, cluster, TRAIN, dp, tp, pp, 1, options=CostOptions(backend=backend, **kw))


def test_megatron_keeps_18_bytes_per_parameter_and_6_plus_12_over_d_distributed():
    # bf16 param 2 + fp32 main grad 4 + fp32 master 4 + Adam m 4 + v 4 = 18 (Megatron-LM README table).
    c = _costs(GPT, gpu_cluster(1, 8, "H100-80GB"), dp=8, backend="megatron")
    n = 1e9
    assert sum(c.state_memory(Mode(0), n)[:3]) / n == pytest.approx(18)
    assert sum(c.state_memory(Mode(1), n)[:3]) / n == pytest.approx(6 + 12 / 8)
    # The generic model (no profile) keeps ZeRO's 16 bytes (Rajbhandari et al. K = 12).
    assert sum(_costs(GPT, gpu_cluster(1, 8, "H100-80GB"), dp=8).state_memory(Mode(0), n)[:3]) / n == 16


def test_estimate_memory_breakdown_counts_18_bytes_per_megatron_parameter():
    cluster = gpu_cluster(1, 1, "H100-80GB")
    st = StrategySpec(dp=1, tp=1, pp=1, micro_batch_size=1, backend="megatron")
    est = estimate_strategy(GPT, cluster, TrainSpec(global_batch=1, seq_len=2048, dtype="bf16"), st)
    b = est.memory_breakdown_bytes
    assert b.params + b.grads + b.optimizer == pytest.approx(18 * tf.model_params(GPT))


def test_fp32_gradient_reduction_moves_twice_the_bf16_bytes():
    # Megatron (bf16: accumulate_allreduce_grads_in_fp32) reduces 4-byte gradients, Megatron of 2021 (fp16) 2-byte.
    # On slow links the all-reduce is bandwidth-bound (latencies < 1e-4 of it): the time doubles with the bytes.
    cluster = gpu_cluster(4, 8, "H100-80GB").model_copy(update={
        "intra_node_bandwidth_bytes_per_s": 1e8, "inter_node_bandwidth_bytes_per_s": 1e8})
    n = 2e10
    fp32 = _costs(GPT, cluster, dp=32, backend="megatron").comm_times(Mode(0), n)[1]
    fp16 = _costs(GPT, cluster, dp=32, backend="megatron_2021").comm_times(Mode(0), n)[1]
    assert fp32 / fp16 == pytest.approx(2.0, rel=1e-3)


@pytest.mark.parametrize("op, n, per_node, proto, expected_us", [
    # one node: base + (n - 1) NVLink hops (all-gather / reduce-scatter), 2 (n - 1) for an all-reduce ring
    ("all_gather", 8, 8, 2, 8.4 + 7 * 3.4),
    ("reduce_scatter", 8, 8, 0, 6.6 + 7 * 0.6),
    ("all_reduce", 8, 8, 2, 8.4 + 14 * 3.4),
    # 4 nodes x 8: 3 network hops, 28 NVLink hops (LL's NVLink hop x 1.8 across nodes)
    ("all_gather", 32, 8, 2, 8.4 + 28 * 3.4 + 3 * 14.0),
    ("all_gather", 32, 8, 0, 6.6 + 28 * 0.6 * 1.8 + 3 * 2.7),
    ("all_reduce", 32, 8, 2, 8.4 + 56 * 3.4 + 6 * 14.0),
])
def test_ring_latency_is_one_hop_per_ring_step(op, n, per_node, proto, expected_us):
    assert nccl_latency_s(op, n, per_node, "ring", proto) == pytest.approx(expected_us * 1e-6)


def test_tree_all_reduce_latency_grows_with_log2_nodes():
    # NCCL tuning.cc: base + 2 ((ppn - 1) intra + log2(nNodes) net); Simple protocol, 16 nodes x 8.
    assert nccl_latency_s("all_reduce", 128, 8, "tree", 2) == pytest.approx((8.4 + 2 * (7 * 4.0 + 4 * 14.0)) * 1e-6)


def test_small_collectives_pay_nccl_latency_large_ones_bandwidth():
    cluster = gpu_cluster(96, 8, "A100-80GB")
    generic = collective_time_s(cluster, "all_gather", 1e3, 768, True, 8)
    nccl = collective_time_s(cluster, "all_gather", 1e3, 768, True, 8, nccl_latency=True)
    # 768 ranks on 96 nodes, LL protocol: 6.6 + 672 x 0.6 x 1.8 + 95 x 2.7 us (the bytes' time is negligible)
    assert nccl == pytest.approx((6.6 + 672 * 0.6 * 1.8 + 95 * 2.7) * 1e-6, rel=1e-3)
    assert nccl > 50 * generic
    big = 4e9
    ratio = (collective_time_s(cluster, "all_gather", big, 768, True, 8, nccl_latency=True)
             / collective_time_s(cluster, "all_gather", big, 768, True, 8))
    assert 1.0 < ratio < 1.1  # Simple protocol at full bandwidth, a few ms of latency on top


def test_fetch_units_per_tensor_module_and_block():
    h, f = GPT.hidden, GPT.ffn_hidden
    tensors = block_fetch_elements(GPT, "tensor")
    assert len(tensors) == 12 and sum(tensors) == tf.block_params(GPT)
    assert max(tensors) == h * f  # fc1 / fc2 weights
    assert len(block_fetch_elements(GPT, "module")) == 6
    assert len(block_fetch_elements(LLAMA, "tensor")) == 9
    assert block_fetch_elements(GPT, "block") == [tf.block_params(GPT)]


def test_per_tensor_zero3_fetch_pays_one_latency_per_tensor():
    # With (near) infinite bandwidth only latencies remain: per micro-batch each of the 12 tensors of a GPT block is
    # all-gathered twice (forward, backward) and the block's gradients reduce-scattered in one bucket
    # (5e8 elements > the block): 25 collectives over 16 ranks on 2 nodes, each LL 6.6 + 14 x 0.6 x 1.8 + 2.7 us.
    cluster = gpu_cluster(2, 8, "H100-80GB").model_copy(update={
        "intra_node_bandwidth_bytes_per_s": 1e30, "inter_node_bandwidth_bytes_per_s": 1e30})
    c = _costs(GPT, cluster, dp=16, backend="deepspeed_2021")
    per_block = c.comm_times(Mode(3), c.block.params)[0]
    assert per_block == pytest.approx(25 * (6.6 + 14 * 0.6 * 1.8 + 2.7) * 1e-6, rel=1e-6)
    by_block = _costs(GPT, cluster, dp=16, backend="torch").comm_times(Mode(3), c.block.params)[0]
    assert by_block == pytest.approx(3 * (6.6 + 14 * 0.6 * 1.8 + 2.7) * 1e-6, rel=1e-6)  # FSDP2: 1 unit


def test_tied_embedding_all_reduce_only_with_tied_embeddings_and_pp_above_1():
    cluster = gpu_cluster(1, 8, "H100-80GB")
    c = _costs(GPT, cluster, pp=4, dp=2, backend="megatron")
    v_pad = tf.padded_vocab(GPT, 1)
    # all-reduce over the first and last stage of v_pad h fp32 gradient elements (Megatron main_grad)
    expected = collective_time_s(cluster, "all_reduce", v_pad * GPT.hidden * 4, 2, False, nccl_latency=True)
    assert c.tied_embedding_sync_s(0) == pytest.approx(expected) and expected > 0
    assert c.tied_embedding_sync_s(3) == pytest.approx(expected)
    assert c.tied_embedding_sync_s(1) == 0.0  # middle stages hold no embedding
    assert _costs(GPT, cluster, pp=1, dp=8, backend="megatron").tied_embedding_sync_s(0) == 0.0
    assert _costs(LLAMA, cluster, pp=4, dp=2, backend="megatron").tied_embedding_sync_s(0) == 0.0  # untied
    assert _costs(GPT, cluster, pp=4, dp=2, backend="torch").tied_embedding_sync_s(0) == 0.0  # torch never syncs
    assert _costs(GPT, cluster, pp=4, dp=2).tied_embedding_sync_s(0) == 0.0  # generic model


def test_tied_embedding_sync_reaches_the_step_time():
    cluster = gpu_cluster(1, 8, "H100-80GB")
    base = dict(dp=2, tp=1, pp=4, micro_batch_size=1)
    with_sync = estimate_strategy(GPT, cluster, TRAIN, StrategySpec(**base, backend="megatron"))
    c = _costs(GPT, cluster, pp=4, dp=2, backend="megatron")
    assert with_sync.optimizer_s >= c.tied_embedding_sync_s(0)


@pytest.mark.parametrize("strategy", [
    dict(dp=16, tp=1, pp=1, micro_batch_size=1, zero_stage=0),
    dict(dp=16, tp=1, pp=1, micro_batch_size=1, zero_stage=1),
    dict(dp=16, tp=1, pp=1, micro_batch_size=2, zero_stage=2),
    dict(dp=16, tp=1, pp=1, micro_batch_size=1, zero_stage=3),
    dict(dp=4, tp=2, pp=2, micro_batch_size=1, zero_stage=1),
    dict(dp=8, tp=2, pp=1, micro_batch_size=1, zero_stage=3, recompute="full"),
])
def test_backend_any_costs_at_least_each_profile(strategy):
    spec = load_model_spec("llama3-8b")
    cluster = gpu_cluster(2, 8, "H100-80GB")
    train = TrainSpec(global_batch=64, seq_len=4096, dtype="bf16")
    est = {b: estimate_strategy(spec, cluster, train, StrategySpec(**strategy, backend=b))
           for b in ("any", "deepspeed", "torch")}
    for b in ("deepspeed", "torch"):
        assert est["any"].step_time_s >= est[b].step_time_s * (1 - 1e-9), b
        assert est["any"].peak_memory_bytes >= est[b].peak_memory_bytes * (1 - 1e-9), b


def test_profiles_name_their_sources_and_unknown_names_are_refused():
    for name in ("deepspeed", "torch", "megatron"):
        prof = PROFILES[name]
        assert {"state_bytes", "grad_reduce_bytes", "zero3_fetch", "tied_embedding_sync"} <= set(prof.sources)
    assert cost_profile("unconstrained") is PROFILES["megatron"]
    assert cost_profile(None) is None
    with pytest.raises(StrategyError, match="use one of deepspeed, torch, megatron"):
        cost_profile("colossal")


def test_fp32_training_keeps_16_bytes_in_every_profile():
    for name in ("deepspeed", "torch", "megatron"):
        assert sum(PROFILES[name].states(0, "fp32")) == 16
        assert PROFILES[name].reduce_bytes(3, "fp32") == 4


def test_megatron_pipeline_messages_are_scattered_over_tp():
    # Megatron sends b s h / t per tp rank (scatter/gather, SC'21 sec. 4.1); DeepSpeed's engine the whole b s h.
    # On slow links (bandwidth-bound sends) the time follows the bytes: tp = 8 times more for DeepSpeed.
    cluster = gpu_cluster(2, 8, "H100-80GB").model_copy(update={
        "intra_node_bandwidth_bytes_per_s": 1e6, "inter_node_bandwidth_bytes_per_s": 1e6})
    mega = _costs(LLAMA, cluster, tp=8, pp=2, backend="megatron")
    ds = _costs(LLAMA, cluster, tp=8, pp=2, backend="deepspeed")
    assert ds.p2p_s / mega.p2p_s == pytest.approx(8, rel=1e-3)
    # with sequence parallelism the activation is already sharded over tp: no difference
    sp_ds = _costs(LLAMA, cluster, tp=8, pp=2, backend="deepspeed", sequence_parallel=True)
    assert sp_ds.p2p_s == pytest.approx(mega.p2p_s, rel=1e-3)


def test_eager_elementwise_bytes_counted_op_by_op():
    # Llama 3 8B (h 4096, 32 heads x 128, 8 kv heads, f 14336): eager RMSNorm moves 36 bytes per element against the
    # fused 4 (x2 norms: 64 h), rotary 20 against 4 on q and k (16 x (4096 + 1024)), SwiGLU 10 against 6 (4 f).
    spec = load_model_spec("llama3-8b")
    assert tf.block_eager_extra_bytes(spec) == (64 * 4096, 16 * (4096 + 1024) + 4 * 14336)
    assert tf.block_eager_extra_bytes(GPT) == (0, 0)  # nn.LayerNorm / GeLU are single kernels in eager mode


def test_eager_elementwise_is_slower_than_fused_for_llama_only():
    cluster = gpu_cluster(1, 8, "H100-80GB")
    base = dict(dp=8, tp=1, pp=1, micro_batch_size=1, zero_stage=3)
    for spec, slower in ((load_model_spec("llama3-8b"), True), (GPT, False)):
        fused = estimate_strategy(spec, cluster, TRAIN, StrategySpec(**base, backend="torch"))
        eager = estimate_strategy(spec, cluster, TRAIN, StrategySpec(**base, backend="torch", elementwise="eager"))
        assert (eager.step_time_s > fused.step_time_s * 1.01) == slower
        assert eager.step_time_s >= fused.step_time_s
    with pytest.raises(StrategyError, match="use fused or eager"):
        estimate_strategy(GPT, cluster, TRAIN, StrategySpec(**base, elementwise="compiled"))



def test_a_plan_records_the_backend_whose_profile_priced_it():
    # plan.json keeps --backend (SolverInfo.backend) so that report and explain re-price the plan with the same cost
    # profile: the report's per-stage breakdown then reproduces the plan's stage times exactly.
    from paraplan.planner.search import search_plans
    from paraplan.report.breakdown import plan_costs

    spec = load_model_spec("llama3-8b")
    cluster = gpu_cluster(1, 8, "H100-80GB")
    train = TrainSpec(global_batch=64, seq_len=4096)
    for backend in ("torch", "deepspeed"):
        plan = search_plans(spec, cluster, train, top_k=1, backend=backend)[0]
        assert plan.solver.backend == backend
        assert plan_costs(plan).mismatch < 1e-9


@pytest.mark.parametrize("sp", [False, True])
def test_tp_collectives_per_block_follow_each_framework(sp):
    """Megatron (fused QKV and gate/up): 2 collectives forward, 2 backward per block; paraplan's DTensor plan and
    DeepSpeed AutoTP (q, k, v, gate, up separate column-parallel modules): each reduces its input gradient, 5
    all-reduces backward (with sequence parallelism also the 2 all-gathers of the row-parallel reduce-scatters'
    backward). Each collective on the micro-batch's whole activation, b s h bf16 bytes."""
    cluster = gpu_cluster(1, 8, "H100-80GB")
    n_bytes = 1 * TRAIN.seq_len * LLAMA.hidden * 2

    def one(op):
        return collective_time_s(cluster, op, n_bytes, 8, False, nccl_latency=True)

    blocks = {name: _costs(LLAMA, cluster, tp=8, backend=name, sequence_parallel=sp).block
              for name in ("megatron", "torch", "deepspeed", "any")}
    if sp:
        mega_fwd = mega_bwd = 2 * one("reduce_scatter") + 2 * one("all_gather")
        dtensor_bwd = 5 * one("all_reduce") + 2 * one("all_gather")
    else:
        mega_fwd = mega_bwd = 2 * one("all_reduce")
        dtensor_bwd = 5 * one("all_reduce")
    assert blocks["megatron"].tp_fwd_s == pytest.approx(mega_fwd, rel=1e-12)
    assert blocks["megatron"].tp_bwd_s == pytest.approx(mega_bwd, rel=1e-12)
    for name in ("torch", "deepspeed", "any"):
        assert blocks[name].tp_fwd_s == pytest.approx(mega_fwd, rel=1e-12), name
        assert blocks[name].tp_bwd_s == pytest.approx(dtensor_bwd, rel=1e-12), name
