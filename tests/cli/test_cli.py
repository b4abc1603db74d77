"""CLI behaviour a user sees: tables, --json keys, and clear errors with exit code 1 and no traceback."""

from __future__ import annotations

import json

import pytest

from conftest import assert_user_error, run_cli as run
from paraplan.cli.app import parse_strategy
from paraplan.types import Plan


def test_models_lists_presets_with_counts():
    result = run("models")
    assert result.exit_code == 0
    for name in ("llama-tiny", "llama-small", "llama3-8b", "llama3-70b", "llama3-405b", "gpt3-175b"):
        assert name in result.output
    assert "8.03B" in result.output


def test_plan_json_summary(tmp_path):
    out = tmp_path / "plan.json"
    result = run("plan", "llama3-8b", "--cluster", "8xH100-80GB", "--global-batch", "64", "--seq-len", "4096",
                 "--json", "-o", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    s, p = summary["strategy"], summary["predicted"]
    assert s["dp"] * s["tp"] * s["pp"] == 8
    assert 64 % (s["dp"] * s["micro_batch_size"]) == 0
    assert 0 < p["peak_memory_bytes"] <= 0.95 * 80 * 2**30  # the default --memory-fraction
    assert p["step_time_s"] > 0 and 0 < p["mfu"] < 1
    plan = json.loads(out.read_text())
    assert plan["schema_version"] == 1 and plan["solver"]["status"] in ("optimal", "feasible")


@pytest.mark.parametrize("forced,key,value", [("dp=2", "dp", 2), ("pp=2", "pp", 2), ("tp=2", "tp", 2),
                                              ("dp=2,zero=3", "zero_stage", 3)])
def test_strategy_override_is_honoured(tmp_path, forced, key, value):
    result = run("plan", "llama-tiny", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64",
                 "--strategy", forced, "--json", "-o", str(tmp_path / "p.json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["strategy"][key] == value


def test_unknown_preset(tmp_path):
    out = tmp_path / "plan.json"
    result = run("plan", "llama-huge", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64", "-o", str(out))
    assert_user_error(result, "unknown model 'llama-huge'", "llama-tiny")
    assert not out.exists()


def test_malformed_cluster_file_lists_errors(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("nodes: 0\ndevices_per_node: eight\ndevice: H100-80GB\n")
    result = run("plan", "llama-tiny", "--cluster", str(bad), "--global-batch", "8", "--seq-len", "64",
                 "-o", str(tmp_path / "p.json"))
    assert_user_error(result, "is invalid", "nodes", "devices_per_node")
    # A catalog device brings its node's links, host memory and NVMe: only the fields really wrong are listed.
    assert "intra_node_bandwidth_bytes_per_s" not in result.output


def test_malformed_model_file_lists_errors(tmp_path):
    bad = tmp_path / "model.json"
    bad.write_text(json.dumps({"family": "llama", "n_layers": 2, "hidden": 64}))
    result = run("plan", str(bad), "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64")
    assert_user_error(result, "is invalid", "ffn_hidden")


def test_global_batch_not_divisible(tmp_path):
    result = run("plan", "llama-tiny", "--cluster", "cpu:2", "--global-batch", "3", "--seq-len", "64",
                 "--strategy", "dp=2", "-o", str(tmp_path / "p.json"))
    assert_user_error(result, "global batch 3 is not divisible")


def test_model_that_fits_no_plan_says_what_it_needs(tmp_path):
    out = tmp_path / "p.json"
    result = run("plan", "llama3-405b", "--cluster", "1xL4-24GB", "--global-batch", "8", "--seq-len", "4096",
                 "-o", str(out))
    assert_user_error(result, "no plan fits", "needs", "per device", "more devices")
    assert not out.exists()


def test_bad_strategy_key():
    result = run("plan", "llama-tiny", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64",
                 "--strategy", "dq=2")
    assert_user_error(result, "--strategy 'dq=2'")


@pytest.mark.parametrize("forced,fragment", [
    ("offload=maybe", "'none', 'cpu' or 'nvme'"),  # used to be read silently as offload=false
    ("recompute=some", "'none', 'selective', 'op' or 'full'"),
    ("dp=two", "valid integer"),
    ("mb=0", "greater than 0"),
    ("zero=4", "less than or equal to 3"),
])
def test_bad_strategy_values_name_what_was_written(forced, fragment):
    result = run("plan", "llama-tiny", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64",
                 "--strategy", f"tp=1,{forced}")
    assert_user_error(result, "--strategy is invalid", forced, fragment)


def test_strategy_values_are_converted():
    override = parse_strategy("dp=2,mb=4,zero=3,offload=true,recompute=full")
    assert (override.dp, override.micro_batch_size, override.zero_stage) == (2, 4, 3)
    assert override.offload_optimizer == "cpu" and override.recompute == "full"
    assert parse_strategy("offload=no").offload_optimizer == "none"
    tiers = parse_strategy("zero=3,offload=nvme,offload_param=cpu,offload_ratio=0.5,offload_act=false")
    assert (tiers.offload_optimizer, tiers.offload_param, tiers.offload_ratio, tiers.offload_activations) == (
        "nvme", "cpu", 0.5, False)


def test_launch_world_size_mismatch(tmp_path):
    plan = tmp_path / "plan.json"
    assert run("plan", "llama3-8b", "--cluster", "8xH100-80GB", "--global-batch", "64", "--seq-len", "2048",
               "-o", str(plan)).exit_code == 0
    result = run("launch", str(plan), "--backend", "torch", "--run-dir", str(tmp_path / "run"))
    assert_user_error(result, "needs 8 CUDA devices")


def test_profile_mismatch_is_reported(tmp_path):
    result = run("plan", "llama-tiny", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64",
                 "--profile", str(tmp_path / "missing.json"))
    assert_user_error(result, "does not exist", "paraplan profile")


@pytest.mark.parametrize("fraction", [0.95, 0.5])
def test_plan_respects_memory_fraction(tmp_path, fraction):
    result = run("plan", "llama3-8b", "--cluster", "8xH100-80GB", "--global-batch", "64", "--seq-len", "8192",
                 "--memory-fraction", str(fraction), "--json", "-o", str(tmp_path / "p.json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["predicted"]["peak_memory_bytes"] <= fraction * 80 * 2**30


def test_device_memory_budget_forces_nvme_offload_on_cpu(tmp_path):
    # llama-small in fp32 keeps 16 B x 101M = 1.6 GB of model states; on cpu:2 with 1 GiB per process no plan fits
    # on the device (the 0.6 GiB process overhead included), so the DeepSpeed plan puts states on NVMe.
    out = tmp_path / "p.json"
    result = run("plan", "llama-small", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "256",
                 "--device-memory", "1GiB", "--backend", "deepspeed", "-o", str(out))
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate_json(out.read_text())
    assert plan.cluster.device.memory_bytes == 2**30 and plan.strategy.zero_stage == 3
    assert "nvme" in (plan.strategy.offload_optimizer, plan.strategy.offload_param)
    assert plan.predicted.peak_memory_bytes <= 0.95 * 2**30 and plan.predicted.nvme_bytes > 0
    # The same budget in a cluster file (device: cpu is this machine, like cpu:N).
    cfile = tmp_path / "c.yaml"
    cfile.write_text("nodes: 1\ndevices_per_node: 2\ndevice: cpu\ndevice_memory: 1GiB\n")
    again = run("plan", "llama-small", "--cluster", str(cfile), "--global-batch", "8", "--seq-len", "256",
                "--backend", "deepspeed", "--json", "-o", str(tmp_path / "q.json"))
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["strategy"]["offload_param"] == plan.strategy.offload_param
    # Without the tiers it cannot fit; a bad budget is refused.
    none = run("plan", "llama-small", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "256",
               "--device-memory", "1GiB", "--strategy", "offload=none,offload_param=none,offload_act=false",
               "-o", str(tmp_path / "r.json"))
    assert_user_error(none, "no plan fits")
    bad = run("plan", "llama-small", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "256",
              "--device-memory", "lots", "-o", str(tmp_path / "s.json"))
    assert_user_error(bad, "device memory budget", "1.5GiB")
