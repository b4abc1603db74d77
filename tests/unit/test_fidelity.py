"""benchmarks/fidelity.py: the default rule for unstated settings, like-with-like metrics, and the statistics; and
benchmarks/moe_fidelity.py (``fidelity.py --moe``): which MoE rows are predicted, how their settings are mapped."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks" / "fidelity.py")
fidelity = importlib.util.module_from_spec(_spec)
sys.modules["fidelity"] = fidelity  # dataclasses look their module up there
_spec.loader.exec_module(fidelity)
_moe_spec = importlib.util.spec_from_file_location("moe_fidelity", ROOT / "benchmarks" / "moe_fidelity.py")
moe_fidelity = importlib.util.module_from_spec(_moe_spec)
sys.modules["moe_fidelity"] = moe_fidelity
_moe_spec.loader.exec_module(moe_fidelity)


def _row(**kw) -> dict:
    base = {"id": "r", "source_group": "llmfoundry_mpt_benchmarks", "model_name": "MPT-7b", "n_layers": 32,
            "hidden": 4096, "ffn_hidden": 16384, "n_heads": 32, "n_kv_heads": None, "seq_len": 2048, "vocab": 50368,
            "gpu_type": "NVIDIA A100 80GB", "gpu_mem_gb": 80, "n_gpus": 8, "gpus_per_node": None, "tp": 1, "pp": 1,
            "dp": 8, "sp": None, "vp": None, "zero_stage": 3, "fsdp": "FULL_SHARD", "recompute": "full activation",
            "micro_batch": 8, "global_batch": 128, "mfu": 0.5, "derived": {}, "other_measured": {}}
    base.update(kw)
    return base


def test_fully_stated_row_uses_only_what_it_states():
    case = fidelity.build_case(_row())
    st = case.strategy
    assert (st.dp, st.tp, st.pp, st.micro_batch_size, st.zero_stage, st.recompute) == (8, 1, 1, 8, 3, "full")
    assert st.attention == "flash1"  # llm-foundry's Triton FlashAttention, from its framework entry
    assert case.defaults == [] and case.fully_stated


def test_unstated_settings_follow_the_one_default_rule():
    row = _row(source_group="megatron_lm_readme_h100", model_name="GPT 70B", n_layers=84, hidden=8192,
               ffn_hidden=None, n_heads=64, seq_len=4096, vocab=131072, gpu_type="NVIDIA H100", gpu_mem_gb=None,
               n_gpus=768, tp=8, pp=2, dp=48, zero_stage=None, fsdp=None, recompute=None, micro_batch=None,
               global_batch=384, measured_tflops_per_gpu=419.7)
    case = fidelity.build_case(row)
    st = case.strategy
    assert st.micro_batch_size == 1 and st.vpp == 1  # rule fallbacks
    assert st.sequence_parallel and st.zero_stage == 1 and st.overlap_tp  # Megatron-Core's stated overlap flags
    assert case.spec.ffn_hidden == 4 * 8192
    assert st.recompute == "none"  # the least recomputation that fits: 70B over tp 8 x pp 2 fits without
    assert any("micro-batch 1" in d for d in case.defaults) and any("recompute" in d for d in case.defaults)
    assert not case.fully_stated


def test_model_parallel_size_split_puts_tp_within_a_node():
    row = _row(source_group="megatron_sc21_table2", model_name="GPT-3 175B architecture", n_layers=96,
               hidden=12288, ffn_hidden=None, n_heads=96, vocab=51200, gpu_type="NVIDIA A100 SXM 80GB",
               n_gpus=384, gpus_per_node=8, tp=None, pp=None, dp=None, zero_stage=None, fsdp=None, recompute=None,
               micro_batch=1, global_batch=1536, model_parallel_size=96, measured_tflops_per_gpu=153)
    case = fidelity.build_case(row)
    assert (case.strategy.tp, case.strategy.pp, case.strategy.dp) == (8, 12, 4)
    assert case.strategy.recompute == "full" and case.strategy.attention == "unfused"


def test_metrics_compare_like_with_like():
    sc21 = _row(source_group="megatron_sc21_table1", model_name="GPT", ffn_hidden=None, gpu_type="A100 SXM 80GB",
                n_gpus=8, zero_stage=None, fsdp=None, recompute="full", micro_batch=None, global_batch=64,
                measured_tflops_per_gpu=140)
    case = fidelity.build_case(sc21)
    est = fidelity.estimate_strategy(case.spec, case.cluster, case.train, case.strategy)
    metric, measured, predicted = fidelity._metric(case, est)
    assert metric.startswith("hw TFLOP/s") and measured == 140
    assert predicted == pytest.approx(est.hardware_tflops_per_device)  # eq. 3 counts the recomputed forward
    case = fidelity.build_case(_row())  # no NumParams stated: our own model FLOPs
    est = fidelity.estimate_strategy(case.spec, case.cluster, case.train, case.strategy)
    metric, measured, predicted = fidelity._metric(case, est)
    assert (metric, measured) == ("MFU", 0.5) and predicted == pytest.approx(est.mfu, rel=1e-12)


def test_llmfoundry_mfu_is_predicted_in_its_own_flop_count():
    # llm-foundry's benchmarking README: mfu = (3 flops_per_seq + 3 attn_flops_per_seq) seq/s / (gpus x peak) with
    # flops_per_seq = 2 N s and attn_flops_per_seq = 4 L h s^2, N its exact NumParams (MPT-7B at s = 2048,
    # position table included). Ours per sequence: Korthikanti et al. 2022 eq. 7, 72 s L h^2 (1 + s/6h + v/12hL).
    n, L, h, s, v = 6_658_859_008, 32, 4096, 2048, 50368
    case = fidelity.build_case(_row(other_measured={"num_params_exact": n}))
    est = fidelity.estimate_strategy(case.spec, case.cluster, case.train, case.strategy)
    theirs = 6 * n * s + 12 * L * h * s**2
    ours = 72 * s * L * h**2 * (1 + s / (6 * h) + v / (12 * h * L))
    assert fidelity._metric(case, est)[2] == pytest.approx(est.mfu * theirs / ours, rel=1e-9)
    assert theirs > ours  # the position table and norms count FLOPs no matmul runs: +0.14% here


def test_deepspeed_zero3_of_2021_overlaps_no_zero_traffic():
    # Its parameter all-gathers synchronized the device (DeepSpeed PR #1188), overlap_comm defaulted to false.
    row = _row(source_group="megatron_sc21_table2", model_name="GPT-3 175B architecture", n_layers=96,
               hidden=12288, ffn_hidden=None, n_heads=96, vocab=51200, gpu_type="NVIDIA A100 SXM 80GB",
               n_gpus=384, gpus_per_node=8, tp=None, pp=None, dp=None, zero_stage=3, fsdp=None, recompute=None,
               micro_batch=4, global_batch=1536, model_parallel_size=1, measured_tflops_per_gpu=144)
    case = fidelity.build_case(row)
    assert case.strategy.zero_stage == 3 and case.strategy.overlap_dp is False


def test_summary_excludes_reference_rows_and_takes_median_and_max():
    R = fidelity.Result
    rows = [R("a", "g", "MFU", 1.0, 1.02, True, [], 0, 80, ""), R("b", "g", "MFU", 1.0, 0.9, False, [], 0, 80, ""),
            R("c", "g", "MFU", 1.0, 1.3, False, [], 0, 80, ""), R("d", "g", "reference", 1.0, 9.0, False, [], 0, 80, "")]
    s = fidelity.summary(rows)
    assert s["compared"] == 3
    assert s["median_abs_error"] == pytest.approx(0.10)
    assert s["max_abs_error"] == pytest.approx(0.30)
    assert s["fully_stated_max_abs_error"] == pytest.approx(0.02) and s["goal_stated_met"]


def test_every_published_row_gets_an_estimate():
    rows = [json.loads(line) for line in fidelity.DEFAULT_DATA.read_text().splitlines() if line.strip()]
    results = fidelity.evaluate(rows)
    assert len(results) == len(rows)
    assert all(math.isfinite(r.predicted) and r.predicted > 0 for r in results)
    refs = [r for r in results if r.metric == "reference"]
    assert all(r.group.startswith("torchtitan") for r in refs)
    # The README quotes the committed results: they must be what the shipped model predicts.
    shipped = json.loads((fidelity.DEFAULT_DATA.parents[1] / "results" / "fidelity.json").read_text())["summary"]
    now = fidelity.summary(results)
    assert now["median_abs_error"] == pytest.approx(shipped["median_abs_error"], rel=1e-9)
    assert now["rows_over_12pct"] == shipped["rows_over_12pct"]


@pytest.mark.xfail(strict=True, reason="issue 12: with the backend cost profiles the median |error| is 6.3% (goal 5%): "
                   "the Megatron-Core H100 rows now reduce gradients in fp32 as Megatron does with bf16 and are "
                   "predicted ~10% slow (README, 'Cost-model fidelity')")
def test_fidelity_meets_the_median_goal():
    rows = [json.loads(line) for line in fidelity.DEFAULT_DATA.read_text().splitlines() if line.strip()]
    assert fidelity.summary(fidelity.evaluate(rows))["median_abs_error"] <= fidelity.GOAL_MEDIAN


# ---- Mixture-of-Experts table (benchmarks/moe_fidelity.py) ---------------------------------------------------------

@pytest.fixture(scope="module")
def moe_rows() -> dict[str, dict]:
    return {row["id"]: row for row in moe_fidelity.load(moe_fidelity.DEFAULT_DATA)}


@pytest.fixture(scope="module")
def moe_results(moe_rows) -> dict[str, object]:
    return {r.id: r for r in moe_fidelity.evaluate(list(moe_rows.values()))}


def test_moe_table_predicts_or_excludes_every_row(moe_rows, moe_results):
    assert list(moe_results) == list(moe_rows)
    for r in moe_results.values():
        assert bool(r.excluded) != (r.metric != "")  # excluded with a reason, or predicted with a metric
        if not r.excluded:
            assert math.isfinite(r.predicted) and r.predicted > 0 and r.measured > 0
    s = moe_fidelity.summary(list(moe_results.values()))
    assert s["predicted"] + s["excluded"] == len(moe_rows) and s["predicted"] >= 15


def test_every_h100_bf16_row_is_predicted_or_refused_by_the_library(moe_rows, moe_results):
    h100_bf16 = [i for i, row in moe_rows.items() if moe_fidelity.device_of(row["gpu_type"]) == "H100-80GB"
                 and moe_fidelity.precision_of(row) == "bf16"]
    assert len(h100_bf16) == 28  # benchmarks/data/README.md: 40 H100 rows, 12 of them FP8
    for i in h100_bf16:
        why = moe_results[i].excluded
        # gpt-oss is refused by ModelSpec.check_seq_len, the rest by the estimator (its message printed): nothing
        # is left out for want of trying.
        assert why == "" or why.startswith(("gpt-oss", "the estimator refuses")), (i, why)
    for r in moe_results.values():  # and nothing else is predicted
        if not r.excluded:
            assert r.id in h100_bf16


def test_fp8_and_devices_the_catalog_lacks_are_excluded(moe_results):
    assert moe_results["bridge_2509_h100_deepseek-v3_1024"].excluded.startswith("FP8")  # "FP8 implied"
    assert moe_results["dgxc_grok1_fp8_h100_512"].excluded.startswith("FP8")
    assert moe_results["bridge_2602_gb300_qwen3-30b-a3b_8_fp8mx"].excluded.startswith("FP8")  # MXFP8
    assert moe_results["dgxc_dsv3_bf16_gb200_128"].excluded.startswith("no catalog device for NVIDIA GB200")
    assert moe_results["dgxc_dsv3_bf16_h100_512"].excluded == ""  # 'BF16 (README: "FP8 recipe is not ...")'
    gpt_oss = moe_results["bridge_2511_h100_gpt-oss-120b_64_bf16"].excluded
    assert "sliding window of 128 tokens" in gpt_oss  # the library's own refusal (ModelSpec.check_seq_len)


def test_predicted_moe_rows_beyond_20pct_name_a_cause(moe_results):
    for r in moe_results.values():
        if not r.excluded and abs(r.error) > moe_fidelity.MISS:
            assert r.reason in moe_fidelity.REASONS, (r.id, r.error)
        elif not r.excluded:
            assert r.reason == ""


def test_moe_median_goal(moe_results):
    assert moe_fidelity.summary(list(moe_results.values()))["median_abs_error"] <= moe_fidelity.GOAL_MEDIAN


def test_moe_report_is_what_the_shipped_model_predicts(moe_results):
    # The committed report quotes these numbers: regenerate it (its first line names the command) when they move.
    text = moe_fidelity.RESULTS.read_text()
    assert moe_fidelity.COMMAND in text
    last = [line for line in text.splitlines() if line.startswith("rows ")][-1]
    s = moe_fidelity.summary(list(moe_results.values()))
    assert f"predicted {s['predicted']}, excluded {s['excluded']}" in last
    assert f"median |error| {100 * s['median_abs_error']:.1f}%" in last


def test_megatron_selective_modules_map_to_the_nearest_recomputation(moe_rows):
    spec = moe_fidelity.row_spec(moe_rows["modelzoo_qwen3_235b_h100_256_s16k_forced"])  # Qwen3-235B-A22B
    # By hand (h 4096, 64 heads x 128, top-8 of 128 experts of 1536): the MoE MLP repeats 8 * 6*4096*1536 + router
    # 2*4096*128 = 303,038,464 FLOPs per token; the attention core at s (causal half) 2 s * 64 * 256 * 0.5.
    f = moe_fidelity.recomputed_flops_per_token(spec, 16384, ["layernorm", "moe"])
    assert f["row"] == 303_038_464 and f["selective"] == 2 * 16384 * 64 * 256 * 0.5  # 268M: nearest
    assert moe_fidelity.map_recompute(spec, 16384, ["layernorm", "moe"])[0] == "selective"
    assert moe_fidelity.map_recompute(spec, 65536, ["layernorm", "moe"])[0] == "none"  # core 1074M: none nearer
    assert moe_fidelity.map_recompute(spec, 4096, ["norm", "act"])[0] == "none"  # element-wise only
    assert moe_fidelity.map_recompute(spec, 4096, ["core_attn"])[0] == "selective"


def test_embedding_and_loss_count_as_layers_in_the_model_zoo_split(moe_rows):
    spec = moe_fidelity.row_spec(moe_rows["modelzoo_qwen3_235b_h100_256_1"])  # 94 layers
    # (94 + 2) / (8 x 4) = 3 units per virtual stage; the first holds the embedding, the last the loss.
    assert moe_fidelity.embed_loss_blocks(spec, 8, 4) == (2, *[3] * 30, 2)
    assert moe_fidelity.embed_loss_blocks(spec, 32, 3) == (0, *[1] * 94, 0)
    assert moe_fidelity.embed_loss_blocks(spec, 5, 1) is None and moe_fidelity.embed_loss_blocks(spec, 1, 1) is None
    case = moe_fidelity.build_case(moe_rows["modelzoo_qwen3_235b_h100_256_4"])
    assert case.strategy.stage_blocks == (0, *[1] * 94, 0)  # pp 32 x vpp 3: the layout the even split cannot run


def test_moe_defaults_follow_framework_then_rule(moe_rows):
    qwen = moe_fidelity.build_case(moe_rows["dgxc_qwen3_235b_bf16_h100_256_example"]).strategy
    # Megatron's default etp = tp = 2 cannot tile: ep 32 x 2 = 64 does not divide tp x dp = 32 per stage.
    assert (qwen.etp, qwen.zero_stage, qwen.sequence_parallel, qwen.overlap_tp) == (1, 1, True, False)
    grok = moe_fidelity.build_case(moe_rows["dgxc_grok1_bf16_h100_512"]).strategy
    assert (grok.etp, grok.cp, grok.vpp) == (4, 2, 8)  # etp = tp, which tiles: 8 x 4 divides 4 x 2 x 8
    zoo = moe_fidelity.build_case(moe_rows["modelzoo_qwen3_235b_h100_256_s128k_forced"]).strategy
    assert (zoo.micro_batch_size, zoo.etp, zoo.overlap_tp, zoo.dp) == (1, 1, True, 1)  # runtime.conf, yaml, sbatch
    fsdp = moe_fidelity.build_case(moe_rows["modelzoo_qwen3_235b_h100_256_3"]).strategy
    assert (fsdp.zero_stage, fsdp.recompute) == (3, "full")
    auto = moe_fidelity.build_case(moe_rows["automodel_h100_qwen3-30b-a3b_8"]).strategy
    assert (auto.zero_stage, auto.recompute, auto.micro_batch_size) == (3, "full", 4)  # its benchmark config
    mixtral = moe_fidelity.build_case(moe_rows["megatron_moe_readme_mixtral8x7b_h100_64"])
    assert mixtral.strategy.vpp == 8 and any("rule: least that fits" in d for d in mixtral.defaults)
    for row in moe_rows.values():  # every predicted row at the balanced router, dropless
        if not moe_fidelity.exclusion(row):
            st = moe_fidelity.build_case(row).strategy
            assert st.routing_imbalance == 1.0 and st.capacity_factor is None


def test_unstated_recompute_is_the_least_that_fits(moe_rows):
    case = moe_fidelity.build_case(moe_rows["dgxc_dsv3_bf16_h100_512"])
    est = {mode: fidelity.estimate_strategy(case.spec, case.cluster, case.train,
                                            replace(case.strategy, recompute=mode)).fits
           for mode in ("none", "selective", "full")}
    first_fit = next((m for m in ("none", "selective", "full") if est[m]), "full")
    assert case.strategy.recompute == first_fit


def test_megatron_flop_counters_by_hand(moe_rows):
    # MCore v0.8 (training.py, 2024): 12 B s L h^2 (1 + (3/2) K f/h + g/a + s/h + v/(2 L h)) per step: the full s x s
    # score square. Mixtral 8x7B: L 32, h 4096, f 14336, K 2, g/a = 8/32, s 4096, v 32000.
    case = moe_fidelity.build_case(moe_rows["megatron_moe_readme_mixtral8x7b_h100_64"])
    est = fidelity.estimate_strategy(case.spec, case.cluster, case.train, case.strategy)
    L, h, f, K, s, v = 32, 4096, 14336, 2, 4096, 32000
    per_token = 12 * L * h * h * (1 + 1.5 * K * f / h + 8 / 32 + s / h + v / (2 * L * h))
    tokens = est.tokens_per_s / 64
    assert moe_fidelity.predicted_value(case, est, "model TFLOP/s/GPU") == pytest.approx(tokens * per_token / 1e12)
    # 2025 counter (causal half of the scores): Qwen3-235B at 16k, d 128, 4 kv heads, 94 layers, v 151936.
    case = moe_fidelity.build_case(moe_rows["modelzoo_qwen3_235b_h100_256_s16k_forced"])
    est = fidelity.estimate_strategy(case.spec, case.cluster, case.train, case.strategy)
    h, a, g, d, s, L, v = 4096, 64, 4, 128, 16384, 94, 151936
    layer = 2 * (2 * h * a * d + 2 * h * g * d) + 2 * s * a * 2 * d * 0.5 + 8 * 6 * h * 1536
    per_token = 3 * (L * layer + 2 * h * v)
    tokens = est.tokens_per_s / 256
    assert moe_fidelity.predicted_value(case, est, "model TFLOP/s/GPU") == pytest.approx(tokens * per_token / 1e12)


def test_moe_rows_use_their_dispatcher_and_attention_kernel(moe_rows):
    """A row that states DeepEP across nodes is priced with moe.deepep_time_s, which is faster there than the NCCL
    all-to-all; every framework of the table runs TransformerEngine's Hopper attention (flash3)."""
    import dataclasses

    from paraplan.cost_models.estimate import estimate_strategy

    case = moe_fidelity.build_case(moe_rows["modelzoo_qwen3_235b_h100_256_1"])
    assert (case.strategy.dispatcher, case.strategy.attention) == ("deepep", "flash3")
    nccl = dataclasses.replace(case.strategy, dispatcher="alltoall")
    fast = estimate_strategy(case.spec, case.cluster, case.train, case.strategy).tokens_per_s
    assert fast > 1.1 * estimate_strategy(case.spec, case.cluster, case.train, nccl).tokens_per_s
    stated = moe_fidelity.build_case(moe_rows["modelzoo_qwen3_235b_h100_256_4"])  # "NCCL all-to-all" in the row
    assert stated.strategy.dispatcher == "alltoall"


def test_fidelity_moe_option_prints_the_moe_table(capsys):
    assert fidelity.main(["--moe"]) == 0
    out = capsys.readouterr().out
    assert "modelzoo_qwen3_235b_h100_256_1" in out and "rows 96: predicted" in out

