"""Analytic MoE costs (paraplan.cost_models.moe): every expected value is derived by hand in the comments from the
formula and the preset's dimensions, or read from the published Megatron-Bridge rows of
benchmarks/data/moe_runs.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paraplan.catalog import gpu_cluster
from paraplan.cost_models import moe as m
from paraplan.cost_models.comm import LINK_EFFICIENCY
from paraplan.errors import ModelSpecError, StrategyError
from paraplan.models.presets import PRESETS
from paraplan.types import ModelSpec, MoESpec

TINY = PRESETS["moe-tiny"]  # h 256, f 512, a 4, k 2, d 64, v 256, L 4 (all MoE), E 4, K 2, f_e 512
DS = PRESETS["deepseek-tiny"]  # h 256, f 512, a 4, v 256, L 4 (layer 0 dense), E 8, K 2, f_e 128, S 1 f_s 128,
# MLA r_q 64, r_kv 64, d_n 32, d_r 16, d_v 32
RUNS = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "moe_runs.jsonl"


# ---- FLOPs ------------------------------------------------------------------------------------------------------

def test_moe_tiny_flops_by_hand():
    # attention at s=128, full square: 2 (2*256*4*64 + 2*256*2*64) = 2 (131072 + 65536) = 393216 projections,
    # scores + values 2 s a (d + d) = 2*128*4*128 = 131072  -> 524288
    assert m.attention_fwd_flops_per_token(TINY, 128) == 524288
    # causal half (Megatron): 393216 + 65536 = 458752
    assert m.attention_fwd_flops_per_token(TINY, 128, causal_fraction=0.5) == 458752
    # router 2 h E = 2*256*4 = 2048; K=2 SwiGLU experts 2 * 6*256*512 = 1572864 -> 1574912
    assert m.mlp_fwd_flops_per_token(TINY, moe_layer=True) == 1574912
    assert m.mlp_fwd_flops_per_token(TINY, moe_layer=True, count_router=False) == 1572864
    # model: 3 (4 (524288 + 1574912) + 2 h v = 2*256*256 = 131072) = 3 * 8527872 = 25583616
    assert m.model_flops_per_token(TINY, 128) == 25583616


def test_deepseek_tiny_mla_flops_by_hand():
    # MLA projections: q down 256*64 = 16384, q up 64*4*(32+16) = 12288, kv down 256*(64+16) = 20480,
    # kv up 64*4*(32+32) = 16384, o 4*32*256 = 32768: sum 98304, x2 = 196608.
    # scores 2 s a (d_n + d_r) = 2*128*4*48 = 49152, values 2 s a d_v = 2*128*4*32 = 32768 -> 278528
    assert m.attention_fwd_flops_per_token(DS, 128) == 278528
    # MoE MLP: router 2*256*8 = 4096, routed 2 * 6*256*128 = 393216, shared 6*256*128 = 196608 -> 593920
    assert m.mlp_fwd_flops_per_token(DS, moe_layer=True) == 593920
    # dense first layer: 6*256*512 = 786432
    assert m.mlp_fwd_flops_per_token(DS, moe_layer=False) == 786432
    # model: 3 (3 MoE (278528 + 593920) + 1 dense (278528 + 786432) + 2*256*256)
    #      = 3 (2617344 + 1064960 + 131072) = 3 * 3813376 = 11440128
    assert m.model_flops_per_token(DS, 128) == 11440128


def test_mla_without_query_latent():
    # q direct: h a (d_n + d_r) = 256*4*48 = 49152 replaces 16384 + 12288 = 28672: +20480 projections, x2 = +40960
    spec = DS.model_copy(update={"mla": DS.mla.model_copy(update={"q_lora_rank": None})})
    assert m.attention_fwd_flops_per_token(spec, 128) == 278528 + 40960


def _row(row_id: str) -> dict:
    for line in RUNS.read_text().splitlines():
        row = json.loads(line)
        if row["id"] == row_id:
            return row
    raise AssertionError(f"{row_id} not in {RUNS}")


def _spec_from_row(row: dict) -> ModelSpec:
    return ModelSpec(
        name=row["id"], family="llama", model_type="qwen3_moe", n_layers=row["n_layers"], hidden=row["hidden"],
        ffn_hidden=row["ffn_hidden"], n_heads=row["n_heads"], n_kv_heads=row["n_kv_heads"],
        head_dim=row["head_dim"], vocab=row["vocab"], qk_norm=True,
        moe=MoESpec(n_experts=row["n_experts"], top_k=row["top_k"], expert_ffn_hidden=row["expert_ffn_hidden"]))


@pytest.mark.parametrize(("row_id", "preset", "mtp"), [
    ("bridge_2602_gb300_qwen3-30b-a3b_8_fp8mx", "qwen3-30b-a3b", 0),  # 23.0 GFLOP/token
    ("bridge_2602_gb300_qwen3-235b-a22b_256_fp8mx", None, 0),  # 148.0, spec built from the row's config fields
    ("bridge_2511_gb300_deepseek-v3_256_bf16", "deepseek-v3", 0),  # 249.7, "w/o MTP"
    ("bridge_2602_gb200_deepseek-v3_256_fp8mx", "deepseek-v3", 1),  # 259.9, the 26.02 recipe trains one MTP layer
])
def test_megatron_convention_matches_published_flops(row_id, preset, mtp):
    # Megatron's counter (training.py num_floating_point_operations): causal half of the scores, no router.
    # Qwen3-30B-A3B by hand: per layer 2 (2*2048*4096 + 2*2048*512) = 37.75M + scores 2*4096*32*256*0.5 = 33.55M
    # + experts 8 * 6*2048*768 = 75.50M = 146.80M; x48 = 7.046G; head 2*2048*151936 = 0.622G; x3 = 23.0G.
    row = _row(row_id)
    spec = PRESETS[preset] if preset else _spec_from_row(row)
    published = row["derived"]["model_gflop_per_token_implied"]["value"] * 1e9
    ours = m.model_flops_per_token(spec, row["seq_len"], causal_fraction=m.MEGATRON_CAUSAL_FRACTION,
                                   count_router=False, mtp_layers=mtp)
    assert ours == pytest.approx(published, rel=0.01)


def test_dense_model_refused():
    with pytest.raises(ModelSpecError):
        m.model_flops_per_token(PRESETS["llama-tiny"], 128)


# ---- memory -----------------------------------------------------------------------------------------------------

def test_edp_algebra():
    # Megatron-Core: tp cp dp = etp ep edp per stage, edp = world / (pp ep etp): 64 / (4*8*1) = 2
    assert m.expert_data_parallel_size(64, 4, 8, 1) == 2
    assert m.expert_data_parallel_size(64, 4, 4, 2) == 2
    assert m.expert_data_parallel_size(64, 1, 8, 1) == 8
    with pytest.raises(StrategyError):
        m.expert_data_parallel_size(64, 4, 3, 1)


def test_moe_tiny_state_bytes_by_hand():
    # attention 2*256*4*64 + 2*256*2*64 = 196608, norms 512, router 4*256 = 1024, routed 4 * 3*256*512 = 1572864.
    # tp 1, pp 1, dp 2, cp 1, ep 2, etp 1, ZeRO-1, four MoE layers, embedding and head on the stage, bf16 (2/2/12).
    # dense = 4 (196608 + 512 + 1024) + 256*256 + (256 + 256*256) = 792576 + 131328 = 923904 parameters
    # expert = 4 * 1572864 / 2 = 3145728; edp = 2 / (1*2*1) = 1 (ZeRO divides expert states by 1)
    b = m.moe_state_bytes(TINY, tp=1, pp=1, dp=2, cp=1, ep=2, etp=1, zero_stage=1, n_dense_layers=0,
                          n_moe_layers=4, has_embed=True, has_head=True)
    assert (b.dense_params, b.dense_grads, b.dense_optimizer) == (2 * 923904, 2 * 923904, 12 * 923904 / 2)
    assert (b.expert_params, b.expert_grads, b.expert_optimizer) == (2 * 3145728, 2 * 3145728, 12 * 3145728)


def test_deepseek_tiny_state_bytes_by_hand():
    # MLA attention: q 256*64 + 64 + 64*4*48 = 28736; kv 256*80 + 64 + 64*4*64 = 36928; o 4*32*256 = 32768
    #   -> 98432. Dense MLP 3*256*512 = 393216; router 8*256 = 2048; shared 3*256*128 = 98304;
    #   routed 8 * 3*256*128 = 786432; norms 512.
    # tp 2, pp 2, dp 2, cp 1 (world 8), ep 4, etp 1 -> edp = 8 / (2*4*1) = 1; ZeRO-2; one dense + one MoE layer
    # and the embedding on this stage.
    # dense = (98432/2 + 512 + 393216/2) + (98432/2 + 512 + 2048 + 98304/2) + 256*256/2
    #       = 246336 + 100928 + 32768 = 380032
    # expert = 786432 / (4*1) = 196608
    b = m.moe_state_bytes(DS, tp=2, pp=2, dp=2, cp=1, ep=4, etp=1, zero_stage=2, n_dense_layers=1,
                          n_moe_layers=1, has_embed=True)
    assert (b.dense_params, b.dense_grads, b.dense_optimizer) == (2 * 380032, 2 * 380032 / 2, 12 * 380032 / 2)
    assert (b.expert_params, b.expert_grads, b.expert_optimizer) == (2 * 196608, 2 * 196608, 12 * 196608)
    assert b.total == b.dense + b.expert


def test_expert_states_scale_with_ep_times_etp_and_edp():
    # world 64 = tp 1 pp 4 dp 16 cp 1. Expert parameters divide by ep etp: ep 8 etp 1 and ep 4 etp 2 hold the same.
    kw = dict(tp=1, pp=4, dp=16, cp=1, zero_stage=0, n_dense_layers=0, n_moe_layers=1)
    spec = DS  # E = 8
    one = m.moe_state_bytes(spec, ep=1, etp=1, **kw)
    e8 = m.moe_state_bytes(spec, ep=8, etp=1, **kw)
    e4t2 = m.moe_state_bytes(spec, ep=4, etp=2, **kw)
    assert e8.expert_params == pytest.approx(one.expert_params / 8)
    assert e4t2.expert == pytest.approx(e8.expert)
    assert e8.dense == one.dense  # dense states do not depend on ep
    # ZeRO-1 shards expert optimizer states over edp = 64 / (4*8*1) = 2 and dense ones over dp cp = 16
    z1 = m.moe_state_bytes(spec, ep=8, etp=1, **{**kw, "zero_stage": 1})
    assert z1.expert_optimizer == pytest.approx(e8.expert_optimizer / 2)
    assert z1.dense_optimizer == pytest.approx(e8.dense_optimizer / 16)
    z3 = m.moe_state_bytes(spec, ep=8, etp=1, **{**kw, "zero_stage": 3})
    assert z3.expert_params == pytest.approx(e8.expert_params / 2)


def test_ep_must_divide_experts():
    with pytest.raises(StrategyError, match="divisors of 8"):
        m.moe_state_bytes(DS, tp=1, pp=1, dp=6, cp=1, ep=3, etp=1, zero_stage=0, n_dense_layers=0,
                          n_moe_layers=1)


# ---- all-to-all ---------------------------------------------------------------------------------------------------

def test_all_to_all_volume():
    # T = 1024 tokens, K 2, h 256, bf16, ep 4: 1024*2*256*2 * 3/4 = 786432 bytes per all-to-all
    v = m.all_to_all_volume(1024, TINY, ep=4, dtype_bytes=2)
    assert v.per_all_to_all == 786432
    assert v.forward == v.backward == 2 * 786432
    assert m.all_to_all_volume(1024, TINY, ep=1, dtype_bytes=2).forward == 0
    # imbalance 1.5 scales it
    assert m.all_to_all_volume(1024, TINY, ep=4, dtype_bytes=2, load=1.5).per_all_to_all == 1.5 * 786432


def test_routed_load():
    assert m.routed_load() == 1.0
    assert m.routed_load(imbalance=1.3) == 1.3
    assert m.routed_load(capacity_factor=1.25, imbalance=1.5) == 1.25  # dropped above capacity
    assert m.routed_load(capacity_factor=1.25, imbalance=1.1) == 1.1
    assert m.routed_load(capacity_factor=1.25, pad_to_capacity=True) == 1.25
    with pytest.raises(ValueError):
        m.routed_load(imbalance=0.5)


def test_all_to_all_time():
    c = gpu_cluster(2, 8, "H100-80GB")
    bw_i = c.intra_node_bandwidth_bytes_per_s * LINK_EFFICIENCY
    bw_x = c.inter_node_bandwidth_bytes_per_s * LINK_EFFICIENCY
    n = 1e8
    assert m.all_to_all_time_s(c, n, ep=1) == 0
    # ep 8 within a node: n / bw + 7 latencies
    assert m.all_to_all_time_s(c, n, ep=8) == pytest.approx(n / bw_i + 7 * c.intra_node_latency_s)
    # ep 16 over 2 nodes, 8 per node: 7/15 of the bytes over NVLink, 8/15 over the NIC, aggregated per
    # destination node: one inter-node latency
    want = (n * 7 / 15 / bw_i + 7 * c.intra_node_latency_s + n * 8 / 15 / bw_x + 1 * c.inter_node_latency_s)
    assert m.ep_spans_nodes(c, 16)
    assert m.all_to_all_time_s(c, n, ep=16) == pytest.approx(want)
    assert m.all_to_all_time_s(c, n, ep=16) > m.all_to_all_time_s(c, n, ep=8)


# ---- activations ----------------------------------------------------------------------------------------------------

def test_routed_activation_and_mla_kv_by_hand():
    # compressed KV: 100 * (64 + 16) * 2 = 16000
    assert m.mla_compressed_kv_bytes(DS, 100, 2) == 16000
    with pytest.raises(ModelSpecError):
        m.mla_compressed_kv_bytes(TINY, 100, 2)


def test_moe_tiny_block_work_by_hand():
    """moe-tiny (h 256, a 4, k 2, d 64, E 4, K 2, f_e 512), b 1, s 8, t 1, ep 2, bf16; M = T = 8 tokens."""
    w = m.block_work(TINY, True, b=1, s=8, t=1, ep=2, etp=1, dtype_bytes=2, sp=False)
    # q (8, 256, 256), k and v (8, 256, 128), o (8, 256, 256); router (8, 256, 4); 16 routed copies over 4 experts
    # on 2 ranks: each local expert gets 16 x 2 / 4 = 8 copies; gate and up (8, 256, 512) x 2 local experts = 4,
    # down (8, 512, 256) x 2
    assert w.gemms == ((8, 256, 256, 1), (8, 256, 128, 2), (8, 256, 256, 1), (8, 256, 4, 1), (8, 256, 512, 4),
                       (8, 512, 256, 2))
    assert w.attn_flops == 4 * 8 * 8 * 4 * 64
    # saved: 8 x 4h = 8192; q, o 2 x 256, k, v 2 x 128 per token: 8 x 768 = 6144; routed 16 x (256 + 4 x 512) = 36864;
    # router fp32 8 x 8 x 4 bytes = 128 elements of 2 bytes
    assert w.act_bytes == (8192 + 6144 + 36864 + 128) * 2
    assert w.ckpt_bytes == 8 * 256 * 2
    # attention 2 x 256^2 + 2 x 256 x 128 = 196608, norms 512, router 1024; experts 4 x 3 x 256 x 512 / 2
    assert (w.params, w.expert_params) == (196608 + 512 + 1024, 4 * 3 * 256 * 512 / 2)
    # each rank sends half of its 16 copies of 256 bf16 values
    assert w.a2a_bytes == 8 * 256 * 2 and w.etp_bytes == 0
    # element-wise: 10h x 8 = 20480, rotary 2 (256 + 128) x 8 = 6144, SwiGLU + permutation 16 (3 x 512 + 4 x 256)
    assert w.elementwise_bytes == (20480 + 6144 + 40960) * 2


def test_deepep_dispatch_by_hand():
    """2 nodes x 8 H100, ep 16, deepseek-tiny (h 256, K 2), 1000 tokens, bf16: a token reaches the other node with
    probability 1 - (1/2)^2 = 0.75 -> IB 1000 x 0.75 x 256 x 2 = 384,000 bytes; NVLink 1000 x 2 x 256 x 2 x 7/8 =
    896,000 bytes; the two overlap."""
    c = gpu_cluster(2, 8, "H100-80GB")
    bw_i = c.intra_node_bandwidth_bytes_per_s * LINK_EFFICIENCY
    bw_x = c.inter_node_bandwidth_bytes_per_s * LINK_EFFICIENCY
    want = max(384_000 / bw_x + c.inter_node_latency_s, 896_000 / bw_i + 7 * c.intra_node_latency_s)
    assert m.deepep_time_s(c, 1000, DS, ep=16, dtype_bytes=2) == pytest.approx(want)
    # within a node it is the plain all-to-all of the same copies
    assert m.deepep_time_s(c, 1000, DS, ep=8, dtype_bytes=2) == pytest.approx(
        m.all_to_all_time_s(c, 1000 * 2 * 256 * 2 * 7 / 8, ep=8))


def test_dense_first_layers_over_interleaved_chunks():
    from paraplan.cost_models.estimate import StrategySpec, dense_blocks_per_rank

    # deepseek-tiny: 4 blocks, layer 0 dense; pp 2 x vpp 2, chunks in model order on ranks 0, 1, 0, 1
    st = StrategySpec(dp=1, tp=1, pp=2, micro_batch_size=1, vpp=2)
    assert dense_blocks_per_rank(st, DS, [2, 2]) == [1, 0]  # chunks of 1 block each: the first is rank 0's
    st = StrategySpec(dp=1, tp=1, pp=2, micro_batch_size=1, vpp=2, stage_blocks=(0, 1, 1, 2))
    assert dense_blocks_per_rank(st, DS, [1, 3]) == [0, 1]  # rank 0's first chunk holds only the embedding
    assert dense_blocks_per_rank(st, TINY, [1, 3]) == [0, 0]


def test_flash3_is_hopper_only():
    from paraplan.catalog import DEVICES
    from paraplan.cost_models import efficiency as eff

    h100, a100 = (eff.device_efficiency(DEVICES[n]) for n in ("H100-80GB", "A100-80GB"))
    assert h100.attention_fraction["flash3"] == pytest.approx(0.35 * 1.75)  # FA3 paper: 1.5-2.0x FA2's 35%
    assert a100.attention_fraction["flash3"] == a100.attention_fraction["flash2"]
