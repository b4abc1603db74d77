"""The cost-model extensions behind `paraplan estimate`, checked against papers and hand derivations."""

from __future__ import annotations

import pytest

from paraplan.catalog import gpu_cluster, load_cluster_spec
from paraplan.cost_models import efficiency as eff
from paraplan.cost_models import transformer as tf
from paraplan.cost_models.comm import LINK_EFFICIENCY, collective_time_s
from paraplan.cost_models.costs import CandidateCosts, CostOptions, Mode, StageCost, step_time_s
from paraplan.cost_models.estimate import StrategySpec, estimate_strategy
from paraplan.errors import ProfileError, StrategyError, TrainSpecError
from paraplan.models.presets import PRESETS
from paraplan.planner.search import search_plans
from paraplan.types import Dtype, LayerProfile, ModelProfile, ModelSpec, StrategyOverride, TrainSpec

GPT = PRESETS["gpt3-175b"]


def _stage(t: float) -> StageCost:
    return StageCost(t, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def test_interleaved_bubble_is_divided_by_virtual_stages():
    # Narayanan et al. SC'21 sec. 2.2.2: p equal stages of time t per micro-batch, m micro-batches, v chunks per
    # device: the step takes (m + (p - 1)/v) t. p = 4, m = 8, v = 2, t = 0.1 -> (8 + 1.5) 0.1 = 0.95, bubble 0.15.
    spec = PRESETS["llama-tiny"]
    costs = CandidateCosts(spec, load_cluster_spec("cpu:4"), TrainSpec(global_batch=8, seq_len=64), 1, 1, 4, 1,
                           options=CostOptions(vpp=2))
    step, pipe, bubble = step_time_s(costs, [_stage(0.1)] * 4)
    assert pipe == pytest.approx(0.95)
    assert bubble == pytest.approx(0.15)


def test_interleaved_first_stage_holds_p_plus_p_minus_1_over_v():
    # Megatron-LM schedules.py warm-up: (p - r - 1) * 2 + (v - 1) p chunk-micro-batches, plus the one in flight,
    # each chunk 1/v of the stage. p = 4, v = 2: stage 0 holds (6 + 4 + 1)/2 = 5.5 = p + (p - 1)/v, stage 3 holds
    # (0 + 4 + 1)/2 = 2.5. Korthikanti et al. 2022 sec. 4.2.3 give the same first-stage factor.
    spec = ModelSpec(name="x", family="llama", n_layers=8, hidden=256, ffn_hidden=512, n_heads=4, n_kv_heads=4,
                     vocab=256)
    costs = CandidateCosts(spec, load_cluster_spec("cpu:4"), TrainSpec(global_batch=64, seq_len=64), 1, 1, 4, 1,
                           options=CostOptions(vpp=2))
    assert [costs.inflight(s) for s in range(4)] == [5.5, 4.5, 3.5, 2.5]
    few = CandidateCosts(spec, load_cluster_spec("cpu:4"), TrainSpec(global_batch=2, seq_len=64), 1, 1, 4, 1,
                         options=CostOptions(vpp=2))
    assert few.inflight(0) == 2  # capped by the m v = 4 chunk-micro-batches that exist: 4 / 2


@pytest.mark.parametrize("t", [2, 8])
def test_sequence_parallel_and_selective_activations_match_korthikanti_table2(t):
    # Korthikanti et al. 2022 Table 2 (bytes per layer): tp + sp: s b h/t (34 + 5 a s/h); tp + sp + selective:
    # 34 s b h/t. This GPT has no dropout, which removes the two 1-byte masks: 32 and 5 a s/h stays with an unfused
    # attention (scores, softmax, mask), which selective recomputation drops.
    s, h, a = 2048, 12288, 96
    train = TrainSpec(global_batch=8, seq_len=s)
    cluster = load_cluster_spec("8xA100-80GB")
    unfused = CandidateCosts(GPT, cluster, train, 8 // t, t, 1, 1,
                             options=CostOptions(sequence_parallel=True, attention="unfused"))
    assert unfused.block.act_bytes == pytest.approx(s * h / t * (32 + 5 * a * s / h))
    assert unfused.block.sel_act_bytes == pytest.approx(32 * s * h / t)
    # A selectively recomputed block repeats the attention core's forward in its backward (its whole extra time).
    assert unfused.block.selective_s == pytest.approx(unfused._times("block").attn_fwd_s)
    assert 0 < unfused.block.selective_s < unfused.block.fwd_s


def test_sequence_parallel_keeps_the_tp_communication_volume():
    # Korthikanti et al. 2022 sec. 4.2.2: each all-reduce becomes a reduce-scatter + all-gather of the same buffer;
    # by nccl-tests' factors 2(t-1)/t = (t-1)/t + (t-1)/t, so only one latency per slot is added.
    train = TrainSpec(global_batch=8, seq_len=2048)
    cluster = load_cluster_spec("8xA100-80GB")
    plain = CandidateCosts(GPT, cluster, train, 1, 8, 1, 1)
    sp = CandidateCosts(GPT, cluster, train, 1, 8, 1, 1, options=CostOptions(sequence_parallel=True))
    extra_latency = 2 * cluster.intra_node_latency_s  # two slots forward, one more latency each
    assert sp.block.tp_fwd_s == pytest.approx(plain.block.tp_fwd_s + extra_latency)
    n_bytes = 2048 * 12288 * 2
    bw = cluster.intra_node_bandwidth_bytes_per_s * LINK_EFFICIENCY
    assert plain.block.tp_fwd_s == pytest.approx(2 * (cluster.intra_node_latency_s + 2 * 7 / 8 * n_bytes / bw))


def test_vocabulary_is_padded_to_a_multiple_of_128_tp():
    # Megatron-LM _vocab_size_with_padding: GPT-2's 50,257 with tp = 8 -> next multiple of 1024 = 51,200;
    # 128,256 (Llama 3) with tp = 8 -> 129,024; already divisible: unchanged.
    assert tf.padded_vocab(GPT, 8) == 51200
    assert tf.padded_vocab(PRESETS["llama3-8b"], 8) == 129024
    assert tf.padded_vocab(PRESETS["llama3-8b"], 1) == 128256


def test_hierarchical_all_reduce_across_nodes():
    # 2 nodes x 8 GPUs, a 16-rank group with 8 ranks per node: reduce-scatter in the node, all-reduce of 1/8 of the
    # buffer across the 2 nodes on each rank's NIC, all-gather in the node.
    c = gpu_cluster(2, 8, "H100-80GB")
    S = 8e9
    bi = c.intra_node_bandwidth_bytes_per_s * LINK_EFFICIENCY
    be = c.inter_node_bandwidth_bytes_per_s * LINK_EFFICIENCY
    li, le = c.intra_node_latency_s, c.inter_node_latency_s
    expected = (li + 7 / 8 * S / bi) + (le + 2 * 1 / 2 * (S / 8) / be) + (li + 7 / 8 * S / bi)
    assert collective_time_s(c, "all_reduce", S, 16, True, per_node=8) == pytest.approx(expected)
    # One rank per node (tp = 8 fills the node): a flat ring over one NIC each.
    assert collective_time_s(c, "all_gather", S, 2, True, per_node=1) == pytest.approx(le + 1 / 2 * S / be)


def test_gemm_wave_quantization_and_roofline():
    dev = load_cluster_spec("8xH100-80GB").device
    e = eff.DEVICE_EFFICIENCY["H100-80GB"]
    peak = 989e12 * e.matmul_ceiling
    # 1536 x 1408 output = 12 x 11 = 132 tiles: one full wave; 1536 x 1536 = 144 tiles: two waves of 132, 144/264.
    k = 8192  # intensity ~700 FLOP/byte: compute bound
    assert eff.gemm_time_s(dev, "bf16", 1536, k, 1408, 2) == pytest.approx(2 * 1536 * k * 1408 / peak)
    assert eff.gemm_time_s(dev, "bf16", 1536, k, 1536, 2) == pytest.approx(2 * 1536 * k * 1536 / (peak * 144 / 264))
    # A matrix-vector product is memory bound: 2 bytes x (K N + K + N) at 80% of 3.35 TB/s.
    assert eff.gemm_time_s(dev, "bf16", 1, 8192, 8192, 2) == pytest.approx(
        2 * (8192 + 8192 * 8192 + 8192) / (3.35e12 * 0.8))


def test_hardware_flops_with_full_recompute_equal_narayanan_eq3():
    B, s, L, h, v = 1536, 2048, 96, 12288, 50257
    eq3 = 96 * B * s * L * h**2 * (1 + s / (6 * h) + v / (16 * L * h))
    assert tf.hardware_flops_per_step(GPT, B, s, "full") == pytest.approx(eq3, rel=1e-12)
    model = tf.model_flops_per_step(GPT, B, s)
    assert tf.hardware_flops_per_step(GPT, B, s, "none") == model
    assert tf.hardware_flops_per_step(GPT, B, s, "selective") == pytest.approx(model + 4 * B * s * s * h * L)


def test_estimate_reports_mfu_from_model_flops_and_hfu_with_recompute():
    spec, cluster = PRESETS["llama3-8b"], load_cluster_spec("8xH100-80GB")
    train = TrainSpec(global_batch=64, seq_len=4096)
    st = StrategySpec(dp=8, tp=1, pp=1, micro_batch_size=2, zero_stage=3, recompute="full")
    est = estimate_strategy(spec, cluster, train, st)
    model = tf.model_flops_per_step(spec, 64, 4096)
    assert est.mfu == pytest.approx(model / (est.step_time_s * 8 * 989e12))
    assert est.model_tflops_per_device == pytest.approx(model / est.step_time_s / 8 / 1e12)
    # HFU adds one recomputed forward of every block: 2 x tokens x matmul weights (2 h^2 + 2 h k d + 3 h f =
    # 218,103,808 for h 4096, k d 1024, f 14336) plus the attention core's 4 b s^2 h, for 32 blocks.
    recomputed = 32 * (2 * 64 * 4096 * 218_103_808 + 4 * 64 * 4096**2 * 4096)
    assert est.hfu == pytest.approx((model + recomputed) / (est.step_time_s * 8 * 989e12))
    bd = est.memory_breakdown_bytes
    # ZeRO-3 over 8 ranks: every state class is divided by dp (Rajbhandari et al. 2020): 16 bytes x params / 8.
    n_params = 32 * tf.block_params(spec) + tf.embed_params(spec) + tf.head_params(spec)  # 128,256 needs no padding
    assert bd.params + bd.grads + bd.optimizer == pytest.approx(16 * n_params / 8, rel=1e-6)


def test_full_recompute_trades_time_for_memory_and_pipeline_stage0_is_most_loaded():
    spec, cluster = PRESETS["llama3-70b"], load_cluster_spec("4x8xH100-80GB")
    train = TrainSpec(global_batch=64, seq_len=4096)
    base = dict(dp=1, tp=8, pp=4, micro_batch_size=1, sequence_parallel=True, zero_stage=0)
    none = estimate_strategy(spec, cluster, train, StrategySpec(**base))
    full = estimate_strategy(spec, cluster, train, StrategySpec(**base, recompute="full"))
    assert full.step_time_s > none.step_time_s
    assert full.memory_breakdown_bytes.activations < none.memory_breakdown_bytes.activations
    assert none.most_loaded_stage == 0  # holds p micro-batches in flight (1F1B)
    inter = estimate_strategy(spec, cluster, train, StrategySpec(**base, vpp=5))
    assert inter.bubble_s < none.bubble_s


def test_invalid_strategies_say_what_to_change():
    spec, cluster = PRESETS["llama3-8b"], load_cluster_spec("8xH100-80GB")
    train = TrainSpec(global_batch=64, seq_len=4096)
    with pytest.raises(StrategyError, match="must equal the 8 devices"):
        estimate_strategy(spec, cluster, train, StrategySpec(dp=4, tp=1, pp=1, micro_batch_size=1))
    with pytest.raises(StrategyError, match="needs pp > 1"):
        estimate_strategy(spec, cluster, train, StrategySpec(dp=8, tp=1, pp=1, micro_batch_size=1, vpp=2))
    with pytest.raises(TrainSpecError, match="not divisible by dp x micro-batch"):
        estimate_strategy(spec, cluster, train, StrategySpec(dp=8, tp=1, pp=1, micro_batch_size=3))
    with pytest.raises(StrategyError, match="attention kernel"):
        estimate_strategy(spec, cluster, train, StrategySpec(dp=8, tp=1, pp=1, micro_batch_size=1,
                                                             attention="sparse"))


def _hand_profile(spec: ModelSpec, seq_len: int, dtype: Dtype) -> ModelProfile:
    """A profile at micro-batch 1 with made-up times: only its model, seq_len and dtype matter to these tests."""
    layers = [LayerProfile(kind=kind, micro_batch_size=1, fwd_time_s=1e-3, bwd_time_s=2e-3, param_count=0,
                           param_bytes=0, activation_bytes=0, output_bytes=1, fwd_flops=0.0, bwd_flops=0.0)
              for kind in ("embed", "block", "head")]
    return ModelProfile(model=spec, device_name="hand", device_kind="cpu", dtype=dtype, seq_len=seq_len,
                        warmup=0, repeats=1, layers=layers)


def _estimate(spec, cluster, train, profile):
    return estimate_strategy(spec, cluster, train, StrategySpec(dp=2, tp=1, pp=1, micro_batch_size=1), profile)


def _search(spec, cluster, train, profile):
    return search_plans(spec, cluster, train, profile, StrategyOverride(dp=2, micro_batch_size=1), top_k=1)


@pytest.mark.parametrize("entry", [_estimate, _search])
@pytest.mark.parametrize("profiled,seq_len,dtype,message", [
    ("llama-small", 64, "fp32", "is of model llama-small, not llama-tiny"),
    ("llama-tiny", 128, "fp32", "taken at seq-len 128"),
    ("llama-tiny", 64, "bf16", "taken in bf16"),
])
def test_library_refuses_a_profile_of_another_problem(entry, profiled, seq_len, dtype, message):
    spec, cluster = PRESETS["llama-tiny"], load_cluster_spec("cpu:2")
    train = TrainSpec(global_batch=8, seq_len=64, dtype="fp32")
    with pytest.raises(ProfileError, match=message):
        entry(spec, cluster, train, _hand_profile(PRESETS[profiled], seq_len, dtype))
    assert entry(spec, cluster, train, _hand_profile(spec, 64, "fp32"))  # the matching profile is used


@pytest.mark.parametrize("entry", [_estimate, _search])
def test_library_refuses_a_factory_model_without_profile(entry):
    spec = ModelSpec(name="pkg.mod:build", family="custom", factory="pkg.mod:build", n_layers=4)
    train = TrainSpec(global_batch=8, seq_len=64, dtype="fp32")
    with pytest.raises(StrategyError, match="factory model: run `paraplan profile` and pass --profile"):
        entry(spec, load_cluster_spec("cpu:2"), train, None)


def test_dp_overlap_hides_gradient_reduction_behind_the_backward():
    # With overlap the exposed DP time is max(0, reduction - backward of one micro-batch); without, all of it.
    # At 1024 tokens the backward is shorter than the reduction, so part of it stays exposed.
    spec, cluster = PRESETS["llama3-8b"], load_cluster_spec("4x8xH100-80GB")
    train = TrainSpec(global_batch=64, seq_len=1024)
    on = CandidateCosts(spec, cluster, train, 32, 1, 1, 1)
    off = CandidateCosts(spec, cluster, train, 32, 1, 1, 1, options=CostOptions(overlap_dp=False))
    mode, L = Mode(0, False), 32
    # ZeRO-0 all-reduces the bf16 gradients (2 bytes x parameters) over 32 ranks, 8 per node on 4 nodes: in-node
    # reduce-scatter, an all-reduce of 1/8 across nodes, in-node all-gather (nccl-tests ring factors).
    S = 2 * (L * tf.block_params(spec) + tf.embed_params(spec) + tf.head_params(spec))
    bi = cluster.intra_node_bandwidth_bytes_per_s * LINK_EFFICIENCY
    be = cluster.inter_node_bandwidth_bytes_per_s * LINK_EFFICIENCY
    li, le = cluster.intra_node_latency_s, cluster.inter_node_latency_s
    reduce = 2 * (li + 7 / 8 * S / bi) + (le + 2 * 3 / 4 * (S / 8) / be)
    window = on.backward_terms(0)(L)
    assert reduce > window
    assert off.stage_cost(0, L, 0, mode).dp_comm_s == pytest.approx(reduce)
    assert on.stage_cost(0, L, 0, mode).dp_comm_s == pytest.approx(reduce - window)


def test_gpipe_holds_every_micro_batch_with_the_1f1b_bubble():
    # Narayanan et al. SC'21 sec. 2.2.1: GPipe and 1F1B idle the same (p - 1)/m; GPipe keeps all m micro-batches'
    # activations on every stage (1F1B: p - s).
    spec, cluster = PRESETS["llama3-70b"], load_cluster_spec("4x8xH100-80GB")
    train = TrainSpec(global_batch=16, seq_len=4096)
    base = dict(dp=1, tp=8, pp=4, micro_batch_size=1, sequence_parallel=True)
    f1b = estimate_strategy(spec, cluster, train, StrategySpec(**base))
    gpipe = estimate_strategy(spec, cluster, train, StrategySpec(**base, schedule="gpipe"))
    assert gpipe.step_time_s == pytest.approx(f1b.step_time_s)
    costs = CandidateCosts(spec, cluster, train, 1, 8, 4, 1, options=CostOptions(schedule="gpipe"))
    assert [costs.inflight(s) for s in range(4)] == [16, 16, 16, 16]
    assert gpipe.peak_memory_bytes > f1b.peak_memory_bytes
    with pytest.raises(StrategyError, match="gpipe"):
        estimate_strategy(spec, cluster, train, StrategySpec(**base, schedule="gpipe", vpp=2))


def test_zero_communication_volumes_per_rajbhandari():
    # One node of 8 GPUs (ring factors of nccl-tests), 1e9 parameters of 2-byte states per stage:
    # ZeRO-0: one gradient all-reduce per step, 2 (7/8) 2e9 bytes; ZeRO-1: reduce-scatter + all-gather per step
    # (same volume); ZeRO-3: per micro-batch two parameter all-gathers and one gradient reduce-scatter, 3 (7/8) 2e9
    # (Rajbhandari et al. 2020 sec. 7: 2 Psi vs 3 Psi).
    cluster = load_cluster_spec("8xH100-80GB")
    costs = CandidateCosts(PRESETS["llama3-8b"], cluster, TrainSpec(global_batch=64, seq_len=4096), 8, 1, 1, 1)
    bw = cluster.intra_node_bandwidth_bytes_per_s * LINK_EFFICIENCY
    lat, psi = cluster.intra_node_latency_s, 1e9
    one_pass = 7 / 8 * 2 * psi / bw
    assert costs.comm_times(Mode(0, False), psi) == pytest.approx((0.0, lat + 2 * one_pass, 0.0))
    assert costs.comm_times(Mode(1, False), psi) == pytest.approx((0.0, lat + one_pass, lat + one_pass))
    assert costs.comm_times(Mode(3, False), psi) == pytest.approx((3 * (lat + one_pass), 0.0, 0.0))


def test_pipeline_p2p_sends_a_tp_shard_v_times_each_way():
    # Per micro-batch a stage sends its activation forward and its gradient back: b s h / t bytes each (Megatron's
    # scatter/gather over tp), v times with v virtual stages. 2 nodes x 8, tp 8 dp 1 pp 2: neighbours on 2 nodes.
    cluster = gpu_cluster(2, 8, "H100-80GB")
    train = TrainSpec(global_batch=16, seq_len=4096)
    costs = CandidateCosts(PRESETS["llama3-70b"], cluster, train, 1, 8, 2, 1, options=CostOptions(vpp=2))
    n_bytes = 4096 * 8192 * 2 / 8
    one = cluster.inter_node_latency_s + n_bytes / (cluster.inter_node_bandwidth_bytes_per_s * LINK_EFFICIENCY)
    assert costs.p2p_s == pytest.approx(2 * 2 * one)


def test_tied_head_is_held_once_without_pipeline_and_twice_with():
    # GPT-3 ties the LM head to the embedding: with pp = 1 one stage holds the matrix once; with pp = 2 the last
    # stage keeps its own copy (Megatron-LM), so the two stages together hold v_pad h twice.
    spec, cluster = GPT, load_cluster_spec("8xA100-80GB")
    train = TrainSpec(global_batch=8, seq_len=2048)
    one = CandidateCosts(spec, cluster, train, 1, 8, 1, 1)
    two = CandidateCosts(spec, cluster, train, 1, 8, 2, 1)
    L, head = 96, 51200 * 12288 / 8
    assert one.stage_params(0, L) == pytest.approx(tf.model_params(spec) / 8 + (51200 - 50257) * 12288 / 8)
    both = two.stage_params(0, L // 2) + two.stage_params(1, L // 2)
    assert both == pytest.approx(one.stage_params(0, L) + head)


def test_offloaded_strategy_fits_only_where_host_memory_holds_it():
    # llama3-70b, ZeRO-3 over 8 A100-40GB with parameters and optimizer in host memory: 70.6e9 x (2 + 16) / 8 =
    # 159 GB per GPU of host memory. The catalog node has 256 GiB per GPU, so it fits; with a 64 GiB-per-GPU
    # host it does not, however little the GPU holds.
    from paraplan.catalog import load_cluster_spec
    from paraplan.cost_models.estimate import StrategySpec, estimate_strategy
    from paraplan.models.presets import load_model_spec
    from paraplan.types import TrainSpec
    from paraplan.units import GiB

    spec, train = load_model_spec("llama3-70b"), TrainSpec(global_batch=32, seq_len=4096)
    st = StrategySpec(dp=8, tp=1, pp=1, micro_batch_size=1, zero_stage=3, offload_optimizer="cpu",
                      offload_param="cpu", recompute="full")
    roomy = estimate_strategy(spec, load_cluster_spec("8xA100-40GB"), train, st)
    assert roomy.fits and roomy.host_bytes >= 70.5e9 * 18 / 8
    small = load_cluster_spec("8xA100-40GB").model_copy(update={"host_memory_bytes": 8 * 64 * GiB})
    tight = estimate_strategy(spec, small, train, st)
    assert tight.peak_memory_bytes == roomy.peak_memory_bytes and not tight.fits
