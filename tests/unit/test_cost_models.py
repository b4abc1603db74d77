"""Cost-model formulas checked against papers, hand derivations and the real modules (meta device)."""

from __future__ import annotations

import math

import pytest

from paraplan.catalog import load_cluster_spec
from paraplan.cost_models import transformer as tf
from paraplan.cost_models.comm import LINK_EFFICIENCY, collective_time_s
from paraplan.cost_models.costs import CandidateCosts, CostOptions, Mode, StageCost, step_time_s
from paraplan.models.build import count_parameters
from paraplan.models.presets import PRESETS
from paraplan.types import ModelSpec, TrainSpec


@pytest.mark.parametrize("name", ["llama-tiny", "llama-small", "llama3-8b", "gpt3-175b"])
def test_param_count_matches_the_built_module(name):
    # Reference: transformers' own modules instantiated on the meta device.
    assert tf.model_params(PRESETS[name]) == count_parameters(PRESETS[name])


def test_llama3_sizes_match_published_counts():
    # Llama 3 model card: 8.03B, 70.6B, 405.9B parameters (rounded as published).
    assert tf.model_params(PRESETS["llama3-8b"]) / 1e9 == pytest.approx(8.03, abs=0.005)
    assert tf.model_params(PRESETS["llama3-70b"]) / 1e9 == pytest.approx(70.6, abs=0.05)
    assert tf.model_params(PRESETS["llama3-405b"]) / 1e9 == pytest.approx(405.9, abs=0.1)


def test_gpt_model_flops_equal_korthikanti_eq7():
    spec = PRESETS["gpt3-175b"]
    B, s, L, h, v = 1536, 2048, 96, 12288, 50257
    eq7 = 72 * B * s * L * h**2 * (1 + s / (6 * h) + v / (12 * h * L))
    assert tf.model_flops_per_step(spec, B, s) == pytest.approx(eq7, rel=1e-12)


@pytest.mark.parametrize("t", [1, 2, 8])
def test_gpt_activations_equal_korthikanti_table2_without_dropout_masks(t):
    # Korthikanti et al. 2022 Table 2, tp row: s b h (10 + 24/t + 5 a s/(h t)) bytes. A fused attention kernel drops
    # the 5 a s/(h t) term; this GPT has no dropout, which removes the two 1-byte masks of the replicated part:
    # s b h (8 + 24/t).
    spec = PRESETS["gpt3-175b"]
    b, s, h = 1, 2048, 12288
    assert tf.block_activation_bytes(spec, b, s, t, dtype_bytes=2) == pytest.approx(s * b * h * (8 + 24 / t))
    # With sequence parallelism everything is sharded: 32 s b h / t.
    assert tf.block_activation_bytes(spec, b, s, t, 2, sp=True) == pytest.approx(32 * s * b * h / t)


def test_zero_memory_matches_rajbhandari_figure1():
    # ZeRO paper Figure 1: Psi = 7.5B, Nd = 64, K = 12: baseline 120 GB, Pos 31.4 GB, Pos+g 16.6 GB, Pos+g+p 1.9 GB.
    spec = PRESETS["llama3-8b"]
    cluster = load_cluster_spec("8x8xA100-80GB")
    costs = CandidateCosts(spec, cluster, TrainSpec(global_batch=64, seq_len=2048), 64, 1, 1, 1)
    psi = 7.5e9
    expected = {0: 120e9, 1: 31.4e9, 2: 16.6e9, 3: 1.9e9}
    for zero, total in expected.items():
        params, grads, optim, host, nvme = costs.state_memory(Mode(zero, False), psi)
        assert params + grads + optim == pytest.approx(total, abs=0.05e9)  # paper rounds to 0.1 GB
        assert host == 0 and nvme == 0
    # ZeRO-Offload (Ren et al. 2021 sec. 4.1): optimizer states and gradient partitions leave the device; the host
    # keeps fp32 master + momentum + variance (12) and the fp32 gradient (4) of the rank's 1/64 partition.
    params, grads, optim, host, nvme = costs.state_memory(Mode(1, True), psi)
    assert (params, grads, optim, nvme) == (pytest.approx(2 * psi), 0, 0, 0)
    assert host == pytest.approx(16 * psi / 64)


def test_ring_all_reduce_time_uses_nccl_bus_bandwidth_factor():
    cluster = load_cluster_spec("8xH100-80GB")
    n_bytes = 1e9
    bw = cluster.intra_node_bandwidth_bytes_per_s * LINK_EFFICIENCY
    expected = cluster.intra_node_latency_s + 2 * 7 / 8 * n_bytes / bw
    assert collective_time_s(cluster, "all_reduce", n_bytes, 8, False) == pytest.approx(expected)
    assert collective_time_s(cluster, "all_gather", n_bytes, 8, False) == pytest.approx(
        cluster.intra_node_latency_s + 7 / 8 * n_bytes / bw)
    assert collective_time_s(cluster, "all_reduce", n_bytes, 1, False) == 0.0


def _stage(t: float, extra: float = 0.0) -> StageCost:
    return StageCost(t, extra, 0, 0, 0, 0, 0, 0, 0, 0)


def test_balanced_1f1b_bubble_is_p_minus_1_over_m():
    # Narayanan SC'21 sec. 2.2.1: with p equal stages of time t and m micro-batches the step takes (m + p - 1) t and
    # the bubble is (p - 1) t, i.e. (p - 1)/m of the ideal m t.
    spec = PRESETS["llama-tiny"]
    costs = CandidateCosts(spec, load_cluster_spec("cpu:4"), TrainSpec(global_batch=8, seq_len=64), 1, 1, 4, 1)
    assert costs.m == 8
    step, pipe, bubble = step_time_s(costs, [_stage(0.1)] * 4)
    assert pipe == pytest.approx((8 + 4 - 1) * 0.1)
    assert bubble == pytest.approx(3 * 0.1)
    assert bubble / (8 * 0.1) == pytest.approx((4 - 1) / 8)
    # Unequal stages: the slowest stage sets the steady state.
    step, pipe, _ = step_time_s(costs, [_stage(0.1), _stage(0.2, extra=0.5), _stage(0.1), _stage(0.1)])
    assert pipe == pytest.approx(7 * 0.2 + 0.5)
    assert step == pytest.approx(pipe + 0.5)


def test_first_stage_holds_the_most_micro_batches():
    spec = PRESETS["llama-tiny"]
    costs = CandidateCosts(spec, load_cluster_spec("cpu:4"), TrainSpec(global_batch=8, seq_len=64), 1, 1, 4, 1)
    assert [costs.inflight(s) for s in range(4)] == [4, 3, 2, 1]
    few = CandidateCosts(spec, load_cluster_spec("cpu:4"), TrainSpec(global_batch=2, seq_len=64), 1, 1, 4, 1)
    assert [few.inflight(s) for s in range(4)] == [2, 2, 2, 1]


def test_full_recompute_keeps_only_block_inputs():
    spec = PRESETS["llama3-8b"]
    train = TrainSpec(global_batch=8, seq_len=4096)
    costs = CandidateCosts(spec, load_cluster_spec("8xH100-80GB"), train, 1, 1, 8, 1)
    none = costs.stage_cost(3, 4, 0, Mode(0, False))
    full = costs.stage_cost(3, 4, 4, Mode(0, False))
    inflight = costs.inflight(3)  # 5
    block_input = 4096 * 4096 * 2
    assert full.activation_bytes == pytest.approx(inflight * 4 * block_input + costs.block.act_bytes)
    assert none.activation_bytes == pytest.approx(inflight * 4 * costs.block.act_bytes)
    # Recomputation repeats each block's forward.
    assert full.time_per_micro_batch_s - none.time_per_micro_batch_s == pytest.approx(
        4 * (costs.block.fwd_s + costs.block.tp_fwd_s))


def test_analytic_block_time_follows_the_documented_curve():
    # Llama 3 8B, tp=2, micro-batch 2 x 4096 tokens on an H100 (132 SMs), derived by hand from
    # paraplan/cost_models/efficiency.py's curve:
    # - GEMMs (M = 8192 tokens): q (8192, 4096, 2048), k and v (8192, 4096, 512), o (8192, 2048, 4096), gate and up
    #   (8192, 4096, 7168), down (8192, 7168, 4096). Output tiles of 128 x 128: 1024, 256, 2048, 3584 and 2048; each is
    #   a multiple of 128 = 32 x 4 while a wave is 132 = 33 x 4 tiles, so each GEMM keeps 32/33 of its wave slots
    #   busy (e.g. 1024 tiles -> 8 waves of 132 = 1056 slots). All are compute bound (intensity above the ridge).
    # - element-wise: 10h replicated + (3f + 2h + 2kd)/t elements per token, 2 bytes each, at 80% of 3.35 TB/s.
    # - flash attention: half of 4 b s^2 h / t (causal) at the FlashAttention-2 fraction of the peak.
    # - every analytic kernel time divided by the stated framework efficiency and by the pace of the slowest of the
    #   job's 8 GPUs, which is the measured slowest-of-a-node / median ratio 727 / 752.
    spec = PRESETS["llama3-8b"]
    costs = CandidateCosts(spec, load_cluster_spec("8xH100-80GB"), TrainSpec(global_batch=8, seq_len=4096),
                           1, 2, 4, 2)
    peak, bw = 989e12, 3.35e12
    ceiling = 698.6 / 989  # the cited power-saturated H100/H200 MSMF
    eta = 0.91  # FRAMEWORK_EFFICIENCY as calibrated in benchmarks/results/fidelity_calibration.txt (0.906, rounded)
    h, f, kd, tokens = 4096, 14336, 8 * 128, 2 * 4096
    matmul_flops = 2 * tokens * (2 * h * h + 2 * h * kd + 3 * h * f) / 2
    gemm = matmul_flops / (peak * ceiling * 32 / 33)
    elem = 2 * tokens * (10 * h + (3 * f + 2 * h + 2 * kd) / 2) / (bw * 0.8)
    attn = (4 * 2 * 4096**2 * h / 2) / 2 / (peak * 0.35)  # FlashAttention-2 on H100: 35%
    pace = 727 / 752
    assert costs.block.fwd_s == pytest.approx((gemm + elem + attn) / (eta * pace), rel=1e-9)
    # Backward: dgrad + wgrad GEMMs (2x), the attention backward (2.5x its forward), twice the element-wise bytes.
    assert costs.block.bwd_s == pytest.approx((2 * gemm + 2 * elem + 2.5 * attn) / (eta * pace), rel=1e-9)
    assert math.isclose(costs.block.params, tf.block_params(spec) / 2)


def test_model_spec_rejects_heads_not_dividing_hidden():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ModelSpec(name="x", family="llama", n_layers=2, hidden=100, ffn_hidden=64, n_heads=3, n_kv_heads=1, vocab=10)


def test_cpu_cluster_takes_measured_links_from_the_profile():
    from paraplan.cost_models.comm import collective_time_s
    from paraplan.cost_models.links import calibrate_cluster
    from paraplan.types import LinkProfile, ModelProfile

    # A 16 MiB all-reduce at 1 GB/s bus bandwidth and a 64 KiB one in 200 us: latency = 200 us - 65536 B / 1 GB/s.
    big = LinkProfile(name="allreduce_gloo_2proc", bytes=16 * 2**20, time_s=16 * 2**20 / 1e9,
                      bandwidth_bytes_per_s=1e9)
    small = LinkProfile(name="allreduce_gloo_2proc_small", bytes=65536, time_s=200e-6,
                        bandwidth_bytes_per_s=65536 / 200e-6)
    memcpy = LinkProfile(name="host_memcpy", bytes=2**27, time_s=0.1, bandwidth_bytes_per_s=2**27 / 0.1)
    prof = ModelProfile(model=PRESETS["llama-tiny"], device_name="cpu", device_kind="cpu", dtype="fp32", seq_len=64,
                        warmup=1, repeats=1, layers=[], links=[big, small, memcpy])
    cpu = calibrate_cluster(load_cluster_spec("cpu:2"), prof)
    # A 2-rank all-reduce of 16 MiB now takes what was measured: latency + 16 MiB / 1 GB/s (factor 2(n-1)/n = 1).
    expected = (200e-6 - 65536 / 1e9) + 16 * 2**20 / 1e9
    assert collective_time_s(cpu, "all_reduce", 16 * 2**20, 2, False) == pytest.approx(expected)
    assert cpu.device.memory_bandwidth_bytes_per_s == pytest.approx(2 * 2**27 / 0.1)
    # GPU clusters keep their datasheet links.
    gpu = load_cluster_spec("8xH100-80GB")
    assert calibrate_cluster(gpu, prof) == gpu


def test_straggler_factor_is_the_expected_slowest_gpu():
    import torch

    from paraplan.cost_models import efficiency as eff

    assert eff.straggler_factor(1) == 1.0
    assert eff.straggler_factor(8) == pytest.approx(727 / 752)  # the measured node it is derived from
    # Blom's z(n) against a brute-force reference: the mean of the largest of n standard normal draws.
    gen = torch.Generator().manual_seed(0)
    for n in (8, 128, 1024):
        brute = torch.randn(4000, n, generator=gen, dtype=torch.float64).max(dim=1).values.mean().item()
        assert eff.expected_slowest_z(n) == pytest.approx(brute, rel=0.02)
    assert eff.straggler_factor(512) < eff.straggler_factor(128) < eff.straggler_factor(8)


PCIE = 64e9 * 0.8  # H100 SXM's PCIe Gen5 x16 per direction, at the 80% achieved-rate assumption of the links


def _h100_node_costs(zero_dp: int = 8):
    spec = PRESETS["llama3-8b"]
    cluster = load_cluster_spec("8xH100-80GB")  # PCIe 64 GB/s per GPU, NVMe 25 GB/s per node, CPU Adam 1e9/s
    return CandidateCosts(spec, cluster, TrainSpec(global_batch=64, seq_len=2048), zero_dp, 1, 1, 1)


def test_zero_infinity_nvme_tiers_by_hand():
    # 8e9 parameters on a stage, ZeRO-3 over 8 ranks, bf16: 1e9 per rank. Parameters (2 B) and the optimizer's
    # fp32 master + Adam moments (12 B) on NVMe; the fp32 gradient partition (4 B) in host memory.
    costs = _h100_node_costs()
    params, grads, optim, host, nvme = costs.state_memory(Mode(3, "nvme", "nvme"), 8e9)
    assert (params, grads, optim) == (0, 0, 0)
    assert nvme == pytest.approx(2e9 + 12e9)
    # Swap buffers: 5 of the largest parameter partition (embedding 128,256 x 4,096 / 8 ranks, rounded up to whole
    # MiB-element blocks: 63 Mi elements) in bf16, and 4 optimizer sub-groups of 1e9 / 16 elements (rounded up to
    # 60 Mi elements) in fp32.
    buffers = 5 * 63 * 2**20 * 2 + 4 * 60 * 2**20 * 4
    assert host == pytest.approx(4e9 + buffers)
    h2d, d2h, disk = costs.transfer_times(Mode(3, "nvme", "nvme"), 8e9)
    assert h2d == pytest.approx(2 * 2e9 / PCIE)  # parameters fetched for the forward and the backward
    assert d2h == pytest.approx(2e9 / PCIE)  # bf16 gradient partition down each micro-batch
    assert disk == pytest.approx(2 * 2e9 / (25e9 / 8))  # and read from the node's NVMe, shared by 8 GPUs
    device_s, offload_s = costs.optimizer_times(Mode(3, "nvme", "nvme"), 8e9)
    cpu_adam = 1e9 / (1e9 / 8)
    swap = 2 * 12e9 / (25e9 / 8)  # optimizer states read and written
    write_back = 2e9 / (25e9 / 8)  # updated bf16 parameters back to NVMe
    assert device_s == 0 and offload_s == pytest.approx(cpu_adam + swap + write_back)


def test_partial_optimizer_offload_by_hand():
    # DeepSpeed ZeRO-3 ratio 0.5: half the optimizer partition (and its gradients) on the host, half on the GPU.
    costs = _h100_node_costs()
    params, grads, optim, host, nvme = costs.state_memory(Mode(3, "cpu", ratio=0.5), 8e9)
    assert (params, grads, optim, nvme) == (pytest.approx(2e9), pytest.approx(1e9), pytest.approx(6e9), 0)
    assert host == pytest.approx(0.5e9 * 16)
    _, offload_s = costs.optimizer_times(Mode(3, "cpu", ratio=0.5), 8e9)
    assert offload_s == pytest.approx(0.5e9 / (1e9 / 8) + 0.5e9 * 2 / PCIE)  # CPU Adam + parameters back up
    # Parameters in host memory are updated in place: no upload.
    _, offload_s = costs.optimizer_times(Mode(3, "cpu", "cpu"), 8e9)
    assert offload_s == pytest.approx(1e9 / (1e9 / 8))


def test_paging_costs_by_hand():
    gpu = _h100_node_costs()
    act = gpu.block.act_bytes
    assert gpu.paging_costs() == pytest.approx((act / PCIE, act / PCIE, 0.0, act, 0.0))
    cpu = CandidateCosts(PRESETS["llama3-8b"], load_cluster_spec("cpu:2", "4GiB"),
                         TrainSpec(global_batch=8, seq_len=256, dtype="fp32"), 2, 1, 1, 1)
    act = cpu.block.act_bytes
    # Written to and read back from disk at the nominal 1 GB/s, shared by the 2 processes.
    assert cpu.paging_costs() == pytest.approx((0.0, 0.0, 2 * act / (1e9 / 2), 0.0, act))
    # A paged block keeps nothing on the device; paging needs one block of working space, like recomputation.
    none = cpu.stage_activation_bytes(0, 4, 0)
    paged = cpu.stage_activation_bytes(0, 4, 0, 0, 4)
    k = cpu.inflight(0)
    assert none - paged == pytest.approx(4 * k * act - act)


def test_zero3_gathered_parameters_follow_the_backend():
    # FSDP-style two whole blocks; with parameters offloaded (DeepSpeed only) its live-parameter limit, 1e9
    # elements, but never less than the largest tensor (llama3-405b's embedding, 128,256 x 16,384).
    spec = PRESETS["llama3-405b"]
    costs = CandidateCosts(spec, load_cluster_spec("8xH100-80GB"), TrainSpec(global_batch=8, seq_len=4096), 8, 1, 1, 1)
    assert costs.zero3_working_bytes(Mode(3)) == pytest.approx(2 * costs.block.params * 2)
    assert costs.zero3_working_bytes(Mode(3, "nvme", "nvme")) == pytest.approx(128256 * 16384 * 2)


def test_deepspeed_gradient_bucket_is_priced_when_offloading():
    # llama3-8b's largest layer is its embedding (128,256 x 4,096 = 525M parameters) > DeepSpeed's 5e8 default,
    # so the emitted bucket is the default: 5e8 bf16 gradients. Plans that do not offload keep no such term.
    costs = _h100_node_costs()
    assert costs.bucket_bytes(Mode(3, "cpu")) == pytest.approx(5e8 * 2)
    assert costs.bucket_bytes(Mode(3)) == 0
    # The DeepSpeed backend emits the bucket for every ZeRO-3 plan: priced under its cost profile in its bf16
    # reduction dtype, under any's in the costlier fp32 (torch reduces in fp32), not under torch's (FSDP2
    # reduce-scatters each block's gradients, no bucket).
    for backend, expected in (("deepspeed", 5e8 * 2), ("any", 5e8 * 4), ("torch", 0.0)):
        c = CandidateCosts(costs.spec, costs.cluster, costs.train, 8, 1, 1, 1, options=CostOptions(backend=backend))
        assert c.bucket_bytes(Mode(3)) == pytest.approx(expected), backend
        assert c.bucket_bytes(Mode(2)) == 0, backend
