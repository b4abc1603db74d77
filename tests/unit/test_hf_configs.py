"""Hugging Face config.json files are modelled exactly or refused, never planned as another architecture.

Each config is built with transformers' own config class and written as ``config.json``; the reference parameter
count is transformers' own model built from it on the meta device (unique parameters; tied weights once). An
accepted config must give exactly that count from paraplan's formula (``model_params``) and from paraplan's built
chain; a refused one must raise a ModelSpecError naming the field and its value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import hf_config_dir  # noqa: E402
from paraplan.cost_models import transformer as tf  # noqa: E402
from paraplan.errors import ModelSpecError, TrainSpecError  # noqa: E402
from paraplan.models.build import build_model, count_parameters  # noqa: E402
from paraplan.models.presets import PRESETS, load_model_spec  # noqa: E402
from paraplan.types import ModelSpec  # noqa: E402




def _hf_params(cfg) -> int:
    """Unique parameters of transformers' own causal LM for ``cfg``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


# ---- accepted: published sizes (values from each model's config.json on the Hugging Face Hub) ----------------------

ACCEPTED = {
    "Llama-3.1-8B": lambda: transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "Llama-3.2-1B": lambda: transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "Mistral-7B-v0.1": lambda: transformers.MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5),
    "Qwen2.5-7B": lambda: transformers.Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, use_sliding_window=False, sliding_window=131072,
        max_window_layers=28, tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 1000000.0}),
    "Qwen2.5-0.5B": lambda: transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True),
    "Qwen3-8B": lambda: transformers.Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=False),
    "Qwen3-0.6B": lambda: transformers.Qwen3Config(  # head_dim 128 while hidden / heads = 64
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(),  # GPT-2 small, 124M, tied head
    # Small variants of every optional feature the accepted types have.
    "llama-biases-headdim": lambda: transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, attention_bias=True, mlp_bias=True),
    "qwen3-bias-tied": lambda: transformers.Qwen3Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, attention_bias=True, tie_word_embeddings=True),
    "qwen2-window": lambda: transformers.Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=256, max_window_layers=1),
    "mistral-headdim": lambda: transformers.MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=None),
    "gpt2-untied-inner": lambda: transformers.GPT2Config(
        vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_inner=100, n_positions=128, tie_word_embeddings=False,
        activation_function="gelu_pytorch_tanh"),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_config_has_transformers_parameter_count(name: str, tmp_path: Path) -> None:
    cfg = ACCEPTED[name]()
    spec = load_model_spec(str(hf_config_dir(cfg, tmp_path, name)))
    expected = _hf_params(cfg)
    # Exact, not within 0.5%: a forgotten bias (h per layer) or q/k norm (2 d per layer) is far below 0.5%.
    assert tf.model_params(spec) == expected
    assert count_parameters(spec) == expected  # what paraplan builds and launches is that same model
    assert spec.name == name


def test_llama31_8b_config_is_the_llama3_8b_preset(tmp_path: Path) -> None:
    # Same published dimensions (Dubey et al. 2024, Table 3); only the name, context and RoPE scaling differ.
    spec = load_model_spec(str(hf_config_dir(ACCEPTED["Llama-3.1-8B"](), tmp_path, "Llama-3.1-8B")))
    assert tf.model_params(spec) == tf.model_params(PRESETS["llama3-8b"]) == 8_030_261_248
    assert spec.rope_scaling is not None and spec.rope_scaling["rope_type"] == "llama3"


def test_qwen3_head_dim_drives_costs(tmp_path: Path) -> None:
    # Qwen3-0.6B: h 1024, a 16, k 8, d 128, so the attention width a d = 2048 is twice h.
    spec = load_model_spec(str(hf_config_dir(ACCEPTED["Qwen3-0.6B"](), tmp_path, "Qwen3-0.6B")))
    assert (spec.head_dim, spec.qk_norm, spec.qkv_bias) == (128, True, False)
    h, f, a, k, d = 1024, 3072, 16, 8, 128
    # q, o: h x a d; k, v: h x k d; SwiGLU 3 h f.
    assert tf.block_matmul_params(spec) == 2 * h * a * d + 2 * h * k * d + 3 * h * f
    # two RMSNorms h each, q_norm and k_norm d each.
    assert tf.block_params(spec) == tf.block_matmul_params(spec) + 2 * h + 2 * d
    b, s = 2, 512
    assert tf.attention_fwd_flops(spec, b, s) == 4 * b * s * s * a * d  # per head 2 x (2 s^2 d)
    # replicated 4h; sharded Q and attention output a d each, K and V k d each, 4f of SwiGLU, q/k norm inputs.
    per_token = 4 * h + 2 * a * d + 2 * k * d + 4 * f + a * d + k * d
    assert tf.block_activation_bytes(spec, b, s, t=1, dtype_bytes=2) == b * s * 2 * per_token


# ---- refused: the message must name the field and its value ----------------------------------------------------

REFUSED = {
    # Mixture-of-Experts types paraplan does not read (those it reads: tests/unit/test_moe_models.py).
    "OLMoE-1B-7B": (lambda: transformers.OlmoeConfig(num_experts=64, num_experts_per_tok=8),
                    ["'olmoe'", "num_experts=64", "num_experts_per_tok=8", "Mixture-of-Experts"]),
    "gpt-neox-20b": (lambda: transformers.GPTNeoXConfig(
        vocab_size=50432, hidden_size=6144, intermediate_size=24576, num_hidden_layers=44, num_attention_heads=64,
        use_parallel_residual=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.25}),
        ["'gpt_neox'", "use_parallel_residual=True", "partial_rotary_factor=0.25", "llama, mistral, qwen2, qwen3"]),
    "falcon-7b": (lambda: transformers.FalconConfig(
        vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71, multi_query=True,
        parallel_attn=True), ["'falcon'", "parallel_attn=True", "multi_query=True"]),
    "Phi-3-mini": (lambda: transformers.Phi3Config(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32),
        ["'phi3'", "not supported"]),
    "gemma-2-9b": (lambda: transformers.Gemma2Config(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256), ["'gemma2'", "head_dim=256", "hidden_activation='gelu_pytorch_tanh'"]),
    "gemma-3-1b": (lambda: transformers.Gemma3TextConfig(), ["'gemma3_text'", "head_dim=256"]),
    "gemma-3-4b": (lambda: transformers.Gemma3Config(), ["'gemma3'", "text_config", "own config.json"]),
    "bert-base": (lambda: transformers.BertConfig(), ["'bert'", "not a causal decoder"]),
    "t5-small": (lambda: transformers.T5Config(), ["'t5'", "is_encoder_decoder=True"]),
    "llama-gelu": (lambda: transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, hidden_act="gelu"),
                   ["hidden_act='gelu'", "silu"]),
    "gpt2-cross": (lambda: transformers.GPT2Config(add_cross_attention=True), ["add_cross_attention=True"]),
    "gpt2-relu": (lambda: transformers.GPT2Config(activation_function="relu"), ["activation_function='relu'"]),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unmodelled_config_is_refused_by_field(name: str, tmp_path: Path) -> None:
    make, needles = REFUSED[name]
    with pytest.raises(ModelSpecError) as exc:
        load_model_spec(str(hf_config_dir(make(), tmp_path, name) / "config.json"))
    for needle in needles:
        assert needle in str(exc.value)


# ---- Mixture-of-Experts configs: read, counted and planned -------------------------------

MOE = {  # name: (config, routed experts, experts per token)
    "Mixtral-8x7B": (lambda: transformers.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2), 8, 2),
    "DeepSeek-V3": (lambda: transformers.DeepseekV3Config(), 256, 8),  # its defaults are DeepSeek-V3's sizes
    "Qwen1.5-MoE-A2.7B": (lambda: transformers.Qwen2MoeConfig(num_experts=60, num_experts_per_tok=4), 60, 4),
}


# Clusters whose devices hold each model's states (Mixtral 46.7B x 16 bytes of AdamW states needs > 8 H100s).
# Each with an ep that divides its experts.
MOE_CLUSTERS = {"Mixtral-8x7B": ("2x8xH100-80GB", 8), "DeepSeek-V3": ("32x8xH100-80GB", 32),
                "Qwen1.5-MoE-A2.7B": ("8xH100-80GB", 4)}


@pytest.mark.parametrize("name", list(MOE))
def test_moe_config_reads_and_plans(name: str, tmp_path: Path) -> None:
    from paraplan.catalog import load_cluster_spec
    from paraplan.planner.search import search_plans
    from paraplan.types import StrategyOverride, TrainSpec

    make, experts, top_k = MOE[name]
    cfg = make()
    spec = load_model_spec(str(hf_config_dir(cfg, tmp_path, name) / "config.json"))
    assert spec.moe is not None and (spec.moe.n_experts, spec.moe.top_k) == (experts, top_k)
    assert tf.model_params(spec) == _hf_params(cfg)
    if spec.moe.layer_freq > 1:  # Qwen2-MoE's decoder_sparse_step > 1 interleaves dense layers: refused
        pytest.skip("interleaved dense layers")
    cluster, ep = MOE_CLUSTERS[name]
    plan = search_plans(spec, load_cluster_spec(cluster), TrainSpec(global_batch=64, seq_len=4096),
                        backend="unconstrained", override=StrategyOverride(ep=ep))[0]
    assert plan.strategy.ep == ep
    assert plan.predicted.memory_breakdown_bytes.expert_states > 0


def test_config_without_model_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "vocab_size": 300}))
    with pytest.raises(ModelSpecError, match='add "model_type"'):
        load_model_spec(str(path))


# ---- what is launched is the real architecture ---------------------------------------------------------------

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.mark.parametrize("cfg", [
    pytest.param(lambda: transformers.Qwen3Config(**TINY, head_dim=32), id="qwen3"),
    pytest.param(lambda: transformers.Qwen2Config(**TINY), id="qwen2"),
    pytest.param(lambda: transformers.MistralConfig(**TINY, sliding_window=64), id="mistral"),
    pytest.param(lambda: transformers.LlamaConfig(**TINY, head_dim=24, attention_bias=True, mlp_bias=True),
                 id="llama-biases"),
])
def test_built_chain_computes_what_transformers_computes(cfg, tmp_path: Path) -> None:
    hf_cfg = cfg()
    spec = load_model_spec(str(hf_config_dir(hf_cfg, tmp_path, "m")))
    chain = build_model(spec, seed=0)
    hf_cfg._attn_implementation = "sdpa"
    reference = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    # transformers' names -> the chain's: model.layers.i.* -> blocks.i.layer.*; embed, final norm and head.
    state = {}
    for key, value in reference.state_dict().items():
        if key.startswith("model.layers."):
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            key = f"blocks.{i}.layer.{rest}"
        else:
            key = {"model.embed_tokens.weight": "embed.embed_tokens.weight", "model.norm.weight": "head.norm.weight",
                   "lm_head.weight": "head.lm_head.weight"}[key]
        state[key] = value
    chain.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))  # 16 <= sliding window
    logits = chain(tokens)
    torch.testing.assert_close(logits, reference(tokens).logits, rtol=1e-5, atol=1e-5)
    logits.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in chain.parameters())


# ---- sliding windows, as transformers applies them -----------------------------------------------------------

def _spec(cfg, tmp_path: Path, folder: str = "m") -> ModelSpec:
    return load_model_spec(str(hf_config_dir(cfg, tmp_path, folder)))


def test_mistral_sliding_window_bounds_the_planned_seq_len(tmp_path: Path) -> None:
    spec = _spec(ACCEPTED["Mistral-7B-v0.1"](), tmp_path)
    assert spec.sliding_window == 4096
    spec.check_seq_len(4096)  # s <= window: windowed attention is full causal attention
    with pytest.raises(TrainSpecError, match=r"sliding-window attention of 4096 tokens is not modelled.*"
                                             r"--seq-len <= 4096"):
        spec.check_seq_len(4097)


def test_seq_len_beyond_max_positions_is_refused() -> None:
    with pytest.raises(TrainSpecError, match="--seq-len <= 2048"):
        PRESETS["gpt3-175b"].check_seq_len(2049)
    PRESETS["gpt3-175b"].check_seq_len(2048)
    with pytest.raises(TrainSpecError, match="--seq-len <= 131072"):  # Llama 3.1's context (presets.py)
        PRESETS["llama3-8b"].check_seq_len(131073)


@pytest.mark.parametrize("use,max_window_layers,expected", [
    (False, 1, None),   # Qwen2.5 ships sliding_window with use_sliding_window false: never applied
    (True, 1, 256),     # layers 1.. use the window
    (True, 3, None),    # max_window_layers >= layers: every layer is full attention
])
def test_qwen_window_follows_use_sliding_window_and_layer_types(use, max_window_layers, expected,
                                                                tmp_path: Path) -> None:
    cfg = transformers.Qwen2Config(**{**TINY, "num_hidden_layers": 3}, max_position_embeddings=1024,
                                   use_sliding_window=use, sliding_window=256, max_window_layers=max_window_layers)
    assert _spec(cfg, tmp_path).sliding_window == expected


def test_mistral_without_window_and_window_beyond_context(tmp_path: Path) -> None:
    assert _spec(transformers.MistralConfig(**TINY, sliding_window=None), tmp_path, "a").sliding_window is None
    cfg = transformers.MistralConfig(**TINY, max_position_embeddings=512, sliding_window=4096)
    assert _spec(cfg, tmp_path, "b").sliding_window is None  # a window longer than any sequence never binds


# ---- names and folders ---------------------------------------------------------------------------------------

def test_names_come_from_the_folder_or_model_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = hf_config_dir(transformers.Qwen3Config(**TINY, head_dim=32), tmp_path, "Qwen3-tiny")
    assert load_model_spec(str(folder)).name == "Qwen3-tiny"
    assert load_model_spec(str(folder / "config.json")).name == "Qwen3-tiny"
    monkeypatch.chdir(folder)
    assert load_model_spec("config.json").name == "qwen3"
    other = tmp_path / "my-model.json"
    other.write_text((folder / "config.json").read_text())
    assert load_model_spec(str(other)).name == "my-model"


def test_folder_without_config_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="holds no config.json"):
        load_model_spec(str(tmp_path))


# ---- paraplan's own model files: strict fields -----------------------------------------------------------------

BASE = dict(name="m", family="llama", n_layers=2, hidden=64, ffn_hidden=96, n_heads=4, n_kv_heads=2, vocab=300)


@pytest.mark.parametrize("field,value", [("n_layers", True), ("n_layers", 2.5), ("n_layers", "32"),
                                         ("hidden", 64.0), ("tied_embeddings", "yes"), ("head_dim", False)])
def test_model_file_fields_are_strict(field: str, value, tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**BASE, field: value}))
    with pytest.raises(ModelSpecError, match=field):
        load_model_spec(str(path))


@pytest.mark.parametrize("spec", [*PRESETS.values(), ModelSpec(**BASE, model_type="qwen3", head_dim=32, qk_norm=True,
                                                               qkv_bias=True, o_bias=True, sliding_window=128),
                                  ModelSpec(**BASE, head_dim=24, rope_scaling={"rope_type": "llama3", "factor": 8.0})],
                         ids=lambda s: s.name)
def test_specs_round_trip_through_json(spec: ModelSpec) -> None:
    assert ModelSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize("extra,needle", [
    (dict(model_type="qwen3"), "qk_norm must be true"),
    (dict(model_type="qwen2"), "qwen2 always has q, k, v biases"),
    (dict(qkv_bias=True), "one attention_bias"),
    (dict(model_type="mistral", mlp_bias=True), "no MLP biases"),
    (dict(sliding_window=128), "no sliding-window attention"),
])
def test_spec_refuses_features_its_block_does_not_have(extra: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ModelSpec(**BASE, **extra)


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {}), ("qwen2", dict(qkv_bias=True)),
                                              ("qwen3", dict(qk_norm=True, head_dim=32))])
def test_every_llama_like_block_has_the_tensor_parallel_plan_modules(model_type: str, extra: dict) -> None:
    # Both backends shard by these names (torch: LLAMA_TP_PLAN; DeepSpeed AutoTP's llama preset: the same regexes).
    from paraplan.backends.torch_native import LLAMA_TP_PLAN
    from paraplan.models.build import build_layer

    spec = ModelSpec(**BASE, model_type=model_type, **extra)
    with torch.device("meta"):
        block = build_layer(spec, "block", 0)
    modules = dict(block.named_modules())
    assert all(isinstance(modules.get(name), torch.nn.Linear) for name in LLAMA_TP_PLAN)
    assert type(block.layer).__name__.lower().startswith(model_type)
