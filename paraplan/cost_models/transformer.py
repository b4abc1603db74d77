"""Analytic per-layer costs of Llama- and GPT-style decoder blocks: parameters, FLOPs, saved activations.

Notation: b micro-batch, s sequence length, h hidden, f FFN hidden, a heads, k key/value heads, d head dimension
(``spec.head_dim``, else h/a; Qwen3 and Gemma set ``a d != h``), v vocabulary, t tensor-parallel degree. FLOPs
count a multiply-add as 2 FLOPs. Llama-family blocks (model_type llama, mistral, qwen2, qwen3) share one formula;
their optional biases and q/k norms (``qkv_bias``, ``o_bias``, ``mlp_bias``, ``qk_norm``) add parameters and
element-wise work but no matmul FLOPs. Mixture-of-Experts models (``spec.moe``) are counted by
:mod:`paraplan.models.moe` (:func:`model_params` defers to it); the per-block formulas here refuse them.
"""

from __future__ import annotations

from paraplan.errors import ModelSpecError
from paraplan.models.moe import count_params
from paraplan.types import ModelSpec


def _dims(spec: ModelSpec) -> tuple[int, int, int, int, int]:
    if spec.moe is not None:  # every dense formula below starts here: none may price an MoE block as dense
        raise ModelSpecError(f"{spec.name} is a Mixture-of-Experts model: the dense block formulas do not describe "
                             "it (paraplan.cost_models.moe prices its blocks)")
    assert spec.hidden and spec.ffn_hidden and spec.n_heads and spec.n_kv_heads and spec.vocab
    return spec.hidden, spec.ffn_hidden, spec.n_heads, spec.n_kv_heads, spec.vocab


def _head_dim(spec: ModelSpec) -> int:
    d = spec.attention_head_dim
    assert d
    return d


def block_matmul_params(spec: ModelSpec) -> int:
    """Weights of the block's matrix multiplies.

    Formula:
        llama: q and o ``h a d`` each, k and v ``h k d`` each, SwiGLU ``3 h f`` (gate, up, down); with
            ``a d = h`` the attention part is the familiar ``2 h^2 + 2 h k d``.
        gpt: fused qkv ``3 h^2``, proj ``h^2``, MLP ``2 h f``.
    Source: the module definitions (transformers LlamaAttention/Qwen3Attention: q_proj ``h -> a d``, k/v_proj
        ``h -> k d``, o_proj ``a d -> h``; GPT2Block); for GPT with f = 4h this is the ``12 h^2`` of Narayanan et al.
        SC'21 eq. 2.
    """
    h, f, a, k, _ = _dims(spec)
    if spec.family == "llama":
        d = _head_dim(spec)
        return 2 * h * a * d + 2 * h * k * d + 3 * h * f
    return 4 * h * h + 2 * h * f


def block_params(spec: ModelSpec) -> int:
    """All parameters of one block: matmul weights plus norms and biases.

    Formula: llama adds two RMSNorm weights (``2h``), plus q, k, v biases ``a d + 2 k d`` (qkv_bias), the o bias
    ``h`` (o_bias), MLP biases ``2 f + h`` (mlp_bias) and the per-head q and k RMSNorm weights ``2 d`` (qk_norm);
    gpt adds two LayerNorms (``4h``) and biases (qkv ``3h``, proj ``h``, fc ``f``, fc-proj ``h``).
    Source: module definitions (transformers LlamaDecoderLayer, Qwen2Attention's ``bias=True`` q/k/v,
    Qwen3Attention's q_norm/k_norm over head_dim); GPT total is Narayanan eq. 2's ``12 h^2 + 13 h`` for f = 4h.
    """
    h, f, a, k, _ = _dims(spec)
    if spec.family == "llama":
        d = _head_dim(spec)
        extra = (a * d + 2 * k * d if spec.qkv_bias else 0) + (h if spec.o_bias else 0)
        extra += (2 * f + h if spec.mlp_bias else 0) + (2 * d if spec.qk_norm else 0)
        return block_matmul_params(spec) + 2 * h + extra
    return block_matmul_params(spec) + 4 * h + 3 * h + h + f + h


def embed_params(spec: ModelSpec) -> int:
    """Token embedding ``v h`` (+ learned positions ``max_seq_len h`` for gpt)."""
    h, _, _, _, v = _dims(spec)
    return v * h + (spec.max_seq_len * h if spec.family == "gpt" else 0)


def head_params(spec: ModelSpec) -> int:
    """Final norm plus LM head ``v h`` (the head matrix is counted here even when tied: on a pipeline the last
    stage holds its own copy, as Megatron-LM does)."""
    h, _, _, _, v = _dims(spec)
    norm = h if spec.family == "llama" else 2 * h
    return norm + v * h


def model_params(spec: ModelSpec) -> int:
    """Unique parameters (tied head counted once). Source: sum of the module definitions; a Mixture-of-Experts model
    by :func:`paraplan.models.moe.count_params` (``.total``)."""
    if spec.moe is not None:
        return count_params(spec).total
    assert spec.n_layers
    h, _, _, _, v = _dims(spec)
    total = embed_params(spec) + spec.n_layers * block_params(spec) + head_params(spec)
    return total - (v * h if spec.tied_embeddings else 0)


def attention_fwd_flops(spec: ModelSpec, b: int, s: int) -> float:
    """Forward FLOPs of the attention core (Q K^T and A V) as MFU conventions count them: ``4 b s^2 a d``.

    Each of the ``a`` query heads multiplies ``(s, d) x (d, s)`` and ``(s, s) x (s, d)``: ``2 x 2 s^2 d`` FLOPs; with
    ``a d = h`` this is Narayanan's ``4 b s^2 h``. The full ``s x s`` square is counted although a causal kernel
    skips the masked half (Megatron-LM, Korthikanti et al. and llm-foundry all count it this way).
    Source: Narayanan et al. SC'21 sec. 5.1. Assumptions: no sliding window (``ModelSpec.check_seq_len`` refuses
    ``s`` beyond it, where the window would change this count).
    """
    a = _dims(spec)[2]
    return 4.0 * b * s * s * a * _head_dim(spec)


def block_fwd_flops(spec: ModelSpec, b: int, s: int) -> float:
    """Forward FLOPs of one block for a micro-batch.

    Formula: ``2 b s P_matmul + 4 b s^2 a d`` (the two attention matmuls QK^T and AV, full s x s as in
        Megatron's accounting, causal masking not discounted; ``a d = h`` unless head_dim says otherwise).
    Source: Narayanan et al. SC'21 sec. 5.1 / eq. 3 (``24 b s h^2 + 4 b s^2 h`` per GPT layer forward).
    """
    return 2.0 * b * s * block_matmul_params(spec) + attention_fwd_flops(spec, b, s)


def head_fwd_flops(spec: ModelSpec, b: int, s: int) -> float:
    """LM head forward ``2 b s h v``. Source: Narayanan et al. SC'21 eq. 3 (the ``6 B s h V`` term / 3)."""
    h, _, _, _, v = _dims(spec)
    return 2.0 * b * s * h * v


def model_flops_per_step(spec: ModelSpec, global_batch: int, s: int) -> float:
    """Model FLOPs of one optimizer step, without recomputation: 3 x forward (backward = 2 x forward).

    Formula: ``3 B (L F_block + F_head)`` with F_block from :func:`block_fwd_flops`. For a GPT block with f = 4h
        this equals ``72 B s L h^2 (1 + s/(6h) + v/(12 h L))``.
    Source: Korthikanti et al. 2022, eq. 7 (model FLOPs, used for MFU).
    """
    assert spec.n_layers
    fwd = spec.n_layers * block_fwd_flops(spec, global_batch, s) + head_fwd_flops(spec, global_batch, s)
    return 3.0 * fwd


def block_activation_bytes(spec: ModelSpec, b: int, s: int, t: int, dtype_bytes: int, sp: bool = False) -> float:
    """Bytes one block saves for backward (no recomputation), per device under tensor parallelism.

    Formula (elements per token, times ``b s dtype_bytes``), attention with a fused (flash/SDPA) kernel so no
        ``a s^2`` term, no dropout:
        llama: replicated ``4h`` (block input, normed input, mid residual, normed mid) + sharded
            ``(2ad + 2kd + 4f) / t`` (Q, attention output, K, V; gate, up, silu(gate), product), plus
            ``(ad + kd) / t`` with qk_norm (the q_proj and k_proj outputs the q/k RMSNorms save). Biases save
            nothing (the linear keeps its input either way).
        gpt: replicated ``4h`` (two LayerNorm inputs and outputs feeding the linears) + sharded
            ``(2h + 2h + 2h ... )``: QKV ``3h``, attention output ``h``, fc output ``f``, GELU output ``f``
            -> ``(4h + 2f) / t``; with f = 4h this is Korthikanti's ``10 + 24/t`` with the 2 bytes of dropout
            masks removed (``4 + ... `` replicated part differs by the masks).
        sp=True shards the replicated part too (divide everything by t).
    Source: Korthikanti et al. 2022, sec. 4.1-4.2 (Table 2 derivation), adapted per module as above.
    Assumptions: fused attention (saves Q, K, V, output and a logsumexp of ``a s`` floats, neglected).
    """
    h, f, a, k, _ = _dims(spec)
    if spec.family == "llama":
        d = _head_dim(spec)
        replicated, sharded = 4 * h, 2 * a * d + 2 * k * d + 4 * f + (a * d + k * d if spec.qk_norm else 0)
    else:
        replicated, sharded = 4 * h, 4 * h + 2 * f
    per_token = (replicated + sharded) / t if sp else replicated + sharded / t
    return float(b * s * dtype_bytes * per_token)


def block_input_bytes(spec: ModelSpec, b: int, s: int, dtype_bytes: int, t: int = 1, sp: bool = False) -> float:
    """The block's input ``b s h`` (kept per block under full recomputation; ``/t`` with sequence parallelism).

    Source: Korthikanti et al. 2022, sec. 4.3 ("full activation recomputation ... 2 s b h per layer").
    """
    h = _dims(spec)[0]
    return float(b * s * h * dtype_bytes) / (t if sp else 1)


def head_activation_bytes(spec: ModelSpec, b: int, s: int, t: int, dtype_bytes: int) -> float:
    """Final norm input + head input ``2 b s h`` in dtype, plus fp32 logits and their softmax ``8 b s v / t``.

    Source: Korthikanti et al. 2022, sec. 4.1 ("output layer ... 4 s b v / t" for fp32 logits); the cross-entropy
    kernel of torch keeps the fp32 logits and their log-softmax (a second ``4 b s v``).
    """
    h, _, _, _, v = _dims(spec)
    return float(2 * b * s * h * dtype_bytes + 8 * b * s * v / t)


def embed_activation_bytes(spec: ModelSpec, b: int, s: int) -> float:
    """Token ids ``8 b s`` (int64) saved by the embedding's backward. Source: torch.nn.Embedding backward."""
    return float(8 * b * s)


# ---- shapes and memory traffic used by the compute-time model (efficiency.py) -----------------------------------

# Megatron-LM pads the vocabulary to a multiple of 128 x tp (``--make-vocab-size-divisible-by 128``,
# megatron/training/tokenizer ``_vocab_size_with_padding``) so that the vocabulary-parallel head splits evenly.
VOCAB_MULTIPLE = 128


def padded_vocab(spec: ModelSpec, t: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Vocabulary rows actually allocated and multiplied: ``ceil(v / (multiple t)) multiple t``.

    Source: Megatron-LM ``_vocab_size_with_padding``. Model FLOPs (MFU) keep the unpadded ``v``; time, parameters
    held by the head and its memory use the padded size.
    """
    v = _dims(spec)[4]
    unit = multiple * t
    return -(-v // unit) * unit


def block_gemms(spec: ModelSpec, tokens: int, t: int) -> list[tuple[int, int, int]]:
    """``(M, K, N)`` of each forward GEMM of one block on one tensor-parallel rank (Megatron column/row split).

    llama: q ``(M, h, a d/t)``, k and v ``(M, h, k d/t)``, o ``(M, a d/t, h)``, gate and up ``(M, h, f/t)``,
        down ``(M, f/t, h)``; gpt: qkv ``(M, h, 3h/t)``, proj ``(M, h/t, h)``, fc ``(M, h, f/t)``, fc-proj
        ``(M, f/t, h)``. ``M = b s`` tokens of the micro-batch (sequence-parallel layouts all-gather to it).
    Source: Shoeybi et al. 2019 (Megatron-LM) sec. 3; the module definitions. Their FLOPs sum to
        ``2 M P_matmul / t`` (:func:`block_matmul_params`).
    """
    h, f, a, k, _ = _dims(spec)

    def shard(x: int) -> int:
        return -(-x // t)

    if spec.family == "llama":
        d = _head_dim(spec)
        return [(tokens, h, shard(a * d)), (tokens, h, shard(k * d)), (tokens, h, shard(k * d)),
                (tokens, shard(a * d), h), (tokens, h, shard(f)), (tokens, h, shard(f)), (tokens, shard(f), h)]
    return [(tokens, h, shard(3 * h)), (tokens, shard(h), h), (tokens, h, shard(f)), (tokens, shard(f), h)]


def block_elementwise_elements(spec: ModelSpec) -> tuple[int, int]:
    """Elements read + written per token by one block's forward element-wise kernels: (replicated, tp-sharded).

    Formula:
        replicated (each tp rank repeats them on the full hidden state unless sequence parallelism shards it):
            two norms (read h, write h) = 4h; two residual adds (read 2h, write h) = 6h; total ``10 h``.
        sharded (act on the ``/t`` slices): llama: SwiGLU ``silu(g) * u`` (read 2f, write f) = 3f and rotary on
            q and k (read and write ``a d + k d``) = ``2ad + 2kd``, plus the q/k RMSNorms with qk_norm (read and
            write ``a d + k d`` again); gpt: bias + GeLU (read f, write f) = 2f.
    Source: counted from the module definitions; the backward moves about twice the forward's bytes (gradients
        in, saved inputs in, gradients out), which the cost model applies.
    Assumptions: biases of the linear layers are fused into the GEMM epilogue; no dropout in llama blocks.
    """
    h, f, a, k, _ = _dims(spec)
    if spec.family == "llama":
        d = _head_dim(spec)
        return 10 * h, 3 * f + (4 if spec.qk_norm else 2) * (a * d + k * d)
    return 10 * h, 2 * f


def block_eager_extra_bytes(spec: ModelSpec) -> tuple[int, int]:
    """Bytes per token a block's forward element-wise work moves in PyTorch eager mode beyond the fused count of
    :func:`block_elementwise_elements` (one read and one write per op, bf16): (replicated, tp-sharded).

    Formula (llama, torchtitan's modules, bf16 activations, fp32 upcasts):
        RMSNorm ``(x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).type_as(x) * weight`` runs float() (read 2,
            write 4), pow (4, 4), mean (read 4), mul (4, 4), type_as (4, 2), * weight (2, 2): 36 bytes per element
            against the fused 4, so ``2 x 32 h`` for the two norms;
        rotary ``view_as_real(view_as_complex(x.float()) * freqs).type_as(x)`` on q and k: float() (2, 4), complex
            mul (4, 4), type_as (4, 2): 20 bytes per element against 4, so ``16 (a d + k d)``;
        SwiGLU ``silu(w1 x) * w3 x``: silu (2, 2) and mul (4, 2): 10 bytes per ``f`` element against 6, so ``4 f``;
        the residual adds are one kernel each either way.
        gpt: 0 (nn.LayerNorm and GeLU are single kernels in eager mode; biases ride in addmm).
    Source: torchtitan torchtitan/models/norms.py ``RMSNorm`` and models/llama/model.py ``apply_rotary_emb``,
        ``FeedForward`` (2024); torch.compile fuses each chain into one kernel (torchtitan compiles every
        TransformerBlock, apply_compile), which is the fused count.
    Assumption: the backward moves twice the forward's bytes, as for the fused count (compute.block_times).
    """
    h, f, a, k, _ = _dims(spec)
    if spec.family != "llama":
        return 0, 0
    d = _head_dim(spec)
    return 64 * h, 16 * (a * d + k * d) + 4 * f


# Bytes per element of the ``b a s^2`` score matrix moved by an unfused attention (Megatron-LM 2021: baddbmm,
# fused scale-mask-softmax, dropout, bmm). Forward: write scores 2, softmax read 2 + write 2, dropout read 2 +
# write 2 + mask 1, read by the A V bmm 2 = 13. Backward: write dP 2, dropout read 2 + mask 1 + write 2, softmax
# read dP 2 + P 2 + write 2, read by the dQ/dK bmms 2 = 15. Without dropout (llama): 8 forward, 10 backward.
UNFUSED_SCORE_BYTES = {"gpt": (13, 15), "llama": (8, 10)}


def attention_score_bytes(spec: ModelSpec, b: int, s: int, t: int) -> tuple[float, float]:
    """(forward, backward) bytes an unfused attention moves through memory for its score matrix, per tp rank.

    Formula: ``b (a/t) s^2 x UNFUSED_SCORE_BYTES``. Source: counted from Megatron-LM's attention (2021); the same
        ``s^2`` tensors as the ``5 a s^2 b`` term of Korthikanti et al. 2022 Table 2.
    """
    a = _dims(spec)[2]
    fwd, bwd = UNFUSED_SCORE_BYTES["llama" if spec.family == "llama" else "gpt"]
    elems = b * (a / t) * s * s
    return elems * fwd, elems * bwd


def attention_score_activation_bytes(spec: ModelSpec, b: int, s: int, t: int) -> float:
    """Saved ``s^2`` activations of an unfused attention: ``5 a s^2 b / t`` bytes (scores, softmax, dropout mask).

    Source: Korthikanti et al. 2022 sec. 4.1 / Table 2 (the term selective recomputation and FlashAttention remove).
    """
    a = _dims(spec)[2]
    return 5.0 * a * s * s * b / t


# torchtitan's op-level selective policy recomputes every second matmul of a block (its mm counter saves the odd
# ones): in a Llama block's forward order q, k, v, o, gate, up, down these are k, o and up (0-based indices 1, 3, 5
# of block_gemms). Source: torchtitan/models/llama3/infra/parallelize.py (_save_list, _get_custom_policy).
OP_POLICY_RECOMPUTED_GEMMS = (1, 3, 5)


def op_policy_supported(spec: ModelSpec) -> bool:
    """Whether :func:`block_op_policy_activation_bytes` describes the block: Llama-family blocks whose projections
    have no bias (a biased linear runs ``aten.addmm``, which torchtitan's policy does not save, so the q/v/gate/down
    outputs would be recomputed too); GPT-2's Conv1D projections are ``addmm`` for the same reason."""
    return spec.family == "llama" and not (spec.qkv_bias or spec.o_bias or spec.mlp_bias)


def block_op_policy_activation_bytes(spec: ModelSpec, b: int, s: int, t: int, dtype_bytes: int,
                                     sp: bool = False) -> float:
    """Bytes a Llama block keeps for backward under torchtitan's op-level selective activation checkpointing.

    Formula (elements per token, times ``b s dtype_bytes``): the checkpoint's input ``h``, and the outputs of the
        saved ops: the odd matmuls q ``a d``, v ``k d``, gate ``f``, down ``h`` (its output before the tensor-parallel
        reduction, full size on every tp rank), and the attention output ``a d``. Without sequence parallelism:
        replicated ``2h`` + sharded ``(2 a d + k d + f) / t``. With it the input and the reduce-scatter outputs of the
        o and down projections (saved: ``reduce_scatter_tensor`` is in the list) are sequence-sharded: replicated
        ``h`` (the down matmul output) + sharded ``(3h + 2 a d + k d + f) / t``. Everything else (norms, rotary,
        SiLU, products, the k, o and up matmuls, all-reduces and all-gathers) is recomputed in backward.
    Source: torchtitan/models/llama3/infra/parallelize.py (``_save_list``: aten.mm, the SDPA ops,
        reduce_scatter_tensor, aten.max; every second mm recomputed); the op order of transformers' LlamaDecoderLayer.
    Assumptions: the attention's logsumexp (``a`` floats per token) neglected; :func:`op_policy_supported` holds.
    """
    h, f, a, k, _ = _dims(spec)
    d = _head_dim(spec)
    sharded = 2 * a * d + k * d + f
    per_token = h + (3 * h + sharded) / t if sp else 2 * h + sharded / t
    return float(b * s * dtype_bytes * per_token)


def hardware_flops_per_step(spec: ModelSpec, global_batch: int, s: int, recompute: str) -> float:
    """FLOPs the devices execute per step including recomputation (for HFU).

    Formula: model FLOPs (:func:`model_flops_per_step`) plus the recomputed forward: ``none`` adds nothing;
        ``selective`` adds the attention core's forward ``B L 4 s^2 a d`` (Q K^T and A V are recomputed); ``op``
        (torchtitan's op-level policy) adds the k, o and up projections ``2 B s L (h k d + a d h + h f)``;
        ``full`` adds every block's forward ``B L F_block`` (the LM head is not recomputed). For a GPT block with
        ``full`` this equals Narayanan et al. SC'21 eq. 3, ``96 B s L h^2 (1 + s/(6h) + v/(16 L h))``.
    Source: Narayanan et al. SC'21 eq. 3; Korthikanti et al. 2022 sec. 5 (HFU counts recomputed FLOPs). The
        FlashAttention backward's internal recomputation of Q K^T is not counted (as llm-foundry's HFU).
    """
    assert spec.n_layers
    model = model_flops_per_step(spec, global_batch, s)
    if recompute == "full":
        return model + spec.n_layers * block_fwd_flops(spec, global_batch, s)
    if recompute == "selective":
        return model + spec.n_layers * attention_fwd_flops(spec, global_batch, s)
    if recompute == "op":
        gemms = block_gemms(spec, global_batch * s, 1)
        return model + spec.n_layers * sum(2.0 * m * kk * n for i, (m, kk, n) in enumerate(gemms)
                                           if i in OP_POLICY_RECOMPUTED_GEMMS)
    return model
