"""Mixture-of-Experts models: read from Hugging Face config.json, counted exactly, and refused by the planner.

The reference for every total is transformers' own causal LM for the config, built on the meta device (unique
parameters). Active counts (what one token's forward pass uses) are derived by hand below and compared with the
figures the models' authors published, saying what each published figure includes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import assert_user_error, hf_config_dir, make_plan, run_cli  # noqa: E402
from paraplan.catalog import load_cluster_spec  # noqa: E402
from paraplan.cost_models import transformer as tf  # noqa: E402
from paraplan.cost_models.estimate import StrategySpec, estimate_strategy  # noqa: E402
from paraplan.errors import ModelSpecError, StrategyError  # noqa: E402
from paraplan.models.build import count_parameters  # noqa: E402
from paraplan.models.moe import count_params  # noqa: E402
from paraplan.models.presets import PRESETS, load_model_spec  # noqa: E402
from paraplan.planner.search import search_plans  # noqa: E402
from paraplan.types import MLASpec, ModelSpec, StrategyOverride, TrainSpec  # noqa: E402




def _hf_model(cfg):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def _hf_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- published configs: each model's config.json on the Hugging Face Hub ------------------------------------------

def _deepseek_v3_json() -> dict:
    """deepseek-ai/DeepSeek-V3 config.json as published (its fp8 quantization_config left out: it changes storage,
    not the architecture), in the legacy rope_scaling form that transformers 5 converts."""
    return {
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
        "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "attention_bias": False, "num_nextn_predict_layers": 1, "ep_size": 1,
    }


PUBLISHED = {
    "Mixtral-8x7B-v0.1": lambda: transformers.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None,
        num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "Qwen3-30B-A3B": lambda: transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=40960, rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=None,
        max_window_layers=48, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "DeepSeek-V3": lambda: transformers.DeepseekV3Config.from_dict(_deepseek_v3_json()),
    "Qwen1.5-MoE-A2.7B": lambda: transformers.Qwen2MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, max_position_embeddings=8192, tie_word_embeddings=False),
    "DeepSeek-V2-Lite": lambda: transformers.DeepseekV2Config(  # q_lora_rank null: queries without a latent
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
        n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, max_position_embeddings=163840),
    "gpt-oss-20b": lambda: transformers.GptOssConfig(  # openai/gpt-oss-20b: 24 layers, 32 experts
        num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088, hidden_size=2880,
        intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=128),
}

# Small variants of every optional feature of the types paraplan reads.
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
DEEPSEEK_SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, n_group=1, topk_group=1)
VARIANTS = {
    "mixtral-headdim-window": lambda: transformers.MixtralConfig(
        **SMALL, num_hidden_layers=2, head_dim=24, sliding_window=256, max_position_embeddings=1024,
        num_local_experts=4, num_experts_per_tok=2),
    "qwen2-moe-sparse-step-tied": lambda: transformers.Qwen2MoeConfig(
        **SMALL, num_hidden_layers=4, decoder_sparse_step=2, qkv_bias=False, tie_word_embeddings=True,
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "qwen3-moe-bias-step3": lambda: transformers.Qwen3MoeConfig(
        **SMALL, num_hidden_layers=3, head_dim=32, attention_bias=True, decoder_sparse_step=3, num_experts=5,
        num_experts_per_tok=5, moe_intermediate_size=40),
    "deepseek-v2-qlora-2shared-2dense": lambda: transformers.DeepseekV2Config(
        **DEEPSEEK_SMALL, num_hidden_layers=4, q_lora_rank=16, n_shared_experts=2, first_k_dense_replace=2),
    "deepseek-v3-noshared-noqlora": lambda: transformers.DeepseekV3Config(
        **DEEPSEEK_SMALL, num_hidden_layers=2, q_lora_rank=None, n_shared_experts=0, first_k_dense_replace=0),
    "gpt-oss-small": lambda: transformers.GptOssConfig(
        **SMALL, num_hidden_layers=3, head_dim=24, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # DeepSeek without shared experts
@pytest.mark.parametrize("name", [*PUBLISHED, *VARIANTS])
def test_moe_config_has_transformers_parameter_count(name: str, tmp_path: Path) -> None:
    cfg = {**PUBLISHED, **VARIANTS}[name]()
    spec = load_model_spec(str(hf_config_dir(cfg, tmp_path, name)))
    model = _hf_model(cfg)
    assert spec.moe is not None
    # Exact: a forgotten router bias (E per layer) or sink (a per layer) is far below 0.5%.
    assert count_params(spec).total == tf.model_params(spec) == _hf_params(model)
    # The layout too: which layers transformers gives an MoE MLP (its experts) and which a dense one.
    layers = model.model.layers
    assert [hasattr(layer.mlp, "experts") for layer in layers] == [spec.moe.is_moe_layer(i)
                                                                   for i in range(len(layers))]


# Presets from each published config.json (the same values read through transformers' own config classes).
@pytest.mark.parametrize("preset,published", [("mixtral-8x7b", "Mixtral-8x7B-v0.1"),
                                              ("qwen3-30b-a3b", "Qwen3-30B-A3B"), ("deepseek-v3", "DeepSeek-V3")])
def test_preset_is_its_published_config(preset: str, published: str, tmp_path: Path) -> None:
    spec = load_model_spec(str(hf_config_dir(PUBLISHED[published](), tmp_path, published)))
    assert spec.model_copy(update={"name": preset}) == PRESETS[preset]


def test_raw_published_config_json_reads(tmp_path: Path) -> None:
    # The file as downloaded (legacy rope_scaling with "type", DeepSeek's own keys transformers keeps as extras).
    path = tmp_path / "DeepSeek-V3" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_deepseek_v3_json()))
    assert load_model_spec(str(path.parent)).model_copy(update={"name": "deepseek-v3"}) == PRESETS["deepseek-v3"]


TINY_HF = {  # the tiny presets as transformers configs
    "moe-tiny": lambda: transformers.MixtralConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, sliding_window=None,
        num_local_experts=4, num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    "deepseek-tiny": lambda: transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_group=1, topk_group=1, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
}


@pytest.mark.parametrize("name", list(TINY_HF))
def test_tiny_presets_are_transformers_models(name: str, tmp_path: Path) -> None:
    cfg = TINY_HF[name]()
    spec = load_model_spec(str(hf_config_dir(cfg, tmp_path, name)))
    assert spec == PRESETS[name]
    assert tf.model_params(PRESETS[name]) == _hf_params(_hf_model(cfg))


# ---- active parameters: hand derivations and the published figures ------------------------------------------------

def test_mixtral_8x7b_total_and_active() -> None:
    h, v, layers, f, heads, kv_heads, d = 4096, 32000, 32, 14336, 32, 8, 128
    attention = 2 * h * heads * d + 2 * h * kv_heads * d  # q, o: h x a d; k, v: h x k d
    expert = 3 * h * f  # SwiGLU: gate, up, down
    common = attention + 2 * h + 8 * h  # + two RMSNorms, router 8 x h
    total = layers * (common + 8 * expert) + 2 * v * h + h  # embedding, LM head, final norm
    active = layers * (common + 2 * expert) + 2 * v * h + h  # top-2 of 8
    counts = count_params(PRESETS["mixtral-8x7b"])
    assert (counts.total, counts.active) == (total, active)
    # Mistral AI, "Mixtral of experts" (2023-12-11): 46.7B total, 12.9B used per token; both figures include the
    # embedding and the head (without them: 46.44B and 12.62B).
    assert (round(total / 1e9, 1), round(active / 1e9, 1)) == (46.7, 12.9)


def test_deepseek_v3_total_and_active() -> None:
    h, v, a, f, f_e = 7168, 129280, 128, 18432, 2048
    q = h * 1536 + 1536 + 1536 * a * (128 + 64)  # q_a_proj, q_a_layernorm, q_b_proj (d_nope + d_rope per head)
    kv = h * (512 + 64) + 512 + 512 * a * (128 + 128)  # kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj (d_nope + d_v)
    attention = q + kv + a * 128 * h  # + o_proj from a d_v
    expert = 3 * h * f_e
    dense = attention + 2 * h + 3 * h * f  # first_k_dense_replace = 3 layers
    moe_common = attention + 2 * h + 256 * h + expert  # router over 256 experts, 1 shared expert
    total = 3 * dense + 58 * (moe_common + 256 * expert) + 2 * v * h + h
    active = 3 * dense + 58 * (moe_common + 8 * expert) + 2 * v * h + h  # top-8 of 256
    counts = count_params(PRESETS["deepseek-v3"])
    assert (counts.total, counts.active) == (total, active)
    assert counts.router_buffers == 58 * 256  # e_score_correction_bias: not parameters (a buffer in transformers)
    # DeepSeek-V3 technical report: 671B total; README_WEIGHTS.md: 671B in the main model, which is what is counted
    # here (embedding and head included; the MTP module's 11.5B more, 685B on the Hub, excluded).
    assert round(total / 1e9) == 671
    # Activated per token: the report says 37B, README_WEIGHTS.md 36.7B "including 0.9B for Embedding and 0.9B for
    # the output Head". This derivation gives 37.55B, 2.3% above 36.7B; not explained by the MTP module (excluded
    # here) nor by the embedding and head (included in both). 36.7B is what remains without one v x h matrix
    # (36.63B), the convention of gpt-oss's model card (below), not the one README_WEIGHTS.md states.
    assert round(active / 1e9, 2) == 37.55
    assert abs(active - 36.7e9) / 36.7e9 < 0.025


def test_qwen3_30b_a3b_and_gpt_oss_published_counts(tmp_path: Path) -> None:
    qwen = count_params(PRESETS["qwen3-30b-a3b"])
    v, h = 151936, 2048
    # Qwen3-30B-A3B model card: 30.5B total, 29.9B without the embedding and head, 3.3B activated (ours 3.35B:
    # the card's figure is truncated, or it rounds something else away).
    assert (round(qwen.total / 1e9, 1), round((qwen.total - 2 * v * h) / 1e9, 1)) == (30.5, 29.9)
    assert 3.3e9 <= qwen.active < 3.4e9
    gpt = count_params(load_model_spec(str(hf_config_dir(PUBLISHED["gpt-oss-20b"](), tmp_path, "gpt-oss-20b"))))
    # gpt-oss model card: 20.91B total, 3.61B active; its active figure leaves out the input embedding (v h).
    assert round(gpt.total / 1e9, 2) == 20.91
    assert round((gpt.active - 201088 * 2880) / 1e9, 2) == 3.61


def test_parts_of_an_moe_block() -> None:
    moe = count_params(PRESETS["deepseek-tiny"]).moe_block
    h, e, k, f_e = 256, 8, 2, 128
    assert moe is not None and moe.dense_mlp == 0
    assert (moe.router, moe.routed_experts, moe.routed_active, moe.shared_experts) == (
        e * h, e * 3 * h * f_e, k * 3 * h * f_e, 3 * h * f_e)
    assert moe.total - moe.active == (e - k) * 3 * h * f_e


# ---- what the spec refuses --------------------------------------------------------------------------------------

BASE = dict(name="m", family="llama", n_layers=2, hidden=64, ffn_hidden=96, n_heads=4, n_kv_heads=2, vocab=300)
MLA = MLASpec(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


@pytest.mark.parametrize("fields,needle", [
    (dict(model_type="mixtral", moe=dict(n_experts=2, top_k=3, expert_ffn_hidden=96)),
     r"top_k \(3\) exceeds n_experts \(2\)"),
    (dict(model_type="mixtral"), "is a Mixture-of-Experts decoder: give moe"),
    (dict(moe=dict(n_experts=4, top_k=2, expert_ffn_hidden=96)), "model_type llama is dense"),
    (dict(model_type="mixtral", moe=dict(n_experts=4, top_k=2, expert_ffn_hidden=32)),
     "set moe.expert_ffn_hidden equal to ffn_hidden"),
    (dict(model_type="deepseek_v3", moe=dict(n_experts=4, top_k=2, expert_ffn_hidden=32,
                                             router_score_correction_bias=True)), "mla .* is required"),
    (dict(model_type="deepseek_v3", head_dim=12, mla=MLA, moe=dict(
        n_experts=4, top_k=2, expert_ffn_hidden=32, first_dense_layers=2, router_score_correction_bias=True)),
     "no layer is an MoE layer"),
    (dict(model_type="deepseek_v2", head_dim=16, mla=MLA, moe=dict(n_experts=4, top_k=2, expert_ffn_hidden=32)),
     "head_dim is the query/key head dimension"),
    (dict(model_type="deepseek_v2", head_dim=12, mla=MLA, moe=dict(n_experts=4, top_k=2, expert_ffn_hidden=32,
                                                                  n_shared_experts=1)),
     "give shared_expert_ffn_hidden exactly when n_shared_experts > 0"),
    (dict(model_type="gpt_oss", moe=dict(n_experts=4, top_k=2, expert_ffn_hidden=96, router_bias=True,
                                         expert_bias=True)), "attention_sinks must be true"),
    (dict(model_type="qwen3_moe", qk_norm=True, moe=dict(n_experts=4, top_k=2, expert_ffn_hidden=32,
                                                         n_shared_experts=1, shared_expert_ffn_hidden=32)),
     "has no shared experts"),
    (dict(family="gpt", moe=dict(n_experts=4, top_k=2, expert_ffn_hidden=96)), "apply to family llama only"),
])
def test_spec_refuses_inconsistent_moe_fields(fields: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ModelSpec(**{**BASE, **fields})


# ---- what the config reader refuses (naming the field) -----------------------------------------------------------

@pytest.mark.parametrize("make,needles", [
    (lambda: transformers.Qwen3MoeConfig(**SMALL, num_hidden_layers=2, mlp_only_layers=[1], num_experts=4,
                                         num_experts_per_tok=2), ["mlp_only_layers=[1]"]),
    (lambda: transformers.DeepseekV2Config(**DEEPSEEK_SMALL, num_hidden_layers=2, moe_layer_freq=2),
     ["moe_layer_freq=2"]),
    (lambda: transformers.DeepseekV3Config(**DEEPSEEK_SMALL, num_hidden_layers=2, attention_bias=True),
     ["attention_bias=True"]),
    (lambda: transformers.OlmoeConfig(num_experts=64, num_experts_per_tok=8),
     ["'olmoe'", "num_experts=64", "Mixture-of-Experts", "mixtral, qwen2_moe"]),
])
def test_moe_layouts_paraplan_does_not_read_are_refused(make, needles: list[str], tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError) as exc:
        load_model_spec(str(hf_config_dir(make(), tmp_path, "m")))
    for needle in needles:
        assert needle in str(exc.value)


# ---- planning and estimating MoE models (issue 11) --------------------------------------------------------------

CPU2 = ("cpu:2", TrainSpec(global_batch=8, seq_len=64, dtype="fp32"))


def test_estimate_splits_expert_states_by_hand() -> None:
    """moe-tiny (h 256, E 4, f_e 512, 4 MoE layers), fp32 AdamW (4 + 4 + 8 bytes), dp 2: routed experts hold
    4 x 4 x 3 x 256 x 512 = 6,291,456 parameters. ep 2 keeps half on each rank (edp = 2 / 2 = 1, nothing for ZeRO
    to shard); ep 1 keeps all and ZeRO-1 shards their optimizer over edp = 2."""
    spec, (cluster, train) = PRESETS["moe-tiny"], CPU2
    experts = 4 * 4 * 3 * 256 * 512
    for ep, params, optimizer in ((2, experts / 2 * 4, experts / 2 * 8), (1, experts * 4, experts * 8 / 2)):
        est = estimate_strategy(spec, load_cluster_spec(cluster), train,
                                StrategySpec(dp=2, tp=1, pp=1, micro_batch_size=1, zero_stage=1, ep=ep))
        m = est.memory_breakdown_bytes
        assert (m.expert_params, m.expert_grads, m.expert_optimizer) == (params, params, optimizer)
        assert m.expert_states + m.dense_states == pytest.approx(m.params + m.grads + m.optimizer)
    with pytest.raises(StrategyError, match="must divide the 4 experts"):
        estimate_strategy(spec, load_cluster_spec(cluster), train,
                          StrategySpec(dp=2, tp=1, pp=1, micro_batch_size=1, ep=3))
    with pytest.raises(StrategyError, match="ep x etp = 4 must divide dp x cp x tp = 2"):
        estimate_strategy(spec, load_cluster_spec(cluster), train,
                          StrategySpec(dp=2, tp=1, pp=1, micro_batch_size=1, ep=4))
    with pytest.raises(StrategyError, match="has no experts"):
        estimate_strategy(PRESETS["llama-tiny"], load_cluster_spec(cluster), train,
                          StrategySpec(dp=2, tp=1, pp=1, micro_batch_size=1, ep=2))


def test_dense_first_layers_sit_on_the_first_stages() -> None:
    """deepseek-tiny's layer 0 is dense: in a contiguous layout it belongs to the first stage holding a block."""
    spec, (cluster, train) = PRESETS["deepseek-tiny"], CPU2
    from paraplan.cost_models.costs import CandidateCosts, CostOptions

    costs = CandidateCosts(spec, load_cluster_spec("cpu:4"), train, 1, 1, 4, 1, options=CostOptions())
    assert costs.dense_blocks_per_stage([1, 1, 1, 1]) == [1, 0, 0, 0]
    assert costs.dense_blocks_per_stage([0, 2, 1, 1]) == [0, 1, 0, 0]
    assert costs.dense_block is not None and costs.dense_block.expert_params == 0 < costs.block.expert_params


def test_milp_layout_of_dense_and_moe_blocks_matches_brute_force() -> None:
    """The MILP's per-stage dense/MoE counts (module docstring of planner.milp) against every contiguous split of
    deepseek-tiny's 4 blocks over 2 stages, each priced by the evaluator with its dense count."""
    from paraplan.cost_models.costs import CandidateCosts, CostOptions, Mode, predict
    from paraplan.planner.milp import solve_stage_milp

    spec, (_, train) = PRESETS["deepseek-tiny"], CPU2
    costs = CandidateCosts(spec, load_cluster_spec("cpu:2"), train, 1, 1, 2, 1, options=CostOptions())
    mode = Mode(0)
    res = solve_stage_milp(costs, [mode], recompute="none")
    assert res is not None

    def step(split: list[int]) -> float:
        dense = costs.dense_blocks_per_stage(split)
        return predict(costs, [costs.stage_cost(s, n, 0, mode, dense_blocks=dense[s])
                               for s, n in enumerate(split)]).step_time_s - 0.0

    best = min(([n0, 4 - n0] for n0 in range(0, 5)), key=step)
    assert res.n_blocks == best
    assert res.objective_s == pytest.approx(step(best), rel=1e-6)


def test_library_plans_moe_with_expert_parallelism() -> None:
    spec, (cluster, train) = PRESETS["moe-tiny"], CPU2
    plans = search_plans(spec, load_cluster_spec(cluster), train, top_k=3, backend="unconstrained")
    for plan in plans:
        s = plan.strategy
        assert 4 % s.ep == 0 and (s.dp * s.cp * s.tp) % (s.ep * s.etp) == 0
        assert plan.predicted.memory_breakdown_bytes.expert_states > 0
    with pytest.raises(StrategyError, match="must divide the 4 experts"):
        search_plans(spec, load_cluster_spec(cluster), train, override=StrategyOverride(ep=3))


def test_cli_plans_and_estimates_moe(tmp_path: Path) -> None:
    common = ["--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64"]
    result = run_cli("plan", "moe-tiny", *common, "--backend", "unconstrained", "--strategy", "ep=2",
                     "-o", str(tmp_path / "p.json"))
    assert result.exit_code == 0, result.output
    assert "model states: dense" in result.output and "expert" in result.output
    assert json.loads((tmp_path / "p.json").read_text())["strategy"]["ep"] == 2
    result = run_cli("estimate", "deepseek-tiny", *common, "--dp", "2", "--tp", "1", "--pp", "1",
                     "--micro-batch", "1", "--ep", "2", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    m, states = out["memory_breakdown_bytes"], out["model_states_bytes"]
    assert states["expert"] > 0 and states["dense"] > 0
    assert states["dense"] + states["expert"] == pytest.approx(m["params"] + m["grads"] + m["optimizer"])
    # planned for the torch backend with ep=2, the plan launches (dry run: files written, nothing started)
    result = run_cli("plan", "moe-tiny", *common, "--backend", "torch", "--strategy", "ep=2", "-o",
                     str(tmp_path / "ep.json"))
    assert result.exit_code == 0, result.output
    result = run_cli("launch", str(tmp_path / "ep.json"), "--backend", "torch", "--dry-run", "--run-dir",
                     str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "torch_parallel.json").read_text())["expert_parallel"]["degree"] == 2
    assert_user_error(run_cli("plan", "moe-tiny", *common, "--backend", "deepspeed", "--strategy", "ep=2", "-o",
                              str(tmp_path / "ds.json")), "ep > 1 under --backend deepspeed")
    assert_user_error(run_cli("estimate", "deepseek-tiny", *common, "--dp", "2", "--tp", "1", "--pp", "1",
                              "--micro-batch", "1", "--ep", "3"), "must divide the 8 experts")
    assert_user_error(run_cli("profile", "moe-tiny", "--seq-len", "8", "--no-links", "-o",
                              str(tmp_path / "prof.json")), "Mixture-of-Experts", "without --profile")
    assert not (tmp_path / "prof.json").exists()


def test_dense_blocks_are_still_refused_by_the_dense_formulas() -> None:
    with pytest.raises(ModelSpecError, match="Mixture-of-Experts"):  # no dense formula prices an MoE block
        tf.block_params(PRESETS["moe-tiny"])


def test_cli_models_lists_moe_presets() -> None:
    result = run_cli("models")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "mixtral-8x7b" in line)
    assert "46.70B" in row and "12.88B active" in row
    assert "active" not in next(line for line in result.output.splitlines() if "llama3-8b" in line)
    listed = {p["name"]: p for p in json.loads(run_cli("models", "--json").output)}
    assert listed["deepseek-v3"]["params"] == count_params(PRESETS["deepseek-v3"]).total
    assert listed["deepseek-v3"]["active_params"] == count_params(PRESETS["deepseek-v3"]).active
    assert (listed["deepseek-v3"]["planning_supported"], listed["llama3-8b"]["planning_supported"]) == (True, True)
