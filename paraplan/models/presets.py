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
from paraplan.types import ModelSpec

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
        vocab=128256, max_seq_len=8192,
    ),
    "llama3-70b": ModelSpec(
        name="llama3-70b", family="llama", n_layers=80, hidden=8192, ffn_hidden=28672, n_heads=64, n_kv_heads=8,
        vocab=128256, max_seq_len=8192,
    ),
    "llama3-405b": ModelSpec(
        name="llama3-405b", family="llama", n_layers=126, hidden=16384, ffn_hidden=53248, n_heads=128,
        n_kv_heads=8, vocab=128256, max_seq_len=8192,
    ),
    "gpt3-175b": ModelSpec(
        name="gpt3-175b", family="gpt", n_layers=96, hidden=12288, ffn_hidden=49152, n_heads=96, n_kv_heads=96,
        vocab=50257, tied_embeddings=True, max_seq_len=2048,
    ),
}


def _from_hf_config(name: str, cfg: dict) -> ModelSpec:
    """Map a Hugging Face ``config.json`` (Llama-like or GPT-2-like) onto a ModelSpec."""
    model_type = cfg.get("model_type", "")
    if "n_embd" in cfg:  # GPT-2 style keys
        h = cfg["n_embd"]
        return ModelSpec(
            name=name, family="gpt", n_layers=cfg["n_layer"], hidden=h, ffn_hidden=cfg.get("n_inner") or 4 * h,
            n_heads=cfg["n_head"], n_kv_heads=cfg["n_head"], vocab=cfg["vocab_size"],
            tied_embeddings=cfg.get("tie_word_embeddings", True), max_seq_len=cfg.get("n_positions", 1024),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        )
    if "hidden_size" in cfg and "intermediate_size" in cfg:
        rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        return ModelSpec(
            name=name, family="llama", n_layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
            ffn_hidden=cfg["intermediate_size"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], vocab=cfg["vocab_size"],
            tied_embeddings=cfg.get("tie_word_embeddings", False),
            max_seq_len=cfg.get("max_position_embeddings", 8192), norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope),
        )
    raise ModelSpecError(
        f"{name}: config.json of model_type '{model_type}' is not understood; paraplan reads Llama-style "
        "(hidden_size, intermediate_size, num_attention_heads, ...) and GPT-2-style (n_embd, n_layer, n_head) keys"
    )


def load_model_spec(model: str) -> ModelSpec:
    """Resolve a model argument: a preset name, a model file (YAML/JSON), an HF ``config.json``, or a factory.

    Args:
        model: ``llama3-8b`` (see ``PRESETS``), a path to a ``.json``/``.yaml`` file holding either ModelSpec fields
            or a Hugging Face config, or ``package.module:function`` for a user factory.

    Raises:
        ModelSpecError: unknown preset, unreadable file, or fields that fail validation (pydantic's errors listed).
    """
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.suffix.lower() in MAPPING_SUFFIXES:
        data = read_mapping(path, "model file", ModelSpecError)
        if "family" in data:
            try:
                return ModelSpec(**{"name": path.stem, **data})
            except ValidationError as exc:
                raise ModelSpecError(format_validation_error(f"model file {model}", exc)) from exc
        try:
            return _from_hf_config(path.stem, data)
        except (KeyError, ValidationError) as exc:
            raise ModelSpecError(f"model file {model} is not a valid Hugging Face config: {exc}") from exc
    if ":" in model and not path.exists():
        return _factory_spec(model)
    known = ", ".join(PRESETS)
    raise ModelSpecError(
        f"unknown model '{model}'; use a preset ({known}), a .json/.yaml model file, or 'package.module:function'"
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
