"""ds_config.json contents for hand-made plans, the plans DeepSpeed cannot run, and the trainer's pure helpers.

Expected values are derived from the plan by hand: llama-tiny has 6 blocks, so its chain is
``[embed=0, blocks=1..6, head=7]`` (8 layers), and ``make_plan`` gives earlier stages the remainder of the blocks.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from paraplan.backends.checks import checkpointed_layers, selective_layers
from paraplan.backends.deepspeed import DS_CONFIG_FILE, PARAPLAN_KEY, build_ds_config, emit_deepspeed, stage_boundaries
from paraplan.backends.train_deepspeed import apply_ac, apply_paging, micro_batches, paging_directory
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


# llama-tiny's largest layer is a block: q and o 384 x 384, k and v 384 x 128 (2 KV heads of 64), the MLP 3 x 384 x
# 1024 and two norms of 384: 1,573,632 parameters, rounded up to whole Mi-element blocks: 2 Mi. An offloading plan
# emits it as the gradient bucket instead of DeepSpeed's 5e8-element default.
TINY_BUCKET = 2 * 2**20
assert 2 * 384 * 384 + 2 * 384 * 128 + 3 * 384 * 1024 + 2 * 384 == 1_573_632


def test_zero3_with_offload_uses_cpu_adam_and_pins_only_on_gpus():
    cfg = build_ds_config(make_plan(dp=2, zero_stage=3, offload_optimizer=True))
    # On a CPU cluster there is no host<->device copy for pinned memory to speed up.
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                        "reduce_bucket_size": TINY_BUCKET, "stage3_max_reuse_distance": 0}
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


# ---------------------------------------------------------------------------------------------------------------
# Memory tiers: optimizer states and parameters in host memory or on NVMe, activation paging.
# ---------------------------------------------------------------------------------------------------------------

MiB_ELEMENTS = 1 << 20  # swap buffers are whole multiples of 2^20 elements (cost_models.offload, aio alignment)


def _round_up_mib(n: float) -> int:
    return max(MiB_ELEMENTS, math.ceil(n / MiB_ELEMENTS) * MiB_ELEMENTS)


def _llama_params(h: int, ffn: int, n_heads: int, n_kv: int, layers: int, vocab: int) -> int:
    """Llama parameters by hand: q, o (h x h), k, v (h x kv_dim), gate/up/down (h x ffn), two RMSNorm weights per
    block; embedding, final norm and LM head (untied)."""
    kv_dim = h // n_heads * n_kv
    block = 2 * h * h + 2 * h * kv_dim + 3 * h * ffn + 2 * h
    return vocab * h + layers * block + h + vocab * h


def test_zero3_params_and_optimizer_on_nvme(tmp_path):
    plan = make_plan(dp=2, zero_stage=3, offload_optimizer="nvme", offload_param="nvme")
    cfg = build_ds_config(plan, nvme_path=tmp_path)
    zero = cfg["zero_optimization"]
    # llama-tiny (h 384, ffn 1024, 6 heads, 2 kv heads, 6 blocks, vocab 256): the largest tensor is an MLP weight,
    # 384 x 1024 = 393,216 elements (the embedding is 256 x 384 = 98,304); split over dp 2 it is 196,608, which
    # rounds up to one 2^20-element buffer.
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": False, "nvme_path": str(tmp_path),
                                     "buffer_count": 5, "buffer_size": MiB_ELEMENTS}
    assert zero["offload_optimizer"] == {"device": "nvme", "pin_memory": False, "nvme_path": str(tmp_path),
                                         "buffer_count": 4}
    # Optimizer sub-groups are 1/16 of the rank's partition, at most 1e8 (cost_models.offload's stated choice):
    # 9,638,784 params / dp 2 = 4,819,392; / 16 = 301,212, rounded up to one 2^20-element buffer.
    assert _llama_params(384, 1024, 6, 2, 6, 256) == 9_638_784
    assert zero["sub_group_size"] == MiB_ELEMENTS == _round_up_mib(9_638_784 / 2 / 16)
    assert zero["stage3_max_reuse_distance"] == 0  # else "Not enough buffers 0 for swapping 1" on step 2
    assert cfg["aio"] == {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                          "overlap_events": True}  # DeepSpeed's aio defaults, stated
    assert "torch_adam" not in cfg["optimizer"]["params"]  # DeepSpeedCPUAdam runs the offloaded step


def test_nvme_buffers_of_a_large_model_on_gpus(tmp_path):
    # llama3-8b on 8 GPUs, dp 8: the largest tensor is the embedding (and head), vocab 128,256 (already a multiple
    # of 128, so no padding) x 4096 = 525,336,576 elements; / 8 = 65,667,072 = 62.6 x 2^20 -> 63 x 2^20.
    plan = make_plan(model="llama3-8b", cluster="8xH100-80GB", dp=8, micro_batch_size=1, global_batch=8,
                     zero_stage=3, offload_optimizer="nvme", offload_param="nvme", dtype="bf16", seq_len=512)
    zero = build_ds_config(plan, nvme_path=tmp_path)["zero_optimization"]
    assert zero["offload_param"]["buffer_size"] == 63 * MiB_ELEMENTS == 66_060_288
    assert zero["offload_param"]["pin_memory"] is True and zero["offload_optimizer"]["pin_memory"] is True
    # 8,030,261,248 params / dp 8 / 16 sub-groups = 62,736,416 = 59.8 x 2^20 -> 60 x 2^20 (under the 1e8 cap;
    # DeepSpeed's 1e9 default would pin 4 x 4 GB of host buffers per GPU).
    assert _llama_params(4096, 14336, 32, 8, 32, 128256) == 8_030_261_248
    assert zero["sub_group_size"] == 60 * MiB_ELEMENTS == _round_up_mib(8_030_261_248 / 8 / 16)


def test_host_memory_tiers_have_no_nvme_settings():
    cfg = build_ds_config(make_plan(dp=2, zero_stage=3, offload_optimizer="cpu", offload_param="cpu",
                                    offload_ratio=0.25))
    zero = cfg["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    # DeepSpeed's partial offload: a quarter of the optimizer states on the host, the rest updated on the device.
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False, "ratio": 0.25}
    assert "aio" not in cfg and "sub_group_size" not in zero
    full = build_ds_config(make_plan(dp=2, zero_stage=3, offload_optimizer="cpu"))["zero_optimization"]
    assert "ratio" not in full["offload_optimizer"]  # 1 is DeepSpeed's default


def test_no_offload_means_no_offload_sections():
    # "none" is a non-empty string: a truthiness test would emit an offload section for it.
    cfg = build_ds_config(make_plan(dp=2, zero_stage=3))
    assert not {"offload_optimizer", "offload_param"} & set(cfg["zero_optimization"])
    assert cfg["optimizer"]["params"]["torch_adam"] is True


def test_nvme_without_a_directory_is_refused_and_the_cluster_path_is_used(tmp_path):
    plan = make_plan(dp=2, zero_stage=3, offload_param="nvme")
    with pytest.raises(LaunchError, match="--nvme-path") as err:
        build_ds_config(plan)
    assert "the parameters on NVMe" in str(err.value)
    cluster = plan.cluster.model_copy(update={"nvme_path": str(tmp_path / "cluster-nvme")})
    on_cluster = plan.model_copy(update={"cluster": cluster})
    assert build_ds_config(on_cluster)["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path /
                                                                                                  "cluster-nvme")
    # --nvme-path wins over the cluster file.
    assert build_ds_config(on_cluster, nvme_path=tmp_path)["zero_optimization"]["offload_param"]["nvme_path"] == \
        str(tmp_path)


@pytest.mark.parametrize("zero", [1, 2])
def test_optimizer_on_nvme_below_zero3_is_refused(zero, tmp_path):
    # DeepSpeed's ZeRO-1/2 optimizer would silently run device nvme as host-memory offload (no swapper).
    with pytest.raises(LaunchError) as err:
        build_ds_config(make_plan(dp=2, zero_stage=zero, offload_optimizer="nvme"), nvme_path=tmp_path)
    assert "stage_1_and_2.py" in str(err.value) and "--strategy zero=3" in str(err.value)


def test_optimizer_offload_with_pipeline_at_zero1_is_emitted():
    # DeepSpeed's PipelineEngine runs ZeRO-1 with host-memory optimizer offload (run in the integration tests).
    cfg = build_ds_config(make_plan(pp=2, zero_stage=1, offload_optimizer="cpu"))
    assert cfg["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                        "reduce_bucket_size": TINY_BUCKET, "allgather_bucket_size": TINY_BUCKET}
    assert cfg["pipeline"] == {"activation_checkpoint_interval": 0}


def test_paged_blocks_and_their_tier_reach_the_trainer(tmp_path):
    # pp=2 over 6 blocks: chain 1..3 and 4..6; 1 block per stage recomputed in full, the next one paged.
    plan = make_plan(pp=2, zero_stage=1, recompute_blocks=1, offload_blocks=1)
    ours = build_ds_config(plan)[PARAPLAN_KEY]
    assert ours["activation_checkpointing"]["chain_layers"] == [1, 4]
    assert ours["activation_paging"] == {"tier": "nvme", "chain_layers": [2, 5], "nvme_path": None}  # cpu cluster
    assert paging_directory(ours, tmp_path, rank=1) == tmp_path / "activations" / "rank1"
    ours = build_ds_config(plan, nvme_path=tmp_path / "fast")[PARAPLAN_KEY]
    assert paging_directory(ours, tmp_path / "run", rank=0) == tmp_path / "fast" / "activations" / "rank0"
    gpu = make_plan(cluster="2xH100-80GB", dp=2, offload_blocks=2, dtype="bf16")
    ours = build_ds_config(gpu)[PARAPLAN_KEY]
    assert ours["activation_paging"]["tier"] == "cpu" and ours["activation_paging"]["chain_layers"] == [1, 2]
    assert paging_directory(ours, tmp_path, rank=0) is None


def test_paged_layers_are_wrapped_and_compute_the_same(tmp_path):
    layers = [nn.Linear(512, 512) for _ in range(3)]
    wrapped = apply_paging(layers, [1], "nvme", tmp_path / "act")
    assert wrapped[0] is layers[0] and wrapped[2] is layers[2] and wrapped[1] is not layers[1]
    x = torch.randn(256, 512, requires_grad=True)
    y = wrapped[1](torch.tanh(x))
    assert list((tmp_path / "act").iterdir()), "the saved activation went to disk"
    (g,) = torch.autograd.grad(y.sum(), x)
    (ref,) = torch.autograd.grad(layers[1](torch.tanh(x)).sum(), x)
    torch.testing.assert_close(g, ref, rtol=0, atol=0)


def test_deepspeed_parses_the_nvme_config(tmp_path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(build_ds_config(make_plan(cluster="cpu:1", zero_stage=3, offload_optimizer="nvme",
                                                       offload_param="nvme"), nvme_path=tmp_path))
    zc = parsed.zero_config
    assert zc.offload_param.device == "nvme" and str(zc.offload_param.nvme_path) == str(tmp_path)
    assert zc.offload_optimizer.device == "nvme" and zc.max_reuse_distance == 0
    assert parsed.aio_config["queue_depth"] == 8


# ---------------------------------------------------------------------------------------------------------------
# `paraplan launch --nvme-path`: refused before anything is written or started.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def started(monkeypatch) -> list:
    from paraplan.backends import launch

    jobs: list = []
    monkeypatch.setattr(launch, "run_job", lambda command, *a, **k: jobs.append(command) or 0)
    return jobs


def _nvme_plan_file(tmp_path, nvme_bytes: float = 0.0):
    plan = make_plan(dp=2, zero_stage=3, offload_optimizer="nvme", offload_param="nvme")
    plan = plan.model_copy(update={"predicted": plan.predicted.model_copy(update={"nvme_bytes": nvme_bytes})})
    path = tmp_path / "plan.json"
    path.write_text(plan.model_dump_json())
    return path


def _launch_ds(plan_path, run_dir, *extra):
    from conftest import run_cli

    return run_cli("launch", str(plan_path), "--backend", "deepspeed", "--steps", "1", "--run-dir", str(run_dir),
                   *extra)


def _refused(result, run_dir, started, *fragments):
    from conftest import assert_user_error

    assert_user_error(result)
    flat = " ".join(result.output.split())
    for frag in fragments:
        assert frag in flat, result.output
    assert not run_dir.exists() and started == []


def test_launch_without_nvme_path_is_refused(tmp_path, started):
    run_dir = tmp_path / "run"
    _refused(_launch_ds(_nvme_plan_file(tmp_path), run_dir), run_dir, started, "--nvme-path",
             "the optimizer states and the parameters on NVMe")


def test_launch_into_a_missing_directory_or_a_file_is_refused(tmp_path, started):
    run_dir = tmp_path / "run"
    _refused(_launch_ds(_nvme_plan_file(tmp_path), run_dir, "--nvme-path", str(tmp_path / "nope")), run_dir, started,
             f"--nvme-path {tmp_path / 'nope'} does not exist")
    (tmp_path / "file").write_text("x")
    _refused(_launch_ds(_nvme_plan_file(tmp_path), run_dir, "--nvme-path", str(tmp_path / "file")), run_dir,
             started, "is not a directory")


def test_launch_into_a_read_only_directory_is_refused(tmp_path, started):
    # /proc is a directory nobody, root included, can create files in.
    run_dir = tmp_path / "run"
    _refused(_launch_ds(_nvme_plan_file(tmp_path), run_dir, "--nvme-path", "/proc"), run_dir, started,
             "--nvme-path /proc is not writable")


def test_launch_without_the_space_the_plan_writes_is_refused(tmp_path, started):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    # Each of the 2 processes writes just over half the free space: together more than there is.
    plan_path = _nvme_plan_file(tmp_path, nvme_bytes=free / 2 + 2**30)
    nvme, run_dir = tmp_path / "nvme", tmp_path / "run"
    nvme.mkdir()
    _refused(_launch_ds(plan_path, run_dir, "--nvme-path", str(nvme)), run_dir, started, "free; the plan writes",
             "x 2 processes on this node", "--nvme-path")
    # Half of it per process fits.
    ok = _launch_ds(_nvme_plan_file(tmp_path, nvme_bytes=free / 4), run_dir, "--nvme-path", str(nvme))
    assert ok.exit_code == 0, ok.output
    assert len(started) == 1
    zero = json.loads((run_dir / DS_CONFIG_FILE).read_text())["zero_optimization"]
    assert zero["offload_param"]["nvme_path"] == str(nvme) == zero["offload_optimizer"]["nvme_path"]


def test_zero3_without_offload_emits_the_priced_bucket_and_releases_parameters():
    """Every ZeRO-3 plan gets the one-layer reduce bucket the planner prices (DeepSpeed's 5e8 default would be 2 GB
    of fp32 per rank) and reuse distance 0 (each gathered parameter released after use, as priced); ZeRO-1/2
    without offload keep DeepSpeed's defaults."""
    zero = build_ds_config(make_plan(dp=2, zero_stage=3))["zero_optimization"]
    assert zero == {"stage": 3, "reduce_bucket_size": TINY_BUCKET, "stage3_max_reuse_distance": 0}
    assert build_ds_config(make_plan(dp=2, zero_stage=2))["zero_optimization"] == {"stage": 2}
