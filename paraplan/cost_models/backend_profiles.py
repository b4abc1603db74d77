"""Backend cost profiles: the conventions of the framework that runs a plan, each with its source in that
framework's code, so that a plan is priced as the backend that will run it.

A profile states, for mixed-precision (bf16/fp16) training with Adam:
    - bytes per parameter of each model state (parameters, gradients, optimizer states incl. fp32 master weights),
      by ZeRO stage (the cost model then shards them: ZeRO-1 the optimizer states, ZeRO-2 also the gradients,
      ZeRO-3 also the parameters);
    - the element size of the gradient reduction and of the ZeRO parameter all-gather;
    - the collective ZeRO-1 reduces gradients with (reduce-scatter, or a full all-reduce);
    - how ZeRO-3 fetches parameters: one all-gather per parameter tensor, per module, or per transformer block;
    - the gradient bucket (one collective per bucket, so one latency per bucket);
    - NCCL's per-step collective latency (``comm.nccl_latency_s``) instead of one latency per collective;
    - whether tied embeddings are synchronized between the first and last pipeline stage (an all-reduce of the
      embedding gradient every step) and whether pipeline messages are scattered over the tp ranks;
    - fixed per-step work besides the optimizer's own state pass: passes over the gradients (norm, zeroing).
    - the tensor-parallel collectives of one transformer block per micro-batch, forward and backward, without
      and with sequence parallelism (Megatron's fused QKV and gate/up projections need one collective per
      sub-layer; a DTensor plan sharding q, k, v, gate and up separately reduces each one's input gradient).
fp32 training keeps every state in fp32 in all three frameworks: 4 + 4 + 8 bytes, reductions in fp32.

What overlaps is not a profile field: ``CostOptions.overlap_dp`` (on for CUDA clusters) states it, and the
fidelity benchmark sets it per framework and year. The defaults of the frameworks, for the record: DeepSpeed
``overlap_comm`` is on for ZeRO-3 and off for ZeRO-1/2 (runtime/zero/config.py, ``overlap_comm_valid``); torch
FSDP2 prefetches the next block's all-gather and overlaps reduce-scatters (``fully_shard``); Megatron-LM overlaps
only with ``--overlap-grad-reduce`` / ``--overlap-param-gather``.

The optimizer step is priced by ``CandidateCosts.optimizer_times`` as one memory pass over the states (read and
write of parameters, gradients and twice the optimizer states); a profile adds its gradient passes
(``grad_passes_per_step``) and, with tied embeddings on a pipeline, the embedding all-reduce. Not priced: data
loading, logging, the loss all-reduce (a scalar).

The profile ``any`` (``plan --backend any``) takes, field by field, the costlier of ``deepspeed`` and ``torch``,
so every cost it gives is at least each of theirs (costs grow with bytes, collective counts and latency).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from paraplan.cost_models import transformer as tf
from paraplan.errors import StrategyError
from paraplan.types import ModelSpec

FETCH_GRANULARITIES = ("tensor", "module", "block")  # finest first: more all-gathers per block

StateBytes = tuple[float, float, float]  # (parameters, gradients, optimizer states) bytes per parameter
# Sequence parallelism on? -> (forward, backward) {collective: count} of one block per micro-batch, each on the block's
# whole activation b s h (comm.collective_time_s sizes: an all-reduce, or the gathered size of an all-gather /
# reduce-scatter).
TpCollectives = dict[bool, tuple[dict[str, int], dict[str, int]]]
MEGATRON_TP_COLLECTIVES: TpCollectives = {
    False: ({"all_reduce": 2}, {"all_reduce": 2}),
    True: ({"reduce_scatter": 2, "all_gather": 2}, {"reduce_scatter": 2, "all_gather": 2}),
}
# paraplan's torch trainer (torch_native.LLAMA_TP_PLAN, DTensor parallelize_module; DeepSpeed's AutoTP alike): q, k,
# v, gate and up are separate ColwiseParallel modules, each turning its replicated input into a DTensor with
# from_local, whose backward redistributes the Partial input gradient to Replicate (torch/distributed/tensor/_api.py
# _FromTorchTensor.backward): an all-reduce per module, 5 per block. Forward: the two RowwiseParallel outputs
# (all-reduce; with sequence parallelism reduce-scatter, and the two PrepareModuleInput all-gathers). Counted with
# `launch --phases` on cpu:2 (llama-tiny, tp 2, 4 micro-batches of 6 blocks): 170 all-reduces per step without
# sequence parallelism (4 x 6 x 7 + 2), and with it 104 all-gathers (4 x 6 x 4 + 8), 48 reduce-scatters (4 x 6 x 2)
# and 134 all-reduces (4 x 6 x 5 + 14: the norm weights' Partial gradients, per step).
DTENSOR_TP_COLLECTIVES: TpCollectives = {
    False: ({"all_reduce": 2}, {"all_reduce": 5}),
    True: ({"reduce_scatter": 2, "all_gather": 2}, {"all_reduce": 5, "all_gather": 2}),
}


@dataclass(frozen=True)
class BackendCostProfile:
    """Cost conventions of one training framework (bf16/fp16 mixed precision with Adam; module docstring).

    Attributes:
        name, title: key and human name.
        state_bytes: ZeRO stage -> (parameter, gradient, optimizer) bytes per parameter before sharding.
        grad_reduce_bytes: ZeRO stage -> bytes per element of the gradient all-reduce / reduce-scatter.
        param_gather_bytes: ZeRO stage -> bytes per element of the parameter all-gather (ZeRO-1/2 after the step,
            ZeRO-3 before use) or broadcast.
        zero1_grad_collective: "reduce_scatter" or "all_reduce" (a full all-reduce, then each rank steps its part).
        zero3_fetch: "tensor" (one all-gather per parameter tensor), "module" (per leaf module with parameters) or
            "block" (one per transformer block).
        grad_bucket_elements: gradient elements per reduction collective (ZeRO-0/1/2 and ZeRO-3 reduce-scatter
            under "tensor"/"module" fetching; "block" fetching reduce-scatters each block's gradients at once);
            ``bucket_elements_per_dp_rank`` grows it with the dp size: ``max(grad_bucket, per_rank x dp)``.
        nccl_latency: collectives pay NCCL's per-step latency (``comm.nccl_latency_s``) on CUDA clusters.
        tied_embedding_sync: tied input and output embeddings on different pipeline stages are kept equal by an
            all-reduce of the embedding gradient between the first and last stage, every step.
        p2p_scatter_gather: pipeline messages are split over the tp ranks (each sends ``1/tp``).
        grad_passes_per_step: memory passes over the gradients per step besides the optimizer's (norm, zeroing).
        tp_collectives: sequence parallelism on? -> (forward, backward) tensor-parallel collectives of one block
            per micro-batch, ``{op: count}`` on the block's activation (:data:`TpCollectives`).
        sources: field -> where the framework sets it.
    """

    name: str
    title: str
    state_bytes: dict[int, StateBytes]
    grad_reduce_bytes: dict[int, int]
    param_gather_bytes: dict[int, int]
    zero1_grad_collective: str
    zero3_fetch: str
    grad_bucket_elements: float
    bucket_elements_per_dp_rank: float = 0.0
    nccl_latency: bool = True
    tied_embedding_sync: bool = False
    p2p_scatter_gather: bool = False
    grad_passes_per_step: int = 0
    tp_collectives: TpCollectives = field(default_factory=lambda: MEGATRON_TP_COLLECTIVES)
    sources: dict[str, str] = field(default_factory=dict)

    def states(self, zero_stage: int, dtype: str) -> StateBytes:
        """(parameter, gradient, optimizer) bytes per parameter under ``zero_stage`` before sharding; fp32
        training: 4 + 4 + 8 in every framework (no master copy)."""
        return (4, 4, 8) if dtype == "fp32" else self.state_bytes[zero_stage]

    def bucket_elements(self, dp: int) -> float:
        return max(self.grad_bucket_elements, self.bucket_elements_per_dp_rank * dp)

    def reduce_bytes(self, zero_stage: int, dtype: str) -> int:
        return 4 if dtype == "fp32" else self.grad_reduce_bytes[zero_stage]

    def gather_bytes(self, zero_stage: int, dtype: str) -> int:
        return 4 if dtype == "fp32" else self.param_gather_bytes[zero_stage]


_ALL = (0, 1, 2, 3)
DEEPSPEED_BUCKET_ELEMENTS = 5e8  # runtime/zero/config.py reduce_bucket_size / allgather_bucket_size defaults
MEGATRON_BUCKET_ELEMENTS = 4e7  # megatron/core/distributed: bucket_size = max(40000000, 1000000 * dp_size)
TORCH_DDP_BUCKET_ELEMENTS = 25 * 2**20 / 4  # torch DDP bucket_cap_mb = 25 MiB of fp32 gradients

PROFILES: dict[str, BackendCostProfile] = {
    "deepspeed": BackendCostProfile(
        "deepspeed", "DeepSpeed (0.1x, bf16)",
        state_bytes={0: (2, 6, 12), 1: (2, 6, 12), 2: (2, 6, 12), 3: (2, 4, 12)},
        grad_reduce_bytes={0: 4, 1: 4, 2: 2, 3: 2}, param_gather_bytes={s: 2 for s in _ALL},
        zero1_grad_collective="all_reduce", zero3_fetch="module", grad_bucket_elements=DEEPSPEED_BUCKET_ELEMENTS,
        tied_embedding_sync=True, grad_passes_per_step=2, tp_collectives=DTENSOR_TP_COLLECTIVES,
        sources={
            "tp_collectives": "AutoTP (deepspeed/module_inject/auto_tp.py) replaces q, k, v, gate and up by "
                              "separate LinearLayer modules, each all-reducing its input gradient "
                              "(module_inject/layers.py ColumnParallel.backward), o and down by LinearAllreduce: "
                              "the DTENSOR_TP_COLLECTIVES counts (170 all-reduces per step measured as for torch)",
            "state_bytes": "ZeRO-0/1 with bf16 run runtime/bf16_optimizer.py BF16_Optimizer: bf16 params and grads, "
                           "a full fp32 gradient accumulator (fp32_groups_gradients_flat), fp32 master + Adam "
                           "moments partitioned (fp32_groups_flat_partition): 2 + 6 + 12; ZeRO-2 "
                           "(runtime/zero/stage_1_and_2.py) keeps bf16 gradient partitions and an fp32 copy per "
                           "partition for the step; ZeRO-3 (runtime/zero/stage3.py) fp32 gradient partitions: "
                           "18 bytes per parameter over d, DeepSpeed's own estimate_zero3_model_states_mem_needs",
            "grad_reduce_bytes": "BF16_Optimizer hands its fp32 accumulator to the engine's all-reduce "
                                 "(engine.buffered_allreduce_fallback via get_grads_for_reduction): 4 bytes; ZeRO-2/3 "
                                 "reduce in engine.communication_data_type, bf16 unless the config sets it",
            "zero1_grad_collective": "BF16_Optimizer: full all-reduce, then each rank updates its partition and the "
                                     "bf16 partitions are all-gathered",
            "zero3_fetch": "runtime/zero/partitioned_param_coordinator.py fetch_sub_module: parameters of each "
                           "submodule gathered by one all_gather_coalesced (prefetched modules coalesce up to "
                           "stage3_prefetch_bucket_size; assumption: a module per call, an upper bound)",
            "grad_bucket_elements": "reduce_bucket_size 5e8 (runtime/zero/config.py)",
            "tied_embedding_sync": "runtime/pipe/engine.py _exec_reduce_tied_grads -> "
                                   "PipelineModule.allreduce_tied_weight_gradients",
            "grad_passes_per_step": "BF16_Optimizer.step: global norm of the fp32 gradients (read), "
                                    "clear_hp_grads (write)",
            "p2p_scatter_gather": "runtime/pipe/engine.py sends whole activations (no tp scatter)",
        }),
    "torch": BackendCostProfile(
        "torch", "torch (DDP / ZeroRedundancyOptimizer / FSDP2, as paraplan's torch backend and torchtitan)",
        state_bytes={0: (4, 4, 8), 1: (4, 4, 8), 2: (2, 4, 12), 3: (4, 4, 8)},
        grad_reduce_bytes={s: 4 for s in _ALL}, param_gather_bytes={0: 4, 1: 4, 2: 2, 3: 2},
        zero1_grad_collective="all_reduce", zero3_fetch="block", grad_bucket_elements=TORCH_DDP_BUCKET_ELEMENTS,
        tp_collectives=DTENSOR_TP_COLLECTIVES,
        sources={
            "tp_collectives": "torch_native.LLAMA_TP_PLAN under DTensor parallelize_module: DTENSOR_TP_COLLECTIVES "
                              "(torchtitan fuses no projections either, but its PrepareModuleInput keeps DTensors, "
                              "so with sequence parallelism it reduces once per sub-layer)",
            "state_bytes": "ZeRO-0/1: fp32 parameters under torch.autocast (paraplan/backends/torch_native.py "
                           "_mixed_precision), fp32 gradients, Adam 8; ZeRO-2/3: FSDP2 keeps the sharded fp32 "
                           "parameter as the master (torch/distributed/fsdp/_fully_shard, MixedPrecisionPolicy "
                           "casts it to param_dtype for the all-gather); ZeRO-2 (reshard_after_forward=False) also "
                           "holds the unsharded bf16 parameters between forward and backward: 2 + (4 + 12)/d",
            "grad_reduce_bytes": "MixedPrecisionPolicy(reduce_dtype=float32) as paraplan emits and torchtitan's "
                                 "mixed_precision_reduce default; DDP reduces the fp32 gradients of autocast",
            "param_gather_bytes": "FSDP2 all-gathers in param_dtype (bf16); ZeroRedundancyOptimizer broadcasts the "
                                  "fp32 parameters each rank updated",
            "zero1_grad_collective": "ZeroRedundancyOptimizer runs under DDP: a full all-reduce, then broadcasts",
            "zero3_fetch": "fully_shard per transformer block (paraplan's torch backend, torchtitan apply_fsdp): one "
                           "all-gather and one reduce-scatter per block",
            "grad_bucket_elements": "torch.nn.parallel.DistributedDataParallel bucket_cap_mb=25",
            "tied_embedding_sync": "torch.distributed.pipelining does not synchronize tied weights (plan refuses "
                                   "tied embeddings with pp > 1)",
            "grad_passes_per_step": "paraplan's trainer: no clipping; zero_grad(set_to_none=True) frees",
        }),
    "megatron": BackendCostProfile(
        "megatron", "Megatron-LM / Megatron-Core (bf16, distributed optimizer for ZeRO-1)",
        state_bytes={s: (2, 4, 12) for s in _ALL}, grad_reduce_bytes={s: 4 for s in _ALL},
        param_gather_bytes={s: 2 for s in _ALL}, zero1_grad_collective="reduce_scatter", zero3_fetch="block",
        grad_bucket_elements=MEGATRON_BUCKET_ELEMENTS, bucket_elements_per_dp_rank=1e6, tied_embedding_sync=True,
        p2p_scatter_gather=True, grad_passes_per_step=2,
        sources={
            "state_bytes": "bf16 params, fp32 main_grad buffer, fp32 master + Adam moments: 2 + 4 + 4 + 4 + 4 = 18 "
                           "(Megatron-LM README, distributed optimizer table: 'bf16 param, fp32 grads: 18 | 6 + 12/d')",
            "grad_reduce_bytes": "megatron/training/arguments.py: bf16 forces accumulate_allreduce_grads_in_fp32 "
                                 "('bfloat16 requires gradient accumulation and all-reduce to be done in fp32')",
            "param_gather_bytes": "distributed optimizer all-gathers the updated bf16 parameters",
            "zero1_grad_collective": "megatron/core/distributed param_and_grad_buffer.py: reduce-scatter per bucket "
                                     "with the distributed optimizer",
            "grad_bucket_elements": "megatron/core/distributed/distributed_data_parallel.py: "
                                    "bucket_size = max(40000000, 1000000 * dp_size)",
            "tied_embedding_sync": "megatron/core/distributed/finalize_model_grads.py "
                                   "_allreduce_word_embedding_grads: all-reduce of the word-embedding main_grad "
                                   "over the embedding group (first and last pipeline stage)",
            "p2p_scatter_gather": "Narayanan et al. SC'21 sec. 4.1 scatter/gather of pipeline messages over tp",
            "grad_passes_per_step": "optimizer clip_grad 1.0 default: gradient norm (read main grads); "
                                    "zero_grad_buffer (write)",
            "zero3_fetch": "Megatron-FSDP shards per transformer layer (not used by the published runs)",
            "tp_collectives": "megatron/core/tensor_parallel/layers.py: fused QKV and fc1 ColumnParallelLinear "
                              "all-reduce (SP: reduce-scatter) their input gradient once, RowParallelLinear "
                              "all-reduces (SP: reduce-scatters) its output: 2 + 2 per block (Shoeybi et al. sec. 3)",
        }),
}

# Historical versions, for published runs of their time (benchmarks/fidelity.py); not CLI choices.
PROFILES["megatron_2021"] = BackendCostProfile(
    "megatron_2021", "Megatron-LM (2021, fp16)",
    state_bytes={s: (2, 2, 16) for s in _ALL}, grad_reduce_bytes={s: 2 for s in _ALL},
    param_gather_bytes={s: 2 for s in _ALL}, zero1_grad_collective="reduce_scatter", zero3_fetch="block",
    grad_bucket_elements=MEGATRON_BUCKET_ELEMENTS, tied_embedding_sync=True, p2p_scatter_gather=True,
    grad_passes_per_step=2,
    sources={**PROFILES["megatron"].sources,
             "grad_reduce_bytes": "fp16 runs (SC'21): accumulate_allreduce_grads_in_fp32 off by default, gradients "
                                  "accumulated and all-reduced in fp16 (megatron/arguments.py of 2021)",
             "state_bytes": "fp16 params and grads, fp32 master, Adam moments and an fp32 copy of the gradients "
                            "for the step: 2 + 2 + 16 (Megatron-LM README table: 'fp16 param, fp16 grads: 20 | "
                            "4 + 16/d')"})
PROFILES["deepspeed_2021"] = BackendCostProfile(
    "deepspeed_2021", "DeepSpeed ZeRO-3 (v0.3-0.4, 2021, fp16)",
    state_bytes={s: (2, 4, 12) for s in _ALL}, grad_reduce_bytes={s: 2 for s in _ALL},
    param_gather_bytes={s: 2 for s in _ALL}, zero1_grad_collective="reduce_scatter", zero3_fetch="tensor",
    grad_bucket_elements=DEEPSPEED_BUCKET_ELEMENTS, tied_embedding_sync=True, grad_passes_per_step=2,
    sources={**PROFILES["deepspeed"].sources,
             "zero3_fetch": "deepspeed/runtime/zero/partition_parameters.py of 2021 (v0.3.x): Init._all_gather "
                            "loops over the module's parameters and calls _allgather_param, one "
                            "torch.distributed.all_gather per parameter tensor",
             "grad_reduce_bytes": "engine.communication_data_type of 2021: fp16 when fp16 or any ZeRO stage is on"})

PROFILES["torchtitan"] = replace(
    PROFILES["torch"], name="torchtitan", title="torchtitan (FSDP2 + DTensor TP with sequence parallelism)",
    tp_collectives={False: DTENSOR_TP_COLLECTIVES[False], True: MEGATRON_TP_COLLECTIVES[True]},
    sources={**PROFILES["torch"].sources,
             "tp_collectives": "torchtitan/models/llama3/infra/parallelize.py apply_tp: PrepareModuleInput on the "
                               "attention and feed-forward keeps the gathered input a DTensor (use_local_output "
                               "False), so the Partial input gradients of wq, wk, wv (w1, w3) add up as DTensors and "
                               "are reduce-scattered once per sub-layer: Megatron's counts with sequence "
                               "parallelism, which torchtitan turns on with tp"})

CLI_BACKENDS = ("deepspeed", "torch", "megatron")


def _worst(a: BackendCostProfile, b: BackendCostProfile) -> BackendCostProfile:
    """Field by field the costlier of two profiles (more bytes, finer fetching, smaller buckets, more passes)."""
    def mx(x: dict, y: dict) -> dict:
        return {k: tuple(max(p, q) for p, q in zip(x[k], y[k])) if isinstance(x[k], tuple) else max(x[k], y[k])
                for k in x}

    def mx_counts(x: dict[str, int], y: dict[str, int]) -> dict[str, int]:
        return {op: max(x.get(op, 0), y.get(op, 0)) for op in {**x, **y}}

    fetch = min(a.zero3_fetch, b.zero3_fetch, key=FETCH_GRANULARITIES.index)
    return BackendCostProfile(
        "any", f"the costlier of {a.name} and {b.name}, field by field",
        state_bytes=mx(a.state_bytes, b.state_bytes), grad_reduce_bytes=mx(a.grad_reduce_bytes, b.grad_reduce_bytes),
        param_gather_bytes=mx(a.param_gather_bytes, b.param_gather_bytes),
        zero1_grad_collective="all_reduce" if "all_reduce" in (a.zero1_grad_collective, b.zero1_grad_collective)
        else "reduce_scatter", zero3_fetch=fetch,
        grad_bucket_elements=min(a.grad_bucket_elements, b.grad_bucket_elements),
        nccl_latency=a.nccl_latency or b.nccl_latency, tied_embedding_sync=a.tied_embedding_sync or
        b.tied_embedding_sync, p2p_scatter_gather=a.p2p_scatter_gather and b.p2p_scatter_gather,
        grad_passes_per_step=max(a.grad_passes_per_step, b.grad_passes_per_step),
        tp_collectives={sp: tuple(mx_counts(x, y) for x, y in zip(a.tp_collectives[sp], b.tp_collectives[sp]))
                        for sp in (False, True)},  # type: ignore[misc]
        sources={"any": f"field-wise maximum of {a.name} and {b.name}"})


PROFILES["any"] = _worst(PROFILES["deepspeed"], PROFILES["torch"])


def cost_profile(name: str | None) -> BackendCostProfile | None:
    """The profile called ``name`` (None: no profile, the generic cost model); ``unconstrained`` (plan's backend
    that prices every strategy, including tp for GPT and tied embeddings across stages, which Megatron-LM runs)
    is Megatron's.

    Raises:
        StrategyError: an unknown name.
    """
    if name is None:
        return None
    key = "megatron" if name == "unconstrained" else name
    if key not in PROFILES:
        raise StrategyError(f"backend cost profile '{name}': use one of {', '.join(CLI_BACKENDS)} (or any)")
    return PROFILES[key]


def block_fetch_elements(spec: ModelSpec, granularity: str) -> list[float]:
    """Elements of each ZeRO-3 all-gather of one transformer block (before tp), in fetch order.

    Formula: "block": one gather of all its parameters; "module": one per leaf module with parameters (GPT: fused
        qkv, attention proj, fc1, fc2 with their biases, two LayerNorms; Llama: q, k, v, o, gate, up, down, two
        RMSNorms); "tensor": one per parameter tensor (GPT: 12, weights and biases apart; Llama: 9). Custom and
        Mixture-of-Experts blocks: one gather (their modules are not known here).
    Source: the module definitions of ``transformer.block_params`` (the lists sum to it up to Llama's optional
        biases and q/k norms, which join their module).
    """
    total = float(tf.block_params(spec)) if spec.family != "custom" and spec.moe is None else 0.0
    if granularity == "block" or total == 0.0:
        return [total]
    h, f = spec.hidden or 0, spec.ffn_hidden or 4 * (spec.hidden or 0)
    if spec.family == "llama":
        d, a, k = spec.attention_head_dim or 0, spec.n_heads or 0, spec.n_kv_heads or 0
        units = [h * a * d, h * k * d, h * k * d, a * d * h, h * f, h * f, f * h, h, h]
    elif granularity == "module":
        units = [3 * h * h + 3 * h, h * h + h, h * f + f, f * h + h, 2 * h, 2 * h]
    else:
        units = [3 * h * h, 3 * h, h * h, h, h * f, f, f * h, h, h, h, h, h]
    rest = total - sum(units)  # Llama's optional biases / q-k norms: with the first module
    units[0] += max(0.0, rest)
    return [float(u) for u in units]
