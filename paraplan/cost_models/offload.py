"""What the memory tiers cost: DeepSpeed's swap buffers for NVMe offload, sized from the plan.

The planner prices these host buffers and the DeepSpeed backend emits the same sizes into ``ds_config.json``, so
the two agree by construction. Tier formulas (bytes, transfers, overlap) live in ``costs.CandidateCosts``.

Sources: DeepSpeed ``runtime/swap_tensor/partitioned_param_swapper.py`` (``buffer_count`` pinned host buffers of
``buffer_size`` elements; a parameter partition larger than one buffer is refused: "More elements ... than buffer
size") and ``runtime/swap_tensor/optimizer_utils.py`` (``buffer_count`` buffers of the largest optimizer sub-group,
fp32); ``runtime/zero/offload_config.py`` for the defaults.
"""

from __future__ import annotations

import math

from paraplan.cost_models import transformer as tf
from paraplan.types import ModelSpec

# DeepSpeed's defaults (runtime/zero/offload_config.py): offload_param.buffer_count 5, offload_optimizer
# .buffer_count 4; the aio section's defaults (runtime/swap_tensor/aio_config.py).
PARAM_SWAP_BUFFERS = 5
OPTIMIZER_SWAP_BUFFERS = 4
AIO_CONFIG = {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
              "overlap_events": True}
# ZeRO-3 ``sub_group_size`` emitted with the optimizer on NVMe: the optimizer step swaps one sub-group of fp32
# master weights and Adam moments at a time, so the host needs OPTIMIZER_SWAP_BUFFERS buffers of the largest
# sub-group in fp32. DeepSpeed's default (1e9) would ask 16 GB of pinned host memory per rank, and a sub-group as
# large as the whole partition would keep a quarter of the optimizer on the host anyway; the ZeRO-Infinity tutorial
# lowers it for NVMe. Stated choice: 1/OPTIMIZER_SUB_GROUPS of the partition, at most 1e8 elements.
OPTIMIZER_SUB_GROUP_ELEMENTS = 100_000_000
OPTIMIZER_SUB_GROUPS = 16
# Swap buffers are rounded up to this many elements (aio block alignment; DeepSpeed aligns I/O to 1 MiB blocks).
_ALIGN = 1 << 20
# Buffer size when the model's largest tensor is unknown (a factory model without sizes): DeepSpeed's default.
DEFAULT_PARAM_BUFFER_ELEMENTS = 100_000_000
# DeepSpeed's reduce_bucket_size / allgather_bucket_size default (runtime/zero/config.py): 5e8 elements, one
# gradient-dtype buffer (stage3.py allocates ``torch.empty(reduce_bucket_size)`` per gradient dtype), 2 GB in fp32.
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000


def _aligned(n: float) -> int:
    return max(_ALIGN, int(math.ceil(n / _ALIGN)) * _ALIGN)


def largest_tensor_elements(spec: ModelSpec, tp: int) -> int | None:
    """Elements of the model's largest parameter tensor on one tensor-parallel rank: the (padded) embedding or
    LM head matrix, or the largest block GEMM weight; None for a factory model (sizes unknown before it is built)."""
    if spec.family == "custom" or not spec.hidden:
        return None
    emb = tf.padded_vocab(spec, tp) * spec.hidden / tp
    mlp = spec.hidden * (spec.ffn_hidden or 4 * spec.hidden) / tp
    return int(math.ceil(max(emb, mlp)))


def largest_layer_elements(spec: ModelSpec, tp: int) -> int | None:
    """Parameters of the model's largest layer (block, embedding or head) on one tensor-parallel rank; None for a
    factory model."""
    if spec.family == "custom" or not spec.hidden:
        return None
    pad = (tf.padded_vocab(spec, tp) - (spec.vocab or 0)) * spec.hidden
    return int(math.ceil(max(tf.block_params(spec), tf.embed_params(spec) + pad, tf.head_params(spec) + pad) / tp))


def reduce_bucket_elements(spec: ModelSpec, tp: int) -> int:
    """``reduce_bucket_size`` (and ``allgather_bucket_size``) emitted when a plan offloads: one layer's gradients,
    aligned, at most DeepSpeed's default (:data:`DEEPSPEED_BUCKET_ELEMENTS`). The default alone would keep 2 GB per
    rank in fp32, more than a small model's whole offloaded state (measured: ../shared/PLATFORM.md)."""
    largest = largest_layer_elements(spec, tp)
    if largest is None:
        return DEEPSPEED_BUCKET_ELEMENTS
    return min(DEEPSPEED_BUCKET_ELEMENTS, _aligned(largest))


def param_swap_buffer_elements(spec: ModelSpec, tp: int, dp_shard: int) -> int:
    """``offload_param.buffer_size`` for NVMe: the largest parameter partition (largest tensor / (dp x cp)),
    aligned; DeepSpeed refuses a partition larger than one buffer."""
    largest = largest_tensor_elements(spec, tp)
    if largest is None:
        return DEFAULT_PARAM_BUFFER_ELEMENTS
    return _aligned(largest / dp_shard)


def optimizer_sub_group_elements(params_per_device: float) -> int:
    """``sub_group_size`` with the optimizer on NVMe: ``1/OPTIMIZER_SUB_GROUPS`` of the rank's partition, at most
    :data:`OPTIMIZER_SUB_GROUP_ELEMENTS`."""
    return min(OPTIMIZER_SUB_GROUP_ELEMENTS, _aligned(params_per_device / OPTIMIZER_SUB_GROUPS))


def swap_buffer_bytes(param_tier: str, optimizer_tier: str, spec: ModelSpec, tp: int, dp_shard: int,
                      params_per_device: float, param_bytes: int) -> float:
    """Pinned host bytes per device of DeepSpeed's NVMe swap buffers.

    Formula: parameters on NVMe: ``PARAM_SWAP_BUFFERS x param_swap_buffer_elements x param bytes``; optimizer on
        NVMe: ``OPTIMIZER_SWAP_BUFFERS x optimizer_sub_group_elements x 4`` (fp32).
    Source: DeepSpeed runtime/swap_tensor (module docstring).
    """
    out = 0.0
    if param_tier == "nvme":
        out += PARAM_SWAP_BUFFERS * param_swap_buffer_elements(spec, tp, dp_shard) * param_bytes
    if optimizer_tier == "nvme":
        out += OPTIMIZER_SWAP_BUFFERS * optimizer_sub_group_elements(params_per_device) * 4
    return out
