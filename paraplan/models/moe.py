"""Parameter counts of llama-family decoders with Mixture-of-Experts layers: total, and active per token.

Covers model_type mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3 (multi-head latent attention) and gpt_oss,
and the dense llama-family types too (a model without ``moe`` has dense blocks only), split by layer kind (dense
block, MoE block) and by part (attention, norms, dense MLP, router, routed experts, shared experts; embedding, head).

Notation: h hidden, v vocabulary, a heads, k key/value heads, d head dimension, f dense MLP inner size
(``ffn_hidden``); E routed experts, K experts per token (top-k), f_e routed expert inner size, S shared experts,
f_s shared expert inner size; MLA: r_q ``q_lora_rank``, r_kv ``kv_lora_rank``, d_n ``qk_nope_head_dim``,
d_r ``qk_rope_head_dim``, d_v ``v_head_dim``.

Source of every count: the module definitions in transformers 5 (``models/<model_type>/modeling_<model_type>.py``:
MixtralExperts, Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock, DeepseekV3Attention/DeepseekV3MoE, GptOssMLP, ...),
checked against transformers' own models built on the meta device in tests/unit/test_moe_models.py.

"Active" counts what one token's forward pass multiplies by: everything except the routed experts it is not sent
to, i.e. K of the E routed experts (every routed expert has the same size, so this is exact per token whatever the
routing). The router, the shared experts, the embedding and the head count as active, as in the published figures
(Mixtral 8x7B: 12.9B active of 46.7B; DeepSeek-V3: 36.7B active of 671B "including 0.9B for Embedding and 0.9B for
the output Head", README_WEIGHTS.md of deepseek-ai/DeepSeek-V3).
"""

from __future__ import annotations

from dataclasses import dataclass

from paraplan.errors import ModelSpecError
from paraplan.types import ModelSpec


@dataclass(frozen=True)
class BlockParams:
    """Parameters of one decoder block, by part. ``routed_experts`` is all E experts; ``routed_active`` the K of them
    one token uses."""

    attention: int
    norms: int
    dense_mlp: int
    router: int
    routed_experts: int
    routed_active: int
    shared_experts: int

    @property
    def total(self) -> int:
        return (self.attention + self.norms + self.dense_mlp + self.router + self.routed_experts
                + self.shared_experts)

    @property
    def active(self) -> int:
        return self.attention + self.norms + self.dense_mlp + self.router + self.routed_active + self.shared_experts


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a whole model by layer kind. ``head`` is the final norm plus the LM head matrix, counted even
    when tied (a pipeline's last stage holds its own copy); ``tied`` is the matrix counted twice then (``v h``, else
    0). ``router_buffers``: DeepSeek-V3's e_score_correction_bias (E fp32 values per MoE layer), state the model
    keeps and updates outside the optimizer, so not in ``total``."""

    embed: int
    head: int
    tied: int
    n_dense_blocks: int
    n_moe_blocks: int
    dense_block: BlockParams
    moe_block: BlockParams | None
    router_buffers: int

    @property
    def total(self) -> int:
        """Unique parameters (tied matrix once): what transformers' ``model.parameters()`` holds."""
        moe = self.n_moe_blocks * self.moe_block.total if self.moe_block else 0
        return self.embed + self.head - self.tied + self.n_dense_blocks * self.dense_block.total + moe

    @property
    def active(self) -> int:
        """Parameters one token's forward pass uses (tied matrix once)."""
        moe = self.n_moe_blocks * self.moe_block.active if self.moe_block else 0
        return self.embed + self.head - self.tied + self.n_dense_blocks * self.dense_block.active + moe


def attention_params(spec: ModelSpec) -> int:
    """Parameters of one block's attention (projections, their biases, q/k norms, latent norms, sinks).

    Formula:
        GQA: q and o ``h a d`` each, k and v ``h k d`` each; biases ``a d + 2 k d`` (qkv_bias) and ``h`` (o_bias);
            q/k RMSNorm ``2 d`` (qk_norm); sinks ``a`` (attention_sinks, gpt-oss).
        MLA: queries ``h r_q + r_q + r_q a (d_n + d_r)`` (q_a_proj, q_a_layernorm, q_b_proj), or ``h a (d_n + d_r)``
            without a query latent; keys/values ``h (r_kv + d_r) + r_kv + r_kv a (d_n + d_v)`` (kv_a_proj_with_mqa,
            kv_a_layernorm, kv_b_proj); output ``a d_v h`` (o_proj).
    Source: transformers LlamaAttention / Qwen3MoeAttention / GptOssAttention (``sinks``); DeepseekV3Attention (the
        same projections as DeepSeek-AI 2024, "DeepSeek-V2", sec. 2.1.2-2.1.3, eq. 9-18).
    """
    h, a, k = _require(spec.hidden), _require(spec.n_heads), _require(spec.n_kv_heads)
    mla = spec.mla
    if mla is not None:
        qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        r_q, r_kv = mla.q_lora_rank, mla.kv_lora_rank
        q = h * r_q + r_q + r_q * a * qk if r_q is not None else h * a * qk
        kv = h * (r_kv + mla.qk_rope_head_dim) + r_kv + r_kv * a * (mla.qk_nope_head_dim + mla.v_head_dim)
        return q + kv + a * mla.v_head_dim * h
    d = _require(spec.attention_head_dim)
    params = 2 * h * a * d + 2 * h * k * d
    params += (a * d + 2 * k * d if spec.qkv_bias else 0) + (h if spec.o_bias else 0)
    params += (2 * d if spec.qk_norm else 0) + (a if spec.attention_sinks else 0)
    return params


def dense_mlp_params(spec: ModelSpec) -> int:
    """SwiGLU MLP ``3 h f`` (gate, up, down), plus ``2 f + h`` biases with mlp_bias (Llama).

    Source: transformers LlamaMLP / DeepseekV3MLP (the dense layers of an MoE model use ``intermediate_size``).
    """
    h, f = _require(spec.hidden), _require(spec.ffn_hidden)
    return 3 * h * f + (2 * f + h if spec.mlp_bias else 0)


def block_params(spec: ModelSpec, moe_layer: bool) -> BlockParams:
    """Parameters of one dense (``moe_layer`` False) or MoE block of ``spec``, by part.

    Formula (MoE block; the dense block has ``dense_mlp`` = :func:`dense_mlp_params` in place of the last three):
        router ``E h`` (+ ``E`` with router_bias); routed experts ``E (3 h f_e)`` (+ ``E (2 f_e + h)`` with
        expert_bias), of which ``K (3 h f_e ...)`` are active; shared experts ``S (3 h f_s)`` (+ ``h`` for Qwen2-MoE's
        sigmoid gate). Norms: the two RMSNorms around attention and MLP, ``2 h``.
    Source: transformers MixtralTopKRouter + MixtralExperts (``gate_up_proj (E, 2 f_e, h)``, ``down_proj (E, h,
        f_e)``), Qwen2MoeSparseMoeBlock (``shared_expert``, ``shared_expert_gate``), DeepseekV3MoE (its shared MLP is
        ``S f_s`` wide), GptOssTopKRouter and GptOssExperts (biases).

    Raises:
        ModelSpecError: ``moe_layer`` for a model without ``moe``, or a family other than llama.
    """
    if spec.family != "llama":
        raise ModelSpecError(f"{spec.name}: MoE-aware counts cover family llama (its dense and MoE model types); "
                             f"family {spec.family} is counted by paraplan.cost_models.transformer")
    h = _require(spec.hidden)
    attention = attention_params(spec)
    if not moe_layer:
        return BlockParams(attention=attention, norms=2 * h, dense_mlp=dense_mlp_params(spec), router=0,
                           routed_experts=0, routed_active=0, shared_experts=0)
    moe = spec.moe
    if moe is None:
        raise ModelSpecError(f"{spec.name} has no Mixture-of-Experts layers (moe is not set)")
    per_expert = 3 * h * moe.expert_ffn_hidden + (2 * moe.expert_ffn_hidden + h if moe.expert_bias else 0)
    shared = moe.n_shared_experts * 3 * h * (moe.shared_expert_ffn_hidden or 0) + (h if moe.shared_expert_gate else 0)
    return BlockParams(
        attention=attention, norms=2 * h, dense_mlp=0,
        router=moe.n_experts * h + (moe.n_experts if moe.router_bias else 0),
        routed_experts=moe.n_experts * per_expert, routed_active=moe.top_k * per_expert, shared_experts=shared,
    )


def moe_layer_count(spec: ModelSpec) -> int:
    """How many of the ``n_layers`` decoder layers are MoE layers (0 for a dense model)."""
    n = _require(spec.n_layers)
    return sum(spec.moe.is_moe_layer(i) for i in range(n)) if spec.moe is not None else 0


def count_params(spec: ModelSpec) -> ParamCounts:
    """Total and active parameters of a llama-family model (dense or MoE), by layer kind and part.

    Formula: ``v h`` (embedding) + ``h + v h`` (final norm, LM head; ``v h`` once if tied) + dense blocks x
        :func:`block_params` (dense) + MoE blocks x :func:`block_params` (MoE); MoE layers are those
        ``MoESpec.is_moe_layer`` selects.
    Source: transformers ``<Type>ForCausalLM`` = ``<Type>Model`` (embed_tokens, layers, norm) + ``lm_head``.
    Assumptions: DeepSeek-V3's multi-token-prediction module (``num_nextn_predict_layers``, 11.5B more parameters
        in the released checkpoint) is not part of the model, as in transformers' DeepseekV3ForCausalLM.

    Raises:
        ModelSpecError: a family other than llama.
    """
    h, v = _require(spec.hidden), _require(spec.vocab)
    n_moe = moe_layer_count(spec)
    dense = block_params(spec, moe_layer=False)
    moe = block_params(spec, moe_layer=True) if spec.moe is not None else None
    buffers = n_moe * spec.moe.n_experts if spec.moe is not None and spec.moe.router_score_correction_bias else 0
    return ParamCounts(
        embed=v * h, head=h + v * h, tied=v * h if spec.tied_embeddings else 0,
        n_dense_blocks=_require(spec.n_layers) - n_moe, n_moe_blocks=n_moe, dense_block=dense, moe_block=moe,
        router_buffers=buffers,
    )


def _require(value: int | None) -> int:
    assert value is not None, "family llama specs carry every dimension (ModelSpec validates it)"
    return value
