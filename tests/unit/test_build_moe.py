"""Mixture-of-Experts chains built from transformers' own decoder layers, and their expert-parallel shards.

References: parameter totals from ``paraplan.models.moe.count_params`` (itself checked against transformers' causal
LMs in test_moe_models.py); outputs from transformers' own ``AutoModelForCausalLM`` of the same config.json with the
chain's weights copied in; initialization distributions from transformers' ``_init_weights`` (as
test_init_weights.py); expert-parallel shards from the unsharded chain's full tensors, computed in this process.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402
from conftest import hf_config_dir, make_plan  # noqa: E402

from paraplan.backends.torch_expert_parallel import (  # noqa: E402
    ExpertParallelExperts, apply_ep, expert_rows,
)
from paraplan.errors import ModelSpecError  # noqa: E402
from paraplan.models.build import build_model, hf_config, init_parameter, is_expert_parameter  # noqa: E402
from paraplan.models.moe import count_params  # noqa: E402
from paraplan.models.presets import PRESETS, load_model_spec  # noqa: E402

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
DEEPSEEK_SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, n_group=1, topk_group=1)
# One small config.json per buildable MoE model type. Values MoESpec does not carry are the ones paraplan builds
# with (build._moe_config_kwargs): Qwen3-MoE normalizes its top-k weights, DeepSeek-V2 routes greedily, V3 in one
# group; anything else is transformers' default.
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_hidden_layers=2, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "qwen2_moe-shared-gate": lambda: transformers.Qwen2MoeConfig(
        **SMALL, num_hidden_layers=2, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48),
    "qwen3_moe-head_dim": lambda: transformers.Qwen3MoeConfig(
        **SMALL, num_hidden_layers=2, head_dim=32, num_experts=5, num_experts_per_tok=3, moe_intermediate_size=40,
        norm_topk_prob=True),
    "deepseek_v2-qlora-2shared": lambda: transformers.DeepseekV2Config(
        **DEEPSEEK_SMALL, num_hidden_layers=3, q_lora_rank=16, n_shared_experts=2, first_k_dense_replace=1,
        topk_method="greedy"),
    "deepseek_v3-noqlora-1dense": lambda: transformers.DeepseekV3Config(
        **DEEPSEEK_SMALL, num_hidden_layers=3, q_lora_rank=None, n_shared_experts=1, first_k_dense_replace=1),
}


def _spec(name: str, tmp_path: Path):
    return load_model_spec(str(hf_config_dir(CONFIGS[name](), tmp_path, name)))


@pytest.mark.parametrize("name", ["moe-tiny", "deepseek-tiny", *CONFIGS])
def test_built_moe_chain_has_the_counted_parameters(name: str, tmp_path: Path) -> None:
    spec = PRESETS[name] if name in PRESETS else _spec(name, tmp_path)
    chain = build_model(spec, device="meta", seed=None)
    assert sum(p.numel() for p in chain.parameters()) == count_params(spec).total
    # The layout too: the MoE layers (and only they) have routed experts.
    assert [hasattr(b.layer.mlp, "experts") for b in chain.blocks] == [spec.moe.is_moe_layer(i)
                                                                       for i in range(spec.n_layers)]


def _chain_name(key: str) -> str:
    if key.startswith("model.layers."):
        i, rest = key.removeprefix("model.layers.").split(".", 1)
        return f"blocks.{i}.layer.{rest}"
    return {"model.embed_tokens.weight": "embed.embed_tokens.weight", "model.norm.weight": "head.norm.weight",
            "lm_head.weight": "head.lm_head.weight"}[key]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_built_moe_chain_computes_what_transformers_computes(name: str, tmp_path: Path) -> None:
    hf_cfg = CONFIGS[name]()
    spec = _spec(name, tmp_path)
    chain = build_model(spec, seed=0)
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg._experts_implementation = "eager"
    reference = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    # The chain's weights (and DeepSeek-V3's routing-bias buffer) into transformers' model, then the same tokens.
    reference.load_state_dict({k: chain.state_dict()[_chain_name(k)] for k in reference.state_dict()}, strict=True)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = chain(tokens)
    torch.testing.assert_close(logits, reference(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["moe-tiny", "deepseek-tiny"])
def test_moe_initialization_draws_what_transformers_init_draws(name: str) -> None:
    """Router, fused experts, latent-attention projections and their norms: transformers' constants exactly, its
    stds within 5 standard errors of the difference of two sample stds (each has a relative standard error of about
    1 / sqrt(2 n) for n samples, their difference sqrt(2) times that: 5 / sqrt(n) in all)."""
    spec = PRESETS[name]
    ours = dict(build_model(spec, seed=3).named_parameters())
    cfg = hf_config(spec)
    reference = transformers.AutoModelForCausalLM.from_config(cfg)
    for key, want in reference.named_parameters():
        got = ours.pop(_chain_name(key))
        assert got.shape == want.shape, key
        if want.std() == 0:
            assert torch.equal(got, want), key
        else:
            assert got.std().item() == pytest.approx(want.std().item(), rel=5 / math.sqrt(got.numel())), key
    assert not ours


def test_expert_rows_are_slices_of_the_full_tensor() -> None:
    spec = PRESETS["deepseek-tiny"]
    name = "blocks.2.layer.mlp.experts.gate_up_proj"
    shape = (8, 256, 256)
    assert is_expert_parameter(name) and not is_expert_parameter("blocks.2.layer.mlp.gate.weight")
    full = init_parameter(name, shape, torch.float32, spec, seed=0)
    assert full.shape == shape
    assert torch.equal(init_parameter(name, shape, torch.float32, spec, 0, experts=range(2, 6)), full[2:6])
    assert not torch.equal(full[0], full[1])  # each expert drawn on its own
    with pytest.raises(ValueError, match="routed-expert"):
        init_parameter("blocks.2.layer.mlp.gate.weight", (8, 256), torch.float32, spec, 0, experts=range(2))


def test_gpt_oss_is_read_but_not_built(tmp_path: Path) -> None:
    cfg = transformers.GptOssConfig(**SMALL, num_hidden_layers=1, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=8)
    spec = load_model_spec(str(hf_config_dir(cfg, tmp_path, "gpt-oss")))
    with pytest.raises(ModelSpecError, match="does not build"):
        build_model(spec, device="meta", seed=None)


# ---- expert-parallel shards (a one-process group; torch's fake process group for two ranks) -------------------


@pytest.fixture
def gloo_world(tmp_path: Path):
    """A real one-rank gloo process group (file rendezvous, no port)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["moe-tiny", "deepseek-tiny"])
def test_expert_parallel_module_at_ep1_equals_transformers_experts(name: str, gloo_world) -> None:
    """The dispatch -> local experts -> combine path with the all-to-alls over one rank gives transformers' experts'
    output bit for bit (top_k = 2: the two copies of a token are added in either order exactly), and the same
    gradients (fp32, and under bf16 autocast)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
    moe = build_model(PRESETS[name], seed=0).blocks[1].layer.mlp
    ours = ExpertParallelExperts(moe.experts, mesh)
    x = torch.randn(64, PRESETS[name].hidden, generator=torch.Generator().manual_seed(0), requires_grad=True)
    _, weights, index = moe.gate(x)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            want, got = moe.experts(x, index, weights), ours(x, index, weights)
        assert torch.equal(got, want)
        grads = [torch.autograd.grad(y.square().sum(), [x, p], retain_graph=True)
                 for y, p in ((want, moe.experts.gate_up_proj), (got, ours.gate_up_proj))]
        assert torch.equal(grads[0][0], grads[1][0])
        assert torch.equal(grads[0][1], grads[1][1].to_local())


@pytest.mark.parametrize("name", ["moe-tiny", "deepseek-tiny"])
def test_each_ep_rank_materializes_its_slice_of_the_unsharded_experts(name: str) -> None:
    """ep=2 on meta, as the trainer builds it: each rank's expert shards after ``materialize_stage`` are its half
    of the unsharded chain's tensors (ep=1 and ep=2 start from the same weights), every other parameter whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from paraplan.backends.torch_native import build_stage_module, build_torch_config, materialize_stage

    plan = make_plan(name, cluster="cpu:2", dp=2, seq_len=32)
    full = dict(build_model(plan.model, seed=plan.train.seed).named_parameters())
    config = build_torch_config(plan)
    for rank in range(2):
        dist.init_process_group("fake", rank=rank, world_size=2, store=FakeStore())
        try:
            mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
            stage = build_stage_module(build_model(plan.model, seed=plan.train.seed, meta_params=True),
                                       config.pipeline.stages[0], config)
            experts = apply_ep(stage, mesh)
            assert len(experts) == 2 * sum(plan.model.moe.is_moe_layer(i) for i in range(plan.model.n_layers))
            materialize_stage(stage, torch.device("cpu"), plan)
            for local_name, param in stage.named_parameters():
                want = full[stage.canonical_name(local_name)]
                rows = expert_rows(param)
                if rows is None:
                    assert torch.equal(param, want), local_name
                else:
                    half = want.shape[0] // 2
                    assert rows == range(rank * half, (rank + 1) * half)
                    assert torch.equal(param.to_local(), want[rank * half:(rank + 1) * half]), local_name
        finally:
            dist.destroy_process_group()
