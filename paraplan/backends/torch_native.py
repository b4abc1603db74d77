"""Native torch backend: render a Plan as ``torch_parallel.json`` and apply it to a layer chain.

``build_torch_config`` turns a plan into a :class:`TorchParallelConfig`, the exact recipe the trainer
(``paraplan.backends.train_torch``) applies: a ``(pp, dp, cp, tp)`` device mesh (torchtitan's order), a Llama
tensor-parallel plan (DTensor ``parallelize_module``), full or selective activation checkpointing of chosen blocks, a
data-parallel wrapper per ZeRO stage (DDP, DDP + ``ZeroRedundancyOptimizer``, FSDP2 ``fully_shard``), context
parallelism (``torch_context_parallel``, CUDA only) and a ``torch.distributed.pipelining`` schedule over the rank's
model chunks (``torch_pipeline``). ``emit_torch`` writes that recipe; ``parallelize`` applies it, per model chunk,
in the order torchtitan's llama ``parallelize.py`` uses (pipeline split, TP, activation checkpointing, data
parallelism).

Expert parallelism (``Strategy.ep`` > 1, Mixture-of-Experts models; ``torch_expert_parallel``): after TP (tp = 1 with
ep) each MoE layer's routed experts are replaced by this rank's ``E/ep`` of them, tokens reaching them by all-to-all;
the router and shared experts stay dense. DDP and FSDP2 leave the expert shards alone; the trainer reduces their
gradients over the edp ranks that hold the same experts (``ParallelModel.expert_parallel``).

Pipeline chunks: with ``vpp`` > 1 (interleaved 1F1B, zero bubble) or the ZB-V schedule a rank holds several model
chunks (``Strategy.virtual_stages``); each is its own :class:`StageModule`, parallelized and wrapped on its own, and
its own ``PipelineStage``. With vpp = 1 a rank holds one chunk, its stage.

Sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2), with tp > 1: the residual stream between blocks is a
DTensor sharded over the tp group along the sequence, ``Shard(1)``; the two RMSNorms of each block run on that
shard (``SequenceParallel``), the attention and MLP inputs are all-gathered (``PrepareModuleInput`` to
``Replicate``) and the o/down projections reduce-scatter their output back to ``Shard(1)``. The embedding output
is split to ``Shard(1)`` (no communication: every tp rank holds it whole) and the head's input is all-gathered, so
the final norm and LM head run replicated as without sequence parallelism. Pipeline chunk boundaries carry whole
(gathered) hidden states. A block's global shape stays ``(b, s, h)``, so its rotary embedding sees all ``s``
positions.

Selective recomputation (sec. 4.3): each rank's ``selective_blocks`` run under the plan's ``selective_policy``
(``train_common.selective_checkpoint``: the attention core recomputed, or torchtitan's op-level policy).

ZeRO stage -> wrapper (over the ``dp`` mesh dimension, ``dp x cp`` flattened with context parallelism; nothing when
dp x cp == 1 and nothing is offloaded):

- 0: ``DistributedDataParallel`` (replicated parameters, gradients and optimizer states).
- 1: DDP + ``torch.distributed.optim.ZeroRedundancyOptimizer`` (optimizer states sharded).
- 2: FSDP2 ``fully_shard(reshard_after_forward=False)`` (gradients and optimizer states sharded; parameters stay
  gathered between forward and backward).
- 3: FSDP2 ``fully_shard(reshard_after_forward=True)`` (parameters sharded too).

Memory tiers. Activation paging (``StagePlan.offload_blocks``, POET-style): each rank's paged blocks run under
``train_common.paged_activations``, their saved tensors copied to host memory (tier cpu) or written to
``<run_dir>/activations/rank<RANK>`` (tier nvme, CPU clusters) during forward and read back for backward. Offloading
model states has one mode, FSDP2's ``CPUOffloadPolicy``: ZeRO-3 with parameters, gradients and optimizer states all
in host memory and the optimizer stepping on the CPU, on GPUs only; :func:`torch_offload_rejection` refuses every
other combination (they are DeepSpeed's).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from paraplan.backends.checks import (
    check_stage_tiling, check_tied_embeddings, check_tp, checkpointed_layers, chunk_block_layers, chunk_layers,
    paged_layers, selective_layers,
)
from paraplan.backends.torch_context_parallel import (
    CP_ROTATE_METHOD, CP_SDPA_BACKENDS, check_context_parallel, context_parallel_step,
)
from paraplan.backends.torch_expert_parallel import (
    ExpertParallel, apply_ep, build_expert_mesh, check_expert_parallel, expert_rows,
)
from paraplan.backends.torch_pipeline import build_schedule, check_schedule_supported
from paraplan.backends.train_common import paged_activations, selective_checkpoint
from paraplan.errors import LaunchError
from paraplan.files import read_model, write_atomic
from paraplan.models.build import LayerChain, torch_dtype
from paraplan.types import SCHEDULE_CLASSES, SCHEMA_VERSION, Dtype, Plan, _Frozen

CONFIG_FILE = "torch_parallel.json"
MESH_DIM_NAMES = ("pp", "dp", "cp", "tp")

# Tensor-parallel plan of one LlamaBlock (names relative to the block), after Megatron-LM (Shoeybi et al. 2019,
# section 3): the first matmul of attention and of the MLP is split by output columns, the second by input rows,
# so each block needs one all-reduce in forward and one in backward per sub-layer. Column-sharding q/k/v gives each
# rank whole heads (transformers reshapes with -1 heads), which is why tp must divide n_heads and n_kv_heads.
LLAMA_TP_PLAN: dict[str, Literal["ColwiseParallel", "RowwiseParallel"]] = {
    "layer.self_attn.q_proj": "ColwiseParallel",
    "layer.self_attn.k_proj": "ColwiseParallel",
    "layer.self_attn.v_proj": "ColwiseParallel",
    "layer.self_attn.o_proj": "RowwiseParallel",
    "layer.mlp.gate_proj": "ColwiseParallel",
    "layer.mlp.up_proj": "ColwiseParallel",
    "layer.mlp.down_proj": "RowwiseParallel",
}

Wrapper = Literal["none", "DDP", "DDP+ZeroRedundancyOptimizer", "FSDP2"]
ScheduleClass = Literal["Schedule1F1B", "ScheduleInterleaved1F1B", "ScheduleInterleavedZeroBubble",
                        "ScheduleZBVZeroBubble"]


class MeshConfig(_Frozen):
    shape: list[int] = Field(description="Device mesh shape, one entry per dimension name (pp, dp, cp, tp).")
    dim_names: list[str] = Field(default=list(MESH_DIM_NAMES), description="Mesh dimension names, outermost first.")


class DataParallelConfig(_Frozen):
    zero_stage: int = Field(ge=0, le=3)
    wrapper: Wrapper = Field(description="What wraps each chunk module over the data-parallel mesh (mesh_dims).")
    reshard_after_forward: bool | None = Field(description="FSDP2 only: free gathered parameters after forward.")
    cpu_offload: bool = Field(description="FSDP2 CPUOffloadPolicy: params, grads, optimizer states on the host, "
                                          "the optimizer step on the CPU (ZeRO-3, CUDA only).")
    mesh_dims: list[str] = Field(
        description="Mesh dimensions gradients are averaged (and FSDP2 shards) over: dp, or dp and cp flattened "
                    "(torchtitan's dp_shard_cp) with context parallelism.",
    )


class TensorParallelConfig(_Frozen):
    degree: int = Field(gt=0)
    plan: dict[str, Literal["ColwiseParallel", "RowwiseParallel"]] = Field(
        description="Module name (relative to each block) -> DTensor parallel style; empty when degree is 1."
    )
    # The HF attention code views/reshapes plain tensors with local head counts; DTensors would need global shapes.
    use_local_output: bool = Field(default=True, description="Styles return plain local tensors to the HF code.")
    sequence_parallel: bool = Field(
        default=False, description="Megatron sequence parallelism: residual stream and norms Shard(1) over the tp "
                                   "group; o/down projections reduce-scatter, attention/MLP inputs all-gathered.",
    )


class PipelineStageConfig(_Frozen):
    """One model chunk (virtual pipeline stage); with vpp = 1 the chunk is the rank's whole stage."""

    index: int = Field(ge=0, description="Virtual stage index in model order (the PipelineStage's stage_index).")
    rank: int = Field(ge=0, description="Pipeline rank that runs it.")
    chunk: int = Field(ge=0, description="Its position among that rank's chunks.")
    first_layer: int = Field(ge=0, description="Chain index, inclusive (0 is the embedding).")
    last_layer: int = Field(ge=0, description="Chain index, inclusive (L+1 is the head).")
    blocks: list[int] = Field(description="Block indices (0-based, chain index - 1) of this chunk.")


class PipelineConfig(_Frozen):
    schedule: ScheduleClass | None = Field(
        description="torch.distributed.pipelining schedule class (types.SCHEDULE_CLASSES); None when pp is 1.")
    chunks_per_rank: int = Field(gt=0, description="Model chunks per pipeline rank (vpp).")
    n_microbatches: int = Field(gt=0, description="Micro-batches per step per dp rank (gradient accumulation).")
    micro_batch_size: int = Field(gt=0, description="Sequences per micro-batch.")
    seq_len: int = Field(gt=0, description="Tokens per sequence (before context-parallel sharding).")
    activation_dtype: Dtype = Field(description="dtype of the hidden states sent between chunks.")
    stages: list[PipelineStageConfig] = Field(description="Every model chunk, in model order (pp x vpp).")


class ContextParallelConfig(_Frozen):
    degree: int = Field(default=1, gt=0, description="cp: ranks a sequence is sharded over (ring attention).")
    sdpa_backends: list[str] = Field(
        default_factory=list, description="torch.nn.attention.SDPBackend kernels allowed inside context_parallel.")
    rotate_method: str | None = Field(default=None, description="How K/V shards travel: allgather or alltoall.")


class ExpertParallelConfig(_Frozen):
    degree: int = Field(default=1, gt=0, description="ep: ranks each MoE layer's routed experts are split over "
                        "(torch_expert_parallel); 1: experts replicated like dense layers.")
    mesh_shape: list[int] = Field(default_factory=list, description="Expert mesh (pp, edp, ep) when degree > 1: ep "
                                  "groups are consecutive ranks of a data-parallel group (Megatron order).")
    grad_reduce: str | None = Field(default=None, description="How expert gradients are reduced when degree > 1.")


class MixedPrecisionConfig(_Frozen):
    compute_dtype: Dtype = Field(description="dtype of matmuls (TrainSpec.dtype).")
    mechanism: Literal["none", "autocast", "fsdp2"] = Field(
        description="none: all fp32. autocast: fp32 parameters, torch.autocast compute. fsdp2: MixedPrecisionPolicy."
    )
    param_dtype: Dtype = Field(description="dtype parameters are used in during forward/backward.")
    reduce_dtype: Dtype = Field(description="dtype gradients are reduced in across dp ranks.")


class TorchParallelConfig(_Frozen):
    """``torch_parallel.json``: everything ``train_torch`` applies to the model, derived from the plan only."""

    schema_version: int = SCHEMA_VERSION
    mesh: MeshConfig
    data_parallel: DataParallelConfig
    tensor_parallel: TensorParallelConfig
    pipeline: PipelineConfig
    context_parallel: ContextParallelConfig
    expert_parallel: ExpertParallelConfig = Field(default_factory=ExpertParallelConfig)
    checkpointed_blocks: list[int] = Field(description="Block indices run with full activation checkpointing.")
    selective_checkpointed_blocks: list[int] = Field(
        default_factory=list, description="Block indices run with selective recomputation (selective_policy).",
    )
    selective_policy: Literal["attention", "op"] = Field(
        description="attention: the SDPA call recomputed, everything else kept; op: torchtitan's op-level policy "
                    "(every other mm, SDPA, reduce-scatter kept).")
    paged_blocks: list[int] = Field(
        default_factory=list, description="Block indices whose saved activations are paged out in forward and back "
                                          "in for backward (train_common.paged_activations).")
    activation_tier: Literal["cpu", "nvme"] = Field(
        default="cpu", description="Where paged_blocks page to: cpu, host memory; nvme, one file per saved storage "
                                   "under <run_dir>/activations/rank<RANK>.")
    mixed_precision: MixedPrecisionConfig


def build_torch_config(plan: Plan) -> TorchParallelConfig:
    """Derive the native-torch recipe of a plan.

    Args:
        plan: the plan; its strategy's stages must cover chain layers ``0..L+1`` in order.

    Returns:
        The configuration ``emit_torch`` writes and ``parallelize`` applies.

    Raises:
        LaunchError: a plan this backend cannot run (see ``check_supported``).
    """
    check_supported(plan)
    st = plan.strategy
    chunks = [
        PipelineStageConfig(index=c.index, rank=c.rank, chunk=c.chunk, first_layer=c.first_layer,
                            last_layer=c.last_layer, blocks=[b - 1 for b in blocks])
        for c, blocks in zip(chunk_layers(plan), chunk_block_layers(plan))
    ]
    mp = _mixed_precision(plan)
    cp = ContextParallelConfig(degree=st.cp, sdpa_backends=list(CP_SDPA_BACKENDS), rotate_method=CP_ROTATE_METHOD) \
        if st.cp > 1 else ContextParallelConfig()
    return TorchParallelConfig(
        mesh=MeshConfig(shape=[st.pp, st.dp, st.cp, st.tp], dim_names=list(MESH_DIM_NAMES)),
        data_parallel=_data_parallel(plan),
        tensor_parallel=TensorParallelConfig(
            degree=st.tp, plan=dict(LLAMA_TP_PLAN) if st.tp > 1 else {}, sequence_parallel=st.sequence_parallel,
        ),
        pipeline=PipelineConfig(
            schedule=SCHEDULE_CLASSES[st.schedule] if st.pp > 1 else None, chunks_per_rank=st.vpp,
            n_microbatches=st.grad_accum, micro_batch_size=st.micro_batch_size, seq_len=plan.train.seq_len,
            activation_dtype=mp.param_dtype, stages=chunks,
        ),
        context_parallel=cp,
        expert_parallel=_expert_parallel(plan),
        # Block b is chain layer b + 1 (layer 0 is the embedding).
        checkpointed_blocks=[c - 1 for c in checkpointed_layers(plan)],
        selective_checkpointed_blocks=[c - 1 for c in selective_layers(plan)],
        selective_policy=st.selective_policy,
        paged_blocks=[c - 1 for c in paged_layers(plan)],
        activation_tier=st.activation_tier,
        mixed_precision=mp,
    )


def torch_offload_rejection(zero_stage: int, offload_param: str, offload_optimizer: str, offload_ratio: float,
                            device_kind: str) -> str | None:
    """Why the torch backend cannot run a plan's offload of model states, or None when it can.

    The torch backend offloads model states one way only, FSDP2's ``CPUOffloadPolicy``: parameters, gradients and
    optimizer states all in host memory, the optimizer stepping on the CPU. That is ZeRO-3 with ``offload_param`` and
    ``offload_optimizer`` both ``cpu`` and ``offload_ratio`` 1 (no offload at all is fine too). It needs an
    accelerator: on the CPU machine (torch 2.13) ``fully_shard(..., offload_policy=CPUOffloadPolicy())`` fails, with
    ``pin_memory=False`` too (PLATFORM.md). NVMe tiers, optimizer-only or parameter-only offload and partial offload
    are DeepSpeed's (ZeRO-Offload / ZeRO-Infinity). Pure, so the planner can mirror it.

    Args:
        zero_stage: the plan's ZeRO stage (0..3).
        offload_param: ``none``, ``cpu`` or ``nvme``.
        offload_optimizer: ``none``, ``cpu`` or ``nvme``.
        offload_ratio: share of the optimizer states offloaded, in (0, 1].
        device_kind: the cluster's device kind, ``cuda`` or ``cpu``.

    Returns:
        The reason, with what to change, or None.
    """
    if offload_param == "none" and offload_optimizer == "none":
        return None
    fixes = ("re-plan with --backend torch (it plans only FSDP2's offload: ZeRO-3 with parameters and optimizer "
             "states in host memory, on GPUs) or launch with --backend deepspeed")
    tiers = f"offload_param={offload_param}, offload_optimizer={offload_optimizer}"
    if "nvme" in (offload_param, offload_optimizer):
        why = f"{tiers}: the torch backend has no NVMe tier for model states (that is DeepSpeed's ZeRO-Infinity)"
    elif offload_param == "none":
        why = (f"{tiers}: the torch backend has no optimizer-only offload; FSDP2's CPUOffloadPolicy also keeps "
               "parameters and gradients on the host, which this plan did not price")
    elif offload_optimizer == "none":
        why = (f"{tiers}: the torch backend has no parameter-only offload; FSDP2's CPUOffloadPolicy also keeps the "
               "optimizer states on the host and steps on the CPU, which this plan did not price")
    elif zero_stage != 3:
        why = f"{tiers} at ZeRO stage {zero_stage}: FSDP2's CPUOffloadPolicy offloads sharded parameters (ZeRO-3)"
    elif offload_ratio < 1:
        why = (f"offload_ratio {offload_ratio}: FSDP2's CPUOffloadPolicy offloads all optimizer states; partial "
               "offload is DeepSpeed's")
    elif device_kind != "cuda":
        return ("the plan offloads parameters and optimizer states to host memory (FSDP2 CPUOffloadPolicy), which "
                "needs an accelerator: on a CPU cluster fully_shard with CPUOffloadPolicy fails (device memory is "
                "host memory already). Re-plan with --backend torch, or launch with --backend deepspeed")
    else:
        return None
    return f"{why}. Either {fixes}"


def check_supported(plan: Plan) -> None:
    """Refuse plans the native torch backend cannot run, saying what to change.

    Raises:
        LaunchError: an offload of model states other than FSDP2's CPUOffloadPolicy mode on GPUs
            (:func:`torch_offload_rejection`), fp16, tensor parallelism for a
            non-Llama model or a degree that does not divide the heads / key-value heads / MLP width, a pipeline
            schedule torch cannot run with the plan's micro-batches, recomputation or data parallelism
            (``torch_pipeline.check_schedule_supported``), pp > 1 without hidden/vocab in the spec, tied embeddings
            split across pipeline stages, stages or chunks that do not tile the layer chain, sequence parallelism
            for a non-Llama model or a sequence length tp does not divide, context parallelism on a CPU cluster
            (``torch_context_parallel.check_context_parallel``) or with a Mixture-of-Experts model, tensor
            parallelism for an MoE model (``checks.check_tp``), or expert parallelism outside what
            ``torch_expert_parallel.check_expert_parallel`` runs (tp = cp = etp = 1, ZeRO 0, or 2-3 with edp = 1,
            no offload).
    """
    st, spec = plan.strategy, plan.model
    offload = torch_offload_rejection(st.zero_stage, st.offload_param, st.offload_optimizer, st.offload_ratio,
                                      plan.cluster.device.kind)
    if offload is not None:
        raise LaunchError(offload)
    if plan.train.dtype == "fp16":
        raise LaunchError(
            "the torch backend does not implement fp16 loss scaling; plan with dtype bf16 (same memory) or fp32, "
            "or launch with --backend deepspeed"
        )
    check_context_parallel(plan)
    if st.cp > 1 and spec.moe is not None:
        raise LaunchError(
            f"cp={st.cp} for the Mixture-of-Experts model {spec.name}: the torch backend's context parallelism has "
            "not been checked with MoE layers (or latent attention); re-plan with --strategy cp=1"
        )
    check_expert_parallel(plan)
    if st.sequence_parallel:
        _check_sequence_parallel(plan)
    if st.tp > 1:
        check_tp(spec, st.tp)
    check_schedule_supported(plan)
    if st.pp > 1 and (spec.hidden is None or spec.vocab is None):
        raise LaunchError(
            f"pp={st.pp} for {spec.name}: the torch backend sizes the stage boundaries from hidden and vocab; add "
            "them to the model spec or re-plan with pp=1"
        )
    check_tied_embeddings(plan)
    check_stage_tiling(plan)


def _check_sequence_parallel(plan: Plan) -> None:
    st, spec = plan.strategy, plan.model
    if spec.family != "llama":
        raise LaunchError(
            f"sequence_parallel for family '{spec.family}': the torch backend's sequence-parallel plan covers Llama "
            "blocks only (RMSNorms and q/k/v/o, gate/up/down projections). Re-plan without sequence parallelism"
        )
    if plan.train.seq_len % st.tp:
        raise LaunchError(
            f"sequence_parallel shards the sequence over tp={st.tp} ranks, which must divide seq_len="
            f"{plan.train.seq_len}; re-plan with a tp that divides it or without sequence parallelism"
        )


def _data_parallel(plan: Plan) -> DataParallelConfig:
    st = plan.strategy
    # check_supported let offload through only in CPUOffloadPolicy's mode (ZeRO-3, params and optimizer on the host),
    # which needs FSDP2 even with one data-parallel rank.
    cpu_offload = st.offload_param == "cpu" and st.offload_optimizer == "cpu"
    if cpu_offload:
        wrapper: Wrapper = "FSDP2"
    elif st.dp * st.cp == 1:
        wrapper = "none"
    else:
        wrapper = ("DDP", "DDP+ZeroRedundancyOptimizer", "FSDP2", "FSDP2")[st.zero_stage]
    return DataParallelConfig(
        zero_stage=st.zero_stage, wrapper=wrapper,
        reshard_after_forward=(st.zero_stage == 3) if wrapper == "FSDP2" else None,
        cpu_offload=cpu_offload, mesh_dims=["dp", "cp"] if st.cp > 1 else ["dp"],
    )


def _expert_parallel(plan: Plan) -> ExpertParallelConfig:
    st = plan.strategy
    if st.ep == 1:
        return ExpertParallelConfig()
    return ExpertParallelConfig(
        degree=st.ep, mesh_shape=[st.pp, st.edp, st.ep],
        grad_reduce=f"all-to-all token dispatch; expert gradients summed over edp={st.edp} ranks, divided by "
                    f"dp={st.dp}; DDP/FSDP2 leave expert parameters alone",
    )


def _mixed_precision(plan: Plan) -> MixedPrecisionConfig:
    dtype = plan.train.dtype
    if dtype == "fp32":
        return MixedPrecisionConfig(compute_dtype=dtype, mechanism="none", param_dtype="fp32", reduce_dtype="fp32")
    if _data_parallel(plan).wrapper == "FSDP2":
        return MixedPrecisionConfig(compute_dtype=dtype, mechanism="fsdp2", param_dtype=dtype, reduce_dtype="fp32")
    return MixedPrecisionConfig(compute_dtype=dtype, mechanism="autocast", param_dtype="fp32", reduce_dtype="fp32")


def emit_torch(plan: Plan, run_dir: Path) -> list[Path]:
    """Write ``torch_parallel.json`` (atomically) into ``run_dir``.

    Args:
        plan: the plan to render.
        run_dir: the run directory (created if missing).

    Returns:
        The paths written.

    Raises:
        LaunchError: a plan this backend cannot run (see ``check_supported``).
    """
    path = Path(run_dir) / CONFIG_FILE
    write_atomic(path, build_torch_config(plan).model_dump_json(indent=2))
    return [path]


def load_torch_config(run_dir: Path, plan: Plan) -> TorchParallelConfig:
    """Read ``torch_parallel.json`` and check it still describes ``plan`` (it is generated, not an input).

    Raises:
        LaunchError: the file is missing, invalid, or differs from what the plan implies.
    """
    path = Path(run_dir) / CONFIG_FILE
    written = read_model(
        path, TorchParallelConfig, "torch backend config", LaunchError,
        "write the run directory with `paraplan launch --backend torch`",
    )
    expected = build_torch_config(plan)
    if written != expected:
        raise LaunchError(
            f"{path} does not match plan.json; it is generated from the plan. Change the plan and re-run "
            "`paraplan launch` instead of editing it"
        )
    return written


# ---------------------------------------------------------------------------------------------------------------
# Applying the recipe
# ---------------------------------------------------------------------------------------------------------------

# Name segments that wrappers insert into parameter names (StageModule.canonical_name).
_WRAPPER_SEGMENTS = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})


class StageModule(nn.Module):
    """Chain layers ``first_layer..last_layer`` of one model chunk (the whole chain when pp is 1).

    ``forward(x) -> y``: tokens ``(b, s)`` int64 or hidden ``(b, s, h)`` in, hidden ``(b, s, h)`` or logits
    ``(b, s, v)`` out, cast to ``output_dtype`` so the pipeline's static stage-boundary metadata always holds.
    Blocks are addressed by their global block index through ``block_position``. With ``position_ids`` (a
    ``(1, s)`` int64 buffer; context parallelism shards it with the sequence) every block is called as
    ``block(x, positions=position_ids)`` so its rotary embedding uses the tokens' global positions.

    ``layer_names`` are the layers' names in the whole chain (``embed``, ``blocks.<i>``, ``head``):
    :meth:`canonical_name` maps this chunk's parameter names (``layers.<position>...``, under any wrapper) to the
    whole chain's, so checkpoints and per-parameter initialization do not depend on the plan.
    """

    def __init__(
        self, layers: list[nn.Module], block_ids: list[int], first_block_position: int,
        output_dtype: torch.dtype, autocast_dtype: torch.dtype | None, position_ids: torch.Tensor | None = None,
        layer_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.layer_names = layer_names or [f"layers.{i}" for i in range(len(layers))]
        self.block_position = {b: first_block_position + i for i, b in enumerate(block_ids)}
        self.output_dtype = output_dtype
        self.autocast_dtype = autocast_dtype
        self.position_ids: torch.Tensor | None
        self.register_buffer("position_ids", position_ids, persistent=False)

    def block(self, block_id: int) -> nn.Module:
        return self.layers[self.block_position[block_id]]

    def canonical_name(self, name: str) -> str:
        """The whole chain's name (``LayerChain.named_parameters``) of parameter or buffer ``name`` of this chunk,
        as named by this module or any wrapper of it (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, the
        activation-checkpoint and paging wrappers' ``_checkpoint_wrapped_module.``; FSDP2 keeps names)."""
        parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
        if parts and parts[0] == "module":  # DDP
            parts = parts[1:]
        if len(parts) < 2 or parts[0] != "layers":
            return ".".join(parts)
        return ".".join([self.layer_names[int(parts[1])], *parts[2:]])

    def set_block(self, block_id: int, module: nn.Module) -> None:
        self.layers[self.block_position[block_id]] = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = (
            torch.autocast(x.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None else contextlib.nullcontext()
        )
        blocks = set(self.block_position.values())
        with ctx:
            for i, layer in enumerate(self.layers):
                if self.position_ids is not None and i in blocks:
                    x = layer(x, positions=self.position_ids)
                else:
                    x = layer(x)
        x = x.to(self.output_dtype)
        # The zero-bubble schedules detach a chunk's output in place after its input-gradient pass, which a view
        # (a DTensor's local tensor, as tensor parallelism hands it back) does not allow.
        return x.clone() if x._is_view() else x


def build_stage_module(chain: LayerChain, stage: PipelineStageConfig, config: TorchParallelConfig,
                       device: torch.device | None = None) -> StageModule:
    """Cut one model chunk out of the chain (keeps references to the chain's layers; drop the chain to free the
    rest). With context parallelism the chunk gets its ``position_ids`` buffer ``0 .. seq_len - 1`` on ``device``
    (default: where the chain's parameters are)."""
    layers = chain.layers()[stage.first_layer: stage.last_layer + 1]
    mp = config.mixed_precision
    positions = None
    if config.context_parallel.degree > 1:
        device = device or next(chain.parameters()).device
        positions = torch.arange(config.pipeline.seq_len, device=device).unsqueeze(0)
    n_layers = len(chain.layers())
    names = ["embed" if i == 0 else "head" if i == n_layers - 1 else f"blocks.{i - 1}"
             for i in range(stage.first_layer, stage.last_layer + 1)]
    return StageModule(
        layers, stage.blocks, first_block_position=1 if stage.first_layer == 0 else 0, layer_names=names,
        output_dtype=torch_dtype(config.pipeline.activation_dtype),
        autocast_dtype=torch_dtype(mp.compute_dtype) if mp.mechanism == "autocast" else None,
        position_ids=positions,
    )


def apply_tp(stage: StageModule, tp_mesh, tp: TensorParallelConfig) -> None:
    """Shard every block's attention and MLP projections over ``tp_mesh`` (DTensor ``parallelize_module``).

    With ``tp.sequence_parallel`` also the block's norms and residual stream (see the module docstring) and the
    stage boundaries: hidden states enter and leave a stage whole, as plain tensors.
    """
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"ColwiseParallel": ColwiseParallel, "RowwiseParallel": RowwiseParallel}
    for block_id in stage.block_position:
        block_plan = {name: styles[style](use_local_output=tp.use_local_output) for name, style in tp.plan.items()}
        if tp.sequence_parallel:
            # Row-parallel outputs reduce-scatter into the Shard(1) residual stream, kept as DTensors so the
            # residual adds and norms run on sequence shards while the block still sees the global shape.
            block_plan.update({
                name: RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
                for name, style in tp.plan.items() if style == "RowwiseParallel"
            })
            block_plan.update(_llama_sp_plan())
        parallelize_module(stage.block(block_id), tp_mesh, block_plan)
    if tp.sequence_parallel:
        _apply_sp_boundaries(stage, tp_mesh)
        # A norm weight (Replicate) applied to sequence shards gets a Partial(sum) gradient: each rank holds the sum
        # over its shard. Megatron all-reduces these over the tp group; do the same as soon as it is accumulated,
        # so the optimizer and the gradient norm see the whole gradient. (DDP's TP transform and FSDP2 reduce
        # Partial gradients to the parameter's placement themselves; the hook is then a no-op.)
        for param in stage.parameters():
            if getattr(param, "placements", None) and all(p.is_replicate() for p in param.placements):
                param.register_post_accumulate_grad_hook(_reduce_partial_grad)


def _reduce_partial_grad(param) -> None:
    if any(p.is_partial() for p in param.grad.placements):
        param.grad = param.grad.redistribute(placements=param.placements)


def reduce_partial_grads(params: list[nn.Parameter]) -> None:
    """Reduce every DTensor gradient still ``Partial`` to its parameter's placement (the sequence-parallel norm
    weights). The zero-bubble schedules assign weight gradients without autograd's accumulate-grad step, so the
    post-accumulate hook of :func:`apply_tp` never sees them; calling this after the step covers them (a no-op for
    gradients already reduced)."""
    from torch.distributed.tensor import DTensor

    for param in params:
        if isinstance(param.grad, DTensor) and isinstance(param, DTensor):
            _reduce_partial_grad(param)


def _llama_sp_plan() -> dict:
    """Sequence-parallel styles of one LlamaBlock beyond its projections (torchtitan's llama plan, HF names)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, SequenceParallel

    return {
        "layer.input_layernorm": SequenceParallel(),
        # The decoder layer calls self_attn(hidden_states=..., position_embeddings=...) by keyword.
        "layer.self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)}, desired_input_kwarg_layouts={"hidden_states": Replicate()},
            use_local_output=True,
        ),
        "layer.post_attention_layernorm": SequenceParallel(),
        "layer.mlp": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True,
        ),
    }


def _apply_sp_boundaries(stage: StageModule, tp_mesh) -> None:
    """Make the stage's first block receive, and its last block hand on, the Shard(1) residual stream.

    The embedding output (whole on every tp rank) is split without communication; the head input is all-gathered,
    so the final norm and LM head run replicated. Between pipeline stages hidden states travel whole: a non-first
    stage splits its input, a non-last stage gathers its output.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput, parallelize_module

    block_ids = list(stage.block_position)
    if not block_ids:  # an embedding-only or head-only stage: everything stays whole
        return
    first_block, last_block = stage.block(block_ids[0]), stage.block(block_ids[-1])
    if stage.layers[0] is first_block:
        parallelize_module(first_block, tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
        ))
    else:  # the embedding
        parallelize_module(stage.layers[0], tp_mesh, PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=False,
        ))
    if stage.layers[-1] is last_block:
        parallelize_module(last_block, tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True,
        ))
    else:  # the head
        parallelize_module(stage.layers[-1], tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True,
        ))


def apply_ac(
    stage: StageModule, block_ids: list[int], selective_block_ids: list[int] = (), selective_policy: str = "attention",
) -> None:
    """Activation checkpointing of this chunk's blocks (ids of other chunks' blocks are ignored).

    Args:
        stage: the chunk module.
        block_ids: blocks with full checkpointing: each keeps only its input and recomputes in backward.
        selective_block_ids: blocks with selective recomputation under ``selective_policy``
            (``train_common.selective_checkpoint``: attention or op).
        selective_policy: ``attention`` or ``op``.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for block_id in block_ids:
        if block_id in stage.block_position:
            wrapped = checkpoint_wrapper(stage.block(block_id), checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            stage.set_block(block_id, wrapped)
    for block_id in selective_block_ids:
        if block_id in stage.block_position:
            stage.set_block(block_id, selective_checkpoint(stage.block(block_id), selective_policy))


def apply_paging(stage: StageModule, block_ids: list[int], tier: str, directory: Path | None) -> None:
    """Page the saved activations of this chunk's ``block_ids`` (ids of other chunks' blocks are ignored) to
    ``tier`` (``train_common.paged_activations``: host memory, or files under ``directory`` for nvme)."""
    for block_id in block_ids:
        if block_id in stage.block_position:
            stage.set_block(block_id, paged_activations(stage.block(block_id), tier, directory))


def apply_fsdp(stage: StageModule, dp_mesh, config: TorchParallelConfig,
               ignored: list[nn.Parameter] = ()) -> None:
    """FSDP2: shard each block, then the root (embedding, norm, head), over ``dp_mesh``; ``ignored`` parameters
    (expert-parallel experts, reduced over their own edp group) are left whole and unmanaged."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dpc, mp = config.data_parallel, config.mixed_precision
    policy = MixedPrecisionPolicy(param_dtype=torch_dtype(mp.param_dtype), reduce_dtype=torch_dtype(mp.reduce_dtype))
    kwargs = dict(
        mesh=dp_mesh, reshard_after_forward=dpc.reshard_after_forward, mp_policy=policy,
        offload_policy=CPUOffloadPolicy() if dpc.cpu_offload else OffloadPolicy(),
    )
    ignored_params = set(ignored) or None
    for block_id in stage.block_position:
        fully_shard(stage.block(block_id), ignored_params=ignored_params, **kwargs)
    fully_shard(stage, ignored_params=ignored_params, **kwargs)


def apply_ddp(stage: StageModule, dp_mesh, tp: int, device: torch.device,
              ignored: list[nn.Parameter] = ()) -> nn.Module:
    """DDP over ``dp_mesh``; with tp > 1 the DTensor parameters are first exposed to DDP as local shards.
    ``ignored`` parameters (expert-parallel experts) are neither broadcast nor all-reduced by DDP."""
    from torch.nn.parallel import DistributedDataParallel

    if tp > 1:
        from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform

        _pre_dp_module_transform(stage)
    if ignored:
        ids = {id(p) for p in ignored}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            stage, [name for name, p in stage.named_parameters() if id(p) in ids])
    return DistributedDataParallel(
        stage, process_group=dp_mesh.get_group(), device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,  # the only buffers are RoPE frequencies, position ids and DeepSeek's (fixed)
        # routing bias, identical on every rank
    )


@dataclass
class ParallelModel:
    """This rank's part of the model after ``parallelize``."""

    # The rank's model chunks in chunk order (one when vpp is 1), each possibly DDP-wrapped or FSDP2-sharded.
    modules: list[nn.Module]
    # Captured before any forward: with tp > 1 under DDP, the TP forward hooks re-register the sharded weights as
    # plain attributes, so module.parameters() would miss them afterwards.
    params: list[nn.Parameter]
    is_first: bool  # holds virtual stage 0 (takes the tokens)
    is_last: bool  # holds the last virtual stage (computes the loss); with ZB-V rank 0 holds both
    schedule: object | None  # the plan's torch.distributed.pipelining schedule when pp > 1
    config: TorchParallelConfig
    position_ids: list[torch.Tensor]  # the chunks' position-id buffers (context parallelism shards them), or []
    dp_mesh: object  # the mesh gradients are averaged over (data_parallel_mesh)
    # ep > 1: the rank's expert shards and their gradient reduction (torch_expert_parallel); None otherwise.
    expert_parallel: ExpertParallel | None = None

    @property
    def module(self) -> nn.Module:
        """The only chunk (pp = 1): call it on micro-batches."""
        return self.modules[0]

    def stages(self) -> list[StageModule]:
        """The chunks' StageModules, unwrapped from DDP."""
        return [m.module if isinstance(m, torch.nn.parallel.DistributedDataParallel) else m for m in self.modules]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name in the whole chain, parameter)`` of every parameter this rank holds (a DTensor when sharded):
        the names ``LayerChain.named_parameters`` gives, whatever the plan's split and wrappers."""
        return [(stage.canonical_name(name), p) for stage in self.stages() for name, p in stage.named_parameters()]


@torch.no_grad()
def materialize_stage(stage: StageModule, device: torch.device, plan: Plan) -> None:
    """Allocate a meta-built chunk on ``device`` and initialize it, one parameter at a time.

    ``to_empty`` allocates every parameter as this rank holds it (a DTensor allocates only its local shard; FSDP2
    re-derives its sharded state in ``_apply``), then each parameter is filled from the full tensor
    ``build.init_parameter`` makes for its whole-chain name (:meth:`StageModule.canonical_name`), sliced to the
    local shard by ``distribute_tensor(..., src_data_rank=None)`` (no communication: every rank makes the full
    tensor itself). That covers TP's ``Shard``, sequence parallelism's ``Replicate`` and FSDP2's ``Shard(0)``, and
    FSDP2 over TP's ``_StridedShard``. Buffers (rotary frequencies, position ids) were built with real values;
    ``to_empty`` would leave them uninitialized, so they are copied back. On a GPU the full tensor is copied to the
    device before slicing (``distribute_tensor``): one whole parameter at a time there too. An expert-parallel shard
    (``torch_expert_parallel.expert_rows``) is made expert by expert, only the rank's experts, never whole.

    Args:
        stage: a chunk whose parameters are on the meta device, after TP, AC and FSDP2, before DDP.
        device: this rank's device.
        plan: the plan (model and seed).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    from paraplan.models.build import init_parameter

    buffers = {name: b.clone() for name, b in stage.named_buffers() if not b.is_meta}
    stage.to_empty(device=device)
    for name, buffer in stage.named_buffers():
        if name in buffers:
            buffer.copy_(buffers[name])
    for name, param in stage.named_parameters():
        rows = expert_rows(param)
        if rows is not None:  # an expert-parallel shard: only its experts are made (build.init_parameter)
            param.to_local().copy_(init_parameter(stage.canonical_name(name), param.shape, param.dtype, plan.model,
                                                  plan.train.seed, experts=rows))
            continue
        full = init_parameter(stage.canonical_name(name), param.shape, param.dtype, plan.model, plan.train.seed)
        if isinstance(param, DTensor):
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)


def data_parallel_mesh(mesh, cp: int):
    """The mesh gradients are averaged over: ``dp``, or ``dp x cp`` flattened (torchtitan's ``dp_shard_cp``)."""
    return mesh["dp", "cp"]._flatten("dp_cp") if cp > 1 else mesh["dp"]


def parallelize(chain: LayerChain, plan: Plan, mesh, device: torch.device | None = None,
                activation_dir: Path | None = None) -> ParallelModel:
    """Apply the plan's strategy to a freshly built chain, for the calling rank.

    Sharded initialization (torchtitan's): a chain built with ``build_model(..., meta_params=True)`` holds its
    parameters on the meta device. Each chunk is then split, tensor-parallelized and FSDP2-sharded on meta, and only
    then allocated on ``device`` (:func:`materialize_stage`: this rank's shards only, each filled from its full
    ``init_parameter`` value), before DDP wraps it (DDP broadcasts rank 0's weights when it is built). No rank ever
    holds more than its shards plus one whole parameter.

    Args:
        chain: the full model, identical on every rank (``build_model`` with the plan's seed), or built with
            ``meta_params=True`` (parameters on meta, buffers real).
        plan: the plan (its recipe is ``build_torch_config(plan)``).
        mesh: a ``DeviceMesh`` of shape ``(pp, dp, cp, tp)`` named ``("pp", "dp", "cp", "tp")``.
        device: where the chain's parameters live, or are materialized (default: CPU).
        activation_dir: this rank's directory for activations paged to disk (tier nvme); needed only then.

    Returns:
        The rank's chunk modules (wrapped) and, for pp > 1, the plan's pipeline schedule over them.

    Raises:
        LaunchError: a plan this backend cannot run.
        ValueError: blocks paged to disk without ``activation_dir``.
    """
    config = build_torch_config(plan)
    device = device or torch.device("cpu")
    st = plan.strategy
    pp_rank = mesh["pp"].get_local_rank()
    chunks = [c for c in config.pipeline.stages if c.rank == pp_rank]  # model order is chunk order
    dp_mesh = data_parallel_mesh(mesh, st.cp)
    on_meta = any(p.is_meta for p in chain.parameters())
    expert_mesh = build_expert_mesh(plan, device.type) if st.ep > 1 else None
    modules, positions, expert_params = [], [], []
    for chunk in chunks:
        # 1. Pipeline split first, so TP/AC/DP only touch this chunk's layers.
        stage = build_stage_module(chain, chunk, config, device)
        # 2. TP before data parallelism: FSDP2 then shards the TP-local shards (2-D), DDP reduces them.
        if st.tp > 1:
            apply_tp(stage, mesh["tp"], config.tensor_parallel)
        # 2b. Expert parallelism (tp = 1): each MoE layer keeps its experts' slice; before AC, so recomputation
        #     replays the all-to-alls; the data-parallel wrappers below leave the expert shards alone.
        stage_experts = apply_ep(stage, expert_mesh["ep"]) if expert_mesh is not None else []
        expert_params += stage_experts
        # 3. Activation checkpointing wraps the (TP-sharded) blocks, so recomputation replays the TP collectives;
        #    paging wraps other blocks the same way (a DTensor pages its local shard).
        apply_ac(stage, config.checkpointed_blocks, config.selective_checkpointed_blocks, config.selective_policy)
        apply_paging(stage, config.paged_blocks, config.activation_tier, activation_dir)
        # 4. Data parallelism last: FSDP2 units are the (checkpoint- or paging-wrapped) blocks plus the chunk's root,
        #    so a paged block sees its unsharded parameters and keeps them in memory.
        module: nn.Module = stage
        wrapper = config.data_parallel.wrapper
        if wrapper == "FSDP2":
            apply_fsdp(stage, dp_mesh, config, stage_experts)
        # A meta-built chunk gets its (sharded) parameters now: after FSDP2 has sharded them, before DDP broadcasts.
        if on_meta:
            materialize_stage(stage, device, plan)
        if wrapper.startswith("DDP"):
            module = apply_ddp(stage, dp_mesh, st.tp, device, stage_experts)
        if stage.position_ids is not None:  # the buffer as materialized: context parallelism shards it in place
            positions.append(stage.position_ids)
        modules.append(module)
    # 5. The pipeline stages wrap the data-parallel modules; they handle DDP no_sync / FSDP2 gradient sync themselves.
    schedule = None
    if st.pp > 1:
        schedule = build_schedule(modules, [c.index for c in chunks], plan, mesh["pp"].get_group(), device,
                                  torch_dtype(config.pipeline.activation_dtype))
    n_chunks = len(config.pipeline.stages)
    experts = None
    if expert_mesh is not None:
        experts = ExpertParallel(expert_params, expert_mesh["edp"].get_group(), st.edp, grad_divisor=st.dp * st.cp)
    return ParallelModel(
        modules, [p for m in modules for p in m.parameters()], any(c.index == 0 for c in chunks),
        any(c.index == n_chunks - 1 for c in chunks), schedule, config, positions, dp_mesh, experts,
    )


def step_context(model: ParallelModel, mesh, batch: list[torch.Tensor]):
    """The context a step's forward and backward run in: context parallelism's (sharding ``batch`` and the chunks'
    position ids in place, ring attention) when cp > 1, else nothing."""
    if model.config.context_parallel.degree == 1:
        return contextlib.nullcontext()
    return context_parallel_step(mesh["cp"], batch, model.position_ids)


def build_optimizer(model: ParallelModel, plan: Plan) -> torch.optim.Optimizer:
    """AdamW over this rank's parameters; ZeRO-1 shards its states over ``model.dp_mesh`` (dp, or dp x cp).

    Expert-parallel shards (DTensors over the ep mesh) form their own parameter group: a fused or foreach AdamW step
    (on GPUs) may not mix tensors of different meshes, or plain tensors and DTensors, in one kernel call."""
    params = model.params
    lr, wd = plan.train.lr, plan.train.weight_decay
    if model.config.data_parallel.wrapper == "DDP+ZeroRedundancyOptimizer":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(
            params, optimizer_class=torch.optim.AdamW, process_group=model.dp_mesh.get_group(), lr=lr, weight_decay=wd
        )
    if model.expert_parallel is not None:
        experts = {id(p) for p in model.expert_parallel.params}
        groups = [{"params": [p for p in params if id(p) not in experts]},
                  {"params": [p for p in params if id(p) in experts]}]
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
