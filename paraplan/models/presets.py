"""Model presets with published dimensions, and loading of model files.

Sources:
- Llama 3: Dubey et al. 2024, "The Llama 3 Herd of Models", Table 3 (layers, model dimension, FFN dimension,
  attention heads, key/value heads, vocabulary 128,000 -> 128,256 in the released configs, RoPE theta 500,000).
- GPT-3 175B: Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1 (96 layers, d_model 12288,
  96 heads, context 2048); vocabulary 50,257 (GPT-2 BPE), d_ff = 4 d_model, tied input/output embeddings.
- llama-tiny / llama-small: CPU-sized Llama-style models with a byte-level vocabulary (256), for the built-in trainer.
- Mixture-of-Experts presets (planned with expert parallelism): each one's config.json on the Hugging Face Hub,
  cited at the preset; moe-tiny and deepseek-tiny are CPU-sized models of the same structure.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from paraplan.errors import ModelSpecError, format_validation_error
from paraplan.files import MAPPING_SUFFIXES, read_mapping
from paraplan.types import GELU_ACTIVATIONS, MLA_MODEL_TYPES, MOE_MODEL_TYPES, MLASpec, ModelSpec, MoESpec

# Llama 3 presets carry Llama 3.1's context (config.json max_position_embeddings 131072, the same architecture with
# rope scaling): the Llama 3 paper (Grattafiori et al. 2024, sec. 3.4.2) pre-trains 405B up to 128K tokens.
PRESETS: dict[str, ModelSpec] = {
    "llama-tiny": ModelSpec(
        name="llama-tiny", family="llama", n_layers=6, hidden=384, ffn_hidden=1024, n_heads=6, n_kv_heads=2,
        vocab=256, max_seq_len=2048, rope_theta=10000.0,
    ),
    "llama-small": ModelSpec(
        name="llama-small", family="llama", n_layers=16, hidden=768, ffn_hidden=2048, n_heads=12, n_kv_heads=4,
        vocab=256, max_seq_len=2048, rope_theta=10000.0,
    ),
    "llama3-8b": ModelSpec(
        name="llama3-8b", family="llama", n_layers=32, hidden=4096, ffn_hidden=14336, n_heads=32, n_kv_heads=8,
        vocab=128256, max_seq_len=131072,
    ),
    "llama3-70b": ModelSpec(
        name="llama3-70b", family="llama", n_layers=80, hidden=8192, ffn_hidden=28672, n_heads=64, n_kv_heads=8,
        vocab=128256, max_seq_len=131072,
    ),
    "llama3-405b": ModelSpec(
        name="llama3-405b", family="llama", n_layers=126, hidden=16384, ffn_hidden=53248, n_heads=128,
        n_kv_heads=8, vocab=128256, max_seq_len=131072,
    ),
    "gpt3-175b": ModelSpec(
        name="gpt3-175b", family="gpt", n_layers=96, hidden=12288, ffn_hidden=49152, n_heads=96, n_kv_heads=96,
        vocab=50257, tied_embeddings=True, max_seq_len=2048,
    ),
    # Mixture-of-Experts: counted by paraplan.models.moe, priced by paraplan.cost_models.moe.
    # mistralai/Mixtral-8x7B-v0.1 config.json (sliding_window null; published: 46.7B parameters, 12.9B active).
    "mixtral-8x7b": ModelSpec(
        name="mixtral-8x7b", family="llama", model_type="mixtral", n_layers=32, hidden=4096, ffn_hidden=14336,
        n_heads=32, n_kv_heads=8, vocab=32000, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-5,
        moe=MoESpec(n_experts=8, top_k=2, expert_ffn_hidden=14336),
    ),
    # Qwen/Qwen3-30B-A3B config.json (decoder_sparse_step 1, mlp_only_layers [], use_sliding_window false; model
    # card: 30.5B parameters, 3.3B activated).
    "qwen3-30b-a3b": ModelSpec(
        name="qwen3-30b-a3b", family="llama", model_type="qwen3_moe", n_layers=48, hidden=2048, ffn_hidden=6144,
        n_heads=32, n_kv_heads=4, head_dim=128, vocab=151936, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6,
        qk_norm=True, moe=MoESpec(n_experts=128, top_k=8, expert_ffn_hidden=768),
    ),
    # deepseek-ai/DeepSeek-V3 config.json (n_group 8, topk_group 4, routed_scaling_factor 2.5, scoring_func sigmoid,
    # topk_method noaux_tc, moe_layer_freq 1). The main model only: its multi-token-prediction module
    # (num_nextn_predict_layers 1) is not built, as in transformers. Published (DeepSeek-V3 technical report;
    # README_WEIGHTS.md): 671B parameters in the main model, 37B (36.7B) activated per token.
    "deepseek-v3": ModelSpec(
        name="deepseek-v3", family="llama", model_type="deepseek_v3", n_layers=61, hidden=7168, ffn_hidden=18432,
        n_heads=128, n_kv_heads=128, head_dim=192, vocab=129280, max_seq_len=163840, rope_theta=10000.0,
        norm_eps=1e-6, rope_scaling={"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        moe=MoESpec(n_experts=256, top_k=8, expert_ffn_hidden=2048, n_shared_experts=1,
                    shared_expert_ffn_hidden=2048, first_dense_layers=3, router_score_correction_bias=True),
        mla=MLASpec(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
    ),
    # CPU-sized models of the same structures: Mixtral-like (4 experts, top-2) and DeepSeek-V3-like (latent
    # attention, one shared expert, one first dense layer).
    "moe-tiny": ModelSpec(
        name="moe-tiny", family="llama", model_type="mixtral", n_layers=4, hidden=256, ffn_hidden=512, n_heads=4,
        n_kv_heads=2, vocab=256, max_seq_len=2048, rope_theta=10000.0,
        moe=MoESpec(n_experts=4, top_k=2, expert_ffn_hidden=512),
    ),
    "deepseek-tiny": ModelSpec(
        name="deepseek-tiny", family="llama", model_type="deepseek_v3", n_layers=4, hidden=256, ffn_hidden=512,
        n_heads=4, n_kv_heads=4, head_dim=48, vocab=256, max_seq_len=2048, rope_theta=10000.0, norm_eps=1e-6,
        moe=MoESpec(n_experts=8, top_k=2, expert_ffn_hidden=128, n_shared_experts=1, shared_expert_ffn_hidden=128,
                    first_dense_layers=1, router_score_correction_bias=True),
        mla=MLASpec(q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
    ),
}


# What paraplan models exactly: the decoder layers of these Hugging Face model types (built from transformers' own
# classes in ``paraplan.models.build``) and GPT-2, and the Mixture-of-Experts types (counted exactly and planned).
# Anything else is refused rather than planned as something else.
LLAMA_LIKE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE_MODEL_TYPES, "gpt2")
READABLE_MODEL_TYPES = (*SUPPORTED_MODEL_TYPES, *MOE_MODEL_TYPES)
_SUPPORTED_TEXT = ("paraplan models llama, mistral, qwen2, qwen3 and gpt2 configs exactly, and the "
                   f"Mixture-of-Experts types {', '.join(MOE_MODEL_TYPES)}")

# config.json keys that make a model a Mixture-of-Experts (Mixtral, Qwen-MoE, DeepSeek, DBRX, OLMoE, Jamba, ...).
_MOE_KEYS = ("num_local_experts", "n_routed_experts", "num_experts", "num_experts_per_tok", "n_shared_experts",
             "moe_intermediate_size", "shared_expert_intermediate_size", "moe_num_experts", "num_routed_experts")
# Keys of unsupported architectures worth naming when refusing them: each changes parameters, FLOPs or memory.
_NOTABLE_KEYS = ("use_parallel_residual", "parallel_attn", "new_decoder_architecture", "multi_query", "rotary_pct",
                 "partial_rotary_factor", "head_dim", "hidden_act", "activation_function", "hidden_activation",
                 "sliding_window", "attn_logit_softcapping", "qk_layernorm", "attention_bias", "bias", "use_bias",
                 "mlp_bias", "tie_word_embeddings")
# Encoder-only model types (bidirectional attention, no causal LM head): not decoders at all.
_ENCODER_ONLY = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                 "modernbert", "camembert", "mpnet", "ernie")


def _refuse_unsupported(name: str, cfg: dict) -> str:
    """Check the architecture-level keys of a config.json; return its (supported) model_type.

    Raises:
        ModelSpecError: no model_type, a multimodal (nested text_config), encoder-decoder, encoder-only config, a
            Mixture-of-Experts config of a type paraplan does not read, or a model_type paraplan does not model;
            the message names the field.
    """
    model_type = cfg.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise ModelSpecError(
            f"{name}: config.json has no model_type, so its architecture is unknown; add \"model_type\" (one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}) if the model is built like one of those; {_SUPPORTED_TEXT}"
        )
    if isinstance(cfg.get("text_config"), dict):
        raise ModelSpecError(
            f"{name}: config.json model_type '{model_type}' nests a text_config (a multimodal model); paraplan "
            "plans text decoders only. To plan just its language model, save the text_config as its own "
            f"config.json (it needs its own model_type); {_SUPPORTED_TEXT}"
        )
    if cfg.get("is_encoder_decoder"):
        raise ModelSpecError(
            f"{name}: config.json model_type '{model_type}' has is_encoder_decoder=True; paraplan plans causal "
            f"decoders only ({_SUPPORTED_TEXT})"
        )
    moe = {k: cfg[k] for k in _MOE_KEYS if cfg.get(k) not in (None, 0, False)}
    if moe and model_type not in MOE_MODEL_TYPES:
        fields = ", ".join(f"{k}={v!r}" for k, v in moe.items())
        raise ModelSpecError(
            f"{name}: config.json model_type '{model_type}' is a Mixture-of-Experts ({fields}) of a type paraplan "
            f"does not read, and planning it as a dense model would be wrong; {_SUPPORTED_TEXT}"
        )
    if model_type in _ENCODER_ONLY:
        raise ModelSpecError(
            f"{name}: config.json model_type '{model_type}' is an encoder (bidirectional attention), not a causal "
            f"decoder; paraplan plans causal language models ({_SUPPORTED_TEXT})"
        )
    if model_type not in READABLE_MODEL_TYPES:
        fields = {k: cfg[k] for k in _NOTABLE_KEYS if cfg.get(k) is not None}
        for rope_key in ("rope_parameters", "rope_scaling"):  # transformers 5 keeps rotary_pct here
            rope = cfg.get(rope_key)
            if isinstance(rope, dict) and rope.get("partial_rotary_factor") not in (None, 1, 1.0):
                fields[f"{rope_key}.partial_rotary_factor"] = rope["partial_rotary_factor"]
        notable = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        raise ModelSpecError(
            f"{name}: config.json model_type '{model_type}'{f' ({notable})' if notable else ''} is not supported; "
            f"{_SUPPORTED_TEXT}. Use a paraplan model file (family llama or gpt) only if the architecture really is "
            "one of those"
        )
    return model_type


def _hf_config_object(name: str, model_type: str, cfg: dict):
    """The transformers config of ``model_type`` read from ``cfg``, with transformers' own defaults and rules."""
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type].from_dict(cfg)
    except Exception as exc:  # transformers raises ValueError, TypeError, KeyError... for a malformed config
        raise ModelSpecError(f"{name}: transformers cannot read this {model_type} config.json: {exc}") from exc


def _from_hf_config(name: str, cfg: dict) -> ModelSpec:
    """Map a Hugging Face ``config.json`` onto a ModelSpec that builds and costs exactly the same model.

    Every field that changes parameters, FLOPs or memory is read through transformers' own config class for the
    model type (so its defaults apply: Qwen3's head_dim 128, Mistral's sliding window, GPT-2's tied head);
    what paraplan cannot model exactly is refused.

    Raises:
        ModelSpecError: an architecture paraplan does not model (see :func:`_refuse_unsupported`), a llama-like
            model whose MLP is not SwiGLU (hidden_act other than silu), a GPT-2 with cross-attention or a non-GELU
            MLP, unknown layer_types, a Mixture-of-Experts layout paraplan does not read (Qwen mlp_only_layers,
            DeepSeek moe_layer_freq other than 1 or biases), or values that fail ModelSpec's validation.
    """
    model_type = _refuse_unsupported(name, cfg)
    c = _hf_config_object(name, model_type, cfg)
    try:
        if model_type == "gpt2":
            return _gpt2_spec(name, c)
        return _llama_like_spec(name, model_type, c)
    except ValidationError as exc:
        raise ModelSpecError(format_validation_error(f"{name} (config.json model_type '{model_type}')", exc)) from exc


def _gpt2_spec(name: str, c) -> ModelSpec:
    if c.add_cross_attention:
        raise ModelSpecError(
            f"{name}: config.json model_type 'gpt2' has add_cross_attention=True (an encoder-decoder block with "
            "extra cross-attention weights); paraplan models decoder-only GPT-2 blocks: set it false"
        )
    if c.activation_function not in GELU_ACTIVATIONS:
        raise ModelSpecError(
            f"{name}: config.json model_type 'gpt2' has activation_function={c.activation_function!r}; paraplan "
            f"models GPT-2's GELU MLP ({', '.join(GELU_ACTIVATIONS)})"
        )
    return ModelSpec(
        name=name, family="gpt", n_layers=c.n_layer, hidden=c.n_embd, ffn_hidden=c.n_inner or 4 * c.n_embd,
        n_heads=c.n_head, n_kv_heads=c.n_head, vocab=c.vocab_size, tied_embeddings=c.tie_word_embeddings,
        max_seq_len=c.n_positions, norm_eps=c.layer_norm_epsilon, hidden_act=c.activation_function,
    )


def _llama_like_spec(name: str, model_type: str, c) -> ModelSpec:
    if c.hidden_act != "silu":
        raise ModelSpecError(
            f"{name}: config.json model_type '{model_type}' has hidden_act={c.hidden_act!r}; paraplan models its "
            "SwiGLU MLP with silu only"
        )
    h, a = c.hidden_size, c.num_attention_heads
    mla = _mla_spec(name, model_type, c) if model_type in MLA_MODEL_TYPES else None
    # transformers' own fallback in LlamaAttention and kin; latent attention's query/key heads are d_nope + d_rope.
    d = mla.qk_nope_head_dim + mla.qk_rope_head_dim if mla else getattr(c, "head_dim", None) or h // a
    rope = dict(getattr(c, "rope_parameters", None) or {})
    theta = float(rope.pop("rope_theta", None) or getattr(c, "rope_theta", None) or 10000.0)
    if rope.get("type") == rope.get("rope_type"):
        rope.pop("type", None)  # transformers 5 keeps a legacy rope_scaling "type" beside the same rope_type
    scaling = rope if rope and rope != {"rope_type": "default"} else None
    window = _sliding_window(name, model_type, c)
    attention_bias = bool(getattr(c, "attention_bias", False))
    one_attention_bias = model_type in ("llama", "qwen3", "qwen3_moe", "gpt_oss")  # q, k, v and o alike
    return ModelSpec(
        name=name, family="llama", model_type=model_type, n_layers=c.num_hidden_layers, hidden=h,
        ffn_hidden=c.intermediate_size, n_heads=a, n_kv_heads=c.num_key_value_heads or a, vocab=c.vocab_size,
        head_dim=None if a * d == h and mla is None else d, tied_embeddings=c.tie_word_embeddings,
        max_seq_len=c.max_position_embeddings, norm_eps=c.rms_norm_eps, rope_theta=theta, rope_scaling=scaling,
        qkv_bias=model_type == "qwen2" or (model_type == "qwen2_moe" and bool(c.qkv_bias))
        or (one_attention_bias and attention_bias),
        o_bias=one_attention_bias and attention_bias,
        mlp_bias=model_type == "llama" and bool(c.mlp_bias), qk_norm=model_type in ("qwen3", "qwen3_moe"),
        sliding_window=window, moe=_moe_spec(name, model_type, c) if model_type in MOE_MODEL_TYPES else None,
        mla=mla, attention_sinks=model_type == "gpt_oss",
    )


def _sliding_window(name: str, model_type: str, c) -> int | None:
    """The span of the model's sliding-window layers as transformers applies it (None: full attention only)."""
    window = None
    if model_type in ("mistral", "mixtral", "qwen3_moe"):
        # MistralAttention / MixtralAttention apply it to every layer when set; Qwen3MoeConfig sets it None unless
        # use_sliding_window, and Qwen3MoeAttention then applies it to every layer.
        window = c.sliding_window
    elif model_type in ("qwen2", "qwen3", "qwen2_moe", "gpt_oss"):
        # transformers: Qwen's sliding_window is None (Qwen2-MoE: 0) unless use_sliding_window; it then applies to
        # the layers whose layer_types entry is sliding_attention (Qwen: by default those from max_window_layers on;
        # gpt-oss: every other layer).
        unknown = sorted(set(c.layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ModelSpecError(
                f"{name}: config.json model_type '{model_type}' has layer_types {unknown}; paraplan models "
                "full_attention and sliding_attention layers only"
            )
        if c.sliding_window is not None and "sliding_attention" in c.layer_types:
            window = c.sliding_window
    if window is not None and window >= c.max_position_embeddings:
        window = None  # a window as long as every sequence never binds
    return window


def _refuse_field(name: str, model_type: str, field: str, value: object, why: str) -> NoReturn:
    raise ModelSpecError(f"{name}: config.json model_type '{model_type}' has {field}={value!r}; {why}")


def _moe_spec(name: str, model_type: str, c) -> MoESpec:
    """The Mixture-of-Experts MLP of a mixtral, qwen2_moe, qwen3_moe, deepseek_v2/v3 or gpt_oss config, as the
    transformers classes of that model type build it (see MoESpec's fields for the config.json keys)."""
    if getattr(c, "num_experts_per_tok", None) is None:
        _refuse_field(name, model_type, "num_experts_per_tok", None, "give the routed experts per token (top-k)")
    if model_type in ("mixtral", "gpt_oss"):  # experts of intermediate_size in every layer; gpt-oss's are biased
        biased = model_type == "gpt_oss"
        return MoESpec(n_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                       expert_ffn_hidden=c.intermediate_size, router_bias=biased, expert_bias=biased)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        if c.mlp_only_layers:
            _refuse_field(name, model_type, "mlp_only_layers", c.mlp_only_layers, "paraplan reads Qwen-MoE layer "
                          "layouts set by decoder_sparse_step alone; set mlp_only_layers []")
        if not c.num_experts:
            _refuse_field(name, model_type, "num_experts", c.num_experts, "every layer is then dense: use "
                          f"model_type {model_type.removesuffix('_moe')} for a dense model")
        shared = model_type == "qwen2_moe"  # Qwen2MoeSparseMoeBlock always holds one gated shared expert
        if shared and not c.shared_expert_intermediate_size:
            _refuse_field(name, model_type, "shared_expert_intermediate_size", c.shared_expert_intermediate_size,
                          "its shared expert needs an inner size > 0")
        return MoESpec(n_experts=c.num_experts, top_k=c.num_experts_per_tok, expert_ffn_hidden=c.moe_intermediate_size,
                       n_shared_experts=1 if shared else 0,
                       shared_expert_ffn_hidden=c.shared_expert_intermediate_size if shared else None,
                       shared_expert_gate=shared, layer_freq=c.decoder_sparse_step)
    freq = getattr(c, "moe_layer_freq", 1)
    if freq not in (None, 1):
        _refuse_field(name, model_type, "moe_layer_freq", freq, "transformers builds an MoE MLP in every layer from "
                      "first_k_dense_replace on whatever its value, DeepSeek's own code does not: paraplan reads "
                      "moe_layer_freq 1 only")
    n_shared = c.n_shared_experts or 0  # DeepSeek's shared experts form one MLP of n_shared x moe_intermediate_size
    return MoESpec(n_experts=c.n_routed_experts, top_k=c.num_experts_per_tok, expert_ffn_hidden=c.moe_intermediate_size,
                   n_shared_experts=n_shared, shared_expert_ffn_hidden=c.moe_intermediate_size if n_shared else None,
                   first_dense_layers=c.first_k_dense_replace or 0,
                   router_score_correction_bias=model_type == "deepseek_v3")


def _mla_spec(name: str, model_type: str, c) -> MLASpec:
    """DeepSeek's multi-head latent attention, without the biases its published configs never set."""
    for field in ("attention_bias", "mlp_bias"):
        if getattr(c, field, False):
            _refuse_field(name, model_type, field, True, "paraplan reads DeepSeek's latent attention and MLPs "
                          f"without biases, as published; set {field} false")
    return MLASpec(q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                   qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim)


def _hf_model_name(path: Path, model_type: object) -> str:
    """A Hugging Face model's title: its folder for a ``config.json`` (model_type if the folder says nothing)."""
    if path.name.lower() != "config.json":
        return path.stem
    folder = path.parent.name
    return folder if folder not in ("", ".", "..") else str(model_type or "config")


def load_model_spec(model: str) -> ModelSpec:
    """Resolve a model argument: a preset name, a model file (YAML/JSON), an HF ``config.json``, or a factory.

    Args:
        model: ``llama3-8b`` (see ``PRESETS``), a path to a ``.json``/``.yaml`` file holding either ModelSpec fields
            or a Hugging Face config, a folder holding a Hugging Face ``config.json``, or ``package.module:function``
            for a user factory.

    Raises:
        ModelSpecError: unknown preset, unreadable file, a Hugging Face architecture paraplan does not model
            exactly (an MoE type it does not read, encoder, multimodal, parallel attention/MLP, ...; the field is
            named), or fields that fail validation (pydantic's errors listed). Mixture-of-Experts configs of the
            types it reads load; planning them is refused later (:meth:`ModelSpec.check_seq_len`).
    """
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model folder {model} holds no config.json; pass a preset, a model file or a "
                                 "folder with a Hugging Face config.json")
        path = path / "config.json"
    if path.suffix.lower() in MAPPING_SUFFIXES:
        data = read_mapping(path, "model file", ModelSpecError)
        if "family" in data:
            try:
                return ModelSpec(**{"name": path.stem, **data})
            except ValidationError as exc:
                raise ModelSpecError(format_validation_error(f"model file {model}", exc)) from exc
        try:
            return _from_hf_config(_hf_model_name(path, data.get("model_type")), data)
        except KeyError as exc:
            raise ModelSpecError(f"model file {model} is not a valid Hugging Face config: missing {exc}") from exc
    if ":" in model and not path.exists():
        return _factory_spec(model)
    known = ", ".join(PRESETS)
    raise ModelSpecError(
        f"unknown model '{model}'; use a preset ({known}), a .json/.yaml model file, a folder with a Hugging Face "
        "config.json, or 'package.module:function'"
    )


def _factory_spec(factory: str) -> ModelSpec:
    """Spec of a factory model, with the dimensions its chain shows when built on the meta device.

    ``n_layers`` is ``len(chain.blocks)``; ``vocab`` and ``hidden`` come from the first ``nn.Embedding`` of
    ``chain.embed`` (when there is one). Heads stay unknown, so such a model is planned without tensor parallelism.
    """
    from paraplan.models.build import build_model, first_embedding

    chain = build_model(ModelSpec(name=factory, family="custom", factory=factory), device="meta", seed=None)
    embedding = first_embedding(chain.embed)
    return ModelSpec(
        name=factory, family="custom", factory=factory, n_layers=len(chain.blocks),
        vocab=embedding.num_embeddings if embedding is not None else None,
        hidden=embedding.embedding_dim if embedding is not None else None,
    )
