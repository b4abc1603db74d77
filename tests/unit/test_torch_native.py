"""Native torch backend without processes: the recipe in torch_parallel.json, refusals, and single-process numerics.

Expected recipes are derived by hand from the plan (llama-tiny: 6 blocks, chain ``[embed, block_0..5, head]`` =
chain indices 0..7, 6 heads, 2 key/value heads, MLP width 1024; global batch 8, micro-batch 2 unless stated).
"""

from __future__ import annotations

import copy
import json
from functools import partial

import pytest
import torch
from conftest import make_plan

from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from paraplan.backends import train_common
from paraplan.backends.torch_native import (
    CONFIG_FILE, apply_ac, build_stage_module, build_torch_config, emit_torch, load_torch_config,
)
from paraplan.errors import LaunchError
from paraplan.models.build import build_model


def test_dp2_zero0_is_ddp_over_whole_chain():
    cfg = build_torch_config(make_plan(dp=2))
    assert cfg.mesh.shape == [1, 2, 1] and cfg.mesh.dim_names == ["pp", "dp", "tp"]
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
    assert cfg.mesh.shape == [1, 1, 1]
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
    assert cfg.mesh.shape == [1, 1, 2]
    col, row = "ColwiseParallel", "RowwiseParallel"
    assert cfg.tensor_parallel.plan == {
        "layer.self_attn.q_proj": col, "layer.self_attn.k_proj": col, "layer.self_attn.v_proj": col,
        "layer.self_attn.o_proj": row,
        "layer.mlp.gate_proj": col, "layer.mlp.up_proj": col, "layer.mlp.down_proj": row,
    }
    assert cfg.tensor_parallel.use_local_output


def test_pp2_stages_schedule_and_checkpointed_blocks():
    cfg = build_torch_config(make_plan(pp=2, recompute_blocks=2))
    assert cfg.mesh.shape == [2, 1, 1]
    assert cfg.pipeline.schedule == "1F1B" and cfg.pipeline.n_microbatches == 4  # 8 / (1 x 2)
    # 6 blocks over 2 stages: embed + blocks 0-2 (chain 0..3), blocks 3-5 + head (chain 4..7).
    s0, s1 = cfg.pipeline.stages
    assert (s0.first_layer, s0.last_layer, s0.blocks) == (0, 3, [0, 1, 2])
    assert (s1.first_layer, s1.last_layer, s1.blocks) == (4, 7, [3, 4, 5])
    # The first 2 blocks of each stage are checkpointed.
    assert cfg.checkpointed_blocks == [0, 1, 3, 4]


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
        (dict(model="gpt3-175b", pp=2), "ties its embedding"),
        (dict(model="gpt3-175b", tp=2, sequence_parallel=True), "sequence-parallel plan covers Llama blocks only"),
        (dict(tp=2, sequence_parallel=True, seq_len=63), "must divide seq_len=63"),
    ],
)
def test_unsupported_plans_say_what_to_change(kwargs, says):
    with pytest.raises(LaunchError, match=says):
        build_torch_config(make_plan(**kwargs))


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


class _RetainedBytes(TorchDispatchMode):
    """Bytes of the storages created during forward that are still alive afterwards: what autograd (or the
    selective-checkpoint cache) keeps for backward, whichever mechanism holds it."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.exclude:
                storage = t.untyped_storage()
                self.refs[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def alive_bytes(self, output: torch.Tensor) -> int:
        out_ptr = output.untyped_storage().data_ptr()
        return sum(n for ptr, (ref, n) in self.refs.items() if not ref.expired() and ptr != out_ptr)


def _retained(block, x: torch.Tensor, policy=None) -> tuple[int, torch.Tensor]:
    """Forward ``block`` on ``x`` (plain, or under selective checkpointing with ``policy``); bytes kept, output."""
    fn = block if policy is None else (lambda t: checkpoint(
        block, t, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, policy)))
    mode = _RetainedBytes(exclude=[p for p in block.parameters()])
    with mode:
        y = fn(x)
    return mode.alive_bytes(y), y


def test_selective_checkpoint_keeps_only_projection_outputs_not_attention(tiny_chain):
    """llama-tiny block, b=2, s=64, fp32: h=384, 6 heads of 64, 2 key/value heads (k, v are 128 wide), MLP 1024."""
    block = copy.deepcopy(tiny_chain.blocks[0])
    b, s, h, kv, f, heads = 2, 64, 384, 128, 1024, 6
    x = torch.randn(b, s, h, requires_grad=True)
    policy = train_common._matmul_save_policy
    kept_sel, y_sel = _retained(block, x, policy)
    # Selective keeps exactly the outputs of the 7 projections: q, k, v, o, gate, up, down (4 bytes each).
    assert kept_sel == b * s * (h + kv + kv + h + f + f + h) * 4
    # The same policy but saving the attention op too keeps its output (b, heads, s, 64) = (b, s, h) and its
    # log-sum-exp (b, heads, s) on top: the attention core is what selective recomputation drops.
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default

    def save_attention_too(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func is attention else policy(ctx, func, *args, **kwargs)

    kept_with_attention, _ = _retained(block, x, save_attention_too)
    assert kept_with_attention - kept_sel == (b * s * h + b * heads * s) * 4
    # And it keeps less than no checkpointing (autograd also keeps norms, rotary and activation inputs).
    kept_plain, y_plain = _retained(block, x)
    assert kept_sel < kept_plain
    # Recomputation replays the same ops: output and gradients are bit-identical to the plain block's.
    torch.testing.assert_close(y_sel, y_plain, rtol=0, atol=0)
    (g_sel,) = torch.autograd.grad(y_sel.square().mean(), x)
    (g_plain,) = torch.autograd.grad(y_plain.square().mean(), x)
    torch.testing.assert_close(g_sel, g_plain, rtol=0, atol=0)


def test_apply_ac_wraps_full_and_selective_blocks(tiny_chain):
    cfg = build_torch_config(make_plan(cluster="cpu:1", recompute_blocks=2, selective_recompute=True))
    stage = build_stage_module(copy.deepcopy(tiny_chain), cfg.pipeline.stages[0], cfg)
    apply_ac(stage, cfg.checkpointed_blocks, cfg.selective_checkpointed_blocks)
    wrapped = [stage.block(i) for i in range(6)]
    # Full checkpointing passes no context_fn; selective passes the policy's contexts.
    kinds = ["context_fn" in getattr(w, "checkpoint_fn").keywords for w in wrapped]
    assert kinds == [False, False, True, True, True, True]
    tokens = _tokens()
    torch.testing.assert_close(stage(tokens), tiny_chain(tokens), rtol=0, atol=0)
