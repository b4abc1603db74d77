"""Pydantic models that cross a stage boundary.

Data flows one way: ``ModelSpec/ClusterSpec/TrainSpec -> ModelProfile -> cost model -> Plan -> LaunchSpec``.
Every model is frozen and forbids unknown fields; every file written to disk carries ``schema_version``.
Units are in the field names: ``*_bytes``, ``*_s``, ``*_flops``, ``*_flops_per_s``, ``*_bytes_per_s``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from paraplan.errors import ModelSpecError, ProfileError, TrainSpecError

SCHEMA_VERSION = 1

Dtype = Literal["bf16", "fp16", "fp32"]
LayerKind = Literal["embed", "block", "head"]
Family = Literal["llama", "gpt", "custom"]
LlamaModelType = Literal["llama", "mistral", "qwen2", "qwen3"]
# Hugging Face model types of the Mixture-of-Experts decoders paraplan reads and counts (planning them comes later).
MoEModelType = Literal["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"]
MOE_MODEL_TYPES: tuple[str, ...] = get_args(MoEModelType)
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")  # multi-head latent attention
GELU_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")
Activation = Literal["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"]
Backend = Literal["deepspeed", "torch"]
# Where a model state lives (ZeRO-Infinity's memory tiers, Rajbhandari et al. 2021 sec. 5): on the device ("none":
# not offloaded), in host memory ("cpu") or on NVMe ("nvme").
Tier = Literal["none", "cpu", "nvme"]
TIERS: tuple[str, ...] = ("none", "cpu", "nvme")


def _tier(value: Any) -> Any:
    """Accept the booleans of schema 1 plans and ``--strategy offload=true``: True is host memory, False none."""
    if isinstance(value, bool):
        return "cpu" if value else "none"
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return "cpu" if value.lower() in ("true", "yes", "on") else "none"
    return value


def _coerce_tiers(data: Any) -> Any:
    if isinstance(data, dict) and "offload_optimizer" in data:
        return {**data, "offload_optimizer": _tier(data["offload_optimizer"])}
    return data

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MoESpec(_Frozen):
    """Mixture-of-Experts MLP of a decoder: a router sends each token to ``top_k`` of ``n_experts`` routed experts
    (SwiGLU MLPs), optionally plus shared experts every token passes through.

    Terms: Shazeer et al. 2017 (top-k gating), Fedus et al. 2022 (Switch Transformers), Dai et al. 2024
    (DeepSeekMoE: shared experts, fine-grained experts). Each description names the Hugging Face config.json key
    the field is read from.
    """

    n_experts: int = Field(
        gt=0, strict=True, description="Routed experts per MoE layer, E (config.json num_local_experts: Mixtral, "
        "gpt-oss; num_experts: Qwen2-MoE, Qwen3-MoE; n_routed_experts: DeepSeek).")
    top_k: int = Field(
        gt=0, strict=True, description="Routed experts each token is sent to, K (num_experts_per_tok).")
    expert_ffn_hidden: int = Field(
        gt=0, strict=True, description="Inner size of each routed expert's SwiGLU MLP (moe_intermediate_size; "
        "Mixtral and gpt-oss: intermediate_size).")
    n_shared_experts: int = Field(
        default=0, ge=0, strict=True, description="Shared experts, applied to every token (DeepSeek "
        "n_shared_experts; Qwen2-MoE: 1, its shared_expert).")
    shared_expert_ffn_hidden: int | None = Field(
        default=None, gt=0, strict=True, description="Inner size of each shared expert (DeepSeek "
        "moe_intermediate_size: its shared MLP is n_shared_experts x moe_intermediate_size wide; Qwen2-MoE "
        "shared_expert_intermediate_size); None without shared experts.")
    shared_expert_gate: bool = Field(
        default=False, strict=True, description="A sigmoid gate Linear(h, 1) scales the shared experts' output "
        "(Qwen2-MoE shared_expert_gate).")
    first_dense_layers: int = Field(
        default=0, ge=0, strict=True, description="The first k decoder layers have a dense MLP of ffn_hidden "
        "instead (DeepSeek first_k_dense_replace).")
    layer_freq: int = Field(
        default=1, gt=0, strict=True, description="MoE layer frequency: layer i (from 0) is an MoE layer when "
        "i >= first_dense_layers and (i + 1) % layer_freq == 0, dense otherwise (Qwen-MoE decoder_sparse_step).")
    router_bias: bool = Field(
        default=False, strict=True, description="The router's linear layer has a bias, E per layer (gpt-oss "
        "router.bias).")
    router_score_correction_bias: bool = Field(
        default=False, strict=True, description="DeepSeek-V3's auxiliary-loss-free balancing bias "
        "(e_score_correction_bias, topk_method noaux_tc): E fp32 values per layer added to the routing scores, "
        "updated by the balancing rule rather than by gradients; a buffer in transformers, not a parameter.")
    expert_bias: bool = Field(
        default=False, strict=True, description="Routed experts' projections have biases (gpt-oss "
        "gate_up_proj_bias, down_proj_bias).")

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds n_experts ({self.n_experts}): a token cannot be sent "
                             "to more experts than there are")
        if (self.n_shared_experts > 0) != (self.shared_expert_ffn_hidden is not None):
            raise ValueError("give shared_expert_ffn_hidden exactly when n_shared_experts > 0 (got "
                             f"n_shared_experts={self.n_shared_experts}, "
                             f"shared_expert_ffn_hidden={self.shared_expert_ffn_hidden})")
        if self.shared_expert_gate and self.n_shared_experts == 0:
            raise ValueError("shared_expert_gate gates shared experts: set n_shared_experts > 0 or drop the gate")
        return self

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` (from 0) has this MoE MLP rather than the dense one."""
        return layer_idx >= self.first_dense_layers and (layer_idx + 1) % self.layer_freq == 0


class MLASpec(_Frozen):
    """Multi-head latent attention (DeepSeek-V2, DeepSeek-AI 2024, sec. 2.1): queries through an optional low-rank
    latent, keys and values through a shared compressed latent (the KV cache) plus a decoupled rotary key.

    Each description names the config.json key the field is read from.
    """

    q_lora_rank: int | None = Field(
        default=None, gt=0, strict=True, description="Rank of the query latent (q_lora_rank); None projects "
        "queries directly, h -> heads x (qk_nope_head_dim + qk_rope_head_dim) (DeepSeek-V2-Lite).")
    kv_lora_rank: int = Field(gt=0, strict=True, description="Rank of the compressed key/value latent "
                              "(kv_lora_rank).")
    qk_nope_head_dim: int = Field(gt=0, strict=True, description="Per-head query/key dimension without rotary "
                                  "embedding (qk_nope_head_dim).")
    qk_rope_head_dim: int = Field(gt=0, strict=True, description="Per-head query/key dimension with rotary "
                                  "embedding, the key part shared by all heads (qk_rope_head_dim).")
    v_head_dim: int = Field(gt=0, strict=True, description="Per-head value dimension (v_head_dim).")


class ModelSpec(_Frozen):
    """Architecture of a decoder-only transformer, or a user factory that builds one.

    For ``family`` llama or gpt every dimension is required; paraplan builds the module from transformers' classes
    (for llama, those of ``model_type``: llama, mistral, qwen2 or qwen3) and predicts its costs from these fields.
    Mixture-of-Experts decoders (``moe``; model_type mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3,
    gpt_oss, DeepSeek's with multi-head latent attention ``mla``) are counted by :mod:`paraplan.models.moe`, priced by
    :mod:`paraplan.cost_models.moe` and built by :mod:`paraplan.models.build` (gpt_oss: counted only; its 128-token
    sliding window refuses longer sequences in :meth:`check_seq_len`).
    For ``custom`` the module comes from ``factory`` (``package.module:function``) and costs come from a measured
    profile. Integer and boolean fields are strict: ``n_layers: true``, ``2.5`` or ``"32"`` are refused, not coerced.
    """

    name: str = Field(description="Preset name, file path or factory this spec came from.")
    family: Family = Field(
        description="llama: RMSNorm, SwiGLU, GQA, RoPE (model_type llama, mistral, qwen2, qwen3; with moe: "
        "mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, gpt_oss). gpt: LayerNorm, GELU MLP, learned "
        "positions."
    )
    n_layers: int | None = Field(default=None, gt=0, strict=True, description="Number of repeated transformer blocks.")
    hidden: int | None = Field(default=None, gt=0, strict=True, description="Hidden size h.")
    ffn_hidden: int | None = Field(default=None, gt=0, strict=True, description="MLP inner size.")
    n_heads: int | None = Field(default=None, gt=0, strict=True, description="Attention heads a.")
    n_kv_heads: int | None = Field(
        default=None, gt=0, strict=True, description="Key/value heads (GQA); equals n_heads for MHA."
    )
    vocab: int | None = Field(default=None, gt=0, strict=True, description="Vocabulary size v.")
    tied_embeddings: bool = Field(default=False, strict=True, description="LM head shares the embedding matrix.")
    max_seq_len: int = Field(default=8192, gt=0, strict=True, description="Maximum sequence length (positions).")
    norm_eps: float = Field(default=1e-5, gt=0)
    rope_theta: float = Field(default=500000.0, gt=0)
    factory: str | None = Field(default=None, description="'package.module:function' returning a LayerChain.")
    model_type: LlamaModelType | MoEModelType | None = Field(
        default=None,
        description="family llama: the Hugging Face model_type whose decoder layer builds each block (llama, "
        "mistral, qwen2, qwen3; Mixture-of-Experts: mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, "
        "gpt_oss); None is llama.",
    )
    head_dim: int | None = Field(
        default=None, gt=0, strict=True,
        description="Per-head dimension d; None is hidden // n_heads. q and o are h x (n_heads d), k and v are "
        "h x (n_kv_heads d) (Qwen3 sets d = 128 whatever h is). With mla: the query/key head dimension, "
        "qk_nope_head_dim + qk_rope_head_dim.",
    )
    qkv_bias: bool = Field(default=False, strict=True, description="q, k, v projections have biases (Qwen2; "
                           "Llama/Qwen3 attention_bias).")
    o_bias: bool = Field(default=False, strict=True, description="o projection has a bias (Llama/Qwen3 "
                         "attention_bias).")
    mlp_bias: bool = Field(default=False, strict=True, description="gate, up, down have biases (Llama mlp_bias).")
    qk_norm: bool = Field(default=False, strict=True, description="RMSNorm over head_dim on q and k (Qwen3).")
    sliding_window: int | None = Field(
        default=None, gt=0, strict=True,
        description="Span in tokens of the model's sliding-window attention layers (Mistral, Qwen with "
        "use_sliding_window); None is full causal attention everywhere. Only seq_len <= sliding_window is planned, "
        "where the window changes nothing.",
    )
    hidden_act: Activation | None = Field(
        default=None, description="MLP activation; None is the family's (silu for llama, gelu_new for gpt)."
    )
    rope_scaling: dict[str, Any] | None = Field(
        default=None,
        description="Hugging Face rope_parameters other than rope_theta (rope_type llama3, yarn, ...), passed to "
        "the built model; None is plain RoPE. Changes numerics, not costs.",
    )
    moe: MoESpec | None = Field(
        default=None,
        description="Mixture-of-Experts MLP of the MoE layers (model_type mixtral, qwen2_moe, qwen3_moe, "
        "deepseek_v2, deepseek_v3, gpt_oss); None for a dense model. Layers it does not cover (moe.first_dense_layers,"
        " moe.layer_freq) have the dense SwiGLU MLP of ffn_hidden.",
    )
    mla: MLASpec | None = Field(
        default=None,
        description="Multi-head latent attention instead of GQA (model_type deepseek_v2, deepseek_v3); None "
        "otherwise.",
    )
    attention_sinks: bool = Field(
        default=False, strict=True,
        description="A learned softmax sink logit per attention head, n_heads parameters per layer (gpt-oss sinks).",
    )

    @model_validator(mode="after")
    def _check_dims(self) -> ModelSpec:
        dims = ("n_layers", "hidden", "ffn_hidden", "n_heads", "n_kv_heads", "vocab")
        if self.family == "custom":
            if not self.factory:
                raise ValueError("family 'custom' needs factory: 'package.module:function'")
            return self
        missing = [d for d in dims if getattr(self, d) is None]
        if missing:
            raise ValueError(f"family '{self.family}' needs {', '.join(missing)}")
        assert self.hidden is not None and self.n_heads is not None and self.n_kv_heads is not None
        if self.head_dim is None and self.mla is None and self.hidden % self.n_heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads}), or set head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        self._check_block_features()
        return self

    def _check_block_features(self) -> None:
        """Refuse fields the block that paraplan builds for this family/model_type would not have."""
        if self.family == "gpt":
            llama_only = {"model_type": None, "head_dim": None, "qkv_bias": False, "o_bias": False,
                          "mlp_bias": False, "qk_norm": False, "sliding_window": None, "rope_scaling": None,
                          "moe": None, "mla": None, "attention_sinks": False}
            bad = [k for k, default in llama_only.items() if getattr(self, k) != default]
            if bad:
                raise ValueError(f"{', '.join(bad)} apply to family llama only; GPT-2 blocks have fixed biases, "
                                 "head_dim = hidden / n_heads and learned positions")
            if self.hidden_act not in (None, *GELU_ACTIVATIONS):
                raise ValueError(f"family gpt uses a GELU MLP (one of {', '.join(GELU_ACTIVATIONS)}), "
                                 f"not hidden_act '{self.hidden_act}'")
            return
        mt = self.model_type or "llama"
        if self.hidden_act not in (None, "silu"):
            raise ValueError(f"family llama uses a SwiGLU MLP (hidden_act silu), not '{self.hidden_act}'")
        rules = [  # (broken, message): what the transformers decoder layer of this model_type builds
            (mt in ("llama", "qwen3", "qwen3_moe", "gpt_oss") and self.qkv_bias != self.o_bias,
             f"model_type {mt} has one attention_bias for q, k, v and o: set qkv_bias and o_bias alike"),
            (mt == "qwen2" and not (self.qkv_bias and not self.o_bias),
             "model_type qwen2 always has q, k, v biases and no o bias: set qkv_bias true, o_bias false"),
            (mt == "qwen2_moe" and self.o_bias,
             "model_type qwen2_moe has no o bias (its qkv_bias covers q, k, v only): set o_bias false"),
            (mt in ("mistral", "mixtral", *MLA_MODEL_TYPES) and (self.qkv_bias or self.o_bias),
             f"model_type {mt} has no attention biases: set qkv_bias and o_bias false"),
            (self.mlp_bias and mt != "llama",
             f"model_type {mt} has no MLP biases (only llama's mlp_bias): set mlp_bias false"),
            (self.qk_norm != (mt in ("qwen3", "qwen3_moe")),
             "qk_norm must be true for model_type qwen3 and qwen3_moe (their q_norm/k_norm) and false otherwise"),
            (self.sliding_window is not None and mt in ("llama", *MLA_MODEL_TYPES),
             f"model_type {mt} has no sliding-window attention: remove sliding_window"),
        ]
        bad = [message for broken, message in rules if broken] + self._moe_rules(mt)
        if bad:
            raise ValueError("; ".join(bad))

    def _moe_rules(self, mt: str) -> list[str]:
        """What the Mixture-of-Experts and latent-attention fields must be for this model_type (messages of the
        broken rules)."""
        moe, is_mla = self.moe, mt in MLA_MODEL_TYPES
        if moe is None:
            bad = [f"model_type {mt} is a Mixture-of-Experts decoder: give moe (n_experts, top_k, expert_ffn_hidden)"
                   ] if mt in MOE_MODEL_TYPES else []
            if self.mla is not None:
                bad.append("mla (multi-head latent attention) applies to model_type deepseek_v2 and deepseek_v3 only")
            if self.attention_sinks:
                bad.append("attention_sinks apply to model_type gpt_oss only")
            return bad
        assert self.n_layers is not None and self.ffn_hidden is not None
        n_moe = sum(moe.is_moe_layer(i) for i in range(self.n_layers))
        shared = moe.n_shared_experts > 0
        rules = [
            (mt not in MOE_MODEL_TYPES,
             f"moe applies to the Mixture-of-Experts model types ({', '.join(MOE_MODEL_TYPES)}); model_type {mt} is "
             "dense"),
            (n_moe == 0, f"no layer is an MoE layer (n_layers {self.n_layers}, moe.first_dense_layers "
                         f"{moe.first_dense_layers}, moe.layer_freq {moe.layer_freq}): drop moe or lower those"),
            (is_mla != (self.mla is not None),
             "mla (multi-head latent attention) is required by model_type deepseek_v2 and deepseek_v3 and applies "
             "to them only"),
            (self.mla is not None and self.head_dim != self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim,
             "with mla, head_dim is the query/key head dimension: set it to mla.qk_nope_head_dim + "
             "mla.qk_rope_head_dim"),
            (self.attention_sinks != (mt == "gpt_oss"),
             "attention_sinks must be true for model_type gpt_oss (its per-head sinks) and false otherwise"),
            ((moe.router_bias or moe.expert_bias) != (mt == "gpt_oss") or moe.router_bias != moe.expert_bias,
             "moe.router_bias and moe.expert_bias must be true for model_type gpt_oss (biased router and experts) "
             "and false otherwise"),
            (moe.router_score_correction_bias != (mt == "deepseek_v3"),
             "moe.router_score_correction_bias must be true for model_type deepseek_v3 (its "
             "e_score_correction_bias) and false otherwise"),
            (mt in ("mixtral", "qwen3_moe", "gpt_oss") and shared,
             f"model_type {mt} has no shared experts: set moe.n_shared_experts 0"),
            (mt == "qwen2_moe" and not (moe.n_shared_experts == 1 and moe.shared_expert_gate),
             "model_type qwen2_moe has one gated shared expert: set moe.n_shared_experts 1 and "
             "moe.shared_expert_gate true"),
            (mt != "qwen2_moe" and moe.shared_expert_gate,
             "moe.shared_expert_gate applies to model_type qwen2_moe only"),
            (is_mla and shared and moe.shared_expert_ffn_hidden != moe.expert_ffn_hidden,
             f"model_type {mt}'s shared experts are as wide as its routed ones (moe_intermediate_size): set "
             "moe.shared_expert_ffn_hidden to moe.expert_ffn_hidden"),
            (mt in ("mixtral", "gpt_oss") and moe.expert_ffn_hidden != self.ffn_hidden,
             f"model_type {mt}'s experts use intermediate_size: set moe.expert_ffn_hidden equal to ffn_hidden"),
            (not is_mla and moe.first_dense_layers > 0,
             "moe.first_dense_layers (first_k_dense_replace) applies to model_type deepseek_v2 and deepseek_v3 only"),
            (mt not in ("qwen2_moe", "qwen3_moe") and moe.layer_freq != 1,
             "moe.layer_freq (decoder_sparse_step) applies to model_type qwen2_moe and qwen3_moe only"),
        ]
        return [message for broken, message in rules if broken]

    @property
    def attention_head_dim(self) -> int | None:
        """Per-head dimension d: ``head_dim``, else ``hidden // n_heads`` (None when unknown)."""
        if self.head_dim is not None:
            return self.head_dim
        return self.hidden // self.n_heads if self.hidden and self.n_heads else None

    def check_seq_len(self, seq_len: int) -> None:
        """Refuse a model, or a sequence length, that paraplan cannot plan exactly.

        Every path that prices or launches a spec calls this before any cost-model or solver work
        (``search_plans``, ``validate_strategy`` for ``estimate``, ``launch_plan``), so the refusal of models the cost
        models do not describe lives here too.

        Args:
            seq_len: tokens per sequence of the training setup.

        Raises:
            ModelSpecError: a Mixture-of-Experts model whose dense layers are not all first (``layer_freq`` > 1):
                the planner's stages count the dense blocks as a prefix of the chain.
            TrainSpecError: ``seq_len`` exceeds ``max_seq_len`` (no positions beyond it), or exceeds
                ``sliding_window`` (windowed attention then differs from the full causal attention paraplan costs).
        """
        if self.moe is not None and self.moe.layer_freq > 1:
            raise ModelSpecError(
                f"{self.name} interleaves dense and MoE layers (layer_freq {self.moe.layer_freq}): paraplan plans "
                "MoE models whose dense layers come first (DeepSeek's first_k_dense_replace) or that have none; "
                "set decoder_sparse_step to 1"
            )
        if seq_len > self.max_seq_len:
            raise TrainSpecError(
                f"seq_len {seq_len} exceeds {self.name}'s max_seq_len {self.max_seq_len}; plan with "
                f"--seq-len <= {self.max_seq_len}"
            )
        if self.sliding_window is not None and seq_len > self.sliding_window:
            raise TrainSpecError(
                f"seq_len {seq_len} exceeds {self.name}'s sliding window of {self.sliding_window} tokens: "
                f"sliding-window attention of {self.sliding_window} tokens is not modelled (its FLOPs and memory "
                f"differ from full attention); use --seq-len <= {self.sliding_window}"
            )


class DeviceSpec(_Frozen):
    """One accelerator (or CPU process) type, with a source for every figure."""

    name: str
    kind: Literal["cuda", "cpu"] = "cuda"
    memory_bytes: float = Field(gt=0, description="Device memory per device, bytes.")
    peak_flops_per_s: dict[str, float] = Field(description="Dense peak FLOP/s per dtype (bf16, fp16, fp32).")
    memory_bandwidth_bytes_per_s: float = Field(gt=0, description="Device memory bandwidth.")
    sources: dict[str, str] = Field(default_factory=dict, description="Figure name -> datasheet citation.")


class ClusterSpec(_Frozen):
    """A homogeneous cluster: ``nodes`` x ``devices_per_node`` devices of one type."""

    schema_version: int = SCHEMA_VERSION
    name: str
    nodes: int = Field(gt=0)
    devices_per_node: int = Field(gt=0)
    device: DeviceSpec
    intra_node_bandwidth_bytes_per_s: float = Field(gt=0, description="Per-device bus bandwidth within a node.")
    inter_node_bandwidth_bytes_per_s: float = Field(gt=0, description="Per-device bus bandwidth across nodes.")
    intra_node_latency_s: float = Field(default=5e-6, ge=0)
    inter_node_latency_s: float = Field(default=1e-5, ge=0)
    host_memory_bytes: float = Field(gt=0, description="Host (CPU) memory per node, bytes.")
    pcie_bandwidth_bytes_per_s: float = Field(gt=0, description="Host<->device bandwidth per device.")
    nvme_bandwidth_bytes_per_s: float = Field(gt=0, description="NVMe bandwidth per node, read and write alike.")
    nvme_capacity_bytes: float = Field(default=30.72e12, ge=0, description="NVMe capacity per node, bytes (default: "
                                       "DGX H100's 8 x 3.84 TB U.2 data drives).")
    nvme_path: str | None = Field(default=None, description="Directory on the nodes' NVMe for offloaded states "
                                  "(launch --nvme-path overrides it).")
    cpu_adam_params_per_s: float = Field(
        default=1.0e9, gt=0, description="CPU Adam update rate per node for offloaded optimizer states (params/s)."
    )
    sources: dict[str, str] = Field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


class TrainSpec(_Frozen):
    """The training setup a plan must serve."""

    global_batch: int = Field(gt=0, description="Sequences per optimizer step.")
    seq_len: int = Field(gt=0, description="Tokens per sequence.")
    dtype: Dtype = Field(default="bf16", description="Compute and parameter dtype (mixed precision for 16-bit).")
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0, description="Linear learning-rate warmup: step k (from 0) runs at "
                                                         "lr x min(1, (k + 1) / warmup_steps); 0: constant lr.")
    seed: int = 0


class LayerProfile(_Frozen):
    """Measured (or meta-traced) costs of one layer type at one micro-batch size."""

    kind: LayerKind
    micro_batch_size: int = Field(gt=0)
    fwd_time_s: float = Field(ge=0, description="Median forward time per micro-batch.")
    bwd_time_s: float = Field(ge=0, description="Median backward time per micro-batch.")
    param_count: int = Field(ge=0)
    param_bytes: int = Field(ge=0)
    activation_bytes: int = Field(ge=0, description="Bytes saved for backward by one forward of this layer.")
    output_bytes: int = Field(ge=0, description="Bytes of the layer's output tensor (the stage boundary).")
    fwd_flops: float = Field(ge=0)
    bwd_flops: float = Field(ge=0)


class LinkProfile(_Frozen):
    """A measured transfer: a collective between local processes, or host<->device copies."""

    name: str
    bytes: int
    time_s: float
    bandwidth_bytes_per_s: float


class BackendOverheads(_Frozen):
    """What tensor parallelism and ZeRO-3 took in one backend beyond plain blocks, timed by `paraplan profile` in
    two processes (``paraplan.backends.overheads``; None: not measured). The cost model turns them into seconds per
    tp block and per ZeRO-3 fetch beyond the collectives it prices on the cluster at hand
    (``CandidateCosts.framework_overhead``), so a calibration that re-prices the links keeps the measured total."""

    tp_extra_s: float | None = Field(default=None, description="Extra seconds of one pass (forward + backward of "
                                     "`blocks` blocks, one micro-batch) with the backend's tp = 2 over the same "
                                     "blocks at half width: collectives, dispatch, waiting.")
    zero3_extra_s: float | None = Field(default=None, description="Extra seconds of one pass under the backend's "
                                        "ZeRO-3 over 2 ranks over plain blocks: gathers, reduce-scatters, hooks.")
    micro_batch_size: int = Field(gt=0, description="Micro-batch the passes were timed at.")
    blocks: int = Field(gt=0, description="Blocks per timed pass.")


class ModelProfile(_Frozen):
    """``paraplan profile`` output: per-layer-type costs on one device."""

    schema_version: int = SCHEMA_VERSION
    model: ModelSpec
    device_name: str
    device_kind: Literal["cuda", "cpu"]
    dtype: Dtype
    seq_len: int
    warmup: int
    repeats: int
    cpu_threads: int | None = Field(default=None, description="torch intra-op threads of a CPU profile.")
    layers: list[LayerProfile]
    links: list[LinkProfile] = Field(default_factory=list)
    tp_block_overhead_s: float | None = Field(
        default=None, ge=0, description="Seconds per tensor-parallel block per micro-batch (forward + backward, "
        "split as the block's measured times) beyond its sharded compute and priced collectives: DTensor dispatch, "
        "processes waiting for each other at every collective. Set by a calibration (paraplan calibrate); None: "
        "derived from backend_overheads for the backend (CandidateCosts.framework_overhead), else 0.")
    zero3_fetch_overhead_s: float | None = Field(
        default=None, ge=0, description="Seconds per ZeRO-3 parameter fetch (one per fetch unit of the backend cost "
        "profile, forward and backward, every micro-batch) beyond the all-gather itself: hooks, the parameter "
        "coordinator. Set by a calibration; None: derived from backend_overheads, else 0.")
    backend_overheads: dict[str, BackendOverheads] = Field(
        default_factory=dict, description="Backend name (torch, deepspeed) -> what its tp and ZeRO-3 took beyond "
        "plain blocks, timed in two processes by `paraplan profile` (paraplan.backends.overheads): the source of the "
        "two overheads above when no calibration sets them.")

    def micro_batch_sizes(self) -> list[int]:
        return sorted({lp.micro_batch_size for lp in self.layers})

    def layer(self, kind: LayerKind, micro_batch_size: int) -> LayerProfile:
        for lp in self.layers:
            if lp.kind == kind and lp.micro_batch_size == micro_batch_size:
                return lp
        raise KeyError((kind, micro_batch_size))

    def check_matches(self, spec: ModelSpec, train: TrainSpec, source: str | None = None,
                      cluster: ClusterSpec | None = None) -> None:
        """Refuse a profile taken for another model, sequence length, dtype or kind of device than the one costed.

        Args:
            spec: the model being planned or estimated.
            train: its training setup (``seq_len`` in tokens, ``dtype``).
            source: where the profile came from (a path), named in the message; None says "the profile".
            cluster: the cluster being planned; its device kind (cuda or cpu) must be the profile's. A CPU's
                measured times say nothing about a GPU's (and the reverse), so such a profile is refused whatever
                dtype the user picks.

        Raises:
            ProfileError: the profile's model, ``seq_len``, ``dtype`` or device kind differs; the message says what
                to re-run.
        """
        name = f"profile {source}" if source else "the profile"
        if cluster is not None and self.device_kind != cluster.device.kind:
            where = "a GPU" if cluster.device.kind == "cuda" else "this CPU machine"
            raise ProfileError(
                f"{name} was measured on {self.device_name} ({self.device_kind}) but {cluster.name} has "
                f"{cluster.device.kind} devices; its times do not transfer. Plan without --profile (costs from FLOPs "
                f"and the device catalog) or profile on {where}")
        if self.model != spec:
            raise ProfileError(f"{name} is of model {self.model.name}, not {spec.name}; profile this model")
        if self.seq_len != train.seq_len:
            raise ProfileError(f"{name} was taken at seq-len {self.seq_len}; plan with --seq-len {self.seq_len} "
                               f"or profile with --seq-len {train.seq_len}")
        if self.dtype != train.dtype:
            raise ProfileError(f"{name} was taken in {self.dtype}; plan with --dtype {self.dtype} or re-profile")


Schedule = Literal["1f1b", "interleaved_1f1b", "zero_bubble", "zbv"]


class StrategyOverride(_Frozen):
    """Parts of a strategy the user forces with ``--strategy`` (``dp=2,tp=1,zero=3``); None means search.

    ``CLI_KEYS`` maps each ``--strategy`` key to its field (``mb`` and ``micro_batch`` both name micro_batch_size).
    """

    CLI_KEYS: ClassVar[dict[str, str]] = {
        "dp": "dp", "tp": "tp", "pp": "pp", "mb": "micro_batch_size", "micro_batch": "micro_batch_size",
        "zero": "zero_stage", "offload": "offload_optimizer", "recompute": "recompute", "sp": "sequence_parallel",
        "cp": "cp", "vpp": "vpp", "schedule": "schedule", "offload_param": "offload_param",
        "offload_ratio": "offload_ratio", "offload_act": "offload_activations", "ep": "ep", "etp": "etp",
    }

    dp: int | None = Field(default=None, gt=0)
    tp: int | None = Field(default=None, gt=0)
    pp: int | None = Field(default=None, gt=0)
    micro_batch_size: int | None = Field(default=None, gt=0)
    zero_stage: int | None = Field(default=None, ge=0, le=3)
    offload_optimizer: Tier | None = Field(default=None, description="Optimizer states (with fp32 master weights "
                                           "and gradients) on the device (none), host memory (cpu) or NVMe.")
    offload_param: Tier | None = Field(default=None, description="Parameters: none, cpu or nvme (ZeRO-3 only).")
    offload_ratio: float | None = Field(default=None, gt=0, le=1, description="Share of the optimizer states "
                                        "offloaded (DeepSpeed ZeRO-3 offload_optimizer.ratio); 1 = all.")
    offload_activations: bool | None = Field(default=None, description="False forbids paging activations to the "
                                             "host (or disk on CPU clusters); None lets the planner choose.")
    recompute: Literal["none", "selective", "op", "full"] | None = Field(
        default=None, description="none: no block recomputed; selective: every block recomputes its attention core; "
                                  "op: every block runs torchtitan's op-level selective policy; "
                                  "full: every block recomputed in full.")
    sequence_parallel: bool | None = None
    cp: int | None = Field(default=None, gt=0)
    vpp: int | None = Field(default=None, gt=0)
    schedule: Schedule | None = None
    ep: int | None = Field(default=None, gt=0, description="Expert-parallel degree (Mixture-of-Experts models).")
    etp: int | None = Field(default=None, gt=0, description="Expert tensor-parallel degree (MoE models).")

    @model_validator(mode="before")
    @classmethod
    def _bool_tiers(cls, data: Any) -> Any:
        return _coerce_tiers(data)

    def to_cli(self) -> str:
        """The forced parts as ``--strategy`` text, e.g. ``dp=2,zero=3,offload=true``."""
        key = {field: k for k, field in reversed(list(self.CLI_KEYS.items()))}  # the short key of each field
        parts = []
        for field, value in self.model_dump(exclude_none=True).items():
            parts.append(f"{key[field]}={str(value).lower() if isinstance(value, bool) else value}")
        return ",".join(parts)


class StagePlan(_Frozen):
    """One pipeline rank's share of the layer chain ``[embed, block_0..block_{L-1}, head]``.

    With ``vpp`` = 1 the rank holds one contiguous range ``first_layer..last_layer``. With interleaving (``vpp`` > 1,
    or the zero-bubble V schedule) it holds ``vpp`` chunks: ``chunk_blocks[c]`` blocks in chunk ``c``; the chunks'
    chain ranges follow from :meth:`Strategy.virtual_stages` and ``first_layer``/``last_layer`` are then the first
    chain index of its first chunk and the last of its last chunk (not a contiguous range).
    """

    index: int = Field(ge=0)
    first_layer: int = Field(ge=0, description="Index into the chain, inclusive (0 is the embedding).")
    last_layer: int = Field(ge=0, description="Index into the chain, inclusive (L+1 is the head).")
    n_blocks: int = Field(ge=0)
    recompute_blocks: int = Field(ge=0, description="Blocks of this stage run with full activation checkpointing.")
    selective_blocks: int = Field(
        default=0, ge=0, description="Blocks of this stage run with selective recomputation (Strategy.selective_policy); "
                                     "the first recompute_blocks blocks are full, the next selective_blocks selective.")
    offload_blocks: int = Field(
        default=0, ge=0, description="Blocks of this stage whose saved activations are paged out during the forward "
                                     "and back in for the backward (Strategy.activation_tier), POET-style; they "
                                     "follow the fully and selectively recomputed blocks and are not recomputed.")
    chunk_blocks: list[int] | None = Field(
        default=None, description="Blocks per virtual chunk (length vpp, chunk order) when vpp > 1; None for vpp 1.")
    time_per_micro_batch_s: float = Field(ge=0, description="Forward + backward (+ recompute, TP comm) per micro-batch.")
    memory_bytes: float = Field(ge=0, description="Predicted peak memory per device of this stage.")

    @model_validator(mode="after")
    def _check_counts(self) -> StagePlan:
        if self.recompute_blocks + self.selective_blocks + self.offload_blocks > self.n_blocks:
            raise ValueError(f"stage {self.index} recomputes {self.recompute_blocks} blocks in full and "
                             f"{self.selective_blocks} selectively and pages {self.offload_blocks} but holds "
                             f"{self.n_blocks}")
        if self.chunk_blocks is not None and (sum(self.chunk_blocks) != self.n_blocks
                                              or min(self.chunk_blocks, default=0) < 0):
            raise ValueError(f"stage {self.index}: chunk_blocks {self.chunk_blocks} must be >= 0 and sum to its "
                             f"{self.n_blocks} blocks")
        return self


# torch.distributed.pipelining class of each schedule (the torch backend runs exactly these).
SCHEDULE_CLASSES: dict[str, str] = {
    "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble",
}


class VirtualStage(NamedTuple):
    """One model chunk of a pipeline: ``index`` in model order, the ``rank`` that runs it and its chain range."""

    index: int
    rank: int
    chunk: int
    first_layer: int
    last_layer: int
    n_blocks: int


def virtual_stage_ranks(pp: int, vpp: int, schedule: str) -> list[int]:
    """The pipeline rank of each virtual stage in model order.

    Loop placement (1F1B, interleaved 1F1B, interleaved zero bubble): virtual stage ``k`` on rank ``k mod pp``
    (Narayanan et al. SC'21 sec. 2.2.2). V placement (ZB-V, Qi et al. 2024 sec. 6): ``k`` on rank ``k`` for
    ``k < pp`` and on ``2 pp - 1 - k`` after, so rank 0 holds the first and the last chunk (torch
    ``generate_stage_to_rank_mapping(style="v")``).
    """
    if schedule == "zbv":
        return [k if k < pp else 2 * pp - 1 - k for k in range(pp * vpp)]
    return [k % pp for k in range(pp * vpp)]


class Strategy(_Frozen):
    """A complete parallel strategy."""

    dp: int = Field(gt=0)
    tp: int = Field(gt=0)
    pp: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    grad_accum: int = Field(gt=0, description="Micro-batches per step per data-parallel rank (m).")
    zero_stage: int = Field(ge=0, le=3)
    offload_optimizer: Tier = Field(
        default="none", description="Where the optimizer states, fp32 master weights and fp32 gradient partitions "
        "live: on the device (none), in host memory with CPU Adam (cpu; ZeRO-Offload, Ren et al. 2021) or on NVMe "
        "swapped through host buffers (nvme; ZeRO-Infinity, Rajbhandari et al. 2021). A bool in older plans.")
    offload_param: Tier = Field(
        default="none", description="Where the (ZeRO-3 partitioned) parameters live between uses: device, host memory "
                                    "or NVMe, fetched for each forward and backward (ZeRO-Infinity).")
    offload_ratio: float = Field(
        default=1.0, gt=0, le=1, description="Share of the optimizer states offloaded (DeepSpeed ZeRO-3 "
                                            "offload_optimizer.ratio); the rest stays and is updated on the device.")
    activation_tier: Literal["cpu", "nvme"] = Field(
        default="cpu", description="Where paged activations (StagePlan.offload_blocks) go: host memory on GPUs, a "
                                   "directory on disk on CPU clusters (whose device memory is host memory).")
    sequence_parallel: bool = Field(
        default=False, description="Megatron sequence parallelism: norms and residual activations sharded over the "
                                   "tp group along the sequence (Korthikanti et al. 2022 sec. 4.2.2); needs tp > 1.")
    selective_recompute: bool = Field(
        default=False, description="Every block not fully recomputed recomputes its attention core in backward "
                                   "(Korthikanti et al. 2022 sec. 4.3); the stages' recompute_blocks are recomputed "
                                   "in full.")
    selective_policy: Literal["attention", "op"] = Field(
        default="attention", description="What a selectively recomputed block recomputes. attention: the attention "
        "core only, everything else saved (Korthikanti et al. 2022 sec. 4.3); op: torchtitan's op-level policy "
        "(torchtitan/models/llama3/infra/parallelize.py _save_list: every other matmul output, the attention output "
        "and reduce-scatters saved, the rest recomputed).")
    cp: int = Field(default=1, gt=0, description="Context-parallel degree: the sequence sharded over cp ranks, "
                                                  "K/V exchanged per layer (Llama 3 paper sec. 3.3.2).")
    vpp: int = Field(default=1, gt=0, description="Model chunks (virtual stages) per pipeline rank.")
    schedule: Schedule = Field(default="1f1b", description="Pipeline schedule; see SCHEDULE_CLASSES.")
    ep: int = Field(default=1, gt=0, description="Expert-parallel degree: each MoE layer's routed experts are split "
                    "over ep ranks, tokens dispatched to them and combined back by all-to-all (Lepikhin et al. 2021, "
                    "GShard). The expert layers refold each pipeline stage's tp x cp x dp ranks into etp x ep x edp "
                    "(Megatron-Core parallel_state.py), so ep x etp divides dp x cp x tp.")
    etp: int = Field(default=1, gt=0, description="Expert tensor-parallel degree: each expert's matrices split over "
                     "etp ranks (Megatron-Core --expert-tensor-parallel-size).")
    routing_imbalance: float = Field(default=1.0, ge=1.0, description="Assumption the plan was priced under: tokens "
                                     "the busiest expert rank receives over the balanced mean (1 = balanced).")
    capacity_factor: float | None = Field(default=None, gt=0, description="Expert capacity factor (Switch "
                                          "Transformers): tokens beyond it are dropped; None: dropless.")
    stages: list[StagePlan]

    @model_validator(mode="before")
    @classmethod
    def _bool_tiers(cls, data: Any) -> Any:
        return _coerce_tiers(data)

    @model_validator(mode="after")
    def _check(self) -> Strategy:
        if len(self.stages) != self.pp:
            raise ValueError(f"{len(self.stages)} stages given for pp={self.pp}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1 (it shards activations over the tensor-parallel group)")
        if not self.selective_recompute and any(st.selective_blocks for st in self.stages):
            raise ValueError("stages have selective_blocks but selective_recompute is false")
        check_schedule(self.pp, self.vpp, self.schedule)
        if (self.dp * self.cp * self.tp) % (self.ep * self.etp):
            raise ValueError(f"ep x etp = {self.ep} x {self.etp} must divide dp x cp x tp = {self.dp * self.cp * self.tp} "
                             "(the expert groups tile each pipeline stage's ranks)")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_param={self.offload_param} needs ZeRO stage 3 (only partitioned parameters are "
                             f"offloaded), got stage {self.zero_stage}")
        if self.offload_ratio < 1 and (self.offload_optimizer != "cpu" or self.zero_stage != 3):
            raise ValueError(f"offload_ratio {self.offload_ratio} < 1 needs ZeRO stage 3 with the optimizer in host "
                             "memory (DeepSpeed's partial offload)")
        for st in self.stages:
            if self.vpp > 1 and (st.chunk_blocks is None or len(st.chunk_blocks) != self.vpp):
                raise ValueError(f"stage {st.index} needs chunk_blocks of length vpp={self.vpp}")
            if self.vpp == 1 and st.chunk_blocks is not None and len(st.chunk_blocks) != 1:
                raise ValueError(f"stage {st.index} has chunk_blocks {st.chunk_blocks} but vpp is 1")
        return self

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size ``world / (pp ep etp)``: the ranks that hold the same experts and reduce their
        gradients (Megatron-Core parallel_state.py ``expert_data_parallel_size``)."""
        return self.world_size // (self.pp * self.ep * self.etp)

    def virtual_stages(self) -> list[VirtualStage]:
        """Every model chunk in model order with its rank and chain range (one per rank when vpp is 1).

        Virtual stage 0 starts with the embedding (chain index 0) and the last one ends with the head.
        """
        return chunk_spans(self.stages, self.vpp, self.schedule)


def chunk_spans(stages: list[StagePlan], vpp: int, schedule: str) -> list[VirtualStage]:
    """The chunks of ``stages`` in model order, each with its rank and chain range, from the stages' block (and
    chunk) counts in the schedule's placement (:func:`virtual_stage_ranks`); their first/last_layer are not read."""
    ranks = virtual_stage_ranks(len(stages), vpp, schedule)
    next_chunk = [0] * len(stages)
    out, first = [], 0
    for k, rank in enumerate(ranks):
        c = next_chunk[rank]
        next_chunk[rank] += 1
        st = stages[rank]
        n = st.chunk_blocks[c] if st.chunk_blocks is not None else st.n_blocks
        last = first + n - 1 + (1 if k == 0 else 0) + (1 if k == len(ranks) - 1 else 0)
        out.append(VirtualStage(k, rank, c, first, last, n))
        first = last + 1
    return out


def place_stages(stages: list[StagePlan], vpp: int, schedule: str) -> list[StagePlan]:
    """``stages`` with ``first_layer``/``last_layer`` set from their block (and chunk) counts in the schedule's
    placement (:func:`chunk_spans`): the first chain index of each rank's first chunk and the last of its last;
    the other fields are kept."""
    spans = chunk_spans(stages, vpp, schedule)
    first = {v.rank: v.first_layer for v in spans if v.chunk == 0}
    last = {v.rank: v.last_layer for v in spans}
    return [st.model_copy(update={"first_layer": first[st.index], "last_layer": last[st.index]}) for st in stages]


def check_schedule(pp: int, vpp: int, schedule: str) -> None:
    """Raise ValueError unless (pp, vpp, schedule) is one torch.distributed.pipelining runs.

    1f1b: one chunk per rank; interleaved_1f1b: vpp >= 2; zero_bubble (ZB-H1 with the interleaved loop placement):
    any vpp; zbv: exactly 2 chunks per rank in V placement. pp = 1 has no schedule: 1f1b with vpp 1.
    """
    if schedule not in SCHEDULE_CLASSES:
        raise ValueError(f"schedule '{schedule}': use one of {', '.join(SCHEDULE_CLASSES)}")
    if pp == 1 and (vpp != 1 or schedule != "1f1b"):
        raise ValueError(f"pp=1 runs no pipeline schedule: use schedule 1f1b and vpp 1 (got {schedule}, vpp {vpp})")
    if schedule == "1f1b" and vpp != 1:
        raise ValueError(f"vpp={vpp} needs schedule interleaved_1f1b, zero_bubble or zbv (1f1b runs one chunk per rank)")
    if schedule == "interleaved_1f1b" and vpp < 2:
        raise ValueError("schedule interleaved_1f1b needs vpp >= 2 (with vpp 1 it is 1f1b)")
    if schedule == "zbv" and vpp != 2:
        raise ValueError(f"schedule zbv runs exactly 2 chunks per rank (vpp=2), got vpp={vpp}")


class MemoryBreakdown(_Frozen):
    """Bytes per device on the most loaded pipeline stage."""

    params: float
    grads: float
    optimizer: float
    activations: float
    other: float
    expert_params: float = Field(default=0.0, ge=0, description="Of params: the routed experts' (MoE models).")
    expert_grads: float = Field(default=0.0, ge=0, description="Of grads: the routed experts'.")
    expert_optimizer: float = Field(default=0.0, ge=0, description="Of optimizer: the routed experts'.")

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.other

    @property
    def expert_states(self) -> float:
        """Parameters, gradients and optimizer states of the routed experts (0 for dense models)."""
        return self.expert_params + self.expert_grads + self.expert_optimizer

    @property
    def dense_states(self) -> float:
        """Parameters, gradients and optimizer states of everything but the routed experts."""
        return self.params + self.grads + self.optimizer - self.expert_states


class Prediction(_Frozen):
    """Predicted cost of one strategy (per optimizer step)."""

    step_time_s: float
    compute_s: float = Field(description="Pipeline critical path of compute incl. TP comm (sum of stages + bubble).")
    bubble_s: float = Field(description="Idle time of the 1F1B pipeline: (m-1)max_s t_s + sum_s t_s - m t_avg.")
    dp_comm_s: float = Field(description="Exposed data-parallel / ZeRO communication.")
    offload_s: float = Field(description="Host<->device transfers and CPU optimizer step.")
    optimizer_s: float = Field(description="Device optimizer step.")
    peak_memory_bytes: float
    memory_capacity_bytes: float
    memory_breakdown_bytes: MemoryBreakdown
    host_bytes: float = Field(default=0.0, ge=0, description="Host memory per device for offloaded states and paged "
                                                             "activations (most loaded stage).")
    nvme_bytes: float = Field(default=0.0, ge=0, description="NVMe (or disk) bytes per device for offloaded states "
                                                             "and paged activations (most loaded stage).")
    binding: str = Field(default="", description="What limits the plan: the capacity or bandwidth that binds.")
    tokens_per_s: float
    model_flops_per_step: float
    mfu: float = Field(description="Model FLOPs per step / (step time x world size x peak).")
    compute_source: Literal["profile", "analytic"]


class SolverInfo(_Frozen):
    status: Literal["optimal", "feasible"]
    gap: float = Field(default=0.0, ge=0, description="Relative MIP gap when stopped by the time limit.")
    solver: str
    candidates: int = Field(description="Outer-loop candidates (dp, tp, pp, micro-batch) considered.")
    milps_solved: int
    search_time_s: float
    excluded: dict[str, int] = Field(default_factory=dict, description="Backend or mode rule -> candidates it "
                                                                       "excluded from the search.")
    backend: str | None = Field(default=None, description="The --backend the search ran under: its rules and its "
                                "cost profile (CostOptions.backend). None in plans written before it was kept.")


class CandidateRecord(_Frozen):
    """One outer-loop candidate the search took up, for the report's candidate-space figure.

    ``step_time_s`` and ``peak_memory_bytes`` are the MILP solution's for a solved candidate, else lower bounds
    (the search's step-time bound and ``memory_lower_bound``): a pruned candidate cannot beat the K-th best plan
    (its memory is not evaluated), an infeasible one has no stage split that fits, a timed-out MILP found no
    solution in its time limit.
    """

    label: str = Field(description="Candidate.label(): degrees, micro-batch and knobs.")
    outcome: Literal["solved", "infeasible", "pruned", "timeout"]
    step_time_s: float | None = Field(default=None, ge=0, description="Predicted step time (solved) or its lower "
                                      "bound (others), s; None when that bound is infinite (no stage split fits).")
    peak_memory_bytes: float | None = Field(default=None, ge=0, description="Peak device memory of the solution "
                                            "(solved) or its lower bound (infeasible, timeout), bytes per device; "
                                            "None for pruned candidates (not evaluated) or an infinite bound.")
    rank: int | None = Field(default=None, ge=1, description="1-based rank among the plans returned (top-k).")


class Plan(_Frozen):
    """``paraplan plan`` output."""

    schema_version: int = SCHEMA_VERSION
    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    strategy: Strategy
    predicted: Prediction
    solver: SolverInfo
    profile_path: str | None = None
    candidates: list[CandidateRecord] | None = Field(
        default=None, description="Every candidate the search took up (None in plans written before it was kept).")

    @model_validator(mode="after")
    def _check_consistent(self) -> Plan:
        """A plan (perhaps edited by hand) must describe one batch and its stages the model's blocks: the backends
        run what it says, so a disagreement would train something other than what was priced."""
        s, gb = self.strategy, self.train.global_batch
        per_step = s.dp * s.micro_batch_size * s.grad_accum
        if per_step != gb:
            raise ValueError(
                f"strategy trains dp x micro_batch_size x grad_accum = {s.dp} x {s.micro_batch_size} x "
                f"{s.grad_accum} = {per_step} sequences per step but train.global_batch is {gb}; re-plan instead of "
                "editing the plan")
        moe = self.model.moe
        if moe is None and (s.ep, s.etp) != (1, 1):
            raise ValueError(f"ep={s.ep}, etp={s.etp}: {self.model.name} has no experts; expert parallelism needs a "
                             "Mixture-of-Experts model")
        if moe is not None and moe.n_experts % s.ep:
            raise ValueError(f"ep={s.ep} does not divide the {moe.n_experts} experts of {self.model.name}")
        if self.model.n_layers is not None and sum(st.n_blocks for st in s.stages) != self.model.n_layers:
            raise ValueError(f"the stages hold {sum(st.n_blocks for st in s.stages)} blocks but {self.model.name} "
                             f"has {self.model.n_layers}")
        return self


class LaunchSpec(_Frozen):
    """What ``paraplan launch`` writes into the run directory and runs."""

    schema_version: int = SCHEMA_VERSION
    backend: Backend
    run_dir: str
    nproc_per_node: int
    nnodes: int
    steps: int
    data_paths: list[str]
    command: list[str]
    files: list[str] = Field(description="Backend files written into run_dir.")
    node_rank: int = Field(default=0, ge=0, description="This node's rank among nnodes (names its log; c10d "
                                                       "rendezvous assigns the process ranks).")
    rdzv_endpoint: str | None = Field(default=None, description="HOST:PORT of the c10d rendezvous (multi-node); "
                                                              "None: --standalone.")
    rdzv_id: str | None = Field(default=None, description="The job's rendezvous id, the same on every node.")
    checkpoint_every: int = Field(default=0, ge=0, description="Save a checkpoint every this many steps (and after "
                                                            "the last); 0: never.")
    max_restarts: int = Field(default=0, ge=0, description="torchrun --max-restarts: restarts of the whole job "
                                                         "after a failed rank, each resuming from the last "
                                                         "complete checkpoint.")
    phase_times: bool = Field(default=False, description="Profile one step (torch.profiler) and record its "
                              "forward, backward, optimizer and per-collective times in metrics.jsonl "
                              "(paraplan.backends.phases); what `paraplan calibrate` fits.")
