"""Context parallelism in the native torch backend (CUDA only), after torchtitan.

torch's ``context_parallel`` (``torch.distributed.tensor.experimental``) shards the sequence of the listed buffers over
the ``cp`` mesh dimension in place (head-tail load balancing for causal attention: rank c keeps chunks c and 2cp-1-c
of 2cp) and replaces ``F.scaled_dot_product_attention`` with ring attention over the CUDA flash, memory-efficient and
cuDNN SDPA kernels; CPU SDPA ops have no such sharding strategy, so CPU plans with cp > 1 are refused.

As in torchtitan (``train.py`` and ``torchtitan/distributed/utils.py`` ``create_context_parallel_ctx`` /
``get_train_context``): forward and backward of a step (the whole pipeline schedule step when pp > 1) run inside
``context_parallel(cp_mesh, buffers=[tokens, targets, position ids of every chunk], buffer_seq_dims=[1, 1, 1...],
no_restore_buffers={tokens, targets})`` and ``sdpa_kernel([FLASH, EFFICIENT, CUDNN])`` (the math kernel has no ring
implementation); gradients are reduced, and FSDP2 shards parameters, over the flattened ``dp x cp`` mesh
(torchtitan's ``dp_shard_cp``): each cp rank's loss is the mean over its tokens, so averaging over ``dp x cp`` ranks
gives the global-batch mean. paraplan's Llama blocks compute rotary embeddings from position ids; those are a
buffer ``(1, seq_len)`` of every chunk module, sharded like the tokens so each token keeps its global position
(torchtitan shards its ``freqs_cis`` buffer the same way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

from paraplan.errors import LaunchError
from paraplan.types import Plan

# The SDPA kernels torch's ring attention shards (torchtitan's list); the math kernel has none.
CP_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
CP_ROTATE_METHOD = "allgather"  # torch's default: all-gather the K/V shards (torchtitan's default too)
_SDPA = torch._C._nn.scaled_dot_product_attention  # the kernel entry, also while context_parallel patches F's name


def check_context_parallel(plan: Plan) -> None:
    """Refuse context parallelism this backend cannot run.

    Raises:
        LaunchError: cp > 1 on a CPU cluster; on CUDA, a non-Llama model (its learned or factory positions are not
            sharded with the sequence), or a seq_len that 2 cp (x tp with sequence parallelism) does not divide.
    """
    st, spec = plan.strategy, plan.model
    if st.cp == 1:
        return
    if plan.cluster.device.kind != "cuda":
        raise LaunchError(
            f"context parallelism needs CUDA: torch's context_parallel (ring attention, "
            f"torch.distributed.tensor.experimental) shards only the CUDA flash / memory-efficient / cuDNN attention "
            f"kernels, and CPU SDPA has no sharding strategy. The plan has cp={st.cp} on {plan.cluster.name}; "
            "re-plan with cp=1 or on a GPU cluster"
        )
    if spec.family != "llama":
        raise LaunchError(
            f"cp={st.cp} for family '{spec.family}': the torch backend shards rotary position ids with the sequence, "
            "which only Llama blocks use. Re-plan with cp=1"
        )
    divisor = 2 * st.cp * (st.tp if st.sequence_parallel else 1)
    if plan.train.seq_len % divisor:
        raise LaunchError(
            f"cp={st.cp} splits each sequence into 2 cp = {2 * st.cp} load-balanced chunks"
            + (f", each sharded again over tp={st.tp} by sequence parallelism" if st.sequence_parallel else "")
            + f"; seq_len={plan.train.seq_len} must be a multiple of {divisor}. Re-plan with such a sequence length"
        )


class _ExpandKeyValueHeads(TorchFunctionMode):
    """Repeat grouped key/value heads up to the query heads before SDPA (transformers' ``repeat_kv``, done on the
    DTensors ``context_parallel`` hands the kernel), so the ring attention never relies on a kernel's
    ``enable_gqa`` support. Same numbers: each query head attends to its group's key/value head either way."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is _SDPA and kwargs.pop("enable_gqa", False):
            q, k, v, *rest = args
            groups = q.shape[-3] // k.shape[-3]
            b, h_kv, s, d = k.shape
            k, v = (t[:, :, None].expand(b, h_kv, groups, s, d).reshape(b, h_kv * groups, s, d) for t in (k, v))
            args = (q, k, v, *rest)
        return func(*args, **kwargs)


@contextlib.contextmanager
def context_parallel_step(cp_mesh, batch: list[torch.Tensor], position_ids: list[torch.Tensor]) -> Iterator[None]:
    """The context of one training step's forward and backward with cp > 1 (torchtitan's train context).

    Args:
        cp_mesh: the 1-D ``cp`` device mesh.
        batch: tokens and targets ``(n, seq_len)``, sharded in place to ``(n, seq_len / cp)`` and not restored.
        position_ids: every local chunk's ``(1, seq_len)`` position-id buffer, sharded like the batch for the step
            and restored after it.
    """
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.nn.attention import SDPBackend, sdpa_kernel

    set_rotate_method(CP_ROTATE_METHOD)
    buffers = [*batch, *position_ids]
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel([getattr(SDPBackend, name) for name in CP_SDPA_BACKENDS]))
        stack.enter_context(context_parallel(
            cp_mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers), no_restore_buffers=set(batch),
        ))
        stack.enter_context(_ExpandKeyValueHeads())
        yield
