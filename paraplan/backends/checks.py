"""Plan checks and the chain layout shared by both backends (``deepspeed``, ``torch_native``).

A plan's stages cut the layer chain ``[embed, block_0 .. block_{L-1}, head]`` (chain indices ``0 .. L+1``) into
contiguous ranges. Both backends refuse the same things here, with the same message, so a plan one refuses is not
"fixed" by switching to the other; what only one backend cannot do stays in that backend's module.
The planner keeps its own predicate for these rules (``planner.search.backend_rejection``: the planner may not
import backends); change both together.
"""

from __future__ import annotations

from paraplan.errors import LaunchError
from paraplan.types import ModelSpec, Plan


def check_tp(spec: ModelSpec, tp: int) -> None:
    """Refuse tensor parallelism neither backend can shard.

    Both shard Llama blocks Megatron-style (q/k/v and gate/up by output columns, o/down by input rows), so each rank
    must hold whole attention heads, whole key/value heads and an equal slice of the MLP.

    Args:
        spec: the plan's model.
        tp: the tensor-parallel degree (> 1).

    Raises:
        LaunchError: a non-Llama model, or a tp that does not divide n_heads, n_kv_heads or ffn_hidden.
    """
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

    Raises:
        LaunchError: a gap, an overlap or an empty stage, (when the spec gives ``n_layers``) a last stage that
            does not end at the head, chain index ``n_layers + 1``, or a stage whose ``n_blocks`` (what the planner
            priced; ``Plan`` checks their sum and ``recompute_blocks`` against it) differs from the blocks between
            its boundaries.
    """
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


def stage_block_layers(plan: Plan) -> list[range]:
    """Chain indices of the blocks of each stage (blocks are chain layers ``1 .. L``), derived from the stage
    boundaries alone (:func:`check_stage_tiling` checks ``StagePlan.n_blocks``, the planner's count, against them).

    Assumes :func:`check_stage_tiling` passed, so the last stage ends at the head, chain index ``L + 1``.
    """
    stages = plan.strategy.stages
    n_blocks = stages[-1].last_layer - 1
    return [range(max(s.first_layer, 1), min(s.last_layer, n_blocks) + 1) for s in stages]


def checkpointed_layers(plan: Plan) -> list[int]:
    """Chain indices of the blocks run with full activation checkpointing: the first ``recompute_blocks`` blocks of
    each stage (blocks are chain layers ``1..L``; layer 0 is the embedding and ``L+1`` the head)."""
    stages = plan.strategy.stages
    return [c for stage, blocks in zip(stages, stage_block_layers(plan)) for c in blocks[: stage.recompute_blocks]]


def selective_layers(plan: Plan) -> list[int]:
    """Chain indices of the blocks run with selective checkpointing: with ``selective_recompute``, every block
    that :func:`checkpointed_layers` does not recompute in full; otherwise none."""
    if not plan.strategy.selective_recompute:
        return []
    stages = plan.strategy.stages
    return [c for stage, blocks in zip(stages, stage_block_layers(plan)) for c in blocks[stage.recompute_blocks:]]
