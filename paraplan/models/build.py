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

import contextlib
import importlib
import math
import zlib
from collections.abc import Iterator

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
# Every decoder layer takes ``(hidden_states, attention_mask=..., position_embeddings=(cos, sin))``. The dense four
# name their linears q_proj/k_proj/v_proj/o_proj/gate_proj/up_proj/down_proj, which the tensor-parallel plans rely
# on. The Mixture-of-Experts ones hold, in each MoE layer, ``mlp.gate`` (the router, returning ``(logits, top-k
# weights, top-k indices)``) and ``mlp.experts`` (the routed experts as fused 3-D tensors ``gate_up_proj (E, 2 f_e,
# h)`` and ``down_proj (E, h, f_e)``, called as ``experts(hidden (T, h), top_k_index (T, K), top_k_weights (T, K))``),
# which expert parallelism (``backends.torch_expert_parallel``) relies on; DeepSeek's also ``mlp.shared_experts``,
# Qwen2-MoE's ``mlp.shared_expert`` and ``mlp.shared_expert_gate``.
_LLAMA_LIKE_CLASSES = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
    "mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe", "deepseek_v2": "DeepseekV2",
    "deepseek_v3": "DeepseekV3",
}
# Built from the Mixture-of-Experts model types paraplan reads: all but gpt_oss, whose experts (biased, interleaved
# gate/up, clamped SwiGLU) and alternating sliding-window layers no paraplan code path has been checked against.
BUILDABLE_MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


def _llama_like_class(model_type: str, suffix: str):
    """``transformers.models.<mt>.modeling_<mt>.<Prefix><suffix>``, e.g. ``Qwen3DecoderLayer``."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, _LLAMA_LIKE_CLASSES[model_type] + suffix)


class LlamaBlock(nn.Module):
    """The transformers decoder layer of ``config.model_type`` (``LlamaDecoderLayer``, ``MistralDecoderLayer``,
    ``Qwen2DecoderLayer``, ``Qwen3DecoderLayer``; with experts ``MixtralDecoderLayer``, ``Qwen2MoeDecoderLayer``,
    ``Qwen3MoeDecoderLayer``, ``DeepseekV2DecoderLayer``, ``DeepseekV3DecoderLayer``) that computes its own rotary
    embeddings (positions ``0..s-1``) with the model type's rotary class (DeepSeek's rotates only the
    ``qk_rope_head_dim`` part of each head: its config's ``head_dim``).
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
    Qwen3Config; with experts MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig, DeepseekV2Config, DeepseekV3Config)
    with the spec's head_dim, biases and RoPE parameters (:func:`_moe_config_kwargs` adds the experts and latent
    attention). Qwen's sliding window is left off: under SDPA with no mask it is not applied, and paraplan only plans
    sequences no longer than the window.

    Raises:
        ModelSpecError: a gpt_oss spec (read and counted, not built), or a factory model.
    """
    if spec.moe is not None and spec.model_type not in BUILDABLE_MOE_MODEL_TYPES:
        raise ModelSpecError(
            f"{spec.name} is a Mixture-of-Experts model of model_type {spec.model_type}: paraplan reads it and counts "
            "its parameters but does not build, profile or launch it (it builds "
            f"{', '.join(BUILDABLE_MOE_MODEL_TYPES)})"
        )
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
        if mt in ("llama", "qwen3", "qwen3_moe"):
            kwargs["attention_bias"] = spec.qkv_bias  # one flag for q, k, v and o (ModelSpec checks they agree)
        if mt == "qwen2_moe":
            kwargs["qkv_bias"] = spec.qkv_bias
        if mt == "llama":
            kwargs["mlp_bias"] = spec.mlp_bias
        if mt in ("mistral", "mixtral"):
            kwargs["sliding_window"] = spec.sliding_window  # MistralConfig's default is 4096, not None
        if spec.moe is not None:
            kwargs.update(_moe_config_kwargs(spec))
        if spec.mla is not None:  # the config derives head_dim (the rotary part, qk_rope_head_dim) itself
            del kwargs["head_dim"]
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
    if spec.moe is not None:  # the experts' own loop over the experts a batch hits (what a model built alone gets)
        cfg._experts_implementation = "eager"
    return cfg


def _moe_config_kwargs(spec: ModelSpec) -> dict:
    """The config.json keys of ``spec.moe`` (and ``spec.mla``) for its model type (the inverse of the mapping
    ``presets`` reads them with).

    Routing is plain top-k over all experts: DeepSeek's group-limited routing is turned off (``n_group`` =
    ``topk_group`` = 1, every expert in one group; V2's ``topk_method`` greedy), and the routers' auxiliary losses play
    no part (the chain returns logits only; Mixtral's router jitter is 0). Values MoESpec does not carry take the
    published models' (they change numerics, not parameters or FLOPs): DeepSeek-V3 normalizes the top-k weights and
    scales them by transformers' default ``routed_scaling_factor`` 2.5 (V3's), DeepSeek-V2 by 1.0; Qwen3-MoE
    normalizes them (Qwen3-30B-A3B's ``norm_topk_prob`` true), Qwen2-MoE does not (transformers' default,
    Qwen1.5-MoE's).
    """
    moe, mt = spec.moe, spec.model_type
    assert moe is not None
    if mt == "mixtral":  # experts use intermediate_size (ModelSpec checks it equals expert_ffn_hidden)
        return dict(num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k, router_jitter_noise=0.0,
                    output_router_logits=False)
    if mt in ("qwen2_moe", "qwen3_moe"):
        kwargs = dict(num_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
                      moe_intermediate_size=moe.expert_ffn_hidden, decoder_sparse_step=moe.layer_freq,
                      mlp_only_layers=[], norm_topk_prob=mt == "qwen3_moe", output_router_logits=False,
                      use_sliding_window=False, sliding_window=None)
        if mt == "qwen2_moe":
            kwargs["shared_expert_intermediate_size"] = moe.shared_expert_ffn_hidden
        return kwargs
    mla = spec.mla
    assert mla is not None  # ModelSpec requires it for the DeepSeek types
    kwargs = dict(
        n_routed_experts=moe.n_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_ffn_hidden,
        n_shared_experts=moe.n_shared_experts, first_k_dense_replace=moe.first_dense_layers, n_group=1, topk_group=1,
        q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_nope_head_dim=mla.qk_nope_head_dim,
        qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim, attention_bias=False,
        output_router_logits=False,
    )
    if mt == "deepseek_v2":
        kwargs["topk_method"] = "greedy"
    else:
        kwargs["norm_topk_prob"] = True
    return kwargs


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


def build_model(
    spec: ModelSpec, device: str | torch.device = "cpu", seed: int | None = 0, meta_params: bool = False,
) -> LayerChain:
    """Build the whole chain. Use ``device='meta'`` to count parameters without allocating them.

    Llama and GPT chains built with a seed get :func:`init_weights`: every parameter is a function of the seed and
    its name alone, so the unsharded model and every sharded one (``torch_native.parallelize`` after a
    ``meta_params`` build, DeepSpeed ZeRO-3 under ``zero.Init``) hold identical weights.

    Args:
        spec: the model.
        device: where parameters and buffers live; ``meta`` allocates nothing.
        seed: if not None, ``torch.manual_seed(seed)`` first and, for llama and gpt, :func:`init_weights` (a
            factory model keeps its own initialization, drawn from the seeded global generator). None: torch's
            default initialization, unseeded (the profiler's case).
        meta_params: parameters on the meta device, buffers (rotary frequencies) computed on ``device``: the
            caller allocates and initializes only the parameters it keeps (``torch_native.parallelize`` does).
            Ignored for a factory model, which is always built in full on ``device`` (its initialization is its
            own, so no rank could reproduce a shard of it alone).

    Raises:
        ModelSpecError: a factory that cannot be imported or returns something other than a layer chain.
    """
    if seed is not None:
        torch.manual_seed(seed)
    empty = meta_params and spec.family != "custom" and torch.device(device).type != "meta"
    with torch.device(device), (_parameters_on_meta() if empty else contextlib.nullcontext()):
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
    if seed is not None and spec.family != "custom" and not empty and torch.device(device).type != "meta":
        init_weights(chain, spec, seed)
    return chain


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device; buffers stay where they are made.

    accelerate's ``init_empty_weights(include_buffers=False)`` (not a paraplan dependency): a module's
    ``__init__`` allocates each parameter (uninitialized, ``torch.empty``) and registers it; the registration swaps
    it for a meta tensor before the module's own initialization runs on it, so only one parameter is ever
    allocated, untouched, at a time. Buffers computed from the config (rotary ``inv_freq``) keep their values.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def is_expert_parameter(name: str) -> bool:
    """Whether ``name`` (a chain parameter name) is a routed-expert tensor: ``gate_up_proj`` or ``down_proj`` of an
    MoE layer's ``mlp.experts``, whose dimension 0 indexes the ``E`` experts (transformers 5 stores them fused:
    ``gate_up_proj (E, 2 f_e, h)``, ``down_proj (E, h, f_e)``)."""
    module, _, kind = name.rpartition(".")
    return module.rpartition(".")[2] == "experts" and kind in ("gate_up_proj", "down_proj")


def init_parameter(name: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, spec: ModelSpec,
                   seed: int, experts: range | None = None) -> torch.Tensor:
    """The initial value of one parameter of a llama or gpt chain, made whole on the CPU from its own generator.

    Distributions follow transformers' ``_init_weights`` (transformers 5.x ``PreTrainedModel._init_weights``, which
    ``LlamaPreTrainedModel`` and the Mistral/Qwen2/Qwen3 classes inherit, and ``GPT2PreTrainedModel._init_weights``):
    linear, ``Conv1D`` and embedding weights ``normal(0, initializer_range)`` (0.02 by default), biases zero, norm
    weights (RMSNorm, LayerNorm) one, and for GPT-2 the output projections of attention and MLP (``c_proj.weight``)
    ``normal(0, initializer_range / sqrt(2 n_layers))`` (GPT-2's residual scaling, two residual paths per block).
    Mixture-of-Experts models (``MixtralPreTrainedModel``, ``DeepseekV3PreTrainedModel``, ... ``_init_weights``): the
    router weight (``mlp.gate.weight``) and the routed experts' fused tensors ``normal(0, initializer_range)`` too.
    The kind is read from the name, which the chain's layer names fix (tests/unit/test_init_weights.py and
    tests/unit/test_build_moe.py check the rules against transformers' own initialization of the same modules).

    The generator is seeded with ``crc32("<seed>:<name>")`` (torch's CPU generator keeps 32 bits of a seed anyway):
    the value depends on the seed and the parameter's name in the whole chain only, never on which rank makes it or
    in what order. A routed-expert tensor (:func:`is_expert_parameter`) draws each expert ``e`` (its row
    ``[e]``) from its own generator, ``crc32("<seed>:<name>:<e>")``, so a rank holding a slice of the experts (expert
    parallelism) makes exactly that slice of the full tensor without making the rest. Values are drawn in fp32 and
    then cast to ``dtype``.

    Args:
        name: the parameter's name in ``LayerChain.named_parameters()``, e.g. ``blocks.2.layer.mlp.up_proj.weight``.
        shape: its full (unsharded) shape; for a routed-expert tensor ``(E, ...)``.
        dtype: the dtype of the returned tensor.
        spec: the model (family llama or gpt).
        seed: the training seed.
        experts: for a routed-expert tensor, the experts (rows of dimension 0) to make; None: all ``E``.

    Returns:
        The full tensor, on the CPU; for a routed-expert tensor with ``experts``, its rows ``experts``
        (``(len(experts), *shape[1:])``).

    Raises:
        ModelSpecError: a factory (``custom``) model, whose initialization is its own.
        ValueError: ``experts`` for a parameter that is not a routed-expert tensor, or outside ``range(E)``.
    """
    if spec.family == "custom":
        raise ModelSpecError(f"{spec.name}: a factory model keeps its own initialization; init_parameter covers "
                             "the llama and gpt families")
    expert = is_expert_parameter(name)
    if experts is not None and (not expert or experts.start < 0 or experts.stop > shape[0]):
        raise ValueError(f"experts {experts} for parameter {name} of shape {tuple(shape)}: only routed-expert "
                         "tensors are made by expert, within their first dimension")
    module, _, kind = name.rpartition(".")
    owner = module.rpartition(".")[2]
    if kind == "bias":
        return torch.zeros(shape, dtype=dtype)
    if "norm" in owner or owner.startswith("ln_"):  # input_layernorm, q_norm, norm; GPT-2's ln_1, ln_2, ln_f
        return torch.ones(shape, dtype=dtype)
    std = hf_config(spec).initializer_range or 0.02
    if spec.family == "gpt" and owner == "c_proj":
        std /= math.sqrt(2 * (spec.n_layers or 1))
    if expert:
        rows = experts if experts is not None else range(shape[0])
        return torch.stack([_normal(f"{seed}:{name}:{e}", shape[1:], std) for e in rows]).to(dtype)
    return _normal(f"{seed}:{name}", shape, std).to(dtype)


def _normal(key: str, shape: torch.Size | tuple[int, ...], std: float) -> torch.Tensor:
    """``normal(0, std)`` fp32 values of ``shape`` from a generator seeded with ``crc32(key)``."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_weights(chain: nn.Module, spec: ModelSpec, seed: int) -> None:
    """Overwrite every parameter of a whole llama or gpt chain with :func:`init_parameter` (tied weights once).

    Raises:
        ModelSpecError: a factory (``custom``) model.
    """
    for name, param in chain.named_parameters():
        param.copy_(init_parameter(name, param.shape, param.dtype, spec, seed))


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
