"""Build a model as a chain of layers ``[embed, block_0 .. block_{L-1}, head]`` from transformers' modules.

Every layer maps one tensor to one tensor, so the same chain is profiled layer by layer, cut into pipeline stages
(DeepSpeed ``PipelineModule``, ``torch.distributed.pipelining``), and wrapped for tensor parallelism and activation
checkpointing. Shapes: tokens ``(b, s)`` int64 -> hidden ``(b, s, h)`` -> ... -> logits ``(b, s, v)``.

A user factory (``package.module:function``) must return a :class:`LayerChain` (or any ``nn.Module`` with the
attributes ``embed``, ``blocks`` (an ``nn.ModuleList`` of identical repeated blocks) and ``head``, each taking and
returning one tensor). The repeated blocks are exactly the entries of ``blocks``: paraplan profiles ``blocks[0]``
once and assumes the others cost the same.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from paraplan.errors import ModelSpecError
from paraplan.types import ModelSpec


class LayerChain(nn.Module):
    """``embed -> blocks -> head``; ``forward(tokens (b, s) int64) -> logits (b, s, v)``."""

    def __init__(self, embed: nn.Module, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def layers(self) -> list[nn.Module]:
        """The chain as a flat list of ``len(blocks) + 2`` layers."""
        return [self.embed, *self.blocks, self.head]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


_TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a paraplan dtype name: ``fp32``, ``bf16`` or ``fp16`` (KeyError for any other)."""
    return _TORCH_DTYPES[name]


def first_embedding(module: nn.Module) -> nn.Embedding | None:
    """The first ``nn.Embedding`` inside ``module`` (itself included), in ``modules()`` order; None if there is none.

    A factory chain's token embedding is taken to be this one: its ``num_embeddings`` is the vocabulary size and
    its ``embedding_dim`` the hidden size.
    """
    return next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. ``logits (b, s, v)``, ``targets (b, s)`` int64 -> scalar."""
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class LlamaEmbed(nn.Module):
    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)


# Class-name prefix of each Llama-like model_type in transformers (``transformers.models.<mt>.modeling_<mt>``).
# All four decoder layers take ``(hidden_states, attention_mask=..., position_embeddings=(cos, sin))`` and name their
# linears q_proj/k_proj/v_proj/o_proj/gate_proj/up_proj/down_proj, which the tensor-parallel plans rely on.
_LLAMA_LIKE_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def _llama_like_class(model_type: str, suffix: str):
    """``transformers.models.<mt>.modeling_<mt>.<Prefix><suffix>``, e.g. ``Qwen3DecoderLayer``."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, _LLAMA_LIKE_CLASSES[model_type] + suffix)


class LlamaBlock(nn.Module):
    """The transformers decoder layer of ``config.model_type`` (``LlamaDecoderLayer``, ``MistralDecoderLayer``,
    ``Qwen2DecoderLayer`` or ``Qwen3DecoderLayer``) that computes its own rotary embeddings (positions ``0..s-1``).
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer = _llama_like_class(config.model_type, "DecoderLayer")(config, layer_idx)
        self.rotary = _llama_like_class(config.model_type, "RotaryEmbedding")(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``x (b, s, h)`` -> ``(b, s, h)``; ``positions (1 or b, s)`` int64, default ``0 .. s-1`` (context
        parallelism passes each token's global position when ``x`` holds a shard of the sequence)."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        cos_sin = self.rotary(x, positions)
        # attention_mask=None: transformers' SDPA path then applies a causal mask (is_causal=True) and ignores any
        # sliding window, which is exact for s <= window (ModelSpec.check_seq_len refuses longer sequences).
        out = self.layer(x, attention_mask=None, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out


class LlamaHead(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


class GPTEmbed(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_seq_len: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(max_seq_len, hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.wte(tokens) + self.wpe(positions)


class GPTBlock(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        self.layer = GPT2Block(config, layer_idx=layer_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        return out[0] if isinstance(out, tuple) else out


class GPTHead(nn.Module):
    def __init__(self, hidden: int, vocab: int, eps: float) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(hidden, eps=eps)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def hf_config(spec: ModelSpec):
    """The transformers config object for a llama or gpt spec (SDPA attention, no dropout).

    family llama builds the config class of ``spec.model_type`` (LlamaConfig, MistralConfig, Qwen2Config,
    Qwen3Config) with the spec's head_dim, biases and RoPE parameters. Qwen's sliding window is left off: under SDPA
    with no mask it is not applied, and paraplan only plans sequences no longer than the window.
    """
    if spec.family == "llama":
        from transformers import CONFIG_MAPPING

        mt = spec.model_type or "llama"
        kwargs: dict = dict(
            vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn_hidden,
            num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
            head_dim=spec.attention_head_dim, max_position_embeddings=spec.max_seq_len, rms_norm_eps=spec.norm_eps,
            rope_parameters={**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta},
            tie_word_embeddings=spec.tied_embeddings, attention_dropout=0.0, hidden_act="silu",
        )
        if mt in ("llama", "qwen3"):
            kwargs["attention_bias"] = spec.qkv_bias  # one flag for q, k, v and o (ModelSpec checks they agree)
        if mt == "llama":
            kwargs["mlp_bias"] = spec.mlp_bias
        if mt == "mistral":
            kwargs["sliding_window"] = spec.sliding_window  # MistralConfig's default is 4096, not None
        cfg = CONFIG_MAPPING[mt](**kwargs)
    elif spec.family == "gpt":
        from transformers import GPT2Config

        cfg = GPT2Config(
            vocab_size=spec.vocab, n_embd=spec.hidden, n_layer=spec.n_layers, n_head=spec.n_heads,
            n_inner=spec.ffn_hidden, n_positions=spec.max_seq_len, layer_norm_epsilon=spec.norm_eps,
            activation_function=spec.hidden_act or "gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    else:
        raise ModelSpecError(f"{spec.name}: family '{spec.family}' has no transformers config")
    cfg._attn_implementation = "sdpa"
    return cfg


def build_layer(spec: ModelSpec, kind: str, layer_idx: int = 0) -> nn.Module:
    """Build one layer of the chain (``kind`` in embed, block, head) on the current default device."""
    cfg = hf_config(spec)
    assert spec.vocab is not None and spec.hidden is not None
    if spec.family == "llama":
        if kind == "embed":
            return LlamaEmbed(spec.vocab, spec.hidden)
        if kind == "block":
            return LlamaBlock(cfg, layer_idx)
        return LlamaHead(cfg)
    if kind == "embed":
        return GPTEmbed(spec.vocab, spec.hidden, spec.max_seq_len)
    if kind == "block":
        return GPTBlock(cfg, layer_idx)
    return GPTHead(spec.hidden, spec.vocab, spec.norm_eps)


def build_model(spec: ModelSpec, device: str | torch.device = "cpu", seed: int | None = 0) -> LayerChain:
    """Build the whole chain. Use ``device='meta'`` to count parameters without allocating them.

    Args:
        spec: the model.
        device: where parameters live; ``meta`` allocates nothing.
        seed: if not None, ``torch.manual_seed(seed)`` first, so every rank builds identical weights.

    Raises:
        ModelSpecError: a factory that cannot be imported or returns something other than a layer chain.
    """
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        if spec.family == "custom":
            chain = _call_factory(spec)
        else:
            assert spec.n_layers is not None
            chain = LayerChain(
                build_layer(spec, "embed"),
                [build_layer(spec, "block", i) for i in range(spec.n_layers)],
                build_layer(spec, "head"),
            )
            if spec.tied_embeddings:
                embed_weight = chain.embed.wte.weight if spec.family == "gpt" else chain.embed.embed_tokens.weight
                chain.head.lm_head.weight = embed_weight
    return chain


def _call_factory(spec: ModelSpec) -> LayerChain:
    assert spec.factory is not None
    module_name, _, func_name = spec.factory.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"cannot import factory '{spec.factory}': {exc}") from exc
    model = func()
    if isinstance(model, LayerChain):
        return model
    if all(hasattr(model, a) for a in ("embed", "blocks", "head")) and isinstance(model.blocks, nn.ModuleList):
        return LayerChain(model.embed, list(model.blocks), model.head)
    raise ModelSpecError(
        f"factory '{spec.factory}' returned {type(model).__name__}; it must return a paraplan.models.LayerChain "
        "or an nn.Module with attributes embed, blocks (nn.ModuleList) and head"
    )


def count_parameters(spec: ModelSpec) -> int:
    """Unique parameters of the model, counted on the meta device (tied weights once)."""
    chain = build_model(spec, device="meta", seed=None)
    return sum(p.numel() for p in chain.parameters())
