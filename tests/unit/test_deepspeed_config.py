"""ds_config.json contents for hand-made plans, the plans DeepSpeed cannot run, and the trainer's pure helpers.

Expected values are derived from the plan by hand: llama-tiny has 6 blocks, so its chain is
``[embed=0, blocks=1..6, head=7]`` (8 layers), and ``make_plan`` gives earlier stages the remainder of the blocks.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from paraplan.backends.checks import checkpointed_layers, selective_layers
from paraplan.backends.deepspeed import DS_CONFIG_FILE, PARAPLAN_KEY, build_ds_config, emit_deepspeed, stage_boundaries
from paraplan.backends.train_deepspeed import apply_ac, micro_batches
from paraplan.errors import LaunchError
from paraplan.types import StagePlan
from conftest import make_plan


def _with_stages(plan, cuts: list[tuple[int, int, int]]):
    """``plan`` with its stages replaced by ``(first_layer, last_layer, recompute_blocks)`` triples; each stage's
    ``n_blocks`` counts the blocks (chain layers 1..6) between its boundaries."""
    stages = [
        StagePlan(index=i, first_layer=f, last_layer=last, n_blocks=len(range(max(f, 1), min(last, 6) + 1)),
                  recompute_blocks=r, time_per_micro_batch_s=0.0, memory_bytes=0.0)
        for i, (f, last, r) in enumerate(cuts)
    ]
    return plan.model_copy(update={"strategy": plan.strategy.model_copy(update={"stages": stages})})


def test_batch_sizes_and_plain_data_parallel_sections():
    # global 8 = dp 2 x micro-batch 2 x accumulation 2.
    cfg = build_ds_config(make_plan(dp=2, micro_batch_size=2, global_batch=8))
    assert cfg["train_batch_size"] == 8
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"] == {"stage": 0}
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}  # fp32: neither
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["lr"] == 1e-3 and cfg["optimizer"]["params"]["weight_decay"] == 0.0
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # no JIT-built FusedAdam without offload
    assert cfg["gradient_clipping"] == 0.0
    assert "pipeline" not in cfg and "tensor_parallel" not in cfg
    assert cfg[PARAPLAN_KEY]["stage_boundaries"] == [0, 8]
    assert cfg[PARAPLAN_KEY]["activation_checkpointing"]["chain_layers"] == []


def test_learning_rate_comes_from_the_plan():
    cfg = build_ds_config(make_plan(dp=2, lr=3e-4))
    assert cfg["optimizer"]["params"]["lr"] == 3e-4


def test_zero3_with_offload_uses_cpu_adam_and_pins_only_on_gpus():
    cfg = build_ds_config(make_plan(dp=2, zero_stage=3, offload_optimizer=True))
    # On a CPU cluster there is no host<->device copy for pinned memory to speed up.
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert "torch_adam" not in cfg["optimizer"]["params"]  # DeepSpeed then picks DeepSpeedCPUAdam
    gpu = build_ds_config(make_plan(cluster="8xH100-80GB", dp=8, micro_batch_size=1, global_batch=8,
                                    zero_stage=3, offload_optimizer=True))
    assert gpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert gpu["gradient_accumulation_steps"] == 1  # 8 = 8 x 1 x 1


@pytest.mark.parametrize(("dtype", "bf16", "fp16"), [("bf16", True, False), ("fp16", False, True)])
def test_half_precision_flags(dtype, bf16, fp16):
    cfg = build_ds_config(make_plan(dp=2, dtype=dtype))
    assert cfg["bf16"] == {"enabled": bf16}
    assert cfg["fp16"] == {"enabled": fp16}


def test_pipeline_boundaries_and_recomputed_blocks():
    # pp=2 over 6 blocks: stage 0 = embed + blocks 1..3 (chain 0..3), stage 1 = blocks 4..6 + head (chain 4..7);
    # recompute_blocks=2 checkpoints the first two blocks of each stage: chain 1, 2 and 4, 5.
    plan = make_plan(pp=2, zero_stage=1, recompute_blocks=2)
    cfg = build_ds_config(plan)
    assert cfg[PARAPLAN_KEY]["stage_boundaries"] == [0, 4, 8]
    assert cfg[PARAPLAN_KEY]["activation_checkpointing"]["chain_layers"] == [1, 2, 4, 5]
    assert cfg[PARAPLAN_KEY]["pp"] == 2
    # Checkpointing is ours, per layer: DeepSpeed's every-k-layers interval is off, and the section carries nothing
    # DeepSpeed does not read (its stage count and partition come from the PipelineModule).
    assert cfg["pipeline"] == {"activation_checkpoint_interval": 0}
    assert cfg["gradient_accumulation_steps"] == 4  # 8 = dp 1 x micro-batch 2 x 4


def test_uneven_planned_cut_is_kept_exactly():
    # A cut no DeepSpeed partition_method would choose: stage 0 = embed + 1 block, stage 1 = 5 blocks + head.
    plan = _with_stages(make_plan(pp=2), [(0, 1, 1), (2, 7, 0)])
    assert stage_boundaries(plan) == [0, 2, 8]
    assert checkpointed_layers(plan) == [1]


def test_recompute_more_blocks_than_a_stage_has_checkpoints_all_of_its_blocks():
    # pp=3: chain 0..2 (blocks 1, 2), 3..4 (blocks 3, 4), 5..7 (blocks 5, 6); asking for 5 caps at 2 per stage.
    plan = make_plan(cluster="cpu:3", pp=3, recompute_blocks=5, global_batch=8, micro_batch_size=2)
    assert stage_boundaries(plan) == [0, 3, 5, 8]
    assert checkpointed_layers(plan) == [1, 2, 3, 4, 5, 6]


def test_tensor_parallel_uses_autotp_llama_preset_without_train_batch_size():
    cfg = build_ds_config(make_plan(tp=2))
    assert cfg["tensor_parallel"] == {"autotp_size": 2, "preset_model": "llama"}
    # DeepSpeed would check train_batch_size against world size (dp x tp), so it is left for DeepSpeed to derive.
    assert "train_batch_size" not in cfg
    assert cfg["gradient_accumulation_steps"] == 4  # 8 = dp 1 x micro-batch 2 x 4
    assert cfg[PARAPLAN_KEY]["global_batch"] == 8


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        (dict(pp=2, zero_stage=2), "--strategy zero=1"),
        (dict(pp=2, zero_stage=3), "--strategy zero=1"),
        (dict(dp=2, zero_stage=0, offload_optimizer=True), "--strategy zero=1"),
        # The torch backend cannot shard GPT-2 blocks either, so the fix is tp=1, not the other backend.
        (dict(model="gpt3-175b", tp=2), "--strategy tp=1"),
        (dict(cluster="cpu:4", tp=2, pp=2), "--strategy pp=1"),
        # llama-tiny has 2 key/value heads: tp=4 cannot split them.
        (dict(cluster="cpu:4", tp=4, global_batch=8), "n_kv_heads=2"),
        # AutoTP shards only linears: no sequence-sharded norms or residual stream; the torch backend has them.
        (dict(tp=2, sequence_parallel=True), "--backend torch"),
        # The PipelineEngine runs its own 1F1B over one stage per rank: no chunks, no other schedule.
        (dict(pp=2, zero_stage=1, vpp=2), "schedule interleaved_1f1b and vpp=2"),
        (dict(pp=2, zero_stage=1, schedule="zero_bubble"), "schedule zero_bubble and vpp=1"),
        (dict(pp=2, zero_stage=1, schedule="zbv", vpp=2), "runs only its own 1F1B"),
        # Ring attention over sequence shards; DeepSpeed's Ulysses is another method.
        (dict(cluster="2xH100-80GB", cp=2), "Ulysses"),
        (dict(cp=2), "cp=2"),
    ],
)
def test_plans_deepspeed_cannot_run_are_refused_with_a_fix(kwargs, says):
    with pytest.raises(LaunchError) as err:
        build_ds_config(make_plan(**kwargs))
    assert says in str(err.value)


def test_tied_embeddings_over_pipeline_stages_are_refused():
    plan = make_plan(pp=2)
    plan = plan.model_copy(update={"model": plan.model.model_copy(update={"tied_embeddings": True})})
    with pytest.raises(LaunchError, match="--strategy pp=1"):
        build_ds_config(plan)


def test_stages_with_a_gap_are_refused():
    plan = _with_stages(make_plan(pp=2), [(0, 2, 0), (4, 7, 0)])  # chain layer 3 belongs to no stage
    with pytest.raises(LaunchError, match="should start at layer 3"):
        build_ds_config(plan)


def test_stages_that_stop_before_the_head_are_refused():
    plan = _with_stages(make_plan(pp=2), [(0, 3, 0), (4, 6, 0)])  # llama-tiny's head is chain layer 7
    with pytest.raises(LaunchError, match="end at chain layer 6 but llama-tiny has 6 blocks"):
        build_ds_config(plan)


def test_emit_writes_the_config_atomically(tmp_path):
    plan = make_plan(dp=2, zero_stage=1)
    paths = emit_deepspeed(plan, tmp_path)
    assert paths == [tmp_path / DS_CONFIG_FILE]
    assert json.loads(paths[0].read_text()) == build_ds_config(plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DS_CONFIG_FILE]  # no .tmp left behind


def test_deepspeed_parses_the_config():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns on import that it found no GPU
    from deepspeed.runtime.config import DeepSpeedConfig

    # Without torch.distributed, DeepSpeedConfig assumes world size 1, so use a dp=1 plan (8 = 1 x 2 x 4).
    parsed = DeepSpeedConfig(build_ds_config(make_plan(cluster="cpu:1", zero_stage=3, offload_optimizer=True,
                                                       dtype="bf16")))
    assert parsed.train_batch_size == 8
    assert parsed.gradient_accumulation_steps == 4
    assert parsed.zero_optimization_stage == 3
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert parsed.optimizer_name == "adamw"
    assert parsed.gradient_clipping == 0.0


def test_micro_batches_cover_the_global_batch_once():
    # Step 1 of global batch 8 is samples 8..15; dp rank r takes 4 of them as 2 micro-batches of 2.
    class Recorder:
        def batch(self, start: int, n: int):
            return start, n

    plan = make_plan(dp=2, micro_batch_size=2, global_batch=8)
    assert list(micro_batches(Recorder(), plan, step=1, dp_rank=0)) == [(8, 2), (10, 2)]
    assert list(micro_batches(Recorder(), plan, step=1, dp_rank=1)) == [(12, 2), (14, 2)]


def test_checkpointed_layer_recomputes_forward_and_keeps_gradients():
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return torch.tanh(self.lin(x))

    torch.manual_seed(0)
    plain = [Counting(), Counting(), Counting()]
    wrapped = apply_ac([Counting(), Counting(), Counting()], chain_layers=[1])
    for src, dst in zip(plain, wrapped):
        (dst.inner if hasattr(dst, "inner") else dst).load_state_dict(src.state_dict())
    x = torch.randn(2, 4)
    for layers in (plain, wrapped):
        y = x
        for layer in layers:
            y = layer(y)
        y.sum().backward()
    calls = [(w.inner if hasattr(w, "inner") else w).calls for w in wrapped]
    assert calls == [1, 2, 1]  # only layer 1 runs its forward again during backward
    for src, dst in zip(plain, wrapped):
        inner = dst.inner if hasattr(dst, "inner") else dst
        torch.testing.assert_close(inner.lin.weight.grad, src.lin.weight.grad)


def test_selective_recompute_covers_the_blocks_not_recomputed_in_full():
    # pp=2: chain 0..3 (embed, blocks 1-3) and 4..7 (blocks 4-6, head); the first block of each stage in full.
    plan = make_plan(pp=2, recompute_blocks=1, selective_recompute=True)
    ac = build_ds_config(plan)[PARAPLAN_KEY]["activation_checkpointing"]
    assert ac["chain_layers"] == [1, 4]
    assert ac["selective"]["chain_layers"] == [2, 3, 5, 6] == selective_layers(plan)
    assert selective_layers(make_plan(pp=2, recompute_blocks=1)) == []


@pytest.mark.parametrize(("policy", "wrapper"), [("attention", "AttentionRecomputeWrapper"),
                                                  ("op", "CheckpointWrapper")])
def test_selective_policy_reaches_the_config_and_the_trainer(policy, wrapper):
    plan = make_plan(dp=2, recompute_blocks=1, selective_recompute=True, selective_policy=policy)
    selective = build_ds_config(plan)[PARAPLAN_KEY]["activation_checkpointing"]["selective"]
    assert selective["policy"] == policy and selective["chain_layers"] == [2, 3, 4, 5, 6]
    layers = [nn.Linear(4, 4) for _ in range(4)]
    wrapped = apply_ac(layers, [1], [2], policy)
    assert wrapped[0] is layers[0] and wrapped[3] is layers[3]
    assert type(wrapped[1]).__name__ == "CheckpointedLayer"
    assert type(wrapped[2]).__name__ == wrapper  # the torch backend's selective recomputation, not a full one
    x = torch.randn(3, 4, requires_grad=True)
    torch.testing.assert_close(wrapped[2](x), layers[2](x), rtol=0, atol=0)
