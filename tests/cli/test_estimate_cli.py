"""`paraplan estimate`: the table, the --json keys, model files, and user errors (exit 1, no traceback)."""

from __future__ import annotations

import json

import pytest

from conftest import assert_user_error, run_cli as run

BASE = ["--cluster", "8xH100-80GB", "--global-batch", "64", "--seq-len", "4096"]


def test_json_has_the_issue_keys_and_consistent_values():
    result = run("estimate", "llama3-8b", *BASE, "--tp", "2", "--pp", "2", "--dp", "2", "--micro-batch", "1",
                 "--vpp", "2", "--sequence-parallel", "--recompute", "selective", "--zero", "1", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    for key in ("step_time_s", "model_tflops_per_device", "mfu", "hfu", "peak_memory_bytes"):
        assert out[key] > 0
    parts = out["memory_breakdown_bytes"]
    assert set(parts) == {"params", "grads", "optimizer", "activations", "other"}
    assert sum(parts.values()) == pytest.approx(out["peak_memory_bytes"])
    # MFU is model TFLOP/s over the dense bf16 peak; HFU adds the recomputed attention core, so it is larger.
    assert out["mfu"] == pytest.approx(out["model_tflops_per_device"] * 1e12 / 989e12)
    assert out["hfu"] > out["mfu"]
    assert out["stage_blocks"] == [16, 16] and out["grad_accum"] == 32
    assert "Korthikanti" in out["flop_count"]


def test_table_names_the_flop_count_and_the_memory_breakdown():
    result = run("estimate", "llama3-70b", "--cluster", "4x8xH100-80GB", "--global-batch", "64", "--seq-len", "4096",
                 "--tp", "8", "--pp", "4", "--dp", "1", "--micro-batch", "1", "--recompute", "full")
    assert result.exit_code == 0, result.output
    for frag in ("MFU", "HFU", "step time", "peak memory per device", "activations", "FLOP count"):
        assert frag in result.output


def test_model_file_with_dimensions_not_in_a_preset(tmp_path):
    model = tmp_path / "gpt-1b.yaml"
    model.write_text("family: gpt\nn_layers: 24\nhidden: 2048\nffn_hidden: 8192\nn_heads: 16\nn_kv_heads: 16\n"
                     "vocab: 50257\ntied_embeddings: true\nmax_seq_len: 2048\n")
    result = run("estimate", str(model), "--cluster", "8xA100-80GB", "--global-batch", "64", "--seq-len", "2048",
                 "--tp", "1", "--pp", "1", "--dp", "8", "--micro-batch", "8", "--zero", "2", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert 0 < out["mfu"] < 1 and out["fits"]


@pytest.mark.parametrize("args,fragments", [
    (["--tp", "1", "--pp", "1", "--dp", "4", "--micro-batch", "1"], ["must equal the 8 devices"]),
    (["--tp", "1", "--pp", "1", "--dp", "8", "--micro-batch", "3"], ["not divisible by dp x micro-batch"]),
    (["--tp", "1", "--pp", "1", "--dp", "8", "--micro-batch", "1", "--recompute", "some"],
     ["--recompute some", "none, selective, op or full"]),
    (["--tp", "1", "--pp", "1", "--dp", "8", "--micro-batch", "1", "--zero", "4"], ["--zero 4"]),
])
def test_user_errors_exit_1_with_what_to_change(args, fragments):
    assert_user_error(run("estimate", "llama3-8b", *BASE, *args), *fragments)


def test_unknown_model_is_a_user_error():
    result = run("estimate", "llama-huge", *BASE, "--tp", "1", "--pp", "1", "--dp", "8", "--micro-batch", "1")
    assert_user_error(result, "unknown model 'llama-huge'")


def test_stage_blocks_express_uneven_layouts():
    base = ["estimate", "llama3-405b", "--cluster", "2048x8xH100-80GB", "--global-batch", "2048", "--seq-len",
            "8192", "--tp", "8", "--pp", "16", "--dp", "128", "--micro-batch", "1", "--sequence-parallel", "--json"]
    # Llama 3 405B's layout (Dubey et al. 2024 sec. 3.3.2): 126 blocks on pp 16 with one block fewer on the first
    # and last stage, interleaved; it used to be refused ("blocks divisible by pp x vpp").
    meta = [7] + [8] * 14 + [7]
    result = run(*base, "--vpp", "8", "--stage-blocks", ",".join(map(str, meta)))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["stage_blocks"] == meta
    # Giving the default split explicitly changes nothing.
    even = run(*base)
    explicit = run(*base, "--stage-blocks", ",".join(map(str, json.loads(even.output)["stage_blocks"])))
    assert json.loads(explicit.output) == json.loads(even.output)
    assert_user_error(run(*base, "--stage-blocks", "7,8"), "add up to the model's 126 blocks")
    assert_user_error(run(*base, "--stage-blocks", "a,b"), "comma-separated integers")
