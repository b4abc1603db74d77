"""Native torch backend without processes: the recipe in torch_parallel.json, refusals, and single-process numerics.

Expected recipes are derived by hand from the plan (llama-tiny: 6 blocks, chain ``[embed, block_0..5, head]`` =
chain indices 0..7, 6 heads, 2 key/value heads, MLP width 1024; global batch 8, micro-batch 2 unless stated).
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import make_plan, retained_bytes


from paraplan.backends import train_common
from paraplan.backends.torch_native import (
    CONFIG_FILE, apply_ac, apply_paging, build_stage_module, build_torch_config, emit_torch, load_torch_config,
    torch_offload_rejection,
)
from paraplan.errors import LaunchError
from paraplan.models.build import build_model


def test_dp2_zero0_is_ddp_over_whole_chain():
    cfg = build_torch_config(make_plan(dp=2))
    assert cfg.mesh.shape == [1, 2, 1, 1] and cfg.mesh.dim_names == ["pp", "dp", "cp", "tp"]
    assert cfg.data_parallel.wrapper == "DDP" and cfg.data_parallel.reshard_after_forward is None
    assert cfg.tensor_parallel.plan == {}
    # 8 sequences / (dp 2 x micro-batch 2) = 2 micro-batches per rank, no pipeline schedule.
    assert cfg.pipeline.schedule is None and cfg.pipeline.n_microbatches == 2
    [stage] = cfg.pipeline.stages
    assert (stage.first_layer, stage.last_layer, stage.blocks) == (0, 7, [0, 1, 2, 3, 4, 5])
    assert cfg.checkpointed_blocks == []
    assert cfg.mixed_precision.mechanism == "none"


def test_single_process_has_no_wrapper():
    cfg = build_torch_config(make_plan(cluster="cpu:1", dp=1))
    assert cfg.mesh.shape == [1, 1, 1, 1]
    assert cfg.data_parallel.wrapper == "none"
    assert cfg.pipeline.n_microbatches == 4  # 8 / (1 x 2)


@pytest.mark.parametrize(
    ("zero", "wrapper", "reshard"),
    [
        (0, "DDP", None),
        (1, "DDP+ZeroRedundancyOptimizer", None),  # ZeRO-1 shards only optimizer states
        (2, "FSDP2", False),  # ZeRO-2: gradients sharded, parameters stay gathered until backward
        (3, "FSDP2", True),  # ZeRO-3: parameters freed after forward, gathered again in backward
    ],
)
def test_zero_stage_picks_wrapper(zero, wrapper, reshard):
    dpc = build_torch_config(make_plan(dp=2, zero_stage=zero)).data_parallel
    assert (dpc.zero_stage, dpc.wrapper, dpc.reshard_after_forward, dpc.cpu_offload) == (zero, wrapper, reshard, False)


def test_tp2_shards_llama_projections_megatron_style():
    cfg = build_torch_config(make_plan(tp=2))
    assert cfg.mesh.shape == [1, 1, 1, 2]
    col, row = "ColwiseParallel", "RowwiseParallel"
    assert cfg.tensor_parallel.plan == {
        "layer.self_attn.q_proj": col, "layer.self_attn.k_proj": col, "layer.self_attn.v_proj": col,
        "layer.self_attn.o_proj": row,
        "layer.mlp.gate_proj": col, "layer.mlp.up_proj": col, "layer.mlp.down_proj": row,
    }
    assert cfg.tensor_parallel.use_local_output


def test_pp2_stages_schedule_and_checkpointed_blocks():
    cfg = build_torch_config(make_plan(pp=2, recompute_blocks=2))
    assert cfg.mesh.shape == [2, 1, 1, 1]
    assert cfg.pipeline.schedule == "Schedule1F1B" and cfg.pipeline.n_microbatches == 4  # 8 / (1 x 2)
    assert cfg.pipeline.chunks_per_rank == 1 and [(s.rank, s.chunk) for s in cfg.pipeline.stages] == [(0, 0), (1, 0)]
    # 6 blocks over 2 stages: embed + blocks 0-2 (chain 0..3), blocks 3-5 + head (chain 4..7).
    s0, s1 = cfg.pipeline.stages
    assert (s0.first_layer, s0.last_layer, s0.blocks) == (0, 3, [0, 1, 2])
    assert (s1.first_layer, s1.last_layer, s1.blocks) == (4, 7, [3, 4, 5])
    # The first 2 blocks of each stage are checkpointed.
    assert cfg.checkpointed_blocks == [0, 1, 3, 4]


def _chunks(cfg) -> list[tuple[int, int, int, int, list[int]]]:
    return [(c.rank, c.chunk, c.first_layer, c.last_layer, c.blocks) for c in cfg.pipeline.stages]


def test_interleaved_chunks_follow_the_loop_placement():
    # pp=2 over 6 blocks: 3 per rank, split over vpp=2 chunks as [2, 1]. Loop placement (virtual stage k on rank
    # k mod 2): v0 = rank 0 chunk 0 = embed + blocks 0-1 (chain 0..2), v1 = rank 1 chunk 0 = blocks 2-3 (chain
    # 3..4), v2 = rank 0 chunk 1 = block 4 (chain 5), v3 = rank 1 chunk 1 = block 5 + head (chain 6..7).
    cfg = build_torch_config(make_plan(pp=2, vpp=2))
    assert cfg.pipeline.schedule == "ScheduleInterleaved1F1B" and cfg.pipeline.chunks_per_rank == 2
    assert [c.index for c in cfg.pipeline.stages] == [0, 1, 2, 3]
    assert _chunks(cfg) == [(0, 0, 0, 2, [0, 1]), (1, 0, 3, 4, [2, 3]), (0, 1, 5, 5, [4]), (1, 1, 6, 7, [5])]
    zb = build_torch_config(make_plan(pp=2, vpp=2, schedule="zero_bubble"))
    assert zb.pipeline.schedule == "ScheduleInterleavedZeroBubble" and _chunks(zb) == _chunks(cfg)


def test_zbv_chunks_follow_the_v_placement():
    # V placement: v0 on rank 0, v1 on rank 1, v2 back on rank 1, v3 on rank 0 (rank 0 holds embedding and head).
    cfg = build_torch_config(make_plan(pp=2, vpp=2, schedule="zbv"))
    assert cfg.pipeline.schedule == "ScheduleZBVZeroBubble"
    assert _chunks(cfg) == [(0, 0, 0, 2, [0, 1]), (1, 0, 3, 4, [2, 3]), (1, 1, 5, 5, [4]), (0, 1, 6, 7, [5])]


@pytest.mark.parametrize(
    ("kwargs", "full", "selective"),
    [
        # A rank's blocks in chunk order: rank 0 = 0, 1 | 4 and rank 1 = 2, 3 | 5 (loop placement, chunks [2, 1]).
        (dict(vpp=2, recompute_blocks=1), [0, 2], [1, 3, 4, 5]),
        (dict(vpp=2, recompute_blocks=2), [0, 1, 2, 3], [4, 5]),
        # V placement: rank 0 = 0, 1 | 5 and rank 1 = 2, 3 | 4.
        (dict(vpp=2, schedule="zbv", recompute_blocks=1), [0, 2], [1, 3, 4, 5]),
        (dict(vpp=2, schedule="zbv", recompute_blocks=3), [0, 1, 2, 3, 4, 5], []),
    ],
)
def test_recomputed_blocks_are_counted_in_each_ranks_chunk_order(kwargs, full, selective):
    cfg = build_torch_config(make_plan(pp=2, selective_recompute=True, **kwargs))
    assert cfg.checkpointed_blocks == full and cfg.selective_checkpointed_blocks == selective


def test_selective_blocks_beyond_the_plans_count_run_plainly():
    # selective_blocks = 1 on each stage: of blocks 0-2 (stage 0) block 0 is full, block 1 selective, block 2 plain.
    plan = make_plan(pp=2, recompute_blocks=1, selective_recompute=True)
    st = plan.strategy
    stages = [s.model_copy(update={"selective_blocks": 1}) for s in st.stages]
    plan = plan.model_copy(update={"strategy": st.model_copy(update={"stages": stages})})
    cfg = build_torch_config(plan)
    assert cfg.checkpointed_blocks == [0, 3] and cfg.selective_checkpointed_blocks == [1, 4]


def _with_stages(plan, **updates):
    """``plan`` with every stage's fields replaced (skipping validation, as a hand edit of plan.json would not)."""
    st = plan.strategy
    stages = [s.model_copy(update={k: v[s.index] for k, v in updates.items()}) for s in st.stages]
    return plan.model_copy(update={"strategy": st.model_copy(update={"stages": stages})})


def test_chunk_tiling_is_checked_against_the_chunk_counts():
    plan = make_plan(pp=2, vpp=2)
    # Rank 0's span is chain 0..5 (chunks 0..2 and 5); a hand edit to 0..4 disagrees with its chunk_blocks [2, 1].
    with pytest.raises(LaunchError, match="says chain layers 0..4 but its chunk_blocks"):
        build_torch_config(_with_stages(plan, last_layer=[4, 7]))
    # chunk_blocks that do not sum to the stage's blocks.
    with pytest.raises(LaunchError, match=r"chunk_blocks \[2, 2\] for vpp=2 and 3 blocks"):
        build_torch_config(_with_stages(plan, chunk_blocks=[[2, 2], [2, 1]]))
    # A middle chunk with no block is an empty pipeline stage: rank 0 as [3, 0] leaves virtual stage 2 empty.
    with pytest.raises(LaunchError, match="virtual stage 2 .rank 0, chunk 1. holds no layer"):
        build_torch_config(_with_stages(plan, chunk_blocks=[[3, 0], [2, 1]], last_layer=[4, 7]))


def test_sequence_parallel_and_selective_recompute_reach_the_recipe():
    plain = build_torch_config(make_plan(tp=2))
    assert not plain.tensor_parallel.sequence_parallel and plain.selective_checkpointed_blocks == []
    cfg = build_torch_config(make_plan(tp=2, sequence_parallel=True))
    assert cfg.tensor_parallel.sequence_parallel
    assert cfg.tensor_parallel.plan == plain.tensor_parallel.plan  # same projections, sharded the same way
    # pp=2 stages hold blocks 0-2 and 3-5; the first of each is fully recomputed, every other one selectively.
    cfg = build_torch_config(make_plan(pp=2, recompute_blocks=1, selective_recompute=True))
    assert cfg.checkpointed_blocks == [0, 3]
    assert cfg.selective_checkpointed_blocks == [1, 2, 4, 5]
    # Every block recomputed in full leaves none for selective recomputation.
    assert build_torch_config(make_plan(recompute_blocks=6, selective_recompute=True)).selective_checkpointed_blocks == []


def test_bf16_uses_autocast_with_ddp_and_fsdp2_policy_with_fsdp():
    ddp = build_torch_config(make_plan(dp=2, dtype="bf16")).mixed_precision
    assert (ddp.mechanism, ddp.param_dtype, ddp.reduce_dtype) == ("autocast", "fp32", "fp32")
    fsdp_cfg = build_torch_config(make_plan(dp=2, zero_stage=3, dtype="bf16"))
    mp = fsdp_cfg.mixed_precision
    assert (mp.mechanism, mp.param_dtype, mp.reduce_dtype) == ("fsdp2", "bf16", "fp32")
    # Stage boundaries carry the dtype the blocks compute their residual stream in.
    assert fsdp_cfg.pipeline.activation_dtype == "bf16"
    assert build_torch_config(make_plan(dp=2, dtype="bf16")).pipeline.activation_dtype == "fp32"


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        (dict(dp=2, zero_stage=2, offload_optimizer=True), "--backend deepspeed"),
        # FSDP2's CPUOffloadPolicy would move parameters and gradients too, which the plan never priced.
        (dict(cluster="2xH100-80GB", dp=2, zero_stage=1, offload_optimizer=True), "no optimizer-only offload"),
        (dict(dp=2, dtype="fp16"), "bf16"),
        (dict(model="gpt3-175b", tp=2), "fuse q, k, v"),
        (dict(cluster="cpu:4", tp=4), "n_kv_heads=2"),  # 6 heads, 2 kv heads: 4 divides neither
        (dict(pp=2, micro_batch_size=8), "1 micro-batches for pp=2"),  # 8 / 8 = 1 micro-batch < 2 stages
        # 10 / 2 = 5 micro-batches: max(1, 5 // 2) = 2 rounds, and 5 is not a multiple of 2.
        (dict(pp=2, vpp=2, global_batch=10), "ScheduleInterleaved1F1B runs the micro-batches in max.1, m // pp. = 2"),
        (dict(pp=2, schedule="zero_bubble", global_batch=14), "= 3 rounds"),  # 7 micro-batches, 7 // 2 = 3
        # Split backward (input, then weight gradients) twice through one selectively checkpointed region.
        (dict(pp=2, schedule="zbv", vpp=2, selective_recompute=True, selective_policy="op"), "selective_policy op"),
        (dict(cluster="cpu:4", dp=2, pp=2, schedule="zero_bubble", zero_stage=3), "dp=2 x cp=1 data-parallel"),
        (dict(cp=2), "context parallelism needs CUDA"),
        (dict(cluster="2xH100-80GB", model="gpt3-175b", cp=2), "only Llama blocks use"),
        (dict(cluster="2xH100-80GB", cp=2, seq_len=66), "seq_len=66 must be a multiple of 4"),
        (dict(model="gpt3-175b", pp=2), "ties its embedding"),
        (dict(model="gpt3-175b", tp=2, sequence_parallel=True), "sequence-parallel plan covers Llama blocks only"),
        (dict(tp=2, sequence_parallel=True, seq_len=63), "must divide seq_len=63"),
    ],
)
def test_unsupported_plans_say_what_to_change(kwargs, says):
    with pytest.raises(LaunchError, match=says):
        build_torch_config(make_plan(**kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(pp=2, schedule="zbv", vpp=2, global_batch=2),  # ZB-V runs any micro-batch count, even 1 < pp
        dict(pp=2, schedule="zbv", vpp=2, global_batch=10),  # 5 micro-batches
        dict(pp=2, vpp=2, global_batch=2),  # interleaved: 1 micro-batch, one round
        dict(pp=2, vpp=2, global_batch=12),  # 6 micro-batches: 3 rounds of 2
        dict(pp=2, schedule="zbv", vpp=2, selective_recompute=True),  # attention policy: a plain nested checkpoint
        dict(cluster="cpu:4", dp=2, pp=2, vpp=2),  # interleaved 1F1B under DDP
    ],
)
def test_schedules_accept_what_torch_runs(kwargs):
    build_torch_config(make_plan(**kwargs))


def test_context_parallel_recipe_on_gpus():
    cfg = build_torch_config(make_plan(cluster="2xH100-80GB", cp=2))
    assert cfg.mesh.shape == [1, 1, 2, 1]
    # Gradients are averaged over dp x cp (torchtitan's dp_shard_cp): with dp=1 that is still 2 ranks, so DDP.
    assert cfg.data_parallel.wrapper == "DDP" and cfg.data_parallel.mesh_dims == ["dp", "cp"]
    assert cfg.context_parallel.degree == 2
    assert cfg.context_parallel.sdpa_backends == ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]
    plain = build_torch_config(make_plan(cluster="2xH100-80GB", dp=2))
    assert plain.context_parallel.degree == 1 and plain.data_parallel.mesh_dims == ["dp"]


def test_stage_module_hands_position_ids_to_its_blocks(tiny_chain):
    cfg = build_torch_config(make_plan(cluster="2xH100-80GB", cp=2))
    stage = build_stage_module(tiny_chain, cfg.pipeline.stages[0], cfg)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    assert stage.position_ids.tolist() == [list(range(64))]
    with torch.no_grad():
        torch.testing.assert_close(stage(tokens), tiny_chain(tokens), rtol=0, atol=0)  # positions 0..s-1 as default
        stage.position_ids += 5  # a sequence shard that starts at token 5: rotary sees other angles
        assert not torch.allclose(stage(tokens), tiny_chain(tokens))


def test_emit_writes_config_file(tmp_path):
    plan = make_plan(pp=2, recompute_blocks=1)
    paths = emit_torch(plan, tmp_path)
    assert paths == [tmp_path / CONFIG_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE]  # no temporary file left behind
    data = json.loads(paths[0].read_text())
    assert data["schema_version"] == 1
    assert data["checkpointed_blocks"] == [0, 3]
    assert load_torch_config(tmp_path, plan) == build_torch_config(plan)


def test_edited_or_missing_config_is_refused(tmp_path):
    plan = make_plan(dp=2)
    with pytest.raises(LaunchError, match=f"{CONFIG_FILE} does not exist; write the run directory"):
        load_torch_config(tmp_path, plan)
    emit_torch(plan, tmp_path)
    path = tmp_path / CONFIG_FILE
    data = json.loads(path.read_text())
    data["checkpointed_blocks"] = [0]
    path.write_text(json.dumps(data))
    with pytest.raises(LaunchError, match="does not match plan.json"):
        load_torch_config(tmp_path, plan)
    del data["mesh"]
    path.write_text(json.dumps(data))
    with pytest.raises(LaunchError, match="mesh"):  # a file that is not a recipe at all names the missing field
        load_torch_config(tmp_path, plan)


@pytest.fixture(scope="module")
def tiny_chain():
    return build_model(make_plan().model, seed=0)


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_pipeline_stages_compose_to_the_whole_chain(tiny_chain):
    plan = make_plan(pp=2)
    cfg = build_torch_config(plan)
    s0, s1 = (build_stage_module(tiny_chain, s, cfg) for s in cfg.pipeline.stages)
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(s1(s0(tokens)), tiny_chain(tokens), rtol=0, atol=0)


def test_checkpointed_block_recomputes_and_matches_plain_block(tiny_chain):
    cfg = build_torch_config(make_plan(cluster="cpu:1", recompute_blocks=2))
    plain = build_stage_module(copy.deepcopy(tiny_chain), cfg.pipeline.stages[0], cfg)
    ckpt = build_stage_module(copy.deepcopy(tiny_chain), cfg.pipeline.stages[0], cfg)
    apply_ac(ckpt, cfg.checkpointed_blocks)
    assert cfg.checkpointed_blocks == [0, 1]

    # Count forward executions by patching the instances' forward (checkpoint recomputation skips module hooks).
    calls = {"plain": 0, "ckpt": 0}
    for key, block in (("plain", plain.block(0)), ("ckpt", ckpt.block(0)._checkpoint_wrapped_module)):
        def counted(x, _forward=block.forward, _key=key):
            calls[_key] += 1
            return _forward(x)
        block.forward = counted

    tokens = _tokens()
    out_plain, out_ckpt = plain(tokens), ckpt(tokens)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    # Recomputation replays the same ops on the same inputs, so outputs and gradients are bit-identical.
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    grads_plain = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in plain.named_parameters()}
    grads_ckpt = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in ckpt.named_parameters()}
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0, msg=name)
    # Block 0 ran once without checkpointing; with it, once in forward and once more in backward.
    assert calls == {"plain": 1, "ckpt": 2}
    # Only the plan's blocks are wrapped: block 2 is the plain LlamaBlock.
    assert type(ckpt.block(2)) is type(plain.block(2))


def _retained(block, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Forward ``block`` (plain or wrapped for recomputation) on ``x``; bytes kept for backward, output."""
    return retained_bytes(block, x)


# llama-tiny block at b=2, s=64, fp32: h=384, 6 heads of d=64, 2 key/value heads (k, v are 128 wide), MLP 1024.
B, S, H, HEADS, D, KV, F = 2, 64, 384, 6, 64, 128, 1024
FP32 = 4
SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _packed_shapes(module, x: torch.Tensor) -> Counter:
    """Shapes of the tensors autograd saves (``saved_tensors_hooks`` pack calls) in one forward of ``module``."""
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return Counter(shapes)


class _CountOp(TorchDispatchMode):
    def __init__(self, op) -> None:
        super().__init__()
        self.op, self.calls = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is self.op
        return func(*args, **(kwargs or {}))


def _forward_backward(module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Output, input gradient, and how often the SDPA kernel ran in forward + backward."""
    counter = _CountOp(SDPA_CPU)
    with counter:
        y = module(x)
        (gx,) = torch.autograd.grad(y.square().mean(), x)
    return y, gx, counter.calls


def test_attention_policy_drops_only_what_the_attention_core_saves(tiny_chain):
    """Korthikanti et al. sec. 4.3 on an SDPA block. By hand: the SDPA op saves q, k, v, its output and its
    log-sum-exp for backward; recomputing it keeps q, k, v (the recomputation's inputs) and drops output and
    log-sum-exp, everything else autograd keeps as without recomputation. In bytes only the log-sum-exp
    (b, heads, s) goes: the SDPA output's storage is also the o projection's saved input (transformers' transpose +
    contiguous is a no-op on the CPU kernel's (b, s, heads, d) layout)."""
    block = copy.deepcopy(tiny_chain.blocks[0])
    x = torch.randn(B, S, H, requires_grad=True)
    selective = train_common.selective_checkpoint(copy.deepcopy(block), "attention")
    plain_saved, sel_saved = _packed_shapes(block, x), _packed_shapes(selective, x)
    assert plain_saved - sel_saved == Counter({(B, HEADS, S, D): 1, (B, HEADS, S): 1})  # output, log-sum-exp
    assert sel_saved - plain_saved == Counter()  # q, k, v now saved as the recomputation's inputs
    kept_plain, _ = _retained(block, x)
    kept_sel, _ = _retained(selective, x)
    assert kept_plain - kept_sel == B * HEADS * S * FP32
    # The attention kernel runs again in backward, and the numbers are the plain block's bit for bit.
    y_plain, g_plain, calls_plain = _forward_backward(block, x)
    y_sel, g_sel, calls_sel = _forward_backward(selective, x)
    assert (calls_plain, calls_sel) == (1, 2)
    torch.testing.assert_close(y_sel, y_plain, rtol=0, atol=0)
    torch.testing.assert_close(g_sel, g_plain, rtol=0, atol=0)


def test_op_policy_keeps_every_other_matmul_and_the_attention_output(tiny_chain):
    """torchtitan's op policy on a Llama block. By hand, the block's matmuls in forward order are q, k, v, o, gate,
    up, down (7 aten.mm); the policy keeps the outputs of the odd ones (q (b s, h), v (b s, kv), gate (b s, f),
    down (b s, h)) and of the SDPA op (output (b, heads, s, d) and log-sum-exp (b, heads, s)), and recomputes the
    rest from the block input, the only tensor autograd itself saves."""
    block = copy.deepcopy(tiny_chain.blocks[0])
    x = torch.randn(B, S, H, requires_grad=True)
    selective = train_common.selective_checkpoint(copy.deepcopy(block), "op")
    assert _packed_shapes(selective, x) == Counter({(B, S, H): 1})
    kept, _ = _retained(selective, x)
    assert kept == (B * S * (H + KV + F + H) + B * S * H + B * HEADS * S) * FP32
    kept_plain, _ = _retained(block, x)
    assert kept < kept_plain / 3  # 1.1 MiB against 3.5 MiB
    # The attention output is kept, so the kernel is not run again; the numbers are the plain block's.
    y_plain, g_plain, _ = _forward_backward(block, x)
    y_sel, g_sel, calls = _forward_backward(selective, x)
    assert calls == 1
    torch.testing.assert_close(y_sel, y_plain, rtol=0, atol=0)
    torch.testing.assert_close(g_sel, g_plain, rtol=0, atol=0)


def test_unknown_selective_policy_is_refused(tiny_chain):
    with pytest.raises(ValueError, match="use one of attention, op"):
        train_common.selective_checkpoint(tiny_chain.blocks[0], "matmul")


@pytest.mark.parametrize("policy", ["attention", "op"])
def test_apply_ac_wraps_full_and_selective_blocks(tiny_chain, policy):
    cfg = build_torch_config(make_plan(cluster="cpu:1", recompute_blocks=2, selective_recompute=True,
                                       selective_policy=policy))
    assert cfg.selective_policy == policy
    stage = build_stage_module(copy.deepcopy(tiny_chain), cfg.pipeline.stages[0], cfg)
    apply_ac(stage, cfg.checkpointed_blocks, cfg.selective_checkpointed_blocks, cfg.selective_policy)
    kinds = [type(stage.block(i)).__name__ for i in range(6)]
    selective = "AttentionRecomputeWrapper" if policy == "attention" else "CheckpointWrapper"
    assert kinds == ["CheckpointWrapper"] * 2 + [selective] * 4
    # Full checkpointing passes no context_fn; the op policy passes its selective-checkpoint contexts.
    assert "context_fn" not in stage.block(0).checkpoint_fn.keywords
    if policy == "op":
        assert "context_fn" in stage.block(2).checkpoint_fn.keywords
    tokens = _tokens()
    torch.testing.assert_close(stage(tokens), tiny_chain(tokens), rtol=0, atol=0)


# Memory tiers. The torch backend offloads model states only as FSDP2's CPUOffloadPolicy does: ZeRO-3 with parameters,
# gradients and optimizer states in host memory, all of them, on GPUs. Everything else is DeepSpeed's.
GPUS = "2xH100-80GB"


def test_cpu_offload_policy_mode_runs_fsdp2_on_gpus():
    dpc = build_torch_config(make_plan(cluster=GPUS, dp=2, zero_stage=3, offload_param="cpu",
                                       offload_optimizer="cpu")).data_parallel
    assert (dpc.wrapper, dpc.reshard_after_forward, dpc.cpu_offload) == ("FSDP2", True, True)
    # One data-parallel rank still needs FSDP2: CPUOffloadPolicy is what moves the states to the host.
    one = build_torch_config(make_plan(cluster="1xH100-80GB", global_batch=4, zero_stage=3, offload_param="cpu",
                                       offload_optimizer="cpu")).data_parallel
    assert (one.wrapper, one.cpu_offload) == ("FSDP2", True)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        (dict(zero_stage=3, offload_param="nvme", offload_optimizer="nvme"), "no NVMe tier for model states"),
        (dict(zero_stage=3, offload_param="cpu", offload_optimizer="nvme"), "no NVMe tier for model states"),
        (dict(zero_stage=3, offload_optimizer="cpu"), "no optimizer-only offload"),
        (dict(zero_stage=2, offload_optimizer="cpu"), "no optimizer-only offload"),
        (dict(zero_stage=3, offload_param="cpu"), "no parameter-only offload"),
        (dict(zero_stage=3, offload_param="cpu", offload_optimizer="cpu", offload_ratio=0.5), "partial offload"),
    ],
)
def test_offload_other_than_cpu_offload_policy_is_refused(kwargs, says):
    with pytest.raises(LaunchError, match=says) as err:
        build_torch_config(make_plan(cluster=GPUS, dp=2, **kwargs))
    assert "--backend torch" in str(err.value) and "--backend deepspeed" in str(err.value)


def test_cpu_offload_policy_is_refused_on_a_cpu_cluster():
    with pytest.raises(LaunchError, match="needs an accelerator"):
        build_torch_config(make_plan(dp=2, zero_stage=3, offload_param="cpu", offload_optimizer="cpu"))


def test_offload_rule_is_a_pure_function_of_the_tiers():
    """What the planner mirrors: only (3, cpu, cpu, 1) on cuda, or no model-state offload at all, passes."""
    tiers = ("none", "cpu", "nvme")
    passing = {
        (z, p, o, r, d)
        for z in range(4) for p in tiers for o in tiers for r in (0.5, 1.0) for d in ("cuda", "cpu")
        if torch_offload_rejection(z, p, o, r, d) is None
    }
    assert passing == {(z, "none", "none", r, d) for z in range(4) for r in (0.5, 1.0) for d in ("cuda", "cpu")} | {
        (3, "cpu", "cpu", 1.0, "cuda")}


def test_paged_blocks_follow_the_recomputed_ones_in_the_recipe():
    # pp=2: ranks hold blocks 0-2 and 3-5; one fully recomputed block each, then one paged.
    cfg = build_torch_config(make_plan(pp=2, recompute_blocks=1, offload_blocks=1))
    assert cfg.checkpointed_blocks == [0, 3] and cfg.paged_blocks == [1, 4]
    assert cfg.activation_tier == "nvme"  # make_plan's default on a CPU cluster: disk
    gpu = build_torch_config(make_plan(cluster=GPUS, dp=2, offload_blocks=6))
    assert gpu.paged_blocks == [0, 1, 2, 3, 4, 5] and gpu.activation_tier == "cpu"
    assert build_torch_config(make_plan()).paged_blocks == []


def test_emitted_config_names_the_paged_blocks(tmp_path):
    plan = make_plan(dp=2, offload_blocks=2)
    emit_torch(plan, tmp_path)
    written = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (written["paged_blocks"], written["activation_tier"]) == ([0, 1], "nvme")
    assert load_torch_config(tmp_path, plan).paged_blocks == [0, 1]


def test_apply_paging_wraps_only_the_plans_blocks_and_matches_the_plain_chain(tiny_chain, tmp_path):
    cfg = build_torch_config(make_plan(cluster="cpu:1", recompute_blocks=1, offload_blocks=2))
    plain = build_stage_module(copy.deepcopy(tiny_chain), cfg.pipeline.stages[0], cfg)
    stage = build_stage_module(copy.deepcopy(tiny_chain), cfg.pipeline.stages[0], cfg)
    apply_ac(stage, cfg.checkpointed_blocks)
    apply_paging(stage, cfg.paged_blocks, cfg.activation_tier, tmp_path)
    kinds = [type(stage.block(i)).__name__ for i in range(6)]
    assert kinds == ["CheckpointWrapper", "PagedActivationWrapper", "PagedActivationWrapper"] + ["LlamaBlock"] * 3
    tokens = _tokens()
    out, want = stage(tokens), plain(tokens)
    assert list(tmp_path.glob("*.pt"))  # blocks 1 and 2 paged their activations out
    out.square().mean().backward()
    want.square().mean().backward()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in stage.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=0, msg=name)
    assert not list(tmp_path.glob("*.pt"))
