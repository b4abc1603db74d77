"""Plan checks and the chain layout shared by both backends (``deepspeed``, ``torch_native``).

A plan's stages cut the layer chain ``[embed, block_0 .. block_{L-1}, head]`` (chain indices ``0 .. L+1``) into
contiguous ranges, one per pipeline rank, or (vpp > 1, or the ZB-V schedule) into ``pp * vpp`` model chunks placed on
the ranks as ``Strategy.virtual_stages`` says; a rank's blocks are then its chunks' blocks in chunk order.
Both backends refuse the same things here, with the same message, so a plan one refuses is not "fixed" by switching
to the other; what only one backend cannot do stays in that backend's module.
The planner keeps its own predicate for these rules (``planner.search.backend_rejection``: the planner may not
import backends); change both together.
"""

from __future__ import annotations

from paraplan.errors import LaunchError
from paraplan.types import ModelSpec, Plan, VirtualStage


def check_tp(spec: ModelSpec, tp: int) -> None:
    """Refuse tensor parallelism neither backend can shard.

    Both shard Llama blocks Megatron-style (q/k/v and gate/up by output columns, o/down by input rows), so each rank
    must hold whole attention heads, whole key/value heads and an equal slice of the MLP.

    Args:
        spec: the plan's model.
        tp: the tensor-parallel degree (> 1).

    Raises:
        LaunchError: a non-Llama model, a Mixture-of-Experts model (neither plan covers routers, fused experts or
            latent attention), or a tp that does not divide n_heads, n_kv_heads or ffn_hidden.
    """
    if spec.moe is not None:
        raise LaunchError(
            f"tp={tp} for the Mixture-of-Experts model {spec.name}: neither backend has a tensor-parallel plan for "
            "MoE blocks (router, fused experts, latent attention). Re-plan with --strategy tp=1 (the torch backend "
            "splits the experts with ep instead)"
        )
    if spec.family != "llama":
        why = (
            "GPT-2 blocks fuse q, k, v into one c_attn matmul" if spec.family == "gpt"
            else "a factory model's layers are unknown to them"
        )
        raise LaunchError(
            f"tp={tp} for family '{spec.family}': both backends have a tensor-parallel plan only for Llama blocks "
            f"({why}). Re-plan with --strategy tp=1"
        )
    dims = {"n_heads": spec.n_heads, "n_kv_heads": spec.n_kv_heads, "ffn_hidden": spec.ffn_hidden}
    bad = [f"{name}={size}" for name, size in dims.items() if size is None or size % tp]
    if bad:
        raise LaunchError(
            f"tp={tp} must divide {', '.join(bad)} of {spec.name} (each rank holds whole heads and an equal MLP "
            "slice); re-plan with a tp that divides them"
        )


def check_tied_embeddings(plan: Plan) -> None:
    """Refuse tied input/output embeddings split over pipeline stages.

    Raises:
        LaunchError: the model ties its embeddings and pp > 1 (neither backend synchronizes the tied weights; in
            DeepSpeed that needs ``TiedLayerSpec`` layers).
    """
    pp, spec = plan.strategy.pp, plan.model
    if pp > 1 and spec.tied_embeddings:
        raise LaunchError(
            f"{spec.name} ties its embedding and LM head, which pp={pp} puts on different stages; neither backend "
            "synchronizes tied weights across stages. Re-plan with --strategy pp=1"
        )


def check_stage_tiling(plan: Plan) -> None:
    """Refuse stages that do not cover the chain ``[embed, blocks..., head]`` exactly once, in order.

    With vpp = 1 each stage is one contiguous range and the ranges must follow each other. With model chunks
    (vpp > 1, or the ZB-V schedule) each rank's ``first_layer``/``last_layer`` must be the span that
    :meth:`Strategy.virtual_stages` derives from its ``chunk_blocks`` in the schedule's placement (loop or V).

    Raises:
        LaunchError: a gap, an overlap or an empty stage or chunk, (when the spec gives ``n_layers``) a last stage
            that does not end at the head, chain index ``n_layers + 1``, a stage whose ``n_blocks`` (what the
            planner priced; ``Plan`` checks their sum and ``recompute_blocks`` against it) differs from the blocks
            between its boundaries, or chunk boundaries that differ from those its ``chunk_blocks`` imply.
    """
    st = plan.strategy
    if st.vpp == 1:
        _check_contiguous_stages(plan)
        return
    for stage in st.stages:
        if stage.chunk_blocks is None or len(stage.chunk_blocks) != st.vpp or sum(stage.chunk_blocks) != stage.n_blocks:
            raise LaunchError(
                f"plan stage {stage.index} has chunk_blocks {stage.chunk_blocks} for vpp={st.vpp} and "
                f"{stage.n_blocks} blocks; they must be vpp counts summing to n_blocks. Re-plan"
            )
    virtual = st.virtual_stages()
    for vs in virtual:
        if vs.last_layer < vs.first_layer:
            raise LaunchError(
                f"plan virtual stage {vs.index} (rank {vs.rank}, chunk {vs.chunk}) holds no layer; every model "
                "chunk needs at least one block (or the embedding / head). Re-plan"
            )
    for stage in st.stages:
        mine = [vs for vs in virtual if vs.rank == stage.index]
        span = (mine[0].first_layer, mine[-1].last_layer)
        if (stage.first_layer, stage.last_layer) != span:
            raise LaunchError(
                f"plan stage {stage.index} says chain layers {stage.first_layer}..{stage.last_layer} but its "
                f"chunk_blocks {stage.chunk_blocks} in the {st.schedule} placement give {span[0]}..{span[1]}; "
                "re-plan instead of editing the stages"
            )
    n_layers, end = plan.model.n_layers, virtual[-1].last_layer
    if n_layers is not None and end != n_layers + 1:
        raise LaunchError(
            f"plan chunks end at chain layer {end} but {plan.model.name} has {n_layers} blocks "
            f"(head at {n_layers + 1}). Re-plan"
        )


def _check_contiguous_stages(plan: Plan) -> None:
    """vpp = 1: the stages' ranges follow each other from the embedding to the head."""
    expected = 0
    for stage in plan.strategy.stages:
        if stage.first_layer != expected or stage.last_layer < stage.first_layer:
            raise LaunchError(
                f"plan stage {stage.index} covers chain layers {stage.first_layer}..{stage.last_layer} but should "
                f"start at layer {expected}; stages must tile the chain [embed, blocks..., head] in order. Re-plan"
            )
        expected = stage.last_layer + 1
    n_layers = plan.model.n_layers
    if n_layers is not None and expected != n_layers + 2:
        raise LaunchError(
            f"plan stages end at chain layer {expected - 1} but {plan.model.name} has {n_layers} blocks "
            f"(head at {n_layers + 1}). Re-plan"
        )
    for stage, blocks in zip(plan.strategy.stages, stage_block_layers(plan)):
        if len(blocks) != stage.n_blocks:  # the planner priced n_blocks; the backends run the boundaries
            raise LaunchError(
                f"plan stage {stage.index} says {stage.n_blocks} blocks but its chain layers "
                f"{stage.first_layer}..{stage.last_layer} hold {len(blocks)}; re-plan instead of editing the stages"
            )


def chunk_layers(plan: Plan) -> list[VirtualStage]:
    """Every model chunk (virtual stage) in model order with its rank and chain range.

    With vpp = 1 these are the stages' own boundaries (which :func:`check_stage_tiling` checked, and which the
    backends run: the boundaries, not the block counts, are what a vpp-1 plan cuts at); with vpp > 1 they come
    from :meth:`Strategy.virtual_stages` (the ranks' ``chunk_blocks`` in the schedule's placement).
    """
    st = plan.strategy
    if st.vpp == 1:
        return [VirtualStage(s.index, s.index, 0, s.first_layer, s.last_layer, s.n_blocks) for s in st.stages]
    return st.virtual_stages()


def chunk_block_layers(plan: Plan) -> list[range]:
    """Chain indices of the blocks (chain layers ``1 .. L``) of each model chunk, in model order.

    Assumes :func:`check_stage_tiling` passed, so the last chunk ends at the head, chain index ``L + 1``.
    """
    chunks = chunk_layers(plan)
    n_blocks = chunks[-1].last_layer - 1
    return [range(max(c.first_layer, 1), min(c.last_layer, n_blocks) + 1) for c in chunks]


def stage_block_layers(plan: Plan) -> list[list[int]]:
    """Chain indices of the blocks of each pipeline rank: its chunks' blocks in chunk order (with vpp = 1 its one
    contiguous range, derived from the stage boundaries alone; :func:`check_stage_tiling` checks
    ``StagePlan.n_blocks``, the planner's count, against them).
    """
    per_rank: list[list[int]] = [[] for _ in plan.strategy.stages]
    for chunk, blocks in zip(chunk_layers(plan), chunk_block_layers(plan)):
        per_rank[chunk.rank].extend(blocks)
    return per_rank


def checkpointed_layers(plan: Plan) -> list[int]:
    """Chain indices (ascending) of the blocks run with full activation checkpointing: the first
    ``recompute_blocks`` blocks of each rank in its chunk order (blocks are chain layers ``1..L``; layer 0 is the
    embedding and ``L+1`` the head)."""
    stages = plan.strategy.stages
    return sorted(
        c for stage, blocks in zip(stages, stage_block_layers(plan)) for c in blocks[: stage.recompute_blocks]
    )


def selective_layers(plan: Plan) -> list[int]:
    """Chain indices (ascending) of the blocks run with selective recomputation (``Strategy.selective_policy``):
    on each rank the ``selective_blocks`` blocks after its ``recompute_blocks`` fully recomputed ones, in its chunk
    order; none without ``selective_recompute``."""
    if not plan.strategy.selective_recompute:
        return []
    return sorted(
        c for stage, blocks in zip(plan.strategy.stages, stage_block_layers(plan))
        for c in blocks[stage.recompute_blocks: stage.recompute_blocks + stage.selective_blocks]
    )


def paged_layers(plan: Plan) -> list[int]:
    """Chain indices (ascending) of the blocks whose saved activations are paged out (``StagePlan.offload_blocks``):
    on each rank the ``offload_blocks`` blocks after its fully and selectively recomputed ones, in its chunk order."""
    out = []
    for stage, blocks in zip(plan.strategy.stages, stage_block_layers(plan)):
        start = stage.recompute_blocks + (stage.selective_blocks if plan.strategy.selective_recompute else 0)
        out.extend(blocks[start: start + stage.offload_blocks])
    return sorted(out)
