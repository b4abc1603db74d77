"""`paraplan estimate --backend`: the backend cost profiles reach the CLI (memory by hand), bad names exit 1."""

from __future__ import annotations

import json

import pytest

from conftest import assert_user_error, run_cli as run

ARGS = ["estimate", "llama3-8b", "--cluster", "8xH100-80GB", "--global-batch", "64", "--seq-len", "4096",
        "--tp", "1", "--pp", "1", "--dp", "8", "--micro-batch", "1", "--zero", "1", "--json"]


def _json(*extra):
    result = run(*ARGS, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_megatron_profile_keeps_fp32_main_grads():
    generic, mega = _json(), _json("--backend", "megatron")
    assert generic["backend"] is None and mega["backend"] == "megatron"
    g, m = generic["memory_breakdown_bytes"], mega["memory_breakdown_bytes"]
    # ZeRO-1: gradients unsharded, 2 bytes generic vs Megatron's 4-byte fp32 main grads; optimizer 12/d both.
    assert m["grads"] == pytest.approx(2 * g["grads"])
    assert m["params"] == pytest.approx(g["params"]) and m["optimizer"] == pytest.approx(g["optimizer"])


def test_backend_any_is_never_cheaper_than_deepspeed_or_torch():
    runs = {b: _json("--backend", b) for b in ("any", "deepspeed", "torch")}
    for b in ("deepspeed", "torch"):
        assert runs["any"]["step_time_s"] >= runs[b]["step_time_s"] * (1 - 1e-9)
        assert runs["any"]["peak_memory_bytes"] >= runs[b]["peak_memory_bytes"] * (1 - 1e-9)


def test_unknown_backend_is_a_user_error():
    assert_user_error(run(*ARGS, "--backend", "colossal"), "--backend colossal", "deepspeed, torch, megatron")
