"""Pipeline schedules of the native torch backend: what ``torch.distributed.pipelining`` runs, and building it.

The plan names a schedule (``Strategy.schedule``); ``types.SCHEDULE_CLASSES`` maps it to the torch class that runs it.
Each rank holds ``vpp`` model chunks (``Strategy.virtual_stages``: loop placement, or the V placement of ZB-V) and
gets one ``PipelineStage`` per chunk, with ``stage_index`` its virtual stage index and ``num_stages = pp * vpp``.

What torch 2.13 accepts, measured on 2 and 4 gloo ranks for n_microbatches m = 1..9 (tiny stages, gradients compared
with one process) and read in ``torch/distributed/pipelining/schedules.py``; :func:`check_schedule_supported` refuses
the rest before any process starts:

- ``Schedule1F1B``: m >= pp (its constructor raises otherwise).
- ``ScheduleInterleaved1F1B`` and ``ScheduleInterleavedZeroBubble``: the micro-batches run in
  ``rounds = max(1, m // pp)`` rounds and the constructor raises unless ``m % rounds == 0`` (true for every m < 2 pp
  and every multiple of pp; m = 5 fails at pp = 2, m = 9 at pp = 4). Any m below pp runs (one round).
- ``ScheduleZBVZeroBubble``: exactly 2 chunks per rank (``types.check_schedule``), any m >= 1.

The two zero-bubble schedules split each backward into an input-gradient pass and a later weight-gradient pass
(``stage_backward_input`` / ``stage_backward_weight``), both ``torch.autograd.grad`` calls on one retained graph:

- a block under torch's selective activation checkpointing (the ``op`` policy) may be backpropagated once only
  ("Trying to backward an extra time ... selective activation checkpoint"), so those plans are refused; full
  checkpointing and the ``attention`` policy (a plain non-reentrant checkpoint of the SDPA call) were checked to give
  the unsplit gradients exactly;
- gradients are assigned, not accumulated through autograd's accumulate-grad nodes. DDP's all-reduce hooks never
  fire, and with FSDP2 the gradients came out wrong as well: llama-tiny at dp=2 pp=2 (4 gloo ranks) gave a step-0
  gradient norm of 5.43 under DDP (unreduced) and 2.53 (zero_bubble) / 2.50 (zbv) under FSDP2 ZeRO-3, against 4.96
  for one process, while interleaved 1F1B with DDP, ZeRO-1 or FSDP2 matched it. So these schedules are refused
  whenever gradients are reduced over data-parallel ranks (dp x cp > 1). Tensor parallelism with them matched
  (tp=2 pp=2, with and without sequence parallelism); post-accumulate-grad hooks do not fire either, so the trainer
  reduces sequence-parallel norm gradients after the step (``torch_native.reduce_partial_grads``; without it the
  gradient norm was off by 2e-5 relative).
"""

from __future__ import annotations

import torch
from torch import nn

from paraplan.errors import LaunchError
from paraplan.models.build import lm_loss
from paraplan.types import SCHEDULE_CLASSES, Plan

SPLIT_BACKWARD_SCHEDULES = ("zero_bubble", "zbv")


def check_schedule_supported(plan: Plan) -> None:
    """Refuse a pipeline schedule torch cannot run for this plan, saying what to change.

    Args:
        plan: the plan; ``strategy.grad_accum`` is the schedule's n_microbatches m.

    Raises:
        LaunchError: schedule 1f1b with m < pp; interleaved_1f1b or zero_bubble with ``m % max(1, m // pp) != 0``;
            zero_bubble or zbv with selective blocks under the ``op`` policy, or with dp x cp > 1.
    """
    st = plan.strategy
    if st.pp == 1:
        return
    m, pp, cls = st.grad_accum, st.pp, SCHEDULE_CLASSES[st.schedule]
    if st.schedule == "1f1b" and m < pp:
        raise LaunchError(
            f"1F1B needs at least as many micro-batches as stages; the plan has {m} micro-batches for pp={pp}. "
            "Re-plan with a smaller micro-batch or a larger global batch"
        )
    rounds = max(1, m // pp)
    if st.schedule in ("interleaved_1f1b", "zero_bubble") and m % rounds:
        raise LaunchError(
            f"torch's {cls} runs the micro-batches in max(1, m // pp) = {rounds} rounds and needs m a multiple of "
            f"that; the plan has m={m} micro-batches for pp={pp}. Re-plan with m below {2 * pp} or a multiple of "
            f"pp (another micro-batch size or global batch), or with schedule zbv or 1f1b"
        )
    if st.schedule not in SPLIT_BACKWARD_SCHEDULES:
        return
    if st.selective_policy == "op" and any(s.selective_blocks for s in st.stages):
        raise LaunchError(
            f"torch's {cls} runs each backward as an input-gradient and a weight-gradient pass, and torch's "
            "selective activation checkpointing (selective_policy op) allows one backward per block. Re-plan with "
            "selective_policy attention, full recomputation, or schedule interleaved_1f1b or 1f1b"
        )
    if st.dp * st.cp > 1:
        raise LaunchError(
            f"torch's {cls} computes weight gradients with torch.autograd.grad outside DDP's and FSDP2's gradient "
            f"reduction (on torch 2.13 the gradients of dp=2 runs came out wrong with both), so it cannot run with "
            f"dp={st.dp} x cp={st.cp} data-parallel ranks. Re-plan with dp=1 (and cp=1), or with schedule "
            "interleaved_1f1b or 1f1b"
        )


def build_schedule(
    modules: list[nn.Module], chunk_indices: list[int], plan: Plan, pp_group, device: torch.device,
    activation_dtype: torch.dtype,
):
    """One ``PipelineStage`` per local chunk and the plan's schedule over them.

    Static boundary shapes (tokens ``(mb, s_local)`` int64 into virtual stage 0, hidden ``(mb, s_local, h)`` between
    chunks, logits ``(mb, s_local, v)`` out of the last; ``s_local = seq_len / cp``, each context-parallel rank's
    sequence shard) avoid torch's shape inference, which runs a real forward and backward.

    Args:
        modules: this rank's chunk modules (data-parallel wrapped), in chunk order.
        chunk_indices: their virtual stage indices (model order), same length.
        plan: the plan (schedule, pp x vpp, micro-batch size, seq_len, cp, hidden, vocab).
        pp_group: the process group of this rank's pipeline.
        device: where activations live.
        activation_dtype: dtype of the hidden states and logits at chunk boundaries.

    Returns:
        The ``torch.distributed.pipelining`` schedule named by ``types.SCHEDULE_CLASSES[plan.strategy.schedule]``;
        its ``step`` scales gradients by 1 / n_microbatches (``lm_loss`` is a mean per micro-batch).
    """
    from torch.distributed import pipelining

    st = plan.strategy
    n_stages = st.pp * st.vpp
    mb, s = st.micro_batch_size, plan.train.seq_len // st.cp
    hidden, vocab = plan.model.hidden, plan.model.vocab
    assert hidden is not None and vocab is not None  # check_supported refuses pp > 1 without them
    stages = []
    for module, k in zip(modules, chunk_indices):
        if k == 0:
            inp = torch.empty((mb, s), dtype=torch.int64, device="meta")
        else:
            inp = torch.empty((mb, s, hidden), dtype=activation_dtype, device="meta", requires_grad=True)
        # requires_grad on the boundary metadata: it decides whether gradients are sent back across the boundary.
        out = torch.empty((mb, s, vocab if k == n_stages - 1 else hidden), dtype=activation_dtype, device="meta",
                          requires_grad=True)
        stages.append(pipelining.PipelineStage(module, k, n_stages, device, input_args=inp, output_args=out,
                                               group=pp_group))
    cls = getattr(pipelining, SCHEDULE_CLASSES[st.schedule])
    # lm_loss is a mean over the micro-batch; scale_grads divides the summed gradients by n_microbatches.
    first = stages[0] if cls is pipelining.Schedule1F1B else stages
    return cls(first, n_microbatches=st.grad_accum, loss_fn=lm_loss, scale_grads=True)
