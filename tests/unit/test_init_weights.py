"""Per-parameter initialization (``build.init_parameter``): transformers' distributions, a function of (seed, name).

The reference is transformers' own causal LM built from the same config, whose ``post_init`` runs its
``_init_weights``: every parameter the rules set to a constant must equal transformers' constant exactly, and every
random one must have transformers' standard deviation (checked on the sample std of both; a tensor of n >= 4096
normal samples has a relative std error of about 1 / sqrt(2 n) <= 1.1%, so 6% is over 5 standard errors and still
tells 0.02 from GPT-2's scaled 0.02 / sqrt(2 * 2) = 0.01).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from paraplan.errors import ModelSpecError  # noqa: E402
from paraplan.models.build import build_model, init_parameter  # noqa: E402
from paraplan.models.presets import PRESETS, load_model_spec  # noqa: E402

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
STD_REL = 0.06


def _chain_name(key: str) -> str:
    """transformers' parameter name -> the chain's (test_hf_configs' mapping, plus GPT-2's)."""
    for prefix in ("model.layers.", "transformer.h."):
        if key.startswith(prefix):
            i, rest = key.removeprefix(prefix).split(".", 1)
            return f"blocks.{i}.layer.{rest}"
    return {"model.embed_tokens.weight": "embed.embed_tokens.weight", "model.norm.weight": "head.norm.weight",
            "lm_head.weight": "head.lm_head.weight", "transformer.wte.weight": "embed.wte.weight",
            "transformer.wpe.weight": "embed.wpe.weight", "transformer.ln_f.weight": "head.ln_f.weight",
            "transformer.ln_f.bias": "head.ln_f.bias"}[key]


@pytest.mark.parametrize("cfg", [
    pytest.param(lambda: transformers.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True), id="llama-biases"),
    pytest.param(lambda: transformers.Qwen3Config(**TINY, head_dim=32), id="qwen3-qk-norms"),
    pytest.param(lambda: transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128),
                 id="gpt2-scaled-c_proj"),
])
def test_built_chain_draws_what_transformers_init_draws(cfg, tmp_path: Path) -> None:
    hf_cfg = cfg()
    (tmp_path / "m").mkdir()
    hf_cfg.to_json_file(tmp_path / "m" / "config.json")
    spec = load_model_spec(str(tmp_path / "m"))
    ours = dict(build_model(spec, seed=3).named_parameters())
    reference = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    kinds = set()
    for key, want in reference.named_parameters():
        got = ours.pop(_chain_name(key))
        assert got.shape == want.shape, key
        if want.std() == 0:  # a constant: biases 0, norm weights 1
            assert torch.equal(got, want), key
            kinds.add(want.flatten()[0].item())
        else:
            assert got.mean().abs() < 3 * got.std() / got.numel() ** 0.5, key
            assert got.std().item() == pytest.approx(want.std().item(), rel=STD_REL), key
            kinds.add(round(want.std().item(), 3))
    assert not ours  # every chain parameter has its transformers counterpart (tied head once)
    # Each model exercises zeros (biases) or ones (norms) and its random stds: 0.02, and GPT-2's 0.02 / sqrt(4).
    assert {1.0, 0.02} <= kinds and (0.01 in kinds) == (spec.family == "gpt")


def test_value_depends_on_seed_and_name_only() -> None:
    spec = PRESETS["llama-tiny"]
    a = init_parameter("blocks.2.layer.mlp.up_proj.weight", (1024, 384), torch.float32, spec, seed=0)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(a, init_parameter("blocks.2.layer.mlp.up_proj.weight", (1024, 384), torch.float32, spec, 0))
    assert not torch.equal(a, init_parameter("blocks.3.layer.mlp.up_proj.weight", (1024, 384), torch.float32,
                                             spec, 0))
    assert not torch.equal(a, init_parameter("blocks.2.layer.mlp.up_proj.weight", (1024, 384), torch.float32,
                                             spec, 1))
    bf16 = init_parameter("blocks.2.layer.mlp.up_proj.weight", (1024, 384), torch.bfloat16, spec, 0)
    assert torch.equal(bf16, a.to(torch.bfloat16))  # drawn in fp32, then rounded


def test_meta_params_build_keeps_buffers_and_allocates_no_parameter() -> None:
    spec = PRESETS["llama-tiny"].model_copy(update={"tied_embeddings": True})
    full, empty = build_model(spec, seed=0), build_model(spec, seed=0, meta_params=True)
    assert all(p.is_meta for p in empty.parameters())
    assert empty.head.lm_head.weight is empty.embed.embed_tokens.weight  # the tie survives
    buffers = dict(full.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in empty.named_buffers())


def test_factory_model_keeps_its_own_initialization() -> None:
    spec = PRESETS["llama-tiny"].model_copy(update={"family": "custom", "factory": "x:y"})
    with pytest.raises(ModelSpecError, match="own initialization"):
        init_parameter("embed.weight", (4, 4), torch.float32, spec, 0)
