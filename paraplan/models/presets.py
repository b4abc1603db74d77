"""Model presets with published dimensions, and loading of model files.

Sources:
- Llama 3: Dubey et al. 2024, "The Llama 3 Herd of Models", Table 3 (layers, model dimension, FFN dimension,
  attention heads, key/value heads, vocabulary 128,000 -> 128,256 in the released configs, RoPE theta 500,000).
- GPT-3 175B: Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1 (96 layers, d_model 12288,
  96 heads, context 2048); vocabulary 50,257 (GPT-2 BPE), d_ff = 4 d_model, tied input/output embeddings.
- llama-tiny / llama-small: CPU-sized Llama-style models with a byte-level vocabulary (256), for the built-in trainer.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from paraplan.errors import ModelSpecError, format_validation_error
from paraplan.files import MAPPING_SUFFIXES, read_mapping
from paraplan.types import GELU_ACTIVATIONS, ModelSpec

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
}


# What paraplan models exactly: the decoder layers of these Hugging Face model types (built from transformers' own
# classes in ``paraplan.models.build``) and GPT-2. Anything else is refused rather than planned as something else.
LLAMA_LIKE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE_MODEL_TYPES, "gpt2")
_SUPPORTED_TEXT = "paraplan models llama, mistral, qwen2, qwen3 and gpt2 configs exactly"

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
        ModelSpecError: no model_type, a multimodal (nested text_config), encoder-decoder, encoder-only or
            Mixture-of-Experts config, or a model_type paraplan does not model; the message names the field.
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
    if moe:
        fields = ", ".join(f"{k}={v!r}" for k, v in moe.items())
        raise ModelSpecError(
            f"{name}: config.json model_type '{model_type}' is a Mixture-of-Experts ({fields}); Mixture-of-Experts "
            f"is not supported yet, and planning it as a dense model would be wrong; {_SUPPORTED_TEXT}"
        )
    if model_type in _ENCODER_ONLY:
        raise ModelSpecError(
            f"{name}: config.json model_type '{model_type}' is an encoder (bidirectional attention), not a causal "
            f"decoder; paraplan plans causal language models ({_SUPPORTED_TEXT})"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
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
            MLP, unknown layer_types, or values that fail ModelSpec's validation.
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
    d = getattr(c, "head_dim", None) or h // a  # transformers' own fallback in LlamaAttention and kin
    rope = dict(getattr(c, "rope_parameters", None) or {})
    theta = float(rope.pop("rope_theta", None) or getattr(c, "rope_theta", None) or 10000.0)
    scaling = rope if rope and rope != {"rope_type": "default"} else None
    window = None
    if model_type == "mistral":
        window = c.sliding_window  # MistralAttention applies it to every layer when set
    elif model_type in ("qwen2", "qwen3"):
        # transformers: sliding_window is None unless use_sliding_window; it then applies to the layers whose
        # layer_types entry is sliding_attention (by default those from max_window_layers on).
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
    attention_bias = bool(getattr(c, "attention_bias", False))
    return ModelSpec(
        name=name, family="llama", model_type=model_type, n_layers=c.num_hidden_layers, hidden=h,
        ffn_hidden=c.intermediate_size, n_heads=a, n_kv_heads=c.num_key_value_heads or a, vocab=c.vocab_size,
        head_dim=None if a * d == h else d, tied_embeddings=c.tie_word_embeddings,
        max_seq_len=c.max_position_embeddings, norm_eps=c.rms_norm_eps, rope_theta=theta, rope_scaling=scaling,
        qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3") and attention_bias),
        o_bias=model_type in ("llama", "qwen3") and attention_bias,
        mlp_bias=model_type == "llama" and bool(c.mlp_bias), qk_norm=model_type == "qwen3", sliding_window=window,
    )


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
            exactly (MoE, encoder, multimodal, parallel attention/MLP, ...; the field is named), or fields that fail
            validation (pydantic's errors listed).
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
